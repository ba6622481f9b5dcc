//! TLS set-up: the server's certificate and key, the local proxy's ways to trust the server
//! (system roots, a given CA, or a pinned certificate fingerprint), self-signed certificates for
//! `sluice cert`, and the blocking handshakes that turn a socket into a [`Stream::Tls`].
//!
//! rustls with the ring provider; TLS 1.2 and 1.3. How the session is shared by the two relay
//! threads is in `stream.rs`.

use crate::error::{Error, Result};
use crate::net::stream::{Stream, TlsStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, ServerConfig,
    ServerConnection, SignatureScheme,
};
use std::fmt;
use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain and private key (PKCS#8, RSA or EC) into a server config.
///
/// # Errors
/// A file that cannot be read, holds no certificate or key, or a key that does not match the
/// certificate; each one line naming the file.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<std::result::Result<_, _>>())
        .map_err(|e| Error::Invalid(format!("tls certificate {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(Error::Invalid(format!(
            "tls certificate {}: no CERTIFICATE in the file",
            cert.display()
        )));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::Invalid(format!("tls key {}: {e}", key.display())))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key_der))
        .map_err(|e| {
            Error::Invalid(format!(
                "tls key {} does not fit certificate {}: {e}",
                key.display(),
                cert.display()
            ))
        })?;
    Ok(Arc::new(cfg))
}

/// Runs the server side of a TLS handshake before `deadline`. Blocking.
///
/// # Errors
/// The client spoke something else, broke the handshake, or was too slow.
pub fn accept(sock: TcpStream, cfg: &Arc<ServerConfig>, deadline: Instant) -> io::Result<Stream> {
    let conn = ServerConnection::new(cfg.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let t = TlsStream::handshake(sock, conn.into(), deadline)?;
    Ok(Stream::Tls(Arc::new(t)))
}

/// How `sluice local` decides to trust the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The usual web roots (Mozilla's, built in).
    System,
    /// A CA certificate (or the server's self-signed certificate) from a PEM file.
    Ca(PathBuf),
    /// The SHA-256 of the server's certificate (DER), as `sluice cert` prints it.
    Pin([u8; 32]),
}

/// Why a `--pin-sha256` value was refused; each names the text it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinError {
    /// Not 64 digits once colons are dropped (the count is of characters).
    Length(String, usize),
    /// A character that is not a hex digit.
    NotHex(String),
}

impl fmt::Display for PinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const WANT: &str = "expected 64 hex digits as printed by `sluice cert`";
        match self {
            PinError::Length(s, n) => write!(f, "bad --pin-sha256 {s:?}: {WANT}, got {n}"),
            PinError::NotHex(s) => {
                write!(f, "bad --pin-sha256 {s:?}: {WANT}, got a non-hex character")
            }
        }
    }
}

impl std::error::Error for PinError {}

/// A pin comes from the command line (`--pin-sha256`): a bad one is a usage error (exit 2).
impl From<PinError> for Error {
    fn from(e: PinError) -> Error {
        Error::Usage(e.to_string())
    }
}

/// Parses a pin: 64 hex digits, colons allowed between pairs.
///
/// # Errors
/// [`PinError`] for anything else.
pub fn parse_pin(s: &str) -> std::result::Result<[u8; 32], PinError> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    let count = hex.chars().count();
    if count != 64 {
        return Err(PinError::Length(s.to_string(), count));
    }
    // All ASCII hex first: slicing pairs below must never cut a multi-byte character.
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PinError::NotHex(s.to_string()));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| PinError::NotHex(s.to_string()))?;
    }
    Ok(out)
}

