//! Reading and writing D-Bus messages on a peer's socket.
//!
//! Reading implements zbus's `ReadHalf::recvmsg`, so that zbus's own
//! `receive_message` frames and parses each message (safely, with its header
//! checks); writing sends the bytes of queued messages with `sendmsg`,
//! several messages per call, and their fds as SCM_RIGHTS.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, sendmsg};
use tokio::io::Interest;
use tokio::net::UnixStream;
use zbus::message::Message;

/// The read side of a peer's socket, as zbus's `ReadHalf`.
///
/// zbus asks for each message in two reads (its 16-byte primary header,
/// then the rest). Reading the socket that way costs two system calls a
/// message, so small reads are served from a chunk read ahead, and the
/// chunk is freed once served (an idle peer holds no buffer).
///
/// File descriptors arrive with the read that includes the first byte of
/// the data they were sent with, and a read may also hold the end of an
/// earlier message. They belong to the first message starting in that chunk
/// whose header declares UNIX_FDS (a message's fds travel with its first
/// byte): they are handed out with the first read of that message.
#[derive(Debug)]
pub struct Reader {
    stream: Arc<UnixStream>,
    chunk: Vec<u8>,
    /// Next byte of `chunk` to hand out.
    pos: usize,
    /// Stream offset of the next byte to hand out.
    served: u64,
    /// Message boundaries of the bytes handed out so far.
    framer: Framer,
    /// Fds waiting for the message that starts at the given stream offset.
    pending: Option<(u64, Vec<OwnedFd>)>,
}

/// Follows message boundaries through a byte stream.
#[derive(Debug, Clone, Copy, Default)]
struct Framer {
    header: [u8; 16],
    header_len: usize,
    /// Bytes of the current message after its primary header still to come.
    remaining: u64,
}

impl Framer {
    /// Consume `b`; returns the offsets in `b` where messages start.
    fn advance(&mut self, mut b: &[u8], mut on_start: impl FnMut(usize)) {
        let mut at = 0;
        while !b.is_empty() {
            if self.remaining > 0 {
                let take = (self.remaining.min(b.len() as u64)) as usize;
                self.remaining -= take as u64;
                b = &b[take..];
                at += take;
                continue;
            }
            if self.header_len == 0 {
                on_start(at);
            }
            let take = (16 - self.header_len).min(b.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&b[..take]);
            self.header_len += take;
            b = &b[take..];
            at += take;
            if self.header_len == 16 {
                self.header_len = 0;
                self.remaining = message_len(&self.header).map_or(0, |t| t as u64 - 16);
            }
        }
    }
}

impl Reader {
    pub fn new(stream: Arc<UnixStream>) -> Self {
        Reader {
            stream,
            chunk: Vec::new(),
            pos: 0,
            served: 0,
            framer: Framer::default(),
            pending: None,
        }
    }

    /// The stream offset of the message the fds of a read of `chunk` belong
    /// to: the first message starting in it that declares fds, or whose
    /// header is not all in the chunk.
    /// Whether everything handed out so far ends at a message boundary: an
    /// end of stream here is the peer closing, not a truncated message.
    pub fn at_message_boundary(&self) -> bool {
        self.framer.header_len == 0 && self.framer.remaining == 0
    }

    /// A message about to be handed out whose header has fields the bus
    /// does not understand loses them, as dbus-daemon 1.14 filters them
    /// (zbus's parser would refuse the message). Only a header wholly in
    /// the chunk read ahead is looked at.
    fn filter_header(&mut self) {
        let Some((old, new)) = crate::wire::args::filter_header(&self.chunk[self.pos..]) else {
            return;
        };
        let shrink = (old - new.len()) as u64;
        self.chunk.splice(self.pos..self.pos + old, new);
        // Fds waiting for a later message in this chunk: its start moved.
        if let Some((at, _)) = &mut self.pending
            && *at > self.served
        {
            *at -= shrink;
        }
    }

    fn owner_of_fds(&self, chunk: &[u8]) -> u64 {
        let mut framer = self.framer;
        let mut owner = None;
        framer.advance(chunk, |rel| {
            if owner.is_none() && declares_fds(&chunk[rel..]).unwrap_or(true) {
                owner = Some(rel);
            }
        });
        self.served + owner.unwrap_or(chunk.len()) as u64
    }

