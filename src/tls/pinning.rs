//! Pinning: a certificate in `agency.tls_ca` byte-identical to the central's
//! is trusted as itself.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

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

impl PinningVerifier {
    /// Trusts `pinned` as themselves and anything else as `webpki` does.
    pub(super) fn new(
        pinned: Vec<CertificateDer<'static>>,
        webpki: Arc<WebPkiServerVerifier>,
    ) -> PinningVerifier {
        PinningVerifier { pinned, webpki }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{date_time_ymd, CertificateParams, KeyPair};

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
