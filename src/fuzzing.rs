//! Entry points for the fuzz targets in `fuzz/` and for `tests/fuzz_corpus.rs`,
//! which replays their corpora (docs/FUZZING.md). Each takes arbitrary bytes,
//! runs the bus's own parsing code on them, and panics only when an
//! invariant of that code breaks: a panic here is a bug in the bus.
//!
//! Not an API: hidden from the docs, and kept to one function per target.

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use zbus::wire::serialized::{Context, Data};
use zbus::wire::{Endian, Structure};

use crate::bus::matching::{MatchIndex, MatchRule, MessageInfo, Owners};
use crate::wire::{Header, Message, validate};

/// Inputs longer than this are skipped: every parser here takes bounded
/// input in the bus (a config or service file is read whole, but the
/// fuzzer's findings are about structure, not size).
const MAX_INPUT: usize = 1 << 20;

thread_local! {
    /// One runtime per fuzzing thread: building one per input would cost
    /// more than the input.
    static RUNTIME: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime"),
    );
}

fn block_on<F: Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| rt.borrow().block_on(f))
}

/// The message reader: `data` is what a client sends after the handshake
/// (its first half as the bytes read with BEGIN, the rest through the
/// socket), framed, parsed and (after the first message, as after Hello)
/// stamped by `transport::socket::Reader`, and admitted (body validated,
/// sender stamped if not yet) as the bus admits each message.
///
/// Invariants: a stamped message re-parses to the same header with the
/// peer as sender and the same body, and a validated body re-encodes to
/// the same bytes (or, where it may hold a dict, stably).
pub fn message_reader(data: &[u8]) {
    if data.len() <= MAX_INPUT {
        read_messages(data);
    }
}

/// How many messages of `data` the reader returned and the bus admitted.
fn read_messages(data: &[u8]) -> usize {
    let me = zbus::names::OwnedUniqueName::try_from(":1.42").expect("a unique name");
    block_on(async {
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        let limits = crate::transport::socket::ReadLimits {
            max_message_size: crate::config::Limits::SESSION_CONF.max_message_size,
            pending_fd_timeout: std::time::Duration::from_secs(1),
            fds: false,
        };
        let (leftover, sent) = data.split_at(data.len() / 2);
        let mut reader =
            crate::transport::socket::Reader::new(Arc::new(ours), limits, leftover.to_vec());
        let write = async move {
            // The reader may stop early (a protocol error): then this fails.
            let _ = theirs.write_all(sent).await;
        };
        // As a connection reads: the first message (the Hello) before the
        // peer has a name, then the reader stamps each with it.
        let read = async {
            let mut admitted = 0;
            let mut stamped = false;
            while let Ok(msg) = reader.receive().await {
                admitted += usize::from(check_admitted(&msg, &me, stamped));
                if !stamped {
                    reader.stamp(&me);
                    stamped = true;
                }
            }
            admitted
        };
        tokio::join!(write, read).1
    })
}

