//! The MQTT connection, in MQTT v5 or 3.1.1: options built from the config, a cheap cloneable
//! [`Client`] handle, and the one [`Driver`] task that owns the rumqttc event loop.
//!
//! The driver never blocks: incoming requests go to a non-blocking `dispatch` callback, and the
//! subscriptions and status it sends on (re)connection use the client's `try_` calls.
//!
//! The device connection's driver is also the outbox's publisher: it is the only one that
//! publishes on that connection, and it alone sees connections come and go in order with
//! the PUBACKs, so it alone can tell which stored message each PUBACK delivers
//! ([`crate::store::outbox::Cursor`]).

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::{QoS as QoS5, v5};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{MqttConfig, Protocol};
use crate::protocol::ReplyRoute;
use crate::store::StoreHandle;
use crate::store::outbox::{Cursor, InFlight, OutMessage, OutboxRow};

/// Which of the agent's connections: its own (persistent session, last will) or its pool's.
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

/// A request as received, whatever the protocol.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: Bytes,
    pub payload: Bytes,
    /// MQTT v5 Response Topic and Correlation Data (never set in 3.1.1).
    pub response_topic: Option<String>,
    pub correlation: Option<Vec<u8>>,
    /// MQTT v5 Message Expiry Interval, in seconds.
    pub expiry_secs: Option<u32>,
    ack: Ack,
}

#[derive(Debug, Clone)]
enum Ack {
    V5(v5::Publish),
    V311(rumqttc::Publish),
    /// A request made inside the agent (a sensor's window): its reply goes back on this
    /// channel instead of to the broker, and there is nothing to acknowledge.
    Local(flume::Sender<Vec<u8>>),
}

impl Incoming {
    /// A request from inside the agent, on `topic` (a request topic of this device), whose
    /// reply is sent on `reply`.
    pub fn local(topic: String, payload: Vec<u8>, reply: flume::Sender<Vec<u8>>) -> Incoming {
        Incoming {
            topic: Bytes::from(topic),
            payload: Bytes::from(payload),
            response_topic: None,
            correlation: None,
            expiry_secs: None,
            ack: Ack::Local(reply),
        }
    }

    /// Where the reply of a request made inside the agent goes.
    pub fn local_reply(&self) -> Option<&flume::Sender<Vec<u8>>> {
        match &self.ack {
            Ack::Local(tx) => Some(tx),
            _ => None,
        }
    }

    fn from_v5(p: v5::Publish) -> Incoming {
        let (response_topic, correlation, expiry_secs) = match &p.properties {
            Some(props) => (
                props.response_topic.clone(),
                props.correlation_data.as_ref().map(|c| c.to_vec()),
                props.message_expiry_interval,
            ),
            None => (None, None, None),
        };
        Incoming {
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            response_topic,
            correlation,
            expiry_secs,
            ack: Ack::V5(p),
        }
    }

    fn from_v311(p: rumqttc::Publish) -> Incoming {
        Incoming {
            topic: Bytes::copy_from_slice(p.topic.as_bytes()),
            payload: p.payload.clone(),
            response_topic: None,
            correlation: None,
            expiry_secs: None,
            ack: Ack::V311(p),
        }
    }
}

