//! corrald's configuration, with the connection limits.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    /// Idle sessions expire after this long.
    pub session_timeout: std::time::Duration,
    /// Per user name; the oldest sessions are reaped beyond it.
    pub max_sessions_per_user: usize,
    /// Failed logins allowed per source address per minute.
    pub login_failures_per_minute: u32,
    /// Delay before answering a failed login (XAPI waits 5 s).
    pub failed_login_delay: std::time::Duration,
    /// `qemu`, `sim`, or `auto` (QEMU when installed, else the simulator).
    pub host_driver: String,
    /// `kvm`, `tcg` or `auto` (KVM when /dev/kvm opens).
    pub accel: String,
    pub qemu_binary: String,
    /// How long VM.clean_shutdown waits for the guest.
    pub clean_shutdown_timeout: std::time::Duration,
    /// A block device for the "Local storage" SR made at first start (an
    /// `ext` SR); none: a `file` SR under the state directory.
    pub local_sr_device: Option<String>,
    /// Directories `PV-kernel`/`PV-ramdisk` may name files in, besides
    /// `<state-dir>/boot` and local ISO libraries.
    pub boot_dirs: Vec<std::path::PathBuf>,
    /// Unix sockets served besides `<state-dir>/xapi.sock` (XAPI's
    /// `/var/lib/xcp/xapi` for the system daemon).
    pub extra_unix_sockets: Vec<std::path::PathBuf>,
    /// Connection bounds (see `http.rs`).
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            session_timeout: std::time::Duration::from_secs(24 * 3600),
            max_sessions_per_user: 500,
            login_failures_per_minute: 10,
            failed_login_delay: std::time::Duration::from_secs(2),
            host_driver: "auto".into(),
            accel: "auto".into(),
            qemu_binary: "qemu-system-x86_64".into(),
            clean_shutdown_timeout: std::time::Duration::from_secs(1200),
            local_sr_device: None,
            boot_dirs: Vec::new(),
            extra_unix_sockets: Vec::new(),
            limits: Default::default(),
        }
    }
}

/// How long a peer may hold a connection without doing its part, and how
/// many connections there may be. Nobody, authenticated or not, holds a
/// socket (or an fd) for longer than these allow.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A kept-alive connection with no request started.
    pub idle: Duration,
    /// From a request's first byte to the end of its RPC body; for streamed
    /// bodies (disk uploads), the longest pause between two reads.
    pub request: Duration,
    pub tls_handshake: Duration,
    pub max_connections: usize,
    pub max_per_source: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle: Duration::from_secs(120),
            request: Duration::from_secs(30),
            tls_handshake: Duration::from_secs(10),
            max_connections: 2048,
            max_per_source: 256,
        }
    }
}
