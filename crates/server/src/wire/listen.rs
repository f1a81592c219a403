//! Accept loops: unix socket, plain TCP (which also sniffs TLS) and TLS.

use crate::context::Server;
use crate::core::call::Origin;
use crate::wire::router::serve;
use anyhow::Context;
use std::sync::Arc;
use tokio::net::UnixListener;

/// One TCP connection: TLS when it starts with a handshake (always, on the
/// TLS listener), plain HTTP otherwise.
pub(crate) async fn serve_tcp(
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
pub(crate) fn refused(peer: Option<std::net::IpAddr>) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if crate::core::logsafe::once_per(&LAST, 1) {
        tracing::warn!(peer = ?peer, "connection refused: too many connections");
    }
}

/// Out of file descriptors (or another accept error): wait instead of
/// spinning, since retrying at once fails the same way.
pub(crate) async fn pause_after_accept_error(e: &std::io::Error) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
    if crate::core::logsafe::once_per(&LAST, 10) {
        tracing::warn!(error = %e, "accept failed{}", if out_of_fds { " (out of file descriptors)" } else { "" });
    }
    let pause = if out_of_fds { 100 } else { 10 };
    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
}

/// The local superuser's socket, 0600 whatever the umask: it is bound in a
/// private (0700) directory and moved into place once its mode is set.
pub(crate) fn bind_private_socket(path: &std::path::Path) -> anyhow::Result<UnixListener> {
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
