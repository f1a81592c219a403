//! Corral's host agent (XenServer's xenopsd): the one place that turns VM
//! decisions into processes. [`HostAgent`] is the seam; [`qemu::QemuAgent`]
//! runs each VM as a QEMU process driven over QMP, [`sim::SimAgent`] keeps
//! VMs in a file for scale tests and hosts without QEMU.
//!
//! The agent knows nothing of the pool database: the server gives it a
//! [`VmConfig`] built from the VM's records and turns its [`VmEvent`]s back
//! into power states. Everything the agent needs to find a VM again (pid,
//! sockets, configuration) is persisted in the VM's run directory, so a
//! restarted corrald re-attaches instead of relying on memory.

pub mod qemu;
pub mod qmp;
pub mod sim;

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use tokio::sync::{broadcast, mpsc};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("VM {0} is not running on this host")]
    NotRunning(String),
    #[error("QEMU failed to start: {0}")]
    StartFailed(String),
    #[error(transparent)]
    Qmp(#[from] qmp::QmpError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The guest did not let a device go.
    #[error("the guest did not release {0}")]
    Rejected(String),
    #[error("{0}")]
    Other(String),
}

pub type AgentFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, AgentError>> + Send + 'a>>;

/// A disk or CD drive of a VM, in the agent's terms.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Drive {
    /// Stable device id (derived from the VBD's uuid).
    pub id: String,
    /// Image path or `nfs://` URL; `None` for an empty CD drive.
    pub path: Option<String>,
    /// `qcow2` or `raw`.
    pub format: String,
    pub read_only: bool,
    pub cdrom: bool,
}

/// A VM's network card: a tap on `bridge` handed to QEMU (the server
/// checked every value: the MAC's syntax, the model from a fixed list).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Nic {
    /// The VIF's `device`: the guest's NIC index, 0–15.
    pub device: u32,
    pub mac: String,
    /// `virtio-net-pci`, `e1000` or `rtl8139`.
    pub model: String,
    pub bridge: String,
    pub mtu: u32,
}

/// The NIC models a VM may have (`platform:nic_type`).
pub const NIC_MODELS: &[&str] = &["virtio-net-pci", "e1000", "rtl8139"];

/// A CD's new medium: the image and the format to open it in.
#[derive(Clone, Debug, PartialEq)]
pub struct Medium {
    pub path: String,
    pub format: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Boot {
    /// Direct kernel boot (XenServer's PV_kernel / PV_ramdisk / PV_args).
    Kernel {
        kernel: String,
        initrd: Option<String>,
        args: String,
    },
    /// Firmware boot following `HVM_boot_params:order` (`c` disk, `d` CD, `n` net).
    Firmware { order: String, uefi: bool },
}

/// Everything needed to launch (or re-launch) a VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmConfig {
    pub uuid: String,
    pub name: String,
    /// `memory_static_max`: the guest's RAM size.
    pub memory: i64,
    /// `memory_dynamic_max`: the balloon target at start.
    pub memory_target: i64,
    pub vcpus_max: i64,
    pub vcpus: i64,
    pub boot: Boot,
    pub drives: Vec<Drive>,
    /// `true`: a guest reboot stops the VM for the toolstack to decide
    /// (`actions_after_reboot=destroy`); `false`: QEMU resets it itself.
    pub reboot_stops: bool,
    /// `platform:acpi` (default on).
    pub acpi: bool,
    /// `platform:cores-per-socket`; 0 is one core per socket. (These
    /// platform fields default when reading a vm.json from an older corrald.)
    #[serde(default)]
    pub cores_per_socket: i64,
    /// The guest's clock (RTC) at start, `YYYY-MM-DDTHH:MM:SS` UTC, when
    /// `platform:timeoffset` puts it off UTC.
    #[serde(default)]
    pub rtc_base: Option<String>,
    /// `platform:vga`: `std` (default) or `cirrus`.
    #[serde(default)]
    pub vga: Option<String>,
    /// `platform:videoram` in MiB (0: QEMU's default).
    #[serde(default)]
    pub videoram_mib: i64,
    /// `platform:hpet` (default on).
    #[serde(default)]
    pub hpet: Option<bool>,
    /// The VM's NICs, by device.
    #[serde(default)]
    pub nics: Vec<Nic>,
}

/// What the agent finds a VM doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running,
    Paused,
    /// The guest powered off and waits for the toolstack.
    ShutDown,
    /// The guest crashed (pvpanic) and waits for the toolstack.
    Crashed,
    /// No process any more.
    Gone,
}

/// Things that happen to a VM without the toolstack asking.
#[derive(Clone, Debug, PartialEq)]
pub enum VmEvent {
    GuestShutdown,
    /// The guest asked to reboot and is stopped (only with `reboot_stops`).
    GuestReboot,
    /// The guest rebooted itself (QEMU reset it).
    GuestRebooted,
    GuestCrash,
    Paused,
    Resumed,
    /// The QEMU process went away unasked.
    Died(String),
}

