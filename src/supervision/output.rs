//! A service's output: read off the routing path, split into lines, and
//! passed on (busvisor's log, the service's buffer, `LogLine` signals)
//! within a per-service budget, so that a service that prints as fast as it
//! can costs the bus a bounded share of its one worker and of its memory.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncReadExt;
use tracing::{info, warn};

use super::SupervisedBus;
use crate::bus::Shared;

/// The longest piece of output kept as one line: a longer line (or output
/// without a newline) is split, so that what is buffered stays bounded.
pub(crate) const MAX_LINE: usize = 8192;

/// Ends every piece of a split line but the last.
pub(crate) const SPLIT_MARK: &str = "\u{2026}";

/// Lines and bytes per second a service's output may pass on (its stdout
/// and stderr together); a second's worth may come at once. Beyond, lines
/// are dropped and counted, and a line saying how many is passed on once
/// the budget allows.
const LINES_PER_SEC: f64 = 1000.0;
const BYTES_PER_SEC: f64 = 256.0 * 1024.0;

/// How fast one pipe is read at most: beyond, reading pauses and the
/// service's writes wait (as on a slow terminal), rather than the bus's
/// worker spending itself on counting lines it drops.
const READ_BYTES_PER_SEC: usize = 16 * 1024 * 1024;
const READ_WINDOW: Duration = Duration::from_millis(100);

/// One read: big enough that a fast writer costs few wake-ups.
const CHUNK: usize = 64 * 1024;

/// Where a line of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
    /// busvisor's own note in the output (lines dropped over the budget).
    Busvisor,
}

impl Stream {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Busvisor => "busvisor",
        }
    }
}

/// One line of a service's output, as kept and as `LogLine` sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogEntry {
    /// When busvisor read it.
    pub(crate) time: SystemTime,
    /// The process busvisor started, whose stdout or stderr it came from
    /// (its children share the pipe: see docs/SERVICES.md).
    pub(crate) pid: i32,
    pub(crate) stream: Stream,
    pub(crate) line: String,
}

impl LogEntry {
    /// The bytes it holds, for the buffer's byte limit.
    pub(crate) fn size(&self) -> usize {
        self.line.len()
    }
}

/// How the budget's notice starts.
const DROPPED_NOTICE: &str = "busvisor: ";

/// A service's output budget (a token bucket for lines and one for bytes).
pub(crate) struct Budget {
    lines: f64,
    bytes: f64,
    at: Instant,
    dropped: u64,
}

impl Budget {
    fn new(now: Instant) -> Budget {
        Budget {
            lines: LINES_PER_SEC,
            bytes: BYTES_PER_SEC,
            at: now,
            dropped: 0,
        }
    }

    /// One budget for the pipes of one start.
    pub(crate) fn shared() -> Arc<Mutex<Budget>> {
        Arc::new(Mutex::new(Budget::new(Instant::now())))
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.lines = (self.lines + secs * LINES_PER_SEC).min(LINES_PER_SEC);
        self.bytes = (self.bytes + secs * BYTES_PER_SEC).min(BYTES_PER_SEC);
    }

    fn take(&mut self, len: usize) -> bool {
        let ok = self.lines >= 1.0 && self.bytes >= len as f64;
        if ok {
            self.lines -= 1.0;
            self.bytes -= len as f64;
        }
        ok
    }

    /// Whether a line of `len` bytes passes; if it does and lines were
    /// dropped before it, the line saying so goes to `out` first.
    fn admit(&mut self, len: usize, out: &mut Vec<String>) -> bool {
        if self.dropped > 0 {
            let notice = format!(
                "{DROPPED_NOTICE}{} lines of output dropped (over {LINES_PER_SEC} lines or {} KiB a second)",
                self.dropped,
                BYTES_PER_SEC as usize / 1024
            );
            if !self.take(notice.len()) {
                self.dropped += 1;
                return false;
            }
            self.dropped = 0;
            out.push(notice);
        }
        if self.take(len) {
            return true;
        }
        self.dropped += 1;
        false
    }
}

/// Output is bytes: lines as read, each shown lossily (invalid UTF-8
/// becomes U+FFFD), and a line longer than [`MAX_LINE`] split into marked
/// pieces, cut on a character boundary where the bytes allow.
#[derive(Default)]
pub(crate) struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Add `bytes`; the complete lines (and pieces) that `keep` accepts
    /// (given their length) go to `out`, the others are skipped without
    /// being copied or converted.
    pub(crate) fn feed(
        &mut self,
        mut bytes: &[u8],
        keep: &mut dyn FnMut(usize, &mut Vec<String>) -> bool,
        out: &mut Vec<String>,
    ) {
        while !bytes.is_empty() {
            let room = MAX_LINE - self.partial.len();
            let window = &bytes[..bytes.len().min(room)];
            if let Some(nl) = window.iter().position(|b| *b == b'\n') {
                if keep(self.partial.len() + nl, out) {
                    self.partial.extend_from_slice(&window[..nl]);
                    out.push(self.take(false));
                } else {
                    self.partial.clear();
                }
                bytes = &bytes[nl + 1..];
                continue;
            }
            self.partial.extend_from_slice(window);
            bytes = &bytes[window.len()..];
            if self.partial.len() >= MAX_LINE {
                let piece = self.take(true);
                if keep(piece.len(), out) {
                    out.push(piece);
                }
            }
        }
    }

    /// At the end of the output: what is left without a newline.
    pub(crate) fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| self.take(false))
    }

    fn take(&mut self, split: bool) -> String {
        let cut = if split {
            char_boundary(&self.partial)
        } else {
            self.partial.len()
        };
        let rest = self.partial.split_off(cut);
        let mut line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial = rest;
        if split {
            line.push_str(SPLIT_MARK);
        } else if line.ends_with('\r') {
            line.pop();
        }
        line
    }
}

