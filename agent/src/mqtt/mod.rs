//! The MQTT connections, in MQTT v5 or 3.1.1: options built from the config, a cheap cloneable
//! [`Client`] handle for QoS 0 publishes and control, and one [`driver::Driver`] task per
//! connection that owns its rumqttc event loop.
//!
//! The driver owns everything that depends on the connection: the acknowledgement order of
//! the messages it delivered ([`acks`]), the flow control that stops reading when the pipeline
//! is full, and, on the device connection, the outbox publisher ([`publisher`]) with its packet
//! ids. Nobody else acknowledges a message or publishes at QoS 1 on a driver's connection.

pub mod acks;
pub mod driver;
pub mod publisher;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::{self, Filter, PublishProperties};
use rumqttc::{TlsConfiguration, Transport};

use crate::config::{MqttConfig, Protocol, Roots, TlsConfig, client_auth_der};
use crate::ticket::Ticket;

pub use driver::{Driver, OutboxFeed, Retained};

/// Which of the agent's connections: its own (persistent session, last will), its pool's, or
/// the fleet's.
#[derive(Debug, Clone)]
pub enum Session {
    /// The device's own requests: a persistent session, so requests wait while it is away.
    /// The last will (retained) marks the device offline.
    Device {
        will_topic: String,
        will_payload: Vec<u8>,
    },
    /// Pool work, on a second connection with a clean session: while this agent is away, the
    /// broker hands the pool's requests to the others. (A persistent session with a shared
    /// subscription also crashes rumqttd 0.20's router when the client disconnects.)
    Pool,
    /// Fleet documents (retained, so a clean session loses nothing), the configuration status
    /// and telemetry, on a connection of their own so a long update never delays requests.
    Fleet,
}

/// A message as a driver delivers it, whatever the protocol, with the ticket that finishes it.
#[derive(Debug)]
pub struct Message {
    pub topic: Bytes,
    pub payload: Bytes,
    /// MQTT v5 Response Topic and Correlation Data (never set in 3.1.1).
    pub response_topic: Option<String>,
    pub correlation: Option<Bytes>,
    /// MQTT v5 Message Expiry Interval, in seconds: what is left of it when the broker sent it.
    pub expiry_secs: Option<u32>,
    pub received: Instant,
    /// Commit it once the message's outcome is durable; drop or release it to have the broker
    /// deliver the message again.
    pub ticket: Ticket,
}

/// The handle for publishing at QoS 0 and for stopping; cheap to clone. QoS 1 publishes and
/// acknowledgements on a connection are its driver's alone.
#[derive(Debug, Clone)]
pub enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

/// The event loop the driver owns.
#[allow(clippy::large_enum_variant, reason = "one per connection")]
pub enum EventLoop {
    V5(rumqttc::v5::EventLoop),
    V311(rumqttc::EventLoop),
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EventLoop::V5(_) => "EventLoop(v5)",
            EventLoop::V311(_) => "EventLoop(v3.1.1)",
        })
    }
}

/// Builds the client and event loop of one connection: session, manual acks, last will, TLS,
/// credentials, no Nagle. `receive_max` is the Receive Maximum advertised in MQTT v5 (the
/// messages the broker may send before some are acknowledged); `outgoing` bounds the QoS 1
/// publishes this side keeps in flight (rumqttc sizes a table by it per connection: left at its
/// default of 65,535 that table alone is 14 MiB); `capacity` bounds the client's request channel.
pub fn connect(
    cfg: &MqttConfig,
    session: Session,
    receive_max: u16,
    outgoing: u16,
    capacity: usize,
) -> (Client, EventLoop) {
    let outgoing = outgoing.max(1);
    let client_id = match session {
        Session::Device { .. } => cfg.client_id.clone(),
        Session::Pool => format!("{}-pool", cfg.client_id),
        Session::Fleet => format!("{}-fleet", cfg.client_id),
    };
    let persistent = matches!(session, Session::Device { .. });
    // Replies can be as large as requests (a probability map is as big as its image).
    let max_packet = cfg.max_payload_bytes.saturating_mul(2).max(1 << 20);
    let transport = cfg.tls.as_ref().map(transport);
    match cfg.protocol {
        Protocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
            o.set_keep_alive(cfg.keep_alive)
                .set_manual_acks(true)
                .set_clean_start(!persistent)
                .set_max_packet_size(Some(u32::try_from(max_packet).unwrap_or(u32::MAX)))
                .set_receive_maximum(Some(receive_max.max(1)))
                .set_outgoing_inflight_upper_limit(outgoing)
                .set_connection_timeout(10)
                .set_network_options(no_delay());
            if let Session::Device {
                will_topic,
                will_payload,
            } = session
            {
                o.set_session_expiry_interval(Some(cfg.session_expiry_secs))
                    .set_last_will(v5::LastWill::new(
                        will_topic,
                        will_payload,
                        QoS5::AtLeastOnce,
                        true,
                        None,
                    ));
            }
            if let Some((user, pass)) = &cfg.credentials {
                o.set_credentials(user.clone(), pass.clone());
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            let (c, e) = rumqttc::v5::AsyncClient::new(o, capacity);
            (Client::V5(c), EventLoop::V5(e))
        }
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
            o.set_keep_alive(cfg.keep_alive)
                .set_manual_acks(true)
                .set_clean_session(!persistent)
                .set_inflight(outgoing)
                .set_max_packet_size(max_packet, max_packet);
            if let Session::Device {
                will_topic,
                will_payload,
            } = session
            {
                o.set_last_will(rumqttc::LastWill::new(
                    will_topic,
                    will_payload,
                    rumqttc::QoS::AtLeastOnce,
                    true,
                ));
            }
            if let Some((user, pass)) = &cfg.credentials {
                o.set_credentials(user.clone(), pass.clone());
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            let (c, mut e) = rumqttc::AsyncClient::new(o, capacity);
            e.set_network_options(no_delay());
            (Client::V311(c), EventLoop::V311(e))
        }
    }
}

