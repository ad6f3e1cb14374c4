//! Rules and messages are written in a short notation: a rule is `allow` or
//! `deny` and the attributes of dbus-daemon's element (`*` is "any", as the
//! parser makes it); a message is its type and `key=value` header facts.

use super::*;
use std::hash::{BuildHasher, RandomState};

/// One rule from `allow attr=value ...` / `deny attr=value ...`, with the
/// parser's defaults (requested_reply true for allow, false for deny).
fn rule(text: &str) -> Rule {
    let mut words = text.split_whitespace();
    let allow = match words.next() {
        Some("allow") => true,
        Some("deny") => false,
        other => panic!("not a rule: {other:?}"),
    };
    let mut m = MessageRule {
        requested_reply: allow,
        ..MessageRule::default()
    };
    let (mut send, mut other) = (false, None);
    for word in words {
        let (key, value) = word.split_once('=').expect("attr=value");
        let any = (value != "*").then(|| value.to_owned());
        let id = || any.as_deref().map(|v| v.parse().unwrap());
        send |= key.starts_with("send_");
        match key
            .trim_start_matches("send_")
            .trim_start_matches("receive_")
        {
            "own" => {
                other = Some(RuleKind::Own {
                    name: any,
                    prefix: false,
                })
            }
            "own_prefix" => {
                other = Some(RuleKind::Own {
                    name: any,
                    prefix: true,
                })
            }
            "user" => other = Some(RuleKind::User(id())),
            "group" => other = Some(RuleKind::Group(id())),
            "type" => m.message_type = any.map(|t| msg_type(&t)),
            "path" => m.path = any,
            "interface" => m.interface = any,
            "member" => m.member = any,
            "error" => m.error = any,
            "destination" | "sender" => m.name = any,
            "destination_prefix" => (m.name, m.name_is_prefix) = (any, true),
            "broadcast" => m.broadcast = Some(value == "true"),
            "requested_reply" => m.requested_reply = value == "true",
            "eavesdrop" => m.eavesdrop = value == "true",
            "log" => m.log = value == "true",
            "min_fds" => m.min_fds = value.parse().unwrap(),
            "max_fds" => m.max_fds = value.parse().unwrap(),
            _ => panic!("unknown attribute {key}"),
        }
    }
    // Without a send attribute (`eavesdrop` alone, fds alone), a receive rule.
    let kind = other.unwrap_or(if send {
        RuleKind::Send(m)
    } else {
        RuleKind::Receive(m)
    });
    Rule { allow, kind }
}

fn rules(texts: &str) -> Vec<Rule> {
    texts
        .split(';')
        .filter(|t| !t.trim().is_empty())
        .map(rule)
        .collect()
}

/// The client policy of a connection when all `texts` are default rules.
fn client(texts: &str) -> ClientPolicy {
    let policy = Policy {
        default: rules(texts),
        ..Policy::default()
    };
    policy.client(1000, &[], false)
}

fn msg_type(t: &str) -> MessageType {
    match t {
        "method_call" => MessageType::MethodCall,
        "method_return" => MessageType::MethodReturn,
        "signal" => MessageType::Signal,
        "error" => MessageType::Error,
        _ => panic!("unknown type {t}"),
    }
}

/// `type key=value ...`; `reply` gives a reply serial, `requested` marks
/// the reply expected, `fds=N`.
fn msg(text: &'static str) -> MessageFacts<'static> {
    let mut words = text.split_whitespace();
    let mut m = MessageFacts {
        message_type: msg_type(words.next().unwrap()),
        path: None,
        interface: None,
        member: None,
        error_name: None,
        destination: None,
        n_fds: 0,
        has_reply_serial: false,
        requested_reply: false,
    };
    for word in words {
        match word.split_once('=') {
            Some(("path", v)) => m.path = Some(v),
            Some(("interface", v)) => m.interface = Some(v),
            Some(("member", v)) => m.member = Some(v),
            Some(("error", v)) => m.error_name = Some(v),
            Some(("destination", v)) => m.destination = Some(v),
            Some(("fds", v)) => m.n_fds = v.parse().unwrap(),
            None if word == "reply" => m.has_reply_serial = true,
            None if word == "requested" => (m.has_reply_serial, m.requested_reply) = (true, true),
            _ => panic!("unknown message fact {word}"),
        }
    }
    m
}

/// A connection's names: owned and queued both count.
struct Conn {
    owned: &'static [&'static str],
    queued: &'static [&'static str],
}

impl Names for Conn {
    fn has(&self, name: &str) -> bool {
        self.owned.iter().chain(self.queued).any(|n| *n == name)
    }
    fn has_under(&self, prefix: &str) -> bool {
        self.owned
            .iter()
            .chain(self.queued)
            .any(|n| has_prefix(n, prefix))
    }
    fn each_name(&self, f: &mut dyn FnMut(&str)) {
        self.owned.iter().chain(self.queued).for_each(|n| f(n));
    }
}

const RECEIVER: Conn = Conn {
    owned: &[":1.5", "a.b"],
    queued: &["q.x"],
};

/// A row `rules | message => allow N` (or `deny N`): the answer and the
/// number of matched rules of the check.
fn row(text: &'static str) -> (&'static str, &'static str, Decision) {
    let (case, outcome) = text.split_once(" => ").expect("=>");
    let (texts, message) = case.split_once(" | ").expect("|");
    let (answer, matched) = outcome.split_once(' ').expect("answer and count");
    let matched_rules = matched.parse().unwrap();
    (
        texts,
        message,
        decision(answer == "allow", matched_rules, false),
    )
}

fn decision(allowed: bool, matched_rules: usize, log: bool) -> Decision {
    Decision {
        allowed,
        matched_rules,
        log,
    }
}

