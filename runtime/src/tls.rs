//! TLS on the link between device and cloud. Certificates and keys are PEM files; the crypto is
//! rustls with ring. The cloud (a tokio server) accepts through tokio-rustls; the device drives a
//! rustls client over its blocking socket, with the link's reader and writer threads sharing one
//! connection state behind a mutex that is never held across a socket call.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConnection, RootCertStore};

use crate::error::{Result, RuntimeError};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn bad(path: &Path, what: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::BadInput(format!("{}: cannot read the {what}: {e}", path.display()))
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| bad(path, what, e))?.collect::<std::result::Result<Vec<_>, _>>();
    let certs = certs.map_err(|e| bad(path, what, e))?;
    if certs.is_empty() {
        return Err(bad(path, what, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| bad(path, "private key (PEM, PKCS#8, PKCS#1 or SEC1)", e))
}

fn roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certs(path, "CA certificate")? {
        roots.add(c).map_err(|e| bad(path, "CA certificate", e))?;
    }
    Ok(roots)
}

fn config_error(e: rustls::Error) -> RuntimeError {
    RuntimeError::BadInput(format!("TLS setup: {e}"))
}

/// The device's TLS settings: which CA signs the cloud's certificate, and optionally the device's
/// own certificate for mutual TLS.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTls(server name {:?})", self.server_name)
    }
}

