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

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::AgencyConfig;
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

/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// The central's side of TLS.
pub struct ServerTls {
    acceptor: TlsAcceptor,
    client_certificates: bool,
}

/// What the first bytes of a connection turned out to be.
pub enum Accepted {
    /// A completed handshake, and who the client is.
    Tls(BoxedIo, Identity),
    /// The client spoke first, and not TLS: answer it in plain text.
    PlainText(TcpStream),
    /// The client closed before sending anything (a port probe).
    Closed,
}

impl ServerTls {
    /// The central's certificate chain and key; with `client_ca`, every
    /// client must present a certificate signed by it.
    ///
    /// # Errors
    /// The files cannot be read, or rustls refuses them.
    pub fn new(
        cert: &Path,
        key_path: &Path,
        client_ca: Option<&Path>,
    ) -> Result<ServerTls, TlsError> {
        let chain = certs(cert)?;
        let key = key(key_path)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let config = match client_ca {
            None => builder.with_no_client_auth().with_single_cert(chain, key)?,
            Some(ca) => {
                let (roots, _) = roots(ca)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()?;
                builder
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(chain, key)?
            }
        };
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            client_certificates: client_ca.is_some(),
        })
    }

    /// Whether clients must present certificates.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_certificates
    }

    /// Waits for the client's first byte: a TLS handshake record is
    /// handshaken (the client's certificate, when required, gives the
    /// [`Identity`]); anything else is handed back to be answered in plain
    /// text. Not bounded in time: the caller races it against its deadline.
    ///
    /// # Errors
    /// The socket fails, or the handshake does; the error says why in the
    /// central's settings' terms (no client certificate, an unknown issuer).
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Accepted> {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await? == 0 {
            return Ok(Accepted::Closed);
        }
        if first[0] != TLS_HANDSHAKE {
            return Ok(Accepted::PlainText(tcp));
        }
        let stream = self.acceptor.accept(tcp).await.map_err(explain_server)?;
        let identity = if self.client_certificates {
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(<[_]>::first);
            Identity::Certificate(cert.and_then(agency_of))
        } else {
            Identity::Anonymous
        };
        Ok(Accepted::Tls(
            Box::new(CloseNotifyOptional(stream)),
            identity,
        ))
    }
}

/// A server TLS stream on which a peer that closes without TLS's
/// close_notify has simply closed. rustls reports that as an error because
/// some protocols cannot tell a cut-off message from a complete one; ours
/// can (every frame states its length, and a frame cut off is still
/// reported as such by the codec), and probes and agencies that just close
/// their socket must not be logged as failed connections.
struct CloseNotifyOptional<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for CloseNotifyOptional<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.0).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CloseNotifyOptional<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A failed server handshake, in the central's settings' terms.
fn explain_server(e: io::Error) -> io::Error {
    let message = match rustls_error(&e) {
        Some(rustls::Error::NoCertificatesPresented) => {
            "the client presented no certificate: this central requires one signed by \
             server.tls_client_ca (the agency sets agency.tls_cert and agency.tls_key)"
                .to_string()
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "the client's certificate is not signed by the authority in server.tls_client_ca"
                .to_string()
        }
        Some(rustls::Error::InvalidCertificate(why)) => {
            format!("the client's certificate was refused: {why:?}")
        }
        Some(rustls::Error::AlertReceived(
            alert @ (AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            // What rustls sends when an authority of the same name, but
            // another key, is in its store: the signature does not verify.
            | AlertDescription::DecryptError),
        )) => format!(
            "the client does not trust this central's certificate ({alert:?}): its \
             agency.tls_ca must hold the authority that signed server.tls_cert, or \
             server.tls_cert itself, and the certificate must carry the name the \
             client dials (or the one in its agency.tls_server_name)"
        ),
        _ => return e,
    };
    io::Error::new(e.kind(), message)
}

