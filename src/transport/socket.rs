//! Reading and writing D-Bus messages on a peer's socket.
//!
//! Reading implements zbus's `ReadHalf::recvmsg`, so that zbus's own
//! `receive_message` frames and parses each message (safely, with its header
//! checks); writing sends the bytes of queued messages with `sendmsg`,
//! several messages per call, and their fds as SCM_RIGHTS.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::time::Instant;
use zbus::message::Message;

/// What the reader enforces for its connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadLimits {
    /// A longer declared message ends the connection before any of its
    /// body is read, as dbus-daemon's loader does.
    pub max_message_size: u64,
    /// How long fds may wait for the end of the message they came with.
    pub pending_fd_timeout: Duration,
    /// The client negotiated fd passing; without it fds are never taken
    /// from the socket (the kernel closes them), as dbus-daemon reads.
    pub fds: bool,
}

/// The read side of a peer's socket: frames, filters, stamps and parses
/// each message itself, so that nothing is committed before bytes arrive.
///
/// Bytes are read ahead into a buffer whose size follows the traffic: it
/// doubles while reads fill it (a peer with a backlog gets up to
/// `MAX_AHEAD` per system call), and it is freed whenever everything in it
/// was handed out before the bus waits on the socket (an idle peer holds no
/// buffer). Each message is copied once out of it into a buffer of its
/// own, its header rewritten on the way (unknown fields removed, the
/// sender stamped), so the body is never copied twice. The rest of a
/// message longer than what was read ahead is read straight into its
/// buffer, together with what follows it (two iovecs, one system call); a
/// message's buffer grows as its bytes arrive: a declared length commits
/// no memory.
///
/// File descriptors are kept in arrival order, as dbus-daemon's loader
/// keeps them, and each message takes as many as its UNIX_FDS field says.
/// Fds travel with the first byte of the data they were sent with, so once
/// every byte of the read that brought them is in complete messages, fds
/// no message took never will be: they are closed.
#[derive(Debug)]
pub(crate) struct Reader {
    stream: Arc<UnixStream>,
    limits: ReadLimits,
    /// Bytes read ahead; `buf[pos..]` are not handed out yet.
    buf: Vec<u8>,
    pos: usize,
    /// How much the next read ahead asks for.
    ahead: usize,
    /// Stream offset of the end of what was read from the socket.
    read: u64,
    /// Received fds no message has taken yet.
    fds: Vec<OwnedFd>,
    /// Stream offset of the end of the read that brought the last of `fds`.
    fds_until: u64,
    /// When `fds` stopped being empty: pending_fd_timeout runs from there.
    fds_since: Option<Instant>,
    /// Some bytes of a message were taken and not all of them.
    partial: bool,
    /// The peer's unique name, stamped as the sender of each message read
    /// once it is set (after Hello).
    sender: Option<Box<str>>,
}

/// The spec's longest message (2^27 bytes).
const MAX_MESSAGE_LEN: u64 = 1 << 27;

/// A message buffer's first size when the message is longer, and its
/// least growth step after that.
const GROW_MIN: usize = 64 * 1024;

/// The first read ahead, and the least.
const CHUNK: usize = 4096;

/// The largest read ahead.
const MAX_AHEAD: usize = 64 * 1024;

fn invalid(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why)
}

/// Up to `n` bytes appended to `v` by a `recvmsg` into its spare capacity.
struct Room<'a> {
    v: &'a mut Vec<u8>,
    n: usize,
}

impl Room<'_> {
    fn iovec(&mut self) -> libc::iovec {
        let spare = self.v.spare_capacity_mut();
        self.n = self.n.min(spare.len());
        libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: self.n,
        }
    }

    /// The kernel wrote `got` bytes (at most `n`) at the start of the room.
    fn commit(&mut self, got: usize) {
        assert!(got <= self.n);
        // SAFETY: `iovec` handed recvmsg `n` bytes of `v`'s spare capacity,
        // and recvmsg wrote the first `got` of them: they are initialised.
        unsafe { self.v.set_len(self.v.len() + got) };
    }
}

impl Reader {
    /// `leftover`: the bytes read with the handshake, past BEGIN.
    pub(crate) fn new(stream: Arc<UnixStream>, limits: ReadLimits, leftover: Vec<u8>) -> Self {
        Reader {
            stream,
            limits,
            read: leftover.len() as u64,
            buf: leftover,
            pos: 0,
            ahead: CHUNK,
            fds: Vec::new(),
            fds_until: 0,
            fds_since: None,
            partial: false,
            sender: None,
        }
    }

