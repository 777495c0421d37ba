//! tern: a fast MQTT 3.1/3.1.1/5.0 broker for edge servers.
//!
//! `Broker::start(config)` runs it in the background (what `main` and the tests do); `codec` and
//! `topic` are the sans-io pieces it is built on.

pub mod broker;
pub mod codec;
pub mod config;
pub mod ring;
pub mod session;
pub mod sys;
pub mod topic;
mod worker;

pub use broker::{Broker, Stopper};
pub use config::Config;
