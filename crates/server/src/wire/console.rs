//! Consoles over XAPI-style HTTP CONNECT: `CONNECT /console?uuid=<console
//! uuid>&session_id=<session> HTTP/1.0` (the path of a `console.location`),
//! answered `200 OK`, then the raw stream both ways. A `vt100` console first
//! replays the VM's recent serial output, then follows it live; an `rfb`
//! console is QEMU's VNC server.

use crate::context::Server;
use crate::wire::http::write_simple;
use crate::wire::query::query_param;
use corral_model::http::Request;
use corral_model::schema::{Role, class, field};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub async fn connect<S>(server: Arc<Server>, stream: &mut S, req: &Request, pending: Vec<u8>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let q = &req.query;
    let session = query_param(q, "session_id").unwrap_or_default();
    let Ok(info) = server.sessions.check(&server, &session) else {
        refuse(stream, "401 Unauthorized", b"invalid session").await;
        return;
    };
    if !info.role.allows(Role::VmOperator) {
        refuse(stream, "403 Forbidden", b"RBAC_PERMISSION_DENIED").await;
        return;
    }
    let target = {
        let st = server.db.read();
        let console = query_param(q, "ref")
            .filter(|r| st.exists(class::CONSOLE, r))
            .or_else(|| {
                query_param(q, "uuid").and_then(|u| st.by_uuid(class::CONSOLE, &u).cloned())
            });
        console.map(|c| {
            let vm = st.get_str(field::console::VM, &c).unwrap_or_default();
            (
                st.get_str(field::console::PROTOCOL, &c).unwrap_or_default(),
                st.get_str(field::vm::UUID, &vm).unwrap_or_default(),
                st.get_str(field::vm::RESIDENT_ON, &vm)
                    .filter(|h| st.exists(class::HOST, h)),
            )
        })
    };
    // The console is served by the host the VM runs on.
    let Some((proto, vm_uuid, host)) = target else {
        refuse(stream, "404 Not Found", b"no such console").await;
        return;
    };
    let host = match host.map(|h| server.host(&h)) {
        Some(Ok(h)) => h,
        Some(Err(_)) => {
            return refuse(stream, "503 Service Unavailable", b"CANNOT_CONTACT_HOST").await;
        }
        None => return refuse(stream, "404 Not Found", b"VM is not running").await,
    };
    if proto == "rfb" {
        let sock = host.agent.vnc_socket(&vm_uuid);
        let Some(Ok(mut vnc)) = (match sock {
            Some(p) => Some(tokio::net::UnixStream::connect(p).await),
            None => None,
        }) else {
            refuse(stream, "404 Not Found", b"VM has no display").await;
            return;
        };
        if stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_err() {
            return;
        }
        if !pending.is_empty() && vnc.write_all(&pending).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(stream, &mut vnc).await;
        return;
    }
    let Ok(mut con) = host.agent.serial(&vm_uuid) else {
        refuse(stream, "404 Not Found", b"VM is not running").await;
        return;
    };
    if stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_err()
        || stream.write_all(&con.replay).await.is_err()
    {
        return;
    }
    if !pending.is_empty() {
        let _ = con.input.send(pending);
    }
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            out = con.output.recv() => match out {
                Ok(data) => {
                    if stream.write_all(&data).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                // The VM stopped: its console ends.
                Err(_) => return,
            },
            n = stream.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if con.input.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            },
        }
    }
}

/// Answers a console request that cannot be served, and ends it.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, status: &str, body: &[u8]) {
    let _ = write_simple(stream, status, "text/plain", body, false, "").await;
}
