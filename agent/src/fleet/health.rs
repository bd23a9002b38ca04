//! The health check after a switch: the first requests run on the new configuration decide
//! whether it stays. Pure: counts and time in, a verdict out.

use std::time::Duration;

pub use crate::config::HealthRule;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pending,
    Healthy,
    /// Roll back.
    Unhealthy,
}

/// The verdict after `ok` answered and `failed` failed local runs, `elapsed` after the switch.
pub fn verdict(rule: &HealthRule, ok: usize, failed: usize, elapsed: Duration) -> Verdict {
    let n = rule.requests.max(1);
    let allowed = (rule.max_error_rate * n as f64).floor() as usize;
    // Already beyond what N runs may hold: no need to wait for the rest.
    if failed > allowed {
        return Verdict::Unhealthy;
    }
    let ran = ok + failed;
    if ran >= n {
        return Verdict::Healthy;
    }
    if elapsed >= rule.window {
        return if ran > 0 && failed as f64 / ran as f64 > rule.max_error_rate {
            Verdict::Unhealthy
        } else {
            Verdict::Healthy
        };
    }
    Verdict::Pending
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: HealthRule = HealthRule {
        requests: 20,
        max_error_rate: 0.25,
        window: Duration::from_secs(60),
    };
    const SOON: Duration = Duration::from_secs(1);
    const LATE: Duration = Duration::from_secs(61);

    #[test]
    fn verdicts() {
        // (ok, failed, elapsed) -> verdict
        let table = [
            (0, 0, SOON, Verdict::Pending),
            (10, 5, SOON, Verdict::Pending),   // 5 of 20 allowed
            (10, 6, SOON, Verdict::Unhealthy), // 6 > 5: decided early
            (15, 5, SOON, Verdict::Healthy),   // 20 ran, 25 %
            (20, 0, SOON, Verdict::Healthy),
            (0, 0, LATE, Verdict::Healthy),   // nothing ran: kept
            (3, 1, LATE, Verdict::Healthy),   // 25 % is not above 25 %
            (2, 2, LATE, Verdict::Unhealthy), // 50 % of what ran
        ];
        for (ok, failed, elapsed, want) in table {
            assert_eq!(
                verdict(&RULE, ok, failed, elapsed),
                want,
                "{ok} ok, {failed} failed"
            );
        }
    }

    #[test]
    fn a_zero_tolerance_rule_rolls_back_on_the_first_failure() {
        let strict = HealthRule {
            max_error_rate: 0.0,
            ..RULE
        };
        assert_eq!(verdict(&strict, 0, 1, SOON), Verdict::Unhealthy);
        assert_eq!(verdict(&strict, 19, 0, SOON), Verdict::Pending);
    }
}
