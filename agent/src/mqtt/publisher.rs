//! What the device connection's driver publishes, and what each PUBACK delivers (sans-IO).
//!
//! Rows come from the outbox in id order and go out in that order, at most `window` in flight
//! (never more than the broker's Receive Maximum). Each publish is matched to the packet id
//! rumqttc gives it when it goes out, so a PUBACK names exactly one row, whatever the order.
//!
//! A lost connection sends every row that was in flight again, in order and with DUP set
//! (MQTT-3.3.1-1), from the driver rather than from rumqttc's resend queue. Those rows are
//! suspects: they go out one at a time, and a connection lost while one of them is alone in
//! flight counts against it. So does a PUBACK with an error reason. After
//! [`MAX_ATTEMPTS`] such failures a row is dropped (counted and logged by the driver): a
//! message the broker refuses is never sent forever. A reply whose requester's expiry has
//! passed is not sent at all.

use std::collections::{HashSet, VecDeque};

use crate::protocol::check_topic_name;
use crate::store::outbox::OutboxRow;

/// Failures (refusals, or connections lost with it alone in flight) before a row is dropped.
pub const MAX_ATTEMPTS: u32 = 3;

/// What is in flight on the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    Row {
        row: OutboxRow,
        dup: bool,
    },
    /// A publish that is not in the outbox (the retained status).
    Other,
}

/// A row waiting to go out.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Queued {
    row: OutboxRow,
    /// Sent before: it goes out with DUP set.
    dup: bool,
    /// Failures counted against it.
    failures: u32,
}

/// The next thing to do with the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Publish the row [`Publisher::peek`] shows (with DUP when `dup`), then report it with
    /// [`Publisher::handed`].
    Send { dup: bool },
    /// Its requester's expiry passed: delete it unsent.
    Expired(i64),
    /// It cannot be published (larger than the broker accepts, or a topic no broker takes):
    /// delete it unsent.
    Unsendable { id: i64, why: String },
}

/// What a PUBACK meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acked {
    /// The row is delivered: delete it.
    Delivered(i64),
    /// The broker refused the row; it goes out again.
    Refused { id: i64, failures: u32 },
    /// The broker refused the row once too often: delete it.
    Dropped { id: i64, failures: u32 },
    /// Not a row (the status), or a packet id we did not send.
    Other,
}

/// A load the driver should start: rows with `id > after`, at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub after: i64,
    pub limit: usize,
}

/// The publisher's state on the current connection.
#[derive(Debug)]
pub struct Publisher {
    /// Rows up to this id have been loaded.
    after: i64,
    ready: VecDeque<Queued>,
    /// Handed to the client, waiting for the packet id rumqttc gives them, in order.
    handed: VecDeque<(Sent, u32)>,
    /// On the wire, waiting for their PUBACK, in send order: (packet id, what, failures).
    in_flight: VecDeque<(u16, Sent, u32)>,
    window_cap: usize,
    window: usize,
    /// The broker's Maximum Packet Size, if it named one.
    max_packet: Option<usize>,
    loading: bool,
    /// Rows in flight when the last connection was lost: sent one at a time.
    suspects: HashSet<i64>,
}

impl Publisher {
    /// A publisher at the start of the outbox, keeping at most `window` publishes in flight.
    pub fn new(window: usize) -> Publisher {
        let window = window.max(1);
        Publisher {
            after: 0,
            ready: VecDeque::new(),
            handed: VecDeque::new(),
            in_flight: VecDeque::new(),
            window_cap: window,
            window,
            max_packet: None,
            loading: false,
            suspects: HashSet::new(),
        }
    }

    /// A CONNACK: the broker's Receive Maximum and Maximum Packet Size, if it sent them.
    pub fn connected(&mut self, receive_max: Option<u16>, max_packet: Option<u32>) {
        self.window = receive_max.map_or(self.window_cap, |r| {
            self.window_cap.min(usize::from(r)).max(1)
        });
        self.max_packet = max_packet.and_then(|m| usize::try_from(m).ok());
    }

    /// The connection is gone. Everything in flight goes out again, in order, with DUP; a row
    /// that was alone in flight counts a failure. Returns the rows to drop (too many failures).
    pub fn lost(&mut self) -> Vec<(i64, u32)> {
        let mut back: Vec<Queued> = Vec::new();
        let sent = self
            .in_flight
            .drain(..)
            .map(|(_, s, f)| (s, f))
            .chain(self.handed.drain(..));
        for (s, failures) in sent {
            if let Sent::Row { row, .. } = s {
                back.push(Queued {
                    row,
                    dup: true,
                    failures,
                });
            }
        }
        let mut dropped = Vec::new();
        if let [alone] = back.as_mut_slice() {
            alone.failures += 1;
            if alone.failures >= MAX_ATTEMPTS {
                dropped.push((alone.row.id, alone.failures));
                back.clear();
            }
        }
        self.suspects.extend(back.iter().map(|q| q.row.id));
        for q in back.into_iter().rev() {
            self.ready.push_front(q);
        }
        dropped
    }

