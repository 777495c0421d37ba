//! Every packet type, in every protocol version, survives encode -> decode unchanged; and every
//! malformed input in the table is refused with its own error.

use bytes::{Bytes, BytesMut};
use tern::codec::*;

const V: [ProtocolVersion; 3] = [ProtocolVersion::V31, ProtocolVersion::V311, ProtocolVersion::V5];
const MAX: usize = 1 << 20;

fn pid(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

fn s(x: &str) -> MqttStr {
    MqttStr::from(x)
}

fn rich_properties() -> Properties {
    Properties {
        reason_string: Some(s("because")),
        user_properties: vec![(s("k"), s("v1")), (s("k"), s("v2")), (s("ü"), s(""))],
        ..Default::default()
    }
}

/// All packet kinds; 5.0 fields filled in only when `v` can carry them.
fn samples(v: ProtocolVersion) -> Vec<Packet> {
    let v5 = v.is_v5();
    let props = |p: Properties| if v5 { p } else { Properties::default() };
    let ack = |n: u16, reason: ReasonCode| Ack {
        packet_id: pid(n),
        reason: if v5 { reason } else { ReasonCode::SUCCESS },
        properties: v5.then(|| Box::new(rich_properties())),
    };
    let connect_props = Properties {
        session_expiry_interval: Some(3600),
        receive_maximum: Some(20),
        maximum_packet_size: Some(65536),
        topic_alias_maximum: Some(10),
        request_response_information: Some(1),
        request_problem_information: Some(0),
        authentication_method: Some(s("SCRAM-SHA-1")),
        authentication_data: Some(Bytes::from_static(b"\x00\x01")),
        user_properties: vec![(s("a"), s("b"))],
        ..Default::default()
    };
    let will_props = Properties {
        will_delay_interval: Some(5),
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        content_type: Some(s("text/plain")),
        response_topic: Some(s("reply/here")),
        correlation_data: Some(Bytes::from_static(b"corr")),
        user_properties: vec![(s("w"), s("x"))],
        ..Default::default()
    };
    let publish_props = Properties {
        payload_format_indicator: Some(0),
        message_expiry_interval: Some(10),
        topic_alias: Some(3),
        response_topic: Some(s("r/t")),
        correlation_data: Some(Bytes::from_static(b"\xff\x00")),
        subscription_identifiers: vec![1, 268_435_455],
        content_type: Some(s("application/json")),
        user_properties: vec![(s("z"), s("1")), (s("a"), s("2"))],
        ..Default::default()
    };
    let connack_props = Properties {
        session_expiry_interval: Some(0),
        receive_maximum: Some(65535),
        maximum_qos: Some(1),
        retain_available: Some(1),
        maximum_packet_size: Some(1 << 20),
        assigned_client_identifier: Some(s("auto-1")),
        topic_alias_maximum: Some(0),
        reason_string: Some(s("ok")),
        wildcard_subscription_available: Some(1),
        subscription_identifier_available: Some(1),
        shared_subscription_available: Some(1),
        server_keep_alive: Some(30),
        response_information: Some(s("resp/")),
        server_reference: Some(s("other:1883")),
        authentication_method: Some(s("m")),
        authentication_data: Some(Bytes::from_static(b"d")),
        ..Default::default()
    };
    let mut out = vec![
        Packet::Connect(Box::new(Connect::new("c"))),
        Packet::Connect(Box::new(Connect {
            protocol: v,
            clean_start: false,
            keep_alive: 65535,
            client_id: s(""),
            will: Some(Will {
                topic: s("will/topic"),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::ExactlyOnce,
                retain: true,
                properties: props(will_props),
            }),
            username: Some(s("user")),
            password: Some(Bytes::from_static(b"p\x00ss")),
            properties: props(connect_props),
            // mosquitto's bridge bit survives the round trip on 3.1 / 3.1.1.
            bridge: !v.is_v5(),
        })),
        Packet::ConnAck(Box::new(ConnAck {
            session_present: true,
            code: ReasonCode(0),
            properties: props(connack_props),
        })),
        Packet::ConnAck(Box::new(ConnAck {
            session_present: false,
            code: if v5 { ReasonCode::BAD_AUTHENTICATION_METHOD } else { ConnectReturnCode::NOT_AUTHORIZED },
            properties: Properties::default(),
        })),
        Packet::Publish(Publish::new("a/b", QoS::AtMostOnce, Bytes::from_static(b"hello"))),
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: s("x/ü/z"),
            packet_id: Some(pid(65535)),
            properties: if v5 { Some(Box::new(publish_props)) } else { None },
            payload: Bytes::from(vec![7u8; 300]),
        }),
        Packet::Publish(Publish {
            qos: QoS::AtLeastOnce,
            packet_id: Some(pid(1)),
            ..Publish::new("empty/payload", QoS::AtLeastOnce, Bytes::new())
        }),
        Packet::PubAck(ack(1, ReasonCode::NO_MATCHING_SUBSCRIBERS)),
        Packet::PubAck(Ack::new(pid(2))),
        Packet::PubRec(ack(3, ReasonCode::QUOTA_EXCEEDED)),
        Packet::PubRel(ack(4, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND)),
        Packet::PubComp(ack(5, ReasonCode::SUCCESS)),
        Packet::Subscribe(Box::new(Subscribe {
            packet_id: pid(6),
            filters: vec![
                (s("a/+"), SubscriptionOptions::new(QoS::AtMostOnce)),
                (
                    s("b/#"),
                    SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: v5,
                        retain_as_published: v5,
                        retain_handling: if v5 { RetainHandling::Never } else { RetainHandling::OnSubscribe },
                    },
                ),
                (s("$share/g/c"), SubscriptionOptions::new(QoS::AtLeastOnce)),
            ],
            properties: props(Properties { subscription_identifiers: vec![42], ..Default::default() }),
        })),
        Packet::SubAck(Box::new(SubAck {
            packet_id: pid(6),
            codes: vec![ReasonCode(0), ReasonCode(2), ReasonCode(0x80)],
            properties: props(rich_properties()),
        })),
        Packet::Unsubscribe(Box::new(Unsubscribe {
            packet_id: pid(7),
            filters: vec![s("a/+"), s("b/#")],
            properties: props(Properties { user_properties: vec![(s("u"), s("p"))], ..Default::default() }),
        })),
        Packet::UnsubAck(Box::new(UnsubAck {
            packet_id: pid(7),
            codes: if v5 { vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED] } else { vec![] },
            properties: props(rich_properties()),
        })),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Box::default()),
    ];
    if let Packet::Connect(c) = &mut out[0] {
        c.protocol = v;
    }
    if v5 {
        out.push(Packet::Disconnect(Box::new(Disconnect {
            reason: ReasonCode::DISCONNECT_WITH_WILL,
            properties: Properties {
                session_expiry_interval: Some(7),
                server_reference: Some(s("elsewhere")),
                ..rich_properties()
            },
        })));
        out.push(Packet::Disconnect(Box::new(Disconnect::new(ReasonCode::SESSION_TAKEN_OVER))));
        out.push(Packet::Auth(Box::default()));
        out.push(Packet::Auth(Box::new(Auth {
            reason: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: Properties {
                authentication_method: Some(s("SCRAM-SHA-1")),
                authentication_data: Some(Bytes::from_static(b"nonce")),
                ..rich_properties()
            },
        })));
    }
    out
}

