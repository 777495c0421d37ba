//! tern: a fast MQTT 3.1/3.1.1/5.0 broker for edge servers.
//!
//! `Broker::start(config)` runs it in the background (what `main` and the tests do); `codec` and
//! `topic` are the sans-io pieces it is built on.
//!
//! ```
//! use std::io::{Read, Write};
//!
//! use bytes::BytesMut;
//! use tern::codec::{decode, Connect, Packet, ProtocolVersion, ReasonCode};
//! use tern::{Broker, Config};
//!
//! // A broker on an ephemeral loopback port, one worker.
//! let broker = Broker::start(Config { port: 0, workers: 1, ..Config::default() }).unwrap();
//! let mut socket = std::net::TcpStream::connect(broker.local_addr()).unwrap();
//!
//! let mut out = BytesMut::new();
//! Connect::new("doc-example").encode(&mut out);
//! socket.write_all(&out).unwrap();
//!
//! let mut buf = BytesMut::new();
//! let connack = loop {
//!     if let Some(p) = decode(&mut buf, Some(ProtocolVersion::V311), 1 << 20).unwrap() {
//!         break p;
//!     }
//!     let mut chunk = [0u8; 64];
//!     let n = socket.read(&mut chunk).unwrap();
//!     buf.extend_from_slice(&chunk[..n]);
//! };
//! assert!(matches!(connack, Packet::ConnAck(a) if a.code == ReasonCode::SUCCESS));
//! broker.shutdown();
//! ```

pub mod alloc;
pub mod auth;
pub mod broker;
pub mod codec;
pub mod config;
pub mod metrics;
pub mod ring;
pub mod router;
pub mod session;
pub mod store;
pub mod sys;
pub mod topic;
pub mod transport;
mod worker;

pub use broker::{Broker, Stopper};
pub use config::Config;
