//! Sensors and actuators: inference nobody requested. Each source samples on a thread of its
//! own and hands its windows to the same path as MQTT requests (cache, policy, local or cloud)
//! as a typed in-process request, and gets a typed answer; results are published on
//! `{prefix}/{device_id}/events/{source}` through the outbox (so they wait out a broker
//! outage), and drive actuators.
//!
//! - `mpu6050`: the accelerometer driver (embedded-hal 1.0), tested against embedded-hal-mock.
//! - `sim`: a simulated MPU-6050 on a simulated rotating machine, with injectable faults.
//! - `actuator`: a GPIO output raised on a class, with a hold time.
//! - `audio`: 16 kHz PCM for the VAD model, and the speech segmenter.
//!
//! A failing sensor (a NACK, a bus error, a stuck output, a FIFO overflow) is reported as a
//! `sensor_fault` event, retried with exponential backoff and counted; when it works again a
//! `sensor_recovered` event says how long the gap was. Nothing panics and no gap is silent.

pub mod actuator;
pub mod audio;
pub mod mpu6050;
pub mod sim;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use embedded_hal::i2c::I2c;

use serde_json::{Value, json};

pub use crate::config::{ActuatorKind, RawActuator, RawSensor, SensorKind};
use models::v2::{InferenceResponse, ResponseData};
use models::{Tensor, TensorData};

use crate::pipeline::{Intake, LocalRequest};
use crate::protocol::Topics;
use crate::store::outbox::OutMessage;
use crate::store::{StoreHandle, now_ms};
use actuator::{Actuator, Rule, SimPin};
use mpu6050::{Mpu6050, Range, Settings};

/// Samples per window of the vibration model, and its axes.
pub const WINDOW: usize = 128;
/// How often the accelerometer's FIFO is read.
const POLL: Duration = Duration::from_millis(20);
/// Windows waiting for inference per source; past it the oldest are dropped (and reported).
const WINDOW_QUEUE: usize = 8;
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Per source, since start.
#[derive(Debug, Default)]
pub struct SensorCounters {
    /// Windows sent to inference.
    pub windows: AtomicU64,
    /// Sensor failures (NACK, bus error, stuck, overflow).
    pub failures: AtomicU64,
    /// Windows dropped because inference fell behind.
    pub dropped: AtomicU64,
    /// Results that came back as errors.
    pub inference_errors: AtomicU64,
}

impl SensorCounters {
    pub fn to_json(&self) -> Value {
        json!({
            "windows": self.windows.load(Ordering::Relaxed),
            "failures": self.failures.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
            "inference_errors": self.inference_errors.load(Ordering::Relaxed),
        })
    }
}

/// The running sources and actuators.
#[derive(Debug, Default)]
pub struct Sensors {
    pub counters: BTreeMap<String, Arc<SensorCounters>>,
    /// Simulated actuators' pins, by actuator name.
    pub pins: BTreeMap<String, SimPin>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Sensors {
    /// Stops the sources (each finishes the window in hand) and waits for them.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// A handle for reading the counters and pins elsewhere.
    pub fn view(&self) -> SensorsView {
        SensorsView {
            counters: self.counters.clone(),
            pins: self.pins.clone(),
        }
    }
}

/// What others may read of the sensors.
#[derive(Debug, Clone, Default)]
pub struct SensorsView {
    pub counters: BTreeMap<String, Arc<SensorCounters>>,
    pub pins: BTreeMap<String, SimPin>,
}

/// Where a source's requests and events go.
#[derive(Debug, Clone)]
struct Outlet {
    source: String,
    model: String,
    events_topic: String,
    intake: Intake,
    store: StoreHandle,
    budget_ms: Option<u64>,
    counters: Arc<SensorCounters>,
}

impl Outlet {
    /// Publishes an event through the outbox.
    fn event(&self, mut body: Value) {
        if let Value::Object(m) = &mut body {
            m.insert("source".into(), json!(self.source));
            m.insert("ts_ms".into(), json!(now_ms()));
        }
        self.store.append_event(OutMessage::event(
            self.events_topic.clone(),
            body.to_string().into_bytes(),
        ));
    }