/// TLS to the broker: against `mqtt.ca_file`, else the system's root certificates.
fn transport(tls: &TlsConfig) -> Transport {
    match &tls.roots {
        Roots::CaFile(ca) => Transport::tls_with_config(TlsConfiguration::Simple {
            ca: ca.clone(),
            alpn: None,
            client_auth: tls.client_auth.clone(),
        }),
        Roots::System(certs) => {
            let mut store = rustls::RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(
                certs
                    .iter()
                    .map(|c| rustls::pki_types::CertificateDer::from(c.clone())),
            );
            tracing::debug!(
                roots = added,
                "Verifying the broker against the system's root certificates."
            );
            let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(store));
            // Checked at validation: the protocol versions are rustls's own defaults, and the
            // client certificate and key parsed there.
            let config = builder
                .map_err(|e| e.to_string())
                .and_then(|b| match &tls.client_auth {
                    None => Ok(b.with_no_client_auth()),
                    Some((cert, key)) => {
                        let (chain, key) = client_auth_der(cert, key)?;
                        b.with_client_auth_cert(chain, key)
                            .map_err(|e| e.to_string())
                    }
                });
            match config {
                Ok(c) => Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(c))),
                Err(e) => {
                    // Unreachable after validation; a connection that fails its handshake
                    // says so in the log rather than the process stopping.
                    tracing::error!(error = %e, "The TLS configuration for the broker could not be built.");
                    Transport::tls_with_config(TlsConfiguration::Simple {
                        ca: Vec::new(),
                        alpn: None,
                        client_auth: None,
                    })
                }
            }
        }
    }
}

/// Network options with Nagle's algorithm off: requests and replies are small and
/// latency-bound, and with it a lone round trip waits out the peer's delayed ACK (about 40 ms).
pub fn no_delay() -> rumqttc::NetworkOptions {
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net
}

impl Client {
    /// Publishes at QoS 0, not retained, without waiting (telemetry: the next one replaces a
    /// lost one).
    pub fn try_publish_volatile(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_publish(topic, QoS5::AtMostOnce, false, payload)
                .map_err(|e| e.to_string()),
            Client::V311(c) => c
                .try_publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
                .map_err(|e| e.to_string()),
        }
    }

    fn try_subscribe_all(&self, filters: &[String]) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| Filter::new(f.clone(), QoS5::AtLeastOnce)),
                )
                .map_err(|e| e.to_string()),
            Client::V311(c) => c
                .try_subscribe_many(
                    filters.iter().map(|f| {
                        rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::AtLeastOnce)
                    }),
                )
                .map_err(|e| e.to_string()),
        }
    }

    /// Sends DISCONNECT (the last will is not published).
    pub fn try_disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V311(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

/// Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling up to the cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        d.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// Properties of a reply to an MQTT v5 request (one that came with a response topic or
/// correlation data): the correlation data copied back, the JSON content type, and what is
/// left of its requester's Message Expiry.
///
/// Replies to other requests carry no properties at all: rumqttd 0.20 panics its 3.1.1
/// listener when it forwards a message with properties to a 3.1.1 subscriber, and such
/// requesters are exactly the 3.1.1 clients.
pub fn reply_properties(
    correlation: Option<&[u8]>,
    v5: bool,
    expiry_secs: Option<u32>,
) -> Option<PublishProperties> {
    v5.then(|| PublishProperties {
        correlation_data: correlation.map(Bytes::copy_from_slice),
        content_type: Some("application/json".into()),
        message_expiry_interval: expiry_secs,
        ..PublishProperties::default()
    })
}

/// What is left of an expiry at `now_ms`, in whole seconds rounded up (MQTT counts seconds, and
/// 0 would mean "no expiry"); `None` once it has passed.
pub fn seconds_left(expires_ms: i64, now_ms: i64) -> Option<u32> {
    let left = expires_ms.checked_sub(now_ms)?;
    if left <= 0 {
        return None;
    }
    let secs = left.saturating_add(999) / 1000;
    Some(u32::try_from(secs).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let caps = [100, 200, 400, 800, 1000, 1000];
        for cap in caps {
            let d = b.next_delay().as_millis();
            assert!(d >= cap / 2 && d <= cap, "{d} not in [{}, {cap}]", cap / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn only_v5_requests_get_reply_properties() {
        let props = reply_properties(Some(b"c"), true, Some(3)).unwrap();
        assert_eq!(props.correlation_data.as_deref(), Some(&b"c"[..]));
        assert_eq!(props.message_expiry_interval, Some(3));
        assert!(reply_properties(None, false, Some(3)).is_none());
    }

    #[test]
    fn expiry_left_rounds_up_and_ends() {
        let cases = [
            (10_000, 0, Some(10)),
            (10_000, 9_001, Some(1)),
            (10_000, 9_999, Some(1)),
            (10_000, 10_000, None),
            (10_000, 20_000, None),
            (i64::MAX, i64::MIN, None),
            (i64::MAX, 0, Some(u32::MAX)),
        ];
        for (expires, now, want) in cases {
            assert_eq!(seconds_left(expires, now), want, "{expires} at {now}");
        }
    }
}
