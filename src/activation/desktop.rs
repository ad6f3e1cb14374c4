//! `[D-BUS Service]` `.service` files, parsed with dbus-daemon's
//! `bus/desktop-file.c` rules.
//!
//! Syntax (per line; lines end in `\n`, `\r\n` or `\r`):
//!
//! * A line starting with `[` is a group header; the line must end with `]`
//!   (no trailing blanks) and the name may hold any printable ASCII except
//!   `[` and `]`.  A group appearing twice is an error (dbus-daemon silently
//!   uses the first one; we refuse the file instead).
//! * A line consisting only of spaces, tabs, `\r` and `\f`, or whose *first*
//!   character is `#`, is ignored.
//! * Anything else before the first group is an error.
//! * Otherwise the line is `Key=Value`: the key is `[A-Za-z0-9-]+`; if `[`
//!   follows the key, the line is a localised key (`Key[locale]=…`) and is
//!   ignored entirely; spaces (not tabs) may surround `=`.  The value runs to
//!   the end of the line (trailing blanks are kept) and may contain the
//!   escapes `\s \t \n \r \\`; any other escape, or a trailing `\`, rejects
//!   the whole file.  When a key repeats within a group, the first value
//!   wins (as in dbus-daemon).
//! * The file must be UTF-8 without NUL bytes and at most 128 KiB.
//!
//! A `.service` file must have a `[D-BUS Service]` group with `Name=` (a
//! valid well-known bus name) and `Exec=`.  `User=`, `SystemdService=` and
//! `AssumedAppArmorLabel=` are optional and kept but not used on the session
//! bus; other keys and groups are ignored.  `Exec=` is split with
//! [`split_exec`] when the file is loaded, but a splitting error does not
//! reject the file: it is kept in [`ServiceFile::argv`] and reported as
//! `InvalidArgs` when the service is activated, as dbus-daemon does.

use std::fmt;
use std::path::{Path, PathBuf};

use super::exec::{ExecError, split_exec};
use crate::wire::validate;

/// The group holding a service's activation data.
pub const DBUS_SERVICE_SECTION: &str = "D-BUS Service";
/// The largest `.service` file dbus-daemon will load.
pub const MAX_SERVICE_FILE_SIZE: usize = 128 * 1024;
/// The longest bus name allowed by the D-Bus specification.
pub const MAX_BUS_NAME_LENGTH: usize = validate::MAX_NAME_LENGTH;

/// What is wrong with a `.service` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DesktopErrorKind {
    /// The file is larger than [`MAX_SERVICE_FILE_SIZE`].
    TooLarge(usize),
    /// The file is not UTF-8 or contains a NUL byte.
    InvalidUtf8,
    /// A line starting with `[` is not a well-formed group header.
    InvalidSectionHeader,
    /// A group name contains control characters, non-ASCII, `[` or `]`.
    InvalidSectionChars,
    /// A group appears twice; `first_line` is where it first appeared.
    DuplicateSection { name: String, first_line: usize },
    /// A `Key=Value` line appears before any group header.
    KeyBeforeSection,
    /// A line in a group does not start with a key character.
    EmptyKey,
    /// The key is followed by something other than spaces and `=`.
    InvalidKeyChars,
    /// A key line has no `=`.
    NoEquals,
    /// A value ends in a lone backslash.
    EscapeAtEnd,
    /// A value contains an escape other than `\s \t \n \r \\`.
    InvalidEscape(char),
    /// There is no `[D-BUS Service]` group.
    MissingSection,
    /// A required key of `[D-BUS Service]` is missing.
    MissingKey(&'static str),
    /// `Name=` is not a valid well-known bus name.
    InvalidName { name: String, reason: BusNameError },
}

