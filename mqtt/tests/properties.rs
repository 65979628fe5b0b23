//! Property tests over the public API: round trips for every packet type,
//! incremental input, and arbitrary or corrupted input never panicking.

use bytes::{Bytes, BytesMut};
use iot_mqtt::topic::{validate_topic_filter, validate_topic_name};
use iot_mqtt::{
    ConnAck, Connect, ConnectReturnCode, MAX_REMAINING_LENGTH, MqttStr, Packet, PubAck, PubComp,
    PubRec, PubRel, Publish, QoS, SubAck, Subscribe, SubscribeFilter, SubscribeReturnCode,
    UnsubAck, Unsubscribe, Will, frame_len,
};
use proptest::collection::vec;
use proptest::prelude::*;

const MAX: usize = MAX_REMAINING_LENGTH;

fn mqtt_str() -> impl Strategy<Value = MqttStr> {
    // Any printable Unicode, including multi-byte characters; never U+0000.
    "\\PC{0,12}".prop_map(|s| MqttStr::try_from(s).expect("printable text is a valid MQTT string"))
}

fn topic_name() -> impl Strategy<Value = MqttStr> {
    "[a-zA-Z0-9 _$é-]{1,8}(/[a-z0-9é]{0,6}){0,4}".prop_map(|s| {
        assert_eq!(validate_topic_name(&s), Ok(()), "{s}");
        MqttStr::try_from(s).expect("generated topic is a valid MQTT string")
    })
}

fn topic_filter() -> impl Strategy<Value = MqttStr> {
    let level = prop_oneof![Just("+".to_owned()), "[a-z0-9é]{0,5}"];
    (vec(level, 1..5), any::<bool>())
        .prop_map(|(levels, multi)| {
            let mut filter = levels.join("/");
            if multi {
                filter.push_str("/#");
            }
            filter
        })
        .prop_filter("valid filter", |f| validate_topic_filter(f).is_ok())
        .prop_map(|f| MqttStr::try_from(f).expect("generated filter is a valid MQTT string"))
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn pkid() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn binary(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn connect() -> impl Strategy<Value = Packet> {
    let will = (topic_name(), binary(40), qos(), any::<bool>()).prop_map(
        |(topic, payload, qos, retain)| Will {
            topic,
            payload,
            qos,
            retain,
        },
    );
    let credentials = prop_oneof![
        Just((None, None)),
        mqtt_str().prop_map(|u| (Some(u), None)),
        (mqtt_str(), binary(20)).prop_map(|(u, p)| (Some(u), Some(p))),
    ];
    (
        any::<u16>(),
        mqtt_str(),
        any::<bool>(),
        proptest::option::of(will),
        credentials,
    )
        .prop_map(
            |(keep_alive, client_id, clean_session, will, (username, password))| {
                Packet::Connect(Connect {
                    keep_alive,
                    client_id,
                    clean_session,
                    will,
                    username,
                    password,
                })
            },
        )
}

fn connack() -> impl Strategy<Value = Packet> {
    (0..=5u8, any::<bool>()).prop_map(|(code, session_present)| {
        let code = ConnectReturnCode::try_from(code).expect("0..=5 are return codes");
        let session_present = session_present && code == ConnectReturnCode::Accepted;
        Packet::ConnAck(ConnAck::new(code, session_present))
    })
}

fn publish() -> impl Strategy<Value = Packet> {
    // Payloads past 127 bytes exercise 2-byte remaining lengths.
    let payload = prop_oneof![binary(64), binary(2000)];
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        pkid(),
        payload,
    )
        .prop_map(|(qos, dup, retain, topic, pkid, payload)| {
            let at_most_once = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !at_most_once,
                qos,
                retain,
                topic,
                pkid: if at_most_once { 0 } else { pkid },
                payload,
            })
        })
}

fn subscribe() -> impl Strategy<Value = Packet> {
    let filter = (topic_filter(), qos()).prop_map(|(f, q)| SubscribeFilter::new(f, q));
    (pkid(), vec(filter, 1..6))
        .prop_map(|(pkid, filters)| Packet::Subscribe(Subscribe { pkid, filters }))
}

fn suback() -> impl Strategy<Value = Packet> {
    let code = prop_oneof![
        qos().prop_map(SubscribeReturnCode::Success),
        Just(SubscribeReturnCode::Failure)
    ];
    (pkid(), vec(code, 1..6)).prop_map(|(pkid, codes)| Packet::SubAck(SubAck::new(pkid, codes)))
}

fn unsubscribe() -> impl Strategy<Value = Packet> {
    (pkid(), vec(topic_filter(), 1..6))
        .prop_map(|(pkid, filters)| Packet::Unsubscribe(Unsubscribe { pkid, filters }))
}

