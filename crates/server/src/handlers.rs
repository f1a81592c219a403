//! Hand-written message implementations, keyed by wire name. Anything the
//! datamodel declares without an entry here is not callable yet and is left
//! out of `system.listMethods`.

use crate::api::{ApiResult, BoxFut, Ctx, Handler, Server, pstr, void};
use crate::sessions::hash_password;
#[allow(unused_imports)]
use corral_model::FieldId;
use corral_model::schema::{Role, class, field};
use corral_model::{ApiError, Value, date, new_ref};
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
        crate::events::register(s, c, set_of(p), true)
    });
    sync("event.unregister", |s, c, p| {
        crate::events::register(s, c, set_of(p), false)
    });
    sync("event.get_current_id", |s, _, _| {
        Ok(Value::Int(s.db.read().generation() as i64))
    });
    sync("event.inject", |s, _, p| {
        let mut p = p.into_iter();
        let (c, r) = (pstr(&mut p), pstr(&mut p));
        crate::events::inject(s, &c, &r)
    });
    sync("message.create", |s, _, p| {
        let mut p = p.into_iter();
        let name = pstr(&mut p);
        let prio = p.next().and_then(|v| v.as_int()).unwrap_or(5);
        let (cls, obj, body) = (pstr(&mut p), pstr(&mut p), pstr(&mut p));
        create_message(s, &name, prio, &cls, &obj, &body).map(Value::String)
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
            return Err(ApiError::new(
                "USER_IS_NOT_LOCAL_SUPERUSER",
                ["only root changes root's password (session.change_password)"],
            ));
        }
        let h = hash_password(&pwd)?;
        s.db.write(|t| t.set(field::user::PASSWORD_HASH, &r, Value::String(h.clone())))
            .map_err(ApiError::from)?;
        // The old password's sessions end with it (the caller's own stays).
        s.sessions.revoke_user(s, &r, Some(&c.session));
        void()
    });
    crate::storage::register(&mut t);
    crate::vm::register(&mut t);
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
            crate::events::from(s, c, classes, tok, timeout).await
        })
    });
    asyn("event.next", |s, c, _| Box::pin(crate::events::next(s, c)));
    asyn("session.change_password", |s, c, p| {
        Box::pin(change_password(s, c, p))
    });
    t
}

