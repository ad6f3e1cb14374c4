//! Splitting of `Exec=` command lines, exactly as dbus-daemon does it.
//!
//! This is a port of `_dbus_shell_parse_argv()` / `_dbus_shell_unquote()`
//! from dbus's `dbus/dbus-shell.c` (itself derived from GLib's
//! `g_shell_parse_argv()`).  The algorithm has two phases:
//!
//! 1. **Tokenising.**  Unquoted spaces and tabs end a token; an unquoted
//!    newline ends a token too.  `'…'` and `"…"` are copied into the token
//!    verbatim (quotes included); inside `"…"` a quote preceded by an odd
//!    number of backslashes does not close it.  An unquoted backslash keeps
//!    itself and the next character for phase 2, except that
//!    backslash-newline vanishes.  An unquoted `#` discards everything up to
//!    the next newline *and the newline itself*.
//! 2. **Unquoting** each token: outside quotes a backslash escapes any
//!    character; `'…'` is literal; in `"…"` a backslash escapes only
//!    `$`, `` ` ``, `"`, `\` and newline and is otherwise kept literally.
//!
//! No expansion or globbing of any kind is done.
//!
//! dbus's port differs from GLib in ways that are reproduced here on
//! purpose, because busvisor must start a `.service` file's program with
//! the very argv dbus-daemon would use:
//!
//! * `#` starts a comment anywhere in unquoted text, not only at the start of
//!   a token (`a#b` is `["a"]`).
//! * A token is always emitted at an unquoted newline and at the end of the
//!   input, even if it is empty: `"a "` is `["a", ""]`, `"a\n\nb"` is
//!   `["a", "", "b"]` and `"a #c"` is `["a", ""]`.
//! * A trailing unquoted backslash or a trailing `#` is reported as
//!   "Unclosed quotes in command line" (GLib says "Text ended just after a
//!   '\' character."; dbus has no such message).
//! * Inside double quotes backslash-newline keeps the newline (the backslash
//!   is dropped), as in GLib.
//!
//! The one deliberate deviation: dbus can never actually produce its
//! "No tokens found in command line" error (it always emits at least the
//! trailing empty token, so an empty `Exec=` yields `[""]`, which later fails
//! to execute).  Here, a command line whose tokens are *all* empty — i.e. it
//! contains nothing but blanks, newlines and comments — is reported as
//! [`ExecError::NoTokens`], which is more useful and is still an error at
//! activation time.  Quoted empty strings (`''`, `""`) are real tokens.
//!
//! Like the C code (which works on NUL-terminated strings), the input is
//! treated as ending at its first NUL character, if any.

/// Why an `Exec=` command line could not be split.
///
/// Both variants are reported to the activation requester as
/// `org.freedesktop.DBus.Error.InvalidArgs`, with the `Display` text (the
/// exact dbus-daemon wording) as the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ExecError {
    /// A `'` or `"` was never closed, or the line ended right after an
    /// unquoted `\` or `#`.
    #[error("Unclosed quotes in command line")]
    UnclosedQuotes,
    /// The command line contained no tokens (only blanks and comments).
    #[error("No tokens found in command line")]
    NoTokens,
}

impl ExecError {
    /// The error message, in dbus-daemon's exact wording.
    pub fn message(&self) -> &'static str {
        match self {
            ExecError::UnclosedQuotes => "Unclosed quotes in command line",
            ExecError::NoTokens => "No tokens found in command line",
        }
    }
}

/// The PATH busvisor looks bare program names up in: its own, never one
/// a client set through UpdateActivationEnvironment.
pub fn bus_path() -> std::ffi::OsString {
    std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into())
}

/// The first executable file named `program` in the directories of `path`.
pub fn find_in_path(program: &str, path: &std::ffi::OsStr) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Splits an `Exec=` command line into an argument vector the way
/// dbus-daemon's `_dbus_shell_parse_argv()` does (see the module docs).
pub fn split_exec(s: &str) -> Result<Vec<String>, ExecError> {
    let s = match s.find('\0') {
        Some(nul) => &s[..nul],
        None => s,
    };
    let tokens = tokenize(s)?;
    if tokens.iter().all(String::is_empty) {
        return Err(ExecError::NoTokens);
    }
    tokens.iter().map(|t| shell_unquote(t)).collect()
}

