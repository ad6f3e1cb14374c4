//! Every shell example of README.md and docs/*.md, run as a reader pasting
//! it would, with the output the document shows compared to what came.
//!
//! What runs: every fenced block whose language is `sh`, `bash`, `shell`,
//! `console` or `shell-session`, in document order. The blocks of one
//! document run in one bash session (variables, `cd` and exports carry
//! over), in a fresh temporary directory holding a copy of the repository's
//! `services.d/` and `examples/`, with a temporary `HOME` and
//! `XDG_RUNTIME_DIR`, no `DBUS_SESSION_BUS_ADDRESS`, `DISPLAY` or other
//! `XDG_*` variable, `DBUS_SYSTEM_BUS_ADDRESS` pointing at nothing, and
//! `busvisor` on `PATH` being the binary under test. `cargo run --release --`
//! in a block is run as that `busvisor`. The session's stdin is a pipe that
//! stays open until the document is done (as a terminal would), so a bus
//! started with `busvisor launch --exit-with-session` lives until then.
//!
//! - `sh`/`bash`/`shell` blocks run as they are, under `set -e`: a command
//!   that fails ends the document's session, and the test fails.
//! - `console` blocks are transcripts: a line starting with `$ ` is a
//!   command (continued on the next line after a trailing `\`, and on
//!   lines starting with the shell's secondary prompt `> `), and the lines
//!   up to the next command are its output (stdout and stderr together). A
//!   command with no output shown must print nothing and exit 0, unless the
//!   next command is `echo $?`, which shows its status.
//!
//! Output is compared line by line, with runs of blanks taken as one space
//! and blank lines at the end ignored. In the output shown:
//! - `...` stands for any text within a line (the blanks around it
//!   included), and a line that is only `...` for any number of lines;
//! - `<time>` likewise, for a time or date;
//! - `<pid>` and `<n>` stand for a number, `<hex>` for hexadecimal digits.
//!
//! A comment on the line before a block's fence says how else to run it:
//! - `<!-- doc-test: skip: REASON -->` does not run it; the reason is
//!   required, and `cargo test --test docs -- --nocapture` lists the skipped
//!   blocks with their reasons. For what cannot run here: root-only system
//!   paths, a display, a real desktop, Docker, the test suite itself.
//! - `<!-- doc-test: root -->` runs it only as root (CI runs as root).
//! - `<!-- doc-test: background -->` runs it in the background, as in
//!   another terminal (a bus in the foreground, `busvisor events`): the
//!   session goes on after a second, and the output of a `console`
//!   background block is compared once the document's other blocks are
//!   done (waiting up to 5 s for it to match). `<!-- doc-test: background
//!   VAR -->` goes on once the block printed a line on stdout (at most
//!   20 s), with `VAR` set to that line, as the prose asks the reader to.
//!
//! `BUSVISOR_DOC_TEST=CLI cargo test --test docs -- --nocapture` runs only
//! the documents whose name contains `CLI`; with `BUSVISOR_DOC_TEST_KEEP=1`
//! each document's directory (the script, its log, each command's output)
//! is kept and named.
//!
//! Every process a document starts carries a mark in its environment; when
//! the document is done they all get SIGTERM, then SIGKILL, by pid.
//! An unlabelled fence whose first line starts with `$ ` is an error (label
//! it `console`), and so is an annotation that is not right before a shell
//! block.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TEST_MARK_VAR, busvisor_bin, kill_marked};

/// Fence languages run as shell; the console ones are transcripts.
const SHELL: &[&str] = &["sh", "bash", "shell", "console", "shell-session"];
const CONSOLE: &[&str] = &["console", "shell-session"];
/// What of the repository the examples use, copied for each document.
const COPIED: &[&str] = &["services.d", "examples"];
/// A document's whole session, at most.
const DOC_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a background block's output may take to match.
const BACKGROUND_SETTLE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Run,
    Root,
    Skip(String),
    /// In the background; with a variable set to its first line.
    Background(Option<String>),
}

#[derive(Debug)]
struct Block {
    line: usize,
    mode: Mode,
    body: Body,
}

#[derive(Debug)]
enum Body {
    Script(String),
    Console(Vec<Cmd>),
}

#[derive(Debug)]
struct Cmd {
    line: usize,
    text: String,
    expected: Vec<String>,
}

// ------------------------------------------------------------- parsing

