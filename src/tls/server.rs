//! The central's side of TLS: the acceptor, which tells a TLS client from a
//! plain-text one by its first byte.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{agency_of, certs, key, provider, roots, rustls_error, BoxedIo, Identity, TlsError};

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
