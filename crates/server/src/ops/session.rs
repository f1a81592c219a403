//! session.* messages.

use crate::auth::passwords::hash_password;
use crate::context::Server;
use crate::core::call::{ApiResult, Ctx, pstr, void};
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value};
use std::sync::Arc;

pub(crate) async fn login(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
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

/// `session.change_password`: the old password is checked under the same
/// throttle as logins (keyed on the caller's user name), and the user's
/// other sessions end.
pub(crate) async fn change_password(s: Arc<Server>, c: Ctx, old: String, new: String) -> ApiResult {
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
        return Err(errors::user_is_not_local_superuser(c.user.as_str()));
    };
    let key = (None, c.user.clone());
    if !s.sessions.verify_throttled(&s, key, Some(hash), &old).await {
        return Err(errors::session_authentication_failed(
            c.user.as_str(),
            "Old password does not match",
        ));
    }
    let h = hash_password(&new)?;
    s.db.write(|t| t.set(field::user::PASSWORD_HASH, &user, Value::String(h.clone())))
        .map_err(ApiError::from)?;
    s.sessions.revoke_user(&s, &user, Some(&c.session));
    void()
}
