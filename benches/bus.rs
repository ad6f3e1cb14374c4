//! Bus benchmark: drives one or more running D-Bus buses with zbus clients and
//! prints one row per workload, side by side for every bus.
//!
//! Usage (normally through `scripts/bench.sh`):
//!
//! ```text
//! cargo bench --bench bus -- [--quick] --bus NAME,PID,ADDRESS [--bus NAME,PID,ADDRESS ...]
//! ```
//!
//! The last `--bus` is the reference: every other bus's rate, CPU and memory
//! get their ratio to it (bench.sh passes busvisor, with `BASELINE` an older
//! busvisor as `busvisor-before`, then dbus-daemon).
//!
//! For every workload the bus process's own CPU time (utime + stime from
//! `/proc/PID/stat`) is read before and after the measured phase, so the CPU
//! the clients burn on the same 2 cores does not blur the comparison. Each
//! row runs in rounds (3 in a full run, each a third of the work), bus after
//! bus, the order reversed every round, and sums them: background load that
//! comes and goes on a shared machine hits all buses alike.
//!
//! What "a message" is, for the CPU-per-message column:
//! * method-call rows: 2 per call (the call routed to the service, the reply
//!   routed back);
//! * driver rows: 2 per call (the call to org.freedesktop.DBus and the
//!   bus's reply);
//! * signal rows: one per delivery, i.e. signals x subscribers;
//! * connection setup: per connection (connect, auth, Hello, disconnect).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use tokio::sync::Notify;
use zbus::message::{Message, Type};
use zbus::{Connection, MessageStream, connection};

mod common;
use common::{Bus, Res};

const IFACE: &str = "org.example.Bench";
const PATH: &str = "/org/example/Bench";
/// A phase that makes no progress for this long is reported as stalled.
const STALL: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- arguments

#[derive(Clone)]
struct Params {
    quick: bool,
    /// Rounds per row (the workload sizes below are per round).
    rounds: usize,
    /// Run only the rows whose name contains this.
    only: Option<String>,
    /// Time limit of one measured phase.
    limit: Duration,
    latency_calls: usize,
    pipelined_calls: usize,
    window: usize,
    payload_calls: usize,
    driver_calls: usize,
    signals: usize,
    idle_conns: usize,
    setup_time: Duration,
}

impl Params {
    fn wanted(&self, row: &str) -> bool {
        self.only.as_deref().is_none_or(|o| row.contains(o))
    }

    fn new(quick: bool) -> Self {
        if quick {
            Params {
                quick,
                rounds: 1,
                only: None,
                limit: Duration::from_millis(700),
                latency_calls: 2_000,
                pipelined_calls: 20_000,
                window: 64,
                payload_calls: 10_000,
                driver_calls: 20_000,
                signals: 5_000,
                idle_conns: 200,
                setup_time: Duration::from_millis(500),
            }
        } else {
            Params {
                quick,
                rounds: 3,
                only: None,
                limit: Duration::from_millis(2_500),
                latency_calls: 7_000,
                pipelined_calls: 100_000,
                window: 64,
                payload_calls: 35_000,
                driver_calls: 100_000,
                signals: 35_000,
                idle_conns: 1_000,
                setup_time: Duration::from_millis(700),
            }
        }
    }
}

fn parse_args() -> Res<(Params, Vec<Bus>)> {
    let mut quick = false;
    let mut only = None;
    let mut buses = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            // `cargo bench` appends this to a harness = false target.
            "--bench" => {}
            "--only" => only = Some(args.next().ok_or("--only needs a pattern")?),
            "--bus" => buses.push(args.next().ok_or("--bus needs NAME,PID,ADDRESS")?.parse()?),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if buses.is_empty() {
        return Err("usage: bus [--quick] --bus NAME,PID,ADDRESS [--bus ...]".into());
    }
    let mut p = Params::new(quick);
    p.only = only;
    Ok((p, buses))
}

// ---------------------------------------------------------- /proc readings

fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Field 2 (comm) may hold spaces: count from the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3, so field N is f[N - 3].
    let utime: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    utime + stime
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------- results