    /// The load to start, if newer rows are committed (`committed` is the newest id) and
    /// there is room for them.
    pub fn want_load(&mut self, committed: i64) -> Option<Load> {
        if self.loading || committed <= self.after || self.ready.len() >= self.window_cap {
            return None;
        }
        self.loading = true;
        Some(Load {
            after: self.after,
            limit: self.window_cap * 2 - self.ready.len(),
        })
    }

    /// The rows a load returned, in id order.
    pub fn loaded(&mut self, rows: Vec<OutboxRow>) {
        self.loading = false;
        for row in rows {
            if row.id > self.after {
                self.after = row.id;
                self.ready.push_back(Queued {
                    row,
                    dup: false,
                    failures: 0,
                });
            }
        }
    }

    /// A row the store pushed as it committed it: taken when it is the next one and there is
    /// room, else left for a load (the watermark says it is there). Returns whether taken.
    pub fn pushed(&mut self, row: OutboxRow) -> bool {
        if row.id != self.after + 1 || self.ready.len() >= self.window_cap * 2 {
            return false;
        }
        self.after = row.id;
        self.ready.push_back(Queued {
            row,
            dup: false,
            failures: 0,
        });
        true
    }

    /// A load failed: it may be tried again.
    pub fn load_failed(&mut self) {
        self.loading = false;
    }

    fn in_flight_count(&self) -> usize {
        self.in_flight.len() + self.handed.len()
    }

    /// Room for one more publish that is not a row (the status)?
    pub fn has_room(&self) -> bool {
        self.in_flight_count() < self.window && !self.handed_dup()
    }

    fn handed_dup(&self) -> bool {
        self.handed
            .iter()
            .any(|(s, _)| matches!(s, Sent::Row { dup: true, .. }))
    }

    /// The next thing to do, if the window allows. `now_ms` decides expiry.
    ///
    /// Resends (DUP) and first sends go to rumqttc by different ways (its resend queue, which
    /// it serves first, and its request channel), so one kind is handed only while none of
    /// the other waits for its packet id: the order they go out in is the order handed.
    pub fn next(&mut self, now_ms: i64) -> Option<Next> {
        let front = self.ready.front()?;
        if let Some(expires) = front.row.message.expires_ms
            && expires <= now_ms
        {
            let q = self.ready.pop_front()?;
            self.suspects.remove(&q.row.id);
            return Some(Next::Expired(q.row.id));
        }
        let bytes = front.row.message.wire_bytes();
        let unsendable = match self.max_packet {
            Some(max) if bytes > max => Some(format!(
                "it is about {bytes} bytes, over the broker's Maximum Packet Size of {max}"
            )),
            _ => check_topic_name(&front.row.message.topic)
                .err()
                .map(|e| format!("its topic cannot be published: {e}")),
        };
        if let Some(why) = unsendable {
            let q = self.ready.pop_front()?;
            self.suspects.remove(&q.row.id);
            return Some(Next::Unsendable { id: q.row.id, why });
        }
        let probing = self.suspects.contains(&front.row.id);
        let busy = self.in_flight_count();
        if busy >= self.window || (probing && busy > 0) {
            return None;
        }
        let mixing = if front.dup {
            !self.handed.is_empty()
        } else {
            self.handed_dup()
        };
        if mixing {
            return None;
        }
        Some(Next::Send { dup: front.dup })
    }

    /// The row to publish next.
    pub fn peek(&self) -> Option<&OutboxRow> {
        self.ready.front().map(|q| &q.row)
    }

    /// The row [`Publisher::next`] offered went to the client.
    pub fn handed(&mut self) {
        if let Some(q) = self.ready.pop_front() {
            self.handed.push_back((
                Sent::Row {
                    row: q.row,
                    dup: q.dup,
                },
                q.failures,
            ));
        }
    }

    /// A publish that is not a row went to the client.
    pub fn handed_other(&mut self) {
        self.handed.push_back((Sent::Other, 0));
    }

    /// rumqttc put a QoS 1 publish on the wire with `pkid`: the oldest handed one.
    pub fn outgoing(&mut self, pkid: u16) {
        if let Some((s, f)) = self.handed.pop_front() {
            self.in_flight.push_back((pkid, s, f));
        }
    }

