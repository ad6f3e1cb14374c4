//! Misbehaving clients and resource limits: a peer that stops reading, one
//! that never authenticates, oversize messages, per-connection limits, and
//! the daemon's own lifecycle (SIGTERM, socket already in use).

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use zbus::message::{Message, Type};

const LIMITS_EXCEEDED: &str = "org.freedesktop.DBus.Error.LimitsExceeded";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_does_not_stall_others() {
    // Small outgoing quota, so the stuck peer's queue really fills up.
    let cfg = config_xml(&[("max_outgoing_bytes", 1_000_000)]);
    let mut bus = start_bus(Some(&cfg));
    let mut stuck = RawClient::connect_authenticated(&bus.socket);
    let stuck_name = stuck.hello();
    // Match everything (and eavesdrop), then never read again.
    for rule in ["", "eavesdrop=true"] {
        stuck.send(&bus_method_msg("AddMatch", &(rule,))).unwrap();
    }
    // Let the AddMatch calls be processed before the flood starts.
    let probe = connect(&bus.address).await;
    sync(&probe).await;
    assert!(bus_ok::<_, bool>(&probe, "NameHasOwner", &(stuck_name.as_str(),)).await);

    let service = connect(&bus.address).await;
    let client = connect(&bus.address).await;
    // The reader of the flood is a raw socket client: what it counts is what
    // the bus sent, with no client library's queueing in between.
    let mut reader = RawClient::connect_authenticated(&bus.socket);
    reader.hello();
    reader
        .send(&bus_method_msg(
            "AddMatch",
            &("type='signal',interface='org.busvisor.Flood'",),
        ))
        .unwrap();
    let mut ss = stream(&service);
    sync(&probe).await;
    const CALLS: u32 = 2000;
    const SIGNALS: u32 = 10000;
    let start = Instant::now();
    let server = tokio::spawn({
        let service = service.clone();
        async move {
            use futures_util::StreamExt;
            let mut answered = 0;
            while let Some(Ok(m)) = ss.next().await {
                if m.message_type() == Type::MethodCall && member(&m) == "Work" {
                    let (i,): (u32,) = m.body().deserialize().unwrap();
                    let r = Message::method_return(&m.header())
                        .build(&(i, "x".repeat(200)))
                        .unwrap();
                    service.send(&r).await.unwrap();
                    answered += 1;
                    if answered == CALLS {
                        break;
                    }
                }
            }
            // Then flood signals at full speed.
            let msgs: Vec<Message> = (0..SIGNALS)
                .map(|i| {
                    Message::signal("/flood", "org.busvisor.Flood", "Tick")
                        .build(&(i, "y".repeat(200)))
                        .unwrap()
                })
                .collect();
            for chunk in msgs.chunks(100) {
                service.send_all(chunk).await.unwrap();
            }
            answered
        }
    });
    let counter = std::thread::spawn(move || {
        let mut got = 0u32;
        let _ = reader.set_read_timeout(Some(Duration::from_secs(60)));
        while got < SIGNALS {
            let Some(m) = reader.recv() else { break };
            if member(&m) == "Tick" {
                let (i, _): (u32, String) = m.body().deserialize().unwrap();
                assert_eq!(i, got, "signals lost or reordered for a reading client");
                got += 1;
            }
        }
        (got == SIGNALS, got)
    });
    let dest = unique(&service);
    for i in 0..CALLS {
        let r = within(client.call_method(
            Some(dest.as_str()),
            "/w",
            Some("org.busvisor.W"),
            "Work",
            &(i,),
        ))
        .await
        .expect("Work call");
        let (j, _): (u32, String) = r.body().deserialize().unwrap();
        assert_eq!(i, j);
    }
    let (ok, got) = counter.join().unwrap();
    assert!(ok, "only {got} of {SIGNALS} signals arrived");
    assert_eq!(within(server).await.unwrap(), CALLS);
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    eprintln!("{CALLS} calls + {SIGNALS} signals with a stuck peer: {elapsed:?}");

    // The bus still accepts and serves new clients.
    bus.assert_alive();
    let late = connect(&bus.address).await;
    let names: Vec<String> = bus_ok(&late, "ListNames", &()).await;
    assert!(names.contains(&unique(&late)));
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_clients_block_nobody_and_time_out() {
    let cfg = config_xml(&[("auth_timeout", 1000)]);
    let mut bus = start_bus(Some(&cfg));
    // One that sends nothing, one that stops in the middle of SASL, one that
    // sent AUTH but never BEGIN.
    let mut silent = RawClient::connect(&bus.socket);
    let mut partial = RawClient::connect(&bus.socket);
    use std::io::Write;
    partial.stream.write_all(b"\0AUTH EXTERN").unwrap();
    let mut no_begin = RawClient::connect(&bus.socket);
    let uid_hex: String = nix::unistd::getuid()
        .as_raw()
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    no_begin
        .stream
        .write_all(format!("\0AUTH EXTERNAL {uid_hex}\r\n").as_bytes())
        .unwrap();
    let opened = Instant::now();

    // Others connect and talk meanwhile.
    let a = within_t(Duration::from_secs(3), connect(&bus.address)).await;
    let b = within_t(Duration::from_secs(3), connect(&bus.address)).await;
    let mut sb = stream(&b);
    let dest = unique(&b);
    let call = tokio::spawn({
        let a = a.clone();
        async move {
            within_t(
                Duration::from_secs(3),
                a.call_method(Some(dest.as_str()), "/", Some("org.busvisor.X"), "Hi", &()),
            )
            .await
        }
    });
    let m = next_matching(&mut sb, Duration::from_secs(3), |m| member(m) == "Hi")
        .await
        .expect("call delivered");
    within(b.send(&Message::method_return(&m.header()).build(&()).unwrap()))
        .await
        .unwrap();
    call.await.unwrap().expect("reply");

    // The unauthenticated sockets are dropped after about auth_timeout.
    for (what, c) in [
        ("silent", &mut silent),
        ("partial", &mut partial),
        ("no BEGIN", &mut no_begin),
    ] {
        assert!(
            c.closed_within(Duration::from_secs(5)),
            "{what} client not dropped"
        );
    }
    let t = opened.elapsed();
    assert!(t >= Duration::from_millis(800), "dropped too early ({t:?})");
    bus.assert_alive();
    // Authenticated clients were not affected.
    let _: Vec<String> = bus_ok(&a, "ListNames", &()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_message_disconnects_only_its_sender() {
    let cfg = config_xml(&[("max_message_size", 65536)]);
    let mut bus = start_bus(Some(&cfg));
    let big = connect(&bus.address).await;
    let other = connect(&bus.address).await;
    let watcher = connect(&bus.address).await;
    add_match(&watcher, "type='signal',interface='org.busvisor.Size'").await;
    add_match(&watcher, "type='signal',member='NameOwnerChanged'").await;
    let mut sw = stream(&watcher);
    let big_name = unique(&big);

    // Just under the limit: delivered.
    let small = Message::signal("/s", "org.busvisor.Size", "Small")
        .build(&("z".repeat(60000),))
        .unwrap();
    assert!(small.data().len() < 65536);
    within(big.send(&small)).await.unwrap();
    assert!(
        next_matching(&mut sw, OP_TIMEOUT, |m| member(m) == "Small")
            .await
            .is_some()
    );

    // Over the limit: not delivered, and the sender is disconnected.
    let huge = Message::signal("/s", "org.busvisor.Size", "Huge")
        .build(&("z".repeat(100_000),))
        .unwrap();
    let _ = within(big.send(&huge)).await;
    let gone = next_matching(&mut sw, OP_TIMEOUT, |m| {
        member(m) == "Huge"
            || (member(m) == "NameOwnerChanged"
                && m.body().deserialize::<(String, String, String)>().unwrap()
                    == (big_name.clone(), big_name.clone(), String::new()))
    })
    .await
    .expect("sender was not disconnected");
    assert_eq!(
        member(&gone),
        "NameOwnerChanged",
        "oversize message was delivered"
    );
    let r = big.call_method(Some(BUS), BUS_PATH, Some(BUS), "GetId", &());
    assert!(
        tokio::time::timeout(OP_TIMEOUT, r)
            .await
            .map(|r| r.is_err())
            .unwrap_or(true)
    );

    // Everyone else is fine.
    bus.assert_alive();
    let names: Vec<String> = bus_ok(&other, "ListNames", &()).await;
    assert!(!names.contains(&big_name));
    assert!(names.contains(&unique(&other)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_match_rules() {
    let cfg = config_xml(&[("max_match_rules_per_connection", 5)]);
    let bus = start_bus(Some(&cfg));
    let a = connect(&bus.address).await;
    for i in 0..5 {
        add_match(&a, &format!("type='signal',member='M{i}'")).await;
    }
    bus_err(
        &a,
        "AddMatch",
        &("type='signal',member='M5'",),
        LIMITS_EXCEEDED,
    )
    .await;
    // Another connection has its own quota.
    let b = connect(&bus.address).await;
    add_match(&b, "type='signal',member='M5'").await;
    // Removing one makes room again.
    assert!(
        bus_call(&a, "RemoveMatch", &("type='signal',member='M0'",))
            .await
            .is_ok()
    );
    add_match(&a, "type='signal',member='M5'").await;
    bus_err(
        &a,
        "AddMatch",
        &("type='signal',member='M6'",),
        LIMITS_EXCEEDED,
    )
    .await;
}

/// Ask for org.busvisor.N0.. until refused; returns how many were granted
/// (owned or queued) and the error name of the refusal.
async fn fill_names(conn: &zbus::Connection, want_reply: u32) -> (usize, Option<String>) {
    for i in 0..10 {
        match bus_call(conn, "RequestName", &(format!("org.busvisor.N{i}"), 0u32)).await {
            Ok(m) => assert_eq!(m.body().deserialize::<u32>().unwrap(), want_reply),
            Err(e) => return (i, Some(err_name(&e))),
        }
    }
    (10, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_names() {
    let cfg = config_xml(&[("max_names_per_connection", 3)]);
    let bus = start_bus(Some(&cfg));
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await;
    let (owned, err) = fill_names(&a, 1).await;
    assert_eq!(err.as_deref(), Some(LIMITS_EXCEEDED));
    assert!(
        (2..=3).contains(&owned),
        "{owned} names granted with max_names_per_connection=3"
    );
    // Queued requests count too: b gets the same number, in the queues.
    let (queued, err) = fill_names(&b, 2).await;
    assert_eq!(err.as_deref(), Some(LIMITS_EXCEEDED));
    assert_eq!(queued, owned);
    // Releasing makes room.
    assert_eq!(
        bus_ok::<_, u32>(&a, "ReleaseName", &("org.busvisor.N0",)).await,
        1
    );
    assert_eq!(
        bus_ok::<_, u32>(&a, "RequestName", &("org.busvisor.Z", 0u32)).await,
        1
    );
    bus_err(
        &a,
        "RequestName",
        &("org.busvisor.Z2", 0u32),
        LIMITS_EXCEEDED,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn names_limit_counts_the_unique_name() {
    // dbus-daemon 1.14 counts the unique name among a connection's names:
    // with max_names_per_connection=3 a connection gets 2 well-known names.
    let cfg = config_xml(&[("max_names_per_connection", 3)]);
    let bus = start_bus(Some(&cfg));
    let a = connect(&bus.address).await;
    let (owned, err) = fill_names(&a, 1).await;
    assert_eq!(err.as_deref(), Some(LIMITS_EXCEEDED));
    assert_eq!(owned, 2);
}

/// A bus whose stderr nobody reads (a harness's pipe) must keep serving:
/// log lines that do not fit are dropped, not waited for, and counted.
#[test]
fn unread_log_pipe_does_not_stall_the_bus() {
    if is_reference() {
        return;
    }
    let mut bus = start_bus_with_stderr_pipe();
    // RUST_LOG=debug (set by start_bus): several lines per connection, so
    // 1,000 connections write far more than a pipe holds (64 KiB).
    let started = Instant::now();
    for _ in 0..1000 {
        let mut c = RawClient::connect_authenticated(&bus.socket);
        let name = c.hello();
        assert!(name.starts_with(":1."), "Hello answered {name:?}");
    }
    eprintln!(
        "1000 connections with the log pipe full: {:?}",
        started.elapsed()
    );
    // The pipe did fill: once drained, the next line that gets through
    // tells how many were dropped.
    let mut pipe = bus.proc.child.stderr.take().expect("stderr pipe");
    nix::fcntl::fcntl(
        &pipe,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let mut drained = Vec::new();
    let mut chunk = [0u8; 65536];
    while let Ok(n) = pipe.read(&mut chunk) {
        if n == 0 {
            break;
        }
        drained.extend_from_slice(&chunk[..n]);
    }
    assert!(
        drained.len() >= 60_000,
        "only {} bytes of log",
        drained.len()
    );
    let mut c = RawClient::connect_authenticated(&bus.socket);
    c.hello();
    // The bus goes on logging the disconnects while the pipe is drained, so
    // the notice may already be in what was drained.
    let mut log = String::from_utf8_lossy(&drained).into_owned();
    assert!(
        wait_until(OP_TIMEOUT, || {
            if let Ok(n) = pipe.read(&mut chunk) {
                log.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
            log.contains("log lines dropped")
        }),
        "no notice of dropped lines; log:\n{log}"
    );
    bus.assert_alive();
}

#[test]
fn sigterm_exits_zero_and_removes_socket() {
    // busvisor's own contract: dbus-daemon dies of the signal instead and
    // leaves its socket file.
    if is_reference() {
        return;
    }
    let mut bus = start_bus(None);
    assert!(bus.socket.exists());
    // A connected client does not keep the bus alive.
    let _c = std::os::unix::net::UnixStream::connect(&bus.socket).unwrap();
    bus.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let st = bus
        .proc
        .wait_timeout(OP_TIMEOUT)
        .expect("bus did not exit on SIGTERM");
    assert_eq!(
        st.code(),
        Some(0),
        "exit status {st:?}; log:\n{}",
        bus.log()
    );
    assert!(!bus.socket.exists(), "socket file left behind");
}

#[test]
fn sigint_exits_zero_too() {
    // busvisor's own contract: dbus-daemon dies of the signal instead and
    // leaves its socket file.
    if is_reference() {
        return;
    }
    let mut bus = start_bus(None);
    bus.proc.signal(nix::sys::signal::Signal::SIGINT);
    let st = bus
        .proc
        .wait_timeout(OP_TIMEOUT)
        .expect("bus did not exit on SIGINT");
    assert_eq!(st.code(), Some(0));
    assert!(!bus.socket.exists());
}

#[test]
fn second_bus_on_same_socket_is_refused() {
    let mut first = start_bus(None);
    let addr = format!("--address=unix:path={}", first.socket.display());
    let out = run_tool(
        busvisor_bin(),
        &["--nofork", &addr, "--print-address"],
        OP_TIMEOUT,
    );
    assert!(!out.success(), "second bus started: {out:?}");
    assert!(
        out.stdout.trim().is_empty(),
        "second bus printed an address: {out:?}"
    );
    assert!(
        out.stderr.contains("in use") && out.stderr.contains(&first.socket.display().to_string()),
        "unclear message: {:?}",
        out.stderr
    );
    // The first bus is untouched and still reachable.
    first.assert_alive();
    assert!(first.socket.exists());
    let out = run_tool(
        "busctl",
        &["--address", &first.address, "list", "--no-pager"],
        OP_TIMEOUT,
    );
    out.assert_ok();
}

#[test]
fn stale_socket_file_is_replaced() {
    // A socket file nobody listens on (a crashed bus) does not prevent starting.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut child = ChildGuard::new(
        std::process::Command::new(busvisor_bin())
            .arg("--nofork")
            .arg(format!("--address=unix:path={}", path.display()))
            .arg("--print-address")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    use std::io::BufRead;
    let mut r = std::io::BufReader::new(child.child.stdout.take().unwrap());
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("unix:path="), "{line:?}");
    let out = run_tool(
        "busctl",
        &["--address", line.trim(), "list", "--no-pager"],
        OP_TIMEOUT,
    );
    out.assert_ok();
    assert!(child.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_disconnects_with_pending_calls_and_names() {
    // Many clients that own names and have calls in flight vanish at once;
    // the bus survives and cleans up.
    let mut bus = start_bus(None);
    let observer = connect(&bus.address).await;
    let target = connect(&bus.address).await;
    let t = unique(&target);
    for i in 0..20 {
        let mut raw = RawClient::connect_authenticated(&bus.socket);
        raw.hello();
        raw.send(&bus_method_msg(
            "RequestName",
            &(format!("org.busvisor.Gone{i}"), 0u32),
        ))
        .unwrap();
        let call = Message::method_call("/", "Pending")
            .destination(t.as_str())
            .build(&())
            .unwrap();
        raw.send(&call).unwrap();
        raw.send(&bus_method_msg("AddMatch", &("",))).unwrap();
        drop(raw);
    }
    sync(&observer).await;
    let ok = {
        let mut ok = false;
        for _ in 0..100 {
            let names: Vec<String> = bus_ok(&observer, "ListNames", &()).await;
            let unique = names.iter().filter(|n| n.starts_with(':')).count();
            if !names.iter().any(|n| n.starts_with("org.busvisor.Gone")) && unique == 2 {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ok
    };
    assert!(ok, "names of vanished clients remain");
    bus.assert_alive();
}

/// Over `max_connections_per_user`, Hello gets LimitsExceeded with
/// dbus-daemon's text and the connection may try again; once another
/// connection of that user leaves, the retry succeeds.
#[test]
fn hello_over_the_per_user_limit_gets_limits_exceeded() {
    let bus = start_bus(Some(&config_xml(&[("max_connections_per_user", 3)])));
    let mut first: Vec<RawClient> = (0..3)
        .map(|_| {
            let mut c = RawClient::connect_authenticated(&bus.socket);
            c.hello();
            c
        })
        .collect();
    let mut extra = RawClient::connect_authenticated(&bus.socket);
    extra.send(&hello_msg()).expect("send Hello");
    let reply = extra.recv().expect("an answer to Hello");
    let uid = nix::unistd::getuid().as_raw();
    assert_eq!(
        reply.header().error_name().map(|e| e.as_str().to_owned()),
        Some("org.freedesktop.DBus.Error.LimitsExceeded".to_owned())
    );
    let text: String = reply.body().deserialize().unwrap();
    assert_eq!(
        text,
        format!("The maximum number of active connections for UID {uid} has been reached")
    );
    drop(first.pop());
    assert!(
        wait_until(OP_TIMEOUT, || {
            extra.send(&hello_msg()).is_ok()
                && extra
                    .recv()
                    .is_some_and(|m| m.header().error_name().is_none())
        }),
        "Hello again after a connection left"
    );
}
