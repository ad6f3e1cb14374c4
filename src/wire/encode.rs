//! The messages the bus sends itself, encoded directly.
//!
//! zbus's `Builder` serializes a header through serde, each field as a
//! variant: about 18,000 instructions for a Hello reply, more than routing
//! a 4 KiB message costs (docs/BENCHMARKS.md). The bus sends one such
//! message per driver call and four per connection (Hello's reply,
//! NameAcquired, NameOwnerChanged twice). Here the header is written as
//! bytes, the body is serialized by zbus into the same buffer behind it,
//! and zbus's parser reads the result back (`Message::from_bytes`), so a
//! field that is not valid fails as the builder would have failed.
//!
//! The bytes are the builder's, field for field and in its order (the
//! tests compare the two), with serials from one counter of the bus's own.

use std::io::Cursor;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};

use zbus::wire::serialized::{Context, Data};
use zbus::wire::{DynamicType, Endian, Signature};

use super::{Flags, Message, Type};

/// zbus's limit, which its builder enforces (the specification's 128 MiB).
const MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;

/// The header fields of a message from the bus; `None` leaves one out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head<'a> {
    pub(crate) kind: Type,
    pub(crate) flags: Flags,
    /// A reply goes in its call's byte order, as zbus answers; the rest in
    /// this machine's.
    pub(crate) endian: Endian,
    pub(crate) path: Option<&'a str>,
    pub(crate) interface: Option<&'a str>,
    pub(crate) member: Option<&'a str>,
    pub(crate) error_name: Option<&'a str>,
    pub(crate) reply_serial: Option<NonZeroU32>,
    pub(crate) destination: Option<&'a str>,
    pub(crate) sender: &'a str,
}

impl<'a> Head<'a> {
    pub(crate) fn new(kind: Type, sender: &'a str) -> Self {
        Head {
            kind,
            flags: Flags::empty(),
            endian: Endian::native(),
            path: None,
            interface: None,
            member: None,
            error_name: None,
            reply_serial: None,
            destination: None,
            sender,
        }
    }

    /// A signal or method call from `sender` to `member` of `interface` at
    /// `path`.
    pub(crate) fn to_member(
        kind: Type,
        sender: &'a str,
        path: &'a str,
        interface: &'a str,
        member: &'a str,
    ) -> Self {
        Head {
            path: Some(path),
            interface: Some(interface),
            member: Some(member),
            ..Head::new(kind, sender)
        }
    }
}

/// Serials of the messages the bus sends: unique among them, never 0.
fn next_serial() -> u32 {
    static SERIAL: AtomicU32 = AtomicU32::new(1);
    loop {
        let s = SERIAL.fetch_add(1, Ordering::Relaxed);
        if s != 0 {
            return s;
        }
    }
}

