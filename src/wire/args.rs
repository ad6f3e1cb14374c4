//! A message body's top-level arguments and signature, read from its bytes as D-Bus marshals
//! them, for the bus to match rules against and to name in error replies.
//!
//! The reader never panics on bad data: it stops where the data goes wrong, and what it read
//! before stays good.

use zbus::message::Message;

/// A top-level body argument that a rule can match: a STRING or an OBJECT_PATH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Arg<'m> {
    /// The value.
    pub(crate) value: &'m str,
    /// Whether it is an OBJECT_PATH.
    pub(crate) is_path: bool,
}

/// The deepest nesting of variants and structures followed while skipping over values.
const MAX_DEPTH: u32 = 64;

/// Reads D-Bus-marshalled values from a message's bytes, never panicking on bad data.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    big_endian: bool,
}

impl<'a> Reader<'a> {
    fn align(&mut self, n: usize) -> Option<()> {
        let p = self.pos.checked_next_multiple_of(n)?;
        if p > self.buf.len() {
            return None;
        }
        self.pos = p;
        Some(())
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u32(&mut self) -> Option<u32> {
        self.align(4)?;
        let b: [u8; 4] = self.take(4)?.try_into().ok()?;
        Some(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    /// A STRING or OBJECT_PATH, with its terminating 0.
    fn string(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.u32()?).ok()?;
        let bytes = self.take(len)?;
        if self.byte()? != 0 {
            return None;
        }
        std::str::from_utf8(bytes).ok()
    }

    /// A SIGNATURE, with its terminating 0.
    fn signature(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.byte()?);
        let bytes = self.take(len)?;
        if self.byte()? != 0 {
            return None;
        }
        Some(bytes)
    }

    /// Skips one value of the first complete type of `sig`; returns the rest of `sig`.
    fn skip<'s>(&mut self, sig: &'s [u8], depth: u32) -> Option<&'s [u8]> {
        let (&code, rest) = sig.split_first()?;
        match code {
            b'y' => {
                self.take(1)?;
            }
            b'n' | b'q' => {
                self.align(2)?;
                self.take(2)?;
            }
            b'b' | b'i' | b'u' | b'h' => {
                self.align(4)?;
                self.take(4)?;
            }
            b'x' | b't' | b'd' => {
                self.align(8)?;
                self.take(8)?;
            }
            b's' | b'o' => {
                let len = usize::try_from(self.u32()?).ok()?;
                self.take(len.checked_add(1)?)?;
            }
            b'g' => {
                self.signature()?;
            }
            b'v' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                let inner = self.signature()?;
                if !self.skip(inner, depth + 1)?.is_empty() {
                    return None;
                }
            }
            b'a' => {
                let len = usize::try_from(self.u32()?).ok()?;
                let elem_len = complete_type_len(rest, 0)?;
                self.align(alignment(*rest.first()?)?)?;
                self.take(len)?;
                return rest.get(elem_len..);
            }
            b'(' | b'{' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                let close = if code == b'(' { b')' } else { b'}' };
                self.align(8)?;
                let mut fields = rest;
                loop {
                    match fields.split_first() {
                        Some((&c, after)) if c == close => return Some(after),
                        Some(_) => fields = self.skip(fields, depth + 1)?,
                        None => return None,
                    }
                }
            }
            _ => return None,
        }
        Some(rest)
    }
}

fn alignment(code: u8) -> Option<usize> {
    Some(match code {
        b'y' | b'g' | b'v' => 1,
        b'n' | b'q' => 2,
        b'b' | b'i' | b'u' | b'h' | b's' | b'o' | b'a' => 4,
        b'x' | b't' | b'd' | b'(' | b'{' => 8,
        _ => return None,
    })
}

/// Length of the first complete type of `sig`.
fn complete_type_len(sig: &[u8], depth: u32) -> Option<usize> {
    if depth > 2 * MAX_DEPTH {
        return None;
    }
    match *sig.first()? {
        b'a' => complete_type_len(sig.get(1..)?, depth + 1)?.checked_add(1),
        open @ (b'(' | b'{') => {
            let close = if open == b'(' { b')' } else { b'}' };
            let mut i = 1;
            loop {
                if *sig.get(i)? == close {
                    return Some(i + 1);
                }
                i += complete_type_len(sig.get(i..)?, depth + 1)?;
            }
        }
        c => alignment(c).map(|_| 1),
    }
}

/// Header field code of the body signature.
const FIELD_SIGNATURE: u8 = 8;

/// The first `max` top-level arguments of the body of `msg`: `Some` for a STRING or an
/// OBJECT_PATH, `None` for any other. Shorter if the body has fewer, or if decoding stopped at
/// bad data: then it holds the arguments read before it.
pub(crate) fn decode_args(msg: &Message, max: usize) -> Vec<Option<Arg<'_>>> {
    let mut args = Vec::new();
    let _ = decode_args_into(msg, max, &mut args);
    args
}

