//! `[mqtt]`: the broker connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMqtt {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub broker: String,
    /// `v5` (default: response topics, correlation data, shared-subscription pools) or `v311`
    /// for brokers that speak only MQTT 3.1.1 (requesters then use `parameters.reply_to`).
    pub protocol: Protocol,
    /// Default: `tether-{device_id}`. Must be stable across restarts for the persistent session.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Read the password from this file instead (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle that signs the broker's certificate (mqtts).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub keep_alive_secs: u64,
    /// How long the broker keeps our session (and queues QoS 1 requests) while we are away.
    pub session_expiry_secs: u32,
    /// Requests larger than this get a `bad_request` reply without being parsed.
    pub max_payload_bytes: usize,
    /// Reconnect backoff: first delay and cap, in milliseconds (exponential, with jitter).
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// When set, replies are published only on topics starting with one of these prefixes
    /// (for example `["replies/"]`); a request naming another reply topic gets `bad_request`.
    pub reply_topics: Vec<String>,
}

impl Default for RawMqtt {
    fn default() -> Self {
        RawMqtt {
            broker: "mqtt://127.0.0.1:1883".into(),
            protocol: Protocol::V5,
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keep_alive_secs: 30,
            session_expiry_secs: 3600,
            max_payload_bytes: 4 * 1024 * 1024,
            reconnect_min_ms: 200,
            reconnect_max_ms: 30_000,
            reply_topics: Vec::new(),
        }
    }
}

/// The MQTT protocol version the agent speaks to its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    V5,
    V311,
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    pub tls: Option<TlsConfig>,
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    pub keep_alive: Duration,
    pub session_expiry_secs: u32,
    pub max_payload_bytes: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub reply_topics: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub roots: Roots,
    /// PEM certificate chain and private key, for mutual TLS.
    pub client_auth: Option<(Vec<u8>, Vec<u8>)>,
}

/// Whom the broker's certificate must chain to.
#[derive(Debug, Clone)]
pub enum Roots {
    /// The PEM bundle of `mqtt.ca_file`.
    CaFile(Vec<u8>),
    /// The system's root certificates (`SSL_CERT_FILE`/`SSL_CERT_DIR`, else the distribution's
    /// store, as `rustls-native-certs` finds them), read at start-up, DER-encoded.
    System(Vec<Vec<u8>>),
}

/// A PEM certificate chain and private key, parsed; or why they cannot be used.
pub fn client_auth_der(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("mqtt.client_cert holds no readable PEM certificate ({e})"))?;
    if chain.is_empty() {
        return Err("mqtt.client_cert holds no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("mqtt.client_key holds no readable PEM private key ({e})"))?;
    Ok((chain, key))
}

/// The system's root certificates, or a sentence saying none were found.
fn system_roots() -> Result<Vec<Vec<u8>>, String> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "A system root certificate could not be read.");
    }
    if found.certs.is_empty() {
        return Err(format!(
            "mqtt.broker is mqtts:// without mqtt.ca_file, and no system root certificates were found ({}): install the ca-certificates package, or name the PEM CA that signs the broker in mqtt.ca_file",
            found
                .errors
                .first()
                .map_or_else(|| "the store is empty".to_owned(), ToString::to_string)
        ));
    }
    Ok(found.certs.into_iter().map(|c| c.to_vec()).collect())
}

