//! The lifecycle API over D-Bus with zbus: the signals of a full lifecycle
//! in order with their serials and pids, PropertiesChanged for each
//! transition, and Snapshot plus serial losing nothing under churn.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use zbus::message::{Message, Type};
use zbus::wire::OwnedVariant;

const SUP: &str = "org.busvisor.Supervisor1";
const SUP_PATH: &str = "/org/busvisor/Supervisor1";

fn examples() -> String {
    format!("{}/services.d", env!("CARGO_MANIFEST_DIR"))
}

async fn sup_call<B, R>(conn: &zbus::Connection, member: &str, body: &B) -> R
where
    B: serde::Serialize + zbus::wire::DynamicType,
    R: for<'d> serde::Deserialize<'d> + zbus::wire::Type,
{
    let m = within_t(
        Duration::from_secs(20),
        conn.call_method(Some(SUP), SUP_PATH, Some(SUP), member, body),
    )
    .await
    .unwrap_or_else(|e| panic!("{member}: {e}"));
    m.body().deserialize::<R>().expect("reply body")
}

/// A lifecycle event: (serial, member, id, the rest as text).
#[derive(Debug, Clone)]
struct Event {
    serial: u64,
    member: String,
    id: String,
    pid: u32,
}

fn event(m: &Message) -> Option<Event> {
    let h = m.header();
    if m.message_type() != Type::Signal || h.interface().map(|i| i.as_str()) != Some(SUP) {
        return None;
    }
    let member = h.member()?.as_str().to_owned();
    let body = m.body();
    let (serial, id, pid) = match member.as_str() {
        "Started" | "Ready" => {
            let (s, id, pid): (u64, String, u32) = body.deserialize().ok()?;
            (s, id, pid)
        }
        "Exited" => {
            let (s, id, pid, _how, _st, _f): (u64, String, u32, String, i32, bool) =
                body.deserialize().ok()?;
            (s, id, pid)
        }
        "ActivationRequested" => {
            let (s, id, _who, pid): (u64, String, String, u32) = body.deserialize().ok()?;
            (s, id, pid)
        }
        "Restarting" => {
            let (s, id, _a, _d): (u64, String, u32, u64) = body.deserialize().ok()?;
            (s, id, 0)
        }
        "Failed" => {
            let (s, id, _r): (u64, String, String) = body.deserialize().ok()?;
            (s, id, 0)
        }
        "Stopping" | "Stopped" | "IdleStopped" => {
            let (s, id): (u64, String) = body.deserialize().ok()?;
            (s, id, 0)
        }
        _ => return None,
    };
    Some(Event {
        serial,
        member,
        id,
        pid,
    })
}