/// The SHA-256 of a certificate's DER, as 64 lowercase hex digits.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A client config for the local proxy's connections to the server.
///
/// # Errors
/// A CA file that cannot be read or holds no certificate.
pub fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>> {
    let p = provider();
    let builder = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Invalid(format!("tls: {e}")))?;
    let cfg = match trust {
        Trust::System => {
            let roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Ca(path) => {
            let mut roots = RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<std::result::Result<_, _>>())
                .map_err(|e| Error::Invalid(format!("--ca {}: {e}", path.display())))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(Error::Invalid(format!(
                    "--ca {}: no usable certificate in the file",
                    path.display()
                )));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: *pin,
                algs: p.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// Runs the client side of a TLS handshake before `deadline`. Blocking.
///
/// # Errors
/// The server's certificate was not trusted (`InvalidData`, saying why), or the handshake failed
/// or was too slow.
pub fn connect(
    sock: TcpStream,
    cfg: &Arc<ClientConfig>,
    name: ServerName<'static>,
    deadline: Instant,
) -> io::Result<Stream> {
    let conn = ClientConnection::new(cfg.clone(), name)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let t = TlsStream::handshake(sock, conn.into(), deadline)?;
    Ok(Stream::Tls(Arc::new(t)))
}

/// Compares two byte strings in time that depends only on their lengths (the pin check need not
/// be secret, but a compare that leaks nothing costs nothing).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Trusts exactly one certificate, by the SHA-256 of its DER; signatures are still checked, so
/// the server must hold the certificate's key.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let d = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if constant_time_eq(d.as_ref(), &self.pin) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate sha256 {} does not match --pin-sha256",
                fingerprint(end_entity.as_ref())
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A self-signed certificate for `name`: (certificate PEM, private key PEM, SHA-256 fingerprint).
///
/// # Errors
/// A name rcgen cannot put in a certificate.
pub fn self_signed(name: &str) -> Result<(String, String, String)> {
    let mut names = vec![name.to_string()];
    if name != "localhost" && name.parse::<std::net::IpAddr>().is_err() {
        // Nothing to add: a DNS name stands alone.
    } else if name == "localhost" {
        names.push("127.0.0.1".into());
    }
    let ck = rcgen::generate_simple_self_signed(names)
        .map_err(|e| Error::Invalid(format!("cannot make a certificate for {name:?}: {e}")))?;
    let fp = fingerprint(ck.cert.der());
    Ok((ck.cert.pem(), ck.signing_key.serialize_pem(), fp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_compare_needs_equal_bytes_and_length() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn pins_parse_with_or_without_colons() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_pin(&hex), Ok([0xab; 32]));
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_pin(&colons), Ok([0xab; 32]));
        assert_eq!(parse_pin("abc"), Err(PinError::Length("abc".into(), 3)));
        let zz = "zz".repeat(32);
        assert_eq!(parse_pin(&zz), Err(PinError::NotHex(zz.clone())));
        assert_eq!(
            PinError::Length("abc".into(), 3).to_string(),
            "bad --pin-sha256 \"abc\": expected 64 hex digits as printed by `sluice cert`, got 3"
        );
        // 64 bytes, but not 64 ASCII characters: refused, never sliced inside a character.
        let euros = format!("{}a", "€".repeat(21));
        assert_eq!(euros.len(), 64);
        assert!(parse_pin(&euros).is_err());
        assert!(parse_pin(&"é".repeat(32)).is_err());
    }

    #[test]
    fn self_signed_cert_loads_and_a_wrong_key_is_refused() {
        let dir = std::env::temp_dir().join(format!("sluice-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key, fp) = self_signed("localhost").unwrap();
        assert_eq!(fp.len(), 64);
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, &cert).unwrap();
        std::fs::write(&k, &key).unwrap();
        assert!(server_config(&c, &k).is_ok());
        let (_, other_key, _) = self_signed("localhost").unwrap();
        std::fs::write(&k, other_key).unwrap();
        let e = server_config(&c, &k).err().unwrap().to_string();
        assert!(e.contains("does not fit"), "{e}");
        std::fs::write(&k, "not a key").unwrap();
        assert!(server_config(&c, &k).is_err());
        assert!(server_config(&dir.join("missing.pem"), &k).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