fn annotation(line: &str) -> Option<Result<Mode, String>> {
    let inner = line
        .trim()
        .strip_prefix("<!--")?
        .strip_suffix("-->")?
        .trim()
        .strip_prefix("doc-test:")?
        .trim();
    let (word, rest) = inner.split_once([' ', ':']).unwrap_or((inner, ""));
    let rest = rest.trim_start_matches(':').trim();
    Some(match word {
        "skip" if !rest.is_empty() => Ok(Mode::Skip(rest.to_string())),
        "skip" => Err("`skip` needs a reason: <!-- doc-test: skip: REASON -->".into()),
        "root" if rest.is_empty() => Ok(Mode::Root),
        "background" if rest.is_empty() => Ok(Mode::Background(None)),
        "background" if rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
            Ok(Mode::Background(Some(rest.to_string())))
        }
        _ => Err(format!("unknown doc-test annotation `{inner}`")),
    })
}

/// A console block's commands and their output.
fn transcript(first_line: usize, lines: &[&str]) -> Result<Vec<Cmd>, String> {
    let mut cmds: Vec<Cmd> = Vec::new();
    // Whether the previous line was a command's, and ended with `\`.
    let (mut in_cmd, mut backslash) = (false, false);
    for (i, l) in lines.iter().enumerate() {
        let more = if backslash {
            Some(*l)
        } else if in_cmd {
            l.strip_prefix("> ")
        } else {
            None
        };
        if let Some(more) = more {
            let c = cmds.last_mut().expect("a command goes on");
            c.text.push('\n');
            c.text.push_str(more);
        } else if let Some(cmd) = l.strip_prefix("$ ") {
            cmds.push(Cmd {
                line: first_line + i,
                text: cmd.to_string(),
                expected: Vec::new(),
            });
        } else if let Some(c) = cmds.last_mut() {
            c.expected.push(l.to_string());
            (in_cmd, backslash) = (false, false);
            continue;
        } else {
            return Err(format!(
                "line {}: a console block starts with a `$ ` command",
                first_line + i
            ));
        }
        (in_cmd, backslash) = (true, l.ends_with('\\'));
    }
    Ok(cmds)
}

/// The shell blocks of a document, in order.
fn parse(text: &str) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut pending: Option<(usize, Mode)> = None;
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        let t = l.trim_start();
        if let Some(a) = annotation(l) {
            let mode = a.map_err(|e| format!("line {}: {e}", i + 1))?;
            pending = Some((i + 1, mode));
            i += 1;
            continue;
        }
        if !t.starts_with("```") {
            if let Some((at, _)) = &pending
                && !t.is_empty()
            {
                return Err(format!(
                    "line {at}: a doc-test annotation must come right before a shell block's fence"
                ));
            }
            i += 1;
            continue;
        }
        let indent = l.len() - t.len();
        let ticks = t.len() - t.trim_start_matches('`').len();
        let lang = t[ticks..].split_whitespace().next().unwrap_or("");
        let start = i + 1;
        let mut end = start;
        while end < lines.len() && lines[end].trim() != &t[..ticks] {
            end += 1;
        }
        let body: Vec<&str> = lines[start..end.min(lines.len())]
            .iter()
            .map(|b| b.get(indent..).unwrap_or(b.trim_start()))
            .collect();
        i = end + 1;
        let mode = pending.take().map(|(_, m)| m);
        if !SHELL.contains(&lang) {
            if mode.is_some() {
                return Err(format!(
                    "line {start}: a doc-test annotation before a `{lang}` block, which is not run"
                ));
            }
            if lang.is_empty()
                && body
                    .iter()
                    .find(|b| !b.trim().is_empty())
                    .is_some_and(|b| b.starts_with("$ "))
            {
                return Err(format!(
                    "line {start}: a transcript in an unlabelled fence: label it ```console"
                ));
            }
            continue;
        }
        let body = if CONSOLE.contains(&lang) {
            Body::Console(transcript(start + 1, &body)?)
        } else {
            Body::Script(body.join("\n"))
        };
        if let (Some(Mode::Background(_)), Body::Console(c)) = (&mode, &body)
            && c.len() != 1
        {
            return Err(format!(
                "line {start}: a background console block has one command"
            ));
        }
        blocks.push(Block {
            line: start,
            mode: mode.unwrap_or(Mode::Run),
            body,
        });
    }
    Ok(blocks)
}

// ------------------------------------------------------------- matching

#[derive(Debug, PartialEq)]
enum Piece {
    Lit(String),
    Any,
    Digits,
    Hex,
}

