//! Actuators: a GPIO output (embedded-hal `OutputPin`) raised while a class is detected and
//! held for a while after the last detection. The rule is pure (`Hold`); the pin is driven by
//! `Actuator`, whose pin errors are counted and reported, never fatal.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use embedded_hal::digital::{ErrorType, OutputPin};

/// When to raise the pin.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The class that raises it (`bearing_fault`).
    pub on_class: String,
    /// Only from this top-1 probability.
    pub min_probability: f64,
    /// How long the pin stays up after the last detection.
    pub hold: Duration,
    /// Detections in a row before the pin rises (1: the first one), so one odd window does
    /// not sound the alarm.
    pub confirm: u32,
}

/// The rule's state: up until `until`.
#[derive(Debug, Clone)]
pub struct Hold {
    rule: Rule,
    until: Option<Instant>,
    streak: u32,
}

impl Hold {
    pub fn new(rule: Rule) -> Hold {
        Hold {
            rule,
            until: None,
            streak: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.until.is_some()
    }

    /// One result: the level to set, if it changes.
    pub fn observe(&mut self, label: &str, probability: f64, now: Instant) -> Option<bool> {
        if label == self.rule.on_class && probability >= self.rule.min_probability {
            self.streak = self.streak.saturating_add(1);
            if self.streak >= self.rule.confirm.max(1) {
                let was_up = self.until.is_some();
                self.until = Some(now + self.rule.hold);
                return (!was_up).then_some(true);
            }
            return self.tick(now);
        }
        self.streak = 0;
        self.tick(now)
    }

    /// Time passing: the level to set, if the hold ran out.
    pub fn tick(&mut self, now: Instant) -> Option<bool> {
        match self.until {
            Some(t) if now >= t => {
                self.until = None;
                Some(false)
            }
            _ => None,
        }
    }
}

/// A pin, and the rule that drives it.
pub struct Actuator<P> {
    pub name: String,
    pin: P,
    active_low: bool,
    hold: Hold,
    /// Writes that failed.
    pub failures: u64,
}

impl<P> std::fmt::Debug for Actuator<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actuator")
            .field("name", &self.name)
            .field("active_low", &self.active_low)
            .field("hold", &self.hold)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

/// What a level change amounted to, for the event it makes.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub level: bool,
    pub error: Option<String>,
}

impl<P: OutputPin> Actuator<P> {
    /// Starts with the pin inactive.
    pub fn new(name: String, mut pin: P, active_low: bool, rule: Rule) -> Actuator<P> {
        let failures = u64::from(drive(&mut pin, active_low, false).is_err());
        Actuator {
            name,
            pin,
            active_low,
            hold: Hold::new(rule),
            failures,
        }
    }

    pub fn observe(&mut self, label: &str, probability: f64, now: Instant) -> Option<Change> {
        let level = self.hold.observe(label, probability, now)?;
        Some(self.set(level))
    }

    pub fn tick(&mut self, now: Instant) -> Option<Change> {
        let level = self.hold.tick(now)?;
        Some(self.set(level))
    }

    fn set(&mut self, level: bool) -> Change {
        match drive(&mut self.pin, self.active_low, level) {
            Ok(()) => Change { level, error: None },
            Err(e) => {
                self.failures += 1;
                tracing::error!(actuator = %self.name, level, error = %e, "Cannot drive the actuator's pin.");
                Change {
                    level,
                    error: Some(e),
                }
            }
        }
    }
}

fn drive<P: OutputPin>(pin: &mut P, active_low: bool, active: bool) -> Result<(), String> {
    let r = if active != active_low {
        pin.set_high()
    } else {
        pin.set_low()
    };
    r.map_err(|e| format!("{e:?}"))
}

/// A simulated output pin: its level and every change, readable from elsewhere.
#[derive(Debug, Clone, Default)]
pub struct SimPin {
    state: Arc<Mutex<SimPinState>>,
}

#[derive(Debug, Clone, Default)]
pub struct SimPinState {
    pub high: bool,
    /// (when, level) of every write.
    pub writes: Vec<(Instant, bool)>,
}

