//! The simulated host agent: VMs are records in `<root>/<uuid>.json` and
//! nothing runs. It exists for scale tests and hosts without QEMU; a host
//! using it says so in its record, and corrald only uses it when told to or
//! when no QEMU is installed.

use crate::{
    AgentError, AgentFut, Drive, GuestStats, HostAgent, Medium, Nic, RunState, SerialConsole,
    VmConfig, VmEvent,
};
use std::path::PathBuf;
use tokio::sync::{broadcast, mpsc};

pub struct SimAgent {
    root: PathBuf,
    events: broadcast::Sender<(String, VmEvent)>,
    pid: std::sync::atomic::AtomicI64,
}

impl SimAgent {
    pub fn new(root: PathBuf) -> SimAgent {
        let (events, _) = broadcast::channel(64);
        SimAgent {
            root,
            events,
            pid: std::sync::atomic::AtomicI64::new(1),
        }
    }
    fn file(&self, vm: &str) -> PathBuf {
        self.root.join(format!("{vm}.json"))
    }
    fn load(&self, vm: &str) -> Result<(VmConfig, RunState), AgentError> {
        let data =
            std::fs::read(self.file(vm)).map_err(|_| AgentError::NotRunning(vm.to_owned()))?;
        serde_json::from_slice(&data).map_err(|e| AgentError::Other(e.to_string()))
    }
    fn store(&self, cfg: &VmConfig, st: RunState) -> Result<(), AgentError> {
        std::fs::create_dir_all(&self.root)?;
        let data = serde_json::to_vec(&(cfg, st)).map_err(|e| AgentError::Other(e.to_string()))?;
        std::fs::write(self.file(&cfg.uuid), data)?;
        Ok(())
    }
    fn set_state(&self, vm: &str, st: RunState) -> Result<(), AgentError> {
        let (cfg, _) = self.load(vm)?;
        self.store(&cfg, st)
    }
}