impl fmt::Display for DesktopErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DesktopErrorKind::TooLarge(size) => {
                write!(f, "Desktop file size ({size} bytes) is too large")
            }
            DesktopErrorKind::InvalidUtf8 => f.write_str("invalid UTF-8"),
            DesktopErrorKind::InvalidSectionHeader => {
                f.write_str("Invalid syntax for section header")
            }
            DesktopErrorKind::InvalidSectionChars => {
                f.write_str("Invalid characters in section name")
            }
            DesktopErrorKind::DuplicateSection { name, first_line } => {
                write!(f, "duplicate group [{name}] (first at line {first_line})")
            }
            DesktopErrorKind::KeyBeforeSection => {
                f.write_str("invalid service file: key=value before [Section]")
            }
            DesktopErrorKind::EmptyKey => f.write_str("Empty key name"),
            DesktopErrorKind::InvalidKeyChars => f.write_str("Invalid characters in key name"),
            DesktopErrorKind::NoEquals => f.write_str("No '=' in key/value pair"),
            DesktopErrorKind::EscapeAtEnd => f.write_str("Text to be unescaped ended in \\"),
            DesktopErrorKind::InvalidEscape(c) => write!(
                f,
                "Text to be unescaped had invalid escape sequence \\{}",
                c.escape_debug()
            ),
            DesktopErrorKind::MissingSection => {
                write!(f, "no [{DBUS_SERVICE_SECTION}] group in .service file")
            }
            DesktopErrorKind::MissingKey(key) => write!(f, "No \"{key}\" key in .service file"),
            DesktopErrorKind::InvalidName { name, reason } => {
                write!(f, "invalid bus name {name:?} in Name key: {reason}")
            }
        }
    }
}

/// An error in a `.service` file, naming the file and (where there is one)
/// the 1-based line.  Displays as `FILE:LINE: MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesktopError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub kind: DesktopErrorKind,
}

impl DesktopError {
    fn new(file: &Path, line: Option<usize>, kind: DesktopErrorKind) -> Self {
        DesktopError {
            file: file.to_path_buf(),
            line,
            kind,
        }
    }
}

impl fmt::Display for DesktopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.kind),
            None => write!(f, "{}: {}", self.file.display(), self.kind),
        }
    }
}

impl std::error::Error for DesktopError {}

/// One `Key=Value` line (value unescaped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesktopEntry {
    pub key: String,
    pub value: String,
    pub line: usize,
}

/// One `[Group]` and its entries in file order (localised keys omitted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesktopSection {
    pub name: String,
    pub line: usize,
    pub entries: Vec<DesktopEntry>,
}

impl DesktopSection {
    /// The first entry with this key, as dbus-daemon looks keys up.
    pub fn entry(&self, key: &str) -> Option<&DesktopEntry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// The first value of this key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entry(key).map(|e| e.value.as_str())
    }
}

/// A parsed desktop-style file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesktopFile {
    pub sections: Vec<DesktopSection>,
}

impl DesktopFile {
    /// Parses `text` with desktop-file.c's rules; `path` is used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<DesktopFile, DesktopError> {
        if text.len() > MAX_SERVICE_FILE_SIZE {
            return Err(DesktopError::new(
                path,
                None,
                DesktopErrorKind::TooLarge(text.len()),
            ));
        }
        if let Some(nul) = text.find('\0') {
            let line = line_of_offset(text.as_bytes(), nul);
            return Err(DesktopError::new(
                path,
                Some(line),
                DesktopErrorKind::InvalidUtf8,
            ));
        }

        let mut file = DesktopFile::default();
        for (idx, line) in lines(text).enumerate() {
            let line_num = idx + 1;
            let err = |kind| DesktopError::new(path, Some(line_num), kind);

            if line.starts_with('[') {
                let name = parse_section_header(line).map_err(err)?;
                if let Some(prev) = file.section(name) {
                    return Err(err(DesktopErrorKind::DuplicateSection {
                        name: name.to_string(),
                        first_line: prev.line,
                    }));
                }
                file.sections.push(DesktopSection {
                    name: name.to_string(),
                    line: line_num,
                    entries: Vec::new(),
                });
            } else if is_blank(line) || line.starts_with('#') {
                continue;
            } else {
                let Some(section) = file.sections.last_mut() else {
                    return Err(err(DesktopErrorKind::KeyBeforeSection));
                };
                if let Some((key, value)) = parse_key_value(line).map_err(err)? {
                    section.entries.push(DesktopEntry {
                        key: key.to_string(),
                        value,
                        line: line_num,
                    });
                }
            }
        }
        Ok(file)
    }

    /// The group with this name.
    pub fn section(&self, name: &str) -> Option<&DesktopSection> {
        self.sections.iter().find(|s| s.name == name)
    }
}

