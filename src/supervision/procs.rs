//! Finding a service's processes.
//!
//! Where the bus may make cgroups (cgroup v2, its own cgroup writable: a
//! root bus, or a delegated subtree), each invocation runs in a cgroup of
//! its own, named by its token, under `<the bus's cgroup>/busvisor-<pid>`.
//! Membership survives double forks, `setsid()`, uid changes and
//! non-dumpable processes, and `/proc/PID/cgroup` and `cgroup.procs` are
//! readable by any user: this is what lets an unprivileged bus keep track
//! of services that run as other users.
//!
//! Everywhere else, each service process gets `BUSVISOR_INVOCATION=<token>`
//! in its environment at spawn. Forked children inherit it, so scanning
//! /proc for the token finds the whole tree too; but reading another
//! process's environ needs its uid (or CAP_SYS_PTRACE) and a dumpable
//! process, which a session bus has and a system bus does not. A process
//! can also drop the token (`env -i`), so the scan adds what the process
//! tree shows (see [`Tree`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use nix::sys::signal::Signal;

pub const TOKEN_VAR: &str = "BUSVISOR_INVOCATION";

/// Set by GLib's app launcher (gio-launch-desktop) in each application it
/// starts for the user, as a desktop portal's OpenURI does. Such a process,
/// and what it starts, is the user's, not the service's that launched it:
/// it is left out of the service (and, with cgroups, moved out of its
/// cgroup), so that stopping or losing the service does not end it. The
/// services' own environments never carry it (see `launch`).
pub(crate) const APP_MARKER: &str = "GIO_LAUNCHED_DESKTOP_FILE_PID";

/// The cgroup, beside the invocations', that applications handed to the
/// user are moved to (not a token: tokens are `<id>-<pid>-<n>`).
const APPS_CGROUP: &str = "apps";

/// Where services' cgroups go: the directory, and its path in the cgroup
/// hierarchy as `/proc/PID/cgroup` shows it.
#[derive(Debug)]
pub(crate) struct CgroupRoot {
    pub(crate) dir: PathBuf,
    hierarchy_path: String,
}

/// The cgroup v2 mount point and the bus process's own cgroup (its path in
/// the hierarchy).
fn own_cgroup() -> Option<(PathBuf, String)> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mountpoint options... - fstype ...
    let mount = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some((mount, path.trim_end_matches('/').to_owned()))
}

/// The root under which the bus whose spawning process is `owner` puts its
/// services' cgroups.
fn cgroup_root_of(owner: u32) -> Option<CgroupRoot> {
    let (mount, own) = own_cgroup()?;
    let hierarchy_path = format!("{own}/busvisor-{owner}");
    Some(CgroupRoot {
        dir: mount.join(hierarchy_path.trim_start_matches('/')),
        hierarchy_path,
    })
}

/// Whether services get cgroups: wherever they can be made, on every bus
/// (exact attribution; on a system bus the only way to know services that
/// run as other users). Moving a process into a cgroup costs about 10 ms
/// (the kernel waits for an RCU grace period), which a cold activation
/// pays. `BUSVISOR_CGROUPS=0` in busvisor's environment at start selects
/// the token and the tree anyway (the tests use both modes).
fn want_cgroups() -> bool {
    std::env::var("BUSVISOR_CGROUPS").as_deref() != Ok("0")
}

/// The services' cgroup root, once set up (see [`setup_cgroups`] and
/// [`use_cgroups`]).
static CGROUPS: OnceLock<Option<CgroupRoot>> = OnceLock::new();

/// As the process that spawns services: make the directory for their
/// cgroups. None (and the environment token alone) where cgroup v2 is not
/// mounted or the bus's cgroup is not writable.
///
/// The directory itself is made by the first spawn (`spawner`), or at once
/// when `now` (the warden, whose router looks for it): a bus that never
/// starts a service, or is killed before it does, leaves nothing behind.
/// Directories of buses that were killed are removed here.
pub(crate) fn setup_cgroups(now: bool) -> Option<&'static CgroupRoot> {
    CGROUPS
        .get_or_init(|| {
            if !want_cgroups() {
                return None;
            }
            let root = cgroup_root_of(std::process::id())?;
            if let Some(parent) = root.dir.parent() {
                remove_dead_buses(parent);
            }
            // Whether cgroups can be made here: by making the directory.
            let made = match std::fs::create_dir(&root.dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = made {
                tracing::debug!("no cgroups for services ({}): {e}", root.dir.display());
                return None;
            }
            if !now {
                let _ = std::fs::remove_dir(&root.dir);
            }
            Some(root)
        })
        .as_ref()
}

