//! Upstream mode: a model served by forwarding its requests to another Open Inference Protocol
//! server (Triton, KServe, MLServer, another relay), behind this relay's auth, limits and
//! metrics. One pooled reqwest client (rustls, keep-alive) for all upstreams.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;

use crate::config::{Config, Upstream};
use crate::error::ApiError;

/// The upstream servers by model name.
#[derive(Debug)]
pub struct Upstreams {
    client: reqwest::Client,
    by_model: BTreeMap<String, Upstream>,
}

/// What an upstream answered.
#[derive(Debug)]
pub struct Forwarded {
    pub status: StatusCode,
    pub body: Bytes,
    pub header_length: Option<String>,
    pub content_type: Option<String>,
}

impl Upstreams {
    pub fn new(config: &Config) -> Upstreams {
        let by_model = config
            .models
            .iter()
            .filter_map(|(name, m)| m.upstream.clone().map(|u| (name.clone(), u)))
            .collect();
        let client = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Upstreams { client, by_model }
    }

    /// The upstream of a model, if it is forwarded.
    pub fn get(&self, model: &str) -> Option<&Upstream> {
        self.by_model.get(model)
    }

    /// Models served upstream.
    pub fn models(&self) -> impl Iterator<Item = &String> {
        self.by_model.keys()
    }

    /// Forwards a request body unchanged (JSON or binary) and returns the upstream's answer.
    pub async fn infer(
        &self,
        up: &Upstream,
        model: &str,
        body: Bytes,
        header_length: Option<&str>,
        timeout: Duration,
    ) -> Result<Forwarded, ApiError> {
        let name = up.model.as_deref().unwrap_or(model);
        let url = format!("{}/v2/models/{name}/infer", up.base_url);
        let mut req = self.client.post(&url).timeout(timeout).body(body);
        if let Some(len) = header_length {
            req = req
                .header(crate::binary::HEADER, len)
                .header("content-type", "application/octet-stream");
        } else {
            req = req.header("content-type", "application/json");
        }
        if let Some(token) = &up.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(|e| {
            let status = if e.is_timeout() {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            ApiError::new(
                status,
                format!("the upstream server for model `{model}` ({url}) did not answer: {e}"),
            )
        })?;
        let status =
            StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let header_length = resp
            .headers()
            .get(crate::binary::HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.bytes().await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the upstream server for model `{model}` broke off its answer: {e}"),
            )
        })?;
        Ok(Forwarded {
            status,
            body,
            header_length,
            content_type,
        })
    }

    /// Asks the upstream whether a model is ready.
    pub async fn ready(&self, up: &Upstream, model: &str) -> bool {
        let name = up.model.as_deref().unwrap_or(model);
        let mut req = self
            .client
            .get(format!("{}/v2/models/{name}/ready", up.base_url))
            .timeout(Duration::from_secs(2));
        if let Some(token) = &up.token {
            req = req.bearer_auth(token);
        }
        req.send().await.is_ok_and(|r| r.status().is_success())
    }

    /// Fetches the upstream's model metadata.
    pub async fn metadata(
        &self,
        up: &Upstream,
        model: &str,
    ) -> Result<serde_json::Value, ApiError> {
        let name = up.model.as_deref().unwrap_or(model);
        let mut req = self
            .client
            .get(format!("{}/v2/models/{name}", up.base_url))
            .timeout(Duration::from_secs(5));
        if let Some(token) = &up.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the upstream server for model `{model}` did not answer: {e}"),
            )
        })?;
        if !resp.status().is_success() {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "the upstream server for model `{model}` answered {}",
                    resp.status()
                ),
            ));
        }
        let mut v: serde_json::Value = resp.json().await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the upstream metadata for `{model}` is not JSON: {e}"),
            )
        })?;
        v["name"] = serde_json::Value::String(model.to_owned());
        Ok(v)
    }
}
