//! Which VM operations are allowed when, and the operation marks.

use crate::context::Server;
use crate::core::call::{ApiResult, Ctx, void};
use crate::core::marks::{Mark, Want};
use crate::ops::query::{flag, power, strmap};
use VmOperations as Op;
use VmPowerState::{Halted, Paused, Running, Suspended};
use corral_model::enums::{VmOperations, VmPowerState};
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value, errors, new_ref};
use std::collections::BTreeMap;

/// `VM.other_config` key on a VM that VM.clone/VM.copy is still making
/// (its disks); start-up removes such VMs.
pub(crate) const BEING_MADE: &str = "corral-being-made";

/// (operation, power states it is allowed from, in XAPI's order).
pub(crate) const POWER_OPS: &[(VmOperations, &[VmPowerState])] = &[
    (Op::Start, &[Halted]),
    (Op::StartOn, &[Halted]),
    (Op::Pause, &[Running]),
    (Op::Unpause, &[Paused]),
    (Op::CleanShutdown, &[Running]),
    (Op::Shutdown, &[Paused, Suspended, Running]),
    (Op::HardShutdown, &[Paused, Suspended, Running]),
    (Op::CleanReboot, &[Running]),
    (Op::HardReboot, &[Paused, Running]),
    (Op::Suspend, &[Running]),
    (Op::Resume, &[Suspended]),
    (Op::ResumeOn, &[Suspended]),
    (Op::PowerStateReset, &[Halted, Paused, Suspended, Running]),
    (Op::Clone, &[Halted]),
    (Op::Copy, &[Halted]),
    (Op::Provision, &[Halted]),
    (Op::Destroy, &[Halted, Suspended]),
];

/// Operations a template may not do.
pub(crate) const NOT_FOR_TEMPLATES: &[VmOperations] = &[
    Op::Start,
    Op::StartOn,
    Op::Pause,
    Op::Unpause,
    Op::CleanShutdown,
    Op::Shutdown,
    Op::HardShutdown,
    Op::CleanReboot,
    Op::HardReboot,
    Op::Suspend,
    Op::Resume,
    Op::ResumeOn,
];

/// What the operation checks read about a VM, gathered once per VM (the
/// start-up refresh checks every operation of every VM).
pub(crate) struct VmFacts {
    blocked: BTreeMap<String, String>,
    power: VmPowerState,
    /// (task, operation)
    current: Vec<(String, String)>,
    template: bool,
    control_domain: bool,
}

impl VmFacts {
    fn of(st: &corral_db::State, vm: &str) -> Option<VmFacts> {
        if !st.exists(class::VM, vm) {
            return None;
        }
        let current = st
            .get(field::vm::CURRENT_OPERATIONS, vm)
            .and_then(|v| {
                v.as_struct().map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                        .collect()
                })
            })
            .unwrap_or_default();
        Some(VmFacts {
            blocked: strmap(st.get(field::vm::BLOCKED_OPERATIONS, vm)),
            power: power(st, vm),
            current,
            template: flag(st, field::vm::IS_A_TEMPLATE, vm),
            control_domain: flag(st, field::vm::IS_CONTROL_DOMAIN, vm),
        })
    }

    /// XAPI's `check_operation_error` for `op` on `vm`.
    fn check(&self, vm: &str, op: VmOperations) -> Result<(), ApiError> {
        if let Some(reason) = self.blocked.get(op.as_str()) {
            return Err(errors::operation_blocked(vm, reason.as_str()));
        }
        if let Some((_, states)) = POWER_OPS.iter().find(|(o, _)| *o == op) {
            if !states.contains(&self.power) {
                let expected = states
                    .iter()
                    .map(|s| s.as_str().to_lowercase())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(errors::vm_bad_power_state(
                    vm.to_owned(),
                    expected,
                    self.power.as_str().to_lowercase(),
                ));
            }
        }
        if let Some((task, other)) = self.current.first() {
            let running: Vec<Option<VmOperations>> = self
                .current
                .iter()
                .map(|(_, o)| VmOperations::parse(o))
                .collect();
            if !allowed_concurrently(op, &running) {
                return Err(errors::other_operation_in_progress(
                    "VM",
                    vm,
                    other.as_str(),
                    task.as_str(),
                ));
            }
        }
        if self.template && NOT_FOR_TEMPLATES.contains(&op) {
            return Err(errors::vm_is_template(vm, op.as_str()));
        }
        if self.control_domain {
            return Err(ApiError::operation_not_allowed(
                "This operation is not allowed on the control domain",
            ));
        }
        Ok(())
    }
}