fn check_sends(rows: &[&'static str], receiver: Receiver) {
    for text in rows {
        let (texts, message, expected) = row(text);
        let d = client(texts).can_send(&msg(message), receiver);
        assert_eq!(
            (d.allowed, d.matched_rules),
            (expected.allowed, expected.matched_rules),
            "{text}"
        );
    }
}

#[test]
fn send_attributes() {
    let rows = [
        " | method_call interface=x member=M => deny 0",
        "allow send_type=method_call | method_call => allow 1",
        "allow send_type=method_call | signal interface=x member=S => deny 0",
        "allow send_type=* | signal interface=x member=S => allow 1",
        "allow send_path=/a | method_call path=/a => allow 1",
        "allow send_path=/a | method_call path=/b => deny 0",
        "allow send_interface=x | method_call interface=x => allow 1",
        "allow send_interface=x | method_call interface=y => deny 0",
        "allow send_interface=x send_member=M | method_call interface=x member=M => allow 1",
        "allow send_interface=x send_member=M | method_call interface=x member=N => deny 0",
        "allow send_error=E | error error=E requested => allow 1",
        "allow send_error=E | error error=F requested => deny 0",
        // The receiver's names, owned or queued, unique name included.
        "allow send_destination=a.b | method_call => allow 1",
        "allow send_destination=:1.5 | method_call => allow 1",
        "allow send_destination=q.x | method_call => allow 1",
        // Not the destination header.
        "allow send_destination=c.d | method_call destination=c.d => deny 0",
        "allow send_destination=* | signal interface=x member=S => allow 1",
        "allow min_fds=1 send_type=* | method_call => deny 0",
        "allow send_type=* min_fds=1 | method_call fds=1 => allow 1",
        "allow send_type=* max_fds=2 | method_call fds=2 => allow 1",
        "allow send_type=* max_fds=2 | method_call fds=3 => deny 0",
        "allow send_broadcast=true | signal interface=x member=S => allow 1",
        "allow send_broadcast=true | signal interface=x member=S destination=a.b => deny 0",
        "allow send_broadcast=true | method_call => deny 0",
        "allow send_broadcast=false | signal interface=x member=S => deny 0",
        "allow send_broadcast=false | signal interface=x member=S destination=a.b => allow 1",
        "allow send_broadcast=false | method_call => allow 1",
        "allow send_type=*; deny send_type=* log=true | method_call => deny 1",
    ];
    check_sends(&rows, Receiver::Connection(&RECEIVER));
}

#[test]
fn missing_fields_match_except_interface_for_allow() {
    let rows = [
        // A message without an interface: allow rules do not match...
        "allow send_interface=x | method_call member=M => deny 0",
        // ...deny rules do.
        "allow send_type=method_call; deny send_interface=x | method_call member=M => deny 2",
        // Missing path, member and error name match allow and deny rules.
        "allow send_path=/a | method_call interface=x => allow 1",
        "allow send_interface=x send_member=M | method_call interface=x => allow 1",
        "allow send_error=E | method_call interface=x member=M => allow 1",
        "allow send_type=*; deny send_path=/a | signal interface=x member=S => deny 2",
        "allow send_type=*; deny send_error=E | method_call interface=x => deny 2",
    ];
    check_sends(&rows, Receiver::Connection(&RECEIVER));
}

/// requested_reply: allow rules (default true) match only expected replies
/// unless they eavesdrop, deny rules (default false) only unexpected ones;
/// messages without a reply serial are not concerned. The same on the
/// receive side.
#[test]
fn requested_reply_send_and_receive() {
    let rows = [
        "allow send_type=method_return | method_return requested => allow 1",
        "allow send_type=method_return | method_return reply => deny 0",
        "allow send_type=method_return send_requested_reply=false | method_return reply => allow 1",
        "allow send_type=method_return send_requested_reply=false | method_return requested => allow 1",
        "allow send_type=method_return eavesdrop=true | method_return reply => allow 1",
        "deny send_type=method_return | method_return requested => deny 0",
        "deny send_type=method_return | method_return reply => deny 1",
        "deny send_type=method_return send_requested_reply=true | method_return requested => deny 1",
        "deny send_type=method_return send_requested_reply=true | method_return reply => deny 1",
        "deny send_type=method_return | method_return => deny 1",
        "allow send_type=method_return | method_return => allow 1",
    ];
    check_sends(&rows, Receiver::Connection(&RECEIVER));
    for text in rows {
        let (texts, message, expected) = row(text);
        let texts = texts.replace("send_", "receive_");
        let d = client(&texts).can_receive(&msg(message), Sender::Connection(&RECEIVER), false);
        assert_eq!(d, expected, "{texts} | {message}");
    }
}

#[test]
fn eavesdrop_on_receive() {
    // (rule, eavesdropping, matched)
    let rows = [
        ("allow receive_type=signal", false, true),
        ("allow receive_type=signal", true, false),
        ("allow receive_type=signal eavesdrop=true", true, true),
        ("allow receive_type=signal eavesdrop=true", false, true),
        ("deny receive_type=signal", true, true),
        ("deny receive_type=signal", false, true),
        ("deny receive_type=signal eavesdrop=true", true, true),
        ("deny receive_type=signal eavesdrop=true", false, false),
    ];
    let m = msg("signal interface=x member=S destination=a.b");
    for (text, eavesdropping, matched) in rows {
        let d = client(text).can_receive(&m, Sender::Connection(&RECEIVER), eavesdropping);
        let allowed = matched && text.starts_with("allow");
        assert_eq!(
            d,
            decision(allowed, matched.into(), false),
            "{text} {eavesdropping}"
        );
    }
}

#[test]
fn eavesdrop_on_send_passes_unrequested_replies() {
    let session = client("allow send_destination=* eavesdrop=true");
    let plain = client("allow send_destination=*");
    let receiver = Receiver::Connection(&RECEIVER);
    for message in ["method_return reply", "error error=E reply"] {
        assert!(session.can_send(&msg(message), receiver).allowed);
        assert!(!plain.can_send(&msg(message), receiver).allowed);
    }
    let requested = msg("method_return requested");
    assert!(plain.can_send(&requested, receiver).allowed);
}

#[test]
fn receive_sender_names_and_driver_header() {
    let p = client("allow receive_sender=a.b; deny receive_sender=q.x receive_type=error");
    let signal = msg("signal interface=x member=S");
    let from = |names| Sender::Connection(names);
    assert!(p.can_receive(&signal, from(&RECEIVER), false).allowed);
    let unrequested = msg("error error=E reply");
    assert!(!p.can_receive(&unrequested, from(&RECEIVER), false).allowed);
    let other = Conn {
        owned: &[":1.9"],
        queued: &[],
    };
    assert!(!p.can_receive(&signal, from(&other), false).allowed);

    let p = client("allow receive_sender=org.freedesktop.DBus");
    let m = msg("signal interface=org.freedesktop.DBus member=NameAcquired");
    let driver = Sender::Driver(Some("org.freedesktop.DBus"));
    assert!(p.can_receive(&m, driver, false).allowed);
    assert!(!p.can_receive(&m, Sender::Driver(None), false).allowed);
    assert!(!p.can_receive(&m, from(&RECEIVER), false).allowed);
}

#[test]
fn driver_and_activation_compare_the_destination_header() {
    let rows = [
        "allow send_destination=a.b | method_call destination=a.b => allow 1",
        "allow send_destination=a.b | method_call destination=:1.5 => deny 0",
        "allow send_destination=a.b | signal interface=x => deny 0",
        "allow send_destination_prefix=a.b | method_call destination=a.b => allow 1",
        "allow send_destination_prefix=a.b | method_call destination=a.b.c => allow 1",
        "allow send_destination_prefix=a.b | method_call destination=a.bc => deny 0",
        "allow send_destination_prefix=a.b | signal interface=x => deny 0",
    ];
    check_sends(&rows, Receiver::Driver);
    check_sends(&rows, Receiver::Activation);
}

#[test]
fn prefix_boundaries() {
    for (name, prefix, under) in [
        ("a.b", "a.b", true),
        ("a.b.c", "a.b", true),
        ("a.b", "a", true),
        ("a.bc", "a.b", false),
        ("a", "a.b", false),
        ("a.b", "a.", false),
        ("a..b", "a.", true),
        ("b.a", "a", false),
    ] {
        assert_eq!(has_prefix(name, prefix), under, "{name} under {prefix}");
    }
    let p = client("allow send_destination_prefix=a.b");
    let call = msg("method_call");
    for (owned, queued, allowed) in [
        (&["a.b"][..], &[][..], true),
        (&["a.b.c"], &[], true),
        (&["a.bc"], &[], false),
        (&["x.y", "a.b.z"], &[], true),
        (&["a"], &[], false),
        (&[":1.3"], &["a.b.q"], true),
    ] {
        let d = p.can_send(&call, Receiver::Connection(&Conn { owned, queued }));
        assert_eq!(d.allowed, allowed, "{owned:?} {queued:?}");
    }
    let p = client("allow own_prefix=a.b");
    for (name, allowed) in [
        ("a.b", true),
        ("a.b.c", true),
        ("a.bc", false),
        ("a", false),
    ] {
        assert_eq!(p.can_own(name), allowed, "{name}");
    }
}

/// The receiver owns or is queued for several names: the order of the
/// rules decides, not the name the message was addressed to.
#[test]
fn several_names_rule_order_decides() {
    let queued_for_x = Conn {
        owned: &[":1.5", "com.y"],
        queued: &["com.x"],
    };
    let receiver = Receiver::Connection(&queued_for_x);
    let call = msg("method_call interface=i member=M destination=:1.5");
    let denied_wins = client("allow send_destination=com.y; deny send_destination=com.x");
    let allowed_wins = client("deny send_destination=com.x; allow send_destination=com.y");
    assert_eq!(
        denied_wins.can_send(&call, receiver),
        decision(false, 2, false)
    );
    assert_eq!(
        allowed_wins.can_send(&call, receiver),
        decision(true, 2, false)
    );
}

#[test]
fn log_of_the_last_matching_rule() {
    let p = client("allow send_type=* log=true; allow send_interface=x");
    let receiver = Receiver::Connection(&RECEIVER);
    let (logged, not_logged) = (
        msg("method_call interface=y"),
        msg("method_call interface=x"),
    );
    assert_eq!(p.can_send(&logged, receiver), decision(true, 1, true));
    assert_eq!(p.can_send(&not_logged, receiver), decision(true, 2, false));
}

/// dbus-daemon's optimizer deletes the rules of a kind before a rule that
/// names no type, path, interface, member, error or name, whatever its
/// broadcast, fds, eavesdrop or requested_reply.
#[test]
fn optimizer_quirk() {
    let receiver = Receiver::Connection(&RECEIVER);
    let call = msg("method_call interface=x member=M destination=a.b");
    // Plain last-match would allow: the deny only matches broadcasts.
    let p = client("allow send_interface=x; deny send_broadcast=true");
    assert_eq!(p.can_send(&call, receiver), decision(false, 0, false));
    // The man page's own example wipes out the receive allows before it.
    let p = client("allow receive_type=method_call; deny receive_sender=* min_fds=1");
    let d = p.can_receive(&call, Sender::Connection(&RECEIVER), false);
    assert_eq!(d, decision(false, 0, false));
    // A blanket allow that matches only requested replies drops the earlier
    // allow of unrequested ones.
    let p = client("allow send_requested_reply=false send_type=method_return; allow send_type=*");
    assert!(!p.can_send(&msg("method_return reply"), receiver).allowed);
    // Matched rules count only what survived.
    let p = client("allow send_type=method_call; allow send_destination=*");
    assert_eq!(p.can_send(&call, receiver), decision(true, 1, false));
    // Only rules of the same kind go.
    let p = client("allow own=n; allow receive_type=*; deny send_type=*; allow send_interface=x");
    assert!(p.can_own("n"));
    assert_eq!(p.can_send(&call, receiver), decision(true, 2, false));
    let p = client("allow own=n; deny own=*; allow own=m");
    assert_eq!(p.0.own.len(), 2);
    assert!(!p.can_own("n") && p.can_own("m"));
    // A destination prefix is a name: nothing is dropped.
    let p = client("allow send_interface=x; deny send_destination_prefix=z");
    assert_eq!(p.can_send(&call, receiver), decision(true, 1, false));
}

/// The flat list: default, groups in the given order, user, at_console
/// true or false, mandatory; user and group rules are not in it.
#[test]
fn context_order() {
    let own = |name: &str| vec![rule(&format!("allow own={name}")), rule("allow user=*")];
    let policy = Policy {
        default: own("d"),
        mandatory: own("m"),
        by_user: [(1000, own("u")), (0, own("root"))].into(),
        by_group: [(10, own("g10")), (20, own("g20")), (30, own("g30"))].into(),
        at_console: own("c"),
        not_at_console: own("nc"),
    };
    let names = |p: ClientPolicy| {
        p.0.own
            .iter()
            .map(|o| o.name.clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(policy.client(1000, &[20, 10, 99], true)),
        ["d", "g20", "g10", "u", "c", "m"]
    );
    assert_eq!(
        names(policy.client(1000, &[10, 20], false)),
        ["d", "g10", "g20", "u", "nc", "m"]
    );
    assert_eq!(names(policy.client(5, &[], false)), ["d", "nc", "m"]);

    // The later context wins: each one denies what the one before allows.
    let pair = |allow: &str, deny: &str| rules(&format!("allow own={allow}; deny own={deny}"));
    let policy = Policy {
        default: pair("d", "-"),
        by_group: [(10, pair("g", "d"))].into(),
        by_user: [(1000, pair("u", "g"))].into(),
        at_console: pair("c", "u"),
        not_at_console: pair("nc", "u"),
        mandatory: pair("m", "c"),
    };
    let at_console = policy.client(1000, &[10], true);
    let allowed = |p: &ClientPolicy| ["d", "g", "u", "c", "nc", "m"].map(|n| p.can_own(n));
    assert_eq!(
        allowed(&at_console),
        [false, false, false, false, false, true]
    );
    let not_at_console = policy.client(1000, &[10], false);
    assert_eq!(
        allowed(&not_at_console),
        [false, false, false, false, true, true]
    );
    let stranger = policy.client(7, &[], false);
    assert_eq!(allowed(&stranger), [true, false, false, false, true, true]);
}

#[test]
fn client_policies_are_shared_by_value() {
    let policy = Policy {
        default: rules("allow own=a"),
        by_user: [(1000, rules("deny own=a"))].into(),
        ..Policy::default()
    };
    let a = policy.client(1000, &[], false);
    let b = policy.client(1000, &[], false);
    assert_eq!(a, b);
    assert!(!a.ptr_eq(&b) && a.ptr_eq(&a.clone()));
    assert_ne!(a, policy.client(1001, &[], false));
    let state = RandomState::new();
    assert_eq!(state.hash_one(&a), state.hash_one(&b));
}

/// (default rules, mandatory rules, uid, groups, admitted)
type ConnectRow = (&'static str, &'static str, u32, &'static [u32], bool);

#[test]
fn can_connect() {
    const BUS: u32 = 100;
    let policy = |default, mandatory| Policy {
        default: rules(default),
        mandatory: rules(mandatory),
        by_user: [(0, rules("allow user=*"))].into(),
        ..Policy::default()
    };
    let rows: &[ConnectRow] = &[
        ("", "", BUS, &[], true),
        ("", "", 0, &[0], false),
        ("", "", 1000, &[1000], false),
        ("allow user=*", "", 0, &[0], true),
        ("allow user=*", "", 1000, &[], true),
        ("deny user=*", "", BUS, &[], false),
        ("allow user=1000", "", 1000, &[], true),
        ("allow user=1000", "", 1001, &[], false),
        ("allow group=5", "", 1001, &[7, 5], true),
        ("allow group=5", "", 1001, &[7], false),
        ("allow group=*", "", 1001, &[], true),
        ("allow user=*; deny group=5", "", 1001, &[5], false),
        ("deny group=5; allow user=1001", "", 1001, &[5], true),
        ("allow user=*", "deny user=1000", 1000, &[], false),
        ("deny user=*", "allow group=5", 1000, &[5], true),
        ("allow user=*; deny own=*", "", 3, &[], true),
    ];
    for &(default, mandatory, uid, groups, admitted) in rows {
        let p = policy(default, mandatory);
        assert_eq!(
            p.can_connect(uid, groups, BUS),
            admitted,
            "{default:?} {mandatory:?} uid {uid}"
        );
    }
}

/// `bus/config-parser.c` `do_check_own_rules` on the rules of
/// `data/valid-config-files/check-own-rules.conf`.
#[test]
fn check_own_rules_conf() {
    let p = client("allow user=*; deny own=*; allow own_prefix=org.freedesktop.ManySystems");
    for (name, allowed) in [
        ("org.freedesktop", false),
        ("org.freedesktop.ManySystem", false),
        ("org.freedesktop.ManySystems", true),
        ("org.freedesktop.ManySystems.foo", true),
        ("org.freedesktop.ManySystems.foo.bar", true),
        ("org.freedesktop.ManySystems2", false),
        ("org.freedesktop.ManySystems2.foo", false),
        ("org.freedesktop.ManySystems2.foo.bar", false),
    ] {
        assert_eq!(p.can_own(name), allowed, "{name}");
    }
}

#[test]
fn own_rules() {
    let rows: &[(&str, &str, bool)] = &[
        ("", "a", false),
        ("allow own=*", "a", true),
        ("allow own=a", "a", true),
        ("allow own=a", "a.b", false),
        ("allow own=*; deny own=a", "a", false),
        ("deny own=a; allow own_prefix=a", "a", true),
        ("allow own_prefix=a; deny own=a.b", "a.b", false),
        ("allow own_prefix=a; deny own=a.b", "a.c", true),
    ];
    for &(texts, name, allowed) in rows {
        assert_eq!(client(texts).can_own(name), allowed, "{texts:?} {name}");
    }
}

const SESSION_CONF: &str =
    "allow send_destination=* eavesdrop=true; allow eavesdrop=true; allow own=*";

#[test]
fn allows_everything() {
    let everything = [
        SESSION_CONF,
        "allow send_type=* send_requested_reply=false; allow eavesdrop=true; allow own=*",
        "deny own=a; allow send_destination=* eavesdrop=true; allow eavesdrop=true; allow own=*",
        "allow send_destination=* eavesdrop=true; allow eavesdrop=true; allow own=*; allow own=a",
    ];
    let not_everything = [
        "",
        "allow send_destination=* eavesdrop=true; allow eavesdrop=true",
        // Unrequested replies would be refused.
        "allow send_destination=*; allow eavesdrop=true; allow own=*",
        // Eavesdropping would be refused.
        "allow send_destination=* eavesdrop=true; allow receive_type=*; allow own=*",
        // Every allowed send would be logged.
        "allow send_destination=* eavesdrop=true log=true; allow eavesdrop=true; allow own=*",
        "allow send_destination=* eavesdrop=true; allow eavesdrop=true max_fds=4; allow own=*",
        "allow send_destination=* eavesdrop=true; allow eavesdrop=true; allow own=*; deny own=a",
        "allow send_destination=* eavesdrop=true; allow eavesdrop=true; allow own=*; deny send_path=/",
    ];
    for texts in everything {
        assert!(client(texts).allows_everything(), "{texts}");
    }
    for texts in not_everything {
        assert!(!client(texts).allows_everything(), "{texts}");
    }
}

#[test]
fn complaint_texts() {
    let m = msg(
        "method_call interface=org.freedesktop.DBus member=UpdateActivationEnvironment destination=org.freedesktop.DBus",
    );
    let sender = Party {
        name: ":1.7",
        loginfo: "uid=1000 pid=42 comm=\"busctl\"",
    };
    assert_eq!(
        complaint(REJECTED_SEND, 2, &m, Some(sender), None),
        "Rejected send message, 2 matched rules; type=\"method_call\", sender=\":1.7\" \
         (uid=1000 pid=42 comm=\"busctl\") interface=\"org.freedesktop.DBus\" \
         member=\"UpdateActivationEnvironment\" error name=\"(unset)\" requested_reply=\"0\" \
         destination=\"org.freedesktop.DBus\" (bus)"
    );
    let m = msg("error error=com.x.Failed requested");
    assert_eq!(
        complaint(
            REJECTED_RECEIVE,
            0,
            &m,
            None,
            Some("uid=0 pid=1 comm=\"x\"")
        ),
        "Rejected receive message, 0 matched rules; type=\"error\", sender=\"(unset)\" ((bus)) \
         interface=\"(unset)\" member=\"(unset)\" error name=\"com.x.Failed\" requested_reply=\"1\" \
         destination=\"org.freedesktop.DBus\" (uid=0 pid=1 comm=\"x\")"
    );
    assert_eq!(
        own_denied(":1.7", "x"),
        "Connection \":1.7\" is not allowed to own the service \"x\" due to security policies in the \
         configuration file"
    );
}

/// A policy shaped like Debian's system.conf with its system.d files: the
/// stock default context, then 40 services each opening 11 methods to
/// everyone and a few to root, with a `deny` per service.
fn system_like_policy() -> Policy {
    let mut default = rules(
        &[
            "allow user=*",
            "deny own=*",
            "deny send_type=method_call",
            "allow send_type=signal",
            "allow send_requested_reply=true send_type=method_return",
            "allow send_requested_reply=true send_type=error",
            "allow receive_type=method_call",
            "allow receive_type=method_return",
            "allow receive_type=error",
            "allow receive_type=signal",
            "allow send_destination=org.freedesktop.DBus send_interface=org.freedesktop.DBus",
            "allow send_destination=org.freedesktop.DBus send_interface=org.freedesktop.DBus.Properties",
            "deny send_destination=org.freedesktop.DBus send_interface=org.freedesktop.DBus.Debug.Stats",
        ]
        .join(";"),
    );
    let mut root = Vec::new();
    for s in 0..40 {
        root.push(rule(&format!("allow own=org.svc{s}")));
        root.push(rule(&format!("allow send_destination=org.svc{s}")));
        default.push(rule(&format!(
            "deny send_destination=org.svc{s} send_interface=org.svc{s}.Admin"
        )));
        for m in 0..11 {
            default.push(rule(&format!(
                "allow send_destination=org.svc{s} send_interface=org.svc{s}.Manager send_member=M{m}"
            )));
        }
    }
    Policy {
        default,
        by_user: [(0, root)].into(),
        ..Policy::default()
    }
}

/// `cargo test --lib policy::check::tests::bench -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a test"]
fn bench_can_send() {
    use std::hint::black_box;
    use std::time::Instant;
    let policy = system_like_policy();
    let user = policy.client(1000, &[1000], false);
    let n_rules = policy.default.len() + policy.by_user[&0].len();
    let session = client(SESSION_CONF);
    let receiver = Conn {
        owned: &[":1.40", "org.svc39"],
        queued: &[],
    };
    let call = msg(
        "method_call path=/org/svc39 interface=org.svc39.Manager member=M10 destination=org.svc39",
    );
    assert!(
        user.can_send(&call, Receiver::Connection(&receiver))
            .allowed
    );
    let time = |label: &str, f: &dyn Fn() -> bool| {
        const N: u32 = 200_000;
        let start = Instant::now();
        for _ in 0..N {
            black_box(f());
        }
        println!(
            "{label}: {:.1} ns per check",
            start.elapsed().as_nanos() as f64 / f64::from(N)
        );
    };
    time("allows_everything (fast path)", &|| {
        black_box(&session).allows_everything()
    });
    time("can_send, session.conf (3 rules)", &|| {
        session
            .can_send(black_box(&call), Receiver::Connection(&receiver))
            .allowed
    });
    let label = format!(
        "can_send, system-like ({n_rules} rules, {} send)",
        user.0.send.len()
    );
    time(&label, &|| {
        user.can_send(black_box(&call), Receiver::Connection(&receiver))
            .allowed
    });
    time("can_receive, system-like", &|| {
        user.can_receive(black_box(&call), Sender::Connection(&receiver), false)
            .allowed
    });
}

// ------------------------------------------------ the index against a scan

/// The checks as dbus-daemon writes them, kept as the reference: every rule
/// of the list in order, the last match deciding.
mod linear {
    use super::super::*;

    pub(super) fn can_send(p: &ClientPolicy, msg: &MessageFacts, receiver: Receiver) -> Decision {
        let hits = p.0.send.iter().filter(|c| {
            message_matches(c, msg)
                && broadcast_matches(&c.rule, msg)
                && destination_matches(&c.rule, msg, receiver)
        });
        fold(hits)
    }

    pub(super) fn can_receive(
        p: &ClientPolicy,
        msg: &MessageFacts,
        sender: Sender,
        eavesdropping: bool,
    ) -> Decision {
        let hits = p.0.receive.iter().filter(|c| {
            eavesdrop_matches(c, eavesdropping)
                && message_matches(c, msg)
                && sender_matches(&c.rule, sender)
        });
        Decision {
            log: false,
            ..fold(hits)
        }
    }

    pub(super) fn can_own(p: &ClientPolicy, name: &str) -> bool {
        let hits = p.0.own.iter().filter(|c| match (&c.name, c.prefix) {
            (None, _) => true,
            (Some(own), false) => own == name,
            (Some(prefix), true) => has_prefix(name, prefix),
        });
        hits.fold(false, |_, c| c.allow)
    }

    fn fold<'a>(hits: impl Iterator<Item = &'a MessageCheck>) -> Decision {
        hits.fold(
            Decision {
                allowed: false,
                matched_rules: 0,
                log: false,
            },
            |d, c| Decision {
                allowed: c.allow,
                matched_rules: d.matched_rules + 1,
                log: c.rule.log,
            },
        )
    }
}

/// xorshift64*: reproducible random cases without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True one time in `n`.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
    /// `None` ("any") half the time, else one of `from`.
    fn maybe<T: Copy>(&mut self, from: &[T]) -> Option<T> {
        (!self.one_in(2)).then(|| self.pick(from))
    }
}

/// Few values, so that rules and messages meet often: names under one
/// another, a unique name, the driver's name.
const NAMES: &[&str] = &[
    "a",
    "a.b",
    "a.b.c",
    "a.bc",
    "q.x",
    "org.freedesktop.DBus",
    ":1.5",
    ":1.9",
];
const INTERFACES: &[&str] = &["i", "j", "org.freedesktop.DBus"];
const MEMBERS: &[&str] = &["M", "N"];
const PATHS: &[&str] = &["/a", "/b"];
const ERRORS: &[&str] = &["E", "F"];
const TYPES: &[MessageType] = &[
    MessageType::MethodCall,
    MessageType::MethodReturn,
    MessageType::Signal,
    MessageType::Error,
];

fn random_rule(rng: &mut Rng) -> Rule {
    let allow = rng.one_in(2);
    let own = |s: &str| Some(s.to_owned());
    let kind = match rng.below(8) {
        0 => RuleKind::Own {
            name: rng.maybe(NAMES).and_then(own),
            prefix: rng.one_in(3),
        },
        k => {
            let send = k <= 4;
            let mut m = MessageRule {
                message_type: rng.maybe(TYPES),
                path: rng.maybe(PATHS).filter(|_| rng.one_in(2)).and_then(own),
                interface: rng.maybe(INTERFACES).and_then(own),
                member: rng.maybe(MEMBERS).filter(|_| rng.one_in(2)).and_then(own),
                error: rng.maybe(ERRORS).filter(|_| rng.one_in(3)).and_then(own),
                name: rng.maybe(NAMES).and_then(own),
                requested_reply: if rng.one_in(4) { !allow } else { allow },
                eavesdrop: rng.one_in(4),
                ..MessageRule::default()
            };
            if rng.one_in(6) {
                (m.min_fds, m.max_fds) = (rng.below(2) as u32, 1 + rng.below(2) as u32);
            }
            if send {
                m.name_is_prefix = m.name.is_some() && rng.one_in(4);
                m.broadcast = rng.maybe(&[true, false]).filter(|_| rng.one_in(2));
                m.log = rng.one_in(8);
                RuleKind::Send(m)
            } else {
                RuleKind::Receive(m)
            }
        }
    };
    Rule { allow, kind }
}

fn random_message(rng: &mut Rng) -> MessageFacts<'static> {
    let message_type = rng.pick(TYPES);
    let reply =
        matches!(message_type, MessageType::MethodReturn | MessageType::Error) || rng.one_in(8);
    MessageFacts {
        message_type,
        path: rng.maybe(PATHS),
        interface: rng.maybe(INTERFACES),
        member: rng.maybe(MEMBERS),
        error_name: rng.maybe(ERRORS),
        destination: rng.maybe(NAMES),
        n_fds: rng.below(3) as u32,
        has_reply_serial: reply,
        requested_reply: reply && rng.one_in(2),
    }
}

