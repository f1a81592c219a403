//! VMs as QEMU processes. Each VM has a run directory
//! (`<state>/vms/<uuid>/`) with its configuration and pid (`vm.json`), its
//! QMP, serial, guest-agent and VNC sockets, and the serial log QEMU itself
//! writes. QEMU is started with `-daemonize`, so it is never corrald's child:
//! killing or restarting corrald leaves it running, and the next corrald
//! finds it again through `vm.json`.
//!
//! Guest intent reaches the toolstack instead of QEMU acting alone:
//! `-action shutdown=pause` keeps a powered-off guest's process until the
//! toolstack applies `actions_after_shutdown`, `panic=pause` does the same for
//! crashes (pvpanic), and `reboot=shutdown` is used when a reboot must not
//! simply reset the VM.

use crate::qemu::cmdline::{drive_spec, shell_quote};
use crate::qemu::process::{
    is_qemu_of, join_cgroup, leave_cgroup, read_persisted, run_state, u64_stat, wait_gone, watch,
};
use crate::qemu::serial::{serial_pump, tail_of};
use crate::qmp::{Qmp, ga_call};
use crate::{
    AgentError, AgentFut, Drive, GuestStats, HostAgent, Medium, Nic, RunState, SERIAL_REPLAY,
    SerialConsole, VmConfig, VmEvent,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
mod cmdline;
mod nics;
mod process;
mod serial;

/// The serial log is cut back to [`SERIAL_REPLAY`] bytes beyond this size.
pub(crate) const SERIAL_LOG_MAX: u64 = 4 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct QemuSettings {
    pub binary: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub machine: String,
    /// UEFI firmware image for `HVM_boot_params:firmware=uefi`.
    pub ovmf: String,
}

impl Default for QemuSettings {
    fn default() -> Self {
        QemuSettings {
            binary: "qemu-system-x86_64".into(),
            accel: crate::resolve_accel("auto").into(),
            machine: "pc-i440fx-7.2".into(),
            ovmf: "/usr/share/OVMF/OVMF_CODE.fd".into(),
        }
    }
}

/// What is persisted per VM (`vm.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Persisted {
    pid: i32,
    config: VmConfig,
}

/// A VM this agent is attached to.
pub(crate) struct Attached {
    pid: i32,
    dir: PathBuf,
    qmp: Arc<Qmp>,
    serial_out: broadcast::Sender<Vec<u8>>,
    serial_in: mpsc::UnboundedSender<Vec<u8>>,
    /// Set before the toolstack stops QEMU on purpose, so the closing QMP
    /// socket is not reported as a death.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// When the toolstack last reset the VM. SeaBIOS answers a host reset
    /// with a reset of its own (guest-initiated) a few ms later; that one is
    /// part of the toolstack's reset, not a guest reboot.
    host_reset: Arc<Mutex<Option<Instant>>>,
    /// The ids of devices QEMU reports gone (`DEVICE_DELETED`: the guest
    /// let a hot-unplugged device go).
    deleted: broadcast::Sender<String>,
}

/// How long the guest has to let a hot-unplugged device go (XAPI waits
/// too); then the unplug is refused.
pub(crate) const UNPLUG_WAIT: Duration = Duration::from_secs(10);

impl Attached {
    /// `device_del`, then (unless `wait` is `None`) the guest's
    /// acknowledgement, QEMU's `DEVICE_DELETED`: whether the device went.
    pub(crate) async fn unplug(
        &self,
        id: &str,
        wait: Option<Duration>,
    ) -> Result<bool, AgentError> {
        // Subscribed first, so the guest's answer cannot come in between.
        let mut deleted = self.deleted.subscribe();
        self.qmp.execute("device_del", json!({"id": id})).await?;
        let Some(wait) = wait else {
            return Ok(false);
        };
        let gone = async {
            loop {
                match deleted.recv().await {
                    Ok(d) if d == id => return true,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return false,
                }
            }
        };
        if matches!(tokio::time::timeout(wait, gone).await, Ok(true)) {
            return Ok(true);
        }
        // Gone without our hearing of it (a lagged channel)?
        let still = self
            .qmp
            .execute(
                "qom-get",
                json!({"path": format!("/machine/peripheral/{id}"), "property": "type"}),
            )
            .await
            .is_ok();
        Ok(!still)
    }
}

/// How long after a toolstack reset a guest reset counts as the firmware's.
pub(crate) const FIRMWARE_RESET_WINDOW: Duration = Duration::from_secs(3);

