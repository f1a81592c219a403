//! The XenAPI dispatcher: one entry point ([`Server::call`]) for every wire
//! protocol. It resolves the wire name against the datamodel (custom
//! messages, implicit class messages, per-field messages), checks the
//! parameter count, the session and the RBAC role, converts the parameters
//! to their declared types, and runs the message — in the background with a
//! task for `Async.*`, or in the foreground with a transient task for
//! async-capable messages, as XAPI does.

use crate::events::EventHub;
use crate::sessions::Sessions;
use corral_db::{Db, Txn, check_field, settable_at_create};
use corral_model::schema::{CLASSES, ClassId, FieldId, Qual, Role, Ty, class, field};
use corral_model::value::{coerce, default_value};
use corral_model::{ApiError, NULL_REF, Value, date, new_ref, xmlrpc};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

pub type ApiResult = Result<Value, ApiError>;
pub type BoxFut = Pin<Box<dyn Future<Output = ApiResult> + Send>>;

/// What a call produced, before it is encoded for the wire.
pub enum Reply {
    Value(Value),
    /// `<class>.get_all_records`: encoded by the transport straight from the
    /// tables under one read lock, without building a [`Value`] tree.
    AllRecords(ClassId),
}

/// Who is calling, as far as the transport knows.
#[derive(Clone, Debug)]
pub struct Caller {
    pub origin: crate::http::Origin,
    pub originator: Option<String>,
}

/// The session a call runs under.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub session: String,
    pub role: Role,
    pub user: String,
    pub user_ref: String,
    /// The task this call reports to, if any.
    pub task: Option<String>,
}

/// A hand-written message implementation.
#[derive(Clone, Copy)]
pub enum Handler {
    Sync(fn(&Arc<Server>, &Ctx, Vec<Value>) -> ApiResult),
    Async(fn(Arc<Server>, Ctx, Vec<Value>) -> BoxFut),
}

/// What a wire name resolved to.
#[derive(Clone)]
struct Resolved {
    wire: String,
    class: ClassId,
    params: Vec<(&'static str, Ty, Option<&'static str>)>,
    role: Role,
    is_async: bool,
    session: bool,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Custom(Handler),
    GetAll,
    GetAllRecords,
    GetAllRecordsWhere,
    GetAllWhere,
    GetRecord,
    GetByUuid,
    GetByNameLabel,
    Create,
    Destroy,
    Get(FieldId),
    Set(FieldId),
    MapAdd(FieldId),
    MapRemove(FieldId),
    SetAdd(FieldId),
    SetRemove(FieldId),
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Idle sessions expire after this long.
    pub session_timeout: std::time::Duration,
    /// Per user name; the oldest sessions are reaped beyond it.
    pub max_sessions_per_user: usize,
    /// Failed logins allowed per source address per minute.
    pub login_failures_per_minute: u32,
    /// Delay before answering a failed login (XAPI waits 5 s).
    pub failed_login_delay: std::time::Duration,
    /// `qemu`, `sim`, or `auto` (QEMU when installed, else the simulator).
    pub host_driver: String,
    /// `kvm`, `tcg` or `auto` (KVM when /dev/kvm opens).
    pub accel: String,
    pub qemu_binary: String,
    /// How long VM.clean_shutdown waits for the guest.
    pub clean_shutdown_timeout: std::time::Duration,
    /// A block device for the "Local storage" SR made at first start (an
    /// `ext` SR); none: a `file` SR under the state directory.
    pub local_sr_device: Option<String>,
    /// Directories `PV-kernel`/`PV-ramdisk` may name files in, besides
    /// `<state-dir>/boot` and local ISO libraries.
    pub boot_dirs: Vec<std::path::PathBuf>,
    /// Connection bounds (see `http.rs`).
    pub limits: crate::http::Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            session_timeout: std::time::Duration::from_secs(24 * 3600),
            max_sessions_per_user: 500,
            login_failures_per_minute: 10,
            failed_login_delay: std::time::Duration::from_secs(2),
            host_driver: "auto".into(),
            accel: "auto".into(),
            qemu_binary: "qemu-system-x86_64".into(),
            clean_shutdown_timeout: std::time::Duration::from_secs(1200),
            local_sr_device: None,
            boot_dirs: Vec::new(),
            limits: Default::default(),
        }
    }
}

