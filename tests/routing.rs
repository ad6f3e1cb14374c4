//! Message routing: sender stamping, unicast, broadcast and match rules,
//! eavesdropping, error replies for missing peers, reply tracking, fd passing.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use zbus::message::{Flags, Message, Type};

async fn emit(conn: &zbus::Connection, msg: &Message) {
    within(conn.send(msg)).await.expect("send");
}

fn signal<B>(path: &str, iface: &str, member: &str, body: &B) -> Message
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    Message::signal(path, iface, member)
        .build(body)
        .expect("signal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_is_stamped_and_spoofing_is_overwritten() {
    let bus = start_bus(None);
    let observer = connect(&bus.address).await;
    let victim = connect(&bus.address).await;
    let mut so = stream(&observer);
    add_match(&observer, "type='signal',interface='org.busvisor.Spoof'").await;
    let mut raw = RawClient::connect_authenticated(&bus.socket);
    let me = raw.hello();
    for (i, fake) in [BUS, unique(&victim).as_str(), ":1.12345"]
        .iter()
        .enumerate()
    {
        let m = Message::signal("/s", "org.busvisor.Spoof", format!("S{i}"))
            .sender(*fake)
            .build(&())
            .unwrap();
        raw.send(&m).unwrap();
    }
    // And one without any sender field.
    raw.send(&signal("/s", "org.busvisor.Spoof", "S3", &()))
        .unwrap();
    let got = collect_for(&mut so, Duration::from_millis(700), |m| {
        m.header().interface().map(|i| i.as_str()) == Some("org.busvisor.Spoof")
    })
    .await;
    assert_eq!(got.len(), 4, "{got:?}");
    for m in &got {
        assert_eq!(sender(m), me, "sender not stamped on {}", member(m));
    }
    // A spoofed method call reaches the callee with the true sender, and the
    // reply goes back to the true caller.
    let mut sv = stream(&victim);
    let call = Message::method_call("/v", "Who")
        .sender(unique(&observer))
        .destination(unique(&victim))
        .interface("org.busvisor.Spoof")
        .build(&())
        .unwrap();
    raw.send(&call).unwrap();
    let m = next_matching(&mut sv, OP_TIMEOUT, |m| member(m) == "Who")
        .await
        .expect("call delivered");
    assert_eq!(sender(&m), me);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicast_call_and_reply_between_clients() {
    let bus = start_bus(None);
    let service = connect(&bus.address).await;
    let client = connect(&bus.address).await;
    let name = "org.busvisor.Echo";
    bus_ok::<_, u32>(&service, "RequestName", &(name, 0u32)).await;
    let mut ss = stream(&service);
    let server = tokio::spawn({
        let service = service.clone();
        async move {
            use futures_util::StreamExt;
            let mut n = 0;
            while let Some(Ok(m)) = ss.next().await {
                if m.message_type() == Type::MethodCall && member(&m) == "Echo" {
                    let (s, i): (String, u32) = m.body().deserialize().unwrap();
                    let r = Message::method_return(&m.header())
                        .build(&(format!("echo:{s}"), i + 1))
                        .unwrap();
                    service.send(&r).await.unwrap();
                    n += 1;
                    if n == 20 {
                        break;
                    }
                }
            }
            n
        }
    });
    for i in 0..10u32 {
        // By well-known name and by unique name.
        for dest in [name.to_owned(), unique(&service)] {
            let r = within(client.call_method(
                Some(dest.as_str()),
                "/echo",
                Some("org.busvisor.Echo"),
                "Echo",
                &("x", i),
            ))
            .await
            .expect("Echo");
            assert_eq!(sender(&r), unique(&service));
            assert_eq!(r.header().destination().unwrap().as_str(), unique(&client));
            let (s, j): (String, u32) = r.body().deserialize().unwrap();
            assert_eq!((s.as_str(), j), ("echo:x", i + 1));
        }
    }
    assert_eq!(within(server).await.unwrap(), 20);
    // An error reply travels too.
    let mut ss = stream(&service);
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            within(client.call_method(Some(name), "/echo", Some("org.busvisor.Echo"), "Fail", &()))
                .await
        }
    });
    let m = next_matching(&mut ss, OP_TIMEOUT, |m| member(m) == "Fail")
        .await
        .unwrap();
    let e = Message::error(&m.header(), "org.busvisor.Error.Nope")
        .build(&("nope",))
        .unwrap();
    emit(&service, &e).await;
    let e = call.await.unwrap().expect_err("error reply");
    assert_eq!(err_name(&e), "org.busvisor.Error.Nope");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_only_matching_rules_and_unicast_needs_eavesdrop() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await; // rule on interface X
    let c = connect(&bus.address).await; // rule on interface Y
    let d = connect(&bus.address).await; // eavesdrop=true on X
    let e = connect(&bus.address).await; // eavesdrop=true, destination = b
    let f = connect(&bus.address).await; // eavesdrop=true, destination = c
    let g = connect(&bus.address).await; // no rule at all
    let x = "org.busvisor.X";
    add_match(&b, &format!("type='signal',interface='{x}'")).await;
    add_match(&c, "type='signal',interface='org.busvisor.Y'").await;
    add_match(&d, &format!("eavesdrop=true,interface='{x}'")).await;
    add_match(&e, &format!("eavesdrop=true,destination='{}'", unique(&b))).await;
    add_match(&f, &format!("eavesdrop=true,destination='{}'", unique(&c))).await;
    let mut streams: Vec<_> = [&b, &c, &d, &e, &f, &g].iter().map(|x| stream(x)).collect();

    // Broadcast on X, then unicast to b on X, then a method call to b on X.
    emit(&a, &signal("/p", x, "Broad", &())).await;
    let uni = Message::signal("/p", x, "Uni")
        .destination(unique(&b))
        .build(&())
        .unwrap();
    emit(&a, &uni).await;
    let call = Message::method_call("/p", "Call")
        .destination(unique(&b))
        .interface(x)
        .with_flags(Flags::NO_REPLY_EXPECTED)
        .build(&())
        .unwrap();
    emit(&a, &call).await;
    // A signal to the bus itself is not a broadcast.
    let to_bus = Message::signal("/p", x, "ToBus")
        .destination(BUS)
        .build(&())
        .unwrap();
    emit(&a, &to_bus).await;
    sync(&a).await;

    let mut seen = Vec::new();
    for s in streams.iter_mut() {
        let got = collect_for(s, Duration::from_millis(500), |m| {
            m.header().interface().map(|i| i.as_str()) == Some(x)
        })
        .await;
        let mut members: Vec<String> = got.iter().map(member).collect();
        members.sort();
        seen.push(members);
    }
    let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        seen[0],
        v(&["Broad", "Call", "Uni"]),
        "b: broadcast by rule, unicast as recipient"
    );
    assert_eq!(seen[1], v(&[]), "c: rule on another interface");
    assert_eq!(
        seen[2],
        v(&["Broad", "Call", "ToBus", "Uni"]),
        "d: eavesdrop on X sees unicast too"
    );
    assert_eq!(
        seen[3],
        v(&["Call", "Uni"]),
        "e: eavesdrops on messages to b"
    );
    assert_eq!(seen[4], v(&[]), "f: eavesdrops on messages to c");
    assert_eq!(seen[5], v(&[]), "g: no rule");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicast_signal_not_seen_by_third_party_without_eavesdrop() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await;
    let c = connect(&bus.address).await;
    // c's rule names everything but eavesdrop, including the destination.
    add_match(&c, "type='signal'").await;
    add_match(&c, &format!("type='signal',destination='{}'", unique(&b))).await;
    add_match(&c, "type='method_call'").await;
    let mut sb = stream(&b);
    let mut sc = stream(&c);
    let uni = Message::signal("/p", "org.busvisor.Private", "Secret")
        .destination(unique(&b))
        .build(&())
        .unwrap();
    emit(&a, &uni).await;
    let got_b = next_matching(&mut sb, OP_TIMEOUT, |m| member(m) == "Secret").await;
    assert!(got_b.is_some(), "recipient did not get the unicast signal");
    let got_c = collect_for(&mut sc, Duration::from_millis(500), |m| {
        member(m) == "Secret"
    })
    .await;
    assert!(
        got_c.is_empty(),
        "third party saw a unicast signal: {got_c:?}"
    );
}

