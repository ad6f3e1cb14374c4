//! Each control command: what it asks the bus, and what it prints, as
//! text for people or in the JSON dialect (`json.rs`).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value as Json, json};

use super::events::{Event, Widths};
use super::text::{
    Output, command_line, cut, format_day_time, format_duration, format_time, now_us, parse_since,
    relative_time, rfc3339, table,
};
use super::{
    Client, EXIT_NO_SUCH_SERVICE, EXIT_NOT_RUNNING, Failure, Props, Result, id_of, json,
    json_plain, match_escape,
};
use crate::cli::{
    CheckArgs, ClientArgs, ClientCommand, ControlArgs, EnableArgs, KillArgs, ListArgs, LogFormat,
    LogsArgs, ResetFailedArgs, ServiceArgs, ShowArgs, StateArgs, StatusArgs,
};

/// Run a control command.
pub async fn run(cmd: ClientCommand) -> Result<()> {
    let mut out = Output::stdout();
    let out = &mut out;
    match cmd {
        ClientCommand::List(a) => list(&Client::connect(&a.client).await?, &a, out).await,
        ClientCommand::Status(a) => status(&Client::connect(&a.client).await?, &a, out).await,
        ClientCommand::Show(a) => show(&Client::connect(&a.client).await?, &a, out).await,
        ClientCommand::Cat(a) => cat(&Client::connect(&a.client).await?, &a, out).await,
        ClientCommand::Start(a) => control(&a, Action::Start, out).await,
        ClientCommand::Stop(a) => control(&a, Action::Stop, out).await,
        ClientCommand::Restart(a) => control(&a, Action::Restart, out).await,
        ClientCommand::IsActive(a) => is_state(&a, false, out).await,
        ClientCommand::IsFailed(a) => is_state(&a, true, out).await,
        ClientCommand::Kill(a) => kill(&Client::connect(&a.client).await?, &a, out).await,
        ClientCommand::Enable(a) => enable(&a, true, out).await,
        ClientCommand::Disable(a) => enable(&a, false, out).await,
        ClientCommand::ResetFailed(a) => reset_failed(&a, out).await,
        ClientCommand::Logs(a) => logs(&Client::connect(&a.client).await?, &a, out).await,
        ClientCommand::Events(a) => events(&Client::connect(&a.client).await?, &a, out).await,
        ClientCommand::Reload(a) => reload(&Client::connect(&a).await?, &a, out).await,
        ClientCommand::Check(a) => check(&a, out),
    }
}

fn str_of<'a>(p: &'a Props, k: &str) -> &'a str {
    p.get(k).and_then(Json::as_str).unwrap_or("")
}

fn u64_of(p: &Props, k: &str) -> u64 {
    p.get(k).and_then(Json::as_u64).unwrap_or(0)
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

// ---------------------------------------------------------------- list

/// Whether `s` matches the glob `pat` (`*`, `?`, `[abc]`, `[a-z]`, `[!x]`).
pub fn glob(pat: &str, s: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    glob_at(&p, &t)
}

fn glob_at(p: &[char], t: &[char]) -> bool {
    match p.first() {
        None => t.is_empty(),
        Some('*') => (0..=t.len()).any(|i| glob_at(&p[1..], &t[i..])),
        Some('?') => !t.is_empty() && glob_at(&p[1..], &t[1..]),
        Some('[') => {
            let Some(close) = p.iter().skip(2).position(|c| *c == ']').map(|i| i + 2) else {
                return t.first() == Some(&'[') && glob_at(&p[1..], &t[1..]);
            };
            let Some(c) = t.first() else { return false };
            let (neg, set) = match p[1] {
                '!' | '^' => (true, &p[2..close]),
                _ => (false, &p[1..close]),
            };
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == '-' {
                    hit |= (set[i]..=set[i + 2]).contains(c);
                    i += 3;
                } else {
                    hit |= set[i] == *c;
                    i += 1;
                }
            }
            hit != neg && glob_at(&p[close + 1..], &t[1..])
        }
        Some(c) => t.first() == Some(c) && glob_at(&p[1..], &t[1..]),
    }
}