pub struct Server {
    pub db: Db,
    pub host_ref: String,
    pub pool_ref: String,
    pub config: Config,
    pub sessions: Sessions,
    pub events: EventHub,
    handlers: HashMap<String, Handler>,
    /// Tasks asked to cancel.
    pub(crate) cancelled: Mutex<std::collections::HashSet<String>>,
    /// Tasks with a worker running (from `Async.*`).
    pub(crate) workers: Mutex<std::collections::HashSet<String>>,
    pub state_dir: std::path::PathBuf,
    /// Per SR uuid: serialises operations that change its images.
    pub(crate) sr_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per class: bytes per record last time all records were encoded.
    record_sizes: Vec<std::sync::atomic::AtomicUsize>,
    /// The host agent: VMs run through it.
    pub agent: Arc<dyn corral_agent::HostAgent>,
    /// VM uuids whose guest shutdown an operation is waiting for.
    pub(crate) expected_shutdowns: Mutex<std::collections::HashSet<String>>,
    /// Who made each task (tasks are volatile, like this table).
    pub(crate) task_owners: Mutex<HashMap<String, crate::tasks::TaskOwner>>,
    /// Open connections, bounded by `config.limits`.
    pub conns: Arc<crate::http::ConnGate>,
    /// The certificate the TLS listeners serve (none without TCP listeners).
    pub tls_cert: std::sync::OnceLock<Arc<crate::tls::HostCert>>,
    /// `<state-dir>/audit.log`.
    audit: Option<crate::audit::Audit>,
}

/// Picks the host agent. The simulator is used only when asked for, or
/// when no QEMU is installed (and the host record then says so).
fn make_agent(config: &Config, state_dir: &std::path::Path) -> Arc<dyn corral_agent::HostAgent> {
    let have_qemu = std::process::Command::new(&config.qemu_binary)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let sim = config.host_driver == "sim" || (config.host_driver == "auto" && !have_qemu);
    if sim {
        tracing::warn!("host driver: sim (simulated VMs; nothing runs)");
        Arc::new(corral_agent::sim::SimAgent::new(state_dir.join("sim-vms")))
    } else {
        let settings = corral_agent::qemu::QemuSettings {
            binary: config.qemu_binary.clone(),
            accel: corral_agent::resolve_accel(&config.accel).into(),
            ..Default::default()
        };
        tracing::info!(accel = %settings.accel, "host driver: qemu");
        Arc::new(corral_agent::qemu::QemuAgent::new(
            vm_run_dir(state_dir),
            settings,
        ))
    }
}

/// Where running VMs keep their sockets, logs and `vm.json`: under /run
/// (unix socket paths must stay under 108 bytes, and nothing there should
/// outlive a host reboot, just like the QEMUs), one directory per state
/// directory. `<state-dir>/vms` links to it for operators.
fn vm_run_dir(state_dir: &std::path::Path) -> std::path::PathBuf {
    use std::hash::{Hash, Hasher};
    let canon = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    canon.hash(&mut h);
    let name = format!("{:08x}", h.finish() as u32);
    let base = if std::fs::create_dir_all("/run/corral").is_ok() {
        std::path::PathBuf::from("/run/corral")
    } else {
        std::env::temp_dir().join("corral-run")
    };
    let dir = base.join(name);
    let _ = std::fs::create_dir_all(&dir);
    let link = state_dir.join("vms");
    if std::fs::read_link(&link).ok().as_deref() != Some(dir.as_path()) {
        let _ = std::fs::remove_file(&link);
        let _ = std::os::unix::fs::symlink(&dir, &link);
    }
    dir
}

fn db_err(e: corral_db::DbError) -> ApiError {
    e.into()
}