/// One signal of the match-rule table: (path, interface, member) plus a body.
fn table_signals(emitter2: bool) -> Vec<Message> {
    let op = zbus::wire::ObjectPath::try_from("/aa/bb/cc").unwrap();
    if emitter2 {
        return vec![signal("/i", "org.busvisor.M", "Alpha", &("foo", "bar"))];
    }
    vec![
        signal("/a/b", "org.busvisor.M", "Alpha", &("foo", "bar")), // A
        signal("/a/bc", "org.busvisor.M", "Beta", &("foo.bar",)),   // B
        signal("/a/b/c", "org.busvisor.N", "Alpha", &("/aa/bb/",)), // C
        signal("/", "org.busvisor.N", "Gamma", &(op,)),             // D
        signal(
            "/x",
            "org.busvisor.M",
            "Delta",
            &("foo.bar.baz", "x", "y", "last"),
        ), // E
        signal("/a", "org.busvisor.M", "Eps", &("/aa",)),           // F
        signal("/a/b", "org.busvisor.M", "Zeta", &("/aa/bb",)),     // G
        signal("/h", "org.busvisor.N", "Eta", &("/",)),             // H
        signal("/j", "org.busvisor.N", "Theta", &(7u32, "foo")),    // J: arg0 not a string
    ]
}

