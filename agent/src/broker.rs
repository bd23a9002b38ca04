//! The embedded MQTT broker (rumqttd, patched: vendor/rumqttd/TETHER.md), for a box with no
//! broker of its own. One listener serves MQTT 5 and MQTT 3.1.1 clients alike; a second, 3.1.1
//! only, is opened when `embedded_broker.listen_v311` names one.
//!
//! rumqttd has no shutdown: once started, the broker lives as long as the process.
//!
//! Behind the `embedded-broker` cargo feature (on by default): the device build
//! (`cross/build.sh`) leaves it out, as a device connects to the broker it is deployed with.

#[cfg(feature = "embedded-broker")]
use std::collections::HashMap;
use std::net::SocketAddr;
#[cfg(feature = "embedded-broker")]
use std::net::TcpListener;
#[cfg(feature = "embedded-broker")]
use std::time::{Duration, Instant};

#[cfg(feature = "embedded-broker")]
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::config::EmbeddedBrokerConfig;

/// The addresses a started broker listens on.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    /// MQTT 5 and 3.1.1.
    pub v5: SocketAddr,
    /// Where 3.1.1 clients connect: `v5`, unless a listener of its own was configured.
    pub v311: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "the embedded broker cannot listen on {addr}: {source} (is another broker running there? pick another address with --embedded-broker ADDR)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the embedded broker did not start listening on {0} within 5 s")]
    NotListening(SocketAddr),
    #[error(
        "this tether-agent was built without the embedded broker (device builds leave it out to stay small): connect to your broker with --broker mqtt://HOST:PORT (mqtt.broker in agent.toml), or use a build with the `embedded-broker` feature"
    )]
    NotBuiltIn,
}

/// Without the `embedded-broker` feature: says how to do without it.
#[cfg(not(feature = "embedded-broker"))]
pub fn start(
    _cfg: &EmbeddedBrokerConfig,
    _max_payload_bytes: usize,
) -> Result<EmbeddedBroker, BrokerError> {
    Err(BrokerError::NotBuiltIn)
}

/// Starts rumqttd on a thread of its own and waits until it accepts connections.
/// A port of 0 is replaced by a free port chosen by the OS.
#[cfg(feature = "embedded-broker")]
pub fn start(
    cfg: &EmbeddedBrokerConfig,
    max_payload_bytes: usize,
) -> Result<EmbeddedBroker, BrokerError> {
    let v5 = reserve(cfg.listen)?;
    let v311_only = cfg.listen_v311.map(reserve).transpose()?;
    let connections = || ConnectionSettings {
        connection_timeout_ms: 60_000,
        // Room for a request, its reply and the MQTT framing.
        max_payload_size: max_payload_bytes.saturating_mul(2).max(1 << 20),
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen| ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: connections(),
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            // Messages live in memory segments: bound them (two segments per filter).
            max_segment_size: max_payload_bytes.saturating_mul(4).max(16 << 20),
            max_segment_count: 2,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: rumqttd::Strategy::default(),
        },
        v4: v311_only.map(|addr| HashMap::from([("v311".to_owned(), server("v311", addr))])),
        // The patched rumqttd serves 3.1.1 clients on its v5 listeners too.
        v5: Some(HashMap::from([("mqtt".to_owned(), server("mqtt", v5))])),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "The embedded MQTT broker stopped.");
            }
        })
        .map_err(|source| BrokerError::Bind { addr: v5, source })?;
    wait_listening(v5)?;
    match v311_only {
        Some(v311) => {
            wait_listening(v311)?;
            tracing::info!(%v5, %v311, "Embedded MQTT broker listening (MQTT 5 and 3.1.1; 3.1.1 also on its own listener).");
        }
        None => tracing::info!(%v5, "Embedded MQTT broker listening (MQTT 5 and 3.1.1)."),
    }
    Ok(EmbeddedBroker {
        v5,
        v311: v311_only.unwrap_or(v5),
    })
}

/// Checks the address is free (and resolves port 0) by binding it for a moment.
#[cfg(feature = "embedded-broker")]
fn reserve(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let listener = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    listener
        .local_addr()
        .map_err(|source| BrokerError::Bind { addr, source })
}

/// Waits until the broker holds the address. Probing with a bind rather than a connection
/// keeps rumqttd from logging a half-open connection as an error.
#[cfg(feature = "embedded-broker")]
fn wait_listening(addr: SocketAddr) -> Result<(), BrokerError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if TcpListener::bind(addr).is_err() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(BrokerError::NotListening(addr))
}
