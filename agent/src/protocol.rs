//! Tether's MQTT protocol, without IO: the topics, where a reply goes, and the error payloads.
//! Everything here is a pure function of its arguments, tested by tables.

use serde::Serialize;

/// The coded errors a requester can receive on its reply topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or does not fit the model.
    BadRequest,
    /// No model of that name is served here.
    UnknownModel,
    /// The queue is full: retry later or elsewhere.
    Overloaded,
    /// The agent cannot serve this now (shutting down, no route within the budget).
    Unavailable,
    /// A fault on our side.
    Internal,
}

impl From<models::ErrorCode> for ErrorCode {
    fn from(c: models::ErrorCode) -> Self {
        match c {
            models::ErrorCode::BadRequest => ErrorCode::BadRequest,
            models::ErrorCode::UnknownModel => ErrorCode::UnknownModel,
            models::ErrorCode::Internal => ErrorCode::Internal,
        }
    }
}

/// The body of an error reply: `{"id", "error", "code"}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorReply<'a> {
    pub id: Option<&'a str>,
    pub error: &'a str,
    pub code: ErrorCode,
    /// Why the request was refused, as the routing policy names it (for example
    /// `would_miss_budget`), when the policy refused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
}

impl ErrorReply<'_> {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self)
            .unwrap_or_else(|_| br#"{"error":"internal","code":"internal"}"#.to_vec())
    }
}

/// The topics of one device.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
    device_id: String,
    pool: Option<String>,
}

impl Topics {
    pub fn new(prefix: &str, device_id: &str, pool: Option<&str>) -> Topics {
        Topics {
            prefix: prefix.to_owned(),
            device_id: device_id.to_owned(),
            pool: pool.map(str::to_owned),
        }
    }

    /// The subscription that brings this device's own requests.
    pub fn device_filter(&self) -> String {
        format!("{}/{}/infer/+", self.prefix, self.device_id)
    }

    /// The shared subscription of the pool, if the device is in one.
    pub fn pool_filter(&self) -> Option<String> {
        self.pool
            .as_ref()
            .map(|pool| format!("$share/{pool}/{}/pool/infer/+", self.prefix))
    }

    /// The model a request topic names, if it is one of ours.
    pub fn model_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let rest = match rest
            .strip_prefix(&self.device_id)
            .and_then(|r| r.strip_prefix('/'))
        {
            Some(r) => r,
            None if self.pool.is_some() => rest.strip_prefix("pool/")?,
            None => return None,
        };
        let model = rest.strip_prefix("infer/")?;
        (!model.is_empty() && !model.contains('/')).then_some(model)
    }

    /// The retained status topic.
    pub fn status(&self) -> String {
        format!("{}/{}/status", self.prefix, self.device_id)
    }

    /// Where telemetry goes.
    pub fn telemetry(&self) -> String {
        format!("{}/{}/telemetry", self.prefix, self.device_id)
    }

    /// Where a reply goes when the request names no reply topic.
    pub fn default_reply(&self, model: &str) -> String {
        format!("{}/{}/result/{model}", self.prefix, self.device_id)
    }
}

/// Where a reply is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRoute {
    pub topic: String,
    /// MQTT v5 Correlation Data, copied back byte for byte.
    pub correlation: Option<Vec<u8>>,
    /// The request used MQTT v5 request/response (a response topic or correlation data), so
    /// the reply carries v5 properties too.
    pub v5: bool,
}

/// Picks the reply topic: the MQTT v5 Response Topic, else `parameters.reply_to`, else the
/// default result topic. A reply topic with wildcards cannot be published to and is skipped.
pub fn reply_route(
    response_topic: Option<&str>,
    correlation: Option<&[u8]>,
    reply_to: Option<&str>,
    default: String,
) -> ReplyRoute {
    let usable = |t: &&str| is_publishable(t);
    let topic = response_topic
        .filter(usable)
        .or(reply_to.filter(usable))
        .map_or(default, str::to_owned);
    let v5 = response_topic.is_some() || correlation.is_some();
    ReplyRoute {
        topic,
        correlation: correlation.map(<[u8]>::to_vec),
        v5,
    }
}

/// A topic name a client may publish to: non-empty, no wildcards, no NUL.
pub fn is_publishable(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0']) && topic.len() <= 65_535
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_topics_name_the_model() {
        let t = Topics::new("tether", "pi-1", Some("line3"));
        let cases = [
            ("tether/pi-1/infer/digits", Some("digits")),
            ("tether/pool/infer/vad", Some("vad")),
            ("tether/pi-2/infer/digits", None),
            ("tether/pi-1/infer/", None),
            ("tether/pi-1/infer/a/b", None),
            ("tether/pi-1/result/digits", None),
            ("other/pi-1/infer/digits", None),
            ("tetherx/pi-1/infer/digits", None),
        ];
        for (topic, want) in cases {
            assert_eq!(t.model_of(topic), want, "{topic}");
        }
        let no_pool = Topics::new("tether", "pi-1", None);
        assert_eq!(no_pool.model_of("tether/pool/infer/vad"), None);
        assert_eq!(no_pool.pool_filter(), None);
        assert_eq!(t.device_filter(), "tether/pi-1/infer/+");
        assert_eq!(
            t.pool_filter().as_deref(),
            Some("$share/line3/tether/pool/infer/+")
        );
    }

    #[test]
    fn a_device_named_pool_still_gets_its_own_requests() {
        let t = Topics::new("tether", "pool", Some("p"));
        assert_eq!(t.model_of("tether/pool/infer/digits"), Some("digits"));
    }

    #[test]
    fn reply_routing_prefers_the_response_topic() {
        let d = || "tether/pi-1/result/digits".to_owned();
        let cases = [
            (
                Some("resp/1"),
                Some(&b"c1"[..]),
                Some("rt/1"),
                "resp/1",
                Some(b"c1".to_vec()),
            ),
            (None, None, Some("rt/1"), "rt/1", None),
            (None, None, None, "tether/pi-1/result/digits", None),
            (Some("bad/+"), None, Some("rt/1"), "rt/1", None),
            (None, None, Some("bad/#"), "tether/pi-1/result/digits", None),
            (
                Some(""),
                Some(&b""[..]),
                None,
                "tether/pi-1/result/digits",
                Some(Vec::new()),
            ),
        ];
        for (response_topic, corr, reply_to, topic, correlation) in cases {
            let r = reply_route(response_topic, corr, reply_to, d());
            let v5 = response_topic.is_some() || corr.is_some();
            assert_eq!(
                r,
                ReplyRoute {
                    topic: topic.to_owned(),
                    correlation,
                    v5
                },
                "{response_topic:?} {reply_to:?}"
            );
        }
    }

    #[test]
    fn error_replies_are_coded() {
        let body = ErrorReply {
            id: Some("r1"),
            error: "unknown model `x`",
            code: ErrorCode::UnknownModel,
            reason: None,
        }
        .to_json();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "r1", "error": "unknown model `x`", "code": "unknown_model"})
        );
    }
}