impl RawMqtt {
    pub(super) fn validate(&self, device_id: &str, errors: &mut Vec<String>) -> Option<MqttConfig> {
        let m = self;
        let url = match url::Url::parse(&m.broker) {
            Ok(url) => Some(url),
            Err(e) => {
                errors.push(format!("mqtt.broker `{}` is not a URL ({e}); write mqtt://host:port or mqtts://host:port", m.broker));
                None
            }
        };
        let mut tls_wanted = false;
        let mut host_port = None;
        if let Some(url) = &url {
            match url.scheme() {
                "mqtt" | "tcp" => {}
                "mqtts" | "ssl" => tls_wanted = true,
                other => errors.push(format!(
                    "mqtt.broker has scheme `{other}`; use mqtt:// or mqtts://"
                )),
            }
            match url.host_str() {
                Some(host) if !host.is_empty() => {
                    let port = url.port().unwrap_or(if tls_wanted { 8883 } else { 1883 });
                    host_port = Some((host.trim_matches(['[', ']']).to_owned(), port));
                }
                _ => errors.push(format!("mqtt.broker `{}` names no host", m.broker)),
            }
        }
        let read = |what: &str, p: &Path, errors: &mut Vec<String>| match std::fs::read(p) {
            Ok(b) => Some(b),
            Err(e) => {
                errors.push(format!("mqtt.{what} {}: {e}", p.display()));
                None
            }
        };
        let tls = if tls_wanted {
            let roots = match &m.ca_file {
                Some(p) => read("ca_file", p, errors).map(Roots::CaFile),
                None => system_roots()
                    .map_err(|e| errors.push(e))
                    .ok()
                    .map(Roots::System),
            };
            let client_auth = match (&m.client_cert, &m.client_key) {
                (Some(c), Some(k)) => {
                    read("client_cert", c, errors).zip(read("client_key", k, errors))
                }
                (None, None) => None,
                _ => {
                    errors.push(
                        "mqtt.client_cert and mqtt.client_key go together: set both for mutual TLS"
                            .into(),
                    );
                    None
                }
            };
            if let Some((cert, key)) = &client_auth
                && let Err(e) = client_auth_der(cert, key)
            {
                errors.push(e);
            }
            roots.map(|roots| TlsConfig { roots, client_auth })
        } else {
            if m.ca_file.is_some() || m.client_cert.is_some() {
                errors.push("mqtt.ca_file and mqtt.client_cert need an mqtts:// broker".into());
            }
            None
        };
        let password = match (&m.password, &m.password_file) {
            (Some(_), Some(_)) => {
                errors.push("set mqtt.password or mqtt.password_file, not both".into());
                None
            }
            (Some(p), None) => Some(p.clone()),
            (None, Some(f)) => match std::fs::read_to_string(f) {
                Ok(s) => Some(s.trim_end_matches(['\n', '\r']).to_owned()),
                Err(e) => {
                    errors.push(format!("mqtt.password_file {}: {e}", f.display()));
                    None
                }
            },
            (None, None) => None,
        };
        let credentials = match (&m.username, password) {
            (Some(u), p) => Some((u.clone(), p.unwrap_or_default())),
            (None, Some(_)) => {
                errors.push("mqtt.password is set without mqtt.username".into());
                None
            }
            (None, None) => None,
        };
        if !(1..=65_535).contains(&m.keep_alive_secs) {
            errors.push(format!(
                "mqtt.keep_alive_secs is {}; use 1 to 65535",
                m.keep_alive_secs
            ));
        }
        if m.max_payload_bytes < 1024 || m.max_payload_bytes > 256 * 1024 * 1024 {
            errors.push(format!(
                "mqtt.max_payload_bytes is {}; use 1024 to 268435456",
                m.max_payload_bytes
            ));
        }
        if m.reconnect_min_ms == 0 || m.reconnect_min_ms > m.reconnect_max_ms {
            errors.push(format!(
                "mqtt.reconnect_min_ms ({}) must be positive and at most mqtt.reconnect_max_ms ({})",
                m.reconnect_min_ms, m.reconnect_max_ms
            ));
        }
        for p in &m.reply_topics {
            if p.is_empty() || p.contains(['+', '#', '\0']) || p.starts_with('$') {
                errors.push(format!(
                    "mqtt.reply_topics entry `{p}` must be a topic prefix without wildcards, NUL or a leading `$`"
                ));
            }
        }
        let client_id = m
            .client_id
            .clone()
            .unwrap_or_else(|| format!("tether-{device_id}"));
        if client_id.is_empty() || client_id.len() > 128 {
            errors.push("mqtt.client_id must be 1 to 128 characters".into());
        }
        let (host, port) = host_port?;
        if tls_wanted && tls.is_none() {
            return None;
        }
        Some(MqttConfig {
            protocol: m.protocol,
            host,
            port,
            tls,
            client_id,
            credentials,
            keep_alive: Duration::from_secs(m.keep_alive_secs),
            session_expiry_secs: m.session_expiry_secs,
            max_payload_bytes: m.max_payload_bytes,
            reconnect_min: Duration::from_millis(m.reconnect_min_ms),
            reconnect_max: Duration::from_millis(m.reconnect_max_ms),
            reply_topics: m.reply_topics.clone(),
        })
    }
}
