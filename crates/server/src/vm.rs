//! VM lifecycle with XAPI's semantics: power operations checked and recorded
//! as XAPI does (blocked → power state → other operation → template), run by
//! the host agent, and the database kept in step with what the agent reports
//! (guest shutdown, reboot, crash, a QEMU that died). Also VM.destroy, clone,
//! copy and provision with their disks, and the host's VM shutdown/boot
//! policy.

use crate::api::{ApiResult, BoxFut, Ctx, Handler, Server, void};
use crate::storage::{db, to_value};
use corral_agent::{Boot, Drive, RunState, VmConfig, VmEvent};
use corral_model::schema::{class, field};
use corral_model::{ApiError, NULL_REF, Value, date, new_ref};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Duration;

/// `VDI.other_config` key of a suspend image: the uuid of its VM.
const SUSPEND_OF: &str = "corral-suspend-of";
/// `VM.other_config` key on a VM that VM.clone/VM.copy is still making
/// (its disks); start-up removes such VMs.
const BEING_MADE: &str = "corral-being-made";

/// Host memory kept back from VMs (the host's own needs).
const HOST_RESERVE: i64 = 512 * 1024 * 1024;

/// (operation, power states it is allowed from, in XAPI's order).
const POWER_OPS: &[(&str, &[&str])] = &[
    ("start", &["Halted"]),
    ("start_on", &["Halted"]),
    ("pause", &["Running"]),
    ("unpause", &["Paused"]),
    ("clean_shutdown", &["Running"]),
    ("shutdown", &["Paused", "Suspended", "Running"]),
    ("hard_shutdown", &["Paused", "Suspended", "Running"]),
    ("clean_reboot", &["Running"]),
    ("hard_reboot", &["Paused", "Running"]),
    ("suspend", &["Running"]),
    ("resume", &["Suspended"]),
    ("resume_on", &["Suspended"]),
    (
        "power_state_reset",
        &["Halted", "Paused", "Suspended", "Running"],
    ),
    ("clone", &["Halted"]),
    ("copy", &["Halted"]),
    ("provision", &["Halted"]),
    ("destroy", &["Halted", "Suspended"]),
];

/// Operations a template may not do.
const NOT_FOR_TEMPLATES: &[&str] = &[
    "start",
    "start_on",
    "pause",
    "unpause",
    "clean_shutdown",
    "shutdown",
    "hard_shutdown",
    "clean_reboot",
    "hard_reboot",
    "suspend",
    "resume",
    "resume_on",
];

fn power(st: &corral_db::State, vm: &str) -> String {
    st.get_str(field::vm::POWER_STATE, vm).unwrap_or_default()
}

/// The VM has a QEMU on this host: Running or Paused, resident here.
fn live_here(s: &Server, st: &corral_db::State, vm: &str) -> bool {
    let p = power(st, vm);
    (p == "Running" || p == "Paused")
        && st.get_str(field::vm::RESIDENT_ON, vm).as_deref() == Some(s.host_ref.as_str())
}

/// A map field as read from the database (absent: empty).
fn strmap(v: Option<Value>) -> BTreeMap<String, String> {
    v.map(|v| crate::storage::strmap(&v)).unwrap_or_default()
}

fn int(st: &corral_db::State, f: corral_model::FieldId, r: &str) -> i64 {
    st.get(f, r).and_then(|v| v.as_int()).unwrap_or(0)
}

fn flag(st: &corral_db::State, f: corral_model::FieldId, r: &str) -> bool {
    st.get(f, r).and_then(|v| v.as_bool()).unwrap_or(false)
}

/// What the operation checks read about a VM, gathered once per VM (the
/// start-up refresh checks every operation of every VM).
struct VmFacts {
    blocked: BTreeMap<String, String>,
    power: String,
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
    fn check(&self, vm: &str, op: &str) -> Result<(), ApiError> {
        if let Some(reason) = self.blocked.get(op) {
            return Err(ApiError::new("OPERATION_BLOCKED", [vm, reason.as_str()]));
        }
        if let Some((_, states)) = POWER_OPS.iter().find(|(o, _)| *o == op) {
            if !states.contains(&self.power.as_str()) {
                let expected = states
                    .iter()
                    .map(|s| s.to_lowercase())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(ApiError::new(
                    "VM_BAD_POWER_STATE",
                    [vm.to_owned(), expected, self.power.to_lowercase()],
                ));
            }
        }
        if let Some((task, other)) = self.current.first() {
            let running: Vec<&str> = self.current.iter().map(|(_, o)| o.as_str()).collect();
            if !allowed_concurrently(op, &running) {
                return Err(ApiError::new(
                    "OTHER_OPERATION_IN_PROGRESS",
                    ["VM", vm, other.as_str(), task.as_str()],
                ));
            }
        }
        if self.template && NOT_FOR_TEMPLATES.contains(&op) {
            return Err(ApiError::new("VM_IS_TEMPLATE", [vm, op]));
        }
        if self.control_domain {
            return Err(ApiError::operation_not_allowed(
                "This operation is not allowed on the control domain",
            ));
        }
        Ok(())
    }
}

fn check_op(st: &corral_db::State, vm: &str, op: &str) -> Result<(), ApiError> {
    VmFacts::of(st, vm)
        .ok_or_else(|| ApiError::handle_invalid("VM", vm))?
        .check(vm, op)
}

/// Operations that may run side by side, as in XAPI: copies of one VM
/// (many clones of a template at once), and snapshots. Anything else waits
/// for the VM to be idle.
const CONCURRENT_GROUPS: &[&[&str]] = &[&["clone", "copy", "export"], &["snapshot", "checkpoint"]];

/// XAPI's rule for forcing a VM off: it may run beside any operation (a
/// clean shutdown the guest ignores, say) but another forced one.
const FORCED: &[&str] = &["hard_shutdown", "hard_reboot", "power_state_reset"];

fn allowed_concurrently(op: &str, running: &[&str]) -> bool {
    if FORCED.contains(&op) {
        return !running.iter().any(|r| FORCED.contains(r));
    }
    CONCURRENT_GROUPS
        .iter()
        .any(|g| g.contains(&op) && running.iter().all(|r| g.contains(r)))
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
        .filter(|o| facts.check(vm, o).is_ok())
        .collect();
    t.set_if_changed(field::vm::ALLOWED_OPERATIONS, vm, Value::string_set(ops))
        .map(|_| ())
}

/// Marks an operation in `current_operations` for its lifetime.
struct VmOp {
    s: Arc<Server>,
    vm: String,
    key: String,
}

impl VmOp {
    fn begin(s: &Arc<Server>, c: &Ctx, vm: &str, op: &str) -> Result<VmOp, ApiError> {
        let key = c.task.clone().unwrap_or_else(new_ref);
        db(s.db.write(|t| {
            check_op(t.state(), vm, op)?;
            let mut cur = t
                .state()
                .get(field::vm::CURRENT_OPERATIONS, vm)
                .and_then(|v| v.as_struct().map(<[_]>::to_vec))
                .unwrap_or_default();
            cur.push((key.clone(), Value::str(op)));
            t.set(field::vm::CURRENT_OPERATIONS, vm, Value::Struct(cur))?;
            refresh_allowed(t, vm)
        }))?;
        Ok(VmOp {
            s: Arc::clone(s),
            vm: vm.to_owned(),
            key,
        })
    }
}

impl Drop for VmOp {
    fn drop(&mut self) {
        let _ = self.s.db.write(|t| {
            if let Some(cur) = t
                .state()
                .get(field::vm::CURRENT_OPERATIONS, &self.vm)
                .and_then(|v| v.as_struct().map(<[_]>::to_vec))
            {
                t.set(
                    field::vm::CURRENT_OPERATIONS,
                    &self.vm,
                    Value::Struct(cur.into_iter().filter(|(k, _)| *k != self.key).collect()),
                )?;
            }
            refresh_allowed(t, &self.vm)
        });
    }
}

fn agent_err(e: corral_agent::AgentError) -> ApiError {
    ApiError::internal(e.to_string())
}

fn vm_uuid(st: &corral_db::State, vm: &str) -> String {
    st.get_str(field::vm::UUID, vm).unwrap_or_default()
}

fn vm_by_uuid(s: &Server, uuid: &str) -> Option<String> {
    s.db.read().by_uuid(class::VM, uuid).cloned()
}

// ---------------------------------------------------------------------------
// Configuration from the records