fn squeeze(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An expected line as literal text and placeholders.
fn pieces(line: &str) -> Vec<Piece> {
    let hole = |rest: &str| {
        let holes = [
            ("...", Piece::Any),
            ("<time>", Piece::Any),
            ("<pid>", Piece::Digits),
            ("<n>", Piece::Digits),
            ("<hex>", Piece::Hex),
        ];
        holes.into_iter().find(|(name, _)| rest.starts_with(name))
    };
    let mut out = Vec::new();
    let mut lit = String::new();
    let line = squeeze(line);
    let mut rest = line.as_str();
    while let Some(c) = rest.chars().next() {
        let Some((name, piece)) = hole(rest) else {
            lit.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        };
        rest = &rest[name.len()..];
        if piece == Piece::Any {
            // The blanks around an elision are part of it.
            lit.truncate(lit.trim_end().len());
            rest = rest.trim_start();
        }
        if !lit.is_empty() {
            out.push(Piece::Lit(std::mem::take(&mut lit)));
        }
        out.push(piece);
    }
    if !lit.is_empty() {
        out.push(Piece::Lit(lit));
    }
    out
}

fn line_matches(p: &[Piece], s: &str) -> bool {
    let run = |ok: fn(char) -> bool| s.find(|c| !ok(c)).unwrap_or(s.len());
    match p.first() {
        None => s.is_empty(),
        Some(Piece::Lit(l)) => s
            .strip_prefix(l.as_str())
            .is_some_and(|r| line_matches(&p[1..], r)),
        Some(Piece::Any) => s
            .char_indices()
            .map(|(i, _)| i)
            .chain([s.len()])
            .any(|i| line_matches(&p[1..], &s[i..])),
        Some(Piece::Digits) => {
            (1..=run(|c| c.is_ascii_digit())).any(|n| line_matches(&p[1..], &s[n..]))
        }
        Some(Piece::Hex) => {
            (1..=run(|c| c.is_ascii_hexdigit())).any(|n| line_matches(&p[1..], &s[n..]))
        }
    }
}

fn lines_match(expected: &[String], actual: &[String]) -> bool {
    match expected.first() {
        None => actual.is_empty(),
        Some(e) if e.trim() == "..." => {
            (0..=actual.len()).any(|n| lines_match(&expected[1..], &actual[n..]))
        }
        Some(e) => actual.first().is_some_and(|a| {
            line_matches(&pieces(e), &squeeze(a)) && lines_match(&expected[1..], &actual[1..])
        }),
    }
}

fn trimmed_lines<S: AsRef<str>>(lines: impl IntoIterator<Item = S>) -> Vec<String> {
    let mut v: Vec<String> = lines
        .into_iter()
        .map(|l| l.as_ref().trim_end().to_string())
        .collect();
    while v.last().is_some_and(|l| l.is_empty()) {
        v.pop();
    }
    v
}

fn output_matches(expected: &[String], actual: &str) -> bool {
    lines_match(&trimmed_lines(expected), &trimmed_lines(actual.lines()))
}

// ------------------------------------------------------------- running

/// The functions the script's blocks are wrapped in: `__dt_begin ID` notes
/// that a block or command starts (and gives back the status of the one
/// before, for an `echo $?`), `__dt_end ID STATUS` keeps its status,
/// `__dt_first_line FILE VAR` waits for a line in FILE and sets VAR to it.
const PRELUDE: &str = r#"__dt_st=0
__dt_begin() { printf 'begin %s\n' "$1" >> "$__dt/progress"; return "$__dt_st"; }
__dt_end() { __dt_st=$2; printf '%s\n' "$2" > "$__dt/$1.status"; return "$2"; }
__dt_first_line() {
    for __dt_i in $(seq 200); do [ "$(wc -l < "$1")" -gt 0 ] && break; sleep 0.1; done
    [ "$(wc -l < "$1")" -gt 0 ] || { echo "doc-test: no line printed within 20 s" >&2; exit 1; }
    export "$2=$(head -n 1 "$1")"
}
"#;

/// The bash script of one document's runnable blocks (`k`: the block's
/// index, naming its files in `dir`).
fn script(blocks: &[(usize, &Block)], dir: &Path) -> String {
    let mut s = format!("__dt='{}'\n{PRELUDE}", dir.display());
    for (k, b) in blocks {
        let code = |t: &str| t.replace("cargo run --release --", "busvisor");
        let _ = writeln!(s, "# block {k}, line {}", b.line);
        match (&b.body, &b.mode) {
            (body, Mode::Background(var)) => {
                // A script's stdout alone (its first line may be wanted); a
                // transcript's both streams, as a terminal shows them.
                let (text, stderr) = match body {
                    Body::Script(t) => (format!("set -e\n{t}"), format!("\"$__dt/{k}.err\"")),
                    Body::Console(c) => (c[0].text.clone(), "&1".to_string()),
                };
                let _ = writeln!(
                    s,
                    "__dt_st=0; __dt_begin {k}\n( {}\n) >\"$__dt/{k}.out\" 2>{stderr} &",
                    code(&text)
                );
                match var {
                    Some(v) => {
                        let _ = writeln!(s, "__dt_first_line \"$__dt/{k}.out\" {v}");
                    }
                    None => s.push_str("sleep 1\n"),
                }
                let _ = writeln!(s, "__dt_end {k} 0");
            }
            (Body::Script(t), _) => {
                let _ = writeln!(
                    s,
                    "__dt_st=0; __dt_begin {k}\nset -e\n{}\nset +e\n__dt_end {k} 0",
                    code(t)
                );
            }
            (Body::Console(cmds), _) => {
                for (j, c) in cmds.iter().enumerate() {
                    let _ = writeln!(
                        s,
                        "__dt_begin {k}.{j}\n{{ {}\n}} >\"$__dt/{k}.{j}.out\" 2>&1\n__dt_end {k}.{j} $?",
                        code(&c.text)
                    );
                }
            }
        }
    }
    s.push_str("printf 'finished\\n' >> \"$__dt/progress\"\n");
    s
}

/// What the documents' runs found.
#[derive(Default)]
struct Outcome {
    ran: usize,
    compared: usize,
    skipped: Vec<String>,
    failures: Vec<String>,
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn quoted(s: &str) -> String {
    s.lines().map(|l| format!("    | {l}\n")).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type().unwrap().is_dir() {
            if e.file_name() != "__pycache__" {
                copy_dir(&src, &dst);
            }
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// SIGTERM, by pid, every process of a document's session (the buses stop
/// their services), then SIGKILL what is left after 5 s.
fn stop_all(mark: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut signalled = std::collections::BTreeSet::new();
    loop {
        let pids = busvisor::supervision::procs::with_env_var(TEST_MARK_VAR, mark);
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in pids {
            if signalled.insert(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_marked(mark);
}

/// A document's session: its directory (`capture/` for what the script
/// records, `home/`, `run/`, `work/` where it runs, `bin/busvisor`).
struct Session {
    tmp: tempfile::TempDir,
    mark: String,
}

impl Session {
    fn new(root: &Path, name: &str) -> Session {
        let tmp = tempfile::Builder::new()
            .prefix("busvisor-docs-")
            .tempdir()
            .unwrap();
        for d in ["capture", "home", "run", "work", "bin"] {
            std::fs::create_dir(tmp.path().join(d)).unwrap();
        }
        std::fs::set_permissions(
            tmp.path().join("run"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        std::os::unix::fs::symlink(busvisor_bin(), tmp.path().join("bin/busvisor")).unwrap();
        for c in COPIED {
            copy_dir(&root.join(c), &tmp.path().join("work").join(c));
        }
        let mark = format!("docs-{}-{name}", std::process::id());
        Session { tmp, mark }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    /// bash on the script, as a reader's shell: a clean environment but
    /// for the tools' own variables, stdin a pipe kept open until the end.
    fn shell(&self, script: &str) -> std::process::Child {
        std::fs::write(self.path("session.sh"), script).unwrap();
        let log = std::fs::File::create(self.path("session.log")).unwrap();
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("bash");
        cmd.arg(self.path("session.sh"))
            .current_dir(self.path("work"));
        for (k, _) in std::env::vars() {
            let theirs = ["DBUS_", "XDG_", "BUSVISOR_"]
                .iter()
                .any(|p| k.starts_with(p));
            let shell = ["DISPLAY", "WAYLAND_DISPLAY", "BASH_ENV", "ENV", "CDPATH"];
            if theirs || shell.contains(&k.as_str()) || k == "RUST_LOG" || k == "NO_COLOR" {
                cmd.env_remove(&k);
            }
        }
        let nobus = format!("unix:path={}", self.path("no-system-bus").display());
        cmd.env("PATH", path)
            .env("HOME", self.path("home"))
            .env("XDG_RUNTIME_DIR", self.path("run"))
            .env("DBUS_SYSTEM_BUS_ADDRESS", nobus)
            .env(TEST_MARK_VAR, &self.mark)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        cmd.spawn().expect("bash")
    }
}

/// Run a document's blocks in one session and check what they printed.
fn run_doc(root: &Path, name: &str, blocks: &[Block], out: &mut Outcome) {
    let is_root = nix::unistd::geteuid().is_root();
    let mut run: Vec<(usize, &Block)> = Vec::new();
    for (k, b) in blocks.iter().enumerate() {
        match &b.mode {
            Mode::Skip(why) => out.skipped.push(format!("{name}:{}: {why}", b.line)),
            Mode::Root if !is_root => out
                .skipped
                .push(format!("{name}:{}: needs root (doc-test: root)", b.line)),
            _ => run.push((k, b)),
        }
    }
    if run.is_empty() {
        return;
    }
    let session = Session::new(root, name);
    let cap = session.path("capture");
    let started = Instant::now();
    let mut child = session.shell(&script(&run, &cap));
    let stdin = child.stdin.take();
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if started.elapsed() > DOC_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Background blocks: what they print may still be on its way, and what
    // they print when everything is stopped below is not theirs to show.
    for (k, b) in &run {
        if let (Body::Console(cmds), Mode::Background(_)) = (&b.body, &b.mode) {
            let file = cap.join(format!("{k}.out"));
            let deadline = Instant::now() + BACKGROUND_SETTLE;
            while !output_matches(&cmds[0].expected, &read(&file)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::fs::write(cap.join(format!("{k}.seen")), read(&file)).unwrap();
        }
    }
    drop(stdin);
    stop_all(&session.mark);
    println!(
        "{name}: {} blocks run in {:.1?}",
        run.len(),
        started.elapsed()
    );

    for (k, b) in &run {
        out.ran += 1;
        if let Body::Console(cmds) = &b.body {
            check_transcript(name, *k, b, cmds, &cap, out);
        }
    }
    let progress = read(&cap.join("progress"));
    if !progress.lines().any(|l| l == "finished") {
        let last = progress
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("begin "));
        let k: usize = last
            .and_then(|l| l.split('.').next()?.parse().ok())
            .unwrap_or(0);
        let how = match status {
            None => format!("did not finish within {DOC_TIMEOUT:?}"),
            Some(st) => format!("ended the session ({st})"),
        };
        let log = read(&session.path("session.log"));
        let lines: Vec<&str> = log.lines().collect();
        out.failures.push(format!(
            "{name}:{}: the block {how}; later blocks did not run. The session's last output:\n{}",
            blocks.get(k).map_or(0, |b| b.line),
            quoted(&lines[lines.len().saturating_sub(30)..].join("\n"))
        ));
    }
    if std::env::var_os("BUSVISOR_DOC_TEST_KEEP").is_some() {
        println!("  its session: {}", session.tmp.keep().display());
    }
}

/// Each command of a transcript that ran: its output as shown, and its
/// status if it shows none.
fn check_transcript(name: &str, k: usize, b: &Block, cmds: &[Cmd], cap: &Path, out: &mut Outcome) {
    let background = matches!(b.mode, Mode::Background(_));
    for (j, c) in cmds.iter().enumerate() {
        let id = if background {
            k.to_string()
        } else {
            format!("{k}.{j}")
        };
        let Ok(status) = std::fs::read_to_string(cap.join(format!("{id}.status"))) else {
            continue; // never reached: the session's failure says why
        };
        out.compared += 1;
        let printed = read(&cap.join(format!("{id}.{}", if background { "seen" } else { "out" })));
        let code: i32 = status.trim().parse().unwrap_or(-1);
        let shows_status = cmds.get(j + 1).is_some_and(|n| n.text.trim() == "echo $?");
        let why = if !output_matches(&c.expected, &printed) {
            "its output differs from the document's".to_string()
        } else if code != 0 && c.expected.is_empty() && !shows_status {
            format!(
                "it exited with status {code}; a command that fails shows its output or its status (echo $?)"
            )
        } else {
            continue;
        };
        out.failures.push(format!(
            "{name}:{}: `{}`: {why}\n  shown:\n{}  printed:\n{}",
            c.line,
            c.text,
            quoted(&c.expected.join("\n")),
            quoted(&printed)
        ));
    }
}

fn documents(root: &Path) -> Vec<(String, PathBuf)> {
    let mut docs = vec![("README.md".to_string(), root.join("README.md"))];
    let mut more: Vec<_> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    more.sort();
    for p in more {
        docs.push((
            format!("docs/{}", p.file_name().unwrap().to_string_lossy()),
            p,
        ));
    }
    docs
}

#[test]
fn every_shell_example_of_the_docs_runs_and_prints_what_it_shows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Outcome::default();
    let only = std::env::var("BUSVISOR_DOC_TEST").unwrap_or_default();
    for (name, path) in documents(root) {
        if !name.contains(&only) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        match parse(&text) {
            Ok(blocks) => run_doc(root, &name, &blocks, &mut out),
            Err(e) => out.failures.push(format!("{name}: {e}")),
        }
    }
    println!(
        "{} blocks run, {} commands' output compared, {} blocks skipped:",
        out.ran,
        out.compared,
        out.skipped.len()
    );
    for s in &out.skipped {
        println!("  skipped {s}");
    }
    assert!(
        out.failures.is_empty(),
        "{} doc examples failed:\n\n{}",
        out.failures.len(),
        out.failures.join("\n\n")
    );
}

// ------------------------------------------------------------- the harness's own tests

#[test]
fn placeholders_match_what_varies_and_nothing_else() {
    let m = |e: &str, a: &str| line_matches(&pieces(e), &squeeze(a));
    assert!(m("echo  running  <pid>  org.x", "echo running 16812 org.x"));
    assert!(!m("echo running <pid> org.x", "echo running - org.x"));
    assert!(m("3 services listed. ...", "3 services listed."));
    assert!(m(
        "3 services listed. ...",
        "3 services listed. 9 inactive ..."
    ));
    assert!(!m("3 services listed. ...", "2 services listed."));
    assert!(m(
        "Loaded: .../services.d/echo.toml (x)",
        "Loaded: /tmp/a/services.d/echo.toml (x)"
    ));
    assert!(!m(
        "Loaded: /.../services.d/echo.toml",
        "Loaded: services.d/echo.toml"
    ));
    assert!(m("guid=<hex>", "guid=f6eeb123bb854af1888b811345af7ee0"));
    assert!(!m("guid=<hex>", "guid="));
    assert!(m(
        "{'State': <'stopping'>, ...}",
        "{'State': <'stopping'>, 'Reason': <''>}"
    ));
    assert!(!m("failure=true", "failure=false"));
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert!(output_matches(&v(&["a", "...", "z"]), "a\nb\nc\nz\n\n"));
    assert!(output_matches(&v(&["a", "...", "z"]), "a\nz"));
    assert!(!output_matches(&v(&["a", "z"]), "a\nb\nz"));
    assert!(!output_matches(&v(&[]), "something"));
}

#[test]
fn transcripts_and_annotations_parse() {
    let doc = "<!-- doc-test: background A -->\n```sh\nbusvisor daemon\n```\n\n\
               ```console\n$ a \\\n  b\nout 1\n$ echo $?\n0\n```\n\
               <!-- doc-test: skip: needs a display -->\n```sh\nx\n```\n```text\n$ not run\n```\n";
    let b = parse(doc).unwrap();
    assert_eq!(b.len(), 3);
    assert_eq!(b[0].mode, Mode::Background(Some("A".into())));
    let Body::Console(c) = &b[1].body else {
        panic!("console")
    };
    assert_eq!(
        (c[0].text.as_str(), c[0].expected.clone()),
        ("a \\\n  b", vec!["out 1".to_string()])
    );
    assert_eq!((c[0].line, c[1].line), (7, 10));
    let c = transcript(1, &["$ sh -c '", "> echo a", "> echo b'", "a", "> b"]).unwrap();
    assert_eq!(c[0].text, "sh -c '\necho a\necho b'");
    assert_eq!(c[0].expected, ["a", "> b"]);
    assert_eq!(b[2].mode, Mode::Skip("needs a display".into()));
    assert!(parse("```\n$ busvisor list\n```\n").is_err());
    assert!(parse("<!-- doc-test: skip -->\n```sh\nx\n```\n").is_err());
    assert!(parse("<!-- doc-test: sikp: x -->\n```sh\nx\n```\n").is_err());
    assert!(parse("<!-- doc-test: root -->\ntext\n```sh\nx\n```\n").is_err());
}