/// Whether `list` shows the service: by the patterns and states asked
/// for; with neither, busvisor's own definitions and whatever is not
/// inactive (`--all`: every service).
fn listed(p: &Props, a: &ListArgs) -> bool {
    let state = str_of(p, "State");
    if !a.state.is_empty() && !a.state.iter().any(|s| s == state) {
        return false;
    }
    if !a.patterns.is_empty() {
        let names = p.get("Names").and_then(Json::as_array);
        let mut all =
            std::iter::once(id_of(p)).chain(names.into_iter().flatten().filter_map(Json::as_str));
        return all.any(|n| a.patterns.iter().any(|pat| glob(pat, n)));
    }
    a.all || !a.state.is_empty() || str_of(p, "Source") == "busvisor" || state != "inactive"
}

async fn list(c: &Client, a: &ListArgs, out: &mut Output) -> Result<()> {
    let all = c.all_services().await?;
    let shown: Vec<&Props> = all.iter().filter(|p| listed(p, a)).collect();
    if a.client.json {
        let services: Vec<Json> = shown.iter().map(|p| json::service(p)).collect();
        return out.json_pretty(&json::document(json!({ "services": services })));
    }
    let mut rows = Vec::new();
    if !a.no_legend {
        rows.push(
            ["SERVICE", "STATE", "PID", "NAMES", "REASON"]
                .map(String::from)
                .to_vec(),
        );
    }
    for p in &shown {
        let mut reason = str_of(p, "Reason").to_owned();
        if p.get("Enabled") == Some(&json!(false)) {
            reason = format!("disabled; {reason}");
        }
        let names: Vec<String> = p
            .get("Names")
            .and_then(Json::as_array)
            .map(|n| n.iter().map(json_plain).collect())
            .unwrap_or_default();
        rows.push(vec![
            id_of(p).to_owned(),
            str_of(p, "State").to_owned(),
            pid_or_dash(u64_of(p, "MainPID")),
            names.join(","),
            reason,
        ]);
    }
    let width = out.width.filter(|_| !a.full);
    let header = !a.no_legend;
    let lines = table(&rows, width, 3, |r, col, text| {
        if col == 1 && (r > 0 || !header) {
            out.paint(text, text)
        } else {
            text.to_owned()
        }
    });
    for l in lines {
        out.line(&l)?;
    }
    if a.no_legend {
        return Ok(());
    }
    let mut count = format!("\n{} listed.", plural(shown.len(), "service", "services"));
    let hidden = all.len() - shown.len();
    if hidden > 0 && a.patterns.is_empty() && a.state.is_empty() && !a.all {
        let _ = write!(
            count,
            " {} of the standard D-Bus service directories not shown: --all lists them.",
            plural(hidden, "inactive service", "inactive services")
        );
    }
    out.line(&count)
}

fn pid_or_dash(pid: u64) -> String {
    if pid == 0 {
        "-".to_owned()
    } else {
        pid.to_string()
    }
}

// ---------------------------------------------------------------- status

/// One line of output, as `logs` and `status` print it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub time_us: u64,
    pub pid: u32,
    pub stream: String,
    pub line: String,
}

impl Entry {
    fn to_json(&self) -> Json {
        json!({
            "id": self.id,
            "time": rfc3339(self.time_us),
            "pid": self.pid,
            "stream": self.stream,
            "line": self.line,
        })
    }

    /// `short`: `2025-01-31 12:00:01.234 CET  echo[1234]  stdout  line`,
    /// the `[pid]` padded to `pid_width` digits; `short-iso`: RFC 3339.
    fn text(&self, format: LogFormat, pid_width: usize, out: &Output) -> String {
        let time = match format {
            LogFormat::ShortIso => rfc3339(self.time_us),
            _ => format_time(self.time_us),
        };
        if format == LogFormat::Cat {
            return self.line.clone();
        }
        let who = format!("{}[{}]", self.id, self.pid);
        let width = self.id.chars().count() + 2 + pid_width;
        let stream = format!("{:<8}", self.stream);
        format!(
            "{time}  {who:<width$}  {}  {}",
            out.paint(&stream, &self.stream),
            self.line
        )
    }
}

