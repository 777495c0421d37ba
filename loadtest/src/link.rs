//! What a load client's MQTT bytes travel over: TCP, TLS (rustls client) or WebSockets
//! (tungstenite framing, client role, over TCP or TLS), all on the one non-blocking socket the
//! event loop polls. Written for the load tool alone: it shares nothing with the broker's code.

use std::io::{self, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use tungstenite::protocol::{Role, WebSocketContext};

fn would_block() -> io::Error {
    io::ErrorKind::WouldBlock.into()
}

/// Treats "not connected yet" (a non-blocking connect in progress) as "try later".
fn later(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::NotConnected {
        would_block()
    } else {
        e
    }
}

pub struct Tls {
    sock: TcpStream,
    tls: rustls::ClientConnection,
}

impl Tls {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tls.reader().read(out) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) => return Err(later(e)),
            }
            self.tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            self.flush()?;
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.flush()?;
        let n = self.tls.writer().write(bytes)?;
        self.flush()?;
        if n == 0 && !bytes.is_empty() {
            return Err(would_block());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::NotConnected) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

pub enum Lower {
    Tcp(TcpStream),
    Tls(Box<Tls>),
}

impl Lower {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            Lower::Tcp(s) => s.read(out).map_err(later),
            Lower::Tls(t) => t.read(out),
        }
    }
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Lower::Tcp(s) => s.write(bytes).map_err(later),
            Lower::Tls(t) => t.write(bytes),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Lower::Tcp(_) => Ok(()),
            Lower::Tls(t) => t.flush(),
        }
    }
    fn sock(&mut self) -> &mut TcpStream {
        match self {
            Lower::Tcp(s) => s,
            Lower::Tls(t) => &mut t.sock,
        }
    }
}

pub struct Ws {
    lower: Lower,
    ctx: WebSocketContext,
    open: bool,
    input: Vec<u8>,
    output: Vec<u8>,
    plain: Vec<u8>,
}

struct Pipe<'a> {
    input: &'a mut Vec<u8>,
    output: &'a mut Vec<u8>,
}

impl Read for Pipe<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(would_block());
        }
        let n = out.len().min(self.input.len());
        out[..n].copy_from_slice(&self.input[..n]);
        self.input.drain(..n);
        Ok(n)
    }
}

impl Write for Pipe<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Ws {
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.lower.read(&mut chunk)?;
        self.input.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.plain.is_empty() {
                let n = out.len().min(self.plain.len());
                out[..n].copy_from_slice(&self.plain[..n]);
                self.plain.drain(..n);
                return Ok(n);
            }
            if !self.open {
                if let Some(end) = self.input.windows(4).position(|w| w == b"\r\n\r\n") {
                    if !self.input.starts_with(b"HTTP/1.1 101") {
                        return Err(io::Error::other("WebSocket upgrade refused"));
                    }
                    self.input.drain(..end + 4);
                    self.open = true;
                    continue;
                }
                if self.fill()? == 0 {
                    return Ok(0);
                }
                continue;
            }
            let mut pipe = Pipe { input: &mut self.input, output: &mut self.output };
            match self.ctx.read(&mut pipe) {
                Ok(tungstenite::Message::Binary(b)) => self.plain.extend_from_slice(&b),
                Ok(tungstenite::Message::Close(_)) => return Ok(0),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.flush()?;
                    if self.fill()? == 0 {
                        return Ok(0);
                    }
                }
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.flush()?;
        if !self.output.is_empty() {
            return Err(would_block());
        }
        let n = bytes.len().min(64 * 1024);
        let mut pipe = Pipe { input: &mut self.input, output: &mut self.output };
        let msg = tungstenite::Message::Binary(tungstenite::Bytes::copy_from_slice(&bytes[..n]));
        self.ctx.write(&mut pipe, msg).map_err(io::Error::other)?;
        self.ctx.flush(&mut pipe).map_err(io::Error::other)?;
        self.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.lower.flush()?;
        while !self.output.is_empty() {
            match self.lower.write(&self.output) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The run's link settings, built once from its arguments (the CA file is read once).
pub fn spec(args: &crate::RunArgs) -> Result<&'static LinkSpec, String> {
    static SPEC: std::sync::OnceLock<Result<LinkSpec, String>> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| LinkSpec::new(args.tls, args.cafile.as_deref(), args.ws)).as_ref().map_err(|e| e.clone())
}

pub enum Link {
    Tcp(TcpStream),
    Tls(Box<Tls>),
    Ws(Box<Ws>),
}

/// How to reach the broker: TLS trusting `cafile` (or, without one, any certificate), and/or
/// WebSockets on path `/mqtt`.
#[derive(Clone)]
pub struct LinkSpec {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub ws: bool,
}

impl LinkSpec {
    pub fn new(tls: bool, cafile: Option<&std::path::Path>, ws: bool) -> Result<LinkSpec, String> {
        if !tls {
            return Ok(LinkSpec { tls: None, ws });
        }
        use rustls::pki_types::pem::PemObject;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let Some(cafile) = cafile else { return Err("--tls needs --cafile".into()) };
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(cafile).map_err(|e| format!("--cafile: {e}"))? {
            roots.add(c.map_err(|e| format!("--cafile: {e}"))?).map_err(|e| format!("--cafile: {e}"))?;
        }
        let config = builder.with_root_certificates(roots).with_no_client_auth();
        Ok(LinkSpec { tls: Some(Arc::new(config)), ws })
    }

    pub fn open(&self, stream: TcpStream, addr: std::net::SocketAddr) -> io::Result<Link> {
        let lower = match &self.tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = rustls::ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
                Lower::Tls(Box::new(Tls { sock: stream, tls }))
            }
            None => Lower::Tcp(stream),
        };
        if !self.ws {
            return Ok(match lower {
                Lower::Tcp(s) => Link::Tcp(s),
                Lower::Tls(t) => Link::Tls(t),
            });
        }
        let request = format!(
            "GET /mqtt HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
            tungstenite::handshake::client::generate_key()
        );
        Ok(Link::Ws(Box::new(Ws {
            lower,
            ctx: WebSocketContext::new(Role::Client, None),
            open: false,
            input: Vec::new(),
            output: request.into_bytes(),
            plain: Vec::new(),
        })))
    }
}

impl Link {
    pub fn source(&mut self) -> &mut TcpStream {
        match self {
            Link::Tcp(s) => s,
            Link::Tls(t) => &mut t.sock,
            Link::Ws(w) => w.lower.sock(),
        }
    }

    pub fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.read(out),
            Link::Tls(t) => t.read(out),
            Link::Ws(w) => w.read(out),
        }
    }

    /// MQTT bytes out; the WebSocket upgrade goes first, and MQTT waits for its answer.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.write(bytes),
            Link::Tls(t) => t.write(bytes),
            Link::Ws(w) if !w.open => {
                w.flush()?;
                Err(would_block())
            }
            Link::Ws(w) => w.write(bytes),
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Link::Tcp(_) => Ok(()),
            Link::Tls(t) => t.flush(),
            Link::Ws(w) => w.flush(),
        }
    }
}
