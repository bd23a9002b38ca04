//! The outbox's messages. Every reply is written to the outbox before its request is
//! acknowledged, published from there in order, and deleted only after the broker's PUBACK
//! (the MQTT driver's `publisher` keeps that bookkeeping).

use crate::protocol::ReplyRoute;

/// A message to publish (QoS 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT v5 correlation data to send back.
    pub correlation: Option<Vec<u8>>,
    /// Send MQTT v5 properties (correlation data, content type): only to v5 requesters.
    pub v5: bool,
    pub retain: bool,
    /// When its requester stops waiting (Unix ms, from the request's MQTT v5 Message Expiry):
    /// not published after it, and published with the time left as its own expiry.
    pub expires_ms: Option<i64>,
}

/// MQTT's fixed header, packet id, topic length and properties, at most.
const PUBLISH_OVERHEAD: usize = 64;

impl OutMessage {
    /// The reply to a request, by its route.
    pub fn reply(route: ReplyRoute, payload: Vec<u8>, expires_ms: Option<i64>) -> OutMessage {
        OutMessage {
            topic: route.topic,
            payload,
            correlation: route.correlation,
            v5: route.v5,
            retain: false,
            expires_ms,
        }
    }

    /// An event: not retained, no properties, no expiry.
    pub fn event(topic: String, payload: Vec<u8>) -> OutMessage {
        OutMessage {
            topic,
            payload,
            correlation: None,
            v5: false,
            retain: false,
            expires_ms: None,
        }
    }

    /// About the size of its PUBLISH packet, to hold against the broker's maximum.
    pub fn wire_bytes(&self) -> usize {
        self.topic.len()
            + self.payload.len()
            + self.correlation.as_ref().map_or(0, Vec::len)
            + PUBLISH_OVERHEAD
    }

    /// The reply route this message was built from.
    pub fn route(&self) -> ReplyRoute {
        ReplyRoute {
            topic: self.topic.clone(),
            correlation: self.correlation.clone(),
            v5: self.v5,
        }
    }

    /// Bytes counted against the outbox's bound.
    pub fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len()) as u64
    }
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub created_ms: i64,
    pub message: OutMessage,
}