pub struct QemuAgent {
    settings: QemuSettings,
    root: PathBuf,
    /// Makes the VMs' taps.
    net: Arc<dyn corral_net::HostNetwork>,
    vms: Mutex<HashMap<String, Arc<Attached>>>,
    events: broadcast::Sender<(String, VmEvent)>,
}

impl QemuAgent {
    pub fn new(
        root: PathBuf,
        settings: QemuSettings,
        net: Arc<dyn corral_net::HostNetwork>,
    ) -> QemuAgent {
        let (events, _) = broadcast::channel(1024);
        QemuAgent {
            settings,
            root,
            net,
            vms: Mutex::new(HashMap::new()),
            events,
        }
    }

    pub(crate) fn dir(&self, vm: &str) -> PathBuf {
        self.root.join(vm)
    }

    pub(crate) fn attached(&self, vm: &str) -> Result<Arc<Attached>, AgentError> {
        self.vms
            .lock()
            .ok()
            .and_then(|m| m.get(vm).cloned())
            .ok_or_else(|| AgentError::NotRunning(vm.to_owned()))
    }

    pub(crate) async fn attach(
        &self,
        vm: &str,
        pid: i32,
    ) -> Result<(Arc<Attached>, RunState), AgentError> {
        let dir = self.dir(vm);
        let (qmp, events) = Qmp::connect(&dir.join("qmp.sock")).await?;
        let (serial_out, _) = broadcast::channel(256);
        let (serial_in, serial_rx) = mpsc::unbounded_channel();
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let host_reset = Arc::new(Mutex::new(None));
        let (deleted, _) = broadcast::channel(64);
        let at = Arc::new(Attached {
            pid,
            dir: dir.clone(),
            qmp: Arc::clone(&qmp),
            serial_out: serial_out.clone(),
            serial_in,
            stopping: Arc::clone(&stopping),
            host_reset: Arc::clone(&host_reset),
            deleted: deleted.clone(),
        });
        tokio::spawn(serial_pump(dir.clone(), serial_out, serial_rx));
        let status = qmp.execute("query-status", Value::Null).await?;
        let state = run_state(&status);
        // Balloon statistics are a QOM property, not migrated or kept across
        // restarts: (re-)arm them on every attach.
        let _ = qmp
            .execute(
                "qom-set",
                json!({"path": "/machine/peripheral/balloon0", "property": "guest-stats-polling-interval", "value": 2}),
            )
            .await;
        if let Ok(mut m) = self.vms.lock() {
            m.insert(vm.to_owned(), Arc::clone(&at));
        }
        tokio::spawn(watch(
            vm.to_owned(),
            events,
            self.events.clone(),
            stopping,
            host_reset,
            deleted,
            dir,
        ));
        Ok((at, state))
    }

    pub(crate) fn forget(&self, vm: &str) {
        if let Ok(mut m) = self.vms.lock() {
            m.remove(vm);
        }
        let _ = std::fs::remove_dir_all(self.dir(vm));
        leave_cgroup(vm);
    }

    pub(crate) async fn kill_and_forget(&self, vm: &str, pid: Option<i32>) {
        let at = self.vms.lock().ok().and_then(|m| m.get(vm).cloned());
        if let Some(at) = &at {
            at.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ =
                tokio::time::timeout(Duration::from_secs(3), at.qmp.execute("quit", Value::Null))
                    .await;
        }
        if let Some(pid) = at.as_ref().map(|a| a.pid).or(pid) {
            wait_gone(pid, vm, Duration::from_secs(3)).await;
            if is_qemu_of(pid, vm) {
                // SAFETY: kill(2) on a pid verified to be this VM's QEMU.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                wait_gone(pid, vm, Duration::from_secs(3)).await;
            }
        }
        self.forget(vm);
    }
}

impl HostAgent for QemuAgent {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn memory_overhead(&self, memory: i64) -> i64 {
        // Device model and (for TCG) the translation cache, plus page tables.
        let base: i64 = if self.settings.accel == "tcg" { 96 } else { 32 };
        base * 1024 * 1024 + memory / 128
    }