#[derive(Default, Clone)]
struct Outcome {
    /// Operations per second (calls, deliveries, connections).
    rate: f64,
    /// Units the bus handled, for CPU per unit.
    units: u64,
    /// Bus CPU ticks spent during the measured phase.
    ticks: u64,
    /// Median and p99 latency in µs (latency row only).
    lat: Option<(f64, f64)>,
    /// Errors seen (error replies, missing deliveries).
    errors: u64,
    failed: Option<String>,
}

struct Row {
    name: String,
    rate_unit: &'static str,
    per: &'static str,
    outcomes: Vec<Outcome>,
}

impl Outcome {
    /// One outcome for several rounds of the same workload: totals, and the
    /// mean of the latency figures.
    fn merge(rounds: Vec<Outcome>) -> Outcome {
        let secs: f64 = rounds
            .iter()
            .filter(|o| o.rate > 0.0)
            .map(|o| o.units as f64 / o.rate)
            .sum();
        let units = rounds.iter().map(|o| o.units).sum();
        let lats: Option<Vec<(f64, f64)>> = rounds.iter().map(|o| o.lat).collect();
        let lat = lats.filter(|l| !l.is_empty()).map(|l| {
            let n = l.len() as f64;
            let (a, b) = l
                .iter()
                .fold((0.0, 0.0), |(a, b), (p50, p99)| (a + p50, b + p99));
            (a / n, b / n)
        });
        Outcome {
            rate: if secs > 0.0 { units as f64 / secs } else { 0.0 },
            units,
            ticks: rounds.iter().map(|o| o.ticks).sum(),
            lat,
            errors: rounds.iter().map(|o| o.errors).sum(),
            failed: rounds.iter().find_map(|o| o.failed.clone()),
        }
    }
}

async fn measure<F, Fut>(bus: &Bus, f: F) -> Outcome
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Res<Outcome>>,
{
    match f().await {
        Ok(o) => o,
        Err(e) => Outcome {
            failed: Some(format!("{}: {e}", bus.name)),
            ..Default::default()
        },
    }
}

// ---------------------------------------------------------------- clients

async fn connect(address: &str) -> Res<Connection> {
    Ok(connection::Builder::address(address).build().await?)
}

async fn connect_owned(address: String) -> Res<Connection> {
    connect(&address).await
}

async fn add_match(conn: &Connection, rule: &str) -> Res<()> {
    conn.call_method(
        Some("org.freedesktop.DBus"),
        "/org/freedesktop/DBus",
        Some("org.freedesktop.DBus"),
        "AddMatch",
        &rule,
    )
    .await?;
    Ok(())
}

