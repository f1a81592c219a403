//! Sessions, local users and login throttling.

use crate::api::{Config, Server};
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use corral_model::schema::{Role, class, field};
use corral_model::{ApiError, NULL_REF, Value, date, new_ref};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct SessionInfo {
    pub role: Role,
    pub user_name: String,
    pub user_ref: String,
    pub last_active: Instant,
    pub created: Instant,
    /// Legacy `event.register` subscriptions and cursor.
    pub registered: Option<(Vec<String>, u64)>,
}

pub struct Sessions {
    map: Mutex<HashMap<String, SessionInfo>>,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    config: Config,
}

/// Hashes a password with argon2id and a random salt (PHC string).
pub fn hash_password(pwd: &str) -> Result<String, ApiError> {
    // 16 random bytes from the OS (uuid v4 draws them from getrandom).
    let salt = SaltString::encode_b64(uuid::Uuid::new_v4().as_bytes())
        .map_err(|e| ApiError::internal(format!("password salt: {e}")))?;
    Argon2::default()
        .hash_password(pwd.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal(format!("password hashing failed: {e}")))
}

pub fn verify_password(pwd: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default()
            .verify_password(pwd.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

fn auth_failed(uname: &str) -> ApiError {
    ApiError::new(
        "SESSION_AUTHENTICATION_FAILED",
        [uname, "Authentication failure"],
    )
}

impl Sessions {
    pub fn new(config: Config) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            config,
        }
    }

    /// Validates a session and marks it used.
    pub fn check(&self, server: &Server, s: &str) -> Result<SessionInfo, ApiError> {
        let mut map = self
            .map
            .lock()
            .map_err(|_| ApiError::internal("session table poisoned"))?;
        match map.get_mut(s) {
            Some(info) if info.last_active.elapsed() < self.config.session_timeout => {
                info.last_active = Instant::now();
                Ok(info.clone())
            }
            Some(_) => {
                map.remove(s);
                drop(map);
                let _ = server.db.write(|t| t.delete(class::SESSION, s));
                Err(ApiError::session_invalid(s))
            }
            None => Err(ApiError::session_invalid(s)),
        }
    }

    pub fn with<R>(&self, s: &str, f: impl FnOnce(&mut SessionInfo) -> R) -> Option<R> {
        self.map.lock().ok()?.get_mut(s).map(f)
    }

    pub fn exists(&self, s: &str) -> bool {
        self.map.lock().map(|m| m.contains_key(s)).unwrap_or(false)
    }

    /// Finds a local user by name: (user ref, password hash, role).
    fn user(server: &Server, uname: &str) -> Option<(String, String, Role)> {
        let st = server.db.read();
        let r = st
            .refs(class::USER)
            .find(|r| st.get_str(field::user::SHORT_NAME, r).as_deref() == Some(uname))?
            .clone();
        let hash = st
            .get_str(field::user::PASSWORD_HASH, &r)
            .unwrap_or_default();
        let role = if uname == "root" {
            Role::Root
        } else {
            st.get(field::user::ROLES, &r)
                .and_then(|v| v.as_array().map(<[_]>::to_vec))
                .unwrap_or_default()
                .iter()
                .filter_map(|rr| {
                    rr.as_str()
                        .and_then(|rr| st.get_str(field::role::NAME_LABEL, rr))
                })
                .filter_map(|n| Role::from_name(&n))
                .min()
                .unwrap_or(Role::ReadOnly)
        };
        Some((r, hash, role))
    }

    /// `session.login_with_password`. Unix-socket callers are the local
    /// superuser and skip the password check, as with XAPI.
    pub async fn login(
        &self,
        server: &Server,
        uname: &str,
        pwd: &str,
        originator: &str,
        local_root: bool,
        addr: Option<IpAddr>,
    ) -> Result<String, ApiError> {
        let (user_ref, role, name) = if local_root {
            let (r, _, _) =
                Self::user(server, "root").unwrap_or((NULL_REF.into(), String::new(), Role::Root));
            (
                r,
                Role::Root,
                if uname.is_empty() {
                    "root".to_owned()
                } else {
                    uname.to_owned()
                },
            )
        } else {
            if let Some(a) = addr {
                let throttled = self
                    .failures
                    .lock()
                    .ok()
                    .and_then(|f| f.get(&a).copied())
                    .is_some_and(|(since, n)| {
                        since.elapsed().as_secs() < 60 && n >= self.config.login_failures_per_minute
                    });
                if throttled {
                    tracing::warn!(source = %a, user = %uname, "login refused: too many failed attempts");
                    return Err(auth_failed(uname));
                }
            }
            let found = Self::user(server, uname);
            let ok = match &found {
                Some((_, hash, _)) => {
                    let (p, h) = (pwd.to_owned(), hash.clone());
                    tokio::task::spawn_blocking(move || verify_password(&p, &h))
                        .await
                        .unwrap_or(false)
                }
                None => false,
            };
            if !ok {
                self.record_failure(server, uname, addr);
                tokio::time::sleep(self.config.failed_login_delay).await;
                return Err(auth_failed(uname));
            }
            let (r, _, role) = found.ok_or_else(|| auth_failed(uname))?;
            (r, role, uname.to_owned())
        };
        let reference = new_ref();
        let now = Value::DateTime(date::now());
        server
            .db
            .write(|t| {
                t.create(
                    class::SESSION,
                    &reference,
                    vec![
                        (
                            field::session::THIS_HOST.index,
                            Value::str(&server.host_ref),
                        ),
                        (field::session::THIS_USER.index, Value::str(&user_ref)),
                        (field::session::LAST_ACTIVE.index, now.clone()),
                        (
                            field::session::IS_LOCAL_SUPERUSER.index,
                            Value::Bool(role == Role::Root),
                        ),
                        (field::session::AUTH_USER_NAME.index, Value::str(&name)),
                        (field::session::ORIGINATOR.index, Value::str(originator)),
                    ],
                )
            })
            .map_err(ApiError::from)?;
        let reaped = {
            let mut map = self
                .map
                .lock()
                .map_err(|_| ApiError::internal("session table poisoned"))?;
            map.insert(
                reference.clone(),
                SessionInfo {
                    role,
                    user_name: name.clone(),
                    user_ref,
                    last_active: Instant::now(),
                    created: Instant::now(),
                    registered: None,
                },
            );
            let mut mine: Vec<(Instant, String)> = map
                .iter()
                .filter(|(_, i)| i.user_name == name)
                .map(|(k, i)| (i.created, k.clone()))
                .collect();
            let mut reaped = Vec::new();
            if mine.len() > self.config.max_sessions_per_user {
                mine.sort();
                for (_, k) in mine
                    .iter()
                    .take(mine.len() - self.config.max_sessions_per_user)
                {
                    map.remove(k);
                    reaped.push(k.clone());
                }
            }
            reaped
        };
        if !reaped.is_empty() {
            let _ = server.db.write(|t| {
                for k in &reaped {
                    let _ = t.delete(class::SESSION, k);
                }
                Ok(())
            });
        }
        tracing::info!(user = %name, "session created");
        Ok(reference)
    }

    fn record_failure(&self, server: &Server, uname: &str, addr: Option<IpAddr>) {
        tracing::warn!(user = %uname, source = ?addr, "failed login");
        let Some(a) = addr else { return };
        let tripped = if let Ok(mut f) = self.failures.lock() {
            let e = f.entry(a).or_insert((Instant::now(), 0));
            if e.0.elapsed().as_secs() >= 60 {
                *e = (Instant::now(), 0);
            }
            e.1 += 1;
            e.1 == self.config.login_failures_per_minute
        } else {
            false
        };
        if tripped {
            let body = format!(
                "Too many failed login attempts from {a}; further attempts are refused for a minute."
            );
            let _ = crate::handlers::create_message(
                server,
                "FAILED_LOGIN_ATTEMPTS",
                3,
                "Host",
                &server.host_uuid(),
                &body,
            );
        }
    }

    pub fn logout(&self, server: &Server, s: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(s);
        }
        let _ = server.db.write(|t| {
            if t.state().exists(class::SESSION, s) {
                t.delete(class::SESSION, s)?;
            }
            Ok(())
        });
        server.events.wake();
    }
}