impl Client {
    /// The last `lines` lines of a service (0: all kept), from `since_us`.
    async fn entries(&self, id: &str, lines: u32, since_us: u64) -> Result<Vec<Entry>> {
        let rows: Vec<(u64, u32, String, String)> = self
            .call_decode("GetLogEntries", &(id, lines, since_us), Some(id))
            .await?;
        Ok(rows
            .into_iter()
            .map(|(time_us, pid, stream, line)| Entry {
                id: id.to_owned(),
                time_us,
                pid,
                stream,
                line,
            })
            .collect())
    }
}

/// The width of the pids of `entries` (at least 5 digits).
fn pid_width(entries: &[Entry]) -> usize {
    entries
        .iter()
        .map(|e| e.pid.to_string().len())
        .max()
        .unwrap_or(0)
        .max(5)
}

/// The pids of a service, each with its command line.
fn processes(p: &Props) -> Vec<(u64, Option<String>)> {
    p.get("PIDs")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(Json::as_u64)
        .map(|pid| (pid, command_line(pid as u32)))
        .collect()
}

async fn status(c: &Client, a: &StatusArgs, out: &mut Output) -> Result<()> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for name in &a.names {
        match c.service(name).await {
            Ok(p) => {
                let logs = c.entries(id_of(&p), a.lines, 0).await?;
                found.push((p, logs));
            }
            Err(Failure::Msg(m, _)) if m.starts_with("no such service") => missing.push(m),
            Err(e) => return Err(e),
        }
    }
    if a.client.json {
        let mut services: Vec<Json> = found
            .iter()
            .map(|(p, logs)| {
                let mut s = json::service(p);
                let procs: Vec<Json> = processes(p)
                    .into_iter()
                    .map(|(pid, cmd)| json!({"pid": pid, "command": cmd}))
                    .collect();
                s["processes"] = Json::Array(procs);
                s["logs"] = logs.iter().map(Entry::to_json).collect();
                s
            })
            .collect();
        services.extend(missing.iter().map(|m| json!({ "error": m })));
        out.json_pretty(&json::document(json!({ "services": services })))?;
    } else {
        for (i, (p, logs)) in found.iter().enumerate() {
            if i > 0 {
                out.line("")?;
            }
            for l in status_text(p, logs, out, a.full) {
                out.line(&l)?;
            }
        }
        for m in &missing {
            eprintln!("busvisor: {m}");
        }
    }
    if !missing.is_empty() {
        return Err(Failure::Status(EXIT_NO_SUCH_SERVICE));
    }
    if found.iter().any(|(p, _)| str_of(p, "State") != "running") {
        return Err(Failure::Status(EXIT_NOT_RUNNING));
    }
    Ok(())
}

/// `●`, `○` or `×`, as systemctl marks a state.
fn bullet(state: &str) -> &'static str {
    match state {
        "running" | "activating" | "stopping" | "restarting" => "●",
        "failed" | "bad-definition" => "×",
        _ => "○",
    }
}

/// `when` and how long ago (or until).
fn when(us: u64, now: u64) -> String {
    format!("{}; {}", format_day_time(us), relative_time(us, now))
}

