//! The XML parser against dbus's own configuration test data, copied into
//! tests/fixtures/dbus-config (see the README there): every invalid file is
//! refused, each set of equivalent files gives one policy, and the valid
//! files the policy work relies on parse.

use std::path::{Path, PathBuf};

use super::xml::load_xml_with_env;
use super::{BusConfig, ConfigError};
use crate::policy::{MessageRule, MessageType, Policy, Rule, RuleKind};

fn corpus(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dbus-config")
        .join(sub)
}

fn load(path: &Path) -> Result<BusConfig, ConfigError> {
    load_xml_with_env(path, &|_| None)
}

/// The `.conf` files directly in `dir`, sorted.
fn conf_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf"))
        .collect();
    files.sort();
    files
}

/// Policy-related files: the line and dbus-daemon 1.14.10's own message
/// (`dbus-daemon --config-file=F` prints "Failed to start message bus: M").
const POLICY_ERRORS: &[(&str, u64, &str)] = &[
    (
        "impossible-send.conf",
        4,
        "Rule with send_broadcast=\"true\" and send_destination=\"com.example.Bees\" cannot \
         match anything",
    ),
    (
        "policy-bad-at-console.conf",
        3,
        "Unknown value \"somewhere in the vicinity\" for at_console in message bus \
         configuration file",
    ),
    (
        "policy-bad-attribute.conf",
        3,
        "Attribute \"hat\" is invalid on <policy> element in this context",
    ),
    (
        "policy-bad-context.conf",
        3,
        "context attribute on <policy> must have the value \"default\" or \"mandatory\", not \
         \"apropos of nothing\"",
    ),
    (
        "policy-bad-rule-attribute.conf",
        4,
        "Attribute \"species\" is invalid on <allow> element in this context",
    ),
    (
        "policy-contradiction.conf",
        3,
        "<policy> element must have exactly one of (context|user|group|at_console) attributes",
    ),
    (
        "policy-member-no-path.conf",
        4,
        "On element <deny>, if you specify a member you must specify an interface or a path. \
         Keep in mind that not all messages have an interface field.",
    ),
    (
        "policy-mixed.conf",
        4,
        "Invalid combination of attributes on element <allow>: own, own_prefix, user, group \
         and the message-related attributes cannot be combined",
    ),
    (
        "policy-no-attributes.conf",
        3,
        "<policy> element must have exactly one of (context|user|group|at_console) attributes",
    ),
    (
        "policy-no-rule-attribute.conf",
        4,
        "Element <allow> must have one or more attributes",
    ),
    (
        "send-and-receive.conf",
        4,
        "Invalid combination of attributes on element <allow>: send and receive attributes \
         cannot be combined",
    ),
];

/// The other files: what the message must contain (our wording, which
/// differs from dbus-daemon's for some of them), and the file it names.
const OTHER_ERRORS: &[(&str, &str, &str)] = &[
    (
        "apparmor-bad-attribute.conf",
        "Attribute \"enforcement_style\" is invalid on <apparmor> element",
        "apparmor-bad-attribute.conf",
    ),
    (
        "apparmor-bad-mode.conf",
        "mode=\"plaintive\"",
        "apparmor-bad-mode.conf",
    ),
    (
        "bad-attribute-2.conf",
        "Attribute \"carefully\" is invalid on <listen> element",
        "bad-attribute-2.conf",
    ),
    (
        "bad-attribute.conf",
        "Attribute \"wildebeest\" is invalid on <limit> element",
        "bad-attribute.conf",
    ),
    ("bad-element.conf", "<bees>", "bad-element.conf"),
    (
        "bad-limit.conf",
        "\"as many as you like\" is not an integer",
        "bad-limit.conf",
    ),
    (
        "badselinux-1.conf",
        "selinux_root_relative=\"jomoma\" must be \"yes\" or \"no\"",
        "badselinux-1.conf",
    ),
    (
        "badselinux-2.conf",
        "if_selinux_enabled=\"moo\" must be \"yes\" or \"no\"",
        "badselinux-2.conf",
    ),
    (
        "circular-1.conf",
        "circular inclusion of",
        "circular-1.conf",
    ),
    // circular-2 includes circular-3, which includes circular-2 again.
    (
        "circular-2.conf",
        "circular inclusion of",
        "circular-3.conf",
    ),
    (
        "circular-3.conf",
        "circular inclusion of",
        "circular-2.conf",
    ),
    (
        "double-attribute.conf",
        "duplicated attribute",
        "double-attribute.conf",
    ),
    (
        "limit-no-name.conf",
        "<limit> element must have a \"name\" attribute",
        "limit-no-name.conf",
    ),
    (
        "ludicrous-limit.conf",
        "value 3123123123 is too large",
        "ludicrous-limit.conf",
    ),
    (
        "negative-limit.conf",
        "must be a positive number",
        "negative-limit.conf",
    ),
    (
        "non-numeric-limit.conf",
        "\"bees\" is not an integer",
        "non-numeric-limit.conf",
    ),
    (
        "not-well-formed.conf",
        "XML syntax error",
        "not-well-formed.conf",
    ),
    (
        "truncated-file.conf",
        "XML syntax error",
        "truncated-file.conf",
    ),
    (
        "unknown-limit.conf",
        "There is no limit called \"max_bees\"",
        "unknown-limit.conf",
    ),
];