/// Whether the bus admitted `msg` (which the reader stamped, if
/// `by_reader`); panics if an invariant breaks.
fn check_admitted(msg: &Message, me: &zbus::names::OwnedUniqueName, by_reader: bool) -> bool {
    let Some(stamped) = crate::transport::admit(msg.clone(), me, by_reader) else {
        return false;
    };
    let (before, after) = (msg.header(), stamped.header());
    assert_eq!(after.sender(), Some(&**me), "the sender is stamped");
    same_header(&before, &after);
    assert_eq!(
        msg.body().data().bytes(),
        stamped.body().data().bytes(),
        "stamping keeps the body"
    );
    // The stamped bytes, decoded afresh as a header, say the same.
    let bytes = stamped.data().bytes().to_vec();
    let endian = if bytes[0] == b'B' {
        Endian::Big
    } else {
        Endian::Little
    };
    let ctxt = Context::new(endian, 0);
    let fresh = Data::new(bytes, ctxt);
    let (reparsed, _) = fresh
        .deserialize::<Header<'_>>()
        .expect("a stamped header decodes");
    assert_eq!(reparsed.sender(), Some(&**me));
    same_header(&after, &reparsed);
    // A body that validated decodes with its signature and encodes back to
    // the same bytes (D-Bus encoding is canonical: zero padding, booleans
    // 0 or 1), except that zbus holds a dict as a sorted map (keys reordered,
    // duplicates merged), so where a dict may be (`{`, or in a variant) the
    // encoding need only be stable. Fds are left out: none come here.
    let body = stamped.body();
    let sig = body.signature().to_string();
    if sig.is_empty() || sig.contains('h') {
        return true;
    }
    let may_hold_dict = sig.contains(['{', 'v']);
    let sig = format!("({sig})");
    let reencode = |data: &Data<'static, 'static>| {
        let (value, used) = data
            .deserialize_for_dynamic_signature::<_, Structure<'_>>(sig.as_str())
            .expect("a validated body decodes");
        assert_eq!(used, data.len(), "the body is all used");
        zbus::wire::to_bytes_for_signature(ctxt, sig.as_str(), &value).expect("a body encodes")
    };
    let again = reencode(body.data());
    if may_hold_dict {
        assert_eq!(reencode(&again).bytes(), again.bytes(), "stable");
    } else {
        assert_eq!(again.bytes(), body.data().bytes(), "the body re-encodes");
    }
    true
}

/// Every header field but the sender is the same.
fn same_header(a: &Header<'_>, b: &Header<'_>) {
    let (pa, pb) = (a.primary(), b.primary());
    assert_eq!(pa.msg_type(), pb.msg_type());
    assert_eq!(pa.flags(), pb.flags());
    assert_eq!(pa.serial_num(), pb.serial_num());
    assert_eq!(pa.body_len(), pb.body_len());
    assert_eq!(a.path(), b.path());
    assert_eq!(a.interface(), b.interface());
    assert_eq!(a.member(), b.member());
    assert_eq!(a.error_name(), b.error_name());
    assert_eq!(a.reply_serial(), b.reply_serial());
    assert_eq!(a.destination(), b.destination());
    assert_eq!(a.signature(), b.signature());
    assert_eq!(a.unix_fds(), b.unix_fds());
}

/// The uid the socket says the SASL client has: root, as the clients whose exchanges seed the corpus ran.
const SASL_UID: u32 = 0;
const SASL_GUID: &str = "0123456789abcdef0123456789abcdef";

/// The SASL server: `data` is what a client sends from its first byte,
/// answered by `transport::sasl::handshake` for a peer of uid 0.
///
/// Invariants: every reply is one the protocol defines; a success comes
/// after an OK with the guid, only for a client that sent BEGIN; the bytes
/// after BEGIN are handed on intact (read with it, or left in the socket);
/// fds only after AGREE_UNIX_FD.
pub fn sasl(data: &[u8]) {
    if data.len() <= MAX_INPUT {
        sasl_exchange(data);
    }
}