/// `status`'s text for one service, systemctl's layout.
fn status_text(p: &Props, logs: &[Entry], out: &Output, full: bool) -> Vec<String> {
    let now = now_us();
    let state = str_of(p, "State");
    let mut lines = Vec::new();
    let names = p
        .get("Names")
        .and_then(Json::as_array)
        .map(|n| n.iter().map(json_plain).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let head = if names.is_empty() {
        id_of(p).to_owned()
    } else {
        format!("{} - {names}", id_of(p))
    };
    lines.push(format!("{} {head}", out.paint(bullet(state), state)));
    let field = |lines: &mut Vec<String>, k: &str, v: String| {
        lines.push(format!("{k:>12}: {v}"));
    };
    let source = match str_of(p, "Source") {
        "busvisor" => "busvisor definition",
        _ => "D-Bus service file",
    };
    let enabled = if p.get("Enabled") == Some(&json!(false)) {
        "disabled"
    } else {
        "enabled"
    };
    let file = str_of(p, "DefinitionFile");
    field(
        &mut lines,
        "Loaded",
        format!("{file} ({source}; {enabled})"),
    );
    let since = u64_of(p, "StateChangeTime");
    field(
        &mut lines,
        "Active",
        format!("{} since {}", out.paint(state, state), when(since, now)),
    );
    if !str_of(p, "Reason").is_empty() && state != "bad-definition" {
        field(&mut lines, "Reason", str_of(p, "Reason").to_owned());
    }
    let error = str_of(p, "DefinitionError");
    if !error.is_empty() {
        field(&mut lines, "Error", error.to_owned());
    }
    let main = u64_of(p, "MainPID");
    let procs = processes(p);
    if main != 0 {
        let cmd = command_line(main as u32).unwrap_or_else(|| "gone".to_owned());
        field(&mut lines, "Main PID", format!("{main} ({cmd})"));
    }
    if !procs.is_empty() {
        field(&mut lines, "Processes", procs.len().to_string());
        let width = out.width.filter(|_| !full);
        for (i, (pid, cmd)) in procs.iter().enumerate() {
            let branch = if i + 1 == procs.len() {
                "└─"
            } else {
                "├─"
            };
            let cmd = cmd.as_deref().unwrap_or("(gone)");
            let line = format!("{:14}{branch}{pid} {cmd}", "");
            lines.push(match width {
                Some(w) => cut(&line, w),
                None => line,
            });
        }
    }
    let restarts = u64_of(p, "Restarts");
    if restarts > 0 {
        field(&mut lines, "Restarts", restarts.to_string());
    }
    let last_pid = u64_of(p, "LastExitPID");
    if last_pid != 0 {
        let status = p.get("LastExitStatus").and_then(Json::as_i64).unwrap_or(-1);
        let signal = p.get("LastExitSignal").and_then(Json::as_i64).unwrap_or(0);
        let how = super::text::exit_text(status, signal);
        let at = when(u64_of(p, "LastExitTime"), now);
        field(&mut lines, "Last exit", format!("{last_pid} {how}, {at}"));
    }
    if !str_of(p, "LastFailure").is_empty() {
        let at = when(u64_of(p, "LastFailureTime"), now);
        let text = str_of(p, "LastFailure");
        field(&mut lines, "Last failure", format!("{text} ({at})"));
    }
    let next = u64_of(p, "NextRestartTime");
    if next != 0 {
        field(&mut lines, "Next start", when(next, now));
    }
    if !str_of(p, "Requester").is_empty() {
        let who = str_of(p, "Requester");
        let pid = u64_of(p, "RequesterPID");
        field(&mut lines, "Requester", format!("{who} (pid {pid})"));
    }
    let idle = u64_of(p, "IdleTimeout");
    if idle != 0 {
        let d = format_duration(Duration::from_micros(idle));
        field(&mut lines, "Idle timeout", d);
    }
    let exec = str_of(p, "ExecPath");
    if !exec.is_empty() {
        field(&mut lines, "Program", exec.to_owned());
    }
    if !logs.is_empty() {
        lines.push(String::new());
        let w = pid_width(logs);
        lines.extend(logs.iter().map(|e| e.text(LogFormat::Short, w, out)));
    }
    lines
}

// ---------------------------------------------------------------- show, cat

/// The property `name` names: its D-Bus name, in any case, or its JSON key.
fn property_name<'a>(p: &'a Props, name: &str) -> Option<&'a str> {
    p.keys()
        .map(String::as_str)
        .find(|k| k.eq_ignore_ascii_case(name) || json::key(k) == name)
}

