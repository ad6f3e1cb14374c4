//! `--systemd-activation` end to end: the real busvisor binary, a fake
//! systemd (a zbus client that owns org.freedesktop.systemd1 and answers
//! ActivationRequest signals), real callers, and a real dbus-monitor.
//!
//! With BUSVISOR_TEST_REFERENCE=1 the same expectations are checked against
//! dbus-daemon (busvisor's own lifecycle events excepted).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const SYSTEMD: &str = "org.freedesktop.systemd1";
const ACTIVATOR: &str = "org.freedesktop.systemd1.Activator";

/// A bus with `--systemd-activation` whose service directory holds one
/// definition per name, each handed to systemd as `dbus-NAME.service`.
struct SdBus {
    bus: TestBus,
    _services: tempfile::TempDir,
}

fn systemd_bus(names: &[&str]) -> SdBus {
    let services = tempfile::Builder::new()
        .prefix("busvisor-sd")
        .tempdir()
        .expect("tempdir");
    for name in names {
        write_service(services.path(), name, "/bin/false");
    }
    // Long enough that an answer within it cannot be the start timeout.
    let extra = format!(
        "  <servicedir>{}</servicedir>\n  <limit name=\"service_start_timeout\">120000</limit>\n",
        services.path().display()
    );
    let bus = start_bus_with_args(
        Some(&config_with(ALLOW_ALL_RULES, &extra)),
        &["--systemd-activation"],
    );
    SdBus {
        bus,
        _services: services,
    }
}

fn write_service(dir: &Path, name: &str, exec: &str) {
    let text =
        format!("[D-BUS Service]\nName={name}\nExec={exec}\nSystemdService=dbus-{name}.service\n");
    std::fs::write(dir.join(format!("{name}.service")), text).expect("write service");
}

fn unit_of(name: &str) -> String {
    format!("dbus-{name}.service")
}

/// A unicast signal to `dest`, which starts it if need be.
async fn poke(conn: &zbus::Connection, dest: &str, member: &str) {
    within(conn.emit_signal(Some(dest), "/foo", "com.example.bar", member, &()))
        .await
        .expect("emit");
}

/// Take `name` as `conn`.
async fn take(conn: &zbus::Connection, name: &str) {
    let r: u32 = bus_ok(conn, "RequestName", &(name, 0u32)).await;
    assert_eq!(r, 1, "RequestName {name}");
}

/// The unit of the next ActivationRequest on systemd's stream.
async fn next_request(s: &mut zbus::MessageStream) -> String {
    let m = next_matching(s, OP_TIMEOUT, |m| is_signal(m, "ActivationRequest"))
        .await
        .expect("no ActivationRequest reached systemd");
    let h = m.header();
    assert_eq!(sender(&m), BUS);
    assert_eq!(h.path().map(|p| p.as_str()), Some(BUS_PATH));
    assert_eq!(h.interface().map(|i| i.as_str()), Some(ACTIVATOR));
    m.body().deserialize().expect("ActivationRequest body")
}

/// systemd's answer that it could not start `unit`.
async fn fail_unit(conn: &zbus::Connection, unit: &str, error: &str, text: &str) {
    within(conn.emit_signal(
        Some(BUS),
        "/org/freedesktop/systemd1",
        ACTIVATOR,
        "ActivationFailure",
        &(unit, error, text),
    ))
    .await
    .expect("emit ActivationFailure");
}

/// A dbus-monitor's output, one entry per message: "signal Member",
/// "method call Member", "method return", "error Name".
fn monitored(out: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let field = |line: &str, key: &str| {
        line.split([' ', ';'])
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or("")
            .to_owned()
    };
    text.lines()
        .filter_map(|l| {
            let kind = ["signal", "method call", "method return", "error"]
                .into_iter()
                .find(|k| l.starts_with(&format!("{k} time=")))?;
            Some(match kind {
                "method return" => kind.to_owned(),
                "error" => format!("error {}", field(l, "error_name=")),
                _ => format!("{kind} {}", field(l, "member=")),
            })
        })
        .collect()
}

