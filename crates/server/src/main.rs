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
                           start's 'Local storage' SR)
  --root-password-file F   root's password on first start (or CORRAL_ROOT_PASSWORD)
The unix socket <state-dir>/xapi.sock is always served; its callers are root.";

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
            other => bail!("unknown setting {other}"),
        }
    }
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("creating {}", opts.state_dir.display()))?;
    init_logging(&opts.state_dir)?;
    limit_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(opts))
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
    }
}

fn init_logging(dir: &std::path::Path) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("corrald.log"))?;
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("CORRAL_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(Mutex::new(file)),
        )
        .init();
    Ok(())
}
