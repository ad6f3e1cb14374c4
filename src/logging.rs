//! Log output that never blocks the bus.
//!
//! busvisor logs two lines per connection at info level. Whoever holds its
//! stderr may not read it (a test harness's pipe that nobody drains, a
//! terminal on hold): a plain blocking write would then stop the runtime,
//! and with it every client, after a few hundred connections. dbus-daemon
//! barely logs, so it never meets this.
//!
//! So each line is written only when the descriptor is writable right now
//! (`poll` with a zero timeout). Otherwise it is dropped and counted, and
//! the next line that gets through is preceded by a notice with the count.
//! The pipe's own buffer is the queue: no thread, no extra copy, and one
//! `poll` per line instead of a wakeup of a writer thread (which measured
//! 20-30 µs per connection). A line longer than a pipe buffer's free space
//! is cut where the descriptor stops taking it.
//!
//! The system log is the other place a line can go, as dbus-daemon logs:
//! `--syslog` (stderr and the system log), `--syslog-only`, `--nosyslog`,
//! and without a flag the configuration's `<syslog/>` (bus/bus.c). Lines
//! go to `/dev/log` as RFC 3164 datagrams, `<PRI>busvisor[PID]: message`,
//! facility daemon, from a non-blocking socket: a system log that does not
//! take a line at once loses it (counted and reported like stderr's). Where
//! there is no `/dev/log` (a container), lines go to stderr instead.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

/// A [`MakeWriter`] for tracing-subscriber's fmt layer over one descriptor.
pub struct LogWriter<F> {
    fd: F,
    /// A regular file is always writable: no `poll` before each line.
    is_file: bool,
    dropped: AtomicU64,
}

impl<F: AsFd> LogWriter<F> {
    pub fn new(fd: F) -> Self {
        use nix::sys::stat::{SFlag, fstat};
        // (A socket's type bits include S_IFREG's: compare the whole field.)
        let is_file = fstat(fd.as_fd()).is_ok_and(|st| {
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
        });
        LogWriter {
            fd,
            is_file,
            dropped: AtomicU64::new(0),
        }
    }

    /// Lines dropped since the last notice.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn writable(&self) -> bool {
        if self.is_file {
            return true;
        }
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLOUT)];
        loop {
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(n) => {
                    return n > 0
                        && fds[0]
                            .revents()
                            .is_some_and(|r| r.contains(PollFlags::POLLOUT));
                }
                Err(Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Write as much of `buf` as the descriptor takes without blocking.
    /// Returns whether all of it went out.
    fn put(&self, mut buf: &[u8]) -> bool {
        while !buf.is_empty() {
            if !self.writable() {
                return false;
            }
            match nix::unistd::write(self.fd.as_fd(), buf) {
                Ok(n) => buf = &buf[n..],
                Err(Errno::EINTR) => {}
                // EAGAIN (someone made it non-blocking), EPIPE (the reader
                // is gone; SIGPIPE is ignored in Rust programs) and the rest.
                Err(_) => return false,
            }
        }
        true
    }

    fn line(&self, buf: &[u8]) {
        let lost = self.dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let notice =
                format!("busvisor: {lost} log lines dropped: nobody was reading the log output\n");
            if !self.put(notice.as_bytes()) {
                self.dropped.fetch_add(lost, Ordering::Relaxed);
            }
        }
        if !self.put(buf) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The writer for one event: the fmt layer hands it the whole line in one
/// `write` call.
pub struct Line<'a, F>(&'a LogWriter<F>);

impl<F: AsFd> io::Write for Line<'_, F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.line(buf);
        // Reported as written either way: a dropped line is not an error
        // for the code that logged it.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a, F: AsFd + 'a> MakeWriter<'a> for LogWriter<F> {
    type Writer = Line<'a, F>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(self)
    }
}

// ------------------------------------------------------------------ syslog

/// The system log's socket.
pub const DEV_LOG: &str = "/dev/log";

/// The identifier in front of every system log line.
const IDENT: &str = "busvisor";

/// Longest datagram sent to the system log (rsyslog's default maximum
/// message size); a longer line is cut.
const MAX_DATAGRAM: usize = 8192;

/// `--syslog`, `--nosyslog` or `--syslog-only`, the one that counts
/// (`DaemonArgs::syslog_flag`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyslogFlag {
    Syslog,
    NoSyslog,
    SyslogOnly,
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Stderr,
    StderrAndSyslog,
    Syslog,
}