/// A connection as the bus shows one: `has` knows its unique name,
/// `each_name` lists only its well-known names.
struct Peer<'a> {
    unique: &'a str,
    names: Vec<&'a str>,
}

impl Names for Peer<'_> {
    fn has(&self, name: &str) -> bool {
        self.unique == name || self.names.contains(&name)
    }
    fn has_under(&self, prefix: &str) -> bool {
        has_prefix(self.unique, prefix) || self.names.iter().any(|n| has_prefix(n, prefix))
    }
    fn each_name(&self, f: &mut dyn FnMut(&str)) {
        self.names.iter().for_each(|n| f(n));
    }
}

fn random_peer(rng: &mut Rng) -> Peer<'static> {
    let mut names: Vec<&str> = NAMES
        .iter()
        .copied()
        .filter(|n| !n.starts_with(':'))
        .collect();
    names.retain(|_| rng.one_in(3));
    Peer {
        unique: rng.pick(&[":1.5", ":1.9"]),
        names,
    }
}

/// The indexed checks give the scan's answers, matched-rule counts and
/// `log` included, over random policies (through the contexts and the
/// optimizer), messages, receivers and senders.
#[test]
fn index_equals_linear_scan() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut checks, mut allowed, mut sure) = (0usize, 0usize, 0usize);
    for _ in 0..3_000 {
        let mut list = |n: usize| (0..rng.below(n)).map(|_| random_rule(&mut rng)).collect();
        let policy = Policy {
            default: list(60),
            mandatory: list(6),
            by_user: [(1000, list(20))].into(),
            ..Policy::default()
        };
        let p = policy.client(1000, &[], false);
        for _ in 0..40 {
            let msg = random_message(&mut rng);
            let (a, b) = (random_peer(&mut rng), random_peer(&mut rng));
            // The part no receiver changes, as the bus keeps it for the
            // recipients of a broadcast.
            let unnamed = p.send_unnamed(&msg);
            if !p.send_names_matter(&a) {
                let d = linear::can_send(&p, &msg, Receiver::Connection(&a));
                assert_eq!(p.send_decision(unnamed), d, "{p:?} {msg:?}");
            }
            for receiver in [
                Receiver::Connection(&a),
                Receiver::Driver,
                Receiver::Activation,
            ] {
                let d = p.can_send_after(&msg, receiver, unnamed);
                assert_eq!(d, linear::can_send(&p, &msg, receiver), "{p:?} {msg:?}");
                if p.surely_sends(msg.message_type, msg.has_reply_serial, msg.requested_reply) {
                    assert!(d.allowed && !d.log, "{p:?} {msg:?}");
                    sure += 1;
                }
                allowed += usize::from(d.allowed);
                checks += 1;
            }
            let driver = Sender::Driver(rng.maybe(NAMES));
            for eavesdropping in [false, true] {
                let unnamed = p.receive_unnamed(&msg, eavesdropping);
                for sender in [Sender::Connection(&b), driver] {
                    let d = p.can_receive_after(&msg, sender, eavesdropping, unnamed);
                    let linear = linear::can_receive(&p, &msg, sender, eavesdropping);
                    assert_eq!(d, linear, "{p:?} {msg:?}");
                    let (t, serial) = (msg.message_type, msg.has_reply_serial);
                    if !eavesdropping && p.surely_receives(t, serial, msg.requested_reply) {
                        assert!(d.allowed, "{p:?} {msg:?}");
                        sure += 1;
                    }
                    allowed += usize::from(d.allowed);
                    checks += 1;
                }
            }
            let name = rng.pick(NAMES);
            assert_eq!(p.can_own(name), linear::can_own(&p, name), "{p:?} {name}");
        }
    }
    // The cases are not all one answer, and answers known in advance were
    // put to the test.
    assert!(
        allowed > checks / 10 && allowed < checks * 9 / 10,
        "{allowed} of {checks}"
    );
    assert!(sure > checks / 50, "{sure} of {checks}");
}

