//! The task that owns one connection's rumqttc event loop.
//!
//! It delivers each incoming message with a [`Ticket`] and keeps the acknowledgement order
//! ([`AckOrder`]): a ticket's holder reports the message finished by message, never by calling
//! in, and the driver sends the acknowledgements that are due, in arrival order, on the
//! connection the messages came on. An acknowledgement that does not fit in rumqttc's request
//! channel waits in the driver and is sent after the next event; none is dropped, and none
//! survives a lost connection.
//!
//! Flow control: while `limit` messages are handed on and not finished, the driver stops
//! reading from the broker (MQTT v5 also advertises the same Receive Maximum), so a backlog
//! after an outage is taken at the agent's pace instead of being refused.
//!
//! On the device connection the driver is also the outbox's publisher, the only one that
//! publishes at QoS 1 there, so it alone can tell which stored message each PUBACK delivers
//! ([`Publisher`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::{self, PubAckReason, SubscribeReasonCode};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::acks::AckOrder;
use super::publisher::{Acked, Next, Publisher};
use super::{Backoff, Client, EventLoop, Message, reply_properties, seconds_left};
use crate::store::outbox::OutboxRow;
use crate::store::{StoreError, StoreHandle, Unsent, now_ms};
use crate::ticket::{Finished, Ticket};

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

/// The outbox, as the device connection's driver publishes it.
#[derive(Debug)]
pub struct OutboxFeed {
    pub store: StoreHandle,
    /// Publishes in flight at once (the broker's Receive Maximum lowers it).
    pub window: usize,
}

/// The task that owns an event loop.
pub struct Driver<D> {
    pub eventloop: EventLoop,
    pub client: Client,
    /// Subscribed (again) on every connection.
    pub filters: Vec<String>,
    /// Published on every connection (the online status).
    pub on_connect: Option<Retained>,
    /// Published when asked to stop, before the DISCONNECT (the offline status).
    pub on_stop: Option<Retained>,
    /// Called with every incoming message; must not block.
    pub dispatch: D,
    /// Turns true once the broker has acknowledged the subscriptions, false when the
    /// connection is lost.
    pub connected_tx: watch::Sender<bool>,
    pub backoff: Backoff,
    /// Publish the outbox on this connection.
    pub outbox: Option<OutboxFeed>,
    /// Publish `on_connect` again whenever this changes (the status after a fleet update).
    pub refresh: Option<watch::Receiver<u64>>,
    /// Messages handed on and not yet finished before the driver stops reading.
    pub limit: usize,
}

impl<D> std::fmt::Debug for Driver<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("filters", &self.filters)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// What acknowledges a message: its packet id (QoS 1).
type AckToken = u16;