fn set_of(p: Vec<Value>) -> Vec<String> {
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

async fn login(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    // Declared params (uname, pwd[, version, originator]) then what the
    // dispatcher appends about the transport: local flag, address, header.
    let n = p.len();
    let mut it = p.into_iter();
    let uname = pstr(&mut it);
    let pwd = pstr(&mut it);
    let rest: Vec<String> = it
        .map(|v| v.as_str().unwrap_or_default().to_owned())
        .collect();
    let (declared, transport) = rest.split_at(rest.len().saturating_sub(3));
    let originator = if n >= 7 {
        declared.get(1).cloned().unwrap_or_default()
    } else {
        String::new()
    };
    let local = transport.first().map(String::as_str) == Some("local");
    let addr = transport.get(1).and_then(|a| a.parse().ok());
    let originator = if originator.is_empty() {
        transport.get(2).cloned().unwrap_or_default()
    } else {
        originator
    };
    s.sessions
        .login(&s, &uname, &pwd, &originator, local, addr)
        .await
        .map(Value::String)
}

/// A new self-signed certificate for this host, served from now on.
fn refresh_certificate(s: &Arc<Server>) -> ApiResult {
    let cert = s
        .tls_cert
        .get()
        .ok_or_else(|| ApiError::internal("this host serves no TLS"))?;
    cert.refresh()
        .map_err(|e| ApiError::internal(format!("certificate refresh failed: {e}")))?;
    void()
}

/// The user record named "root" (the local superuser).
fn is_root_user(s: &Server, user: &str) -> bool {
    s.db.read()
        .get_str(field::user::SHORT_NAME, user)
        .as_deref()
        == Some("root")
}

/// `user.destroy`: never root; the user's sessions end with it.
fn user_destroy(s: &Arc<Server>, _: &Ctx, p: Vec<Value>) -> ApiResult {
    let r = pstr(&mut p.into_iter());
    if !s.db.read().exists(class::USER, &r) {
        return Err(ApiError::handle_invalid("user", &r));
    }
    if is_root_user(s, &r) {
        return Err(ApiError::new(
            "USER_IS_NOT_LOCAL_SUPERUSER",
            ["the local superuser cannot be destroyed"],
        ));
    }
    s.db.write(|t| t.delete(class::USER, &r))
        .map_err(ApiError::from)?;
    s.sessions.revoke_user(s, &r, None);
    void()
}

/// Generic `user.create` with `user.create_local`'s checks: a non-empty
/// short name, unique, never a second "root".
fn user_create(s: &Arc<Server>, _: &Ctx, p: Vec<Value>) -> ApiResult {
    let args = p.into_iter().next().unwrap_or(Value::Nil);
    let given = crate::api::create_fields(class::USER, &args)?;
    let name = given
        .iter()
        .find(|(i, _)| *i == field::user::SHORT_NAME.index)
        .map(|(_, v)| v.db_string())
        .unwrap_or_default();
    if name.is_empty() || name == "root" {
        return Err(ApiError::invalid_value("short_name", &name));
    }
    let r = new_ref();
    s.db.write(|t| {
        assert_unique_user(t.state(), &name)?;
        t.create(class::USER, &r, given)
    })
    .map_err(ApiError::from)?;
    Ok(Value::String(r))
}

fn assert_unique_user(st: &corral_db::State, name: &str) -> Result<(), ApiError> {
    if st
        .refs(class::USER)
        .any(|u| st.get_str(field::user::SHORT_NAME, u).as_deref() == Some(name))
    {
        return Err(ApiError::new(
            "DB_UNIQUENESS_CONSTRAINT_VIOLATION",
            ["user", "short_name", name],
        ));
    }
    Ok(())
}

/// `session.change_password`: the old password is checked under the same
/// throttle as logins (keyed on the caller's user name), and the user's
/// other sessions end.
async fn change_password(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let mut p = p.into_iter();
    let (old, new) = (pstr(&mut p), pstr(&mut p));
    let (user, hash) = {
        let st = s.db.read();
        let user = st
            .refs(class::USER)
            .find(|r| st.get_str(field::user::SHORT_NAME, r).as_deref() == Some(c.user.as_str()))
            .cloned();
        let hash = user
            .as_ref()
            .and_then(|u| st.get_str(field::user::PASSWORD_HASH, u));
        (user, hash)
    };
    let (Some(user), Some(hash)) = (user, hash) else {
        return Err(ApiError::new(
            "USER_IS_NOT_LOCAL_SUPERUSER",
            [c.user.as_str()],
        ));
    };
    let key = (None, c.user.clone());
    if !s.sessions.verify_throttled(&s, key, Some(hash), &old).await {
        return Err(ApiError::new(
            "SESSION_AUTHENTICATION_FAILED",
            [c.user.as_str(), "Old password does not match"],
        ));
    }
    let h = hash_password(&new)?;
    s.db.write(|t| t.set(field::user::PASSWORD_HASH, &user, Value::String(h.clone())))
        .map_err(ApiError::from)?;
    s.sessions.revoke_user(&s, &user, Some(&c.session));
    void()
}

fn create_local_user(s: &Arc<Server>, _: &Ctx, p: Vec<Value>) -> ApiResult {
    let mut p = p.into_iter();
    let (name, full, pwd, role) = (pstr(&mut p), pstr(&mut p), pstr(&mut p), pstr(&mut p));
    if name.is_empty() || name == "root" {
        return Err(ApiError::invalid_value("short_name", &name));
    }
    Role::from_name(&role).ok_or_else(|| ApiError::code("ROLE_NOT_FOUND"))?;
    let h = hash_password(&pwd)?;
    let r = new_ref();
    s.db.write(|t| {
        let st = t.state();
        assert_unique_user(st, &name)?;
        let role_ref = st
            .refs(class::ROLE)
            .find(|x| {
                st.get_str(field::role::NAME_LABEL, x)
                    .is_some_and(|n| n.eq_ignore_ascii_case(&role))
            })
            .cloned()
            .ok_or_else(|| ApiError::code("ROLE_NOT_FOUND"))?;
        t.create(
            class::USER,
            &r,
            vec![
                (field::user::SHORT_NAME.index, Value::String(name.clone())),
                (field::user::FULLNAME.index, Value::String(full.clone())),
                (field::user::PASSWORD_HASH.index, Value::String(h.clone())),
                (field::user::ROLES.index, Value::string_set([role_ref])),
            ],
        )
    })
    .map_err(ApiError::from)?;
    Ok(Value::String(r))
}

/// The record part of `VM.clone`/`VM.copy`: a new Halted VM copied from
/// `src` (its disks are the caller's business).
pub fn vm_clone_record(s: &Server, src: &str, name: &str) -> Result<String, ApiError> {
    let (src, name) = (src.to_owned(), name.to_owned());
    let r = new_ref();
    s.db.write(|t| {
        let st = t.state();
        let row = st
            .row(class::VM, &src)
            .ok_or_else(|| ApiError::handle_invalid("VM", &src))?;
        let power = st.get_str(field::vm::POWER_STATE, &src).unwrap_or_default();
        if power != "Halted" {
            return Err(ApiError::new(
                "VM_BAD_POWER_STATE",
                [src.as_str(), "halted", power.to_lowercase().as_str()],
            ));
        }
        let mut fields: Vec<(usize, Value)> = row.fields.iter().cloned().enumerate().collect();
        let set = |fields: &mut Vec<(usize, Value)>, f: corral_model::FieldId, v: Value| {
            fields[f.index].1 = v
        };
        set(&mut fields, field::vm::UUID, Value::str(""));
        set(
            &mut fields,
            field::vm::NAME_LABEL,
            Value::String(name.clone()),
        );
        set(
            &mut fields,
            field::vm::IS_DEFAULT_TEMPLATE,
            Value::Bool(false),
        );
        set(
            &mut fields,
            field::vm::ALLOWED_OPERATIONS,
            Value::Array(vec![]),
        );
        set(
            &mut fields,
            field::vm::CURRENT_OPERATIONS,
            Value::Struct(vec![]),
        );
        set(
            &mut fields,
            field::vm::RESIDENT_ON,
            Value::str(corral_model::NULL_REF),
        );
        set(
            &mut fields,
            field::vm::SNAPSHOT_OF,
            Value::str(corral_model::NULL_REF),
        );
        set(&mut fields, field::vm::PARENT, Value::str(&src));
        if let Value::Struct(oc) = &mut fields[field::vm::OTHER_CONFIG.index].1 {
            oc.retain(|(k, _)| k != "default_template");
        }
        set(
            &mut fields,
            field::vm::METRICS,
            Value::str(corral_model::NULL_REF),
        );
        set(
            &mut fields,
            field::vm::GUEST_METRICS,
            Value::str(corral_model::NULL_REF),
        );
        set(&mut fields, field::vm::POWER_STATE, Value::str("Halted"));
        set(&mut fields, field::vm::DOMID, Value::Int(-1));
        set(
            &mut fields,
            field::vm::SUSPEND_VDI,
            Value::str(corral_model::NULL_REF),
        );
        fields.retain(|(i, _)| class::VM.def().fields[*i].rel.is_none());
        t.create(class::VM, &r, fields)?;
        crate::vm::refresh_allowed(t, &r)
    })
    .map_err(ApiError::from)?;
    Ok(r)
}

/// Creates an alert (`message` object).
pub fn create_message(
    s: &Server,
    name: &str,
    priority: i64,
    cls: &str,
    obj_uuid: &str,
    body: &str,
) -> Result<String, ApiError> {
    let r = new_ref();
    s.db.write(|t| {
        t.create(
            class::MESSAGE,
            &r,
            vec![
                (field::message::NAME.index, Value::str(name)),
                (field::message::PRIORITY.index, Value::Int(priority)),
                (field::message::CLS.index, Value::str(cls)),
                (field::message::OBJ_UUID.index, Value::str(obj_uuid)),
                (
                    field::message::TIMESTAMP.index,
                    Value::DateTime(date::now()),
                ),
                (field::message::BODY.index, Value::str(body)),
            ],
        )
    })
    .map_err(ApiError::from)?;
    Ok(r)
}

fn messages_since(s: &Server, filter: Option<(&str, &str)>, since: &str) -> ApiResult {
    let since = date::parse(since).unwrap_or(0);
    let st = s.db.read();
    let mut out = Vec::new();
    for r in st.refs(class::MESSAGE) {
        let ts = st
            .get_str(field::message::TIMESTAMP, r)
            .and_then(|t| date::parse(&t))
            .unwrap_or(0);
        if ts <= since {
            continue;
        }
        if let Some((cls, obj)) = filter {
            if st.get_str(field::message::CLS, r).as_deref() != Some(cls)
                || st.get_str(field::message::OBJ_UUID, r).as_deref() != Some(obj)
            {
                continue;
            }
        }
        if let Some(rec) = st.record(class::MESSAGE, r) {
            out.push((r.clone(), rec));
        }
    }
    Ok(Value::Struct(out))
}

impl Server {
    pub fn host_uuid(&self) -> String {
        self.db
            .read()
            .get_str(field::host::UUID, &self.host_ref)
            .unwrap_or_default()
    }
    /// Tasks created by `Async.*` calls have a worker; `task.create` ones do not.
    pub fn task_has_worker(&self, task: &str) -> bool {
        self.workers
            .lock()
            .map(|w| w.contains(task))
            .unwrap_or(false)
    }
}
