//! The process's exit codes, from sysexits(3), so a service manager can tell a configuration
//! error (restarting will not help: the unit sets `RestartPreventExitStatus=78`) from a
//! failure worth retrying. Pure: a table-tested mapping from the error that stopped the start.

use crate::AgentError;
use crate::config::ConfigErrors;

/// A bad agent.toml, flag or environment value (EX_CONFIG).
pub const CONFIG: u8 = 78;
/// A model file that fails its checksum or does not load (EX_DATAERR).
pub const MODEL: u8 = 65;
/// The database cannot be opened or created (EX_CANTCREAT).
pub const DATABASE: u8 = 73;
/// A port to listen on is taken or refused (EX_UNAVAILABLE): the embedded broker, /metrics.
pub const LISTEN: u8 = 69;
/// Anything else.
pub const OTHER: u8 = 1;

/// The exit code for the error that ended the process.
pub fn code_for(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<ConfigErrors>().is_some() {
        return CONFIG;
    }
    match error.downcast_ref::<AgentError>() {
        Some(AgentError::Models(_)) => MODEL,
        Some(AgentError::Store(_)) => DATABASE,
        Some(AgentError::Broker(crate::broker::BrokerError::NotBuiltIn)) => CONFIG,
        Some(AgentError::Broker(_) | AgentError::Metrics { .. }) => LISTEN,
        _ => OTHER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_start_failure_has_its_code() {
        let cases: Vec<(anyhow::Error, u8)> = vec![
            (
                ConfigErrors(vec!["device_id is empty".into()]).into(),
                CONFIG,
            ),
            (
                anyhow::Error::from(ConfigErrors(vec!["x".into()])).context("while starting"),
                CONFIG,
            ),
            (
                AgentError::Models(models::ModelError::BadRequest("bad".into())).into(),
                MODEL,
            ),
            (
                AgentError::Metrics {
                    addr: "127.0.0.1:9".parse().unwrap_or_else(|_| unreachable!()),
                    source: std::io::Error::other("taken"),
                }
                .into(),
                LISTEN,
            ),
            (
                AgentError::Broker(crate::broker::BrokerError::NotBuiltIn).into(),
                CONFIG,
            ),
            (AgentError::Fleet("no".into()).into(), OTHER),
            (anyhow::anyhow!("something else"), OTHER),
        ];
        for (error, code) in cases {
            assert_eq!(code_for(&error), code, "{error:#}");
        }
    }
}