/// Reads past the header fields; returns the reader at their end and the
/// body signature as written (empty when there is none).
fn read_header(msg: &Message) -> Option<(Reader<'_>, &[u8])> {
    let bytes = msg.data().bytes();
    let mut r = Reader {
        buf: bytes,
        pos: 12,
        big_endian: bytes.first() == Some(&b'B'),
    };
    // The header fields, an array of (BYTE code, VARIANT value) from offset 12, to find the body
    // signature as it is written: zbus's parsed `Signature` doesn't tell "(ss)" from "ss".
    let fields_len = usize::try_from(r.u32()?).ok()?;
    r.align(8)?;
    let fields_end = r.pos.checked_add(fields_len)?;
    let mut body_sig: &[u8] = &[];
    while r.pos < fields_end {
        r.align(8)?;
        let code = r.byte()?;
        let sig = r.signature()?;
        if code == FIELD_SIGNATURE && sig == b"g" {
            body_sig = r.signature()?;
        } else if !r.skip(sig, 0)?.is_empty() {
            return None;
        }
    }
    if r.pos != fields_end {
        return None;
    }
    Some((r, body_sig))
}

/// The header fields the bus understands (PATH to UNIX_FDS); dbus-daemon
/// 1.14 removes the others before relaying a message ("HeaderFiltering").
const KNOWN_FIELDS: std::ops::RangeInclusive<u8> = 1..=9;

const SENDER_FIELD: u8 = 7;

const UNIX_FDS_FIELD: u8 = 9;

/// Whether the header field whose value `r` is about to read is a SENDER
/// holding a well-known name. dbus-daemon accepts any valid bus name there
/// and sets its own; zbus's parser would refuse the message, so the field
/// goes, and the reader stamps the unique name as for any other. An
/// invalid name stays for the parser to refuse, as dbus-daemon does.
fn well_known_sender(code: u8, sig: &[u8], r: &Reader<'_>) -> bool {
    if code != SENDER_FIELD || sig != b"s" {
        return false;
    }
    let mut peek = Reader { ..*r };
    // A unique name (what clients that set a sender send) is decided by its
    // first byte, without reading the rest.
    let Some(first) = peek.u32().and_then(|_| peek.buf.get(peek.pos)) else {
        return false;
    };
    *first != b':'
        && (Reader { ..*r })
            .string()
            .is_some_and(|name| super::validate::well_known_name(name).is_ok())
}

/// When the message starting `bytes` has header fields the bus does not
/// understand (or a SENDER holding a well-known name), its header without
/// them: (the length of the header it replaces, padding included; the new
/// header). None when there is nothing to remove, or `bytes` does not hold
/// the whole header, or the header is malformed (which the parser then
/// refuses as before).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn filter_header(bytes: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    let r = rewrite_header(bytes, None, &mut out)?;
    r.dropped.then_some((r.old_len, out))
}

/// What `rewrite_header` found in the header it rewrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rewritten {
    /// The length of the header it replaces, padding included.
    pub(crate) old_len: usize,
    /// Fields were removed: unknown ones, or a SENDER holding a well-known
    /// name (their values are for the caller to check, as dbus-daemon does).
    pub(crate) dropped: bool,
    /// The UNIX_FDS field's value (0 without one).
    pub(crate) unix_fds: u32,
}

