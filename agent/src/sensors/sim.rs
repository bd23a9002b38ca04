//! A simulated MPU-6050 on a simulated bus, for the demo and the tests: it implements the
//! embedded-hal `I2c` trait at the register level (the real driver runs against it), fills its
//! FIFO in real time from a simulated rotating machine — the signals the vibration model was
//! trained on (`models/make_models.py`) — and fails on a schedule: NACKs, bus errors, a stuck
//! output.

use std::collections::VecDeque;
use std::time::Instant;

use embedded_hal::i2c::{ErrorKind, ErrorType, I2c, NoAcknowledgeSource, Operation};

pub use crate::config::{Condition, Fault, FaultKind, Phase};

use super::mpu6050::{FIFO_BYTES, bits, reg};

/// A simulated rotating machine: shaft speed, residual unbalance, noise, gravity on z, and the
/// condition's signature, as a function of time (the continuous form of the training windows).
#[derive(Debug, Clone)]
pub struct Machine {
    f0: f64,
    phase: f64,
    noise: f64,
    a1: f64,
    a2: f64,
    hum: f64,
    imbalance_amp: f64,
    bpfo: f64,
    fres: f64,
    damp: f64,
    ring_amp: f64,
    direction: [f64; 3],
    rng: fastrand::Rng,
}

impl Machine {
    pub fn new(seed: u64) -> Machine {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut u = |a: f64, b: f64| a + (b - a) * rng.f64();
        let f0 = u(15.0, 50.0);
        let d = [u(0.2, 1.0), u(0.2, 1.0), u(0.1, 0.5)];
        let sum: f64 = d.iter().sum();
        Machine {
            f0,
            phase: u(0.0, std::f64::consts::TAU),
            noise: u(0.02, 0.10),
            a1: u(0.02, 0.08),
            a2: u(0.0, 0.04),
            hum: u(0.0, 0.02),
            imbalance_amp: u(0.10, 0.30) * (0.5 + 1.5 * (f0 / 50.0).powi(2)),
            bpfo: f0 * u(3.0, 3.6),
            fres: u(150.0, 350.0),
            damp: u(60.0, 180.0),
            ring_amp: u(0.12, 0.6),
            direction: [d[0] / sum, d[1] / sum, d[2] / sum],
            rng,
        }
    }

    /// The acceleration in g at time `t` seconds.
    pub fn sample(&mut self, t: f64, condition: Condition) -> [f64; 3] {
        use std::f64::consts::TAU;
        let w = TAU * self.f0 * t + self.phase;
        let mut x = self.a1 * w.cos() + self.a2 * (2.0 * w).cos();
        let mut y = self.a1 * w.sin() + self.a2 * (2.0 * w).sin();
        let mut z = 1.0 + 0.3 * self.a1 * (w + 0.5).cos();
        let hum = self.hum * (TAU * 50.0 * t).sin();
        match condition {
            Condition::Normal => {}
            Condition::Imbalance => {
                x += self.imbalance_amp * w.cos();
                y += self.imbalance_amp * w.sin();
                z += 0.2 * self.imbalance_amp * w.cos();
            }
            Condition::BearingFault => {
                // The ring of the most recent ball pass, and the one before it.
                let period = 1.0 / self.bpfo;
                let since = t % period;
                let mut ring = 0.0;
                for dt in [since, since + period] {
                    ring += self.ring_amp * (-self.damp * dt).exp() * (TAU * self.fres * dt).sin();
                }
                x += self.direction[0] * ring * 1.5;
                y += self.direction[1] * ring * 1.5;
                z += self.direction[2] * ring * 1.5;
            }
        }
        let mut n = || self.noise * gaussian(&mut self.rng);
        [x + hum + n(), y + hum + n(), z + hum + n()]
    }
}

