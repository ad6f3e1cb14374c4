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

/// The read side of a peer's socket: frames, filters and parses each
/// message itself, so that nothing is committed before bytes arrive.
///
/// Small reads are served from a chunk read ahead (one system call serves
/// several small messages), and the chunk is freed once served (an idle
/// peer holds no buffer). A message longer than a chunk is read straight
/// into its own buffer, which grows as its bytes arrive: a declared length
/// commits no memory.
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
    chunk: Vec<u8>,
    /// Next byte of `chunk` to hand out.
    pos: usize,
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
}

/// The spec's longest message (2^27 bytes).
const MAX_MESSAGE_LEN: u64 = 1 << 27;

/// A message buffer's first size when the message is longer, and its
/// least growth step after that.
const GROW_MIN: usize = 64 * 1024;

fn invalid(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why)
}

impl Reader {
    /// `leftover`: the bytes read with the handshake, past BEGIN.
    pub(crate) fn new(stream: Arc<UnixStream>, limits: ReadLimits, leftover: Vec<u8>) -> Self {
        Reader {
            stream,
            limits,
            read: leftover.len() as u64,
            chunk: leftover,
            pos: 0,
            fds: Vec::new(),
            fds_until: 0,
            fds_since: None,
            partial: false,
        }
    }

    /// Whether everything handed out so far ends at a message boundary: an
    /// end of stream here is the peer closing, not a truncated message.
    pub(crate) fn at_message_boundary(&self) -> bool {
        !self.partial
    }

