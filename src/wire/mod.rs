//! The wire: the one place the bus and the supervisor reach zbus through.
//!
//! zbus frames, parses and builds messages; everything above this module
//! sees [`Message`] as its currency, the builders below for what the bus
//! sends itself, [`BusError`] for the errors it answers with, and the names
//! of [`names`]. The transport and the CLI client use zbus directly.

pub(crate) mod args;
mod encode;
pub(crate) mod names;
pub(crate) mod validate;

use tracing::warn;

pub(crate) use names::ErrorName;
pub(crate) use zbus::message::{Flags, Header, Message, Type};
pub(crate) use zbus::wire::{DynamicType, Fd, ObjectPath, OwnedVariant, Variant};

/// A D-Bus error the bus answers with: its name and its human text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", self.name_str(), self.text)]
pub(crate) struct BusError {
    pub(crate) name: ErrorName,
    pub(crate) text: String,
    /// An error name from outside busvisor's list, passed on as it came
    /// (systemd's ActivationFailure); `name` is then `Failed`.
    foreign: Option<Box<str>>,
}

impl BusError {
    pub(crate) fn new(name: ErrorName, text: impl Into<String>) -> Self {
        BusError {
            name,
            text: text.into(),
            foreign: None,
        }
    }

    /// An error with a name someone else chose. dbus-daemon would send an
    /// invalid one nowhere (and retry for ever); busvisor sends `Failed`.
    pub(crate) fn named(name: &str, text: impl Into<String>) -> Self {
        let mut e = BusError::failed(text);
        if validate::error_name(name) {
            e.foreign = Some(name.into());
        }
        e
    }

    /// The error name on the wire.
    pub(crate) fn name_str(&self) -> &str {
        self.foreign.as_deref().unwrap_or(self.name.as_str())
    }

    pub(crate) fn invalid_args(text: impl Into<String>) -> Self {
        BusError::new(ErrorName::InvalidArgs, text)
    }

    pub(crate) fn failed(text: impl Into<String>) -> Self {
        BusError::new(ErrorName::Failed, text)
    }
}

/// The body of `msg` as `T`, or InvalidArgs.
pub(crate) fn args<'b, T>(body: &'b zbus::message::Body) -> Result<T, BusError>
where
    T: zbus::wire::DynamicDeserialize<'b>,
{
    body.deserialize()
        .map_err(|e| BusError::invalid_args(format!("invalid arguments: {e}")))
}

/// Whether `msg` is a method call whose sender wants an answer (no
/// NO_REPLY_EXPECTED flag).
pub(crate) fn wants_reply(msg: &Message) -> bool {
    msg.message_type() == Type::MethodCall
        && !msg
            .primary_header()
            .flags()
            .contains(Flags::NO_REPLY_EXPECTED)
}

/// The header of the bus's answer to `call`: to its sender, in its byte
/// order.
fn answer_head<'a>(call: &'a Header<'_>, kind: Type) -> encode::Head<'a> {
    encode::Head {
        endian: call.primary().endian_sig().into(),
        reply_serial: Some(call.primary().serial_num()),
        destination: call.sender().map(|s| s.as_str()),
        ..encode::Head::new(kind, names::BUS_NAME)
    }
}

/// A method return from the bus to `call`.
pub(crate) fn reply<B>(call: &Message, body: &B) -> Option<Message>
where
    B: serde::Serialize + DynamicType,
{
    encode::encode(&answer_head(&call.header(), Type::MethodReturn), body)
        .map_err(|e| warn!("cannot build reply: {e}"))
        .ok()
}

/// An error from the bus in reply to `call`.
pub(crate) fn error(call: &Message, e: &BusError) -> Option<Message> {
    let header = call.header();
    let head = encode::Head {
        error_name: Some(e.name_str()),
        ..answer_head(&header, Type::Error)
    };
    encode::encode(&head, &(e.text.as_str(),))
        .map_err(|err| warn!("cannot build error {}: {err}", e.name_str()))
        .ok()
}

