//! The QEMU process: finding it again, watching it exit, and its cgroup.

use crate::qemu::{FIRMWARE_RESET_WINDOW, Persisted};
use crate::qmp::QmpEvent;
use crate::{RunState, VmEvent};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};

pub(crate) fn run_state(status: &Value) -> RunState {
    match status.get("status").and_then(Value::as_str).unwrap_or("") {
        "running" => RunState::Running,
        "shutdown" => RunState::ShutDown,
        "guest-panicked" => RunState::Crashed,
        _ => RunState::Paused,
    }
}

/// True while `pid` is a live QEMU process started for VM `uuid`.
pub(crate) fn is_qemu_of(pid: i32, uuid: &str) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // A zombie has an empty command line.
    !cmd.is_empty() && cmd.split(|b| *b == 0).any(|arg| arg == uuid.as_bytes())
}

/// Waits (up to `limit`) for this VM's QEMU to exit. QEMU is not our child,
/// so a pidfd tells us the moment it exits; polling is the fallback.
pub(crate) async fn wait_gone(pid: i32, uuid: &str, limit: Duration) {
    if let Some(fd) = pidfd(pid) {
        // Checked after opening, so the pidfd is this QEMU's, not a reuse.
        if !is_qemu_of(pid, uuid) {
            return;
        }
        // SAFETY: an OwnedFd stays open and returns the same descriptor
        // for as long as the AsyncFd owns it.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        };
        if let Ok(fd) = registered {
            let _ = tokio::time::timeout(limit, fd.readable()).await;
            return;
        }
    }
    let t0 = std::time::Instant::now();
    while is_qemu_of(pid, uuid) && t0.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn pidfd(pid: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a fresh descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Turns QMP events into [`VmEvent`]s until the socket closes.
pub(crate) async fn watch(
    vm: String,
    mut events: mpsc::UnboundedReceiver<QmpEvent>,
    out: broadcast::Sender<(String, VmEvent)>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    host_reset: Arc<Mutex<Option<Instant>>>,
    deleted: broadcast::Sender<String>,
    dir: PathBuf,
) {
    while let Some(ev) = events.recv().await {
        if ev.name == "DEVICE_DELETED" {
            if let Some(id) = ev.data.get("device").and_then(Value::as_str) {
                let _ = deleted.send(id.to_owned());
            }
            continue;
        }
        let guest = ev
            .data
            .get("guest")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let reason = ev.data.get("reason").and_then(Value::as_str).unwrap_or("");
        if ev.name == "RESET" && guest {
            let mut h = host_reset.lock().unwrap_or_else(|p| p.into_inner());
            if h.is_some_and(|t| t.elapsed() < FIRMWARE_RESET_WINDOW) {
                *h = None;
                continue;
            }
        }
        let e = match ev.name.as_str() {
            "SHUTDOWN" if guest && reason == "guest-reset" => Some(VmEvent::GuestReboot),
            "SHUTDOWN" if guest => Some(VmEvent::GuestShutdown),
            "RESET" if guest => Some(VmEvent::GuestRebooted),
            "GUEST_PANICKED" => Some(VmEvent::GuestCrash),
            "STOP" => Some(VmEvent::Paused),
            "RESUME" => Some(VmEvent::Resumed),
            _ => None,
        };
        if let Some(e) = e {
            tracing::debug!(vm = %vm, event = ?e, "VM event");
            let _ = out.send((vm.clone(), e));
        }
    }
    if !stopping.load(std::sync::atomic::Ordering::SeqCst) {
        tracing::warn!(vm = %vm, "QEMU exited unexpectedly");
        let why = std::fs::read_to_string(dir.join("qemu.log"))
            .ok()
            .and_then(|l| l.lines().last().map(str::to_owned))
            .unwrap_or_else(|| "the QEMU process exited unexpectedly".into());
        let _ = out.send((vm, VmEvent::Died(why)));
    }
}

pub(crate) fn u64_stat(v: &Value, key: &str) -> Option<i64> {
    // Unsupported statistics read as 2^64-1 (or -1): unknown.
    let n = v.get(key)?;
    let x = n.as_u64().map(|u| u as i64).or_else(|| n.as_i64())?;
    (x >= 0 && x != i64::MAX && n.as_u64() != Some(u64::MAX)).then_some(x)
}

pub(crate) fn read_persisted(dir: &Path) -> Option<Persisted> {
    serde_json::from_slice(&std::fs::read(dir.join("vm.json")).ok()?).ok()
}

/// The mount point of the cgroup v2 (unified) hierarchy, if there is one:
/// `/sys/fs/cgroup` on a pure v2 host, `/sys/fs/cgroup/unified` on a hybrid
/// one (where it has no controllers but still groups and tracks processes).
pub(crate) fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        // "<id> <parent> <dev> <root> <mount point> <opts> ... - <fstype> ..."
        let (pre, post) = l.split_once(" - ")?;
        let mount_point = pre.split_whitespace().nth(4)?;
        (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

pub(crate) fn cgroup_dir(uuid: &str) -> Option<PathBuf> {
    Some(
        cgroup2_root()?
            .join("corral.slice")
            .join(format!("vm-{uuid}.scope")),
    )
}

/// Puts the VM's QEMU in its own cgroup where a cgroup v2 hierarchy is
/// mounted and writable; otherwise it stays where corrald started it.
pub(crate) fn join_cgroup(uuid: &str, pid: i32) {
    let Some(dir) = cgroup_dir(uuid) else {
        return;
    };
    if std::fs::create_dir_all(&dir).is_ok() {
        if let Err(e) = std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
            tracing::debug!(vm = %uuid, error = %e, "cannot move QEMU into its cgroup");
        }
    }
}

/// Removes the VM's cgroup once its QEMU is gone (rmdir of an empty group).
/// An exited QEMU stays in the group until its parent (init, as QEMU
/// daemonizes) reaps it, so a busy group is retried in the background.
pub(crate) fn leave_cgroup(uuid: &str) {
    let Some(dir) = cgroup_dir(uuid) else {
        return;
    };
    if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("cgroup-rmdir".into())
        .spawn(move || {
            for _ in 0..200 {
                std::thread::sleep(Duration::from_millis(50));
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    return;
                }
            }
            tracing::warn!(cgroup = %dir.display(), "cgroup still busy 10 s after its QEMU exited");
        });
}
