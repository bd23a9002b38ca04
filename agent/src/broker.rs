//! The embedded MQTT broker (rumqttd), for a box with no broker of its own. rumqttd serves each
//! protocol version on its own listener: MQTT v5 (what the agent speaks) and MQTT 3.1.1.
//!
//! rumqttd has no shutdown: once started, the broker lives as long as the process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::config::EmbeddedBrokerConfig;

/// The addresses a started broker listens on.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    pub v5: SocketAddr,
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
}

/// Starts rumqttd on a thread of its own and waits until it accepts connections.
/// A port of 0 is replaced by a free port chosen by the OS.
pub fn start(
    cfg: &EmbeddedBrokerConfig,
    max_payload_bytes: usize,
) -> Result<EmbeddedBroker, BrokerError> {
    let v5 = reserve(cfg.listen)?;
    let v311 = match cfg.listen_v311 {
        Some(addr) => reserve(addr)?,
        None if cfg.listen.port() == 0 => reserve(SocketAddr::new(cfg.listen.ip(), 0))?,
        None => reserve(SocketAddr::new(
            cfg.listen.ip(),
            cfg.listen.port().saturating_add(1),
        ))?,
    };
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
        v4: Some(HashMap::from([("v311".to_owned(), server("v311", v311))])),
        v5: Some(HashMap::from([("v5".to_owned(), server("v5", v5))])),
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
    for addr in [v5, v311] {
        wait_listening(addr)?;
    }
    tracing::info!(%v5, %v311, "Embedded MQTT broker listening (v5 and 3.1.1).");
    Ok(EmbeddedBroker { v5, v311 })
}

/// Checks the address is free (and resolves port 0) by binding it for a moment.
fn reserve(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let listener = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    listener
        .local_addr()
        .map_err(|source| BrokerError::Bind { addr, source })
}

/// Waits until the broker holds the address. Probing with a bind rather than a connection
/// keeps rumqttd from logging a half-open connection as an error.
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
