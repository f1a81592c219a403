//! HTTP framing helpers shared by the endpoints.

pub use corral_model::http::Request;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// XAPI's `http_limit_max_rpc_size`.
pub const MAX_RPC_BODY: usize = 300 * 1024;

/// XAPI's limit for CLI bodies.
pub const MAX_CLI_BODY: usize = 200 * 1024;

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

/// Answers with an error page and closes (the caller returns).
pub(crate) async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, status: &str) {
    let code = status.split(' ').next().unwrap_or(status);
    let _ = write_simple(s, status, "text/html", &error_page(code), false, "").await;
}

pub(crate) fn error_page(code: &str) -> Vec<u8> {
    format!("<html><body><h1>HTTP {code}</h1></body></html>").into_bytes()
}
