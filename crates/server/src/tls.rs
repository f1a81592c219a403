//! The host's TLS certificate: self-signed, made on first start, kept in
//! `<state-dir>/tls/`.

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

pub fn server_config(
    state_dir: &Path,
    names: Vec<String>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let dir = state_dir.join("tls");
    let cert_path = dir.join("server.crt");
    let key_path = dir.join("server.key");
    if !cert_path.exists() || !key_path.exists() {
        std::fs::create_dir_all(&dir)?;
        let ck =
            rcgen::generate_simple_self_signed(names).context("generating the host certificate")?;
        std::fs::write(&cert_path, ck.cert.pem())?;
        write_private(&key_path, ck.signing_key.serialize_pem().as_bytes())?;
        tracing::info!(path = %cert_path.display(), "generated self-signed host certificate");
    }
    let cert_pem = std::fs::read(&cert_path)?;
    let key_pem = std::fs::read(&key_path)?;
    let certs: Vec<CertificateDer<'static>> = pem_blocks(&cert_pem, "CERTIFICATE")
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key_der = pem_blocks(&key_pem, "PRIVATE KEY")
        .into_iter()
        .next()
        .context("no private key in server.key")?;
    let key = PrivateKeyDer::Pkcs8(key_der.into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// Extracts the DER bodies of PEM blocks with the given label suffix.
fn pem_blocks(pem: &[u8], label: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    let text = String::from_utf8_lossy(pem);
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with("-----BEGIN ") && l.ends_with(&format!("{label}-----")) {
            cur = Some(String::new());
        } else if l.starts_with("-----END ") {
            if let Some(b) = cur.take() {
                if let Ok(d) = base64::engine::general_purpose::STANDARD.decode(b) {
                    out.push(d);
                }
            }
        } else if let Some(b) = cur.as_mut() {
            b.push_str(l);
        }
    }
    out
}
