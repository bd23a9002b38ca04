//! The device's load, sampled on a timer by a thread of its own and published on a `watch`:
//! CPU utilisation and memory (sysinfo), the SoC temperature (the hottest Linux thermal zone)
//! and throttling (the Raspberry Pi firmware's flags, where the kernel exposes them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

/// One sample. `None` where the device does not tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Load {
    pub cpu_percent: Option<f64>,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub temperature_c: Option<f64>,
    pub throttled: bool,
}

/// Where the Raspberry Pi firmware's throttling flags appear in sysfs.
const THROTTLED_FILE: &str = "/sys/devices/platform/soc/soc:firmware/get_throttled";

/// Reads the load; one per process.
pub struct Monitor {
    /// `None` where sysinfo cannot read the system (then CPU and memory are unknown).
    sys: Option<sysinfo::System>,
    thermal_zones: Vec<PathBuf>,
    throttled_file: Option<PathBuf>,
    primed: bool,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("thermal_zones", &self.thermal_zones)
            .finish_non_exhaustive()
    }
}

impl Monitor {
    pub fn new() -> Monitor {
        let thermal_zones = std::fs::read_dir("/sys/class/thermal")
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
                    .map(|e| e.path().join("temp"))
                    .filter(|p| p.exists())
                    .collect()
            })
            .unwrap_or_default();
        Monitor {
            sys: sysinfo::System::new().ok(),
            thermal_zones,
            throttled_file: Path::new(THROTTLED_FILE)
                .exists()
                .then(|| PathBuf::from(THROTTLED_FILE)),
            primed: false,
        }
    }

    /// A sample; CPU utilisation is over the time since the previous one (none on the first).
    pub fn sample(&mut self) -> Load {
        let (cpu, used, total) = match self.sys.as_mut() {
            Some(sys) => {
                sys.refresh_cpu_usage();
                sys.refresh_memory();
                let cpu = self.primed.then(|| f64::from(sys.global_cpu_usage()));
                (cpu, sys.used_memory(), sys.total_memory())
            }
            None => (None, 0, 0),
        };
        self.primed = true;
        let temperature_c = self
            .thermal_zones
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .filter_map(|t| parse_millidegrees(&t))
            .reduce(f64::max);
        let throttled = self
            .throttled_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| parse_throttled(&t))
            .unwrap_or(false);
        Load {
            cpu_percent: cpu,
            memory_used_bytes: used,
            memory_total_bytes: total,
            temperature_c,
            throttled,
        }
    }
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor::new()
    }
}

/// A thermal zone's `temp`: millidegrees Celsius.
pub fn parse_millidegrees(text: &str) -> Option<f64> {
    text.trim().parse::<i64>().ok().map(|m| m as f64 / 1000.0)
}

/// The firmware's throttling flags (`0x50005`, or `throttled=0x50005` as vcgencmd prints
/// them): bit 2 is "throttled now", bit 1 "ARM frequency capped now".
pub fn parse_throttled(text: &str) -> Option<bool> {
    let text = text.trim();
    let hex = text.strip_prefix("throttled=").unwrap_or(text);
    let hex = hex.strip_prefix("0x").unwrap_or(hex);
    u32::from_str_radix(hex, 16)
        .ok()
        .map(|flags| flags & 0b110 != 0)
}

/// Samples every `interval` on a thread of its own until every receiver is gone.
pub fn spawn(interval: Duration) -> std::io::Result<watch::Receiver<Load>> {
    let mut monitor = Monitor::new();
    let first = monitor.sample();
    let (load_tx, load_rx) = watch::channel(first);
    std::thread::Builder::new()
        .name("monitor".into())
        .spawn(move || {
            let mut since_trim = Duration::ZERO;
            loop {
                std::thread::sleep(interval);
                if load_tx.send(monitor.sample()).is_err() {
                    return;
                }
                since_trim = since_trim.saturating_add(interval);
                if since_trim >= RELEASE_EVERY {
                    since_trim = Duration::ZERO;
                    release_free_memory();
                }
            }
        })?;
    Ok(load_rx)
}

/// How often memory the allocator holds free is given back to the system.
const RELEASE_EVERY: Duration = Duration::from_secs(10);

/// Gives the memory glibc's allocator holds free (in every thread's arena, not only at the top
/// of the main heap, which is all `free` returns by itself) back to the system. After a burst
/// of requests the workers' arenas keep what they used; without this, a device's resident
/// memory stays at its peak. A walk of the free lists: well under a millisecond for the
/// agent's heap, on this thread of its own.
#[allow(
    unsafe_code,
    reason = "one FFI call with no pointers to manage: glibc's malloc_trim"
)]
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory; it takes
    // each arena's lock and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thermal_zones_are_millidegrees() {
        assert_eq!(parse_millidegrees("48312\n"), Some(48.312));
        assert_eq!(parse_millidegrees("-5000"), Some(-5.0));
        assert_eq!(parse_millidegrees("n/a"), None);
    }

    #[test]
    fn throttling_reads_the_current_flags_only() {
        assert_eq!(parse_throttled("0x0"), Some(false));
        assert_eq!(parse_throttled("throttled=0x50005\n"), Some(true));
        assert_eq!(parse_throttled("0x2"), Some(true), "frequency capped now");
        assert_eq!(
            parse_throttled("0x50000"),
            Some(false),
            "only happened before"
        );
        assert_eq!(parse_throttled("garbage"), None);
    }

    #[test]
    fn a_sample_of_this_machine_is_sane() {
        let mut m = Monitor::new();
        let first = m.sample();
        assert!(
            first.cpu_percent.is_none(),
            "no utilisation without an interval"
        );
        assert!(first.memory_total_bytes > 0);
        std::thread::sleep(Duration::from_millis(250));
        let second = m.sample();
        let cpu = second.cpu_percent.unwrap();
        assert!((0.0..=100.0).contains(&cpu), "{cpu}");
    }
}
