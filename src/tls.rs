//! TLS material: certificate files given by the operator or a self-signed pair generated once and
//! reused, loaded into a rustls configuration whose certificate can be swapped while serving.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    ServerConfig,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, StoresServerSessions},
    sign::CertifiedKey,
};

use crate::config::{PassiveHost, TlsConfig};

/// File names of the generated pair inside `tls.generated_dir`.
pub const GENERATED_CERT: &str = "cert.pem";
pub const GENERATED_KEY: &str = "key.pem";

/// Failure to load or generate TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {path}: {source}: check tls.cert_file")]
    CertRead { path: PathBuf, source: io::Error },
    #[error("no PEM certificate found in {path}: tls.cert_file must hold a PEM chain (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("cannot read private key file {path}: {source}: check tls.key_file")]
    KeyRead { path: PathBuf, source: io::Error },
    #[error("no PEM private key found in {path}: tls.key_file must hold a PKCS#8, PKCS#1 or SEC1 PEM key")]
    NoKey { path: PathBuf },
    #[error("unsupported private key in {path}: {reason}")]
    UnsupportedKey { path: PathBuf, reason: String },
    #[error("private key {key} does not match certificate {cert}: point tls.key_file at the key of this certificate")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "cannot store the generated certificate in {dir}: {source}: make tls.generated_dir writable, or set tls.cert_file and tls.key_file"
    )]
    Store { dir: PathBuf, source: io::Error },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Paths of the certificate and key, and whether ftpsd generated them.
#[derive(Debug, Clone)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// True when ftpsd generated the pair itself.
    pub generated: bool,
}

/// Returns the configured pair, or generates a self-signed one in `tls.generated_dir` on first use
/// and reuses it afterwards, so that a client that trusted it once keeps trusting it.
pub fn certificate_files(config: &TlsConfig, passive_host: &PassiveHost) -> Result<CertificateFiles, TlsError> {
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        return Ok(CertificateFiles {
            cert: cert.clone(),
            key: key.clone(),
            generated: false,
        });
    }

    let dir = &config.generated_dir;
    let cert = dir.join(GENERATED_CERT);
    let key = dir.join(GENERATED_KEY);
    if !(cert.is_file() && key.is_file()) {
        generate_self_signed(dir, &cert, &key, passive_host)?;
        tracing::info!(cert = %cert.display(), key = %key.display(), "generated a self-signed certificate");
    }
    Ok(CertificateFiles {
        cert,
        key,
        generated: true,
    })
}

fn generate_self_signed(dir: &Path, cert_path: &Path, key_path: &Path, passive_host: &PassiveHost) -> Result<(), TlsError> {
    let store_error = |source| TlsError::Store {
        dir: dir.to_path_buf(),
        source,
    };

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Ok(host) = gethostname::gethostname().into_string()
        && !host.is_empty()
    {
        names.push(host);
    }
    match passive_host {
        PassiveHost::Ip(ip) => names.push(ip.to_string()),
        PassiveHost::Dns(name) => names.push(name.clone()),
        PassiveHost::FromConnection => {}
    }
    names.dedup();

    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(names)?;

    fs::create_dir_all(dir).map_err(store_error)?;
    write_private(key_path, signing_key.serialize_pem().as_bytes()).map_err(store_error)?;
    fs::write(cert_path, cert.pem()).map_err(store_error)?;
    Ok(())
}

/// Writes a file readable by its owner only, so that a generated key is never world-readable.
fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// A loaded certificate chain and key, with the facts that logs and metrics report.
#[derive(Debug, Clone)]
pub struct LoadedCertificate {
    pub key: Arc<CertifiedKey>,
    /// Expiry of the leaf certificate.
    pub not_after: SystemTime,
    /// Hex serial number of the leaf certificate.
    pub serial: String,
    /// The certificate file it was read from.
    pub source: PathBuf,
}

/// Reads and checks a PEM certificate chain and its private key.
pub fn load_certificate(files: &CertificateFiles) -> Result<LoadedCertificate, TlsError> {
    let cert_bytes = fs::read(&files.cert).map_err(|source| TlsError::CertRead {
        path: files.cert.clone(),
        source,
    })?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::NoCertificate { path: files.cert.clone() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: files.cert.clone() });
    }

    let key_bytes = fs::read(&files.key).map_err(|source| TlsError::KeyRead {
        path: files.key.clone(),
        source,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| TlsError::NoKey { path: files.key.clone() })?;
    let signing_key = crypto_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|error| TlsError::UnsupportedKey {
            path: files.key.clone(),
            reason: error.to_string(),
        })?;

    let (not_after, serial) = leaf_facts(&chain[0]).ok_or_else(|| TlsError::NoCertificate { path: files.cert.clone() })?;

    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| TlsError::KeyMismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
    })?;

    Ok(LoadedCertificate {
        key: Arc::new(certified),
        not_after,
        serial,
        source: files.cert.clone(),
    })
}

fn leaf_facts(leaf: &CertificateDer<'_>) -> Option<(SystemTime, String)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let seconds = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
    Some((SystemTime::UNIX_EPOCH + Duration::from_secs(seconds), parsed.raw_serial_as_string()))
}

