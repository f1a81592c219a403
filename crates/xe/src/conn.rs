//! Connections to the server: the local unix socket, TCP, or TLS without certificate verification (as XenServer's xe).

use crate::die;
use crate::opts::Opts;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

pub(crate) const DEFAULT_SOCKET: &str = "/var/lib/corral/xapi.sock";

/// How long xe waits for a TCP connection, and for the server's greeting.
pub(crate) const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) trait Stream: Read + Write {
    /// Bounds blocking reads (the console proxy polls the keyboard between).
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
}

impl Stream for TcpStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, d)
    }
}

impl Stream for UnixStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, d)
    }
}

impl Stream for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(d)
    }
}

#[derive(Debug)]
pub(crate) struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub(crate) fn connect(o: &Opts) -> Box<dyn Stream> {
    // A named server is always contacted, with the credentials given;
    // the local socket is only for commands that name none.
    let Some(server) = o.server.as_deref() else {
        let path = std::env::var("CORRAL_XAPI_SOCKET").unwrap_or_else(|_| DEFAULT_SOCKET.into());
        let s = UnixStream::connect(&path).unwrap_or_else(|e| {
            die(&format!(
                "Unable to contact the local toolstack at {path}: {e}"
            ))
        });
        return Box::new(s);
    };
    let port = o.port.unwrap_or(if o.nossl { 80 } else { 443 });
    let host = server.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .unwrap_or_else(|e| die(&format!("Unable to contact server {server}:{port}: {e}")))
        .collect();
    let tcp = addrs
        .iter()
        .find_map(|a| TcpStream::connect_timeout(a, CONNECT_TIMEOUT).ok())
        .unwrap_or_else(|| die(&format!("Unable to contact server {server}:{port}")));
    if o.nossl {
        return Box::new(tcp);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| die(&format!("TLS setup failed: {e}")))
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| die("Bad server name"));
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name)
        .unwrap_or_else(|e| die(&format!("TLS setup failed: {e}")));
    Box::new(rustls::StreamOwned::new(conn, tcp))
}

/// Stops with a message naming the port when `e` is the greeting timeout.
pub(crate) fn no_answer(o: &Opts, e: &std::io::Error) {
    if matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) {
        let server = o.server.as_deref().unwrap_or("the local toolstack");
        let port = o.port.unwrap_or(if o.nossl { 80 } else { 443 });
        die(&format!(
            "No answer from {server} port {port} within {} s: {}",
            greeting_timeout().as_secs_f64(),
            if o.nossl {
                "is it an HTTPS port? (drop --nossl)"
            } else {
                "is it a plain HTTP port? (use --nossl)"
            }
        ));
    }
}

pub(crate) const GREETING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// [`GREETING_TIMEOUT`], or `$CORRAL_XE_TIMEOUT` seconds.
pub(crate) fn greeting_timeout() -> std::time::Duration {
    std::env::var("CORRAL_XE_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .map(std::time::Duration::from_secs_f64)
        .unwrap_or(GREETING_TIMEOUT)
}

pub(crate) fn read_head(conn: &mut dyn Stream) -> Result<(u32, Option<u64>), String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut b).map_err(|e| e.to_string())? == 0 {
            return Err("the server closed the connection".into());
        }
        head.push(b[0]);
        if head.len() > 65536 {
            return Err("response header too large".into());
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("bad HTTP response")?;
    let len = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    });
    Ok((status, len))
}
