//! Per-device authentication and rate limiting, without IO: bearer tokens are looked up by their
//! sha256 (the relay never stores a token itself), and each device has a token bucket.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::http::StatusCode;
use models::sha256::Sha256;

use crate::config::Token;
use crate::error::ApiError;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: String,
    models: Option<Vec<String>>,
}

impl Device {
    /// Refuses with 403 when the device's token does not cover `model`.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        match &self.models {
            Some(allowed) if !allowed.iter().any(|m| m == model) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "device `{}` is not allowed to use model `{model}`; its token covers: {}",
                    self.id,
                    allowed.join(", ")
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Hex sha256 of a token, as stored in relay.toml.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token table and the rate limiter.
#[derive(Debug)]
pub struct Auth {
    by_hash: HashMap<String, Device>,
    rps: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Auth {
    pub fn new(tokens: &[Token], rps: f64, burst: f64) -> Auth {
        let by_hash = tokens
            .iter()
            .map(|t| {
                (
                    t.sha256.clone(),
                    Device {
                        id: t.device_id.clone(),
                        models: t.models.clone(),
                    },
                )
            })
            .collect();
        Auth {
            by_hash,
            rps,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// True when tokens are configured.
    pub fn enabled(&self) -> bool {
        !self.by_hash.is_empty()
    }

    /// The device behind an `Authorization` header value: 401 when auth is on and the header is
    /// missing, malformed or unknown; `None` when auth is off.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Option<Device>, ApiError> {
        if !self.enabled() {
            return Ok(None);
        }
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
        let header = authorization.ok_or_else(|| {
            unauthorized("this relay needs a device token: send `Authorization: Bearer <token>`")
        })?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("the Authorization header must read `Bearer <token>`"))?;
        self.by_hash
            .get(&hash_token(token))
            .cloned()
            .map(Some)
            .ok_or_else(|| unauthorized("the device token is not known to this relay"))
    }

    /// Takes one request from the device's bucket at time `now`; 429 when it is empty.
    pub fn admit(&self, device: &str, now: Instant) -> Result<(), ApiError> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(device.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rps).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "device `{device}` is over its rate limit of {} requests per second; slow down and retry",
                    self.rps
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn auth() -> Auth {
        let tokens = vec![
            Token {
                device_id: "pi-1".into(),
                sha256: hash_token("secret-1"),
                models: None,
            },
            Token {
                device_id: "pi-2".into(),
                sha256: hash_token("secret-2"),
                models: Some(vec!["digits".into()]),
            },
        ];
        Auth::new(&tokens, 2.0, 3.0)
    }

    #[test]
    fn tokens_map_to_devices() {
        let a = auth();
        assert_eq!(
            a.authenticate(Some("Bearer secret-1")).unwrap().unwrap().id,
            "pi-1"
        );
        for bad in [
            None,
            Some("secret-1"),
            Some("Bearer "),
            Some("Bearer nope"),
            Some("Basic abc"),
        ] {
            let e = a.authenticate(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        }
        let d2 = a.authenticate(Some("Bearer secret-2")).unwrap().unwrap();
        assert!(d2.check_model("digits").is_ok());
        assert_eq!(
            d2.check_model("vad").unwrap_err().status,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn no_tokens_means_no_auth() {
        let a = Auth::new(&[], 1.0, 1.0);
        assert_eq!(a.authenticate(None).unwrap(), None);
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let a = auth();
        let t0 = Instant::now();
        for _ in 0..3 {
            a.admit("pi-1", t0).unwrap();
        }
        assert_eq!(
            a.admit("pi-1", t0).unwrap_err().status,
            StatusCode::TOO_MANY_REQUESTS
        );
        // Another device has its own bucket.
        a.admit("pi-2", t0).unwrap();
        // Half a second at 2/s refills one request.
        a.admit("pi-1", t0 + Duration::from_millis(500)).unwrap();
        assert!(a.admit("pi-1", t0 + Duration::from_millis(500)).is_err());
    }
}