/// Checks size and UTF-8 validity of raw `.service` file contents.
pub fn decode<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str, DesktopError> {
    if bytes.len() > MAX_SERVICE_FILE_SIZE {
        return Err(DesktopError::new(
            path,
            None,
            DesktopErrorKind::TooLarge(bytes.len()),
        ));
    }
    std::str::from_utf8(bytes).map_err(|e| {
        DesktopError::new(
            path,
            Some(line_of_offset(bytes, e.valid_up_to())),
            DesktopErrorKind::InvalidUtf8,
        )
    })
}

/// The contents of a `[D-BUS Service]` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFile {
    /// `Name=`: the well-known bus name the service provides.
    pub name: String,
    /// `Exec=` as written (after desktop-file unescaping).
    pub exec: String,
    /// `Exec=` split into argv, or the error to report at activation.
    pub argv: Result<Vec<String>, ExecError>,
    /// `User=` (only meaningful on the system bus).
    pub user: Option<String>,
    /// `SystemdService=` (not used by busvisor).
    pub systemd_service: Option<String>,
    /// `AssumedAppArmorLabel=` (not used by busvisor).
    pub assumed_apparmor_label: Option<String>,
    /// Line of the `Name=` key.
    pub name_line: usize,
    /// Line of the `Exec=` key.
    pub exec_line: usize,
}

impl ServiceFile {
    /// Parses the text of a `.service` file; `path` is used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<ServiceFile, DesktopError> {
        let file = DesktopFile::parse(path, text)?;
        let Some(section) = file.section(DBUS_SERVICE_SECTION) else {
            return Err(DesktopError::new(
                path,
                None,
                DesktopErrorKind::MissingSection,
            ));
        };
        let required = |key: &'static str| {
            section.entry(key).ok_or_else(|| {
                DesktopError::new(path, Some(section.line), DesktopErrorKind::MissingKey(key))
            })
        };
        let name = required("Name")?;
        let exec = required("Exec")?;
        if let Err(reason) = validate::well_known_name(&name.value) {
            return Err(DesktopError::new(
                path,
                Some(name.line),
                DesktopErrorKind::InvalidName {
                    name: name.value.clone(),
                    reason,
                },
            ));
        }
        let optional = |key: &str| section.get(key).map(str::to_string);
        Ok(ServiceFile {
            name: name.value.clone(),
            exec: exec.value.clone(),
            argv: split_exec(&exec.value),
            user: optional("User"),
            systemd_service: optional("SystemdService"),
            assumed_apparmor_label: optional("AssumedAppArmorLabel"),
            name_line: name.line,
            exec_line: exec.line,
        })
    }

    /// Parses raw `.service` file contents, checking size and UTF-8 first.
    pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<ServiceFile, DesktopError> {
        ServiceFile::parse(path, decode(path, bytes)?)
    }
}

/// Why a `Name=` is not a valid well-known bus name: the reason
/// `wire::validate::well_known_name` gives. Its messages, worded for
/// service files, are here.
pub use crate::wire::validate::NameError as BusNameError;

impl fmt::Display for BusNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusNameError::Empty => f.write_str("name is empty"),
            BusNameError::TooLong(len) => write!(
                f,
                "name is {len} bytes long, the maximum is {MAX_BUS_NAME_LENGTH}"
            ),
            BusNameError::Unique => {
                f.write_str("unique connection names (starting with ':') cannot be activated")
            }
            BusNameError::TooFewElements => {
                f.write_str("name must have at least two elements separated by '.'")
            }
            BusNameError::EmptyElement => f.write_str("name has an empty element"),
            BusNameError::ElementStartsWithDigit => {
                f.write_str("an element of the name starts with a digit")
            }
            BusNameError::InvalidChar(c) => write!(
                f,
                "invalid character {c:?} (only A-Z a-z 0-9 _ - and '.' are allowed)"
            ),
        }
    }
}

impl std::error::Error for BusNameError {}

/// Splits into lines ending in `\n`, `\r\n` or `\r` (like dbus's
/// `_dbus_string_find_eol`); a final line without terminator is included,
/// an empty remainder after the last terminator is not.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match rest.find(['\n', '\r']) {
            Some(i) => {
                let line = &rest[..i];
                let eol_len = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + eol_len..];
                Some(line)
            }
            None => {
                let line = rest;
                rest = "";
                Some(line)
            }
        }
    })
}

