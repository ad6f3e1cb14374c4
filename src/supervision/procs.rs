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
//! process, which a session bus has and a system bus does not.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::OnceLock;

pub const TOKEN_VAR: &str = "BUSVISOR_INVOCATION";

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

/// The services' cgroup root, once set up (see [`setup_cgroups`] and
/// [`use_cgroups`]).
static CGROUPS: OnceLock<Option<CgroupRoot>> = OnceLock::new();

/// As the process that spawns services: make the directory for their
/// cgroups. None (and the environment token alone) where cgroup v2 is not
/// mounted or the bus's cgroup is not writable.
pub(crate) fn setup_cgroups() -> Option<&'static CgroupRoot> {
    CGROUPS
        .get_or_init(|| {
            let root = cgroup_root_of(std::process::id())?;
            match std::fs::create_dir(&root.dir) {
                Ok(()) => Some(root),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Some(root),
                Err(e) => {
                    tracing::debug!("no cgroups for services ({}): {e}", root.dir.display());
                    None
                }
            }
        })
        .as_ref()
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

/// Remove the cgroups of invocations that have no process left (the kernel
/// refuses to remove a populated one), and the root itself when `all` (at
/// shutdown).
pub(crate) fn prune_cgroups(all: bool) {
    let Some(root) = cgroups() else {
        return;
    };
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
fn cgroup_scan(root: &CgroupRoot) -> Scan {
    let mut out = Scan::new();
    let Ok(dir) = std::fs::read_dir(&root.dir) else {
        return out;
    };
    for e in dir.flatten() {
        let Some(token) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Ok(procs) = std::fs::read_to_string(e.path().join("cgroup.procs")) else {
            continue;
        };
        let pids: BTreeSet<i32> = procs.lines().filter_map(|l| l.parse().ok()).collect();
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
pub type Scan = HashMap<String, BTreeSet<i32>>;

/// Every service process, by its invocation's token: from the cgroups where
/// services run in cgroups, else from their environments.
pub fn services() -> Scan {
    match cgroups() {
        Some(root) => cgroup_scan(root),
        None => scan(TOKEN_VAR),
    }
}

/// Every live (non-zombie) process whose environment has `var`, grouped by
/// its value: one pass over /proc serves every service at once. It reads
/// every process's environment, milliseconds on a busy desktop, so the
/// supervisor runs it off the runtime and outside the core lock.
pub fn scan(var: &str) -> Scan {
    let mut out = Scan::new();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_stat() {
        let me = std::process::id() as i32;
        let (ppid, state) = stat_of(me).unwrap();
        assert!(ppid > 0);
        assert!(state == 'R' || state == 'S');
    }
}