/// A service that answers every method call with an empty return, replying
/// to everything that is already queued in one write.
fn spawn_service(conn: Connection, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    // The stream must exist before anything is sent to the service: zbus
    // does not keep messages that arrive while no stream is active.
    let mut stream = MessageStream::from(&conn);
    tokio::spawn(async move {
        let mut replies = Vec::with_capacity(128);
        while let Some(Ok(msg)) = stream.next().await {
            let mut next = Some(msg);
            while let Some(m) = next.take() {
                if m.message_type() == Type::MethodCall
                    && let Ok(r) = Message::method_return(&m.header()).build(&())
                {
                    replies.push(r);
                }
                if replies.len() < 128
                    && let Some(Some(Ok(m))) = stream.next().now_or_never()
                {
                    next = Some(m);
                }
            }
            if !replies.is_empty() {
                if conn.send_all(&replies).await.is_err() {
                    break;
                }
                replies.clear();
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
    })
}

/// What one pipelined caller sends.
#[derive(Clone)]
enum CallKind {
    /// An empty call to the service.
    Empty { dest: String },
    /// A call carrying `ay` of the given size.
    Payload { dest: String, body: Arc<Vec<u8>> },
    /// GetNameOwner("org.freedesktop.DBus") on the driver.
    Driver,
}

fn build_call(kind: &CallKind) -> Res<Message> {
    Ok(match kind {
        CallKind::Empty { dest } => Message::method_call(PATH, "Ping")
            .interface(IFACE)
            .destination(dest.as_str())
            .build(&())?,
        CallKind::Payload { dest, body } => Message::method_call(PATH, "Put")
            .interface(IFACE)
            .destination(dest.as_str())
            .build(&body.as_slice())?,
        CallKind::Driver => Message::method_call("/org/freedesktop/DBus", "GetNameOwner")
            .interface("org.freedesktop.DBus")
            .destination("org.freedesktop.DBus")
            .build(&"org.freedesktop.DBus")?,
    })
}

/// Keeps `window` calls in flight until `total` are answered or `deadline`
/// passes (then stops sending and drains). Returns (answered, errors).
async fn pipelined_caller(
    conn: Connection,
    kind: CallKind,
    total: usize,
    window: usize,
    deadline: Instant,
) -> Res<(u64, u64)> {
    let mut stream = MessageStream::from(&conn);
    let mut sent = 0usize;
    let mut answered = 0u64;
    let mut errors = 0u64;
    let mut batch = Vec::with_capacity(window);
    for _ in 0..window.min(total) {
        batch.push(build_call(&kind)?);
    }
    sent += batch.len();
    conn.send_all(&batch).await?;
    batch.clear();
    while (answered as usize) < sent {
        let Ok(next) = tokio::time::timeout(STALL, stream.next()).await else {
            return Err(format!(
                "stalled: no reply for {STALL:?}, {answered} of {sent} calls answered"
            )
            .into());
        };
        let Some(msg) = next else {
            return Err("connection closed".into());
        };
        let mut next = Some(msg?);
        let mut got = 0;
        while let Some(m) = next.take() {
            match m.message_type() {
                Type::MethodReturn => got += 1,
                Type::Error => {
                    got += 1;
                    errors += 1;
                }
                _ => {}
            }
            if let Some(Some(Ok(m))) = stream.next().now_or_never() {
                next = Some(m);
            }
        }
        answered += got;
        if Instant::now() < deadline {
            let n = (got as usize).min(total - sent);
            for _ in 0..n {
                batch.push(build_call(&kind)?);
            }
            if !batch.is_empty() {
                sent += batch.len();
                conn.send_all(&batch).await?;
                batch.clear();
            }
        }
    }
    Ok((answered, errors))
}

// ------------------------------------------------------------- workloads

async fn wl_latency(bus: &Bus, p: &Params) -> Res<Outcome> {
    let svc = connect(&bus.address).await?;
    let caller = connect(&bus.address).await?;
    let dest = svc.unique_name().ok_or("no unique name")?.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let h = spawn_service(svc.clone(), stop.clone());
    let kind = CallKind::Empty { dest };
    let mut stream = MessageStream::from(&caller);
    // Warm up.
    for _ in 0..50 {
        caller.send(&build_call(&kind)?).await?;
        wait_reply(&mut stream).await?;
    }
    let mut lats = Vec::with_capacity(p.latency_calls);
    let mut errors = 0;
    let t0 = cpu_ticks(bus.pid);
    let start = Instant::now();
    let deadline = start + p.limit;
    while lats.len() < p.latency_calls && Instant::now() < deadline {
        let m = build_call(&kind)?;
        let s = Instant::now();
        caller.send(&m).await?;
        if !wait_reply(&mut stream).await? {
            errors += 1;
        }
        lats.push(s.elapsed().as_secs_f64() * 1e6);
    }
    let elapsed = start.elapsed();
    let ticks = cpu_ticks(bus.pid) - t0;
    stop.store(true, Ordering::Relaxed);
    h.abort();
    lats.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |q: f64| lats[((lats.len() as f64 - 1.0) * q).round() as usize];
    Ok(Outcome {
        rate: lats.len() as f64 / elapsed.as_secs_f64(),
        units: 2 * lats.len() as u64,
        ticks,
        lat: Some((pct(0.5), pct(0.99))),
        errors,
        failed: None,
    })
}

/// Waits for the next reply; true if it is a method return.
async fn wait_reply(stream: &mut MessageStream) -> Res<bool> {
    loop {
        let m = tokio::time::timeout(STALL, stream.next())
            .await
            .map_err(|_| format!("stalled: no reply for {STALL:?}"))?
            .ok_or("connection closed")??;
        match m.message_type() {
            Type::MethodReturn => return Ok(true),
            Type::Error => return Ok(false),
            _ => {}
        }
    }
}

async fn wl_pipelined(bus: &Bus, p: &Params, pairs: usize, payload: Option<usize>) -> Res<Outcome> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut services = Vec::new();
    let mut callers = Vec::new();
    for _ in 0..pairs {
        let svc = connect(&bus.address).await?;
        let caller = connect(&bus.address).await?;
        let dest = svc.unique_name().ok_or("no unique name")?.to_string();
        services.push(spawn_service(svc, stop.clone()));
        let kind = match payload {
            None => CallKind::Empty { dest },
            Some(n) => CallKind::Payload {
                dest,
                body: Arc::new(vec![0x5a; n]),
            },
        };
        callers.push((caller, kind));
    }
    let total = if payload.is_some() {
        p.payload_calls
    } else {
        p.pipelined_calls
    } / pairs;
    let r = run_callers(bus, p, callers, total, 2).await;
    stop.store(true, Ordering::Relaxed);
    services.iter().for_each(|h| h.abort());
    r
}

async fn run_callers(
    bus: &Bus,
    p: &Params,
    callers: Vec<(Connection, CallKind)>,
    total_each: usize,
    units_per_call: u64,
) -> Res<Outcome> {
    // Warm up every pair briefly.
    for (c, k) in &callers {
        pipelined_caller(
            c.clone(),
            k.clone(),
            200,
            p.window,
            Instant::now() + p.limit,
        )
        .await?;
    }
    let t0 = cpu_ticks(bus.pid);
    let start = Instant::now();
    let deadline = start + p.limit;
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|(c, k)| tokio::spawn(pipelined_caller(c, k, total_each, p.window, deadline)))
        .collect();
    let mut calls = 0;
    let mut errors = 0;
    for t in tasks {
        let (a, e) = t.await??;
        calls += a;
        errors += e;
    }
    let elapsed = start.elapsed();
    let ticks = cpu_ticks(bus.pid) - t0;
    Ok(Outcome {
        rate: calls as f64 / elapsed.as_secs_f64(),
        units: units_per_call * calls,
        ticks,
        lat: None,
        errors,
        failed: None,
    })
}

