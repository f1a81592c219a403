//! Task ownership and lifetime: who made each task (only the owner, or a
//! pool-operator and above, changes, cancels or destroys it), how many a
//! client may keep, cancellation, and XAPI's garbage collection. Tasks are
//! volatile, as in XAPI: the owner table lives in memory beside them.

use crate::context::Server;
use crate::core::call::{ApiResult, Ctx};
use corral_model::errors;
use corral_model::schema::{Role, class, field};
use corral_model::{ApiError, Value, date};

/// Client-made tasks (`task.create`) alive at once, per session and per user.
pub const TASKS_PER_SESSION: usize = 100;

pub const TASKS_PER_USER: usize = 1000;

#[derive(Clone, Debug)]
pub(crate) struct TaskOwner {
    /// The session that made it ("" for corrald's own).
    pub(crate) session: String,
    pub(crate) user: String,
    /// Made by `task.create`.
    pub(crate) client: bool,
}

impl Server {
    /// `task.create`: a client's own task, at most [`TASKS_PER_SESSION`]
    /// per session and [`TASKS_PER_USER`] per user alive at once.
    pub fn client_task_create(&self, ctx: &Ctx, label: &str, description: &str) -> ApiResult {
        if let Ok(o) = self.task_owners.lock() {
            let mine = |t: &&TaskOwner| t.client && t.session == ctx.session;
            let users = |t: &&TaskOwner| t.client && t.user == ctx.user;
            if o.values().filter(mine).count() >= TASKS_PER_SESSION
                || o.values().filter(users).count() >= TASKS_PER_USER
            {
                return Err(errors::too_many_pending_tasks());
            }
        }
        let t = self.task_create(label, description, &ctx.session, true)?;
        if let Ok(mut o) = self.task_owners.lock() {
            if let Some(owner) = o.get_mut(&t) {
                owner.client = true;
            }
        }
        Ok(Value::String(t))
    }

    /// Whether `ctx` may change, cancel or destroy `task`: its own (same
    /// session or same user), or anyone's for a pool-operator and above.
    pub fn check_task_owner(&self, ctx: &Ctx, task: &str, wire: &str) -> Result<(), ApiError> {
        if ctx.role.allows(Role::PoolOperator) || ctx.session.is_empty() {
            return Ok(());
        }
        if self.owns_task(&ctx.session, &ctx.user, task)
            || !self.db.read().exists(class::TASK, task)
        {
            return Ok(());
        }
        let holders: Vec<&str> = Role::holders(Role::PoolOperator)
            .iter()
            .map(|r| r.name())
            .collect();
        Err(errors::rbac_permission_denied(
            format!("{}/any", wire.to_lowercase()),
            format!(
                "No permission in user session. (Roles with this permission: {})",
                holders.join(", ")
            ),
        ))
    }

    /// `task` was made by `session` or by user `user`.
    pub fn owns_task(&self, session: &str, user: &str, task: &str) -> bool {
        self.task_owners
            .lock()
            .ok()
            .and_then(|o| o.get(task).cloned())
            .is_some_and(|o| o.session == session || (!o.user.is_empty() && o.user == user))
    }

    /// At start-up, after the marks they held were cleared: this host's
    /// tasks died with its previous process (another host's stay). A
    /// database of one process has none (tasks are not persisted); a pool
    /// database shared with other hosts has.
    pub fn forget_dead_tasks(&self) {
        let r = self.db.write(|t| {
            let mine: Vec<String> = t
                .state()
                .refs(class::TASK)
                .filter(|k| {
                    t.state().get_str(field::task::RESIDENT_ON, k).as_deref()
                        == Some(self.host_ref.as_str())
                })
                .cloned()
                .collect();
            for k in mine {
                t.delete(class::TASK, &k)?;
            }
            Ok::<(), ApiError>(())
        });
        if let Err(e) = r {
            tracing::warn!(error = %ApiError::from(e).code, "could not remove dead tasks");
        }
    }