fn vbds_of(st: &corral_db::State, vm: &str) -> Vec<String> {
    st.get(field::vm::VBDS, vm)
        .and_then(|v| {
            v.as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Device name for a VBD's `userdevice` (XenServer's `xvd<letter>`).
fn device_name(userdevice: &str) -> String {
    let n: u32 = userdevice.parse().unwrap_or(0);
    let letter = char::from_u32('a' as u32 + n.min(25)).unwrap_or('a');
    format!("xvd{letter}")
}

/// The agent's view of one VBD, if it has a medium or is a CD drive.
fn drive_of(s: &Server, st: &corral_db::State, vbd: &str) -> Result<Option<Drive>, ApiError> {
    let ty = st.get_str(field::vbd::TYPE_, vbd).unwrap_or_default();
    let cdrom = ty == "CD";
    if ty == "Floppy" {
        return Ok(None);
    }
    let empty = flag(st, field::vbd::EMPTY, vbd);
    let vdi = st.get_str(field::vbd::VDI, vbd).unwrap_or_default();
    let id = st.get_str(field::vbd::UUID, vbd).unwrap_or_default();
    let read_only = st.get_str(field::vbd::MODE, vbd).as_deref() == Some("RO");
    if empty || !st.exists(class::VDI, &vdi) {
        if cdrom {
            return Ok(Some(Drive {
                id,
                path: None,
                format: "raw".into(),
                read_only: true,
                cdrom,
            }));
        }
        return Err(ApiError::new("VM_REQUIRES_VDI", [vbd, vdi.as_str()]));
    }
    let image = vdi_image(s, st, &vdi)?;
    Ok(Some(Drive {
        id,
        path: Some(image.path),
        format: image.format.qemu_name().to_owned(),
        // Decided here, where the drive is built, whatever path led to it
        // (VBD.create, VBD.set_mode, a CD insert).
        read_only: read_only || cdrom || vdi_read_only(st, &vdi),
        cdrom,
    }))
}

/// A VDI no guest may write: marked read-only, or on an ISO library.
pub(crate) fn vdi_read_only(st: &corral_db::State, vdi: &str) -> bool {
    let sr = st.get_str(field::vdi::SR, vdi).unwrap_or_default();
    flag(st, field::vdi::READ_ONLY, vdi)
        || st.get_str(field::sr::CONTENT_TYPE, &sr).as_deref() == Some("iso")
}

/// A VDI's image and the format the storage layer pins for it.
fn vdi_image(
    s: &Server,
    st: &corral_db::State,
    vdi: &str,
) -> Result<corral_storage::Image, ApiError> {
    let sr = st.get_str(field::vdi::SR, vdi).unwrap_or_default();
    let loc = st.get_str(field::vdi::LOCATION, vdi).unwrap_or_default();
    crate::storage::vdi_image(s, st, &sr, &loc)
}

/// A VDI attached read-write by a running VM cannot be used by another.
fn check_vdi_free(st: &corral_db::State, vm: &str, vbd: &str) -> Result<(), ApiError> {
    let vdi = st.get_str(field::vbd::VDI, vbd).unwrap_or_default();
    if !st.exists(class::VDI, &vdi) || flag(st, field::vbd::EMPTY, vbd) {
        return Ok(());
    }
    let rw = st.get_str(field::vbd::MODE, vbd).as_deref() == Some("RW");
    for other in st.refs(class::VBD) {
        if other == vbd
            || st.get_str(field::vbd::VDI, other).as_deref() != Some(vdi.as_str())
            || !flag(st, field::vbd::CURRENTLY_ATTACHED, other)
        {
            continue;
        }
        let other_vm = st.get_str(field::vbd::VM, other).unwrap_or_default();
        if other_vm == vm {
            continue;
        }
        let other_rw = st.get_str(field::vbd::MODE, other).as_deref() == Some("RW");
        if rw || other_rw {
            return Err(ApiError::new("VDI_IN_USE", [vdi.as_str(), "start"]));
        }
    }
    Ok(())
}

fn build_config(s: &Server, vm: &str) -> Result<VmConfig, ApiError> {
    let st = s.db.read();
    let g = |f| st.get_str(f, vm).unwrap_or_default();
    let (smin, dmin, dmax, smax) = (
        int(&st, field::vm::MEMORY_STATIC_MIN, vm),
        int(&st, field::vm::MEMORY_DYNAMIC_MIN, vm),
        int(&st, field::vm::MEMORY_DYNAMIC_MAX, vm),
        int(&st, field::vm::MEMORY_STATIC_MAX, vm),
    );
    if !(smin <= dmin && dmin <= dmax && dmax <= smax) {
        return Err(ApiError::new(
            "MEMORY_CONSTRAINT_VIOLATION",
            ["memory_static_min <= memory_dynamic_min <= memory_dynamic_max <= memory_static_max"],
        ));
    }
    if smax < 16 * 1024 * 1024 {
        return Err(ApiError::new("VM_MEMORY_SIZE_TOO_LOW", [vm]));
    }
    let (vmax, vstart) = (
        int(&st, field::vm::VCPUS_MAX, vm),
        int(&st, field::vm::VCPUS_AT_STARTUP, vm),
    );
    if vstart < 1 || vstart > vmax {
        return Err(ApiError::invalid_value(
            "VCPUs_at_startup",
            &vstart.to_string(),
        ));
    }
    let platform = strmap(st.get(field::vm::PLATFORM, vm));
    let hvm = strmap(st.get(field::vm::HVM_BOOT_PARAMS, vm));
    // XAPI's checks: the topology must fit VCPUs_max.
    let cores_per_socket = match platform.get("cores-per-socket") {
        None => 0,
        Some(c) => match c.parse::<i64>() {
            Ok(n) if n > 0 && vmax % n == 0 => n,
            Ok(n) if n > 0 => {
                return Err(ApiError::invalid_value(
                    "platform:cores-per-socket",
                    &format!("VCPUs_max ({vmax}) must be a multiple of this field ({n})"),
                ));
            }
            _ => return Err(ApiError::invalid_value("platform:cores-per-socket", c)),
        },
    };
    let rtc_base = match platform.get("timeoffset") {
        None => None,
        Some(o) => match o.trim().parse::<i64>() {
            Ok(0) => None,
            Ok(secs) => {
                // YYYYMMDDTHH:MM:SSZ → YYYY-MM-DDTHH:MM:SS
                let d = date::format(date::now_secs() + secs);
                Some(format!(
                    "{}-{}-{}T{}",
                    &d[0..4],
                    &d[4..6],
                    &d[6..8],
                    &d[9..17]
                ))
            }
            Err(_) => return Err(ApiError::invalid_value("platform:timeoffset", o)),
        },
    };
    let kernel = g(field::vm::PV_KERNEL);
    let boot = if !kernel.is_empty() {
        let kernel = boot_file(s, &st, vm, "PV-kernel", &kernel)?;
        let rd = g(field::vm::PV_RAMDISK);
        let initrd = if rd.is_empty() {
            None
        } else {
            Some(boot_file(s, &st, vm, "PV-ramdisk", &rd)?)
        };
        Boot::Kernel {
            kernel,
            initrd,
            args: g(field::vm::PV_ARGS),
        }
    } else if g(field::vm::HVM_BOOT_POLICY).is_empty() {
        // A PV-style (direct kernel) VM with no kernel has nothing to boot.
        return Err(ApiError::new(
            "BOOTLOADER_FAILED",
            [
                vm.to_owned(),
                "the VM boots a kernel directly (HVM-boot-policy is empty) but PV-kernel is not set"
                    .to_owned(),
            ],
        ));
    } else {
        Boot::Firmware {
            order: hvm.get("order").cloned().unwrap_or_else(|| "cd".into()),
            uefi: hvm.get("firmware").map(String::as_str) == Some("uefi"),
        }
    };
    let mut drives = Vec::new();
    let mut vbds = vbds_of(&st, vm);
    vbds.sort_by_key(|v| {
        st.get_str(field::vbd::USERDEVICE, v)
            .and_then(|u| u.parse::<u32>().ok())
    });
    for vbd in &vbds {
        check_vdi_free(&st, vm, vbd)?;
        if let Some(d) = drive_of(s, &st, vbd)? {
            drives.push(d);
        }
    }
    Ok(VmConfig {
        uuid: vm_uuid(&st, vm),
        name: g(field::vm::NAME_LABEL),
        memory: smax,
        memory_target: dmax,
        vcpus_max: vmax,
        vcpus: vstart,
        boot,
        drives,
        reboot_stops: g(field::vm::ACTIONS_AFTER_REBOOT) == "destroy",
        acpi: platform.get("acpi").map(String::as_str) != Some("0"),
        cores_per_socket,
        rtc_base,
        vga: platform.get("vga").cloned(),
        videoram_mib: platform
            .get("videoram")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        hpet: platform.get("hpet").map(|v| v != "false" && v != "0"),
    })
}

/// Free host memory for a new VM, as XAPI's `compute_free_memory`.
pub fn host_free_memory(s: &Server, st: &corral_db::State) -> (i64, i64) {
    let metrics = st
        .get_str(field::host::METRICS, &s.host_ref)
        .unwrap_or_default();
    let total = int(st, field::host_metrics::MEMORY_TOTAL, &metrics);
    let mut used = HOST_RESERVE;
    for vm in st.refs(class::VM) {
        if live_here(s, st, vm) {
            let m = int(st, field::vm::MEMORY_STATIC_MAX, vm);
            used += m + s.agent.memory_overhead(m);
        }
    }
    (total, (total - used).max(0))
}

fn check_memory(s: &Server, cfg: &VmConfig) -> Result<(), ApiError> {
    let st = s.db.read();
    let (_, free) = host_free_memory(s, &st);
    let needed = cfg.memory + s.agent.memory_overhead(cfg.memory);
    if needed > free {
        return Err(ApiError::new(
            "HOST_NOT_ENOUGH_FREE_MEMORY",
            [needed.to_string(), free.to_string()],
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Recording power states

fn console_location(s: &Server, console_uuid: &str) -> String {
    let st = s.db.read();
    let addr = st
        .get_str(field::host::ADDRESS, &s.host_ref)
        .unwrap_or_default();
    format!("https://{addr}/console?uuid={console_uuid}")
}

/// The VM now runs here (or is paused): records, metrics, consoles, VBDs.
fn record_running(
    s: &Server,
    vm: &str,
    paused: bool,
    domid: i64,
    cfg: &VmConfig,
) -> Result<(), ApiError> {
    let consoles: Vec<(String, String, &str)> = ["vt100", "rfb"]
        .iter()
        .map(|p| {
            let u = corral_model::new_uuid();
            (u.clone(), console_location(s, &u), *p)
        })
        .collect();
    db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::VM, vm) {
            return Err(ApiError::handle_invalid("VM", vm));
        }
        t.set(
            field::vm::POWER_STATE,
            vm,
            Value::str(if paused { "Paused" } else { "Running" }),
        )?;
        t.set(field::vm::RESIDENT_ON, vm, Value::str(&s.host_ref))?;
        t.set(field::vm::DOMID, vm, Value::Int(domid))?;
        t.set(field::vm::SUSPEND_VDI, vm, Value::str(NULL_REF))?;
        t.set(field::vm::DOMARCH, vm, Value::str("x64"))?;
        let metrics = ensure_metrics(t, vm)?;
        t.set(
            field::vm_metrics::START_TIME,
            &metrics,
            Value::DateTime(date::now()),
        )?;
        t.set(
            field::vm_metrics::VCPUS_NUMBER,
            &metrics,
            Value::Int(cfg.vcpus),
        )?;
        t.set(
            field::vm_metrics::MEMORY_ACTUAL,
            &metrics,
            Value::Int(cfg.memory_target),
        )?;
        t.set(
            field::vm_metrics::STATE,
            &metrics,
            Value::string_set([if paused { "paused" } else { "running" }]),
        )?;
        t.set(
            field::vm_metrics::LAST_UPDATED,
            &metrics,
            Value::DateTime(date::now()),
        )?;
        t.set(
            field::vm_metrics::CURRENT_DOMAIN_TYPE,
            &metrics,
            Value::str(if matches!(cfg.boot, Boot::Kernel { .. }) {
                "pv_in_pvh"
            } else {
                "hvm"
            }),
        )?;
        t.set(
            field::vm_metrics::HVM,
            &metrics,
            Value::Bool(!matches!(cfg.boot, Boot::Kernel { .. })),
        )?;
        for vbd in vbds_of(t.state(), vm) {
            let ud = t
                .state()
                .get_str(field::vbd::USERDEVICE, &vbd)
                .unwrap_or_default();
            t.set(field::vbd::CURRENTLY_ATTACHED, &vbd, Value::Bool(true))?;
            t.set(field::vbd::DEVICE, &vbd, Value::String(device_name(&ud)))?;
        }
        remove_consoles(t, vm)?;
        for (uuid, loc, proto) in &consoles {
            t.create(
                class::CONSOLE,
                &new_ref(),
                vec![
                    (field::console::UUID.index, Value::str(uuid)),
                    (field::console::PROTOCOL.index, Value::str(*proto)),
                    (field::console::LOCATION.index, Value::str(loc)),
                    (field::console::VM.index, Value::str(vm)),
                    (field::console::OTHER_CONFIG.index, Value::Struct(vec![])),
                ],
            )?;
        }
        refresh_allowed(t, vm)
    }))
}

fn ensure_metrics(t: &mut corral_db::Txn<'_>, vm: &str) -> Result<String, ApiError> {
    let m = t
        .state()
        .get_str(field::vm::METRICS, vm)
        .unwrap_or_default();
    if t.state().exists(class::VM_METRICS, &m) {
        return Ok(m);
    }
    let m = new_ref();
    t.create(class::VM_METRICS, &m, vec![])?;
    t.set(field::vm::METRICS, vm, Value::str(&m))?;
    Ok(m)
}

fn remove_consoles(t: &mut corral_db::Txn<'_>, vm: &str) -> Result<(), ApiError> {
    let cons: Vec<String> = t
        .state()
        .refs(class::CONSOLE)
        .filter(|c| t.state().get_str(field::console::VM, c).as_deref() == Some(vm))
        .cloned()
        .collect();
    for c in cons {
        t.delete(class::CONSOLE, &c)?;
    }
    Ok(())
}

/// The VM no longer runs: Halted (or Suspended with its image).
fn record_stopped(
    s: &Server,
    vm: &str,
    state: &str,
    suspend_vdi: Option<&str>,
) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        if !t.state().exists(class::VM, vm) {
            return Ok(());
        }
        t.set(field::vm::POWER_STATE, vm, Value::str(state))?;
        t.set(field::vm::RESIDENT_ON, vm, Value::str(NULL_REF))?;
        t.set(field::vm::DOMID, vm, Value::Int(-1))?;
        t.set(
            field::vm::SUSPEND_VDI,
            vm,
            Value::str(suspend_vdi.unwrap_or(NULL_REF)),
        )?;
        for vbd in vbds_of(t.state(), vm) {
            t.set(field::vbd::CURRENTLY_ATTACHED, &vbd, Value::Bool(false))?;
        }
        remove_consoles(t, vm)?;
        let metrics = t
            .state()
            .get_str(field::vm::METRICS, vm)
            .unwrap_or_default();
        if t.state().exists(class::VM_METRICS, &metrics) {
            t.set(
                field::vm_metrics::STATE,
                &metrics,
                Value::string_set([state.to_lowercase()]),
            )?;
            t.set(field::vm_metrics::MEMORY_ACTUAL, &metrics, Value::Int(0))?;
            t.set(
                field::vm_metrics::LAST_UPDATED,
                &metrics,
                Value::DateTime(date::now()),
            )?;
        }
        let gm = t
            .state()
            .get_str(field::vm::GUEST_METRICS, vm)
            .unwrap_or_default();
        if t.state().exists(class::VM_GUEST_METRICS, &gm) {
            t.delete(class::VM_GUEST_METRICS, &gm)?;
        }
        t.set(field::vm::GUEST_METRICS, vm, Value::str(NULL_REF))?;
        refresh_allowed(t, vm)
    }))
}