fn gaussian(rng: &mut fastrand::Rng) -> f64 {
    // Box-Muller.
    let u1 = rng.f64().max(1e-12);
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The simulated bus error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimError(pub ErrorKind);

impl embedded_hal::i2c::Error for SimError {
    fn kind(&self) -> ErrorKind {
        self.0
    }
}

/// An MPU-6050 that is a simulation, on a bus of its own.
#[derive(Debug)]
pub struct SimMpu6050 {
    address: u8,
    regs: [u8; 128],
    fifo: VecDeque<u8>,
    start: Instant,
    /// Samples generated so far (the FIFO's clock).
    produced: u64,
    machine: Machine,
    phases: Vec<Phase>,
    faults: Vec<Fault>,
    stuck_value: Option<[u8; 6]>,
}

impl SimMpu6050 {
    pub fn new(address: u8, seed: u64, phases: Vec<Phase>, faults: Vec<Fault>) -> SimMpu6050 {
        let mut regs = [0u8; 128];
        regs[usize::from(reg::WHO_AM_I)] = 0x68;
        regs[usize::from(reg::PWR_MGMT_1)] = 0x40; // asleep after power-up
        SimMpu6050 {
            address,
            regs,
            fifo: VecDeque::new(),
            start: Instant::now(),
            produced: 0,
            machine: Machine::new(seed),
            phases,
            faults,
            stuck_value: None,
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn condition_at(&self, ms: u64) -> Condition {
        self.phases
            .iter()
            .filter(|p| p.after_ms <= ms)
            .max_by_key(|p| p.after_ms)
            .map_or(Condition::Normal, |p| p.state)
    }

    fn fault_now(&self) -> Option<FaultKind> {
        let ms = self.elapsed_ms();
        self.faults
            .iter()
            .find(|f| f.after_ms <= ms && ms < f.after_ms.saturating_add(f.duration_ms))
            .map(|f| f.kind)
    }

    fn rate_hz(&self) -> f64 {
        1000.0 / (1.0 + f64::from(self.regs[usize::from(reg::SMPLRT_DIV)]))
    }

    fn lsb_per_g(&self) -> f64 {
        match self.regs[usize::from(reg::ACCEL_CONFIG)] & 0x18 {
            0x00 => 16384.0,
            0x08 => 8192.0,
            0x10 => 4096.0,
            _ => 2048.0,
        }
    }

    fn sampling(&self) -> bool {
        self.regs[usize::from(reg::PWR_MGMT_1)] & 0x40 == 0
            && self.regs[usize::from(reg::USER_CTRL)] & bits::FIFO_ENABLE != 0
            && self.regs[usize::from(reg::FIFO_EN)] & bits::ACCEL_FIFO_EN != 0
    }

    /// Brings the FIFO up to now.
    fn fill(&mut self) {
        let rate = self.rate_hz();
        let due = (self.start.elapsed().as_secs_f64() * rate) as u64;
        if !self.sampling() {
            self.produced = due;
            return;
        }
        let stuck = self.fault_now() == Some(FaultKind::Stuck);
        let scale = self.lsb_per_g();
        // At most one FIFO's worth: older samples would be overwritten anyway.
        let max = (FIFO_BYTES / 6) as u64 + 1;
        if due.saturating_sub(self.produced) > max {
            self.produced = due - max;
            self.regs[usize::from(reg::INT_STATUS)] |= bits::FIFO_OFLOW_INT;
        }
        while self.produced < due {
            let t = self.produced as f64 / rate;
            let condition = self.condition_at((t * 1e3) as u64);
            let g = self.machine.sample(t, condition);
            let mut bytes = [0u8; 6];
            for (i, v) in g.iter().enumerate() {
                let counts = (v * scale).round().clamp(-32768.0, 32767.0) as i16;
                bytes[2 * i..2 * i + 2].copy_from_slice(&counts.to_be_bytes());
            }
            if stuck {
                bytes = *self.stuck_value.get_or_insert(bytes);
            } else {
                self.stuck_value = None;
            }
            if self.fifo.len() + 6 > FIFO_BYTES {
                self.fifo.drain(..6);
                self.regs[usize::from(reg::INT_STATUS)] |= bits::FIFO_OFLOW_INT;
            }
            self.fifo.extend(bytes);
            self.produced += 1;
        }
    }

    fn write_reg(&mut self, r: u8, value: u8) {
        match r {
            reg::PWR_MGMT_1 if value & bits::DEVICE_RESET != 0 => {
                let who = self.regs[usize::from(reg::WHO_AM_I)];
                self.regs = [0u8; 128];
                self.regs[usize::from(reg::WHO_AM_I)] = who;
                self.regs[usize::from(reg::PWR_MGMT_1)] = 0x40;
                self.fifo.clear();
            }
            reg::USER_CTRL if value & bits::FIFO_RESET != 0 => {
                self.fifo.clear();
                self.regs[usize::from(reg::INT_STATUS)] &= !bits::FIFO_OFLOW_INT;
                self.regs[usize::from(reg::USER_CTRL)] = value & !bits::FIFO_RESET;
            }
            _ => self.regs[usize::from(r & 0x7F)] = value,
        }
    }

    fn read(&mut self, start: u8, out: &mut [u8]) {
        self.fill();
        if start == reg::FIFO_R_W {
            for b in out.iter_mut() {
                *b = self.fifo.pop_front().unwrap_or(0);
            }
            return;
        }
        if start == reg::FIFO_COUNT_H {
            let n = u16::try_from(self.fifo.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes();
            for (b, v) in out.iter_mut().zip(n.iter().chain(std::iter::repeat(&0))) {
                *b = *v;
            }
            return;
        }
        for (i, b) in out.iter_mut().enumerate() {
            *b = self.regs[usize::from(start.wrapping_add(i as u8) & 0x7F)];
        }
        if start == reg::INT_STATUS {
            // Reading INT_STATUS clears it.
            self.regs[usize::from(reg::INT_STATUS)] = 0;
        }
    }
}

impl ErrorType for SimMpu6050 {
    type Error = SimError;
}

impl I2c for SimMpu6050 {
    fn transaction(
        &mut self,
        address: u8,
        operations: &mut [Operation<'_>],
    ) -> Result<(), SimError> {
        if address != self.address {
            return Err(SimError(ErrorKind::NoAcknowledge(
                NoAcknowledgeSource::Address,
            )));
        }
        match self.fault_now() {
            Some(FaultKind::Nack) => {
                return Err(SimError(ErrorKind::NoAcknowledge(
                    NoAcknowledgeSource::Address,
                )));
            }
            Some(FaultKind::Bus) => return Err(SimError(ErrorKind::Bus)),
            _ => {}
        }
        let mut pointer = None;
        for op in operations {
            match op {
                Operation::Write(bytes) => {
                    if let Some((&r, values)) = bytes.split_first() {
                        pointer = Some(r);
                        for (i, v) in values.iter().enumerate() {
                            self.write_reg(r.wrapping_add(i as u8), *v);
                        }
                    }
                }
                Operation::Read(buf) => {
                    let r = pointer.unwrap_or(0);
                    self.read(r, buf);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::mpu6050::{DEFAULT_ADDRESS, Mpu6050, Range, Settings};
    use super::*;
    use std::time::Duration;

    struct NoDelay;
    impl embedded_hal::delay::DelayNs for NoDelay {
        fn delay_ns(&mut self, _: u32) {}
    }

    const SETTINGS: Settings = Settings {
        address: DEFAULT_ADDRESS,
        range: Range::G2,
        rate_hz: 1000,
    };

    #[test]
    fn the_driver_reads_real_time_samples_with_gravity_on_z() {
        let sim = SimMpu6050::new(DEFAULT_ADDRESS, 1, vec![], vec![]);
        let mut dev = Mpu6050::init(sim, SETTINGS, &mut NoDelay).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        let mut out = Vec::new();
        let n = dev.read_fifo(&mut out).unwrap();
        assert!((40..=120).contains(&n), "about 60 samples at 1 kHz: {n}");
        let mean_z: f32 = out.iter().map(|s| s[2]).sum::<f32>() / n as f32;
        assert!((0.8..1.2).contains(&mean_z), "gravity on z: {mean_z}");
    }

    #[test]
    fn scheduled_faults_reach_the_driver() {
        let faults = vec![
            Fault {
                after_ms: 0,
                kind: FaultKind::Nack,
                duration_ms: 30,
            },
            Fault {
                after_ms: 30,
                kind: FaultKind::Stuck,
                duration_ms: 10_000,
            },
        ];
        let sim = SimMpu6050::new(DEFAULT_ADDRESS, 1, vec![], faults);
        let (sim, e) = Mpu6050::init(sim, SETTINGS, &mut NoDelay).unwrap_err();
        assert!(e.to_string().contains("NACK"), "{e}");
        std::thread::sleep(Duration::from_millis(40));
        let mut dev = Mpu6050::init(sim, SETTINGS, &mut NoDelay).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let mut out = Vec::new();
        dev.read_fifo(&mut out).unwrap();
        assert!(out.len() > 10);
        assert!(
            out.windows(2).all(|w| w[0] == w[1]),
            "a stuck output repeats"
        );
    }

    #[test]
    fn a_late_reader_sees_the_overflow() {
        let sim = SimMpu6050::new(DEFAULT_ADDRESS, 1, vec![], vec![]);
        let mut dev = Mpu6050::init(sim, SETTINGS, &mut NoDelay).unwrap();
        std::thread::sleep(Duration::from_millis(250)); // > 170 samples at 1 kHz
        assert_eq!(
            dev.read_fifo(&mut Vec::new()),
            Err(super::super::mpu6050::Error::FifoOverflow)
        );
    }
}

/// The simulated machine against the vibration model: windows of each condition, from machines
/// of many seeds, classified by the zoo's device model.
#[cfg(test)]
mod against_the_model {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use models::{EngineConfig, Tensor, TensorData};

    #[test]
    fn the_device_model_recognises_the_simulated_conditions() {
        let engine = EngineConfig {
            only: vec!["vibration".into()],
            ..EngineConfig::default()
        }
        .build(models::default_zoo_dir())
        .unwrap();
        let model = engine.model("vibration").unwrap();
        let labels = model.spec().labels.clone().unwrap();
        for (ci, condition) in [
            Condition::Normal,
            Condition::Imbalance,
            Condition::BearingFault,
        ]
        .into_iter()
        .enumerate()
        {
            let mut right = 0;
            let n = 60;
            for seed in 0..n {
                let mut m = Machine::new(seed);
                let t0 = 1.0 + seed as f64 * 0.37;
                let samples: Vec<[f64; 3]> = (0..128)
                    .map(|i| m.sample(t0 + i as f64 / 1000.0, condition))
                    .collect();
                let mut data = Vec::with_capacity(384);
                for axis in 0..3 {
                    data.extend(samples.iter().map(|s| s[axis] as f32));
                }
                let input = Tensor::new("input", vec![1, 3, 128], TensorData::F32(data)).unwrap();
                let out = model.infer(vec![input]).unwrap();
                let TensorData::F32(p) = out[0].data() else {
                    panic!("not f32")
                };
                let best = (0..p.len()).max_by(|a, b| p[*a].total_cmp(&p[*b])).unwrap();
                right += usize::from(best == ci);
            }
            eprintln!(
                "{}: {right} of {n} simulated windows recognised",
                labels[ci]
            );
            assert!(
                right * 10 >= n as usize * 8,
                "{}: {right} of {n}",
                labels[ci]
            );
        }
    }
}