async fn wl_driver(bus: &Bus, p: &Params) -> Res<Outcome> {
    let c = connect(&bus.address).await?;
    run_callers(bus, p, vec![(c, CallKind::Driver)], p.driver_calls, 2).await
}

/// Subscribers count `Tick` signals until `Done`.
async fn subscriber(
    mut stream: MessageStream,
    count: Arc<AtomicU64>,
    progress: Arc<Notify>,
) -> Res<()> {
    while let Some(m) = stream.next().await {
        let m = m?;
        if m.message_type() != Type::Signal {
            continue;
        }
        let h = m.header();
        match h.member().map(|m| m.as_str()) {
            Some("Tick") => {
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(32) {
                    progress.notify_one();
                }
            }
            Some("Done") => {
                progress.notify_one();
                return Ok(());
            }
            _ => {}
        }
    }
    Err("subscriber connection closed".into())
}

async fn wl_fanout(
    bus: &Bus,
    p: &Params,
    subs: usize,
    idle: Option<&[Connection]>,
) -> Res<Outcome> {
    let _ = idle; // only held open by the caller
    let emitter = connect(&bus.address).await?;
    let progress = Arc::new(Notify::new());
    let mut counts = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..subs {
        let c = connect(&bus.address).await?;
        // Created before the rule, so that no signal arrives unseen.
        let stream = MessageStream::from(&c);
        add_match(&c, &format!("type='signal',interface='{IFACE}'")).await?;
        let n = Arc::new(AtomicU64::new(0));
        counts.push(n.clone());
        tasks.push(tokio::spawn(subscriber(stream, n, progress.clone())));
    }
    // The emitter keeps at most `window` signals ahead of the slowest
    // subscriber, so neither bus has to queue without bound.
    let window: u64 = 256;
    let batch = 32usize;
    // Fewer signals with many subscribers: the bus work is signals x subs.
    let total = (p.signals as u64 / subs.max(1) as u64 * 4).clamp(500, p.signals as u64);
    let min_count = |counts: &[Arc<AtomicU64>]| {
        counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    };
    let t0 = cpu_ticks(bus.pid);
    let start = Instant::now();
    let deadline = start + p.limit;
    let mut sent = 0u64;
    let mut msgs = Vec::with_capacity(batch);
    while sent < total && Instant::now() < deadline {
        while sent - min_count(&counts) + batch as u64 > window {
            if tokio::time::timeout(STALL, progress.notified())
                .await
                .is_err()
                && sent - min_count(&counts) + batch as u64 > window
            {
                let got: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
                tasks.iter().for_each(|t| t.abort());
                return Err(format!(
                    "fan-out stalled: {sent} signals sent, subscribers received {got:?}"
                )
                .into());
            }
        }
        for i in 0..batch {
            msgs.push(Message::signal(PATH, IFACE, "Tick").build(&(sent + i as u64))?);
        }
        emitter.send_all(&msgs).await?;
        msgs.clear();
        sent += batch as u64;
    }
    emitter
        .send(&Message::signal(PATH, IFACE, "Done").build(&())?)
        .await?;
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t).await???;
    }
    let elapsed = start.elapsed();
    let ticks = cpu_ticks(bus.pid) - t0;
    let delivered: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    let errors = sent * subs as u64 - delivered;
    Ok(Outcome {
        rate: delivered as f64 / elapsed.as_secs_f64(),
        units: delivered,
        ticks,
        lat: None,
        errors,
        failed: None,
    })
}

