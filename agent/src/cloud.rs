//! The relay, as the agent calls it: an Open Inference Protocol client (reqwest with rustls,
//! keep-alive, the device's bearer token, a timeout equal to the request's remaining budget)
//! behind a circuit breaker, with a round-trip estimate per model for the policy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use models::v2::InferenceResponse;

use crate::config::RelayConfig;

/// The header carrying the request's remaining budget to the relay, in milliseconds (the
/// relay's `tether-budget-ms`).
pub const BUDGET_HEADER: &str = "tether-budget-ms";
use crate::policy::{Breaker, BreakerState, Relay};

/// Why an offload did not return an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CloudError {
    #[error("the relay's circuit is open after repeated failures; not tried")]
    CircuitOpen,
    #[error("the relay did not answer within the remaining budget of {0} ms")]
    Timeout(u64),
    #[error("the relay could not be reached: {0}")]
    Unreachable(String),
    /// The relay refused the request itself (a 4xx for its input): the sender's to fix, and
    /// no sign the relay is unwell.
    #[error("the relay refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    /// The relay turned this device away (401, 403, 429): worth running locally instead, but no
    /// sign the relay is unwell either.
    #[error("the relay declined the request ({status}): {message}")]
    Declined { status: u16, message: String },
    #[error("the relay failed ({status}): {message}")]
    Failed { status: u16, message: String },
    #[error("the relay's answer is not a V2 response: {0}")]
    BadAnswer(String),
}

/// A smoothed round trip: mean and mean deviation, as TCP estimates its RTO.
#[derive(Debug, Clone, Copy)]
struct Rtt {
    mean: f64,
    dev: f64,
}

impl Rtt {
    fn update(&mut self, ms: f64) {
        let err = ms - self.mean;
        self.mean += err / 8.0;
        self.dev += (err.abs() - self.dev) / 4.0;
    }

    /// A pessimistic estimate: mean plus twice the deviation.
    fn estimate(&self) -> f64 {
        self.mean + 2.0 * self.dev
    }
}

/// The cheap, cloneable relay client.
#[derive(Debug, Clone)]
pub struct Cloud {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    base: url::Url,
    token: Option<String>,
    breaker: Mutex<Breaker>,
    rtt: Mutex<HashMap<String, Rtt>>,
}

/// `builder` trusting only the certificates of `ca_pem` when given (`relay.ca_file`), else the
/// system's roots (reqwest's platform verifier).
pub fn with_roots(
    builder: reqwest::ClientBuilder,
    ca_pem: Option<&[u8]>,
) -> reqwest::ClientBuilder {
    match ca_pem.map(reqwest::Certificate::from_pem_bundle) {
        Some(Ok(certs)) => builder.tls_certs_only(certs),
        // Checked at validation; an unreadable bundle trusts nothing rather than everything.
        Some(Err(_)) => builder.tls_certs_only(Vec::new()),
        None => builder,
    }
}

impl Cloud {
    pub fn new(cfg: &RelayConfig) -> Result<Cloud, CloudError> {
        let http = with_roots(
            reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(90))
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5)),
            cfg.ca_pem.as_deref(),
        )
        .build()
        .map_err(|e| CloudError::Unreachable(e.to_string()))?;
        Ok(Cloud {
            inner: Arc::new(Inner {
                http,
                base: cfg.url.clone(),
                token: cfg.token.clone(),
                breaker: Mutex::new(Breaker::new(cfg.breaker)),
                rtt: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The relay as the policy sees it for `model` at `now`.
    pub fn relay_signal(&self, model: &str, now: Instant) -> Relay {
        let allowed = lock(&self.inner.breaker).would_allow(now);
        if !allowed {
            return Relay::Down;
        }
        let rtt = lock(&self.inner.rtt).get(model).map(Rtt::estimate);
        Relay::Up { rtt_ms: rtt }
    }

    pub fn circuit(&self) -> BreakerState {
        lock(&self.inner.breaker).state()
    }

    /// Sends a V2 request body (as received) to the relay's model of the same name, giving up
    /// after `timeout`.
    pub async fn infer(
        &self,
        model: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<InferenceResponse, CloudError> {
        if !lock(&self.inner.breaker).allow(Instant::now()) {
            return Err(CloudError::CircuitOpen);
        }
        let started = Instant::now();
        let result = self.call(model, body, timeout).await;
        // Only a transport failure or a server error says the relay is unwell; an answer the
        // relay gave on purpose (4xx) or one this agent cannot read does not open the circuit
        // for every requester of the device.
        let healthy = !matches!(
            result,
            Err(CloudError::Unreachable(_) | CloudError::Timeout(_) | CloudError::Failed { .. })
        );
        lock(&self.inner.breaker).record(healthy, Instant::now());
        if result.is_ok() {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            lock(&self.inner.rtt)
                .entry(model.to_owned())
                .and_modify(|r| r.update(ms))
                .or_insert(Rtt {
                    mean: ms,
                    dev: ms / 2.0,
                });
        }
        result
    }

    async fn call(
        &self,
        model: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<InferenceResponse, CloudError> {
        let mut url = self.inner.base.clone();
        url.path_segments_mut()
            .map_err(|()| CloudError::Unreachable("the relay URL cannot take a path".into()))?
            .pop_if_empty()
            .extend(["v2", "models", model, "infer"]);
        let budget_ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut req = self
            .inner
            .http
            .post(url)
            .timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            // The relay drops the request once this passes instead of computing it for nobody.
            .header(BUDGET_HEADER, budget_ms)
            .body(body);
        if let Some(token) = &self.inner.token {
            req = req.bearer_auth(token);
        }
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                CloudError::Timeout(budget_ms)
            } else {
                // The whole chain: "error sending request" alone hides a refused connection or
                // a certificate the device does not trust.
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    text.push_str(": ");
                    text.push_str(&s.to_string());
                    source = s.source();
                }
                CloudError::Unreachable(text)
            }
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let json_len = resp
            .headers()
            .get(models::v2::BINARY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().parse::<usize>());
        let bytes = resp.bytes().await.map_err(transport)?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            let code = status.as_u16();
            return Err(if matches!(code, 401 | 403 | 429) {
                CloudError::Declined {
                    status: code,
                    message,
                }
            } else if status.is_client_error() && code != 408 {
                CloudError::Refused {
                    status: code,
                    message,
                }
            } else {
                CloudError::Failed {
                    status: code,
                    message,
                }
            });
        }
        let json_len = json_len.transpose().map_err(|_| {
            CloudError::BadAnswer("its Inference-Header-Content-Length is not a byte count".into())
        })?;
        models::v2::decode_response(&bytes, json_len)
            .map_err(|e| CloudError::BadAnswer(e.to_string()))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_round_trip_estimate_follows_the_measurements() {
        let mut r = Rtt {
            mean: 10.0,
            dev: 5.0,
        };
        assert_eq!(r.estimate(), 20.0);
        for _ in 0..50 {
            r.update(30.0);
        }
        assert!((r.mean - 30.0).abs() < 0.1, "{r:?}");
        assert!(r.dev < 0.5, "{r:?}");
    }
}