/// Drain `s` until `pred` holds for an event, returning all events and
/// the State values announced by PropertiesChanged, in order.
async fn collect_until(
    s: &mut zbus::MessageStream,
    events: &mut Vec<Event>,
    states: &mut Vec<String>,
    mut pred: impl FnMut(&Event) -> bool,
) {
    use futures_util::StreamExt;
    let fut = async {
        while let Some(Ok(m)) = s.next().await {
            if let Some(e) = event(&m) {
                let done = pred(&e);
                events.push(e);
                if done {
                    return;
                }
            } else if m.header().member().map(|x| x.as_str()) == Some("PropertiesChanged")
                && m.header()
                    .path()
                    .is_some_and(|p| p.as_str().ends_with("/service/crasher"))
            {
                let (_, changed, _): (String, HashMap<String, OwnedVariant>, Vec<String>) =
                    m.body().deserialize().expect("PropertiesChanged body");
                if let Some(v) = changed.get("State") {
                    states.push(String::try_from(v.try_clone().unwrap()).unwrap());
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out; events so far: {events:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_signals_and_properties_in_order() {
    if is_reference() {
        return; // busvisor-only: lifecycle events are busvisor's own API
    }
    let dir = examples();
    let mut bus = start_bus_with_args(None, &["--services-dir", &dir]);
    let mut pids = PidGuard::default();
    let watcher = connect(&bus.address).await;
    let mut s = stream(&watcher);
    add_match(&watcher, "type='signal',sender='org.busvisor.Supervisor1'").await;
    let client = connect(&bus.address).await;
    let me = unique(&client);

    // Activation by a client call.
    let crasher = "org.busvisor.Example.Crasher";
    let path = "/org/busvisor/Example/Crasher";
    let pid1: u32 = within_t(
        Duration::from_secs(20),
        client.call_method(Some(crasher), path, Some(crasher), "Pid", &()),
    )
    .await
    .expect("Pid")
    .body()
    .deserialize()
    .unwrap();
    pids.add(pid1);
    let (mut events, mut states) = (Vec::new(), Vec::new());
    collect_until(&mut s, &mut events, &mut states, |e| e.member == "Ready").await;

    // A crash, then the restart.
    let _ = within(client.call_method(Some(crasher), path, Some(crasher), "Crash", &())).await;
    collect_until(&mut s, &mut events, &mut states, |e| e.member == "Ready").await;
    let pid2 = events.last().unwrap().pid;
    pids.add(pid2);
    assert_ne!(pid1, pid2, "the restart is a new process");

    // Stop through the API.
    sup_call::<_, ()>(&client, "Stop", &("crasher",)).await;
    collect_until(&mut s, &mut events, &mut states, |e| e.member == "Stopped").await;

    let crasher_events: Vec<&Event> = events.iter().filter(|e| e.id == "crasher").collect();
    let members: Vec<&str> = crasher_events.iter().map(|e| e.member.as_str()).collect();
    assert_eq!(
        members,
        [
            "ActivationRequested",
            "Started",
            "Ready",
            // The crash left nothing to stop: no Stopping.
            "Exited",
            "Stopped",
            "Restarting",
            "Started",
            "Ready",
            "Stopping",
            "Exited",
            "Stopped"
        ],
        "{events:?}"
    );
    // Serials increase by one from event to event.
    for w in events.windows(2) {
        assert_eq!(w[1].serial, w[0].serial + 1, "{events:?}");
    }
    // The pids are the real ones: the requester, the first and the second process.
    let requested = crasher_events[0];
    let client_pid = std::process::id();
    assert_eq!(requested.pid, client_pid, "requester pid");
    assert_eq!(crasher_events[1].pid, pid1);
    assert_eq!(crasher_events[2].pid, pid1);
    assert_eq!(crasher_events[3].pid, pid1);
    assert_eq!(crasher_events[6].pid, pid2);
    assert_eq!(crasher_events[9].pid, pid2);
    // PropertiesChanged followed every state of the lifecycle, in order.
    let mut expected = vec![
        "activating",
        "running",
        "restarting",
        "activating",
        "running",
        "stopping",
        "inactive",
    ];
    states.dedup();
    expected.dedup();
    assert_eq!(states, expected, "{states:?}");
    // And the Requester property names the client.
    let v = service_prop(&client, "crasher", "Restarts").await;
    assert_eq!(u32::try_from(v).unwrap(), 1);
    let _ = me;
    bus.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_events_lose_nothing_under_churn() {
    if is_reference() {
        return; // busvisor-only: lifecycle events are busvisor's own API
    }
    let dir = examples();
    let mut bus = start_bus_with_args(None, &["--services-dir", &dir]);
    let watcher = connect(&bus.address).await;
    let mut s = stream(&watcher);
    // Subscribe first, then take the snapshot.
    add_match(
        &watcher,
        "type='signal',sender='org.busvisor.Supervisor1',interface='org.busvisor.Supervisor1'",
    )
    .await;

    // Churn: restart two services over and over from another connection.
    let churner = connect(&bus.address).await;
    let churn = tokio::spawn(async move {
        for _ in 0..4 {
            for id in ["echo", "crasher"] {
                let _ = churner
                    .call_method(Some(SUP), SUP_PATH, Some(SUP), "Restart", &(id,))
                    .await;
            }
        }
    });
    // Take the snapshot in the middle of the churn: once its first event is in.
    next_matching(&mut s, Duration::from_secs(20), |m| event(m).is_some())
        .await
        .expect("the churn made an event");
    type Row = (
        String,
        Vec<String>,
        String,
        String,
        u32,
        zbus::wire::OwnedObjectPath,
    );
    let (first, _rows): (u64, Vec<Row>) = sup_call(&watcher, "Snapshot", &()).await;
    within_t(Duration::from_secs(60), churn).await.unwrap();
    let (last, rows): (u64, Vec<Row>) = sup_call(&watcher, "Snapshot", &()).await;
    assert!(last > first, "the churn made events ({first} -> {last})");

    // Every event after the first snapshot, up to the last, arrives once.
    let mut seen = Vec::new();
    let mut events = Vec::new();
    let mut states = Vec::new();
    if last > first {
        collect_until(&mut s, &mut events, &mut states, |e| e.serial >= last).await;
        seen.extend(events.iter().map(|e| e.serial).filter(|s| *s > first));
    }
    let want: Vec<u64> = (first + 1..=last).collect();
    assert_eq!(seen, want, "events after the snapshot");
    // The last snapshot agrees with the last events: both services run.
    for id in ["echo", "crasher"] {
        let row = rows.iter().find(|r| r.0 == id).expect("service listed");
        assert_eq!(row.2, "running", "{row:?}");
        let last_ready = events
            .iter()
            .rev()
            .find(|e| e.id == id && e.member == "Ready");
        assert_eq!(last_ready.map(|e| e.pid), Some(row.4), "{id}");
    }
    let mut pids = PidGuard::default();
    for r in &rows {
        if r.4 > 0 {
            pids.add(r.4);
        }
    }
    bus.assert_alive();
}

/// A bus whose services dir holds one definition of the test service
/// (tests/fixtures/testsvc.py) owning `name`, with `extra` settings; and a
/// stream of the signals matching `rule`.
async fn testsvc_bus(
    name: &str,
    extra: &str,
    rule: &str,
) -> (tempfile::TempDir, TestBus, zbus::MessageStream) {
    let tmp = tempfile::tempdir().unwrap();
    let script = format!("{}/tests/fixtures/testsvc.py", env!("CARGO_MANIFEST_DIR"));
    std::fs::write(
        tmp.path().join("svc.toml"),
        format!("name = \"{name}\"\nexec = [\"python3\", \"{script}\", \"{name}\"]\n{extra}"),
    )
    .unwrap();
    let bus = start_bus_with_args(None, &["--services-dir", tmp.path().to_str().unwrap()]);
    let watcher = connect(&bus.address).await;
    let s = stream(&watcher);
    add_match(&watcher, rule).await;
    (tmp, bus, s)
}

/// Make the test service owning `name` exit with `code` (it does not reply).
async fn exit_service(client: &zbus::Connection, name: &str, code: i32) {
    let r =
        within(client.call_method(Some(name), TEST_PATH, Some(TEST_IFACE), "Exit", &(code,))).await;
    assert!(r.is_err(), "Exit does not reply");
}

/// A Service1 property of service `id`.
async fn service_prop(client: &zbus::Connection, id: &str, name: &str) -> OwnedVariant {
    let m = within(client.call_method(
        Some(SUP),
        format!("/org/busvisor/Supervisor1/service/{id}").as_str(),
        Some("org.freedesktop.DBus.Properties"),
        "Get",
        &("org.busvisor.Service1", name),
    ))
    .await
    .unwrap_or_else(|e| panic!("Get {name}: {e}"));
    m.body().deserialize().unwrap()
}

/// A testsvc service that ran once and exited with status 3, and the
/// lifecycle events from its activation until `until` held.
struct Crashed {
    _tmp: tempfile::TempDir,
    bus: TestBus,
    signals: zbus::MessageStream,
    client: zbus::Connection,
    _pids: PidGuard,
    events: Vec<Event>,
    states: Vec<String>,
}

async fn crash_once(name: &str, definition: &str, until: impl Fn(&Event) -> bool) -> Crashed {
    let (_tmp, bus, mut signals) = testsvc_bus(
        name,
        definition,
        "type='signal',sender='org.busvisor.Supervisor1'",
    )
    .await;
    let client = connect(&bus.address).await;
    let mut pids = PidGuard::default();
    pids.add(call_pid(&client, name).await);
    exit_service(&client, name, 3).await;
    let (mut events, mut states) = (Vec::new(), Vec::new());
    collect_until(&mut signals, &mut events, &mut states, until).await;
    Crashed {
        _tmp,
        bus,
        signals,
        client,
        _pids: pids,
        events,
        states,
    }
}

/// A run that ends in failure with `restart = "no"` is announced: Exited
/// (a failure), Stopped, then Failed with reason `exited`, and the state
/// property reads `failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_without_restart_is_announced_as_failed() {
    if is_reference() {
        return; // busvisor-only: lifecycle events are busvisor's own API
    }
    let mut c = crash_once("org.busvisor.Once", "restart = \"no\"\n", |e| {
        e.member == "Failed"
    })
    .await;
    let events = &c.events;
    let members: Vec<&str> = events.iter().map(|e| e.member.as_str()).collect();
    assert_eq!(
        members,
        [
            "ActivationRequested",
            "Started",
            "Ready",
            "Exited",
            "Stopped",
            "Failed"
        ],
        "{events:?}"
    );
    let state = String::try_from(service_prop(&c.client, "svc", "State").await).unwrap();
    assert_eq!(state, "failed");
    c.bus.assert_alive();
}

/// A stop while a restart waits out its delay is announced (Stopped), so
/// that an events follower does not wait for a restart that will not come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_restart_delay_is_announced() {
    if is_reference() {
        return; // busvisor-only: lifecycle events are busvisor's own API
    }
    let mut c = crash_once(
        "org.busvisor.Again",
        "restart = \"always\"\nrestart_delay = \"30s\"\n",
        |e| e.member == "Restarting",
    )
    .await;
    sup_call::<_, ()>(&c.client, "Stop", &("svc",)).await;
    c.events.clear();
    collect_until(&mut c.signals, &mut c.events, &mut c.states, |e| {
        e.member == "Stopped"
    })
    .await;
    assert_eq!(c.events.len(), 1, "{:?}", c.events);
    c.bus.assert_alive();
}

/// The backoff as announced by Restarting's delay: it doubles per
/// consecutive failure, and a run longer than the start-limit interval (and
/// the delay cap) starts it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stable_run_resets_the_restart_backoff() {
    use futures_util::StreamExt;
    if is_reference() {
        return; // busvisor-only: lifecycle events are busvisor's own API
    }
    let (_tmp, mut bus, mut s) = testsvc_bus(
        "org.busvisor.B",
        "restart = \"on-failure\"\nrestart_delay = \"100ms\"\nrestart_delay_max = \"400ms\"\n\
         start_limit = { burst = 10, interval = \"1s\" }\n",
        "type='signal',sender='org.busvisor.Supervisor1',member='Restarting'",
    )
    .await;
    let client = connect(&bus.address).await;
    let mut pids = PidGuard::default();
    let mut delays = Vec::new();
    for pause in [0u64, 0, 1500] {
        pids.add(call_pid(&client, "org.busvisor.B").await);
        // The run must last that long: the rule is about its length.
        tokio::time::sleep(Duration::from_millis(pause)).await;
        exit_service(&client, "org.busvisor.B", 1).await;
        let m = within(async {
            loop {
                let m = s.next().await.expect("signal stream").expect("message");
                if m.header().member().map(|x| x.as_str()) == Some("Restarting") {
                    return m;
                }
            }
        })
        .await;
        let (_, _, _, delay_ms): (u64, String, u32, u64) = m.body().deserialize().unwrap();
        delays.push(delay_ms);
    }
    assert_eq!(
        delays,
        [100, 200, 100],
        "the third run lasted 1.5 s: backoff starts over"
    );
    bus.assert_alive();
}
