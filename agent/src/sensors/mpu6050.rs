//! A driver for the InvenSense MPU-6050 accelerometer (and its MPU-6500/9250 relatives), from
//! the data sheet's register map (RM-MPU-6000A-00 rev 4.2), written against the embedded-hal
//! 1.0 `I2c` and `DelayNs` traits. It samples the accelerometer into the chip's FIFO at a set
//! rate and reads it in bursts, so a Linux host that is late by a few tens of milliseconds loses
//! nothing; a FIFO that overflowed anyway is reported, never silently skipped.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

/// The I2C address with AD0 low (0x69 with AD0 high).
pub const DEFAULT_ADDRESS: u8 = crate::config::DEFAULT_MPU6050_ADDRESS;

/// Registers used (data sheet section 3, register map).
pub mod reg {
    pub const SMPLRT_DIV: u8 = 0x19;
    pub const CONFIG: u8 = 0x1A;
    pub const ACCEL_CONFIG: u8 = 0x1C;
    pub const FIFO_EN: u8 = 0x23;
    pub const INT_STATUS: u8 = 0x3A;
    pub const ACCEL_XOUT_H: u8 = 0x3B;
    pub const USER_CTRL: u8 = 0x6A;
    pub const PWR_MGMT_1: u8 = 0x6B;
    pub const FIFO_COUNT_H: u8 = 0x72;
    pub const FIFO_R_W: u8 = 0x74;
    pub const WHO_AM_I: u8 = 0x75;
}

/// Bits used.
pub mod bits {
    /// PWR_MGMT_1: reset every register.
    pub const DEVICE_RESET: u8 = 0x80;
    /// PWR_MGMT_1: awake, clocked from the X gyro's PLL (recommended over the internal
    /// oscillator).
    pub const CLKSEL_PLL_X: u8 = 0x01;
    /// CONFIG: digital low-pass at 184 Hz for the accelerometer, which also sets the 1 kHz
    /// internal rate the sample-rate divider divides.
    pub const DLPF_184HZ: u8 = 0x01;
    /// USER_CTRL.
    pub const FIFO_ENABLE: u8 = 0x40;
    pub const FIFO_RESET: u8 = 0x04;
    /// FIFO_EN: accelerometer X, Y, Z into the FIFO (6 bytes per sample).
    pub const ACCEL_FIFO_EN: u8 = 0x08;
    /// INT_STATUS: the FIFO overflowed.
    pub const FIFO_OFLOW_INT: u8 = 0x10;
}

/// WHO_AM_I values of the parts this driver knows: MPU-6050, MPU-6500, MPU-9250, MPU-9255.
pub const KNOWN_IDS: &[u8] = &[0x68, 0x70, 0x71, 0x73];

/// Bytes the FIFO holds; past it the oldest samples are lost (and the overflow bit set).
pub const FIFO_BYTES: usize = 1024;
const SAMPLE_BYTES: usize = 6;
/// Samples read per I2C transfer.
const BURST_SAMPLES: usize = 32;

/// Full-scale range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    G2,
    G4,
    G8,
    G16,
}

impl Range {
    pub fn from_g(g: u8) -> Option<Range> {
        match g {
            2 => Some(Range::G2),
            4 => Some(Range::G4),
            8 => Some(Range::G8),
            16 => Some(Range::G16),
            _ => None,
        }
    }

    /// ACCEL_CONFIG's AFS_SEL bits.
    pub fn bits(self) -> u8 {
        match self {
            Range::G2 => 0x00,
            Range::G4 => 0x08,
            Range::G8 => 0x10,
            Range::G16 => 0x18,
        }
    }

    /// Counts per g.
    pub fn lsb_per_g(self) -> f32 {
        match self {
            Range::G2 => 16384.0,
            Range::G4 => 8192.0,
            Range::G8 => 4096.0,
            Range::G16 => 2048.0,
        }
    }
}

/// How to set the part up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub address: u8,
    pub range: Range,
    /// Output rate, 4 to 1000 Hz (1 kHz divided by a whole number).
    pub rate_hz: u32,
}

