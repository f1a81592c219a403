//! The forwarding seam in a pool built in one process: a master and a
//! second host share one pool database; each host has its own simulated
//! agent and state directory, and the master reaches host B's drivers
//! through a loopback pool link that a test can cut.
//!
//! What it proves: an operation on an object that lives on host B acts
//! through B's drivers (B's agent runs the VM, B's PBD is plugged through
//! B), and a host that cannot be reached yields `CANNOT_CONTACT_HOST`
//! with its marks released and nothing recorded.

use corral_agent::HostAgent;
use corral_agent::sim::SimAgent;
use corral_model::refs::Ref;
use corral_model::{ApiError, Value, class, field};
use corral_net::sim::SimNetwork;
use corral_server::context::hosts::{HostHandle, LinkError, PoolLink};
use corral_server::context::{LocalDrivers, Server};
mod common;
use common::caller;
use corral_server::core::config::Config;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The master's way to host B: B's handle, unless the link is cut.
struct LoopbackLink {
    hosts: HashMap<String, HostHandle>,
    cut: Mutex<HashSet<String>>,
}

impl PoolLink for LoopbackLink {
    fn connect(&self, host: &str) -> Result<HostHandle, LinkError> {
        if self.cut.lock().unwrap().contains(host) {
            return Err(LinkError::Unreachable("link cut by the test".into()));
        }
        self.hosts.get(host).cloned().ok_or(LinkError::NoLink)
    }
}

struct TestPool {
    dir: PathBuf,
    master: Arc<Server>,
    a_agent: Arc<SimAgent>,
    b: String,
    b_agent: Arc<SimAgent>,
    link: Arc<LoopbackLink>,
    session: String,
}