/// Root's share of `tests/fixtures/policy-large` (system.conf, its system.d
/// files and the benches' holes), the policy `scripts/bench.sh` measures
/// with `POLICY=large`.
fn large_fixture() -> Policy {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/policy-large/bus.conf");
    crate::config::xml::load_xml(&path)
        .expect("the large policy fixture loads")
        .policy_rules
}

/// Every name, interface and member the rules of `p` mention, with a few
/// they do not.
fn vocabulary(p: &ClientPolicy) -> [Vec<&str>; 3] {
    let (mut names, mut interfaces, mut members) = (
        vec![":1.5", "com.other"],
        vec!["com.other.I"],
        vec!["Other"],
    );
    for c in p.0.send.iter().chain(&p.0.receive) {
        names.extend(c.rule.name.as_deref());
        interfaces.extend(c.rule.interface.as_deref());
        members.extend(c.rule.member.as_deref());
    }
    for v in [&mut names, &mut interfaces, &mut members] {
        v.sort_unstable();
        v.dedup();
    }
    [names, interfaces, members]
}

/// The index on a real policy: the benches' messages pass, the stock holes
/// and denials hold, and random messages built from the policy's own
/// names, interfaces and members get the scan's answers.
#[test]
fn large_fixture_policy() {
    let policy = large_fixture();
    let root = policy.client(0, &[0], false);
    let user = policy.client(1000, &[1000], false);
    let size = |p: &ClientPolicy| p.0.send.len() + p.0.receive.len() + p.0.own.len();
    assert!((400..600).contains(&size(&root)), "{}", size(&root));
    assert!(!root.allows_everything());

    let unique = Peer {
        unique: ":1.7",
        names: vec![],
    };
    let ping = msg(
        "method_call path=/org/example/Bench interface=org.example.Bench member=Ping destination=:1.7",
    );
    assert!(root.can_send(&ping, Receiver::Connection(&unique)).allowed);
    assert!(
        root.can_receive(&ping, Sender::Connection(&unique), false)
            .allowed
    );
    let reply = msg("method_return destination=:1.7 requested");
    assert!(root.can_send(&reply, Receiver::Connection(&unique)).allowed);
    let unrequested = msg("method_return destination=:1.7 reply");
    assert!(
        !root
            .can_send(&unrequested, Receiver::Connection(&unique))
            .allowed
    );
    let get_name_owner = msg(
        "method_call path=/org/freedesktop/DBus interface=org.freedesktop.DBus member=GetNameOwner destination=org.freedesktop.DBus",
    );
    assert!(root.can_send(&get_name_owner, Receiver::Driver).allowed);
    let uae = msg(
        "method_call interface=org.freedesktop.DBus member=UpdateActivationEnvironment destination=org.freedesktop.DBus",
    );
    assert!(!user.can_send(&uae, Receiver::Driver).allowed);
    assert!(root.can_own("com.example.Echo") && !root.can_own("com.other"));
    assert!(root.can_own("org.freedesktop.NetworkManager"));
    assert!(!user.can_own("org.freedesktop.NetworkManager"));

    // Known without reading the message: replies, and receiving calls and
    // replies; not calls, nor signals (a service's file denies some).
    use MessageType::*;
    assert!(root.surely_sends(MethodReturn, true, true) && root.surely_sends(Error, true, true));
    assert!(
        !root.surely_sends(MethodReturn, true, false)
            && !root.surely_sends(MethodCall, false, false)
    );
    assert!(
        root.surely_receives(MethodCall, false, false)
            && root.surely_receives(MethodReturn, true, true)
    );
    assert!(
        !root.surely_receives(Signal, false, false)
            && !root.surely_receives(MethodCall, true, false)
    );

    let nm = Peer {
        unique: ":1.8",
        names: vec!["org.freedesktop.NetworkManager"],
    };
    let set_logging = msg("method_call interface=org.freedesktop.NetworkManager member=SetLogging");
    assert!(
        !user
            .can_send(&set_logging, Receiver::Connection(&nm))
            .allowed
    );
    assert!(
        root.can_send(&set_logging, Receiver::Connection(&nm))
            .allowed
    );
    let get_devices = msg("method_call interface=org.freedesktop.NetworkManager member=GetDevices");
    assert!(
        user.can_send(&get_devices, Receiver::Connection(&nm))
            .allowed
    );

    let [names, interfaces, members] = vocabulary(&root);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for p in [&root, &user] {
        for _ in 0..5_000 {
            let mut m: MessageFacts<'_> = random_message(&mut rng);
            (m.interface, m.member) = (rng.maybe(&interfaces), rng.maybe(&members));
            m.destination = rng.maybe(&names);
            let mut owned: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| !n.starts_with(':'))
                .collect();
            owned.retain(|_| rng.one_in(40));
            let peer = Peer {
                unique: ":1.5",
                names: owned,
            };
            let (t, serial, requested) = (m.message_type, m.has_reply_serial, m.requested_reply);
            for receiver in [Receiver::Connection(&peer), Receiver::Driver] {
                let d = p.can_send(&m, receiver);
                assert_eq!(d, linear::can_send(p, &m, receiver), "{m:?}");
                assert!(!p.surely_sends(t, serial, requested) || (d.allowed && !d.log));
            }
            for sender in [Sender::Connection(&peer), Sender::Driver(m.destination)] {
                let d = p.can_receive(&m, sender, false);
                assert_eq!(d, linear::can_receive(p, &m, sender, false), "{m:?}");
                assert!(!p.surely_receives(t, serial, requested) || d.allowed);
            }
            let name = rng.pick(&names);
            assert_eq!(p.can_own(name), linear::can_own(p, name), "{name}");
        }
    }
}

