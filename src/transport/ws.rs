//! MQTT over WebSockets (spec chapter 6): tern reads the HTTP upgrade itself (bounded, parsed
//! with httparse) and answers it; after that tungstenite's `WebSocketContext` does the framing on
//! bytes tern hands it. Only binary frames carry MQTT [MQTT-6.0.0-1]; their payloads feed the
//! same decoder as TCP, so a packet may span frames and a frame may hold several
//! [MQTT-6.0.0-2]; the `mqtt` subprotocol is required and echoed [MQTT-6.0.0-4]. Frames and
//! messages are bounded by `max_packet_size` (plus room for a second packet's start), never by
//! tungstenite's 64 MiB default, and a frame header announcing more is refused before its
//! payload is buffered.

use std::io::{self, Read, Write};

use bytes::{Buf, BytesMut};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::Message;

use super::{would_block, Lower, PENDING_MAX};

/// The longest HTTP upgrade request accepted.
const MAX_REQUEST: usize = 8 * 1024;

enum State {
    Handshake,
    Open(Box<WebSocketContext>),
}

pub struct WsStream {
    pub(super) lower: Lower,
    state: State,
    /// Raw bytes read from below, not yet unframed.
    input: BytesMut,
    /// Frames (or the handshake answer) not yet taken by the layer below.
    output: Vec<u8>,
    max_message: usize,
}

/// tungstenite reads from and writes to this: tern's buffers, never the socket.
struct Pipe<'a> {
    input: &'a mut BytesMut,
    output: &'a mut Vec<u8>,
}

impl Read for Pipe<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(would_block());
        }
        let n = out.len().min(self.input.len());
        out[..n].copy_from_slice(&self.input[..n]);
        self.input.advance(n);
        Ok(n)
    }
}

impl Write for Pipe<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

impl WsStream {
    pub fn new(lower: Lower, max_packet_size: usize) -> WsStream {
        WsStream {
            lower,
            state: State::Handshake,
            input: BytesMut::new(),
            output: Vec::new(),
            // A frame may end one packet and begin the next.
            max_message: max_packet_size.saturating_mul(2).max(64 * 1024),
        }
    }

    pub fn read_into(&mut self, buf: &mut BytesMut, arrived: &mut u64) -> io::Result<usize> {
        loop {
            let State::Open(ctx) = &mut self.state else {
                self.handshake()?;
                continue;
            };
            let mut pipe = Pipe { input: &mut self.input, output: &mut self.output };
            match ctx.read(&mut pipe) {
                Ok(Message::Binary(data)) => {
                    if data.is_empty() {
                        continue;
                    }
                    buf.extend_from_slice(&data);
                    self.flush_output()?;
                    return Ok(data.len());
                }
                Ok(Message::Text(_)) => {
                    // [MQTT-6.0.0-1]: only binary frames; close with 1003 (unsupported data).
                    let frame = CloseFrame { code: CloseCode::Unsupported, reason: "MQTT needs binary frames".into() };
                    let _ = ctx.close(&mut pipe, Some(frame));
                    let _ = ctx.flush(&mut pipe);
                    let _ = self.flush_output();
                    return Err(invalid("a text frame on MQTT over WebSockets [MQTT-6.0.0-1]"));
                }
                Ok(Message::Close(_)) => {
                    let _ = ctx.flush(&mut pipe);
                    let _ = self.flush_output();
                    return Ok(0);
                }
                Ok(_) => {
                    // Ping (tungstenite queued the pong), pong, raw frame.
                    let _ = ctx.flush(&mut pipe);
                    self.flush_output()?;
                    // A client that pings without reading the pongs would grow `output` without
                    // end: past a bound it is closed.
                    if self.output.len() > 4 * PENDING_MAX {
                        return Err(invalid("WebSocket pings faster than the client reads the pongs"));
                    }
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.fill(arrived)? == 0 {
                        return Ok(0);
                    }
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => return Ok(0),
                Err(e) => {
                    let _ = self.flush_output();
                    return Err(invalid(format!("WebSocket: {e}")));
                }
            }
        }
    }

    /// Reads more raw bytes from below; `Ok(0)` at the end of the stream, `WouldBlock` if none.
    fn fill(&mut self, arrived: &mut u64) -> io::Result<usize> {
        self.lower.read_raw(&mut self.input, arrived)
    }

    /// Reads and answers the HTTP upgrade: `Ok` once open, `WouldBlock` while it is incomplete.
    fn handshake(&mut self) -> io::Result<()> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&self.input) {
                Ok(httparse::Status::Complete(len)) => {
                    let answer = upgrade(&req);
                    match answer {
                        Ok(accept) => {
                            let response = format!(
                                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                                 Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
                            );
                            self.output.extend_from_slice(response.as_bytes());
                            self.input.advance(len);
                            // tungstenite zeroes the free part of its read buffer before every
                            // read: keep it small (it grows for a large frame).
                            let config = WebSocketConfig::default()
                                .read_buffer_size(4096)
                                .max_message_size(Some(self.max_message))
                                .max_frame_size(Some(self.max_message))
                                .max_write_buffer_size(PENDING_MAX * 4)
                                .write_buffer_size(0);
                            self.state = State::Open(Box::new(WebSocketContext::new(Role::Server, Some(config))));
                            return self.flush_output();
                        }
                        Err((status, why)) => {
                            let response = format!(
                                "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: text/plain\r\n\
                                 Content-Length: {}\r\n\r\n{why}\n",
                                why.len() + 1
                            );
                            self.output.extend_from_slice(response.as_bytes());
                            let _ = self.flush_output();
                            return Err(invalid(format!("WebSocket upgrade refused ({status}): {why}")));
                        }
                    }
                }
                Ok(httparse::Status::Partial) => {
                    if self.input.len() > MAX_REQUEST {
                        self.output.extend_from_slice(
                            b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n",
                        );
                        let _ = self.flush_output();
                        return Err(invalid("WebSocket upgrade request over 8 KiB"));
                    }
                    if self.fill(&mut 0)? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                Err(e) => {
                    self.output.extend_from_slice(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
                    let _ = self.flush_output();
                    return Err(invalid(format!("not an HTTP request: {e}")));
                }
            }
        }
    }

