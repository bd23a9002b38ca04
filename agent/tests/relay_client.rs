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
    client_at(&format!("http://{addr}"), None)
}

/// A client of the relay at `url`, trusting only `ca_pem` when given.
fn client_at(url: &str, ca_pem: Option<Vec<u8>>) -> Cloud {
    Cloud::new(&RelayConfig {
        url: url.parse().unwrap(),
        token: None,
        ca_pem,
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

/// A TLS front for the relay at `relay`, with a server certificate for 127.0.0.1 signed by a
/// CA made here (as a load balancer terminating TLS would be); returns its address and the
/// CA's PEM.
async fn tls_front(relay: SocketAddr) -> (SocketAddr, Vec<u8>) {
    use rumqttc::tokio_rustls::{TlsAcceptor, rustls};
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tether-test-ca");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::IpAddress(std::net::IpAddr::from([
        127, 0, 0, 1,
    ]))];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(relay).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    (addr, ca.pem().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_relay_is_verified_against_its_ca_file_or_the_system_roots() {
    let (relay_addr, _stop) = relay().await;
    let (front, ca_pem) = tls_front(relay_addr).await;
    let cloud = |ca: Option<Vec<u8>>| client_at(&format!("https://127.0.0.1:{}", front.port()), ca);
    // relay.ca_file names the CA: the relay answers over TLS.
    let trusted = cloud(Some(ca_pem))
        .infer("digits", digits_request(json!({})), Duration::from_secs(10))
        .await;
    assert!(trusted.is_ok(), "{trusted:?}");
    // Without it, the system's roots do not know this CA: refused, as a transport failure.
    let untrusted = cloud(None)
        .infer("digits", digits_request(json!({})), Duration::from_secs(10))
        .await;
    let err = format!("{:?}", untrusted.unwrap_err());
    assert!(
        err.contains("certificate") || err.contains("Unknown") || err.contains("issuer"),
        "{err}"
    );
}
