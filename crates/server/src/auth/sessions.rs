//! Sessions, local users and login throttling.

use crate::auth::passwords::{decoy_hash, verify_in};
use crate::core::config::Config;
use corral_db::Db;
use corral_model::errors;
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
    /// Made by a login on this host; a session made on another host of
    /// the pool is taken from the pool database and lives while its record
    /// does.
    pub home: bool,
}

pub struct Sessions {
    map: Mutex<HashMap<String, SessionInfo>>,
    throttle: Mutex<Throttle>,
    /// argon2 runs at once (each takes 19 MiB and a core for ~30 ms): one
    /// working buffer per run, kept between logins.
    hashing: tokio::sync::Semaphore,
    buffers: std::sync::Arc<Mutex<Vec<Vec<argon2::Block>>>>,
    config: Config,
}

/// What sessions need from the host they run on: its database and identity,
/// and a way to end what a session started. The host context implements it,
/// so this layer does not depend on it.
pub trait SessionHost: Send + Sync {
    fn db(&self) -> &Db;
    fn host_ref(&self) -> &str;
    fn host_uuid(&self) -> String;
    /// Called after a session is removed: its tasks end with it.
    fn session_ended(&self, session: &str);
    /// Wakes event waiters (a session's record changed).
    fn wake(&self);
}

impl<T: SessionHost + ?Sized> SessionHost for std::sync::Arc<T> {
    fn db(&self) -> &Db {
        (**self).db()
    }
    fn host_ref(&self) -> &str {
        (**self).host_ref()
    }
    fn host_uuid(&self) -> String {
        (**self).host_uuid()
    }
    fn session_ended(&self, session: &str) {
        (**self).session_ended(session)
    }
    fn wake(&self) {
        (**self).wake()
    }
}

/// argon2 verifications at once.
pub(crate) const HASHING_AT_ONCE: usize = 2;

/// How long a window of failed attempts lasts.
pub(crate) const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Failures per source address in a window, over all user names.
pub(crate) const FAILURES_PER_SOURCE_FACTOR: u32 = 10;

/// Windows kept at most; the oldest go first when more are needed.
pub(crate) const MAX_WINDOWS: usize = 10_000;

/// Whose attempts are counted together: a source address (`None`: the
/// session itself, for `session.change_password`) and a user name.
pub(crate) type Key = (Option<IpAddr>, String);

#[derive(Clone, Copy)]
pub(crate) struct Window {
    start: Instant,
    failed: u32,
    /// Attempts being verified now: they count against the limit before
    /// their outcome is known, so concurrent guesses cannot slip past it.
    in_flight: u32,
    logged: bool,
}

impl Window {
    fn new() -> Window {
        Window {
            start: Instant::now(),
            failed: 0,
            in_flight: 0,
            logged: false,
        }
    }
    fn current(&mut self) -> &mut Window {
        if self.start.elapsed() >= WINDOW && self.in_flight == 0 {
            *self = Window::new();
        }
        self
    }
}

/// Failed-login accounting per (source, user) and per source. A window
/// refuses further attempts for its key until it ends, so a guesser behind
/// an address locks out only the name it guesses, for at most a minute,
/// while other users behind the same address (a NAT) log in as usual.
#[derive(Default)]
pub(crate) struct Throttle {
    by_user: HashMap<Key, Window>,
    by_source: HashMap<Option<IpAddr>, Window>,
}

/// What the throttle decided about one attempt.
pub(crate) enum Admission {
    Go,
    Refused { first: bool },
}

impl Throttle {
    fn prune(&mut self) {
        if self.by_user.len() + self.by_source.len() < MAX_WINDOWS {
            return;
        }
        let live = |w: &Window| w.start.elapsed() < WINDOW || w.in_flight > 0;
        self.by_user.retain(|_, w| live(w));
        self.by_source.retain(|_, w| live(w));
        // Still full (a flood of fresh windows): drop the oldest half.
        if self.by_user.len() >= MAX_WINDOWS / 2 {
            let mut starts: Vec<Instant> = self.by_user.values().map(|w| w.start).collect();
            starts.sort();
            let cut = starts[starts.len() / 2];
            self.by_user.retain(|_, w| w.start > cut || w.in_flight > 0);
        }
    }