async fn wl_setup(bus: &Bus, p: &Params) -> Res<Outcome> {
    let t0 = cpu_ticks(bus.pid);
    let start = Instant::now();
    let deadline = start + p.setup_time;
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let a = bus.address.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let c = connect(&a).await?;
                    c.close().await?;
                    n += 1;
                }
                Res::Ok(n)
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += t.await??;
    }
    let elapsed = start.elapsed();
    // Let the bus finish tearing down the last connections.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ticks = cpu_ticks(bus.pid) - t0;
    Ok(Outcome {
        rate: n as f64 / elapsed.as_secs_f64(),
        units: n,
        ticks,
        lat: None,
        errors: 0,
        failed: None,
    })
}

/// Opens `n` idle connections (auth + Hello), a few at a time.
async fn open_idle(bus: &Bus, n: usize) -> Res<Vec<Connection>> {
    let mut conns = Vec::with_capacity(n);
    let mut it = 0..n;
    loop {
        let chunk: Vec<_> = it.by_ref().take(16).collect();
        if chunk.is_empty() {
            break;
        }
        let tasks: Vec<_> = chunk
            .iter()
            .map(|_| tokio::spawn(connect_owned(bus.address.clone())))
            .collect();
        for t in tasks {
            conns.push(t.await??);
        }
    }
    Ok(conns)
}

struct Memory {
    idle_kib: u64,
    loaded_kib: u64,
    conns: usize,
}

// ---------------------------------------------------------------- table

fn fmt_rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.0}k", r / 1000.0)
    } else {
        format!("{r:.0}")
    }
}