/// The handle through which everyone publishes and acknowledges: cheap to clone.
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
/// credentials, no Nagle. `capacity` bounds the client's request channel.
pub fn connect(cfg: &MqttConfig, session: Session, capacity: usize) -> (Client, EventLoop) {
    let client_id = match session {
        Session::Device { .. } => cfg.client_id.clone(),
        Session::Pool => format!("{}-pool", cfg.client_id),
        Session::Fleet => format!("{}-fleet", cfg.client_id),
    };
    let persistent = matches!(session, Session::Device { .. });
    // Replies can be as large as requests (a probability map is as big as its image).
    let max_packet = cfg.max_payload_bytes.saturating_mul(2).max(1 << 20);
    let transport = cfg.tls.as_ref().map(|tls| {
        Transport::tls_with_config(TlsConfiguration::Simple {
            ca: tls.ca_pem.clone(),
            alpn: None,
            client_auth: tls.client_auth.clone(),
        })
    });
    match cfg.protocol {
        Protocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
            o.set_keep_alive(cfg.keep_alive)
                .set_manual_acks(true)
                .set_clean_start(!persistent)
                .set_max_packet_size(Some(u32::try_from(max_packet).unwrap_or(u32::MAX)))
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

/// Network options with Nagle's algorithm off: requests and replies are small and
/// latency-bound, and with it a lone round trip waits out the peer's delayed ACK (about 40 ms).
pub fn no_delay() -> rumqttc::NetworkOptions {
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net
}

/// Properties of a reply to an MQTT v5 request (one that came with a response topic or
/// correlation data): the correlation data copied back and the JSON content type.
///
/// Replies to other requests carry no properties at all: rumqttd 0.20 panics its 3.1.1
/// listener when it forwards a message with properties to a 3.1.1 subscriber, and such
/// requesters are exactly the 3.1.1 clients.
pub fn reply_properties(route: &ReplyRoute) -> Option<PublishProperties> {
    route.v5.then(|| PublishProperties {
        correlation_data: route.correlation.clone().map(Into::into),
        content_type: Some("application/json".into()),
        ..PublishProperties::default()
    })
}

impl Client {
    /// Publishes a stored message (QoS 1) without waiting.
    pub fn try_publish_message(&self, m: &OutMessage) -> Result<(), String> {
        match self {
            Client::V5(c) => match reply_properties(&m.route()) {
                Some(props) => c.try_publish_with_properties(
                    m.topic.clone(),
                    QoS5::AtLeastOnce,
                    m.retain,
                    m.payload.clone(),
                    props,
                ),
                None => c.try_publish(
                    m.topic.clone(),
                    QoS5::AtLeastOnce,
                    m.retain,
                    m.payload.clone(),
                ),
            }
            .map_err(|e| e.to_string()),
            Client::V311(c) => c
                .try_publish(
                    m.topic.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    m.retain,
                    m.payload.clone(),
                )
                .map_err(|e| e.to_string()),
        }
    }

    /// Publishes a retained QoS 1 message without waiting (the status).
    pub fn try_publish_retained(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_publish(topic, QoS5::AtLeastOnce, true, payload)
                .map_err(|e| e.to_string()),
            Client::V311(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
                .map_err(|e| e.to_string()),
        }
    }

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

    /// Acknowledges a request to the broker (a no-op for QoS 0).
    pub fn try_ack(&self, m: &Incoming) -> Result<(), String> {
        match (self, &m.ack) {
            (Client::V5(c), Ack::V5(p)) => c.try_ack(p).map_err(|e| e.to_string()),
            (Client::V311(c), Ack::V311(p)) => c.try_ack(p).map_err(|e| e.to_string()),
            (_, Ack::Local(_)) => Ok(()),
            _ => Err("a request acknowledged on a connection of another protocol".into()),
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

/// What one poll of the event loop amounts to.
enum Polled {
    Connected { session_present: bool },
    Subscribed { refused: Option<String> },
    Message(Box<Incoming>),
    PubAck,
    SentDisconnect,
    Nothing,
    Lost(String),
}

impl EventLoop {
    async fn next(&mut self) -> Polled {
        match self {
            EventLoop::V5(e) => {
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::Packet;
                match e.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => Polled::Connected {
                        session_present: a.session_present,
                    },
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        Polled::Message(Box::new(Incoming::from_v5(p)))
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => Polled::Subscribed {
                        refused: a
                            .return_codes
                            .iter()
                            .any(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                            .then(|| format!("{:?}", a.return_codes)),
                    },
                    Ok(Event::Incoming(Packet::PubAck(_))) => Polled::PubAck,
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Polled::SentDisconnect,
                    Ok(_) => Polled::Nothing,
                    Err(e) => Polled::Lost(e.to_string()),
                }
            }
            EventLoop::V311(e) => {
                use rumqttc::{Event, Packet, SubscribeReasonCode as Code};
                match e.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => Polled::Connected {
                        session_present: a.session_present,
                    },
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        Polled::Message(Box::new(Incoming::from_v311(p)))
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => Polled::Subscribed {
                        refused: a
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, Code::Failure))
                            .then(|| format!("{:?}", a.return_codes)),
                    },
                    Ok(Event::Incoming(Packet::PubAck(_))) => Polled::PubAck,
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Polled::SentDisconnect,
                    Ok(_) => Polled::Nothing,
                    Err(e) => Polled::Lost(e.to_string()),
                }
            }
        }
    }
}

/// A retained message, for the status topic; its payload is made when it is sent, so it says
/// what is true then (the models and configuration version a fleet update switched to).
#[derive(Clone)]
pub struct Retained {
    pub topic: String,
    pub payload: std::sync::Arc<dyn Fn() -> Vec<u8> + Send + Sync>,
}

impl std::fmt::Debug for Retained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retained")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
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
        self.current = (self.current * 2).min(self.max);
        d.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// The outbox, as the device connection's driver publishes it.
#[derive(Debug)]
pub struct OutboxFeed {
    pub store: StoreHandle,
    /// Publishes in flight at once (at most the client's inflight window).
    pub window: usize,
}

/// The task that owns the event loop.
pub struct Driver<D> {
    pub eventloop: EventLoop,
    pub client: Client,
    /// Subscribed (again) on every connection.
    pub filters: Vec<String>,
    /// Published on every connection (the online status).
    pub on_connect: Option<Retained>,
    /// Published when asked to stop, before the DISCONNECT (the offline status).
    pub on_stop: Option<Retained>,
    /// Called with every incoming request; must not block.
    pub dispatch: D,
    /// Turns true once the broker has acknowledged the subscriptions, false when the
    /// connection is lost.
    pub connected_tx: watch::Sender<bool>,
    pub backoff: Backoff,
    /// Publish the outbox on this connection.
    pub outbox: Option<OutboxFeed>,
    /// Publish `on_connect` again whenever this changes (the status after a fleet update).
    pub refresh: Option<watch::Receiver<u64>>,
}

impl<D> std::fmt::Debug for Driver<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("filters", &self.filters)
            .finish_non_exhaustive()
    }
}

type LoadFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (u64, Result<Vec<OutboxRow>, crate::store::StoreError>)>
            + Send,
    >,
>;

/// The outbox side of a driver: the cursor, the load in progress, and deliveries not yet
/// deleted.
struct Publisher {
    store: StoreHandle,
    cursor: Cursor,
    watermark: watch::Receiver<i64>,
    load: Option<LoadFuture>,
    delivered: Vec<i64>,
}

impl Publisher {
    /// Sends what the window allows and starts the next load if one is due.
    fn pump(&mut self, client: &Client) {
        while let Some(row) = self.cursor.next_to_send() {
            match client.try_publish_message(&row.message) {
                Ok(()) => self.cursor.sent(InFlight::Row(row.id)),
                Err(_) => {
                    // The client's channel is full: try again after the next event.
                    self.cursor.unsent(row);
                    break;
                }
            }
        }
        if self.load.is_none() {
            let committed = *self.watermark.borrow_and_update();
            if let Some(load) = self.cursor.want_load(committed) {
                let store = self.store.clone();
                self.load = Some(Box::pin(async move {
                    (load.epoch, store.load(load.after, load.limit).await)
                }));
            }
        }
        self.delete_delivered();
    }

    fn delete_delivered(&mut self) {
        if !self.delivered.is_empty() {
            let ids = std::mem::take(&mut self.delivered);
            if let Err(ids) = self.store.try_delete(ids) {
                self.delivered = ids;
            }
        }
    }
}

/// What the outbox side of the driver waits for.
enum FeedEvent {
    Loaded(u64, Result<Vec<OutboxRow>, crate::store::StoreError>),
    NewRows,
}

/// The next load finishing or (when `watch_rows`) new rows being committed; never, without an
/// outbox.
async fn next_feed_event(p: &mut Option<Publisher>, watch_rows: bool) -> FeedEvent {
    let Some(Publisher {
        load, watermark, ..
    }) = p.as_mut()
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        (epoch, rows) = async {
            match load.as_mut() {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        } => FeedEvent::Loaded(epoch, rows),
        changed = watermark.changed(), if watch_rows => match changed {
            Ok(()) => FeedEvent::NewRows,
            Err(_) => std::future::pending().await,
        },
    }
}

