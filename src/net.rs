//! Optional TLS for the agency–central link (rustls, with the `ring`
//! provider). Off unless the central has a certificate and key configured
//! and the agency a CA to verify it with; then personal data (names,
//! documents, birthdates, winners) never crosses the network in clear.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A byte stream the codec can run over: plain TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection as the handlers and the agency see it.
pub type BoxedIo = Box<dyn Io>;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file cannot be read or holds no usable PEM.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the material (a key that does not match, say).
    #[error("TLS setup: {0}")]
    Setup(#[from] rustls::Error),
    /// The server name to verify is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// The central's side: its certificate chain and key.
///
/// # Errors
/// The files cannot be read, or rustls refuses them.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The agency's side: trusts only the authorities in `ca`, and checks the
/// central's certificate against `server_name`.
///
/// # Errors
/// The CA file cannot be read, or the name is not valid.
pub fn connector(
    ca: &Path,
    server_name: &str,
) -> Result<(TlsConnector, ServerName<'static>), TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca)? {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

/// What to check when the central cannot be reached, by how connecting
/// failed: the agency's and the operator tools' messages end with it, so a
/// bare "Connection refused" never leaves an operator guessing.
pub(crate) fn unreachable_hint(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => {
            "nothing listens there: is the central running, and on this port? (its `listen` \
             log line shows its address)"
        }
        ErrorKind::TimedOut | ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
            "no answer from that host: is the address right, and the host reachable?"
        }
        _ => "is the address right?",
    }
}
