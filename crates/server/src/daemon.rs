//! Wiring: open the database, make the listeners, serve until SIGTERM.

use crate::context::Server;
use crate::core::call::Origin;
use crate::core::config::Config;
use crate::wire::listen::{bind_private_socket, pause_after_accept_error, refused, serve_tcp};
use crate::wire::router::serve;
use anyhow::Context;
use corral_db::Db;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;

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
        Arc::new(db),
        id.host_ref,
        id.pool_ref,
        opts.config.clone(),
        opts.state_dir.clone(),
        crate::drivers::make_drivers(&opts.config, &opts.state_dir)?,
        crate::dispatch::registry::table(),
    ))
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let server = build(&opts)?;
    // Made now, so the first unknown user name costs no more than later ones.
    tokio::task::spawn_blocking(|| crate::auth::passwords::decoy_hash());
    crate::ops::sr::startup(&server)
        .await
        .map_err(|e| anyhow::anyhow!("storage start-up: {e}"))?;
    crate::ops::host::record_host_driver(&server);
    crate::ops::pif::startup(&server).await;
    crate::ops::vm::startup::startup(&server)
        .await
        .map_err(|e| anyhow::anyhow!("VM start-up: {e}"))?;
    crate::ops::vdi::snapshot::finish_interrupted_switches(&server).await;
    // Last: the marks of this host's dead tasks were cleared above.
    server.forget_dead_tasks();
    // <state-dir>/xapi.sock always; more where asked (the system unit adds
    // XAPI's /var/lib/xcp/xapi, which xenserver_facts and other local tools
    // know).
    let mut sockets = vec![opts.state_dir.join("xapi.sock")];
    sockets.extend(server.config.extra_unix_sockets.iter().cloned());
    for path in &sockets {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        serve_unix(Arc::clone(&server), bind_private_socket(path)?);
    }
    // Both TCP listeners speak TLS; the plain one also plain HTTP, told
    // apart by the first byte (a TLS handshake record starts with 0x16).
    let acceptor = match opts.tls_listen.or(opts.listen) {
        Some(_) => {
            let names = vec![
                crate::init::host_facts::hostname(),
                crate::init::host_facts::primary_address(),
                "localhost".into(),
            ];
            let cert = crate::core::tls::HostCert::open(&opts.state_dir, names)?;
            let _ = server.tls_cert.set(Arc::clone(&cert));
            Some(tokio_rustls::TlsAcceptor::from(
                crate::core::tls::server_config(cert)?,
            ))
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
    for path in &sockets {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Serves the local superuser's socket: every caller is root.
fn serve_unix(server: Arc<Server>, unix: tokio::net::UnixListener) {
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