/// The message `head` and `body` make, with the next serial.
pub(crate) fn encode<B>(head: &Head<'_>, body: &B) -> zbus::Result<Message>
where
    B: serde::Serialize + DynamicType,
{
    encode_with_serial(head, next_serial(), body)
}

fn encode_with_serial<B>(head: &Head<'_>, serial: u32, body: &B) -> zbus::Result<Message>
where
    B: serde::Serialize + DynamicType,
{
    let signature = body.signature();
    let mut out = Out {
        buf: Vec::with_capacity(256),
        big: head.endian == Endian::Big,
    };
    out.buf.extend_from_slice(&[
        if out.big { b'B' } else { b'l' },
        head.kind as u8,
        head.flags.bits(),
        1,
    ]);
    out.u32(0); // the body's length, set below
    out.u32(serial);
    out.u32(0); // the fields' length, set below
    let strings = [
        (1, b'o', head.path),
        (2, b's', head.interface),
        (3, b's', head.member),
        (4, b's', head.error_name),
    ];
    for (code, sig, value) in strings {
        if let Some(v) = value {
            out.string_field(code, sig, v)?;
        }
    }
    if let Some(s) = head.reply_serial {
        out.field_start(5, b'u');
        out.u32(s.get());
    }
    if let Some(d) = head.destination {
        out.string_field(6, b's', d)?;
    }
    out.string_field(7, b's', head.sender)?;
    if !matches!(signature, Signature::Unit) {
        out.field_start(8, b'g');
        let at = out.buf.len();
        out.buf.push(0);
        signature
            .write_as_string_no_parens(&mut out)
            .map_err(|_| zbus::Error::InvalidField)?;
        let len = out.buf.len() - at - 1;
        out.buf[at] = u8::try_from(len).map_err(|_| zbus::Error::InvalidField)?;
        out.buf.push(0);
    }
    let fields_len = out.buf.len() - 16;
    out.set_u32(12, fields_len)?;
    let body_start = out.buf.len().next_multiple_of(8);
    out.buf.resize(body_start, 0);
    let ctxt = Context::new(head.endian, 0);
    let mut cursor = Cursor::new(&mut out.buf);
    cursor.set_position(body_start as u64);
    // SAFETY: `to_writer_for_signature` is unsafe because descriptors in
    // the body are closed with the returned `Written`: they are moved from
    // it into the message below, which owns them from then on.
    let written =
        unsafe { zbus::wire::to_writer_for_signature(&mut cursor, ctxt, &signature, body) }?;
    let fds = written.into_fds();
    let mut body_start = body_start;
    if !fds.is_empty() {
        // Rare (GetConnectionCredentials' ProcessFD): the UNIX_FDS field
        // goes last, where the body starts, which moves 8 bytes on.
        let mut field = [9, 1, b'u', 0, 0, 0, 0, 0];
        let n = u32::try_from(fds.len()).map_err(|_| zbus::Error::ExcessData)?;
        field[4..].copy_from_slice(&if out.big {
            n.to_be_bytes()
        } else {
            n.to_le_bytes()
        });
        out.buf.splice(body_start..body_start, field);
        body_start += field.len();
        out.set_u32(12, body_start - 16)?;
    }
    if out.buf.len() > MAX_MESSAGE_SIZE {
        return Err(zbus::Error::ExcessData);
    }
    let body_len = out.buf.len() - body_start;
    out.set_u32(4, body_len)?;
    // SAFETY: `from_bytes` is unsafe only because the bytes may be badly
    // encoded; it parses and checks them, and a bad encoding is an error.
    unsafe { Message::from_bytes(Data::new_fds(out.buf, ctxt, fds)) }
}

/// A header being written, in one byte order.
struct Out {
    buf: Vec<u8>,
    big: bool,
}

impl Out {
    fn u32(&mut self, v: u32) {
        let bytes = if self.big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.buf.extend_from_slice(&bytes);
    }

    fn set_u32(&mut self, at: usize, v: usize) -> zbus::Result<()> {
        let v = u32::try_from(v).map_err(|_| zbus::Error::ExcessData)?;
        let bytes = if self.big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.buf[at..at + 4].copy_from_slice(&bytes);
        Ok(())
    }

    /// A field's code and its one-letter signature, on 8 bytes.
    fn field_start(&mut self, code: u8, sig: u8) {
        let start = self.buf.len().next_multiple_of(8);
        self.buf.resize(start, 0);
        self.buf.extend_from_slice(&[code, 1, sig, 0]);
    }

    fn string_field(&mut self, code: u8, sig: u8, v: &str) -> zbus::Result<()> {
        self.field_start(code, sig);
        self.u32(u32::try_from(v.len()).map_err(|_| zbus::Error::ExcessData)?);
        self.buf.extend_from_slice(v.as_bytes());
        self.buf.push(0);
        Ok(())
    }
}

impl std::fmt::Write for Out {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.buf.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Fd, ObjectPath};
    use std::collections::HashMap;

    fn call(endian: Endian) -> Message {
        Message::method_call("/org/freedesktop/DBus", "Hello")
            .sender(":1.42")
            .destination("org.freedesktop.DBus")
            .endian(endian)
            .build(&())
            .unwrap()
    }

    /// The same message by zbus's builder and by `encode`, byte for byte.
    fn same<B>(theirs: zbus::message::Builder<'_>, ours: &Head<'_>, body: &B)
    where
        B: serde::Serialize + DynamicType,
    {
        let serial = NonZeroU32::new(77).unwrap();
        let theirs = theirs.serial(serial).build(body).unwrap();
        let ours = encode_with_serial(ours, serial.get(), body).unwrap();
        assert_eq!(ours.data().bytes(), theirs.data().bytes(), "{theirs:?}");
        assert_eq!(ours.header().signature(), theirs.header().signature());
    }

    #[test]
    fn replies_and_errors_are_the_builders_in_both_byte_orders() {
        for endian in [Endian::Little, Endian::Big] {
            let c = call(endian);
            let h = c.header();
            let reply = Head {
                endian,
                reply_serial: Some(c.primary_header().serial_num()),
                destination: Some(":1.42"),
                ..Head::new(Type::MethodReturn, "org.freedesktop.DBus")
            };
            let builder = || Message::method_return(&h).sender("org.freedesktop.DBus");
            same(builder(), &reply, &());
            same(builder(), &reply, &(":1.42",));
            same(builder(), &reply, &(7u32, true, "x"));
            same(builder(), &reply, &(vec!["a", "bb", "ccc"],));
            same(builder(), &reply, &(vec![1u8, 2, 3],));
            let mut creds: HashMap<&str, crate::wire::OwnedVariant> = HashMap::new();
            creds.insert("ProcessID", crate::wire::owned(12u32));
            same(builder(), &reply, &(creds,));
            let error = Head {
                kind: Type::Error,
                error_name: Some("org.freedesktop.DBus.Error.NameHasNoOwner"),
                ..reply
            };
            same(
                Message::error(&h, "org.freedesktop.DBus.Error.NameHasNoOwner")
                    .sender("org.freedesktop.DBus"),
                &error,
                &("Could not get owner of name 'x': no such name",),
            );
        }
    }

    #[test]
    fn signals_and_calls_are_the_builders() {
        let noc = Head::to_member(
            Type::Signal,
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameOwnerChanged",
        );
        let builder = || {
            Message::signal(
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "NameOwnerChanged",
            )
            .sender("org.freedesktop.DBus")
        };
        same(builder(), &noc, &("org.example.Name", "", ":1.7"));
        same(
            builder().destination(":1.7"),
            &Head {
                destination: Some(":1.7"),
                ..noc
            },
            &(ObjectPath::try_from("/a/b").unwrap(),),
        );
        let env = Head {
            destination: Some("org.freedesktop.systemd1"),
            flags: Flags::NO_REPLY_EXPECTED,
            ..Head::to_member(
                Type::MethodCall,
                "org.freedesktop.DBus",
                "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager",
                "SetEnvironment",
            )
        };
        same(
            Message::method_call("/org/freedesktop/systemd1", "SetEnvironment")
                .interface("org.freedesktop.systemd1.Manager")
                .destination("org.freedesktop.systemd1")
                .sender("org.freedesktop.DBus")
                .with_flags(Flags::NO_REPLY_EXPECTED),
            &env,
            &(vec!["A=1", "B=2"],),
        );
    }

    #[test]
    fn what_the_builder_refuses_is_refused() {
        let bad_path = Head::to_member(
            Type::Signal,
            "org.freedesktop.DBus",
            "not/a/path",
            "org.x",
            "S",
        );
        assert!(encode(&bad_path, &()).is_err());
        let bad_member = Head {
            path: Some("/a"),
            member: Some("no.dots.allowed"),
            ..bad_path
        };
        assert!(encode(&bad_member, &()).is_err());
    }

    #[test]
    fn descriptors_go_in_the_message_with_their_field() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = call(Endian::Little);
        let h = c.header();
        let reply = Head {
            reply_serial: Some(c.primary_header().serial_num()),
            destination: Some(":1.42"),
            ..Head::new(Type::MethodReturn, "org.freedesktop.DBus")
        };
        for body_before in [0u8, 1, 7] {
            let fd = || Fd::from(std::os::fd::AsFd::as_fd(&a));
            let body = (vec![7u8; usize::from(body_before)], fd(), "after");
            let theirs = Message::method_return(&h)
                .sender("org.freedesktop.DBus")
                .serial(NonZeroU32::new(5).unwrap())
                .build(&body)
                .unwrap();
            let ours = encode_with_serial(&reply, 5, &body).unwrap();
            assert_eq!(ours.data().bytes(), theirs.data().bytes());
            assert_eq!(ours.data().fds().len(), 1);
            let (_, got, tail): (Vec<u8>, zbus::wire::OwnedFd, String) =
                ours.body().deserialize().unwrap();
            assert!(std::os::fd::AsRawFd::as_raw_fd(&got) >= 0);
            assert_eq!(tail, "after");
        }
    }

    #[test]
    fn serials_are_fresh() {
        let h = Head::to_member(Type::Signal, "org.freedesktop.DBus", "/a", "org.x", "S");
        let a = encode(&h, &()).unwrap().primary_header().serial_num();
        let b = encode(&h, &()).unwrap().primary_header().serial_num();
        assert_ne!(a, b);
    }
}