    /// Removes a task record and its owner entry.
    pub fn task_destroy(&self, task: &str) {
        if let Ok(mut o) = self.task_owners.lock() {
            o.remove(task);
        }
        if let Ok(mut w) = self.workers.lock() {
            w.remove(task);
        }
        if let Ok(mut c) = self.cancelled.lock() {
            c.remove(task);
        }
        let _ = self.db.write(|t| {
            if t.state().exists(class::TASK, task) {
                t.delete(class::TASK, task)?;
            }
            Ok(())
        });
    }

    /// `task.cancel`: allowed while `cancel` is in the task's
    /// `allowed_operations`; the operation working on it sees the request
    /// and ends with `TASK_CANCELLED`, a task nobody works on ends at once.
    pub fn cancel_task(&self, task: &str) -> Result<(), ApiError> {
        let allowed = self
            .db
            .read()
            .get(field::task::ALLOWED_OPERATIONS, task)
            .ok_or_else(|| ApiError::handle_invalid("task", task))?;
        if !allowed
            .as_array()
            .unwrap_or_default()
            .iter()
            .any(|v| v.as_str() == Some("cancel"))
        {
            return Err(ApiError::operation_not_allowed("task is not cancellable"));
        }
        self.db
            .write(|t| {
                t.set(
                    field::task::CURRENT_OPERATIONS,
                    task,
                    Value::Struct(vec![(task.to_owned(), Value::str("cancel"))]),
                )
            })
            .map_err(ApiError::from)?;
        self.request_cancel(task);
        if !self.task_has_worker(task) {
            self.task_complete(task, Err(errors::task_cancelled(task)));
        }
        Ok(())
    }

    fn tasks_of_session(&self, session: &str) -> Vec<String> {
        self.task_owners
            .lock()
            .map(|o| {
                o.iter()
                    .filter(|(_, t)| t.session == session)
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Cancels every pending task of `session` (its client went away).
    pub fn cancel_session_tasks(&self, session: &str) {
        for t in self.tasks_of_session(session) {
            let pending =
                self.db.read().get_str(field::task::STATUS, &t).as_deref() == Some("pending");
            if pending {
                let _ = self.cancel_task(&t);
            }
        }
    }

    /// A session ended (logout, expiry, revocation): its record goes, and
    /// so do its tasks, but for those an operation is still working on,
    /// which go when they finish.
    pub fn session_ended(&self, session: &str) {
        let tasks = self.tasks_of_session(session);
        let running: Vec<String> = tasks
            .iter()
            .filter(|t| self.task_has_worker(t))
            .cloned()
            .collect();
        if let Ok(mut o) = self.task_owners.lock() {
            for t in &tasks {
                if !running.contains(t) {
                    o.remove(t);
                }
            }
        }
        let _ = self.db.write(|t| {
            if t.state().exists(class::SESSION, session) {
                t.delete(class::SESSION, session)?;
            }
            for task in tasks.iter().filter(|x| !running.contains(x)) {
                if t.state().exists(class::TASK, task) {
                    t.delete(class::TASK, task)?;
                }
            }
            Ok(())
        });
    }

    /// XAPI's task garbage collection: finished tasks go an hour after they
    /// finished (at once when their session is gone), pending ones that no
    /// operation works on after a day.
    pub fn gc_tasks(&self) {
        let now = date::now_secs();
        let mut dead = Vec::new();
        {
            let st = self.db.read();
            for t in st.refs(class::TASK) {
                let status = st.get_str(field::task::STATUS, t).unwrap_or_default();
                let when = |f| st.get_str(f, t).and_then(|d| date::parse(&d)).unwrap_or(0);
                let session_alive = self
                    .task_owners
                    .lock()
                    .ok()
                    .and_then(|o| o.get(t).map(|o| o.session.clone()))
                    .is_some_and(|s| s.is_empty() || self.sessions.exists(&s));
                let expired = if status == "pending" {
                    !self.task_has_worker(t) && now - when(field::task::CREATED) > 24 * 3600
                } else {
                    !session_alive || now - when(field::task::FINISHED) > 3600
                };
                if expired {
                    dead.push(t.clone());
                }
            }
        }
        for t in dead {
            self.task_destroy(&t);
        }
    }
}