/// As the keeper, once the bus `bus` is gone: kill every process left in
/// its services' cgroups at once (`cgroup.kill` on the bus's directory
/// covers the ones below).
pub(crate) fn kill_cgroups_of(bus: u32) {
    if let Some(root) = cgroup_root_of(bus)
        && root.dir.is_dir()
    {
        let _ = std::fs::write(root.dir.join("cgroup.kill"), "1");
    }
}

/// As the keeper, once the bus `bus` and its processes are gone: remove
/// its cgroup directories.
pub(crate) fn remove_cgroups_of(bus: u32) {
    if let Some(root) = cgroup_root_of(bus) {
        remove_bus_dir(&root.dir);
    }
}

fn remove_bus_dir(dir: &std::path::Path) {
    if let Ok(services) = std::fs::read_dir(dir) {
        for s in services.flatten().filter(|s| s.path().is_dir()) {
            let _ = std::fs::remove_dir(s.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Every live (non-zombie) process below `root` in the process tree.
pub(crate) fn descendants_of(root: i32) -> Vec<i32> {
    let parents: HashMap<i32, i32> = proc_pids()
        .filter_map(|p| {
            stat_of(p)
                .filter(|(_, state)| *state != 'Z')
                .map(|(ppid, _)| (p, ppid))
        })
        .collect();
    parents
        .keys()
        .copied()
        .filter(|&p| is_below(p, root, |at| parents.get(&at).copied()))
        .collect()
}

/// Whether `pid` is below `root`, following `parent_of`.
fn is_below(pid: i32, root: i32, parent_of: impl Fn(i32) -> Option<i32>) -> bool {
    let mut at = pid;
    // Bounded: /proc changes under a walk.
    for _ in 0..256 {
        match parent_of(at) {
            Some(pp) if pp == root => return true,
            Some(pp) if pp > 1 => at = pp,
            _ => return false,
        }
    }
    false
}

/// End every process below this one: SIGTERM, then SIGKILL after `grace`
/// to what is left, until nothing is (a process may fork while it is being
/// killed). `reap` runs between looks, for a caller that reaps itself.
/// Returns how many got SIGTERM.
pub(crate) fn end_descendants(grace: std::time::Duration, reap: impl Fn()) -> usize {
    use std::time::{Duration, Instant};
    let me = std::process::id() as i32;
    let termed = signal_descendants(me, Signal::SIGTERM);
    if termed > 0 {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !descendants_of(me).is_empty() {
            reap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for _ in 0..50 {
        reap();
        if signal_descendants(me, Signal::SIGKILL) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    reap();
    termed
}

/// Send `sig` to every live process below `root`; returns how many. Each
/// is held by a pidfd before it is checked to be below `root` again, so
/// that a pid reused since the scan is not signalled.
pub(crate) fn signal_descendants(root: i32, sig: Signal) -> usize {
    let mut sent = 0;
    for pid in descendants_of(root) {
        let fd = match pidfd_open(pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
            Err(_) => None,
        };
        if !is_below(pid, root, |at| stat_of(at).map(|(pp, _)| pp)) {
            continue;
        }
        let r = match &fd {
            Some(fd) => pidfd_send_signal(fd, Some(sig)),
            None => {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(Into::into)
            }
        };
        if r.is_ok() {
            sent += 1;
        }
    }
    sent
}

/// Remove the (empty) cgroup directories of buses no longer running: a bus
/// killed with SIGKILL cannot remove its own.
fn remove_dead_buses(parent: &std::path::Path) {
    let Ok(dir) = std::fs::read_dir(parent) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("busvisor-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        remove_bus_dir(&e.path());
    }
}

/// As a bus whose services another process (`owner`) spawns: use the
/// cgroups it made, if it made them.
pub(crate) fn use_cgroups(owner: u32) -> Option<&'static CgroupRoot> {
    CGROUPS
        .get_or_init(|| cgroup_root_of(owner).filter(|r| r.dir.is_dir()))
        .as_ref()
}

/// The services' cgroup root, if services run in cgroups.
pub(crate) fn cgroups() -> Option<&'static CgroupRoot> {
    CGROUPS.get().and_then(|c| c.as_ref())
}

/// The cgroup an invocation runs in (tokens are valid cgroup names: see
/// `Service::new_invocation`).
pub(crate) fn service_cgroup(token: &str) -> Option<PathBuf> {
    Some(cgroups()?.dir.join(token))
}

/// Kill every process of an invocation's cgroup at once (cgroup.kill,
/// Linux 5.14): exact, whatever its processes did meanwhile. False where
/// there is no such cgroup or it cannot be written (an older kernel; a
/// router, whose services' cgroups are root's): then signal them one by one.
pub(crate) fn kill_cgroup(token: &str) -> bool {
    let Some(dir) = service_cgroup(token) else {
        return false;
    };
    std::fs::write(dir.join("cgroup.kill"), b"1").is_ok()
}

/// Remove the cgroups of invocations that have no process left (the kernel
/// refuses to remove a populated one), and the root itself when `all` (at
/// shutdown).
pub(crate) fn prune_cgroups(all: bool) {
    let Some(root) = cgroups() else {
        return;
    };
    // Not while a spawn is between its cgroup's mkdir and its exec.
    let _spawning = super::spawner::SPAWN_LOCK
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Ok(dir) = std::fs::read_dir(&root.dir) {
        for e in dir.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    if all {
        let _ = std::fs::remove_dir(&root.dir);
    }
}

/// The token of the invocation `pid` runs in, from its cgroup.
fn cgroup_token_of(pid: i32, root: &CgroupRoot) -> Option<String> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let below = path
        .strip_prefix(root.hierarchy_path.as_str())?
        .strip_prefix('/')?;
    let token = below.split('/').next()?;
    (!token.is_empty()).then(|| token.to_owned())
}

/// Live processes by token, from the services' cgroups.
fn cgroup_scan(root: &CgroupRoot) -> ByToken {
    let mut out = ByToken::new();
    let Ok(dir) = std::fs::read_dir(&root.dir) else {
        return out;
    };
    for e in dir.flatten() {
        let Some(token) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if token == APPS_CGROUP {
            continue;
        }
        let Ok(procs) = std::fs::read_to_string(e.path().join("cgroup.procs")) else {
            continue;
        };
        let mut pids: BTreeSet<i32> = procs.lines().filter_map(|l| l.parse().ok()).collect();
        hand_over_apps(root, &token, &mut pids);
        if !pids.is_empty() {
            out.insert(token, pids);
        }
    }
    out
}

/// The token in a process's environment, or its cgroup's name. One read,
/// no waiting: the router asks under its lock, about a process that owns a
/// bus name (so is not in the middle of an execve).
pub fn token_of(pid: i32) -> Option<String> {
    if let Some(root) = cgroups() {
        return cgroup_token_of(pid, root);
    }
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    value_in(&env, TOKEN_VAR)
}

/// The value of `var` in a process's environment, if any. One read, no
/// waiting: a process caught in the middle of execve (its environment
/// empty for a moment) is found by the next scan, and a start that looks
/// empty is checked again (`ExitMeaning::RecheckSoon`). Waiting here would
/// cost every kernel thread and every process without an environment.
pub fn env_var_of(pid: i32, var: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    value_in(&env, var)
}

/// The value of `var` in the NUL-separated `KEY=value` list of an environ file.
fn value_in(env: &[u8], var: &str) -> Option<String> {
    let prefix = format!("{var}=");
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Parent pid and state letter, from /proc/PID/stat (parsed after the last ')').
pub fn stat_of(pid: i32) -> Option<(i32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Live (non-zombie) processes by the value of one environment variable.
pub type ByToken = HashMap<String, BTreeSet<i32>>;

/// A process held by a pidfd: the process itself, not its pid, which the
/// kernel gives to another process once this one is reaped. None where
/// the kernel has no pidfds (before 5.3): then the pid alone.
pub type Pidfd = Option<Arc<OwnedFd>>;

/// Service processes by token, each held by a pidfd opened before the
/// process was seen to carry the token (so the pidfd is of that process).
pub type Scan = HashMap<String, BTreeMap<i32, Pidfd>>;

/// Every service process, by its invocation's token: from the cgroups where
/// services run in cgroups, else from their environments and the process
/// tree (see [`Tree`]).
pub(crate) fn services(tree: &mut Tree) -> Scan {
    let root = cgroups();
    let (found, by_tree) = match root {
        Some(root) => (cgroup_scan(root), HashMap::new()),
        None => tree.scan(),
    };
    // Checked again with the pidfd held: a pid reused since the first look
    // does not pass for the service's process.
    let still = |pid: i32, token: &str| match (root, by_tree.get(&pid)) {
        (Some(root), _) => cgroup_token_of(pid, root).as_deref() == Some(token),
        (None, Some(start)) => stat_full(pid).is_some_and(|s| s.start == *start),
        (None, None) => env_var_of(pid, TOKEN_VAR).as_deref() == Some(token),
    };
    let mut out = Scan::new();
    for (token, pids) in found {
        let held: BTreeMap<i32, Pidfd> = pids
            .into_iter()
            .filter_map(|pid| {
                let fd = match pidfd_open(pid) {
                    Ok(fd) => Some(Arc::new(fd)),
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return None,
                    Err(_) => None,
                };
                still(pid, &token).then_some((pid, fd))
            })
            .collect();
        if !held.is_empty() {
            out.insert(token, held);
        }
    }
    out
}

/// A process as its /proc/PID/stat shows it (readable by anyone).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stat {
    pub(crate) ppid: i32,
    pub(crate) pgid: i32,
    pub(crate) sid: i32,
    /// Clock ticks from boot to its start: with the pid, names one process.
    pub(crate) start: u64,
    pub(crate) zombie: bool,
}

/// A process's /proc/PID/stat (fields counted after the last ')', since
/// the command name may hold anything).
pub(crate) fn stat_full(pid: i32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut f = rest.split_whitespace();
    let zombie = f.next()? == "Z";
    let ppid = f.next()?.parse().ok()?;
    let pgid = f.next()?.parse().ok()?;
    let sid = f.next()?.parse().ok()?;
    // starttime is field 22; the state was field 3.
    let start = f.nth(22 - 7)?.parse().ok()?;
    Some(Stat {
        ppid,
        pgid,
        sid,
        start,
        zombie,
    })
}

/// The pids in /proc.
fn proc_pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
}

/// Attribution without cgroups. The token in a process's environment is
/// the first clue, but a process may drop it (`env -i`, an exec with an
/// empty environment). So the scan also attributes, from /proc/PID/stat:
/// a process the supervisor already holds for a service; one attributed by
/// an earlier scan (remembered by pid and start time, so a reused pid is
/// not taken for it), which keeps a helper attributed after its parent
/// exits and it is re-parented to busvisor; one in the session or process
/// group of a service process (busvisor starts each service in a session
/// of its own, and the kernel does not reuse a pid while it names a
/// session or group); and any descendant of those.
///
/// A pid is taken for a service's only while it is known to be that
/// service's process: a pid whose process has gone may already be another
/// program's, and its session (a terminal's, say) is not the service's.
#[derive(Default)]
pub(crate) struct Tree {
    /// Each service's processes as the supervisor holds them, set before
    /// each scan.
    pub(crate) known: HashMap<String, Known>,
    remembered: HashMap<(i32, u64), String>,
}

/// What the supervisor holds of one invocation, for a scan.
#[derive(Debug, Default)]
pub(crate) struct Known {
    /// Its processes whose pidfds said, just before the scan, that they
    /// still exist.
    pub(crate) live: Vec<i32>,
    /// The session busvisor made for it (led by the launched process, which
    /// may have exited since).
    pub(crate) session: Option<i32>,
}

impl Tree {
    /// Live processes by token, and those attributed other than by their
    /// environment, with their start times (to check them again).
    fn scan(&mut self) -> (ByToken, HashMap<i32, u64>) {
        let mut stats = HashMap::new();
        let mut owner: HashMap<i32, String> = HashMap::new();
        let mut apps = std::collections::HashSet::new();
        for pid in proc_pids() {
            let Some(st) = stat_full(pid).filter(|s| !s.zombie) else {
                continue;
            };
            if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
                if value_in(&env, APP_MARKER).is_some() {
                    apps.insert(pid);
                }
                if let Some(token) = value_in(&env, TOKEN_VAR) {
                    owner.insert(pid, token);
                }
            }
            stats.insert(pid, st);
        }
        let handed = handed_over(stats.keys().copied(), &apps, |p| {
            stats.get(&p).map(|s| s.ppid)
        });
        owner.retain(|pid, _| !handed.contains(pid));
        let mut by_tree = HashMap::new();
        let mut claim = |pid: i32, token: &String, owner: &mut HashMap<i32, String>| {
            if handed.contains(&pid) {
                return;
            }
            if let (Some(st), false) = (stats.get(&pid), owner.contains_key(&pid)) {
                owner.insert(pid, token.clone());
                by_tree.insert(pid, st.start);
            }
        };
        for (token, known) in &self.known {
            for pid in &known.live {
                claim(*pid, token, &mut owner);
            }
        }
        for ((pid, start), token) in &self.remembered {
            if stats.get(pid).is_some_and(|s| s.start == *start) {
                claim(*pid, token, &mut owner);
            }
        }
        // The session busvisor made names the service even once its leader
        // has exited, as long as the pid is not some other process's now:
        // while the session has members the kernel reuses no pid for it.
        let mut groups: HashMap<i32, String> = HashMap::new();
        for (token, known) in &self.known {
            if let Some(sid) = known.session
                && (!stats.contains_key(&sid) || owner.get(&sid) == Some(token))
            {
                groups.insert(sid, token.clone());
            }
        }
        groups.extend(
            owner
                .iter()
                .filter_map(|(pid, t)| stats.get(pid).map(|s| (s, t)))
                .flat_map(|(s, t)| [(s.sid, t.clone()), (s.pgid, t.clone())]),
        );
        for (pid, st) in &stats {
            let group = |id: i32| groups.get(&id).filter(|_| id > 1);
            if let Some(token) = group(st.sid).or_else(|| group(st.pgid)) {
                claim(*pid, token, &mut owner);
            }
        }
        for pid in stats.keys() {
            if let Some(token) = ancestor_token(*pid, &stats, &owner) {
                claim(*pid, &token, &mut owner);
            }
        }
        self.remembered = owner
            .iter()
            .filter_map(|(pid, t)| stats.get(pid).map(|s| ((*pid, s.start), t.clone())))
            .collect();
        let mut found = ByToken::new();
        for (pid, token) in owner {
            found.entry(token).or_default().insert(pid);
        }
        (found, by_tree)
    }
}

/// Which of `candidates` are applications in `apps` (see [`APP_MARKER`])
/// or below one, found by walking up from each (`parent_of`) until the
/// bus: the bus's own environment may carry the marker, when an app
/// launcher started it.
fn handed_over(
    candidates: impl IntoIterator<Item = i32>,
    apps: &std::collections::HashSet<i32>,
    parent_of: impl Fn(i32) -> Option<i32>,
) -> std::collections::HashSet<i32> {
    let bus = std::process::id() as i32;
    let mut out = std::collections::HashSet::new();
    if apps.is_empty() {
        return out;
    }
    let mut walk = |pid: i32| {
        let mut at = pid;
        for _ in 0..64 {
            if at <= 1 || at == bus {
                return;
            }
            if apps.contains(&at) {
                out.insert(pid);
                return;
            }
            match parent_of(at) {
                Some(pp) => at = pp,
                None => return,
            }
        }
    };
    for pid in candidates {
        walk(pid);
    }
    out
}

/// With cgroups: move the applications an invocation launched for the user
/// (and what they started) out of its cgroup, so that a stop, which kills
/// the cgroup, spares them; they leave `pids` too. A few passes, for what
/// they fork meanwhile.
fn hand_over_apps(root: &CgroupRoot, token: &str, pids: &mut BTreeSet<i32>) {
    for _ in 0..3 {
        let apps: std::collections::HashSet<i32> = pids
            .iter()
            .copied()
            .filter(|p| env_var_of(*p, APP_MARKER).is_some())
            .collect();
        let handed = handed_over(pids.iter().copied(), &apps, |p| {
            stat_of(p).map(|(pp, _)| pp)
        });
        let moving: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|p| handed.contains(p))
            .collect();
        if moving.is_empty() {
            return;
        }
        let dir = root.dir.join(APPS_CGROUP);
        // Not while a prune may remove the directory.
        let _lock = super::spawner::SPAWN_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Err(e) = std::fs::create_dir(&dir)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            return tracing::warn!("cannot make {}: {e}", dir.display());
        }
        for pid in &moving {
            match std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
                Ok(()) => tracing::info!(
                    pid,
                    invocation = token,
                    "an application it launched is left to the user"
                ),
                Err(e) => tracing::warn!(pid, "cannot move an application out of {token}: {e}"),
            }
            pids.remove(pid);
        }
        let Ok(now) = std::fs::read_to_string(root.dir.join(token).join("cgroup.procs")) else {
            return;
        };
        *pids = now.lines().filter_map(|l| l.parse().ok()).collect();
    }
}

/// The token of the nearest attributed ancestor of `pid`, if any.
fn ancestor_token(
    pid: i32,
    stats: &HashMap<i32, Stat>,
    owner: &HashMap<i32, String>,
) -> Option<String> {
    if owner.contains_key(&pid) {
        return None;
    }
    let mut at = pid;
    // Bounded: a pid loop cannot happen, but /proc changes under the scan.
    for _ in 0..64 {
        at = stats.get(&at)?.ppid;
        if at <= 1 {
            return None;
        }
        if let Some(t) = owner.get(&at) {
            return Some(t.clone());
        }
    }
    None
}

/// Every live (non-zombie) process whose environment has `var`, grouped by
/// its value: one pass over /proc serves every service at once. It reads
/// every process's environment, milliseconds on a busy desktop, so the
/// supervisor runs it off the runtime and outside the core lock.
pub fn scan(var: &str) -> ByToken {
    let mut out = ByToken::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(value) = env_var_of(pid, var)
            && stat_of(pid).is_some_and(|(_, state)| state != 'Z')
        {
            out.entry(value).or_default().insert(pid);
        }
    }
    out
}

