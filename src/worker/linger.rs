//! Connections the broker ended after telling the client why: a DISCONNECT with a reason code, a
//! refusing CONNACK. Closing such a socket at once, with input from the client not yet read, makes
//! the kernel reset the connection, and so does the client's next write after the close: the
//! client's write then fails with `ECONNRESET` or `EPIPE`, and a client that is still sending (a
//! PUBREL for each PUBREC, say) fails on that write before it reads the reason waiting for it. So
//! the socket lingers: the rest of its output is written, the transport's own end (TLS
//! close_notify, WebSocket Close) follows, the write side is shut (FIN), and what the client still
//! sends is read and thrown away until it closes too, for at most `LINGER_MS` and `LINGER_BYTES`.
//! Nothing read here is handled: the connection is already closed for the protocol, its session
//! detached.
//!
//! Lingering sockets are bounded per worker (`MAX_LINGERING`); past it a connection closes at once.

use std::io;

use bytes::{Buf, BytesMut};
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::conn::Transport;

/// How long a closed connection may linger.
pub const LINGER_MS: u64 = 1000;
/// Bytes read and thrown away per lingering connection before it is closed anyway.
pub const LINGER_BYTES: usize = 1 << 20;
/// Lingering sockets per worker.
pub const MAX_LINGERING: usize = 1024;
/// Lingering socket n polls as `Token(TOKEN_BASE + n)`.
pub const TOKEN_BASE: usize = usize::MAX / 2;

struct Linger {
    transport: Transport,
    /// Output the socket had not taken when the connection closed.
    out: BytesMut,
    /// The transport's end-of-stream marker queued; the write side shut.
    finished: bool,
    shut: bool,
    /// Bytes it may still send us.
    left: usize,
    uid: u64,
}

#[derive(Default)]
pub struct Lingering {
    slab: Slab<Linger>,
    next_uid: u64,
}

/// Whether a lingering socket is done with.
#[derive(PartialEq)]
enum Step {
    Wait,
    Done,
}

impl Lingering {
    pub fn has_room(&self) -> bool {
        self.slab.len() < MAX_LINGERING
    }

    pub fn is_token(t: Token) -> bool {
        t.0 >= TOKEN_BASE && t.0 < TOKEN_BASE + MAX_LINGERING
    }

    /// Takes over a closed connection's socket (already registered with `registry`): polled for
    /// both directions from now on (edge-triggered, so a shut write side costs at most one
    /// spurious wake-up). Returns the (key, uid) to arm its deadline with, or None when it is
    /// done already.
    pub fn start(&mut self, registry: &Registry, transport: Transport, out: BytesMut) -> Option<(usize, u64)> {
        self.next_uid += 1;
        let uid = self.next_uid;
        let key = self.slab.insert(Linger { transport, out, finished: false, shut: false, left: LINGER_BYTES, uid });
        let l = &mut self.slab[key];
        let token = Token(TOKEN_BASE + key);
        let both = Interest::READABLE | Interest::WRITABLE;
        if registry.reregister(l.transport.source(), token, both).is_err() || step(l) == Step::Done {
            self.end(registry, key);
            return None;
        }
        Some((key, uid))
    }

    /// The socket of lingering `token` is ready.
    pub fn ready(&mut self, registry: &Registry, token: Token) {
        let key = token.0 - TOKEN_BASE;
        if self.slab.get_mut(key).is_some_and(|l| step(l) == Step::Done) {
            self.end(registry, key);
        }
    }

    /// Its time is up: closed whatever the client is doing.
    pub fn expire(&mut self, registry: &Registry, key: usize, uid: u64) {
        if self.slab.get(key).is_some_and(|l| l.uid == uid) {
            self.end(registry, key);
        }
    }

    fn end(&mut self, registry: &Registry, key: usize) {
        if let Some(mut l) = self.slab.try_remove(key) {
            let _ = registry.deregister(l.transport.source());
        }
    }
}

/// Writes what is left, then shuts the write side, then drains; says what to wait for next.
fn step(l: &mut Linger) -> Step {
    while !l.out.is_empty() {
        match l.transport.write(&l.out) {
            Ok(0) => return Step::Done,
            Ok(n) => l.out.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Done,
        }
    }
    if l.transport.flush_pending().is_err() {
        return Step::Done;
    }
    if !l.shut && l.out.is_empty() && !l.transport.pending_output() {
        if !l.finished {
            l.finished = true;
            l.transport.finish();
            if l.transport.flush_pending().is_err() {
                return Step::Done;
            }
        }
        if !l.transport.pending_output() {
            if l.transport.shutdown_write().is_err() {
                return Step::Done;
            }
            l.shut = true;
        }
    }
    // Read what the client sends meanwhile: unread input is what turns a close into a reset.
    match l.transport.discard(l.left) {
        Ok((n, ended)) => {
            l.left -= n;
            if ended || l.left == 0 {
                Step::Done
            } else {
                Step::Wait
            }
        }
        Err(_) => Step::Done,
    }
}