fn print_table(rows: &[Row], buses: &[Bus], hz: u64, mem: &[Memory]) {
    let tick_us = 1e6 / hz as f64;
    // Every bus but the reference (the last) gets a ratio column, headed by
    // its name when there are several.
    let reference = common::reference(buses);
    let refname = &buses[reference].name;
    let compared = 0..reference;
    let ratio_head = |i: usize| {
        if reference == 1 {
            "ratio".to_string()
        } else {
            buses[i].name.clone()
        }
    };
    let ratio_w: Vec<usize> = compared
        .clone()
        .map(|i| ratio_head(i).len().max(7))
        .collect();
    // Two buses: the columns as they have always been (results in
    // docs/BENCHMARKS.md compare with them); more: as wide as their headers.
    let widen = |b: &Bus, head: usize, min: usize| {
        if buses.len() > 2 {
            (b.name.len() + head).max(min)
        } else {
            min
        }
    };
    let rate_w: Vec<usize> = buses.iter().map(|b| widen(b, 5, 14)).collect();
    let cpu_w: Vec<usize> = buses.iter().map(|b| widen(b, 4, 12)).collect();
    let legend = compared
        .clone()
        .map(|i| format!("{}/{refname}", buses[i].name))
        .collect::<Vec<_>>()
        .join(", ");
    println!();
    println!(
        "bus CPU = utime+stime of the bus process during the measured phase ({} µs/tick); ratio = {legend}",
        tick_us
    );
    let mut head = format!("{:<34}", "workload");
    for (b, w) in buses.iter().zip(&rate_w) {
        head += &format!(" {:>w$}", format!("{} rate", b.name));
    }
    for (i, w) in compared.clone().zip(&ratio_w) {
        head += &format!(" {:>w$}", ratio_head(i));
    }
    head += " |";
    for (b, w) in buses.iter().zip(&cpu_w) {
        head += &format!(" {:>w$}", format!("{} CPU", b.name));
    }
    for (i, w) in compared.clone().zip(&ratio_w) {
        head += &format!(" {:>w$}", ratio_head(i));
    }
    head += "  CPU unit";
    let rule = "-".repeat(head.chars().count() + 5);
    println!("{head}");
    println!("{rule}");
    for r in rows {
        let cpu = |o: &Outcome| {
            if o.units == 0 {
                f64::NAN
            } else {
                o.ticks as f64 * tick_us / o.units as f64
            }
        };
        let rate_s = |o: &Outcome| {
            if o.failed.is_some() {
                "FAILED".to_string()
            } else {
                format!("{} {}", fmt_rate(o.rate), r.rate_unit)
            }
        };
        let of = |i: usize| r.outcomes.get(i);
        let ratio = |i: usize, f: &dyn Fn(&Outcome) -> f64| match (of(i), of(reference)) {
            (Some(x), Some(y)) => f(x) / f(y),
            _ => f64::NAN,
        };
        let mut line = format!("{:<34}", r.name);
        for (i, w) in rate_w.iter().enumerate() {
            line += &format!(" {:>w$}", of(i).map(rate_s).unwrap_or_default());
        }
        for (i, w) in compared.clone().zip(&ratio_w) {
            line += &format!(" {:>w$.2}", ratio(i, &|o| o.rate));
        }
        line += " |";
        for (i, w) in cpu_w.iter().enumerate() {
            line += &format!(" {:>w$.2}", of(i).map(cpu).unwrap_or(f64::NAN));
        }
        for (i, w) in compared.clone().zip(&ratio_w) {
            let cpu_ratio = ratio(i, &cpu);
            let mark = if cpu_ratio.is_finite() && cpu_ratio <= 0.7 {
                " "
            } else {
                "!"
            };
            line += &format!(" {:>w$.2}{mark}", cpu_ratio, w = w - 1);
        }
        println!("{line}  µs/{}", r.per);
        for (bus, o) in buses.iter().zip(&r.outcomes) {
            if let Some((p50, p99)) = o.lat {
                println!(
                    "{:<34}   {}: median {:.1} µs, p99 {:.1} µs",
                    "", bus.name, p50, p99
                );
            }
            if o.errors > 0 {
                println!("{:<34}   {}: {} errors / missing", "", bus.name, o.errors);
            }
            if let Some(f) = &o.failed {
                println!("{:<34}   {}", "", f);
            }
        }
    }
    println!("{rule}");
    println!("'!' marks a CPU ratio above the 0.7 target.");
    println!();
    println!("memory (VmRSS of the bus process)");
    let nw = common::name_width(buses, 14);
    println!(
        "{:<nw$} {:>12} {:>22} {:>16}",
        "bus", "idle KiB", "with N clients KiB", "KiB/connection"
    );
    let per = |m: &Memory| (m.loaded_kib as f64 - m.idle_kib as f64) / m.conns.max(1) as f64;
    for (bus, m) in buses.iter().zip(mem) {
        println!(
            "{:<nw$} {:>12} {:>22} {:>16.2}",
            bus.name,
            m.idle_kib,
            format!("{} (N={})", m.loaded_kib, m.conns),
            per(m)
        );
    }
    if mem.len() == buses.len() {
        for i in compared {
            println!(
                "per-connection ratio {}/{refname}: {:.2} (target: at most 6 KiB per connection for busvisor)",
                buses[i].name,
                per(&mem[i]) / per(&mem[reference])
            );
        }
    }
}

// ---------------------------------------------------------------- main