    /// Stamp `name` as the sender of every message read from now on.
    pub(crate) fn stamp(&mut self, name: &str) {
        self.sender = Some(name.into());
    }

    /// Whether everything handed out so far ends at a message boundary: an
    /// end of stream here is the peer closing, not a truncated message.
    pub(crate) fn at_message_boundary(&self) -> bool {
        !self.partial
    }

    /// The next message the bus should see, its sender stamped once
    /// `stamp` was called. Messages of a type the specification does not
    /// define are read and dropped, as it asks. Errors are protocol errors
    /// or the end of the stream: the caller ends the connection.
    pub(crate) async fn receive(&mut self) -> std::io::Result<Message> {
        loop {
            self.want(16).await?;
            self.partial = true;
            let head: [u8; 16] = self.buf[self.pos..self.pos + 16]
                .try_into()
                .expect("16 bytes");
            let (header_end, total) = self.frame(&head)?;
            self.want(header_end).await?;
            let known = matches!(head[1], 1..=4);
            // An unknown-type message is checked and dropped: no stamp.
            let sender = self.sender.as_deref().filter(|_| known);
            let body_len = total - header_end;
            let ready = (self.buf.len() - self.pos - header_end).min(body_len);
            let stamp_room = sender.map_or(0, |s| s.len() + 16);
            let mut out =
                Vec::with_capacity(header_end + stamp_room + body_len.min(ready.max(GROW_MIN)));
            let header = &self.buf[self.pos..self.pos + header_end];
            let rewritten = crate::wire::args::rewrite_header(header, sender, &mut out)
                .ok_or_else(|| invalid("malformed header".into()))?;
            // Fields the bus does not understand went, as dbus-daemon 1.14
            // filters them (zbus's parser would refuse the message); their
            // values must still be well-formed.
            if rewritten.dropped && !crate::wire::header_well_formed(header) {
                return Err(invalid("malformed header field".into()));
            }
            self.advance(header_end);
            let total = out.len() + body_len;
            if total as u64 > MAX_MESSAGE_LEN {
                return Err(invalid(format!("message of {total} bytes is too long")));
            }
            self.fill(&mut out, total).await?;
            self.partial = false;
            let fds = self.take_fds(rewritten.unix_fds)?;
            if !known && head[1] != 0 {
                if !crate::wire::well_formed_unknown(&out) {
                    return Err(invalid(format!("malformed message of type {}", head[1])));
                }
                tracing::debug!("ignored a message of unknown type {}", head[1]);
                continue;
            }
            let endian = if head[0] == b'B' {
                zbus::wire::Endian::Big
            } else {
                zbus::wire::Endian::Little
            };
            let ctxt = zbus::wire::serialized::Context::new(endian, 0);
            let data = zbus::wire::serialized::Data::new_fds(out, ctxt, fds);
            // SAFETY: `from_bytes` is unsafe only because the bytes may be
            // badly encoded; it runs zbus's parser and whole-message checks
            // on them, the same as zbus's own `receive_message`, and a bad
            // encoding is an error here.
            return unsafe { Message::from_bytes(data) }.map_err(|e| invalid(e.to_string()));
        }
    }

    /// The header length (to the body's alignment) and the total length of
    /// the message `head` starts, checked against the limits before
    /// anything is allocated for it.
    fn frame(&self, head: &[u8; 16]) -> std::io::Result<(usize, usize)> {
        let big = match head[0] {
            b'l' => false,
            b'B' => true,
            b => return Err(invalid(format!("bad byte order mark {b:#x}"))),
        };
        let u32_at = |at: usize| {
            let x = [head[at], head[at + 1], head[at + 2], head[at + 3]];
            u64::from(if big {
                u32::from_be_bytes(x)
            } else {
                u32::from_le_bytes(x)
            })
        };
        let header_end = (16 + u32_at(12)).next_multiple_of(8);
        let total = header_end + u32_at(4);
        let limit = self.limits.max_message_size.min(MAX_MESSAGE_LEN);
        if total > limit {
            return Err(invalid(format!(
                "message of {total} bytes is longer than the limit of {limit}"
            )));
        }
        // Both fit: total <= 2^27.
        Ok((header_end as usize, total as usize))
    }

