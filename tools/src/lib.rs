//! Tether's developer and fleet operator tools: the demo, the benchmarks and load generators,
//! one request through a broker, and the fleet operator's side. None of this runs on a device;
//! the `tether` binary (`main.rs`) is its command line.

pub mod bench;
pub mod client;
pub mod demo;
pub mod escalation;
pub mod loadgen;
pub mod operator;
pub mod package;
pub mod rollout;
pub mod store_bench;
pub mod stream;