fn set_paused(s: &Server, vm: &str, paused: bool) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        t.set(
            field::vm::POWER_STATE,
            vm,
            Value::str(if paused { "Paused" } else { "Running" }),
        )?;
        let metrics = t
            .state()
            .get_str(field::vm::METRICS, vm)
            .unwrap_or_default();
        if t.state().exists(class::VM_METRICS, &metrics) {
            t.set(
                field::vm_metrics::STATE,
                &metrics,
                Value::string_set([if paused { "paused" } else { "running" }]),
            )?;
        }
        refresh_allowed(t, vm)
    }))
}

fn alert(s: &Server, vm: &str, name: &str, priority: i64, body: &str) {
    let uuid = vm_uuid(&s.db.read(), vm);
    if let Err(e) = crate::handlers::create_message(s, name, priority, "VM", &uuid, body) {
        tracing::warn!(vm = %uuid, error = %e, "cannot record message");
    }
}

// ---------------------------------------------------------------------------
// Power operations

fn params(p: Vec<Value>) -> (String, Vec<Value>) {
    let mut it = p.into_iter();
    let vm = it.next().map(|v| v.db_string()).unwrap_or_default();
    (vm, it.collect())
}

/// `(vm, [host,] start_paused, force)` of start/start_on/resume/resume_on.
fn start_params(p: Vec<Value>, with_host: bool) -> (String, Option<String>, bool) {
    let (vm, rest) = params(p);
    let host = with_host.then(|| rest.first().map(|v| v.db_string()).unwrap_or_default());
    let paused = rest
        .get(usize::from(with_host))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    (vm, host, paused)
}

/// Builds the configuration, checks memory and launches.
async fn launch(
    s: &Arc<Server>,
    vm: &str,
    paused: bool,
    incoming: Option<std::path::PathBuf>,
) -> Result<VmConfig, ApiError> {
    let cfg = build_config(s, vm)?;
    check_memory(s, &cfg)?;
    let domid = s
        .agent
        .start(cfg.clone(), paused, incoming)
        .await
        .map_err(|e| match e {
            corral_agent::AgentError::StartFailed(m) => {
                ApiError::new("BOOTLOADER_FAILED", [vm, m.as_str()])
            }
            other => agent_err(other),
        })?;
    if let Err(e) = record_running(s, vm, paused, domid, &cfg) {
        // Undo: the database could not say so, so nothing may run.
        let _ = s.agent.destroy(&cfg.uuid).await;
        return Err(e);
    }
    Ok(cfg)
}

async fn vm_start(s: Arc<Server>, c: Ctx, p: Vec<Value>, with_host: bool) -> ApiResult {
    let (vm, host, paused) = start_params(p, with_host);
    let op = if with_host { "start_on" } else { "start" };
    let _op = VmOp::begin(&s, &c, &vm, op)?;
    if let Some(h) = host {
        check_host(&s, &h)?;
    }
    launch(&s, &vm, paused, None).await?;
    alert(&s, &vm, "VM_STARTED", 5, "VM started");
    void()
}

fn check_host(s: &Server, h: &str) -> Result<(), ApiError> {
    let st = s.db.read();
    if !st.exists(class::HOST, h) {
        return Err(ApiError::handle_invalid("host", h));
    }
    if h != s.host_ref {
        return Err(ApiError::new("HOST_OFFLINE", [h]));
    }
    if !flag(&st, field::host::ENABLED, h) {
        return Err(ApiError::new("HOST_DISABLED", [h]));
    }
    Ok(())
}

/// How often the power button is pressed again while a clean shutdown
/// waits: a guest still booting when asked (no ACPI daemon yet) misses the
/// first press.
const POWER_BUTTON_REPEAT: Duration = Duration::from_secs(10);

/// How often a waiting operation looks for a cancel request (and for a
/// QEMU that a concurrent hard shutdown stopped).
const CANCEL_POLL: Duration = Duration::from_secs(1);

/// Waits for the guest to power itself off after the power button; fails
/// with `TASK_CANCELLED` when `task` is cancelled meanwhile.
async fn wait_guest_shutdown(
    s: &Arc<Server>,
    uuid: &str,
    mut rx: tokio::sync::broadcast::Receiver<(String, VmEvent)>,
    timeout: Duration,
    task: Option<&str>,
) -> Result<bool, ApiError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut next_press = tokio::time::Instant::now() + POWER_BUTTON_REPEAT;
    loop {
        if matches!(
            s.agent.state(uuid).await,
            Ok(RunState::ShutDown | RunState::Gone)
        ) {
            return Ok(true);
        }
        if let Some(t) = task.filter(|t| s.task_cancel_requested(t)) {
            return Err(ApiError::new("TASK_CANCELLED", [t]));
        }
        let now = tokio::time::Instant::now();
        match tokio::time::timeout_at(deadline.min(next_press).min(now + CANCEL_POLL), rx.recv())
            .await
        {
            Err(_) if tokio::time::Instant::now() >= deadline => return Ok(false),
            Err(_) if tokio::time::Instant::now() >= next_press => {
                let _ = s.agent.powerdown(uuid).await;
                next_press += POWER_BUTTON_REPEAT;
            }
            Err(_) => {}
            Ok(Ok((u, VmEvent::GuestShutdown | VmEvent::Died(_)))) if u == uuid => return Ok(true),
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return Ok(false),
            Ok(_) => {}
        }
    }
}

/// Power button, wait up to `timeout`; true when the guest went down.
async fn clean_stop(
    s: &Arc<Server>,
    vm: &str,
    timeout: Duration,
    task: Option<&str>,
) -> Result<bool, ApiError> {
    let uuid = vm_uuid(&s.db.read(), vm);
    s.expect_shutdown(&uuid, true);
    let rx = s.agent.events();
    let r = async {
        s.agent.powerdown(&uuid).await.map_err(agent_err)?;
        wait_guest_shutdown(s, &uuid, rx, timeout, task).await
    }
    .await;
    if !matches!(r, Ok(true)) {
        s.expect_shutdown(&uuid, false);
    }
    r
}

async fn halt(s: &Arc<Server>, vm: &str) -> Result<(), ApiError> {
    let uuid = vm_uuid(&s.db.read(), vm);
    s.agent.destroy(&uuid).await.map_err(agent_err)?;
    s.expect_shutdown(&uuid, false);
    record_stopped(s, vm, "Halted", None)
}

fn clean_timeout(s: &Server, vm: &str) -> Duration {
    let oc = strmap(s.db.read().get(field::vm::OTHER_CONFIG, vm));
    Duration::from_secs(
        oc.get("clean_shutdown_timeout")
            .and_then(|v| v.parse().ok())
            .unwrap_or(s.config.clean_shutdown_timeout.as_secs()),
    )
}

async fn vm_clean_shutdown(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, "clean_shutdown")?;
    let t = clean_timeout(&s, &vm);
    if !clean_stop(&s, &vm, t, c.task.as_deref()).await? {
        return Err(ApiError::new(
            "VM_SHUTDOWN_TIMEOUT",
            [vm.clone(), t.as_secs().to_string()],
        ));
    }
    if power(&s.db.read(), &vm) == "Halted" {
        // A hard shutdown ran meanwhile and did the rest.
        return void();
    }
    halt(&s, &vm).await?;
    alert(&s, &vm, "VM_SHUTDOWN", 5, "VM shut down");
    void()
}

async fn vm_shutdown(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, "shutdown")?;
    let state = power(&s.db.read(), &vm);
    if state == "Suspended" {
        drop_suspend_image(&s, &vm).await;
        record_stopped(&s, &vm, "Halted", None)?;
        return void();
    }
    if state == "Running" {
        let t = clean_timeout(&s, &vm);
        match clean_stop(&s, &vm, t, c.task.as_deref()).await {
            Ok(true) => {}
            Err(e) if e.code == "TASK_CANCELLED" => return Err(e),
            _ => tracing::info!(vm = %vm, "clean shutdown timed out; forcing off"),
        }
    }
    halt(&s, &vm).await?;
    void()
}

async fn vm_hard_shutdown(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, "hard_shutdown")?;
    if power(&s.db.read(), &vm) == "Suspended" {
        drop_suspend_image(&s, &vm).await;
        record_stopped(&s, &vm, "Halted", None)?;
        return void();
    }
    halt(&s, &vm).await?;
    void()
}

async fn vm_clean_reboot(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, "clean_reboot")?;
    let t = clean_timeout(&s, &vm);
    if !clean_stop(&s, &vm, t, c.task.as_deref()).await? {
        return Err(ApiError::new(
            "VM_SHUTDOWN_TIMEOUT",
            [vm.clone(), t.as_secs().to_string()],
        ));
    }
    let now = power(&s.db.read(), &vm);
    if now == "Halted" {
        // Forced off meanwhile (a concurrent hard shutdown): no reboot.
        return Err(ApiError::new(
            "VM_BAD_POWER_STATE",
            [vm.as_str(), "running", "halted"],
        ));
    }
    let uuid = vm_uuid(&s.db.read(), &vm);
    let r = s.agent.reset(&uuid).await.map_err(agent_err);
    s.expect_shutdown(&uuid, false);
    r?;
    set_paused(&s, &vm, false)?;
    alert(&s, &vm, "VM_REBOOTED", 5, "VM rebooted");
    void()
}

async fn vm_hard_reboot(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, "hard_reboot")?;
    let uuid = vm_uuid(&s.db.read(), &vm);
    s.agent.reset(&uuid).await.map_err(agent_err)?;
    set_paused(&s, &vm, false)?;
    void()
}

async fn vm_pause(s: Arc<Server>, c: Ctx, p: Vec<Value>, pause: bool) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, if pause { "pause" } else { "unpause" })?;
    let uuid = vm_uuid(&s.db.read(), &vm);
    if pause {
        s.agent.pause(&uuid).await.map_err(agent_err)?;
    } else {
        s.agent.unpause(&uuid).await.map_err(agent_err)?;
    }
    set_paused(&s, &vm, pause)?;
    void()
}

async fn vm_power_state_reset(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, "power_state_reset")?;
    let uuid = vm_uuid(&s.db.read(), &vm);
    // Only a VM this host no longer runs may be reset (XAPI refuses a
    // running domain too); never leave a QEMU the database forgot.
    if matches!(
        s.agent.state(&uuid).await,
        Ok(RunState::Running | RunState::Paused)
    ) {
        return Err(ApiError::operation_not_allowed(
            "the VM is still running on this host",
        ));
    }
    let _ = s.agent.destroy(&uuid).await;
    record_stopped(&s, &vm, "Halted", None)?;
    void()
}

// ---------------------------------------------------------------------------
// Suspend and resume: the guest's state goes into a `suspend` VDI.