/// The agency's side of TLS (also the operator tools').
pub struct ClientTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl ClientTls {
    /// TLS as `config` asks for it, to dial `address` (the certificate's
    /// name follows the address actually dialled): `None` when
    /// `agency.tls_ca` is not set.
    ///
    /// # Errors
    /// A file cannot be read, or the server name is not valid.
    pub fn for_agency(config: &AgencyConfig, address: &str) -> Result<Option<ClientTls>, TlsError> {
        if config.tls_ca.as_os_str().is_empty() {
            return Ok(None);
        }
        let identity = (!config.tls_cert.as_os_str().is_empty())
            .then_some((config.tls_cert.as_path(), config.tls_key.as_path()));
        ClientTls::new(&config.tls_ca, &config.tls_name(address), identity).map(Some)
    }

    /// Trusts the authorities in `ca` (and pins any certificate in it, see
    /// [`PinningVerifier`]), checks the central's certificate against
    /// `server_name`, and presents `identity` (certificate chain, key) when
    /// given.
    ///
    /// # Errors
    /// A file cannot be read, or the name is not valid.
    pub fn new(
        ca: &Path,
        server_name: &str,
        identity: Option<(&Path, &Path)>,
    ) -> Result<ClientTls, TlsError> {
        let (roots, pinned) = roots(ca)?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::File {
                path: ca.to_path_buf(),
                reason: e.to_string(),
            })?;
        let verifier = Arc::new(PinningVerifier { pinned, webpki });
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key_path)) => {
                builder.with_client_auth_cert(certs(cert)?, key(key_path)?)?
            }
        };
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }

    /// Completes the handshake over `tcp`. Errors, during the handshake and
    /// on later reads (a central refusing this agency's certificate says so
    /// only after the handshake, in TLS 1.3), are explained in the agency's
    /// settings' terms; those no retry can fix are marked (see
    /// [`is_refusal`]).
    ///
    /// # Errors
    /// The handshake fails.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<BoxedIo> {
        let stream = self
            .connector
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| explain_client(e, &self.name))?;
        Ok(Box::new(Explained {
            inner: stream,
            name: self.name.clone(),
        }))
    }
}

/// An explained TLS failure that no new connection can fix (a wrong
/// certificate, a central that does not speak TLS).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsRefusal(String);

/// Whether `e` is a [`TlsRefusal`]: retrying will not help.
pub fn is_refusal(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<TlsRefusal>())
}

fn refusal(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, TlsRefusal(message))
}

/// A failed client handshake or read, in the agency's settings' terms.
fn explain_client(e: io::Error, name: &ServerName<'_>) -> io::Error {
    let name = name.to_str();
    let message = match rustls_error(&e) {
        Some(rustls::Error::InvalidCertificate(why)) => match why {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "the central's certificate is not signed by an authority in agency.tls_ca \
                 (CLI_TLS_CA): give the authority (CA) certificate that signed it, or the \
                 central's own certificate to pin it ({why:?})"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "the central's certificate does not name {name:?}: set \
                     agency.tls_server_name (CLI_TLS_SERVER_NAME) to a name it carries"
                )
            }
            CertificateError::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => {
                "the central presents a CA certificate as its own: give the central a \
                 certificate signed by that CA, or put the central's exact certificate in \
                 agency.tls_ca (CLI_TLS_CA) to pin it"
                    .to_string()
            }
            other => format!("the central's certificate was refused: {other:?}"),
        },
        // Plain-text bytes read as a TLS record: a frame header's first
        // byte, 0x00, is no TLS content type.
        Some(rustls::Error::InvalidMessage(_)) => {
            format!("the central does not speak TLS (it answered in plain text): {NO_TLS_FIX}")
        }
        Some(rustls::Error::AlertReceived(AlertDescription::CertificateRequired)) => {
            "the central requires a client certificate: set agency.tls_cert and \
             agency.tls_key (CLI_TLS_CERT, CLI_TLS_KEY) to a certificate naming this agency, \
             signed by the authority in the central's server.tls_client_ca"
                .to_string()
        }
        Some(rustls::Error::AlertReceived(
            alert @ (AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::AccessDenied),
        )) => format!(
            "the central refused this agency's certificate ({alert:?}): agency.tls_cert must \
             be signed by the authority in the central's server.tls_client_ca"
        ),
        _ => return e,
    };
    refusal(message)
}

