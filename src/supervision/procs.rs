//! Finding a service's processes through /proc.
//!
//! Each service process gets `BUSVISOR_INVOCATION=<token>` in its
//! environment at spawn. Forked children inherit it, whatever they do with
//! sessions and process groups, so scanning /proc for the token finds the
//! whole tree even after double forks and `setsid()`. Reading another
//! process's environ needs the same uid, which a session bus has.

use std::collections::{BTreeSet, HashMap};

pub const TOKEN_VAR: &str = "BUSVISOR_INVOCATION";

/// The token in a process's environment, if any. One read, no waiting:
/// the router asks under its lock, about a process that owns a bus name
/// (so is not in the middle of an execve).
pub fn token_of(pid: i32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    value_in(&env, TOKEN_VAR)
}

/// The value of `var` in a process's environment, if any.
pub fn env_var_of(pid: i32, var: &str) -> Option<String> {
    let path = format!("/proc/{pid}/environ");
    let mut env = std::fs::read(&path).ok()?;
    // A process in the middle of execve shows an empty environment for a
    // moment: look again rather than lose it. (Kernel threads, pid 2 and its
    // children, have none at all.)
    let mut tries = 0;
    while env.is_empty()
        && tries < 20
        && pid != 2
        && stat_of(pid).is_some_and(|(ppid, s)| ppid != 2 && s != 'Z')
    {
        std::thread::sleep(std::time::Duration::from_micros(500));
        env = std::fs::read(&path).ok()?;
        tries += 1;
    }
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
