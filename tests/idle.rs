//! What an idle bus costs: with 100 service definitions loaded and no
//! traffic, busvisor uses no measurable CPU. Its utime + stime (all threads,
//! /proc/PID/stat) over a 60 s window without clients must stay within
//! 20 ms: two ticks at the usual CLK_TCK of 100, room for a stray wake-up
//! but not for a periodic timer that does work.
//!
//! The two tests measure at the same time (cargo runs them on parallel
//! threads), so the file costs one window of wall time. busvisor's own
//! contract: dbus-daemon has no TOML services directory, so both are skipped
//! with BUSVISOR_TEST_REFERENCE=1. The figures are printed with
//! `--nocapture` ("measured: ...").

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const DEFINITIONS: usize = 100;
const WINDOW: Duration = Duration::from_secs(60);
const BUDGET: Duration = Duration::from_millis(20);
/// After the last client is gone, before the window starts.
const SETTLE: Duration = Duration::from_secs(1);

fn service_name(i: usize) -> String {
    format!("org.busvisor.Idle.S{i:03}")
}

/// The one service the second test starts: restart = "always", and an
/// idle_timeout well beyond the window, so it stays up, idle, throughout.
const RUNNING: usize = 0;

/// 100 definitions of testsvc.py in `dir`, a mix of restart policies, idle
/// timeouts (all longer than the window), start limits and stop settings:
/// whatever per-service timers the bus keeps, they are there.
fn write_definitions(dir: &Path) {
    let script = format!("{FIXTURES}/testsvc.py");
    for i in 0..DEFINITIONS {
        let name = service_name(i);
        let policy = match i % 4 {
            0 => "restart = \"always\"\nrestart_delay = \"1s\"\nidle_timeout = \"10m\"".to_owned(),
            1 => format!(
                "restart = \"on-failure\"\nidle_timeout = \"{}s\"\n\
                 start_limit = {{ burst = 3, interval = \"10s\" }}",
                90 + i
            ),
            2 => "restart = \"no\"\nidle_timeout = \"5m\"\nstop_timeout = \"2s\"".to_owned(),
            _ => String::new(),
        };
        std::fs::write(
            dir.join(format!("idle{i:03}.toml")),
            format!("name = {name:?}\nexec = [\"python3\", {script:?}, {name:?}]\n{policy}\n"),
        )
        .unwrap();
    }
}

/// busvisor at its default log level with the 100 definitions; on drop the
/// bus and every service it started are killed by pid.
struct IdleBus {
    bus: TestBus,
    _services: tempfile::TempDir,
}

impl IdleBus {
    /// Started, with every definition listed by ListActivatableNames.
    async fn start() -> IdleBus {
        let services = tempfile::Builder::new()
            .prefix("busvisor-idle")
            .tempdir()
            .unwrap();
        write_definitions(services.path());
        let bus = start_bus_with_env(
            None,
            &["--services-dir", services.path().to_str().unwrap()],
            &[("RUST_LOG", "info")],
        );
        let b = IdleBus {
            bus,
            _services: services,
        };
        let conn = connect(&b.bus.address).await;
        let started = Instant::now();
        loop {
            let names: Vec<String> = bus_ok(&conn, "ListActivatableNames", &()).await;
            let ours = names
                .iter()
                .filter(|n| n.starts_with("org.busvisor.Idle."))
                .count();
            if ours == DEFINITIONS {
                break;
            }
            assert!(
                started.elapsed() < OP_TIMEOUT,
                "{ours} of {DEFINITIONS} definitions listed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        within(conn.close()).await.unwrap();
        b
    }

    /// The bus's CPU time over [`WINDOW`], after [`SETTLE`], with no client
    /// connected: (time, ticks).
    async fn cpu_over_window(&mut self) -> (Duration, u64) {
        tokio::time::sleep(SETTLE).await;
        let pid = self.bus.pid();
        let t0 = cpu_ticks(pid).expect("bus /proc/PID/stat");
        tokio::time::sleep(WINDOW).await;
        let t1 = cpu_ticks(pid).expect("bus /proc/PID/stat");
        self.bus.assert_alive();
        let ticks = t1 - t0;
        (
            Duration::from_nanos(ticks * 1_000_000_000 / clk_tck()),
            ticks,
        )
    }
}

impl Drop for IdleBus {
    fn drop(&mut self) {
        kill_bus_and_services(&mut self.bus);
    }
}

#[track_caller]
fn assert_within_budget(what: &str, (used, ticks): (Duration, u64)) {
    eprintln!(
        "measured: {what}: {:.1} ms of CPU ({ticks} ticks at {} Hz) over {WINDOW:?}",
        used.as_secs_f64() * 1e3,
        clk_tck()
    );
    assert!(
        used <= BUDGET,
        "{what}: busvisor used {used:?} of CPU over {WINDOW:?} with no traffic (budget {BUDGET:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cpu_with_100_definitions_and_no_traffic() {
    if is_reference() {
        return;
    }
    let mut b = IdleBus::start().await;
    let cpu = b.cpu_over_window().await;
    assert_within_budget("100 definitions, nothing running", cpu);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cpu_with_an_idle_running_service() {
    if is_reference() {
        return;
    }
    let mut b = IdleBus::start().await;
    let name = service_name(RUNNING);
    let conn = connect(&b.bus.address).await;
    let pid = call_pid(&conn, &name).await;
    within(conn.close()).await.unwrap();
    let cpu = b.cpu_over_window().await;
    // It was there, idle, for the whole window.
    assert!(
        pid_alive(pid),
        "{name} (pid {pid}) stopped during the window"
    );
    assert_within_budget("100 definitions, one service running idle", cpu);
}
