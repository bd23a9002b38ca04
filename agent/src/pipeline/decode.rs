//! Decoding a request from the wire (sans-IO): topic, payload and MQTT v5 properties in; a
//! validated request with its reply route, budget and identity out, or a refusal that says
//! where to send the sentence explaining it. Every number from the wire is range-checked
//! before it becomes a duration, and every reply topic is checked before anything is written.
//! Total: no input makes it panic (property-tested below).

use std::time::Duration;

use models::v2::InferenceRequest;
use serde_json::Value;

use crate::protocol::{ErrorCode, ReplyRoute, Topics, identity};

/// The bounds decoding applies.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Larger payloads are refused unread.
    pub max_payload_bytes: usize,
    /// The largest `budget_ms` a request may ask for; a longer Message Expiry is capped to it.
    pub max_budget: Duration,
    /// How long a request without a Message Expiry is remembered for de-duplication (zero:
    /// not at all).
    pub dedupe_window: Duration,
    /// The longest any request is remembered.
    pub dedupe_max_window: Duration,
}

/// A request ready for the cache and the policy.
#[derive(Debug)]
pub struct Decoded {
    pub model: String,
    pub request: InferenceRequest,
    pub route: ReplyRoute,
    /// The latency budget it asked for (`parameters.budget_ms`, else its Message Expiry capped
    /// to the maximum); `None`: the model's default.
    pub budget: Option<Duration>,
    /// `"cache": false`: run the model even if the cache holds an answer.
    pub bypass_cache: bool,
    /// How long its requester waits (its Message Expiry), if it said.
    pub expiry: Option<Duration>,
    /// Its de-duplication key and how long to remember its reply.
    pub identity: Option<([u8; 32], Duration)>,
}

/// Why a message is not a request that can be answered as such.
#[derive(Debug, PartialEq)]
pub enum Undecodable {
    /// Not on a request topic (or not UTF-8): acknowledged and ignored.
    NotARequest(String),
    /// A request that is refused, and where to say why.
    Refused(Box<Refusal>),
}

/// A refused request: the reply that says why, and where it goes.
#[derive(Debug, PartialEq)]
pub struct Refusal {
    pub model: String,
    pub route: ReplyRoute,
    pub id: Option<String>,
    pub code: ErrorCode,
    pub error: String,
    /// How long its requester waits, if it said.
    pub expiry: Option<Duration>,
}

