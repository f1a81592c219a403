//! The audit trail. Every call that changes state is recorded in
//! `<state-dir>/audit.log` (as XAPI's audit.log: who, what, on which
//! objects, the outcome), one JSON object per line, rotated and bounded;
//! every failed call is also logged to `corrald.log` with its error code,
//! so an administrator can see why a client failed. Parameters are never
//! recorded, only the objects they name, so no secret reaches either file.

use crate::core::logfile::{KEEP, MAX_BYTES, RotatingFile};
use corral_model::{ApiError, Value};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

pub struct Audit {
    file: Mutex<RotatingFile>,
}

/// What one call was, for the record.
pub struct CallRecord<'a> {
    pub method: &'a str,
    pub user: &'a str,
    pub source: &'a str,
    /// `class/uuid` (or the ref, for objects already gone) of the objects
    /// the call named.
    pub objects: &'a [String],
    pub outcome: &'a Result<(), ApiError>,
}

impl Audit {
    pub fn open(state_dir: &Path) -> std::io::Result<Audit> {
        Ok(Audit {
            file: Mutex::new(RotatingFile::open(
                &state_dir.join("audit.log"),
                MAX_BYTES,
                KEEP,
            )?),
        })
    }

    pub fn record(&self, r: &CallRecord<'_>) {
        let (outcome, error) = match r.outcome {
            Ok(()) => ("ok", Vec::new()),
            Err(e) => ("error", e.description()),
        };
        let mut line = serde_json::json!({
            "time": corral_model::date::format(corral_model::date::now_secs()),
            "user": crate::core::logsafe::name(r.user),
            "source": r.source,
            "call": crate::core::logsafe::name(r.method),
            "objects": r.objects,
            "outcome": outcome,
        });
        if let Some(code) = error.first() {
            line["error"] = serde_json::Value::String(code.clone());
        }
        let text = format!("{line}\n");
        if let Ok(mut f) = self.file.lock() {
            let _ = f.write_all(text.as_bytes());
        }
    }
}

/// Whether a call (wire name, without `Async.`) may change state. Reads
/// (getters, `get_all*`, `get_record`, event waits, probes, assertions) are
/// not audited.
pub fn changes_state(wire: &str) -> bool {
    let name = wire.rsplit('.').next().unwrap_or(wire);
    !(name.starts_with("get")
        || name.starts_with("assert_")
        || matches!(
            wire,
            "event.from"
                | "event.next"
                | "event.register"
                | "event.unregister"
                | "event.inject"
                | "system.listMethods"
                | "SR.probe"
                | "SR.probe_ext"
                | "session.local_logout"
        ))
}

/// The object references among a call's parameters (after the session):
/// strings that are refs, and refs inside arrays. Nothing else is kept.
pub fn objects_of(params: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for p in params {
        match p {
            Value::String(s) if s.starts_with("OpaqueRef:") => out.push(s.clone()),
            Value::Array(a) => {
                for v in a.iter().take(16) {
                    if let Value::String(s) = v {
                        if s.starts_with("OpaqueRef:") {
                            out.push(s.clone());
                        }
                    }
                }
            }
            _ => {}
        }
        if out.len() >= 16 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_not_audited() {
        for w in [
            "VM.get_record",
            "VM.get_all_records_where",
            "event.from",
            "SR.probe",
            "VM.get_power_state",
        ] {
            assert!(!changes_state(w), "{w}");
        }
        for w in [
            "VM.start",
            "VM.set_name_label",
            "session.login_with_password",
            "task.destroy",
            "SR.create",
        ] {
            assert!(changes_state(w), "{w}");
        }
    }

    #[test]
    fn only_refs_are_kept_from_parameters() {
        let p = vec![
            Value::str("OpaqueRef:a"),
            Value::str("TopSecretPw-42"),
            Value::Struct(vec![("password".into(), Value::str("hunter2"))]),
            Value::Array(vec![Value::str("OpaqueRef:b"), Value::str("x")]),
        ];
        assert_eq!(objects_of(&p), ["OpaqueRef:a", "OpaqueRef:b"]);
    }
}
