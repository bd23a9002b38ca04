//! A model download costs the relay the same memory whatever the file's size: a 96 MiB
//! artifact streamed through real TCP raises the process's peak resident memory by a small
//! fraction of the file (it used to be read whole, twice for a range). A test binary of its
//! own, so no other test shares the process whose memory is read.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

mod support;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// VmRSS and VmHWM of this process, in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap()
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_artifact_streams_in_constant_memory() {
    const SIZE: usize = 96 << 20;
    // A zoo whose digits device file is 96 MiB (the relay serves it, and runs only the cloud
    // variant, so its contents need not be a model).
    let dir = std::env::temp_dir().join(format!("tether-artifact-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let zoo = models::default_zoo_dir();
    for entry in std::fs::read_dir(&zoo).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let old = models::manifest::sha256_hex(&std::fs::read(zoo.join("digits.int8.onnx")).unwrap());
    // Written a MiB at a time, so the test itself never holds the file.
    let sha = {
        use std::io::Write;
        let mut f = std::fs::File::create(dir.join("digits.int8.onnx")).unwrap();
        let mut h = models::sha256::Sha256::new();
        let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..SIZE >> 20 {
            f.write_all(&chunk).unwrap();
            h.update(&chunk);
        }
        hex::encode(h.finalize())
    };
    let manifest = std::fs::read_to_string(dir.join("MANIFEST.toml")).unwrap();
    std::fs::write(dir.join("MANIFEST.toml"), manifest.replace(&old, &sha)).unwrap();

    let models_dir = dir.clone();
    let (addr, _state, stop) = support::relay(move |raw| raw.models_dir = Some(models_dir)).await;

    let download = |range: Option<&'static str>| async move {
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let range = range.map_or_else(String::new, |r| format!("range: {r}\r\n"));
        sock.write_all(
            format!("GET /v2/models/digits/versions/1.0.0/artifact HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n{range}\r\n").as_bytes(),
        )
        .await
        .unwrap();
        // Read and hash as it comes, 64 KiB at a time, as a device would.
        let mut hasher = models::sha256::Sha256::new();
        let mut head = Vec::new();
        let mut body_len = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(60), sock.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            if n == 0 {
                break;
            }
            let mut chunk = &buf[..n];
            if !head.ends_with(b"\r\n\r\n") {
                let at = head.len();
                head.extend_from_slice(chunk);
                match head.windows(4).position(|w| w == b"\r\n\r\n") {
                    Some(end) => {
                        chunk = &buf[(end + 4 - at)..n];
                        head.truncate(end + 4);
                    }
                    None => continue,
                }
            }
            hasher.update(chunk);
            body_len += chunk.len();
        }
        (
            String::from_utf8_lossy(&head).into_owned(),
            body_len,
            hex::encode(hasher.finalize()),
        )
    };
    // The peak so far (loading the relay's models) is not this test's concern: reset it.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let (rss_before, _) = memory();
    // Where the peak cannot be reset, the resident size sampled every 2 ms stands in for it.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = std::thread::spawn({
        let sampling = sampling.clone();
        move || {
            let mut max = 0.0f64;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(memory().0);
                std::thread::sleep(Duration::from_millis(2));
            }
            max
        }
    });
    let (head, len, got) = download(None).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!((len, got), (SIZE, sha.clone()));
    let (head, len, _) = download(Some("bytes=1048576-")).await;
    assert!(head.starts_with("HTTP/1.1 206"), "{head}");
    assert_eq!(len, SIZE - (1 << 20));
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let sampled = sampler.join().unwrap();
    let peak = if reset { memory().1 } else { sampled };
    let _ = stop.send(());
    std::fs::remove_dir_all(&dir).unwrap();
    let grew = peak - rss_before;
    println!(
        "peak RSS {peak:.1} MiB; {grew:.1} MiB over the {rss_before:.1} MiB before two downloads of a 96 MiB file"
    );
    assert!(
        grew < 24.0,
        "two downloads of a 96 MiB file raised the peak by {grew:.1} MiB"
    );
}
