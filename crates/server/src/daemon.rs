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

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let server = build(&opts)?;
    crate::storage::startup(&server)
        .await
        .map_err(|e| anyhow::anyhow!("storage start-up: {e}"))?;
    crate::init::record_host_driver(&server);
    crate::vm::startup(&server)
        .await
        .map_err(|e| anyhow::anyhow!("VM start-up: {e}"))?;
    let sock_path = opts.state_dir.join("xapi.sock");
    let _ = std::fs::remove_file(&sock_path);
    let unix = UnixListener::bind(&sock_path)
        .with_context(|| format!("binding {}", sock_path.display()))?;
    {
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = unix.accept().await else {
                    continue;
                };
                let server = Arc::clone(&server);
                let raw_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&s));
                tokio::spawn(serve(
                    server,
                    s,
                    Origin {
                        addr: None,
                        local_root: true,
                        raw_fd,
                    },
                ));
            }
        });
    }
    if let Some(addr) = opts.listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(%addr, "serving HTTP");
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = l.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let server = Arc::clone(&server);
                let raw_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&s));
                tokio::spawn(serve(
                    server,
                    s,
                    Origin {
                        addr: Some(peer.ip()),
                        local_root: false,
                        raw_fd,
                    },
                ));
            }
        });
    }
    if let Some(addr) = opts.tls_listen {
        let names = vec![
            crate::init::hostname(),
            crate::init::primary_address(),
            "localhost".into(),
        ];
        let cfg = crate::tls::server_config(&opts.state_dir, names)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(%addr, "serving HTTPS");
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = l.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let server = Arc::clone(&server);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(s).await {
                        serve(
                            server,
                            tls,
                            Origin {
                                addr: Some(peer.ip()),
                                local_root: false,
                                raw_fd: None,
                            },
                        )
                        .await;
                    }
                });
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
