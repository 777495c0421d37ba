//! tern: a fast MQTT 3.1/3.1.1/5.0 broker for edge servers.

pub mod codec;
pub mod topic;
