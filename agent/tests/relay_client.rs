//! The agent's relay client against a real relay over HTTP: answers in either of the
//! protocol's forms are understood, a request's remaining budget travels with it, and only
//! transport failures and server errors count against the relay's circuit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use agent::cloud::{Cloud, CloudError};
use agent::config::{BreakerConfig, RelayConfig};
use agent::policy::BreakerState;
use bytes::Bytes;
use common::relay;
use serde_json::json;

fn client(addr: SocketAddr) -> Cloud {
    Cloud::new(&RelayConfig {
        url: format!("http://{addr}").parse().unwrap(),
        token: None,
        breaker: BreakerConfig {
            consecutive_failures: 3,
            error_rate: 0.5,
            window: 10,
            open_for: Duration::from_secs(30),
        },
    })
    .unwrap()
}

fn digits_request(parameters: serde_json::Value) -> Bytes {
    let data: Vec<f32> = (0..64u8).map(|i| f32::from(i % 16)).collect();
    let mut request = json!({
        "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": data}],
    });
    if let Some(p) = parameters.as_object() {
        for (k, v) in p {
            request[k] = v.clone();
        }
    }
    Bytes::from(request.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_json_answers_are_both_understood() {
    let (addr, _stop) = relay().await;
    let cloud = client(addr);
    let plain = cloud
        .infer("digits", digits_request(json!({})), Duration::from_secs(10))
        .await
        .unwrap();
    let expected = plain.outputs[0].to_tensor().unwrap();
    for asked in [
        json!({"parameters": {"binary_data_output": true}}),
        json!({"outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]}),
    ] {
        let answer = cloud
            .infer(
                "digits",
                digits_request(asked.clone()),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|e| panic!("{asked}: {e}"));
        let got = answer
            .outputs
            .iter()
            .find(|o| o.name == expected.name())
            .unwrap()
            .to_tensor()
            .unwrap();
        assert_eq!(got.as_f32(), expected.as_f32(), "{asked}");
    }
    assert_eq!(cloud.circuit(), BreakerState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_do_not_open_the_circuit_but_an_unreachable_relay_does() {
    let (addr, _stop) = relay().await;
    let cloud = client(addr);
    // Bad input and an unknown model, many times over: the relay is fine, the circuit stays
    // closed.
    for _ in 0..6 {
        let bad = Bytes::from_static(
            br#"{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]}]}"#,
        );
        let err = cloud
            .infer("digits", bad, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CloudError::Refused { status: 400, .. }),
            "{err:?}"
        );
        let err = cloud
            .infer(
                "no-such-model",
                digits_request(json!({})),
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, CloudError::Refused { status: 404, .. }),
            "{err:?}"
        );
    }
    assert_eq!(cloud.circuit(), BreakerState::Closed);

    // Nothing listening: three transport failures open it.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cloud = client(dead);
    for _ in 0..3 {
        let err = cloud
            .infer("digits", digits_request(json!({})), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, CloudError::Unreachable(_)), "{err:?}");
    }
    assert_eq!(cloud.circuit(), BreakerState::Open);
}
