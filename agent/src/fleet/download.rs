//! Model files for fleet updates: downloaded into the agent's model directory, resumed where an
//! interrupted transfer stopped (`Range`), checked against the free disk space first and the
//! sha256 last, written to `NAME-SHA.onnx.part` and renamed only once verified. Files already
//! present (a previous version, kept for rollback) are reused without a download.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::Rejection;
use super::doc::ModelUpdate;

/// Attempts per download; each one resumes where the previous one stopped.
const ATTEMPTS: u32 = 4;

/// Fetches model files into one directory.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    dir: PathBuf,
    /// Bytes that must stay free after a download (the database and its outbox need room).
    reserve_bytes: u64,
    /// The relay's origin and the device's token for it: sent only to that origin.
    relay: Option<(url::Url, String)>,
}

impl Fetcher {
    pub fn new(
        dir: PathBuf,
        reserve_bytes: u64,
        relay: Option<(url::Url, String)>,
    ) -> Result<Fetcher, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot set up the HTTP client for model downloads: {e}"))?;
        Ok(Fetcher {
            client,
            dir,
            reserve_bytes,
            relay,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a verified file for this update lives.
    pub fn path_for(&self, name: &str, sha256: &str) -> PathBuf {
        let short = &sha256[..sha256.len().min(16)];
        self.dir.join(format!("{name}-{short}.onnx"))
    }

    /// The verified file for `update`, downloading it unless it is already here.
    pub async fn fetch(&self, name: &str, update: &ModelUpdate) -> Result<PathBuf, Rejection> {
        let path = self.path_for(name, &update.sha256);
        if let Ok(bytes) = tokio::fs::read(&path).await
            && models::manifest::sha256_hex(&bytes).eq_ignore_ascii_case(&update.sha256)
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
        for attempt in 1..=ATTEMPTS {
            match self.attempt(name, update, &part).await {
                Ok(()) => {
                    return self.verify_and_rename(name, update, &part, &path).await;
                }
                Err(Attempt::Fatal(r)) => {
                    let _ = tokio::fs::remove_file(&part).await;
                    return Err(r);
                }
                Err(Attempt::Retry(e)) => {
                    tracing::warn!(model = name, attempt, error = %e, "Model download interrupted; resuming.");
                    last_error = e;
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
            }
        }
        Err(Rejection::Download(format!(
            "cannot download model `{name}` from {}: {last_error} (after {ATTEMPTS} attempts; the partial file is kept to resume)",
            update.url
        )))
    }

    async fn attempt(&self, name: &str, update: &ModelUpdate, part: &Path) -> Result<(), Attempt> {
        let have = tokio::fs::metadata(part).await.map_or(0, |m| m.len());
        let mut request = self.client.get(&update.url);
        if have > 0 {
            request = request.header(RANGE, format!("bytes={have}-"));
        }
        if let Some((origin, token)) = &self.relay
            && let Ok(url) = url::Url::parse(&update.url)
            && url.origin() == origin.origin()
        {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = request.send().await.map_err(|e| {
            if have == 0 && (e.is_connect() || e.is_builder()) {
                Attempt::Fatal(Rejection::Download(format!(
                    "the model URL {} cannot be reached: {}",
                    update.url,
                    error_chain(&e)
                )))
            } else {
                Attempt::Retry(error_chain(&e))
            }
        })?;
        let status = response.status();
        let (resume_from, remaining) = match status {
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
                (have, content_length(&response))
            }
            StatusCode::OK => (0, content_length(&response)),
            StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
                // The partial file is as long as the whole (or longer): check it as it is.
                return Ok(());
            }
            s => {
                let body = response.text().await.unwrap_or_default();
                return Err(Attempt::Fatal(Rejection::Download(format!(
                    "the model URL {} answered {s}: {}",
                    update.url,
                    body.chars().take(200).collect::<String>()
                ))));
            }
        };
        let total = remaining.map(|r| r + resume_from).or(update.bytes);
        if let Some(total) = total
            && let Some(b) = update.bytes
            && b != total
        {
            return Err(Attempt::Fatal(Rejection::Checksum(format!(
                "model `{name}` at {} is {total} bytes, not the {b} the document says",
                update.url
            ))));
        }
        self.check_space(name, total.map_or(0, |t| t.saturating_sub(resume_from)))
            .map_err(Attempt::Fatal)?;
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
            tracing::info!(model = name, from = resume_from, total = ?total, "Resuming the model download.");
        }
        let mut done = resume_from;
        let mut last_log = Instant::now();
        let mut response = response;
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|e| Attempt::Retry(error_chain(&e)))?;
            let Some(chunk) = chunk else { break };
            file.write_all(&chunk).await.map_err(|e| {
                Attempt::Fatal(Rejection::NoSpace(format!(
                    "cannot write the model file {}: {e}",
                    part.display()
                )))
            })?;
            done += chunk.len() as u64;
            if last_log.elapsed() >= Duration::from_secs(2) {
                last_log = Instant::now();
                match total {
                    Some(t) if t > 0 => {
                        tracing::info!(
                            model = name,
                            bytes = done,
                            total = t,
                            percent = format!("{:.0}", done as f64 * 100.0 / t as f64),
                            "Downloading model."
                        )
                    }
                    _ => tracing::info!(model = name, bytes = done, "Downloading model."),
                }
            }
        }
        file.flush()
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        file.sync_all()
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        if let Some(t) = total
            && done < t
        {
            return Err(Attempt::Retry(format!(
                "the connection ended after {done} of {t} bytes"
            )));
        }
        tracing::info!(model = name, bytes = done, "Model downloaded.");
        Ok(())
    }

    async fn verify_and_rename(
        &self,
        name: &str,
        update: &ModelUpdate,
        part: &Path,
        path: &Path,
    ) -> Result<PathBuf, Rejection> {
        let bytes = tokio::fs::read(part)
            .await
            .map_err(|e| Rejection::Download(format!("cannot read {}: {e}", part.display())))?;
        let actual = hex::encode(Sha256::digest(&bytes));
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
        if free < bytes.saturating_add(self.reserve_bytes) {
            return Err(Rejection::NoSpace(format!(
                "not enough disk for model `{name}`: it needs {bytes} bytes and {} must stay free (fleet.reserve_bytes), but {} has {free} bytes free",
                self.reserve_bytes,
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

    fn update(url: &str, data: &[u8]) -> ModelUpdate {
        ModelUpdate {
            version: "2".into(),
            sha256: models::manifest::sha256_hex(data),
            url: url.into(),
            bytes: Some(data.len() as u64),
            spec: None,
        }
    }

    #[tokio::test]
    async fn an_interrupted_download_resumes_and_verifies() {
        let data: Arc<Vec<u8>> = Arc::new((0..200_000u32).map(|i| (i % 251) as u8).collect());
        let (url, ranged) = server(data.clone(), 1).await;
        let dir = crate::test_scratch_dir("fetch");
        let f = Fetcher::new(dir.clone(), 0, None).unwrap();
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
        let f = Fetcher::new(dir.clone(), 0, None).unwrap();
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

        let full = Fetcher::new(dir.clone(), u64::MAX / 2, None).unwrap();
        let err = full.fetch("m", &update(&url, &data)).await.unwrap_err();
        let Rejection::NoSpace(m) = err else {
            panic!("{err:?}")
        };
        assert!(m.contains("not enough disk"), "{m}");
    }
}
