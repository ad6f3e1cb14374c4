//! Replays every input of the fuzz corpora and every crash the fuzzers found
//! (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`) through the entry
//! points the fuzz targets call (`busvisor::fuzzing`), so that `cargo test`
//! keeps what the fuzzing proved (docs/FUZZING.md).

use std::path::{Path, PathBuf};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 6] = [
    ("message_reader", busvisor::fuzzing::message_reader),
    ("sasl", busvisor::fuzzing::sasl),
    ("match_rule", busvisor::fuzzing::match_rule),
    ("xml_config", busvisor::fuzzing::xml_config),
    ("service_file", busvisor::fuzzing::service_file),
    ("toml_files", busvisor::fuzzing::toml_files),
];

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `target` on each file; returns the names of those that panicked.
fn replay(target: Target, files: &[PathBuf]) -> Vec<String> {
    let mut failed = Vec::new();
    for f in files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if std::panic::catch_unwind(|| target(&data)).is_err() {
            failed.push(f.display().to_string());
        }
    }
    failed
}

fn run(name: &str) {
    let target = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a target")
        .1;
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = inputs(&fuzz.join("corpus").join(name));
    // An empty corpus would make this test pass without testing anything.
    assert!(
        !corpus.is_empty(),
        "no corpus for {name} in {}",
        fuzz.display()
    );
    let regressions = inputs(&fuzz.join("regressions").join(name));
    let mut failed = replay(target, &corpus);
    failed.extend(replay(target, &regressions));
    assert!(
        failed.is_empty(),
        "{name}: {} of {} inputs panicked:\n{}",
        failed.len(),
        corpus.len() + regressions.len(),
        failed.join("\n")
    );
}

#[test]
fn message_reader_corpus() {
    run("message_reader");
}

#[test]
fn sasl_corpus() {
    run("sasl");
}

#[test]
fn match_rule_corpus() {
    run("match_rule");
}

#[test]
fn xml_config_corpus() {
    run("xml_config");
}

#[test]
fn service_file_corpus() {
    run("service_file");
}

#[test]
fn toml_files_corpus() {
    run("toml_files");
}

/// Every target has its corpus directory, and no other directory is there:
/// a target added to fuzz/ without a replay here fails.
#[test]
fn every_target_is_replayed() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut targets: Vec<String> = std::fs::read_dir(fuzz.join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .map(|e| {
            let p = e.expect("an entry").path();
            p.file_stem().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    targets.sort();
    let mut known: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    known.sort();
    assert_eq!(targets, known);
}
