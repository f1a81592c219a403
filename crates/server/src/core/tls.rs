//! The host's TLS certificate: self-signed, made on first start (valid for
//! ten years, as XAPI's, with the host name as its subject), kept in
//! `<state-dir>/tls/` and replaced by `host.refresh_server_certificate`
//! without a restart: connections after that see the new one.

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// How long a generated certificate is valid (XAPI: ten years).
pub(crate) const VALID_YEARS: i32 = 10;

/// The certificate served, and where it lives.
#[derive(Debug)]
pub struct HostCert {
    dir: PathBuf,
    names: Vec<String>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for HostCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| Arc::clone(&c))
    }
}

impl HostCert {
    /// Loads the certificate, making one first if there is none.
    pub fn open(state_dir: &Path, names: Vec<String>) -> anyhow::Result<Arc<HostCert>> {
        let dir = state_dir.join("tls");
        if !dir.join("server.crt").exists() || !dir.join("server.key").exists() {
            generate(&dir, &names)?;
        }
        let key = match load(&dir) {
            Ok(k) => k,
            Err(e) => {
                // A pair cut short by a crash, or edited by hand.
                tracing::warn!(error = %e, "host certificate unusable: making a new one");
                generate(&dir, &names)?;
                load(&dir)?
            }
        };
        let current = RwLock::new(key);
        Ok(Arc::new(HostCert {
            dir,
            names,
            current,
        }))
    }

    /// A new key and certificate, written and served from now on.
    pub fn refresh(&self) -> anyhow::Result<()> {
        generate(&self.dir, &self.names)?;
        let key = load(&self.dir)?;
        if let Ok(mut c) = self.current.write() {
            *c = key;
        }
        Ok(())
    }
}

pub fn server_config(cert: Arc<HostCert>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    Ok(Arc::new(cfg))
}

pub(crate) fn generate(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).context("certificate names")?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_else(|| "localhost".into()),
    );
    params.distinguished_name = dn;
    let (y, m, d) = today();
    params.not_before = rcgen::date_time_ymd(y, m, d);
    // 28 February exists in every year.
    params.not_after = rcgen::date_time_ymd(y + VALID_YEARS, m, d.min(28));
    let key = rcgen::KeyPair::generate().context("generating the host key")?;
    let cert = params
        .self_signed(&key)
        .context("signing the host certificate")?;
    // Key first, then the certificate (a crash between leaves a pair
    // that does not match; `load` refuses it and start-up makes a new one).
    write_private(&dir.join("server.key.new"), key.serialize_pem().as_bytes())?;
    write_private(&dir.join("server.crt.new"), cert.pem().as_bytes())?;
    std::fs::rename(dir.join("server.key.new"), dir.join("server.key"))?;
    std::fs::rename(dir.join("server.crt.new"), dir.join("server.crt"))?;
    tracing::info!(path = %dir.join("server.crt").display(), "generated self-signed host certificate");
    Ok(())
}

/// Today's (year, month, day) in UTC.
pub(crate) fn today() -> (i32, u8, u8) {
    let d = corral_model::date::format(corral_model::date::now_secs());
    let num = |r: std::ops::Range<usize>| d.get(r).and_then(|s| s.parse::<u16>().ok());
    let small = |r, default| num(r).and_then(|n| u8::try_from(n).ok()).unwrap_or(default);
    (
        num(0..4).map(i32::from).unwrap_or(2026),
        small(4..6, 1),
        small(6..8, 1),
    )
}

pub(crate) fn load(dir: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let cert_pem = std::fs::read(dir.join("server.crt"))?;
    let key_pem = std::fs::read(dir.join("server.key"))?;
    let certs: Vec<CertificateDer<'static>> = pem_blocks(&cert_pem, "CERTIFICATE")
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key_der = pem_blocks(&key_pem, "PRIVATE KEY")
        .into_iter()
        .next()
        .context("no private key in server.key")?;
    let key = PrivateKeyDer::Pkcs8(key_der.into());
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key)
        .context("loading the host key")?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match()
        .context("the host key does not match its certificate")?;
    Ok(Arc::new(ck))
}

pub(crate) fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Extracts the DER bodies of PEM blocks with the given label suffix.
pub(crate) fn pem_blocks(pem: &[u8], label: &str) -> Vec<Vec<u8>> {
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
