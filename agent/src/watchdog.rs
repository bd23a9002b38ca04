//! systemd's watchdog, decided here: the agent pings (`WATCHDOG=1`) only while every stage a
//! request needs makes progress, so systemd restarts an agent that is alive but stuck (a store
//! thread that no longer answers, a stage thread gone, workers finishing nothing while
//! requests wait). Pure: observations in, a verdict out; the notify socket is `lib.rs`'s.

/// One look at the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Observation {
    /// The store thread answered a round trip within the check's deadline.
    pub store_answered: bool,
    pub front_alive: bool,
    pub workers_alive: usize,
    /// Local runs finished so far (answered or failed).
    pub runs: usize,
    /// Requests queued for a worker or running on one.
    pub waiting: usize,
}

/// Whether to ping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// Why not, as a sentence for the log and the status.
    Stuck(String),
}

/// The verdict on `now`, given the previous look (one check interval earlier).
pub fn judge(previous: Option<&Observation>, now: &Observation) -> Verdict {
    if !now.store_answered {
        return Verdict::Stuck("the store thread did not answer within the watchdog check".into());
    }
    if !now.front_alive {
        return Verdict::Stuck("the front stage has stopped".into());
    }
    if now.workers_alive == 0 {
        return Verdict::Stuck("no inference worker is running".into());
    }
    if let Some(prev) = previous
        && prev.waiting > 0
        && now.waiting > 0
        && now.runs == prev.runs
    {
        return Verdict::Stuck(format!(
            "the inference workers finished nothing in a whole check interval while {} requests waited",
            now.waiting
        ));
    }
    Verdict::Healthy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_progress_earns_a_ping() {
        let ok = Observation {
            store_answered: true,
            front_alive: true,
            workers_alive: 2,
            runs: 10,
            waiting: 0,
        };
        let with = |f: fn(&mut Observation)| {
            let mut o = ok;
            f(&mut o);
            o
        };
        // (previous, now, healthy)
        let cases: Vec<(Option<Observation>, Observation, bool)> = vec![
            (None, ok, true),
            (Some(ok), ok, true),
            (None, with(|o| o.store_answered = false), false),
            (None, with(|o| o.front_alive = false), false),
            (None, with(|o| o.workers_alive = 0), false),
            // Busy and finishing work: fine.
            (
                Some(with(|o| o.waiting = 5)),
                with(|o| {
                    o.waiting = 5;
                    o.runs = 12
                }),
                true,
            ),
            // Work waited through a whole interval and nothing finished: stuck.
            (
                Some(with(|o| o.waiting = 5)),
                with(|o| o.waiting = 3),
                false,
            ),
            // Idle with nothing waiting is not stuck, however long.
            (Some(ok), ok, true),
            // Work just arrived: not judged until it has waited an interval.
            (Some(ok), with(|o| o.waiting = 4), true),
        ];
        for (i, (prev, now, healthy)) in cases.into_iter().enumerate() {
            let v = judge(prev.as_ref(), &now);
            assert_eq!(v == Verdict::Healthy, healthy, "case {i}: {v:?}");
        }
    }
}