/// Start dbus-monitor (no rules: everything) and wait until it shows a
/// probe signal from `probe`.
async fn attach_monitor(
    bus: &TestBus,
    probe: &zbus::Connection,
) -> (ChildGuard, std::path::PathBuf) {
    let out = bus.dir.path().join("monitor.out");
    let mon = spawn_tool("dbus-monitor", &["--address", &bus.address], &out);
    for _ in 0..250 {
        within(probe.emit_signal(None::<&str>, "/probe", "org.busvisor.Probe", "Probe", &()))
            .await
            .expect("probe");
        tokio::time::sleep(Duration::from_millis(20)).await;
        if monitored(&out).iter().any(|m| m == "signal Probe") {
            return (mon, out);
        }
    }
    panic!("dbus-monitor never showed a signal; log:\n{}", bus.log());
}

/// What the monitor showed after its last probe, once it holds `n` entries.
fn monitored_after_probes(out: &Path, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    wait_until(OP_TIMEOUT, || {
        let all = monitored(out);
        let last = all
            .iter()
            .rposition(|m| m == "signal Probe")
            .map_or(0, |i| i + 1);
        seen = all[last..].to_vec();
        seen.len() >= n
    });
    seen
}

/// dbus's test-monitor /monitor/activation, with a real dbus-monitor: the
/// request to systemd before the message that caused it, then nothing of
/// the activation again but the connections and names of systemd and of the
/// service; the failed third start as an error to its sender, before the
/// ActivationFailure that caused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_sees_a_systemd_activation_as_dbus_daemon_shows_it() {
    let (one, two) = (
        "com.example.SystemdActivatable1",
        "com.example.SystemdActivatable2",
    );
    let SdBus { bus, .. } = &systemd_bus(&[one, two]);
    let sender = connect(&bus.address).await;
    let (_mon, out) = attach_monitor(bus, &sender).await;

    poke(&sender, one, "UnicastSignal1").await;
    let shown = monitored_after_probes(&out, 2);
    assert_eq!(shown, ["signal ActivationRequest", "signal UnicastSignal1"]);

    // systemd comes, takes its name and gets the request that waited.
    let systemd = connect(&bus.address).await;
    let mut requests = stream(&systemd);
    take(&systemd, SYSTEMD).await;
    assert_eq!(next_request(&mut requests).await, unit_of(one));
    // The service comes and gets the signal that waited.
    let service = connect(&bus.address).await;
    let mut delivered = stream(&service);
    take(&service, one).await;
    next_matching(&mut delivered, OP_TIMEOUT, |m| {
        is_signal(m, "UnicastSignal1")
    })
    .await
    .expect("the queued signal reached the service");

    // A second start, systemd already there: the same two, in that order.
    poke(&sender, two, "UnicastSignal2").await;
    assert_eq!(next_request(&mut requests).await, unit_of(two));
    fail_unit(
        &systemd,
        &unit_of(two),
        "com.example.Nope",
        "Computer says no",
    )
    .await;

    let connection = [
        "method call Hello",
        "method return",
        "signal NameOwnerChanged",
        "signal NameAcquired",
    ];
    let name = [
        "method call RequestName",
        "signal NameOwnerChanged",
        "signal NameAcquired",
        "method return",
    ];
    let mut want: Vec<&str> = vec!["signal ActivationRequest", "signal UnicastSignal1"];
    want.extend(connection); // systemd
    want.extend(name);
    want.extend(connection); // the service
    want.extend(name);
    want.extend([
        "signal ActivationRequest",
        "signal UnicastSignal2",
        // dbus-daemon answers even a signal whose activation failed.
        "error com.example.Nope",
        "signal ActivationFailure",
    ]);
    let shown = monitored_after_probes(&out, want.len());
    assert_eq!(shown, want, "log:\n{}", bus.log());
}