    /// Take the `n` fds the message just read declares; close those that no
    /// message can still claim.
    fn take_fds(&mut self, n: u32) -> std::io::Result<Vec<OwnedFd>> {
        let n = n as usize;
        if n > self.fds.len() {
            return Err(invalid(if self.limits.fds {
                format!("message declares {n} fds, {} came", self.fds.len())
            } else {
                format!("message declares {n} fds, and fd passing was not negotiated")
            }));
        }
        let taken = if n == self.fds.len() {
            std::mem::take(&mut self.fds)
        } else {
            self.fds.drain(..n).collect()
        };
        let at = self.read - (self.buf.len() - self.pos) as u64;
        if !self.fds.is_empty() && self.fds_until <= at {
            tracing::debug!("closed {} fds no message declared", self.fds.len());
            self.fds.clear();
        }
        if self.fds.is_empty() {
            self.fds_since = None;
        }
        Ok(taken)
    }

    /// Have at least `n` bytes read ahead. A header longer than what was
    /// read grows the buffer at most by what arrived (doubling).
    async fn want(&mut self, n: usize) -> std::io::Result<()> {
        while self.buf.len() - self.pos < n {
            let have = self.buf.len() - self.pos;
            let ask = self.ahead.max((n - have).min(have.max(CHUNK)));
            self.read_ahead(None, ask).await?;
        }
        Ok(())
    }

    /// Fill `out` up to `want` bytes: what was read ahead first, then
    /// straight from the socket, with a read ahead behind it.
    async fn fill(&mut self, out: &mut Vec<u8>, want: usize) -> std::io::Result<()> {
        loop {
            // What a read brought past the room it had is read ahead.
            let n = (want - out.len()).min(self.buf.len() - self.pos);
            out.extend_from_slice(&self.buf[self.pos..self.pos + n]);
            self.advance(n);
            if out.len() == want {
                return Ok(());
            }
            // Its buffer grows by doubling as bytes arrive, never past its length.
            if out.len() == out.capacity() {
                out.reserve_exact((want - out.len()).min(out.len().max(GROW_MIN)));
            }
            let room = (want - out.len()).min(out.capacity() - out.len());
            self.read_ahead(Some((out, room)), self.ahead).await?;
        }
    }

