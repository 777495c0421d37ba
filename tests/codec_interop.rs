//! Differential tests against an independent codec (`mqttbytes`): what it encodes we decode to the
//! same values, and what we encode it decodes to the same values, for 3.1.1 and 5.0.

use bytes::{Bytes, BytesMut};
use mqttbytes::{v4, v5, QoS as TheirQoS};
use proptest::prelude::*;
use tern::codec::*;

const MAX: usize = 1 << 20;

fn their_qos(q: QoS) -> TheirQoS {
    match q {
        QoS::AtMostOnce => TheirQoS::AtMostOnce,
        QoS::AtLeastOnce => TheirQoS::AtLeastOnce,
        QoS::ExactlyOnce => TheirQoS::ExactlyOnce,
    }
}

fn ours(bytes: &BytesMut, v: ProtocolVersion) -> Packet {
    let mut buf = bytes.clone();
    let version = if bytes[0] >> 4 == 1 { None } else { Some(v) };
    let p = decode(&mut buf, version, MAX).expect("we decode what mqttbytes encodes").expect("complete");
    assert!(buf.is_empty());
    p
}

fn encode(p: &Packet, v: ProtocolVersion) -> BytesMut {
    let mut b = BytesMut::new();
    p.encode(v, &mut b);
    b
}