/// What one poll of the event loop amounts to.
enum Polled {
    Connected {
        session_present: bool,
        receive_max: Option<u16>,
        max_packet: Option<u32>,
    },
    Subscribed {
        refused: Option<String>,
    },
    Message {
        topic: Bytes,
        payload: Bytes,
        response_topic: Option<String>,
        correlation: Option<Bytes>,
        expiry_secs: Option<u32>,
        ack: Option<AckToken>,
    },
    /// A QoS 1 publish of ours went out with this packet id.
    Outgoing(u16),
    PubAck {
        pkid: u16,
        refusal: Option<String>,
    },
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
                        receive_max: a.properties.as_ref().and_then(|p| p.receive_max),
                        max_packet: a.properties.as_ref().and_then(|p| p.max_packet_size),
                    },
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let (response_topic, correlation, expiry_secs) = match p.properties {
                            Some(props) => (
                                props.response_topic,
                                props.correlation_data,
                                props.message_expiry_interval,
                            ),
                            None => (None, None, None),
                        };
                        Polled::Message {
                            topic: p.topic,
                            payload: p.payload,
                            response_topic,
                            correlation,
                            expiry_secs,
                            ack: (p.qos != QoS5::AtMostOnce).then_some(p.pkid),
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => Polled::Subscribed {
                        refused: a
                            .return_codes
                            .iter()
                            .any(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                            .then(|| format!("{:?}", a.return_codes)),
                    },
                    Ok(Event::Incoming(Packet::PubAck(a))) => Polled::PubAck {
                        pkid: a.pkid,
                        refusal: (!matches!(
                            a.reason,
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                        ))
                        .then(|| format!("{:?}", a.reason)),
                    },
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) if pkid != 0 => {
                        Polled::Outgoing(pkid)
                    }
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
                        receive_max: None,
                        max_packet: None,
                    },
                    Ok(Event::Incoming(Packet::Publish(p))) => Polled::Message {
                        topic: Bytes::from(p.topic.into_bytes()),
                        payload: p.payload,
                        response_topic: None,
                        correlation: None,
                        expiry_secs: None,
                        ack: (p.qos != rumqttc::QoS::AtMostOnce).then_some(p.pkid),
                    },
                    Ok(Event::Incoming(Packet::SubAck(a))) => Polled::Subscribed {
                        refused: a
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, Code::Failure))
                            .then(|| format!("{:?}", a.return_codes)),
                    },
                    Ok(Event::Incoming(Packet::PubAck(a))) => Polled::PubAck {
                        pkid: a.pkid,
                        refusal: None,
                    },
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) if pkid != 0 => {
                        Polled::Outgoing(pkid)
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Polled::SentDisconnect,
                    Ok(_) => Polled::Nothing,
                    Err(e) => Polled::Lost(e.to_string()),
                }
            }
        }
    }

    /// Forgets what rumqttc would send again after a reconnect: the driver resends the
    /// outbox itself (in order, with DUP), and acknowledgements never cross a connection.
    fn forget_pending(&mut self) {
        match self {
            EventLoop::V5(e) => e.pending.clear(),
            EventLoop::V311(e) => e.pending.clear(),
        }
    }

    /// Queues a publish that was sent before (DUP set) ahead of the request channel.
    fn resend(&mut self, row: &OutboxRow, expiry_secs: Option<u32>) {
        let m = &row.message;
        match self {
            EventLoop::V5(e) => {
                let mut p = v5::Publish::new(
                    m.topic.clone(),
                    QoS5::AtLeastOnce,
                    m.payload.clone(),
                    reply_properties(m.correlation.as_deref(), m.v5, expiry_secs),
                );
                p.retain = m.retain;
                p.dup = true;
                e.pending.push_back(rumqttc::v5::Request::Publish(p));
            }
            EventLoop::V311(e) => {
                let mut p = rumqttc::Publish::new(
                    m.topic.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    m.payload.clone(),
                );
                p.retain = m.retain;
                p.dup = true;
                e.pending.push_back(rumqttc::Request::Publish(p));
            }
        }
    }
}

impl Client {
    /// Acknowledges the QoS 1 message with packet id `pkid`, without waiting.
    fn try_ack(&self, pkid: AckToken) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                let mut p = v5::Publish::new("", QoS5::AtLeastOnce, Vec::<u8>::new(), None);
                p.pkid = pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
            Client::V311(c) => {
                let mut p = rumqttc::Publish::new("", rumqttc::QoS::AtLeastOnce, Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
        }
    }

