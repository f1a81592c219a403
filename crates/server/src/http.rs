//! A small HTTP/1.x server: one stack for XML-RPC, JSON-RPC, the `xe`
//! thin-CLI protocol (which answers without an HTTP status line) and, later,
//! streamed transfers and `CONNECT` consoles. Connections are generic over
//! the transport so TCP, TLS and the unix socket share it.

use crate::api::{Caller, Reply, Server};
use corral_model::{ApiError, jsonrpc, xmlrpc};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// XAPI's `http_limit_max_rpc_size`.
pub const MAX_RPC_BODY: usize = 300 * 1024;
/// XAPI's limit for CLI bodies.
pub const MAX_CLI_BODY: usize = 200 * 1024;
const MAX_HEAD: usize = 16 * 1024;

pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub http10: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn keep_alive(&self) -> bool {
        match self.header("connection") {
            Some(v) if v.eq_ignore_ascii_case("close") => false,
            Some(v) if v.eq_ignore_ascii_case("keep-alive") => true,
            _ => !self.http10,
        }
    }
}

/// Where a connection came from.
#[derive(Clone, Copy, Debug)]
pub struct Origin {
    pub addr: Option<IpAddr>,
    /// The unix socket: callers are the local superuser.
    pub local_root: bool,
    /// The connection's socket when it carries plain HTTP (not TLS), so
    /// bulk transfers can splice into it without copying through memory.
    pub raw_fd: Option<i32>,
}

pub async fn write_simple<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: &str,
    ctype: &str,
    body: &[u8],
    keep_alive: bool,
    extra: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nAccess-Control-Allow-Origin: *\r\nAccess-Control-Allow-Headers: X-Requested-With\r\nConnection: {}\r\n{extra}\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    if body.len() > 64 * 1024 {
        // Large replies are not copied behind the head.
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
    } else {
        let mut buf = Vec::with_capacity(head.len() + body.len());
        buf.extend_from_slice(head.as_bytes());
        buf.extend_from_slice(body);
        s.write_all(&buf).await?;
    }
    s.flush().await
}

fn error_page(code: &str) -> Vec<u8> {
    format!("<html><body><h1>HTTP {code}</h1></body></html>").into_bytes()
}

/// Serves one connection until it closes.
pub async fn serve<S>(server: Arc<Server>, mut stream: S, origin: Origin)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        // Read the head.
        let head_len = loop {
            if let Some(n) = find_head_end(&buf) {
                break n;
            }
            if buf.len() > MAX_HEAD {
                let _ = write_simple(
                    &mut stream,
                    "431 Request Header Fields Too Large",
                    "text/html",
                    &error_page("431"),
                    false,
                    "",
                )
                .await;
                return;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let req = match parse_head(&buf[..head_len]) {
            Some(r) => r,
            None => {
                let _ = write_simple(
                    &mut stream,
                    "400 Bad Request",
                    "text/html",
                    &error_page("400"),
                    false,
                    "",
                )
                .await;
                return;
            }
        };
        buf.drain(..head_len);
        let limit = if req.path == "/cli" {
            MAX_CLI_BODY
        } else {
            MAX_RPC_BODY
        };
        let content_length = req
            .header("content-length")
            .and_then(|v| v.trim().parse::<usize>().ok());
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
            crate::transfer::import(Arc::clone(&server), &mut stream, &req, pending).await;
            return;
        }
        if req.method == "CONNECT" && req.path == "/console" {
            let pending = std::mem::take(&mut buf);
            crate::console::connect(Arc::clone(&server), &mut stream, &req, pending).await;
            return;
        }
        if req.method == "GET" && req.path == "/export_raw_vdi" {
            crate::transfer::export(Arc::clone(&server), &mut stream, &req, origin.raw_fd).await;
            return;
        }
        if req.method != "POST" {
            let _ = write_simple(
                &mut stream,
                "403 Forbidden",
                "text/html",
                &error_page("403"),
                false,
                "",
            )
            .await;
            return;
        }
        let Some(len) = content_length else {
            let _ = write_simple(
                &mut stream,
                "411 Length Required",
                "text/html",
                &error_page("411"),
                false,
                "",
            )
            .await;
            return;
        };
        if len > limit {
            let _ = write_simple(
                &mut stream,
                "413 Payload Too Large",
                "text/html",
                &error_page("413"),
                false,
                "",
            )
            .await;
            return;
        }
        while buf.len() < len {
            let mut chunk = vec![0u8; (len - buf.len()).min(65536)];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();

        if req.path == "/cli" || req.path.starts_with("/cli?") {
            crate::cli::serve_cli(server, stream, origin, body).await;
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
                            let text = jsonrpc::success_with(
                                &call.id,
                                call.v2,
                                server.records_size_hint(c),
                                |out| server.write_all_records(c, true, out),
                            );
                            server.note_records_size(c, text.len());
                            text
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
                                let text =
                                    xmlrpc::success_with(server.records_size_hint(c), |out| {
                                        server.write_all_records(c, false, out)
                                    });
                                server.note_records_size(c, text.len());
                                text
                            }
                            Err(e) => xmlrpc::failure(&e),
                        }
                    };
                    ("200 OK", "text/xml", text.into_bytes())
                }
                Err(e) if std::str::from_utf8(&body).is_err() => {
                    tracing::debug!(error = %e, "XML-RPC body is not UTF-8");
                    let err =
                        ApiError::new("INVALID_VALUE", ["Invalid UTF-8 string in parameter", ""]);
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

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn parse_head(head: &[u8]) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Request::new(&mut headers);
    match r.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let target = r.path?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target.to_owned(), String::new()),
    };
    Some(Request {
        method: r.method?.to_owned(),
        path,
        query,
        headers: r
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        http10: r.version == Some(0),
    })
}