impl Settings {
    /// SMPLRT_DIV for the rate: 1 kHz / (1 + div).
    pub fn divider(&self) -> u8 {
        let r = self.rate_hz.clamp(4, 1000);
        u8::try_from((1000 / r).saturating_sub(1)).unwrap_or(u8::MAX)
    }
}

/// What went wrong, with the bus's own error inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error<E> {
    Bus(E),
    /// Something answered at the address, but not one of these parts.
    NotFound {
        who_am_i: u8,
    },
    /// The FIFO filled before it was read: samples were lost (the FIFO was reset).
    FifoOverflow,
}

impl<E: embedded_hal::i2c::Error> std::fmt::Display for Error<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Bus(e) => write!(f, "I2C error: {}", describe(e.kind())),
            Error::NotFound { who_am_i } => write!(
                f,
                "the part at this address reports WHO_AM_I {who_am_i:#04x}, not an MPU-6050 (0x68) or a relative"
            ),
            Error::FifoOverflow => f.write_str(
                "the sensor's FIFO overflowed: the host read it too late and samples were lost",
            ),
        }
    }
}

fn describe(kind: embedded_hal::i2c::ErrorKind) -> &'static str {
    use embedded_hal::i2c::ErrorKind as K;
    match kind {
        K::NoAcknowledge(_) => {
            "no acknowledge (NACK): is the sensor connected and at this address?"
        }
        K::Bus => "bus error (a misplaced START or STOP): check the wiring and pull-ups",
        K::ArbitrationLoss => "arbitration lost to another bus master",
        K::Overrun => "data overrun",
        _ => "unspecified bus error",
    }
}

impl<E> From<E> for Error<E> {
    fn from(e: E) -> Self {
        Error::Bus(e)
    }
}

/// One MPU-6050 on a bus.
#[derive(Debug)]
pub struct Mpu6050<I2C> {
    i2c: I2C,
    settings: Settings,
}

impl<I2C: I2c> Mpu6050<I2C> {
    /// Checks the part, resets it and starts sampling into the FIFO.
    pub fn init(
        i2c: I2C,
        settings: Settings,
        delay: &mut impl DelayNs,
    ) -> Result<Mpu6050<I2C>, (I2C, Error<I2C::Error>)> {
        let mut dev = Mpu6050 { i2c, settings };
        match dev.setup(delay) {
            Ok(()) => Ok(dev),
            Err(e) => Err((dev.i2c, e)),
        }
    }

    fn setup(&mut self, delay: &mut impl DelayNs) -> Result<(), Error<I2C::Error>> {
        let who = self.read_reg(reg::WHO_AM_I)?;
        if !KNOWN_IDS.contains(&who) {
            return Err(Error::NotFound { who_am_i: who });
        }
        self.write_reg(reg::PWR_MGMT_1, bits::DEVICE_RESET)?;
        delay.delay_ms(100);
        self.write_reg(reg::PWR_MGMT_1, bits::CLKSEL_PLL_X)?;
        delay.delay_ms(10);
        self.write_reg(reg::CONFIG, bits::DLPF_184HZ)?;
        self.write_reg(reg::SMPLRT_DIV, self.settings.divider())?;
        self.write_reg(reg::ACCEL_CONFIG, self.settings.range.bits())?;
        self.write_reg(reg::FIFO_EN, bits::ACCEL_FIFO_EN)?;
        self.reset_fifo()
    }

    /// Empties the FIFO and keeps it enabled.
    pub fn reset_fifo(&mut self) -> Result<(), Error<I2C::Error>> {
        self.write_reg(reg::USER_CTRL, bits::FIFO_RESET)?;
        self.write_reg(reg::USER_CTRL, bits::FIFO_ENABLE)?;
        Ok(())
    }

    /// The acceleration now, in g (x, y, z), from the data registers.
    pub fn read_accel(&mut self) -> Result<[f32; 3], Error<I2C::Error>> {
        let mut b = [0u8; 6];
        self.i2c
            .write_read(self.settings.address, &[reg::ACCEL_XOUT_H], &mut b)?;
        Ok(self.decode(&b))
    }

