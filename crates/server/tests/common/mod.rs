//! What the in-process harnesses share.

use corral_server::core::call::{Caller, Origin};

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
