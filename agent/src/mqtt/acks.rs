//! The acknowledgement order of one connection (sans-IO), as rumqttc's `state.rs` keeps packet
//! ids: every message delivered gets a [`Delivery`] (the connection's epoch and its arrival
//! number); when its holder reports it finished, the acknowledgements that are now due come
//! out, in arrival order (MQTT-4.6.0-2), however the requests finished.
//!
//! A new connection starts a new epoch: what was waiting for an acknowledgement on the old one
//! is dropped (packet ids of an old connection must never acknowledge a message on a new one;
//! the broker delivers those messages again), and a finish reported for an old epoch only
//! frees its place in the flow-control count.

use std::collections::VecDeque;

use crate::ticket::Delivery;

/// One message in the order, until it is acknowledged.
#[derive(Debug)]
enum Entry<A> {
    /// Still being answered. `None`: nothing to acknowledge (QoS 0).
    Running(Option<A>),
    /// Finished; `None`: released without an acknowledgement.
    Done(Option<A>),
}

/// The order of one connection's acknowledgements. `A` is what sending one needs (the packet
/// id and QoS).
#[derive(Debug)]
pub struct AckOrder<A> {
    epoch: u64,
    /// The arrival number of `window[0]`.
    front: u64,
    window: VecDeque<Entry<A>>,
    /// Messages handed on and not finished, whatever connection they came on: what the flow
    /// control counts.
    running: usize,
}

impl<A> Default for AckOrder<A> {
    fn default() -> Self {
        AckOrder {
            epoch: 0,
            front: 0,
            window: VecDeque::new(),
            running: 0,
        }
    }
}

impl<A> AckOrder<A> {
    /// A new connection: nothing from before is acknowledged on it.
    pub fn reconnected(&mut self) {
        self.epoch += 1;
        self.front = 0;
        self.window.clear();
    }

    /// A message arrived and is handed on; `ack` is what acknowledges it (`None` for QoS 0).
    pub fn arrive(&mut self, ack: Option<A>) -> Delivery {
        let seq = self.front + self.window.len() as u64;
        self.window.push_back(Entry::Running(ack));
        self.running += 1;
        Delivery {
            epoch: self.epoch,
            seq,
        }
    }

    /// A message is finished: committed (`ack`) or released. Returns the acknowledgements now
    /// due, oldest first.
    pub fn finish(&mut self, delivery: Delivery, ack: bool) -> Vec<A> {
        self.running = self.running.saturating_sub(1);
        if delivery.epoch != self.epoch {
            return Vec::new();
        }
        let Some(index) = delivery
            .seq
            .checked_sub(self.front)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return Vec::new();
        };
        let Some(entry) = self.window.get_mut(index) else {
            return Vec::new();
        };
        if let Entry::Running(a) = entry {
            let a = a.take();
            *entry = Entry::Done(if ack { a } else { None });
        }
        let mut due = Vec::new();
        while let Some(Entry::Done(_)) = self.window.front() {
            if let Some(Entry::Done(Some(a))) = self.window.pop_front() {
                due.push(a);
            }
            self.front += 1;
        }
        due
    }

    /// Messages handed on and not yet finished, on any connection.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Messages of this connection not yet acknowledged (finished or not): what the broker
    /// counts against the Receive Maximum.
    pub fn unacknowledged(&self) -> usize {
        self.window.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a script of arrivals and finishes; returns what each step acknowledged.
    fn play(steps: &[Step]) -> Vec<Vec<u16>> {
        let mut order = AckOrder::<u16>::default();
        let mut deliveries = Vec::new();
        let mut out = Vec::new();
        for step in steps {
            out.push(match *step {
                Step::Arrive(pkid) => {
                    deliveries.push(order.arrive(pkid));
                    vec![]
                }
                Step::Commit(i) => order.finish(deliveries[i], true),
                Step::Release(i) => order.finish(deliveries[i], false),
                Step::Reconnect => {
                    order.reconnected();
                    vec![]
                }
            });
        }
        out
    }

    #[derive(Clone, Copy)]
    enum Step {
        Arrive(Option<u16>),
        Commit(usize),
        Release(usize),
        Reconnect,
    }
    use Step::*;

    #[test]
    fn acknowledgements_leave_in_arrival_order() {
        let cases: &[(&[Step], &[&[u16]])] = &[
            // In order.
            (
                &[Arrive(Some(1)), Commit(0), Arrive(Some(2)), Commit(1)],
                &[&[], &[1], &[], &[2]],
            ),
            // The second finishes first: it waits for the first.
            (
                &[Arrive(Some(1)), Arrive(Some(2)), Commit(1), Commit(0)],
                &[&[], &[], &[], &[1, 2]],
            ),
            // A released message is skipped, not acknowledged, and does not block the rest.
            (
                &[Arrive(Some(1)), Arrive(Some(2)), Release(0), Commit(1)],
                &[&[], &[], &[], &[2]],
            ),
            // QoS 0 has nothing to acknowledge but keeps its place.
            (
                &[Arrive(None), Arrive(Some(7)), Commit(1), Commit(0)],
                &[&[], &[], &[], &[7]],
            ),
            // A finish reported twice acknowledges once.
            (
                &[
                    Arrive(Some(1)),
                    Arrive(Some(2)),
                    Commit(0),
                    Commit(0),
                    Commit(1),
                ],
                &[&[], &[], &[1], &[], &[2]],
            ),
        ];
        for (steps, want) in cases {
            let got = play(steps);
            let want: Vec<Vec<u16>> = want.iter().map(|w| w.to_vec()).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn nothing_is_acknowledged_across_a_reconnect() {
        // Message 0 arrives on the first connection and finishes after a reconnect; message 1
        // (its redelivery, say) arrives on the second. Packet id 1 may name another message on
        // the new connection: it must not be acknowledged.
        let got = play(&[
            Arrive(Some(1)),
            Reconnect,
            Arrive(Some(1)),
            Commit(0),
            Commit(1),
        ]);
        assert_eq!(got, vec![vec![], vec![], vec![], vec![], vec![1]]);
    }

    #[test]
    fn the_flow_control_count_covers_every_connection() {
        let mut order = AckOrder::<u16>::default();
        let old = order.arrive(Some(1));
        order.reconnected();
        let new = order.arrive(Some(1));
        assert_eq!(
            order.running(),
            2,
            "the old request still occupies the pipeline"
        );
        assert_eq!(order.unacknowledged(), 1);
        assert!(order.finish(old, true).is_empty());
        assert_eq!(order.running(), 1);
        assert_eq!(order.finish(new, true), vec![1]);
        assert_eq!(order.running(), 0);
        assert_eq!(order.unacknowledged(), 0);
    }
}
