//! A listener with `protocol = "http"`: `GET /metrics` (Prometheus text format 0.0.4) and `GET /`
//! (the status page, one self-contained HTML file that polls `/metrics`). Served by one thread of
//! its own, away from the workers: a scrape reads the workers' published counters and never
//! touches a worker. Requests are read with a deadline and a size bound, one at a time, and
//! every connection is closed after its response.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::Shared;

const STATUS_PAGE: &str = include_str!("status.html");
/// A request head larger than this is refused (431).
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request and read the response.
const DEADLINE: Duration = Duration::from_secs(2);

pub fn start(listener: TcpListener, shared: Arc<Shared>) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("tern-http".into()).spawn(move || serve(listener, &shared))
}

fn serve(listener: TcpListener, shared: &Shared) {
    while !shared.shutdown.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = handle(stream, shared) {
                    log::debug!("http: {e}");
                }
            }
            // Checked for shutdown between accepts; a scrape waits at most this long.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                log::warn!("http: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn handle(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    stream.set_write_timeout(Some(DEADLINE))?;
    let started = Instant::now();
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    let (status, kind, body) = loop {
        if started.elapsed() > DEADLINE {
            return Ok(());
        }
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => break respond(req.method, req.path, shared),
            Ok(httparse::Status::Partial) if len < MAX_REQUEST => continue,
            Ok(httparse::Status::Partial) => {
                break ("431 Request Header Fields Too Large", "text/plain", "too large\n".into())
            }
            Err(_) => break ("400 Bad Request", "text/plain", "bad request\n".into()),
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

fn respond(method: Option<&str>, path: Option<&str>, shared: &Shared) -> (&'static str, &'static str, String) {
    let path = path.unwrap_or("/").split('?').next().unwrap_or("/");
    match (method, path) {
        (Some("GET"), "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", super::render(shared)),
        (Some("GET"), "/") => ("200 OK", "text/html; charset=utf-8", STATUS_PAGE.to_string()),
        (Some("GET"), _) => ("404 Not Found", "text/plain", "not found: try /metrics or /\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    }
}
