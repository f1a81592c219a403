//! The handler table: every message with a hand-written implementation.

pub mod network;
pub mod storage;
pub mod vm;

use crate::auth::passwords::hash_password;
use crate::context::{AsyncHandler, Handler, Server, SyncHandler};
use crate::core::alerts::create_message;
use crate::core::call::{ApiResult, BoxFut, Ctx, void};
use crate::ops::host::refresh_certificate;
use crate::ops::message::messages_since;
use crate::ops::session::{change_password, login};
use crate::ops::user::{create_local_user, is_root_user, user_create, user_destroy};
use corral_model::args::{Args, event, host, message, session, task, user};
use corral_model::errors;
use corral_model::schema::{Role, class, field};
use corral_model::{ApiError, Value};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

pub fn table() -> HashMap<String, Handler> {
    let mut t = Table::default();
    t.on_sync(|s, c, _: session::Logout| {
        s.sessions.logout(s, &c.session);
        void()
    });
    t.on_sync(|s, c, _: session::LocalLogout| {
        s.sessions.logout(s, &c.session);
        void()
    });
    t.untyped("user.destroy", untyped_sync(user_destroy));
    t.untyped("user.create", untyped_sync(user_create));
    t.on_sync(|s, _, _: host::RefreshServerCertificate| refresh_certificate(s));
    t.on_sync(|s, _, _: host::EmergencyResetServerCertificate| refresh_certificate(s));
    t.on_sync(|s, _, a: task::Destroy| {
        let r = a.self_.as_str();
        if !s.db.read().exists(class::TASK, r) {
            return Err(ApiError::handle_invalid("task", r));
        }
        s.task_destroy(r);
        void()
    });
    t.on_sync(|s, c, a: task::Create| s.client_task_create(c, &a.label, &a.description));
    t.on_sync(|s, _, a: task::Cancel| {
        s.cancel_task(a.task.as_str())?;
        void()
    });
    t.on_sync(|s, c, a: event::Register| crate::ops::event::register(s, c, a.classes, true));
    t.on_sync(|s, c, a: event::Unregister| crate::ops::event::register(s, c, a.classes, false));
    t.on_sync(|s, _, _: event::GetCurrentId| Ok(Value::Int(s.db.read().generation() as i64)));
    t.on_sync(|s, _, a: event::Inject| crate::ops::event::inject(s, &a.class, &a.ref_));
    t.on_sync(|s, _, a: message::Create| {
        let cls = a.cls.as_str();
        create_message(&s.db, &a.name, a.priority, cls, &a.obj_uuid, &a.body).map(Value::String)
    });
    t.on_sync(|s, _, a: message::Destroy| {
        s.db.write(|t| t.delete(class::MESSAGE, a.self_.as_str()))
            .map_err(ApiError::from)?;
        void()
    });
    t.on_sync(|s, _, a: message::GetSince| messages_since(s, None, &a.since));
    t.on_sync(|s, _, a: message::Get| {
        messages_since(s, Some((a.cls.as_str(), &a.obj_uuid)), &a.since)
    });
    t.on_sync(|s, _, a: user::CreateLocal| create_local_user(s, a));
    t.on_sync(|s, c, a: user::SetPassword| {
        let r = a.self_.as_str();
        if !s.db.read().exists(class::USER, r) {
            return Err(ApiError::handle_invalid("user", r));
        }
        if is_root_user(s, r) && c.role != Role::Root {
            return Err(errors::user_is_not_local_superuser(
                "only root changes root's password (session.change_password)",
            ));
        }
        let h = hash_password(&a.new_pwd)?;
        s.db.write(|t| t.set(field::user::PASSWORD_HASH, r, Value::String(h.clone())))
            .map_err(ApiError::from)?;
        // The old password's sessions end with it (the caller's own stays).
        s.sessions.revoke_user(s, r, Some(&c.session));
        void()
    });
    crate::dispatch::registry::network::register(&mut t);
    crate::dispatch::registry::storage::register(&mut t);
    crate::dispatch::registry::vm::register(&mut t);
    // The logins also see the transport (dispatch appends it).
    t.untyped(
        "session.login_with_password",
        untyped_async(|s, _, p| Box::pin(login(s, p))),
    );
    t.untyped(
        "session.slave_local_login_with_password",
        untyped_async(|s, _, p| Box::pin(login(s, p))),
    );
    t.on(|s, c, a: event::From| crate::ops::event::from(s, c, a.classes, a.token, a.timeout));
    t.on(|s, c, _: event::Next| crate::ops::event::next(s, c));
    t.on(|s, c, a: session::ChangePassword| change_password(s, c, a.old_pwd, a.new_pwd));
    t.into_map()
}

/// The handler table as it is built: typed handlers are keyed by their
/// message's wire name and decode its argument struct once, here.
#[derive(Default)]
pub struct Table(HashMap<String, Handler>);

impl Table {
    /// An operation of message `A` (an async fn of the server, the call's
    /// context and `A`'s arguments).
    pub fn on<A, F, Fut>(&mut self, f: F)
    where
        A: Args + Send + 'static,
        F: Fn(Arc<Server>, Ctx, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ApiResult> + Send + 'static,
    {
        let h: Arc<AsyncHandler> = Arc::new(move |s, c, p| match A::from_params(p) {
            Ok(a) => Box::pin(f(s, c, a)),
            Err(e) => Box::pin(async move { Err(e) }),
        });
        self.0.insert(A::WIRE.to_owned(), Handler::Async(h));
    }

    /// A message of `A` answered at once, without a task's worth of work.
    pub fn on_sync<A, F>(&mut self, f: F)
    where
        A: Args + 'static,
        F: Fn(&Arc<Server>, &Ctx, A) -> ApiResult + Send + Sync + 'static,
    {
        let h: Arc<SyncHandler> = Arc::new(move |s, c, p| f(s, c, A::from_params(p)?));
        self.0.insert(A::WIRE.to_owned(), Handler::Sync(h));
    }

    /// A message without an argument struct: the implicit constructors and
    /// destructors with checks of their own, and the logins (which also see
    /// the transport).
    pub fn untyped(&mut self, wire: &str, h: Handler) {
        self.0.insert(wire.to_owned(), h);
    }

    pub fn into_map(self) -> HashMap<String, Handler> {
        self.0
    }
}

/// An untyped async handler.
pub fn untyped_async(f: fn(Arc<Server>, Ctx, Vec<Value>) -> BoxFut) -> Handler {
    Handler::Async(Arc::new(f))
}

/// An untyped sync handler.
pub fn untyped_sync(f: fn(&Arc<Server>, &Ctx, Vec<Value>) -> ApiResult) -> Handler {
    Handler::Sync(Arc::new(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_model::ClassId;

    /// Every hand-written handler answers a message the spec declares (or
    /// an implicit constructor, destructor or setter of its class): a
    /// handler under a misspelt or removed name would never be called.
    #[test]
    fn every_handler_is_for_a_declared_message() {
        let t = table();
        assert!(t.len() > 60, "the table has {} handlers", t.len());
        for wire in t.keys() {
            let (class, message) = wire.split_once('.').expect("Class.message");
            let c = ClassId::by_name(class).unwrap_or_else(|| panic!("{wire}: no class {class}"));
            let def = c.def();
            let declared = def.messages.iter().any(|m| m.name == message);
            let implicit = def.implicit.iter().any(|(m, _)| *m == message)
                || message
                    .strip_prefix("set_")
                    .is_some_and(|f| def.fields.iter().any(|x| x.name == f));
            assert!(declared || implicit, "{wire} is not in the spec");
        }
    }
}