    /// Runs one request through the agent's pipeline and waits for its answer.
    fn infer(
        &self,
        inputs: Vec<Tensor>,
        id: String,
        cache: bool,
    ) -> Result<InferenceResponse, Value> {
        let budget = self.budget_ms.map(Duration::from_millis);
        let rx = self.intake.submit(LocalRequest {
            model: self.model.clone(),
            id,
            inputs,
            budget,
            cache,
        });
        // The pipeline answers every request by its budget; the margin is for a busy device.
        let wait = budget.unwrap_or(Duration::from_secs(1)) + Duration::from_secs(10);
        match rx.recv_timeout(wait) {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(json!({"code": e.code, "error": e.error})),
            Err(_) => Err(json!({"error": "the agent did not answer (shutting down?)"})),
        }
    }
}

/// Starts every configured source and actuator.
pub fn start(
    sensors: &[RawSensor],
    actuators: &[RawActuator],
    topics: &Topics,
    intake: &Intake,
    store: &StoreHandle,
) -> Result<Sensors, String> {
    let mut out = Sensors::default();
    for s in sensors {
        let counters = Arc::new(SensorCounters::default());
        out.counters.insert(s.name.clone(), counters.clone());
        let model = s.model.clone().unwrap_or_else(|| {
            match s.kind {
                SensorKind::Audio => "vad",
                _ => "vibration",
            }
            .to_owned()
        });
        let outlet = Outlet {
            source: s.name.clone(),
            model,
            events_topic: topics.events(&s.name),
            intake: intake.clone(),
            store: store.clone(),
            budget_ms: s.budget_ms,
            counters,
        };
        let mut mine = Vec::new();
        for a in actuators.iter().filter(|a| a.source == s.name) {
            let rule = Rule {
                on_class: a.on_class.clone(),
                min_probability: a.min_probability,
                hold: Duration::from_millis(a.hold_ms),
                confirm: a.confirm_windows,
            };
            match a.kind {
                ActuatorKind::Simulated => {
                    let pin = SimPin::default();
                    out.pins.insert(a.name.clone(), pin.clone());
                    mine.push(AnyActuator::Sim(Actuator::new(
                        a.name.clone(),
                        pin,
                        a.active_low,
                        rule,
                    )));
                }
                ActuatorKind::Gpio => mine.push(gpio_actuator(a, rule)?),
            }
        }
        let stop = out.stop.clone();
        let name = s.name.clone();
        match s.kind {
            SensorKind::Audio => {
                let cfg = s.clone();
                out.threads
                    .push(spawn(&name, move || audio_loop(&cfg, &outlet, &stop))?);
            }
            SensorKind::Simulated | SensorKind::Mpu6050 => {
                let settings = Settings {
                    address: s.address,
                    range: Range::from_g(s.range_g).unwrap_or(Range::G2),
                    rate_hz: s.rate_hz,
                };
                let (win_tx, win_rx) = flume::bounded::<Window>(WINDOW_QUEUE);
                let reporter_outlet = outlet.clone();
                let reporter_stop = stop.clone();
                let reporter_rx = win_rx.clone();
                out.threads.push(spawn(&format!("{name}-infer"), move || {
                    report_loop(&reporter_outlet, &reporter_rx, mine, &reporter_stop)
                })?);
                let cfg = s.clone();
                out.threads.push(spawn(&name, move || match cfg.kind {
                    SensorKind::Simulated => {
                        let seed = cfg.seed.unwrap_or_else(|| fastrand::u64(..));
                        let (phases, faults) = (cfg.condition.clone(), cfg.faults.clone());
                        let address = cfg.address;
                        sample_loop(
                            || {
                                Ok(sim::SimMpu6050::new(
                                    address,
                                    seed,
                                    phases.clone(),
                                    faults.clone(),
                                ))
                            },
                            settings,
                            &outlet,
                            (&win_tx, &win_rx),
                            &stop,
                        )
                    }
                    _ => hw_sample_loop(&cfg, settings, &outlet, (&win_tx, &win_rx), &stop),
                })?);
            }
        }
        tracing::info!(source = %s.name, kind = ?s.kind, "Sensor source started.");
    }
    Ok(out)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name(format!("sensor-{name}"))
        .spawn(f)
        .map_err(|e| format!("cannot start the thread of sensor `{name}`: {e}"))
}

#[cfg(feature = "hw")]
fn hw_sample_loop(
    cfg: &RawSensor,
    settings: Settings,
    outlet: &Outlet,
    windows: (&flume::Sender<Window>, &flume::Receiver<Window>),
    stop: &AtomicBool,
) {
    let bus = cfg.i2c_bus.clone().unwrap_or_default();
    sample_loop(
        || {
            linux_embedded_hal::I2cdev::new(&bus)
                .map_err(|e| format!("cannot open {}: {e}", bus.display()))
        },
        settings,
        outlet,
        windows,
        stop,
    );
}

#[cfg(not(feature = "hw"))]
fn hw_sample_loop(
    _cfg: &RawSensor,
    _settings: Settings,
    outlet: &Outlet,
    _windows: (&flume::Sender<Window>, &flume::Receiver<Window>),
    _stop: &AtomicBool,
) {
    // validate() refuses this configuration; kept total so nothing panics.
    outlet.event(json!({"kind": "sensor_fault", "error": "built without the hw feature"}));
}

#[cfg(feature = "hw")]
fn gpio_actuator(a: &RawActuator, rule: Rule) -> Result<AnyActuator, String> {
    let chip_path = a.chip.clone().unwrap_or_default();
    let mut chip = linux_embedded_hal::gpio_cdev::Chip::new(&chip_path).map_err(|e| {
        format!(
            "actuators `{}`: cannot open {}: {e}",
            a.name,
            chip_path.display()
        )
    })?;
    let line = chip
        .get_line(a.line.unwrap_or(0))
        .map_err(|e| format!("actuators `{}`: {e}", a.name))?;
    let handle = line
        .request(
            linux_embedded_hal::gpio_cdev::LineRequestFlags::OUTPUT,
            u8::from(a.active_low),
            "tether-agent",
        )
        .map_err(|e| format!("actuators `{}`: cannot take the line: {e}", a.name))?;
    let pin = linux_embedded_hal::CdevPin::new(handle)
        .map_err(|e| format!("actuators `{}`: {e}", a.name))?;
    Ok(AnyActuator::Gpio(Actuator::new(
        a.name.clone(),
        pin,
        a.active_low,
        rule,
    )))
}

#[cfg(not(feature = "hw"))]
fn gpio_actuator(a: &RawActuator, _rule: Rule) -> Result<AnyActuator, String> {
    Err(format!(
        "actuators `{}`: this tether-agent was built without the `hw` feature",
        a.name
    ))
}

/// The actuators of one source, whatever drives them.
#[derive(Debug)]
enum AnyActuator {
    Sim(Actuator<SimPin>),
    #[cfg(feature = "hw")]
    Gpio(Actuator<linux_embedded_hal::CdevPin>),
}

impl AnyActuator {
    fn name(&self) -> &str {
        match self {
            AnyActuator::Sim(a) => &a.name,
            #[cfg(feature = "hw")]
            AnyActuator::Gpio(a) => &a.name,
        }
    }

