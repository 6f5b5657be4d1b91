//! The agency's side of TLS (also the operator tools'): the connector, and
//! rustls's errors explained in the agency's settings' terms.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{
    certs, key, provider, roots, rustls_error, BoxedIo, PinningVerifier, TlsError, NO_TLS_FIX,
};

/// The agency's side of TLS (also the operator tools').
pub struct ClientTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl ClientTls {
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
        let verifier = Arc::new(PinningVerifier::new(pinned, webpki));
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
