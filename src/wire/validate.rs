//! D-Bus names, checked by dbus-daemon's rules (`dbus/dbus-marshal-validate.c`): one validator
//! for each kind of name that messages, match rules and service files carry.
//!
//! Names are ASCII. Bus names, interfaces, members and error names are 1 to [`MAX_NAME_LENGTH`]
//! bytes; an object path has no limit of its own.

/// Longest bus name, interface, member or error name (`DBUS_MAXIMUM_NAME_LENGTH`).
pub(crate) const MAX_NAME_LENGTH: usize = 255;

/// Why a name is not a valid well-known bus name (see `well_known_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// The name is empty.
    Empty,
    /// The name is longer than `MAX_NAME_LENGTH` bytes: this many.
    TooLong(usize),
    /// Starts with `:`, i.e. is a unique connection name.
    Unique,
    /// Has fewer than two elements.
    TooFewElements,
    /// Has an empty element (leading, trailing or doubled `.`).
    EmptyElement,
    /// An element starts with a digit.
    ElementStartsWithDigit,
    /// Contains a character outside `[A-Za-z0-9_-]` and `.`.
    InvalidChar(char),
}

// Characters, as dbus-daemon's VALID_*NAME_CHARACTER macros have them. The initial character of
// an element is one of these but not a digit.