    fn admit(&mut self, key: &Key, limit: u32) -> Admission {
        self.prune();
        let per_source = limit.saturating_mul(FAILURES_PER_SOURCE_FACTOR);
        let src = self
            .by_source
            .entry(key.0)
            .or_insert_with(Window::new)
            .current();
        let src_full = src.failed + src.in_flight >= per_source;
        let src_snapshot = *src;
        let user = self
            .by_user
            .entry(key.clone())
            .or_insert_with(Window::new)
            .current();
        if src_full || user.failed + user.in_flight >= limit {
            let first = !user.logged || (src_full && !src_snapshot.logged);
            user.logged = true;
            if src_full {
                if let Some(s) = self.by_source.get_mut(&key.0) {
                    s.logged = true;
                }
            }
            return Admission::Refused { first };
        }
        user.in_flight += 1;
        if let Some(s) = self.by_source.get_mut(&key.0) {
            s.in_flight += 1;
        }
        Admission::Go
    }

    /// The outcome of an admitted attempt; true when this failure used up
    /// the key's allowance (time for one alert).
    fn done(&mut self, key: &Key, ok: bool, limit: u32) -> bool {
        if let Some(s) = self.by_source.get_mut(&key.0) {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.failed += u32::from(!ok);
        }
        match self.by_user.get_mut(key) {
            Some(w) => {
                w.in_flight = w.in_flight.saturating_sub(1);
                if ok {
                    return false;
                }
                w.failed += 1;
                w.failed == limit
            }
            None => false,
        }
    }
}

pub(crate) fn auth_failed(uname: &str) -> ApiError {
    errors::session_authentication_failed(uname, "Authentication failure")
}