    /// A PUBACK for `pkid`; `ok` unless its reason code is an error (0x80 and above).
    pub fn acked(&mut self, pkid: u16, ok: bool) -> Acked {
        let Some(i) = self.in_flight.iter().position(|(p, _, _)| *p == pkid) else {
            return Acked::Other;
        };
        let Some((_, sent, failures)) = self.in_flight.remove(i) else {
            return Acked::Other;
        };
        let Sent::Row { row, .. } = sent else {
            return Acked::Other;
        };
        self.suspects.remove(&row.id);
        if ok {
            return Acked::Delivered(row.id);
        }
        let failures = failures + 1;
        if failures >= MAX_ATTEMPTS {
            return Acked::Dropped {
                id: row.id,
                failures,
            };
        }
        let id = row.id;
        self.ready.push_front(Queued {
            row,
            dup: true,
            failures,
        });
        Acked::Refused { id, failures }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::outbox::OutMessage;

    fn row(id: i64) -> OutboxRow {
        row_expiring(id, None)
    }

    fn row_expiring(id: i64, expires_ms: Option<i64>) -> OutboxRow {
        OutboxRow {
            id,
            created_ms: 0,
            message: OutMessage {
                topic: format!("t/{id}"),
                payload: vec![0; 10],
                correlation: None,
                v5: false,
                retain: false,
                expires_ms,
            },
        }
    }

    /// Sends everything the window allows; returns the ids and DUP flags, giving each the next
    /// packet id from `pkid`.
    fn send_all(p: &mut Publisher, pkid: &mut u16) -> Vec<(i64, bool)> {
        let mut out = vec![];
        while let Some(Next::Send { dup }) = p.next(0) {
            out.push((p.peek().unwrap().id, dup));
            p.handed();
            *pkid += 1;
            p.outgoing(*pkid);
        }
        out
    }

    #[test]
    fn rows_go_out_in_order_within_the_window_and_each_puback_names_its_row() {
        let mut p = Publisher::new(3);
        assert_eq!(p.want_load(0), None, "nothing committed");
        let load = p.want_load(5).unwrap();
        assert_eq!(load, Load { after: 0, limit: 6 });
        assert_eq!(p.want_load(5), None, "one load at a time");
        p.loaded((1..=5).map(row).collect());
        let mut pkid = 0;
        assert_eq!(
            send_all(&mut p, &mut pkid),
            vec![(1, false), (2, false), (3, false)]
        );
        // The broker acknowledges the second first: packet ids, not positions, decide.
        assert_eq!(p.acked(2, true), Acked::Delivered(2));
        assert_eq!(send_all(&mut p, &mut pkid), vec![(4, false)]);
        assert_eq!(p.acked(1, true), Acked::Delivered(1));
        assert_eq!(p.acked(99, true), Acked::Other, "an unknown packet id");
    }

    #[test]
    fn pushed_rows_are_taken_in_order_and_gaps_are_loaded() {
        let mut p = Publisher::new(3);
        assert!(p.pushed(row(1)));
        assert!(p.pushed(row(2)));
        assert!(!p.pushed(row(4)), "row 3 is missing: not taken");
        assert!(!p.pushed(row(2)), "already taken");
        assert_eq!(p.want_load(4), Some(Load { after: 2, limit: 4 }));
        p.loaded(vec![row(3), row(4)]);
        assert!(!p.pushed(row(4)), "loaded meanwhile");
        assert!(p.pushed(row(5)));
        assert!(p.pushed(row(6)));
        assert!(!p.pushed(row(7)), "six ready fill twice the window");
        assert_eq!(
            send_all(&mut p, &mut 0),
            vec![(1, false), (2, false), (3, false)]
        );
    }

    #[test]
    fn the_window_shrinks_to_the_brokers_receive_maximum() {
        let mut p = Publisher::new(64);
        p.connected(Some(2), None);
        p.want_load(10).unwrap();
        p.loaded((1..=10).map(row).collect());
        assert_eq!(send_all(&mut p, &mut 0).len(), 2);
    }

    #[test]
    fn a_lost_connection_resends_in_order_with_dup_and_suspects_go_alone() {
        let mut p = Publisher::new(10);
        p.want_load(4).unwrap();
        p.loaded((1..=4).map(row).collect());
        let mut pkid = 0;
        assert_eq!(send_all(&mut p, &mut pkid).len(), 4);
        assert_eq!(p.acked(1, true), Acked::Delivered(1));
        assert!(p.lost().is_empty(), "three in flight: nobody is blamed");
        p.connected(None, None);
        let mut pkid = 0;
        // Suspects go out one at a time, with DUP.
        assert_eq!(send_all(&mut p, &mut pkid), vec![(2, true)]);
        assert_eq!(p.acked(1, true), Acked::Delivered(2));
        assert_eq!(send_all(&mut p, &mut pkid), vec![(3, true)]);
        assert_eq!(p.acked(2, true), Acked::Delivered(3));
        assert_eq!(send_all(&mut p, &mut pkid), vec![(4, true)]);
        assert_eq!(p.acked(3, true), Acked::Delivered(4));
    }

    #[test]
    fn a_row_that_breaks_the_connection_every_time_is_dropped() {
        let mut p = Publisher::new(10);
        p.want_load(3).unwrap();
        p.loaded((1..=3).map(row).collect());
        let mut pkid = 0;
        send_all(&mut p, &mut pkid);
        assert!(p.lost().is_empty());
        for attempt in 1..MAX_ATTEMPTS {
            let sent = send_all(&mut p, &mut pkid);
            assert_eq!(sent, vec![(1, true)], "attempt {attempt}");
            assert!(p.lost().is_empty(), "attempt {attempt}");
        }
        assert_eq!(send_all(&mut p, &mut pkid), vec![(1, true)]);
        assert_eq!(p.lost(), vec![(1, MAX_ATTEMPTS)]);
        // The rest go on: 2 and 3 were suspects too, and are sent one at a time.
        assert_eq!(send_all(&mut p, &mut pkid), vec![(2, true)]);
    }

    #[test]
    fn a_refused_row_is_retried_then_dropped() {
        let mut p = Publisher::new(10);
        p.want_load(2).unwrap();
        p.loaded(vec![row(1), row(2)]);
        let mut pkid = 0;
        assert_eq!(send_all(&mut p, &mut pkid), vec![(1, false), (2, false)]);
        assert_eq!(p.acked(1, false), Acked::Refused { id: 1, failures: 1 });
        assert_eq!(p.acked(2, true), Acked::Delivered(2));
        for failures in 2..MAX_ATTEMPTS {
            assert_eq!(send_all(&mut p, &mut pkid), vec![(1, true)]);
            assert_eq!(p.acked(pkid, false), Acked::Refused { id: 1, failures });
        }
        assert_eq!(send_all(&mut p, &mut pkid), vec![(1, true)]);
        assert_eq!(
            p.acked(pkid, false),
            Acked::Dropped {
                id: 1,
                failures: MAX_ATTEMPTS
            }
        );
        assert_eq!(p.next(0), None);
    }

    #[test]
    fn expired_oversized_and_unpublishable_rows_are_not_sent() {
        let mut p = Publisher::new(10);
        p.connected(None, Some(100));
        p.want_load(3).unwrap();
        let mut big = row(3);
        big.message.payload = vec![0; 200];
        p.loaded(vec![
            row_expiring(1, Some(1_000)),
            row_expiring(2, Some(5_000)),
            big,
        ]);
        assert_eq!(p.next(2_000), Some(Next::Expired(1)));
        assert_eq!(p.next(2_000), Some(Next::Send { dup: false }));
        assert_eq!(p.peek().unwrap().id, 2);
        p.handed();
        assert!(matches!(
            p.next(2_000),
            Some(Next::Unsendable { id: 3, why }) if why.contains("Maximum Packet Size of 100")
        ));
        let mut bad = row(4);
        bad.message.topic = "a/+/b".into();
        p.want_load(4).unwrap();
        p.loaded(vec![bad]);
        assert!(matches!(
            p.next(2_000),
            Some(Next::Unsendable { id: 4, why }) if why.contains("wildcard")
        ));
    }

    #[test]
    fn resends_and_first_sends_are_never_waiting_for_packet_ids_together() {
        let mut p = Publisher::new(10);
        p.want_load(2).unwrap();
        p.loaded(vec![row(1), row(2)]);
        let mut pkid = 0;
        send_all(&mut p, &mut pkid);
        assert_eq!(p.acked(1, false), Acked::Refused { id: 1, failures: 1 });
        p.want_load(3).unwrap();
        p.loaded(vec![row(3)]);
        // Row 1 goes again (DUP); row 3 waits until rumqttc has taken it.
        assert!(matches!(p.next(0), Some(Next::Send { dup: true, .. })));
        p.handed();
        assert_eq!(p.next(0), None);
        p.outgoing(3);
        assert_eq!(p.next(0), Some(Next::Send { dup: false }));
        assert_eq!(p.peek().unwrap().id, 3);
        // And the status waits while a resend is handed.
        let mut q = Publisher::new(10);
        q.want_load(1).unwrap();
        q.loaded(vec![row(1)]);
        send_all(&mut q, &mut 0);
        q.lost();
        q.next(0);
        q.handed();
        assert!(!q.has_room());
    }
}