impl Server {
    pub fn new(
        db: Db,
        host_ref: String,
        pool_ref: String,
        config: Config,
        state_dir: std::path::PathBuf,
    ) -> Arc<Server> {
        let events = EventHub::new(db.read().generation());
        let state_dir_for_audit = state_dir.clone();
        let agent = make_agent(&config, &state_dir);
        let server = Arc::new(Server {
            agent,
            expected_shutdowns: Mutex::new(Default::default()),
            db,
            host_ref,
            pool_ref,
            sessions: Sessions::new(config.clone()),
            config,
            events,
            handlers: crate::handlers::table(),
            cancelled: Mutex::new(Default::default()),
            workers: Mutex::new(Default::default()),
            state_dir,
            record_sizes: CLASSES.iter().map(|_| Default::default()).collect(),
            sr_locks: Mutex::new(HashMap::new()),
            conns: Default::default(),
            task_owners: Mutex::new(HashMap::new()),
            tls_cert: std::sync::OnceLock::new(),
            audit: crate::audit::Audit::open(&state_dir_for_audit)
                .inspect_err(|e| tracing::warn!(error = %e, "no audit log"))
                .ok(),
        });
        let hub = server.events.sender();
        server.db.set_commit_hook(move |g| {
            let _ = hub.send(g);
        });
        server
    }

    /// `system.listMethods`: every wire name that has an implementation.
    pub fn list_methods(&self) -> Value {
        let mut out = Vec::new();
        for c in ClassId::all() {
            let def = c.def();
            for m in def.messages {
                let wire = format!("{}.{}", def.name, m.name);
                if self.handlers.contains_key(&wire) {
                    out.push(Value::String(wire));
                }
            }
            if !def.in_db {
                continue;
            }
            for (m, _) in def.implicit {
                out.push(Value::String(format!("{}.{m}", def.name)));
            }
            if def.implicit.iter().any(|(m, _)| *m == "get_all_records") {
                out.push(Value::String(format!("{}.get_all_records_where", def.name)));
                out.push(Value::String(format!("{}.get_all_where", def.name)));
            }
            for f in def.fields.iter().filter(|f| !f.internal) {
                if def.getters {
                    out.push(Value::String(format!("{}.get_{}", def.name, f.name)));
                }
                if f.set_role.is_some()
                    && !self
                        .handlers
                        .contains_key(&format!("{}.set_{}", def.name, f.name))
                {
                    out.push(Value::String(format!("{}.set_{}", def.name, f.name)));
                }
                if f.ops_role.is_some() {
                    match f.ty {
                        Ty::Map(..) => {
                            out.push(Value::String(format!("{}.add_to_{}", def.name, f.name)));
                            out.push(Value::String(format!(
                                "{}.remove_from_{}",
                                def.name, f.name
                            )));
                        }
                        Ty::Set(_) => {
                            out.push(Value::String(format!("{}.add_{}", def.name, f.name)));
                            out.push(Value::String(format!("{}.remove_{}", def.name, f.name)));
                        }
                        _ => {}
                    }
                }
            }
        }
        Value::Array(out)
    }

