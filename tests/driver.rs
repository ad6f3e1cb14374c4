//! The bus driver (org.freedesktop.DBus and friends), driven by zbus clients
//! and the real command-line tools.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use zbus::message::Type;
use zbus::wire::OwnedVariant;

const PRIMARY_OWNER: u32 = 1;
const IN_QUEUE: u32 = 2;
const EXISTS: u32 = 3;
const ALREADY_OWNER: u32 = 4;
const RELEASED: u32 = 1;
const NON_EXISTENT: u32 = 2;
const NOT_OWNER: u32 = 3;
const ALLOW_REPLACEMENT: u32 = 1;
const REPLACE_EXISTING: u32 = 2;
const DO_NOT_QUEUE: u32 = 4;

const INVALID_ARGS: &str = "org.freedesktop.DBus.Error.InvalidArgs";
const NAME_HAS_NO_OWNER: &str = "org.freedesktop.DBus.Error.NameHasNoOwner";
const LIMITS_EXCEEDED: &str = "org.freedesktop.DBus.Error.LimitsExceeded";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_unique_name_and_signals() {
    let bus = start_bus(None);
    let observer = connect(&bus.address).await;
    let mut obs = stream(&observer);
    add_match(
        &observer,
        "type='signal',interface='org.freedesktop.DBus',member='NameOwnerChanged'",
    )
    .await;

    // Raw client: Hello reply, then NameAcquired for its own unique name.
    let mut raw = RawClient::connect_authenticated(&bus.socket);
    raw.send(&hello_msg()).unwrap();
    let reply = raw.recv().expect("Hello reply");
    assert_eq!(reply.message_type(), Type::MethodReturn);
    assert_eq!(sender(&reply), BUS);
    let name: String = reply.body().deserialize().unwrap();
    assert!(name.starts_with(':'), "unique name {name}");
    let acq = raw.recv().expect("NameAcquired");
    assert!(is_signal(&acq, "NameAcquired"), "{acq:?}");
    assert_eq!(acq.header().destination().unwrap().as_str(), name);
    assert_eq!(acq.body().deserialize::<String>().unwrap(), name);

    // The observer sees NameOwnerChanged(name, "", name).
    let noc = next_matching(&mut obs, OP_TIMEOUT, |m| {
        is_signal(m, "NameOwnerChanged")
            && m.body()
                .deserialize::<(String, String, String)>()
                .unwrap()
                .0
                == name
    })
    .await
    .expect("NameOwnerChanged for the new connection");
    let (n, old, new): (String, String, String) = noc.body().deserialize().unwrap();
    assert_eq!(
        (n.as_str(), old.as_str(), new.as_str()),
        (name.as_str(), "", name.as_str())
    );
    assert_eq!(sender(&noc), BUS);

    // Unique names are distinct.
    let other = connect(&bus.address).await;
    assert_ne!(unique(&other), name);
    assert_ne!(unique(&other), unique(&observer));

    // Disconnecting announces the loss of the unique name.
    drop(raw);
    let gone = next_matching(&mut obs, OP_TIMEOUT, |m| {
        is_signal(m, "NameOwnerChanged")
            && m.body().deserialize::<(String, String, String)>().unwrap()
                == (name.clone(), name.clone(), String::new())
    })
    .await;
    assert!(
        gone.is_some(),
        "no NameOwnerChanged for the disconnect of {name}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn second_hello_is_an_error_not_a_disconnect() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    // dbus-daemon answers org.freedesktop.DBus.Error.Failed "Already handled an
    // Hello message" and keeps the connection.
    let e = bus_call(&a, "Hello", &())
        .await
        .expect_err("second Hello must fail");
    assert_eq!(err_name(&e), "org.freedesktop.DBus.Error.Failed", "{e}");
    let names: Vec<String> = bus_ok(&a, "ListNames", &()).await;
    assert!(names.contains(&unique(&a)));
}

/// As dbus-daemon 1.14: a method call before Hello gets AccessDenied, and
/// the connection stays, unregistered: a Hello after it works. One that
/// never sends Hello is dropped after auth_timeout, like any incomplete
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_message_must_be_hello() {
    let mut bus = start_bus(Some(&config_xml(&[("auth_timeout", 1500)])));
    let mut raw = RawClient::connect_authenticated(&bus.socket);
    raw.send(&bus_method_msg("ListNames", &())).unwrap();
    let m = raw.recv().expect("an answer to ListNames before Hello");
    assert_eq!(m.message_type(), Type::Error);
    assert_eq!(
        m.header().error_name().map(|e| e.as_str()),
        Some("org.freedesktop.DBus.Error.AccessDenied")
    );
    let text: String = m.body().deserialize().unwrap();
    assert!(text.contains("other than Hello"), "{text}");
    // Still connected, and still able to register.
    let name = raw.hello();
    assert!(name.starts_with(":1."), "{name}");

    // A client that keeps sending other calls and never Hello is dropped
    // once auth_timeout has passed since it connected.
    let mut stubborn = RawClient::connect_authenticated(&bus.socket);
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(5) {
        if stubborn.send(&bus_method_msg("ListNames", &())).is_err() {
            break;
        }
        match stubborn.recv() {
            Some(m) if m.message_type() == Type::Error => answered += 1,
            _ => break,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let lasted = started.elapsed();
    assert!(answered > 0, "no AccessDenied before the drop");
    assert!(
        lasted >= Duration::from_millis(1300) && lasted < Duration::from_secs(4),
        "dropped after {lasted:?} (auth_timeout 1.5 s)"
    );
    // The bus still serves others.
    bus.assert_alive();
    let c = connect(&bus.address).await;
    let names: Vec<String> = bus_ok(&c, "ListNames", &()).await;
    assert!(names.contains(&unique(&c)));
}

fn owner_change(m: &zbus::message::Message) -> (String, String, String) {
    m.body().deserialize().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_release_name_flags_queue_and_signals() {
    let bus = start_bus(None);
    let name = "org.busvisor.Test.Name";
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await;
    let c = connect(&bus.address).await;
    let observer = connect(&bus.address).await;
    let (ua, ub, uc) = (unique(&a), unique(&b), unique(&c));
    let mut obs = stream(&observer);
    add_match(
        &observer,
        &format!("type='signal',sender='{BUS}',member='NameOwnerChanged',arg0='{name}'"),
    )
    .await;
    let mut sa = stream(&a);
    let mut sc = stream(&c);

    let req = |conn: &zbus::Connection, flags: u32| {
        let conn = conn.clone();
        async move { bus_ok::<_, u32>(&conn, "RequestName", &(name, flags)).await }
    };
    let queue = |conn: &zbus::Connection| {
        let conn = conn.clone();
        async move { bus_ok::<_, Vec<String>>(&conn, "ListQueuedOwners", &(name,)).await }
    };

    assert_eq!(req(&a, 0).await, PRIMARY_OWNER);
    let acq = next_matching(&mut sa, OP_TIMEOUT, |m| {
        is_signal(m, "NameAcquired") && m.body().deserialize::<String>().unwrap() == name
    })
    .await;
    assert!(acq.is_some(), "a got no NameAcquired");
    let noc = next_matching(&mut obs, OP_TIMEOUT, |m| is_signal(m, "NameOwnerChanged"))
        .await
        .unwrap();
    assert_eq!(owner_change(&noc), (name.into(), String::new(), ua.clone()));

    assert_eq!(req(&a, 0).await, ALREADY_OWNER);
    assert_eq!(req(&b, 0).await, IN_QUEUE);
    assert_eq!(queue(&observer).await, vec![ua.clone(), ub.clone()]);
    // DO_NOT_QUEUE against an owner: EXISTS, and not queued.
    assert_eq!(req(&c, DO_NOT_QUEUE).await, EXISTS);
    assert_eq!(queue(&observer).await, vec![ua.clone(), ub.clone()]);
    // REPLACE_EXISTING while the owner does not allow replacement: queued
    // (its place is checked in replace_existing_request_queues_second).
    assert_eq!(req(&c, REPLACE_EXISTING).await, IN_QUEUE);
    let mut q = queue(&observer).await;
    assert_eq!(q[0], ua);
    q.sort();
    let mut want = vec![ua.clone(), ub.clone(), uc.clone()];
    want.sort();
    assert_eq!(q, want);
    // DO_NOT_QUEUE again: EXISTS, and c leaves the queue.
    assert_eq!(req(&c, REPLACE_EXISTING | DO_NOT_QUEUE).await, EXISTS);
    assert_eq!(queue(&observer).await, vec![ua.clone(), ub.clone()]);
    assert_eq!(
        bus_ok::<_, String>(&observer, "GetNameOwner", &(name,)).await,
        ua
    );

    // The owner now allows replacement; c replaces it, a is queued behind c.
    assert_eq!(req(&a, ALLOW_REPLACEMENT).await, ALREADY_OWNER);
    assert_eq!(req(&c, REPLACE_EXISTING).await, PRIMARY_OWNER);
    let lost = next_matching(&mut sa, OP_TIMEOUT, |m| is_signal(m, "NameLost")).await;
    assert_eq!(
        lost.expect("a got no NameLost")
            .body()
            .deserialize::<String>()
            .unwrap(),
        name
    );
    let acq = next_matching(&mut sc, OP_TIMEOUT, |m| {
        is_signal(m, "NameAcquired") && m.body().deserialize::<String>().unwrap() == name
    })
    .await;
    assert!(acq.is_some(), "c got no NameAcquired");
    let noc = next_matching(&mut obs, OP_TIMEOUT, |m| is_signal(m, "NameOwnerChanged"))
        .await
        .unwrap();
    assert_eq!(owner_change(&noc), (name.into(), ua.clone(), uc.clone()));
    assert_eq!(
        queue(&observer).await,
        vec![uc.clone(), ua.clone(), ub.clone()]
    );
    assert_eq!(bus_ok::<_, String>(&b, "GetNameOwner", &(name,)).await, uc);

    // Releasing hands the name to the next in line.
    assert_eq!(
        bus_ok::<_, u32>(&c, "ReleaseName", &(name,)).await,
        RELEASED
    );
    let noc = next_matching(&mut obs, OP_TIMEOUT, |m| is_signal(m, "NameOwnerChanged"))
        .await
        .unwrap();
    assert_eq!(owner_change(&noc), (name.into(), uc.clone(), ua.clone()));
    let acq = next_matching(&mut sa, OP_TIMEOUT, |m| {
        is_signal(m, "NameAcquired") && m.body().deserialize::<String>().unwrap() == name
    })
    .await;
    assert!(acq.is_some(), "a got no NameAcquired after c released");
    assert_eq!(
        bus_ok::<_, u32>(&c, "ReleaseName", &(name,)).await,
        NOT_OWNER
    );
    assert_eq!(
        bus_ok::<_, u32>(&c, "ReleaseName", &("org.busvisor.Nobody",)).await,
        NON_EXISTENT
    );
    // A queued (non-primary) owner can release its place silently.
    assert_eq!(
        bus_ok::<_, u32>(&b, "ReleaseName", &(name,)).await,
        RELEASED
    );
    assert_eq!(queue(&observer).await, vec![ua.clone()]);

    // The owner disconnects: the name goes to the queue, or away.
    assert_eq!(req(&b, 0).await, IN_QUEUE);
    drop(sa);
    drop(a);
    let noc = next_matching(&mut obs, OP_TIMEOUT, |m| is_signal(m, "NameOwnerChanged"))
        .await
        .unwrap();
    assert_eq!(owner_change(&noc), (name.into(), ua.clone(), ub.clone()));
    drop(b);
    let noc = next_matching(&mut obs, OP_TIMEOUT, |m| is_signal(m, "NameOwnerChanged"))
        .await
        .unwrap();
    assert_eq!(owner_change(&noc), (name.into(), ub.clone(), String::new()));
    assert!(!bus_ok::<_, bool>(&observer, "NameHasOwner", &(name,)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn replace_existing_request_queues_second() {
    // dbus-daemon (bus/services.c, bus_service_add_owner): a queued request
    // with REPLACE_EXISTING is inserted right after the primary owner.
    let bus = start_bus(None);
    let name = "org.busvisor.Test.QueueOrder";
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await;
    let c = connect(&bus.address).await;
    assert_eq!(
        bus_ok::<_, u32>(&a, "RequestName", &(name, 0u32)).await,
        PRIMARY_OWNER
    );
    assert_eq!(
        bus_ok::<_, u32>(&b, "RequestName", &(name, 0u32)).await,
        IN_QUEUE
    );
    assert_eq!(
        bus_ok::<_, u32>(&c, "RequestName", &(name, REPLACE_EXISTING)).await,
        IN_QUEUE
    );
    assert_eq!(
        bus_ok::<_, Vec<String>>(&a, "ListQueuedOwners", &(name,)).await,
        vec![unique(&a), unique(&c), unique(&b)]
    );
    // So c, not b, gets the name when a releases it.
    assert_eq!(
        bus_ok::<_, u32>(&a, "ReleaseName", &(name,)).await,
        RELEASED
    );
    assert_eq!(
        bus_ok::<_, String>(&a, "GetNameOwner", &(name,)).await,
        unique(&c)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_do_not_queue_owner_is_dropped() {
    let bus = start_bus(None);
    let name = "org.busvisor.Test.Dropped";
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await;
    let mut sa = stream(&a);
    assert_eq!(
        bus_ok::<_, u32>(&a, "RequestName", &(name, ALLOW_REPLACEMENT | DO_NOT_QUEUE)).await,
        PRIMARY_OWNER
    );
    assert_eq!(
        bus_ok::<_, u32>(&b, "RequestName", &(name, REPLACE_EXISTING)).await,
        PRIMARY_OWNER
    );
    assert!(
        next_matching(&mut sa, OP_TIMEOUT, |m| is_signal(m, "NameLost"))
            .await
            .is_some()
    );
    assert_eq!(
        bus_ok::<_, Vec<String>>(&b, "ListQueuedOwners", &(name,)).await,
        vec![unique(&b)]
    );
    // a is in no queue any more: releasing says so.
    assert_eq!(
        bus_ok::<_, u32>(&a, "ReleaseName", &(name,)).await,
        NOT_OWNER
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_name_rejects_invalid_names() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    let me = unique(&a);
    for bad in [me.as_str(), ":1.99", BUS, "no-dots", "a..b", "1abc.def", ""] {
        bus_err(&a, "RequestName", &(bad, 0u32), INVALID_ARGS).await;
    }
    for bad in [me.as_str(), BUS, "a..b"] {
        bus_err(&a, "ReleaseName", &(bad,), INVALID_ARGS).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_names_and_owner_queries() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await;
    let name = "org.busvisor.Test.Listed";
    assert_eq!(
        bus_ok::<_, u32>(&a, "RequestName", &(name, 0u32)).await,
        PRIMARY_OWNER
    );

    let names: Vec<String> = bus_ok(&b, "ListNames", &()).await;
    for n in [BUS, name, unique(&a).as_str(), unique(&b).as_str()] {
        assert!(
            names.iter().any(|x| x == n),
            "{n} missing from ListNames {names:?}"
        );
    }
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        names.len(),
        "duplicates in ListNames {names:?}"
    );

    let act: Vec<String> = bus_ok(&b, "ListActivatableNames", &()).await;
    assert!(act.iter().any(|x| x == BUS), "{act:?}");
    assert!(!act.iter().any(|x| x == name), "{act:?}");

    assert!(bus_ok::<_, bool>(&b, "NameHasOwner", &(name,)).await);
    assert!(bus_ok::<_, bool>(&b, "NameHasOwner", &(BUS,)).await);
    assert!(bus_ok::<_, bool>(&b, "NameHasOwner", &(unique(&a),)).await);
    assert!(!bus_ok::<_, bool>(&b, "NameHasOwner", &("org.busvisor.Nobody",)).await);
    assert!(!bus_ok::<_, bool>(&b, "NameHasOwner", &(":1.9999",)).await);

    assert_eq!(
        bus_ok::<_, String>(&b, "GetNameOwner", &(name,)).await,
        unique(&a)
    );
    assert_eq!(
        bus_ok::<_, String>(&b, "GetNameOwner", &(unique(&a),)).await,
        unique(&a)
    );
    assert_eq!(bus_ok::<_, String>(&b, "GetNameOwner", &(BUS,)).await, BUS);
    bus_err(
        &b,
        "GetNameOwner",
        &("org.busvisor.Nobody",),
        NAME_HAS_NO_OWNER,
    )
    .await;
    bus_err(&b, "GetNameOwner", &(":1.9999",), NAME_HAS_NO_OWNER).await;

    assert_eq!(
        bus_ok::<_, Vec<String>>(&b, "ListQueuedOwners", &(name,)).await,
        vec![unique(&a)]
    );
    bus_err(
        &b,
        "ListQueuedOwners",
        &("org.busvisor.Nobody",),
        NAME_HAS_NO_OWNER,
    )
    .await;

    // Once a leaves, its names leave with it.
    let ua = unique(&a);
    drop(a);
    let ok = {
        let mut ok = false;
        for _ in 0..100 {
            let names: Vec<String> = bus_ok(&b, "ListNames", &()).await;
            if !names.contains(&ua) && !names.iter().any(|x| x == name) {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ok
    };
    assert!(ok, "names of a disconnected peer still listed");

    // The CLI tools agree.
    let out = run_tool(
        "busctl",
        &[
            "--address",
            &bus.address,
            "list",
            "--no-pager",
            "--no-legend",
        ],
        OP_TIMEOUT,
    );
    out.assert_ok();
    assert!(
        out.stdout.contains(&unique(&b)),
        "busctl list: {}",
        out.stdout
    );
    let out = run_tool(
        "dbus-send",
        &[
            &format!("--bus={}", bus.address),
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.GetNameOwner",
            &format!("string:{}", unique(&b)),
        ],
        OP_TIMEOUT,
    );
    out.assert_ok();
    assert!(
        out.stdout.contains(&format!("string \"{}\"", unique(&b))),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_service_by_name_and_activation_environment() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    bus_err(
        &a,
        "StartServiceByName",
        &("org.busvisor.NoSuchService", 0u32),
        "org.freedesktop.DBus.Error.ServiceUnknown",
    )
    .await;
    let mut env = HashMap::new();
    env.insert("BUSVISOR_TEST_VAR", "value");
    let r = bus_call(&a, "UpdateActivationEnvironment", &(&env,)).await;
    assert!(r.is_ok(), "UpdateActivationEnvironment: {r:?}");
    // Wrong argument type.
    bus_err(&a, "UpdateActivationEnvironment", &("x",), INVALID_ARGS).await;
    // gdbus can call it too.
    let out = run_tool(
        "gdbus",
        &[
            "call",
            "--address",
            &bus.address,
            "--dest",
            BUS,
            "--object-path",
            BUS_PATH,
            "--method",
            "org.freedesktop.DBus.UpdateActivationEnvironment",
            "{'A': 'b'}",
        ],
        OP_TIMEOUT,
    );
    out.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_match_are_refcounted() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await;
    let rule = "type='signal',interface='org.busvisor.Test',member='Ping'";
    add_match(&a, rule).await;
    add_match(&a, rule).await;
    let mut sa = stream(&a);
    let emit = |conn: &zbus::Connection| {
        let conn = conn.clone();
        async move {
            within(conn.emit_signal(None::<&str>, "/x", "org.busvisor.Test", "Ping", &()))
                .await
                .unwrap();
        }
    };
    // Two identical rules: the signal is still delivered once.
    emit(&b).await;
    let got = collect_for(&mut sa, Duration::from_millis(400), |m| {
        is_signal(m, "Ping")
    })
    .await;
    assert_eq!(got.len(), 1, "duplicate rules must not duplicate delivery");

    assert!(bus_call(&a, "RemoveMatch", &(rule,)).await.is_ok());
    emit(&b).await;
    let got = collect_for(&mut sa, Duration::from_millis(400), |m| {
        is_signal(m, "Ping")
    })
    .await;
    assert_eq!(got.len(), 1, "one reference left: still delivered");

    assert!(
        bus_call(&a, "RemoveMatch", &(rule,)).await.is_ok(),
        "second RemoveMatch must succeed"
    );
    emit(&b).await;
    let got = collect_for(&mut sa, Duration::from_millis(400), |m| {
        is_signal(m, "Ping")
    })
    .await;
    assert!(got.is_empty(), "rule removed: nothing delivered");

    bus_err(
        &a,
        "RemoveMatch",
        &(rule,),
        "org.freedesktop.DBus.Error.MatchRuleNotFound",
    )
    .await;
    bus_err(
        &a,
        "AddMatch",
        &("type='nonsense'",),
        "org.freedesktop.DBus.Error.MatchRuleInvalid",
    )
    .await;
    bus_err(
        &a,
        "AddMatch",
        &("foo='bar'",),
        "org.freedesktop.DBus.Error.MatchRuleInvalid",
    )
    .await;
    bus_err(&a, "AddMatch", &(1u32,), INVALID_ARGS).await;
}

/// A match rule of `len` bytes: `type='signal',arg0='xx…x'`.
fn rule_of_length(len: usize) -> String {
    let head = "type='signal',arg0='";
    let rule = format!("{head}{}'", "x".repeat(len - head.len() - 1));
    assert_eq!(rule.len(), len);
    rule
}

/// dbus-daemon checks a rule's length before parsing it (signals.c,
/// DBUS_MAXIMUM_MATCH_RULE_LENGTH = 1024): one byte more is LimitsExceeded,
/// even when the text would not parse; exactly 1024 bytes is an ordinary
/// rule, which matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_rules_longer_than_1024_bytes_exceed_the_limits() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await;
    let longest = rule_of_length(1024);
    let too_long = rule_of_length(1025);
    bus_err(&a, "AddMatch", &(too_long.as_str(),), LIMITS_EXCEEDED).await;
    bus_err(
        &a,
        "AddMatch",
        &(rule_of_length(8192).as_str(),),
        LIMITS_EXCEEDED,
    )
    .await;
    let nonsense = format!("nonsense='{}'", "y".repeat(1100));
    bus_err(&a, "AddMatch", &(nonsense.as_str(),), LIMITS_EXCEEDED).await;
    bus_err(&a, "RemoveMatch", &(too_long.as_str(),), LIMITS_EXCEEDED).await;

    // The connection is still served, and a rule of exactly 1024 bytes works.
    add_match(&a, &longest).await;
    let mut sa = stream(&a);
    let arg0 = &longest["type='signal',arg0='".len()..longest.len() - 1];
    for arg in [arg0, "other"] {
        within(b.emit_signal(None::<&str>, "/x", "org.busvisor.Test", "Long", &(arg,)))
            .await
            .unwrap();
    }
    sync(&b).await;
    let got = collect_for(&mut sa, Duration::from_millis(400), |m| {
        is_signal(m, "Long")
    })
    .await;
    assert_eq!(got.len(), 1, "the 1024-byte rule matches its arg0 only");
    assert_eq!(got[0].body().deserialize::<String>().unwrap(), arg0);
    assert!(
        bus_call(&a, "RemoveMatch", &(longest.as_str(),))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_credentials() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await;
    let uid = nix::unistd::getuid().as_raw();
    let pid = std::process::id();
    assert_eq!(
        bus_ok::<_, u32>(&b, "GetConnectionUnixUser", &(unique(&a),)).await,
        uid
    );
    assert_eq!(
        bus_ok::<_, u32>(&b, "GetConnectionUnixProcessID", &(unique(&a),)).await,
        pid
    );
    let name = "org.busvisor.Test.Creds";
    bus_ok::<_, u32>(&a, "RequestName", &(name, 0u32)).await;
    assert_eq!(
        bus_ok::<_, u32>(&b, "GetConnectionUnixProcessID", &(name,)).await,
        pid
    );
    // The bus's own credentials: the pid it publishes (busvisor's keeper).
    assert_eq!(
        bus_ok::<_, u32>(&b, "GetConnectionUnixProcessID", &(BUS,)).await,
        bus.keeper_pid()
    );
    assert_eq!(
        bus_ok::<_, u32>(&b, "GetConnectionUnixUser", &(BUS,)).await,
        uid
    );

    let creds: HashMap<String, OwnedVariant> =
        bus_ok(&b, "GetConnectionCredentials", &(unique(&a),)).await;
    assert_eq!(u32::try_from(&*creds["UnixUserID"]).unwrap(), uid);
    assert_eq!(u32::try_from(&*creds["ProcessID"]).unwrap(), pid);
    // zbus negotiates fd passing: the reply carries a pidfd for our own
    // process (dbus-daemon 1.14 predates ProcessFD).
    if !is_reference() {
        let fd_v = creds
            .get("ProcessFD")
            .expect("ProcessFD missing although fds were negotiated");
        let fd = zbus::wire::Fd::try_from(&**fd_v).expect("ProcessFD is an fd");
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .unwrap();
        let fd_pid = info
            .lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .map(|s| s.trim().to_owned());
        assert_eq!(
            fd_pid.as_deref(),
            Some(pid.to_string().as_str()),
            "pidfd fdinfo:\n{info}"
        );
    }

    for m in [
        "GetConnectionUnixUser",
        "GetConnectionUnixProcessID",
        "GetConnectionCredentials",
    ] {
        bus_err(&b, m, &("org.busvisor.Nobody",), NAME_HAS_NO_OWNER).await;
        bus_err(&b, m, &(":1.9999",), NAME_HAS_NO_OWNER).await;
    }
    bus_err(
        &b,
        "GetAdtAuditSessionData",
        &(unique(&a),),
        "org.freedesktop.DBus.Error.AdtAuditDataUnknown",
    )
    .await;
    bus_err(
        &b,
        "GetConnectionSELinuxSecurityContext",
        &(unique(&a),),
        "org.freedesktop.DBus.Error.SELinuxSecurityContextUnknown",
    )
    .await;
    bus_err(
        &b,
        "GetAdtAuditSessionData",
        &("org.busvisor.Nobody",),
        NAME_HAS_NO_OWNER,
    )
    .await;
}

/// UnixGroupIDs are the groups the client process had when it connected
/// (as dbus-daemon reads them, with SO_PEERGROUPS), not the user database's
/// list for its uid: a client started with other supplementary groups (by
/// `setpriv`, which needs root) reports those.
#[test]
fn credentials_report_the_connecting_process_groups() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: setpriv --groups needs root");
        return;
    }
    let bus = start_bus(None);
    let script = format!(
        "import sys; sys.path.insert(0, {dir:?}); import minibus\n\
         c = minibus.Connection({addr:?})\n\
         creds = c.call('org.freedesktop.DBus', '/org/freedesktop/DBus', \
         'org.freedesktop.DBus', 'GetConnectionCredentials', 's', [c.unique_name])[0]\n\
         print(creds['UnixGroupIDs'])",
        dir = concat!(env!("CARGO_MANIFEST_DIR"), "/services.d"),
        addr = bus.address,
    );
    let gid = nix::unistd::getgid().as_raw().to_string();
    let out = run_tool(
        "setpriv",
        &["--groups", "4343,4242", "--", "python3", "-c", &script],
        OP_TIMEOUT,
    );
    out.assert_ok();
    let mut want = vec![gid.parse::<u32>().unwrap(), 4242, 4343];
    want.sort_unstable();
    want.dedup();
    assert!(
        out.stdout.contains(&format!("{want:?}")),
        "UnixGroupIDs: {} (want {want:?})",
        out.stdout.trim()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn credentials_for_client_without_fd_passing() {
    // A client that did not negotiate fd passing must still get an answer
    // to GetConnectionCredentials (without ProcessFD).
    let bus = start_bus(None);
    let mut raw = RawClient::connect_authenticated(&bus.socket);
    let me = raw.hello();
    let call = bus_method_msg("GetConnectionCredentials", &(me.as_str(),));
    let serial = call.primary_header().serial_num();
    raw.send(&call).unwrap();
    let _ = raw.stream.set_read_timeout(Some(Duration::from_secs(5)));
    let reply = loop {
        match raw.recv() {
            Some(m) if m.header().reply_serial() == Some(serial) => break Some(m),
            Some(_) => continue,
            None => break None,
        }
    };
    let reply =
        reply.expect("no reply to GetConnectionCredentials for a client without fd passing");
    assert_eq!(reply.message_type(), Type::MethodReturn, "{reply:?}");
    let creds: HashMap<String, OwnedVariant> = reply.body().deserialize().unwrap();
    assert_eq!(
        u32::try_from(&*creds["UnixUserID"]).unwrap(),
        nix::unistd::getuid().as_raw()
    );
    assert_eq!(
        u32::try_from(&*creds["ProcessID"]).unwrap(),
        std::process::id()
    );
    assert!(!creds.contains_key("ProcessFD"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_reload_peer_and_properties() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    let id: String = bus_ok(&a, "GetId", &()).await;
    // The bus id: 32 hex digits, the same for every connection.
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let b = connect(&bus.address).await;
    assert_eq!(bus_ok::<_, String>(&b, "GetId", &()).await, id);

    assert!(bus_call(&a, "ReloadConfig", &()).await.is_ok());

    let peer = "org.freedesktop.DBus.Peer";
    within(a.call_method(Some(BUS), BUS_PATH, Some(peer), "Ping", &()))
        .await
        .expect("Ping");
    let m = within(a.call_method(Some(BUS), BUS_PATH, Some(peer), "GetMachineId", &()))
        .await
        .expect("GetMachineId");
    let mid: String = m.body().deserialize().unwrap();
    let want = std::fs::read_to_string("/etc/machine-id")
        .or_else(|_| std::fs::read_to_string("/var/lib/dbus/machine-id"))
        .unwrap();
    assert_eq!(mid, want.trim());

    let props = "org.freedesktop.DBus.Properties";
    let m = within(a.call_method(Some(BUS), BUS_PATH, Some(props), "Get", &(BUS, "Features")))
        .await
        .expect("Get Features");
    let v: OwnedVariant = m.body().deserialize().unwrap();
    let _features: Vec<String> = Vec::<String>::try_from(v).expect("Features is as");
    let m = within(a.call_method(
        Some(BUS),
        BUS_PATH,
        Some(props),
        "Get",
        &(BUS, "Interfaces"),
    ))
    .await
    .expect("Get Interfaces");
    let v: OwnedVariant = m.body().deserialize().unwrap();
    let ifaces: Vec<String> = Vec::<String>::try_from(v).expect("Interfaces is as");
    assert!(
        ifaces
            .iter()
            .any(|i| i == "org.freedesktop.DBus.Monitoring"),
        "{ifaces:?}"
    );
    let m = within(a.call_method(Some(BUS), BUS_PATH, Some(props), "GetAll", &(BUS,)))
        .await
        .expect("GetAll");
    let all: HashMap<String, OwnedVariant> = m.body().deserialize().unwrap();
    assert!(
        all.contains_key("Features") && all.contains_key("Interfaces"),
        "{all:?}"
    );
    let e = within(a.call_method(
        Some(BUS),
        BUS_PATH,
        Some(props),
        "Get",
        &(BUS, "NoSuchProp"),
    ))
    .await
    .expect_err("unknown property");
    assert_eq!(err_name(&e), "org.freedesktop.DBus.Error.UnknownProperty");
    let e = within(a.call_method(
        Some(BUS),
        BUS_PATH,
        Some(props),
        "Set",
        &(
            BUS,
            "Features",
            zbus::wire::Variant::from(vec!["x".to_owned()]),
        ),
    ))
    .await
    .expect_err("Features is read-only");
    assert_eq!(err_name(&e), "org.freedesktop.DBus.Error.PropertyReadOnly");

    // busctl reads the properties too.
    let out = run_tool(
        "busctl",
        &[
            "--address",
            &bus.address,
            "get-property",
            BUS,
            BUS_PATH,
            BUS,
            "Interfaces",
        ],
        OP_TIMEOUT,
    );
    out.assert_ok();
    assert!(
        out.stdout.contains("org.freedesktop.DBus.Monitoring"),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_is_valid_xml() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    let m = within(a.call_method(
        Some(BUS),
        BUS_PATH,
        Some("org.freedesktop.DBus.Introspectable"),
        "Introspect",
        &(),
    ))
    .await
    .expect("Introspect");
    let xml: String = m.body().deserialize().unwrap();
    // Parse it fully and collect interface/method names.
    let mut reader = quick_xml::Reader::from_str(&xml);
    let mut ifaces = Vec::new();
    let mut methods = Vec::new();
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Start(e)) | Ok(quick_xml::events::Event::Empty(e)) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                let attr = e
                    .try_get_attribute("name")
                    .ok()
                    .flatten()
                    .map(|a| String::from_utf8_lossy(&a.value).into_owned());
                match name.as_str() {
                    "interface" => ifaces.push(attr.unwrap_or_default()),
                    "method" => methods.push(attr.unwrap_or_default()),
                    _ => {}
                }
            }
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("invalid introspection XML: {e}\n{xml}"),
        }
    }
    for i in [
        BUS,
        "org.freedesktop.DBus.Introspectable",
        "org.freedesktop.DBus.Peer",
        "org.freedesktop.DBus.Properties",
    ] {
        assert!(
            ifaces.iter().any(|x| x == i),
            "{i} not introspected: {ifaces:?}"
        );
    }
    assert!(xml.trim_end().ends_with("</node>"), "{xml}");

    let out = run_tool(
        "busctl",
        &[
            "--address",
            &bus.address,
            "introspect",
            "--no-pager",
            BUS,
            BUS_PATH,
        ],
        OP_TIMEOUT,
    );
    out.assert_ok();
    for m in [
        "RequestName",
        "GetConnectionCredentials",
        "NameOwnerChanged",
        "Features",
    ] {
        assert!(
            out.stdout.contains(m),
            "busctl introspect lacks {m}:\n{}",
            out.stdout
        );
    }
    for m in [
        "Hello",
        "RequestName",
        "AddMatch",
        "GetId",
        "Ping",
        "Introspect",
        "BecomeMonitor",
    ] {
        assert!(methods.iter().any(|x| x == m), "{m} not introspected");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signatures_and_unknown_methods() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    bus_err(&a, "RequestName", &("org.busvisor.X",), INVALID_ARGS).await;
    bus_err(&a, "RequestName", &(1u32, "org.busvisor.X"), INVALID_ARGS).await;
    bus_err(&a, "GetNameOwner", &(), INVALID_ARGS).await;
    bus_err(&a, "NameHasOwner", &(7i32,), INVALID_ARGS).await;
    bus_err(&a, "ListNames", &("extra",), INVALID_ARGS).await;
    bus_err(
        &a,
        "NoSuchMethod",
        &(),
        "org.freedesktop.DBus.Error.UnknownMethod",
    )
    .await;
    let e = within(a.call_method(
        Some(BUS),
        BUS_PATH,
        Some("org.busvisor.NoSuchInterface"),
        "Foo",
        &(),
    ))
    .await
    .expect_err("unknown interface");
    assert!(
        [
            "org.freedesktop.DBus.Error.UnknownInterface",
            "org.freedesktop.DBus.Error.UnknownMethod"
        ]
        .contains(&err_name(&e).as_str()),
        "{e}"
    );
    // dbus-send with the wrong argument type gets InvalidArgs.
    let out = run_tool(
        "dbus-send",
        &[
            &format!("--bus={}", bus.address),
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.GetNameOwner",
            "uint32:5",
        ],
        OP_TIMEOUT,
    );
    assert!(!out.success());
    assert!(out.stderr.contains("InvalidArgs"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn become_monitor_with_dbus_monitor() {
    let bus = start_bus(None);
    let service = connect(&bus.address).await;
    let client = connect(&bus.address).await;
    let out_file = bus.dir.path().join("monitor.out");
    let _mon = spawn_tool("dbus-monitor", &["--address", &bus.address], &out_file);
    // Wait until the monitor is attached: its BecomeMonitor is logged as a
    // NameLost of its unique name and it shows the signal we emit.
    let attached = {
        let mut ok = false;
        for _ in 0..250 {
            within(client.emit_signal(None::<&str>, "/probe", "org.busvisor.Probe", "Probe", &()))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            if std::fs::read_to_string(&out_file)
                .unwrap_or_default()
                .contains("member=Probe")
            {
                ok = true;
                break;
            }
        }
        ok
    };
    assert!(
        attached,
        "dbus-monitor never showed a signal; log:\n{}",
        bus.log()
    );

    // A method call from client to service, and its reply.
    let mut ss = stream(&service);
    let dest = unique(&service);
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            within(client.call_method(
                Some(dest.as_str()),
                "/obj",
                Some("org.busvisor.Svc"),
                "Frobnicate",
                &("hello-monitor",),
            ))
            .await
        }
    });
    let m = next_matching(&mut ss, OP_TIMEOUT, |m| member(m) == "Frobnicate")
        .await
        .expect("call reached service");
    let reply = zbus::message::Message::method_return(&m.header())
        .build(&("reply-for-monitor",))
        .unwrap();
    within(service.send(&reply)).await.unwrap();
    call.await.unwrap().expect("call answered");

    let ok = wait_until(OP_TIMEOUT, || {
        let t = std::fs::read_to_string(&out_file).unwrap_or_default();
        t.contains("member=Frobnicate")
            && t.contains("reply-for-monitor")
            && t.contains("hello-monitor")
    });
    let text = std::fs::read_to_string(&out_file).unwrap_or_default();
    assert!(
        ok,
        "dbus-monitor did not see the call and its reply:\n{text}"
    );
    assert!(text.contains("method return"), "{text}");
    // The monitor is not listed as a bus name holder.
    let names: Vec<String> = bus_ok(&client, "ListNames", &()).await;
    // Unique names: the service and the client; the monitor is not listed.
    let unique = names.iter().filter(|n| n.starts_with(':')).count();
    assert_eq!(unique, 2, "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn become_monitor_accepts_eavesdrop_rules() {
    let bus = start_bus(None);
    let mon = connect(&bus.address).await;
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await;
    let mut sm = stream(&mon);
    let r = within(mon.call_method(
        Some(BUS),
        BUS_PATH,
        Some("org.freedesktop.DBus.Monitoring"),
        "BecomeMonitor",
        &(
            vec!["eavesdrop=true,type='signal',interface='org.busvisor.Mon'"],
            0u32,
        ),
    ))
    .await;
    assert!(r.is_ok(), "BecomeMonitor with eavesdrop=true: {r:?}");
    // A unicast signal a -> b matching the rule, and one that does not match.
    let sig = |iface: &str| {
        zbus::message::Message::signal("/m", iface, "Sig")
            .destination(unique(&b))
            .build(&())
            .unwrap()
    };
    within(a.send(&sig("org.busvisor.Other"))).await.unwrap();
    within(a.send(&sig("org.busvisor.Mon"))).await.unwrap();
    let got = next_matching(&mut sm, OP_TIMEOUT, |m| member(m) == "Sig")
        .await
        .expect("monitor saw the signal");
    assert_eq!(
        got.header().interface().unwrap().as_str(),
        "org.busvisor.Mon"
    );
    assert_eq!(sender(&got), unique(&a));
    // BecomeMonitor with a bad rule fails.
    let c = connect(&bus.address).await;
    let e = within(c.call_method(
        Some(BUS),
        BUS_PATH,
        Some("org.freedesktop.DBus.Monitoring"),
        "BecomeMonitor",
        &(vec!["type='bogus'"], 0u32),
    ))
    .await
    .expect_err("bad rule");
    assert_eq!(err_name(&e), "org.freedesktop.DBus.Error.MatchRuleInvalid");
}

/// org.freedesktop.DBus.Debug.Stats, as dbus-daemon offers it: listed in
/// Interfaces; GetStats counts connections, rules and names;
/// GetConnectionStats answers for a peer and refuses the bus itself;
/// GetAllMatchRules lists each connection's rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_stats_interface() {
    use std::collections::HashMap;
    use zbus::OwnedVariant as OwnedValue;
    const STATS: &str = "org.freedesktop.DBus.Debug.Stats";
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await;
    let rule = "type='signal',interface='org.example.Stats'";
    bus_call(&a, "AddMatch", &(rule,)).await.unwrap();
    let stats_call = |conn: zbus::Connection, member: &'static str, arg: Option<String>| async move {
        match arg {
            Some(s) => {
                within(conn.call_method(Some(BUS), BUS_PATH, Some(STATS), member, &(s,))).await
            }
            None => within(conn.call_method(Some(BUS), BUS_PATH, Some(STATS), member, &())).await,
        }
    };
    let ifaces: OwnedValue = within(a.call_method(
        Some(BUS),
        BUS_PATH,
        Some("org.freedesktop.DBus.Properties"),
        "Get",
        &(BUS, "Interfaces"),
    ))
    .await
    .unwrap()
    .body()
    .deserialize()
    .unwrap();
    let ifaces: Vec<String> = ifaces.try_into().unwrap();
    assert!(ifaces.iter().any(|i| i == STATS), "{ifaces:?}");

    let m = stats_call(a.clone(), "GetStats", None).await.unwrap();
    let stats: HashMap<String, OwnedValue> = m.body().deserialize().unwrap();
    let get = |k: &str| -> u32 { stats[k].clone().try_into().unwrap() };
    assert!(get("ActiveConnections") >= 2, "{stats:?}");
    assert!(get("MatchRules") >= 1, "{stats:?}");
    assert!(get("BusNames") >= 2, "{stats:?}");

    let me = unique(&a);
    let m = stats_call(b.clone(), "GetConnectionStats", Some(me.clone()))
        .await
        .unwrap();
    let conn: HashMap<String, OwnedValue> = m.body().deserialize().unwrap();
    let name: String = conn["UniqueName"].clone().try_into().unwrap();
    assert_eq!(name, me);
    let rules: u32 = conn["MatchRules"].clone().try_into().unwrap();
    assert!(rules >= 1, "{conn:?}");
    let e = stats_call(b.clone(), "GetConnectionStats", Some(BUS.to_owned()))
        .await
        .expect_err("the bus itself");
    assert_eq!(
        err_name(&e),
        "org.freedesktop.DBus.Error.InvalidArgs",
        "{e}"
    );

    let m = stats_call(b.clone(), "GetAllMatchRules", None)
        .await
        .unwrap();
    let all: HashMap<String, Vec<String>> = m.body().deserialize().unwrap();
    assert!(
        all.get(&me)
            .is_some_and(|r| r.iter().any(|x| x.contains("org.example.Stats"))),
        "{all:?}"
    );
}