impl LogTarget {
    /// dbus-daemon's choice (`bus_context_new` in bus/bus.c): a flag wins
    /// over the configuration's `<syslog/>`, which adds the system log to
    /// stderr.
    pub fn choose(flag: Option<SyslogFlag>, config_syslog: bool) -> LogTarget {
        match flag {
            Some(SyslogFlag::SyslogOnly) => LogTarget::Syslog,
            Some(SyslogFlag::Syslog) => LogTarget::StderrAndSyslog,
            Some(SyslogFlag::NoSyslog) => LogTarget::Stderr,
            None if config_syslog => LogTarget::StderrAndSyslog,
            None => LogTarget::Stderr,
        }
    }
}

/// RFC 3164 priority: facility daemon (3), the level's severity.
fn priority(level: &Level) -> u8 {
    const DAEMON: u8 = 3 << 3;
    let severity = match *level {
        Level::ERROR => 3, // LOG_ERR
        Level::WARN => 4,  // LOG_WARNING
        Level::INFO => 6,  // LOG_INFO
        _ => 7,            // LOG_DEBUG
    };
    DAEMON | severity
}

/// Lines to the system log: one datagram per line on a non-blocking
/// socket, connected when first needed and again after the log daemon
/// restarted.
pub struct SyslogWriter {
    path: PathBuf,
    sock: Mutex<Option<UnixDatagram>>,
    dropped: AtomicU64,
}

impl SyslogWriter {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SyslogWriter {
            path: path.into(),
            sock: Mutex::new(None),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether a system log listens there (a socket exists).
    pub fn available(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(&self.path).is_ok_and(|m| m.file_type().is_socket())
    }

    /// Lines dropped since the last notice.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn connect(&self) -> Option<UnixDatagram> {
        let sock = UnixDatagram::unbound().ok()?;
        sock.connect(&self.path).ok()?;
        sock.set_nonblocking(true).ok()?;
        Some(sock)
    }

    fn datagram(level: &Level, text: &[u8]) -> Vec<u8> {
        let text = text.strip_suffix(b"\n").unwrap_or(text);
        let mut d = format!("<{}>{IDENT}[{}]: ", priority(level), std::process::id()).into_bytes();
        let room = MAX_DATAGRAM.saturating_sub(d.len());
        d.extend_from_slice(&text[..text.len().min(room)]);
        d
    }

    /// Send one datagram without waiting; false when it was not taken.
    fn send(&self, datagram: &[u8]) -> bool {
        let mut sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        // One new connection per line at most: a log daemon that restarted
        // has a new socket at the same path.
        for fresh in [false, true] {
            if fresh || sock.is_none() {
                *sock = self.connect();
            }
            let Some(s) = sock.as_ref() else {
                return false;
            };
            match s.send(datagram) {
                Ok(_) => return true,
                // Its queue is full: nobody is reading now.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {}
            }
        }
        *sock = None;
        false
    }

    /// Log `text` (one formatted line) at `level`.
    pub fn line(&self, level: &Level, text: &[u8]) {
        let lost = self.dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let notice = format!("{lost} log lines dropped: the system log did not take them");
            if !self.send(&Self::datagram(&Level::WARN, notice.as_bytes())) {
                self.dropped.fetch_add(lost, Ordering::Relaxed);
            }
        }
        if !self.send(&Self::datagram(level, text)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The writer for one event at one level.
pub struct SyslogLine<'a> {
    writer: &'a SyslogWriter,
    level: Level,
}

impl io::Write for SyslogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.line(&self.level, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Both places a line can go, and which of them take lines now.
pub struct Sinks<F> {
    stderr: LogWriter<F>,
    syslog: SyslogWriter,
    to_stderr: AtomicBool,
    to_syslog: AtomicBool,
}

impl<F: AsFd> Sinks<F> {
    /// Lines to `stderr` only, until [`Sinks::set_target`].
    pub fn new(stderr: F, syslog_path: impl Into<PathBuf>) -> Self {
        Sinks {
            stderr: LogWriter::new(stderr),
            syslog: SyslogWriter::new(syslog_path),
            to_stderr: AtomicBool::new(true),
            to_syslog: AtomicBool::new(false),
        }
    }

    /// Send lines to `target`; without a system log, to stderr. Returns
    /// where they go.
    pub fn set_target(&self, target: LogTarget) -> LogTarget {
        let target = if target != LogTarget::Stderr && !self.syslog.available() {
            LogTarget::Stderr
        } else {
            target
        };
        self.to_stderr
            .store(target != LogTarget::Syslog, Ordering::Relaxed);
        self.to_syslog
            .store(target != LogTarget::Stderr, Ordering::Relaxed);
        target
    }

    #[cfg(test)]
    fn syslog(&self) -> &SyslogWriter {
        &self.syslog
    }
}

/// The stderr sink as a [`MakeWriter`].
struct ToStderr<F>(Arc<Sinks<F>>);

impl<'a, F: AsFd + 'a> MakeWriter<'a> for ToStderr<F> {
    type Writer = Line<'a, F>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(&self.0.stderr)
    }
}