fn suspend_sr(s: &Server, vm: &str) -> Result<String, ApiError> {
    let st = s.db.read();
    let candidates = [
        st.get_str(field::vm::SUSPEND_SR, vm),
        st.get_str(field::pool::SUSPEND_IMAGE_SR, &s.pool_ref),
        st.get_str(field::host::SUSPEND_IMAGE_SR, &s.host_ref),
        st.get_str(field::pool::DEFAULT_SR, &s.pool_ref),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|sr| st.exists(class::SR, sr))
        .ok_or_else(|| ApiError::new("VM_NO_SUSPEND_SR", [vm]))
}

fn fifo(dir: &std::path::Path) -> Result<std::path::PathBuf, ApiError> {
    std::fs::create_dir_all(dir).map_err(|e| ApiError::internal(e.to_string()))?;
    let p = dir.join(format!("stream-{}", &corral_model::new_uuid()[..8]));
    let c = std::ffi::CString::new(p.to_string_lossy().as_bytes())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    // SAFETY: mkfifo with a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(ApiError::internal(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(p)
}

async fn vm_suspend(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, "suspend")?;
    let sr = suspend_sr(&s, &vm)?;
    let (uuid, mem, name) = {
        let st = s.db.read();
        (
            vm_uuid(&st, &vm),
            int(&st, field::vm::MEMORY_STATIC_MAX, &vm),
            st.get_str(field::vm::NAME_LABEL, &vm).unwrap_or_default(),
        )
    };
    // Room for RAM and device state; the image is thin, so only what the
    // stream holds is allocated.
    let size = mem + mem / 8 + (64 << 20);
    let vdi = new_vdi(
        &s,
        &sr,
        &format!("Suspend image for {name}"),
        size,
        "suspend",
        &[(SUSPEND_OF, &uuid)],
    )
    .await?;
    let result = async {
        let image = vdi_image(&s, &s.db.read(), &vdi)?;
        let pipe = fifo(&s.state_dir.join("streams"))?;
        let run_dir = s.state_dir.clone();
        let reader = {
            let pipe = pipe.clone();
            tokio::task::spawn_blocking(move || stream_into_vdi(&pipe, &image, &run_dir))
        };
        let saved = s.agent.save(&uuid, pipe.clone()).await.map_err(agent_err);
        if saved.is_err() {
            // Unblock the reader if QEMU never opened the FIFO.
            let _ = std::fs::OpenOptions::new().write(true).open(&pipe);
        }
        let len = reader
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let _ = std::fs::remove_file(&pipe);
        saved?;
        let len = len?;
        db(s.db.write(|t| {
            let mut oc = strmap(t.state().get(field::vdi::OTHER_CONFIG, &vdi));
            oc.insert("corral-suspend-length".into(), len.to_string());
            t.set(field::vdi::OTHER_CONFIG, &vdi, to_value(&oc))
        }))?;
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = result {
        // Undo: the VM keeps running, the image goes.
        let _ = s.agent.unpause(&uuid).await;
        let _ = crate::storage::vdi_destroy(Arc::clone(&s), vec![Value::str(&vdi)]).await;
        return Err(e);
    }
    s.agent.destroy(&uuid).await.map_err(agent_err)?;
    record_stopped(&s, &vm, "Suspended", Some(&vdi))?;
    alert(&s, &vm, "VM_SUSPENDED", 5, "VM suspended");
    void()
}

/// Copies the save stream from the FIFO into the VDI; returns its length.
fn stream_into_vdi(
    pipe: &std::path::Path,
    image: &corral_storage::Image,
    run_dir: &std::path::Path,
) -> Result<u64, ApiError> {
    use std::io::Read;
    let mut src = std::fs::File::open(pipe).map_err(|e| ApiError::internal(e.to_string()))?;
    let mut img = corral_storage::nbd::NbdImage::open(image, true, run_dir)
        .map_err(|e| ApiError::new("VDI_IO_ERROR", [e.to_string()]))?;
    let mut buf = vec![0u8; corral_storage::nbd::CHUNK];
    let mut off = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match src.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(ApiError::internal(e.to_string())),
            }
        }
        if n == 0 {
            break;
        }
        if off + n as u64 > img.size() {
            return Err(ApiError::new(
                "VDI_IO_ERROR",
                ["suspend image too large for its VDI"],
            ));
        }
        img.write_queued(off, &buf[..n])
            .map_err(|e| ApiError::new("VDI_IO_ERROR", [e.to_string()]))?;
        off += n as u64;
        if n < buf.len() {
            break;
        }
    }
    img.close()
        .map_err(|e| ApiError::new("VDI_IO_ERROR", [e.to_string()]))?;
    Ok(off)
}

/// Feeds `len` bytes of the VDI into the FIFO QEMU restores from.
fn stream_from_vdi(
    pipe: &std::path::Path,
    image: &corral_storage::Image,
    len: u64,
    run_dir: &std::path::Path,
) -> Result<(), ApiError> {
    // The FIFO first: if the image cannot be read, closing it ends QEMU's
    // incoming stream instead of leaving it waiting for a writer.
    let out = std::fs::OpenOptions::new()
        .write(true)
        .open(pipe)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut img = corral_storage::nbd::NbdImage::open(image, false, run_dir)
        .map_err(|e| ApiError::new("VDI_IO_ERROR", [e.to_string()]))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&out);
    let mut left = len;
    let mut failed = None;
    img.read_all(4, |chunk| {
        let n = (chunk.len() as u64).min(left) as usize;
        if let Err(e) = corral_storage::nbd::write_all_fd(fd, &chunk[..n]) {
            failed = Some(e);
            return false;
        }
        left -= n as u64;
        left > 0
    })
    .map_err(|e| ApiError::new("VDI_IO_ERROR", [e.to_string()]))?;
    if let Some(e) = failed {
        return Err(ApiError::new("VDI_IO_ERROR", [e.to_string()]));
    }
    Ok(())
}

async fn vm_resume(s: Arc<Server>, c: Ctx, p: Vec<Value>, with_host: bool) -> ApiResult {
    let (vm, host, paused) = start_params(p, with_host);
    let _op = VmOp::begin(&s, &c, &vm, if with_host { "resume_on" } else { "resume" })?;
    if let Some(h) = host {
        check_host(&s, &h)?;
    }
    let (vdi, uuid) = {
        let st = s.db.read();
        (
            st.get_str(field::vm::SUSPEND_VDI, &vm).unwrap_or_default(),
            vm_uuid(&st, &vm),
        )
    };
    let (image, len) = {
        let st = s.db.read();
        if !st.exists(class::VDI, &vdi) {
            return Err(ApiError::new(
                "VM_REQUIRES_VDI",
                [vm.as_str(), vdi.as_str()],
            ));
        }
        let image = vdi_image(&s, &st, &vdi)?;
        let len = strmap(st.get(field::vdi::OTHER_CONFIG, &vdi))
            .get("corral-suspend-length")
            .and_then(|l| l.parse::<u64>().ok())
            .unwrap_or(0);
        (image, len)
    };
    let pipe = fifo(&s.state_dir.join("streams"))?;
    let writer = {
        let (pipe, run_dir) = (pipe.clone(), s.state_dir.clone());
        tokio::task::spawn_blocking(move || stream_from_vdi(&pipe, &image, len, &run_dir))
    };
    let launched = launch(&s, &vm, true, Some(pipe.clone())).await;
    if launched.is_err() {
        // Unblock the writer: nobody will read the FIFO.
        let _ = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pipe);
    }
    let fed = writer
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let _ = std::fs::remove_file(&pipe);
    if let Err(e) = launched {
        let _ = db(s.db.write(|t| {
            t.set(field::vm::POWER_STATE, &vm, Value::str("Suspended"))?;
            t.set(field::vm::SUSPEND_VDI, &vm, Value::str(&vdi))?;
            refresh_allowed(t, &vm)
        }));
        return Err(e);
    }
    let restored = async {
        fed?;
        if !paused {
            s.agent.unpause(&uuid).await.map_err(agent_err)?;
        }
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = restored {
        // Undo: back to Suspended with the image kept.
        let _ = s.agent.destroy(&uuid).await;
        let _ = record_stopped(&s, &vm, "Suspended", Some(&vdi));
        return Err(e);
    }
    set_paused(&s, &vm, paused)?;
    let _ = crate::storage::vdi_destroy(Arc::clone(&s), vec![Value::str(&vdi)]).await;
    alert(&s, &vm, "VM_RESUMED", 5, "VM resumed");
    void()
}

async fn drop_suspend_image(s: &Arc<Server>, vm: &str) {
    let vdi =
        s.db.read()
            .get_str(field::vm::SUSPEND_VDI, vm)
            .unwrap_or_default();
    if s.db.read().exists(class::VDI, &vdi) {
        let _ = crate::storage::vdi_destroy(Arc::clone(s), vec![Value::str(&vdi)]).await;
    }
}

// ---------------------------------------------------------------------------
// Reacting to the agent

impl Server {
    /// Marks a VM whose next guest shutdown an operation is waiting for, so
    /// the monitor leaves it to that operation.
    pub(crate) fn expect_shutdown(&self, uuid: &str, on: bool) {
        if let Ok(mut e) = self.expected_shutdowns.lock() {
            if on {
                e.insert(uuid.to_owned());
            } else {
                e.remove(uuid);
            }
        }
    }
    fn shutdown_expected(&self, uuid: &str) -> bool {
        self.expected_shutdowns
            .lock()
            .map(|e| e.contains(uuid))
            .unwrap_or(false)
    }
}

fn busy(s: &Server, vm: &str) -> bool {
    s.db.read()
        .get(field::vm::CURRENT_OPERATIONS, vm)
        .and_then(|v| v.as_struct().map(|m| !m.is_empty()))
        .unwrap_or(false)
}

async fn on_event(s: &Arc<Server>, uuid: &str, ev: VmEvent) {
    let Some(vm) = vm_by_uuid(s, uuid) else {
        return;
    };
    let action = |f| s.db.read().get_str(f, &vm).unwrap_or_default();
    let r = match ev {
        VmEvent::GuestShutdown if s.shutdown_expected(uuid) => Ok(()),
        VmEvent::GuestShutdown => {
            if action(field::vm::ACTIONS_AFTER_SHUTDOWN) == "restart" {
                s.agent.reset(uuid).await.map_err(agent_err)
            } else {
                alert(s, &vm, "VM_SHUTDOWN", 5, "The guest shut itself down");
                halt(s, &vm).await
            }
        }
        VmEvent::GuestReboot => {
            if action(field::vm::ACTIONS_AFTER_REBOOT) == "destroy" {
                halt(s, &vm).await
            } else {
                s.agent.reset(uuid).await.map_err(agent_err)
            }
        }
        // QEMU reset the guest itself (the VM started with
        // actions_after_reboot=restart); if the field was changed to destroy
        // since, the reboot ends the VM now (not during VM.clean_reboot).
        VmEvent::GuestRebooted
            if action(field::vm::ACTIONS_AFTER_REBOOT) == "destroy" && !busy(s, &vm) =>
        {
            alert(
                s,
                &vm,
                "VM_SHUTDOWN",
                5,
                "The guest rebooted; actions_after_reboot=destroy halted it",
            );
            halt(s, &vm).await
        }
        VmEvent::GuestRebooted => {
            alert(s, &vm, "VM_REBOOTED", 5, "The guest rebooted itself");
            Ok(())
        }
        VmEvent::GuestCrash => {
            alert(s, &vm, "VM_CRASHED", 2, "The guest crashed (pvpanic)");
            match action(field::vm::ACTIONS_AFTER_CRASH).as_str() {
                "preserve" => set_paused(s, &vm, true),
                "restart" | "coredump_and_restart" | "rename_restart" => {
                    s.agent.reset(uuid).await.map_err(agent_err)
                }
                _ => halt(s, &vm).await,
            }
        }
        VmEvent::Paused | VmEvent::Resumed if busy(s, &vm) => Ok(()),
        VmEvent::Paused | VmEvent::Resumed => {
            let p = power(&s.db.read(), &vm);
            let paused = ev == VmEvent::Paused;
            if (p == "Running" && paused) || (p == "Paused" && !paused) {
                // Someone outside the toolstack paused or resumed it; the
                // database follows what the guest does.
                match s.agent.state(uuid).await {
                    Ok(RunState::Paused) => set_paused(s, &vm, true),
                    Ok(RunState::Running) => set_paused(s, &vm, false),
                    _ => Ok(()),
                }
            } else {
                Ok(())
            }
        }
        VmEvent::Died(why) => {
            if s.shutdown_expected(uuid) {
                s.expect_shutdown(uuid, false);
            }
            let p = power(&s.db.read(), &vm);
            if p == "Running" || p == "Paused" {
                let _ = s.agent.destroy(uuid).await;
                alert(
                    s,
                    &vm,
                    "VM_CRASHED",
                    2,
                    &format!(
                        "The VM's QEMU process ended unexpectedly ({why}); the VM is now halted."
                    ),
                );
                record_stopped(s, &vm, "Halted", None)
            } else {
                Ok(())
            }
        }
    };
    if let Err(e) = r {
        tracing::warn!(vm = %uuid, error = %e, "handling a VM event failed");
    }
}