/// Memory and OS facts from inside the guest; `None` means unknown.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuestStats {
    /// Balloon size as QEMU reports it (`query-balloon`).
    pub memory_actual: Option<i64>,
    pub memory_total: Option<i64>,
    pub memory_free: Option<i64>,
    /// From the guest agent (`guest-get-osinfo`), XAPI `os_version` keys.
    pub os_version: Vec<(String, String)>,
    /// The guest's interfaces and their addresses, as the guest agent
    /// reports them (`guest-network-get-interfaces`; loopback left out).
    pub interfaces: Vec<GuestInterface>,
    pub agent: bool,
}

/// One guest interface: its MAC (lower case) and addresses, in the
/// guest's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestInterface {
    pub mac: String,
    pub ipv4: Vec<String>,
    pub ipv6: Vec<String>,
}

/// A VM's serial console: what it printed recently, then live output and a
/// way to type into it.
pub struct SerialConsole {
    pub replay: Vec<u8>,
    pub output: broadcast::Receiver<Vec<u8>>,
    pub input: mpsc::UnboundedSender<Vec<u8>>,
}

/// How much of the serial output is kept for replay.
pub const SERIAL_REPLAY: usize = 128 * 1024;

pub trait HostAgent: Send + Sync {
    /// `qemu` or `sim`.
    fn kind(&self) -> &'static str;
    /// Bytes of host memory a VM of `memory` bytes costs beyond its RAM.
    fn memory_overhead(&self, memory: i64) -> i64;
    /// Launches the VM: running, or paused before its first instruction, or
    /// (with `incoming`) restoring a saved image read from that path.
    fn start(&self, cfg: VmConfig, paused: bool, incoming: Option<PathBuf>) -> AgentFut<'_, i64>;
    /// VMs this host still runs (after a toolstack restart), re-attached.
    fn reattach(&self) -> AgentFut<'_, Vec<(String, RunState)>>;
    fn state(&self, vm: &str) -> AgentFut<'_, RunState>;
    /// ACPI power button.
    fn powerdown(&self, vm: &str) -> AgentFut<'_, ()>;
    /// Stops the process at once and forgets the VM.
    fn destroy(&self, vm: &str) -> AgentFut<'_, ()>;
    /// Hardware reset, then running.
    fn reset(&self, vm: &str) -> AgentFut<'_, ()>;
    fn pause(&self, vm: &str) -> AgentFut<'_, ()>;
    fn unpause(&self, vm: &str) -> AgentFut<'_, ()>;
    /// Writes the VM's state to `dest` (a file or FIFO); the VM stays
    /// stopped afterwards (the caller destroys it once the image is safe).
    fn save(&self, vm: &str, dest: PathBuf) -> AgentFut<'_, ()>;
    fn drive_attach(&self, vm: &str, drive: Drive) -> AgentFut<'_, ()>;
    fn drive_detach(&self, vm: &str, id: &str) -> AgentFut<'_, ()>;
    /// Hot-plugs a NIC into a running VM (its tap on `nic.bridge`).
    fn nic_attach(&self, vm: &str, nic: Nic) -> AgentFut<'_, ()>;
    /// Hot-unplugs NIC `device`: the guest must let it go
    /// ([`AgentError::Rejected`] when it does not), unless `force`, which
    /// takes the backend away at once.
    fn nic_detach(&self, vm: &str, device: u32, force: bool) -> AgentFut<'_, ()>;
    /// Sets the balloon target (the guest's memory) of a running VM, bytes.
    fn set_balloon(&self, vm: &str, bytes: i64) -> AgentFut<'_, ()>;
    /// Switches a plugged disk's active image to `overlay`, an existing qcow2
    /// image backed by the current one, in one step: everything the guest
    /// wrote before is in the old image, everything after in the overlay
    /// (a point-in-time snapshot of a running disk).
    fn drive_switch_to_overlay(&self, vm: &str, id: &str, overlay: &str) -> AgentFut<'_, ()>;
    /// The image a plugged drive reads and writes now (its active layer).
    fn drive_image(&self, vm: &str, id: &str) -> AgentFut<'_, Option<String>>;
    /// Grows a plugged drive's image to `size` bytes while the guest runs.
    fn drive_resize(&self, vm: &str, id: &str, size: i64) -> AgentFut<'_, ()>;
    /// Inserts (`Some`) or ejects (`None`) a CD's medium.
    /// Puts `medium` into (or, with `None`, ejects the medium of) CD drive `id`.
    fn cd_change(&self, vm: &str, id: &str, medium: Option<Medium>) -> AgentFut<'_, ()>;
    fn stats(&self, vm: &str) -> AgentFut<'_, GuestStats>;
    fn events(&self) -> broadcast::Receiver<(String, VmEvent)>;
    fn serial(&self, vm: &str) -> Result<SerialConsole, AgentError>;
    /// The VNC server's unix socket, for `rfb` consoles.
    fn vnc_socket(&self, vm: &str) -> Option<PathBuf>;
}

/// Chooses the accelerator: `auto` means KVM when `/dev/kvm` opens, else TCG.
pub fn resolve_accel(setting: &str) -> &'static str {
    match setting {
        "kvm" => "kvm",
        "tcg" => "tcg",
        _ => {
            if std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok()
            {
                "kvm"
            } else {
                "tcg"
            }
        }
    }
}
