//! Model files for fleet updates: downloaded into the agent's model directory, resumed where an
//! interrupted transfer stopped (`Range`), written to `NAME-SHA.onnx.part`, hashed while they
//! are written and renamed only once verified. Files already present (a previous version, kept
//! for rollback) are reused without a download.
//!
//! Everything a server sends is untrusted: the declared size (`bytes`, required in the
//! document) is checked against the free disk space before anything is written and enforced
//! while streaming, a download as a whole has a deadline (`fleet.download_timeout_secs`) and
//! stops when the agent stops, an error body is read only up to a few hundred bytes, and files
//! are never read whole into memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use models::sha256::Sha256;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::Rejection;
use super::doc::{ModelUpdate, check_url};
use crate::config::is_plain_name;

/// Attempts per download; each one resumes where the previous one stopped.
const ATTEMPTS: u32 = 5;
/// The pause after the first failed attempt, doubled after each (and capped).
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(30);
/// How much of an error body is quoted back.
const ERROR_BODY_CHARS: usize = 200;

/// How a [`Fetcher`] downloads.
#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// Bytes that must stay free after a download (the database and its outbox need room).
    pub reserve_bytes: u64,
    /// Plain `http://` URLs are refused unless this is set.
    pub allow_http: bool,
    /// One download, every attempt and pause included.
    pub timeout: Duration,
}

/// Fetches model files into one directory.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    dir: PathBuf,
    limits: FetchLimits,
    /// The relay's origin and the device's token for it: sent only to that origin.
    relay: Option<(url::Url, String)>,
    /// Cancelled when the agent stops: a download in progress gives up at once.
    stop: CancellationToken,
}

