//! Wiring: open the database, make the listeners, serve until SIGTERM.

use crate::api::{Config, Server};
use crate::http::{Origin, serve};
use anyhow::Context;
use corral_db::Db;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};

#[derive(Clone, Debug)]
pub struct Options {
    pub state_dir: PathBuf,
    pub listen: Option<SocketAddr>,
    pub tls_listen: Option<SocketAddr>,
    pub root_password: Option<String>,
    pub config: Config,
}

/// Opens the state directory and builds the server (no listeners yet).
pub fn build(opts: &Options) -> anyhow::Result<Arc<Server>> {
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("creating {}", opts.state_dir.display()))?;
    // Where PV-kernel/PV-ramdisk files live unless boot-dirs says otherwise.
    let _ = std::fs::create_dir(opts.state_dir.join("boot"));
    let db = Db::open(&opts.state_dir.join("pool.db")).context("opening the pool database")?;
    let id = crate::init::ensure(&db, opts.root_password.clone())?;
    Ok(Server::new(
        db,
        id.host_ref,
        id.pool_ref,
        opts.config.clone(),
        opts.state_dir.clone(),
    ))
}

/// One TCP connection: TLS when it starts with a handshake (always, on the
/// TLS listener), plain HTTP otherwise.
async fn serve_tcp(
    server: Arc<Server>,
    s: tokio::net::TcpStream,
    peer: std::net::IpAddr,
    tls_only: bool,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) {
    let limits = server.config.limits.clone();
    let tls = tls_only || {
        let mut first = [0u8; 1];
        match tokio::time::timeout(limits.idle, s.peek(&mut first)).await {
            Ok(Ok(1)) => first[0] == 0x16,
            _ => return,
        }
    };
    let origin = Origin {
        addr: Some(peer),
        local_root: false,
        raw_fd: None,
    };
    if !tls {
        let raw_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&s));
        return serve(server, s, Origin { raw_fd, ..origin }).await;
    }
    let Some(acceptor) = acceptor else {
        tracing::warn!(%peer, "a TLS handshake on the plain HTTP port, and TLS is off: closed");
        return;
    };
    match tokio::time::timeout(limits.tls_handshake, acceptor.accept(s)).await {
        Ok(Ok(tls)) => serve(server, tls, origin).await,
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// A connection over the limits is closed at once; said in the log at most
/// once a second.
fn refused(peer: Option<std::net::IpAddr>) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if crate::logsafe::once_per(&LAST, 1) {
        tracing::warn!(peer = ?peer, "connection refused: too many connections");
    }
}

/// Out of file descriptors (or another accept error): wait instead of
/// spinning, since retrying at once fails the same way.
async fn pause_after_accept_error(e: &std::io::Error) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
    if crate::logsafe::once_per(&LAST, 10) {
        tracing::warn!(error = %e, "accept failed{}", if out_of_fds { " (out of file descriptors)" } else { "" });
    }
    let pause = if out_of_fds { 100 } else { 10 };
    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
}

/// The local superuser's socket, 0600 whatever the umask: it is bound in a
/// private (0700) directory and moved into place once its mode is set.
fn bind_private_socket(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let tmp_dir = dir.join(format!(".sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::create_dir(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
    std::fs::set_permissions(&tmp_dir, std::fs::Permissions::from_mode(0o700))?;
    let tmp = tmp_dir.join("xapi.sock");
    let bound = (|| -> anyhow::Result<UnixListener> {
        let l = UnixListener::bind(&tmp).with_context(|| format!("binding {}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        let _ = std::fs::remove_file(path);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("moving the socket to {}", path.display()))?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&tmp_dir);
    bound
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let server = build(&opts)?;
    // Made now, so the first unknown user name costs no more than later ones.
    tokio::task::spawn_blocking(|| crate::sessions::decoy_hash());
    crate::storage::startup(&server)
        .await
        .map_err(|e| anyhow::anyhow!("storage start-up: {e}"))?;
    crate::init::record_host_driver(&server);
    crate::vm::startup(&server)
        .await
        .map_err(|e| anyhow::anyhow!("VM start-up: {e}"))?;
    crate::storage::finish_interrupted_switches(&server).await;
    let sock_path = opts.state_dir.join("xapi.sock");
    let unix = bind_private_socket(&sock_path)?;
    {
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            loop {
                let s = match unix.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        pause_after_accept_error(&e).await;
                        continue;
                    }
                };
                let Some(permit) = server.conns.admit(None, &server.config.limits) else {
                    refused(None);
                    continue;
                };
                let server = Arc::clone(&server);
                let raw_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&s));
                tokio::spawn(async move {
                    let _permit = permit;
                    serve(
                        server,
                        s,
                        Origin {
                            addr: None,
                            local_root: true,
                            raw_fd,
                        },
                    )
                    .await
                });
            }
        });
    }
    // Both TCP listeners speak TLS; the plain one also plain HTTP, told
    // apart by the first byte (a TLS handshake record starts with 0x16).
    let acceptor = match opts.tls_listen.or(opts.listen) {
        Some(_) => {
            let names = vec![
                crate::init::hostname(),
                crate::init::primary_address(),
                "localhost".into(),
            ];
            let cert = crate::tls::HostCert::open(&opts.state_dir, names)?;
            let _ = server.tls_cert.set(Arc::clone(&cert));
            Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
                cert,
            )?))
        }
        None => None,
    };
    for (addr, tls_only) in [(opts.listen, false), (opts.tls_listen, true)] {
        let Some(addr) = addr else { continue };
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(%addr, "serving {}", if tls_only { "HTTPS" } else { "HTTP (and HTTPS)" });
        let server = Arc::clone(&server);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            loop {
                let (s, peer) = match l.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        pause_after_accept_error(&e).await;
                        continue;
                    }
                };
                let Some(permit) = server.conns.admit(Some(peer.ip()), &server.config.limits)
                else {
                    refused(Some(peer.ip()));
                    continue;
                };
                let _ = s.set_nodelay(true);
                let server = Arc::clone(&server);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    serve_tcp(server, s, peer.ip(), tls_only, acceptor).await
                });
            }
        });
    }
    {
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tick.tick().await;
                server.gc_tasks();
            }
        });
    }
    // Hand freed memory back to the kernel now and then (see main.rs on arenas).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(async {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tick.tick().await;
            // SAFETY: malloc_trim only releases free pages of the allocator.
            unsafe { libc::malloc_trim(0) };
        }
    });
    tracing::info!(state_dir = %opts.state_dir.display(), "corrald ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
    }
    let _ = std::fs::remove_file(&sock_path);
    Ok(())
}
