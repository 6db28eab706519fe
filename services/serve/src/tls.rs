//! TLS on accepted connections (rustls with ring, no OpenSSL), under the same connection limits as plain text.
//!
//! The handshake runs on the admitted connection ([`crate::TrackedIo`]), so a handshake counts against the cap, is
//! idle (an eviction candidate) until its first request, and has its own deadline ([`ServerTls::accept`]): a client
//! that never finishes it is closed. The certificate is served through [`ReloadableCertificate`] (rustls'
//! `ResolvesServerCert`), so a replaced certificate is used from the next handshake on; the whole configuration (for
//! a new client CA) is swapped with [`ServerTls::replace_config`]. Connections already open keep what they had.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

/// ALPN of an HTTPS server: HTTP/2 first, HTTP/1.1 for clients without it.
pub const ALPN_HTTPS: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN of a gRPC server: HTTP/2 only.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];

/// The one crypto provider, named explicitly so that no process-wide default has to be installed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which of the PEM files a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Certificate,
    Key,
    ClientCa,
}

/// A PEM file that cannot be used, and why (in words that say what to fix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFileError {
    pub file: TlsFile,
    pub path: PathBuf,
    pub reason: String,
}

impl std::fmt::Display for TlsFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for TlsFileError {}

fn file_error(file: TlsFile, path: &Path, reason: impl Into<String>) -> TlsFileError {
    TlsFileError {
        file,
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Reads a PEM file whole.
pub fn read_pem(file: TlsFile, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|error| file_error(file, path, format!("cannot be read: {error}")))
}

/// The certificates of a PEM file, in order; at least one.
pub fn certificates_from_pem(
    file: TlsFile,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(file, path, format!("is not valid PEM: {error}")))?;
    if certificates.is_empty() {
        return Err(file_error(
            file,
            path,
            "holds no `BEGIN CERTIFICATE` block: give a PEM file with the certificate (then its intermediates)",
        ));
    }
    Ok(certificates)
}

/// The certificate chain and its private key, checked to belong together.
pub fn certified_key_from_pem(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsFileError> {
    let chain = certificates_from_pem(TlsFile::Certificate, cert_path, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| {
        file_error(
            TlsFile::Key,
            key_path,
            format!("holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {error}"),
        )
    })?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|error| {
            file_error(
                TlsFile::Key,
                key_path,
                format!("is not a supported private key: {error}"),
            )
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(error) => Err(file_error(
            TlsFile::Key,
            key_path,
            format!(
                "does not belong to the certificate in {} ({error}): give the key the certificate was issued for",
                cert_path.display()
            ),
        )),
    }
}

/// Whether clients must present a certificate from the client CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// The handshake fails without a certificate from the CA.
    Required,
    /// A client may connect without a certificate; one it presents must chain to the CA.
    Optional,
}

/// The verifier of client certificates issued by the CAs of a PEM file.
pub fn client_verifier_from_pem(
    path: &Path,
    pem: &[u8],
    auth: ClientAuth,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates_from_pem(TlsFile::ClientCa, path, pem)? {
        roots.add(certificate).map_err(|error| {
            file_error(
                TlsFile::ClientCa,
                path,
                format!("holds a certificate that cannot be a trust anchor: {error}"),
            )
        })?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = match auth {
        ClientAuth::Required => builder,
        ClientAuth::Optional => builder.allow_unauthenticated(),
    };
    builder.build().map_err(|error| {
        file_error(
            TlsFile::ClientCa,
            path,
            format!("cannot verify client certificates: {error}"),
        )
    })
}

/// The server certificate, replaceable while the server runs: every handshake takes the current one.
#[derive(Debug)]
pub struct ReloadableCertificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCertificate {
    pub fn new(certified: CertifiedKey) -> Arc<Self> {
        Arc::new(ReloadableCertificate {
            current: RwLock::new(Arc::new(certified)),
        })
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        // Only a plain assignment happens under the write lock, so a poisoned lock still holds a whole value.
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn replace(&self, certified: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
    }
}

impl ResolvesServerCert for ReloadableCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A server configuration serving `certificate`, verifying clients with `client_verifier` if given, offering `alpn`.
pub fn server_config(
    certificate: Arc<ReloadableCertificate>,
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(certificate);
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
}

/// TLS for one server: its current configuration and the handshake's deadline.
#[derive(Clone, Debug)]
pub struct ServerTls {
    config: Arc<RwLock<Arc<ServerConfig>>>,
    handshake_timeout: Duration,
}

impl ServerTls {
    pub fn new(config: Arc<ServerConfig>, handshake_timeout: Duration) -> Self {
        ServerTls {
            config: Arc::new(RwLock::new(config)),
            handshake_timeout,
        }
    }

    /// Handshakes from now on use `config` (a server certificate that is reloaded needs no new configuration).
    pub fn replace_config(&self, config: Arc<ServerConfig>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    fn current_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The server side of the handshake on `io`, within the handshake timeout.
    pub async fn accept<IO>(&self, io: IO) -> io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current_config());
        match tokio::time::timeout(self.handshake_timeout, acceptor.accept(io)).await {
            Ok(done) => done,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the TLS handshake did not finish within {} ms",
                    self.handshake_timeout.as_millis()
                ),
            )),
        }
    }
}

/// A connection, after its TLS handshake or in plain text.
pub enum MaybeTls<IO> {
    Plain(IO),
    Tls(Box<TlsStream<IO>>),
}

impl<IO> MaybeTls<IO> {
    /// The certificates the client presented (leaf first), if it used TLS and presented any.
    pub fn peer_certificates(&self) -> Option<Arc<[CertificateDer<'static>]>> {
        match self {
            MaybeTls::Plain(_) => None,
            MaybeTls::Tls(stream) => stream
                .get_ref()
                .1
                .peer_certificates()
                .filter(|chain| !chain.is_empty())
                .map(|chain| chain.iter().map(|cert| cert.clone().into_owned()).collect()),
        }
    }

    /// The socket under the TLS layer.
    pub fn get_ref(&self) -> &IO {
        match self {
            MaybeTls::Plain(io) => io,
            MaybeTls::Tls(stream) => stream.get_ref().0,
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_read(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_write(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_flush(cx),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_shutdown(cx),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(io) => io.is_write_vectored(),
            MaybeTls::Tls(stream) => stream.is_write_vectored(),
        }
    }
}

/// A connection's TLS handshake when `tls` is set, or the connection as it is.
pub async fn handshake<IO>(tls: Option<&ServerTls>, io: IO) -> io::Result<MaybeTls<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match tls {
        None => Ok(MaybeTls::Plain(io)),
        Some(tls) => Ok(MaybeTls::Tls(Box::new(tls.accept(io).await?))),
    }
}