impl SimPin {
    pub fn state(&self) -> SimPinState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn write(&self, high: bool) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.high = high;
        s.writes.push((Instant::now(), high));
    }
}

impl ErrorType for SimPin {
    type Error = std::convert::Infallible;
}

impl OutputPin for SimPin {
    fn set_low(&mut self) -> Result<(), Self::Error> {
        self.write(false);
        Ok(())
    }

    fn set_high(&mut self) -> Result<(), Self::Error> {
        self.write(true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use embedded_hal_mock::eh1::MockError;
    use embedded_hal_mock::eh1::digital::{Mock, State, Transaction as T};

    fn rule() -> Rule {
        Rule {
            on_class: "bearing_fault".into(),
            min_probability: 0.8,
            hold: Duration::from_secs(5),
            confirm: 1,
        }
    }

    #[test]
    fn the_hold_rises_on_a_confident_detection_and_falls_after_the_hold() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut h = Hold::new(rule());
        assert_eq!(h.observe("normal", 0.99, s(0)), None);
        assert_eq!(
            h.observe("bearing_fault", 0.7, s(0)),
            None,
            "not confident enough"
        );
        assert_eq!(h.observe("bearing_fault", 0.9, s(1)), Some(true));
        assert_eq!(
            h.observe("bearing_fault", 0.95, s(3)),
            None,
            "already up; hold extended to 8 s"
        );
        assert_eq!(h.observe("normal", 0.99, s(7)), None, "still held");
        assert_eq!(h.tick(s(8)), Some(false));
        assert_eq!(h.tick(s(9)), None);
        assert!(!h.is_up());
    }

    #[test]
    fn a_confirmed_rule_needs_detections_in_a_row() {
        let t0 = Instant::now();
        let mut h = Hold::new(Rule {
            confirm: 3,
            ..rule()
        });
        assert_eq!(h.observe("bearing_fault", 0.9, t0), None);
        assert_eq!(h.observe("bearing_fault", 0.9, t0), None);
        assert_eq!(h.observe("normal", 0.9, t0), None, "the streak breaks");
        assert_eq!(h.observe("bearing_fault", 0.9, t0), None);
        assert_eq!(h.observe("bearing_fault", 0.9, t0), None);
        assert_eq!(h.observe("bearing_fault", 0.9, t0), Some(true));
    }

    #[test]
    fn the_pin_follows_the_rule_and_active_low_inverts_it() {
        let t0 = Instant::now();
        let mut pin = Mock::new(&[
            T::set(State::High), // inactive at start (active low)
            T::set(State::Low),  // raised
            T::set(State::High), // released
        ]);
        let mut a = Actuator::new("alarm".into(), pin.clone(), true, rule());
        assert_eq!(
            a.observe("bearing_fault", 0.9, t0),
            Some(Change {
                level: true,
                error: None
            })
        );
        assert_eq!(
            a.tick(t0 + Duration::from_secs(6)).map(|c| c.level),
            Some(false)
        );
        pin.done();
    }

    #[test]
    fn a_failing_pin_is_counted_and_reported() {
        let t0 = Instant::now();
        let mut pin = Mock::new(&[
            T::set(State::Low),
            T::set(State::High).with_error(MockError::Io(std::io::ErrorKind::BrokenPipe)),
        ]);
        let mut a = Actuator::new("alarm".into(), pin.clone(), false, rule());
        let c = a.observe("bearing_fault", 0.9, t0).unwrap();
        assert!(c.level && c.error.is_some(), "{c:?}");
        assert_eq!(a.failures, 1);
        pin.done();
    }

    #[test]
    fn a_simulated_pin_records_its_writes() {
        let pin = SimPin::default();
        let mut a = Actuator::new("alarm".into(), pin.clone(), false, rule());
        a.observe("bearing_fault", 0.99, Instant::now());
        let s = pin.state();
        assert!(s.high);
        assert_eq!(
            s.writes.iter().map(|w| w.1).collect::<Vec<_>>(),
            vec![false, true]
        );
    }
}
