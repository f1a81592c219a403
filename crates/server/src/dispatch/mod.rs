//! From a decoded call to its handler: session, RBAC, argument checks, tasks and the audit log.

use crate::context::{Handler, Server};
use crate::core::call::{ApiResult, Caller, Ctx, uuid_field};
use crate::dispatch::resolve::{Kind, Resolved};
use corral_model::errors;
use corral_model::schema::{ClassId, Role, class};
use corral_model::value::{coerce, default_value};
use corral_model::{ApiError, Value};
use std::sync::Arc;
pub mod filter;
pub mod generic;
pub mod registry;
pub mod resolve;

/// What a call produced, before it is encoded for the wire.
pub enum Reply {
    Value(Value),
    /// `<class>.get_all_records`: encoded by the transport straight from the
    /// tables under one read lock, without building a [`Value`] tree.
    AllRecords(ClassId),
}

impl Server {
    /// Runs one API call.
    pub async fn call(
        self: &Arc<Self>,
        method: &str,
        params: Vec<Value>,
        caller: &Caller,
    ) -> ApiResult {
        match self.call_reply(method, params, caller).await? {
            Reply::Value(v) => Ok(v),
            Reply::AllRecords(c) => Ok(self.all_records(c)),
        }
    }

    /// [`Server::call`], leaving large replies for the transport to encode.
    /// Failed calls are logged and calls that change state are audited.
    pub async fn call_reply(
        self: &Arc<Self>,
        method: &str,
        params: Vec<Value>,
        caller: &Caller,
    ) -> Result<Reply, ApiError> {
        let wire = method.strip_prefix("Async.").unwrap_or(method);
        let audited = crate::core::audit::changes_state(wire);
        let login = matches!(
            wire,
            "session.login_with_password" | "session.slave_local_login_with_password"
        );
        let first = params.first().and_then(Value::as_str).unwrap_or_default();
        // Who, for calls after which it cannot be looked up any more.
        let user_before = if login {
            Some(first.to_owned())
        } else if wire == "session.logout" {
            self.sessions.with(first, |i| i.user_name.clone())
        } else {
            None
        };
        let session = (!login).then(|| first.to_owned());
        let objects = if audited {
            self.describe_objects(&crate::core::audit::objects_of(
                params.get(1..).unwrap_or(&[]),
            ))
        } else {
            Vec::new()
        };
        let out = self.dispatch(method, params, caller).await;
        if out.is_ok() && !audited {
            return out;
        }
        let user = user_before
            .or_else(|| {
                session
                    .as_deref()
                    .and_then(|s| self.sessions.with(s, |i| i.user_name.clone()))
            })
            .unwrap_or_default();
        let source = if caller.origin.local_root {
            "unix-socket".to_owned()
        } else {
            caller
                .origin
                .addr
                .map(|a| a.to_string())
                .unwrap_or_default()
        };
        let outcome = out.as_ref().map(|_| ()).map_err(Clone::clone);
        if let Err(e) = &outcome {
            self.log_failed_call(method, &user, &source, e);
        }
        if audited {
            if let Some(a) = &self.audit {
                a.record(&crate::core::audit::CallRecord {
                    method,
                    user: &user,
                    source: &source,
                    objects: &objects,
                    outcome: &outcome,
                });
            }
        }
        out
    }

    /// `class/uuid` for each ref (the ref itself when it names nothing).
    pub(crate) fn describe_objects(&self, refs: &[String]) -> Vec<String> {
        if refs.is_empty() {
            return Vec::new();
        }
        let st = self.db.read();
        refs.iter()
            .map(|r| {
                ClassId::all()
                    .into_iter()
                    .filter(|c| c.def().in_db && *c != class::SESSION)
                    .find(|c| st.exists(*c, r))
                    .map(|c| {
                        let uuid = st.get_str(uuid_field(c), r).unwrap_or_default();
                        format!("{}/{uuid}", c.name())
                    })
                    .unwrap_or_else(|| r.clone())
            })
            .collect()
    }

    /// A failed call in corrald.log: method, code, user, source (never the
    /// parameters). Failures anyone can cause without a session are logged
    /// at most once a second.
    pub(crate) fn log_failed_call(&self, method: &str, user: &str, source: &str, e: &ApiError) {
        static UNAUTHENTICATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let anonymous = user.is_empty() || e.code == errors::SESSION_AUTHENTICATION_FAILED;
        if anonymous && !crate::core::logsafe::once_per(&UNAUTHENTICATED, 1) {
            return;
        }
        tracing::info!(
            call = %crate::core::logsafe::name(method),
            code = %e.code,
            user = %crate::core::logsafe::name(user),
            source,
            "call failed"
        );
    }

