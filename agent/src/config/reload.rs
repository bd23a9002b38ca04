//! What a reload of agent.toml (SIGHUP) may change while the agent runs: pure, and tested by
//! a table. The keys that differ between two configurations are split into those the live
//! swap applies (the same swap fleet documents use: routing policy, cache rules and bounds,
//! outbox bounds, the telemetry interval) and those that only a restart applies (the broker,
//! the workers, the database, ...), which are reported and left as they were.

use super::RawConfig;

/// The keys that differ, each as its dotted path (`policy.default_budget_ms`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Applied by the live swap.
    pub live: Vec<String>,
    /// Left as they were until a restart.
    pub restart: Vec<String>,
}

/// Key prefixes the live swap applies.
const LIVE: &[&str] = &[
    "policy.",
    "store.cache.",
    "store.outbox.",
    "fleet.telemetry_interval_secs",
];

/// Whether the live swap applies `key`.
pub fn is_live(key: &str) -> bool {
    LIVE.iter().any(|p| match p.strip_suffix('.') {
        Some(section) => key == section || key.starts_with(p),
        None => key == *p,
    })
}

/// The keys that differ between `old` and `new`, split by what applies them.
pub fn changes(old: &RawConfig, new: &RawConfig) -> Changes {
    let (Ok(a), Ok(b)) = (toml::Value::try_from(old), toml::Value::try_from(new)) else {
        return Changes {
            live: Vec::new(),
            restart: vec!["(the configuration could not be compared)".into()],
        };
    };
    let mut keys = Vec::new();
    diff("", Some(&a), Some(&b), &mut keys);
    let (live, restart) = keys.into_iter().partition(|k| is_live(k));
    Changes { live, restart }
}

fn diff(path: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
    match (a, b) {
        (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
            let names: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for name in names {
                let child = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                diff(&child, x.get(name), y.get(name), out);
            }
        }
        (x, y) if x == y => {}
        _ => out.push(path.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn changes_are_split_into_live_and_restart() {
        let base = "device_id = \"a\"\n[policy]\ndefault_budget_ms = 1000\n";
        let cases: &[(&str, &str, &[&str], &[&str])] = &[
            ("same file", base, &[], &[]),
            (
                "a policy value",
                "device_id = \"a\"\n[policy]\ndefault_budget_ms = 50\n",
                &["policy.default_budget_ms"],
                &[],
            ),
            (
                "a per-model policy added",
                "device_id = \"a\"\n[policy]\ndefault_budget_ms = 1000\n[policy.models.digits]\nbudget_ms = 5\n",
                &["policy.models.digits"],
                &[],
            ),
            (
                "cache rules and outbox bounds",
                "device_id = \"a\"\n[policy]\ndefault_budget_ms = 1000\n[store.cache]\nttl_secs = 5\n[store.outbox]\nmax_rows = 10\n",
                &["store.cache.ttl_secs", "store.outbox.max_rows"],
                &[],
            ),
            (
                "the broker and the workers need a restart",
                "device_id = \"a\"\n[mqtt]\nbroker = \"mqtt://b:1883\"\n[inference]\nworkers = 1\n[policy]\ndefault_budget_ms = 1000\n",
                &[],
                &["inference.workers", "mqtt.broker"],
            ),
            (
                "the device id too",
                "device_id = \"b\"\n[policy]\ndefault_budget_ms = 1000\n",
                &[],
                &["device_id"],
            ),
            (
                "a relay added",
                "device_id = \"a\"\n[policy]\ndefault_budget_ms = 1000\n[relay]\nurl = \"http://r\"\n",
                &[],
                &["relay"],
            ),
            (
                "the telemetry interval, not the groups",
                "device_id = \"a\"\n[policy]\ndefault_budget_ms = 1000\n[fleet]\ntelemetry_interval_secs = 5\ngroups = [\"lab\"]\n",
                &["fleet.telemetry_interval_secs"],
                &["fleet.groups"],
            ),
        ];
        for (what, new, live, restart) in cases {
            let c = changes(&raw(base), &raw(new));
            assert_eq!(c.live, *live, "{what}");
            assert_eq!(c.restart, *restart, "{what}");
        }
    }

    #[test]
    fn live_prefixes_match_whole_keys() {
        assert!(is_live("policy.mode"));
        assert!(is_live("fleet.telemetry_interval_secs"));
        assert!(!is_live("policyx"));
        assert!(!is_live("store.path"));
        assert!(!is_live("fleet.telemetry_interval_secs_extra"));
    }
}