impl HostAgent for SimAgent {
    fn kind(&self) -> &'static str {
        "sim"
    }
    fn memory_overhead(&self, _memory: i64) -> i64 {
        0
    }
    fn start(&self, cfg: VmConfig, paused: bool, _incoming: Option<PathBuf>) -> AgentFut<'_, i64> {
        Box::pin(async move {
            self.store(
                &cfg,
                if paused {
                    RunState::Paused
                } else {
                    RunState::Running
                },
            )?;
            Ok(self.pid.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
        })
    }
    fn reattach(&self) -> AgentFut<'_, Vec<(String, RunState)>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for e in std::fs::read_dir(&self.root)
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(uuid) = name.strip_suffix(".json") {
                    if let Ok((_, st)) = self.load(uuid) {
                        out.push((uuid.to_owned(), st));
                    }
                }
            }
            Ok(out)
        })
    }
    fn state(&self, vm: &str) -> AgentFut<'_, RunState> {
        let r = self.load(vm).map(|(_, s)| s).unwrap_or(RunState::Gone);
        Box::pin(async move { Ok(r) })
    }
    fn powerdown(&self, vm: &str) -> AgentFut<'_, ()> {
        // A simulated guest always honours the power button.
        let r = self.set_state(vm, RunState::ShutDown);
        let _ = self.events.send((vm.to_owned(), VmEvent::GuestShutdown));
        Box::pin(async move { r })
    }
    fn destroy(&self, vm: &str) -> AgentFut<'_, ()> {
        let _ = std::fs::remove_file(self.file(vm));
        Box::pin(async { Ok(()) })
    }
    fn reset(&self, vm: &str) -> AgentFut<'_, ()> {
        let r = self.set_state(vm, RunState::Running);
        Box::pin(async move { r })
    }
    fn pause(&self, vm: &str) -> AgentFut<'_, ()> {
        let r = self.set_state(vm, RunState::Paused);
        Box::pin(async move { r })
    }
    fn unpause(&self, vm: &str) -> AgentFut<'_, ()> {
        let r = self.set_state(vm, RunState::Running);
        Box::pin(async move { r })
    }
    fn save(&self, vm: &str, dest: PathBuf) -> AgentFut<'_, ()> {
        let r = self.set_state(vm, RunState::Paused);
        Box::pin(async move {
            r?;
            std::fs::write(dest, b"corral-sim-suspend-image\n")?;
            Ok(())
        })
    }
    fn drive_attach(&self, vm: &str, drive: Drive) -> AgentFut<'_, ()> {
        let r = self.load(vm).and_then(|(mut cfg, st)| {
            cfg.drives.push(drive);
            self.store(&cfg, st)
        });
        Box::pin(async move { r })
    }
    fn nic_attach(&self, vm: &str, nic: Nic) -> AgentFut<'_, ()> {
        let r = self.load(vm).and_then(|(mut cfg, st)| {
            if cfg.nics.iter().any(|n| n.device == nic.device) {
                return Err(AgentError::Other(format!("NIC {} exists", nic.device)));
            }
            cfg.nics.push(nic);
            self.store(&cfg, st)
        });
        Box::pin(async move { r })
    }
    fn nic_detach(&self, vm: &str, device: u32, _force: bool) -> AgentFut<'_, ()> {
        let r = self.load(vm).and_then(|(mut cfg, st)| {
            cfg.nics.retain(|n| n.device != device);
            self.store(&cfg, st)
        });
        Box::pin(async move { r })
    }
    fn set_balloon(&self, vm: &str, bytes: i64) -> AgentFut<'_, ()> {
        let r = self.load(vm).and_then(|(mut cfg, st)| {
            cfg.memory_target = bytes;
            self.store(&cfg, st)
        });
        Box::pin(async move { r })
    }
    fn drive_switch_to_overlay(&self, vm: &str, id: &str, overlay: &str) -> AgentFut<'_, ()> {
        let r = self.load(vm).and_then(|(mut cfg, st)| {
            for d in cfg.drives.iter_mut().filter(|d| d.id == id) {
                d.path = Some(overlay.to_owned());
            }
            self.store(&cfg, st)
        });
        Box::pin(async move { r })
    }
    fn drive_image(&self, vm: &str, id: &str) -> AgentFut<'_, Option<String>> {
        let r = self.load(vm).map(|(cfg, _)| {
            cfg.drives
                .iter()
                .find(|d| d.id == id)
                .and_then(|d| d.path.clone())
        });
        Box::pin(async move { r })
    }
    fn drive_resize(&self, vm: &str, _id: &str, _size: i64) -> AgentFut<'_, ()> {
        let r = self.load(vm).map(|_| ());
        Box::pin(async move { r })
    }
    fn drive_detach(&self, vm: &str, id: &str) -> AgentFut<'_, ()> {
        let r = self.load(vm).and_then(|(mut cfg, st)| {
            cfg.drives.retain(|d| d.id != id);
            self.store(&cfg, st)
        });
        Box::pin(async move { r })
    }
    fn cd_change(&self, vm: &str, id: &str, medium: Option<Medium>) -> AgentFut<'_, ()> {
        let r = self.load(vm).and_then(|(mut cfg, st)| {
            for d in cfg.drives.iter_mut().filter(|d| d.id == id) {
                d.path = medium.as_ref().map(|m| m.path.clone());
            }
            self.store(&cfg, st)
        });
        Box::pin(async move { r })
    }
    fn stats(&self, vm: &str) -> AgentFut<'_, GuestStats> {
        let r = self.load(vm).map(|(cfg, _)| GuestStats {
            memory_actual: Some(cfg.memory_target),
            ..GuestStats::default()
        });
        Box::pin(async move { r })
    }
    fn events(&self) -> broadcast::Receiver<(String, VmEvent)> {
        self.events.subscribe()
    }
    fn serial(&self, vm: &str) -> Result<SerialConsole, AgentError> {
        self.load(vm)?;
        let (_tx, output) = broadcast::channel(1);
        let (input, _rx) = mpsc::unbounded_channel();
        Ok(SerialConsole {
            replay: b"simulated host: this VM has no console\r\n".to_vec(),
            output,
            input,
        })
    }
    fn vnc_socket(&self, _vm: &str) -> Option<PathBuf> {
        None
    }
}
