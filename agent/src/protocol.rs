//! Tether's MQTT protocol, without IO: every topic the agent uses, where a reply goes and which
//! reply topics are refused, how a request is identified for de-duplication, and the error
//! payloads. Everything here is a pure function of its arguments, tested by tables.

use models::sha256::Sha256;
use serde::Serialize;

/// The coded errors a requester can receive on its reply topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or does not fit the model.
    BadRequest,
    /// No model of that name is served here.
    UnknownModel,
    /// The request cannot be answered within its budget: retry later or elsewhere.
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

/// The longest topic MQTT can carry, in bytes.
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// Second segments under the prefix that belong to the agents themselves: a reply is never
/// published there (`{prefix}/{device}/config`, `.../status`, ...).
const CONTROL_SEGMENTS: [&str; 6] = [
    "config",
    "status",
    "telemetry",
    "quality",
    "events",
    "infer",
];

/// The topics of one device, and the rules its reply topics follow.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
    device_id: String,
    pool: Option<String>,
    /// When not empty, a reply topic must start with one of these (`mqtt.reply_topics`).
    reply_prefixes: Vec<String>,
}

impl Topics {
    pub fn new(prefix: &str, device_id: &str, pool: Option<&str>) -> Topics {
        Topics {
            prefix: prefix.to_owned(),
            device_id: device_id.to_owned(),
            pool: pool.map(str::to_owned),
            reply_prefixes: Vec::new(),
        }
    }

