//! The bytes under MQTT: plain TCP, TLS (rustls) and WebSockets (tungstenite's framing, over TCP
//! or TLS). Everything above `Transport` sees MQTT bytes only: a read appends them to the
//! connection's input buffer, a write takes them from its output buffer. tern keeps the
//! non-blocking socket; rustls and tungstenite work on bytes it hands them.
//!
//! Output is bounded below the connection too: a TLS or WebSocket transport takes no more MQTT
//! bytes while what it already encrypted or framed has not reached the socket (`PENDING_MAX`),
//! so the connection's own bound (`max_output_bytes`) keeps holding.

pub mod tls;
mod ws;

use std::io::{self, Read, Write};

use bytes::BytesMut;
use mio::net::TcpStream;

pub use tls::{TlsConfigs, TlsStream};
pub use ws::WsStream;

/// Encrypted or framed bytes a transport holds for a socket that would block, before it stops
/// taking more.
pub const PENDING_MAX: usize = 64 * 1024;

pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
    Ws(Box<WsStream>),
}

/// Under WebSocket framing: the raw socket or TLS.
pub enum Lower {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
}

impl Lower {
    fn read_raw(&mut self, buf: &mut BytesMut, arrived: &mut u64) -> io::Result<usize> {
        match self {
            Lower::Tcp(s) => read_into(s, buf, arrived),
            Lower::Tls(t) => t.read_into(buf, arrived),
        }
    }

    fn write_raw(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Lower::Tcp(s) => s.write(bytes),
            Lower::Tls(t) => t.write(bytes),
        }
    }

    fn socket(&mut self) -> &mut TcpStream {
        match self {
            Lower::Tcp(s) => s,
            Lower::Tls(t) => t.socket(),
        }
    }

    fn socket_ref(&self) -> &TcpStream {
        match self {
            Lower::Tcp(s) => s,
            Lower::Tls(t) => t.socket_ref(),
        }
    }

    fn pending_output(&self) -> bool {
        match self {
            Lower::Tcp(_) => false,
            Lower::Tls(t) => t.pending_output(),
        }
    }

    fn flush_pending(&mut self) -> io::Result<()> {
        match self {
            Lower::Tcp(_) => Ok(()),
            Lower::Tls(t) => t.flush_pending(),
        }
    }

    fn identity(&self) -> Option<&str> {
        match self {
            Lower::Tcp(_) => None,
            Lower::Tls(t) => t.identity(),
        }
    }
}

impl Transport {
    /// The socket, for registering with the poller.
    pub fn source(&mut self) -> &mut TcpStream {
        match self {
            Transport::Tcp(s) => s,
            Transport::Tls(t) => t.socket(),
            Transport::Ws(w) => w.lower.socket(),
        }
    }

    fn socket_ref(&self) -> &TcpStream {
        match self {
            Transport::Tcp(s) => s,
            Transport::Tls(t) => t.socket_ref(),
            Transport::Ws(w) => w.lower.socket_ref(),
        }
    }

