//! A connection's bounded outbound queue, and the handle that cuts its socket.
//!
//! The router never awaits a socket. It pushes shared `Message` handles into a
//! peer's [`Outbox`] (a cheap `Arc` clone, no copy) and the peer's writer task
//! drains the queue into the socket, several messages per write. The queue is
//! bounded in bytes and fds; see [`PushError`] for what the router does when a
//! peer stops reading.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::wire::Message;
use tokio::sync::Notify;

/// Why a message could not be queued for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The queue holds its limit of bytes or fds: the peer is not reading.
    Full,
    /// The peer is gone or going.
    Closed,
    /// The message carries fds and the peer did not negotiate fd passing.
    NoFds,
}

/// The bytes of a peer's messages still queued for others: dbus-daemon's
/// live messages of a connection, which max_incoming_bytes bounds (its
/// reader stops reading that peer while they are over the limit).
pub(crate) struct Incoming {
    bytes: AtomicUsize,
    limit: usize,
    /// Woken when the bytes fall back to the limit.
    freed: Notify,
}

impl Incoming {
    pub(crate) fn new(limit: usize) -> Self {
        Incoming {
            bytes: AtomicUsize::new(0),
            limit,
            freed: Notify::new(),
        }
    }

    pub(crate) fn over(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) > self.limit
    }

    /// Wait until the peer's queued messages are back within the limit.
    pub(crate) async fn wait_within(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so that a release in between wakes it.
            freed.as_mut().enable();
            if !self.over() {
                return;
            }
            freed.await;
        }
    }
}

/// A queued message's share of its sender's `Incoming`, given back when it
/// leaves the queue (taken by the writer, or dropped with the queue).
struct Charge {
    to: Arc<Incoming>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let before = self.to.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        if before > self.to.limit && before - self.bytes <= self.to.limit {
            self.to.freed.notify_waiters();
        }
    }
}

struct Entry {
    msg: Message,
    _charge: Option<Charge>,
}

struct Queue {
    messages: VecDeque<Entry>,
    bytes: usize,
    fds: usize,
    closed: bool,
}

/// A peer's bounded outbound queue.
pub(crate) struct Outbox {
    queue: Mutex<Queue>,
    ready: Notify,
    max_bytes: usize,
    max_fds: usize,
    /// Messages dropped because the queue was full (broadcast signals).
    pub(crate) dropped: AtomicU64,
    /// The peer negotiated fd passing in its handshake.
    fds_ok: bool,
    /// When the writer last got bytes out (ms on the process clock), or
    /// when the queue last started to fill.
    last_progress: AtomicU64,
    /// Woken when queued bytes leave.
    drained: Notify,
    /// Senders do not wait for this peer before this time (ms): it made
    /// one wait too long, so it is slow rather than just behind.
    no_wait_until: AtomicU64,
    /// This peer's own messages queued for others (max_incoming_bytes).
    pub(crate) incoming: Arc<Incoming>,
}

/// A queue that has not moved for this long belongs to a peer that is not
/// reading: senders stop waiting for it (its broadcasts are then dropped).
const STUCK_MS: u64 = 500;
/// The longest one wait for a peer's queue may last; a peer that needs more
/// is not waited for during `SLOW_PENALTY_MS`, so that a reader that drains
/// slowly on purpose cannot pace the bus.
const WAIT_BUDGET_MS: u64 = 200;
const SLOW_PENALTY_MS: u64 = 2000;

fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl Outbox {
    pub(crate) fn new(max_bytes: usize, max_fds: usize, fds_ok: bool) -> Self {
        Outbox {
            queue: Mutex::new(Queue {
                messages: VecDeque::new(),
                bytes: 0,
                fds: 0,
                closed: false,
            }),
            ready: Notify::new(),
            max_bytes,
            max_fds,
            dropped: AtomicU64::new(0),
            fds_ok,
            last_progress: AtomicU64::new(now_ms()),
            drained: Notify::new(),
            no_wait_until: AtomicU64::new(0),
            incoming: Arc::new(Incoming::new(usize::MAX)),
        }
    }

    /// This peer's messages may have at most `max` bytes queued for others
    /// before its reader stops (max_incoming_bytes).
    pub(crate) fn limit_incoming(mut self, max: usize) -> Self {
        self.incoming = Arc::new(Incoming::new(max));
        self
    }

    /// `push_charged`, charged to nobody.
    #[cfg(test)]
    pub(crate) fn push(&self, msg: Message) -> Result<bool, PushError> {
        self.push_charged(msg, None)
    }

    /// Queue `msg`, unless that would pass the limits. A single message larger
    /// than the limit is still accepted into an empty queue, so that a peer
    /// that reads can always receive anything the bus accepted. Returns
    /// whether a sender should now wait for this queue (see `wait_drained`).
    /// With `charge`, the message counts against its sender's `Incoming`
    /// until it leaves this queue.
    pub(crate) fn push_charged(
        &self,
        msg: Message,
        charge: Option<&Arc<Incoming>>,
    ) -> Result<bool, PushError> {
        let len = msg.data().len();
        let fds = msg.data().fds().len();
        if fds > 0 && !self.fds_ok {
            return Err(PushError::NoFds);
        }
        let half_full = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.closed {
                return Err(PushError::Closed);
            }
            let over = q.bytes + len > self.max_bytes || q.fds + fds > self.max_fds;
            if over && !q.messages.is_empty() {
                return Err(PushError::Full);
            }
            if q.bytes == 0 {
                self.last_progress.store(now_ms(), Ordering::Relaxed);
            }
            q.bytes += len;
            q.fds += fds;
            let charge = charge.map(|to| {
                to.bytes.fetch_add(len, Ordering::Relaxed);
                Charge {
                    to: to.clone(),
                    bytes: len,
                }
            });
            q.messages.push_back(Entry {
                msg,
                _charge: charge,
            });
            q.bytes > self.max_bytes / 2
        };
        self.ready.notify_one();
        // More than half full and still moving: backpressure rather than
        // dropped broadcasts.
        Ok(half_full && !self.stuck() && now_ms() >= self.no_wait_until.load(Ordering::Relaxed))
    }

    /// Queue `msg`, counting it as dropped when it does not fit.
    pub(crate) fn push_counted(
        &self,
        msg: Message,
        charge: Option<&Arc<Incoming>>,
    ) -> Result<bool, PushError> {
        let r = self.push_charged(msg, charge);
        if r.is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Wait for queued messages and move them all into `batch`. Returns false
    /// once the outbox is closed and empty.
    pub(crate) async fn next_batch(&self, batch: &mut Vec<Message>) -> bool {
        loop {
            {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                if !q.messages.is_empty() {
                    // Taken by the writer: the senders' charges end here.
                    batch.extend(q.messages.drain(..).map(|e| e.msg));
                    return true;
                }
                if q.closed {
                    return false;
                }
                // About to wait: an idle peer keeps no buffer, neither the
                // queue's nor the writer's.
                q.messages = VecDeque::new();
                *batch = Vec::new();
            }
            self.ready.notified().await;
        }
    }

    /// Account for messages that have left through the socket. The bytes
    /// stay counted while being written, so that a peer stuck mid-write
    /// still counts as full.
    pub(crate) fn sent(&self, batch: &[Message]) {
        let (bytes, fds) = batch.iter().fold((0, 0), |(b, f), m| {
            (b + m.data().len(), f + m.data().fds().len())
        });
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.bytes = q.bytes.saturating_sub(bytes);
            q.fds = q.fds.saturating_sub(fds);
        }
        self.last_progress.store(now_ms(), Ordering::Relaxed);
        self.drained.notify_waiters();
    }

    fn stuck(&self) -> bool {
        now_ms().saturating_sub(self.last_progress.load(Ordering::Relaxed)) > STUCK_MS
    }

    /// Wait until the queue is down to a quarter, the peer turns out stuck,
    /// or it is closed. Never longer than the stuck threshold without progress.
    pub(crate) async fn wait_drained(&self) {
        let started = now_ms();
        loop {
            {
                let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                if q.closed || q.bytes <= self.max_bytes / 4 {
                    return;
                }
            }
            if self.stuck() {
                return;
            }
            if now_ms().saturating_sub(started) > WAIT_BUDGET_MS {
                self.no_wait_until
                    .store(now_ms() + SLOW_PENALTY_MS, Ordering::Relaxed);
                return;
            }
            let _ = tokio::time::timeout(
                std::time::Duration::from_millis(50),
                self.drained.notified(),
            )
            .await;
        }
    }

    /// Refuse further messages; the writer flushes what is queued, then ends.
    pub(crate) fn close(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.ready.notify_one();
    }

    pub(crate) fn fds_ok(&self) -> bool {
        self.fds_ok
    }

    /// Messages, bytes and fds waiting to be written.
    pub(crate) fn queued(&self) -> (usize, usize, usize) {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        (q.messages.len(), q.bytes, q.fds)
    }

    pub(crate) fn queued_bytes(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Outbox({} bytes)", self.queued_bytes())
    }
}

/// The peer's socket, shared by its tasks and the router: cutting it
/// (shutdown) wakes the reader and a writer blocked in a write with an
/// error, from anywhere.
pub(crate) struct Cutter(std::sync::Arc<tokio::net::UnixStream>);

impl Cutter {
    pub(crate) fn new(stream: std::sync::Arc<tokio::net::UnixStream>) -> Self {
        Cutter(stream)
    }