    /// The next message the bus should see. Messages of a type the
    /// specification does not define are read and dropped, as it asks.
    /// Errors are protocol errors or the end of the stream: the caller
    /// ends the connection.
    pub(crate) async fn receive(&mut self) -> std::io::Result<Message> {
        loop {
            let mut head = [0u8; 16];
            self.fill_small(&mut head).await?;
            let (header_end, total) = self.frame(&head)?;
            let mut out = Vec::with_capacity(total.min(GROW_MIN));
            out.extend_from_slice(&head);
            let mut filled = out.len();
            self.fill(&mut out, &mut filled, header_end).await?;
            let mut total = total;
            // Fields the bus does not understand go, as dbus-daemon 1.14
            // filters them (zbus's parser would refuse the message). The
            // whole header is in, wherever the reads fell.
            if let Some((old, new)) = crate::wire::args::filter_header(&out) {
                // Their values must still be well-formed.
                if !crate::wire::header_well_formed(&out) {
                    return Err(invalid("malformed header field".into()));
                }
                total = total - old + new.len();
                out.clear();
                out.extend_from_slice(&new);
                filled = out.len();
            }
            self.fill(&mut out, &mut filled, total).await?;
            self.partial = false;
            let fds = self.take_fds(unix_fds(&out).unwrap_or(0))?;
            if !matches!(head[1], 1..=4) && head[1] != 0 {
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
        let at = self.read - (self.chunk.len() - self.pos) as u64;
        if !self.fds.is_empty() && self.fds_until <= at {
            tracing::debug!("closed {} fds no message declared", self.fds.len());
            self.fds.clear();
        }
        if self.fds.is_empty() {
            self.fds_since = None;
        }
        Ok(taken)
    }

    /// Fill `dst` from the chunk (and the socket behind it).
    async fn fill_small(&mut self, dst: &mut [u8]) -> std::io::Result<()> {
        let mut got = 0;
        while got < dst.len() {
            if self.pos >= self.chunk.len() {
                self.read_chunk().await?;
            }
            self.partial = true;
            let n = (dst.len() - got).min(self.chunk.len() - self.pos);
            dst[got..got + n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
            got += n;
            self.advance(n);
        }
        Ok(())
    }

    /// Fill `out` up to `want` bytes; `filled` of them are in, the rest of
    /// `out.len()` is zeroed room (kept between reads, so that a peer
    /// trickling bytes does not make the bus zero the same room again).
    async fn fill(
        &mut self,
        out: &mut Vec<u8>,
        filled: &mut usize,
        want: usize,
    ) -> std::io::Result<()> {
        while *filled < want {
            if self.pos < self.chunk.len() {
                let n = (want - *filled).min(self.chunk.len() - self.pos);
                if out.len() < *filled + n {
                    out.resize(*filled + n, 0);
                }
                out[*filled..*filled + n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
                *filled += n;
                self.advance(n);
                continue;
            }
            if want - *filled < CHUNK {
                self.read_chunk().await?;
                continue;
            }
            // A big message: straight into place, its buffer growing by
            // doubling as bytes arrive, never past its length.
            if *filled == out.len() {
                let step = (want - *filled).min((*filled).max(GROW_MIN));
                out.reserve_exact(step);
                out.resize(*filled + step, 0);
            }
            let n = self.recv(&mut out[*filled..]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            *filled += n;
        }
        out.truncate(*filled);
        Ok(())
    }

    fn advance(&mut self, n: usize) {
        self.pos += n;
        if self.pos >= self.chunk.len() {
            // Served: freed, so that an idle peer holds no buffer.
            self.chunk = Vec::new();
            self.pos = 0;
        }
    }

    /// Read a chunk ahead; the socket's end is an error (UnexpectedEof).
    async fn read_chunk(&mut self) -> std::io::Result<()> {
        // Wait first, allocate after: an idle peer holds no buffer.
        self.readable().await?;
        let mut chunk = vec![0u8; CHUNK];
        let n = self.recv(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        chunk.truncate(n);
        self.chunk = chunk;
        self.pos = 0;
        Ok(())
    }

    /// The socket's readiness; while fds wait for the rest of their
    /// message, no longer than pending_fd_timeout from their arrival (as
    /// dbus-daemon's pending_unix_fds_timeout_cb disconnects).
    async fn readable(&self) -> std::io::Result<()> {
        let Some(since) = self.fds_since else {
            return self.stream.readable().await;
        };
        let until = since + self.limits.pending_fd_timeout;
        match tokio::time::timeout_at(until, self.stream.readable()).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "held fds for an incomplete message longer than pending_fd_timeout",
            )),
        }
    }

    /// One read into `buf`; received fds join the queue.
    async fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let fd = self.stream.as_raw_fd();
        let want_fds = self.limits.fds;
        loop {
            self.readable().await?;
            let mut got = None;
            let r = self.stream.try_io(Interest::READABLE, || {
                let (n, fds) = recv_now(fd, buf, want_fds)?;
                // A short read without fds emptied the socket: report it
                // drained, so that the next read waits for the next edge
                // instead of spending a recvmsg on EAGAIN (bytes that
                // arrive later raise a new edge). One system call less per
                // message. With fds it proves nothing: the kernel ends a
                // read after the data that carried them. (Nothing else ends
                // a unix stream read early but SO_PASSCRED, which busvisor
                // does not set, and out-of-band data, which delays only the
                // client that sends it.)
                let drained = n > 0 && n < buf.len() && fds.is_empty();
                got = Some((n, fds));
                if drained {
                    Err(std::io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            match (r, got) {
                (_, Some((n, fds))) => {
                    self.read += n as u64;
                    if !fds.is_empty() {
                        if self.fds.is_empty() {
                            self.fds_since = Some(Instant::now());
                        }
                        self.fds.extend(fds);
                        self.fds_until = self.read;
                    }
                    return Ok(n);
                }
                (Err(e), None) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                (Err(e), None) => return Err(e),
                (Ok(()), None) => continue,
            }
        }
    }
}

/// The UNIX_FDS field of the message whose whole header starts `b`; None
/// when the header fields cannot be walked.
fn unix_fds(b: &[u8]) -> Option<u32> {
    let h = b.get(..16)?;
    let big = h[0] == b'B';
    let u32_at = |x: &[u8], at: usize| -> Option<u32> {
        let v: [u8; 4] = x.get(at..at + 4)?.try_into().ok()?;
        Some(if big {
            u32::from_be_bytes(v)
        } else {
            u32::from_le_bytes(v)
        })
    };
    let fields_len = u32_at(h, 12)? as usize;
    let fields = b.get(16..16usize.checked_add(fields_len)?)?;
    // Each field: 8-aligned (BYTE code, SIGNATURE of one type, value).
    let mut i = 0;
    while i < fields.len() {
        i = i.next_multiple_of(8);
        if i >= fields.len() {
            break;
        }
        let code = fields[i];
        let sig_len = *fields.get(i + 1)? as usize;
        let sig = fields.get(i + 2..i + 2 + sig_len)?;
        let mut v = i + 2 + sig_len + 1;
        match sig {
            b"u" => {
                v = v.next_multiple_of(4);
                let n = u32_at(fields, v)?;
                if code == 9 {
                    return Some(n);
                }
                v += 4;
            }
            b"s" | b"o" => {
                v = v.next_multiple_of(4);
                let len = u32_at(fields, v)? as usize;
                v += 4 + len + 1;
            }
            b"g" => {
                let len = *fields.get(v)? as usize;
                v += 1 + len + 1;
            }
            // No header field has another type: zbus refuses the message.
            _ => return None,
        }
        i = v;
    }
    Some(0)
}

/// Reads of this size or more go straight into the message's buffer.
const CHUNK: usize = 4096;

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
fn recv_now(fd: RawFd, buf: &mut [u8], want_fds: bool) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    // On the stack: no allocation per read.
    let mut space = [0u64; CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    if want_fds {
        mh.msg_control = space.as_mut_ptr().cast();
        mh.msg_controllen = std::mem::size_of_val(&space) as _;
    }
    // SAFETY: `mh` points at `iov` (over `buf`) and `space`, both alive
    // and writable for the call.
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
    const PER_CALL: usize = 16;
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
            // On the stack: no allocation per write.
            let mut buffers = [IoSlice::new(&[]); PER_CALL];
            let mut used = 0;
            let mut skip = offset;
            for m in &msgs[i..end] {
                let bytes: &[u8] = m.data();
                if skip >= bytes.len() {
                    skip -= bytes.len();
                    continue;
                }
                buffers[used] = IoSlice::new(&bytes[skip..]);
                used += 1;
                skip = 0;
            }
            let slices = &buffers[..used];
            let rights = [ControlMessage::ScmRights(&raw_fds)];
            let cmsgs: &[ControlMessage<'_>] = if fds_sent { &[] } else { &rights };
            let n = stream
                .async_io(Interest::WRITABLE, || {
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
        assert_eq!(unix_fds(call(false).data()), Some(0));
        assert_eq!(unix_fds(call(true).data()), Some(1));
        let m = call(true);
        assert_eq!(unix_fds(&m.data()[..20]), None);
    }
}