    /// Appends the MQTT bytes that have arrived to `buf` (reading the socket, decrypting,
    /// unframing). `Ok(0)`: the client closed; `WouldBlock`: nothing more now. `arrived` is set
    /// to when the last bytes read reached the host (see `recv_stamped`), where the kernel says.
    pub fn read_into(&mut self, buf: &mut BytesMut, arrived: &mut u64) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => read_into(s, buf, arrived),
            Transport::Tls(t) => t.read_into(buf, arrived),
            Transport::Ws(w) => w.read_into(buf, arrived),
        }
    }

    /// Plain TCP: a short `read_into` means the socket had nothing more.
    pub fn is_tcp(&self) -> bool {
        matches!(self, Transport::Tcp(_))
    }

    /// Takes MQTT bytes for the client; returns how many it took (`WouldBlock` if none).
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.write(bytes),
            Transport::Tls(t) => t.write(bytes),
            Transport::Ws(w) => w.write(bytes),
        }
    }

    /// Encrypted or framed bytes still waiting for the socket (handshake records included).
    pub fn pending_output(&self) -> bool {
        match self {
            Transport::Tcp(_) => false,
            Transport::Tls(t) => t.pending_output(),
            Transport::Ws(w) => w.pending_output(),
        }
    }

    /// Pushes what `pending_output` holds towards the socket, as far as it takes it.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        match self {
            Transport::Tcp(_) => Ok(()),
            Transport::Tls(t) => t.flush_pending(),
            Transport::Ws(w) => w.flush_pending(),
        }
    }

    /// Queues the transport's own end-of-stream marker after what was written: TLS close_notify,
    /// a WebSocket Close frame. The socket's write side is shut once it is flushed.
    pub fn finish(&mut self) {
        match self {
            Transport::Tcp(_) => {}
            Transport::Tls(t) => t.finish(),
            Transport::Ws(w) => w.finish(),
        }
    }

    /// Shuts the socket's write side (a FIN after everything written), keeping it readable.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.source().shutdown(std::net::Shutdown::Write)
    }

    /// Reads and throws away what the socket has, at most `limit` bytes, until it would block.
    /// Returns the bytes thrown away and whether the stream ended.
    pub fn discard(&mut self, limit: usize) -> io::Result<(usize, bool)> {
        let mut scratch = [0u8; 16 * 1024];
        let mut total = 0;
        while total < limit {
            let room = scratch.len().min(limit - total);
            match self.source().read(&mut scratch[..room]) {
                Ok(0) => return Ok((total, true)),
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((total, false)),
                Err(e) => return Err(e),
            }
        }
        Ok((total, false))
    }

    /// The username a client certificate gives, on a listener with `use_identity_as_username`.
    pub fn identity(&self) -> Option<&str> {
        match self {
            Transport::Tcp(_) => None,
            Transport::Tls(t) => t.identity(),
            Transport::Ws(w) => w.lower.identity(),
        }
    }

    /// Whether the listener requires the certificate's identity as the username.
    pub fn wants_identity(&self) -> bool {
        match self {
            Transport::Tcp(_) => false,
            Transport::Tls(t) => t.use_identity,
            Transport::Ws(w) => matches!(&w.lower, Lower::Tls(t) if t.use_identity),
        }
    }

    /// The client's address, for log lines (not kept: it would cost every idle connection).
    pub fn peer(&self) -> String {
        self.socket_ref().peer_addr().map_or_else(|_| "a closed socket".to_string(), |a| a.to_string())
    }

    /// Short name for logs and `$SYS`: mqtt, mqtts, ws, wss.
    pub fn kind(&self) -> &'static str {
        match self {
            Transport::Tcp(_) => "mqtt",
            Transport::Tls(_) => "mqtts",
            Transport::Ws(w) if matches!(w.lower, Lower::Tls(_)) => "wss",
            Transport::Ws(_) => "ws",
        }
    }
}

/// Reads into the spare capacity of `buf` without zeroing it first; `arrived` as `recv_stamped`.
pub fn read_into(stream: &mut TcpStream, buf: &mut BytesMut, arrived: &mut u64) -> io::Result<usize> {
    if buf.capacity() == buf.len() {
        buf.reserve(4096);
    }
    let spare = buf.spare_capacity_mut();
    // SAFETY: `recv_stamped` only writes into the slice and reports how many bytes it wrote; we
    // expose exactly those bytes with set_len. u8 has no invalid bit patterns.
    let n = unsafe {
        let slice = std::slice::from_raw_parts_mut(spare.as_mut_ptr() as *mut u8, spare.len());
        recv_stamped(stream, slice, arrived)?
    };
    // SAFETY: the first n spare bytes were just initialised by recvmsg.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Asks the kernel to stamp what arrives on `stream` with the time it reached the host
/// (`SO_TIMESTAMPNS`), so connections read by different workers can be put in arrival order.
pub fn stamp_arrivals(stream: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a plain setsockopt on a socket we own, with a correctly sized int.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `recv` that also reads the kernel's arrival stamp of the last segment taken (wall clock,
/// nanoseconds since the epoch) into `arrived`, when the socket asked for stamps and the kernel
/// gave one; otherwise `arrived` is left as it was.
pub fn recv_stamped(stream: &TcpStream, out: &mut [u8], arrived: &mut u64) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // Room for one SCM_TIMESTAMPNS (a timespec), aligned for cmsghdr.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: out.as_mut_ptr() as *mut libc::c_void, iov_len: out.len() };
    // SAFETY: zeroed msghdr is a valid empty header; we point it at live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    loop {
        // SAFETY: every pointer in `msg` refers to a buffer that outlives the call, with its length.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if msg.msg_controllen > 0 {
            // SAFETY: the kernel filled `control` with well-formed cmsgs up to msg_controllen;
            // the CMSG_* walk stays within it.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                        let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                        *arrived = (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64);
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
        }
        return Ok(n as usize);
    }
}

/// `Read` for rustls over a socket, keeping the arrival stamp.
pub(crate) struct StampedSocket<'a> {
    pub sock: &'a mut TcpStream,
    pub arrived: &'a mut u64,
}

impl Read for StampedSocket<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        recv_stamped(self.sock, out, self.arrived)
    }
}

fn would_block() -> io::Error {
    io::Error::from(io::ErrorKind::WouldBlock)
}