    /// Hand out `n` bytes of what was read ahead.
    fn advance(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.buf.len() {
            // Everything handed out: the room is reused, or freed before
            // the next wait.
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// One read from the socket, waiting for it: first into `direct`'s
    /// room (the rest of a message, into its own buffer), then up to
    /// `ahead` bytes into the read-ahead buffer. The socket's end is an
    /// error (UnexpectedEof).
    async fn read_ahead(
        &mut self,
        mut direct: Option<(&mut Vec<u8>, usize)>,
        ahead: usize,
    ) -> std::io::Result<()> {
        let fd = self.stream.as_raw_fd();
        let want_fds = self.limits.fds;
        loop {
            if self.pos == self.buf.len() {
                // Nothing pending: an idle peer holds no buffer.
                self.buf = Vec::new();
                self.pos = 0;
            }
            self.readable().await?;
            // Allocated after the wait: only the room to read into.
            if self.pos > 0 && self.buf.capacity() - self.buf.len() < ahead {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            self.buf.reserve_exact(ahead);
            let mut room = Room {
                v: &mut self.buf,
                n: ahead,
            };
            let mut first = direct.as_mut().map(|(v, n)| Room { v, n: *n });
            let mut got = None;
            let r = self.stream.try_io(Interest::READABLE, || {
                let mut iov = [room.iovec(), room.iovec()];
                let iov: &mut [libc::iovec] = match first.as_mut() {
                    Some(d) => {
                        iov[0] = d.iovec();
                        &mut iov
                    }
                    None => &mut iov[..1],
                };
                let asked: usize = iov.iter().map(|v| v.iov_len).sum();
                let (n, fds) = recv_now(fd, iov, want_fds)?;
                // A short read without fds emptied the socket: report it
                // drained, so that the next read waits for the next edge
                // instead of spending a recvmsg on EAGAIN (bytes that
                // arrive later raise a new edge). One system call less per
                // message. With fds it proves nothing: the kernel ends a
                // read after the data that carried them. (Nothing else ends
                // a unix stream read early but SO_PASSCRED, which busvisor
                // does not set, and out-of-band data, which delays only the
                // client that sends it.)
                let drained = n > 0 && n < asked && fds.is_empty();
                got = Some((n, fds));
                if drained {
                    Err(std::io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            match (r, got) {
                (_, Some((0, _))) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                (_, Some((n, fds))) => {
                    self.read += n as u64;
                    let direct_n = first.as_ref().map_or(0, |d| d.n.min(n));
                    if let Some(d) = first.as_mut() {
                        d.commit(direct_n);
                    }
                    let rest = n - direct_n;
                    room.commit(rest);
                    // Reads that fill the read ahead ask for more next
                    // time, and half-empty ones for less.
                    if rest == room.n && room.n >= self.ahead {
                        self.ahead = (self.ahead * 2).min(MAX_AHEAD);
                    } else if rest < room.n / 2 {
                        self.ahead = (self.ahead / 2).max(CHUNK);
                    }
                    if !fds.is_empty() {
                        if self.fds.is_empty() {
                            self.fds_since = Some(Instant::now());
                        }
                        self.fds.extend(fds);
                        self.fds_until = self.read;
                    }
                    return Ok(());
                }
                (Err(e), None) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                (Err(e), None) => return Err(e),
                (Ok(()), None) => continue,
            }
        }
    }

    /// The socket's readiness; while fds wait for the rest of their
    /// message, no longer than pending_fd_timeout from their arrival (as
    /// dbus-daemon's pending_unix_fds_timeout_cb disconnects).
    async fn readable(&self) -> std::io::Result<()> {
        let Some(since) = self.fds_since else {
            return self.stream.readable().await;
        };
        let until = since + self.limits.pending_fd_timeout;
        // Boxed: a timer is large, and rarely armed (an idle peer's task
        // keeps room for its largest state).
        match Box::pin(tokio::time::timeout_at(until, self.stream.readable())).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "held fds for an incomplete message longer than pending_fd_timeout",
            )),
        }
    }
}

/// The most fds one read may bring (the kernel's SCM_MAX_FD); the router
/// enforces max_message_unix_fds.
const MAX_FDS_PER_READ: usize = 253;

/// Control buffer room for MAX_FDS_PER_READ fds: CMSG_SPACE(253 * 4) is
/// 1032 bytes on Linux; in u64 words so that it is aligned for cmsghdr.
const CMSG_WORDS: usize = (16 + MAX_FDS_PER_READ * 4).div_ceil(8) + 1;

/// One `recvmsg`. With `want_fds` false no control buffer is given, so the
/// kernel closes any fds sent (a client that did not negotiate them cannot
/// make the bus hold them). libc rather than nix: nix reports a truncated
/// control buffer as an error before handing out the fds that did arrive,
/// which then stay open for good.
fn recv_now(
    fd: RawFd,
    iov: &mut [libc::iovec],
    want_fds: bool,
) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    // On the stack: no allocation per read.
    let mut space = [0u64; CMSG_WORDS];
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = iov.as_mut_ptr();
    mh.msg_iovlen = iov.len() as _;
    if want_fds {
        mh.msg_control = space.as_mut_ptr().cast();
        mh.msg_controllen = std::mem::size_of_val(&space) as _;
    }
    // SAFETY: `mh` points at `iov` (each over writable memory of its
    // caller's, alive for the call) and `space`.
    let n = unsafe { libc::recvmsg(fd, &mut mh, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel wrote well-formed cmsghdrs into `space`, within
    // `msg_controllen`, which the CMSG_* macros walk; SCM_RIGHTS data is
    // an array of ints, each an fd just installed in our table that
    // nothing else refers to, so it is owned here.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..len / std::mem::size_of::<libc::c_int>() {
                    let raw = std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    if want_fds && mh.msg_flags & libc::MSG_CTRUNC != 0 {
        // Some fds were lost on the way (the bus's fd limit, say): no
        // message can be matched with its fds any more. dbus-daemon closes
        // those that came and drops the connection
        // (`_dbus_read_socket_with_unix_fds`).
        drop(fds);
        return Err(invalid("control data truncated (MSG_CTRUNC)".into()));
    }
    Ok((n as usize, fds))
}

/// Write `msgs` in order: as many messages per `sendmsg` as fit in 16
/// buffers, a message with fds always first in its call (fds travel with the
/// first byte). Partial writes continue where they stopped.
pub async fn write_all(stream: &UnixStream, msgs: &[Message]) -> std::io::Result<()> {
    let fd = stream.as_raw_fd();
    let mut i = 0;
    while i < msgs.len() {
        // This call: msgs[i], then following messages without fds.
        let mut end = i + 1;
        while end < msgs.len() && end - i < PER_CALL && msgs[end].data().fds().is_empty() {
            end += 1;
        }
        let raw_fds: Vec<RawFd> = msgs[i].data().fds().iter().map(|f| f.as_raw_fd()).collect();
        let mut offset = 0usize; // bytes of msgs[i..end] already written
        let total: usize = msgs[i..end].iter().map(|m| m.data().len()).sum();
        let mut fds_sent = raw_fds.is_empty();
        while offset < total {
            let rights = [ControlMessage::ScmRights(&raw_fds)];
            let cmsgs: &[ControlMessage<'_>] = if fds_sent { &[] } else { &rights };
            let batch = &msgs[i..end];
            let n = stream
                .async_io(Interest::WRITABLE, || {
                    // Built on the stack of each attempt, not kept in the
                    // writer's future (which an idle peer's task holds).
                    let mut buffers = [IoSlice::new(&[]); PER_CALL];
                    let slices = unwritten(batch, offset, &mut buffers);
                    sendmsg::<UnixAddr>(fd, slices, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                        .map_err(std::io::Error::from)
                })
                .await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            fds_sent = true;
            offset += n;
        }
        i = end;
    }
    Ok(())
}

/// The most messages one `sendmsg` carries.
const PER_CALL: usize = 16;

/// The bytes of `msgs` past the first `offset`, in `buffers`.
fn unwritten<'a, 'b>(
    msgs: &'a [Message],
    offset: usize,
    buffers: &'b mut [IoSlice<'a>; PER_CALL],
) -> &'b [IoSlice<'a>] {
    let mut used = 0;
    let mut skip = offset;
    for m in msgs {
        let bytes: &[u8] = m.data();
        if skip >= bytes.len() {
            skip -= bytes.len();
            continue;
        }
        buffers[used] = IoSlice::new(&bytes[skip..]);
        used += 1;
        skip = 0;
    }
    &buffers[..used]
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::wire::Fd;

    fn call(fds: bool) -> Message {
        let b = Message::method_call("/a", "M")
            .destination("x.y")
            .interface("x.y");
        if fds {
            let out = std::io::stdout();
            b.build(&(Fd::from(&out), "s")).unwrap()
        } else {
            b.build(&("s", 7u32)).unwrap()
        }
    }

    #[test]
    fn finds_unix_fds_field() {
        let fds = |m: &Message| {
            let mut out = Vec::new();
            crate::wire::args::rewrite_header(m.data(), None, &mut out).map(|r| r.unix_fds)
        };
        assert_eq!(fds(&call(false)), Some(0));
        assert_eq!(fds(&call(true)), Some(1));
        let m = call(true);
        let mut out = Vec::new();
        assert!(crate::wire::args::rewrite_header(&m.data()[..20], None, &mut out).is_none());
    }

    fn limits() -> ReadLimits {
        ReadLimits {
            max_message_size: 1 << 27,
            pending_fd_timeout: Duration::from_secs(1),
            fds: false,
        }
    }

    /// Messages of every size, back to back, some split across reads,
    /// come out whole, in order, with their sender stamped.
    #[tokio::test]
    async fn messages_longer_than_a_read_ahead_come_whole_and_stamped() {
        let sizes = [0usize, 10, 4000, 4096, 70_000, 300_000, 5, 2_000_000, 1];
        let msgs: Vec<Message> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Message::method_call("/a", "M")
                    .destination("x.y")
                    .sender(":1.99")
                    .build(&(i as u32, vec![i as u8; *n]))
                    .unwrap()
            })
            .collect();
        let (a, b) = UnixStream::pair().unwrap();
        let wire: Vec<u8> = msgs.iter().flat_map(|m| m.data().to_vec()).collect();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut a = a;
            // In uneven pieces, so that reads fall anywhere.
            for piece in wire.chunks(12_345) {
                a.write_all(piece).await.unwrap();
            }
            a
        });
        let mut r = Reader::new(Arc::new(b), limits(), Vec::new());
        r.stamp(":1.7");
        for (i, n) in sizes.iter().enumerate() {
            let m = r.receive().await.unwrap();
            assert_eq!(m.header().sender().unwrap().as_str(), ":1.7");
            let (k, body): (u32, Vec<u8>) = m.body().deserialize().unwrap();
            assert_eq!((k as usize, body.len()), (i, *n));
            assert!(body.iter().all(|b| *b == i as u8));
        }
        assert!(r.at_message_boundary());
        let a = writer.await.unwrap();
        // Waiting on an idle peer: no buffer held.
        let wait = tokio::time::timeout(Duration::from_millis(20), r.receive()).await;
        assert!(wait.is_err());
        assert_eq!(r.buf.capacity(), 0);
        drop(a);
        let end = r.receive().await.unwrap_err();
        assert_eq!(end.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
