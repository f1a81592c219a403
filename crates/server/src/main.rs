//! `corrald --state-dir DIR [--listen ADDR:PORT] [--tls-listen ADDR:PORT]
//!          [--config FILE] [--root-password-file FILE]`

use anyhow::{Context, bail};
use corral_server::daemon::{Options, run};
use std::path::PathBuf;
use std::sync::Mutex;

const USAGE: &str = "usage: corrald --state-dir DIR [--listen ADDR:PORT] [--tls-listen ADDR:PORT] [--config FILE] [--root-password-file FILE]

  --listen ADDR:PORT       plain HTTP XenAPI listener (XenServer: port 80)
  --tls-listen ADDR:PORT   HTTPS XenAPI listener (XenServer: port 443); default 0.0.0.0:443
  --no-tls                 do not serve HTTPS
  --host-driver D          qemu | sim | auto (default: qemu when installed)
  --accel A                kvm | tcg | auto (default: kvm when /dev/kvm opens)
  --config FILE            key = value settings (state-dir, listen, tls-listen,
                           session-timeout-secs, max-sessions-per-user,
                           login-failures-per-minute, failed-login-delay-ms,
                           host-driver, accel, qemu-binary,
                           clean-shutdown-timeout-secs, local-sr-device:
                           a block device formatted ext4 for the first
                           start's 'Local storage' SR, boot-dirs: the
                           directories PV-kernel/PV-ramdisk may name files
                           in besides <state-dir>/boot, ':'-separated,
                           http-idle-timeout-secs (120), http-request-timeout-secs
                           (30), tls-handshake-timeout-secs (10),
                           max-connections (2048), max-connections-per-source
                           (256))
  --xapi-socket PATH       serve the root socket at PATH too (the system unit:
                           XAPI's /var/lib/xcp/xapi); repeatable; config key
                           xapi-socket
  --root-password-file F   root's password on first start (or CORRAL_ROOT_PASSWORD)
The unix socket <state-dir>/xapi.sock is always served; its callers are root.";

fn secs(v: &str) -> anyhow::Result<std::time::Duration> {
    Ok(std::time::Duration::from_secs_f64(v.parse()?))
}

fn main() -> anyhow::Result<()> {
    let mut opts = Options {
        state_dir: PathBuf::from("/var/lib/corral"),
        listen: None,
        tls_listen: Some("0.0.0.0:443".parse()?),
        root_password: std::env::var("CORRAL_ROOT_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty()),
        config: Default::default(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut settings: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let mut val = || -> anyhow::Result<String> {
            i += 1;
            args.get(i)
                .cloned()
                .with_context(|| format!("{a} needs a value"))
        };
        match a {
            "--state-dir" => settings.push(("state-dir".into(), val()?)),
            "--listen" => settings.push(("listen".into(), val()?)),
            "--tls-listen" => settings.push(("tls-listen".into(), val()?)),
            "--no-tls" => settings.push(("tls-listen".into(), "none".into())),
            "--host-driver" => settings.push(("host-driver".into(), val()?)),
            "--accel" => settings.push(("accel".into(), val()?)),
            "--xapi-socket" => settings.push(("xapi-socket".into(), val()?)),
            "--root-password-file" => {
                let f = val()?;
                let p = std::fs::read_to_string(&f).with_context(|| format!("reading {f}"))?;
                opts.root_password = Some(p.trim_end_matches(['\n', '\r']).to_owned());
            }
            "--config" => {
                let f = val()?;
                let text = std::fs::read_to_string(&f).with_context(|| format!("reading {f}"))?;
                for line in text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                {
                    let (k, v) = line
                        .split_once('=')
                        .with_context(|| format!("{f}: bad line {line:?}"))?;
                    // Command-line options win: config entries go first.
                    settings.insert(0, (k.trim().into(), v.trim().trim_matches('"').into()));
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown option {other}\n{USAGE}"),
        }
        i += 1;
    }
    for (k, v) in settings {
        match k.as_str() {
            "state-dir" => opts.state_dir = v.into(),
            "listen" => {
                opts.listen = if v == "none" {
                    None
                } else {
                    Some(
                        v.parse()
                            .with_context(|| format!("bad listen address {v}"))?,
                    )
                }
            }
            "tls-listen" => {
                opts.tls_listen = if v == "none" {
                    None
                } else {
                    Some(
                        v.parse()
                            .with_context(|| format!("bad tls-listen address {v}"))?,
                    )
                }
            }
            "session-timeout-secs" => {
                opts.config.session_timeout = std::time::Duration::from_secs(v.parse()?)
            }
            "max-sessions-per-user" => opts.config.max_sessions_per_user = v.parse()?,
            "login-failures-per-minute" => opts.config.login_failures_per_minute = v.parse()?,
            "failed-login-delay-ms" => {
                opts.config.failed_login_delay = std::time::Duration::from_millis(v.parse()?)
            }
            "host-driver" => opts.config.host_driver = v,
            "accel" => opts.config.accel = v,
            "qemu-binary" => opts.config.qemu_binary = v,
            "clean-shutdown-timeout-secs" => {
                opts.config.clean_shutdown_timeout = std::time::Duration::from_secs(v.parse()?)
            }
            "local-sr-device" => opts.config.local_sr_device = Some(v),
            "xapi-socket" => opts.config.extra_unix_sockets.push(v.into()),
            "http-idle-timeout-secs" => opts.config.limits.idle = secs(&v)?,
            "http-request-timeout-secs" => opts.config.limits.request = secs(&v)?,
            "tls-handshake-timeout-secs" => opts.config.limits.tls_handshake = secs(&v)?,
            "max-connections" => opts.config.limits.max_connections = v.parse()?,
            "max-connections-per-source" => opts.config.limits.max_per_source = v.parse()?,
            "boot-dirs" => {
                opts.config.boot_dirs = v
                    .split(':')
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
                    .collect()
            }
            other => bail!("unknown setting {other}"),
        }
    }
    make_private(&opts.state_dir)?;
    // Absolute from here on: SR locations under it must be (device-config
    // paths are checked to be absolute).
    opts.state_dir = std::fs::canonicalize(&opts.state_dir)
        .with_context(|| format!("resolving {}", opts.state_dir.display()))?;
    init_logging(&opts.state_dir)?;
    limit_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(opts))?;
    // Shut down without tearing the runtime down: tasks that
    // `block_in_place` moved onto blocking threads would otherwise run on
    // against a runtime that is going (everything durable is on disk by
    // now, as after a kill -9).
    std::process::exit(0)
}

/// glibc gives every thread that allocates its own arena and keeps freed
/// memory in it; under many concurrent requests corrald's RSS then grows far
/// beyond its live data. Two arenas and a periodic trim keep RSS close to
/// what the tables need (see docs/benchmarks.md).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        // A fixed threshold: big blocks (argon2's 19 MiB per login, large
        // replies) are mapped and unmapped, never left in an arena, where
        // glibc's sliding threshold would keep one per arena and thread.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        // Fixing the mmap threshold also fixes the trim threshold at its
        // 128 KiB default, which would shrink and regrow the heap on every
        // request; the periodic malloc_trim below returns free memory.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

/// Everything corrald (and the tools it runs) writes is its own: files
/// 0600 and directories 0700 whatever the caller's umask, and the state
/// directory and the files an older corrald left there made so too. The
/// database holds password hashes and SR secrets; images hold guests' data.
fn make_private(state_dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: umask(2) only sets this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", state_dir.display()))?;
    for f in [
        "pool.db",
        "pool.db-wal",
        "pool.db-shm",
        "corrald.log",
        "audit.log",
    ] {
        let p = state_dir.join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

fn init_logging(dir: &std::path::Path) -> anyhow::Result<()> {
    use corral_server::core::logfile::{KEEP, MAX_BYTES, RotatingFile};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let file = RotatingFile::open(&dir.join("corrald.log"), MAX_BYTES, KEEP)?;
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("CORRAL_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(Mutex::new(file)),
        )
        .init();
    Ok(())
}
