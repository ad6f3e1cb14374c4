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
#[derive(Debug)]
pub struct Reader(pub Arc<UnixStream>);

/// The most fds one message may carry on the wire (dbus-daemon's limit is
/// lower; the router enforces max_message_unix_fds).
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

#[async_trait::async_trait]
impl zbus::connection::socket::ReadHalf for Reader {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
        let fd = self.0.as_raw_fd();
        self.0
            .async_io(Interest::READABLE, || recv_now(fd, buf))
            .await
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }
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
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(end - i);
            let mut skip = offset;
            for m in &msgs[i..end] {
                let bytes: &[u8] = m.data();
                if skip >= bytes.len() {
                    skip -= bytes.len();
                    continue;
                }
                slices.push(IoSlice::new(&bytes[skip..]));
                skip = 0;
            }
            let rights = [ControlMessage::ScmRights(&raw_fds)];
            let cmsgs: &[ControlMessage<'_>] = if fds_sent { &[] } else { &rights };
            let n = stream
                .async_io(Interest::WRITABLE, || {
                    sendmsg::<UnixAddr>(fd, &slices, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
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
