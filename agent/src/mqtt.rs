//! The MQTT connection: options built from the config, and the one driver task that owns the
//! rumqttc event loop. Everyone else publishes through the cheap, cloneable `AsyncClient`.
//!
//! The driver never blocks: incoming requests go to a non-blocking `dispatch` callback, and the
//! subscriptions and status it sends on (re)connection use the client's `try_` calls.

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;

/// Which of the agent's connections: its own (persistent session, last will) or its pool's.
#[derive(Debug, Clone)]
pub enum Session {
    /// The device's own requests: a persistent session, so requests wait while it is away.
    Device { will: LastWill },
    /// Pool work, on a second connection with a clean session: while this agent is away, the
    /// broker hands the pool's requests to the others. (A persistent session with a shared
    /// subscription also crashes rumqttd 0.20's router when the client disconnects.)
    Pool,
}

/// Builds the client options: session, manual acks, last will, TLS, credentials.
pub fn options(cfg: &MqttConfig, session: Session) -> MqttOptions {
    let client_id = match session {
        Session::Device { .. } => cfg.client_id.clone(),
        Session::Pool => format!("{}-pool", cfg.client_id),
    };
    let mut o = MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
    o.set_keep_alive(cfg.keep_alive).set_manual_acks(true);
    no_delay(&mut o);
    match session {
        Session::Device { will } => {
            o.set_clean_start(false)
                .set_session_expiry_interval(Some(cfg.session_expiry_secs))
                .set_last_will(will);
        }
        Session::Pool => {
            o.set_clean_start(true);
        }
    }
    o
        // Replies can be as large as requests (a probability map is as big as its image).
        .set_max_packet_size(Some(
            u32::try_from(cfg.max_payload_bytes.saturating_mul(2)).unwrap_or(u32::MAX),
        ))
        .set_connection_timeout(10);
    if let Some((user, pass)) = &cfg.credentials {
        o.set_credentials(user.clone(), pass.clone());
    }
    if let Some(tls) = &cfg.tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: tls.ca_pem.clone(),
            alpn: None,
            client_auth: tls.client_auth.clone(),
        }));
    }
    o
}

/// Turns Nagle's algorithm off: requests and replies are small and latency-bound, and with it a
/// lone round trip waits out the peer's delayed ACK (about 40 ms each way).
pub fn no_delay(o: &mut MqttOptions) {
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
}

/// A retained message, for the status topic.
#[derive(Debug, Clone)]
pub struct Retained {
    pub topic: String,
    pub payload: Vec<u8>,
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
        self.current = (self.current * 2).min(self.max);
        d.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// The task that owns the event loop.
pub struct Driver<D> {
    pub eventloop: EventLoop,
    pub client: AsyncClient,
    /// Subscribed (again) on every connection.
    pub filters: Vec<String>,
    /// Published on every connection (the online status).
    pub on_connect: Option<Retained>,
    /// Called with every incoming publish; must not block.
    pub dispatch: D,
    pub connected_tx: watch::Sender<bool>,
    pub backoff: Backoff,
}

impl<D> std::fmt::Debug for Driver<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("filters", &self.filters)
            .finish_non_exhaustive()
    }
}

impl<D: FnMut(Publish)> Driver<D> {
    /// Runs until `stop` is cancelled, or until our own DISCONNECT has gone out.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let event = tokio::select! {
                event = self.eventloop.poll() => event,
                () = stop.cancelled() => return,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.backoff.reset();
                    tracing::info!(
                        session_present = ack.session_present,
                        "Connected to the MQTT broker."
                    );
                    let subs = self.filters.iter().map(|f| {
                        rumqttc::v5::mqttbytes::v5::Filter::new(f.clone(), QoS::AtLeastOnce)
                    });
                    if let Err(e) = self.client.try_subscribe_many(subs) {
                        tracing::error!(error = %e, "Could not queue the subscriptions.");
                    }
                    if let Some(status) = &self.on_connect
                        && let Err(e) = self.client.try_publish(
                            status.topic.clone(),
                            QoS::AtLeastOnce,
                            true,
                            status.payload.clone(),
                        )
                    {
                        tracing::warn!(error = %e, "Could not queue the online status.");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => (self.dispatch)(publish),
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|c| {
                        !matches!(
                            c,
                            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                        )
                    }) {
                        tracing::error!(codes = ?ack.return_codes, "The broker refused a subscription: requests on it will not arrive.");
                    } else {
                        self.connected_tx.send_replace(true);
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                    self.connected_tx.send_replace(false);
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    self.connected_tx.send_replace(false);
                    let delay = self.backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis(), "MQTT connection lost; reconnecting.");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => return,
                    }
                }
            }
        }
    }
}

/// Properties of a reply to an MQTT v5 request (one that came with a response topic or
/// correlation data): the correlation data copied back and the JSON content type.
///
/// Replies to other requests carry no properties at all: rumqttd 0.20 panics its 3.1.1
/// listener when it forwards a message with properties to a 3.1.1 subscriber, and such
/// requesters are exactly the 3.1.1 clients.
pub fn reply_properties(route: &crate::protocol::ReplyRoute) -> Option<PublishProperties> {
    route.v5.then(|| PublishProperties {
        correlation_data: route.correlation.clone().map(Into::into),
        content_type: Some("application/json".into()),
        ..PublishProperties::default()
    })
}

/// Publishes a QoS 1 reply, with properties only where [`reply_properties`] gives some.
pub async fn publish_reply(
    client: &AsyncClient,
    route: crate::protocol::ReplyRoute,
    body: Vec<u8>,
) -> Result<(), rumqttc::v5::ClientError> {
    match reply_properties(&route) {
        Some(props) => {
            client
                .publish_with_properties(route.topic, QoS::AtLeastOnce, false, body, props)
                .await
        }
        None => {
            client
                .publish(route.topic, QoS::AtLeastOnce, false, body)
                .await
        }
    }
}

/// The non-blocking form of [`publish_reply`].
#[allow(
    clippy::result_large_err,
    reason = "rumqttc's error type, passed through as is"
)]
pub fn try_publish_reply(
    client: &AsyncClient,
    route: crate::protocol::ReplyRoute,
    body: Vec<u8>,
) -> Result<(), rumqttc::v5::ClientError> {
    match reply_properties(&route) {
        Some(props) => {
            client.try_publish_with_properties(route.topic, QoS::AtLeastOnce, false, body, props)
        }
        None => client.try_publish(route.topic, QoS::AtLeastOnce, false, body),
    }
}

/// The response topic and correlation data of a request, if it has them.
pub fn request_properties(p: &Publish) -> (Option<&str>, Option<&[u8]>) {
    match &p.properties {
        Some(props) => (
            props.response_topic.as_deref(),
            props.correlation_data.as_deref(),
        ),
        None => (None, None),
    }
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
}