    /// Limits reply topics to these prefixes (none: any topic the rules allow).
    pub fn with_reply_prefixes(mut self, prefixes: Vec<String>) -> Topics {
        self.reply_prefixes = prefixes;
        self
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

    /// This device's request topic for `model`.
    pub fn request(&self, model: &str) -> String {
        format!("{}/{}/infer/{model}", self.prefix, self.device_id)
    }

    /// The retained status topic.
    pub fn status(&self) -> String {
        format!("{}/{}/status", self.prefix, self.device_id)
    }

    /// Where telemetry goes.
    pub fn telemetry(&self) -> String {
        format!("{}/{}/telemetry", self.prefix, self.device_id)
    }

    /// The quality report: audits and shadow runs per model version, retained.
    pub fn quality(&self) -> String {
        format!("{}/{}/quality", self.prefix, self.device_id)
    }

    /// Where a sensor source's events go.
    pub fn events(&self, source: &str) -> String {
        format!("{}/{}/events/{source}", self.prefix, self.device_id)
    }

    /// Where a reply goes when the request names no reply topic.
    pub fn default_reply(&self, model: &str) -> String {
        format!("{}/{}/result/{model}", self.prefix, self.device_id)
    }

    /// Checks a topic a requester asked its reply to be published on.
    pub fn check_reply_topic(&self, topic: &str) -> Result<(), TopicRefusal> {
        check_topic_name(topic)?;
        if topic.starts_with('$') {
            return Err(TopicRefusal::Reserved);
        }
        if let Some(rest) = topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        {
            let mut segments = rest.split('/');
            let first = segments.next().unwrap_or_default();
            let second = segments.next();
            if first == "fleet" {
                return Err(TopicRefusal::AgentTopic("fleet"));
            }
            if let Some(s) = second.and_then(|s| CONTROL_SEGMENTS.iter().find(|c| **c == s)) {
                return Err(TopicRefusal::AgentTopic(s));
            }
        }
        if !self.reply_prefixes.is_empty()
            && !self.reply_prefixes.iter().any(|p| topic.starts_with(p))
        {
            return Err(TopicRefusal::NotAllowed);
        }
        Ok(())
    }

    /// Where the reply to a request goes: its MQTT v5 Response Topic, else its
    /// `parameters.reply_to`, else the default result topic of `model`. A refused topic is an
    /// error that carries the default route, where the requester is told why.
    pub fn reply_route(
        &self,
        response_topic: Option<&str>,
        correlation: Option<&[u8]>,
        reply_to: Option<&str>,
        model: &str,
    ) -> Result<ReplyRoute, RefusedRoute> {
        let v5 = response_topic.is_some() || correlation.is_some();
        let route = |topic: String| ReplyRoute {
            topic,
            correlation: correlation.map(<[u8]>::to_vec),
            v5,
        };
        match response_topic.or(reply_to) {
            None => Ok(route(self.default_reply(model))),
            Some(asked) => match self.check_reply_topic(asked) {
                Ok(()) => Ok(route(asked.to_owned())),
                Err(refusal) => Err(RefusedRoute {
                    refusal,
                    fallback: route(self.default_reply(model)),
                }),
            },
        }
    }
}

/// A topic name MQTT and common brokers accept: 1 to 65,535 bytes of UTF-8 without U+0000, the
/// control characters Mosquitto refuses (U+0001–U+001F, U+007F–U+009F), Unicode
/// non-characters, or the wildcards `+` and `#`.
pub fn check_topic_name(topic: &str) -> Result<(), TopicRefusal> {
    if topic.is_empty() {
        return Err(TopicRefusal::Empty);
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(TopicRefusal::TooLong(topic.len()));
    }
    for c in topic.chars() {
        if c == '+' || c == '#' {
            return Err(TopicRefusal::Wildcard);
        }
        if c.is_control() {
            return Err(TopicRefusal::Control(c));
        }
        if is_noncharacter(c) {
            return Err(TopicRefusal::NonCharacter(c));
        }
    }
    Ok(())
}

/// U+FDD0–U+FDEF and the last two code points of every plane.
fn is_noncharacter(c: char) -> bool {
    let n = u32::from(c);
    (0xFDD0..=0xFDEF).contains(&n) || n & 0xFFFE == 0xFFFE
}

/// Why a reply topic is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRefusal {
    Empty,
    TooLong(usize),
    Wildcard,
    Control(char),
    NonCharacter(char),
    /// Under `$` (broker topics, shared subscriptions).
    Reserved,
    /// One of the agents' own topics under the prefix.
    AgentTopic(&'static str),
    /// Outside `mqtt.reply_topics`.
    NotAllowed,
}

impl std::fmt::Display for TopicRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopicRefusal::Empty => f.write_str("it is empty"),
            TopicRefusal::TooLong(n) => {
                write!(f, "it is {n} bytes, over MQTT's {MAX_TOPIC_BYTES}")
            }
            TopicRefusal::Wildcard => f.write_str("it contains a wildcard (`+` or `#`)"),
            TopicRefusal::Control(c) => write!(
                f,
                "it contains the control character U+{:04X}, which brokers refuse",
                u32::from(*c)
            ),
            TopicRefusal::NonCharacter(c) => write!(
                f,
                "it contains the Unicode non-character U+{:04X}",
                u32::from(*c)
            ),
            TopicRefusal::Reserved => f.write_str("topics starting with `$` belong to the broker"),
            TopicRefusal::AgentTopic(kind) => write!(
                f,
                "it is one of the agents' own topics (`{kind}`), where no reply is published"
            ),
            TopicRefusal::NotAllowed => f.write_str(
                "this agent publishes replies only under the prefixes of mqtt.reply_topics",
            ),
        }
    }
}

/// A refused reply topic, and where the requester is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRoute {
    pub refusal: TopicRefusal,
    pub fallback: ReplyRoute,
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

