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