/// The 1-based line (by the same terminators as [`lines`]) of a byte offset.
fn line_of_offset(bytes: &[u8], offset: usize) -> usize {
    let before = bytes.get(..offset).unwrap_or(bytes);
    let mut line = 1;
    let mut i = 0;
    while let Some(&b) = before.get(i) {
        if b == b'\n' {
            line += 1;
        } else if b == b'\r' {
            line += 1;
            if before.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
        }
        i += 1;
    }
    line
}

fn is_blank(line: &str) -> bool {
    line.chars()
        .all(|c| matches!(c, ' ' | '\t' | '\r' | '\x0c'))
}

fn parse_section_header(line: &str) -> Result<&str, DesktopErrorKind> {
    if line.len() <= 2 || !line.ends_with(']') {
        return Err(DesktopErrorKind::InvalidSectionHeader);
    }
    let name = &line[1..line.len() - 1];
    if name
        .bytes()
        .any(|c| c <= 0x1f || c >= 0x7f || c == b'[' || c == b']')
    {
        return Err(DesktopErrorKind::InvalidSectionChars);
    }
    Ok(name)
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
}

/// Returns `None` for a localised key line, which is ignored.
fn parse_key_value(line: &str) -> Result<Option<(&str, String)>, DesktopErrorKind> {
    let key_end = line.find(|c| !is_key_char(c)).unwrap_or(line.len());
    if key_end == 0 {
        return Err(DesktopErrorKind::EmptyKey);
    }
    let (key, rest) = line.split_at(key_end);
    if rest.starts_with('[') {
        return Ok(None);
    }
    let rest = rest.trim_start_matches(' ');
    let Some(value) = rest.strip_prefix('=') else {
        return Err(if rest.is_empty() {
            DesktopErrorKind::NoEquals
        } else {
            DesktopErrorKind::InvalidKeyChars
        });
    };
    let value = unescape(value.trim_start_matches(' '))?;
    Ok(Some((key, value)))
}