/// Where to cut `bytes` so that a UTF-8 character at its end is not cut in
/// two (the character then starts the next piece).
fn char_boundary(bytes: &[u8]) -> usize {
    let len = bytes.len();
    for back in 1..=len.min(3) {
        let b = bytes[len - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte
        }
        let need = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if need > back { len - back } else { len };
    }
    len
}

/// The pace of one pipe's reads (see [`READ_BYTES_PER_SEC`]).
struct Pace {
    since: Instant,
    bytes: usize,
}

impl Pace {
    /// How long to pause after `n` more bytes.
    fn after(&mut self, n: usize) -> Option<Duration> {
        let now = Instant::now();
        if now.duration_since(self.since) >= READ_WINDOW {
            self.since = now;
            self.bytes = 0;
        }
        self.bytes += n;
        let per_window = READ_BYTES_PER_SEC / (1000 / READ_WINDOW.as_millis() as usize);
        (self.bytes >= per_window)
            .then(|| (self.since + READ_WINDOW).saturating_duration_since(now))
    }
}

/// Read a service's output into the log, its buffer and LogLine signals,
/// within `budget`, taking the core lock at most once per read. It reads
/// until the pipe's end whatever the bytes are: a service whose output is
/// not read would die of SIGPIPE or block.
pub(super) fn capture(
    bus: Arc<SupervisedBus>,
    id: String,
    pid: i32,
    stream: Stream,
    fd: std::os::fd::OwnedFd,
    budget: &Arc<Mutex<Budget>>,
) {
    let budget = budget.clone();
    tokio::spawn(async move {
        let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
            return;
        };
        let mut chunk = vec![0u8; CHUNK];
        let mut lines = LineSplitter::default();
        let mut pace = Pace {
            since: Instant::now(),
            bytes: 0,
        };
        loop {
            let mut burst = Vec::new();
            let end = match rx.read(&mut chunk).await {
                Ok(0) => true,
                Ok(n) => {
                    {
                        let mut b = budget.lock().unwrap_or_else(|e| e.into_inner());
                        b.refill(Instant::now());
                        lines.feed(&chunk[..n], &mut |len, out| b.admit(len, out), &mut burst);
                    }
                    if let Some(pause) = pace.after(n) {
                        tokio::time::sleep(pause).await;
                    }
                    false
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(service = %id, pid, "cannot read its output: {e}");
                    true
                }
            };
            if end {
                burst.extend(lines.finish());
            }
            pass_on(&bus, &id, pid, stream, burst);
            if end {
                return;
            }
        }
    });
}

/// Lines that passed the budget: to the log, then under the lock to the
/// service's buffer and its subscribers.
fn pass_on(bus: &SupervisedBus, id: &str, pid: i32, stream: Stream, burst: Vec<String>) {
    if burst.is_empty() {
        return;
    }
    let time = SystemTime::now();
    let entries: Vec<LogEntry> = burst
        .into_iter()
        .map(|line| {
            info!(service = %id, pid, stream = stream.as_str(), "{line}");
            // The budget's own notice is busvisor's, whatever pipe it was on.
            let stream = if line.starts_with(DROPPED_NOTICE)
                && line.contains(" lines of output dropped (over ")
            {
                Stream::Busvisor
            } else {
                stream
            };
            LogEntry {
                time,
                pid,
                stream,
                line,
            }
        })
        .collect();
    let mut g = bus.lock();
    let Shared { core, sup } = &mut *g;
    sup.output(id, entries, core);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut |_, _| true, &mut out);
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn lines_are_bytes_shown_lossily() {
        assert_eq!(
            split(&[b"a\xffb\r\nsec", b"ond\n\nlast"]),
            ["a\u{fffd}b", "second", "", "last"]
        );
    }

    #[test]
    fn long_lines_are_split_and_marked_on_character_boundaries() {
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let out = split(&[&long, b"\n"]);
        assert_eq!(out.len(), 3);
        assert!(out[0].ends_with(SPLIT_MARK) && out[1].ends_with(SPLIT_MARK));
        assert_eq!(out[2].len(), 10);
        // A 3-byte character across the limit goes whole to the next piece.
        let mut text = vec![b'y'; MAX_LINE - 1];
        text.extend_from_slice("\u{20ac}z".as_bytes());
        let out = split(&[&text]);
        assert_eq!(out[0], format!("{}{SPLIT_MARK}", "y".repeat(MAX_LINE - 1)));
        assert_eq!(out[1], "\u{20ac}z");
    }

    #[test]
    fn over_budget_lines_are_dropped_counted_and_reported() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        let many = "y\n".repeat(3000);
        s.feed(many.as_bytes(), &mut |len, o| b.admit(len, o), &mut out);
        assert_eq!(out.len(), LINES_PER_SEC as usize);
        assert_eq!(b.dropped, 3000 - LINES_PER_SEC as u64);
        out.clear();
        b.refill(t0 + Duration::from_millis(100));
        s.feed(b"next\n", &mut |len, o| b.admit(len, o), &mut out);
        assert!(
            out[0].starts_with("busvisor: 2000 lines of output dropped"),
            "{out:?}"
        );
        assert_eq!(out[1], "next");
        assert_eq!(b.dropped, 0);
    }
}
