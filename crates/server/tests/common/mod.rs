//! What the in-process harnesses share.

use corral_agent::sim::SimAgent;
use corral_db::Db;
use corral_model::Value;
use corral_net::sim::SimNetwork;
use corral_server::context::{LocalDrivers, Server};
use corral_server::core::call::{Caller, Origin};
use std::path::PathBuf;
use std::sync::Arc;

/// A caller as the local root user is (the unix socket, uid 0).
pub fn caller() -> Caller {
    Caller {
        origin: Origin {
            addr: None,
            local_root: true,
            raw_fd: None,
        },
        originator: None,
    }
}

/// A second host's record ("host-b", 198.18.0.2) in the pool database.
pub fn add_host_b(db: &corral_db::Db) -> String {
    corral_server::init::add_host(
        db,
        &corral_server::init::HostFacts {
            name: "host-b".into(),
            address: "198.18.0.2".into(),
            memory_total: 16 << 30,
            memory_free: 15 << 30,
            ncpu: 2,
            cpu: vec![],
        },
    )
    .expect("host B")
}

/// A new in-memory pool database (root's password "pw") and its master,
/// on simulated drivers, with `state_dir` as its state directory.
pub fn sim_master(
    state_dir: PathBuf,
    agent: Arc<SimAgent>,
    net: Arc<SimNetwork>,
) -> (Arc<Db>, Arc<Server>) {
    let db = Arc::new(Db::in_memory());
    let id = corral_server::init::ensure(&db, Some("pw".into())).expect("pool database");
    let server = Server::new(
        Arc::clone(&db),
        id.host_ref,
        id.pool_ref,
        corral_server::core::config::Config::default(),
        state_dir,
        LocalDrivers { agent, net },
        corral_server::dispatch::registry::table(),
    );
    (db, server)
}

/// A root session on `server`.
pub async fn login_root(server: &Arc<Server>) -> String {
    server
        .call(
            "session.login_with_password",
            vec![Value::str("root"), Value::str("pw")],
            &caller(),
        )
        .await
        .expect("login")
        .db_string()
}
