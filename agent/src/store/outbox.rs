//! The outbox's messages and the publisher's cursor over them.
//!
//! Every reply is written to the outbox before its request is acknowledged, published from
//! there in order, and deleted only after the broker's PUBACK. The [`Cursor`] is the pure
//! bookkeeping the MQTT driver keeps for that: which rows are in flight on the current
//! connection, in the order they were written, so the n-th PUBACK (brokers acknowledge in
//! order, MQTT-4.6.0-2) names the n-th row. It does no IO; the driver feeds it events.

use std::collections::VecDeque;

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
}

impl OutMessage {
    /// The reply to a request, by its route.
    pub fn reply(route: ReplyRoute, payload: Vec<u8>) -> OutMessage {
        OutMessage {
            topic: route.topic,
            payload,
            correlation: route.correlation,
            v5: route.v5,
            retain: false,
        }
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

/// What sits in flight on the connection, in write order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlight {
    Row(i64),
    /// A publish that is not in the outbox (the status).
    Other,
}

/// The publisher's position in the outbox on the current connection.
#[derive(Debug)]
pub struct Cursor {
    /// Rows up to this id have been loaded (sent, or waiting in `ready`).
    after: i64,
    ready: VecDeque<OutboxRow>,
    in_flight: VecDeque<InFlight>,
    window: usize,
    /// Bumped when the connection's session is lost, so a load started before is discarded.
    epoch: u64,
    loading: bool,
}

/// A load the driver should start: rows with `id > after`, at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub epoch: u64,
    pub after: i64,
    pub limit: usize,
}

impl Cursor {
    /// A cursor at the start of the outbox, keeping at most `window` publishes in flight.
    pub fn new(window: usize) -> Cursor {
        Cursor {
            after: 0,
            ready: VecDeque::new(),
            in_flight: VecDeque::new(),
            window: window.max(1),
            epoch: 0,
            loading: false,
        }
    }

    /// A CONNACK. With the session kept, the client library resends what was in flight, in
    /// order, and the bookkeeping stands. Without it, what was in flight is gone: start again
    /// from the oldest row not acknowledged.
    pub fn connected(&mut self, session_present: bool) {
        if session_present {
            return;
        }
        let oldest = self
            .in_flight
            .iter()
            .find_map(|f| match f {
                InFlight::Row(id) => Some(*id),
                InFlight::Other => None,
            })
            .or_else(|| self.ready.front().map(|r| r.id));
        if let Some(oldest) = oldest {
            self.after = oldest - 1;
        }
        self.in_flight.clear();
        self.ready.clear();
        self.epoch += 1;
        self.loading = false;
    }

    /// The load to start, if more rows are committed (`committed` is the newest id) and there
    /// is room for them.
    pub fn want_load(&mut self, committed: i64) -> Option<Load> {
        if self.loading || !self.ready.is_empty() || committed <= self.after {
            return None;
        }
        let room = self.window.saturating_sub(self.in_flight.len());
        if room == 0 {
            return None;
        }
        self.loading = true;
        Some(Load {
            epoch: self.epoch,
            after: self.after,
            limit: room,
        })
    }

    /// The rows a load returned (in id order). Rows of an earlier session are dropped.
    pub fn loaded(&mut self, epoch: u64, rows: Vec<OutboxRow>) {
        if epoch != self.epoch {
            return;
        }
        self.loading = false;
        if let Some(last) = rows.last() {
            self.after = last.id;
        }
        self.ready.extend(rows);
    }

    /// A load failed: it may be tried again.
    pub fn load_failed(&mut self, epoch: u64) {
        if epoch == self.epoch {
            self.loading = false;
        }
    }

    /// The next row to publish, if the window allows. Report it with [`Cursor::sent`] or
    /// give it back with [`Cursor::unsent`].
    pub fn next_to_send(&mut self) -> Option<OutboxRow> {
        if self.in_flight.len() >= self.window {
            return None;
        }
        self.ready.pop_front()
    }