/// Every live (non-zombie) process whose environment has `var=value`.
pub fn with_env_var(var: &str, value: &str) -> BTreeSet<i32> {
    scan(var).remove(value).unwrap_or_default()
}

/// A service's processes, each held by a pidfd from when it was first
/// known (spawned, found by a scan, or taking the service's name), so that
/// what is signalled is never a process that got a reused pid.
#[derive(Default)]
pub(crate) struct ProcSet(BTreeMap<i32, Pidfd>);

impl std::fmt::Debug for ProcSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl ProcSet {
    pub(crate) fn contains(&self, pid: &i32) -> bool {
        self.0.contains_key(pid)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = i32> + '_ {
        self.0.keys().copied()
    }

    /// The pids with their pidfds, to signal them.
    pub(crate) fn held(&self) -> impl Iterator<Item = (i32, Option<&OwnedFd>)> + '_ {
        self.0.iter().map(|(pid, fd)| (*pid, fd.as_deref()))
    }

    /// A process known by its pid now: a child not yet reaped (its pid
    /// cannot be reused yet), or the peer that just took the service's name.
    pub(crate) fn insert(&mut self, pid: i32) {
        self.0
            .entry(pid)
            .or_insert_with(|| pidfd_open(pid).ok().map(Arc::new));
    }

    /// A process a scan found, with the pidfd the scan opened.
    pub(crate) fn insert_held(&mut self, pid: i32, fd: &Pidfd) {
        self.0.entry(pid).or_insert_with(|| fd.clone());
    }

    /// A process reaped.
    pub(crate) fn remove(&mut self, pid: &i32) {
        self.0.remove(pid);
    }

    /// Forget the processes that are gone. A zombie stays until the reaper
    /// reports it, so that its exit is attributed; a process reaped by
    /// someone else (its own parent) goes, even if its pid is reused,
    /// because its pidfd says so.
    pub(crate) fn retain_live(&mut self) {
        self.0.retain(|pid, fd| exists(*pid, fd.as_deref()));
    }

    /// The pids whose processes still exist (zombies included): the only
    /// ones that may stand for the service in a scan.
    pub(crate) fn live(&self) -> impl Iterator<Item = i32> + '_ {
        self.0
            .iter()
            .filter(|(pid, fd)| exists(**pid, fd.as_deref()))
            .map(|(pid, _)| *pid)
    }
}