impl ClientTls {
    /// Trusts the certificates `ca` holds; presents `identity` (certificate chain, key) when the
    /// cloud asks for one. `server_name` overrides the name checked in the cloud's certificate
    /// (default: the host part of the address connected to).
    pub fn from_pem_files(ca: &Path, identity: Option<(&Path, &Path)>, server_name: Option<String>) -> Result<Self> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_root_certificates(roots(ca)?);
        let config = match identity {
            Some((cert, k)) => builder.with_client_auth_cert(certs(cert, "client certificate")?, key(k)?).map_err(config_error)?,
            None => builder.with_no_client_auth(),
        };
        Ok(Self { config: Arc::new(config), server_name })
    }

    /// The name the cloud's certificate must carry when connecting to `addr` (host:port).
    fn server_name(&self, addr: &str) -> std::io::Result<ServerName<'static>> {
        let host = match &self.server_name {
            Some(n) => n.clone(),
            None => host_of(addr).to_string(),
        };
        ServerName::try_from(host.clone())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{host}` is not a valid TLS server name")))
    }

    /// Shakes hands over `stream` (blocking, bounded by `timeout`) and splits the session into a
    /// reading and a writing half for the link's two threads.
    pub(crate) fn handshake(&self, addr: &str, mut stream: TcpStream, timeout: Duration) -> std::io::Result<(TlsReader, TlsWriter)> {
        let name = self.server_name(addr)?;
        let mut conn = ClientConnection::new(self.config.clone(), name).map_err(tls_io)?;
        // Frames are bounded by the protocol's cap; the writer drains after every frame.
        conn.set_buffer_limit(None);
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut stream).map_err(|e| unwrap_tls(e, "in the handshake"))?;
        }
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        let conn = Arc::new(Mutex::new(conn));
        let reader = TlsReader { sock: stream.try_clone()?, conn: conn.clone(), cipher: Vec::new(), pos: 0, eof: false };
        Ok((reader, TlsWriter { sock: stream, conn }))
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// True when every address `addr` resolves to is a loopback address: nothing leaves the machine.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(ip) = host_of(addr).parse::<IpAddr>() {
        return ip.is_loopback();
    }
    match addr.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// What went wrong in TLS, kept typed inside an `io::Error` so the device can tell it from a
/// dropped connection (retrying cannot fix a certificate).
#[derive(Debug, thiserror::Error)]
pub enum TlsFailure {
    #[error("{context}: {error}{}", hint(.error))]
    Rustls { context: &'static str, error: rustls::Error },
    #[error("because this device did not use it: the cloud speaks only TLS (connect with --tls-ca and the cloud's CA certificate)")]
    PeerSpeaksTls,
}

fn hint(e: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError, Error};
    match e {
        Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            " (the cloud's certificate is not signed by the CA given with --tls-ca)"
        }
        Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }) => {
            " (the cloud's certificate does not name the host connected to: see --tls-server-name)"
        }
        Error::AlertReceived(AlertDescription::CertificateRequired) => {
            " (the cloud requires a client certificate: pass --tls-cert and --tls-key)"
        }
        Error::AlertReceived(AlertDescription::UnknownCA | AlertDescription::BadCertificate | AlertDescription::DecryptError) => {
            " (the cloud does not accept this client certificate)"
        }
        Error::InvalidMessage(_) => " (is the cloud started with --tls-cert and --tls-key? a plain cloud does not speak TLS)",
        _ => "",
    }
}

fn tls_io(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, TlsFailure::Rustls { context: "in the handshake", error: e })
}

/// rustls reports its errors inside `io::Error`s; give them their context and hint.
fn unwrap_tls(e: std::io::Error, context: &'static str) -> std::io::Error {
    let kind = e.kind();
    match e.into_inner() {
        Some(inner) => match inner.downcast::<rustls::Error>() {
            Ok(error) => std::io::Error::new(std::io::ErrorKind::InvalidData, TlsFailure::Rustls { context, error: *error }),
            Err(inner) => std::io::Error::new(kind, inner),
        },
        None => std::io::Error::from(kind),
    }
}

/// The `TlsFailure` inside `e`, if it is one.
pub fn tls_failure(e: &std::io::Error) -> Option<&TlsFailure> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<TlsFailure>())
}

fn lock(conn: &Mutex<ClientConnection>) -> MutexGuard<'_, ClientConnection> {
    // A panic in the other half leaves a usable state: the connection then fails on its own.
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

/// The reading half: decrypts what the socket delivers.
pub(crate) struct TlsReader {
    sock: TcpStream,
    conn: Arc<Mutex<ClientConnection>>,
    /// Ciphertext read from the socket but not yet taken by rustls.
    cipher: Vec<u8>,
    pos: usize,
    eof: bool,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            {
                let mut c = lock(&self.conn);
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.eof {
                    return Ok(0);
                }
                // Plaintext is drained before more ciphertext goes in, so rustls's receive buffer
                // never overflows.
                if self.pos < self.cipher.len() {
                    let mut rest = &self.cipher[self.pos..];
                    let before = rest.len();
                    c.read_tls(&mut rest)?;
                    self.pos += before - rest.len();
                    if let Err(e) = c.process_new_packets() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            TlsFailure::Rustls { context: "after the handshake", error: e },
                        ));
                    }
                    continue;
                }
            }
            // No lock across the blocking read: the writer keeps sending meanwhile.
            self.cipher.resize(32 << 10, 0);
            let n = self.sock.read(&mut self.cipher)?;
            self.cipher.truncate(n);
            self.pos = 0;
            if n == 0 {
                self.eof = true;
                let mut c = lock(&self.conn);
                c.read_tls(&mut &[][..])?;
                if let Err(e) = c.process_new_packets() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        TlsFailure::Rustls { context: "after the handshake", error: e },
                    ));
                }
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(0),
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// The writing half: encrypts under the lock, writes to the socket outside it. Only this half
/// writes to the socket, so records leave in the order rustls made them.
pub(crate) struct TlsWriter {
    sock: TcpStream,
    conn: Arc<Mutex<ClientConnection>>,
}

impl TlsWriter {
    fn drain(&mut self, write: impl FnOnce(&mut ClientConnection) -> std::io::Result<()>) -> std::io::Result<()> {
        let mut out = Vec::new();
        {
            let mut c = lock(&self.conn);
            write(&mut c)?;
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
        }
        self.sock.write_all(&out)
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.drain(|c| c.writer().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for TlsWriter {
    /// Ends the session cleanly, so the cloud can tell a goodbye from a cut connection.
    fn drop(&mut self) {
        let _ = self.drain(|c| {
            c.send_close_notify();
            Ok(())
        });
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

/// The cloud's TLS settings: its certificate chain and key, and optionally the CA that must have
/// signed every device's certificate (mutual TLS).
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    mutual: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls(mutual: {})", self.mutual)
    }
}

impl ServerTls {
    pub fn from_pem_files(cert: &Path, key_path: &Path, client_ca: Option<&Path>) -> Result<Self> {
        let builder =
            rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(config_error)?;
        let builder = match client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| bad(ca, "client CA certificate", e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config =
            builder.with_single_cert(certs(cert, "certificate")?, key(key_path)?).map_err(|e| bad(cert, "certificate and key", e))?;
        Ok(Self { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), mutual: client_ca.is_some() })
    }

    /// Whether devices must present a certificate.
    pub fn mutual(&self) -> bool {
        self.mutual
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_loopback() {
        assert_eq!(host_of("127.0.0.1:7070"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7070"), "::1");
        assert_eq!(host_of("cloud.example:443"), "cloud.example");
        assert!(is_loopback("127.0.0.1:7070"));
        assert!(is_loopback("[::1]:7070"));
        assert!(is_loopback("localhost:7070"));
        assert!(!is_loopback("10.0.0.2:7070"));
        assert!(!is_loopback("0.0.0.0:7070"));
    }
}