#[test]
fn every_packet_round_trips_in_every_version() {
    for v in V {
        for p in samples(v) {
            let mut buf = BytesMut::new();
            p.encode(v, &mut buf);
            if let Packet::Publish(publish) = &p {
                assert_eq!(publish.size(v), buf.len(), "Publish::size agrees with encode");
            }
            // One packet followed by a second: decode takes exactly the first.
            let mut stream = buf.clone();
            stream.extend_from_slice(&[0xc0, 0x00]);
            let version = if let Packet::Connect(_) = p { None } else { Some(v) };
            let got = decode(&mut stream, version, MAX).unwrap_or_else(|e| panic!("{v:?} {p:?}: {e}"));
            assert_eq!(got.as_ref(), Some(&p), "{v:?}");
            assert_eq!(&stream[..], &[0xc0, 0x00], "{v:?} {}: consumed exactly one packet", p.name());
        }
    }
}

#[test]
fn every_strict_prefix_is_incomplete_and_consumes_nothing() {
    for v in V {
        for p in samples(v) {
            let mut full = BytesMut::new();
            p.encode(v, &mut full);
            for cut in 0..full.len() {
                let mut buf = BytesMut::from(&full[..cut]);
                let version = if let Packet::Connect(_) = p { None } else { Some(v) };
                assert_eq!(decode(&mut buf, version, MAX), Ok(None), "{v:?} {} cut at {cut}", p.name());
                assert_eq!(buf.len(), cut);
            }
        }
    }
}