#[test]
fn every_invalid_file_is_refused() {
    let dir = corpus("invalid-config-files");
    let files = conf_files(&dir);
    // The whole corpus is here: a missing copy must not pass silently.
    assert_eq!(files.len(), POLICY_ERRORS.len() + OTHER_ERRORS.len());
    for file in &files {
        let name = file.file_name().unwrap().to_str().unwrap();
        let e = match load(file) {
            Ok(_) => panic!("{name} accepted"),
            Err(e) => e,
        };
        let shown = e.to_string();
        if let Some((_, line, message)) = POLICY_ERRORS.iter().find(|(n, ..)| *n == name) {
            assert!(matches!(e, ConfigError::Invalid { .. }), "{shown}");
            assert_eq!(shown, format!("{}:{line}: {message}", file.display()));
        } else if let Some((_, needle, named)) = OTHER_ERRORS.iter().find(|(n, ..)| *n == name) {
            assert!(shown.contains(needle), "{name}: {shown}");
            assert_eq!(e.path(), dir.join(named), "{name}: {shown}");
            assert!(shown.starts_with(&dir.join(named).display().to_string()));
        } else {
            panic!("{name} is in neither table");
        }
    }
}

/// Where the dbus-tests package is installed, the copies are the same as
/// its files (nothing is skipped without it: the test above runs on the
/// copies).
#[test]
fn copies_match_installed_dbus_tests() {
    let installed = Path::new("/usr/lib/dbus-1.0/installed-tests/dbus/data");
    if !installed.is_dir() {
        eprintln!("{} absent; copies not compared", installed.display());
        return;
    }
    for sub in [
        "invalid-config-files",
        "equiv-config-files/basic",
        "equiv-config-files/entities",
        "valid-config-files",
    ] {
        for copy in conf_files(&corpus(sub)) {
            let original = installed.join(sub).join(copy.file_name().unwrap());
            assert_eq!(
                std::fs::read(&copy).unwrap(),
                std::fs::read(&original).unwrap(),
                "{}",
                copy.display()
            );
        }
    }
}

#[test]
fn equivalent_files_give_equal_policies() {
    let allow_any_user = Policy {
        default: vec![Rule {
            allow: true,
            kind: RuleKind::User(None),
        }],
        ..Policy::default()
    };
    for set in ["basic", "entities"] {
        let files = conf_files(&corpus("equiv-config-files").join(set));
        assert_eq!(files.len(), 2, "{set}");
        let configs: Vec<BusConfig> = files
            .iter()
            .map(|f| load(f).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let first = &configs[0];
        // basic.d/basic.conf's rule (the <includedir> stands before the
        // <policy>), then the file's own: two `<allow user="*"/>`.
        let mut expected = allow_any_user.clone();
        expected.default.extend(allow_any_user.default.clone());
        assert_eq!(first.policy_rules, expected, "{set}");
        for other in &configs[1..] {
            assert_eq!(other.policy_rules, first.policy_rules, "{set}");
            assert_eq!(other.listen, first.listen, "{set}");
            assert_eq!(other.servicedirs, first.servicedirs, "{set}");
            assert_eq!(other.include_dirs, first.include_dirs, "{set}");
            assert_eq!(other.limits, first.limits, "{set}");
            assert_eq!(other.user, first.user, "{set}");
        }
    }
}

fn send(allow: bool, f: impl FnOnce(&mut MessageRule)) -> Rule {
    let mut m = MessageRule::unset(allow);
    f(&mut m);
    Rule {
        allow,
        kind: RuleKind::Send(m),
    }
}

fn own(allow: bool, name: &str, prefix: bool) -> Rule {
    Rule {
        allow,
        kind: RuleKind::Own {
            name: Some(name.to_owned()),
            prefix,
        },
    }
}

#[test]
fn valid_files_parse() {
    let dir = corpus("valid-config-files");
    for name in [
        "basic.conf",
        "entities.conf",
        "check-own-rules.conf",
        "many-rules.conf",
    ] {
        load(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    let cfg = load(&dir.join("check-own-rules.conf")).unwrap();
    assert_eq!(
        cfg.policy_rules.default,
        [
            Rule {
                allow: true,
                kind: RuleKind::User(None)
            },
            Rule {
                allow: false,
                kind: RuleKind::Own {
                    name: None,
                    prefix: false
                }
            },
            own(true, "org.freedesktop.ManySystems", true),
        ]
    );

    let cfg = load(&dir.join("many-rules.conf")).unwrap();
    let p = &cfg.policy_rules;
    // basic.d/basic.conf's `<allow user="*"/>` comes first (its
    // <includedir> stands before the policies), then 14 rules each.
    assert_eq!(p.default.len(), 15);
    assert_eq!(p.default[1..], p.mandatory[..]);
    assert!(p.by_user.is_empty() && p.by_group.is_empty());
    let system = Some("org.freedesktop.System".to_owned());
    let rules = &p.mandatory;
    assert_eq!(
        rules[1],
        send(false, |m| {
            m.interface = system.clone();
            m.member = Some("Reboot".into());
        })
    );
    let RuleKind::Receive(receive) = &rules[2].kind else {
        panic!("{:?}", rules[2]);
    };
    assert_eq!(receive.member.as_deref(), Some("Reboot"));
    assert!(!receive.requested_reply);
    assert_eq!(rules[4], own(false, "org.freedesktop.System", false));
    assert_eq!(rules[5], own(false, "org.freedesktop.ManySystems", true));
    assert_eq!(rules[6], send(false, |m| m.name = system.clone()));
    assert_eq!(
        rules[8],
        send(true, |m| m.message_type = Some(MessageType::Error))
    );
    assert_eq!(
        rules[13],
        send(false, |m| {
            m.name = Some("org.freedesktop.Bar".into());
            m.interface = Some("org.freedesktop.Foo".into());
            m.message_type = Some(MessageType::MethodCall);
        })
    );
}
