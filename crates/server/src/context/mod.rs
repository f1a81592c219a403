//! The host context every operation runs in: the database, this host's identity, its drivers and its volatile state.

pub mod hosts;
pub mod tasks;

use crate::auth::sessions::Sessions;
use crate::core::call::{ApiResult, BoxFut, Ctx, db_err};
use crate::core::config::Config;
use crate::core::events_hub::EventHub;
use corral_db::Db;
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value, date, new_ref, xmlrpc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct Server {
    /// The pool database (shared with the hosts of an in-process harness).
    pub db: Arc<Db>,
    pub host_ref: String,
    pub pool_ref: String,
    pub config: Config,
    pub sessions: Sessions,
    pub events: EventHub,
    pub(crate) handlers: HashMap<String, Handler>,
    /// Tasks asked to cancel.
    pub(crate) cancelled: Mutex<std::collections::HashSet<String>>,
    /// Tasks with a worker running (from `Async.*`).
    pub(crate) workers: Mutex<std::collections::HashSet<String>>,
    pub state_dir: std::path::PathBuf,
    /// Per SR uuid: serialises operations that change its images.
    pub(crate) sr_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// This host's agent: its VMs run through it. Operations reach it
    /// (and other hosts' agents) through [`Server::host`].
    pub(crate) local_agent: Arc<dyn corral_agent::HostAgent>,
    pub(crate) local_net: Arc<dyn corral_net::HostNetwork>,
    /// How the pool's other hosts are reached (none: a pool of one).
    pub(crate) pool_link: std::sync::RwLock<Option<Arc<dyn hosts::PoolLink>>>,
    /// VM uuids whose guest shutdown an operation is waiting for.
    pub(crate) expected_shutdowns: Mutex<std::collections::HashSet<String>>,
    /// Who made each task (tasks are volatile, like this table).
    pub(crate) task_owners: Mutex<HashMap<String, crate::context::tasks::TaskOwner>>,
    /// Open connections, bounded by `config.limits`.
    pub conns: Arc<crate::core::conns::ConnGate>,
    /// The certificate the TLS listeners serve (none without TCP listeners).
    pub tls_cert: std::sync::OnceLock<Arc<crate::core::tls::HostCert>>,
    /// `<state-dir>/audit.log`.
    pub(crate) audit: Option<crate::core::audit::Audit>,
}

/// A hand-written message implementation, called with the parameters
/// dispatch has checked (the typed ones decode them into their message's
/// argument struct first: `dispatch::registry::Table`).
#[derive(Clone)]
pub enum Handler {
    Sync(Arc<SyncHandler>),
    Async(Arc<AsyncHandler>),
}

pub type SyncHandler = dyn Fn(&Arc<Server>, &Ctx, Vec<Value>) -> ApiResult + Send + Sync;

pub type AsyncHandler = dyn Fn(Arc<Server>, Ctx, Vec<Value>) -> BoxFut + Send + Sync;

/// This host's own drivers, which [`Server::local`] hands out.
pub struct LocalDrivers {
    pub agent: Arc<dyn corral_agent::HostAgent>,
    pub net: Arc<dyn corral_net::HostNetwork>,
}

impl Server {
    pub fn new(
        db: Arc<Db>,
        host_ref: String,
        pool_ref: String,
        config: Config,
        state_dir: std::path::PathBuf,
        drivers: LocalDrivers,
        handlers: HashMap<String, Handler>,
    ) -> Arc<Server> {
        let events = EventHub::new(db.read().generation());
        let state_dir_for_audit = state_dir.clone();
        let server = Arc::new(Server {
            local_agent: drivers.agent,
            local_net: drivers.net,
            pool_link: Default::default(),
            expected_shutdowns: Mutex::new(Default::default()),
            db,
            host_ref,
            pool_ref,
            sessions: Sessions::new(config.clone()),
            config,
            events,
            handlers,
            cancelled: Mutex::new(Default::default()),
            workers: Mutex::new(Default::default()),
            state_dir,
            sr_locks: Mutex::new(HashMap::new()),
            conns: Default::default(),
            task_owners: Mutex::new(HashMap::new()),
            tls_cert: std::sync::OnceLock::new(),
            audit: crate::core::audit::Audit::open(&state_dir_for_audit)
                .inspect_err(|e| tracing::warn!(error = %e, "no audit log"))
                .ok(),
        });
        let hub = server.events.sender();
        server.db.set_commit_hook(move |g| {
            let _ = hub.send(g);
        });
        // Handlers write from async tasks: while one waits for its commit's
        // fsync, the runtime runs other requests on another thread, whose
        // commits join the same batch (group commit).
        server.db.set_wait_hook(|wait| {
            let multi = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            if multi {
                tokio::task::block_in_place(wait)
            } else {
                wait()
            }
        });
        server
    }