fn packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        connect(),
        connack(),
        publish(),
        pkid().prop_map(|pkid| Packet::PubAck(PubAck { pkid })),
        pkid().prop_map(|pkid| Packet::PubRec(PubRec { pkid })),
        pkid().prop_map(|pkid| Packet::PubRel(PubRel { pkid })),
        pkid().prop_map(|pkid| Packet::PubComp(PubComp { pkid })),
        subscribe(),
        suback(),
        unsubscribe(),
        pkid().prop_map(|pkid| Packet::UnsubAck(UnsubAck { pkid })),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect),
    ]
}

fn encode(packet: &Packet) -> BytesMut {
    let mut out = BytesMut::new();
    packet.write(&mut out);
    out
}

/// Feeds `data` in the given chunk sizes, decoding after each chunk as a
/// server would. Returns the packets decoded before the first error, if any.
fn feed(data: &[u8], chunks: &[usize], max: usize) -> Vec<Packet> {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    let mut rest = data;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().expect("chunk sizes are never empty")).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            let before = buf.clone();
            let expected_len = frame_len(&buf, max);
            match Packet::read(&mut buf, max) {
                Ok(Some(packet)) => {
                    let consumed = before.len() - buf.len();
                    assert_eq!(expected_len, Ok(Some(consumed)));
                    packets.push(packet);
                }
                Ok(None) => {
                    assert_eq!(buf, before, "incomplete input must not be consumed");
                    assert_eq!(expected_len, Ok(None));
                    break;
                }
                Err(e) => {
                    // Header errors must be reported by frame_len too.
                    if let Err(header_error) = expected_len {
                        assert_eq!(header_error, e);
                    }
                    return packets;
                }
            }
        }
    }
    packets
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn write_then_read_is_identity(packet in packet(), trailing in vec(any::<u8>(), 0..8)) {
        let mut buf = encode(&packet);
        prop_assert_eq!(buf.len(), packet.len());
        let len = buf.len();
        buf.extend_from_slice(&trailing);
        prop_assert_eq!(frame_len(&buf, MAX), Ok(Some(len)));
        let decoded = Packet::read(&mut buf, MAX).unwrap();
        prop_assert_eq!(decoded, Some(packet));
        prop_assert_eq!(&buf[..], &trailing[..]);
    }

    #[test]
    fn byte_by_byte_is_none_until_the_last_byte(packet in packet()) {
        let encoded = encode(&packet);
        let mut buf = BytesMut::new();
        for (i, &byte) in encoded.iter().enumerate() {
            buf.extend_from_slice(&[byte]);
            let decoded = Packet::read(&mut buf, MAX).unwrap();
            if i + 1 < encoded.len() {
                prop_assert_eq!(decoded, None);
                prop_assert_eq!(&buf[..], &encoded[..=i]);
            } else {
                prop_assert_eq!(decoded, Some(packet.clone()));
                prop_assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn streams_of_packets_decode_in_any_chunking(
        packets in vec(packet(), 1..8),
        chunks in vec(1..64usize, 1..8),
    ) {
        let mut stream = BytesMut::new();
        for packet in &packets {
            packet.write(&mut stream);
        }
        prop_assert_eq!(feed(&stream, &chunks, MAX), packets);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        data in vec(any::<u8>(), 0..512),
        chunks in vec(1..32usize, 1..8),
        max in prop_oneof![Just(MAX), 0..256usize],
    ) {
        feed(&data, &chunks, max);
    }

    /// A frame with a valid header and a random body either fails to decode
    /// or re-encodes to exactly the same bytes: decoding accepts only the
    /// canonical form.
    #[test]
    fn random_bodies_decode_canonically(
        byte1 in prop::sample::select(vec![
            0x10u8, 0x20, 0x30, 0x31, 0x32, 0x33, 0x34, 0x3b, 0x3d, 0x40, 0x50, 0x62,
            0x70, 0x82, 0x90, 0xa2, 0xb0, 0xc0, 0xd0, 0xe0,
        ]),
        body in vec(any::<u8>(), 0..64),
    ) {
        let mut frame = BytesMut::from(&[byte1][..]);
        // Bodies under 128 bytes: one length byte.
        frame.extend_from_slice(&[u8::try_from(body.len()).unwrap()]);
        frame.extend_from_slice(&body);
        let original = frame.clone();
        if let Ok(Some(packet)) = Packet::read(&mut frame, MAX) {
            prop_assert!(frame.is_empty());
            prop_assert_eq!(encode(&packet), original);
        }
    }

    /// Same property on a valid packet with one corrupted byte, which reaches
    /// deeper into CONNECT and SUBSCRIBE than random bodies do.
    #[test]
    fn corrupted_packets_decode_canonically_or_fail(
        packet in packet(),
        index in any::<prop::sample::Index>(),
        value in any::<u8>(),
    ) {
        let mut bytes = encode(&packet);
        let i = index.index(bytes.len());
        bytes[i] = value;
        let original = bytes.clone();
        let result = Packet::read(&mut bytes, MAX);
        if let Ok(Some(decoded)) = result
            && bytes.is_empty()
        {
            prop_assert_eq!(encode(&decoded), original);
        }
    }
}
