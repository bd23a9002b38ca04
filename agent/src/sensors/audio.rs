//! The audio source for the VAD model: 16 kHz mono PCM from a WAV file, a raw s16le file, a
//! named pipe or stdin, cut into the 512-sample chunks Silero VAD takes (with 64 samples of
//! context), and a segmenter that turns per-chunk speech probabilities into speech start and
//! end events. The segmenter is pure; the reader is IO.

use std::io::Read;
use std::path::Path;

/// Silero VAD's input at 16 kHz: 512 new samples after 64 of context.
pub const RATE: u32 = 16_000;
pub const CHUNK: usize = 512;
pub const CONTEXT: usize = 64;

/// Reads PCM and hands out chunks.
pub struct Pcm {
    reader: Box<dyn Read + Send>,
    /// Bytes per sample: 2 (s16le).
    pending: Vec<u8>,
    pub description: String,
}

impl std::fmt::Debug for Pcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pcm")
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

impl Pcm {
    /// `-` for stdin; `*.wav` (16 kHz, mono, 16-bit); anything else raw s16le at 16 kHz (a
    /// file or a named pipe, such as `arecord -r 16000 -f S16_LE -c 1 > /run/mic.pcm`).
    pub fn open(path: &Path) -> Result<Pcm, String> {
        if path.as_os_str() == "-" {
            return Ok(Pcm {
                reader: Box::new(std::io::stdin()),
                pending: Vec::new(),
                description: "stdin (raw s16le, 16 kHz mono)".into(),
            });
        }
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot open the audio input {}: {e}", path.display()))?;
        if path
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("wav"))
        {
            let wav = hound::WavReader::new(std::io::BufReader::new(file))
                .map_err(|e| format!("{} is not a WAV file: {e}", path.display()))?;
            let s = wav.spec();
            if s.sample_rate != RATE
                || s.channels != 1
                || s.bits_per_sample != 16
                || s.sample_format != hound::SampleFormat::Int
            {
                return Err(format!(
                    "{} is {} Hz, {} channel(s), {}-bit {:?}; the VAD needs 16000 Hz mono 16-bit PCM (sox in.wav -r 16000 -c 1 -b 16 out.wav)",
                    path.display(),
                    s.sample_rate,
                    s.channels,
                    s.bits_per_sample,
                    s.sample_format
                ));
            }
            let samples: Vec<u8> = wav
                .into_samples::<i16>()
                .map(|r| r.map(|v| v.to_le_bytes()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .concat();
            return Ok(Pcm {
                reader: Box::new(std::io::Cursor::new(samples)),
                pending: Vec::new(),
                description: format!("{} (WAV)", path.display()),
            });
        }
        Ok(Pcm {
            reader: Box::new(std::io::BufReader::new(file)),
            pending: Vec::new(),
            description: format!("{} (raw s16le, 16 kHz mono)", path.display()),
        })
    }

    /// The next 512 samples in [-1, 1]; a short last chunk is padded with silence; `None` at
    /// the end of the stream.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<f32>>, String> {
        let want = CHUNK * 2;
        let mut buf = [0u8; 4096];
        while self.pending.len() < want {
            match self.reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("cannot read the audio input: {e}")),
            }
        }
        if self.pending.len() < 2 {
            return Ok(None);
        }
        let take = self.pending.len().min(want) & !1;
        let bytes: Vec<u8> = self.pending.drain(..take).collect();
        let mut out: Vec<f32> = bytes
            .chunks_exact(2)
            .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
            .collect();
        out.resize(CHUNK, 0.0);
        Ok(Some(out))
    }
}

/// Speech start and end from per-chunk probabilities, with hysteresis: speech starts on a chunk
/// at or above `threshold`, and ends once the probability stayed below `threshold - 0.15` for
/// `min_silence_s`; segments shorter than `min_speech_s` are dropped.
#[derive(Debug, Clone)]
pub struct Segmenter {
    pub threshold: f64,
    pub min_silence_s: f64,
    pub min_speech_s: f64,
    state: SegState,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum SegState {
    Silence,
    /// Speech since `start`; `quiet_since` when it went quiet.
    Speech {
        start: f64,
        quiet_since: Option<f64>,
        announced: bool,
    },
}

/// What the segmenter says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speech {
    Start { t_s: f64 },
    End { start_s: f64, t_s: f64 },
}

impl Segmenter {
    pub fn new(threshold: f64, min_silence_s: f64, min_speech_s: f64) -> Segmenter {
        Segmenter {
            threshold,
            min_silence_s,
            min_speech_s,
            state: SegState::Silence,
        }
    }