/// A property as `show` prints it: times in RFC 3339 (empty: never),
/// lists space-separated, everything else as the API gives it.
fn show_value(k: &str, v: &Json) -> String {
    match json::value(k, v) {
        Json::Null if k.ends_with("Time") => String::new(),
        Json::String(s) if k.ends_with("Time") => s,
        _ => json_plain(v),
    }
}

async fn show(c: &Client, a: &ShowArgs, out: &mut Output) -> Result<()> {
    let p = c.service(&a.name).await?;
    let keys: Vec<&str> = if a.property.is_empty() {
        let mut k: Vec<&str> = crate::supervision::lifecycle::PROPERTY_NAMES
            .iter()
            .copied()
            .filter(|k| p.contains_key(*k))
            .collect();
        let mut extra: Vec<&str> = p
            .keys()
            .map(String::as_str)
            .filter(|k| !k.is_empty() && !k.contains(char::is_whitespace))
            .filter(|k| !crate::supervision::lifecycle::PROPERTY_NAMES.contains(k))
            .collect();
        extra.sort();
        k.extend(extra);
        k
    } else {
        a.property
            .iter()
            .map(|n| {
                property_name(&p, n)
                    .ok_or_else(|| Failure::msg(format!("{}: no such property: {n}", a.name)))
            })
            .collect::<Result<_>>()?
    };
    if a.client.json {
        let mut o = serde_json::Map::new();
        o.insert("id".into(), json!(id_of(&p)));
        for k in keys {
            o.insert(json::key(k), json::value(k, &p[k]));
        }
        return out.json_pretty(&json::document(Json::Object(o)));
    }
    for k in keys {
        let v = show_value(k, &p[k]);
        if a.value {
            out.line(&v)?;
        } else {
            out.line(&format!("{k}={v}"))?;
        }
    }
    Ok(())
}

async fn cat(c: &Client, a: &ServiceArgs, out: &mut Output) -> Result<()> {
    let p = c.service(&a.name).await?;
    let file = str_of(&p, "DefinitionFile");
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure::msg(format!("cannot read {file}: {e}")))?;
    if a.client.json {
        let doc = json!({ "id": id_of(&p), "file": file, "text": text });
        return out.json_pretty(&json::document(doc));
    }
    out.line(&format!("# {file}"))?;
    out.line(text.strip_suffix('\n').unwrap_or(&text))
}

// ---------------------------------------------------------------- control

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Action {
    Start,
    Stop,
    Restart,
}

impl Action {
    fn method(self) -> &'static str {
        match self {
            Action::Start => "Start",
            Action::Stop => "Stop",
            Action::Restart => "Restart",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Action::Start => "started",
            Action::Stop => "stopped",
            Action::Restart => "restarted",
        }
    }
}

async fn control(a: &ControlArgs, action: Action, out: &mut Output) -> Result<()> {
    let c = Client::connect(&a.client).await?;
    let method = action.method();
    if a.no_block {
        let mut ids = Vec::new();
        for name in &a.names {
            let id = c.service_id(name).await?;
            c.send_no_reply(method, &(id.as_str(),)).await?;
            ids.push(id);
        }
        c.flush().await?;
        if a.client.json {
            return out.json_pretty(&json::document(json!({ "queued": ids })));
        }
        for id in ids {
            out.line(&format!("{} of {id} queued", method.to_lowercase()))?;
        }
        return Ok(());
    }
    let mut done = Vec::new();
    for name in &a.names {
        c.call_decode::<_, ()>(method, &(name.as_str(),), Some(name))
            .await?;
        let p = c.service(name).await?;
        if !a.client.json {
            let state = str_of(&p, "State");
            let mut line = format!(
                "{} {}: {}",
                action.done(),
                id_of(&p),
                out.paint(state, state)
            );
            let main = u64_of(&p, "MainPID");
            if main != 0 {
                let _ = write!(line, ", main pid {main}");
            }
            out.line(&line)?;
        }
        done.push(json::service(&p));
    }
    if a.client.json {
        return out.json_pretty(&json::document(json!({ "services": done })));
    }
    Ok(())
}

