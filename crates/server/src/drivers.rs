//! Which host agent drives VMs and which network driver makes bridges, and
//! where VMs' runtime files go.

use crate::context::LocalDrivers;
use crate::core::config::Config;
use std::sync::Arc;

/// Picks the host agent and network driver. The simulators are used only
/// when asked for, or when no QEMU is installed (and the host record then
/// says so).
pub(crate) fn make_drivers(
    config: &Config,
    state_dir: &std::path::Path,
) -> anyhow::Result<LocalDrivers> {
    let have_qemu = std::process::Command::new(&config.qemu_binary)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let sim = config.host_driver == "sim" || (config.host_driver == "auto" && !have_qemu);
    if sim {
        tracing::warn!("host driver: sim (simulated VMs; nothing runs)");
        Ok(LocalDrivers {
            agent: Arc::new(corral_agent::sim::SimAgent::new(state_dir.join("sim-vms"))),
            net: Arc::new(corral_net::sim::SimNetwork::new()),
        })
    } else {
        let settings = corral_agent::qemu::QemuSettings {
            binary: config.qemu_binary.clone(),
            accel: corral_agent::resolve_accel(&config.accel).into(),
            ..Default::default()
        };
        tracing::info!(accel = %settings.accel, "host driver: qemu");
        let net: Arc<dyn corral_net::HostNetwork> =
            Arc::new(corral_net::linux::LinuxNetwork::new());
        Ok(LocalDrivers {
            agent: Arc::new(corral_agent::qemu::QemuAgent::new(
                vm_run_dir(state_dir),
                settings,
                Arc::clone(&net),
            )),
            net,
        })
    }
}

/// Where running VMs keep their sockets, logs and `vm.json`: under /run
/// (unix socket paths must stay under 108 bytes, and nothing there should
/// outlive a host reboot, just like the QEMUs), one directory per state
/// directory. `<state-dir>/vms` links to it for operators.
pub(crate) fn vm_run_dir(state_dir: &std::path::Path) -> std::path::PathBuf {
    use std::hash::{Hash, Hasher};
    let canon = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    canon.hash(&mut h);
    let name = format!("{:08x}", h.finish() as u32);
    let base = if std::fs::create_dir_all("/run/corral").is_ok() {
        std::path::PathBuf::from("/run/corral")
    } else {
        std::env::temp_dir().join("corral-run")
    };
    let dir = base.join(name);
    let _ = std::fs::create_dir_all(&dir);
    let link = state_dir.join("vms");
    if std::fs::read_link(&link).ok().as_deref() != Some(dir.as_path()) {
        let _ = std::fs::remove_file(&link);
        let _ = std::os::unix::fs::symlink(&dir, &link);
    }
    dir
}
