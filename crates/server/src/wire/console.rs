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
        let _ = write_simple(
            stream,
            "401 Unauthorized",
            "text/plain",
            b"invalid session",
            false,
            "",
        )
        .await;
        return;
    };
    if !info.role.allows(Role::VmOperator) {
        let _ = write_simple(
            stream,
            "403 Forbidden",
            "text/plain",
            b"RBAC_PERMISSION_DENIED",
            false,
            "",
        )
        .await;
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
            )
        })
    };
    let Some((proto, vm_uuid)) = target else {
        let _ = write_simple(
            stream,
            "404 Not Found",
            "text/plain",
            b"no such console",
            false,
            "",
        )
        .await;
        return;
    };
    if proto == "rfb" {
        let sock = server.agent.vnc_socket(&vm_uuid);
        let Some(Ok(mut vnc)) = (match sock {
            Some(p) => Some(tokio::net::UnixStream::connect(p).await),
            None => None,
        }) else {
            let _ = write_simple(
                stream,
                "404 Not Found",
                "text/plain",
                b"VM has no display",
                false,
                "",
            )
            .await;
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
    let Ok(mut con) = server.agent.serial(&vm_uuid) else {
        let _ = write_simple(
            stream,
            "404 Not Found",
            "text/plain",
            b"VM is not running",
            false,
            "",
        )
        .await;
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