fn unescape(raw: &str) -> Result<String, DesktopErrorKind> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            None => return Err(DesktopErrorKind::EscapeAtEnd),
            Some('s') => out.push(' '),
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some(other) => return Err(DesktopErrorKind::InvalidEscape(other)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/usr/share/dbus-1/services/org.example.Foo.service")
    }

    fn parse(text: &str) -> Result<ServiceFile, DesktopError> {
        ServiceFile::parse(p(), text)
    }

    fn ok(text: &str) -> ServiceFile {
        match parse(text) {
            Ok(s) => s,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn err(text: &str) -> DesktopError {
        match parse(text) {
            Ok(s) => panic!("unexpectedly parsed: {s:?}"),
            Err(e) => e,
        }
    }

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn minimal() {
        let s = ok("[D-BUS Service]\nName=org.example.Foo\nExec=/usr/bin/foo --bar\n");
        assert_eq!(s.name, "org.example.Foo");
        assert_eq!(s.exec, "/usr/bin/foo --bar");
        assert_eq!(s.argv, Ok(v(&["/usr/bin/foo", "--bar"])));
        assert_eq!(s.user, None);
        assert_eq!(s.systemd_service, None);
        assert_eq!(s.assumed_apparmor_label, None);
        assert_eq!((s.name_line, s.exec_line), (2, 3));
    }

    #[test]
    fn optional_keys_comments_blanks_other_groups() {
        let text = "# leading comment\n\
                    \n\
                    [Desktop Entry]\n\
                    Name=whatever, not validated\n\
                    X-Weird=\\s\n\
                    \t \n\
                    [D-BUS Service]\n\
                    #Name=commented.Out\n\
                    Name = org.example.Foo\n\
                    Exec  =  /usr/bin/foo\n\
                    User=root\n\
                    SystemdService=foo.service\n\
                    AssumedAppArmorLabel=unconfined\n\
                    Unknown-Key=ignored\n\
                    [Other]\n\
                    A=b";
        let s = ok(text);
        assert_eq!(s.name, "org.example.Foo");
        assert_eq!(s.argv, Ok(v(&["/usr/bin/foo"])));
        assert_eq!(s.user.as_deref(), Some("root"));
        assert_eq!(s.systemd_service.as_deref(), Some("foo.service"));
        assert_eq!(s.assumed_apparmor_label.as_deref(), Some("unconfined"));
        assert_eq!((s.name_line, s.exec_line), (9, 10));
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        let s = ok("[D-BUS Service]\r\nName=org.example.Foo\r\nExec=/bin/foo\r\n");
        assert_eq!(s.exec, "/bin/foo");
        let s = ok("[D-BUS Service]\rName=org.example.Foo\rExec=/bin/foo");
        assert_eq!(s.exec, "/bin/foo");
        assert_eq!(s.exec_line, 3);
    }

    #[test]
    fn value_escapes() {
        let s = ok("[D-BUS Service]\nName=org.example.Foo\nExec=a\\sb\\tc\\nd\\re\\\\f\n");
        assert_eq!(s.exec, "a b\tc\nd\re\\f");
        // the unescaped blanks split words; the remaining `\f` is a shell
        // escape of `f`
        assert_eq!(s.argv, Ok(v(&["a", "b", "c", "d\ref"])));
    }

    #[test]
    fn stacked_backslashes() {
        // `\\\\` in the file -> `\\` after desktop unescaping -> `\` in argv
        let s = ok("[D-BUS Service]\nName=org.example.Foo\nExec=/bin/prog \\\\\\\\\n");
        assert_eq!(s.exec, "/bin/prog \\\\");
        assert_eq!(s.argv, Ok(v(&["/bin/prog", "\\"])));
        // `\\s` -> `\ ` -> escaped space inside one argument
        let s = ok("[D-BUS Service]\nName=org.example.Foo\nExec=/bin/prog a\\\\\\sb\n");
        assert_eq!(s.exec, "/bin/prog a\\ b");
        assert_eq!(s.argv, Ok(v(&["/bin/prog", "a b"])));
        // `\\` alone -> `\` -> shell escape of the next char
        let s = ok("[D-BUS Service]\nName=org.example.Foo\nExec=/bin/prog \\\\$HOME\n");
        assert_eq!(s.argv, Ok(v(&["/bin/prog", "$HOME"])));
    }

    #[test]
    fn invalid_escapes_reject_the_file() {
        for (text, c) in [
            ("Exec=/bin/foo \\x", 'x'),
            ("Exec=\"a\\\"b\"", '"'),
            ("Exec=/bin/foo \\$", '$'),
            ("Exec=/bin/foo \\ x", ' '),
        ] {
            let e = err(&format!("[D-BUS Service]\nName=org.example.Foo\n{text}\n"));
            assert_eq!(e.kind, DesktopErrorKind::InvalidEscape(c), "{text}");
            assert_eq!(e.line, Some(3));
        }
        let e = err("[D-BUS Service]\nName=org.example.Foo\nExec=/bin/foo\\\n");
        assert_eq!(e.kind, DesktopErrorKind::EscapeAtEnd);
        // even in a group and key we otherwise ignore
        let e = err("[D-BUS Service]\nName=org.example.Foo\nExec=/bin/foo\n[X]\nY=\\q\n");
        assert_eq!(e.kind, DesktopErrorKind::InvalidEscape('q'));
        assert_eq!(e.line, Some(5));
        assert_eq!(
            e.to_string(),
            "/usr/share/dbus-1/services/org.example.Foo.service:5: \
             Text to be unescaped had invalid escape sequence \\q"
        );
    }

    #[test]
    fn locale_keys_are_ignored() {
        let s = ok("[D-BUS Service]\n\
                    Name[de]=not.This\n\
                    Name=org.example.Foo\n\
                    Exec[fr_FR.UTF-8@euro]=anything \\q goes\n\
                    Exec=/bin/foo\n");
        assert_eq!(s.name, "org.example.Foo");
        assert_eq!(s.exec, "/bin/foo");
        // a localised key alone does not satisfy a required key
        let e = err("[D-BUS Service]\nName=org.example.Foo\nExec[C]=/bin/foo\n");
        assert_eq!(e.kind, DesktopErrorKind::MissingKey("Exec"));
    }

    #[test]
    fn first_duplicate_key_wins() {
        let s = ok("[D-BUS Service]\nName=org.example.Foo\nExec=/bin/a\nExec=/bin/b\n");
        assert_eq!(s.exec, "/bin/a");
    }

    #[test]
    fn syntax_errors() {
        let cases: &[(&str, DesktopErrorKind, usize)] = &[
            (
                "Name=x\n[D-BUS Service]\n",
                DesktopErrorKind::KeyBeforeSection,
                1,
            ),
            ("# c\nName[de]=x\n", DesktopErrorKind::KeyBeforeSection, 2),
            (
                "[D-BUS Service\n",
                DesktopErrorKind::InvalidSectionHeader,
                1,
            ),
            (
                "[D-BUS Service] \n",
                DesktopErrorKind::InvalidSectionHeader,
                1,
            ),
            ("[]\n", DesktopErrorKind::InvalidSectionHeader, 1),
            ("[a]b]\n", DesktopErrorKind::InvalidSectionChars, 1),
            ("[a\tb]\n", DesktopErrorKind::InvalidSectionChars, 1),
            ("[é]\n", DesktopErrorKind::InvalidSectionChars, 1),
            ("[D-BUS Service]\n=x\n", DesktopErrorKind::EmptyKey, 2),
            ("[D-BUS Service]\n Name=x\n", DesktopErrorKind::EmptyKey, 2),
            (
                "[D-BUS Service]\n  # indented comment\n",
                DesktopErrorKind::EmptyKey,
                2,
            ),
            (
                "[D-BUS Service]\nNa_me=x\n",
                DesktopErrorKind::InvalidKeyChars,
                2,
            ),
            (
                "[D-BUS Service]\nName\t=x\n",
                DesktopErrorKind::InvalidKeyChars,
                2,
            ),
            (
                "[D-BUS Service]\nName x\n",
                DesktopErrorKind::InvalidKeyChars,
                2,
            ),
            ("[D-BUS Service]\nName\n", DesktopErrorKind::NoEquals, 2),
            ("[D-BUS Service]\nName   \n", DesktopErrorKind::NoEquals, 2),
        ];
        for (text, kind, line) in cases {
            let e = err(text);
            assert_eq!(&e.kind, kind, "{text:?}");
            assert_eq!(e.line, Some(*line), "{text:?}");
        }
    }

    #[test]
    fn duplicate_group_is_an_error() {
        let e = err(
            "[D-BUS Service]\nName=org.example.Foo\nExec=/bin/foo\n\n[D-BUS Service]\nName=org.example.Bar\n",
        );
        assert_eq!(
            e.kind,
            DesktopErrorKind::DuplicateSection {
                name: "D-BUS Service".into(),
                first_line: 1
            }
        );
        assert_eq!(e.line, Some(5));
        assert!(
            e.to_string()
                .contains("org.example.Foo.service:5: duplicate group [D-BUS Service]")
        );
    }

    #[test]
    fn missing_parts() {
        assert_eq!(err("").kind, DesktopErrorKind::MissingSection);
        assert_eq!(
            err("[Other]\nName=a.b\nExec=x\n").kind,
            DesktopErrorKind::MissingSection
        );
        let e = err("\n[D-BUS Service]\nExec=/bin/foo\n");
        assert_eq!(e.kind, DesktopErrorKind::MissingKey("Name"));
        assert_eq!(e.line, Some(2));
        assert!(
            e.to_string()
                .ends_with(":2: No \"Name\" key in .service file")
        );
        assert_eq!(
            err("[D-BUS Service]\nName=org.example.Foo\n").kind,
            DesktopErrorKind::MissingKey("Exec")
        );
        // keys are case-sensitive
        assert_eq!(
            err("[D-BUS Service]\nname=org.example.Foo\nExec=/bin/foo\n").kind,
            DesktopErrorKind::MissingKey("Name")
        );
    }

    #[test]
    fn invalid_names() {
        // Every reason is tested in wire::validate; here, that one reaches the error.
        for (name, reason) in [
            ("foo", BusNameError::TooFewElements),
            (":1.42", BusNameError::Unique),
            ("org.exämple.Foo", BusNameError::InvalidChar('ä')),
        ] {
            let e = err(&format!("[D-BUS Service]\nExec=/bin/x\nName={name}\n"));
            assert_eq!(
                e.kind,
                DesktopErrorKind::InvalidName {
                    name: name.into(),
                    reason
                },
                "{name:?}"
            );
            assert_eq!(e.line, Some(3));
        }
        assert_eq!(
            err("[D-BUS Service]\nExec=/bin/x\nName=\n").kind,
            DesktopErrorKind::InvalidName {
                name: String::new(),
                reason: BusNameError::Empty
            }
        );
    }

    #[test]
    fn exec_errors_are_deferred() {
        let s = ok("[D-BUS Service]\nName=org.example.Foo\nExec=/bin/foo 'unclosed\n");
        assert_eq!(s.argv, Err(ExecError::UnclosedQuotes));
        assert_eq!(s.exec, "/bin/foo 'unclosed");
        let s = ok("[D-BUS Service]\nName=org.example.Foo\nExec=\n");
        assert_eq!(s.argv, Err(ExecError::NoTokens));
        let s = ok("[D-BUS Service]\nName=org.example.Foo\nExec=   \n");
        assert_eq!(s.argv, Err(ExecError::NoTokens));
    }

    #[test]
    fn trailing_blanks_are_part_of_the_value() {
        let s = ok("[D-BUS Service]\nName=org.example.Foo\nExec=/bin/foo \n");
        assert_eq!(s.exec, "/bin/foo ");
        // exactly what dbus-daemon would run
        assert_eq!(s.argv, Ok(v(&["/bin/foo", ""])));
    }

    #[test]
    fn encoding_and_size() {
        let e =
            ServiceFile::parse_bytes(p(), b"[D-BUS Service]\nName=a.b\nExec=/x\xff\n").unwrap_err();
        assert_eq!(e.kind, DesktopErrorKind::InvalidUtf8);
        assert_eq!(e.line, Some(3));
        assert!(e.to_string().ends_with(":3: invalid UTF-8"));
        let e = err("[D-BUS Service]\nName=a.b\nExec=/x\0y\n");
        assert_eq!((e.kind, e.line), (DesktopErrorKind::InvalidUtf8, Some(3)));
        let mut big = "[D-BUS Service]\nName=a.b\nExec=/x\n".to_string();
        big.push_str(&"#".repeat(MAX_SERVICE_FILE_SIZE));
        assert!(matches!(err(&big).kind, DesktopErrorKind::TooLarge(_)));
        assert!(matches!(
            ServiceFile::parse_bytes(p(), big.as_bytes())
                .unwrap_err()
                .kind,
            DesktopErrorKind::TooLarge(_)
        ));
        let ok = ServiceFile::parse_bytes(p(), "[D-BUS Service]\nName=a.b\nExec=/é\n".as_bytes());
        assert_eq!(ok.map(|s| s.exec), Ok("/é".to_string()));
    }

    #[test]
    fn generic_desktop_file_access() {
        let f = DesktopFile::parse(p(), "[A]\nk=v\nk=w\n[B]\nx = y z \n").unwrap();
        assert_eq!(f.sections.len(), 2);
        assert_eq!(f.section("A").and_then(|s| s.get("k")), Some("v"));
        assert_eq!(f.section("B").and_then(|s| s.get("x")), Some("y z "));
        assert_eq!(f.section("C"), None);
        assert_eq!(f.section("B").map(|s| s.line), Some(4));
    }

    #[test]
    fn line_counting() {
        assert_eq!(line_of_offset(b"a\nb\r\nc\rd", 0), 1);
        assert_eq!(line_of_offset(b"a\nb\r\nc\rd", 2), 2);
        assert_eq!(line_of_offset(b"a\nb\r\nc\rd", 5), 3);
        assert_eq!(line_of_offset(b"a\nb\r\nc\rd", 7), 4);
        assert_eq!(line_of_offset(b"a", 100), 1);
        assert_eq!(
            lines("a\n\nb\r\n\rc").collect::<Vec<_>>(),
            ["a", "", "b", "", "c"]
        );
        assert_eq!(lines("a\n").collect::<Vec<_>>(), ["a"]);
    }
}