/// Suspend images made for `vm` that it does not point at (a suspend that
/// never finished).
async fn drop_unused_suspend_images(s: &Arc<Server>, vm: &str) {
    let stale: Vec<String> = {
        let st = s.db.read();
        let uuid = vm_uuid(&st, vm);
        let keep = st.get_str(field::vm::SUSPEND_VDI, vm).unwrap_or_default();
        st.refs(class::VDI)
            .filter(|v| **v != keep)
            .filter(|v| st.get_str(field::vdi::TYPE_, v).as_deref() == Some("suspend"))
            .filter(|v| strmap(st.get(field::vdi::OTHER_CONFIG, v)).get(SUSPEND_OF) == Some(&uuid))
            .cloned()
            .collect()
    };
    for v in stale {
        let _ = crate::storage::vdi_destroy(Arc::clone(s), vec![Value::str(&v)]).await;
    }
}

/// The VDIs of `vm`'s disk VBDs that no other VM uses: what goes with the
/// VM when it is uninstalled (ISOs and shared disks stay).
pub(crate) fn own_disks(st: &corral_db::State, vm: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for vbd in vbds_of(st, vm) {
        if st.get_str(field::vbd::TYPE_, &vbd).as_deref() != Some("Disk") {
            continue;
        }
        let Some(vdi) = st.get_str(field::vbd::VDI, &vbd) else {
            continue;
        };
        if !st.exists(class::VDI, &vdi) || out.contains(&vdi) {
            continue;
        }
        let shared = st.refs(class::VBD).any(|b| {
            st.get_str(field::vbd::VDI, b).as_deref() == Some(vdi.as_str())
                && st.get_str(field::vbd::VM, b).as_deref() != Some(vm)
        });
        if !shared {
            out.push(vdi);
        }
    }
    out
}

/// VMs that a VM.clone/VM.copy with disks was still making when corrald
/// died: removed with the disks made for them.
async fn undo_interrupted_copies(s: &Arc<Server>) {
    let half: Vec<String> = {
        let st = s.db.read();
        st.refs(class::VM)
            .filter(|vm| strmap(st.get(field::vm::OTHER_CONFIG, vm)).contains_key(BEING_MADE))
            .cloned()
            .collect()
    };
    for vm in half {
        tracing::warn!(vm = %vm, "removing a VM whose clone or copy was interrupted");
        let disks = own_disks(&s.db.read(), &vm);
        let _ = db(s.db.write(|t| {
            for vbd in vbds_of(t.state(), &vm) {
                t.delete(class::VBD, &vbd)?;
            }
            t.delete(class::VM, &vm)
        }));
        for v in disks {
            let _ = crate::storage::vdi_destroy(Arc::clone(s), vec![Value::str(&v)]).await;
        }
    }
}

/// Re-attaches to the VMs this host runs and reconciles power states, then
/// follows the agent's events and refreshes metrics.
pub async fn startup(s: &Arc<Server>) -> Result<(), ApiError> {
    let found: HashMap<String, RunState> = s
        .agent
        .reattach()
        .await
        .map_err(agent_err)?
        .into_iter()
        .collect();
    // Operations in flight died with the old corrald (tasks are volatile):
    // note what each VM was doing, then clear them all.
    let interrupted: HashMap<String, Vec<String>> = db(s.db.write(|t| {
        let mut out = HashMap::new();
        let vms: Vec<String> = t.state().refs(class::VM).cloned().collect();
        for vm in vms {
            let ops: Vec<String> = t
                .state()
                .get(field::vm::CURRENT_OPERATIONS, &vm)
                .and_then(|v| {
                    v.as_struct()
                        .map(|m| m.iter().map(|(_, o)| o.db_string()).collect())
                })
                .unwrap_or_default();
            if !ops.is_empty() {
                t.set(field::vm::CURRENT_OPERATIONS, &vm, Value::Struct(vec![]))?;
                out.insert(vm, ops);
            }
        }
        Ok::<_, ApiError>(out)
    }))?;
    let was = |vm: &str, op: &str| {
        interrupted
            .get(vm)
            .is_some_and(|o| o.iter().any(|x| x == op))
    };
    undo_interrupted_copies(s).await;
    let mine: Vec<(String, String, String)> = {
        let st = s.db.read();
        st.refs(class::VM)
            .filter(|vm| live_here(s, &st, vm))
            .map(|vm| (vm.clone(), vm_uuid(&st, vm), power(&st, vm)))
            .collect()
    };
    for (vm, uuid, p) in &mine {
        if was(vm, "suspend") {
            // An unfinished suspend is undone: the guest runs on (it was
            // paused for the save) and the half-written image goes.
            if found.get(uuid) == Some(&RunState::Paused) && p == "Running" {
                let _ = s.agent.unpause(uuid).await;
                drop_unused_suspend_images(s, vm).await;
                continue;
            }
            drop_unused_suspend_images(s, vm).await;
        }
        match found.get(uuid) {
            Some(RunState::Running) if p != "Running" => {
                let _ = set_paused(s, vm, false);
            }
            Some(RunState::Paused) if p != "Paused" => {
                let _ = set_paused(s, vm, true);
            }
            Some(RunState::Running | RunState::Paused) => {}
            Some(RunState::ShutDown) => on_event(s, uuid, VmEvent::GuestShutdown).await,
            Some(RunState::Crashed) => on_event(s, uuid, VmEvent::GuestCrash).await,
            Some(RunState::Gone) | None
                if ["clean_shutdown", "hard_shutdown", "shutdown"]
                    .iter()
                    .any(|o| was(vm, o)) =>
            {
                // A shutdown that finished while corrald was down.
                alert(s, vm, "VM_SHUTDOWN", 5, "VM shut down");
                let _ = record_stopped(s, vm, "Halted", None);
            }
            Some(RunState::Gone) | None => {
                alert(
                    s,
                    vm,
                    "VM_CRASHED",
                    2,
                    "The VM's QEMU process was gone when the toolstack started; the VM is now halted.",
                );
                let _ = record_stopped(s, vm, "Halted", None);
            }
        }
    }
    // QEMUs the database does not know as running here are not ours to keep.
    for (uuid, st) in &found {
        if *st != RunState::Gone && !mine.iter().any(|(_, u, _)| u == uuid) {
            tracing::warn!(vm = %uuid, "stopping a QEMU the database does not run here");
            let _ = s.agent.destroy(uuid).await;
        }
    }
    // Every VM's allowed operations follow the rules of this build.
    let _ = db(s.db.write(|t| {
        let vms: Vec<String> = t.state().refs(class::VM).cloned().collect();
        for vm in vms {
            refresh_allowed(t, &vm)?;
        }
        Ok::<(), ApiError>(())
    }));
    let mut rx = s.agent.events();
    let srv = Arc::clone(s);
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok((uuid, ev)) => {
                    let srv = Arc::clone(&srv);
                    tokio::spawn(async move { on_event(&srv, &uuid, ev).await });
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
    });
    let srv = Arc::clone(s);
    tokio::spawn(async move { boot_policy(&srv).await });
    let srv = Arc::clone(s);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            refresh_metrics(&srv).await;
        }
    });
    Ok(())
}

/// Reads guest statistics of every running VM into VM_metrics and
/// VM_guest_metrics. Unknown values stay unknown (absent), never 100 % used.
/// All VMs go into one transaction that writes only what changed, so an idle
/// pool commits nothing and wakes no event clients.
pub async fn refresh_metrics(s: &Arc<Server>) {
    let running: Vec<(String, String)> = {
        let st = s.db.read();
        st.refs(class::VM)
            .filter(|vm| power(&st, vm) == "Running")
            .map(|vm| (vm.clone(), vm_uuid(&st, vm)))
            .collect()
    };
    let mut stats = Vec::with_capacity(running.len());
    for (vm, uuid) in running {
        if let Ok(g) = s.agent.stats(&uuid).await {
            stats.push((vm, g));
        }
    }
    let _ = db(s.db.write(|t| {
        for (vm, g) in &stats {
            // Stopped or destroyed while we were asking.
            if !t.state().exists(class::VM, vm) || power(t.state(), vm) != "Running" {
                continue;
            }
            write_guest_stats(t, vm, g)?;
        }
        Ok(())
    }));
}

