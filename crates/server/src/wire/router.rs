//! One HTTP connection: heads, limits, and the endpoint each request goes to.

use crate::context::Server;
use crate::core::call::{Caller, Origin};
use crate::dispatch::Reply;
use crate::wire::http::{MAX_CLI_BODY, MAX_RPC_BODY, error_page, refuse, write_simple};
use crate::wire::rpc::{Envelope, stream_all_records};
use corral_model::errors;
use corral_model::http::{MAX_HEAD, find_head_end, parse_head};
use corral_model::{jsonrpc, xmlrpc};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};

/// Serves one connection until it closes.
pub async fn serve<S>(server: Arc<Server>, mut stream: S, origin: Origin)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let limits = server.config.limits.clone();
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        // Read the head: the first byte within the idle time, the rest (and
        // any RPC body) within the request time.
        let mut deadline = Instant::now() + limits.idle;
        let head_len = loop {
            if let Some(n) = find_head_end(&buf) {
                break Some(n).filter(|n| *n <= MAX_HEAD);
            }
            if buf.len() > MAX_HEAD {
                break None;
            }
            let mut chunk = [0u8; 8192];
            let want = (MAX_HEAD + 4 - buf.len()).min(chunk.len());
            match timeout_at(deadline, stream.read(&mut chunk[..want])).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(n)) => {
                    if buf.is_empty() {
                        deadline = Instant::now() + limits.request;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
        };
        let Some(head_len) = head_len else {
            refuse(&mut stream, "431 Request Header Fields Too Large").await;
            return;
        };
        // One unambiguous framing or none: a second Content-Length, a sign,
        // or Transfer-Encoding beside Content-Length could make a proxy in
        // front of us see other requests than we do.
        let Some((req, content_length)) =
            parse_head(&buf[..head_len]).and_then(|r| r.content_length().ok().map(|l| (r, l)))
        else {
            refuse(&mut stream, "400 Bad Request").await;
            return;
        };
        buf.drain(..head_len);
        let limit = if req.path == "/cli" {
            MAX_CLI_BODY
        } else {
            MAX_RPC_BODY
        };
        let keep_alive = req.keep_alive();

        if req.method == "OPTIONS" {
            let allow = req.header("access-control-request-headers").unwrap_or("");
            let extra = format!(
                "Access-Control-Allow-Methods: PUT\r\nAccess-Control-Allow-Headers: {}{}X-Requested-With\r\n",
                allow,
                if allow.is_empty() { "" } else { ", " }
            );
            // The generic writer already sends one Allow-Headers; send a bare reply instead.
            let head = format!(
                "HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\n{extra}Content-Length: 0\r\nConnection: {}\r\n\r\n",
                if keep_alive { "keep-alive" } else { "close" }
            );
            if stream.write_all(head.as_bytes()).await.is_err() || !keep_alive {
                return;
            }
            continue;
        }

        // Disk transfers stream their bodies; they never enter `buf` whole.
        if req.method == "PUT" && req.path == "/import_raw_vdi" {
            let pending = std::mem::take(&mut buf);
            crate::wire::transfer::import(Arc::clone(&server), &mut stream, &req, pending).await;
            return;
        }
        if req.method == "CONNECT" && req.path == "/console" {
            let pending = std::mem::take(&mut buf);
            crate::wire::console::connect(Arc::clone(&server), &mut stream, &req, pending).await;
            return;
        }
        if req.method == "GET" && req.path == "/export_raw_vdi" {
            crate::wire::transfer::export(Arc::clone(&server), &mut stream, &req, origin.raw_fd)
                .await;
            return;
        }
        if req.method != "POST" {
            refuse(&mut stream, "403 Forbidden").await;
            return;
        }
        let Some(len) = content_length else {
            refuse(&mut stream, "411 Length Required").await;
            return;
        };
        if len > limit {
            refuse(&mut stream, "413 Payload Too Large").await;
            return;
        }
        while buf.len() < len {
            let mut chunk = vec![0u8; (len - buf.len()).min(65536)];
            match timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();

        if req.path == "/cli" || req.path.starts_with("/cli?") {
            crate::cli::serve::serve_cli(server, stream, origin, body).await;
            return;
        }
        let (status, ctype, out) = if req.path == "/jsonrpc" || req.path.starts_with("/jsonrpc/") {
            match jsonrpc::parse_call(&body) {
                Ok(call) => {
                    let caller = Caller {
                        origin,
                        originator: req.header("originator").map(str::to_owned),
                    };
                    let res = if call.method == "system.listMethods" {
                        Ok(Reply::Value(server.list_methods()))
                    } else {
                        server.call_reply(&call.method, call.params, &caller).await
                    };
                    let text = match res {
                        Ok(Reply::Value(v)) => jsonrpc::success(&v, &call.id, call.v2),
                        Ok(Reply::AllRecords(c)) => {
                            let envelope = Envelope::JsonRpc {
                                id: &call.id,
                                v2: call.v2,
                            };
                            match stream_all_records(
                                &server,
                                &mut stream,
                                c,
                                envelope,
                                keep_alive,
                                req.http10,
                            )
                            .await
                            {
                                Ok(true) => continue,
                                _ => return,
                            }
                        }
                        Err(e) => jsonrpc::failure(&e, &call.id, call.v2),
                    };
                    ("200 OK", "application/json", text.into_bytes())
                }
                Err(e) => {
                    tracing::debug!(error = %e, "bad JSON-RPC request");
                    ("500 Internal Server Error", "text/html", error_page("500"))
                }
            }
        } else {
            match xmlrpc::parse_call(&body) {
                Ok(call) => {
                    let caller = Caller {
                        origin,
                        originator: req.header("originator").map(str::to_owned),
                    };
                    let text = if call.method == "system.listMethods" {
                        xmlrpc::bare(&server.list_methods())
                    } else {
                        match server.call_reply(&call.method, call.params, &caller).await {
                            Ok(Reply::Value(v)) => xmlrpc::success(&v),
                            Ok(Reply::AllRecords(c)) => {
                                match stream_all_records(
                                    &server,
                                    &mut stream,
                                    c,
                                    Envelope::XmlRpc,
                                    keep_alive,
                                    req.http10,
                                )
                                .await
                                {
                                    Ok(true) => continue,
                                    _ => return,
                                }
                            }
                            Err(e) => xmlrpc::failure(&e),
                        }
                    };
                    ("200 OK", "text/xml", text.into_bytes())
                }
                Err(e) if std::str::from_utf8(&body).is_err() => {
                    tracing::debug!(error = %e, "XML-RPC body is not UTF-8");
                    let err = errors::invalid_value("Invalid UTF-8 string in parameter", "");
                    ("200 OK", "text/xml", xmlrpc::failure(&err).into_bytes())
                }
                Err(e) => {
                    tracing::debug!(error = %e, "bad XML-RPC request");
                    ("500 Internal Server Error", "text/html", error_page("500"))
                }
            }
        };
        let ka = keep_alive && status.starts_with("200");
        if write_simple(&mut stream, status, ctype, &out, ka, "")
            .await
            .is_err()
            || !ka
        {
            return;
        }
    }
}