    /// Hand out `n` bytes that now sit in `buf`; returns the fds that go
    /// with them.
    fn served(&mut self, bytes: &[u8]) -> Vec<OwnedFd> {
        let start = self.served;
        self.served += bytes.len() as u64;
        self.framer.advance(bytes, |_| {});
        match &self.pending {
            Some((at, _)) if *at >= start && *at < self.served => {
                self.pending.take().map(|(_, f)| f).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }
}

/// The total length of the message whose bytes start `b`, from its primary
/// header and fields length.
fn message_len(b: &[u8]) -> Option<usize> {
    let h = b.get(..16)?;
    let read = |at: usize| -> u32 {
        let x = [h[at], h[at + 1], h[at + 2], h[at + 3]];
        if h[0] == b'B' {
            u32::from_be_bytes(x)
        } else {
            u32::from_le_bytes(x)
        }
    };
    let fields = read(12) as usize;
    let body = read(4) as usize;
    let header = 16 + fields;
    Some(header + (8 - header % 8) % 8 + body)
}

/// Whether the message starting `b` declares UNIX_FDS > 0; None when its
/// header fields are not all in `b`.
fn declares_fds(b: &[u8]) -> Option<bool> {
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
    let fields = b.get(16..16 + fields_len)?;
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
                    return Some(n > 0);
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
            // A field of a type the specification does not define for
            // headers: count the message as one that may carry fds.
            _ => return None,
        }
        i = v;
    }
    Some(false)
}

/// Reads of this size or more go straight into the caller's buffer.
const CHUNK: usize = 4096;

#[async_trait::async_trait]
impl zbus::connection::socket::ReadHalf for Reader {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
        let fd = self.stream.as_raw_fd();
        if self.pos >= self.chunk.len() {
            if buf.len() >= CHUNK {
                // A big body: straight into place.
                let (n, mut fds) = self
                    .stream
                    .async_io(Interest::READABLE, || recv_now(fd, buf))
                    .await?;
                fds.extend(self.served(&buf[..n]));
                return Ok((n, fds));
            }
            // Wait first, allocate after: an idle peer holds no buffer.
            let (mut chunk, n, fds) = loop {
                self.stream.readable().await?;
                let mut chunk = vec![0u8; CHUNK];
                let mut got = None;
                let r = self.stream.try_io(Interest::READABLE, || {
                    let (n, fds) = recv_now(fd, &mut chunk)?;
                    // A short read without fds emptied the socket: report it
                    // drained, so that the next read waits for the next edge
                    // instead of spending a recvmsg on EAGAIN (bytes that
                    // arrive later raise a new edge). One system call less
                    // per message. With fds it proves nothing: the kernel
                    // ends a read after the data that carried them. (Nothing
                    // else ends a unix stream read early but SO_PASSCRED,
                    // which busvisor does not set, and out-of-band data,
                    // which delays only the client that sends it.)
                    let drained = n > 0 && n < CHUNK && fds.is_empty();
                    got = Some((n, fds));
                    if drained {
                        Err(std::io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(())
                    }
                });
                match (r, got) {
                    (_, Some((n, fds))) => break (chunk, n, fds),
                    (Err(e), None) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    (Err(e), None) => return Err(e),
                    (Ok(()), None) => unreachable!("try_io returned Ok without reading"),
                }
            };
            if n == 0 {
                return Ok((0, fds));
            }
            chunk.truncate(n);
            if !fds.is_empty() {
                let owner = self.owner_of_fds(&chunk);
                match &mut self.pending {
                    Some((at, old)) if *at == owner => old.extend(fds),
                    _ => self.pending = Some((owner, fds)),
                }
            }
            self.chunk = chunk;
            self.pos = 0;
        }
        if self.at_message_boundary() {
            self.filter_header();
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        let chunk = std::mem::take(&mut self.chunk);
        let fds = self.served(&chunk[self.pos - n..self.pos]);
        if self.pos < chunk.len() {
            self.chunk = chunk;
        } else {
            // Served: freed, so that an idle peer holds no buffer.
            self.pos = 0;
        }
        Ok((n, fds))
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }
}

/// The most fds one read may bring (the kernel's SCM_MAX_FD); the router
/// enforces max_message_unix_fds.
const MAX_FDS_PER_READ: usize = 253;

fn recv_now(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_READ]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<UnixAddr>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel has just installed `fd` in our table for
                // this SCM_RIGHTS message; nothing else refers to it, so it
                // is owned here (nix hands received fds out as raw numbers).
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, fds))
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
        assert_eq!(declares_fds(call(false).data()), Some(false));
        assert_eq!(declares_fds(call(true).data()), Some(true));
        let m = call(true);
        assert_eq!(declares_fds(&m.data()[..20]), None);
        assert_eq!(message_len(m.data()), Some(m.data().len()));
    }

    #[test]
    fn framer_finds_message_starts_across_pieces() {
        let (a, b) = (call(false), call(true));
        let mut stream = a.data().to_vec();
        stream.extend_from_slice(b.data());
        let mut f = Framer::default();
        let mut starts = Vec::new();
        let mut base = 0;
        for piece in stream.chunks(7) {
            f.advance(piece, |rel| starts.push(base + rel));
            base += piece.len();
        }
        assert_eq!(starts, vec![0, a.data().len()]);
    }
}