/// Serves the current certificate to every new TLS session; [`CertificateStore::replace`] swaps it
/// without touching sessions that already completed their handshake.
#[derive(Debug)]
pub struct CertificateStore {
    current: RwLock<Arc<LoadedCertificate>>,
}

impl CertificateStore {
    pub fn new(certificate: LoadedCertificate) -> Self {
        CertificateStore {
            current: RwLock::new(Arc::new(certificate)),
        }
    }

    /// Serves `certificate` to new TLS sessions from now on and returns the one it replaces.
    pub fn replace(&self, certificate: LoadedCertificate) -> Arc<LoadedCertificate> {
        // A poisoned lock only means a writer panicked mid-assignment of an Arc; the value is whole.
        let mut current = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::replace(&mut *current, Arc::new(certificate))
    }

    pub fn current(&self) -> Arc<LoadedCertificate> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }
}

/// Returns the *ring* provider, which builds into a static musl binary with a C compiler alone.
// NOTE: rustls 0.23.48 deprecates it for lacking post-quantum key exchange; switching to
// aws-lc-rs adds that but needs cmake in the image's build stage.
#[allow(deprecated)]
fn crypto_provider() -> rustls::crypto::CryptoProvider {
    ring::default_provider()
}

/// Builds the rustls configuration: TLS 1.2 and 1.3, no client certificates, and session
/// resumption that FTPS clients use to tie data connections to the control session.
pub fn server_config(store: Arc<CertificateStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(crypto_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.session_storage = Arc::new(SessionCache::new(1024));
    // No TLS 1.3 session tickets. The server sends them right after the handshake, and a client
    // that only writes on an upload data connection (curl, lftp) never reads them. Closing a
    // socket with unread data makes the kernel send RST instead of FIN, so the server loses the
    // end of the upload with "connection reset". TLS 1.2 clients still resume through the
    // session-ID cache above.
    config.send_tls13_tickets = 0;
    config.key_log = Arc::new(rustls::NoKeyLog {});
    Ok(Arc::new(config))
}

/// A TLS 1.2 session-ID cache whose `take` keeps the entry. rustls calls `take` on every
/// resumption, and a client that resumes the control connection's session for each data
/// connection needs the entry more than once. libunftp 0.24.0's own cache (src/server/tls.rs)
/// keeps entries for the same reason, and its comment names FileZilla as such a client.
#[derive(Debug)]
struct SessionCache {
    entries: std::sync::Mutex<std::collections::VecDeque<(Vec<u8>, Vec<u8>)>>,
    capacity: usize,
}

impl SessionCache {
    fn new(capacity: usize) -> Self {
        SessionCache {
            entries: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(capacity)),
            capacity,
        }
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.retain(|(existing, _)| *existing != key);
        if entries.len() == self.capacity {
            entries.pop_front();
        }
        entries.push_back((key, value));
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.iter().find(|(existing, _)| existing == key).map(|(_, value)| value.clone())
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.get(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_config(dir: &Path) -> TlsConfig {
        TlsConfig {
            generated_dir: dir.to_path_buf(),
            ..TlsConfig::default()
        }
    }

    #[test]
    fn generated_pair_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let config = tls_config(dir.path());

        let first = certificate_files(&config, &PassiveHost::FromConnection).unwrap();
        let first_serial = load_certificate(&first).unwrap().serial;
        let second = certificate_files(&config, &PassiveHost::FromConnection).unwrap();
        let second_serial = load_certificate(&second).unwrap().serial;

        assert!(first.generated);
        assert_eq!(first_serial, second_serial);
        use std::os::unix::fs::PermissionsExt;
        let key_mode = fs::metadata(&first.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        let first = certificate_files(&tls_config(one.path()), &PassiveHost::FromConnection).unwrap();
        let second = certificate_files(&tls_config(two.path()), &PassiveHost::FromConnection).unwrap();

        let mixed = CertificateFiles {
            cert: first.cert.clone(),
            key: second.key.clone(),
            generated: false,
        };
        let error = load_certificate(&mixed).err().unwrap();
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error}");
        assert!(error.to_string().contains(&second.key.display().to_string()));
    }

    #[test]
    fn replace_serves_the_new_certificate() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        let first = load_certificate(&certificate_files(&tls_config(one.path()), &PassiveHost::FromConnection).unwrap()).unwrap();
        let second = load_certificate(&certificate_files(&tls_config(two.path()), &PassiveHost::FromConnection).unwrap()).unwrap();
        let (first_serial, second_serial) = (first.serial.clone(), second.serial.clone());

        let store = CertificateStore::new(first);
        let previous = store.replace(second);

        assert_eq!(previous.serial, first_serial);
        assert_eq!(store.current().serial, second_serial);
    }

    #[test]
    fn missing_and_garbage_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        fs::write(&garbage, "not a certificate").unwrap();
        let missing = dir.path().join("missing.pem");

        let error = load_certificate(&CertificateFiles {
            cert: missing.clone(),
            key: garbage.clone(),
            generated: false,
        })
        .err()
        .unwrap();
        assert!(error.to_string().contains("missing.pem"), "{error}");

        let error = load_certificate(&CertificateFiles {
            cert: garbage.clone(),
            key: garbage.clone(),
            generated: false,
        })
        .err()
        .unwrap();
        assert!(error.to_string().contains("garbage.pem"), "{error}");
    }
}
