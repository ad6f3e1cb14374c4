//! Activation-latency benchmark: the time from the first method call to a
//! bus name whose service is not running until the reply, on several buses
//! in the same run.
//!
//! Usage (normally through `scripts/bench.sh`, which starts the buses with the
//! service definitions below):
//!
//! ```text
//! cargo bench --bench activation -- [--quick] [--iterations N] [--python PATH]
//!     [--services rust,python] --bus NAME,PID,ADDRESS [--bus NAME,PID,ADDRESS ...]
//! activation --serve BUS_NAME      (the trivial service itself; see below)
//! ```
//!
//! The last `--bus` is the reference: every other bus's medians get their
//! ratio to it.
//!
//! Each bus must have two activatable services, running the same programs on
//! every bus:
//! * `org.example.Bench`: this bench executable, `--serve org.example.Bench`
//!   (zbus on a current-thread tokio runtime: connect to
//!   `DBUS_STARTER_ADDRESS`, Hello, RequestName, answer one call, exit);
//! * `org.example.BenchPy`: `PYTHON benches/activation_service.py
//!   org.example.BenchPy` (services.d/minibus.py; interpreter startup
//!   dominates, so the bus's share is harder to see).
//!
//! Both answer `org.example.Bench.Pid() -> u` once and exit right after the
//! reply. One iteration: check that the name has no owner, send `Pid()`, time
//! until the reply, then wait until the name has lost its owner
//! (NameOwnerChanged) and the service process has exited (gone from /proc,
//! or a zombie left to init: dbus-daemon's babysitter does not reap it; one
//! the bus itself must reap, as busvisor does, is waited for), plus a short
//! settle time. So every
//! measured call is a cold start. The buses take turns call by call, so
//! background noise hits all of them alike; one unmeasured warm-up start per
//! bus and service comes first (page cache, lazily loaded libraries).
//!
//! For reference, the same services are also started directly by the bench
//! (no activation): spawn, wait for the name to be taken, call, reply. That is
//! what the service costs by itself; activation minus direct is roughly the
//! bus's own activation overhead.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use zbus::message::{Message, Type};
use zbus::{Connection, MessageStream, connection};

mod common;
use common::{Bus, Res};

const IFACE: &str = "org.example.Bench";
const PATH: &str = "/org/example/Bench";
const RUST_NAME: &str = "org.example.Bench";
const PY_NAME: &str = "org.example.BenchPy";
const PY_SERVICE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/activation_service.py");
/// A call, a name release or a process exit that takes longer fails the run.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after the service is gone, before the next cold start.
const SETTLE: Duration = Duration::from_millis(15);

// ---------------------------------------------------------------- service

/// The trivial service: take `name` on the starter bus, answer one call with
/// this process's pid, exit.
fn serve(name: &str) -> Res<()> {
    let address = std::env::var("DBUS_STARTER_ADDRESS")
        .or_else(|_| std::env::var("DBUS_SESSION_BUS_ADDRESS"))
        .map_err(|_| "no DBUS_STARTER_ADDRESS")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let conn = connection::Builder::address(address.as_str())
            .build()
            .await?;
        // The stream must exist before the name is taken: zbus drops
        // messages that arrive while no stream is active, and the bus sends
        // the queued activation call as soon as the name is ours.
        let mut stream = MessageStream::from(&conn);
        // RequestName(name, DO_NOT_QUEUE) by hand: Connection::request_name
        // adds two match rules first, two more round trips.
        let reply = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "RequestName",
                &(name, 4u32),
            )
            .await?;
        let code: u32 = reply.body().deserialize()?;
        if code != 1 {
            return Err(format!("RequestName({name}) returned {code}").into());
        }
        while let Some(m) = stream.next().await {
            let m = m?;
            if m.message_type() != Type::MethodCall {
                continue;
            }
            let r = Message::method_return(&m.header()).build(&std::process::id())?;
            conn.send(&r).await?;
            return Ok(());
        }
        Err("bus closed the connection before the call".into())
    })
}

// ---------------------------------------------------------------- arguments

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Rust,
    Python,
}

impl Kind {
    fn bus_name(self) -> &'static str {
        match self {
            Kind::Rust => RUST_NAME,
            Kind::Python => PY_NAME,
        }
    }
    fn label(self) -> &'static str {
        match self {
            Kind::Rust => "rust service (zbus, bench binary --serve)",
            Kind::Python => "python service (minibus, activation_service.py)",
        }
    }
}

struct Params {
    iterations: usize,
    kinds: Vec<Kind>,
    python: String,
}

