//! The server side of D-Bus authentication (SASL EXTERNAL over a Unix
//! socket), per the specification's "Authentication Protocol".
//!
//! busvisor runs it itself rather than through zbus's `Connection` builder:
//! zbus keeps its handshake private, and a whole zbus `Connection` per peer
//! costs more memory than a bus can spend per idle client. Owning it also
//! tells us whether the client negotiated fd passing.

use tokio::net::UnixStream;

/// What the handshake settled.
#[derive(Debug)]
pub struct Negotiated {
    /// The client asked for and was granted Unix fd passing.
    pub fds: bool,
    /// Bytes the client sent after BEGIN: the start of its first message.
    pub leftover: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SaslError {
    #[error("the client closed the connection during authentication")]
    Closed,
    #[error("the client did not start with a NUL byte")]
    NoNulByte,
    #[error("authentication line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("too many failed authentication attempts")]
    TooManyAttempts,
    #[error("I/O error during authentication: {0}")]
    Io(#[from] std::io::Error),
}

const MAX_LINE: usize = 16 * 1024;
const MAX_REJECTIONS: usize = 8;

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether an EXTERNAL identity (hex of the decimal uid, or empty for "the
/// one the socket says") names the peer's uid.
fn identity_ok(hex: &str, peer_uid: u32) -> bool {
    if hex.is_empty() {
        return true;
    }
    hex_decode(hex)
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse::<u32>().ok())
        .is_some_and(|uid| uid == peer_uid)
}

struct Lines<'a> {
    stream: &'a UnixStream,
    buf: Vec<u8>,
}

impl Lines<'_> {
    async fn next(&mut self) -> Result<String, SaslError> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(SaslError::LineTooLong(MAX_LINE));
            }
            let mut chunk = [0u8; 512];
            let n = read_some(self.stream, &mut chunk).await?;
            if n == 0 {
                return Err(SaslError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

async fn read_some(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn send(stream: &UnixStream, line: &str) -> Result<(), SaslError> {
    let text = format!("{line}\r\n");
    let mut bytes = text.as_bytes();
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Run the server side of the handshake on `stream`, whose peer has uid
/// `peer_uid` (from SO_PEERCRED). Returns once the client sent BEGIN.
pub async fn handshake(
    stream: &UnixStream,
    guid: &str,
    peer_uid: u32,
) -> Result<Negotiated, SaslError> {
    // The NUL byte comes in the same read as the first command (one system
    // call less per connection).
    let mut first = [0u8; 512];
    let n = read_some(stream, &mut first).await?;
    if n == 0 {
        return Err(SaslError::Closed);
    }
    if first[0] != 0 {
        return Err(SaslError::NoNulByte);
    }
    let mut lines = Lines {
        stream,
        buf: first[1..n].to_vec(),
    };
    let mut authenticated = false;
    let mut waiting_for_data = false;
    let mut fds = false;
    let mut rejections = 0;
    loop {
        let line = lines.next().await?;
        let (command, arg) = match line.split_once(' ') {
            Some((c, a)) => (c, a.trim()),
            None => (line.as_str(), ""),
        };
        let reject = async |rejections: &mut usize| -> Result<(), SaslError> {
            *rejections += 1;
            if *rejections > MAX_REJECTIONS {
                return Err(SaslError::TooManyAttempts);
            }
            send(stream, "REJECTED EXTERNAL").await
        };
        match (command, authenticated) {
            ("AUTH", false) => {
                let (mech, initial) = match arg.split_once(' ') {
                    Some((m, i)) => (m, Some(i.trim())),
                    None if arg.is_empty() => ("", None),
                    None => (arg, None),
                };
                match (mech, initial) {
                    ("EXTERNAL", Some(id)) if identity_ok(id, peer_uid) => {
                        authenticated = true;
                        send(stream, &format!("OK {guid}")).await?;
                    }
                    ("EXTERNAL", None) => {
                        waiting_for_data = true;
                        send(stream, "DATA").await?;
                    }
                    _ => reject(&mut rejections).await?,
                }
            }
            ("DATA", false) if waiting_for_data => {
                waiting_for_data = false;
                if identity_ok(arg, peer_uid) {
                    authenticated = true;
                    send(stream, &format!("OK {guid}")).await?;
                } else {
                    reject(&mut rejections).await?;
                }
            }
            ("CANCEL" | "ERROR", _) => {
                authenticated = false;
                waiting_for_data = false;
                fds = false;
                reject(&mut rejections).await?;
            }
            ("NEGOTIATE_UNIX_FD", true) => {
                fds = true;
                send(stream, "AGREE_UNIX_FD").await?;
            }
            ("BEGIN", true) => {
                return Ok(Negotiated {
                    fds,
                    leftover: lines.buf,
                });
            }
            ("AUTH" | "DATA" | "BEGIN" | "NEGOTIATE_UNIX_FD", _) => {
                send(stream, "ERROR \"Command not expected now\"").await?;
            }
            _ => send(stream, "ERROR \"Unknown command\"").await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn identities() {
        assert!(identity_ok("", 1000));
        assert!(identity_ok("31303030", 1000));
        assert!(!identity_ok("31303031", 1000));
        assert!(!identity_ok("3", 1000));
        assert!(!identity_ok("zz", 1000));
    }

    #[tokio::test]
    async fn external_with_fds_and_pipelined_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let client = tokio::spawn(async move {
            let mut b = b;
            let id: String = uid
                .to_string()
                .bytes()
                .map(|c| format!("{c:02x}"))
                .collect();
            b.write_all(
                format!("\0AUTH EXTERNAL {id}\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\nxyz").as_bytes(),
            )
            .await
            .unwrap();
            let mut got = vec![0u8; 256];
            let mut n = 0;
            while !String::from_utf8_lossy(&got[..n]).contains("AGREE_UNIX_FD\r\n") {
                n += b.read(&mut got[n..]).await.unwrap();
            }
            String::from_utf8_lossy(&got[..n]).into_owned()
        });
        let neg = handshake(&a, "0123456789abcdef0123456789abcdef", uid)
            .await
            .unwrap();
        assert!(neg.fds);
        assert_eq!(neg.leftover, b"xyz");
        let replies = client.await.unwrap();
        assert!(
            replies.starts_with("OK 0123456789abcdef0123456789abcdef\r\n"),
            "{replies}"
        );
    }

    #[tokio::test]
    async fn wrong_uid_is_rejected_then_data_exchange_works() {
        let (a, b) = UnixStream::pair().unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let client = tokio::spawn(async move {
            let mut b = b;
            b.write_all(b"\0AUTH EXTERNAL 3939393939\r\n")
                .await
                .unwrap();
            let mut got = vec![0u8; 256];
            let n = b.read(&mut got).await.unwrap();
            assert!(String::from_utf8_lossy(&got[..n]).starts_with("REJECTED"));
            b.write_all(b"AUTH EXTERNAL\r\n").await.unwrap();
            let n = b.read(&mut got).await.unwrap();
            assert_eq!(&got[..n], b"DATA\r\n");
            b.write_all(b"DATA\r\nBEGIN\r\n").await.unwrap();
            let n = b.read(&mut got).await.unwrap();
            assert!(String::from_utf8_lossy(&got[..n]).starts_with("OK "));
        });
        let neg = handshake(&a, "0123456789abcdef0123456789abcdef", uid)
            .await
            .unwrap();
        assert!(!neg.fds);
        client.await.unwrap();
    }

    /// EXTERNAL is the only mechanism, on every bus: the system bus's
    /// `<auth>EXTERNAL</auth>` is what busvisor always does, and
    /// `<allow_anonymous/>` changes nothing.
    #[tokio::test]
    async fn other_mechanisms_are_rejected_with_the_list() {
        let (a, b) = UnixStream::pair().unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let client = tokio::spawn(async move {
            let mut b = b;
            let mut got = vec![0u8; 256];
            b.write_all(b"\0AUTH ANONYMOUS 74657374\r\n").await.unwrap();
            let n = b.read(&mut got).await.unwrap();
            assert_eq!(&got[..n], b"REJECTED EXTERNAL\r\n");
            b.write_all(b"AUTH DBUS_COOKIE_SHA1 31303030\r\n")
                .await
                .unwrap();
            let n = b.read(&mut got).await.unwrap();
            assert_eq!(&got[..n], b"REJECTED EXTERNAL\r\n");
            b.write_all(b"AUTH\r\n").await.unwrap();
            let n = b.read(&mut got).await.unwrap();
            assert_eq!(&got[..n], b"REJECTED EXTERNAL\r\n");
            drop(b);
        });
        let r = handshake(&a, "0123456789abcdef0123456789abcdef", uid).await;
        assert!(matches!(r, Err(SaslError::Closed)), "{r:?}");
        client.await.unwrap();
    }
}