async fn is_state(a: &StateArgs, failed: bool, out: &mut Output) -> Result<()> {
    let c = Client::connect(&a.client).await?;
    let mut states = Vec::new();
    for name in &a.names {
        let state = match c.service(name).await {
            Ok(p) => str_of(&p, "State").to_owned(),
            Err(Failure::Msg(m, _)) if m.starts_with("no such service") => "unknown".to_owned(),
            Err(e) => return Err(e),
        };
        states.push((name.clone(), state));
    }
    let is_failed = |s: &str| s == "failed" || s == "bad-definition";
    let ok = if failed {
        states.iter().any(|(_, s)| is_failed(s))
    } else {
        states.iter().all(|(_, s)| s == "running")
    };
    if a.client.json {
        let list: Vec<Json> = states
            .iter()
            .map(|(n, s)| json!({ "name": n, "state": s }))
            .collect();
        let key = if failed { "failed" } else { "active" };
        out.json_pretty(&json::document(json!({ "services": list, key: ok })))?;
    } else if !a.quiet {
        for (_, s) in &states {
            out.line(&out.paint(s, s))?;
        }
    }
    match (ok, failed) {
        (true, _) => Ok(()),
        (false, true) => Err(Failure::Status(1)),
        (false, false) => Err(Failure::Status(EXIT_NOT_RUNNING)),
    }
}

async fn kill(c: &Client, a: &KillArgs, out: &mut Output) -> Result<()> {
    let sig = crate::activation::definition::parse_signal(&a.signal)
        .map_err(|e| Failure::msg(format!("--signal: {e}")))?;
    let whom = if a.main { "main" } else { "all" };
    let n: u32 = c
        .call_decode("Kill", &(a.name.as_str(), whom, sig as i32), Some(&a.name))
        .await?;
    let id = c.service_id(&a.name).await?;
    if a.client.json {
        let doc = json!({ "id": id, "signal": sig.as_str(), "whom": whom, "processes": n });
        return out.json_pretty(&json::document(doc));
    }
    let what = if a.main {
        "the main process".to_owned()
    } else {
        plural(n as usize, "process", "processes")
    };
    out.line(&format!("sent {} to {what} of {id}", sig.as_str()))
}

async fn enable(a: &EnableArgs, enable: bool, out: &mut Output) -> Result<()> {
    let c = Client::connect(&a.client).await?;
    let method = if enable { "Enable" } else { "Disable" };
    let mut done = Vec::new();
    for name in &a.names {
        let id = c.service_id(name).await?;
        let persistent: bool = c.call_decode(method, &(id.as_str(),), Some(name)).await?;
        let p = c.service(&id).await?;
        if a.now {
            let op = if enable { "Start" } else { "Stop" };
            c.call_decode::<_, ()>(op, &(id.as_str(),), Some(name))
                .await?;
        }
        let file = str_of(&p, "DefinitionFile");
        let marker = crate::activation::catalog::disabled_marker(std::path::Path::new(file));
        if !a.client.json {
            let verb = if enable { "enabled" } else { "disabled" };
            let how = match (persistent, enable) {
                (true, true) => format!("(removed {})", marker.display()),
                (true, false) => format!("(made {})", marker.display()),
                (false, _) => {
                    format!("until the bus stops (cannot write beside {file}: see the bus's log)")
                }
            };
            out.line(&format!("{verb} {id} {how}"))?;
        }
        done.push(
            json!({ "id": id, "enabled": enable, "persistent": persistent,
                          "marker": marker.display().to_string() }),
        );
    }
    if a.client.json {
        return out.json_pretty(&json::document(json!({ "services": done })));
    }
    Ok(())
}