/// Decodes one message.
pub fn decode(
    topics: &Topics,
    limits: &Limits,
    topic: &[u8],
    payload: &[u8],
    response_topic: Option<&str>,
    correlation: Option<&[u8]>,
    expiry_secs: Option<u32>,
) -> Result<Decoded, Undecodable> {
    let Ok(topic) = std::str::from_utf8(topic) else {
        return Err(Undecodable::NotARequest(
            "the topic is not UTF-8".to_owned(),
        ));
    };
    let Some(model) = topics.model_of(topic) else {
        return Err(Undecodable::NotARequest(format!(
            "`{}` is not a request topic of this agent",
            topic.chars().take(200).collect::<String>()
        )));
    };
    let model = model.to_owned();
    let expiry = expiry_secs.map(|s| Duration::from_secs(u64::from(s)));
    let refuse = |route: ReplyRoute, id: Option<String>, code, error: String| {
        Undecodable::Refused(Box::new(Refusal {
            model: model.clone(),
            route,
            id,
            code,
            error,
            expiry,
        }))
    };
    // Where to say what is wrong before the payload is read: the response topic when it is
    // usable, else the default result topic.
    let early = |reply_to: Option<&str>| match topics.reply_route(
        response_topic,
        correlation,
        reply_to,
        &model,
    ) {
        Ok(r) => r,
        Err(refused) => refused.fallback,
    };
    if payload.len() > limits.max_payload_bytes {
        return Err(refuse(
            early(None),
            None,
            ErrorCode::BadRequest,
            format!(
                "the request is {} bytes, over this agent's limit of {} bytes (mqtt.max_payload_bytes)",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    let request = match InferenceRequest::from_json(payload) {
        Ok(r) => r,
        Err(e) => {
            return Err(refuse(
                early(probe_reply_to(payload).as_deref()),
                None,
                ErrorCode::BadRequest,
                format!("the request is not a V2 inference request: {e}"),
            ));
        }
    };
    let id = request.id.clone();
    let params = request.parameters.as_ref();
    let param = |name: &str| params.and_then(|p| p.get(name));
    let reply_to = match param("reply_to") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => {
            return Err(refuse(
                early(None),
                id,
                ErrorCode::BadRequest,
                format!(
                    "parameters.reply_to must be a topic name (a string), not {}",
                    kind(other)
                ),
            ));
        }
    };
    let route = match topics.reply_route(response_topic, correlation, reply_to, &model) {
        Ok(r) => r,
        Err(refused) => {
            let asked = response_topic.or(reply_to).unwrap_or_default();
            return Err(refuse(
                refused.fallback,
                id,
                ErrorCode::BadRequest,
                format!(
                    "the reply topic `{}` is refused: {}; name another reply topic",
                    printable(asked),
                    refused.refusal
                ),
            ));
        }
    };
    let bypass_cache = match param("cache") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => !b,
        Some(other) => {
            return Err(refuse(
                route,
                id,
                ErrorCode::BadRequest,
                format!(
                    "parameters.cache must be true or false, not {}",
                    kind(other)
                ),
            ));
        }
    };
    let budget = match param("budget_ms") {
        None | Some(Value::Null) => expiry.map(|e| e.min(limits.max_budget)),
        Some(v) => match budget_ms(v, limits.max_budget) {
            Ok(b) => Some(b),
            Err(e) => return Err(refuse(route, id, ErrorCode::BadRequest, e)),
        },
    };
    let window = match expiry {
        Some(e) => e.min(limits.dedupe_max_window),
        None => limits.dedupe_window,
    };
    let identity = (!window.is_zero())
        .then(|| identity(topic, &route.topic, correlation, id.as_deref()))
        .flatten()
        .map(|key| (key, window));
    Ok(Decoded {
        model,
        request,
        route,
        budget,
        bypass_cache,
        expiry,
        identity,
    })
}

/// `parameters.budget_ms`: a finite number of milliseconds in (0, max].
fn budget_ms(v: &Value, max: Duration) -> Result<Duration, String> {
    let max_ms = max.as_secs_f64() * 1e3;
    let Some(ms) = v.as_f64() else {
        return Err(format!(
            "parameters.budget_ms must be a number of milliseconds, not {}",
            kind(v)
        ));
    };
    if !(ms.is_finite() && ms > 0.0 && ms <= max_ms) {
        return Err(format!(
            "parameters.budget_ms is {ms}; use a number of milliseconds above 0 and at most {max_ms} (policy.max_budget_ms)"
        ));
    }
    // In range, so the conversion cannot fail; the fallback is never taken.
    Ok(Duration::try_from_secs_f64(ms / 1e3).unwrap_or(max))
}

/// The JSON type of a value, for sentences.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A topic as it can be quoted in a reply: control characters escaped, at most 200 chars.
fn printable(topic: &str) -> String {
    topic
        .chars()
        .take(200)
        .flat_map(char::escape_debug)
        .collect()
}

/// `parameters.reply_to` of a payload that is not a valid request, if it has one, so the
/// requester hears why.
fn probe_reply_to(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Params {
        reply_to: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Outer {
        parameters: Option<Params>,
    }
    serde_json::from_slice::<Outer>(payload)
        .ok()?
        .parameters?
        .reply_to
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn topics() -> Topics {
        Topics::new("tether", "pi-1", None)
    }

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 4096,
            max_budget: Duration::from_secs(300),
            dedupe_window: Duration::from_secs(600),
            dedupe_max_window: Duration::from_secs(86_400),
        }
    }

    const T: &[u8] = b"tether/pi-1/infer/digits";
    const BODY: &str =
        r#"{"id":"r1","inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[0.5]}]"#;

    fn with_params(params: &str) -> Vec<u8> {
        format!("{BODY},\"parameters\":{params}}}").into_bytes()
    }

    fn refusal(r: Result<Decoded, Undecodable>) -> Refusal {
        match r {
            Err(Undecodable::Refused(r)) => *r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_request_decodes_with_its_route_budget_and_identity() {
        let d = decode(
            &topics(),
            &limits(),
            T,
            &with_params(r#"{"budget_ms": 250.5, "cache": false}"#),
            Some("my/replies"),
            Some(b"c1"),
            Some(30),
        )
        .unwrap();
        assert_eq!(d.model, "digits");
        assert_eq!(d.route.topic, "my/replies");
        assert_eq!(d.budget, Some(Duration::from_micros(250_500)));
        assert!(d.bypass_cache);
        assert_eq!(d.expiry, Some(Duration::from_secs(30)));
        let (key, window) = d.identity.unwrap();
        assert_eq!(window, Duration::from_secs(30), "the expiry is the window");
        assert_eq!(
            Some(key),
            identity("tether/pi-1/infer/digits", "my/replies", Some(b"c1"), None)
        );
    }

    #[test]
    fn budgets_come_from_the_parameter_else_the_expiry_capped() {
        let cases = [
            (BODY.to_owned() + "}", None, None),
            (
                BODY.to_owned() + "}",
                Some(20),
                Some(Duration::from_secs(20)),
            ),
            (
                BODY.to_owned() + "}",
                Some(u32::MAX),
                Some(Duration::from_secs(300)),
            ),
            (
                String::from_utf8(with_params(r#"{"budget_ms": 5}"#)).unwrap(),
                Some(20),
                Some(Duration::from_millis(5)),
            ),
        ];
        for (body, expiry, want) in cases {
            let d = decode(&topics(), &limits(), T, body.as_bytes(), None, None, expiry).unwrap();
            assert_eq!(d.budget, want, "{body} {expiry:?}");
        }
    }

    #[test]
    fn hostile_parameters_are_refused_with_a_sentence() {
        let cases = [
            (
                r#"{"budget_ms": 1e22}"#,
                "budget_ms is 10000000000000000000000",
            ),
            (r#"{"budget_ms": 1e308}"#, "budget_ms is 1"),
            (r#"{"budget_ms": -1}"#, "budget_ms is -1"),
            (r#"{"budget_ms": 0}"#, "budget_ms is 0"),
            (r#"{"budget_ms": 300001}"#, "at most 300000"),
            (
                r#"{"budget_ms": "50"}"#,
                "must be a number of milliseconds, not a string",
            ),
            (r#"{"budget_ms": [1]}"#, "not an array"),
            (
                r#"{"cache": "no"}"#,
                "parameters.cache must be true or false, not a string",
            ),
            (
                r#"{"reply_to": 7}"#,
                "reply_to must be a topic name (a string), not a number",
            ),
        ];
        for (params, needle) in cases {
            let r = refusal(decode(
                &topics(),
                &limits(),
                T,
                &with_params(params),
                None,
                None,
                None,
            ));
            assert_eq!(r.code, ErrorCode::BadRequest, "{params}");
            assert_eq!(r.id.as_deref(), Some("r1"), "{params}");
            assert!(r.error.contains(needle), "{params}: {}", r.error);
        }
    }

    #[test]
    fn a_refused_reply_topic_is_answered_on_the_default_topic() {
        let cases = [
            (None, Some("r\u{1}x"), "U+0001"),
            (None, Some("tether/pi-1/config"), "agents' own topics"),
            (None, Some("tether/pi-2/status"), "agents' own topics"),
            (None, Some("a/+"), "wildcard"),
            (Some("$SYS/x"), None, "belong to the broker"),
        ];
        for (response_topic, reply_to, needle) in cases {
            let params = match reply_to {
                Some(t) => serde_json::json!({ "reply_to": t }).to_string(),
                None => "{}".to_owned(),
            };
            let r = refusal(decode(
                &topics(),
                &limits(),
                T,
                &with_params(&params),
                response_topic,
                Some(b"c"),
                None,
            ));
            assert_eq!(r.route.topic, "tether/pi-1/result/digits");
            assert_eq!(r.route.correlation.as_deref(), Some(&b"c"[..]));
            assert!(r.error.contains(needle), "{}", r.error);
            assert!(
                !r.error.contains('\u{1}'),
                "the sentence escapes control characters"
            );
        }
    }

    #[test]
    fn malformed_payloads_are_refused_and_others_ignored() {
        let r = refusal(decode(
            &topics(),
            &limits(),
            T,
            b"{not json",
            None,
            None,
            None,
        ));
        assert!(
            r.error.contains("not a V2 inference request"),
            "{}",
            r.error
        );
        let r = refusal(decode(
            &topics(),
            &limits(),
            T,
            br#"{"parameters":{"reply_to":"back/here"},"inputs":7}"#,
            None,
            None,
            None,
        ));
        assert_eq!(r.route.topic, "back/here", "the requester hears why");
        let big = vec![b' '; 5000];
        let r = refusal(decode(&topics(), &limits(), T, &big, None, None, None));
        assert!(r.error.contains("over this agent's limit"), "{}", r.error);
        assert!(matches!(
            decode(
                &topics(),
                &limits(),
                b"tether/pi-1/status",
                b"{}",
                None,
                None,
                None
            ),
            Err(Undecodable::NotARequest(_))
        ));
        assert!(matches!(
            decode(&topics(), &limits(), b"\xff\xfe", b"{}", None, None, None),
            Err(Undecodable::NotARequest(_))
        ));
    }

    #[test]
    fn without_correlation_or_id_there_is_no_identity() {
        let body = br#"{"inputs":[]}"#;
        let d = decode(&topics(), &limits(), T, body, Some("r"), None, None).unwrap();
        assert!(d.identity.is_none());
        let mut no_dedupe = limits();
        no_dedupe.dedupe_window = Duration::ZERO;
        let d = decode(&topics(), &no_dedupe, T, body, Some("r"), Some(b"c"), None).unwrap();
        assert!(d.identity.is_none(), "window 0 turns de-duplication off");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever arrives, decoding returns; a route it chooses obeys the reply-topic rules.
        #[test]
        fn decoding_never_panics_and_routes_are_safe(
            topic in prop::collection::vec(any::<u8>(), 0..40),
            payload in prop::collection::vec(any::<u8>(), 0..300),
            response_topic in prop::option::of(".{0,40}"),
            correlation in prop::option::of(prop::collection::vec(any::<u8>(), 0..20)),
            expiry in prop::option::of(any::<u32>()),
        ) {
            let topics = topics();
            // Half the time, this agent's request topic.
            let topic = if topic.len() % 2 == 0 { T.to_vec() } else { topic };
            let r = decode(&topics, &limits(), &topic, &payload, response_topic.as_deref(), correlation.as_deref(), expiry);
            match r {
                Ok(d) => {
                    prop_assert!(topics.check_reply_topic(&d.route.topic).is_ok());
                    if let Some(b) = d.budget {
                        prop_assert!(b <= Duration::from_secs(300));
                    }
                }
                Err(Undecodable::Refused(r)) => {
                    prop_assert!(topics.check_reply_topic(&r.route.topic).is_ok());
                    prop_assert!(!r.error.is_empty());
                }
                Err(Undecodable::NotARequest(_)) => {}
            }
        }

        /// Requests built from arbitrary parameter values decode or are refused, never panic,
        /// and an accepted budget is always in range.
        #[test]
        fn hostile_parameter_values_never_panic(
            budget in prop_oneof![
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                ".{0,10}".prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
            ],
            reply_to in prop_oneof![".{0,30}".prop_map(Value::from), any::<i64>().prop_map(Value::from)],
            cache in prop_oneof![any::<bool>().prop_map(Value::from), ".{0,5}".prop_map(Value::from)],
        ) {
            let params = serde_json::json!({"budget_ms": budget, "reply_to": reply_to, "cache": cache});
            let body = with_params(&params.to_string());
            if let Ok(d) = decode(&topics(), &limits(), T, &body, None, None, None) {
                let b = d.budget.unwrap_or_default();
                prop_assert!(b <= Duration::from_secs(300));
                prop_assert!(topics().check_reply_topic(&d.route.topic).is_ok());
            }
        }
    }
}