/// The system log sink as a [`MakeWriter`]: the level picks the priority.
struct ToSyslog<F>(Arc<Sinks<F>>);

impl<'a, F: 'a> MakeWriter<'a> for ToSyslog<F> {
    type Writer = SyslogLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        SyslogLine {
            writer: &self.0.syslog,
            level: Level::INFO,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        SyslogLine {
            writer: &self.0.syslog,
            level: *meta.level(),
        }
    }
}

/// The two fmt layers, each filtered by whether its sink takes lines now,
/// so that a sink turned off costs no formatting. The system log's lines
/// carry no time (the log adds it), level (the priority says it) or colour.
pub fn layers<S, F>(sinks: Arc<Sinks<F>>, ansi: bool) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'l> tracing_subscriber::registry::LookupSpan<'l>,
    F: AsFd + Send + Sync + 'static,
{
    use tracing_subscriber::filter::filter_fn;
    let (a, b) = (sinks.clone(), sinks.clone());
    let stderr = tracing_subscriber::fmt::layer()
        .with_timer(Clock::default())
        .with_writer(ToStderr(sinks.clone()))
        .with_ansi(ansi)
        .with_filter(filter_fn(move |_| a.to_stderr.load(Ordering::Relaxed)));
    let syslog = tracing_subscriber::fmt::layer()
        .with_writer(ToSyslog(sinks))
        .with_ansi(false)
        .without_time()
        .with_level(false)
        .with_target(false)
        .with_filter(filter_fn(move |_| b.to_syslog.load(Ordering::Relaxed)));
    stderr.and_then(syslog)
}

/// Timestamps as tracing-subscriber's `SystemTime` writes them
/// (`2026-11-30T07:21:58.462011Z`), for a fraction of the cost: the part
/// down to the second is formatted once a second (by jiff), the
/// microseconds each line. The bus logs two lines per connection at info;
/// the default timer's seven padded integer formats took 4,700
/// instructions a line, a seventh of a connection's user-space cost.
#[derive(Default)]
struct Clock {
    second: Mutex<(u64, String)>,
}

impl Clock {
    fn write(
        &self,
        since_epoch: std::time::Duration,
        w: &mut impl std::fmt::Write,
    ) -> std::fmt::Result {
        let secs = since_epoch.as_secs();
        let mut cached = self.second.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != secs || cached.1.is_empty() {
            let t = i64::try_from(secs)
                .ok()
                .and_then(|s| jiff::Timestamp::from_second(s).ok())
                .ok_or(std::fmt::Error)?;
            cached.1.clear();
            std::fmt::Write::write_fmt(
                &mut cached.1,
                format_args!("{}", t.strftime("%Y-%m-%dT%H:%M:%S.")),
            )?;
            cached.0 = secs;
        }
        let mut fraction = *b"000000Z";
        let mut us = since_epoch.subsec_micros();
        for digit in fraction[..6].iter_mut().rev() {
            *digit = b'0' + (us % 10) as u8;
            us /= 10;
        }
        w.write_str(&cached.1)?;
        w.write_str(std::str::from_utf8(&fraction).map_err(|_| std::fmt::Error)?)
    }
}

impl tracing_subscriber::fmt::time::FormatTime for Clock {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.write(now, w)
    }
}

/// The process's sinks: its stderr and `/dev/log`.
static SINKS: LazyLock<Arc<Sinks<io::Stderr>>> =
    LazyLock::new(|| Arc::new(Sinks::new(io::stderr(), DEV_LOG)));

/// Log to stderr, never blocking on it, at `level` unless `RUST_LOG` says
/// otherwise; [`set_target`] may add or switch to the system log later,
/// once the configuration is read.
pub fn init(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level.unwrap_or("info")));
    let ansi = std::io::IsTerminal::is_terminal(&io::stderr());
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layers(SINKS.clone(), ansi))
        .try_init();
}