/// What the handshake on `data` settled, checked.
fn sasl_exchange(data: &[u8]) -> Option<crate::transport::sasl::Negotiated> {
    let (result, replies, unread) = block_on(async {
        let (server, client) = UnixStream::pair().expect("socketpair");
        let (mut from_server, mut to_server) = client.into_split();
        let write = async move {
            let _ = to_server.write_all(data).await;
            // Dropping the write half shuts it down: the server sees EOF.
        };
        let read = async move {
            let mut replies = Vec::new();
            let _ = from_server.read_to_end(&mut replies).await;
            replies
        };
        let serve = async move {
            let r = crate::transport::sasl::handshake(&server, SASL_GUID, SASL_UID).await;
            // What the handshake did not read stays in the socket, for the
            // message reader.
            let mut unread = Vec::new();
            if r.is_ok() {
                let mut server = server;
                let _ = server.read_to_end(&mut unread).await;
            }
            (r, unread)
        };
        let ((), replies, (result, unread)) = tokio::join!(write, read, serve);
        (result, replies, unread)
    });
    let replies = String::from_utf8(replies).expect("replies are ASCII");
    assert!(
        replies.is_empty() || replies.ends_with("\r\n"),
        "{replies:?}"
    );
    let ok = format!("OK {SASL_GUID}");
    let mut rejected = 0;
    for line in replies.split_terminator("\r\n") {
        match line {
            "REJECTED EXTERNAL" => rejected += 1,
            "DATA" | "AGREE_UNIX_FD" => {}
            l if l == ok => {}
            "ERROR \"Command not expected now\"" | "ERROR \"Unknown command\"" => {}
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert!(rejected <= 8, "at most 8 rejections are answered");
    if let Ok(n) = &result {
        assert!(replies.contains(&format!("{ok}\r\n")), "{replies:?}");
        // The bytes after BEGIN: those read with it, then those unread.
        let after = [&n.leftover[..], &unread].concat();
        assert!(data.ends_with(&after), "what follows BEGIN is handed on");
        let before = &data[..data.len() - after.len()];
        assert!(
            before.ends_with(b"BEGIN\r\n") || before.ends_with(b"BEGIN \r\n") || {
                // BEGIN with an argument, which the server ignores.
                let line_start = before[..before.len() - 2]
                    .windows(2)
                    .rposition(|w| w == b"\r\n")
                    .map_or(0, |i| i + 2);
                before[line_start..].starts_with(b"BEGIN ")
            }
        );
        if n.fds {
            assert!(replies.contains("AGREE_UNIX_FD\r\n"));
        }
    }
    result.ok()
}

/// The match-rule parser: `data` as the argument of AddMatch.
///
/// Invariants: a rule that parses prints as text that parses back to the
/// same rule (when that text is within the length limit); and the index
/// finds the rule for exactly the messages the rule matches.
pub fn match_rule(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(rule) = MatchRule::parse(text) else {
        return;
    };
    let printed = rule.to_string();
    if printed.len() <= crate::bus::matching::MAX_RULE_LENGTH {
        let again = MatchRule::parse(&printed)
            .unwrap_or_else(|e| panic!("{printed:?} (printed from {text:?}) fails: {e}"));
        assert_eq!(again, rule, "{text:?} printed as {printed:?}");
        assert_eq!(again.to_string(), printed);
    }
    let mut index = MatchIndex::default();
    index.add(1u8, rule.clone());
    for msg in messages_for(&rule) {
        let owners = HeaderOwners(msg.header());
        let info = MessageInfo::new(&msg);
        let direct = rule.matches(&info, &owners);
        let mut found = false;
        index.for_each_match(&info, &owners, |_, _| true, |_| found = true);
        assert_eq!(
            found, direct,
            "index and rule disagree on {msg:?} for {text:?}"
        );
    }
}

/// Messages that the rule may match: built from its own fields, and one
/// that matches little.
fn messages_for(rule: &MatchRule) -> Vec<Message> {
    let path = rule.path().or(rule.path_namespace()).unwrap_or("/a");
    let iface = rule.interface().unwrap_or("a.b");
    let member = rule.member().unwrap_or("M");
    let sender = rule
        .sender()
        .filter(|s| s.starts_with(':'))
        .unwrap_or(":1.1");
    let arg0 = rule.arg0().unwrap_or("x");
    let with_dest = |b: zbus::message::Builder<'static>| match rule.destination() {
        Some(d) => b.destination(d.to_owned()),
        None => b,
    };
    let signal = with_dest(Message::signal(
        path.to_owned(),
        iface.to_owned(),
        member.to_owned(),
    ))
    .sender(sender.to_owned())
    .build(&(arg0,));
    let call = with_dest(Message::method_call(path.to_owned(), member.to_owned()))
        .sender(sender.to_owned())
        .interface(iface.to_owned())
        .build(&(arg0, path));
    let other = Message::signal("/z", "z.z", "Z").sender(":1.9").build(&());
    [signal, call, other].into_iter().flatten().collect()
}

/// Names are owned only by themselves: the sender and destination fields.
struct HeaderOwners<'m>(Header<'m>);

impl Owners for HeaderOwners<'_> {
    fn sender_is(&self, name: &str) -> bool {
        self.0.sender().is_some_and(|s| s.as_str() == name)
    }
    fn destination_is(&self, name: &str) -> bool {
        self.0.destination().is_some_and(|d| d.as_str() == name)
    }
}