impl Drop for TestPool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestPool {
    async fn new() -> TestPool {
        let dir = std::env::temp_dir().join(format!("corral-seam-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("test directory");
        let a_agent = Arc::new(SimAgent::new(dir.join("a/sim-vms")));
        let (db, master) =
            common::sim_master(dir.join("a"), a_agent.clone(), Arc::new(SimNetwork::new()));
        let b = common::add_host_b(&db);
        let b_agent = Arc::new(SimAgent::new(dir.join("b/sim-vms")));
        let b_net = Arc::new(SimNetwork::new());
        let b_handle = HostHandle {
            host: b.clone(),
            agent: b_agent.clone(),
            net: b_net.clone(),
            state_dir: dir.join("b"),
        };
        let link = Arc::new(LoopbackLink {
            hosts: HashMap::from([(b.clone(), b_handle.clone())]),
            cut: Mutex::new(HashSet::new()),
        });
        master.set_pool_link(link.clone());
        corral_server::ops::vm::monitor::watch_host(&master, master.local());
        corral_server::ops::vm::monitor::watch_host(&master, b_handle);
        let session = common::login_root(&master).await;
        TestPool {
            dir,
            master,
            a_agent,
            b,
            b_agent,
            link,
            session,
        }
    }

    async fn call(&self, method: &str, args: Vec<Value>) -> Result<Value, ApiError> {
        let mut params = vec![Value::str(&self.session)];
        params.extend(args);
        self.master.call(method, params, &caller()).await
    }

    /// Through the typed client.
    async fn start_on(&self, vm: &str, host: &str) -> Result<Value, ApiError> {
        let args = corral_model::args::vm::StartOn {
            vm: Ref::new(vm),
            host: Ref::new(host),
            start_paused: false,
            force: false,
        };
        self.master.invoke(&self.session, args, &caller()).await
    }

    fn cut(&self, host: &str, cut: bool) {
        let mut c = self.link.cut.lock().unwrap();
        if cut {
            c.insert(host.to_owned());
        } else {
            c.remove(host);
        }
    }

    /// A halted VM (no disks) cloned from a template.
    async fn vm(&self, name: &str) -> String {
        let tpl = self
            .call(
                "VM.get_by_name_label",
                vec![Value::str("Other install media")],
            )
            .await
            .expect("template");
        let tpl = tpl.as_array().expect("refs")[0].db_string();
        let vm = self
            .call("VM.clone", vec![Value::str(&tpl), Value::str(name)])
            .await
            .expect("clone")
            .db_string();
        self.call(
            "VM.set_is_a_template",
            vec![Value::str(&vm), Value::Bool(false)],
        )
        .await
        .expect("not a template");
        vm
    }

    fn get(&self, f: corral_model::FieldId, r: &str) -> String {
        self.master.db.read().get_str(f, r).unwrap_or_default()
    }

    fn uuid(&self, vm: &str) -> String {
        self.get(field::vm::UUID, vm)
    }

    fn current_ops(&self, vm: &str) -> usize {
        self.master
            .db
            .read()
            .get(field::vm::CURRENT_OPERATIONS, vm)
            .and_then(|v| v.as_struct().map(<[_]>::len))
            .unwrap_or(0)
    }
}

/// Whether a simulated agent rooted at `root` holds the VM.
fn runs(root: &Path, uuid: &str) -> bool {
    root.join("sim-vms").join(format!("{uuid}.json")).exists()
}

fn code(r: Result<Value, ApiError>) -> Vec<String> {
    match r {
        Ok(v) => panic!("expected a failure, got {v:?}"),
        Err(e) => e.description(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_host_b_runs_through_b_s_agent() {
    let p = TestPool::new().await;
    let vm = p.vm("on-b").await;
    let uuid = p.uuid(&vm);
    p.start_on(&vm, &p.b).await.expect("start_on B");
    assert_eq!(p.get(field::vm::RESIDENT_ON, &vm), p.b);
    assert!(runs(&p.dir.join("b"), &uuid), "B's agent runs it");
    assert!(
        !runs(&p.dir.join("a"), &uuid),
        "the master's agent does not"
    );

    // Every later operation finds B from the VM's residence.
    p.call("VM.pause", vec![Value::str(&vm)])
        .await
        .expect("pause");
    assert_eq!(
        p.b_agent.state(&uuid).await.expect("B state"),
        corral_agent::RunState::Paused
    );
    assert!(
        matches!(
            p.a_agent.state(&uuid).await,
            Ok(corral_agent::RunState::Gone) | Err(_)
        ),
        "A knows nothing of it"
    );
    p.call("VM.unpause", vec![Value::str(&vm)])
        .await
        .expect("unpause");
    // A clean shutdown presses B's power button and waits for B's event.
    p.call("VM.clean_shutdown", vec![Value::str(&vm)])
        .await
        .expect("clean shutdown on B");
    assert_eq!(p.get(field::vm::POWER_STATE, &vm), "Halted");
    assert!(!runs(&p.dir.join("b"), &uuid));

    // Without a host named, the VM starts where placement puts it: here.
    p.call(
        "VM.start",
        vec![Value::str(&vm), Value::Bool(false), Value::Bool(false)],
    )
    .await
    .expect("start");
    assert_eq!(p.get(field::vm::RESIDENT_ON, &vm), p.master.host_ref);
    assert!(runs(&p.dir.join("a"), &uuid));
    assert!(!runs(&p.dir.join("b"), &uuid));
    p.call("VM.hard_shutdown", vec![Value::str(&vm)])
        .await
        .expect("hard shutdown here");
    assert_eq!(p.current_ops(&vm), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_host_is_cannot_contact_host_and_changes_nothing() {
    let p = TestPool::new().await;
    let vm = p.vm("b-unreachable").await;
    let uuid = p.uuid(&vm);
    let start_on_b = || p.start_on(&vm, &p.b);
    p.cut(&p.b, true);
    assert_eq!(
        code(start_on_b().await),
        ["CANNOT_CONTACT_HOST", p.b.as_str()]
    );
    assert_eq!(p.get(field::vm::POWER_STATE, &vm), "Halted");
    assert_eq!(p.current_ops(&vm), 0, "the mark went with the call");
    let allowed = p.master.db.read().get(field::vm::ALLOWED_OPERATIONS, &vm);
    assert!(
        allowed
            .and_then(|a| a
                .as_array()
                .map(|a| a.iter().any(|o| o.db_string() == "start")))
            .unwrap_or(false),
        "start is allowed again"
    );

    // Running on B, then B goes away: operations on the VM cannot act.
    p.cut(&p.b, false);
    start_on_b().await.expect("start_on B");
    p.cut(&p.b, true);
    assert_eq!(
        code(p.call("VM.hard_shutdown", vec![Value::str(&vm)]).await),
        ["CANNOT_CONTACT_HOST", p.b.as_str()]
    );
    assert_eq!(p.get(field::vm::POWER_STATE, &vm), "Running");
    assert_eq!(p.get(field::vm::RESIDENT_ON, &vm), p.b);
    assert_eq!(p.current_ops(&vm), 0);
    assert!(runs(&p.dir.join("b"), &uuid), "B's QEMU was not touched");
    // power_state_reset is for exactly this: it needs no host.
    p.call("VM.power_state_reset", vec![Value::str(&vm)])
        .await
        .expect("power_state_reset");
    assert_eq!(p.get(field::vm::POWER_STATE, &vm), "Halted");

    // A host whose metrics say it is down is refused before any contact.
    let metrics = p.get(field::host::METRICS, &p.b);
    p.master
        .db
        .write(|t| t.set(field::host_metrics::LIVE, &metrics, Value::Bool(false)))
        .expect("B down");
    p.cut(&p.b, false);
    assert_eq!(code(start_on_b().await), ["HOST_OFFLINE", p.b.as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_on_host_b_is_reached_through_b() {
    let p = TestPool::new().await;
    let create_on_b = |dir: PathBuf| {
        p.call(
            "SR.create",
            vec![
                Value::str(&p.b),
                Value::Struct(vec![("location".into(), Value::str(dir.to_string_lossy()))]),
                Value::Int(0),
                Value::str("B's storage"),
                Value::str(""),
                Value::str("file"),
                Value::str("user"),
                Value::Bool(false),
                Value::Struct(vec![]),
            ],
        )
    };
    let srs = || p.master.db.read().refs(class::SR).count();
    let before = srs();
    p.cut(&p.b, true);
    let refused = p.dir.join("sr-refused");
    assert_eq!(
        code(create_on_b(refused.clone()).await),
        ["CANNOT_CONTACT_HOST", p.b.as_str()]
    );
    assert_eq!(srs(), before, "no SR record was made");
    assert!(!refused.exists(), "no storage was prepared");

    p.cut(&p.b, false);
    let sr = create_on_b(p.dir.join("sr-b"))
        .await
        .expect("SR.create on B")
        .db_string();
    let pbd = {
        let st = p.master.db.read();
        let pbds: Vec<String> = st
            .refs(class::PBD)
            .filter(|x| st.get_str(field::pbd::SR, x).as_deref() == Some(sr.as_str()))
            .cloned()
            .collect();
        assert_eq!(pbds.len(), 1);
        assert_eq!(st.get_str(field::pbd::HOST, &pbds[0]), Some(p.b.clone()));
        pbds[0].clone()
    };
    let attached = || {
        p.master
            .db
            .read()
            .get(field::pbd::CURRENTLY_ATTACHED, &pbd)
            .and_then(|v| v.as_bool())
    };
    assert_eq!(attached(), Some(true), "plugged on B");
    // A VDI on it is made through the host that has it plugged.
    p.call(
        "VDI.create",
        vec![Value::Struct(vec![
            ("SR".into(), Value::str(&sr)),
            ("virtual_size".into(), Value::str("1048576")),
            ("type".into(), Value::str("user")),
            ("name_label".into(), Value::str("on-b")),
            ("read_only".into(), Value::Bool(false)),
            ("sharable".into(), Value::Bool(false)),
            ("other_config".into(), Value::Struct(vec![])),
        ])],
    )
    .await
    .expect("VDI.create on B's SR");

    p.cut(&p.b, true);
    assert_eq!(
        code(p.call("PBD.unplug", vec![Value::str(&pbd)]).await),
        ["CANNOT_CONTACT_HOST", p.b.as_str()]
    );
    assert_eq!(attached(), Some(true), "still plugged");
    p.cut(&p.b, false);
    p.call("PBD.unplug", vec![Value::str(&pbd)])
        .await
        .expect("unplug on B");
}

impl TestPool {
    /// Host B's own corrald context on the pool database (as a member).
    fn member_b(&self) -> Arc<Server> {
        let b_agent: Arc<dyn HostAgent> = self.b_agent.clone();
        Server::new(
            Arc::clone(&self.master.db),
            self.b.clone(),
            self.master.pool_ref.clone(),
            Config::default(),
            self.dir.join("b"),
            LocalDrivers {
                agent: b_agent,
                net: Arc::new(SimNetwork::new()),
            },
            corral_server::dispatch::registry::table(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_checked_by_any_host_with_the_pool_database() {
    let p = TestPool::new().await;
    let b = p.member_b();
    let on_b = |m: &'static str, s: &str| {
        let (b, params) = (
            Arc::clone(&b),
            vec![Value::str(s), Value::str(&p.master.pool_ref)],
        );
        async move { b.call(m, params, &caller()).await }
    };
    // The master's session works on B, with the user's role.
    let rec = on_b("pool.get_record", &p.session).await.expect("on B");
    assert!(rec.as_struct().is_some());
    assert!(on_b("pool.get_record", "OpaqueRef:made-up").await.is_err());
    // Logged out on the master: B stops taking it at once.
    p.call("session.logout", vec![]).await.expect("logout");
    assert_eq!(
        code(on_b("pool.get_record", &p.session).await),
        ["SESSION_INVALID", p.session.as_str()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_clears_only_what_its_own_host_was_doing() {
    let p = TestPool::new().await;
    let vm = p.vm("marked").await;
    let (b_task, m_task, internal) = ("OpaqueRef:task-b", "OpaqueRef:task-m", "OpaqueRef:internal");
    p.master
        .db
        .write(|t| {
            for (task, host) in [(b_task, &p.b), (m_task, &p.master.host_ref)] {
                t.create(class::TASK, task, vec![])?;
                t.set(field::task::RESIDENT_ON, task, Value::str(host))?;
            }
            t.set(
                field::vm::CURRENT_OPERATIONS,
                &vm,
                Value::Struct(vec![
                    (b_task.into(), Value::str("clone")),
                    (m_task.into(), Value::str("copy")),
                    (internal.into(), Value::str("export")),
                ]),
            )
        })
        .expect("marks");
    let keys = || -> Vec<String> {
        let st = p.master.db.read();
        let mut k: Vec<String> = st
            .get(field::vm::CURRENT_OPERATIONS, &vm)
            .and_then(|v| {
                v.as_struct()
                    .map(|m| m.iter().map(|(k, _)| k.clone()).collect())
            })
            .unwrap_or_default();
        k.sort();
        k
    };
    let tasks = |task: &str| p.master.db.read().exists(class::TASK, task);

    // B restarts: its own task's mark and the task go; the master's stay.
    let b = p.member_b();
    corral_server::ops::vm::startup::startup(&b)
        .await
        .expect("B start-up");
    b.forget_dead_tasks();
    assert_eq!(keys(), [internal, m_task]);
    assert!(!tasks(b_task));
    assert!(tasks(m_task));

    // The master restarts: its task's mark and its internal one go.
    corral_server::ops::vm::startup::startup(&p.master)
        .await
        .expect("master start-up");
    p.master.forget_dead_tasks();
    assert!(keys().is_empty());
    assert!(!tasks(m_task));
}