pub(crate) fn check_op(st: &corral_db::State, vm: &str, op: VmOperations) -> Result<(), ApiError> {
    VmFacts::of(st, vm)
        .ok_or_else(|| ApiError::handle_invalid("VM", vm))?
        .check(vm, op)
}

/// Operations that may run side by side, as in XAPI: copies of one VM
/// (many clones of a template at once), and snapshots. Anything else waits
/// for the VM to be idle.
pub(crate) const CONCURRENT_GROUPS: &[&[VmOperations]] = &[
    &[Op::Clone, Op::Copy, Op::Export],
    &[Op::Snapshot, Op::Checkpoint],
];

/// XAPI's rule for forcing a VM off: it may run beside any operation (a
/// clean shutdown the guest ignores, say) but another forced one.
pub(crate) const FORCED: &[VmOperations] = &[Op::HardShutdown, Op::HardReboot, Op::PowerStateReset];

/// Whether `op` may join the `running` ones (`None`: an operation this
/// version does not know, which nothing joins).
pub(crate) fn allowed_concurrently(op: VmOperations, running: &[Option<VmOperations>]) -> bool {
    if FORCED.contains(&op) {
        return !running
            .iter()
            .any(|r| r.is_none_or(|r| FORCED.contains(&r)));
    }
    CONCURRENT_GROUPS
        .iter()
        .any(|g| g.contains(&op) && running.iter().all(|r| r.is_some_and(|r| g.contains(&r))))
}

/// Recomputes `allowed_operations`: while operations run, only those that
/// may join them.
pub fn refresh_allowed(t: &mut corral_db::Txn<'_>, vm: &str) -> Result<(), ApiError> {
    let Some(facts) = VmFacts::of(t.state(), vm) else {
        return Ok(());
    };
    let ops: Vec<&str> = POWER_OPS
        .iter()
        .map(|(o, _)| *o)
        .filter(|o| facts.check(vm, *o).is_ok())
        .map(VmOperations::as_str)
        .collect();
    t.set_if_changed(field::vm::ALLOWED_OPERATIONS, vm, Value::string_set(ops))
        .map(|_| ())
}

/// Marks `op` on the VM for the mark's lifetime, once the VM's state and
/// its running operations allow it.
pub(crate) fn mark_vm(s: &Server, c: &Ctx, vm: &str, op: VmOperations) -> Result<Mark, ApiError> {
    let check = |st: &corral_db::State| check_op(st, vm, op);
    Mark::take(
        &s.db,
        c.task.clone().unwrap_or_else(new_ref),
        &[Want {
            current: field::vm::CURRENT_OPERATIONS,
            obj: vm,
            op: op.as_str(),
            check: Some(&check),
            refresh: refresh_allowed,
        }],
    )
}