/// Phase 1: `tokenize_command_line()` from dbus-shell.c.
fn tokenize(s: &str) -> Result<Vec<String>, ExecError> {
    let chars: Vec<char> = s.chars().collect();
    let mut tokens = Vec::new();
    let mut token = String::new();
    // '\0' in the C code: not inside any quote/escape/comment.
    let mut current_quote: Option<char> = None;
    // Parity of the run of consecutive backslashes ending at the previous
    // character; used to detect escaped double quotes.
    let mut quoted = false;
    let mut i = 0;

    while let Some(&c) = chars.get(i) {
        let mut cur = c;
        match current_quote {
            Some('\\') => {
                if c != '\n' {
                    // Keep the escape for the unquoting phase.
                    token.push('\\');
                    token.push(c);
                }
                // backslash-newline becomes nothing
                current_quote = None;
            }
            Some('#') => {
                // Discard up to the next newline; the newline itself is
                // consumed below without delimiting the token.
                while let Some(&d) = chars.get(i) {
                    if d == '\n' {
                        break;
                    }
                    i += 1;
                }
                current_quote = None;
                match chars.get(i) {
                    Some(&d) => cur = d,
                    None => break,
                }
            }
            Some(q) => {
                if c == q && !(q == '"' && quoted) {
                    current_quote = None;
                }
                // Everything inside quotes, and the closing quote, is kept.
                token.push(c);
            }
            None => match c {
                '\n' => tokens.push(std::mem::take(&mut token)),
                ' ' | '\t' => {
                    if !token.is_empty() {
                        tokens.push(std::mem::take(&mut token));
                    }
                }
                '\'' | '"' => {
                    token.push(c);
                    current_quote = Some(c);
                }
                '#' | '\\' => current_quote = Some(c),
                _ => token.push(c),
            },
        }

        quoted = if cur == '\\' { !quoted } else { false };
        i += 1;
    }

    tokens.push(token);

    if current_quote.is_some() {
        return Err(ExecError::UnclosedQuotes);
    }
    Ok(tokens)
}