    fn start(&self, cfg: VmConfig, paused: bool, incoming: Option<PathBuf>) -> AgentFut<'_, i64> {
        Box::pin(async move {
            let dir = self.dir(&cfg.uuid);
            if let Some(old) = read_persisted(&dir) {
                if is_qemu_of(old.pid, &cfg.uuid) {
                    return Err(AgentError::Other(format!(
                        "VM {} already has a QEMU process",
                        cfg.uuid
                    )));
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            // One tap per NIC, opened here and inherited by QEMU, which
            // holds it for the VM's life: the guest keeps its network when
            // corrald goes, and the tap goes with the VM.
            if let Some(bad) = cfg.nics.iter().find(|n| {
                !corral_net::mac::is_valid(&n.mac) || !crate::NIC_MODELS.contains(&n.model.as_str())
            }) {
                return Err(AgentError::StartFailed(format!(
                    "NIC {}: MAC {:?} or model {:?} refused",
                    bad.device, bad.mac, bad.model
                )));
            }
            let mut taps = Vec::with_capacity(cfg.nics.len());
            for nic in &cfg.nics {
                let name = corral_net::names::tap_name(&cfg.uuid, nic.device);
                let fd = self
                    .net
                    .open_tap(&name, &nic.bridge, nic.mtu)
                    .await
                    .map_err(|e| AgentError::StartFailed(e.to_string()))?;
                taps.push((nic.device, fd));
            }
            let tap_fds: Vec<(u32, i32)> = taps
                .iter()
                .map(|(d, fd)| (*d, std::os::fd::AsRawFd::as_raw_fd(fd)))
                .collect();
            let args = self.command_line(&cfg, &dir, paused, incoming.as_deref(), &tap_fds);
            std::fs::write(
                dir.join("cmdline"),
                args.iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" "),
            )?;
            let mut command = tokio::process::Command::new(&self.settings.binary);
            command.args(&args).stdin(std::process::Stdio::null());
            let inherit: Vec<i32> = tap_fds.iter().map(|(_, fd)| *fd).collect();
            // SAFETY: between fork and exec only fcntl(2), which is
            // async-signal-safe, runs; it clears close-on-exec on the tap
            // descriptors so that QEMU inherits them at the same numbers.
            unsafe {
                command.pre_exec(move || {
                    for fd in &inherit {
                        if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
            let out = command
                .output()
                .await
                .map_err(|e| AgentError::StartFailed(format!("{}: {e}", self.settings.binary)))?;
            // QEMU has its own copies now.
            drop(taps);
            if !out.status.success() {
                let msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(AgentError::StartFailed(msg));
            }
            let pid: i32 = std::fs::read_to_string(dir.join("qemu.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .ok_or_else(|| AgentError::StartFailed("QEMU wrote no pid file".into()))?;
            let persisted = Persisted {
                pid,
                config: cfg.clone(),
            };
            let json = serde_json::to_vec_pretty(&persisted)
                .map_err(|e| AgentError::Other(e.to_string()))?;
            let tmp = dir.join("vm.json.tmp");
            std::fs::write(&tmp, json)?;
            std::fs::rename(&tmp, dir.join("vm.json"))?;
            join_cgroup(&cfg.uuid, pid);
            match self.attach(&cfg.uuid, pid).await {
                Ok((at, _)) => {
                    if incoming.is_some() {
                        // Restoring: wait until QEMU has read the whole image.
                        let t0 = std::time::Instant::now();
                        loop {
                            let st = at.qmp.execute("query-status", Value::Null).await?;
                            if st.get("status").and_then(Value::as_str) != Some("inmigrate") {
                                break;
                            }
                            if t0.elapsed() > Duration::from_secs(600) {
                                self.kill_and_forget(&cfg.uuid, Some(pid)).await;
                                return Err(AgentError::Other("restoring the VM timed out".into()));
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        let mig = at.qmp.execute("query-migrate", Value::Null).await?;
                        if mig.get("status").and_then(Value::as_str) == Some("failed") {
                            self.kill_and_forget(&cfg.uuid, Some(pid)).await;
                            return Err(AgentError::Other("restoring the VM failed".into()));
                        }
                    }
                    if cfg.memory_target > 0 && cfg.memory_target < cfg.memory {
                        let _ = self.set_balloon(&cfg.uuid, cfg.memory_target).await;
                    }
                    Ok(pid as i64)
                }
                Err(e) => {
                    self.kill_and_forget(&cfg.uuid, Some(pid)).await;
                    Err(e)
                }
            }
        })
    }

    fn reattach(&self) -> AgentFut<'_, Vec<(String, RunState)>> {
        Box::pin(async move {
            let mut found = Vec::new();
            let Ok(rd) = std::fs::read_dir(&self.root) else {
                return Ok(found);
            };
            for e in rd.flatten() {
                let uuid = e.file_name().to_string_lossy().into_owned();
                let Some(p) = read_persisted(&e.path()) else {
                    let _ = std::fs::remove_dir_all(e.path());
                    continue;
                };
                if !is_qemu_of(p.pid, &uuid) {
                    found.push((uuid.clone(), RunState::Gone));
                    self.forget(&uuid);
                    continue;
                }
                match self.attach(&uuid, p.pid).await {
                    Ok((_, st)) => found.push((uuid, st)),
                    Err(err) => {
                        tracing::warn!(vm = %uuid, error = %err, "cannot re-attach to QEMU; stopping it");
                        self.kill_and_forget(&uuid, Some(p.pid)).await;
                        found.push((uuid, RunState::Gone));
                    }
                }
            }
            Ok(found)
        })
    }

    fn state(&self, vm: &str) -> AgentFut<'_, RunState> {
        let vm = vm.to_owned();
        Box::pin(async move {
            let Ok(at) = self.attached(&vm) else {
                return Ok(RunState::Gone);
            };
            match at.qmp.execute("query-status", Value::Null).await {
                Ok(s) => Ok(run_state(&s)),
                Err(_) if !is_qemu_of(at.pid, &vm) => Ok(RunState::Gone),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn powerdown(&self, vm: &str) -> AgentFut<'_, ()> {
        let vm = vm.to_owned();
        Box::pin(async move {
            self.attached(&vm)?
                .qmp
                .execute("system_powerdown", Value::Null)
                .await?;
            Ok(())
        })
    }

    fn destroy(&self, vm: &str) -> AgentFut<'_, ()> {
        let vm = vm.to_owned();
        Box::pin(async move {
            let pid = read_persisted(&self.dir(&vm)).map(|p| p.pid);
            self.kill_and_forget(&vm, pid).await;
            Ok(())
        })
    }

    fn reset(&self, vm: &str) -> AgentFut<'_, ()> {
        let vm = vm.to_owned();
        Box::pin(async move {
            let at = self.attached(&vm)?;
            // Under `-action reboot=shutdown` QEMU turns system_reset into a
            // shutdown too, so the toolstack's own reset (hard_reboot, restart
            // after a crash or a guest reboot) lifts that for the one reset.
            let stops = read_persisted(&at.dir).is_some_and(|p| p.config.reboot_stops);
            if stops {
                at.qmp
                    .execute("set-action", json!({"reboot": "reset"}))
                    .await?;
            }
            *at.host_reset.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            let reset = async {
                at.qmp.execute("system_reset", Value::Null).await?;
                at.qmp.execute("cont", Value::Null).await
            }
            .await;
            if stops {
                // Keep reboot=reset until the firmware's own reset is over.
                let start = Instant::now();
                while start.elapsed() < FIRMWARE_RESET_WINDOW
                    && at.host_reset.lock().map(|h| h.is_some()).unwrap_or(false)
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                at.qmp
                    .execute("set-action", json!({"reboot": "shutdown"}))
                    .await?;
            }
            reset?;
            Ok(())
        })
    }

    fn pause(&self, vm: &str) -> AgentFut<'_, ()> {
        let vm = vm.to_owned();
        Box::pin(async move {
            self.attached(&vm)?.qmp.execute("stop", Value::Null).await?;
            Ok(())
        })
    }

    fn unpause(&self, vm: &str) -> AgentFut<'_, ()> {
        let vm = vm.to_owned();
        Box::pin(async move {
            self.attached(&vm)?.qmp.execute("cont", Value::Null).await?;
            Ok(())
        })
    }

    fn save(&self, vm: &str, dest: PathBuf) -> AgentFut<'_, ()> {
        let vm = vm.to_owned();
        Box::pin(async move {
            let at = self.attached(&vm)?;
            let q = &at.qmp;
            q.execute("stop", Value::Null).await?;
            // The default 128 MiB/s cap also throttles saving to a file.
            q.execute(
                "migrate-set-parameters",
                json!({"max-bandwidth": 8_i64 << 30}),
            )
            .await?;
            q.execute(
                "migrate",
                json!({"uri": format!("exec:cat > {}", shell_quote(&dest.to_string_lossy()))}),
            )
            .await?;
            loop {
                let st = q.execute("query-migrate", Value::Null).await?;
                match st.get("status").and_then(Value::as_str).unwrap_or("") {
                    "completed" => return Ok(()),
                    "failed" | "cancelled" => {
                        let why = st
                            .get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("migration failed");
                        let _ = q.execute("cont", Value::Null).await;
                        return Err(AgentError::Other(format!("saving the VM failed: {why}")));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
    }

    fn drive_attach(&self, vm: &str, drive: Drive) -> AgentFut<'_, ()> {
        let vm = vm.to_owned();
        Box::pin(async move {
            let at = self.attached(&vm)?;
            let hmp = format!("drive_add 0 {}", drive_spec(&drive));
            let out = at
                .qmp
                .execute("human-monitor-command", json!({"command-line": hmp}))
                .await?;
            let text = out.as_str().unwrap_or("").trim();
            if !text.is_empty() && !text.eq_ignore_ascii_case("OK") {
                return Err(AgentError::Other(text.to_owned()));
            }
            let dev = json!({"driver": "virtio-blk-pci", "drive": format!("drive-{}", drive.id), "id": format!("vbd-{}", drive.id)});
            if let Err(e) = at.qmp.execute("device_add", dev).await {
                let _ = at
                    .qmp
                    .execute(
                        "human-monitor-command",
                        json!({"command-line": format!("drive_del drive-{}", drive.id)}),
                    )
                    .await;
                return Err(e.into());
            }
            Ok(())
        })
    }

    fn nic_attach(&self, vm: &str, nic: Nic) -> AgentFut<'_, ()> {
        let vm = vm.to_owned();
        Box::pin(async move { self.hotplug_nic(&vm, nic).await })
    }

    fn nic_detach(&self, vm: &str, device: u32, force: bool) -> AgentFut<'_, ()> {
        let vm = vm.to_owned();
        Box::pin(async move { self.unplug_nic(&vm, device, force).await })
    }

    fn set_balloon(&self, vm: &str, bytes: i64) -> AgentFut<'_, ()> {
        let vm = vm.to_owned();
        Box::pin(async move {
            self.attached(&vm)?
                .qmp
                .execute("balloon", json!({"value": bytes}))
                .await?;
            Ok(())
        })
    }

    fn drive_switch_to_overlay(&self, vm: &str, id: &str, overlay: &str) -> AgentFut<'_, ()> {
        let (vm, id, overlay) = (vm.to_owned(), id.to_owned(), overlay.to_owned());
        Box::pin(async move {
            // mode=existing: QEMU opens the overlay Corral made and puts the
            // current image under it, atomically for the guest.
            self.attached(&vm)?
                .qmp
                .execute(
                    "blockdev-snapshot-sync",
                    json!({
                        "device": format!("drive-{id}"),
                        "snapshot-file": overlay,
                        "format": "qcow2",
                        "mode": "existing",
                    }),
                )
                .await?;
            Ok(())
        })
    }

    fn drive_image(&self, vm: &str, id: &str) -> AgentFut<'_, Option<String>> {
        let (vm, id) = (vm.to_owned(), id.to_owned());
        Box::pin(async move {
            let blocks = self
                .attached(&vm)?
                .qmp
                .execute("query-block", Value::Null)
                .await?;
            let device = format!("drive-{id}");
            Ok(blocks.as_array().and_then(|a| {
                a.iter()
                    .find(|b| b.get("device").and_then(Value::as_str) == Some(device.as_str()))
                    .and_then(|b| b.get("inserted")?.get("file")?.as_str().map(str::to_owned))
            }))
        })
    }

    fn drive_resize(&self, vm: &str, id: &str, size: i64) -> AgentFut<'_, ()> {
        let (vm, id) = (vm.to_owned(), id.to_owned());
        Box::pin(async move {
            self.attached(&vm)?
                .qmp
                .execute(
                    "block_resize",
                    json!({"device": format!("drive-{id}"), "size": size}),
                )
                .await?;
            Ok(())
        })
    }

    fn drive_detach(&self, vm: &str, id: &str) -> AgentFut<'_, ()> {
        let (vm, id) = (vm.to_owned(), id.to_owned());
        Box::pin(async move {
            let at = self.attached(&vm)?;
            if at.unplug(&format!("vbd-{id}"), Some(UNPLUG_WAIT)).await? {
                return Ok(());
            }
            Err(AgentError::Other(format!(
                "the guest did not release vbd-{id}"
            )))
        })
    }

    fn cd_change(&self, vm: &str, id: &str, medium: Option<Medium>) -> AgentFut<'_, ()> {
        let (vm, id) = (vm.to_owned(), id.to_owned());
        Box::pin(async move {
            let at = self.attached(&vm)?;
            let qdev = format!("vbd-{id}");
            match medium {
                Some(m) => {
                    at.qmp
                        .execute(
                            "blockdev-change-medium",
                            json!({"id": qdev, "filename": m.path, "format": m.format, "read-only-mode": "read-only"}),
                        )
                        .await?;
                }
                None => {
                    // One command: opening the tray and removing the medium as
                    // two would let the guest close the tray in between (Linux
                    // closes an open tray when something opens the device).
                    at.qmp
                        .execute("eject", json!({"id": qdev, "force": true}))
                        .await?;
                    // An empty drive shows a closed tray, as XenServer's does; the
                    // guest may have closed it already.
                    let _ = at
                        .qmp
                        .execute("blockdev-close-tray", json!({"id": qdev}))
                        .await;
                }
            }
            Ok(())
        })
    }