impl Sessions {
    pub fn new(config: Config) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            throttle: Mutex::new(Throttle::default()),
            hashing: tokio::sync::Semaphore::new(HASHING_AT_ONCE),
            buffers: Default::default(),
            config,
        }
    }

    /// Checks `pwd` for user `uname` (`hash`: the user's, `None` for an
    /// unknown user), throttled by `key`: at most the configured failures
    /// per window, counted before verification, with argon2 bounded in
    /// flight. Failures are logged once per window and delayed.
    pub async fn verify_throttled(
        &self,
        server: &dyn SessionHost,
        key: Key,
        hash: Option<String>,
        pwd: &str,
    ) -> bool {
        let limit = self.config.login_failures_per_minute;
        let admitted = match self.throttle.lock() {
            Ok(mut t) => t.admit(&key, limit),
            Err(_) => Admission::Refused { first: false },
        };
        if let Admission::Refused { first } = admitted {
            if first {
                tracing::warn!(
                    user = %crate::core::logsafe::name(&key.1),
                    source = ?key.0,
                    "login refused: too many failed attempts (further refusals in this minute are not logged)"
                );
            }
            tokio::time::sleep(self.config.failed_login_delay).await;
            return false;
        }
        let ok = match self.hashing.acquire().await {
            Ok(_permit) => {
                let known = hash.is_some();
                let h = hash.unwrap_or_else(|| decoy_hash().to_owned());
                let p = pwd.to_owned();
                let buffers = std::sync::Arc::clone(&self.buffers);
                let matched = tokio::task::spawn_blocking(move || {
                    let mut mem = buffers
                        .lock()
                        .ok()
                        .and_then(|mut b| b.pop())
                        .unwrap_or_default();
                    let ok = verify_in(&p, &h, &mut mem);
                    if let Ok(mut b) = buffers.lock() {
                        b.push(mem);
                    }
                    ok
                })
                .await
                .unwrap_or(false);
                matched && known
            }
            Err(_) => false,
        };
        let tripped = self
            .throttle
            .lock()
            .map(|mut t| t.done(&key, ok, limit))
            .unwrap_or(false);
        if !ok {
            self.record_failure(server, &key, tripped);
            tokio::time::sleep(self.config.failed_login_delay).await;
        }
        ok
    }

    /// Ends every session of `user_ref` but `keep` (its password changed,
    /// or it is gone): a session never outlives the credentials it was
    /// opened with.
    pub fn revoke_user(&self, server: &dyn SessionHost, user_ref: &str, keep: Option<&str>) {
        let gone: Vec<String> = match self.map.lock() {
            Ok(mut m) => {
                let gone: Vec<String> = m
                    .iter()
                    .filter(|(k, i)| i.user_ref == user_ref && Some(k.as_str()) != keep)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in &gone {
                    m.remove(k);
                }
                gone
            }
            Err(_) => return,
        };
        for k in &gone {
            server.session_ended(k);
        }
        if !gone.is_empty() {
            server.wake();
        }
    }

    /// Validates a session and marks it used.
    pub fn check(&self, server: &dyn SessionHost, s: &str) -> Result<SessionInfo, ApiError> {
        let mut map = self
            .map
            .lock()
            .map_err(|_| ApiError::internal("session table poisoned"))?;
        match map.get_mut(s) {
            Some(info) if !info.home && !server.db().read().exists(class::SESSION, s) => {
                // Its host logged it out or expired it.
                map.remove(s);
                Err(ApiError::session_invalid(s))
            }
            // Another host's session lives while its record does: whether it
            // timed out is its own host's call.
            Some(info)
                if !info.home || info.last_active.elapsed() < self.config.session_timeout =>
            {
                info.last_active = Instant::now();
                Ok(info.clone())
            }
            Some(_) => {
                map.remove(s);
                drop(map);
                server.session_ended(s);
                Err(ApiError::session_invalid(s))
            }
            None => {
                let info = Self::from_pool_db(server, s)?;
                map.insert(s.to_owned(), info.clone());
                Ok(info)
            }
        }
    }

    /// A session another host of the pool made, from its record in the
    /// pool database: its user's role as of now.
    fn from_pool_db(server: &dyn SessionHost, s: &str) -> Result<SessionInfo, ApiError> {
        let name = {
            let st = server.db().read();
            if !st.exists(class::SESSION, s) {
                return Err(ApiError::session_invalid(s));
            }
            st.get_str(field::session::AUTH_USER_NAME, s)
                .unwrap_or_default()
        };
        let (user_ref, _, role) =
            Self::user(server, &name).ok_or_else(|| ApiError::session_invalid(s))?;
        Ok(SessionInfo {
            role,
            user_name: name,
            user_ref,
            last_active: Instant::now(),
            created: Instant::now(),
            registered: None,
            home: false,
        })
    }

    pub fn with<R>(&self, s: &str, f: impl FnOnce(&mut SessionInfo) -> R) -> Option<R> {
        self.map.lock().ok()?.get_mut(s).map(f)
    }

    pub fn exists(&self, s: &str) -> bool {
        self.map.lock().map(|m| m.contains_key(s)).unwrap_or(false)
    }

    /// Finds a local user by name: (user ref, password hash, role).
    fn user(server: &dyn SessionHost, uname: &str) -> Option<(String, String, Role)> {
        let st = server.db().read();
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
        server: &dyn SessionHost,
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
            let found = Self::user(server, uname);
            let hash = found.as_ref().map(|(_, h, _)| h.clone());
            let key = (addr, uname.to_owned());
            if !self.verify_throttled(server, key, hash, pwd).await {
                return Err(auth_failed(uname));
            }
            let (r, _, role) = found.ok_or_else(|| auth_failed(uname))?;
            (r, role, uname.to_owned())
        };
        let reference = new_ref();
        let now = Value::DateTime(date::now());
        server
            .db()
            .write(|t| {
                t.create(
                    class::SESSION,
                    &reference,
                    vec![
                        (
                            field::session::THIS_HOST.index,
                            Value::str(server.host_ref()),
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
                    home: true,
                },
            );
            let mut mine: Vec<(Instant, String)> = map
                .iter()
                .filter(|(_, i)| i.home && i.user_name == name)
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
        for k in &reaped {
            server.session_ended(k);
        }
        tracing::info!(user = %crate::core::logsafe::name(&name), "session created");
        Ok(reference)
    }

    /// Logs a failed attempt (the first of its window, and the one that
    /// uses up the allowance) and raises the alert when the limit trips.
    fn record_failure(&self, server: &dyn SessionHost, key: &Key, tripped: bool) {
        let first = self
            .throttle
            .lock()
            .ok()
            .and_then(|t| t.by_user.get(key).map(|w| w.failed == 1))
            .unwrap_or(false);
        if first || tripped {
            tracing::warn!(
                user = %crate::core::logsafe::name(&key.1),
                source = ?key.0,
                "failed login{}",
                if tripped { "; limit reached, further attempts are refused for a minute" } else { "" }
            );
        }
        if tripped {
            let from = key
                .0
                .map(|a| a.to_string())
                .unwrap_or_else(|| "a session".into());
            let body = format!(
                "Too many failed login attempts for user {} from {from}; further attempts are refused for a minute.",
                crate::core::logsafe::name(&key.1)
            );
            let _ = crate::core::alerts::create_message(
                server.db(),
                "FAILED_LOGIN_ATTEMPTS",
                3,
                "Host",
                &server.host_uuid(),
                &body,
            );
        }
    }

    pub fn logout(&self, server: &dyn SessionHost, s: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(s);
        }
        server.session_ended(s);
        server.wake();
    }
}