impl<D: FnMut(Incoming)> Driver<D> {
    /// Runs until our own DISCONNECT has gone out after `stop` (the caller bounds how long it
    /// waits for that).
    pub async fn run(self, stop: CancellationToken) {
        let Driver {
            mut eventloop,
            client,
            filters,
            on_connect,
            on_stop,
            mut dispatch,
            connected_tx,
            mut backoff,
            outbox,
            mut refresh,
        } = self;
        let mut publisher = outbox.map(|feed| Publisher {
            watermark: feed.store.watermark(),
            store: feed.store,
            cursor: Cursor::new(feed.window),
            load: None,
            delivered: Vec::new(),
        });
        let mut online = false;
        let mut stopping = false;
        loop {
            if let Some(p) = publisher.as_mut() {
                if online && !stopping {
                    p.pump(&client);
                } else {
                    p.delete_delivered();
                }
            }
            let polled = tokio::select! {
                polled = eventloop.next() => polled,
                () = stop.cancelled(), if !stopping => {
                    stopping = true;
                    if let Some(status) = &on_stop
                        && client.try_publish_retained(&status.topic, (status.payload)()).is_ok()
                        && let Some(p) = publisher.as_mut()
                    {
                        p.cursor.sent(InFlight::Other);
                    }
                    client.try_disconnect();
                    continue;
                }
                changed = async {
                    match refresh.as_mut() {
                        Some(r) => r.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match changed {
                        Ok(()) => {
                            if online
                                && !stopping
                                && let Some(status) = &on_connect
                                && client.try_publish_retained(&status.topic, (status.payload)()).is_ok()
                                && let Some(p) = publisher.as_mut()
                            {
                                p.cursor.sent(InFlight::Other);
                            }
                        }
                        Err(_) => refresh = None,
                    }
                    continue;
                }
                event = next_feed_event(&mut publisher, online && !stopping) => {
                    if let (FeedEvent::Loaded(epoch, rows), Some(p)) = (event, publisher.as_mut()) {
                        p.load = None;
                        match rows {
                            Ok(rows) => p.cursor.loaded(epoch, rows),
                            Err(e) => {
                                tracing::error!(error = %e, "Cannot read the outbox.");
                                p.cursor.load_failed(epoch);
                            }
                        }
                    }
                    continue;
                }
            };
            match polled {
                Polled::Connected { session_present } => {
                    online = true;
                    backoff.reset();
                    tracing::info!(session_present, "Connected to the MQTT broker.");
                    if let Some(p) = publisher.as_mut() {
                        p.cursor.connected(session_present);
                        if !session_present {
                            p.load = None;
                        }
                    }
                    if let Err(e) = client.try_subscribe_all(&filters) {
                        tracing::error!(error = %e, "Could not queue the subscriptions.");
                    }
                    if let Some(status) = &on_connect {
                        match client.try_publish_retained(&status.topic, (status.payload)()) {
                            Ok(()) => {
                                if let Some(p) = publisher.as_mut() {
                                    p.cursor.sent(InFlight::Other);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "Could not queue the online status.");
                            }
                        }
                    }
                }
                Polled::PubAck => {
                    if let Some(p) = publisher.as_mut()
                        && let Some(id) = p.cursor.acked()
                    {
                        p.delivered.push(id);
                    }
                }
                Polled::Message(m) => dispatch(*m),
                Polled::Subscribed {
                    refused: Some(codes),
                } => {
                    tracing::error!(%codes, "The broker refused a subscription: requests on it will not arrive.");
                }
                Polled::Subscribed { refused: None } => {
                    connected_tx.send_replace(true);
                }
                Polled::SentDisconnect => {
                    connected_tx.send_replace(false);
                    if let Some(p) = publisher.as_mut() {
                        p.delete_delivered();
                    }
                    return;
                }
                Polled::Nothing => {}
                Polled::Lost(e) => {
                    online = false;
                    connected_tx.send_replace(false);
                    if stopping {
                        return;
                    }
                    let delay = backoff.next_delay();
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
        let v5 = ReplyRoute {
            topic: "r".into(),
            correlation: Some(b"c".to_vec()),
            v5: true,
        };
        let props = reply_properties(&v5).unwrap();
        assert_eq!(props.correlation_data.as_deref(), Some(&b"c"[..]));
        let plain = ReplyRoute {
            topic: "r".into(),
            correlation: None,
            v5: false,
        };
        assert!(reply_properties(&plain).is_none());
    }
}