fn parse_args() -> Res<(Params, Vec<Bus>)> {
    let mut quick = false;
    let mut iterations = None;
    let mut kinds = vec![Kind::Rust, Kind::Python];
    let mut python = "python3".to_string();
    let mut buses = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            // `cargo bench` appends this to a harness = false target.
            "--bench" => {}
            "--iterations" => {
                let n: usize = args.next().ok_or("--iterations needs N")?.parse()?;
                iterations = Some(n.max(1));
            }
            "--python" => python = args.next().ok_or("--python needs a path")?,
            "--services" => {
                let list = args.next().ok_or("--services needs rust,python")?;
                kinds = list
                    .split(',')
                    .map(|k| match k {
                        "rust" => Ok(Kind::Rust),
                        "python" => Ok(Kind::Python),
                        other => Err(format!("unknown service {other:?}: rust or python")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--bus" => buses.push(args.next().ok_or("--bus needs NAME,PID,ADDRESS")?.parse()?),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if buses.is_empty() {
        return Err(
            "usage: activation [--quick] [--iterations N] [--python PATH] \
                    [--services rust,python] --bus NAME,PID,ADDRESS [--bus ...]"
                .into(),
        );
    }
    let iterations = iterations.unwrap_or(if quick { 20 } else { 40 });
    Ok((
        Params {
            iterations,
            kinds,
            python,
        },
        buses,
    ))
}

// ---------------------------------------------------------------- client side

/// One persistent caller per bus, subscribed to the services' NameOwnerChanged.
struct Caller {
    bus: Bus,
    conn: Connection,
    stream: MessageStream,
}

async fn driver_call<B>(conn: &Connection, member: &str, body: &B) -> Res<Message>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    Ok(conn
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            member,
            body,
        )
        .await?)
}

impl Caller {
    async fn new(bus: &Bus, kinds: &[Kind]) -> Res<Self> {
        let conn = connection::Builder::address(bus.address.as_str())
            .build()
            .await?;
        let stream = MessageStream::from(&conn);
        for k in kinds {
            let rule = format!(
                "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{}'",
                k.bus_name()
            );
            driver_call(&conn, "AddMatch", &rule).await?;
        }
        Ok(Caller {
            bus: bus.clone(),
            conn,
            stream,
        })
    }

    async fn has_owner(&self, name: &str) -> Res<bool> {
        Ok(driver_call(&self.conn, "NameHasOwner", &name)
            .await?
            .body()
            .deserialize()?)
    }

    /// Next message on the caller's stream, or an error after `TIMEOUT`.
    async fn next(&mut self, what: &str) -> Res<Message> {
        Ok(tokio::time::timeout(TIMEOUT, self.stream.next())
            .await
            .map_err(|_| format!("{}: no {what} within {TIMEOUT:?}", self.bus.name))?
            .ok_or("connection closed")??)
    }

    /// Calls Pid() on `name` and waits for the reply. Returns the service's
    /// pid; NameOwnerChanged signals for `name` seen on the way are noted in
    /// `released` (new owner "") so none is lost.
    async fn call_pid(&mut self, name: &str, released: &mut bool) -> Res<u32> {
        let call = Message::method_call(PATH, "Pid")
            .interface(IFACE)
            .destination(name)
            .build(&())?;
        let serial = call.primary_header().serial_num();
        self.conn.send(&call).await?;
        loop {
            let m = self.next("reply").await?;
            note_release(&m, name, released);
            if m.header().reply_serial() != Some(serial) {
                continue;
            }
            match m.message_type() {
                Type::MethodReturn => return Ok(m.body().deserialize()?),
                Type::Error => {
                    let e = m.header().error_name().map(|e| e.to_string());
                    let text: String = m.body().deserialize().unwrap_or_default();
                    return Err(format!(
                        "{}: {name}: error reply {}: {text}",
                        self.bus.name,
                        e.unwrap_or_default()
                    )
                    .into());
                }
                _ => {}
            }
        }
    }

    /// Waits until `name` has no owner and process `pid` is gone.
    async fn wait_gone(&mut self, name: &str, mut released: bool, pid: Option<u32>) -> Res<()> {
        while !released {
            let m = self.next("NameOwnerChanged").await?;
            note_release(&m, name, &mut released);
        }
        if self.has_owner(name).await? {
            return Err(format!("{}: {name} still has an owner", self.bus.name).into());
        }
        if let Some(pid) = pid {
            let start = Instant::now();
            while !exited(pid, self.bus.pid) {
                if start.elapsed() > TIMEOUT {
                    return Err(format!("{}: service pid {pid} did not go", self.bus.name).into());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        tokio::time::sleep(SETTLE).await;
        Ok(())
    }

    /// One cold start through activation; the latency in ms.
    async fn activate_once(&mut self, kind: Kind) -> Res<f64> {
        let name = kind.bus_name();
        if self.has_owner(name).await? {
            return Err(format!("{}: {name} is already running", self.bus.name).into());
        }
        let mut released = false;
        let start = Instant::now();
        let pid = self.call_pid(name, &mut released).await?;
        let lat = start.elapsed().as_secs_f64() * 1e3;
        self.wait_gone(name, released, Some(pid)).await?;
        Ok(lat)
    }

    /// One start of the service by the bench itself (no activation): spawn,
    /// wait for the name, call, reply. The time in ms.
    async fn direct_once(&mut self, kind: Kind, p: &Params) -> Res<f64> {
        let name = kind.bus_name();
        let mut cmd = match kind {
            Kind::Rust => {
                let mut c = Command::new(std::env::current_exe()?);
                c.args(["--serve", name]);
                c
            }
            Kind::Python => {
                let mut c = Command::new(&p.python);
                c.args([PY_SERVICE, name]);
                c
            }
        };
        cmd.env("DBUS_STARTER_ADDRESS", &self.bus.address)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus.address)
            .env("DBUS_STARTER_BUS_TYPE", "session")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let start = Instant::now();
        let mut child = cmd.spawn()?;
        let r = async {
            // Wait for NameOwnerChanged(name, "", owner).
            loop {
                let m = self.next("NameOwnerChanged").await?;
                if let Some((_, old, new)) = name_owner_changed(&m, name)
                    && old.is_empty()
                    && !new.is_empty()
                {
                    break;
                }
            }
            let mut released = false;
            self.call_pid(name, &mut released).await?;
            let lat = start.elapsed().as_secs_f64() * 1e3;
            Res::Ok((lat, released))
        }
        .await;
        let (lat, released) = match r {
            Ok(x) => x,
            Err(e) => {
                // Started by us: stopped by its pid.
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        // Reaps it; the service exits right after its reply.
        let status = child.wait()?;
        if !status.success() {
            return Err(format!("{}: direct {name} exited with {status}", self.bus.name).into());
        }
        self.wait_gone(name, released, None).await?;
        Ok(lat)
    }
}

/// True once process `pid` is gone, or is a zombie that `bus` does not have
/// to reap. dbus-daemon's services end up children of init (its babysitter
/// exits), which may reap them only much later; busvisor (a subreaper) reaps
/// its own, and is waited for, as it acts on the exit.
fn exited(pid: u32, bus: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // Field 2 (comm) may hold spaces: count from the last ')'.
    let mut f = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace();
    let state = f.next().unwrap_or("");
    let ppid: u32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    state == "Z" && ppid != bus
}

fn name_owner_changed(m: &Message, name: &str) -> Option<(String, String, String)> {
    if m.message_type() != Type::Signal
        || m.header().member().map(|x| x.as_str()) != Some("NameOwnerChanged")
    {
        return None;
    }
    let args: (String, String, String) = m.body().deserialize().ok()?;
    (args.0 == name).then_some(args)
}

fn note_release(m: &Message, name: &str, released: &mut bool) {
    if let Some((_, _, new)) = name_owner_changed(m, name)
        && new.is_empty()
    {
        *released = true;
    }
}

// ---------------------------------------------------------------- statistics

struct Stats {
    median: f64,
    p90: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn stats(v: &[f64]) -> Option<Stats> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |q: f64| s[((s.len() as f64 - 1.0) * q).round() as usize];
    let median = if s.len().is_multiple_of(2) {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    } else {
        s[s.len() / 2]
    };
    Some(Stats {
        median,
        p90: pct(0.9),
        min: s[0],
        max: s[s.len() - 1],
        n: s.len(),
    })
}

/// Latencies of one (service, mode) block: one list per bus, plus failures.
struct Block {
    title: String,
    lats: Vec<Vec<f64>>,
    failed: Vec<Option<String>>,
}

fn print_block(b: &Block, buses: &[Bus], target: bool) {
    println!("{}", b.title);
    let nw = common::name_width(buses, 12);
    for (i, bus) in buses.iter().enumerate() {
        match (stats(&b.lats[i]), &b.failed[i]) {
            (Some(s), f) => {
                println!(
                    "  {:<nw$} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>4}{}",
                    bus.name,
                    s.median,
                    s.p90,
                    s.min,
                    s.max,
                    s.n,
                    f.as_ref()
                        .map(|e| format!("  FAILED after {} runs: {e}", s.n))
                        .unwrap_or_default()
                );
            }
            (None, f) => println!(
                "  {:<nw$} FAILED: {}",
                bus.name,
                f.as_deref().unwrap_or("no result")
            ),
        }
    }
    // Every bus but the reference (the last) against the reference.
    let reference = common::reference(buses);
    for i in 0..reference {
        if let (Some(a), Some(d)) = (stats(&b.lats[i]), stats(&b.lats[reference])) {
            let r = a.median / d.median;
            let verdict = if !target {
                String::new()
            } else if r <= 1.0 {
                "   target <= 1.00: met".to_string()
            } else {
                "   target <= 1.00: NOT MET".to_string()
            };
            println!(
                "  ratio {}/{}: median {:.2}, p90 {:.2}, min {:.2}{}",
                buses[i].name,
                buses[reference].name,
                r,
                a.p90 / d.p90,
                a.min / d.min,
                verdict
            );
        }
    }
}

// ---------------------------------------------------------------- main

async fn run(p: Params, buses: Vec<Bus>) -> Res<()> {
    eprintln!(
        "activation: {} cold starts per bus and service, buses: {}",
        p.iterations,
        buses
            .iter()
            .map(|b| format!("{} (pid {})", b.name, b.pid))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut callers = Vec::new();
    for bus in &buses {
        callers.push(Caller::new(bus, &p.kinds).await?);
    }
    let t_all = Instant::now();
    let mut blocks = Vec::new();
    for &kind in &p.kinds {
        for direct in [false, true] {
            let mut block = Block {
                title: format!(
                    "{}: {}",
                    kind.label(),
                    if direct {
                        "direct start, no activation (reference: spawn -> name taken -> call -> reply)"
                    } else {
                        "ACTIVATION (first call -> reply)"
                    }
                ),
                lats: vec![Vec::new(); buses.len()],
                failed: vec![None; buses.len()],
            };
            // Warm-up (unmeasured) + iterations, bus after bus per iteration.
            for it in 0..=p.iterations {
                for (i, c) in callers.iter_mut().enumerate() {
                    if block.failed[i].is_some() {
                        continue;
                    }
                    let r = if direct {
                        c.direct_once(kind, &p).await
                    } else {
                        c.activate_once(kind).await
                    };
                    match r {
                        Ok(ms) if it > 0 => block.lats[i].push(ms),
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("  {}", e);
                            block.failed[i] = Some(e.to_string());
                        }
                    }
                }
            }
            for (i, bus) in buses.iter().enumerate() {
                if let Some(s) = stats(&block.lats[i]) {
                    eprintln!(
                        "  {} {} on {}: median {:.2} ms",
                        if direct { "direct" } else { "activation" },
                        kind.bus_name(),
                        bus.name,
                        s.median
                    );
                }
            }
            blocks.push((direct, block));
        }
    }
    let elapsed = t_all.elapsed();

    println!();
    println!(
        "activation latency: first method call to a not-running service until its reply, \
         {} cold starts per bus (interleaved, after 1 warm-up), in ms",
        p.iterations
    );
    println!(
        "  {:<nw$} {:>9} {:>9} {:>9} {:>9} {:>4}",
        "bus",
        "median",
        "p90",
        "min",
        "max",
        "n",
        nw = common::name_width(&buses, 12)
    );
    println!("{}", "-".repeat(100));
    for (direct, b) in &blocks {
        print_block(b, &buses, !direct);
        println!();
    }
    if p.kinds.contains(&Kind::Rust) {
        println!(
            "headline: the rust service (starts in a few ms, so the bus's share of the \
             latency is visible; the python one is dominated by interpreter startup)."
        );
        let a = blocks
            .iter()
            .find(|(d, b)| !d && b.title.starts_with("rust"));
        let reference = common::reference(&buses);
        for i in 0..reference {
            if let Some((_, b)) = a
                && let (Some(x), Some(y)) = (stats(&b.lats[i]), stats(&b.lats[reference]))
            {
                println!(
                    "activation median {}/{}: {:.2} ms / {:.2} ms = {:.2} (target: <= 1.00, {})",
                    buses[i].name,
                    buses[reference].name,
                    x.median,
                    y.median,
                    x.median / y.median,
                    if x.median <= y.median {
                        "met"
                    } else {
                        "NOT MET"
                    }
                );
            }
        }
    }
    println!("(activation section took {:.1} s)", elapsed.as_secs_f64());
    let any_failed = blocks
        .iter()
        .any(|(_, b)| b.failed.iter().any(|f| f.is_some()));
    if any_failed {
        return Err("some measurements failed (see above)".into());
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        let name = args.get(2).map(String::as_str).unwrap_or(RUST_NAME);
        if let Err(e) = serve(name) {
            eprintln!("activation --serve {name}: {e}");
            std::process::exit(1);
        }
        return;
    }
    common::main_with("activation", parse_args(), |(p, buses)| run(p, buses));
}
