//! What the router and the warden say to each other: one datagram per
//! message on a SOCK_SEQPACKET pair, NUL-separated text fields, the verb
//! first. The router asks for two things only, by name and by pid; it never
//! sends a command line, a user or an environment.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use crate::supervision::reaper::ExitKind;

/// The largest message either side sends.
pub(crate) const MAX_MESSAGE: usize = 8192;

/// Router → warden.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// Start the service defined as `id`, as its definition says, in the
    /// invocation `token`.
    Spawn { seq: u64, id: String, token: String },
    /// Send `signal` to `pid`, if it is a process of the services'.
    Kill { pid: i32, signal: i32 },
    /// Kill every process of the invocation `token`'s cgroup at once.
    KillCgroup { token: String },
}

/// Warden → router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Spawn `seq` started `pid` running `program`; its stdout and stderr
    /// read ends come with the message.
    Spawned { seq: u64, pid: i32, program: String },
    /// Spawn `seq` failed: a D-Bus error name and text for the waiters.
    Failed {
        seq: u64,
        error: String,
        text: String,
    },
    /// A process of the services' ended.
    Exited { pid: i32, kind: ExitKind },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed warden message: {0}")]
pub(crate) struct ProtocolError(pub(crate) String);

fn fields(data: &[u8]) -> Result<Vec<&str>, ProtocolError> {
    let text = std::str::from_utf8(data).map_err(|_| ProtocolError("not UTF-8".into()))?;
    Ok(text.split('\0').collect())
}

fn num<T: std::str::FromStr>(s: &str) -> Result<T, ProtocolError> {
    s.parse()
        .map_err(|_| ProtocolError(format!("not a number: {s:?}")))
}

fn join(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

impl Request {
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Request::Spawn { seq, id, token } => join(&["spawn", &seq.to_string(), id, token]),
            Request::Kill { pid, signal } => join(&["kill", &pid.to_string(), &signal.to_string()]),
            Request::KillCgroup { token } => join(&["killcgroup", token]),
        }
    }

    pub(crate) fn decode(data: &[u8]) -> Result<Request, ProtocolError> {
        match fields(data)?.as_slice() {
            ["spawn", seq, id, token] => Ok(Request::Spawn {
                seq: num(seq)?,
                id: (*id).to_owned(),
                token: (*token).to_owned(),
            }),
            ["kill", pid, signal] => Ok(Request::Kill {
                pid: num(pid)?,
                signal: num(signal)?,
            }),
            ["killcgroup", token] => Ok(Request::KillCgroup {
                token: (*token).to_owned(),
            }),
            other => Err(ProtocolError(format!(
                "unknown request {:?}",
                other.first()
            ))),
        }
    }
}

impl Event {
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Event::Spawned { seq, pid, program } => {
                join(&["spawned", &seq.to_string(), &pid.to_string(), program])
            }
            Event::Failed { seq, error, text } => join(&["failed", &seq.to_string(), error, text]),
            Event::Exited { pid, kind } => {
                let (how, n) = match kind {
                    ExitKind::Code(c) => ("code", *c),
                    ExitKind::Signal(s) => ("signal", *s),
                };
                join(&["exited", &pid.to_string(), how, &n.to_string()])
            }
        }
    }

    pub(crate) fn decode(data: &[u8]) -> Result<Event, ProtocolError> {
        match fields(data)?.as_slice() {
            ["spawned", seq, pid, program] => Ok(Event::Spawned {
                seq: num(seq)?,
                pid: num(pid)?,
                program: (*program).to_owned(),
            }),
            ["failed", seq, error, text] => Ok(Event::Failed {
                seq: num(seq)?,
                error: (*error).to_owned(),
                text: (*text).to_owned(),
            }),
            ["exited", pid, how, n] => Ok(Event::Exited {
                pid: num(pid)?,
                kind: match *how {
                    "code" => ExitKind::Code(num(n)?),
                    "signal" => ExitKind::Signal(num(n)?),
                    other => return Err(ProtocolError(format!("unknown exit kind {other:?}"))),
                },
            }),
            other => Err(ProtocolError(format!("unknown event {:?}", other.first()))),
        }
    }
}

/// Send one message, with descriptors.
pub(crate) fn send(sock: RawFd, data: &[u8], fds: &[RawFd]) -> nix::Result<()> {
    let iov = [std::io::IoSlice::new(data)];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
    sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).map(|_| ())
}

/// Receive one message and the descriptors that came with it. An empty
/// message is the other side's end.
pub(crate) fn recv(sock: &impl AsRawFd, flags: MsgFlags) -> nix::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        flags | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: SCM_RIGHTS gave this process these new descriptors,
                // which nothing else owns.
                fds.push(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) });
            }
        }
    }
    let n = msg.bytes;
    buf.truncate(n);
    Ok((buf, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Spawn {
                seq: 7,
                id: "org.freedesktop.PolicyKit1".into(),
                token: "org.freedesktop.PolicyKit1-12-1".into(),
            },
            Request::Kill {
                pid: 42,
                signal: 15,
            },
            Request::KillCgroup {
                token: "org.freedesktop.PolicyKit1-12-1".into(),
            },
        ] {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn events_round_trip() {
        for e in [
            Event::Spawned {
                seq: 1,
                pid: 99,
                program: "/usr/lib/polkit-1/polkitd".into(),
            },
            Event::Failed {
                seq: 2,
                error: "org.freedesktop.DBus.Error.Spawn.ExecFailed".into(),
                text: "Failed to execute program x: No such file".into(),
            },
            Event::Exited {
                pid: 3,
                kind: ExitKind::Code(1),
            },
            Event::Exited {
                pid: 4,
                kind: ExitKind::Signal(9),
            },
        ] {
            assert_eq!(Event::decode(&e.encode()), Ok(e));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"spawn",
            b"spawn\0x\0id\0tok",
            b"kill\0-\0",
            b"\xff\xfe",
            b"exited\x001\0how\x002",
            b"launch\0/bin/sh",
        ] {
            assert!(Request::decode(bad).is_err() || Event::decode(bad).is_err());
        }
    }
}