proptest! {
    #[test]
    fn publish_311_both_ways(topic in "[a-z]{1,8}(/[a-z0-9]{1,8}){0,3}", q in 0u8..3, retain: bool, id in 1u16.., payload in prop::collection::vec(any::<u8>(), 0..300)) {
        let qos = QoS::from_u8(q).unwrap();
        let mut theirs = v4::Publish::new(topic.clone(), their_qos(qos), payload.clone());
        theirs.retain = retain;
        if qos != QoS::AtMostOnce { theirs.pkid = id; }
        let mut wire = BytesMut::new();
        theirs.write(&mut wire).unwrap();
        let Packet::Publish(p) = ours(&wire, ProtocolVersion::V311) else { panic!("not a publish") };
        prop_assert_eq!(p.topic.as_str(), topic.as_str());
        prop_assert_eq!(p.qos, qos);
        prop_assert_eq!(p.retain, retain);
        prop_assert_eq!(p.packet_id.map(|i| i.get()), (qos != QoS::AtMostOnce).then_some(id));
        prop_assert_eq!(&p.payload[..], &payload[..]);

        let mut back = encode(&Packet::Publish(p), ProtocolVersion::V311);
        prop_assert_eq!(&back[..], &wire[..], "byte-identical encoding");
        match v4::read(&mut back, MAX).unwrap() {
            v4::Packet::Publish(t) => prop_assert_eq!(t, theirs),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn publish_5_with_properties_both_ways(topic in "[a-z]{1,8}(/[a-z]{1,8}){0,3}", q in 0u8..3, id in 1u16.., expiry: Option<u32>, alias in prop::option::of(1u16..), ct in prop::option::of("[a-z/]{1,10}"), ups in prop::collection::vec(("[a-z]{1,5}", "[a-z]{0,5}"), 0..3), payload in prop::collection::vec(any::<u8>(), 0..100)) {
        let qos = QoS::from_u8(q).unwrap();
        let mut theirs = v5::Publish::new(topic.clone(), their_qos(qos), payload.clone());
        if qos != QoS::AtMostOnce { theirs.pkid = id; }
        theirs.properties = Some(v5::PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: expiry,
            topic_alias: alias,
            response_topic: Some("reply/to".into()),
            correlation_data: Some(Bytes::from_static(b"cd")),
            user_properties: ups.clone(),
            subscription_identifiers: vec![],
            content_type: ct.clone(),
        });
        let mut wire = BytesMut::new();
        theirs.write(&mut wire).unwrap();
        let Packet::Publish(p) = ours(&wire, ProtocolVersion::V5) else { panic!("not a publish") };
        let props = p.properties.as_deref().expect("properties decoded");
        prop_assert_eq!(props.message_expiry_interval, expiry);
        prop_assert_eq!(props.topic_alias, alias);
        prop_assert_eq!(props.content_type.as_ref().map(|s| s.to_string()), ct);
        prop_assert_eq!(props.response_topic.as_ref().unwrap().as_str(), "reply/to");
        prop_assert_eq!(&props.correlation_data.as_ref().unwrap()[..], b"cd");
        let got_ups: Vec<(String, String)> = props.user_properties.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        prop_assert_eq!(got_ups, ups);
        prop_assert_eq!(&p.payload[..], &payload[..]);

        let mut back = encode(&Packet::Publish(p), ProtocolVersion::V5);
        match v5::read(&mut back, MAX).unwrap() {
            v5::Packet::Publish(t) => prop_assert_eq!(t, theirs),
            other => prop_assert!(false, "{:?}", other),
        }
    }
}

#[test]
fn connect_311_both_ways() {
    let mut theirs = v4::Connect::new("client-1");
    theirs.keep_alive = 30;
    theirs.clean_session = false;
    theirs.last_will = Some(v4::LastWill::new("will/t", "gone", TheirQoS::AtLeastOnce, true));
    theirs.login = Some(v4::Login::new("user", "secret"));
    let mut wire = BytesMut::new();
    theirs.write(&mut wire).unwrap();
    let Packet::Connect(c) = ours(&wire, ProtocolVersion::V311) else { panic!() };
    assert_eq!(c.protocol, ProtocolVersion::V311);
    assert_eq!((c.client_id.as_str(), c.keep_alive, c.clean_start), ("client-1", 30, false));
    let will = c.will.as_ref().unwrap();
    assert_eq!(
        (will.topic.as_str(), &will.payload[..], will.qos, will.retain),
        ("will/t", &b"gone"[..], QoS::AtLeastOnce, true)
    );
    assert_eq!(c.username.as_ref().unwrap(), "user");
    assert_eq!(&c.password.as_ref().unwrap()[..], b"secret");

    let mut back = encode(&Packet::Connect(c), ProtocolVersion::V311);
    assert_eq!(back, wire);
    assert_eq!(v4::read(&mut back, MAX).unwrap(), v4::Packet::Connect(theirs));
}

#[test]
fn connect_5_both_ways() {
    let mut theirs = v5::Connect::new("c5");
    theirs.properties = Some(v5::ConnectProperties {
        session_expiry_interval: Some(120),
        receive_maximum: Some(10),
        max_packet_size: Some(4096),
        topic_alias_max: Some(5),
        request_response_info: Some(1),
        request_problem_info: Some(0),
        user_properties: vec![("a".into(), "b".into())],
        authentication_method: None,
        authentication_data: None,
    });
    let mut wire = BytesMut::new();
    theirs.write(&mut wire).unwrap();
    let Packet::Connect(c) = ours(&wire, ProtocolVersion::V5) else { panic!() };
    assert_eq!(c.protocol, ProtocolVersion::V5);
    assert_eq!(c.properties.session_expiry_interval, Some(120));
    assert_eq!(c.properties.receive_maximum, Some(10));
    assert_eq!(c.properties.maximum_packet_size, Some(4096));
    assert_eq!(c.properties.topic_alias_maximum, Some(5));
    assert_eq!(c.properties.user_properties, vec![("a".into(), "b".into())]);

    let mut back = encode(&Packet::Connect(c), ProtocolVersion::V5);
    assert_eq!(v5::read(&mut back, MAX).unwrap(), v5::Packet::Connect(theirs));
}

#[test]
fn subscribe_and_acks_311_both_ways() {
    let mut theirs = v4::Subscribe::new_many(vec![
        v4::SubscribeFilter::new("a/+".into(), TheirQoS::AtLeastOnce),
        v4::SubscribeFilter::new("b/#".into(), TheirQoS::ExactlyOnce),
    ]);
    theirs.pkid = 5;
    let mut wire = BytesMut::new();
    theirs.write(&mut wire).unwrap();
    let p = ours(&wire, ProtocolVersion::V311);
    let Packet::Subscribe(s) = &p else { panic!() };
    assert_eq!(s.packet_id.get(), 5);
    let got: Vec<_> = s.filters.iter().map(|(f, o)| (f.to_string(), o.qos)).collect();
    assert_eq!(got, vec![("a/+".to_string(), QoS::AtLeastOnce), ("b/#".to_string(), QoS::ExactlyOnce)]);

    let pid = PacketId::new(17).unwrap();
    let cases: Vec<(Packet, v4::Packet)> = vec![
        (Packet::PubAck(Ack::new(pid)), v4::Packet::PubAck(v4::PubAck::new(17))),
        (Packet::PubRec(Ack::new(pid)), v4::Packet::PubRec(v4::PubRec::new(17))),
        (Packet::PubRel(Ack::new(pid)), v4::Packet::PubRel(v4::PubRel::new(17))),
        (Packet::PubComp(Ack::new(pid)), v4::Packet::PubComp(v4::PubComp::new(17))),
        (
            Packet::SubAck(Box::new(SubAck {
                packet_id: pid,
                codes: vec![ReasonCode(1), ReasonCode(0x80)],
                properties: Properties::default(),
            })),
            v4::Packet::SubAck(v4::SubAck::new(
                17,
                vec![v4::SubscribeReasonCode::Success(TheirQoS::AtLeastOnce), v4::SubscribeReasonCode::Failure],
            )),
        ),
        (
            Packet::UnsubAck(Box::new(UnsubAck { packet_id: pid, codes: vec![], properties: Properties::default() })),
            v4::Packet::UnsubAck(v4::UnsubAck::new(17)),
        ),
        (
            Packet::ConnAck(Box::new(ConnAck {
                session_present: true,
                code: ReasonCode(0),
                properties: Properties::default(),
            })),
            v4::Packet::ConnAck(v4::ConnAck::new(v4::ConnectReturnCode::Success, true)),
        ),
        (Packet::PingReq, v4::Packet::PingReq),
        (Packet::PingResp, v4::Packet::PingResp),
        (Packet::Disconnect(Box::default()), v4::Packet::Disconnect),
    ];
    for (mine, theirs) in cases {
        let mut wire = encode(&mine, ProtocolVersion::V311);
        assert_eq!(ours(&wire, ProtocolVersion::V311), mine);
        assert_eq!(v4::read(&mut wire, MAX).unwrap(), theirs, "{}", mine.name());
    }
    let mut wire = encode(&p, ProtocolVersion::V311);
    assert_eq!(v4::read(&mut wire, MAX).unwrap(), v4::Packet::Subscribe(theirs));
}

#[test]
fn subscribe_5_options_both_ways() {
    let mut f = v5::SubscribeFilter::new("x/#".into(), TheirQoS::AtLeastOnce);
    f.nolocal = true;
    f.preserve_retain = true;
    f.retain_forward_rule = v5::RetainForwardRule::Never;
    let mut theirs = v5::Subscribe::new_many(vec![f]);
    theirs.pkid = 9;
    theirs.properties = Some(v5::SubscribeProperties { id: Some(77), user_properties: vec![] });
    let mut wire = BytesMut::new();
    theirs.write(&mut wire).unwrap();
    let p = ours(&wire, ProtocolVersion::V5);
    let Packet::Subscribe(s) = &p else { panic!() };
    let (filter, o) = &s.filters[0];
    assert_eq!(filter, "x/#");
    assert_eq!(
        (o.qos, o.no_local, o.retain_as_published, o.retain_handling),
        (QoS::AtLeastOnce, true, true, RetainHandling::Never)
    );
    assert_eq!(s.properties.subscription_identifiers, vec![77]);
    let mut back = encode(&p, ProtocolVersion::V5);
    assert_eq!(v5::read(&mut back, MAX).unwrap(), v5::Packet::Subscribe(theirs));
}