/// Lines in `text`, counting a last line without a newline.
fn line_count(text: &str) -> u64 {
    text.lines().count() as u64 + 1
}

/// Where the fuzzed files claim to be: a directory that does not exist.
const ORIGIN_DIR: &str = "/nonexistent/busvisor-fuzz";

/// The XML configuration parser (and the `<policy>` rules it parses), on
/// `data` as the text of a configuration file.
///
/// Inputs that mention `include` are skipped: `<include>` and
/// `<includedir>` read other files, which a fuzzer must not (a path such
/// as /dev/stdin would block it); tests/fixtures covers them.
///
/// Invariants: parsing is deterministic; an error's line is in the file;
/// limits are in dbus-daemon's range. (`<listen>` addresses are checked
/// when the bus binds them, as dbus-daemon checks them.)
pub fn xml_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains("include") || text.len() > MAX_INPUT {
        return;
    }
    let origin = Path::new(ORIGIN_DIR).join("fuzz.conf");
    let env = |_: &str| None;
    let parsed = crate::config::parse_xml_with_env(text, &origin, &env);
    check_config(text, &parsed, false);
    let again = crate::config::parse_xml_with_env(text, &origin, &env);
    match (&parsed, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "parsing is deterministic"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("parsing is deterministic"),
    }
}

/// `listen_checked`: the parser checks the listen addresses it keeps.
fn check_config(
    text: &str,
    parsed: &Result<crate::config::BusConfig, crate::config::ConfigError>,
    listen_checked: bool,
) {
    match parsed {
        Ok(cfg) => {
            for addr in cfg.listen.iter().filter(|_| listen_checked) {
                assert!(
                    crate::config::address::parse_listen(addr).is_ok(),
                    "kept listen address {addr:?} does not parse"
                );
            }
            let l = &cfg.limits;
            for v in [
                l.max_incoming_bytes,
                l.max_outgoing_bytes,
                l.max_message_size,
                l.max_message_unix_fds,
                l.auth_timeout_ms,
                l.max_completed_connections,
            ] {
                assert!(v <= i64::MAX as u64, "limit {v} out of range");
            }
        }
        Err(e) => {
            if let Some(line) = e.line() {
                assert!(
                    (1..=line_count(text)).contains(&line),
                    "error line {line} outside the file: {e}"
                );
            }
        }
    }
}

/// The `[D-BUS Service]` file parser, on `data` as a `.service` file's
/// bytes, then made into a definition as the catalog makes it.
///
/// Invariants: the name is a valid well-known bus name; the lines given
/// are in the file; a split Exec= is a non-empty argv without NUL.
pub fn service_file(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let path = Path::new(ORIGIN_DIR).join("org.example.Fuzz.service");
    let file = crate::activation::desktop::ServiceFile::parse_bytes(&path, data);
    // Lines end at \n, \r\n or a lone \r, as in dbus-daemon's desktop files.
    let lines = 1 + data
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && data.get(i + 1) != Some(&b'\n')))
        .count();
    match file {
        Ok(f) => {
            assert!(validate::well_known_name(&f.name).is_ok(), "{:?}", f.name);
            assert!((1..=lines).contains(&f.name_line));
            assert!((1..=lines).contains(&f.exec_line));
            if let Ok(argv) = &f.argv {
                assert!(!argv.is_empty());
                assert!(argv.iter().all(|a| !a.contains('\0')), "{argv:?}");
            }
            let def = crate::activation::definition::def_from_service_file(&path, f.clone());
            assert_eq!(def.names, vec![f.name.clone()]);
            assert_eq!(def.id, f.name);
        }
        Err(e) => {
            if let Some(line) = e.line {
                assert!((1..=lines).contains(&line), "error line {line}: {e}");
            }
        }
    }
}