#[test]
fn decoded_strings_and_payloads_share_the_read_buffer() {
    let mut buf = BytesMut::new();
    Publish::new("zero/copy", QoS::AtMostOnce, Bytes::from(vec![1u8; 64])).encode(ProtocolVersion::V311, &mut buf);
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let Some(Packet::Publish(p)) = decode(&mut buf, Some(ProtocolVersion::V311), MAX).unwrap() else { panic!() };
    assert!(range.contains(&(p.payload.as_ptr() as usize)), "payload points into the read buffer");
    assert!(range.contains(&(p.topic.as_bytes().as_ptr() as usize)), "topic points into the read buffer");
}

#[test]
fn v5_fields_are_dropped_when_encoding_for_311() {
    let mut p = Publish::new("t", QoS::AtLeastOnce, Bytes::from_static(b"x"));
    p.packet_id = Some(pid(9));
    p.properties = Some(Box::new(rich_properties()));
    let mut buf = BytesMut::new();
    p.encode(ProtocolVersion::V311, &mut buf);
    let Some(Packet::Publish(got)) = decode(&mut buf, Some(ProtocolVersion::V311), MAX).unwrap() else { panic!() };
    assert_eq!(got.properties, None);
    assert_eq!(got.payload, p.payload);
}

/// One malformed input per rule, each refused with its own error.
#[test]
fn malformed_inputs_are_refused_with_the_rule_they_break() {
    use DecodeError::*;
    use ProtocolVersion::*;
    let connect = |name: &[u8], level: u8, flags: u8, rest: &[u8]| {
        let mut body = vec![0, name.len() as u8];
        body.extend_from_slice(name);
        body.extend_from_slice(&[level, flags, 0, 60]);
        body.extend_from_slice(rest);
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    };
    let cases: Vec<(&str, Vec<u8>, ProtocolVersion, DecodeError)> = vec![
        ("5-byte remaining length", vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01], V311, MalformedVarInt),
        ("non-minimal remaining length [MQTT-1.5.5-1]", vec![0xc0, 0x80, 0x00], V5, MalformedVarInt),
        ("reserved type 0", vec![0x00, 0x00], V311, ReservedPacketType(0)),
        ("AUTH before 5.0", vec![0xf0, 0x00], V311, ReservedPacketType(15)),
        ("PINGREQ flags [MQTT-2.2.2-2]", vec![0xc1, 0x00], V311, InvalidFlags { packet_type: 12, flags: 1 }),
        (
            "SUBSCRIBE flags [MQTT-3.8.1-1]",
            vec![0x80, 0x06, 0, 1, 0, 1, b'a', 0],
            V311,
            InvalidFlags { packet_type: 8, flags: 0 },
        ),
        ("PUBREL flags [MQTT-3.6.1-1]", vec![0x60, 0x02, 0, 1], V311, InvalidFlags { packet_type: 6, flags: 0 }),
        ("QoS 3 [MQTT-3.3.1-4]", vec![0x36, 0x05, 0, 1, b'a', 0, 1], V311, InvalidQoS),
        ("DUP on QoS 0 [MQTT-3.3.1-2]", vec![0x38, 0x03, 0, 1, b'a'], V311, DupOnQoS0),
        ("topic runs past the packet", vec![0x30, 0x03, 0, 9, b'a'], V311, Truncated),
        ("packet id missing", vec![0x32, 0x03, 0, 1, b'a'], V311, Truncated),
        ("invalid UTF-8 [MQTT-1.5.3-1]", vec![0x30, 0x04, 0, 2, 0xc0, 0xaf], V311, InvalidUtf8),
        ("UTF-16 surrogate [MQTT-1.5.3-1]", vec![0x30, 0x05, 0, 3, 0xed, 0xa0, 0x80], V311, InvalidUtf8),
        ("U+0000 [MQTT-1.5.3-2]", vec![0x30, 0x04, 0, 2, b'a', 0], V311, NullCharacter),
        ("wildcard in topic [MQTT-3.3.2-2]", vec![0x30, 0x04, 0, 2, b'a', b'#'], V311, WildcardInTopicName),
        ("+ in topic [MQTT-3.3.2-2]", vec![0x30, 0x03, 0, 1, b'+'], V5, WildcardInTopicName),
        ("empty topic [MQTT-4.7.3-1]", vec![0x30, 0x02, 0, 0], V311, EmptyTopicName),
        ("empty topic without alias [MQTT-3.3.2-1]", vec![0x30, 0x03, 0, 0, 0], V5, EmptyTopicWithoutAlias),
        ("PUBLISH packet id 0 [MQTT-2.3.1-1]", vec![0x32, 0x05, 0, 1, b'a', 0, 0], V311, ZeroPacketId),
        ("PUBACK packet id 0 [MQTT-2.3.1-1]", vec![0x40, 0x02, 0, 0], V311, ZeroPacketId),
        ("PUBACK trailing byte", vec![0x40, 0x03, 0, 1, 0], V311, TrailingBytes),
        ("PINGREQ with a body", vec![0xc0, 0x01, 0], V311, TrailingBytes),
        ("SUBSCRIBE with no filter [MQTT-3.8.3-3]", vec![0x82, 0x02, 0, 1], V311, NoSubscribeFilters),
        ("UNSUBSCRIBE with no filter [MQTT-3.10.3-2]", vec![0xa2, 0x02, 0, 1], V311, NoUnsubscribeFilters),
        ("SUBACK with no code", vec![0x90, 0x02, 0, 1], V311, NoSubAckCodes),
        (
            "SUBSCRIBE reserved option bits [MQTT-3.8.3-4]",
            vec![0x82, 0x06, 0, 1, 0, 1, b'a', 0x04],
            V311,
            SubscriptionOptionsReserved,
        ),
        (
            "5.0 SUBSCRIBE reserved option bits [MQTT-3.8.3-5]",
            vec![0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x40],
            V5,
            SubscriptionOptionsReserved,
        ),
        ("SUBSCRIBE QoS 3", vec![0x82, 0x06, 0, 1, 0, 1, b'a', 0x03], V311, InvalidSubscribeQoS),
        ("retain handling 3", vec![0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x30], V5, InvalidRetainHandling),
        ("protocol name [MQTT-3.1.2-1]", connect(b"MQTX", 4, 2, &[0, 0]), V311, InvalidProtocolName),
        ("protocol level [MQTT-3.1.2-2]", connect(b"MQTT", 6, 2, &[0, 0]), V311, UnsupportedProtocolLevel(6)),
        ("MQIsdp with level 4", connect(b"MQIsdp", 4, 2, &[0, 0]), V311, UnsupportedProtocolLevel(4)),
        ("CONNECT reserved flag [MQTT-3.1.2-3]", connect(b"MQTT", 4, 3, &[0, 0]), V311, ConnectReservedFlag),
        ("will QoS without will [MQTT-3.1.2-11]", connect(b"MQTT", 4, 0x08, &[0, 0]), V311, WillFlagsWithoutWill),
        ("will retain without will [MQTT-3.1.2-11]", connect(b"MQTT", 4, 0x20, &[0, 0]), V311, WillFlagsWithoutWill),
        ("will QoS 3 [MQTT-3.1.2-14]", connect(b"MQTT", 4, 0x1c, &[0, 0, 0, 1, b't', 0, 0]), V311, InvalidWillQoS),
        (
            "password without user name [MQTT-3.1.2-22]",
            connect(b"MQTT", 4, 0x40, &[0, 0, 0, 0]),
            V311,
            PasswordWithoutUsername,
        ),
        ("wildcard in will topic", connect(b"MQTT", 4, 0x04, &[0, 0, 0, 1, b'#', 0, 0]), V311, WildcardInTopicName),
        ("CONNECT trailing bytes", connect(b"MQTT", 4, 0x02, &[0, 0, 9]), V311, TrailingBytes),
        ("CONNACK reserved flags [MQTT-3.2.2-1]", vec![0x20, 0x02, 0x02, 0], V311, ConnAckReservedFlags),
        ("CONNACK return code 6", vec![0x20, 0x02, 0, 6], V311, InvalidReasonCode { packet: "CONNACK", code: 6 }),
        (
            "PUBACK reason 0x92",
            vec![0x40, 0x03, 0, 1, 0x92],
            V5,
            InvalidReasonCode { packet: "PUBACK/PUBREC", code: 0x92 },
        ),
        ("DISCONNECT reason 0x01", vec![0xe0, 0x01, 0x01], V5, InvalidReasonCode { packet: "DISCONNECT", code: 1 }),
        ("unknown property", vec![0xe0, 0x03, 0, 1, 0x7f], V5, UnknownProperty(0x7f)),
        (
            "property not allowed in packet",
            vec![0xe0, 0x04, 0, 2, 0x23, 0],
            V5,
            PropertyNotAllowed { id: 0x23, packet: "DISCONNECT" },
        ),
        (
            "duplicate property",
            vec![0xe0, 0x0c, 0, 10, 0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2],
            V5,
            DuplicateProperty(0x11),
        ),
        ("payload format 2", vec![0x30, 0x06, 0, 1, b'a', 2, 0x01, 2], V5, InvalidPropertyValue(0x01)),
        ("topic alias 0 [MQTT-3.3.2-8]", vec![0x30, 0x07, 0, 1, b'a', 3, 0x23, 0, 0], V5, ZeroTopicAlias),
        ("subscription identifier 0", vec![0x30, 0x06, 0, 1, b'a', 2, 0x0b, 0], V5, InvalidPropertyValue(0x0b)),
        ("property block runs past packet", vec![0x30, 0x05, 0, 1, b'a', 9, 0x01], V5, Truncated),
        ("first packet not CONNECT [MQTT-3.1.0-1]", vec![0xc0, 0x00], V311, ExpectedConnect),
    ];
    for (what, bytes, v, want) in cases {
        let mut buf = BytesMut::from(&bytes[..]);
        let version = if what.contains("CONNECT [MQTT-3.1.0-1]") || bytes[0] >> 4 == 1 { None } else { Some(v) };
        assert_eq!(decode(&mut buf, version, MAX), Err(want.clone()), "{what}");
        assert!(!want.to_string().is_empty());
    }
}