async fn reset_failed(a: &ResetFailedArgs, out: &mut Output) -> Result<()> {
    let c = Client::connect(&a.client).await?;
    let ids = if a.names.is_empty() {
        let all = c.all_services().await?;
        c.call_decode::<_, ()>("ResetFailed", &("",), None).await?;
        all.iter()
            .filter(|p| str_of(p, "State") == "failed")
            .map(|p| id_of(p).to_owned())
            .collect()
    } else {
        let mut ids = Vec::new();
        for name in &a.names {
            c.call_decode::<_, ()>("ResetFailed", &(name.as_str(),), Some(name))
                .await?;
            ids.push(c.service_id(name).await?);
        }
        ids
    };
    let mut done = Vec::new();
    for id in &ids {
        let p = c.service(id).await?;
        if !a.client.json {
            let state = str_of(&p, "State");
            out.line(&format!("reset {id}: {}", out.paint(state, state)))?;
        }
        done.push(json::service(&p));
    }
    if a.client.json {
        return out.json_pretty(&json::document(json!({ "services": done })));
    }
    Ok(())
}

// ---------------------------------------------------------------- reload, check

async fn reload(c: &Client, a: &ClientArgs, out: &mut Output) -> Result<()> {
    c.call_decode::<_, ()>("Reload", &(), None).await?;
    let all = c.all_services().await?;
    let bad: Vec<&Props> = all
        .iter()
        .filter(|p| str_of(p, "State") == "bad-definition")
        .collect();
    let defined = all.len() - bad.len();
    if a.json {
        let services: Vec<Json> = all.iter().map(json::service).collect();
        let problems: Vec<&str> = bad.iter().map(|p| str_of(p, "Reason")).collect();
        let doc = json!({ "defined": defined, "skipped": bad.len(), "problems": problems,
                          "services": services });
        out.json_pretty(&json::document(doc))?;
    } else {
        out.line(&format!(
            "reloaded: {defined} defined, {} skipped",
            bad.len()
        ))?;
        for p in &bad {
            out.line(&format!("skipped {}: {}", id_of(p), str_of(p, "Reason")))?;
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Failure::Status(1))
    }
}

/// Where `check` looks without a path: `./services.d` if there is one, and
/// the standard service directories of a session (or, with `--system`,
/// system) bus.
fn default_check_paths(system: bool) -> Vec<std::path::PathBuf> {
    let cfg = if system {
        crate::config::system_default().ok()
    } else {
        Some(crate::config::session_default())
    };
    let local = std::path::PathBuf::from("services.d");
    local
        .is_dir()
        .then_some(local)
        .into_iter()
        .chain(
            cfg.into_iter()
                .flat_map(|c| c.servicedirs.into_iter().map(|d| d.path))
                .filter(|p| p.is_dir()),
        )
        .collect()
}

fn check(a: &CheckArgs, out: &mut Output) -> Result<()> {
    let paths = if a.paths.is_empty() {
        default_check_paths(a.system)
    } else {
        a.paths.clone()
    };
    let report = crate::activation::catalog::check(&paths, a.system);
    if a.json {
        let defs: Vec<Json> = report
            .defs
            .iter()
            .map(|d| json!({ "id": d.id, "file": d.file, "names": d.names }))
            .collect();
        let doc = json!({ "checked": paths, "definitions": defs, "problems": report.problems });
        out.json_pretty(&json::document(doc))?;
    } else {
        for p in &report.problems {
            out.line(p)?;
        }
        out.line(&format!(
            "{} checked: {}, {}",
            plural(paths.len(), "path", "paths"),
            plural(report.defs.len(), "definition loads", "definitions load"),
            plural(report.problems.len(), "problem", "problems"),
        ))?;
    }
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::Status(1))
    }
}

// ---------------------------------------------------------------- logs, events