/// The header of the message starting `bytes` as the bus relays it, written
/// to `out` (cleared first), in one walk over its fields: the fields the bus
/// does not understand and a SENDER holding a well-known name removed, and
/// with `sender`, the SENDER field set to it (after the others), so that the
/// body can follow without the message being copied again. None when
/// `bytes` does not hold the whole header, or the header is malformed, or,
/// with `sender`, a SENDER field to replace is not a valid unique name
/// (zbus's parser refuses those).
pub(crate) fn rewrite_header(
    bytes: &[u8],
    sender: Option<&str>,
    out: &mut Vec<u8>,
) -> Option<Rewritten> {
    let big_endian = match bytes.first()? {
        b'l' => false,
        b'B' => true,
        _ => return None,
    };
    let mut r = Reader {
        buf: bytes.get(..16)?,
        pos: 12,
        big_endian,
    };
    let end = 16usize.checked_add(usize::try_from(r.u32()?).ok()?)?;
    let old_len = end.next_multiple_of(8);
    let header = bytes.get(..old_len)?;
    let mut r = Reader {
        buf: &header[..end],
        pos: 16,
        big_endian,
    };
    out.clear();
    out.extend_from_slice(&header[..16]);
    let mut dropped = false;
    let mut unix_fds = 0;
    loop {
        let start = r.pos.next_multiple_of(8);
        if start >= end {
            break;
        }
        r.pos = start;
        let code = r.byte()?;
        let sig = r.signature()?;
        let forged = well_known_sender(code, sig, &r);
        let value = r.pos;
        if !r.skip(sig, 1)?.is_empty() {
            return None;
        }
        if code == UNIX_FDS_FIELD && sig == b"u" {
            unix_fds = (Reader { pos: value, ..r }).u32()?;
        }
        if forged || !KNOWN_FIELDS.contains(&code) {
            dropped = true;
            continue;
        }
        if code == SENDER_FIELD && sender.is_some() {
            // Replaced below; what it held must still be a unique name.
            let name = (Reader { pos: value, ..r })
                .string()
                .filter(|_| sig == b"s")?;
            if !super::validate::unique_name(name) {
                return None;
            }
            continue;
        }
        // Each field starts on 8 bytes in both, so the values inside keep
        // their alignment.
        out.resize(out.len().next_multiple_of(8), 0);
        out.extend_from_slice(&header[start..r.pos]);
    }
    let u32_bytes = |x: u32| {
        if big_endian {
            x.to_be_bytes()
        } else {
            x.to_le_bytes()
        }
    };
    if let Some(name) = sender {
        out.resize(out.len().next_multiple_of(8), 0);
        out.extend_from_slice(&[SENDER_FIELD, 1, b's', 0]);
        out.extend_from_slice(&u32_bytes(u32::try_from(name.len()).ok()?));
        out.extend_from_slice(name.as_bytes());
        out.push(0);
    }
    let fields = u32::try_from(out.len() - 16).ok()?;
    out[12..16].copy_from_slice(&u32_bytes(fields));
    out.resize(out.len().next_multiple_of(8), 0);
    Some(Rewritten {
        old_len,
        dropped,
        unix_fds,
    })
}

/// The body signature exactly as the header carries it ("" for no body):
/// the form D-Bus error messages and signature checks use.
pub fn body_signature(msg: &Message) -> &str {
    read_header(msg)
        .and_then(|(_, sig)| std::str::from_utf8(sig).ok())
        .unwrap_or("")
}

