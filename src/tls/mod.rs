//! Optional TLS for the agency–central link (rustls, with the `ring`
//! provider). Off unless the central has a certificate and key configured
//! and the agency a CA to verify it with; then personal data (names,
//! documents, birthdates, winners) never crosses the network in clear.
//!
//! Three things beyond a plain TLS setup live here:
//!
//! - **Mutual TLS.** With `server.tls_client_ca` the central requires a
//!   client certificate signed by that authority, and the certificate names
//!   the agency: a DNS subject-alternative name `agency-N` ([`agency_of`]).
//!   The handler learns it as the connection's [`Identity`].
//! - **A wrong kind of peer is named.** The central looks at the first byte
//!   of a connection before its handshake ([`ServerTls::accept`]): one that
//!   is not a TLS handshake record gets a plain-text `TLS_REQUIRED` frame.
//!   The agency explains rustls's errors in terms of its settings
//!   ([`ClientTls::connect`]), before and after the handshake.
//! - **Pinning.** A certificate in `agency.tls_ca` that is byte-identical to
//!   the central's end-entity certificate is trusted as that certificate
//!   (within its validity period, and for its names), so a self-signed
//!   certificate can be given as its own authority ([`PinningVerifier`]).
//!
//! The parts: [`server`] (the central's acceptor), [`client`] (the agency's
//! and the operator tools' connector) and [`pinning`] (the verifier that
//! trusts a pinned certificate). TLS takes file paths and names, never a
//! component's settings: the agency and the central say which files.

mod client;
mod pinning;
mod server;

pub use client::{is_refusal, ClientTls};
pub use pinning::PinningVerifier;
pub use server::{Accepted, ServerTls};

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::model::AgencyId;

/// A byte stream the codec can run over: plain TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection as the handlers and the agency see it.
pub type BoxedIo = Box<dyn Io>;

/// How a client certificate names its agency: a DNS subject-alternative
/// name `agency-` followed by the agency's number, e.g. `agency-3`.
pub const AGENCY_NAME_PREFIX: &str = "agency-";

/// What a plain-text agency must set to reach a TLS central.
pub const SET_TLS_CA: &str = "set agency.tls_ca (CLI_TLS_CA) to the authority that signed \
                              the central's certificate (or to that certificate itself)";

/// What the agency says when it finds a TLS record where a frame header
/// should be.
pub fn central_speaks_tls() -> String {
    format!("the central speaks TLS: {SET_TLS_CA}")
}

/// The message of the `TLS_REQUIRED` answer to a plain-text client.
pub fn tls_required_message() -> String {
    format!("this central speaks only TLS: {SET_TLS_CA}")
}

/// What a TLS agency must change to reach a plain-text central.
const NO_TLS_FIX: &str =
    "clear agency.tls_ca (CLI_TLS_CA), or give the central server.tls_cert and server.tls_key";

/// The message of the `TLS_UNAVAILABLE` answer to a TLS client on a
/// plain-text central.
pub fn tls_unavailable_message() -> String {
    format!("this central does not speak TLS: {NO_TLS_FIX}")
}

/// Who a connection is, as far as TLS can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// No client certificate: plain TCP, or TLS without client
    /// authentication. Secrets (`HELLO`) decide who it may speak for.
    Anonymous,
    /// A client certificate verified against `server.tls_client_ca`, with
    /// the agency it names ([`agency_of`]); `None` when it names none (an
    /// operator's probe may still ask `PING` and `STATUS`).
    Certificate(Option<AgencyId>),
}

impl Identity {
    /// Whether the connection is authenticated as an agency by its
    /// certificate, needing no secret.
    pub fn certified_agency(self) -> Option<AgencyId> {
        match self {
            Identity::Certificate(agency) => agency,
            Identity::Anonymous => None,
        }
    }

    /// Why this connection may not speak for `agency`: under mutual TLS only
    /// the certificate's agency may be named. `None` when it may.
    pub fn refuses(self, agency: AgencyId) -> Option<String> {
        match self {
            Identity::Anonymous => None,
            Identity::Certificate(Some(certified)) if certified == agency => None,
            Identity::Certificate(Some(certified)) => Some(format!(
                "the client certificate names agency {certified}, not agency {agency}"
            )),
            Identity::Certificate(None) => Some(format!(
                "the client certificate names no agency (it needs the DNS name \
                 {AGENCY_NAME_PREFIX}{agency}), so it cannot speak for agency {agency}"
            )),
        }
    }
}

/// The agency a client certificate names: its DNS subject-alternative
/// names of the form `agency-N`. `None` when there is none, or when there
/// are several that disagree (a certificate speaks for one agency).
pub fn agency_of(cert: &CertificateDer<'_>) -> Option<AgencyId> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut named = cert.valid_dns_names().filter_map(|name| {
        let digits = name.strip_prefix(AGENCY_NAME_PREFIX)?;
        // Digits only: no sign, no leading `+`, and never agency 0.
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse::<AgencyId>().ok().filter(|&a| a > 0)
    });
    let first = named.next()?;
    named.all(|other| other == first).then_some(first)
}

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
    /// The client-certificate authority cannot be used.
    #[error("TLS setup: server.tls_client_ca: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
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

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<(rustls::RootCertStore, Vec<CertificateDer<'static>>), TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = certs(ca)?;
    for cert in &certs {
        roots.add(cert.clone())?;
    }
    Ok((roots, certs))
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn cert_for(names: &[&str]) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let cert = CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        cert.der().clone()
    }

    #[test]
    fn the_agency_is_the_dns_name_agency_n() {
        assert_eq!(agency_of(&cert_for(&["agency-3"])), Some(3));
        assert_eq!(agency_of(&cert_for(&["central", "agency-12"])), Some(12));
        assert_eq!(agency_of(&cert_for(&["agency-2", "agency-2"])), Some(2));
        for names in [
            &["agency-1", "agency-2"][..],
            &["agency-0"],
            &["agency-x"],
            &["agency-+4"],
            &["agency"],
            &["localhost"],
            &[],
        ] {
            assert_eq!(agency_of(&cert_for(names)), None, "{names:?}");
        }
    }

    #[test]
    fn a_certificate_speaks_only_for_its_agency() {
        assert_eq!(Identity::Anonymous.refuses(2), None);
        assert_eq!(Identity::Certificate(Some(2)).refuses(2), None);
        let wrong = Identity::Certificate(Some(1)).refuses(2).unwrap();
        assert_eq!(wrong, "the client certificate names agency 1, not agency 2");
        let none = Identity::Certificate(None).refuses(2).unwrap();
        assert!(none.contains("names no agency"), "{none}");
        assert_eq!(Identity::Certificate(Some(4)).certified_agency(), Some(4));
        assert_eq!(Identity::Anonymous.certified_agency(), None);
    }
}