#[test]
fn the_reason_code_sent_names_the_broken_rule() {
    // [MQTT-3.3.1-4]: both QoS bits set is a Malformed Packet (0x81), not a protocol error.
    assert_eq!(DecodeError::InvalidQoS.reason_code(), ReasonCode::MALFORMED_PACKET);
    // [MQTT-3.3.2-8]: a topic alias of 0 gets DISCONNECT 0x94 Topic Alias invalid.
    assert_eq!(DecodeError::ZeroTopicAlias.reason_code(), ReasonCode::TOPIC_ALIAS_INVALID);
}

#[test]
fn oversized_packets_are_refused_from_the_header_alone() {
    // A header announcing 200 MB: refused with 3 bytes in hand, before any body is buffered.
    let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x01][..]);
    assert_eq!(
        decode(&mut buf, Some(ProtocolVersion::V311), 1024),
        Err(DecodeError::PacketTooLarge { size: 2_097_157, max: 1024 })
    );
    assert_eq!(DecodeError::PacketTooLarge { size: 1, max: 0 }.reason_code(), ReasonCode::PACKET_TOO_LARGE);
}

#[test]
fn reason_codes_classify_errors_for_v5_disconnects() {
    assert_eq!(DecodeError::Truncated.reason_code(), ReasonCode::MALFORMED_PACKET);
    assert_eq!(DecodeError::DuplicateProperty(1).reason_code(), ReasonCode::PROTOCOL_ERROR);
    assert_eq!(DecodeError::UnsupportedProtocolLevel(9).reason_code(), ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
    assert_eq!(DecodeError::WildcardInTopicName.reason_code(), ReasonCode::TOPIC_NAME_INVALID);
}
