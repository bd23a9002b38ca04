//! The receipt for one delivered message: which connection it came on (the connection's epoch)
//! and where it arrived in that connection's order. The MQTT driver that issued it keeps the
//! acknowledgement order; whoever holds the ticket tells the driver, by message, that the
//! message is finished — committed (acknowledge it) or released (leave it for the broker to
//! deliver again).
//!
//! A ticket dropped without either is released: a panic, an early return or a shutdown can
//! never leave a driver waiting for it. This module depends on nothing else in the agent, so
//! the store (which commits) and the pipeline (which holds tickets) need not know the driver.

/// A message's place on its connection: the connection's epoch and its arrival number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Delivery {
    pub epoch: u64,
    pub seq: u64,
}

/// What a ticket tells its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub delivery: Delivery,
    /// Acknowledge the message (its outcome is committed), or leave it unacknowledged.
    pub ack: bool,
}

/// One message in flight. Send it [`Ticket::commit`] once its outcome is durable.
#[derive(Debug)]
pub struct Ticket {
    finished_tx: flume::Sender<Finished>,
    delivery: Delivery,
    done: bool,
}

impl Ticket {
    /// A ticket that reports to `finished_tx` (the issuing driver's inbox).
    pub fn new(finished_tx: flume::Sender<Finished>, delivery: Delivery) -> Ticket {
        Ticket {
            finished_tx,
            delivery,
            done: false,
        }
    }

    pub fn delivery(&self) -> Delivery {
        self.delivery
    }

    /// The message's outcome is committed: the driver acknowledges it, in arrival order, if
    /// it is still on the connection it came on.
    pub fn commit(mut self) {
        self.finish(true);
    }

    /// Not acknowledged: the broker delivers the message again on a later connection.
    pub fn release(mut self) {
        self.finish(false);
    }

    fn finish(&mut self, ack: bool) {
        if !self.done {
            self.done = true;
            // The driver's inbox is unbounded in type but holds at most one message per ticket
            // it issued, and it issues no more than its flow-control window: this never waits.
            // A driver that is gone has nothing left to acknowledge.
            let _ = self.finished_tx.send(Finished {
                delivery: self.delivery,
                ack,
            });
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_reports_exactly_once_and_a_dropped_one_is_released() {
        let (tx, rx) = flume::unbounded();
        let d = |seq| Delivery { epoch: 1, seq };
        Ticket::new(tx.clone(), d(0)).commit();
        Ticket::new(tx.clone(), d(1)).release();
        drop(Ticket::new(tx.clone(), d(2)));
        let got: Vec<Finished> = rx.drain().collect();
        assert_eq!(
            got,
            vec![
                Finished {
                    delivery: d(0),
                    ack: true
                },
                Finished {
                    delivery: d(1),
                    ack: false
                },
                Finished {
                    delivery: d(2),
                    ack: false
                },
            ]
        );
    }

    #[test]
    fn a_ticket_whose_driver_is_gone_drops_quietly() {
        let (tx, rx) = flume::unbounded();
        drop(rx);
        Ticket::new(tx, Delivery { epoch: 0, seq: 0 }).commit();
    }
}