impl Fetcher {
    pub fn new(
        dir: PathBuf,
        limits: FetchLimits,
        relay: Option<(url::Url, String)>,
        relay_ca: Option<&[u8]>,
        stop: CancellationToken,
    ) -> Result<Fetcher, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(30));
        // Model files come from the relay (its CA, `relay.ca_file`) or from anywhere public
        // (the system's roots): both are trusted.
        if let Some(pem) = relay_ca {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("relay.ca_file holds no readable PEM certificate: {e}"))?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot set up the HTTP client for model downloads: {e}"))?;
        Ok(Fetcher {
            client,
            dir,
            limits,
            relay,
            stop,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a verified file for this update lives. Both parts come from a document: the name
    /// must be a plain name (checked when the document is validated) and only hex digits of
    /// the checksum are used, so the path stays inside the model directory whatever they hold.
    pub fn path_for(&self, name: &str, sha256: &str) -> PathBuf {
        let short: String = sha256
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(16)
            .collect::<String>()
            .to_ascii_lowercase();
        let name = if is_plain_name(name) { name } else { "model" };
        self.dir.join(format!("{name}-{short}.onnx"))
    }

    /// The verified file for `update`, downloading it unless it is already here.
    pub async fn fetch(&self, name: &str, update: &ModelUpdate) -> Result<PathBuf, Rejection> {
        if !is_plain_name(name) {
            return Err(Rejection::Invalid(format!(
                "`{}` is not a model name: use letters, digits, `.`, `_` and `-`",
                name.escape_debug()
            )));
        }
        let url = check_url(&update.url, self.limits.allow_http).map_err(Rejection::Invalid)?;
        let timeout = self.limits.timeout;
        tokio::select! {
            biased;
            () = self.stop.cancelled() => Err(Rejection::Download(format!(
                "the download of model `{name}` stopped because the agent is stopping (the partial file is kept to resume)"
            ))),
            r = tokio::time::timeout(timeout, self.fetch_now(name, update, &url)) => r.unwrap_or_else(|_| {
                Err(Rejection::Download(format!(
                    "the download of model `{name}` from {url} did not finish within {} s (fleet.download_timeout_secs); the partial file is kept to resume",
                    timeout.as_secs()
                )))
            }),
        }
    }

    async fn fetch_now(
        &self,
        name: &str,
        update: &ModelUpdate,
        url: &url::Url,
    ) -> Result<PathBuf, Rejection> {
        let path = self.path_for(name, &update.sha256);
        if let Ok(Some(sha)) = hash_file(&path).await
            && sha.eq_ignore_ascii_case(&update.sha256)
        {
            tracing::info!(model = name, path = %path.display(), "Model file already here; no download.");
            return Ok(path);
        }
        tokio::fs::create_dir_all(&self.dir).await.map_err(|e| {
            Rejection::Download(format!(
                "cannot create the model directory {}: {e}",
                self.dir.display()
            ))
        })?;
        let part = path.with_extension("onnx.part");
        let mut last_error = String::new();
        let mut pause = FIRST_PAUSE;
        for attempt in 1..=ATTEMPTS {
            match self.attempt(name, update, url, &part).await {
                Ok(sha) => {
                    return self
                        .verify_and_rename(name, update, sha, &part, &path)
                        .await;
                }
                Err(Attempt::Fatal(r)) => {
                    let _ = tokio::fs::remove_file(&part).await;
                    return Err(r);
                }
                Err(Attempt::Retry(e)) => {
                    last_error = e;
                    if attempt < ATTEMPTS {
                        tracing::warn!(model = name, attempt, error = %last_error, pause_ms = pause.as_millis(), "Model download interrupted; resuming after a pause.");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_PAUSE);
                    }
                }
            }
        }
        Err(Rejection::Download(format!(
            "cannot download model `{name}` from {url}: {last_error} (after {ATTEMPTS} attempts; the partial file is kept to resume)"
        )))
    }

    /// One request: appends to the partial file and returns the sha256 of the whole file.
    async fn attempt(
        &self,
        name: &str,
        update: &ModelUpdate,
        url: &url::Url,
        part: &Path,
    ) -> Result<String, Attempt> {
        let declared = update.bytes;
        let mut have = tokio::fs::metadata(part).await.map_or(0, |m| m.len());
        if have > declared {
            let _ = tokio::fs::remove_file(part).await;
            have = 0;
        }
        // What is already there is hashed from disk, in pieces, so the new bytes only extend it.
        let mut hasher = Sha256::new();
        if have > 0 {
            hasher = hash_into(part, hasher)
                .await
                .map_err(|e| Attempt::Retry(format!("cannot read {}: {e}", part.display())))?;
        }
        if have == declared {
            return Ok(hex::encode(hasher.finalize()));
        }
        let mut request = self.client.get(url.clone());
        if have > 0 {
            request = request.header(RANGE, format!("bytes={have}-"));
        }
        if let Some((origin, token)) = &self.relay
            && url.origin() == origin.origin()
        {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let mut response = request.send().await.map_err(|e| {
            if have == 0 && (e.is_connect() || e.is_builder()) {
                Attempt::Fatal(Rejection::Download(format!(
                    "the model URL {url} cannot be reached: {}",
                    error_chain(&e)
                )))
            } else {
                Attempt::Retry(error_chain(&e))
            }
        })?;
        let status = response.status();
        let resume_from = match status {
            StatusCode::PARTIAL_CONTENT if have > 0 => {
                let starts_at = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if starts_at != Some(have) {
                    let _ = tokio::fs::remove_file(part).await;
                    return Err(Attempt::Retry(
                        "the server resumed at another offset; starting over".into(),
                    ));
                }
                have
            }
            StatusCode::OK => {
                hasher = Sha256::new();
                0
            }
            StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
                let _ = tokio::fs::remove_file(part).await;
                return Err(Attempt::Retry(
                    "the server cannot resume this file; starting over".into(),
                ));
            }
            s => {
                let body = error_body(&mut response).await;
                return Err(Attempt::Fatal(Rejection::Download(format!(
                    "the model URL {url} answered {s}: {body}"
                ))));
            }
        };
        if let Some(remaining) = content_length(&response)
            && resume_from.checked_add(remaining) != Some(declared)
        {
            return Err(Attempt::Fatal(Rejection::Checksum(format!(
                "model `{name}` at {url} is {} bytes, not the {declared} the document says",
                resume_from.saturating_add(remaining)
            ))));
        }
        let to_write = declared.saturating_sub(resume_from);
        self.check_space(name, to_write).map_err(Attempt::Fatal)?;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(resume_from > 0)
            .write(true)
            .truncate(resume_from == 0)
            .open(part)
            .await
            .map_err(|e| {
                Attempt::Fatal(Rejection::Download(format!(
                    "cannot write {}: {e}",
                    part.display()
                )))
            })?;
        if resume_from > 0 {
            tracing::info!(
                model = name,
                from = resume_from,
                total = declared,
                "Resuming the model download."
            );
        }
        let mut done = resume_from;
        let mut last_log = Instant::now();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| Attempt::Retry(error_chain(&e)))?
        {
            let len = u64::try_from(chunk.len()).unwrap_or(u64::MAX);
            done = match done.checked_add(len).filter(|d| *d <= declared) {
                Some(d) => d,
                None => {
                    return Err(Attempt::Fatal(Rejection::Checksum(format!(
                        "model `{name}` at {url} sent more than the {declared} bytes the document says; the file was discarded"
                    ))));
                }
            };
            file.write_all(&chunk).await.map_err(|e| {
                Attempt::Fatal(Rejection::NoSpace(format!(
                    "cannot write the model file {}: {e}",
                    part.display()
                )))
            })?;
            hasher.update(&chunk);
            if last_log.elapsed() >= Duration::from_secs(2) {
                last_log = Instant::now();
                let percent = done.saturating_mul(100) / declared.max(1);
                tracing::info!(
                    model = name,
                    bytes = done,
                    total = declared,
                    percent,
                    "Downloading model."
                );
            }
        }
        file.flush()
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        file.sync_all()
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        if done < declared {
            return Err(Attempt::Retry(format!(
                "the connection ended after {done} of {declared} bytes"
            )));
        }
        tracing::info!(model = name, bytes = done, "Model downloaded.");
        Ok(hex::encode(hasher.finalize()))
    }

    async fn verify_and_rename(
        &self,
        name: &str,
        update: &ModelUpdate,
        actual: String,
        part: &Path,
        path: &Path,
    ) -> Result<PathBuf, Rejection> {
        if !actual.eq_ignore_ascii_case(&update.sha256) {
            let _ = tokio::fs::remove_file(part).await;
            return Err(Rejection::Checksum(format!(
                "model `{name}` from {} has sha256 {actual}, not the {} the document says; the file was discarded",
                update.url, update.sha256
            )));
        }
        tokio::fs::rename(part, path).await.map_err(|e| {
            Rejection::Download(format!(
                "cannot move the model into {}: {e}",
                path.display()
            ))
        })?;
        Ok(path.to_path_buf())
    }

    /// Refuses a download of `bytes` that would leave less than the reserve free.
    fn check_space(&self, name: &str, bytes: u64) -> Result<(), Rejection> {
        let Some(free) = free_bytes(&self.dir) else {
            return Ok(());
        };
        let reserve = self.limits.reserve_bytes;
        if free < bytes.saturating_add(reserve) {
            return Err(Rejection::NoSpace(format!(
                "not enough disk for model `{name}`: it needs {bytes} bytes and {reserve} must stay free (fleet.reserve_bytes), but {} has {free} bytes free",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Deletes model files no longer wanted, keeping those in `keep` (in use, or the last good
    /// configuration's, for rollback).
    pub fn prune(&self, keep: &[PathBuf]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let is_model = p.extension().is_some_and(|x| x == "onnx");
            if is_model && !keep.iter().any(|k| k == &p) {
                match std::fs::remove_file(&p) {
                    Ok(()) => {
                        tracing::info!(path = %p.display(), "Removed a model file no configuration uses.")
                    }
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "Cannot remove an unused model file.")
                    }
                }
            }
        }
    }
}

/// The sha256 of a file, read in pieces; `None` when it does not exist.
async fn hash_file(path: &Path) -> std::io::Result<Option<String>> {
    match tokio::fs::metadata(path).await {
        Ok(_) => Ok(Some(hex::encode(
            hash_into(path, Sha256::new()).await?.finalize(),
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// `hasher` fed with the whole file, read 64 KiB at a time on a blocking thread.
async fn hash_into(path: &Path, mut hasher: Sha256) -> std::io::Result<Sha256> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(hasher);
            }
            hasher.update(buf.get(..n).unwrap_or_default());
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The start of an error response's body, for the message (never the whole of it).
async fn error_body(response: &mut reqwest::Response) -> String {
    let mut text = String::new();
    while text.len() < ERROR_BODY_CHARS {
        match response.chunk().await {
            Ok(Some(c)) => text.push_str(&String::from_utf8_lossy(&c)),
            Ok(None) | Err(_) => break,
        }
    }
    text.chars().take(ERROR_BODY_CHARS).collect()
}

enum Attempt {
    /// Worth resuming.
    Retry(String),
    /// Final: the document is refused.
    Fatal(Rejection),
}

fn content_length(r: &reqwest::Response) -> Option<u64> {
    r.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// Free bytes for an unprivileged writer on the file system holding `dir` (or its nearest
/// existing parent).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let mut p = Some(dir);
    while let Some(d) = p {
        if let Ok(s) = rustix::fs::statvfs(d) {
            return Some(s.f_bavail.saturating_mul(s.f_frsize));
        }
        p = d.parent();
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A raw HTTP file server that honours `Range` and cuts the first `cuts` transfers
    /// halfway by closing the socket: what a flaky link does.
    async fn server(data: Arc<Vec<u8>>, cuts: usize) -> (String, Arc<AtomicUsize>) {
        use tokio::io::AsyncReadExt;
        let ranged = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = ranged.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => len += k,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..len]).to_lowercase();
                let start = head
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|v| v.trim().trim_end_matches('-').parse::<usize>().ok())
                    .unwrap_or(0);
                let total = data.len();
                let mut out = if start > 0 {
                    r.fetch_add(1, Ordering::SeqCst);
                    format!(
                        "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{total}\r\nconnection: close\r\n\r\n",
                        total - start,
                        total - 1
                    )
                } else {
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\nconnection: close\r\n\r\n")
                }
                .into_bytes();
                let body = &data[start..];
                if n < cuts {
                    out.extend_from_slice(&body[..body.len() / 2]);
                } else {
                    out.extend_from_slice(body);
                }
                n += 1;
                let _ = sock.write_all(&out).await;
                let _ = sock.shutdown().await;
            }
        });
        (format!("http://{addr}/m.onnx"), ranged)
    }

    fn fetcher(dir: &Path, reserve_bytes: u64, timeout: Duration) -> Fetcher {
        let limits = FetchLimits {
            reserve_bytes,
            allow_http: true,
            timeout,
        };
        Fetcher::new(
            dir.to_path_buf(),
            limits,
            None,
            None,
            CancellationToken::new(),
        )
        .unwrap()
    }

    /// A raw HTTP server answering every request with `head` and then `body`, written `step`
    /// bytes at a time with `pause` between writes: a server that lies about sizes, or a
    /// trickle.
    async fn scripted(head: &'static str, body: Vec<u8>, step: usize, pause: Duration) -> String {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut len = 0;
                    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf[len..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => len += k,
                        }
                    }
                    if sock.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    for piece in body.chunks(step.max(1)) {
                        if sock.write_all(piece).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(pause).await;
                    }
                    let _ = sock.shutdown().await;
                });
            }
        });
        format!("http://{addr}/m.onnx")
    }

    fn update(url: &str, data: &[u8]) -> ModelUpdate {
        ModelUpdate {
            version: "2".into(),
            sha256: models::manifest::sha256_hex(data),
            url: url.into(),
            bytes: u64::try_from(data.len()).unwrap(),
            spec: None,
        }
    }

    #[tokio::test]
    async fn an_interrupted_download_resumes_and_verifies() {
        let data: Arc<Vec<u8>> = Arc::new((0..200_000u32).map(|i| (i % 251) as u8).collect());
        let (url, ranged) = server(data.clone(), 1).await;
        let dir = crate::test_scratch_dir("fetch");
        let f = fetcher(&dir, 0, Duration::from_secs(60));
        let u = update(&url, &data);
        let path = f.fetch("m", &u).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), *data);
        assert_eq!(
            ranged.load(Ordering::SeqCst),
            1,
            "the second attempt resumed"
        );
        assert!(!path.with_extension("onnx.part").exists());
        // Present and verified: no second download.
        let again = f.fetch("m", &u).await.unwrap();
        assert_eq!(again, path);
    }

    #[tokio::test]
    async fn wrong_sha_unreachable_and_no_space_are_refused() {
        let data: Arc<Vec<u8>> = Arc::new(vec![7u8; 10_000]);
        let (url, _) = server(data.clone(), 0).await;
        let dir = crate::test_scratch_dir("fetch-bad");
        let f = fetcher(&dir, 0, Duration::from_secs(60));
        let mut u = update(&url, &data);
        u.sha256 = "ab".repeat(32);
        let err = f.fetch("m", &u).await.unwrap_err();
        assert!(matches!(err, Rejection::Checksum(_)), "{err:?}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "nothing left behind"
        );

        let dead = update("http://127.0.0.1:9/m.onnx", &data);
        let err = f.fetch("m", &dead).await.unwrap_err();
        assert!(matches!(err, Rejection::Download(_)), "{err:?}");

        let full = fetcher(&dir, u64::MAX / 2, Duration::from_secs(60));
        let err = full.fetch("m", &update(&url, &data)).await.unwrap_err();
        let Rejection::NoSpace(m) = err else {
            panic!("{err:?}")
        };
        assert!(m.contains("not enough disk"), "{m}");
    }

    #[tokio::test]
    async fn a_body_longer_than_declared_is_cut_off_and_discarded() {
        // No Content-Length, and far more bytes than the document declares: writing stops at
        // the declared size and nothing is left behind.
        let data = vec![1u8; 1000];
        let flood = vec![1u8; 1 << 20];
        let url = scripted(
            "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n",
            flood,
            16 << 10,
            Duration::ZERO,
        )
        .await;
        let dir = crate::test_scratch_dir("fetch-long");
        let f = fetcher(&dir, 0, Duration::from_secs(60));
        let err = f.fetch("m", &update(&url, &data)).await.unwrap_err();
        let Rejection::Checksum(m) = &err else {
            panic!("{err:?}")
        };
        assert!(m.contains("more than the 1000 bytes"), "{m}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "nothing left behind"
        );

        // A Content-Length that disagrees with the document is refused before the body.
        let url = scripted(
            "HTTP/1.1 200 OK\r\ncontent-length: 999999999\r\nconnection: close\r\n\r\n",
            vec![0u8; 10],
            10,
            Duration::ZERO,
        )
        .await;
        let err = f.fetch("m", &update(&url, &data)).await.unwrap_err();
        assert!(matches!(err, Rejection::Checksum(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_trickle_is_stopped_at_the_deadline_and_a_stop_ends_a_download() {
        let data = vec![2u8; 4000];
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 4000\r\nconnection: close\r\n\r\n";
        let url = scripted(head, data.clone(), 10, Duration::from_millis(200)).await;
        let dir = crate::test_scratch_dir("fetch-slow");
        let f = fetcher(&dir, 0, Duration::from_millis(700));
        let err = f.fetch("m", &update(&url, &data)).await.unwrap_err();
        let Rejection::Download(m) = &err else {
            panic!("{err:?}")
        };
        assert!(m.contains("did not finish within"), "{m}");

        let stop = CancellationToken::new();
        let limits = FetchLimits {
            reserve_bytes: 0,
            allow_http: true,
            timeout: Duration::from_secs(600),
        };
        let f = Fetcher::new(dir.clone(), limits, None, None, stop.clone()).unwrap();
        let u = update(&url, &data);
        let task = tokio::spawn(async move { f.fetch("m", &u).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
        let err = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the download ended on stop")
            .unwrap()
            .unwrap_err();
        assert!(err.message().contains("stopping"), "{err:?}");
    }

    #[tokio::test]
    async fn plain_http_unsafe_names_and_odd_checksums_are_refused_without_a_request() {
        let dir = crate::test_scratch_dir("fetch-names");
        let limits = FetchLimits {
            reserve_bytes: 0,
            allow_http: false,
            timeout: Duration::from_secs(5),
        };
        let f = Fetcher::new(dir.clone(), limits, None, None, CancellationToken::new()).unwrap();
        let data = [0u8; 4];
        let err = f
            .fetch("m", &update("http://127.0.0.1:9/m.onnx", &data))
            .await
            .unwrap_err();
        assert!(err.message().contains("fleet.allow_http"), "{err:?}");
        for name in ["../../x", "a/b", ".hidden", "", "x\0y", "é"] {
            let err = f
                .fetch(name, &update("https://127.0.0.1:9/m.onnx", &data))
                .await
                .unwrap_err();
            assert!(matches!(err, Rejection::Invalid(_)), "{name:?}: {err:?}");
        }
        // Whatever a document's checksum holds, the path stays a plain file in the directory
        // (and nothing panics on multi-byte characters).
        for sha in ["ééééééééééééééééé", "../../../../etc/passwd", ""] {
            let p = f.path_for("m", sha);
            assert_eq!(p.parent(), Some(dir.as_path()), "{sha}");
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }
}