fn write_guest_stats(
    t: &mut corral_db::Txn<'_>,
    vm: &str,
    g: &corral_agent::GuestStats,
) -> Result<(), ApiError> {
    let metrics = ensure_metrics(t, vm)?;
    if let Some(a) = g.memory_actual {
        if t.set_if_changed(field::vm_metrics::MEMORY_ACTUAL, &metrics, Value::Int(a))? {
            t.set(
                field::vm_metrics::LAST_UPDATED,
                &metrics,
                Value::DateTime(date::now()),
            )?;
        }
    }
    let mut memory: Vec<(String, String)> = Vec::new();
    if let Some(tot) = g.memory_total {
        memory.push(("total".into(), (tot / 1024).to_string()));
    }
    if let Some(free) = g.memory_free {
        memory.push(("free".into(), (free / 1024).to_string()));
    }
    if memory.is_empty() && !g.agent {
        return Ok(());
    }
    let gm = {
        let cur = t
            .state()
            .get_str(field::vm::GUEST_METRICS, vm)
            .unwrap_or_default();
        if t.state().exists(class::VM_GUEST_METRICS, &cur) {
            cur
        } else {
            let r = new_ref();
            t.create(class::VM_GUEST_METRICS, &r, vec![])?;
            t.set(field::vm::GUEST_METRICS, vm, Value::str(&r))?;
            r
        }
    };
    let map = |v: &[(String, String)]| {
        Value::Struct(
            v.iter()
                .map(|(k, x)| (k.clone(), Value::String(x.clone())))
                .collect(),
        )
    };
    let mut changed = t.set_if_changed(field::vm_guest_metrics::MEMORY, &gm, map(&memory))?;
    if g.agent {
        changed |=
            t.set_if_changed(field::vm_guest_metrics::OS_VERSION, &gm, map(&g.os_version))?;
        changed |= t.set_if_changed(field::vm_guest_metrics::NETWORKS, &gm, map(&g.networks))?;
    }
    changed |= t.set_if_changed(
        field::vm_guest_metrics::PV_DRIVERS_DETECTED,
        &gm,
        Value::Bool(g.agent),
    )?;
    changed |= t.set_if_changed(field::vm_guest_metrics::LIVE, &gm, Value::Bool(g.agent))?;
    if changed {
        t.set(
            field::vm_guest_metrics::LAST_UPDATED,
            &gm,
            Value::DateTime(date::now()),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Disks and CDs of running VMs

/// A VDI plugged into a VM running here: (VM uuid, VBD uuid), the names
/// its drive has in the agent.
pub(crate) fn plugged_drive(s: &Server, vdi: &str) -> Option<(String, String)> {
    find_plugged(s, vdi, false)
}

/// [`plugged_drive`] when the guest can write it: QEMU holds the image
/// read-write (so only QEMU may read it consistently or move it).
pub(crate) fn plugged_rw_drive(s: &Server, vdi: &str) -> Option<(String, String)> {
    find_plugged(s, vdi, true)
}

/// (VM uuid, VBD uuid) of a running VM here with `vdi` plugged (and, with
/// `writable`, writable by its guest).
fn find_plugged(s: &Server, vdi: &str, writable: bool) -> Option<(String, String)> {
    let st = s.db.read();
    if writable && vdi_read_only(&st, vdi) {
        return None;
    }
    st.refs(class::VBD).find_map(|vbd| {
        if st.get_str(field::vbd::VDI, vbd).as_deref() != Some(vdi)
            || !flag(&st, field::vbd::CURRENTLY_ATTACHED, vbd)
            || (writable && st.get_str(field::vbd::MODE, vbd).as_deref() != Some("RW"))
        {
            return None;
        }
        let vm = st.get_str(field::vbd::VM, vbd)?;
        live_here(s, &st, &vm).then(|| {
            (
                vm_uuid(&st, &vm),
                st.get_str(field::vbd::UUID, vbd).unwrap_or_default(),
            )
        })
    })
}

fn running_uuid(s: &Server, vbd: &str) -> Option<(String, String)> {
    let st = s.db.read();
    let vm = st.get_str(field::vbd::VM, vbd)?;
    let p = power(&st, &vm);
    (p == "Running" || p == "Paused").then(|| (vm.clone(), vm_uuid(&st, &vm)))
}

async fn vbd_plug(s: Arc<Server>, _c: Ctx, p: Vec<Value>) -> ApiResult {
    let vbd = p
        .into_iter()
        .next()
        .map(|v| v.db_string())
        .unwrap_or_default();
    if !s.db.read().exists(class::VBD, &vbd) {
        return Err(ApiError::handle_invalid("VBD", &vbd));
    }
    let Some((vm, uuid)) = running_uuid(&s, &vbd) else {
        let vm =
            s.db.read()
                .get_str(field::vbd::VM, &vbd)
                .unwrap_or_default();
        let actual = power(&s.db.read(), &vm).to_lowercase();
        return Err(ApiError::new(
            "VM_BAD_POWER_STATE",
            [vm.as_str(), "running", actual.as_str()],
        ));
    };
    let drive = {
        let st = s.db.read();
        if flag(&st, field::vbd::CURRENTLY_ATTACHED, &vbd) {
            return Err(ApiError::new("DEVICE_ALREADY_ATTACHED", [vbd.as_str()]));
        }
        check_vdi_free(&st, &vm, &vbd)?;
        drive_of(&s, &st, &vbd)?
    };
    let Some(drive) = drive else {
        return Err(ApiError::operation_not_allowed(
            "this VBD type cannot be plugged",
        ));
    };
    if drive.cdrom {
        // QEMU's emulated CD drives (IDE) cannot be hot-plugged.
        return Err(ApiError::operation_not_allowed(
            "CD drives cannot be plugged into a running VM; the VM gets this drive when it next starts",
        ));
    }
    s.agent
        .drive_attach(&uuid, drive)
        .await
        .map_err(agent_err)?;
    db(s.db.write(|t| {
        let ud = t
            .state()
            .get_str(field::vbd::USERDEVICE, &vbd)
            .unwrap_or_default();
        t.set(field::vbd::DEVICE, &vbd, Value::String(device_name(&ud)))?;
        t.set(field::vbd::CURRENTLY_ATTACHED, &vbd, Value::Bool(true))
    }))?;
    void()
}

async fn vbd_unplug(s: Arc<Server>, _c: Ctx, p: Vec<Value>) -> ApiResult {
    let vbd = p
        .into_iter()
        .next()
        .map(|v| v.db_string())
        .unwrap_or_default();
    let (attached, uuid, ty) = {
        let st = s.db.read();
        if !st.exists(class::VBD, &vbd) {
            return Err(ApiError::handle_invalid("VBD", &vbd));
        }
        (
            flag(&st, field::vbd::CURRENTLY_ATTACHED, &vbd),
            st.get_str(field::vbd::UUID, &vbd).unwrap_or_default(),
            st.get_str(field::vbd::TYPE_, &vbd).unwrap_or_default(),
        )
    };
    if !attached {
        return Err(ApiError::new("DEVICE_ALREADY_DETACHED", [vbd.as_str()]));
    }
    if ty == "CD" {
        return Err(ApiError::new("VBD_NOT_UNPLUGGABLE", [vbd.as_str()]));
    }
    let Some((_, vm_uuid)) = running_uuid(&s, &vbd) else {
        return Err(ApiError::new("DEVICE_ALREADY_DETACHED", [vbd.as_str()]));
    };
    s.agent.drive_detach(&vm_uuid, &uuid).await.map_err(|e| {
        ApiError::new(
            "DEVICE_DETACH_REJECTED",
            ["VBD", vbd.as_str(), e.to_string().as_str()],
        )
    })?;
    db(s.db.write(|t| t.set(field::vbd::CURRENTLY_ATTACHED, &vbd, Value::Bool(false))))?;
    void()
}

/// VBD.insert / VBD.eject: the record first (it validates), then the
/// running VM's drive; a failed media change puts the record back.
async fn vbd_media(s: Arc<Server>, p: Vec<Value>, insert: bool) -> ApiResult {
    let vbd = p.first().map(|v| v.db_string()).unwrap_or_default();
    let before = s.db.read().get_str(field::vbd::VDI, &vbd);
    if insert {
        crate::storage::vbd_insert(&s, p)?;
    } else {
        crate::storage::vbd_eject(&s, p)?;
    }
    // A drive added while the VM ran is not in QEMU yet: its medium is
    // recorded for the next start.
    let plugged = flag(&s.db.read(), field::vbd::CURRENTLY_ATTACHED, &vbd);
    if let Some((_, vm_uuid)) = running_uuid(&s, &vbd).filter(|_| plugged) {
        let (id, medium) = {
            let st = s.db.read();
            let id = st.get_str(field::vbd::UUID, &vbd).unwrap_or_default();
            let medium = if insert {
                let vdi = st.get_str(field::vbd::VDI, &vbd).unwrap_or_default();
                let image = vdi_image(&s, &st, &vdi)?;
                Some(corral_agent::Medium {
                    path: image.path,
                    format: image.format.qemu_name().to_owned(),
                })
            } else {
                None
            };
            (id, medium)
        };
        if let Err(e) = s.agent.cd_change(&vm_uuid, &id, medium).await {
            let _ = db(s.db.write(|t| {
                let old = before.clone().unwrap_or_else(|| NULL_REF.into());
                t.set(field::vbd::EMPTY, &vbd, Value::Bool(old == NULL_REF))?;
                t.set(
                    field::vbd::ALLOWED_OPERATIONS,
                    &vbd,
                    crate::storage::vbd_allowed("CD", old == NULL_REF),
                )?;
                t.set(field::vbd::VDI, &vbd, Value::String(old))
            }));
            return Err(agent_err(e));
        }
    }
    void()
}

// ---------------------------------------------------------------------------
// Destroy, clone, copy, provision

async fn vm_destroy(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let op = VmOp::begin(&s, &c, &vm, "destroy")?;
    if flag(&s.db.read(), field::vm::IS_DEFAULT_TEMPLATE, &vm) {
        return Err(ApiError::new(
            "VM_CANNOT_DELETE_DEFAULT_TEMPLATE",
            [vm.as_str()],
        ));
    }
    drop_suspend_image(&s, &vm).await;
    drop(op);
    // Only what belongs to the VM goes: its VBDs, consoles and metrics
    // records. Its disks (VDIs) stay, as in XAPI.
    db(s.db.write(|t| {
        for vbd in vbds_of(t.state(), &vm) {
            t.delete(class::VBD, &vbd)?;
        }
        remove_consoles(t, &vm)?;
        for f in [field::vm::METRICS, field::vm::GUEST_METRICS] {
            let r = t.state().get_str(f, &vm).unwrap_or_default();
            let c = if f == field::vm::METRICS {
                class::VM_METRICS
            } else {
                class::VM_GUEST_METRICS
            };
            if t.state().exists(c, &r) {
                t.delete(c, &r)?;
            }
        }
        t.delete(class::VM, &vm)
    }))?;
    void()
}

/// VM.clone (`sr` None: disks cloned on their SRs) and VM.copy (full copies
/// onto `sr`, or onto each disk's own SR when `sr` is NULL).
async fn vm_clone_or_copy(s: Arc<Server>, c: Ctx, p: Vec<Value>, copy: bool) -> ApiResult {
    let mut it = p.into_iter();
    let vm = it.next().map(|v| v.db_string()).unwrap_or_default();
    let name = it.next().map(|v| v.db_string()).unwrap_or_default();
    let sr = it.next().map(|v| v.db_string());
    let _op = VmOp::begin(&s, &c, &vm, if copy { "copy" } else { "clone" })?;
    if let Some(sr) = sr.as_deref().filter(|r| *r != NULL_REF) {
        if !s.db.read().exists(class::SR, sr) {
            return Err(ApiError::handle_invalid("SR", sr));
        }
    }
    let new_vm = crate::handlers::vm_clone_record(&s, &vm, &name)?;
    let vbds = vbds_of(&s.db.read(), &vm);
    if !vbds.is_empty() {
        set_other_config_key(
            &s,
            &new_vm,
            BEING_MADE,
            Some(if copy { "copy" } else { "clone" }),
        )?;
    }
    let mut made_vdis = Vec::new();
    let result = async {
        for vbd in &vbds {
            let vbd = vbd.as_str();
            let (vdi, ty, empty) = {
                let st = s.db.read();
                (
                    st.get_str(field::vbd::VDI, &vbd).unwrap_or_default(),
                    st.get_str(field::vbd::TYPE_, &vbd).unwrap_or_default(),
                    flag(&st, field::vbd::EMPTY, &vbd),
                )
            };
            let new_vdi = if ty == "CD" || empty || !s.db.read().exists(class::VDI, &vdi) {
                vdi.clone()
            } else if copy {
                let target = sr
                    .clone()
                    .filter(|r| r != NULL_REF)
                    .or_else(|| s.db.read().get_str(field::vdi::SR, &vdi))
                    .unwrap_or_default();
                let r = crate::storage::vdi_copy_to(&s, &c, &vdi, &target).await?;
                made_vdis.push(r.clone());
                r
            } else {
                let r = crate::storage::vdi_clone_of(&s, &vdi).await?;
                made_vdis.push(r.clone());
                r
            };
            copy_vbd(&s, &vbd, &new_vm, &new_vdi)?;
        }
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = result {
        // Undo: the new VM and the disks made for it.
        let _ = db(s.db.write(|t| {
            for vbd in vbds_of(t.state(), &new_vm) {
                t.delete(class::VBD, &vbd)?;
            }
            t.delete(class::VM, &new_vm)
        }));
        for v in made_vdis {
            let _ = crate::storage::vdi_destroy(Arc::clone(&s), vec![Value::str(&v)]).await;
        }
        return Err(e);
    }
    if !vbds.is_empty() {
        set_other_config_key(&s, &new_vm, BEING_MADE, None)?;
    }
    Ok(Value::String(new_vm))
}

fn set_other_config_key(
    s: &Server,
    vm: &str,
    key: &str,
    value: Option<&str>,
) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        let mut oc = strmap(t.state().get(field::vm::OTHER_CONFIG, vm));
        match value {
            Some(v) => oc.insert(key.into(), v.into()),
            None => oc.remove(key),
        };
        t.set(field::vm::OTHER_CONFIG, vm, to_value(&oc))
    }))
}