/// Send the process's log lines to `target` (see [`LogTarget::choose`]);
/// without a system log they stay on stderr, and a line says so.
pub fn set_target(target: LogTarget) {
    let got = SINKS.set_target(target);
    if got != target {
        tracing::info!("no system log at {DEV_LOG}: logging to stderr");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::time::Duration;

    #[test]
    fn the_clock_writes_tracing_subscribers_timestamps() {
        let clock = Clock::default();
        let at = |secs, us: u32| {
            let mut s = String::new();
            clock.write(Duration::new(secs, us * 1000), &mut s).unwrap();
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(1_000_000_000, 5), "2001-09-09T01:46:40.000005Z");
        // The cached second is replaced when the second changes.
        assert_eq!(at(1_000_000_001, 999_999), "2001-09-09T01:46:41.999999Z");
        assert_eq!(at(1_764_487_318, 462_011), "2025-11-30T07:21:58.462011Z");
        // The same shape as tracing-subscriber's own timer.
        let mut theirs = String::new();
        tracing_subscriber::fmt::time::FormatTime::format_time(
            &tracing_subscriber::fmt::time::SystemTime,
            &mut tracing_subscriber::fmt::format::Writer::new(&mut theirs),
        )
        .unwrap();
        let mut ours = String::new();
        tracing_subscriber::fmt::time::FormatTime::format_time(
            &clock,
            &mut tracing_subscriber::fmt::format::Writer::new(&mut ours),
        )
        .unwrap();
        let shape = |t: &str| t.replace(|c: char| c.is_ascii_digit(), "0");
        assert_eq!(shape(&ours), shape(&theirs), "{ours} {theirs}");
    }

    fn set_nonblocking(fd: &OwnedFd, on: bool) {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
        let flags = if on {
            flags | OFlag::O_NONBLOCK
        } else {
            flags - OFlag::O_NONBLOCK
        };
        fcntl(fd, FcntlArg::F_SETFL(flags)).unwrap();
    }

    #[test]
    fn full_pipe_drops_lines_instead_of_blocking_then_reports_them() {
        let (rx, tx) = nix::unistd::pipe().unwrap();
        // Fill the pipe to the brim, then leave the write end blocking, as a
        // stderr pipe is.
        set_nonblocking(&tx, true);
        let mut filled = 0usize;
        while let Ok(n) = nix::unistd::write(&tx, &[b'x'; 4096]) {
            filled += n;
        }
        set_nonblocking(&tx, false);
        let writer = std::sync::Arc::new(LogWriter::new(tx));
        let w = writer.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..3 {
                w.make_writer().write_all(b"lost line\n").unwrap();
            }
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a write to a full pipe blocked");
        assert_eq!(writer.dropped(), 3);

        // Once the reader drains the pipe, the next line is preceded by the count.
        let mut rx = std::fs::File::from(rx);
        let mut sink = vec![0u8; filled];
        rx.read_exact(&mut sink).unwrap();
        writer.make_writer().write_all(b"next line\n").unwrap();
        assert_eq!(writer.dropped(), 0);
        drop(writer);
        let mut rest = String::new();
        rx.read_to_string(&mut rest).unwrap();
        assert_eq!(
            rest,
            "busvisor: 3 log lines dropped: nobody was reading the log output\nnext line\n"
        );
    }

    #[test]
    fn closed_reader_is_not_an_error() {
        let (rx, tx) = nix::unistd::pipe().unwrap();
        drop(rx);
        let writer = LogWriter::new(tx);
        writer
            .make_writer()
            .write_all(b"nobody hears this\n")
            .unwrap();
        assert_eq!(writer.dropped(), 1);
    }

    // ------------------------------------------------------------ syslog

    /// A system log: a datagram socket bound in a temporary directory.
    fn fake_syslog() -> (tempfile::TempDir, PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (dir, path, rx)
    }

    fn recv(rx: &UnixDatagram) -> String {
        let mut buf = vec![0u8; 65536];
        let n = rx.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn pending(rx: &UnixDatagram) -> usize {
        rx.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut n = 0;
        while rx.recv(&mut buf).is_ok() {
            n += 1;
        }
        rx.set_nonblocking(false).unwrap();
        n
    }

    #[test]
    fn target_follows_dbus_daemon() {
        use LogTarget as T;
        use SyslogFlag as F;
        for config in [false, true] {
            assert_eq!(T::choose(Some(F::SyslogOnly), config), T::Syslog);
            assert_eq!(T::choose(Some(F::Syslog), config), T::StderrAndSyslog);
            assert_eq!(T::choose(Some(F::NoSyslog), config), T::Stderr);
        }
        assert_eq!(T::choose(None, true), T::StderrAndSyslog);
        assert_eq!(T::choose(None, false), T::Stderr);
    }

    #[test]
    fn syslog_datagrams_are_rfc3164_with_the_level_as_priority() {
        let (_d, path, rx) = fake_syslog();
        let w = SyslogWriter::new(&path);
        assert!(w.available());
        let pid = std::process::id();
        for (level, pri) in [
            (Level::ERROR, 27),
            (Level::WARN, 28),
            (Level::INFO, 30),
            (Level::DEBUG, 31),
            (Level::TRACE, 31),
        ] {
            w.line(&level, b"a line\n");
            assert_eq!(recv(&rx), format!("<{pri}>busvisor[{pid}]: a line"));
        }
        let long = vec![b'x'; 3 * MAX_DATAGRAM];
        w.line(&Level::INFO, &long);
        assert_eq!(recv(&rx).len(), MAX_DATAGRAM, "a long line is cut");
        assert_eq!(w.dropped(), 0);
        assert!(!SyslogWriter::new(path.with_file_name("none")).available());
    }

    #[test]
    fn full_syslog_drops_lines_instead_of_blocking_then_reports_them() {
        let (_d, path, rx) = fake_syslog();
        let w = std::sync::Arc::new(SyslogWriter::new(&path));
        let w2 = w.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Far more than a datagram socket queues for a reader that
            // does not read (max_dgram_qlen and the buffer both).
            for i in 0..5000 {
                w2.line(&Level::INFO, format!("line {i}").as_bytes());
            }
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a write to a full system log blocked");
        let dropped = w.dropped();
        let queued = pending(&rx);
        assert!(
            dropped > 0 && queued > 0,
            "{dropped} dropped, {queued} queued"
        );
        assert_eq!(dropped as usize + queued, 5000);
        w.line(&Level::INFO, b"next");
        assert!(recv(&rx).ends_with(&format!(
            "{dropped} log lines dropped: the system log did not take them"
        )));
        assert!(recv(&rx).ends_with("]: next"));
        assert_eq!(w.dropped(), 0);
    }

    #[test]
    fn syslog_restarted_is_reconnected_and_absent_is_not_an_error() {
        let (_d, path, rx) = fake_syslog();
        let w = SyslogWriter::new(&path);
        w.line(&Level::INFO, b"one");
        assert!(recv(&rx).ends_with("]: one"));
        // The log daemon goes away, then comes back on a new socket.
        drop(rx);
        std::fs::remove_file(&path).unwrap();
        w.line(&Level::INFO, b"lost");
        assert_eq!(w.dropped(), 1);
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        w.line(&Level::INFO, b"two");
        assert!(recv(&rx).ends_with("1 log lines dropped: the system log did not take them"));
        assert!(recv(&rx).ends_with("]: two"));
    }

    #[test]
    fn events_go_where_the_target_says() {
        let (_d, path, rx) = fake_syslog();
        let (err_rx, err_tx) = nix::unistd::pipe().unwrap();
        set_nonblocking(&err_rx, true);
        let sinks = std::sync::Arc::new(Sinks::new(err_tx, &path));
        let subscriber = tracing_subscriber::registry().with(layers(sinks.clone(), false));
        let mut err_rx = std::fs::File::from(err_rx);
        let mut stderr_text = || {
            let mut s = String::new();
            let _ = err_rx.read_to_string(&mut s);
            s
        };
        let pid = std::process::id();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(peer = ":1.4", "first");
            assert!(stderr_text().contains("WARN"), "stderr only at first");
            assert_eq!(pending(&rx), 0);

            assert_eq!(sinks.set_target(LogTarget::Syslog), LogTarget::Syslog);
            tracing::error!(peer = ":1.5", "second");
            assert_eq!(
                recv(&rx),
                format!("<27>busvisor[{pid}]: second peer=\":1.5\"")
            );
            assert_eq!(stderr_text(), "");

            let both = sinks.set_target(LogTarget::StderrAndSyslog);
            assert_eq!(both, LogTarget::StderrAndSyslog);
            tracing::info!("third");
            assert_eq!(recv(&rx), format!("<30>busvisor[{pid}]: third"));
            assert!(stderr_text().contains("third"));

            assert_eq!(sinks.set_target(LogTarget::Stderr), LogTarget::Stderr);
            tracing::info!("fourth");
            assert!(stderr_text().contains("fourth"));
            assert_eq!(pending(&rx), 0);
        });
        // No system log: stderr, whatever was asked.
        let none = Sinks::new(std::io::stderr(), path.with_file_name("none"));
        assert_eq!(none.set_target(LogTarget::Syslog), LogTarget::Stderr);
        assert_eq!(
            none.set_target(LogTarget::StderrAndSyslog),
            LogTarget::Stderr
        );
        assert!(sinks.syslog().available());
    }
}