/// dbus's test-sd-activation /sd-activation/activation, and more: systemd's
/// ActivationFailure fails the waiting callers at once with its error;
/// the same signal from anyone else is ignored; the next message asks
/// systemd again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_failure_from_systemd_answers_the_callers_at_once() {
    let fails = "com.example.Fails";
    let SdBus { bus, .. } = &systemd_bus(&[fails]);
    let systemd = connect(&bus.address).await;
    let mut requests = stream(&systemd);
    take(&systemd, SYSTEMD).await;
    let caller = connect(&bus.address).await;
    let events = connect(&bus.address).await;
    let mut failed_events = stream(&events);
    if !is_reference() {
        add_match(
            &events,
            "type='signal',sender='org.busvisor.Supervisor1',member='Failed'",
        )
        .await;
    }

    let started = Instant::now();
    let call = tokio::spawn({
        let caller = caller.clone();
        async move {
            caller
                .call_method(Some(fails), "/", Some("com.example.I"), "Work", &())
                .await
        }
    });
    let start_by_name = tokio::spawn({
        let caller = caller.clone();
        async move {
            caller
                .call_method(
                    Some(BUS),
                    BUS_PATH,
                    Some(BUS),
                    "StartServiceByName",
                    &(fails, 0u32),
                )
                .await
        }
    });
    assert_eq!(next_request(&mut requests).await, unit_of(fails));

    // A connection that is not systemd cannot fail the start.
    let forger = connect(&bus.address).await;
    fail_unit(
        &forger,
        &unit_of(fails),
        "com.example.Malice",
        "I'm on yr bus",
    )
    .await;
    sync(&forger).await;
    sync(&caller).await;
    assert!(
        !call.is_finished() && !start_by_name.is_finished(),
        "a forged failure was believed"
    );

    fail_unit(
        &systemd,
        &unit_of(fails),
        "com.example.Nope",
        "Computer says no",
    )
    .await;
    for waiter in [call, start_by_name] {
        let e = within(waiter)
            .await
            .expect("join")
            .expect_err("the start failed");
        assert_eq!(err_name(&e), "com.example.Nope", "{e}");
        assert!(e.to_string().contains("Computer says no"), "{e}");
    }
    let took = started.elapsed();
    println!("measured: callers failed {took:?} after the request");
    assert!(
        took < Duration::from_secs(5),
        "answered after {took:?}, not at once"
    );
    if !is_reference() {
        let ev = next_matching(&mut failed_events, OP_TIMEOUT, |m| is_signal(m, "Failed"))
            .await
            .expect("a Failed event");
        let (_, id, reason): (u64, String, String) = ev.body().deserialize().unwrap();
        assert_eq!((id.as_str(), reason.as_str()), (fails, "systemd"));
    }

    // The failed start is over: the next message asks systemd again.
    poke(&caller, fails, "Again").await;
    assert_eq!(next_request(&mut requests).await, unit_of(fails));
}

/// An ActivationFailure is taken from the owner of systemd's name only with
/// `--systemd-activation`; without it the callers wait (here until their
/// start times out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_failure_without_systemd_activation_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = "com.example.Slow";
    // Started by the bus itself: a process that never takes its name.
    write_service(dir.path(), name, "/bin/sleep 30");
    let extra = format!(
        "  <servicedir>{}</servicedir>\n  <limit name=\"service_start_timeout\">1500</limit>\n",
        dir.path().display()
    );
    let bus = start_bus(Some(&config_with(ALLOW_ALL_RULES, &extra)));
    let systemd = connect(&bus.address).await;
    take(&systemd, SYSTEMD).await;
    let caller = connect(&bus.address).await;
    let call = tokio::spawn({
        let caller = caller.clone();
        async move {
            caller
                .call_method(Some(name), "/", Some("com.example.I"), "Work", &())
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    fail_unit(
        &systemd,
        &unit_of(name),
        "com.example.Nope",
        "Computer says no",
    )
    .await;
    let e = within(call)
        .await
        .expect("join")
        .expect_err("the start failed");
    assert_ne!(err_name(&e), "com.example.Nope", "{e}");
}