/// A request's identity for de-duplication: its request topic, its reply topic and its
/// correlation data (MQTT v5) or, without any, its `id`. Two deliveries with the same identity
/// are the same request (a requester's retry, or the broker's redelivery). `None` when the
/// request carries neither correlation data nor an id: it cannot be told from another.
pub fn identity(
    request_topic: &str,
    reply_topic: &str,
    correlation: Option<&[u8]>,
    id: Option<&str>,
) -> Option<[u8; 32]> {
    let (kind, value): (&[u8], &[u8]) = match (correlation, id) {
        (Some(c), _) => (b"c", c),
        (None, Some(id)) => (b"i", id.as_bytes()),
        (None, None) => return None,
    };
    let mut h = Sha256::new();
    for part in [
        request_topic.as_bytes(),
        reply_topic.as_bytes(),
        kind,
        value,
    ] {
        // Length-prefixed, so no two different tuples hash the same bytes.
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    Some(h.finalize())
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
    fn reply_topics_follow_the_rules() {
        let t = Topics::new("tether", "pi-1", None);
        let long = "a".repeat(MAX_TOPIC_BYTES + 1);
        let cases: &[(&str, Result<(), TopicRefusal>)] = &[
            ("my/replies", Ok(())),
            ("clients/ü/réponses", Ok(())),
            ("tether/pi-1/result/digits", Ok(())),
            ("tether/replies/c7", Ok(())),
            ("tetherx/pi-1/config", Ok(())),
            ("", Err(TopicRefusal::Empty)),
            (&long, Err(TopicRefusal::TooLong(MAX_TOPIC_BYTES + 1))),
            ("a/+/b", Err(TopicRefusal::Wildcard)),
            ("a/#", Err(TopicRefusal::Wildcard)),
            ("r\u{0}x", Err(TopicRefusal::Control('\u{0}'))),
            ("r\u{1}x", Err(TopicRefusal::Control('\u{1}'))),
            ("r\u{1f}x", Err(TopicRefusal::Control('\u{1f}'))),
            ("r\u{7f}x", Err(TopicRefusal::Control('\u{7f}'))),
            ("r\u{9f}x", Err(TopicRefusal::Control('\u{9f}'))),
            ("r\u{fdd0}x", Err(TopicRefusal::NonCharacter('\u{fdd0}'))),
            ("r\u{fffe}", Err(TopicRefusal::NonCharacter('\u{fffe}'))),
            ("r\u{1ffff}", Err(TopicRefusal::NonCharacter('\u{1ffff}'))),
            ("$SYS/broker", Err(TopicRefusal::Reserved)),
            ("$share/g/t", Err(TopicRefusal::Reserved)),
            (
                "tether/pi-1/config",
                Err(TopicRefusal::AgentTopic("config")),
            ),
            (
                "tether/pi-1/config/status",
                Err(TopicRefusal::AgentTopic("config")),
            ),
            (
                "tether/pi-1/status",
                Err(TopicRefusal::AgentTopic("status")),
            ),
            (
                "tether/pi-2/telemetry",
                Err(TopicRefusal::AgentTopic("telemetry")),
            ),
            (
                "tether/pi-2/quality",
                Err(TopicRefusal::AgentTopic("quality")),
            ),
            (
                "tether/fleet/lab/rollout",
                Err(TopicRefusal::AgentTopic("fleet")),
            ),
            (
                "tether/pi-1/events/pump",
                Err(TopicRefusal::AgentTopic("events")),
            ),
            (
                "tether/pi-9/infer/digits",
                Err(TopicRefusal::AgentTopic("infer")),
            ),
            (
                "tether/pool/infer/digits",
                Err(TopicRefusal::AgentTopic("infer")),
            ),
            (
                "tether/fleet/lab/config",
                Err(TopicRefusal::AgentTopic("fleet")),
            ),
        ];
        for (topic, want) in cases {
            assert_eq!(
                t.check_reply_topic(topic),
                *want,
                "{:?}",
                topic.chars().take(40).collect::<String>()
            );
        }
        let limited = Topics::new("a/b", "d", None).with_reply_prefixes(vec!["replies/".into()]);
        assert_eq!(limited.check_reply_topic("replies/x"), Ok(()));
        assert_eq!(
            limited.check_reply_topic("other/x"),
            Err(TopicRefusal::NotAllowed)
        );
        assert_eq!(
            limited.check_reply_topic("a/b/d/status"),
            Err(TopicRefusal::AgentTopic("status")),
            "a multi-segment prefix is matched whole"
        );
    }

    #[test]
    fn reply_routing_prefers_the_response_topic_and_refuses_bad_ones() {
        let t = Topics::new("tether", "pi-1", None);
        let default = "tether/pi-1/result/digits";
        let ok = |topic: &str, correlation: Option<&[u8]>, v5| {
            Ok(ReplyRoute {
                topic: topic.to_owned(),
                correlation: correlation.map(<[u8]>::to_vec),
                v5,
            })
        };
        let refused = |refusal, correlation: Option<&[u8]>, v5| {
            Err(RefusedRoute {
                refusal,
                fallback: ReplyRoute {
                    topic: default.to_owned(),
                    correlation: correlation.map(<[u8]>::to_vec),
                    v5,
                },
            })
        };
        let c1: &[u8] = b"c1";
        let cases = [
            (
                Some("resp/1"),
                Some(c1),
                Some("rt/1"),
                ok("resp/1", Some(c1), true),
            ),
            (None, None, Some("rt/1"), ok("rt/1", None, false)),
            (None, None, None, ok(default, None, false)),
            (None, Some(c1), None, ok(default, Some(c1), true)),
            (
                Some("bad/+"),
                None,
                Some("rt/1"),
                refused(TopicRefusal::Wildcard, None, true),
            ),
            (
                None,
                None,
                Some("tether/pi-1/config"),
                refused(TopicRefusal::AgentTopic("config"), None, false),
            ),
            (
                Some(""),
                Some(b"".as_slice()),
                None,
                refused(TopicRefusal::Empty, Some(b"".as_slice()), true),
            ),
        ];
        for (response_topic, corr, reply_to, want) in cases {
            assert_eq!(
                t.reply_route(response_topic, corr, reply_to, "digits"),
                want,
                "{response_topic:?} {reply_to:?}"
            );
        }
    }

    #[test]
    fn identities_need_correlation_data_or_an_id_and_tell_requests_apart() {
        let a = identity("t/infer/m", "r", Some(b"1"), None).unwrap();
        assert_eq!(Some(a), identity("t/infer/m", "r", Some(b"1"), Some("x")));
        assert_ne!(Some(a), identity("t/infer/m", "r", Some(b"2"), None));
        assert_ne!(Some(a), identity("t/infer/m", "r2", Some(b"1"), None));
        assert_ne!(Some(a), identity("t/infer/n", "r", Some(b"1"), None));
        assert_ne!(
            Some(a),
            identity("t/infer/m", "r", None, Some("1")),
            "an id is not correlation data"
        );
        assert_ne!(
            identity("a", "bc", None, Some("d")),
            identity("ab", "c", None, Some("d")),
            "parts do not run into each other"
        );
        assert_eq!(identity("t", "r", None, None), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// Whatever topics a request names, the route chosen is one the rules allow: the asked
        /// topic when it passes, else the default result topic.
        #[test]
        fn every_route_obeys_the_rules(
            response_topic in proptest::option::of("(tether/(pi-1|pi-2|fleet|pool)/)?[a-z$+#/\\x00-\\x1f\\u{7f}-\\u{a0}\\u{fdd0}\\u{fffe}\\u{ffff}]{0,12}(config|status|infer/x|result/x)?"),
            reply_to in proptest::option::of(".{0,20}"),
            correlation in proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8)),
        ) {
            let t = Topics::new("tether", "pi-1", None);
            let asked = response_topic.as_deref().or(reply_to.as_deref());
            match t.reply_route(response_topic.as_deref(), correlation.as_deref(), reply_to.as_deref(), "m") {
                Ok(r) => {
                    proptest::prop_assert!(t.check_reply_topic(&r.topic).is_ok(), "{:?}", r.topic);
                    proptest::prop_assert!(asked.is_none_or(|a| a == r.topic));
                    proptest::prop_assert_eq!(r.correlation, correlation);
                }
                Err(refused) => {
                    proptest::prop_assert!(asked.is_some());
                    proptest::prop_assert_eq!(refused.fallback.topic, "tether/pi-1/result/m");
                    proptest::prop_assert!(t.check_reply_topic(asked.unwrap_or_default()).is_err());
                }
            }
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
