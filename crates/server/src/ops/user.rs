//! user.* messages and the local users.

use crate::auth::passwords::hash_password;
use crate::context::Server;
use crate::core::call::{ApiResult, Ctx, pstr, void};
use corral_model::args::user;
use corral_model::errors;
use corral_model::schema::{Role, class, field};
use corral_model::{ApiError, Value, new_ref};
use std::sync::Arc;

/// The user record named "root" (the local superuser).
pub(crate) fn is_root_user(s: &Server, user: &str) -> bool {
    s.db.read()
        .get_str(field::user::SHORT_NAME, user)
        .as_deref()
        == Some("root")
}

/// `user.destroy`: never root; the user's sessions end with it.
pub(crate) fn user_destroy(s: &Arc<Server>, _: &Ctx, p: Vec<Value>) -> ApiResult {
    let r = pstr(&mut p.into_iter());
    if !s.db.read().exists(class::USER, &r) {
        return Err(ApiError::handle_invalid("user", &r));
    }
    if is_root_user(s, &r) {
        return Err(errors::user_is_not_local_superuser(
            "the local superuser cannot be destroyed",
        ));
    }
    s.db.write(|t| t.delete(class::USER, &r))
        .map_err(ApiError::from)?;
    s.sessions.revoke_user(s, &r, None);
    void()
}

/// Generic `user.create` with `user.create_local`'s checks: a non-empty
/// short name, unique, never a second "root".
pub(crate) fn user_create(s: &Arc<Server>, _: &Ctx, p: Vec<Value>) -> ApiResult {
    let args = p.into_iter().next().unwrap_or(Value::Nil);
    let given = crate::core::records::create_fields(class::USER, &args)?;
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

pub(crate) fn assert_unique_user(st: &corral_db::State, name: &str) -> Result<(), ApiError> {
    if st
        .refs(class::USER)
        .any(|u| st.get_str(field::user::SHORT_NAME, u).as_deref() == Some(name))
    {
        return Err(errors::db_uniqueness_constraint_violation(
            "user",
            "short_name",
            name,
        ));
    }
    Ok(())
}

pub(crate) fn create_local_user(s: &Arc<Server>, a: user::CreateLocal) -> ApiResult {
    let (name, full, pwd, role) = (a.short_name, a.fullname, a.password, a.role);
    if name.is_empty() || name == "root" {
        return Err(ApiError::invalid_value("short_name", &name));
    }
    Role::from_name(&role).ok_or_else(|| errors::role_not_found())?;
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
            .ok_or_else(|| errors::role_not_found())?;
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