fn copy_vbd(s: &Server, vbd: &str, vm: &str, vdi: &str) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        let st = t.state();
        let g = |f| st.get(f, vbd).unwrap_or(Value::Nil);
        let fields = vec![
            (field::vbd::VM.index, Value::str(vm)),
            (field::vbd::VDI.index, Value::str(vdi)),
            (field::vbd::USERDEVICE.index, g(field::vbd::USERDEVICE)),
            (field::vbd::BOOTABLE.index, g(field::vbd::BOOTABLE)),
            (field::vbd::MODE.index, g(field::vbd::MODE)),
            (field::vbd::TYPE_.index, g(field::vbd::TYPE_)),
            (field::vbd::UNPLUGGABLE.index, g(field::vbd::UNPLUGGABLE)),
            (field::vbd::EMPTY.index, g(field::vbd::EMPTY)),
            (field::vbd::OTHER_CONFIG.index, g(field::vbd::OTHER_CONFIG)),
            (
                field::vbd::QOS_ALGORITHM_TYPE.index,
                g(field::vbd::QOS_ALGORITHM_TYPE),
            ),
            (
                field::vbd::QOS_ALGORITHM_PARAMS.index,
                g(field::vbd::QOS_ALGORITHM_PARAMS),
            ),
        ];
        t.create(
            class::VBD,
            &new_ref(),
            fields
                .into_iter()
                .filter(|(_, v)| *v != Value::Nil)
                .collect(),
        )
    }))
}

/// A new empty VDI through `VDI.create` (its checks, journal and undo).
async fn new_vdi(
    s: &Arc<Server>,
    sr: &str,
    name: &str,
    size: i64,
    ty: &str,
    other_config: &[(&str, &str)],
) -> Result<String, ApiError> {
    let rec = Value::Struct(vec![
        ("name_label".into(), Value::str(name)),
        ("SR".into(), Value::str(sr)),
        ("virtual_size".into(), Value::Int(size)),
        ("type".into(), Value::str(ty)),
        ("sharable".into(), Value::Bool(false)),
        ("read_only".into(), Value::Bool(false)),
        (
            "other_config".into(),
            Value::Struct(
                other_config
                    .iter()
                    .map(|(k, v)| ((*k).into(), Value::str(*v)))
                    .collect(),
            ),
        ),
    ]);
    Ok(crate::storage::vdi_create(Arc::clone(s), vec![rec])
        .await?
        .db_string())
}

/// VM.provision: makes the disks a template's `other_config:disks` asks for
/// (XenServer's `<provision><disk device= size= sr= bootable= type=/>`).
async fn vm_provision(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, "provision")?;
    let oc = strmap(s.db.read().get(field::vm::OTHER_CONFIG, &vm));
    let Some(xml) = oc.get("disks").cloned() else {
        return void();
    };
    let disks = parse_provision(&xml)?;
    let default_sr =
        s.db.read()
            .get_str(field::pool::DEFAULT_SR, &s.pool_ref)
            .unwrap_or_default();
    // Disks made so far, undone if a later one fails.
    let mut made: Vec<(String, Option<String>)> = Vec::new();
    let result = async {
        for d in disks {
            let sr = {
                let st = s.db.read();
                if d.sr.is_empty() {
                    default_sr.clone()
                } else {
                    st.by_uuid(class::SR, &d.sr)
                        .cloned()
                        .unwrap_or_else(|| d.sr.clone())
                }
            };
            if !s.db.read().exists(class::SR, &sr) {
                return Err(ApiError::new("VM_REQUIRES_SR", [vm.as_str(), sr.as_str()]));
            }
            let vdi = new_vdi(
                &s,
                &sr,
                &format!("{} {}", d.ty, d.device),
                d.size,
                &d.ty,
                &[],
            )
            .await?;
            made.push((vdi.clone(), None));
            let vbd = new_ref();
            db(s.db.write(|t| {
                t.create(
                    class::VBD,
                    &vbd,
                    vec![
                        (field::vbd::VM.index, Value::str(&vm)),
                        (field::vbd::VDI.index, Value::str(&vdi)),
                        (
                            field::vbd::USERDEVICE.index,
                            Value::String(d.device.clone()),
                        ),
                        (field::vbd::BOOTABLE.index, Value::Bool(d.bootable)),
                        (field::vbd::MODE.index, Value::str("RW")),
                        (field::vbd::TYPE_.index, Value::str("Disk")),
                        (field::vbd::EMPTY.index, Value::Bool(false)),
                    ],
                )
            }))?;
            if let Some(last) = made.last_mut() {
                last.1 = Some(vbd);
            }
        }
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = result {
        for (vdi, vbd) in made.into_iter().rev() {
            if let Some(vbd) = vbd {
                let _ = db(s.db.write(|t| t.delete(class::VBD, &vbd)));
            }
            let _ = crate::storage::vdi_destroy(Arc::clone(&s), vec![Value::str(&vdi)]).await;
        }
        return Err(e);
    }
    set_other_config_key(&s, &vm, "disks", None)?;
    void()
}

struct ProvisionDisk {
    device: String,
    size: i64,
    sr: String,
    bootable: bool,
    ty: String,
}

fn parse_provision(xml: &str) -> Result<Vec<ProvisionDisk>, ApiError> {
    let bad = || ApiError::invalid_value("other_config:disks", xml);
    let mut out = Vec::new();
    for part in xml.split("<disk").skip(1) {
        let attrs = part.split("/>").next().ok_or_else(bad)?;
        let get = |k: &str| -> Option<String> {
            let i = attrs.find(&format!("{k}=\""))? + k.len() + 2;
            let rest = &attrs[i..];
            Some(rest[..rest.find('"')?].to_owned())
        };
        out.push(ProvisionDisk {
            device: get("device").ok_or_else(bad)?,
            size: get("size").and_then(|v| v.parse().ok()).ok_or_else(bad)?,
            sr: get("sr").unwrap_or_default(),
            bootable: get("bootable").as_deref() == Some("true"),
            ty: get("type").unwrap_or_else(|| "system".into()),
        });
    }
    Ok(out)
}

async fn vm_assert_operation_valid(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    let mut it = p.into_iter();
    let vm = it.next().map(|v| v.db_string()).unwrap_or_default();
    let op = it.next().map(|v| v.db_string()).unwrap_or_default();
    check_op(&s.db.read(), &vm, &op)?;
    void()
}

async fn vm_assert_can_boot_here(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    let mut it = p.into_iter();
    let vm = it.next().map(|v| v.db_string()).unwrap_or_default();
    let host = it.next().map(|v| v.db_string()).unwrap_or_default();
    if !s.db.read().exists(class::VM, &vm) {
        return Err(ApiError::handle_invalid("VM", &vm));
    }
    check_host(&s, &host)?;
    let cfg = build_config(&s, &vm)?;
    check_memory(&s, &cfg)?;
    void()
}

/// Sets any of the four memory fields after checking XAPI's ordering
/// constraint; static limits only while Halted.
async fn set_memory(
    s: &Server,
    vm: &str,
    smin: Option<i64>,
    smax: Option<i64>,
    dmin: Option<i64>,
    dmax: Option<i64>,
) -> ApiResult {
    db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::VM, vm) {
            return Err(ApiError::handle_invalid("VM", vm));
        }
        let p = power(st, vm);
        if (smin.is_some() || smax.is_some()) && p != "Halted" {
            return Err(ApiError::new("VM_BAD_POWER_STATE", [vm.to_owned(), "halted".into(), p.to_lowercase()]));
        }
        let cur = |f| int(st, f, vm);
        let (a, b, c, d) = (
            smin.unwrap_or_else(|| cur(field::vm::MEMORY_STATIC_MIN)),
            dmin.unwrap_or_else(|| cur(field::vm::MEMORY_DYNAMIC_MIN)),
            dmax.unwrap_or_else(|| cur(field::vm::MEMORY_DYNAMIC_MAX)),
            smax.unwrap_or_else(|| cur(field::vm::MEMORY_STATIC_MAX)),
        );
        if !(a <= b && b <= c && c <= d) {
            return Err(ApiError::new(
                "MEMORY_CONSTRAINT_VIOLATION",
                ["Memory limits must satisfy: static_min <= dynamic_min <= dynamic_max <= static_max"],
            ));
        }
        t.set(field::vm::MEMORY_STATIC_MIN, vm, Value::Int(a))?;
        t.set(field::vm::MEMORY_DYNAMIC_MIN, vm, Value::Int(b))?;
        t.set(field::vm::MEMORY_DYNAMIC_MAX, vm, Value::Int(c))?;
        t.set(field::vm::MEMORY_STATIC_MAX, vm, Value::Int(d))
    }))?;
    // A running VM follows its new dynamic_max through the balloon.
    let (uuid, target, live) = {
        let st = s.db.read();
        (
            vm_uuid(&st, vm),
            int(&st, field::vm::MEMORY_DYNAMIC_MAX, vm),
            live_here(s, &st, vm),
        )
    };
    if live && dmax.is_some() {
        s.agent
            .set_balloon(&uuid, target)
            .await
            .map_err(agent_err)?;
    }
    void()
}

fn ints(p: &[Value]) -> Vec<i64> {
    p.iter()
        .map(|v| {
            v.as_int()
                .unwrap_or_else(|| v.db_string().parse().unwrap_or(0))
        })
        .collect()
}

/// The host's VM shutdown policy (Corral extension, seed 002's
/// libvirt-guests made first-class), from `host.other_config`:
/// `vm-shutdown-policy` = `shutdown` (default: clean shutdown in reverse
/// `order`, each given `vm-shutdown-timeout` seconds, default 300, then
/// forced off) | `suspend` | `refuse` (fail while VMs run).
async fn host_shutdown_vms(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (host, _) = params(p);
    if host != s.host_ref {
        return Err(ApiError::new("HOST_OFFLINE", [host.as_str()]));
    }
    let oc = strmap(s.db.read().get(field::host::OTHER_CONFIG, &host));
    let policy = oc
        .get("vm-shutdown-policy")
        .cloned()
        .unwrap_or_else(|| "shutdown".into());
    let timeout = Duration::from_secs(
        oc.get("vm-shutdown-timeout")
            .and_then(|t| t.parse().ok())
            .unwrap_or(300),
    );
    let mut vms: Vec<(i64, String)> = {
        let st = s.db.read();
        st.refs(class::VM)
            // `host` is this host (checked above).
            .filter(|vm| live_here(&s, &st, vm))
            .map(|vm| (int(&st, field::vm::ORDER, vm), vm.clone()))
            .collect()
    };
    // Reverse start order: the highest `order` goes first.
    vms.sort_by(|a, b| b.0.cmp(&a.0));
    match policy.as_str() {
        "refuse" if !vms.is_empty() => {
            return Err(ApiError::operation_not_allowed(format!(
                "{} VMs are running and vm-shutdown-policy is refuse",
                vms.len()
            )));
        }
        "suspend" => {
            for (_, vm) in &vms {
                if power(&s.db.read(), vm) == "Running" {
                    vm_suspend(Arc::clone(&s), c.clone(), vec![Value::str(vm)]).await?;
                }
            }
        }
        _ => {
            for (_, vm) in &vms {
                let _op = VmOp::begin(&s, &c, vm, "shutdown")?;
                let clean = power(&s.db.read(), vm) == "Running"
                    && clean_stop(&s, vm, timeout, None).await.unwrap_or(false);
                halt(&s, vm).await?;
                alert(
                    &s,
                    vm,
                    "VM_SHUTDOWN",
                    5,
                    if clean {
                        "Shut down cleanly for host shutdown"
                    } else {
                        "Forced off for host shutdown (timeout)"
                    },
                );
            }
        }
    }
    void()
}