    pub fn task_create(
        &self,
        label: &str,
        description: &str,
        session: &str,
        cancellable: bool,
    ) -> Result<String, ApiError> {
        let reference = new_ref();
        let now = Value::DateTime(date::now());
        let allowed = if cancellable {
            Value::string_set(["cancel"])
        } else {
            Value::Array(vec![])
        };
        self.db
            .write(|t| {
                t.create(
                    class::TASK,
                    &reference,
                    vec![
                        (field::task::NAME_LABEL.index, Value::str(label)),
                        (field::task::NAME_DESCRIPTION.index, Value::str(description)),
                        (field::task::CREATED.index, now.clone()),
                        (field::task::STATUS.index, Value::str("pending")),
                        (field::task::RESIDENT_ON.index, Value::str(&self.host_ref)),
                        (field::task::PROGRESS.index, Value::Float(0.0)),
                        (field::task::ALLOWED_OPERATIONS.index, allowed.clone()),
                        (field::task::TYPE_.index, Value::str("<none/>")),
                        (field::task::OTHER_CONFIG.index, Value::Struct(vec![])),
                    ],
                )
            })
            .map_err(db_err)?;
        let user = self
            .sessions
            .with(session, |i| i.user_name.clone())
            .unwrap_or_default();
        if let Ok(mut o) = self.task_owners.lock() {
            o.insert(
                reference.clone(),
                crate::context::tasks::TaskOwner {
                    session: session.to_owned(),
                    user,
                    client: false,
                },
            );
        }
        Ok(reference)
    }

    pub fn task_progress(&self, task: &str, progress: f64) {
        let _ = self
            .db
            .write(|t| t.set(field::task::PROGRESS, task, Value::Float(progress)));
    }

    /// Whether someone asked `task` to cancel.
    pub fn task_cancel_requested(&self, task: &str) -> bool {
        self.cancelled
            .lock()
            .map(|c| c.contains(task))
            .unwrap_or(false)
    }

    pub fn request_cancel(&self, task: &str) {
        if let Ok(mut c) = self.cancelled.lock() {
            c.insert(task.to_owned());
        }
    }

    /// Finishes a task: result as XML-RPC `<value>` text, or the error.
    pub fn task_complete(&self, task: &str, out: ApiResult) {
        if let Ok(mut c) = self.cancelled.lock() {
            c.remove(task);
        }
        if let Ok(mut w) = self.workers.lock() {
            w.remove(task);
        }
        let now = Value::DateTime(date::now());
        let _ = self.db.write(|t| {
            if !t.state().exists(class::TASK, task) {
                return Ok(());
            }
            t.set(field::task::PROGRESS, task, Value::Float(1.0))?;
            t.set(field::task::FINISHED, task, now.clone())?;
            t.set(field::task::ALLOWED_OPERATIONS, task, Value::Array(vec![]))?;
            t.set(field::task::CURRENT_OPERATIONS, task, Value::Struct(vec![]))?;
            match &out {
                Ok(v) => {
                    t.set(
                        field::task::RESULT,
                        task,
                        Value::String(xmlrpc::value_to_string(v)),
                    )?;
                    t.set(field::task::STATUS, task, Value::str("success"))
                }
                Err(e) => {
                    t.set(
                        field::task::ERROR_INFO,
                        task,
                        Value::string_set(e.description()),
                    )?;
                    let st = if e.code == errors::TASK_CANCELLED {
                        "cancelled"
                    } else {
                        "failure"
                    };
                    t.set(field::task::STATUS, task, Value::str(st))
                }
            }
        });
    }
}

impl Server {
    /// Whether this host is its pool's master (which runs the operations).
    pub fn is_master(&self) -> bool {
        self.db
            .read()
            .get_str(field::pool::MASTER, &self.pool_ref)
            .as_deref()
            == Some(self.host_ref.as_str())
    }

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

impl crate::auth::sessions::SessionHost for Server {
    fn db(&self) -> &Db {
        &self.db
    }
    fn host_ref(&self) -> &str {
        &self.host_ref
    }
    fn host_uuid(&self) -> String {
        Server::host_uuid(self)
    }
    fn session_ended(&self, session: &str) {
        Server::session_ended(self, session)
    }
    fn wake(&self) {
        self.events.wake()
    }
}