    fn observe(&mut self, label: &str, p: f64, now: Instant) -> Option<actuator::Change> {
        match self {
            AnyActuator::Sim(a) => a.observe(label, p, now),
            #[cfg(feature = "hw")]
            AnyActuator::Gpio(a) => a.observe(label, p, now),
        }
    }

    fn tick(&mut self, now: Instant) -> Option<actuator::Change> {
        match self {
            AnyActuator::Sim(a) => a.tick(now),
            #[cfg(feature = "hw")]
            AnyActuator::Gpio(a) => a.tick(now),
        }
    }
}

/// One window of samples, axis-major (x[128], y[128], z[128]).
#[derive(Debug)]
struct Window {
    index: u64,
    data: Vec<f32>,
}

/// Failures in a row, the backoff they earn, and the gap they open.
#[derive(Debug, Default)]
struct Trouble {
    in_a_row: u32,
    since: Option<Instant>,
}

impl Trouble {
    fn fail(&mut self, outlet: &Outlet, error: &str, stop: &AtomicBool) {
        self.in_a_row += 1;
        self.since.get_or_insert_with(Instant::now);
        let total = outlet.counters.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let delay = BACKOFF_MIN
            .saturating_mul(1 << self.in_a_row.min(10))
            .min(BACKOFF_MAX);
        tracing::warn!(source = %outlet.source, error, in_a_row = self.in_a_row, retry_in_ms = delay.as_millis(), "Sensor failure.");
        outlet.event(json!({
            "kind": "sensor_fault",
            "error": error,
            "in_a_row": self.in_a_row,
            "failures": total,
            "retry_in_ms": delay.as_millis() as u64,
        }));
        sleep_unless_stopped(delay, stop);
    }

