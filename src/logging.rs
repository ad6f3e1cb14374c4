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

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tracing_subscriber::fmt::MakeWriter;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::time::Duration;

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
}
