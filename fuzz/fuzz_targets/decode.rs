//! Hostile bytes into every decoder entry point, for every protocol version. A panic, an abort or
//! an out-of-memory is a finding.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tern::codec::{decode, next_frame, ProtocolVersion, PublishRef};

const MAX: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    for v in [None, Some(ProtocolVersion::V31), Some(ProtocolVersion::V311), Some(ProtocolVersion::V5)] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(_)) = decode(&mut buf, v, MAX) {}
        let mut at = 0;
        while let Ok(Some((first, hl, size))) = next_frame(&data[at..], v, MAX) {
            if first >> 4 == 3 {
                let _ = PublishRef::parse(&data[at + hl..at + size], first & 0x0f, v.unwrap_or(ProtocolVersion::V5));
            }
            at += size;
        }
    }
});