    fn recovered(&mut self, outlet: &Outlet) {
        if let Some(since) = self.since.take() {
            let gap_ms = since.elapsed().as_millis() as u64;
            tracing::info!(source = %outlet.source, gap_ms, "Sensor working again.");
            outlet.event(json!({"kind": "sensor_recovered", "gap_ms": gap_ms, "failures_in_a_row": self.in_a_row}));
        }
        self.in_a_row = 0;
    }
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

struct Sleep;
impl embedded_hal::delay::DelayNs for Sleep {
    fn delay_ns(&mut self, ns: u32) {
        std::thread::sleep(Duration::from_nanos(u64::from(ns)));
    }
}

/// Reads an accelerometer's FIFO into windows until `stop`, reopening and re-initialising
/// the device after every failure, with backoff.
fn sample_loop<B: I2c>(
    mut open: impl FnMut() -> Result<B, String>,
    settings: Settings,
    outlet: &Outlet,
    (win_tx, win_rx): (&flume::Sender<Window>, &flume::Receiver<Window>),
    stop: &AtomicBool,
) {
    let mut trouble = Trouble::default();
    let mut bus: Option<B> = None;
    let mut dev: Option<Mpu6050<B>> = None;
    let mut samples: Vec<[f32; 3]> = Vec::with_capacity(4 * WINDOW);
    let mut index = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(d) = dev.as_mut() else {
            let b = match bus.take() {
                Some(b) => b,
                None => match open() {
                    Ok(b) => b,
                    Err(e) => {
                        trouble.fail(outlet, &e, stop);
                        continue;
                    }
                },
            };
            match Mpu6050::init(b, settings, &mut Sleep) {
                Ok(d) => {
                    // Recovered only once a good window comes (a stuck sensor initialises fine).
                    dev = Some(d);
                    samples.clear();
                }
                Err((b, e)) => {
                    bus = Some(b);
                    trouble.fail(outlet, &e.to_string(), stop);
                }
            }
            continue;
        };
        std::thread::sleep(POLL);
        match d.read_fifo(&mut samples) {
            Ok(_) => {}
            Err(e) => {
                let overflow = matches!(e, mpu6050::Error::FifoOverflow);
                samples.clear();
                if !overflow && let Some(d) = dev.take() {
                    bus = Some(d.release());
                }
                trouble.fail(outlet, &e.to_string(), stop);
                continue;
            }
        }
        while samples.len() >= WINDOW {
            let w: Vec<[f32; 3]> = samples.drain(..WINDOW).collect();
            if w.windows(2).all(|p| p[0] == p[1]) {
                samples.clear();
                if let Some(d) = dev.take() {
                    bus = Some(d.release());
                }
                trouble.fail(
                    outlet,
                    &format!(
                        "the sensor's output is stuck at {:?} g for {WINDOW} samples: it is reset",
                        w[0]
                    ),
                    stop,
                );
                break;
            }
            trouble.recovered(outlet);
            let mut data = Vec::with_capacity(3 * WINDOW);
            for axis in 0..3 {
                data.extend(w.iter().map(|s| s[axis]));
            }
            let window = Window { index, data };
            index += 1;
            if let Err(flume::TrySendError::Full(window)) = win_tx.try_send(window) {
                // Inference is behind: the oldest waiting window goes, and says so.
                if let Ok(old) = win_rx.try_recv() {
                    outlet.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    outlet.event(json!({"kind": "window_dropped", "window": old.index, "reason": "inference is behind the sensor"}));
                }
                let _ = win_tx.try_send(window);
            }
        }
    }
}

/// Sends each window to inference, publishes the result and drives the actuators.
fn report_loop(
    outlet: &Outlet,
    windows: &flume::Receiver<Window>,
    mut actuators: Vec<AnyActuator>,
    stop: &AtomicBool,
) {
    loop {
        let window = match windows.recv_timeout(Duration::from_millis(50)) {
            Ok(w) => Some(w),
            Err(flume::RecvTimeoutError::Timeout) => None,
            Err(flume::RecvTimeoutError::Disconnected) => return,
        };
        let now = Instant::now();
        for a in &mut actuators {
            if let Some(c) = a.tick(now) {
                actuator_event(outlet, a.name(), &c, "hold ended");
            }
        }
        let Some(w) = window else {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            continue;
        };
        outlet.counters.windows.fetch_add(1, Ordering::Relaxed);
        let input = match Tensor::new("input", vec![1, 3, WINDOW], TensorData::F32(w.data)) {
            Ok(t) => t,
            Err(e) => {
                outlet.event(
                    json!({"kind": "inference_error", "window": w.index, "error": e.to_string()}),
                );
                continue;
            }
        };
        let reply = match outlet.infer(vec![input], format!("{}-{}", outlet.source, w.index), true)
        {
            Ok(r) => r,
            Err(e) => {
                outlet
                    .counters
                    .inference_errors
                    .fetch_add(1, Ordering::Relaxed);
                outlet.event(json!({"kind": "inference_error", "window": w.index, "code": e.get("code"), "error": e.get("error")}));
                continue;
            }
        };
        let p = &Value::Object(reply.parameters.unwrap_or_default());
        let top = &p["classes"][0][0];
        let label = top["label"].as_str().unwrap_or("").to_owned();
        let probability = top["probability"].as_f64().unwrap_or(0.0);
        outlet.event(json!({
            "kind": "classification",
            "window": w.index,
            "model": outlet.model,
            "label": label,
            "probability": probability,
            "classes": p["classes"][0],
            "route": p["route"],
            "latency_ms": p["latency_ms"],
        }));
        for a in &mut actuators {
            if let Some(c) = a.observe(&label, probability, Instant::now()) {
                actuator_event(outlet, a.name(), &c, &format!("{label} {probability:.2}"));
            }
        }
    }
}

fn actuator_event(outlet: &Outlet, name: &str, c: &actuator::Change, cause: &str) {
    tracing::info!(actuator = name, level = c.level, cause, "Actuator.");
    outlet.event(json!({
        "kind": "actuator",
        "actuator": name,
        "level": if c.level { "high" } else { "low" },
        "cause": cause,
        "error": c.error,
    }));
}

/// Runs the VAD over an audio input, carrying its recurrent state from chunk to chunk, and
/// publishes speech start and end.
fn audio_loop(cfg: &RawSensor, outlet: &Outlet, stop: &AtomicBool) {
    let path = cfg.path.clone().unwrap_or_else(|| PathBuf::from("-"));
    let mut trouble = Trouble::default();
    let mut pcm = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match audio::Pcm::open(&path) {
            Ok(p) => break p,
            Err(e) => trouble.fail(outlet, &e, stop),
        }
    };
    trouble.recovered(outlet);
    tracing::info!(source = %outlet.source, input = %pcm.description, "Audio source open.");
    let mut seg = audio::Segmenter::new(
        cfg.vad_threshold,
        cfg.min_silence_ms as f64 / 1e3,
        cfg.min_speech_ms as f64 / 1e3,
    );
    let chunk_s = audio::CHUNK as f64 / f64::from(audio::RATE);
    let mut context = vec![0.0f32; audio::CONTEXT];
    let mut state = vec![0.0f32; 2 * 128];
    let mut index = 0u64;
    let began = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if cfg.realtime {
            let due = Duration::from_secs_f64(index as f64 * chunk_s);
            sleep_unless_stopped(due.saturating_sub(began.elapsed()), stop);
        }
        let chunk = match pcm.next_chunk() {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                trouble.fail(outlet, &e, stop);
                continue;
            }
        };
        let t_s = index as f64 * chunk_s;
        let mut input = context.clone();
        input.extend_from_slice(&chunk);
        context.copy_from_slice(&chunk[audio::CHUNK - audio::CONTEXT..]);
        let inputs = Tensor::new(
            "input",
            vec![1, audio::CONTEXT + audio::CHUNK],
            TensorData::F32(input),
        )
        .and_then(|i| {
            Tensor::new("state", vec![2, 1, 128], TensorData::F32(state.clone()))
                .map(|s| vec![i, s])
        });
        outlet.counters.windows.fetch_add(1, Ordering::Relaxed);
        let reply = match inputs {
            Ok(inputs) => outlet.infer(inputs, format!("{}-{index}", outlet.source), false),
            Err(e) => Err(json!({"error": e.to_string()})),
        };
        index += 1;
        let response = match reply {
            Ok(r) => r,
            Err(e) => {
                outlet
                    .counters
                    .inference_errors
                    .fetch_add(1, Ordering::Relaxed);
                outlet
                    .event(json!({"kind": "inference_error", "t_s": t_s, "error": e.get("error")}));
                // The recurrent state is lost with the answer: start it over.
                state.iter_mut().for_each(|v| *v = 0.0);
                continue;
            }
        };
        let p = output_f32(&response, "output")
            .and_then(|d| d.first().copied())
            .map_or(0.0, f64::from);
        if let Some(s) = output_f32(&response, "stateN")
            && s.len() == state.len()
        {
            state.copy_from_slice(&s);
        }
        if let Some(ev) = seg.observe(p, t_s, chunk_s) {
            speech_event(outlet, ev);
        }
    }
    if let Some(ev) = seg.finish(index as f64 * chunk_s) {
        speech_event(outlet, ev);
    }
    outlet.event(json!({"kind": "stream_end", "chunks": index, "t_s": index as f64 * chunk_s}));
    tracing::info!(source = %outlet.source, chunks = index, "Audio input ended.");
}

/// The values of a response's output named `name`, as f32.
fn output_f32(response: &InferenceResponse, name: &str) -> Option<Vec<f32>> {
    let out = response.outputs.iter().find(|o| o.name == name)?;
    match &out.data {
        ResponseData::Typed(TensorData::F32(v)) => Some(v.clone()),
        ResponseData::Typed(_) => None,
        ResponseData::Json(Value::Array(a)) => {
            a.iter().map(|v| v.as_f64().map(|f| f as f32)).collect()
        }
        ResponseData::Json(_) => None,
    }
}

fn speech_event(outlet: &Outlet, ev: audio::Speech) {
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    let body = match ev {
        audio::Speech::Start { t_s } => json!({"kind": "speech_start", "t_s": round(t_s)}),
        audio::Speech::End { start_s, t_s } => json!({
            "kind": "speech_end",
            "t_s": round(t_s),
            "start_s": round(start_s),
            "duration_s": round(t_s - start_s),
        }),
    };
    tracing::info!(source = %outlet.source, event = %body, "Speech.");
    outlet.event(body);
}
