//! The handler table: every message with a hand-written implementation.

pub mod storage;
pub mod vm;

use crate::auth::passwords::hash_password;
use crate::context::{Handler, Server};
use crate::core::alerts::create_message;
use crate::core::call::{ApiResult, BoxFut, Ctx, pstr, void};
use crate::ops::host::refresh_certificate;
use crate::ops::message::messages_since;
use crate::ops::session::{change_password, login};
use crate::ops::user::{create_local_user, is_root_user, user_create, user_destroy};
use corral_model::errors;
use corral_model::schema::{Role, class, field};
use corral_model::{ApiError, Value};
use std::collections::HashMap;
use std::sync::Arc;

pub fn table() -> HashMap<String, Handler> {
    let mut t: HashMap<String, Handler> = HashMap::new();
    let mut sync = |n: &str, f: fn(&Arc<Server>, &Ctx, Vec<Value>) -> ApiResult| {
        t.insert(n.to_owned(), Handler::Sync(f));
    };
    sync("session.logout", |s, c, _| {
        s.sessions.logout(s, &c.session);
        void()
    });
    sync("session.local_logout", |s, c, _| {
        s.sessions.logout(s, &c.session);
        void()
    });
    sync("user.destroy", user_destroy);
    sync("host.refresh_server_certificate", |s, _, _| {
        refresh_certificate(s)
    });
    sync("host.emergency_reset_server_certificate", |s, _, _| {
        refresh_certificate(s)
    });
    sync("user.create", user_create);
    sync("task.destroy", |s, _, p| {
        let r = pstr(&mut p.into_iter());
        if !s.db.read().exists(class::TASK, &r) {
            return Err(ApiError::handle_invalid("task", &r));
        }
        s.task_destroy(&r);
        void()
    });
    sync("task.create", |s, c, p| {
        let mut p = p.into_iter();
        let (label, descr) = (pstr(&mut p), pstr(&mut p));
        s.client_task_create(c, &label, &descr)
    });
    sync("task.cancel", |s, _, p| {
        s.cancel_task(&pstr(&mut p.into_iter()))?;
        void()
    });
    sync("event.register", |s, c, p| {
        crate::ops::event::register(s, c, set_of(p), true)
    });
    sync("event.unregister", |s, c, p| {
        crate::ops::event::register(s, c, set_of(p), false)
    });
    sync("event.get_current_id", |s, _, _| {
        Ok(Value::Int(s.db.read().generation() as i64))
    });
    sync("event.inject", |s, _, p| {
        let mut p = p.into_iter();
        let (c, r) = (pstr(&mut p), pstr(&mut p));
        crate::ops::event::inject(s, &c, &r)
    });
    sync("message.create", |s, _, p| {
        let mut p = p.into_iter();
        let name = pstr(&mut p);
        let prio = p.next().and_then(|v| v.as_int()).unwrap_or(5);
        let (cls, obj, body) = (pstr(&mut p), pstr(&mut p), pstr(&mut p));
        create_message(&s.db, &name, prio, &cls, &obj, &body).map(Value::String)
    });
    sync("message.destroy", |s, _, p| {
        let r = pstr(&mut p.into_iter());
        s.db.write(|t| t.delete(class::MESSAGE, &r))
            .map_err(ApiError::from)?;
        void()
    });
    sync("message.get_since", |s, _, p| {
        let since = pstr(&mut p.into_iter());
        messages_since(s, None, &since)
    });
    sync("message.get", |s, _, p| {
        let mut p = p.into_iter();
        let (cls, obj, since) = (pstr(&mut p), pstr(&mut p), pstr(&mut p));
        messages_since(s, Some((&cls, &obj)), &since)
    });
    sync("user.create_local", create_local_user);
    sync("user.set_password", |s, c, p| {
        let mut p = p.into_iter();
        let (r, pwd) = (pstr(&mut p), pstr(&mut p));
        if !s.db.read().exists(class::USER, &r) {
            return Err(ApiError::handle_invalid("user", &r));
        }
        if is_root_user(s, &r) && c.role != Role::Root {
            return Err(errors::user_is_not_local_superuser(
                "only root changes root's password (session.change_password)",
            ));
        }
        let h = hash_password(&pwd)?;
        s.db.write(|t| t.set(field::user::PASSWORD_HASH, &r, Value::String(h.clone())))
            .map_err(ApiError::from)?;
        // The old password's sessions end with it (the caller's own stays).
        s.sessions.revoke_user(s, &r, Some(&c.session));
        void()
    });
    crate::dispatch::registry::storage::register(&mut t);
    crate::dispatch::registry::vm::register(&mut t);
    let mut asyn = |n: &str, f: fn(Arc<Server>, Ctx, Vec<Value>) -> BoxFut| {
        t.insert(n.to_owned(), Handler::Async(f));
    };
    asyn("session.login_with_password", |s, _, p| {
        Box::pin(login(s, p))
    });
    asyn("session.slave_local_login_with_password", |s, _, p| {
        Box::pin(login(s, p))
    });
    asyn("event.from", |s, c, p| {
        Box::pin(async move {
            let mut p = p.into_iter();
            let classes = set_of(p.next().into_iter().collect());
            let tok = pstr(&mut p);
            let timeout = p.next().and_then(|v| v.as_float()).unwrap_or(0.0);
            crate::ops::event::from(s, c, classes, tok, timeout).await
        })
    });
    asyn("event.next", |s, c, _| {
        Box::pin(crate::ops::event::next(s, c))
    });
    asyn("session.change_password", |s, c, p| {
        Box::pin(change_password(s, c, p))
    });
    t
}

pub(crate) fn set_of(p: Vec<Value>) -> Vec<String> {
    p.into_iter()
        .next()
        .and_then(|v| {
            v.as_array().map(|a| {
                a.iter()
                    .map(|x| x.as_str().unwrap_or_default().to_owned())
                    .collect()
            })
        })
        .unwrap_or_default()
}
