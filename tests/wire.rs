//! The wire under hostile or careless clients: memory and fds a peer can
//! make the bus hold, limits on what it reads, malformed and unusual
//! messages, fairness between peers, and the listening socket's path.
//! BUSVISOR_TEST_REFERENCE=1 runs them against dbus-daemon.

mod common;

use common::*;

#[test]
fn address_on_a_regular_file_is_refused_and_the_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let addr = format!("--address=unix:path={}", file.display());
    let daemon = if is_reference() {
        "dbus-daemon"
    } else {
        busvisor_bin()
    };
    let out = run_tool(
        daemon,
        &["--session", "--nofork", &addr, "--print-address"],
        OP_TIMEOUT,
    );
    assert!(!out.success(), "the bus started on a regular file: {out:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    if !is_reference() {
        assert!(
            out.stderr.contains(&file.display().to_string()) && out.stderr.contains("not a socket"),
            "unclear message: {:?}",
            out.stderr
        );
    }
}