    pub(crate) async fn dispatch(
        self: &Arc<Self>,
        method: &str,
        params: Vec<Value>,
        caller: &Caller,
    ) -> Result<Reply, ApiError> {
        let (is_async_call, wire) = match method.strip_prefix("Async.") {
            Some(rest) => (true, rest),
            None => (false, method),
        };
        let Some(res) = self.resolve(wire) else {
            if params.is_empty() {
                return Err(ApiError::method_unknown(method));
            }
            // XAPI validates the session before saying the method is unknown.
            let s = params[0].as_str().unwrap_or_default().to_owned();
            self.sessions.check(self, &s)?;
            return Err(ApiError::method_unknown(method));
        };
        if is_async_call && !res.is_async {
            return Err(ApiError::new(
                "Fault",
                [format!("No async mode for this operation (rpc: {method})")],
            ));
        }
        let mut params = params;
        let given = params.len().saturating_sub(usize::from(res.session));
        let required = res.params.iter().filter(|p| p.2.is_none()).count();
        if given < required || given > res.params.len() {
            let expected = if required == res.params.len() {
                required.to_string()
            } else {
                format!("{required}-{}", res.params.len())
            };
            return Err(errors::message_parameter_count_mismatch(
                res.wire.clone(),
                expected,
                given.to_string(),
            ));
        }
        let ctx = if res.session {
            let s = params.remove(0);
            let s = s.as_str().unwrap_or_default().to_owned();
            let info = self.sessions.check(self, &s)?;
            if !info.role.allows(res.role) {
                let perm = res.wire.to_lowercase();
                let holders: Vec<&str> = Role::holders(res.role).iter().map(|r| r.name()).collect();
                return Err(errors::rbac_permission_denied(
                    perm,
                    format!(
                        "No permission in user session. (Roles with this permission: {})",
                        holders.join(", ")
                    ),
                ));
            }
            Ctx {
                session: s,
                role: info.role,
                user: info.user_name.clone(),
                user_ref: info.user_ref.clone(),
                task: None,
            }
        } else {
            Ctx {
                session: String::new(),
                role: Role::ReadOnly,
                user: String::new(),
                user_ref: String::new(),
                task: None,
            }
        };
        // Types and defaults.
        let mut typed = Vec::with_capacity(res.params.len());
        let mut it = params.into_iter();
        for (name, ty, default) in &res.params {
            match it.next() {
                Some(v) => typed.push(coerce(v, ty, name)?),
                None => typed.push(match default {
                    Some(d) => default_value(ty, Some(d)),
                    None => default_value(ty, None),
                }),
            }
        }
        if let Kind::Custom(_) = res.kind {
            if !res.session {
                // Login calls see the transport.
                typed.push(Value::String(if caller.origin.local_root {
                    "local".into()
                } else {
                    String::new()
                }));
                typed.push(Value::String(
                    caller
                        .origin
                        .addr
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                ));
                typed.push(Value::String(caller.originator.clone().unwrap_or_default()));
            }
        }
        // A task is changed, cancelled or destroyed only by its owner (or a
        // pool-operator and above), whichever message does it.
        let changes_task = matches!(
            res.kind,
            Kind::Set(_) | Kind::MapAdd(_) | Kind::MapRemove(_)
        ) || matches!(res.wire.as_str(), "task.destroy" | "task.cancel");
        if res.class == class::TASK && changes_task {
            let task = typed.first().and_then(Value::as_str).unwrap_or_default();
            self.check_task_owner(&ctx, task, &res.wire)?;
        }
        if is_async_call {
            let task = self.task_create(&res.wire, "", &ctx.session, true)?;
            let server = Arc::clone(self);
            let mut tctx = ctx.clone();
            tctx.task = Some(task.clone());
            let t2 = task.clone();
            if let Ok(mut w) = self.workers.lock() {
                w.insert(task.clone());
            }
            tokio::spawn(async move {
                let out = server.run(&res, &tctx, typed).await;
                server.task_complete(&t2, out);
            });
            return Ok(Reply::Value(Value::String(task)));
        }
        if let Kind::GetAllRecords = res.kind {
            return Ok(Reply::AllRecords(res.class));
        }
        if res.is_async && res.session {
            // A transient task, visible while the call runs.
            // Cancellable like an Async one: the operation sees the request.
            let task = self.task_create(&res.wire, "", &ctx.session, true)?;
            if let Ok(mut w) = self.workers.lock() {
                w.insert(task.clone());
            }
            let mut tctx = ctx.clone();
            tctx.task = Some(task.clone());
            let out = self.run(&res, &tctx, typed).await;
            self.task_destroy(&task);
            return out.map(Reply::Value);
        }
        self.run(&res, &ctx, typed).await.map(Reply::Value)
    }

    pub(crate) async fn run(
        self: &Arc<Self>,
        res: &Resolved,
        ctx: &Ctx,
        params: Vec<Value>,
    ) -> ApiResult {
        match &res.kind {
            Kind::Custom(Handler::Sync(f)) => f(self, ctx, params),
            Kind::Custom(Handler::Async(f)) => f(Arc::clone(self), ctx.clone(), params).await,
            kind => {
                // Setters whose field a host realises (a VIF's locking and
                // QoS, a network's default locking mode) are checked first
                // and take effect after.
                let changed = match kind {
                    Kind::Set(f)
                    | Kind::SetAdd(f)
                    | Kind::SetRemove(f)
                    | Kind::MapAdd(f)
                    | Kind::MapRemove(f) => Some(*f),
                    _ => None,
                };
                let target = changed
                    .and(params.first())
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                if let (Some(f), Some(v)) = (changed, params.get(1)) {
                    if !matches!(kind, Kind::SetRemove(_) | Kind::MapRemove(_)) {
                        crate::ops::vif::port::check_set(res.class, f, v)?;
                    }
                }
                let out = self.generic(res.class, kind, params)?;
                if let (Some(f), Some(r)) = (changed, target) {
                    crate::ops::vif::port::after_set(self, res.class, f, &r).await?;
                }
                Ok(out)
            }
        }
    }
}

impl Server {
    /// The typed in-process client: message `A` under `session`, through
    /// the same dispatch as a call from the wire (session, RBAC, routing,
    /// tasks and the audit log).
    pub async fn invoke<A: corral_model::args::Args>(
        self: &Arc<Self>,
        session: &str,
        args: A,
        caller: &Caller,
    ) -> ApiResult {
        let mut params = Vec::with_capacity(8);
        params.push(Value::str(session));
        params.extend(args.into_params());
        self.call(A::WIRE, params, caller).await
    }
}