fn is_initial_name_char(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_bus_name_char(b: u8) -> bool {
    is_name_char(b) || b == b'-'
}

fn check_length(name: &str) -> Result<(), NameError> {
    match name.len() {
        0 => Err(NameError::Empty),
        len if len > MAX_NAME_LENGTH => Err(NameError::TooLong(len)),
        _ => Ok(()),
    }
}

/// Checks that `name` is at least `min_elements` `.`-separated elements of `is_char` characters,
/// none empty and none starting with a digit. The length is for the caller to check.
fn check_elements(
    name: &str,
    is_char: fn(u8) -> bool,
    min_elements: usize,
) -> Result<(), NameError> {
    if let Some(c) = name
        .chars()
        .find(|&c| c != '.' && !u8::try_from(c).is_ok_and(is_char))
    {
        return Err(NameError::InvalidChar(c));
    }
    let mut elements = 0;
    for element in name.split('.') {
        elements += 1;
        match element.bytes().next() {
            None => return Err(NameError::EmptyElement),
            Some(b) if b.is_ascii_digit() => return Err(NameError::ElementStartsWithDigit),
            Some(_) => {}
        }
    }
    if elements < min_elements {
        return Err(NameError::TooFewElements);
    }
    Ok(())
}

fn check_well_known(name: &str, min_elements: usize) -> Result<(), NameError> {
    check_length(name)?;
    if name.starts_with(':') {
        return Err(NameError::Unique);
    }
    check_elements(name, is_bus_name_char, min_elements)
}

/// A well-known bus name (`org.example.Foo`): two or more elements of `[A-Za-z0-9_-]`, none
/// empty, none starting with a digit. The one validator that says why, for messages about names
/// given in files.
pub(crate) fn well_known_name(name: &str) -> Result<(), NameError> {
    check_well_known(name, 2)
}

/// A unique connection name (`:1.42`): `:` and elements of `[A-Za-z0-9_-]`, which may start with
/// a digit. As dbus-daemon has it, only the first element may be empty (`:` and `:.1` pass), and
/// one element is enough.
pub(crate) fn unique_name(name: &str) -> bool {
    check_length(name).is_ok()
        && name.strip_prefix(':').is_some_and(|rest| {
            rest.split('.').enumerate().all(|(i, element)| {
                (i == 0 || !element.is_empty()) && element.bytes().all(is_bus_name_char)
            })
        })
}

/// A bus name, unique or well-known (`_dbus_validate_bus_name`).
pub(crate) fn bus_name(name: &str) -> bool {
    unique_name(name) || well_known_name(name).is_ok()
}

/// A bus name or the namespace of some (`_dbus_validate_bus_namespace`), as `arg0namespace`
/// takes: a well-known name of a single element (`org`) passes too.
pub(crate) fn bus_name_namespace(name: &str) -> bool {
    unique_name(name) || check_well_known(name, 1).is_ok()
}

/// An interface name (`org.example.Iface`): two or more elements of `[A-Za-z0-9_]`, none empty,
/// none starting with a digit.
pub(crate) fn interface(name: &str) -> bool {
    check_length(name).is_ok() && check_elements(name, is_name_char, 2).is_ok()
}

/// An error name (`org.example.Error.Failed`): the rules of an interface name.
pub(crate) fn error_name(name: &str) -> bool {
    interface(name)
}

/// A member name (`Frobnicate`): one element of `[A-Za-z0-9_]`, not starting with a digit.
pub(crate) fn member(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() <= MAX_NAME_LENGTH
        && b.split_first().is_some_and(|(first, rest)| {
            is_initial_name_char(*first) && rest.iter().all(|c| is_name_char(*c))
        })
}

/// An object path (`/org/example/Obj`): `/`, or `/`-led elements of `[A-Za-z0-9_]`, none empty
/// (so no trailing `/`).
pub(crate) fn object_path(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    match path.strip_prefix('/') {
        Some(rest) => rest
            .split('/')
            .all(|e| !e.is_empty() && e.bytes().all(is_name_char)),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name of `len` bytes: `a.` then `b`s (`len` is at least 3).
    fn long(len: usize) -> String {
        format!("a.{}", "b".repeat(len - 2))
    }

    /// Asserts that `valid` takes each of `good` and refuses each of `bad`.
    fn check(valid: fn(&str) -> bool, good: &[&str], bad: &[&str]) {
        for name in good {
            assert!(valid(name), "{name:?} should pass");
        }
        for name in bad {
            assert!(!valid(name), "{name:?} should fail");
        }
    }

    #[test]
    fn well_known_names() {
        let good = [
            "org.example.Foo",
            "a.b",
            "org.exam-ple._Foo9",
            "org.-x.Y",
            "_._",
        ];
        for name in good.iter().copied().chain([long(255).as_str()]) {
            assert_eq!(well_known_name(name), Ok(()), "{name:?}");
        }
        for (name, reason) in [
            ("", NameError::Empty),
            ("foo", NameError::TooFewElements),
            (":1.42", NameError::Unique),
            ("org.2example.Foo", NameError::ElementStartsWithDigit),
            ("1org.Foo", NameError::ElementStartsWithDigit),
            ("org..Foo", NameError::EmptyElement),
            (".org.Foo", NameError::EmptyElement),
            ("org.Foo.", NameError::EmptyElement),
            (".", NameError::EmptyElement),
            ("org.exa mple.Foo", NameError::InvalidChar(' ')),
            ("org.example.Foo ", NameError::InvalidChar(' ')),
            ("org.exämple.Foo", NameError::InvalidChar('ä')),
            ("org.ex/ample", NameError::InvalidChar('/')),
        ] {
            assert_eq!(well_known_name(name), Err(reason), "{name:?}");
        }
        assert_eq!(well_known_name(&long(256)), Err(NameError::TooLong(256)));
    }

    #[test]
    fn unique_names() {
        let longest = format!(":1.{}", "9".repeat(252));
        assert_eq!(longest.len(), 255);
        let good = [
            ":1.42", ":1.0", ":1", ":42.7.9", ":a-b._c", ":", ":.1", &longest,
        ];
        let too_long = format!("{longest}9");
        let bad = [
            "", "1.42", ":1.", ":1..2", ":1.4 2", ":1:2", ":1.é", &too_long,
        ];
        check(unique_name, &good, &bad);
        check(bus_name, &good, &bad);
        check(bus_name_namespace, &good, &[]);
        check(unique_name, &[], &["org.example.Foo"]);
    }

    #[test]
    fn bus_names_and_namespaces() {
        let longest = long(255);
        let good = ["org.freedesktop.DBus", "org.foo-bar._9", ":1.42", &longest];
        let too_long = long(256);
        let bad = [
            "", "1org", "org.", "org..x", ".org", "org.1x", "or g", &too_long,
        ];
        check(bus_name, &good, &bad);
        check(bus_name_namespace, &good, &bad);
        // A single element is a namespace but not a name.
        let single = ["org", "_", "-x"];
        check(bus_name, &[], &single);
        check(bus_name_namespace, &single, &[]);
    }

    #[test]
    fn interfaces_and_error_names() {
        let longest = long(255);
        let good = ["org.x.Iface", "_a.b_1", "a.b", "A.B.C9", &longest];
        let too_long = long(256);
        let bad = [
            "",
            "foo",
            "org..foo",
            ".org.foo",
            "org.foo.",
            "org.1foo",
            "1org.foo",
            "org.foo-bar",
            "org.fóo",
            ":1.42",
            &too_long,
        ];
        check(interface, &good, &bad);
        check(error_name, &good, &bad);
    }

    #[test]
    fn members() {
        let longest = "m".repeat(255);
        let too_long = "m".repeat(256);
        check(
            member,
            &["Sig", "_", "a1", "Name_Owner_Changed", &longest],
            &["", "1abc", "a.b", "a-b", "a b", "é", &too_long],
        );
    }

    #[test]
    fn object_paths() {
        // No length limit of its own.
        let long_path = "/a".repeat(200);
        check(
            object_path,
            &["/", "/a", "/a/b", "/org/gnome_1/A9", "/_", "/1", &long_path],
            &["", "a", "a/b", "/a/", "//", "/a//b", "/a-b", "/a.b", "/é"],
        );
    }
}