/// A signal the bus emits, broadcast (`dest` None) or to one peer.
pub(crate) fn signal<B>(
    path: &str,
    iface: &str,
    member: &str,
    dest: Option<&str>,
    body: &B,
) -> Option<Message>
where
    B: serde::Serialize + DynamicType,
{
    let head = encode::Head {
        destination: dest,
        ..encode::Head::to_member(Type::Signal, names::BUS_NAME, path, iface, member)
    };
    encode::encode(&head, body)
        .map_err(|e| warn!("cannot build signal {member}: {e}"))
        .ok()
}

/// A method call the bus makes itself, expecting no reply (dbus-daemon's
/// SetEnvironment to systemd).
pub(crate) fn call_from_bus<B>(
    dest: &str,
    path: &str,
    iface: &str,
    member: &str,
    body: &B,
) -> Option<Message>
where
    B: serde::Serialize + DynamicType,
{
    let head = encode::Head {
        flags: Flags::NO_REPLY_EXPECTED,
        destination: Some(dest),
        ..encode::Head::to_member(Type::MethodCall, names::BUS_NAME, path, iface, member)
    };
    encode::encode(&head, body)
        .map_err(|e| warn!("cannot build call {member}: {e}"))
        .ok()
}

/// An error to a call that is not at hand, only its sender and serial:
/// zbus's reply builders need a header to answer.
pub(crate) fn detached_error(caller: &str, serial: u32, e: &BusError) -> Option<Message> {
    let serial = std::num::NonZeroU32::new(serial)?;
    let stand_in = Message::method_call("/", "x")
        .sender(caller)
        .serial(serial)
        .build(&())
        .ok()?;
    error(&stand_in, e)
}

/// A fresh server GUID, as the address and GetId report it.
pub(crate) fn new_guid() -> String {
    zbus::Guid::generate().as_str().to_owned()
}

/// A property value as a variant that owns its data.
pub(crate) fn owned<'a, T: Into<Variant<'a>>>(x: T) -> OwnedVariant {
    OwnedVariant::try_from(x.into()).expect("plain values always convert")
}

/// The header of the message `bytes` starts, decoded and checked as
/// dbus-daemon's loader checks every header: protocol version 1, fields
/// that decode whatever their code (unknown ones included), the known ones
/// with their types, zero padding. Returns where the body starts and the
/// body's signature. Costly (it decodes into values): only for the rare
/// messages with unknown fields or of unknown type.
fn checked_header(bytes: &[u8]) -> Option<(usize, String)> {
    use zbus::wire::serialized::{Context, Data};
    use zbus::wire::{Endian, Structure, Variant as Value};
    let endian = match bytes.first() {
        Some(b'l') => Endian::Little,
        Some(b'B') => Endian::Big,
        _ => return None,
    };
    if bytes.get(3) != Some(&1) {
        return None;
    }
    let data = Data::new(bytes, Context::new(endian, 0));
    let (header, header_len) = data
        .deserialize_for_dynamic_signature::<_, Structure<'_>>("(yyyyuua(yv))")
        .ok()?;
    let Some(Value::Array(fields)) = header.fields().get(6) else {
        return None;
    };
    let mut signature = String::new();
    for f in fields.iter() {
        let Value::Structure(f) = f else {
            return None;
        };
        let [Value::U8(code), Value::Variant(v)] = f.fields() else {
            return None;
        };
        match (code, &**v) {
            (1, Value::ObjectPath(_))
            | (2 | 3 | 4 | 6 | 7, Value::Str(_))
            | (5 | 9, Value::U32(_)) => {}
            (8, Value::Signature(s)) => signature = s.to_string(),
            (0..=9, _) => return None,
            // Unknown codes: any value that decodes.
            _ => {}
        }
    }
    let body_start = header_len.next_multiple_of(8);
    if bytes.get(header_len..body_start)?.iter().any(|b| *b != 0) {
        return None;
    }
    Some((body_start, signature))
}