    fn resolve(&self, wire: &str) -> Option<Resolved> {
        let (cname, mname) = match wire.split_once('.') {
            Some(x) => x,
            None => {
                // The `<Class>_<message>` form.
                let c = CLASSES
                    .iter()
                    .filter(|c| wire.starts_with(&format!("{}_", c.name)))
                    .max_by_key(|c| c.name.len())?;
                (c.name, &wire[c.name.len() + 1..])
            }
        };
        let class = ClassId::by_name(cname)?;
        let def = class.def();
        let self_param = |c: &'static str| ("self", Ty::Ref(c), None);
        let mk = |params, role, is_async, kind| Resolved {
            wire: format!("{}.{mname}", def.name),
            class,
            params,
            role,
            is_async,
            session: true,
            kind,
        };
        if let Some(m) = class.message(mname) {
            let h = *self.handlers.get(&format!("{}.{}", def.name, m.name))?;
            let mut r = mk(
                m.params.iter().map(|p| (p.name, p.ty, p.default)).collect(),
                m.role,
                m.is_async,
                Kind::Custom(h),
            );
            r.session = !matches!(
                (def.name, m.name),
                ("session", "login_with_password") | ("session", "slave_local_login_with_password")
            );
            return Some(r);
        }
        if !def.in_db {
            return None;
        }
        let name = def.name;
        let has = |m: &str| class.implicit_role(m);
        let role_of = |m: &str| has(m).unwrap_or(Role::ReadOnly);
        let r = match mname {
            "get_all" if has("get_all").is_some() => {
                mk(vec![], role_of("get_all"), false, Kind::GetAll)
            }
            "get_all_records" if has("get_all_records").is_some() => mk(
                vec![],
                role_of("get_all_records"),
                false,
                Kind::GetAllRecords,
            ),
            "get_all_records_where" if has("get_all_records").is_some() => mk(
                vec![("expr", Ty::String, None)],
                Role::ReadOnly,
                false,
                Kind::GetAllRecordsWhere,
            ),
            "get_all_where" if has("get_all_records").is_some() => mk(
                vec![("expr", Ty::String, None)],
                Role::ReadOnly,
                false,
                Kind::GetAllWhere,
            ),
            "get_record" if has("get_record").is_some() => mk(
                vec![self_param(name)],
                role_of("get_record"),
                false,
                Kind::GetRecord,
            ),
            "get_by_uuid" if has("get_by_uuid").is_some() => mk(
                vec![("uuid", Ty::String, None)],
                role_of("get_by_uuid"),
                false,
                Kind::GetByUuid,
            ),
            "get_by_name_label" if has("get_by_name_label").is_some() => mk(
                vec![("label", Ty::String, None)],
                role_of("get_by_name_label"),
                false,
                Kind::GetByNameLabel,
            ),
            // Classes whose create/destroy touch more than the database
            // (PBD, VDI, VBD) have hand-written handlers.
            "create" if has("create").is_some() => mk(
                vec![("args", Ty::Record(name), None)],
                role_of("create"),
                true,
                match self.handlers.get(&format!("{name}.create")) {
                    Some(h) => Kind::Custom(*h),
                    None => Kind::Create,
                },
            ),
            "destroy" if has("destroy").is_some() => mk(
                vec![self_param(name)],
                role_of("destroy"),
                true,
                match self.handlers.get(&format!("{name}.destroy")) {
                    Some(h) => Kind::Custom(*h),
                    None => Kind::Destroy,
                },
            ),
            _ => {
                let field_op = |prefix: &str| -> Option<FieldId> {
                    let f = class.field(mname.strip_prefix(prefix)?)?;
                    if f.def().internal { None } else { Some(f) }
                };
                if let (true, Some(f)) = (def.getters, field_op("get_")) {
                    mk(vec![self_param(name)], Role::ReadOnly, false, Kind::Get(f))
                } else if let Some(f) = field_op("set_").filter(|f| f.def().set_role.is_some()) {
                    let d = f.def();
                    // A setter with checks of its own (VBD.set_mode).
                    let kind = match self.handlers.get(&format!("{name}.set_{}", d.name)) {
                        Some(h) => Kind::Custom(*h),
                        None => Kind::Set(f),
                    };
                    mk(
                        vec![self_param(name), ("value", d.ty, None)],
                        d.set_role.unwrap_or(Role::PoolAdmin),
                        false,
                        kind,
                    )
                } else if let Some(f) = field_op("add_to_").filter(|f| f.def().ops_role.is_some()) {
                    let Ty::Map(k, v) = f.def().ty else {
                        return None;
                    };
                    mk(
                        vec![self_param(name), ("key", *k, None), ("value", *v, None)],
                        f.def().ops_role.unwrap_or(Role::PoolAdmin),
                        false,
                        Kind::MapAdd(f),
                    )
                } else if let Some(f) =
                    field_op("remove_from_").filter(|f| f.def().ops_role.is_some())
                {
                    let Ty::Map(k, _) = f.def().ty else {
                        return None;
                    };
                    mk(
                        vec![self_param(name), ("key", *k, None)],
                        f.def().ops_role.unwrap_or(Role::PoolAdmin),
                        false,
                        Kind::MapRemove(f),
                    )
                } else if let Some(f) = field_op("add_").filter(|f| f.def().ops_role.is_some()) {
                    let Ty::Set(e) = f.def().ty else { return None };
                    mk(
                        vec![self_param(name), ("value", *e, None)],
                        f.def().ops_role.unwrap_or(Role::PoolAdmin),
                        false,
                        Kind::SetAdd(f),
                    )
                } else if let Some(f) = field_op("remove_").filter(|f| f.def().ops_role.is_some()) {
                    let Ty::Set(e) = f.def().ty else { return None };
                    mk(
                        vec![self_param(name), ("value", *e, None)],
                        f.def().ops_role.unwrap_or(Role::PoolAdmin),
                        false,
                        Kind::SetRemove(f),
                    )
                } else {
                    return None;
                }
            }
        };
        Some(r)
    }

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