/// A client TLS stream whose read and write errors are explained (see
/// [`ClientTls::connect`]).
struct Explained<S> {
    inner: S,
    name: ServerName<'static>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Explained<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            // A close without close_notify is a close (see
            // `CloseNotifyOptional`).
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(explain_client(e, &this.name))),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Explained<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(explain_client(e, &this.name))),
            other => other,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(explain_client(e, &this.name))),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(explain_client(e, &this.name))),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Verifies the central's certificate: one byte-identical to a certificate
/// in `agency.tls_ca` is trusted as itself (pinning: a self-signed
/// certificate given as its own authority), still only within its validity
/// period and for the names it carries; any other must chain to an
/// authority in `agency.tls_ca`, as usual. The handshake's signatures are
/// checked the same way in both cases, so the central must hold the
/// certificate's key.
#[derive(Debug)]
pub struct PinningVerifier {
    pinned: Vec<CertificateDer<'static>>,
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return self.webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
        }
        let (not_before, not_after) = validity(end_entity).ok_or(
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
        )?;
        let now = now.as_secs();
        if now < not_before {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet,
            ));
        }
        if now > not_after {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
        }
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&parsed, server_name)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// A certificate's validity period (notBefore, notAfter) in seconds since
/// the Unix epoch, read from its DER: webpki checks it only on the way to a
/// trust anchor, which a pinned certificate does not take.
fn validity(der: &[u8]) -> Option<(u64, u64)> {
    let (cert, _) = der_field(der, 0x30)?;
    let (tbs, _) = der_field(cert, 0x30)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = der_field(rest, 0xa0)?.1; // version
    }
    rest = der_field(rest, 0x02)?.1; // serial number
    rest = der_field(rest, 0x30)?.1; // signature algorithm
    rest = der_field(rest, 0x30)?.1; // issuer
    let (period, _) = der_field(rest, 0x30)?;
    let tag = *period.first()?;
    let (not_before, rest) = der_field(period, tag)?;
    let not_before = der_time(tag, not_before)?;
    let tag = *rest.first()?;
    let (not_after, _) = der_field(rest, tag)?;
    Some((not_before, der_time(tag, not_after)?))
}

/// The contents of the DER field with `tag` at the start of `input`, and
/// what follows it.
fn der_field(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, mut rest) = rest.split_first()?;
    let len = if len < 0x80 {
        usize::from(len)
    } else {
        let bytes = usize::from(len & 0x7f);
        if bytes == 0 || bytes > 4 || rest.len() < bytes {
            return None;
        }
        let (size, after) = rest.split_at(bytes);
        rest = after;
        size.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A UTCTime (0x17, `YYMMDDHHMMSSZ`) or GeneralizedTime (0x18,
/// `YYYYMMDDHHMMSSZ`) as seconds since the epoch.
fn der_time(tag: u8, value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?;
    let full = match tag {
        // RFC 5280: two-digit years 50..99 are 19xx, 00..49 are 20xx.
        0x17 => format!("{}{text}", if text.get(..2)? >= "50" { "19" } else { "20" }),
        0x18 => text.to_string(),
        _ => return None,
    };
    let time = chrono::NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%SZ").ok()?;
    u64::try_from(time.and_utc().timestamp()).ok()
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{date_time_ymd, CertificateParams, KeyPair};

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

    #[test]
    fn validity_is_read_from_the_certificate() {
        let key = KeyPair::generate().unwrap();
        // One date in UTCTime's range, one past 2049 (GeneralizedTime).
        let mut params = CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = date_time_ymd(2001, 2, 3);
        params.not_after = date_time_ymd(2051, 6, 7);
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            validity(cert.der()),
            Some((981_158_400, 2_569_708_800)),
            "2001-02-03 and 2051-06-07, midnight UTC"
        );
        assert_eq!(validity(b"\x30\x03\x02\x01\x00"), None);
    }
}