/// At the first corrald start after a host boot, `vm-boot-policy=start`
/// starts the VMs with `other_config:auto_poweron=true` in `order`, waiting
/// `start_delay` after each; the default `ignore` resumes nothing.
pub async fn boot_policy(s: &Arc<Server>) {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let marker = s.state_dir.join("last-boot-id");
    let first_start = std::fs::read_to_string(&marker)
        .map(|b| b != boot_id)
        .unwrap_or(true);
    let _ = std::fs::write(&marker, &boot_id);
    let oc = strmap(s.db.read().get(field::host::OTHER_CONFIG, &s.host_ref));
    if !first_start || oc.get("vm-boot-policy").map(String::as_str) != Some("start") {
        return;
    }
    let mut vms: Vec<(i64, i64, String)> = {
        let st = s.db.read();
        st.refs(class::VM)
            .filter(|vm| {
                power(&st, vm) == "Halted"
                    && !flag(&st, field::vm::IS_A_TEMPLATE, vm)
                    && strmap(st.get(field::vm::OTHER_CONFIG, vm))
                        .get("auto_poweron")
                        .map(String::as_str)
                        == Some("true")
            })
            .map(|vm| {
                (
                    int(&st, field::vm::ORDER, vm),
                    int(&st, field::vm::START_DELAY, vm),
                    vm.clone(),
                )
            })
            .collect()
    };
    vms.sort();
    let ctx = Ctx {
        session: String::new(),
        role: corral_model::schema::Role::PoolAdmin,
        user: "root".into(),
        user_ref: String::new(),
        task: None,
    };
    for (_, delay, vm) in vms {
        if let Err(e) = vm_start(
            Arc::clone(s),
            ctx.clone(),
            vec![Value::str(&vm), Value::Bool(false), Value::Bool(false)],
            false,
        )
        .await
        {
            tracing::warn!(vm = %vm, error = %e, "auto power-on failed");
        }
        tokio::time::sleep(Duration::from_secs(delay.max(0) as u64)).await;
    }
}

pub fn register(t: &mut HashMap<String, Handler>) {
    let mut a = |n: &str, f: fn(Arc<Server>, Ctx, Vec<Value>) -> BoxFut| {
        t.insert(n.to_owned(), Handler::Async(f));
    };
    a("VM.start", |s, c, p| Box::pin(vm_start(s, c, p, false)));
    a("VM.start_on", |s, c, p| Box::pin(vm_start(s, c, p, true)));
    a("VM.clean_shutdown", |s, c, p| {
        Box::pin(vm_clean_shutdown(s, c, p))
    });
    a("VM.shutdown", |s, c, p| Box::pin(vm_shutdown(s, c, p)));
    a("VM.hard_shutdown", |s, c, p| {
        Box::pin(vm_hard_shutdown(s, c, p))
    });
    a("VM.clean_reboot", |s, c, p| {
        Box::pin(vm_clean_reboot(s, c, p))
    });
    a("VM.hard_reboot", |s, c, p| {
        Box::pin(vm_hard_reboot(s, c, p))
    });
    a("VM.pause", |s, c, p| Box::pin(vm_pause(s, c, p, true)));
    a("VM.unpause", |s, c, p| Box::pin(vm_pause(s, c, p, false)));
    a("VM.suspend", |s, c, p| Box::pin(vm_suspend(s, c, p)));
    a("VM.resume", |s, c, p| Box::pin(vm_resume(s, c, p, false)));
    a("VM.resume_on", |s, c, p| Box::pin(vm_resume(s, c, p, true)));
    a("VM.power_state_reset", |s, c, p| {
        Box::pin(vm_power_state_reset(s, c, p))
    });
    a("VM.destroy", |s, c, p| Box::pin(vm_destroy(s, c, p)));
    a("VM.clone", |s, c, p| {
        Box::pin(vm_clone_or_copy(s, c, p, false))
    });
    a("VM.copy", |s, c, p| {
        Box::pin(vm_clone_or_copy(s, c, p, true))
    });
    a("VM.provision", |s, c, p| Box::pin(vm_provision(s, c, p)));
    a("VM.assert_operation_valid", |s, _, p| {
        Box::pin(vm_assert_operation_valid(s, p))
    });
    a("VM.assert_can_boot_here", |s, _, p| {
        Box::pin(vm_assert_can_boot_here(s, p))
    });
    a("VM.update_allowed_operations", |s, _, p| {
        Box::pin(async move {
            let (vm, _) = params(p);
            db(s.db.write(|t| refresh_allowed(t, &vm)))?;
            void()
        })
    });
    a("VM.compute_memory_overhead", |s, _, p| {
        Box::pin(async move {
            let (vm, _) = params(p);
            let m = int(&s.db.read(), field::vm::MEMORY_STATIC_MAX, &vm);
            Ok(Value::Int(s.agent.memory_overhead(m)))
        })
    });
    a("host.compute_free_memory", |s, _, _| {
        Box::pin(async move { Ok(Value::Int(host_free_memory(&s, &s.db.read()).1)) })
    });
    a("VM.set_memory_limits", |s, _, p| {
        Box::pin(async move {
            let (vm, rest) = params(p);
            let v = ints(&rest);
            set_memory(
                &s,
                &vm,
                v.first().copied(),
                v.get(1).copied(),
                v.get(2).copied(),
                v.get(3).copied(),
            )
            .await
        })
    });
    a("VM.set_memory_static_range", |s, _, p| {
        Box::pin(async move {
            let (vm, rest) = params(p);
            let v = ints(&rest);
            set_memory(&s, &vm, v.first().copied(), v.get(1).copied(), None, None).await
        })
    });
    a("VM.set_memory_dynamic_range", |s, _, p| {
        Box::pin(async move {
            let (vm, rest) = params(p);
            let v = ints(&rest);
            set_memory(&s, &vm, None, None, v.first().copied(), v.get(1).copied()).await
        })
    });
    a("VM.set_memory", |s, _, p| {
        Box::pin(async move {
            let (vm, rest) = params(p);
            let v = ints(&rest).first().copied();
            set_memory(&s, &vm, None, v, v, v).await
        })
    });
    a("host.shutdown_vms", |s, c, p| {
        Box::pin(host_shutdown_vms(s, c, p))
    });
    a("VBD.plug", |s, c, p| Box::pin(vbd_plug(s, c, p)));
    a("VBD.unplug", |s, c, p| Box::pin(vbd_unplug(s, c, p)));
    a("VBD.unplug_force", |s, c, p| Box::pin(vbd_unplug(s, c, p)));
    a("VBD.insert", |s, _, p| Box::pin(vbd_media(s, p, true)));
    a("VBD.eject", |s, _, p| Box::pin(vbd_media(s, p, false)));
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
        assert!(check_op(&st, vm, "clone").is_ok());
        assert!(check_op(&st, vm, "copy").is_ok());
        let err = check_op(&st, vm, "start").expect_err("start must wait");
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
        assert!(check_op(&st, vm, "destroy").is_err());
        let allowed: Vec<String> = st
            .get(field::vm::ALLOWED_OPERATIONS, vm)
            .and_then(|v| {
                v.as_array()
                    .map(|a| a.iter().map(|x| x.db_string()).collect())
            })
            .unwrap_or_default();
        // Forcing a VM's state may join anything (XAPI's rule).
        assert_eq!(allowed, ["power_state_reset", "clone", "copy"]);
        assert!(!allowed_concurrently("snapshot", &["clone"]));
        assert!(allowed_concurrently("hard_shutdown", &["clean_shutdown"]));
        assert!(allowed_concurrently(
            "hard_reboot",
            &["suspend", "snapshot"]
        ));
        assert!(!allowed_concurrently("hard_shutdown", &["hard_reboot"]));
        assert!(!allowed_concurrently(
            "power_state_reset",
            &["hard_shutdown"]
        ));
        assert!(!allowed_concurrently("clean_shutdown", &["clean_reboot"]));
        assert!(allowed_concurrently("checkpoint", &["snapshot"]));
    }

    /// XenServer's `<provision>` XML: every disk with its attributes, the
    /// defaults for the optional ones, and a clear error for a broken one.
    #[test]
    fn provision_xml() {
        let disks = parse_provision(
            r#"<provision><disk device="0" size="34359738368" sr="" bootable="true" type="system"/><disk device="1" size="1024" sr="u-1"/></provision>"#,
        )
        .expect("parses");
        assert_eq!(disks.len(), 2);
        assert_eq!(
            (
                disks[0].device.as_str(),
                disks[0].size,
                disks[0].sr.as_str(),
                disks[0].bootable,
                disks[0].ty.as_str()
            ),
            ("0", 34359738368, "", true, "system")
        );
        assert_eq!(
            (
                disks[1].device.as_str(),
                disks[1].size,
                disks[1].sr.as_str(),
                disks[1].bootable,
                disks[1].ty.as_str()
            ),
            ("1", 1024, "u-1", false, "system")
        );
        assert!(
            parse_provision("<provision></provision>")
                .expect("empty")
                .is_empty()
        );
        let err = parse_provision(r#"<provision><disk device="0" size="big"/></provision>"#)
            .err()
            .expect("a size must be a number");
        assert_eq!(err.description()[0], "INVALID_VALUE");
    }
}

/// A `PV-kernel`/`PV-ramdisk` path as QEMU gets it: resolved (links
/// followed) to a regular file inside one of the boot directories
/// (`<state-dir>/boot`, those of the `boot-dirs` setting, and local ISO
/// libraries). Anything else gets one answer, whether or not the path
/// exists, so the check reveals nothing about the rest of the host.
fn boot_file(
    s: &Server,
    st: &corral_db::State,
    vm: &str,
    what: &str,
    path: &str,
) -> Result<String, ApiError> {
    let refused = || {
        ApiError::new(
            "BOOTLOADER_FAILED",
            [
                vm.to_owned(),
                format!("{what} must be a file in a boot directory of this host"),
            ],
        )
    };
    let real = std::fs::canonicalize(path).map_err(|_| refused())?;
    let inside = boot_dirs(s, st)
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .any(|d| real.starts_with(&d));
    if !inside || !std::fs::metadata(&real).is_ok_and(|m| m.is_file()) {
        return Err(refused());
    }
    real.to_str().map(str::to_owned).ok_or_else(refused)
}

/// Where boot files may come from: the configured directories and the
/// directories of plugged local ISO libraries. `st` is the caller's read
/// lock (a second one could deadlock behind a waiting writer).
fn boot_dirs(s: &Server, st: &corral_db::State) -> Vec<std::path::PathBuf> {
    let mut dirs = s.config.boot_dirs.clone();
    dirs.push(s.state_dir.join("boot"));
    for pbd in st.refs(class::PBD) {
        let sr = st.get_str(field::pbd::SR, pbd).unwrap_or_default();
        let iso = st.get_str(field::sr::TYPE_, &sr).as_deref() == Some("iso");
        if !iso || !flag(st, field::pbd::CURRENTLY_ATTACHED, pbd) {
            continue;
        }
        if let Some(l) = strmap(st.get(field::pbd::DEVICE_CONFIG, pbd)).get("location") {
            if l.starts_with('/') {
                dirs.push(l.into());
            }
        }
    }
    dirs
}