/// Whether the process held by `fd` (or, on kernels without pidfds, some
/// process with its pid) still exists.
fn exists(pid: i32, fd: Option<&OwnedFd>) -> bool {
    match fd {
        Some(fd) => match pidfd_send_signal(fd, None) {
            Ok(()) => true,
            // Alive, and another user's (a router's root service).
            Err(e) => e.raw_os_error() != Some(libc::ESRCH),
        },
        None => stat_of(pid).is_some(),
    }
}

/// A pidfd for `pid` (pidfd_open(2), Linux 5.3).
pub(crate) fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
    // descriptor or -1; nix has no wrapper.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new descriptor to this process.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Send `sig` to the process of `fd`; None sends nothing, and only says
/// whether it still exists (ESRCH once it has been reaped).
pub(crate) fn pidfd_send_signal(fd: &OwnedFd, sig: Option<Signal>) -> std::io::Result<()> {
    let signo = sig.map_or(0, |s| s as i32);
    // SAFETY: pidfd_send_signal(2) with a valid pidfd, a signal number, no
    // siginfo and no flags; nix has no wrapper.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signo,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_an_app_starts_is_handed_over_with_it_and_the_bus_is_the_limit() {
        let bus = std::process::id() as i32;
        // bus -> 100 (service) -> 101 (app) -> 102 -> 103; 100 -> 104.
        let parents: HashMap<i32, i32> =
            [(100, bus), (101, 100), (102, 101), (103, 102), (104, 100)].into();
        let parent_of = |p: i32| parents.get(&p).copied();
        let apps = [101].into();
        let handed = handed_over(parents.keys().copied(), &apps, parent_of);
        assert_eq!(handed, [101, 102, 103].into());
        // The bus itself launched as an app marks nothing.
        let apps = [bus].into();
        assert!(handed_over(parents.keys().copied(), &apps, parent_of).is_empty());
    }

    #[test]
    fn pidfd_signals_reach_the_process_and_tell_when_it_is_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let mut set = ProcSet::default();
        set.insert(pid);
        let fd = pidfd_open(pid).unwrap();
        pidfd_send_signal(&fd, Some(Signal::SIGKILL)).unwrap();
        // A zombie is still there until it is reaped.
        while stat_of(pid).is_some_and(|(_, s)| s != 'Z') {
            std::thread::yield_now();
        }
        set.retain_live();
        assert!(set.contains(&pid));
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
        set.retain_live();
        assert!(set.is_empty());
    }

    #[test]
    fn full_stat_has_groups_and_start_time() {
        let me = std::process::id() as i32;
        let st = stat_full(me).unwrap();
        assert_eq!(st.sid, nix::unistd::getsid(None).unwrap().as_raw());
        assert_eq!(st.pgid, nix::unistd::getpgrp().as_raw());
        assert!(st.start > 0 && !st.zombie);
    }

    #[test]
    fn reads_own_stat() {
        let me = std::process::id() as i32;
        let (ppid, state) = stat_of(me).unwrap();
        assert!(ppid > 0);
        assert!(state == 'R' || state == 'S');
    }
}
