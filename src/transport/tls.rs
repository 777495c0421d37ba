//! TLS with rustls (ring provider; TLS 1.2 and 1.3): the server configuration of each TLS
//! listener, loaded from PEM files at start and again on SIGHUP (connections keep the
//! configuration they started with), and a TLS session over tern's non-blocking socket.

use std::io::{self, BufRead, Write};
use std::path::Path;
use std::sync::{Arc, RwLock};

use bytes::BytesMut;
use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use super::{would_block, PENDING_MAX};
use crate::config::ListenerConfig;

/// A listener's TLS configuration, replaceable while connections use the old one.
pub struct TlsConfigs {
    /// One per listener (in `Config::listeners()` order); `None` for a listener without TLS.
    slots: Vec<Option<RwLock<Arc<ServerConfig>>>>,
}

impl TlsConfigs {
    /// Loads every TLS listener's certificates and keys; an error names the key and the file.
    pub fn load(listeners: &[ListenerConfig]) -> Result<TlsConfigs, String> {
        let slots = listeners
            .iter()
            .map(|l| Ok(if l.is_tls() { Some(RwLock::new(server_config(l)?)) } else { None }))
            .collect::<Result<_, String>>()?;
        Ok(TlsConfigs { slots })
    }

    /// The configuration new connections on listener `i` get, if it is a TLS listener.
    pub fn get(&self, i: usize) -> Option<Arc<ServerConfig>> {
        let slot = self.slots.get(i)?.as_ref()?;
        Some(slot.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Re-reads the certificates and keys (the certbot renewal case). A listener whose files do
    /// not load keeps its current configuration; the errors are returned.
    pub fn reload(&self, listeners: &[ListenerConfig]) -> Vec<String> {
        let mut errors = Vec::new();
        for (l, slot) in listeners.iter().zip(&self.slots) {
            let Some(slot) = slot else { continue };
            match server_config(l) {
                Ok(c) => *slot.write().unwrap_or_else(|e| e.into_inner()) = c,
                Err(e) => errors.push(e),
            }
        }
        errors
    }
}

fn certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("`{key}` {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("`{key}` {}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// A bridge's rustls client configuration: the remote checked against `cafile`, with a client
/// certificate when `certfile` and `keyfile` are given.
pub fn client_config(cafile: &Path, cert: Option<(&Path, &Path)>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for c in certs("cafile", cafile)? {
        roots.add(c).map_err(|e| format!("`cafile` {}: {e}", cafile.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots);
    let config = match cert {
        Some((certfile, keyfile)) => {
            let chain = certs("certfile", certfile)?;
            let key =
                PrivateKeyDer::from_pem_file(keyfile).map_err(|e| format!("`keyfile` {}: {e}", keyfile.display()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("`certfile`/`keyfile`: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Builds a listener's rustls configuration from its PEM files.
pub fn server_config(l: &ListenerConfig) -> Result<Arc<ServerConfig>, String> {
    let (Some(certfile), Some(keyfile)) = (&l.certfile, &l.keyfile) else {
        return Err("a TLS listener needs both `certfile` and `keyfile`".into());
    };
    let chain = certs("certfile", certfile)?;
    let key = PrivateKeyDer::from_pem_file(keyfile).map_err(|e| format!("`keyfile` {}: {e}", keyfile.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &l.cafile {
        Some(cafile) => {
            let mut roots = RootCertStore::empty();
            for c in certs("cafile", cafile)? {
                roots.add(c).map_err(|e| format!("`cafile` {}: {e}", cafile.display()))?;
            }
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if let Some(crlfile) = &l.crlfile {
                let crls = CertificateRevocationListDer::pem_file_iter(crlfile)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("`crlfile` {}: {e}", crlfile.display()))?;
                v = v.with_crls(crls);
            }
            if !l.require_certificate {
                v = v.allow_unauthenticated();
            }
            builder.with_client_cert_verifier(v.build().map_err(|e| format!("`cafile` {}: {e}", cafile.display()))?)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("`certfile`/`keyfile` {} / {}: {e}", certfile.display(), keyfile.display()))?;
    Ok(Arc::new(config))
}

/// A TLS session over a non-blocking socket: a client's connection to a listener, or a bridge's
/// to a remote broker.
pub struct TlsStream {
    sock: TcpStream,
    tls: rustls::Connection,
    /// The listener takes the client certificate's CN as the username.
    pub use_identity: bool,
    identity: Option<Box<str>>,
}

impl TlsStream {
    pub fn new(sock: TcpStream, config: Arc<ServerConfig>, use_identity: bool) -> io::Result<TlsStream> {
        let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
        tls.set_buffer_limit(Some(PENDING_MAX));
        Ok(TlsStream { sock, tls: tls.into(), use_identity, identity: None })
    }

    /// The client side, for a bridge: `server` is the name (or IP) the remote's certificate
    /// must be for.
    pub fn client(sock: TcpStream, config: Arc<rustls::ClientConfig>, server: &str) -> io::Result<TlsStream> {
        let name = rustls::pki_types::ServerName::try_from(server.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("TLS server name {server:?}: {e}")))?;
        let mut tls = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
        tls.set_buffer_limit(Some(PENDING_MAX));
        Ok(TlsStream { sock, tls: tls.into(), use_identity: false, identity: None })
    }

    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    pub fn socket_ref(&self) -> &TcpStream {
        &self.sock
    }

    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// Reads and decrypts; answers the handshake as it goes.
    pub fn read_into(&mut self, buf: &mut BytesMut, arrived: &mut u64) -> io::Result<usize> {
        loop {
            // Straight from rustls' plaintext buffer into ours: no scratch to zero per read.
            let mut reader = self.tls.reader();
            match reader.fill_buf() {
                Ok([]) => return Ok(0), // close_notify
                Ok(chunk) => {
                    let n = chunk.len();
                    buf.extend_from_slice(chunk);
                    reader.consume(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match self.tls.read_tls(&mut super::StampedSocket { sock: &mut self.sock, arrived: &mut *arrived }) {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            let handshaking = self.tls.is_handshaking();
            if let Err(e) = self.tls.process_new_packets() {
                // The alert goes out if the socket takes it; the caller logs and closes.
                let _ = self.flush_pending();
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")));
            }
            if handshaking && !self.tls.is_handshaking() && self.use_identity {
                self.identity = self.tls.peer_certificates().and_then(|c| c.first()).and_then(|c| common_name(c));
            }
            self.flush_pending()?;
        }
    }

    /// Encrypts; takes nothing while `PENDING_MAX` of records wait for the socket.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.flush_pending()?;
        let n = self.tls.writer().write(bytes)?;
        self.flush_pending()?;
        if n == 0 && !bytes.is_empty() {
            return Err(would_block());
        }
        Ok(n)
    }

    pub fn pending_output(&self) -> bool {
        self.tls.wants_write()
    }

    /// Queues close_notify: the end of the stream, after what was written before.
    pub fn finish(&mut self) {
        self.tls.send_close_notify();
    }

    pub fn flush_pending(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The subject's common name of a DER certificate.
fn common_name(cert: &CertificateDer<'_>) -> Option<Box<str>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.into())
}