    pub(crate) fn cut(&self) {
        use std::os::fd::AsRawFd;
        let _ = nix::sys::socket::shutdown(self.0.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }

    /// The peer's supplementary groups as the kernel recorded them when it
    /// connected (SO_PEERGROUPS, Linux 4.13+), as dbus-daemon reads them: the
    /// groups the process really had, with no user database lookup.
    pub(crate) fn groups(&self) -> Option<Vec<u32>> {
        use std::os::fd::AsRawFd;
        const GID: usize = std::mem::size_of::<libc::gid_t>();
        let mut buf: Vec<libc::gid_t> = vec![0; 64];
        loop {
            let mut len = (buf.len() * GID) as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes, the size of
            // `buf`, and sets `len` to what it wrote (or, with ERANGE, to
            // what it needs). nix has no SO_PEERGROUPS.
            let r = unsafe {
                libc::getsockopt(
                    self.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_PEERGROUPS,
                    buf.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            if r == 0 {
                buf.truncate(len as usize / GID);
                return Some(buf);
            }
            let needed = len as usize / GID;
            if nix::errno::Errno::last() != nix::errno::Errno::ERANGE || needed <= buf.len() {
                return None;
            }
            buf.resize(needed, 0);
        }
    }

    /// A pidfd of the peer process (SO_PEERPIDFD), fetched when asked for.
    pub(crate) fn pidfd(&self) -> Option<std::os::fd::OwnedFd> {
        nix::sys::socket::getsockopt(&*self.0, nix::sys::socket::sockopt::PeerPidfd).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(len: usize) -> Message {
        Message::method_call("/", "M")
            .build(&(vec![0u8; len],))
            .unwrap()
    }

    fn fd_msg() -> Message {
        let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        Message::method_call("/", "M")
            .build(&(crate::wire::Fd::from(fd),))
            .unwrap()
    }

    #[tokio::test]
    async fn a_batch_takes_everything_queued_in_order() {
        let o = Outbox::new(1 << 20, 16, true);
        for n in 1..=3 {
            o.push(msg(n)).unwrap();
        }
        let mut batch = Vec::new();
        assert!(o.next_batch(&mut batch).await);
        let lens: Vec<usize> = batch.iter().map(|m| m.body().len()).collect();
        assert_eq!(lens, [4 + 1, 4 + 2, 4 + 3]);
        // Bytes stay counted until written.
        assert!(o.queued_bytes() > 0);
        o.sent(&batch);
        assert_eq!(o.queued_bytes(), 0);
    }

    #[test]
    fn the_byte_limit_refuses_but_an_empty_queue_takes_anything() {
        let o = Outbox::new(100, 16, true);
        assert_eq!(o.push(msg(500)), Ok(true), "alone it fits, and presses");
        assert_eq!(o.push(msg(1)), Err(PushError::Full));
        assert_eq!(o.push_counted(msg(1), None), Err(PushError::Full));
        assert_eq!(o.dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn fds_only_for_peers_that_negotiated_them() {
        let no = Outbox::new(1 << 20, 16, false);
        assert_eq!(no.push(fd_msg()), Err(PushError::NoFds));
        let yes = Outbox::new(1 << 20, 1, true);
        assert!(yes.push(fd_msg()).is_ok());
        assert_eq!(yes.push(fd_msg()), Err(PushError::Full), "max_fds is 1");
    }

    #[test]
    fn half_full_asks_the_sender_to_wait() {
        let o = Outbox::new(1000, 16, true);
        let small = msg(100);
        let size = small.data().len();
        let mut pressed = false;
        for _ in 0..(500 / size + 1) {
            pressed = o.push(small.clone()).unwrap();
        }
        assert!(pressed, "more than half of 1000 bytes queued");
    }

    #[tokio::test]
    async fn closing_refuses_new_messages_and_ends_the_writer_once_empty() {
        let o = Outbox::new(1 << 20, 16, true);
        o.push(msg(1)).unwrap();
        o.close();
        assert_eq!(o.push(msg(1)), Err(PushError::Closed));
        let mut batch = Vec::new();
        assert!(
            o.next_batch(&mut batch).await,
            "what was queued still goes out"
        );
        batch.clear();
        assert!(!o.next_batch(&mut batch).await);
    }

    #[tokio::test]
    async fn a_wait_for_a_stuck_queue_is_bounded() {
        let o = Outbox::new(1000, 16, true);
        o.push(msg(900)).unwrap();
        let started = std::time::Instant::now();
        o.wait_drained().await;
        let waited = started.elapsed().as_millis() as u64;
        assert!(waited <= WAIT_BUDGET_MS + 200, "waited {waited} ms");
    }

    #[tokio::test]
    async fn a_charge_lasts_until_the_writer_takes_the_message_or_the_queue_goes() {
        let sender = Arc::new(Incoming::new(100));
        let o = Outbox::new(1 << 20, 16, true);
        o.push_charged(msg(200), Some(&sender)).unwrap();
        assert!(sender.over());
        let mut batch = Vec::new();
        assert!(o.next_batch(&mut batch).await);
        assert!(!sender.over());
        sender.wait_within().await;
        let o = Outbox::new(1 << 20, 16, true);
        o.push_charged(msg(200), Some(&sender)).unwrap();
        assert!(sender.over());
        drop(o);
        assert!(!sender.over());
    }
}