async fn run(p: Params, buses: Vec<Bus>) -> Res<()> {
    let hz = clk_tck();
    let mut rows: Vec<Row> = Vec::new();
    let mut mem: Vec<Memory> = Vec::new();
    eprintln!(
        "bench: {} mode, {} round(s) per row, buses: {}",
        if p.quick { "quick" } else { "full" },
        p.rounds,
        buses
            .iter()
            .map(|b| format!("{} (pid {})", b.name, b.pid))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Memory first, on fresh buses; the idle connections then hold
    // non-matching rules for the fan-out row.
    let mut idle_row = Row {
        name: format!("fan-out 10 subs + {} idle rules", p.idle_conns),
        rate_unit: "msg/s",
        per: "delivery",
        outcomes: vec![],
    };
    for bus in buses.iter().filter(|_| p.wanted(&idle_row.name)) {
        let idle_kib = rss_kib(bus.pid);
        let conns = open_idle(bus, p.idle_conns).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let loaded_kib = rss_kib(bus.pid);
        mem.push(Memory {
            idle_kib,
            loaded_kib,
            conns: conns.len(),
        });
        eprintln!(
            "  memory {}: idle {idle_kib} KiB, {} conns {loaded_kib} KiB",
            bus.name,
            conns.len()
        );
        for (i, chunk) in conns.chunks(16).enumerate() {
            let tasks: Vec<_> = chunk
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    let rule = format!("type='signal',interface='org.example.Idle{}'", i * 16 + j);
                    let c = c.clone();
                    tokio::spawn(async move { add_match(&c, &rule).await })
                })
                .collect();
            for t in tasks {
                t.await??;
            }
        }
        let o = measure(bus, || wl_fanout(bus, &p, 10, Some(&conns))).await;
        eprintln!("  {} on {}: {:.0}/s", idle_row.name, bus.name, o.rate);
        idle_row.outcomes.push(o);
        drop(conns);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    macro_rules! row {
        ($name:expr, $unit:expr, $per:expr, |$bus:ident| $body:expr) => {{
            let mut row = Row {
                name: $name.to_string(),
                rate_unit: $unit,
                per: $per,
                outcomes: vec![],
            };
            if p.wanted(&row.name) {
                let mut per_bus: Vec<Vec<Outcome>> = vec![Vec::new(); buses.len()];
                for round in 0..p.rounds {
                    // A B, then B A, ...: drift in background load evens out.
                    let order: Vec<usize> = if round % 2 == 0 {
                        (0..buses.len()).collect()
                    } else {
                        (0..buses.len()).rev().collect()
                    };
                    for i in order {
                        let $bus = &buses[i];
                        let o = measure($bus, || async { $body.await }).await;
                        per_bus[i].push(o);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                for (bus, rounds) in buses.iter().zip(per_bus) {
                    let o = Outcome::merge(rounds);
                    eprintln!("  {} on {}: {:.0}/s", row.name, bus.name, o.rate);
                    row.outcomes.push(o);
                }
                rows.push(row);
            }
        }};
    }

    row!("call round-trip (1 pair, serial)", "call/s", "msg", |bus| {
        wl_latency(bus, &p)
    });
    row!(
        format!("pipelined calls, 1 pair x {}", p.window),
        "call/s",
        "msg",
        |bus| wl_pipelined(bus, &p, 1, None)
    );
    row!(
        format!("pipelined calls, 4 pairs x {}", p.window),
        "call/s",
        "msg",
        |bus| wl_pipelined(bus, &p, 4, None)
    );
    row!("4 KiB payload calls, 1 pair x 64", "call/s", "msg", |bus| {
        wl_pipelined(bus, &p, 1, Some(4096))
    });
    row!(
        "driver GetNameOwner x 64",
        "call/s",
        "msg",
        |bus| wl_driver(bus, &p)
    );
    row!("signal fan-out, 1 subscriber", "msg/s", "delivery", |bus| {
        wl_fanout(bus, &p, 1, None)
    });
    row!(
        "signal fan-out, 10 subscribers",
        "msg/s",
        "delivery",
        |bus| wl_fanout(bus, &p, 10, None)
    );
    row!(
        "signal fan-out, 100 subscribers",
        "msg/s",
        "delivery",
        |bus| wl_fanout(bus, &p, 100, None)
    );
    if !idle_row.outcomes.is_empty() {
        rows.push(idle_row);
    }
    row!("connection setup (2 at a time)", "conn/s", "conn", |bus| {
        wl_setup(bus, &p)
    });

    print_table(&rows, &buses, hz, &mem);
    Ok(())
}

fn main() {
    common::main_with("bench", parse_args(), |(p, buses)| run(p, buses));
}