    /// Frames MQTT bytes as one binary message; takes nothing while `PENDING_MAX` of frames wait.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.flush_output()?;
        let State::Open(ctx) = &mut self.state else { return Err(would_block()) };
        if self.output.len() >= PENDING_MAX || self.lower.pending_output() {
            return Err(would_block());
        }
        let n = bytes.len().min(PENDING_MAX);
        let mut pipe = Pipe { input: &mut self.input, output: &mut self.output };
        let msg = Message::Binary(tungstenite::Bytes::copy_from_slice(&bytes[..n]));
        ctx.write(&mut pipe, msg).map_err(|e| invalid(format!("WebSocket: {e}")))?;
        ctx.flush(&mut pipe).map_err(|e| invalid(format!("WebSocket: {e}")))?;
        self.flush_output()?;
        Ok(n)
    }

    pub fn pending_output(&self) -> bool {
        !self.output.is_empty() || self.lower.pending_output()
    }

    /// Queues a normal Close frame: the end of the stream (over TLS the FIN follows it, without
    /// close_notify, which could overtake a frame still waiting here).
    pub fn finish(&mut self) {
        if let State::Open(ctx) = &mut self.state {
            let mut pipe = Pipe { input: &mut self.input, output: &mut self.output };
            let _ = ctx.close(&mut pipe, Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }));
            let _ = ctx.flush(&mut pipe);
        }
    }

    pub fn flush_pending(&mut self) -> io::Result<()> {
        self.flush_output()
    }

    fn flush_output(&mut self) -> io::Result<()> {
        self.lower.flush_pending()?;
        while !self.output.is_empty() {
            match self.lower.write_raw(&self.output) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Checks an upgrade request; the `Sec-WebSocket-Accept` value, or the status and why not.
fn upgrade(req: &httparse::Request<'_, '_>) -> Result<String, (&'static str, &'static str)> {
    const BAD: &str = "400 Bad Request";
    if req.method != Some("GET") {
        return Err(("405 Method Not Allowed", "MQTT over WebSockets needs a GET upgrade"));
    }
    let header = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    let has_token = |name: &str, token: &str| {
        header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err((BAD, "this listener speaks MQTT over WebSockets: send an Upgrade: websocket request"));
    }
    if header("sec-websocket-version") != Some(b"13".as_slice()) {
        return Err((BAD, "Sec-WebSocket-Version 13 is required"));
    }
    // [MQTT-6.0.0-3]/[MQTT-6.0.0-4]: the client offers "mqtt" and the server answers with it.
    if !req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .any(|h| std::str::from_utf8(h.value).is_ok_and(|v| v.split(',').any(|t| t.trim() == "mqtt")))
    {
        return Err((BAD, "the mqtt subprotocol is required (Sec-WebSocket-Protocol: mqtt)"));
    }
    let Some(key) = header("sec-websocket-key") else { return Err((BAD, "Sec-WebSocket-Key is missing")) };
    Ok(tungstenite::handshake::derive_accept_key(key))
}
