//! A relay served in this test process on a free port.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use cloud_relay::State;
use cloud_relay::config::RawConfig;

/// Serves the zoo (unless `tweak` names another models directory) with no shutdown grace;
/// stops when the sender is sent to or dropped.
pub async fn relay(
    tweak: impl FnOnce(&mut RawConfig),
) -> (SocketAddr, State, tokio::sync::oneshot::Sender<()>) {
    let mut raw = RawConfig {
        models_dir: Some(models::default_zoo_dir()),
        ..RawConfig::default()
    };
    raw.shutdown_grace_ms = 0;
    tweak(&mut raw);
    let cfg = raw.validate().unwrap();
    let state = tokio::task::spawn_blocking(move || State::build(cfg))
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cloud_relay::serve(state.clone(), listener, async move {
        let _ = rx.await;
    }));
    (addr, state, tx)
}