    /// Appends every sample waiting in the FIFO to `out`, in g; returns how many.
    pub fn read_fifo(&mut self, out: &mut Vec<[f32; 3]>) -> Result<usize, Error<I2C::Error>> {
        let status = self.read_reg(reg::INT_STATUS)?;
        if status & bits::FIFO_OFLOW_INT != 0 {
            self.reset_fifo()?;
            return Err(Error::FifoOverflow);
        }
        let mut c = [0u8; 2];
        self.i2c
            .write_read(self.settings.address, &[reg::FIFO_COUNT_H], &mut c)?;
        let count = usize::from(u16::from_be_bytes(c)).min(FIFO_BYTES);
        let samples = count / SAMPLE_BYTES;
        let mut left = samples;
        let mut buf = [0u8; BURST_SAMPLES * SAMPLE_BYTES];
        while left > 0 {
            let n = left.min(BURST_SAMPLES);
            let bytes = &mut buf[..n * SAMPLE_BYTES];
            self.i2c
                .write_read(self.settings.address, &[reg::FIFO_R_W], bytes)?;
            out.extend(bytes.chunks_exact(SAMPLE_BYTES).map(|s| self.decode(s)));
            left -= n;
        }
        Ok(samples)
    }

    fn decode(&self, b: &[u8]) -> [f32; 3] {
        let scale = self.settings.range.lsb_per_g();
        let axis = |i: usize| f32::from(i16::from_be_bytes([b[2 * i], b[2 * i + 1]])) / scale;
        [axis(0), axis(1), axis(2)]
    }

    fn read_reg(&mut self, r: u8) -> Result<u8, Error<I2C::Error>> {
        let mut b = [0u8; 1];
        self.i2c.write_read(self.settings.address, &[r], &mut b)?;
        Ok(b[0])
    }

    fn write_reg(&mut self, r: u8, value: u8) -> Result<(), Error<I2C::Error>> {
        self.i2c.write(self.settings.address, &[r, value])?;
        Ok(())
    }

    /// The bus back (after an error, to start over).
    pub fn release(self) -> I2C {
        self.i2c
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};

    const A: u8 = DEFAULT_ADDRESS;
    const SETTINGS: Settings = Settings {
        address: A,
        range: Range::G4,
        rate_hz: 1000,
    };

    fn init_transactions() -> Vec<T> {
        vec![
            T::write_read(A, vec![reg::WHO_AM_I], vec![0x68]),
            T::write(A, vec![reg::PWR_MGMT_1, 0x80]),
            T::write(A, vec![reg::PWR_MGMT_1, 0x01]),
            T::write(A, vec![reg::CONFIG, 0x01]),
            T::write(A, vec![reg::SMPLRT_DIV, 0]),
            T::write(A, vec![reg::ACCEL_CONFIG, 0x08]),
            T::write(A, vec![reg::FIFO_EN, 0x08]),
            T::write(A, vec![reg::USER_CTRL, 0x04]),
            T::write(A, vec![reg::USER_CTRL, 0x40]),
        ]
    }

    fn be(v: i16) -> [u8; 2] {
        v.to_be_bytes()
    }

    #[test]
    fn initialisation_follows_the_data_sheet() {
        let mut i2c = Mock::new(&init_transactions());
        let dev = Mpu6050::init(i2c.clone(), SETTINGS, &mut NoopDelay::new()).unwrap();
        dev.release();
        i2c.done();
    }

    #[test]
    fn the_divider_sets_the_rate() {
        let at = |rate_hz| {
            Settings {
                rate_hz,
                ..SETTINGS
            }
            .divider()
        };
        assert_eq!(
            (at(1000), at(500), at(100), at(4), at(1)),
            (0, 1, 9, 249, 249)
        );
    }

    #[test]
    fn a_direct_read_decodes_big_endian_counts_at_the_range() {
        let mut t = init_transactions();
        // +1 g on z at ±4 g is 8192 counts; -0.5 g on x is -4096.
        let mut data = Vec::new();
        for v in [-4096i16, 0, 8192] {
            data.extend(be(v));
        }
        t.push(T::write_read(A, vec![reg::ACCEL_XOUT_H], data));
        let mut i2c = Mock::new(&t);
        let mut dev = Mpu6050::init(i2c.clone(), SETTINGS, &mut NoopDelay::new()).unwrap();
        assert_eq!(dev.read_accel().unwrap(), [-0.5, 0.0, 1.0]);
        i2c.done();
    }

