//! Hostile bytes: random input and random mutations of valid packets never panic, and the
//! decoder never allocates more than a small multiple of the bytes it was given.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tern::codec::*;

struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only counts requested bytes per thread.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + layout.size()));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + new_size));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const VERSIONS: [Option<ProtocolVersion>; 4] =
    [None, Some(ProtocolVersion::V31), Some(ProtocolVersion::V311), Some(ProtocolVersion::V5)];

/// Decodes everything in `input` for one version; returns the bytes the decoder allocated.
fn decode_all(input: &[u8], version: Option<ProtocolVersion>, max: usize) -> usize {
    let mut buf = BytesMut::from(input);
    let mut packets = Vec::with_capacity(input.len() / 2 + 1);
    let mut used = 0;
    loop {
        let before = ALLOCATED.with(|a| a.get());
        let r = decode(&mut buf, version, max);
        used += ALLOCATED.with(|a| a.get()) - before;
        match r {
            Ok(Some(p)) => packets.push(p),
            Ok(None) | Err(_) => break,
        }
    }
    used
}

/// What a decoder may allocate for `n` input bytes: the boxed CONNECT and property blocks, and
/// `Vec`s whose entries cost a bounded multiple of their minimum wire size.
fn allowance(n: usize) -> usize {
    64 * n + 4096
}

fn arb_str() -> impl Strategy<Value = String> {
    "[a-z/ü]{0,12}"
}

fn arb_topic() -> impl Strategy<Value = String> {
    "[a-z]{1,6}(/[a-z]{0,6}){0,4}"
}

fn arb_properties() -> impl Strategy<Value = Properties> {
    (
        prop::option::of(0u8..=1),
        prop::option::of(any::<u32>()),
        prop::option::of(arb_str()),
        prop::option::of(arb_topic()),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..8)),
        prop::collection::vec(1u32..=268_435_455, 0..3),
        prop::collection::vec((arb_str(), arb_str()), 0..4),
        prop::option::of(1u16..),
    )
        .prop_map(|(pfi, mei, ct, rt, cd, sids, ups, alias)| Properties {
            payload_format_indicator: pfi,
            message_expiry_interval: mei,
            content_type: ct.map(MqttStr::from),
            response_topic: rt.map(MqttStr::from),
            correlation_data: cd.map(Bytes::from),
            subscription_identifiers: sids,
            user_properties: ups.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            topic_alias: alias,
            ..Default::default()
        })
}

fn arb_publish() -> impl Strategy<Value = Publish> {
    (
        arb_topic(),
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        1u16..,
        prop::collection::vec(any::<u8>(), 0..200),
        arb_properties(),
    )
        .prop_map(|(topic, qos, dup, retain, id, payload, props)| {
            let qos = QoS::from_u8(qos).unwrap();
            Publish {
                dup: dup && qos != QoS::AtMostOnce,
                qos,
                retain,
                topic: topic.into(),
                packet_id: (qos != QoS::AtMostOnce).then(|| PacketId::new(id).unwrap()),
                properties: (!props.is_empty()).then(|| Box::new(props)),
                payload: payload.into(),
            }
        })
}

fn arb_packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        arb_publish().prop_map(Packet::Publish),
        (1u16.., prop::collection::vec((arb_topic(), 0u8..3, any::<bool>()), 1..5)).prop_map(|(id, fs)| {
            Packet::Subscribe(Box::new(Subscribe {
                packet_id: PacketId::new(id).unwrap(),
                filters: fs
                    .into_iter()
                    .map(|(f, q, nl)| {
                        let mut o = SubscriptionOptions::new(QoS::from_u8(q).unwrap());
                        o.no_local = nl;
                        (f.into(), o)
                    })
                    .collect(),
                properties: Properties::default(),
            }))
        }),
        (arb_str(), any::<bool>(), arb_topic(), prop::option::of(arb_str())).prop_map(|(id, clean, wt, user)| {
            let mut c = Connect::new(id.as_str());
            c.protocol = ProtocolVersion::V5;
            c.clean_start = clean;
            c.will = Some(Will {
                topic: wt.into(),
                payload: Bytes::from_static(b"w"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties { will_delay_interval: Some(3), ..Default::default() },
            });
            c.username = user.map(MqttStr::from);
            Packet::Connect(Box::new(c))
        }),
        (1u16..).prop_map(|id| Packet::PubRel(Ack::new(PacketId::new(id).unwrap()))),
        Just(Packet::PingReq),
        Just(Packet::Disconnect(Box::new(Disconnect::new(ReasonCode::DISCONNECT_WITH_WILL)))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_nor_overallocate(input in prop::collection::vec(any::<u8>(), 0..512)) {
        for v in VERSIONS {
            let used = decode_all(&input, v, 1 << 20);
            prop_assert!(used <= allowance(input.len()), "{used} bytes for {} input bytes", input.len());
        }
    }

    #[test]
    fn mutated_packets_never_panic_nor_overallocate(
        p in arb_packet(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let mut bytes = BytesMut::new();
        p.encode(ProtocolVersion::V5, &mut bytes);
        let mut bytes = bytes.to_vec();
        for (at, value, op) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = value,
                1 => bytes[i] ^= 1 << (value % 8),
                2 => bytes.insert(i, value),
                _ => bytes.truncate(i),
            }
        }
        for v in VERSIONS {
            let used = decode_all(&bytes, v, 1 << 20);
            prop_assert!(used <= allowance(bytes.len()), "{used} bytes for {} input bytes", bytes.len());
        }
    }

    #[test]
    fn v5_publish_round_trips(p in arb_publish()) {
        let mut buf = BytesMut::new();
        p.encode(ProtocolVersion::V5, &mut buf);
        prop_assert_eq!(p.size(ProtocolVersion::V5), buf.len());
        let got = decode(&mut buf, Some(ProtocolVersion::V5), 1 << 20).unwrap();
        prop_assert_eq!(got, Some(Packet::Publish(p)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn any_max_packet_size_is_respected(p in arb_publish(), max in 2usize..400) {
        let mut buf = BytesMut::new();
        p.encode(ProtocolVersion::V5, &mut buf);
        let size = buf.len();
        match decode(&mut buf, Some(ProtocolVersion::V5), max) {
            Ok(Some(_)) => prop_assert!(size <= max),
            Err(DecodeError::PacketTooLarge { .. }) => prop_assert!(size > max),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}

#[test]
fn a_huge_announced_length_allocates_nothing() {
    // 268 MB announced, 6 bytes sent: incomplete, and no buffer is grown to fit.
    let input = [0x30u8, 0xff, 0xff, 0xff, 0x7f, 0x00];
    let used = decode_all(&input, Some(ProtocolVersion::V311), MAX_PACKET_SIZE);
    assert_eq!(used, 0);
}
