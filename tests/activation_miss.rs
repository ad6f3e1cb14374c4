//! Messages to names that no loaded definition provides. dbus-daemon reads
//! its service directories again when a lookup misses (activation.c), so a
//! `.service` file added to a directory that is not watched still activates
//! on the first call; and a flood of calls to unknown names gets its
//! ServiceUnknown errors without holding up anyone else.
//!
//! The unwatched directory is `$XDG_RUNTIME_DIR/dbus-1/services` of the
//! standard session service directories (dbus-daemon does not watch it, nor
//! does busvisor: see src/daemon.rs). Both buses read it with their default
//! session configuration, so these tests run against dbus-daemon too
//! (BUSVISOR_TEST_REFERENCE=1).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const TESTSVC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/testsvc.py");
const SERVICE_UNKNOWN: &str = "org.freedesktop.DBus.Error.ServiceUnknown";

/// A bus with its default session configuration and a private
/// `$XDG_RUNTIME_DIR`, whose `dbus-1/services` exists (empty) from the start.
struct RuntimeDirBus {
    bus: TestBus,
    services: PathBuf,
    _runtime: tempfile::TempDir,
}

impl RuntimeDirBus {
    fn start() -> RuntimeDirBus {
        let runtime = tempfile::Builder::new()
            .prefix("busvisor-runtime")
            .tempdir()
            .unwrap();
        let services = runtime.path().join("dbus-1/services");
        std::fs::create_dir_all(&services).unwrap();
        let bus = start_bus_with_env(
            None,
            &[],
            &[("XDG_RUNTIME_DIR", runtime.path().to_str().unwrap())],
        );
        RuntimeDirBus {
            bus,
            services,
            _runtime: runtime,
        }
    }
}

impl Drop for RuntimeDirBus {
    fn drop(&mut self) {
        kill_bus_and_services(&mut self.bus);
    }
}

/// `<dir>/<name>.service` running testsvc.py for `name` (the runtime
/// directory wants the file named after the bus name).
fn write_service_file(dir: &Path, name: &str) {
    std::fs::write(
        dir.join(format!("{name}.service")),
        format!(
            "[D-BUS Service]\nName={name}\nExec={} {TESTSVC} {name}\n",
            which("python3")
        ),
    )
    .unwrap();
}

/// A definition written after the bus started, into a directory nobody
/// watches: the first call finds it (the miss reads the directories again)
/// and is answered by the service, without ReloadConfig.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_added_to_an_unwatched_dir_activates_on_the_first_call() {
    let b = RuntimeDirBus::start();
    let conn = connect(&b.bus.address).await;
    let name = "org.busvisor.Unwatched";
    let names: Vec<String> = bus_ok(&conn, "ListActivatableNames", &()).await;
    assert!(!names.iter().any(|n| n == name), "{names:?}");
    // Past any margin a bus keeps for coarse directory timestamps.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    write_service_file(&b.services, name);
    let t = Instant::now();
    let pid = call_pid(&conn, name).await;
    // dbus-daemon does not tag its services for kill_bus_and_services.
    let _service = PidGuard { pids: vec![pid] };
    eprintln!(
        "measured: first call to a new file in the unwatched dir answered in {:?}",
        t.elapsed()
    );
    assert!(pid_alive(pid));
    let names: Vec<String> = bus_ok(&conn, "ListActivatableNames", &()).await;
    assert!(names.iter().any(|n| n == name), "{names:?}");
}

/// 200 calls to distinct unknown names, all in flight at once, right after a
/// change to a service directory (so a bus that reads the directories on a
/// miss does so now): each gets ServiceUnknown, and another client's Ping
/// round trips with the bus stay under a second throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_calls_to_unknown_names_fails_fast_and_blocks_no_one() {
    const CALLS: usize = 200;
    let mut b = RuntimeDirBus::start();
    for i in 0..20 {
        write_service_file(&b.services, &format!("org.busvisor.Known{i}"));
    }
    let caller = connect(&b.bus.address).await;
    let pinger = connect(&b.bus.address).await;
    sync(&caller).await;

    let burst_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pings = {
        let done = burst_done.clone();
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || n < 5 {
                let t = Instant::now();
                within_t(Duration::from_secs(1), sync(&pinger)).await;
                slowest = slowest.max(t.elapsed());
                n += 1;
            }
            (n, slowest)
        })
    };

    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let c = caller.clone();
        calls.spawn(async move {
            let name = format!("org.busvisor.Unknown.N{i}");
            match call(&c, &name, "Pid").await {
                Ok(m) => panic!("call to {name} answered: {m:?}"),
                Err(e) => (name, err_name(&e), started.elapsed()),
            }
        });
    }
    let mut last = Duration::ZERO;
    let mut answered = 0;
    while let Some(r) = calls.join_next().await {
        let (name, err, at) = r.unwrap();
        assert_eq!(err, SERVICE_UNKNOWN, "call to {name}");
        last = last.max(at);
        answered += 1;
    }
    burst_done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n_pings, slowest) = within(pings).await.unwrap();
    let scans = if is_reference() {
        String::new()
    } else {
        let n = b.bus.log().matches("service definitions loaded").count();
        format!("; {n} definition scans")
    };
    eprintln!(
        "measured: {answered} ServiceUnknown errors, the last after {last:?}; \
         {n_pings} pings meanwhile, slowest {slowest:?}{scans}"
    );
    assert_eq!(answered, CALLS);
    assert!(last < Duration::from_secs(5), "the burst took {last:?}");
    assert!(slowest < Duration::from_secs(1), "a Ping took {slowest:?}");
    b.bus.assert_alive();
}