    /// Every record of a class as one struct keyed by ref.
    fn all_records(&self, c: ClassId) -> Value {
        let st = self.db.read();
        Value::Struct(
            st.refs(c)
                .filter_map(|r| Some((r.clone(), st.record(c, r)?)))
                .collect(),
        )
    }

    /// Encodes `<class>.get_all_records` as the XML-RPC `<value>` or the
    /// JSON-RPC result, field by field from the tables.
    pub fn write_all_records(&self, c: ClassId, json: bool, out: &mut String) {
        let st = self.db.read();
        out.push_str(if json { "{" } else { "<value><struct>" });
        let mut first = true;
        for r in st.refs(c) {
            if json {
                if !first {
                    out.push(',');
                }
                corral_model::jsonrpc::write_str(r, out);
                out.push_str(":{");
            } else {
                out.push_str("<member><name>");
                xmlrpc::escape_into(r, out);
                out.push_str("</name><value><struct>");
            }
            first = false;
            let mut first_field = true;
            st.visit_record(c, r, |name, v| {
                if json {
                    if !first_field {
                        out.push(',');
                    }
                    corral_model::jsonrpc::write_str(name, out);
                    out.push(':');
                    corral_model::jsonrpc::write_value(v, out);
                } else {
                    out.push_str("<member><name>");
                    out.push_str(name);
                    out.push_str("</name>");
                    xmlrpc::write_value(v, out);
                    out.push_str("</member>");
                }
                first_field = false;
            });
            out.push_str(if json {
                "}"
            } else {
                "</struct></value></member>"
            });
        }
        out.push_str(if json { "}" } else { "</struct></value>" });
    }

    /// Bytes per record of the last encoding of each class, to size the
    /// next one's buffer in one allocation.
    pub fn records_size_hint(&self, c: ClassId) -> usize {
        let per = self
            .record_sizes
            .get(c.0)
            .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
            .unwrap_or(0);
        (per.max(256) * self.db.read().count(c)).saturating_add(4096)
    }

