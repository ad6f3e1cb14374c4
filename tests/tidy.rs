//! The architecture's invariants that source text can show, checked on
//! `src/` as text (in the spirit of rust-analyzer's `tidy.rs`). See
//! docs/ARCHITECTURE.md, "Invariants".

use std::path::{Path, PathBuf};

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// A file's code without its unit tests, comments and string contents.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .map(|l| match l.trim_start().starts_with("//") {
            true => "",
            false => l,
        })
        .map(blank_strings)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `"..."` and `'x'` literals emptied, so their braces and words do not count.
fn blank_strings(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        match (in_str, c) {
            (true, '\\') => {
                chars.next();
            }
            (true, '"') => {
                in_str = false;
                out.push('"');
            }
            (true, _) => {}
            (false, '"') => {
                in_str = true;
                out.push('"');
            }
            (false, '\'') if matches!(chars.clone().nth(1), Some('\'')) => {
                chars.next();
                chars.next();
                out.push_str("' '");
            }
            (false, _) => out.push(c),
        }
    }
    out
}

fn rel(p: &Path) -> String {
    p.strip_prefix(src())
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn offenders(files: &[PathBuf], words: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for f in files {
        let code = code(f);
        for (n, line) in code.lines().enumerate() {
            for w in words {
                if line.contains(w) {
                    found.push(format!("{}:{}: {w}", rel(f), n + 1));
                }
            }
        }
    }
    found
}

#[test]
fn the_bus_core_never_names_the_supervisor() {
    let bus = sources(&src().join("bus"));
    assert!(bus.len() >= 8, "src/bus/ moved? {bus:?}");
    let names = [
        "crate::supervision",
        "crate::activation",
        "crate::lifecycle",
        "crate::daemon",
        "crate::transport",
        "crate::client",
        "crate::cli",
    ];
    let found = offenders(&bus, &names);
    assert!(
        found.is_empty(),
        "the bus core names the other part:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_bus_core_spawns_no_task_and_reads_no_file() {
    let bus = sources(&src().join("bus"));
    let words = [
        "tokio::spawn",
        "spawn_blocking",
        "std::thread",
        "std::fs",
        "File::",
    ];
    let found = offenders(&bus, &words);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn zbus_only_behind_the_wire() {
    let allowed = |f: &Path| {
        let r = rel(f);
        // fuzzing.rs checks what the wire decodes, with zbus's own decoder.
        r.starts_with("wire/")
            || r.starts_with("transport/")
            || r == "client.rs"
            || r == "fuzzing.rs"
    };
    let files: Vec<PathBuf> = sources(&src())
        .into_iter()
        .filter(|f| !allowed(f))
        .collect();
    let found = offenders(&files, &["zbus::"]);
    assert!(
        found.is_empty(),
        "zbus outside wire/, transport/, client.rs and fuzzing.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn service_state_changes_only_in_service_rs() {
    let files: Vec<PathBuf> = sources(&src())
        .into_iter()
        .filter(|f| rel(f) != "supervision/service.rs")
        .collect();
    let found = offenders(&files, &["set_state(", ".state = "]);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn lifecycle_signals_are_built_only_in_lifecycle_rs() {
    let files: Vec<PathBuf> = sources(&src())
        .into_iter()
        .filter(|f| {
            !["supervision/lifecycle.rs", "wire/names.rs", "client.rs"].contains(&rel(f).as_str())
        })
        .collect();
    // The events' path and interface together make a lifecycle signal.
    let found = offenders(
        &files,
        &["SUPERVISOR_PATH, SUPERVISOR_IFACE", "Announcer {"],
    );
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// `fn` items of the core longer than `max` lines.
fn long_functions(files: &[PathBuf], max: usize) -> Vec<String> {
    let mut found = Vec::new();
    for f in files {
        let code = code(f);
        let lines: Vec<&str> = code.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let l = lines[i].trim_start();
            let is_fn = l.starts_with("fn ")
                || l.starts_with("pub fn ")
                || l.starts_with("pub(crate) fn ")
                || l.starts_with("pub(super) fn ")
                || l.starts_with("async fn ")
                || l.starts_with("const fn ");
            if !is_fn {
                i += 1;
                continue;
            }
            let (mut depth, mut opened, mut j) = (0i32, false, i);
            while j < lines.len() {
                for c in lines[j].chars() {
                    match c {
                        '{' => {
                            depth += 1;
                            opened = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                if (opened && depth == 0) || (!opened && lines[j].trim_end().ends_with(';')) {
                    break;
                }
                j += 1;
            }
            if j + 1 - i > max {
                found.push(format!("{}:{}: {} lines", rel(f), i + 1, j + 1 - i));
            }
            i = j + 1;
        }
    }
    found
}

#[test]
fn no_long_functions_in_the_core() {
    let mut core = sources(&src().join("bus"));
    core.extend(sources(&src().join("supervision")));
    core.push(src().join("activation/catalog.rs"));
    let found = long_functions(&core, 80);
    assert!(
        found.is_empty(),
        "functions over 80 lines:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_look_for() {
    // The scanner itself: a planted offender is found, a comment or string is not.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.rs");
    std::fs::write(
        &f,
        "// zbus::x in a comment\nfn a() {\n    let s = \"zbus::y {\";\n    zbus::z();\n}\n",
    )
    .unwrap();
    let code = code(&f);
    assert_eq!(code.matches("zbus::").count(), 1, "{code}");
    assert!(code.contains("\"\""), "{code}");
}