    fn stats(&self, vm: &str) -> AgentFut<'_, GuestStats> {
        let vm = vm.to_owned();
        Box::pin(async move {
            let at = self.attached(&vm)?;
            let mut g = GuestStats::default();
            if let Ok(b) = at.qmp.execute("query-balloon", Value::Null).await {
                g.memory_actual = b.get("actual").and_then(Value::as_i64);
            }
            if let Ok(s) = at
                .qmp
                .execute(
                    "qom-get",
                    json!({"path": "/machine/peripheral/balloon0", "property": "guest-stats"}),
                )
                .await
            {
                // last-update 0: the guest has not answered since polling was armed.
                if s.get("last-update").and_then(Value::as_i64).unwrap_or(0) > 0 {
                    let st = s.get("stats").cloned().unwrap_or(Value::Null);
                    g.memory_total = u64_stat(&st, "stat-total-memory");
                    g.memory_free = u64_stat(&st, "stat-available-memory")
                        .or_else(|| u64_stat(&st, "stat-free-memory"));
                }
            }
            let ga = at.dir.join("qga.sock");
            if let Ok(os) = ga_call(
                &ga,
                "guest-get-osinfo",
                Value::Null,
                Duration::from_millis(1500),
            )
            .await
            {
                g.agent = true;
                let get = |k: &str| os.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                let version = get("version-id");
                let mut parts = version.split('.');
                g.os_version = vec![
                    ("name".into(), get("pretty-name")),
                    ("uname".into(), get("kernel-release")),
                    ("distro".into(), get("id")),
                    ("major".into(), parts.next().unwrap_or("").to_owned()),
                    ("minor".into(), parts.next().unwrap_or("").to_owned()),
                ];
                if let Ok(ifs) = ga_call(
                    &ga,
                    "guest-network-get-interfaces",
                    Value::Null,
                    Duration::from_millis(1500),
                )
                .await
                {
                    for i in ifs.as_array().into_iter().flatten() {
                        if i.get("name").and_then(Value::as_str) == Some("lo") {
                            continue;
                        }
                        let mut iface = crate::GuestInterface {
                            mac: i
                                .get("hardware-address")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_ascii_lowercase(),
                            ..Default::default()
                        };
                        for ip in i
                            .get("ip-addresses")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                        {
                            let addr = ip
                                .get("ip-address")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_owned();
                            if ip.get("ip-address-type").and_then(Value::as_str) == Some("ipv6") {
                                iface.ipv6.push(addr);
                            } else {
                                iface.ipv4.push(addr);
                            }
                        }
                        g.interfaces.push(iface);
                    }
                }
            }
            Ok(g)
        })
    }

    fn events(&self) -> broadcast::Receiver<(String, VmEvent)> {
        self.events.subscribe()
    }

    fn serial(&self, vm: &str) -> Result<SerialConsole, AgentError> {
        let at = self.attached(vm)?;
        // Subscribe before reading the log so nothing falls in between.
        let output = at.serial_out.subscribe();
        let mut replay = tail_of(&at.dir.join("serial.log.0"), SERIAL_REPLAY);
        replay.extend(tail_of(&at.dir.join("serial.log"), SERIAL_REPLAY));
        let cut = replay.len().saturating_sub(SERIAL_REPLAY);
        Ok(SerialConsole {
            replay: replay.split_off(cut),
            output,
            input: at.serial_in.clone(),
        })
    }

    fn vnc_socket(&self, vm: &str) -> Option<PathBuf> {
        self.attached(vm).ok().map(|a| a.dir.join("vnc.sock"))
    }
}