/// Whether the header `bytes` starts is well-formed (see `checked_header`):
/// checked before unknown fields are removed, as dbus-daemon checks them
/// before it filters them.
pub(crate) fn header_well_formed(bytes: &[u8]) -> bool {
    checked_header(bytes).is_some()
}

/// Whether a message of a type the specification does not define (the bus
/// ignores those) is still well-formed, as dbus-daemon's loader checks
/// every message before its type matters: its header, and a body that
/// decodes with its signature.
pub(crate) fn well_formed_unknown(bytes: &[u8]) -> bool {
    use zbus::wire::serialized::{Context, Data};
    use zbus::wire::{Endian, Structure};
    let Some((body_start, signature)) = checked_header(bytes) else {
        return false;
    };
    let endian = if bytes[0] == b'B' {
        Endian::Big
    } else {
        Endian::Little
    };
    let data = Data::new(bytes, Context::new(endian, 0));
    let body = data.slice(body_start..);
    if signature.is_empty() {
        return body.is_empty();
    }
    matches!(
        body.deserialize_for_dynamic_signature::<_, Structure<'_>>(format!("({signature})").as_str()),
        Ok((_, n)) if n == body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(no_reply: bool) -> Message {
        let mut b = Message::method_call("/p", "M")
            .sender(":1.4")
            .destination("org.example.X");
        if no_reply {
            b = b.with_flags(Flags::NO_REPLY_EXPECTED);
        }
        b.build(&()).unwrap()
    }

    #[test]
    fn replies_go_back_to_the_caller_from_the_bus() {
        let c = call(false);
        assert!(wants_reply(&c));
        assert!(!wants_reply(&call(true)));
        let r = reply(&c, &(7u32,)).unwrap();
        let h = r.header();
        assert_eq!(h.destination().unwrap().as_str(), ":1.4");
        assert_eq!(h.sender().unwrap().as_str(), names::BUS_NAME);
        assert_eq!(h.reply_serial(), Some(c.primary_header().serial_num()));
        let e = error(&c, &BusError::invalid_args("bad")).unwrap();
        assert_eq!(
            e.header().error_name().unwrap().as_str(),
            ErrorName::InvalidArgs.as_str()
        );
        let text: String = e.body().deserialize().unwrap();
        assert_eq!(text, "bad");
    }

    #[test]
    fn an_error_name_from_outside_is_passed_on_when_valid() {
        let e = BusError::named("com.example.Nope", "Computer says no");
        let m = error(&call(false), &e).unwrap();
        assert_eq!(
            m.header().error_name().unwrap().as_str(),
            "com.example.Nope"
        );
        assert_eq!(e.to_string(), "com.example.Nope: Computer says no");
        let bad = BusError::named("not an error name", "x");
        assert_eq!(bad.name_str(), ErrorName::Failed.as_str());
    }

    #[test]
    fn a_detached_error_answers_the_serial() {
        let e = detached_error(":1.9", 42, &BusError::new(ErrorName::NoReply, "gone")).unwrap();
        let h = e.header();
        assert_eq!(h.destination().unwrap().as_str(), ":1.9");
        assert_eq!(h.reply_serial().map(|s| s.get()), Some(42));
        assert!(detached_error(":1.9", 0, &BusError::failed("x")).is_none());
    }

    #[test]
    fn signals_carry_the_bus_as_sender() {
        let s = signal(
            names::BUS_PATH,
            names::BUS_NAME,
            "NameLost",
            Some(":1.2"),
            &("a.b",),
        )
        .unwrap();
        assert_eq!(s.header().sender().unwrap().as_str(), names::BUS_NAME);
        assert_eq!(s.header().destination().unwrap().as_str(), ":1.2");
    }
}