/// Removes shell quoting from one word, as dbus's `_dbus_shell_unquote()`
/// does: outside quotes a backslash escapes any character (and
/// backslash-newline disappears), single quotes are literal, and inside
/// double quotes a backslash escapes only `$`, `` ` ``, `"`, `\` and newline.
///
/// Returns [`ExecError::UnclosedQuotes`] if a quote is not closed.
pub fn shell_unquote(word: &str) -> Result<String, ExecError> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::with_capacity(word.len());
    let mut i = 0;

    while i < chars.len() {
        // Unquoted characters, honouring backslash escapes.
        while let Some(&c) = chars.get(i) {
            if c == '"' || c == '\'' {
                break;
            }
            if c == '\\' {
                i += 1;
                if let Some(&e) = chars.get(i) {
                    if e != '\n' {
                        out.push(e);
                    }
                    i += 1;
                }
            } else {
                out.push(c);
                i += 1;
            }
        }

        let Some(&quote) = chars.get(i) else {
            break;
        };
        i += 1;
        let mut closed = false;
        if quote == '"' {
            while let Some(&c) = chars.get(i) {
                match c {
                    '"' => {
                        i += 1;
                        closed = true;
                        break;
                    }
                    '\\' => {
                        i += 1;
                        match chars.get(i) {
                            Some(&e @ ('"' | '\\' | '`' | '$' | '\n')) => {
                                out.push(e);
                                i += 1;
                            }
                            // not an escape: the backslash is literal
                            _ => out.push('\\'),
                        }
                    }
                    _ => {
                        out.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while let Some(&c) = chars.get(i) {
                i += 1;
                if c == '\'' {
                    closed = true;
                    break;
                }
                out.push(c);
            }
        }
        if !closed {
            return Err(ExecError::UnclosedQuotes);
        }
    }

    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Vec<String> {
        match split_exec(s) {
            Ok(v) => v,
            Err(e) => panic!("split_exec({s:?}) failed: {e}"),
        }
    }

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn simple_words() {
        assert_eq!(ok("/usr/bin/foo"), v(&["/usr/bin/foo"]));
        assert_eq!(ok("foo bar  baz"), v(&["foo", "bar", "baz"]));
        assert_eq!(ok("foo\tbar"), v(&["foo", "bar"]));
        assert_eq!(ok("   foo bar"), v(&["foo", "bar"]));
        assert_eq!(ok("\t foo"), v(&["foo"]));
    }

    #[test]
    fn dbus_test_suite_cases() {
        // From dbus's test/shell-test.c
        assert_eq!(
            ok("command -s --force-shutdown \"a string\" 123"),
            v(&["command", "-s", "--force-shutdown", "a string", "123"])
        );
        assert_eq!(
            ok("grep -l -r -i 'whatever' files*.c"),
            v(&["grep", "-l", "-r", "-i", "whatever", "files*.c"])
        );
        assert_eq!(
            ok("evolution mailto:pepe@cuco.com"),
            v(&["evolution", "mailto:pepe@cuco.com"])
        );
        assert_eq!(ok("run \"a \n multiline\""), v(&["run", "a \n multiline"]));
        assert_eq!(
            split_exec("ls \"a wrong string'"),
            Err(ExecError::UnclosedQuotes)
        );
    }

    #[test]
    fn single_quotes_are_literal() {
        assert_eq!(ok(r"'a b' c"), v(&["a b", "c"]));
        assert_eq!(ok(r"'a\b'"), v(&[r"a\b"]));
        assert_eq!(ok(r#"'a"b'"#), v(&[r#"a"b"#]));
        assert_eq!(ok(r"'$HOME' `x`"), v(&["$HOME", "`x`"]));
        // the classic way to put a ' inside single quotes
        assert_eq!(ok(r"'foo'\''bar'"), v(&["foo'bar"]));
        assert_eq!(ok("'#not a comment'"), v(&["#not a comment"]));
        assert_eq!(ok("'a\nb'"), v(&["a\nb"]));
    }

    #[test]
    fn double_quotes() {
        assert_eq!(ok(r#""a b" c"#), v(&["a b", "c"]));
        assert_eq!(ok(r#""a\"b""#), v(&[r#"a"b"#]));
        assert_eq!(ok(r#""a\\b""#), v(&[r"a\b"]));
        assert_eq!(ok(r#""\$HOME""#), v(&["$HOME"]));
        assert_eq!(ok(r#""\`""#), v(&["`"]));
        // other backslashes stay literal
        assert_eq!(ok(r#""\n\t\a""#), v(&[r"\n\t\a"]));
        assert_eq!(ok(r#""a'b""#), v(&["a'b"]));
        // escaped backslash followed by a closing quote
        assert_eq!(ok(r#""a\\" b"#), v(&[r"a\", "b"]));
        // escaped quote then closing quote
        assert_eq!(ok(r#""a\"" b"#), v(&[r#"a""#, "b"]));
        // three backslashes before the quote: \\ then \"
        assert_eq!(ok(r#""a\\\"" b"#), v(&[r#"a\""#, "b"]));
        // backslash-newline inside double quotes keeps the newline (GLib too)
        assert_eq!(ok("\"a\\\nb\""), v(&["a\nb"]));
        // no expansion
        assert_eq!(ok(r#""$HOME" ~ *.c"#), v(&["$HOME", "~", "*.c"]));
    }

    #[test]
    fn quotes_concatenate_within_a_word() {
        assert_eq!(ok(r#"a"b c"d'e f'g"#), v(&["ab cde fg"]));
        assert_eq!(ok(r#"--opt="x y""#), v(&["--opt=x y"]));
    }

    #[test]
    fn empty_quoted_strings_are_arguments() {
        assert_eq!(ok(r#"ls """#), v(&["ls", ""]));
        assert_eq!(ok("ls '' x"), v(&["ls", "", "x"]));
        assert_eq!(ok("''"), v(&[""]));
    }

    #[test]
    fn unquoted_backslash() {
        assert_eq!(ok(r"a\ b"), v(&["a b"]));
        assert_eq!(ok(r"a\\b"), v(&[r"a\b"]));
        assert_eq!(ok(r#"a\"b"#), v(&[r#"a"b"#]));
        assert_eq!(ok(r"a\'b"), v(&["a'b"]));
        assert_eq!(ok(r"\#x"), v(&["#x"]));
        assert_eq!(ok(r"a\nb"), v(&["anb"]));
        // backslash-newline is removed and joins the word
        assert_eq!(ok("ab\\\ncd"), v(&["abcd"]));
        // escaped double quote does not open a quoted section
        assert_eq!(ok(r#"\"a b"#), v(&[r#""a"#, "b"]));
        // \\ then a real quote
        assert_eq!(ok(r#"\\"a b""#), v(&[r"\a b"]));
    }

    #[test]
    fn stacked_escapes_from_service_files() {
        // In a .service file, `Exec=/bin/prog \\\\` passes a single
        // backslash: the desktop-file layer turns `\\` into `\`, leaving
        // `\\` for this layer, which turns it into `\`.
        assert_eq!(ok(r"/bin/prog \\"), v(&["/bin/prog", r"\"]));
        // `\\s` in the file is `\ ` here: an escaped space.
        assert_eq!(ok(r"/bin/prog a\ b"), v(&["/bin/prog", "a b"]));
        assert_eq!(ok(r#"/bin/prog "C:\\dir""#), v(&["/bin/prog", r"C:\dir"]));
        assert_eq!(ok(r#"/bin/prog "C:\dir""#), v(&["/bin/prog", r"C:\dir"]));
    }

    #[test]
    fn newline_separates_tokens() {
        assert_eq!(ok("a\nb"), v(&["a", "b"]));
        // dbus quirk: every unquoted newline delimits, even empty tokens
        assert_eq!(ok("a\n\nb"), v(&["a", "", "b"]));
        assert_eq!(ok("a \nb"), v(&["a", "", "b"]));
    }

    #[test]
    fn trailing_blanks_give_empty_argument_like_dbus() {
        assert_eq!(ok("a "), v(&["a", ""]));
        assert_eq!(ok("a b\t"), v(&["a", "b", ""]));
        assert_eq!(ok("a\n"), v(&["a", ""]));
    }

    #[test]
    fn comments() {
        assert_eq!(ok("#comment\nfoo bar"), v(&["foo", "bar"]));
        // the newline ending the comment is swallowed with it
        assert_eq!(ok("a #c\nb"), v(&["a", "b"]));
        assert_eq!(ok("a #c"), v(&["a", ""]));
        // dbus quirk: '#' inside an unquoted word starts a comment too
        assert_eq!(ok("a#b c"), v(&["a"]));
        assert_eq!(ok("a#b\nc"), v(&["ac"]));
        // quoted or escaped '#' is literal
        assert_eq!(ok(r##"a"#b" c"##), v(&["a#b", "c"]));
        assert_eq!(ok(r"a\#b"), v(&["a#b"]));
    }

    #[test]
    fn errors() {
        assert_eq!(split_exec("'abc"), Err(ExecError::UnclosedQuotes));
        assert_eq!(split_exec("\"abc"), Err(ExecError::UnclosedQuotes));
        assert_eq!(split_exec(r#""abc\""#), Err(ExecError::UnclosedQuotes));
        assert_eq!(split_exec(r"foo\"), Err(ExecError::UnclosedQuotes));
        assert_eq!(split_exec("foo #"), Err(ExecError::UnclosedQuotes));
        assert_eq!(split_exec("a 'b\"c"), Err(ExecError::UnclosedQuotes));
        assert_eq!(split_exec(""), Err(ExecError::NoTokens));
        assert_eq!(split_exec("   \t "), Err(ExecError::NoTokens));
        assert_eq!(split_exec("\n\n"), Err(ExecError::NoTokens));
        assert_eq!(split_exec("# only a comment"), Err(ExecError::NoTokens));
        assert_eq!(split_exec("\\\n"), Err(ExecError::NoTokens));
    }

    #[test]
    fn error_messages_are_dbus_wording() {
        assert_eq!(
            ExecError::UnclosedQuotes.to_string(),
            "Unclosed quotes in command line"
        );
        assert_eq!(
            ExecError::NoTokens.to_string(),
            "No tokens found in command line"
        );
        assert_eq!(
            ExecError::NoTokens.message(),
            ExecError::NoTokens.to_string()
        );
        assert_eq!(
            ExecError::UnclosedQuotes.message(),
            ExecError::UnclosedQuotes.to_string()
        );
    }

    #[test]
    fn nul_ends_the_string_like_c() {
        assert_eq!(ok("a b\0c d"), v(&["a", "b"]));
        assert_eq!(split_exec("\0abc"), Err(ExecError::NoTokens));
    }

    #[test]
    fn non_ascii() {
        assert_eq!(
            ok("/usr/bin/ñ 'é ü' \"日本\""),
            v(&["/usr/bin/ñ", "é ü", "日本"])
        );
        assert_eq!(ok(r"\é"), v(&["é"]));
    }

    #[test]
    fn unquote_directly() {
        assert_eq!(
            shell_unquote(r#""foo"blah'bar'"#),
            Ok("fooblahbar".to_string())
        );
        assert_eq!(shell_unquote("'x"), Err(ExecError::UnclosedQuotes));
        assert_eq!(shell_unquote("\"x\\"), Err(ExecError::UnclosedQuotes));
        assert_eq!(shell_unquote("x\\"), Ok("x".to_string()));
    }

    #[test]
    fn never_panics_on_odd_input() {
        let pieces = ["a", " ", "\t", "\n", "'", "\"", "\\", "#", "$", "é", "\0"];
        // all strings of length <= 4 over the alphabet
        let mut inputs = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for s in &inputs {
                for p in pieces {
                    next.push(format!("{s}{p}"));
                }
            }
            inputs.extend(next);
            inputs.sort();
            inputs.dedup();
        }
        for s in &inputs {
            if let Ok(argv) = split_exec(s) {
                assert!(!argv.is_empty(), "{s:?}");
            }
        }
    }
}
