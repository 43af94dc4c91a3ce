use super::*;

fn round_trip(p: Packet, v: Version) {
    let mut bytes = Vec::new();
    p.encode(v, &mut bytes);
    let (back, n) = decode_packet(&bytes, v, 1 << 20)
        .unwrap_or_else(|e| panic!("{p:?} ({v:?}): {e}"))
        .unwrap_or_else(|| panic!("{p:?} ({v:?}) incomplete"));
    assert_eq!(n, bytes.len(), "{p:?} ({v:?}) consumed");
    assert_eq!(back, p, "{v:?}");
    // Every strict prefix is incomplete, never an error or a panic.
    for cut in 0..bytes.len() {
        assert_eq!(
            decode_packet(&bytes[..cut], v, 1 << 20),
            Ok(None),
            "{p:?} cut at {cut}"
        );
    }
}

fn packets() -> Vec<Packet> {
    vec![
        Packet::Connect(Box::new(Connect {
            client_id: "konsul-edge-n1".into(),
            keep_alive: 30,
            clean_session: false,
            will: Some(Will {
                topic: "edges/n1/status".into(),
                payload: br#"{"status":"offline"}"#.to_vec(),
                qos: 1,
                retain: true,
            }),
            username: Some("u".into()),
            password: Some("p w".into()),
            receive_maximum: 1024,
            maximum_packet_size: 200_000,
        })),
        Packet::ConnAck {
            session_present: true,
            code: 0,
            receive_maximum: None,
        },
        Packet::Publish(Publish {
            dup: true,
            qos: 1,
            retain: false,
            topic: "devices/d1/telemetry".into(),
            id: Some(7),
            payload: vec![0, 1, 2, 255],
        }),
        Packet::Publish(Publish {
            dup: false,
            qos: 0,
            retain: true,
            topic: "a/b".into(),
            id: None,
            payload: Vec::new(),
        }),
        Packet::Publish(Publish {
            dup: false,
            qos: 2,
            retain: false,
            topic: "x".into(),
            id: Some(65535),
            payload: vec![b'z'; 300],
        }),
        Packet::PubAck(1),
        Packet::PubRec(2),
        Packet::PubRel(3),
        Packet::PubComp(4),
        Packet::UnsubAck(5),
        Packet::Subscribe {
            id: 1,
            filters: vec![("devices/+/register".into(), 1), ("devices/#".into(), 2)],
        },
        Packet::SubAck {
            id: 1,
            codes: vec![1, 0x80],
        },
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect { reason: 0 },
    ]
}

#[test]
fn every_packet_round_trips_in_both_versions() {
    for v in [Version::V311, Version::V5] {
        for mut p in packets() {
            if let (Packet::Connect(c), Version::V311) = (&mut p, v) {
                // MQTT 5 properties: 3.1.1 has no place for them.
                c.receive_maximum = 0;
                c.maximum_packet_size = 0;
            }
            round_trip(p, v);
        }
    }
    round_trip(
        Packet::ConnAck {
            session_present: false,
            code: 0,
            receive_maximum: Some(20),
        },
        Version::V5,
    );
}

#[test]
fn connect_bytes_match_the_specification() {
    // MQTT 3.1.1 section 3.1: a minimal CONNECT, clean session, keep-alive 60.
    let mut out = Vec::new();
    Packet::Connect(Box::new(Connect {
        client_id: "c".into(),
        keep_alive: 60,
        clean_session: true,
        will: None,
        username: None,
        password: None,
        receive_maximum: 10,
        maximum_packet_size: 0,
    }))
    .encode(Version::V311, &mut out);
    assert_eq!(
        out,
        [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'c']
    );
}

#[test]
fn a_3_1_1_connack_answers_a_5_connect() {
    // Unacceptable protocol version from a broker without MQTT 5.
    let p = decode_packet(&[0x20, 2, 0, 1], Version::V5, 1024)
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(
        p,
        Packet::ConnAck {
            session_present: false,
            code: 1,
            receive_maximum: None
        }
    );
}

#[test]
fn an_oversized_packet_is_refused_from_its_header() {
    // PUBLISH announcing 1 MiB; only the header is there.
    let bytes = [0x30, 0x80, 0x80, 0x40];
    assert_eq!(
        decode_packet(&bytes, Version::V311, 1000),
        Err(CodecError::TooLarge {
            kind: PUBLISH,
            len: 1 << 20,
            max: 1000
        })
    );
}

#[test]
fn malformed_packets_are_errors() {
    let v = Version::V311;
    let cases: &[&[u8]] = &[
        &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], // length over four bytes
        &[0x36, 3, 0, 1, b'a'],                // QoS 3
        &[0x32, 3, 0, 1, b'a'],                // QoS 1 without packet id
        &[0x32, 5, 0, 1, b'a', 0, 0],          // packet id 0
        &[0x30, 3, 0, 2, 0xff],                // topic runs past the packet
        &[0x30, 4, 0, 2, 0xff, 0xfe],          // topic not UTF-8
        &[0x62, 2, 0, 1][..2],                 // (incomplete, see below)
        &[0x60, 2, 0, 1],                      // PUBREL with wrong flags
        &[0x40, 3, 0, 1, 0],                   // trailing bytes in 3.1.1
        &[0x90, 2, 0, 1],                      // SUBACK without codes
        &[0x20, 2, 2, 0],                      // CONNACK reserved flag
        &[0xf0, 0],                            // AUTH in 3.1.1 / reserved
        &[0x00, 0],                            // reserved type 0
    ];
    for (i, c) in cases.iter().enumerate() {
        let r = decode_packet(c, v, 1 << 20);
        if i == 6 {
            assert_eq!(r, Ok(None));
        } else {
            assert!(r.is_err(), "case {i}: {c:?} gave {r:?}");
        }
    }
    // MQTT 5: an unknown property, a property list running past its packet.
    assert!(decode_packet(&[0x20, 5, 0, 0, 2, 0x7f, 0], Version::V5, 64).is_err());
    assert!(decode_packet(&[0x20, 4, 0, 0, 5, 0x21], Version::V5, 64).is_err());
    assert!(decode_packet(&[0x20, 6, 0, 0, 3, 0x21, 0, 0], Version::V5, 64).is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
        for v in [Version::V311, Version::V5] {
            let mut rest = &bytes[..];
            while let Ok(Some((_, n))) = decode_packet(rest, v, 1 << 16) {
                rest = &rest[n..];
            }
        }
    }

    #[test]
    fn publishes_round_trip(
        topic in "[a-z/+#]{0,40}",
        payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        qos in 0u8..3,
        id in 1u16..,
        dup: bool,
        retain: bool,
    ) {
        for v in [Version::V311, Version::V5] {
            round_trip(Packet::Publish(Publish {
                dup, qos, retain, topic: topic.clone(),
                id: (qos > 0).then_some(id),
                payload: payload.clone(),
            }), v);
        }
    }
}