/// What the bench's messages cost against root's share of the large
/// fixture, indexed and scanned:
/// `cargo test --release --lib policy::check::tests::bench_large -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a test"]
fn bench_large_fixture() {
    use std::hint::black_box;
    use std::time::Instant;
    let root = large_fixture().client(0, &[0], false);
    println!(
        "root's share: {} send, {} receive, {} own rules",
        root.0.send.len(),
        root.0.receive.len(),
        root.0.own.len()
    );
    let unique = Peer {
        unique: ":1.7",
        names: vec![],
    };
    let nm = Peer {
        unique: ":1.8",
        names: vec!["org.freedesktop.NetworkManager"],
    };
    let cases = [
        (
            "bench Ping to a unique name",
            msg(
                "method_call path=/org/example/Bench interface=org.example.Bench member=Ping destination=:1.7",
            ),
            &unique,
        ),
        (
            "requested reply",
            msg("method_return destination=:1.7 requested"),
            &unique,
        ),
        (
            "broadcast signal",
            msg("signal path=/org/example/Bench interface=org.example.Bench member=Tick"),
            &unique,
        ),
        (
            "call to NetworkManager",
            msg(
                "method_call path=/org/freedesktop/NetworkManager interface=org.freedesktop.NetworkManager member=GetDevices destination=org.freedesktop.NetworkManager",
            ),
            &nm,
        ),
    ];
    let time = |label: &str, f: &dyn Fn() -> bool| {
        const N: u32 = 200_000;
        let start = Instant::now();
        for _ in 0..N {
            black_box(f());
        }
        println!(
            "{label}: {:.1} ns per check",
            start.elapsed().as_nanos() as f64 / f64::from(N)
        );
    };
    for (label, m, peer) in &cases {
        let (to, from) = (Receiver::Connection(*peer), Sender::Connection(*peer));
        time(&format!("can_send, {label}"), &|| {
            root.can_send(black_box(m), to).allowed
        });
        time("  linear scan", &|| {
            linear::can_send(&root, black_box(m), to).allowed
        });
        time(&format!("can_receive, {label}"), &|| {
            root.can_receive(black_box(m), from, false).allowed
        });
        time("  linear scan", &|| {
            linear::can_receive(&root, black_box(m), from, false).allowed
        });
    }
    let driver = msg(
        "method_call path=/org/freedesktop/DBus interface=org.freedesktop.DBus member=GetNameOwner destination=org.freedesktop.DBus",
    );
    time("can_send, GetNameOwner to the driver", &|| {
        root.can_send(black_box(&driver), Receiver::Driver).allowed
    });
    time("  linear scan", &|| {
        linear::can_send(&root, black_box(&driver), Receiver::Driver).allowed
    });
}