fn tag(m: &Message) -> &'static str {
    let h = m.header();
    match (
        h.path().map(|p| p.as_str()).unwrap_or(""),
        h.member().map(|p| p.as_str()).unwrap_or(""),
    ) {
        ("/a/b", "Alpha") => "A",
        ("/a/bc", "Beta") => "B",
        ("/a/b/c", "Alpha") => "C",
        ("/", "Gamma") => "D",
        ("/x", "Delta") => "E",
        ("/a", "Eps") => "F",
        ("/a/b", "Zeta") => "G",
        ("/h", "Eta") => "H",
        ("/i", "Alpha") => "I",
        ("/j", "Theta") => "J",
        _ => "?",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_rule_keys() {
    let bus = start_bus(None);
    let emitter = connect(&bus.address).await;
    let emitter2 = connect(&bus.address).await;
    bus_ok::<_, u32>(&emitter, "RequestName", &("org.busvisor.Emitter", 0u32)).await;
    let e2 = unique(&emitter2);
    let all = "A B C D E F G H I J";
    let cases: Vec<(String, &str)> = vec![
        ("type='signal'".into(), all),
        ("type='method_call'".into(), ""),
        ("sender='org.busvisor.Emitter'".into(), "A B C D E F G H J"),
        (
            format!("sender='{}'", unique(&emitter)),
            "A B C D E F G H J",
        ),
        (format!("sender='{e2}'"), "I"),
        ("sender='org.busvisor.NoOne'".into(), ""),
        ("interface='org.busvisor.N'".into(), "C D H J"),
        ("member='Alpha'".into(), "A C I"),
        ("path='/a/b'".into(), "A G"),
        ("path_namespace='/a/b'".into(), "A C G"),
        ("path_namespace='/a'".into(), "A B C F G"),
        ("path_namespace='/'".into(), all),
        ("arg0='foo'".into(), "A I"),
        ("arg1='bar'".into(), "A I"),
        ("arg3='last'".into(), "E"),
        ("arg1='foo'".into(), "J"),
        ("arg0='/aa/bb/cc'".into(), ""),
        ("arg0path='/aa/'".into(), "C D G H"),
        ("arg0path='/aa/bb/cc'".into(), "C D H"),
        ("arg0path='/aa'".into(), "F H"),
        ("arg0namespace='foo.bar'".into(), "B E"),
        ("arg0namespace='foo'".into(), "A B E I"),
        (
            "type='signal',interface='org.busvisor.M',member='Alpha',path='/a/b'".into(),
            "A",
        ),
        ("sender='org.busvisor.Emitter',arg0='foo'".into(), "A"),
        ("destination='org.busvisor.Emitter'".into(), ""),
    ];
    let mut receivers = Vec::new();
    for (rule, _) in &cases {
        let r = connect(&bus.address).await;
        let s = stream(&r);
        add_match(&r, rule).await;
        add_match(&r, "type='signal',interface='org.busvisor.End'").await;
        receivers.push((r, s));
    }
    for m in table_signals(false) {
        emit(&emitter, &m).await;
    }
    for m in table_signals(true) {
        emit(&emitter2, &m).await;
    }
    emit(&emitter, &signal("/end", "org.busvisor.End", "End", &())).await;
    emit(&emitter2, &signal("/end", "org.busvisor.End", "End", &())).await;

    let mut failures = Vec::new();
    for ((rule, want), (_conn, s)) in cases.iter().zip(receivers.iter_mut()) {
        use futures_util::StreamExt;
        let mut got = BTreeSet::new();
        let mut ends = 0;
        let r = tokio::time::timeout(OP_TIMEOUT, async {
            while let Some(Ok(m)) = s.next().await {
                if m.message_type() != Type::Signal {
                    continue;
                }
                let iface = m
                    .header()
                    .interface()
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                if iface == "org.busvisor.End" {
                    ends += 1;
                    if ends == 2 {
                        break;
                    }
                } else if iface.starts_with("org.busvisor.") {
                    got.insert(tag(&m));
                }
            }
        })
        .await;
        assert!(r.is_ok(), "rule {rule}: End signals never arrived");
        let want: BTreeSet<&str> = want.split_whitespace().collect();
        if got != want {
            failures.push(format!("rule {rule}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "match rule mismatches:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_missing_names() {
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    let e = within(a.call_method(
        Some("org.busvisor.Nobody"),
        "/",
        Some("org.busvisor.X"),
        "Foo",
        &(),
    ))
    .await
    .expect_err("no owner");
    assert_eq!(err_name(&e), "org.freedesktop.DBus.Error.ServiceUnknown");
    let e = within(a.call_method(Some(":1.9999"), "/", Some("org.busvisor.X"), "Foo", &()))
        .await
        .expect_err("no such unique name");
    assert_eq!(err_name(&e), "org.freedesktop.DBus.Error.ServiceUnknown");

    // NO_AUTO_START: NameHasNoOwner instead.
    let mut sa = stream(&a);
    let call = Message::method_call("/", "Foo")
        .destination("org.busvisor.Nobody")
        .interface("org.busvisor.X")
        .with_flags(Flags::NO_AUTO_START)
        .build(&())
        .unwrap();
    let serial = call.primary_header().serial_num();
    emit(&a, &call).await;
    let r = next_matching(&mut sa, OP_TIMEOUT, |m| {
        m.header().reply_serial() == Some(serial)
    })
    .await
    .expect("reply to NO_AUTO_START call");
    assert_eq!(r.message_type(), Type::Error);
    assert_eq!(
        r.header().error_name().unwrap().as_str(),
        "org.freedesktop.DBus.Error.NameHasNoOwner"
    );
    assert_eq!(sender(&r), BUS);

    // The same through busctl.
    let out = run_tool(
        "busctl",
        &[
            "--address",
            &bus.address,
            "call",
            "org.busvisor.Nobody",
            "/",
            "org.busvisor.X",
            "Foo",
        ],
        OP_TIMEOUT,
    );
    assert!(!out.success());
    assert!(
        out.stderr.contains("not provided by any .service files"),
        "{out:?}"
    );
    let out = run_tool(
        "busctl",
        &[
            "--address",
            &bus.address,
            "--auto-start=no",
            "call",
            "org.busvisor.Nobody",
            "/",
            "org.busvisor.X",
            "Foo",
        ],
        OP_TIMEOUT,
    );
    assert!(!out.success());
    assert!(out.stderr.contains("does not exist"), "{out:?}");
}

/// A call from a new client to another that never answers, once delivered:
/// the callee, its message stream, and the caller's pending call.
async fn hanging_call(
    address: &str,
) -> (
    zbus::Connection,
    zbus::MessageStream,
    tokio::task::JoinHandle<zbus::Result<Message>>,
) {
    let a = connect(address).await;
    let b = connect(address).await;
    let mut sb = stream(&b);
    let dest = unique(&b);
    let call = tokio::spawn(async move {
        within(a.call_method(
            Some(dest.as_str()),
            "/",
            Some("org.busvisor.X"),
            "Hang",
            &(),
        ))
        .await
    });
    next_matching(&mut sb, OP_TIMEOUT, |m| member(m) == "Hang")
        .await
        .expect("call delivered");
    (b, sb, call)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callee_disconnecting_gives_no_reply_error() {
    let bus = start_bus(None);
    let (b, sb, call) = hanging_call(&bus.address).await;
    drop(sb);
    drop(b);
    let e = call.await.unwrap().expect_err("must fail");
    assert_eq!(err_name(&e), "org.freedesktop.DBus.Error.NoReply", "{e}");
}

/// With `reply_timeout`, a call nobody answers gets NoReply from the bus
/// when the time is up, with dbus-daemon's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_call_times_out_with_no_reply() {
    let bus = start_bus(Some(&config_xml(&[("reply_timeout", 400)])));
    let started = std::time::Instant::now();
    let (b, _sb, call) = hanging_call(&bus.address).await;
    let e = call.await.unwrap().expect_err("must time out");
    let waited = started.elapsed();
    assert_eq!(err_name(&e), "org.freedesktop.DBus.Error.NoReply", "{e}");
    assert!(
        e.to_string()
            .contains("Message did not receive a reply (timeout by message bus)"),
        "{e}"
    );
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(5),
        "timed out after {waited:?}"
    );
    // The bus stays healthy for others.
    sync(&b).await;
}

/// b sends `a` an invented reply and error, then a second reply to a's real
/// call; returns what `a` got of the forged ones, and what b got back.
async fn forge_replies(address: &str) -> (Vec<Message>, Vec<Message>) {
    let a = connect(address).await;
    let b = connect(address).await;
    let mut sa = stream(&a);
    let mut sb = stream(&b);
    let fake_call = Message::method_call("/", "Never")
        .sender(unique(&a))
        .destination(unique(&b))
        .build(&())
        .unwrap();
    let forged = Message::method_return(&fake_call.header())
        .build(&("forged",))
        .unwrap();
    emit(&b, &forged).await;
    let forged_err = Message::error(&fake_call.header(), "org.busvisor.Forged")
        .build(&("forged",))
        .unwrap();
    emit(&b, &forged_err).await;
    // Routed before the call below (a's messages could overtake b's).
    sync(&b).await;
    // A real call: its reply is delivered once; a second is unrequested.
    let dest = unique(&b);
    let call = tokio::spawn({
        let a = a.clone();
        async move {
            within(a.call_method(
                Some(dest.as_str()),
                "/",
                Some("org.busvisor.X"),
                "Once",
                &(),
            ))
            .await
        }
    });
    let m = next_matching(&mut sb, OP_TIMEOUT, |m| member(m) == "Once")
        .await
        .unwrap();
    let r1 = Message::method_return(&m.header())
        .build(&("first",))
        .unwrap();
    let r2 = Message::method_return(&m.header())
        .build(&("forged",))
        .unwrap();
    emit(&b, &r1).await;
    emit(&b, &r2).await;
    let r = call.await.unwrap().expect("real reply");
    assert_eq!(r.body().deserialize::<String>().unwrap(), "first");
    sync(&b).await;
    sync(&a).await;
    let b_name = unique(&b);
    let got = collect_for(&mut sa, Duration::from_millis(500), |m| {
        matches!(m.message_type(), Type::MethodReturn | Type::Error)
            && sender(m) == b_name
            && m.body().deserialize::<String>().ok().as_deref() == Some("forged")
    })
    .await;
    let errors = collect_for(&mut sb, Duration::from_millis(300), |m| {
        m.message_type() == Type::Error && sender(m) == "org.freedesktop.DBus"
    })
    .await;
    (got, errors)
}

/// Replies nobody asked for (invented, or a second one) are up to the
/// policy, as in dbus-daemon: session.conf's `<allow send_destination="*"
/// eavesdrop="true"/>` lets them through; a policy whose allow rules do not
/// say `eavesdrop="true"` refuses them, and the replier gets AccessDenied
/// (an allow rule's `send_requested_reply` defaults to true).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrequested_replies_follow_the_policy() {
    let bus = start_bus(Some(&config_xml(&[])));
    let (got, errors) = forge_replies(&bus.address).await;
    assert_eq!(got.len(), 3, "session.conf delivers them: {got:?}");
    assert!(errors.is_empty(), "{errors:?}");

    let strict = config_xml(&[]).replace(
        r#"<allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>"#,
        r#"<allow send_destination="*"/>
    <allow receive_sender="*"/>"#,
    );
    assert_ne!(strict, config_xml(&[]));
    let bus = start_bus(Some(&strict));
    let (got, errors) = forge_replies(&bus.address).await;
    assert!(got.is_empty(), "unrequested replies delivered: {got:?}");
    // The first two came before the call and went by unread; the second
    // reply's is here.
    assert_eq!(errors.len(), 1, "{errors:?}");
    for e in &errors {
        assert_eq!(
            e.header().error_name().unwrap().as_str(),
            "org.freedesktop.DBus.Error.AccessDenied"
        );
        let text: String = e.body().deserialize().unwrap();
        assert!(
            text.starts_with("Rejected send message, 0 matched rules; type=\"")
                && text.contains("requested_reply=\"0\""),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_passing_through_the_bus() {
    use std::io::{Read, Write};
    let bus = start_bus(None);
    let a = connect(&bus.address).await;
    let b = connect(&bus.address).await;
    let (rd, wr) = nix::unistd::pipe().unwrap();
    let mut sb = stream(&b);
    let call = Message::method_call("/", "TakeFd")
        .destination(unique(&b))
        .interface("org.busvisor.Fd")
        .build(&(zbus::wire::Fd::from(&rd),))
        .unwrap();
    drop(rd);
    let serial = call.primary_header().serial_num();
    let mut sa = stream(&a);
    emit(&a, &call).await;
    let m = next_matching(&mut sb, OP_TIMEOUT, |m| member(m) == "TakeFd")
        .await
        .expect("fd call delivered");
    assert_eq!(m.data().fds().len(), 1);
    let body = m.body();
    let fd: zbus::wire::Fd = body.deserialize().unwrap();
    let owned = std::os::fd::AsFd::as_fd(&fd).try_clone_to_owned().unwrap();
    drop(fd);
    drop(body);
    let mut w = std::fs::File::from(wr);
    w.write_all(b"through the bus").unwrap();
    drop(w);
    drop(m);
    let mut r = std::fs::File::from(owned);
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    assert_eq!(s, "through the bus");
    // And back: b replies with an fd of its own.
    let (rd2, wr2) = nix::unistd::pipe().unwrap();
    let hdr_call = Message::method_call("/", "TakeFd")
        .sender(unique(&a))
        .destination(unique(&b))
        .serial(serial)
        .build(&())
        .unwrap();
    let reply = Message::method_return(&hdr_call.header())
        .build(&(zbus::wire::Fd::from(&rd2),))
        .unwrap();
    drop(rd2);
    emit(&b, &reply).await;
    let rm = next_matching(&mut sa, OP_TIMEOUT, |m| {
        m.header().reply_serial() == Some(serial)
    })
    .await
    .expect("reply with fd");
    let body = rm.body();
    let fd: zbus::wire::Fd = body.deserialize().unwrap();
    let dup = std::os::fd::AsFd::as_fd(&fd).try_clone_to_owned().unwrap();
    drop(fd);
    drop(body);
    drop(rm);
    let mut w = std::fs::File::from(wr2);
    w.write_all(b"and back").unwrap();
    drop(w);
    let mut s = String::new();
    std::fs::File::from(dup).read_to_string(&mut s).unwrap();
    assert_eq!(s, "and back");
}

/// Calls with and without fds, sent in bursts so that the bus reads several
/// in one chunk: every fd reaches the message that carried it, and only it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_fd_messages_keep_their_fds() {
    let mut bus = start_bus(None);
    let sender = connect(&bus.address).await;
    let receiver = connect(&bus.address).await;
    let mut rs = stream(&receiver);
    let dest = unique(&receiver);
    let file = tempfile::tempfile().expect("temp file");
    const N: u32 = 600;
    let msgs: Vec<Message> = (0..N)
        .map(|i| {
            let b = Message::method_call("/fd", "Take")
                .destination(dest.as_str())
                .interface("org.busvisor.Fd")
                .with_flags(zbus::message::Flags::NO_REPLY_EXPECTED);
            if i % 5 == 3 {
                b.build(&(zbus::wire::Fd::from(&file), i)).unwrap()
            } else {
                b.build(&(i, "no fd here")).unwrap()
            }
        })
        .collect();
    for chunk in msgs.chunks(50) {
        within(sender.send_all(chunk)).await.expect("send_all");
    }
    let mut got = 0u32;
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        use futures_util::StreamExt;
        while let Some(Ok(m)) = rs.next().await {
            if member(&m) != "Take" {
                continue;
            }
            let fds = m.data().fds().len();
            let sig = m.body().signature().to_string();
            if sig.contains('h') {
                let (_fd, i): (zbus::wire::Fd<'_>, u32) = m.body().deserialize().unwrap();
                assert_eq!(i % 5, 3, "an fd message out of place: {i}");
                assert_eq!(fds, 1, "message {i} lost its fd");
                assert_eq!(i, got, "order");
            } else {
                let (i, _): (u32, String) = m.body().deserialize().unwrap();
                assert_ne!(i % 5, 3);
                assert_eq!(fds, 0, "message {i} got an fd that was not its own");
                assert_eq!(i, got, "order");
            }
            got += 1;
            if got == N {
                break;
            }
        }
    })
    .await;
    assert!(r.is_ok(), "only {got} of {N} messages arrived");
    bus.assert_alive();
}

/// A client that did not negotiate fd passing: a call carrying an fd to it
/// gets NotSupported at once, and its own calls still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fds_to_a_client_without_fd_passing_are_refused() {
    let mut bus = start_bus(None);
    let mut raw = RawClient::connect_authenticated(&bus.socket);
    let raw_name = raw.hello();
    let caller = connect(&bus.address).await;
    let file = tempfile::tempfile().expect("temp file");
    let e = within(caller.call_method(
        Some(raw_name.as_str()),
        "/fd",
        Some("org.busvisor.Fd"),
        "Take",
        &(zbus::wire::Fd::from(&file),),
    ))
    .await
    .expect_err("the call cannot be delivered");
    assert_eq!(
        err_name(&e),
        "org.freedesktop.DBus.Error.NotSupported",
        "{e}"
    );
    // The same call without an fd is delivered.
    let call = Message::method_call("/fd", "Take")
        .destination(raw_name.as_str())
        .interface("org.busvisor.Fd")
        .with_flags(zbus::message::Flags::NO_REPLY_EXPECTED)
        .build(&(7u32,))
        .unwrap();
    within(caller.send(&call)).await.unwrap();
    let _ = raw.set_read_timeout(Some(Duration::from_secs(5)));
    let got = loop {
        let m = raw.recv().expect("message for the raw client");
        if member(&m) == "Take" {
            break m;
        }
    };
    assert_eq!(got.body().deserialize::<u32>().unwrap(), 7);
    bus.assert_alive();
}