async fn logs(c: &Client, a: &LogsArgs, out: &mut Output) -> Result<()> {
    let format = if a.client.json {
        LogFormat::Json
    } else {
        a.output
    };
    let since = match &a.since {
        Some(s) => parse_since(s, now_us())?,
        None => 0,
    };
    let id = c.service_id(&a.name).await?;
    // Subscribe first, then fetch the backlog: no line is lost between.
    let mut follow = None;
    if a.follow {
        let keys = format!(",member='LogLine',arg0='{}'", match_escape(&id));
        follow = Some(c.subscribe(&keys).await?);
    }
    let backlog = c.entries(&id, a.lines, since).await?;
    let mut width = pid_width(&backlog);
    let print = |e: &Entry, out: &mut Output, width: &mut usize| {
        *width = (*width).max(e.pid.to_string().len());
        match format {
            LogFormat::Json => out.json(&json::document(e.to_json())),
            f => {
                let t = e.text(f, *width, out);
                out.line(&t)
            }
        }
    };
    for e in &backlog {
        print(e, out, &mut width)?;
    }
    let Some(mut rx) = follow else {
        return Ok(());
    };
    while let Some(m) = rx.recv().await {
        if m.header().member().map(|m| m.as_str()) != Some("LogLine") {
            continue;
        }
        let Ok((sid, pid, line, stream, time_us)) =
            m.body().deserialize::<(String, u32, String, String, u64)>()
        else {
            continue;
        };
        if sid != id || time_us < since {
            continue;
        }
        let e = Entry {
            id: sid,
            time_us,
            pid,
            stream,
            line,
        };
        print(&e, out, &mut width)?;
    }
    Err(Failure::msg(format!(
        "the bus at {} closed the connection",
        c.address
    )))
}

async fn events(c: &Client, a: &crate::cli::EventsArgs, out: &mut Output) -> Result<()> {
    // Subscribe before anything else: every event from here on is printed.
    let mut rx = c.subscribe("").await?;
    let only = match &a.service {
        Some(name) => Some(c.service_id(name).await?),
        None => None,
    };
    let longest = c
        .all_services()
        .await?
        .iter()
        .map(|p| id_of(p).chars().count())
        .max()
        .unwrap_or(0);
    let mut widths = Widths {
        serial: 5,
        id: longest,
    };
    while let Some(m) = rx.recv().await {
        let Some(ev) = Event::from_message(&m) else {
            continue;
        };
        if ev.kind == "log" && !a.logs {
            continue;
        }
        if only.as_ref().is_some_and(|id| *id != ev.id) {
            continue;
        }
        let now = now_us();
        if a.client.json {
            out.json(&ev.to_json(now))?;
        } else {
            let line = ev.human(now, out, &mut widths);
            out.line(&line)?;
        }
    }
    Err(Failure::msg(format!(
        "the bus at {} closed the connection",
        c.address
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", "anything"));
        assert!(glob("org.busvisor.*", "org.busvisor.Example.Echo"));
        assert!(!glob("org.busvisor.*", "org.freedesktop.DBus"));
        assert!(glob("e?ho", "echo"));
        assert!(glob("[ce]*", "echo") && glob("[ce]*", "crasher"));
        assert!(!glob("[!ce]*", "echo"));
        assert!(glob("[a-e]cho", "echo") && !glob("[f-z]cho", "echo"));
        assert!(glob("a[b", "a[b"));
        assert!(!glob("echo", "echo2"));
    }

    #[test]
    fn list_filters() {
        let p = |id: &str, state: &str, source: &str| -> Props {
            let v = json!({ "Id": id, "State": state, "Source": source,
                            "Names": [format!("org.x.{id}")] });
            v.as_object().unwrap().clone()
        };
        let none = ListArgs::default();
        assert!(listed(&p("a", "inactive", "busvisor"), &none));
        assert!(!listed(&p("b", "inactive", "dbus"), &none));
        assert!(listed(&p("b", "running", "dbus"), &none));
        let all = ListArgs {
            all: true,
            ..Default::default()
        };
        assert!(listed(&p("b", "inactive", "dbus"), &all));
        let failed = ListArgs {
            state: vec!["failed".into()],
            ..Default::default()
        };
        assert!(!listed(&p("a", "inactive", "busvisor"), &failed));
        assert!(listed(&p("b", "failed", "dbus"), &failed));
        let pat = ListArgs {
            patterns: vec!["org.x.[ab]".into()],
            ..Default::default()
        };
        assert!(listed(&p("b", "inactive", "dbus"), &pat));
        assert!(!listed(&p("c", "running", "busvisor"), &pat));
    }
}