    /// The probability of the chunk that spans `[t_s, t_s + chunk_s)`.
    pub fn observe(&mut self, p: f64, t_s: f64, chunk_s: f64) -> Option<Speech> {
        let end = t_s + chunk_s;
        let low = self.threshold - 0.15;
        match self.state {
            SegState::Silence => {
                if p >= self.threshold {
                    self.state = SegState::Speech {
                        start: t_s,
                        quiet_since: None,
                        announced: false,
                    };
                    return self.announce(end);
                }
                None
            }
            SegState::Speech {
                start,
                quiet_since,
                announced,
            } => {
                if p >= low {
                    self.state = SegState::Speech {
                        start,
                        quiet_since: None,
                        announced,
                    };
                    return self.announce(end);
                }
                let since = quiet_since.unwrap_or(t_s);
                if end - since >= self.min_silence_s {
                    self.state = SegState::Silence;
                    return announced.then_some(Speech::End {
                        start_s: start,
                        t_s: since,
                    });
                }
                self.state = SegState::Speech {
                    start,
                    quiet_since: Some(since),
                    announced,
                };
                None
            }
        }
    }

    /// Speech long enough to count is announced once.
    fn announce(&mut self, now: f64) -> Option<Speech> {
        if let SegState::Speech {
            start,
            quiet_since,
            announced: false,
        } = self.state
            && now - start >= self.min_speech_s
        {
            self.state = SegState::Speech {
                start,
                quiet_since,
                announced: true,
            };
            return Some(Speech::Start { t_s: start });
        }
        None
    }

    /// The end of the stream: closes a segment in progress.
    pub fn finish(&mut self, t_s: f64) -> Option<Speech> {
        let out = match self.state {
            SegState::Speech {
                start,
                quiet_since,
                announced: true,
            } => Some(Speech::End {
                start_s: start,
                t_s: quiet_since.unwrap_or(t_s),
            }),
            _ => None,
        };
        self.state = SegState::Silence;
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const C: f64 = 0.032;

    fn run(ps: &[f64]) -> Vec<Speech> {
        let mut s = Segmenter::new(0.5, 0.1, 0.09);
        let mut out: Vec<Speech> = ps
            .iter()
            .enumerate()
            .filter_map(|(i, p)| s.observe(*p, i as f64 * C, C))
            .collect();
        out.extend(s.finish(ps.len() as f64 * C));
        out
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn a_segment_starts_at_its_first_loud_chunk_and_ends_where_silence_began() {
        let mut ps = vec![0.1; 5];
        ps.extend([0.9; 10]);
        ps.extend([0.1; 10]);
        let ev = run(&ps);
        assert_eq!(ev.len(), 2, "{ev:?}");
        let Speech::Start { t_s } = ev[0] else {
            panic!()
        };
        assert!(close(t_s, 5.0 * C));
        let Speech::End { start_s, t_s } = ev[1] else {
            panic!()
        };
        assert!(close(start_s, 5.0 * C) && close(t_s, 15.0 * C), "{ev:?}");
    }

    #[test]
    fn short_dips_and_blips_do_not_split_or_make_segments() {
        // A dip of two chunks (64 ms < 100 ms) inside speech, a one-chunk blip in silence, a
        // middle value that keeps speech going (hysteresis).
        let mut ps = vec![0.9; 5];
        ps.extend([0.1, 0.1]);
        ps.extend([0.4; 3]);
        ps.extend([0.9; 3]);
        ps.extend([0.1; 6]);
        ps.push(0.9);
        ps.extend([0.1; 6]);
        let ev = run(&ps);
        assert_eq!(ev.len(), 2, "one segment: {ev:?}");
        assert!(
            matches!(ev[1], Speech::End { t_s, .. } if close(t_s, 13.0 * C)),
            "{ev:?}"
        );
    }

    #[test]
    fn speech_at_the_end_of_the_stream_is_closed() {
        let ev = run(&[0.1, 0.9, 0.9, 0.9, 0.9]);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(matches!(ev[1], Speech::End { t_s, .. } if close(t_s, 5.0 * C)));
    }

    #[test]
    fn raw_pcm_is_chunked_and_scaled() {
        let dir = crate::test_scratch_dir("pcm");
        let path = dir.join("a.pcm");
        let samples: Vec<u8> = (0..1000i16).flat_map(|v| (v * 16).to_le_bytes()).collect();
        std::fs::write(&path, samples).unwrap();
        let mut p = Pcm::open(&path).unwrap();
        let a = p.next_chunk().unwrap().unwrap();
        let b = p.next_chunk().unwrap().unwrap();
        assert_eq!((a.len(), b.len()), (CHUNK, CHUNK));
        assert_eq!(a[1], 16.0 / 32768.0);
        assert_eq!(b[1000 - 512], 0.0, "padded");
        assert!(p.next_chunk().unwrap().is_none());
        let bad = dir.join("x.wav");
        std::fs::write(&bad, b"RIFF....").unwrap();
        assert!(Pcm::open(&bad).unwrap_err().contains("not a WAV"));
    }
}