    /// Publishes a stored message for the first time (QoS 1), without waiting.
    fn try_publish_row(&self, row: &OutboxRow, expiry_secs: Option<u32>) -> Result<(), String> {
        let m = &row.message;
        match self {
            Client::V5(c) => match reply_properties(m.correlation.as_deref(), m.v5, expiry_secs) {
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

    /// Publishes a retained QoS 1 message without waiting: the status, by the device driver,
    /// and the fleet's configuration status on the fleet connection (whose driver publishes
    /// nothing itself).
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
}

type LoadFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send>>;

/// Delivered rows are deleted in batches of this many...
const DELETE_BATCH: usize = 64;
/// ...or after this long: a delete is no request's business, and one store wake-up per batch
/// costs less than one per reply. (A crash before it is sent resends those replies: at least
/// once.)
const DELETE_AFTER: Duration = Duration::from_millis(50);

/// The outbox side of the device driver.
struct Feed {
    store: StoreHandle,
    publisher: Publisher,
    watermark: watch::Receiver<i64>,
    /// Rows as the store commits them.
    rows_rx: flume::Receiver<OutboxRow>,
    load: Option<LoadFuture>,
    /// Rows delivered, not yet deleted.
    delivered: Vec<i64>,
    /// When the delivered rows are deleted, if not sooner.
    delete_at: Option<Instant>,
    expired: Vec<i64>,
    refused: Vec<i64>,
}

impl Feed {
    /// Publishes what the window allows, and starts the next load if one is due.
    fn pump(&mut self, client: &Client, eventloop: &mut EventLoop) {
        let now = now_ms();
        while let Some(next) = self.publisher.next(now) {
            match next {
                Next::Send { dup } => {
                    let Some(row) = self.publisher.peek() else {
                        break;
                    };
                    let expiry = row.message.expires_ms.and_then(|e| seconds_left(e, now));
                    if dup {
                        eventloop.resend(row, expiry);
                    } else if client.try_publish_row(row, expiry).is_err() {
                        // The client's channel is full (the topic was checked): after the next
                        // event.
                        break;
                    }
                    self.publisher.handed();
                }
                Next::Expired(id) => self.expired.push(id),
                Next::Unsendable { id, why } => {
                    tracing::warn!(
                        id,
                        %why,
                        "A stored message cannot be published; it is dropped from the outbox."
                    );
                    self.refused.push(id);
                }
            }
        }
        if self.load.is_none() {
            let committed = *self.watermark.borrow_and_update();
            if let Some(load) = self.publisher.want_load(committed) {
                let store = self.store.clone();
                self.load = Some(Box::pin(
                    async move { store.load(load.after, load.limit).await },
                ));
            }
        }
        self.flush();
    }

    /// Hands the store what left the outbox: delivered rows in batches, the rest at once.
    fn flush(&mut self) {
        let due = self.delivered.len() >= DELETE_BATCH
            || self.delete_at.is_some_and(|at| at <= Instant::now());
        if !self.delivered.is_empty() && due {
            match self.store.try_delete(std::mem::take(&mut self.delivered)) {
                Ok(()) => self.delete_at = None,
                Err(ids) => self.delivered = ids,
            }
        }
        if !self.delivered.is_empty() && self.delete_at.is_none() {
            self.delete_at = Some(Instant::now() + DELETE_AFTER);
        }
        for (list, why) in [
            (&mut self.expired, Unsent::Expired),
            (&mut self.refused, Unsent::Refused),
        ] {
            if !list.is_empty()
                && let Err(ids) = self.store.try_unsent(std::mem::take(list), why)
            {
                *list = ids;
            }
        }
    }

    fn acked(&mut self, pkid: u16, refusal: Option<String>) {
        match self.publisher.acked(pkid, refusal.is_none()) {
            Acked::Delivered(id) => self.delivered.push(id),
            Acked::Refused { id, failures } => {
                tracing::warn!(id, failures, reason = ?refusal, "The broker refused a stored message; it is sent again.");
            }
            Acked::Dropped { id, failures } => {
                tracing::warn!(id, failures, reason = ?refusal, "The broker refused a stored message again and again; it is dropped from the outbox.");
                self.refused.push(id);
            }
            Acked::Other => {}
        }
    }

    fn lost(&mut self) {
        for (id, failures) in self.publisher.lost() {
            tracing::warn!(
                id,
                failures,
                "The connection was lost each time this stored message was the only one in flight: the broker refuses it. It is dropped from the outbox."
            );
            self.refused.push(id);
        }
    }
}

/// The next load finishing, or (when `watch_rows`) a row committed and pushed, or new rows
/// committed, or delivered rows due for deletion; never, without an outbox.
async fn next_feed_event(feed: &mut Option<Feed>, watch_rows: bool) -> FeedEvent {
    let Some(Feed {
        load,
        watermark,
        rows_rx,
        delete_at,
        ..
    }) = feed.as_mut()
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        biased;
        row = rows_rx.recv_async(), if watch_rows => match row {
            Ok(row) => FeedEvent::Pushed(row),
            Err(_) => std::future::pending().await,
        },
        () = async {
            match delete_at {
                Some(at) => tokio::time::sleep_until((*at).into()).await,
                None => std::future::pending().await,
            }
        } => FeedEvent::DeleteDue,
        rows = async {
            match load.as_mut() {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        } => FeedEvent::Loaded(rows),
        changed = watermark.changed(), if watch_rows => match changed {
            Ok(()) => FeedEvent::NewRows,
            Err(_) => std::future::pending().await,
        },
    }
}

/// What the outbox side of the driver waits for.
enum FeedEvent {
    Pushed(OutboxRow),
    Loaded(Result<Vec<OutboxRow>, StoreError>),
    NewRows,
    DeleteDue,
}

/// Sends the acknowledgements that are due while the client's channel has room.
fn send_acks(client: &Client, due: &mut VecDeque<AckToken>) {
    while let Some(&pkid) = due.front() {
        if client.try_ack(pkid).is_err() {
            return;
        }
        due.pop_front();
    }
}

impl<D: FnMut(Message)> Driver<D> {
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
            limit,
        } = self;
        let limit = limit.max(1);
        let (finished_tx, finished_rx) = flume::unbounded::<Finished>();
        let mut order = AckOrder::<AckToken>::default();
        let mut due: VecDeque<AckToken> = VecDeque::new();
        let mut feed = outbox.map(|f| Feed {
            watermark: f.store.watermark(),
            rows_rx: f.store.committed_rows(),
            delete_at: None,
            store: f.store,
            publisher: Publisher::new(f.window),
            load: None,
            delivered: Vec::new(),
            expired: Vec::new(),
            refused: Vec::new(),
        });
        let mut online = false;
        let mut stopping = false;
        // A status to publish once the publisher's window has room for it.
        let mut status: Option<&Retained> = None;
        loop {
            if online {
                send_acks(&client, &mut due);
            }
            if let Some(f) = feed.as_mut() {
                if let Some(s) = status
                    && online
                    && f.publisher.has_room()
                    && client.try_publish_retained(&s.topic, (s.payload)()).is_ok()
                {
                    f.publisher.handed_other();
                    status = None;
                }
                if online && !stopping {
                    f.pump(&client, &mut eventloop);
                } else {
                    f.flush();
                }
            } else if let Some(s) = status.take()
                && online
                && let Err(e) = client.try_publish_retained(&s.topic, (s.payload)())
            {
                tracing::warn!(error = %e, "Could not queue a status.");
            }
            // Flow control: past the limit, leave new messages with the broker.
            let reading = !online || stopping || order.running() < limit;
            let polled = tokio::select! {
                polled = eventloop.next(), if reading => polled,
                finished = finished_rx.recv_async() => {
                    if let Ok(f) = finished {
                        due.extend(order.finish(f.delivery, f.ack));
                    }
                    continue;
                }
                () = stop.cancelled(), if !stopping => {
                    stopping = true;
                    if online && let Some(s) = &on_stop {
                        match client.try_publish_retained(&s.topic, (s.payload)()) {
                            Ok(()) => {
                                if let Some(f) = feed.as_mut() {
                                    f.publisher.handed_other();
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "Could not queue the offline status."),
                        }
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
                            if !stopping {
                                status = on_connect.as_ref();
                            }
                        }
                        Err(_) => refresh = None,
                    }
                    continue;
                }
                event = next_feed_event(&mut feed, online && !stopping) => {
                    let Some(f) = feed.as_mut() else { continue };
                    match event {
                        FeedEvent::Pushed(row) => {
                            // Take what else has been committed meanwhile, in one go.
                            let mut next = Some(row);
                            while let Some(row) = next {
                                f.publisher.pushed(row);
                                next = f.rows_rx.try_recv().ok();
                            }
                        }
                        FeedEvent::Loaded(rows) => {
                            f.load = None;
                            match rows {
                                Ok(rows) => f.publisher.loaded(rows),
                                Err(e) => {
                                    tracing::error!(error = %e, "Cannot read the outbox.");
                                    f.publisher.load_failed();
                                }
                            }
                        }
                        FeedEvent::NewRows | FeedEvent::DeleteDue => {}
                    }
                    continue;
                }
            };
            match polled {
                Polled::Connected {
                    session_present,
                    receive_max,
                    max_packet,
                } => {
                    online = true;
                    backoff.reset();
                    tracing::info!(session_present, "Connected to the MQTT broker.");
                    if let Some(f) = feed.as_mut() {
                        f.publisher.connected(receive_max, max_packet);
                    }
                    if let Err(e) = client.try_subscribe_all(&filters) {
                        tracing::error!(error = %e, "Could not queue the subscriptions.");
                    }
                    status = on_connect.as_ref();
                }
                Polled::Message {
                    topic,
                    payload,
                    response_topic,
                    correlation,
                    expiry_secs,
                    ack,
                } => {
                    let delivery = order.arrive(ack);
                    let ticket = Ticket::new(finished_tx.clone(), delivery);
                    if stopping {
                        // Not taken: the broker delivers it again after the restart.
                        ticket.release();
                        continue;
                    }
                    dispatch(Message {
                        topic,
                        payload,
                        response_topic,
                        correlation,
                        expiry_secs,
                        received: Instant::now(),
                        ticket,
                    });
                }
                Polled::Outgoing(pkid) => {
                    if let Some(f) = feed.as_mut() {
                        f.publisher.outgoing(pkid);
                    }
                }
                Polled::PubAck { pkid, refusal } => {
                    if let Some(f) = feed.as_mut() {
                        f.acked(pkid, refusal);
                    }
                }
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
                    if let Some(f) = feed.as_mut() {
                        f.delete_at = Some(Instant::now());
                        f.flush();
                    }
                    return;
                }
                Polled::Nothing => {}
                Polled::Lost(e) => {
                    online = false;
                    connected_tx.send_replace(false);
                    // Nothing of this connection is acknowledged on the next one, and the
                    // outbox is sent again by the publisher, not by rumqttc.
                    order.reconnected();
                    due.clear();
                    eventloop.forget_pending();
                    if let Some(f) = feed.as_mut() {
                        f.lost();
                    }
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