    pub fn unsent(&mut self, row: OutboxRow) {
        self.ready.push_front(row);
    }

    /// A publish went to the client, after any before it.
    pub fn sent(&mut self, what: InFlight) {
        self.in_flight.push_back(what);
    }

    /// A PUBACK: the oldest publish in flight is delivered. Returns its row, to delete.
    pub fn acked(&mut self) -> Option<i64> {
        match self.in_flight.pop_front() {
            Some(InFlight::Row(id)) => Some(id),
            _ => None,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64) -> OutboxRow {
        OutboxRow {
            id,
            created_ms: 0,
            message: OutMessage {
                topic: format!("t/{id}"),
                payload: vec![],
                correlation: None,
                v5: false,
                retain: false,
            },
        }
    }

    fn send_all(c: &mut Cursor) -> Vec<i64> {
        let mut ids = vec![];
        while let Some(r) = c.next_to_send() {
            ids.push(r.id);
            c.sent(InFlight::Row(r.id));
        }
        ids
    }

    #[test]
    fn publishes_in_order_within_the_window_and_deletes_on_puback() {
        let mut c = Cursor::new(2);
        assert_eq!(c.want_load(0), None, "nothing committed");
        let load = c.want_load(5).unwrap();
        assert_eq!((load.after, load.limit), (0, 2));
        assert_eq!(c.want_load(5), None, "one load at a time");
        c.loaded(load.epoch, vec![row(1), row(2)]);
        assert_eq!(send_all(&mut c), vec![1, 2]);
        assert_eq!(c.want_load(5), None, "window full");
        assert_eq!(c.acked(), Some(1));
        c.sent(InFlight::Other);
        assert_eq!(c.want_load(5), None, "row 2 and the status fill the window");
        assert_eq!(c.acked(), Some(2));
        let load = c.want_load(5).unwrap();
        assert_eq!((load.after, load.limit), (2, 1));
        assert_eq!(c.acked(), None, "the status is not a row");
    }

    #[test]
    fn a_lost_session_restarts_from_the_oldest_unacknowledged_row() {
        let mut c = Cursor::new(10);
        let load = c.want_load(4).unwrap();
        c.loaded(load.epoch, vec![row(1), row(2), row(3), row(4)]);
        c.sent(InFlight::Other);
        for _ in 0..2 {
            let r = c.next_to_send().unwrap();
            c.sent(InFlight::Row(r.id));
        }
        assert_eq!(c.acked(), None, "the status went first");
        assert_eq!(c.acked(), Some(1));
        // Row 2 in flight, 3 and 4 ready: the session is lost.
        let stale = c.want_load(9);
        assert!(stale.is_none(), "rows are ready");
        c.connected(false);
        assert_eq!(c.in_flight(), 0);
        let load = c.want_load(4).unwrap();
        assert_eq!(load.after, 1, "row 2 was never acknowledged");
        c.loaded(load.epoch, vec![row(2), row(3), row(4)]);
        assert_eq!(send_all(&mut c), vec![2, 3, 4]);
    }

    #[test]
    fn a_kept_session_keeps_the_bookkeeping() {
        let mut c = Cursor::new(10);
        let load = c.want_load(2).unwrap();
        c.loaded(load.epoch, vec![row(1), row(2)]);
        send_all(&mut c);
        c.connected(true);
        assert_eq!(c.acked(), Some(1));
        assert_eq!(c.acked(), Some(2));
        assert_eq!(c.acked(), None);
    }

    #[test]
    fn a_load_from_before_a_lost_session_is_discarded() {
        let mut c = Cursor::new(10);
        let old = c.want_load(3).unwrap();
        c.connected(false);
        c.loaded(old.epoch, vec![row(1)]);
        assert!(c.next_to_send().is_none(), "stale rows must not be sent");
        let load = c.want_load(3).unwrap();
        assert_eq!(load.after, 0);
        c.load_failed(load.epoch);
        assert!(c.want_load(3).is_some(), "a failed load can be retried");
    }
}
