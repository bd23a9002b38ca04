//! Tether patch: MQTT 3.1.1 and MQTT 5 clients on one listener, as full brokers serve them.
//!
//! A connection's codec is chosen from the protocol level in its CONNECT packet (4: 3.1.1,
//! 5: MQTT 5) and kept for the life of the connection. Until the whole CONNECT is buffered the
//! codec asks for more bytes, bounded by the listener's maximum packet size like every other
//! read. Anything that is not a CONNECT, or has another level, goes to the MQTT 5 codec, which
//! refuses it as rumqttd always has.

use bytes::BytesMut;

use super::v4::V4;
use super::v5::{self, V5};
use super::{Error, Packet, Protocol};

#[derive(Debug, Clone, Copy, Default)]
pub struct Auto {
    chosen: Option<Level>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    V311,
    V5,
}

impl Protocol for Auto {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        let level = match self.chosen {
            Some(level) => level,
            None => {
                // Errors with InsufficientBytes until the whole first packet is here.
                v5::check(stream.iter(), max_size)?;
                let level = connect_level(stream);
                self.chosen = Some(level);
                level
            }
        };
        match level {
            Level::V311 => V4.read_mut(stream, max_size),
            Level::V5 => V5.read_mut(stream, max_size),
        }
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, Error> {
        match self.chosen {
            Some(Level::V311) => V4.write(without_properties(packet), write),
            _ => V5.write(packet, write),
        }
    }
}

/// A packet as MQTT 3.1.1 carries it. A message an MQTT 5 client published comes with its
/// properties (response topic, correlation data, ...), which 3.1.1 has no place for: they are
/// left out, where rumqttd's 3.1.1 codec would panic (`unreachable!`) and end the connection.
fn without_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Connect(c, _, will, _, login) => Packet::Connect(c, None, will, None, login),
        Packet::ConnAck(p, _) => Packet::ConnAck(p, None),
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::Subscribe(p, _) => Packet::Subscribe(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::Unsubscribe(p, _) => Packet::Unsubscribe(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        p @ (Packet::PingReq(_) | Packet::PingResp(_)) => p,
    }
}

/// The protocol level of a complete first packet, if it is a CONNECT that names MQTT 3.1.1.
fn connect_level(packet: &[u8]) -> Level {
    const CONNECT: u8 = 0x10;
    if packet.first() != Some(&CONNECT) {
        return Level::V5;
    }
    // The remaining length takes 1 to 4 bytes (already checked), each but the last with the
    // continuation bit set.
    let Some(length_bytes) = packet
        .iter()
        .skip(1)
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map(|i| i + 1)
    else {
        return Level::V5;
    };
    let variable = 1 + length_bytes;
    let name_len = match (packet.get(variable), packet.get(variable + 1)) {
        (Some(&hi), Some(&lo)) => usize::from(u16::from_be_bytes([hi, lo])),
        _ => return Level::V5,
    };
    match packet.get(variable + 2 + name_len) {
        Some(4) => Level::V311,
        _ => Level::V5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Publish, PublishProperties};
    use bytes::Bytes;

    fn connect(level: u8) -> Vec<u8> {
        // CONNECT, remaining length, "MQTT", level, flags (clean), keep alive 60, client id "c"
        let mut v = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 60];
        if level == 5 {
            v.push(0); // no properties
        }
        v.extend_from_slice(&[0, 1, b'c']);
        v[1] = u8::try_from(v.len() - 2).unwrap();
        v
    }

    #[test]
    fn the_connect_packet_chooses_the_codec() {
        for (level, expected) in [(4, Level::V311), (5, Level::V5), (3, Level::V5)] {
            assert_eq!(connect_level(&connect(level)), expected, "level {level}");
        }
        assert_eq!(connect_level(&[0x30, 0]), Level::V5, "not a CONNECT");
        assert_eq!(connect_level(&[0x10, 0xff, 0xff]), Level::V5, "truncated");
        assert_eq!(connect_level(&[0x10, 2, 0xff, 0xff]), Level::V5, "name past the end");
    }

    #[test]
    fn both_versions_connect_through_one_codec() {
        for level in [4, 5] {
            let mut auto = Auto::default();
            let bytes = connect(level);
            // A byte at a time: asks for more until the CONNECT is whole.
            let mut stream = BytesMut::new();
            for (i, b) in bytes.iter().enumerate() {
                stream.extend_from_slice(&[*b]);
                let read = auto.read_mut(&mut stream, 1024);
                if i + 1 < bytes.len() {
                    assert!(matches!(read, Err(Error::InsufficientBytes(_))), "{read:?}");
                } else {
                    assert!(matches!(read, Ok(Packet::Connect(..))), "{read:?}");
                }
            }
        }
    }

    #[test]
    fn a_v5_message_reaches_a_v311_subscriber_without_its_properties() {
        let mut auto = Auto::default();
        let mut stream = BytesMut::from(&connect(4)[..]);
        auto.read_mut(&mut stream, 1024).unwrap();
        let properties = PublishProperties {
            response_topic: Some("replies".into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            ..Default::default()
        };
        let publish = Publish::new("t", "hello", false);
        let mut out = BytesMut::new();
        auto.write(Packet::Publish(publish.clone(), Some(properties)), &mut out)
            .unwrap();
        let mut expected = BytesMut::new();
        V4.write(Packet::Publish(publish, None), &mut expected)
            .unwrap();
        assert_eq!(out, expected);
    }

    #[test]
    fn an_oversized_first_packet_is_refused_before_it_is_buffered() {
        let mut auto = Auto::default();
        let mut stream = BytesMut::from(&[0x10u8, 0xff, 0xff, 0xff, 0x7f][..]);
        assert!(matches!(
            auto.read_mut(&mut stream, 1024),
            Err(Error::PayloadSizeLimitExceeded(_))
        ));
    }
}