/// busvisor's TOML files: `data` as a service definition
/// (`services.d/*.toml`, `activation::definition::parse_toml`) and as a
/// bus configuration (`config::busvisor_toml`).
///
/// Invariants: a definition has valid, distinct names, an argv whose
/// program is set, restart_delay <= restart_delay_max, log_lines in range;
/// an error's line and column are in the file; the configuration as for
/// `xml_config`, and its listen addresses parse (this parser checks them).
pub fn toml_files(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.len() > crate::activation::definition::MAX_TOML_FILE_SIZE {
        return;
    }
    let path = Path::new(ORIGIN_DIR).join("org.example.Fuzz.toml");
    match crate::activation::definition::parse_toml(&path, text) {
        Ok(def) => {
            assert!(!def.names.is_empty());
            for (i, n) in def.names.iter().enumerate() {
                assert!(validate::well_known_name(n).is_ok(), "{n:?}");
                assert!(!def.names[..i].contains(n), "{n:?} twice");
            }
            let argv = def.argv.as_ref().expect("a TOML exec is an argv");
            assert!(!argv.is_empty() && !argv[0].is_empty());
            assert!(def.restart_delay <= def.restart_delay_max);
            let max_lines = crate::activation::definition::MAX_LOG_LINES;
            assert!((1..=max_lines).contains(&def.log_lines));
        }
        Err(e) => {
            if let crate::activation::definition::DefinitionError::Toml(t) = &e {
                assert!(
                    (1..=line_count(text) as usize).contains(&t.line) && t.column >= 1,
                    "error at {}:{}: {e}",
                    t.line,
                    t.column
                );
            }
        }
    }
    let origin = Path::new(ORIGIN_DIR).join("busvisor.toml");
    let parsed = crate::config::busvisor_toml::parse_toml_with_env(text, &origin, &|_| None);
    check_config(text, &parsed, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The targets reach the code they are for: real inputs get through.
    #[test]
    fn real_inputs_pass() {
        let call = Message::method_call("/org/freedesktop/DBus", "Hello")
            .destination("org.freedesktop.DBus")
            .interface("org.freedesktop.DBus")
            .build(&())
            .unwrap();
        let signal = Message::signal("/a", "a.b", "S")
            .build(&("x", 7u32, vec![("k", true)], crate::wire::owned(3i64)))
            .unwrap();
        let mut two = call.data().bytes().to_vec();
        two.extend_from_slice(signal.data().bytes());
        assert_eq!(read_messages(&two), 2);
        // A truncated second message ends the stream after the first.
        assert_eq!(read_messages(&two[..two.len() - 1]), 1);
        // A dict whose keys are out of order and repeated is valid, and is
        // relayed as it came (zbus's own decoding would sort and merge it).
        let pairs = vec![("b", "1"), ("a", "2"), ("b", "3")];
        let body = Message::signal("/a", "a.b", "S").build(&(pairs,)).unwrap();
        let mut bytes = body.data().bytes().to_vec();
        let at = bytes.windows(5).position(|w| w == b"a(ss)").unwrap();
        bytes[at..at + 5].copy_from_slice(b"a{ss}");
        assert_eq!(read_messages(&bytes), 1);

        let n =
            sasl_exchange(b"\0AUTH EXTERNAL 30\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\nl\x01").unwrap();
        assert!(n.fds);
        assert_eq!(n.leftover, b"l\x01");
        assert!(sasl_exchange(b"\0AUTH EXTERNAL 31\r\nBEGIN\r\n").is_none());
        // Past the handshake's first read (512 bytes), the rest of the
        // message stays in the socket (a finding of the fuzzer's, in this
        // check, not in the server).
        let mut long = b"\0AUTH EXTERNAL 30\r\nBEGIN\r\n".to_vec();
        long.extend_from_slice(&[b'l'; 600]);
        let n = sasl_exchange(&long).unwrap();
        assert!(n.leftover.len() < 600);

        match_rule(b"type='signal',sender=':1.1',path_namespace='/a',arg0='x'");
        toml_files(b"name = \"a.b\"\nexec = [\"/bin/x\"]\n");
        service_file(b"[D-BUS Service]\nName=a.b\nExec=/bin/x --y 'z w'\n");
        xml_config(
            crate::config::SESSION_CONF
                .replace("include", "")
                .as_bytes(),
        );
    }
}
