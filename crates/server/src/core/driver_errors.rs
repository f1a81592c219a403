//! The one place where the drivers' typed errors become XenAPI errors:
//! the host agent's (`AgentError`), the host network's (`NetError`) and
//! the storage layer's (`StorageError`). The database's own mapping lives beside `DbError`.

use corral_agent::AgentError;
use corral_model::{ApiError, errors};
use corral_storage::StorageError;

/// A host-agent failure while acting on VM `vm` (a reference).
pub fn agent(vm: &str, e: AgentError) -> ApiError {
    match e {
        // Its QEMU is gone: the monitor records it halted.
        AgentError::NotRunning(_) => errors::vm_bad_power_state(vm, "running", "halted"),
        AgentError::StartFailed(m) => ApiError::internal(format!("QEMU failed to start: {m}")),
        AgentError::Qmp(e) => ApiError::internal(format!("QEMU refused: {e}")),
        AgentError::Io(e) => ApiError::internal(format!("host agent I/O: {e}")),
        AgentError::Rejected(d) => ApiError::internal(format!("the guest did not release {d}")),
        AgentError::Other(m) => ApiError::internal(m),
    }
}

/// A host-network failure while setting up `what` (a bridge, a tap).
pub fn network(what: &str, e: corral_net::NetError) -> ApiError {
    ApiError::internal(format!("host network, {what}: {e}"))
}

/// A host-agent failure in an operation on the host as a whole (no VM).
pub fn agent_on_host(e: AgentError) -> ApiError {
    ApiError::internal(format!("host agent: {e}"))
}

/// A storage failure during the SMAPI-style operation numbered `code`
/// (the `SR_BACKEND_FAILURE_<code>` it reports when nothing more specific
/// fits) on SR `sr` (a reference).
pub fn storage(code: u32, sr: &str, e: StorageError) -> ApiError {
    let backend = |code: u32, reason: &str, detail: String| {
        ApiError::new(
            &format!("SR_BACKEND_FAILURE_{code}"),
            [String::new(), reason.to_owned(), detail],
        )
    };
    match e {
        StorageError::Backend {
            code,
            reason,
            detail,
        } => backend(code, &reason, detail),
        StorageError::Tool(m) => backend(code, "Storage operation failed", m),
        StorageError::Io(e) => backend(code, "Storage operation failed", e.to_string()),
        StorageError::Full(m) => backend(44, "There is insufficient space", m),
        StorageError::Missing(loc) => errors::vdi_missing(sr, loc),
        StorageError::NotSupported => errors::sr_operation_not_supported(sr),
        StorageError::RequiresUpgrade => errors::sr_requires_upgrade(sr),
        StorageError::Untrusted(why) => backend(code, "The image cannot be used", why),
        StorageError::BadConfig { key, why } => {
            ApiError::invalid_value(&format!("device-config:{key}"), &why)
        }
        StorageError::TooNew { found, supported } => backend(
            47,
            "The SR is not available",
            format!(
                "SR format version {found} was written by a newer Corral (this one supports up to {supported})"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_failures_map_to_xenapi_codes() {
        let e = agent("OpaqueRef:vm", AgentError::NotRunning("u".into()));
        assert_eq!(
            e.description(),
            ["VM_BAD_POWER_STATE", "OpaqueRef:vm", "running", "halted"]
        );
        let e = agent("OpaqueRef:vm", AgentError::Other("boom".into()));
        assert_eq!(e.description(), ["INTERNAL_ERROR", "boom"]);
    }

    #[test]
    fn storage_failures_map_to_xenapi_codes() {
        let e = storage(78, "OpaqueRef:sr", StorageError::NotSupported);
        assert_eq!(
            e.description(),
            ["SR_OPERATION_NOT_SUPPORTED", "OpaqueRef:sr"]
        );
        let e = storage(78, "OpaqueRef:sr", StorageError::Tool("qemu-img: x".into()));
        assert_eq!(
            e.description(),
            [
                "SR_BACKEND_FAILURE_78",
                "",
                "Storage operation failed",
                "qemu-img: x"
            ]
        );
        let e = storage(78, "OpaqueRef:sr", StorageError::Full("1 GiB".into()));
        assert_eq!(e.code, "SR_BACKEND_FAILURE_44");
        let e = storage(78, "OpaqueRef:sr", StorageError::Missing("loc".into()));
        assert_eq!(e.description(), ["VDI_MISSING", "OpaqueRef:sr", "loc"]);
    }
}