pub(crate) fn vm_assert_operation_valid(s: &Server, vm: &str, op: VmOperations) -> ApiResult {
    check_op(&s.db.read(), vm, op)?;
    void()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// XAPI lets copies of one VM (a template cloned by many clients at
    /// once) run together, but nothing else joins a running operation.
    #[test]
    fn only_copies_and_snapshots_run_side_by_side() {
        let db = corral_db::Db::in_memory();
        let vm = "OpaqueRef:vm";
        db.write(|t| {
            t.create(class::VM, vm, vec![])?;
            t.set(field::vm::POWER_STATE, vm, Value::str("Halted"))?;
            t.set(
                field::vm::CURRENT_OPERATIONS,
                vm,
                Value::Struct(vec![("OpaqueRef:task".into(), Value::str("clone"))]),
            )?;
            refresh_allowed(t, vm)
        })
        .expect("set up");
        let st = db.read();
        assert!(check_op(&st, vm, Op::Clone).is_ok());
        assert!(check_op(&st, vm, Op::Copy).is_ok());
        let err = check_op(&st, vm, Op::Start).expect_err("start must wait");
        assert_eq!(
            err.description(),
            [
                "OTHER_OPERATION_IN_PROGRESS",
                "VM",
                vm,
                "clone",
                "OpaqueRef:task"
            ]
        );
        assert!(check_op(&st, vm, Op::Destroy).is_err());
        let allowed: Vec<String> = st
            .get(field::vm::ALLOWED_OPERATIONS, vm)
            .and_then(|v| {
                v.as_array()
                    .map(|a| a.iter().map(|x| x.db_string()).collect())
            })
            .unwrap_or_default();
        // Forcing a VM's state may join anything (XAPI's rule).
        assert_eq!(allowed, ["power_state_reset", "clone", "copy"]);
        let running = |ops: &[VmOperations]| ops.iter().map(|o| Some(*o)).collect::<Vec<_>>();
        assert!(!allowed_concurrently(Op::Snapshot, &running(&[Op::Clone])));
        assert!(allowed_concurrently(
            Op::HardShutdown,
            &running(&[Op::CleanShutdown])
        ));
        assert!(allowed_concurrently(
            Op::HardReboot,
            &running(&[Op::Suspend, Op::Snapshot])
        ));
        assert!(!allowed_concurrently(
            Op::HardShutdown,
            &running(&[Op::HardReboot])
        ));
        assert!(!allowed_concurrently(
            Op::PowerStateReset,
            &running(&[Op::HardShutdown])
        ));
        assert!(!allowed_concurrently(
            Op::CleanShutdown,
            &running(&[Op::CleanReboot])
        ));
        assert!(allowed_concurrently(
            Op::Checkpoint,
            &running(&[Op::Snapshot])
        ));
        // An operation this version does not know is joined by nothing.
        assert!(!allowed_concurrently(Op::Clone, &[None]));
        assert!(!allowed_concurrently(Op::HardShutdown, &[None]));
    }

    /// The power-state rule of every operation, and the error XAPI gives
    /// (expected states in XAPI's order, lower case).
    #[test]
    fn power_state_table() {
        let cases: &[(VmPowerState, VmOperations, Option<&str>)] = &[
            (Halted, Op::Start, None),
            (Running, Op::Start, Some("halted")),
            (Running, Op::CleanShutdown, None),
            (Paused, Op::CleanShutdown, Some("running")),
            (Suspended, Op::HardShutdown, None),
            (Halted, Op::HardShutdown, Some("paused, suspended, running")),
            (Paused, Op::HardReboot, None),
            (Suspended, Op::HardReboot, Some("paused, running")),
            (Suspended, Op::Resume, None),
            (Running, Op::Resume, Some("suspended")),
            (Halted, Op::PowerStateReset, None),
            (Running, Op::Destroy, Some("halted, suspended")),
            (Suspended, Op::Destroy, None),
            (Running, Op::Clone, Some("halted")),
        ];
        for (state, op, expected) in cases {
            let db = corral_db::Db::in_memory();
            let vm = "OpaqueRef:vm";
            db.write(|t| {
                t.create(class::VM, vm, vec![])?;
                t.set(field::vm::POWER_STATE, vm, Value::str(state.as_str()))
            })
            .expect("set up");
            let got = check_op(&db.read(), vm, *op);
            match expected {
                None => assert!(got.is_ok(), "{op} from {state}: {got:?}"),
                Some(exp) => {
                    let e = got.expect_err("refused");
                    let actual = state.as_str().to_lowercase();
                    assert_eq!(
                        e.description(),
                        ["VM_BAD_POWER_STATE", vm, exp, actual.as_str()],
                        "{op} from {state}"
                    );
                }
            }
        }
    }
}