    #[test]
    fn the_fifo_is_read_in_bursts() {
        let mut t = init_transactions();
        let samples = 40usize; // one burst of 32, one of 8
        t.push(T::write_read(A, vec![reg::INT_STATUS], vec![0x01]));
        t.push(T::write_read(
            A,
            vec![reg::FIFO_COUNT_H],
            be((samples * 6) as i16).to_vec(),
        ));
        let sample = |i: usize| {
            let mut s = Vec::new();
            s.extend(be(i as i16 * 8));
            s.extend(be(-(i as i16)));
            s.extend(be(8192));
            s
        };
        t.push(T::write_read(
            A,
            vec![reg::FIFO_R_W],
            (0..32).flat_map(sample).collect(),
        ));
        t.push(T::write_read(
            A,
            vec![reg::FIFO_R_W],
            (32..40).flat_map(sample).collect(),
        ));
        let mut i2c = Mock::new(&t);
        let mut dev = Mpu6050::init(i2c.clone(), SETTINGS, &mut NoopDelay::new()).unwrap();
        let mut out = Vec::new();
        assert_eq!(dev.read_fifo(&mut out).unwrap(), 40);
        assert_eq!(out.len(), 40);
        assert_eq!(out[39], [39.0 * 8.0 / 8192.0, -39.0 / 8192.0, 1.0]);
        // A count that is not a whole number of samples leaves the partial one for later.
        i2c.done();
    }

    #[test]
    fn an_overflowed_fifo_is_reset_and_reported() {
        let mut t = init_transactions();
        t.push(T::write_read(A, vec![reg::INT_STATUS], vec![0x10]));
        t.push(T::write(A, vec![reg::USER_CTRL, 0x04]));
        t.push(T::write(A, vec![reg::USER_CTRL, 0x40]));
        let mut i2c = Mock::new(&t);
        let mut dev = Mpu6050::init(i2c.clone(), SETTINGS, &mut NoopDelay::new()).unwrap();
        assert_eq!(dev.read_fifo(&mut Vec::new()), Err(Error::FifoOverflow));
        i2c.done();
    }

    #[test]
    fn a_missing_sensor_a_bus_error_and_a_stranger_are_errors() {
        // Nothing at the address: the first byte is not acknowledged.
        let nack = ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address);
        let mut i2c = Mock::new(&[T::write_read(A, vec![reg::WHO_AM_I], vec![0]).with_error(nack)]);
        let (_, e) = Mpu6050::init(i2c.clone(), SETTINGS, &mut NoopDelay::new()).unwrap_err();
        assert_eq!(e, Error::Bus(nack));
        assert!(e.to_string().contains("NACK"), "{e}");
        i2c.done();

        // A part that is not an MPU-6050 (an ADXL345's device id).
        let mut i2c = Mock::new(&[T::write_read(A, vec![reg::WHO_AM_I], vec![0xE5])]);
        let (_, e) = Mpu6050::init(i2c.clone(), SETTINGS, &mut NoopDelay::new()).unwrap_err();
        assert_eq!(e, Error::NotFound { who_am_i: 0xE5 });
        i2c.done();

        // A bus error in the middle of a FIFO read.
        let mut t = init_transactions();
        t.push(T::write_read(A, vec![reg::INT_STATUS], vec![0]));
        t.push(T::write_read(A, vec![reg::FIFO_COUNT_H], vec![0, 12]));
        t.push(T::write_read(A, vec![reg::FIFO_R_W], vec![0; 12]).with_error(ErrorKind::Bus));
        let mut i2c = Mock::new(&t);
        let mut dev = Mpu6050::init(i2c.clone(), SETTINGS, &mut NoopDelay::new()).unwrap();
        let e = dev.read_fifo(&mut Vec::new()).unwrap_err();
        assert_eq!(e, Error::Bus(ErrorKind::Bus));
        assert!(e.to_string().contains("bus error"), "{e}");
        i2c.done();
    }
}