fn decode_args_into<'m>(
    msg: &'m Message,
    max: usize,
    args: &mut Vec<Option<Arg<'m>>>,
) -> Option<()> {
    let bytes = msg.data().bytes();
    let body_len = usize::try_from(msg.primary_header().body_len()).ok()?;
    let (mut r, body_sig) = read_header(msg)?;
    if body_sig.is_empty() {
        return None;
    }
    r.align(8)?;
    let body_end = r.pos.checked_add(body_len)?;
    r.buf = bytes.get(..body_end)?;

    let mut sig = body_sig;
    while let Some(&code) = sig.first() {
        if args.len() >= max {
            break;
        }
        if code == b's' || code == b'o' {
            let value = r.string()?;
            args.push(Some(Arg {
                value,
                is_path: code == b'o',
            }));
            sig = sig.get(1..)?;
        } else {
            sig = r.skip(sig, 0)?;
            args.push(None);
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `msg`'s bytes with a field (code, `u` 0x12345678) added to its
    /// header, first or last: as dbus's test-header-fields makes them.
    fn with_weird_field(msg: &Message, code: u8, first: bool) -> (Vec<u8>, usize) {
        let bytes = msg.data().bytes().to_vec();
        let fields_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        let header_end = (16 + fields_len).next_multiple_of(8);
        let weird = [code, 1, b'u', 0, 0x78, 0x56, 0x34, 0x12];
        let mut fields = bytes[16..16 + fields_len].to_vec();
        if first {
            let mut f = weird.to_vec();
            f.extend_from_slice(&fields);
            fields = f;
        } else {
            fields.resize(fields.len().next_multiple_of(8), 0);
            fields.extend_from_slice(&weird);
        }
        let mut out = bytes[..16].to_vec();
        out[12..16].copy_from_slice(&(fields.len() as u32).to_le_bytes());
        out.extend_from_slice(&fields);
        out.resize(out.len().next_multiple_of(8), 0);
        let new_header = out.len();
        out.extend_from_slice(&bytes[header_end..]);
        (out, new_header)
    }

    #[test]
    fn a_well_known_sender_is_filtered_out_and_a_unique_one_kept() {
        let build = |sender: &str| {
            Message::signal("/p", "org.example.I", "S")
                .sender(sender)
                .build(&())
                .unwrap()
        };
        let unique = build(":1.23456789012345");
        assert!(filter_header(unique.data().bytes()).is_none());
        let mut forged = unique.data().bytes().to_vec();
        let at = forged
            .windows(17)
            .position(|w| w == b":1.23456789012345")
            .unwrap();
        let without = Message::signal("/p", "org.example.I", "S")
            .build(&())
            .unwrap();
        for (name, dropped) in [(b"org.example.Fake1", true), (b"org..example.Bad1", false)] {
            forged[at..at + 17].copy_from_slice(name);
            // The same fields but the sender's (bytes 8..12 are the serial).
            let filtered = filter_header(&forged).map(|(_, h)| h[12..].to_vec());
            let want = dropped.then(|| without.data().bytes()[12..].to_vec());
            assert_eq!(filtered, want, "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn unknown_header_fields_are_filtered_out() {
        let msg = Message::method_call("/p", "M")
            .destination("org.example.D")
            .interface("org.example.I")
            .build(&("hello",))
            .unwrap();
        let original = msg.data().bytes();
        let len = u32::from_le_bytes(original[12..16].try_into().unwrap()) as usize;
        let original_header = &original[..(16 + len).next_multiple_of(8)];
        assert!(filter_header(original).is_none(), "nothing to filter");
        for first in [true, false] {
            let (weird, header_len) = with_weird_field(&msg, 123, first);
            let (old_len, filtered) = filter_header(&weird).expect("a field to drop");
            assert_eq!(old_len, header_len);
            assert_eq!(filtered, original_header, "first: {first}");
        }
        // Not the whole header at hand: nothing done.
        let (weird, header_len) = with_weird_field(&msg, 123, false);
        assert!(filter_header(&weird[..header_len - 1]).is_none());
    }
    use zbus::wire::{Endian, ObjectPath, Variant};

    fn body<B>(b: &B) -> Message
    where
        B: zbus::export::serde::ser::Serialize + zbus::wire::DynamicType,
    {
        Message::signal("/x", "org.x.I", "S")
            .build(b)
            .expect("signal")
    }

    fn s(value: &str) -> Option<Arg<'_>> {
        Some(Arg {
            value,
            is_path: false,
        })
    }

    #[test]
    fn decode_structs_variants_and_big_endian() {
        // A body that is a single structure: arg0 is the structure, not its first field.
        let m = body(&(("a", "b"),));
        assert_eq!(decode_args(&m, 64), [None]);
        let m = body(&(
            Variant::Variant(Box::new(Variant::from("nested"))),
            vec![(1u8, 2u64)],
            std::collections::HashMap::from([("k", Variant::from(1.5f64))]),
            (7u16, "in", (true,)),
            "tail",
            ObjectPath::from_static_str("/p").unwrap(),
        ));
        let path = Some(Arg {
            value: "/p",
            is_path: true,
        });
        assert_eq!(
            decode_args(&m, 64),
            [None, None, None, None, s("tail"), path]
        );
        let big = Message::signal("/x", "org.x.I", "S")
            .endian(Endian::Big)
            .build(&(3u8, "big", vec![1u32, 2], "end"))
            .unwrap();
        assert_eq!(decode_args(&big, 64), [None, s("big"), None, s("end")]);
        assert_eq!(decode_args(&big, 2), [None, s("big")]);
        assert_eq!(decode_args(&body(&()), 64), []);
    }

    #[test]
    fn body_signature_as_written() {
        assert_eq!(body_signature(&body(&(("a", "b"),))), "(ss)");
        assert_eq!(body_signature(&body(&("a", "b"))), "ss");
        assert_eq!(body_signature(&body(&(vec![("k", 1u8)],))), "a(sy)");
        assert_eq!(body_signature(&body(&())), "");
    }

    #[test]
    fn reader_survives_garbage() {
        // Random bodies under random signatures must not panic.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let sigs: [&[u8]; 8] = [
            b"s",
            b"as",
            b"a{sv}s",
            b"v",
            b"(sa(yv))o",
            b"ayxs",
            b"a(",
            b"((((((((((((((((((((((((((((((((s))))))))))))))))))))))))))))))))",
        ];
        for _ in 0..2000 {
            let len = (next() % 64) as usize;
            let buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            for sig in sigs {
                let mut r = Reader {
                    buf: &buf,
                    pos: (next() % 8) as usize,
                    big_endian: next() % 2 == 0,
                };
                let _ = r.skip(sig, 0);
            }
        }
        // Deeply nested variants stop at the depth limit.
        let mut buf = Vec::new();
        for _ in 0..200 {
            buf.extend_from_slice(&[1, b'v', 0]);
        }
        let mut r = Reader {
            buf: &buf,
            pos: 0,
            big_endian: false,
        };
        assert!(r.skip(b"v", 0).is_none());
        assert_eq!(complete_type_len(b"a{sv}x", 0), Some(5));
        assert_eq!(complete_type_len(b"(", 0), None);
        assert_eq!(complete_type_len(b"", 0), None);
    }
}