    pub fn note_records_size(&self, c: ClassId, bytes: usize) {
        let n = self.db.read().count(c).max(1);
        if let Some(a) = self.record_sizes.get(c.0) {
            a.store(bytes / n + 16, std::sync::atomic::Ordering::Relaxed);
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
        let audited = crate::audit::changes_state(wire);
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
            self.describe_objects(&crate::audit::objects_of(params.get(1..).unwrap_or(&[])))
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
                a.record(&crate::audit::CallRecord {
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
    fn describe_objects(&self, refs: &[String]) -> Vec<String> {
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
    fn log_failed_call(&self, method: &str, user: &str, source: &str, e: &ApiError) {
        static UNAUTHENTICATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let anonymous = user.is_empty() || e.code == "SESSION_AUTHENTICATION_FAILED";
        if anonymous && !crate::logsafe::once_per(&UNAUTHENTICATED, 1) {
            return;
        }
        tracing::info!(
            call = %crate::logsafe::name(method),
            code = %e.code,
            user = %crate::logsafe::name(user),
            source,
            "call failed"
        );
    }

    async fn dispatch(
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
            return Err(ApiError::new(
                "MESSAGE_PARAMETER_COUNT_MISMATCH",
                [res.wire.clone(), expected, given.to_string()],
            ));
        }
        let ctx = if res.session {
            let s = params.remove(0);
            let s = s.as_str().unwrap_or_default().to_owned();
            let info = self.sessions.check(self, &s)?;
            if !info.role.allows(res.role) {
                let perm = res.wire.to_lowercase();
                let holders: Vec<&str> = Role::holders(res.role).iter().map(|r| r.name()).collect();
                return Err(ApiError::new(
                    "RBAC_PERMISSION_DENIED",
                    [
                        perm,
                        format!(
                            "No permission in user session. (Roles with this permission: {})",
                            holders.join(", ")
                        ),
                    ],
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

    async fn run(self: &Arc<Self>, res: &Resolved, ctx: &Ctx, params: Vec<Value>) -> ApiResult {
        match &res.kind {
            Kind::Custom(Handler::Sync(f)) => f(self, ctx, params),
            Kind::Custom(Handler::Async(f)) => f(Arc::clone(self), ctx.clone(), params).await,
            kind => self.generic(res.class, kind, params),
        }
    }

    fn generic(&self, c: ClassId, kind: &Kind, mut p: Vec<Value>) -> ApiResult {
        let take_str = |p: &mut Vec<Value>| -> String {
            match p.remove(0) {
                Value::String(s) => s,
                other => other.db_string(),
            }
        };
        match kind {
            Kind::GetAll => Ok(Value::Array(
                self.db
                    .read()
                    .refs(c)
                    .map(|r| Value::String(r.clone()))
                    .collect(),
            )),
            Kind::GetAllRecords => Ok(self.all_records(c)),
            Kind::GetAllRecordsWhere | Kind::GetAllWhere => {
                let expr = take_str(&mut p);
                let filter =
                    crate::filter::parse(&expr).map_err(|e| ApiError::invalid_value(&expr, &e))?;
                let st = self.db.read();
                let mut out = Vec::new();
                for r in st.refs(c) {
                    let Some(row) = st.record(c, r) else { continue };
                    if filter.eval(&row) {
                        out.push((r.clone(), row));
                    }
                }
                Ok(if matches!(kind, Kind::GetAllWhere) {
                    Value::Array(out.into_iter().map(|(r, _)| Value::String(r)).collect())
                } else {
                    Value::Struct(out)
                })
            }
            Kind::GetRecord => {
                let r = take_str(&mut p);
                self.db
                    .read()
                    .record(c, &r)
                    .ok_or_else(|| ApiError::handle_invalid(c.name(), &r))
            }
            Kind::GetByUuid => {
                let u = take_str(&mut p);
                self.db
                    .read()
                    .by_uuid(c, &u)
                    .map(|r| Value::String(r.clone()))
                    .ok_or_else(|| ApiError::uuid_invalid(c.name(), &u))
            }
            Kind::GetByNameLabel => {
                let l = take_str(&mut p);
                let f = c
                    .field("name_label")
                    .ok_or_else(|| ApiError::internal("no name_label"))?;
                let st = self.db.read();
                Ok(Value::Array(
                    st.refs(c)
                        .filter(|r| {
                            st.get(f, r).as_ref().and_then(Value::as_str) == Some(l.as_str())
                        })
                        .map(|r| Value::String(r.clone()))
                        .collect(),
                ))
            }
            Kind::Create => {
                let args = p.remove(0);
                let reference = new_ref();
                let given = create_fields(c, &args)?;
                self.db
                    .write(|t| {
                        check_refs(t, c, &given)?;
                        t.create(c, &reference, given)?;
                        follow_up(t, c, &reference)
                    })
                    .map_err(db_err)?;
                Ok(Value::String(reference))
            }
            Kind::Destroy => {
                let r = take_str(&mut p);
                self.db.write(|t| t.delete(c, &r)).map_err(db_err)?;
                Ok(Value::String(String::new()))
            }
            Kind::Get(f) => {
                let r = take_str(&mut p);
                self.db
                    .read()
                    .get(*f, &r)
                    .ok_or_else(|| ApiError::handle_invalid(c.name(), &r))
            }
            Kind::Set(f) => {
                let r = take_str(&mut p);
                let v = check_field(*f, p.remove(0))?;
                self.db
                    .write(|t| {
                        check_refs(t, c, &[(f.index, v.clone())])?;
                        t.set(*f, &r, v)?;
                        follow_up(t, c, &r)
                    })
                    .map_err(db_err)?;
                Ok(Value::String(String::new()))
            }
            Kind::MapAdd(f) => {
                let r = take_str(&mut p);
                let key = p.remove(0).db_string();
                let val = p.remove(0);
                self.db
                    .write(|t| {
                        let cur = t
                            .state()
                            .get(*f, &r)
                            .ok_or_else(|| ApiError::handle_invalid(c.name(), &r))?;
                        let mut m = cur.as_struct().map(<[_]>::to_vec).unwrap_or_default();
                        if m.iter().any(|(k, _)| *k == key) {
                            let uuid = t.state().get_str(uuid_field(c), &r).unwrap_or_default();
                            return Err(ApiError::new(
                                "MAP_DUPLICATE_KEY",
                                [c.name(), f.def().name, &uuid, &key],
                            ));
                        }
                        m.push((key.clone(), val.clone()));
                        t.set(*f, &r, Value::Struct(m))?;
                        follow_up(t, c, &r)
                    })
                    .map_err(db_err)?;
                Ok(Value::String(String::new()))
            }
            Kind::MapRemove(f) => {
                let r = take_str(&mut p);
                let key = p.remove(0).db_string();
                self.db
                    .write(|t| {
                        let cur = t
                            .state()
                            .get(*f, &r)
                            .ok_or_else(|| ApiError::handle_invalid(c.name(), &r))?;
                        let m = cur.as_struct().map(<[_]>::to_vec).unwrap_or_default();
                        if !m.iter().any(|(k, _)| *k == key) {
                            return Ok(());
                        }
                        t.set(
                            *f,
                            &r,
                            Value::Struct(m.into_iter().filter(|(k, _)| *k != key).collect()),
                        )?;
                        follow_up(t, c, &r)
                    })
                    .map_err(db_err)?;
                Ok(Value::String(String::new()))
            }
            Kind::SetAdd(f) | Kind::SetRemove(f) => {
                let adding = matches!(kind, Kind::SetAdd(_));
                let r = take_str(&mut p);
                let v = p.remove(0);
                self.db
                    .write(|t| {
                        let cur = t
                            .state()
                            .get(*f, &r)
                            .ok_or_else(|| ApiError::handle_invalid(c.name(), &r))?;
                        let mut s = cur.as_array().map(<[_]>::to_vec).unwrap_or_default();
                        let present = s.contains(&v);
                        if adding == present {
                            return Ok(());
                        }
                        if adding {
                            s.push(v.clone());
                        } else {
                            s.retain(|x| *x != v);
                        }
                        t.set(*f, &r, Value::Array(s))
                    })
                    .map_err(db_err)?;
                Ok(Value::String(String::new()))
            }
            Kind::Custom(_) => Err(ApiError::internal("unreachable dispatch")),
        }
    }

    // ----- tasks -----

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
                crate::tasks::TaskOwner {
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
                    let st = if e.code == "TASK_CANCELLED" {
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

/// Derived fields that a generic setter's change affects (a VM's
/// `allowed_operations` after `is_a_template` or `blocked_operations`).
fn follow_up(t: &mut Txn<'_>, c: ClassId, r: &str) -> Result<(), ApiError> {
    if c == class::VM {
        crate::vm::refresh_allowed(t, r)?;
    }
    Ok(())
}

pub fn uuid_field(c: ClassId) -> FieldId {
    c.field("uuid").unwrap_or(FieldId { class: c, index: 0 })
}

/// The fields given to a generic `create`, type-checked; RW and ctor fields
/// without a datamodel default must be present.
pub(crate) fn create_fields(c: ClassId, args: &Value) -> Result<Vec<(usize, Value)>, ApiError> {
    let members = args
        .as_struct()
        .ok_or_else(|| ApiError::field_type("args"))?;
    let mut out = Vec::new();
    for (i, f) in c.def().fields.iter().enumerate() {
        if !settable_at_create(f) {
            continue;
        }
        match members.iter().find(|(k, _)| k == f.name) {
            Some((_, v)) => out.push((i, coerce(v.clone(), &f.ty, f.name)?)),
            None if f.default.is_some() => {}
            None => {
                return Err(ApiError::internal(format!(
                    "Missing field {} in {}.create",
                    f.name,
                    c.name()
                )));
            }
        }
    }
    Ok(out)
}

/// Refs written to the database must name existing objects (or be null).
pub fn check_refs(t: &Txn<'_>, c: ClassId, fields: &[(usize, Value)]) -> Result<(), ApiError> {
    for (i, v) in fields {
        let f = &c.def().fields[*i];
        if let (Ty::Ref(target), Some(r)) = (f.ty, v.as_str()) {
            if let Some(tc) = ClassId::by_name(target) {
                if r != NULL_REF && tc.def().in_db && !t.state().exists(tc, r) {
                    return Err(ApiError::handle_invalid(target, r));
                }
            }
        }
    }
    Ok(())
}

/// Convenience for handlers: take a string parameter.
pub fn pstr(p: &mut std::vec::IntoIter<Value>) -> String {
    match p.next() {
        Some(Value::String(s)) | Some(Value::DateTime(s)) => s,
        Some(v) => v.db_string(),
        None => String::new(),
    }
}

pub fn void() -> ApiResult {
    Ok(Value::String(String::new()))
}

pub fn is_rw(f: FieldId) -> bool {
    f.def().qual == Qual::RW
}
