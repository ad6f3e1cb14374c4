//! Starting service processes.
//!
//! Every fork happens on one dedicated thread that lives as long as
//! busvisor: PR_SET_PDEATHSIG fires when the *forking thread* exits, and
//! tokio's blocking pool retires idle threads, which would kill services at
//! random. Spawning holds [`SPAWN_LOCK`], which the reaper also takes, so the
//! reaper can never collect a child whose exec failure std is still
//! reporting (std waits for such a child itself).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
use nix::sys::signal::Signal;
use tokio::sync::oneshot;

/// Held while forking and while reaping.
pub static SPAWN_LOCK: Mutex<()> = Mutex::new(());

/// What to start.
#[derive(Debug, Clone)]
pub struct SpawnRequest {
    pub argv: Vec<String>,
    /// The PATH a bare `argv[0]` is looked up in; None: the one in `env`
    /// (`run`'s command, which the user gave with its environment).
    pub search_path: Option<OsString>,
    pub env: HashMap<OsString, OsString>,
    pub cwd: Option<PathBuf>,
    /// A service's stdio: stdin from /dev/null, stdout and stderr
    /// captured, no other descriptor. Otherwise (`run`'s command) stdin,
    /// stdout, stderr and every descriptor busvisor inherited are passed
    /// through, as dbus-run-session passes them: a pipe or a terminal on
    /// stdin reaches the command.
    pub capture: bool,
    /// Put the process in a session of its own (services).
    pub new_session: bool,
    /// The cgroup to create and run in (see `procs`).
    pub cgroup: Option<PathBuf>,
    /// Run as this user, with its groups (system services).
    pub user: Option<Credentials>,
    /// Reset the OOM score adjustment to 0, as dbus-daemon does for system
    /// services: the bus's own (often -900) is not theirs.
    pub reset_oom: bool,
}

/// A user to run as, resolved before the fork (the child may not allocate,
/// and NSS lookups do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub name: String,
    pub uid: nix::unistd::Uid,
    pub gid: nix::unistd::Gid,
    pub groups: Vec<nix::unistd::Gid>,
}

impl Credentials {
    /// The passwd entry of `name`, and the groups `initgroups` would give it.
    pub fn of(name: &str) -> std::io::Result<Credentials> {
        let user = nix::unistd::User::from_name(name)
            .map_err(std::io::Error::from)?
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no such user {name:?}"),
                )
            })?;
        let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid).map_err(std::io::Error::from)?;
        Ok(Credentials {
            name: name.to_owned(),
            uid: user.uid,
            gid: user.gid,
            groups,
        })
    }
}

/// A started process: its pid and the read ends of its output pipes.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub program: PathBuf,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

type Job = (SpawnRequest, oneshot::Sender<std::io::Result<Spawned>>);

/// Handle to the spawner thread.
#[derive(Clone)]
pub struct Spawner {
    tx: mpsc::Sender<Job>,
}

impl Spawner {
    /// Start the spawner thread. Call once, early.
    pub fn start() -> std::io::Result<Spawner> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("busvisor-spawner".into())
            .spawn(move || {
                for (req, reply) in rx {
                    let _ = reply.send(spawn_now(&req));
                }
            })?;
        Ok(Spawner { tx })
    }

    pub async fn spawn(&self, req: SpawnRequest) -> std::io::Result<Spawned> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((req, tx))
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
        rx.await
            .map_err(|_| std::io::Error::other("the spawner thread dropped a request"))?
    }
}

/// The fd limit busvisor started with, restored in what it spawns (see
/// `raise_fd_limit`).
static INITIAL_NOFILE: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

/// dbus-daemon's `_dbus_rlimit_raise_fd_limit`: as root, a soft limit of at
/// least 65536 (and a hard limit at least that); as anyone, the soft limit
/// up to the hard one. The original is kept for the processes busvisor
/// spawns.
pub(crate) fn raise_fd_limit() -> nix::Result<()> {
    const ENOUGH_FDS: u64 = 65536;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let _ = INITIAL_NOFILE.set((soft, hard));
    let (mut new_soft, mut new_hard) = (soft, hard);
    if nix::unistd::getuid().is_root() {
        if new_soft != RLIM_INFINITY && new_soft < ENOUGH_FDS {
            new_soft = ENOUGH_FDS;
        }
        if new_hard != RLIM_INFINITY && new_hard < new_soft {
            new_hard = new_soft;
        }
    }
    if new_hard == RLIM_INFINITY || new_soft < new_hard {
        new_soft = new_hard;
    }
    if (new_soft, new_hard) == (soft, hard) {
        return Ok(());
    }
    // Root without CAP_SYS_RESOURCE (a container) may not raise the hard
    // limit: then at least the soft one, up to it.
    setrlimit(Resource::RLIMIT_NOFILE, new_soft, new_hard)
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard, hard))
}

/// Resolve argv[0]: a path as given, otherwise searched in `search_path`
/// (or the environment's PATH).
pub fn resolve_program(program: &str, req: &SpawnRequest) -> std::io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = match &req.search_path {
        Some(p) => p.clone(),
        None => req
            .env
            .get(&OsString::from("PATH"))
            .cloned()
            .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin")),
    };
    crate::activation::exec::find_in_path(program, &path).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{program} not found in PATH"),
        )
    })
}

/// Create an invocation's cgroup; the path of its `cgroup.procs`, which the
/// child writes itself into. None if the cgroup cannot be made (the
/// environment token still finds the service).
fn join_cgroup_path(dir: &Path) -> Option<std::ffi::CString> {
    // The bus's own cgroup directory too, made by the first spawn.
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::warn!("cannot create the cgroup {}: {e}", dir.display());
        return None;
    }
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).ok()
}

/// In a forked child: write `data` to a file, ignoring failure (only
/// async-signal-safe calls, no allocation).
fn write_file(path: &std::ffi::CStr, data: &[u8]) {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    if let Ok(fd) = open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty()) {
        let _ = nix::unistd::write(&fd, data);
    }
}

/// What the child does between fork and exec, made before the fork: the
/// child may not allocate.
struct ChildSetup {
    cgroup_procs: Option<std::ffi::CString>,
    reset_oom: bool,
    new_session: bool,
    /// Keep what busvisor inherited open (`run`'s command).
    inherit_fds: bool,
    nofile: Option<(u64, u64)>,
    user: Option<Credentials>,
}

impl ChildSetup {
    fn new(req: &SpawnRequest) -> ChildSetup {
        ChildSetup {
            cgroup_procs: req.cgroup.as_deref().and_then(join_cgroup_path),
            reset_oom: req.reset_oom,
            new_session: req.new_session,
            inherit_fds: !req.capture,
            nofile: INITIAL_NOFILE.get().copied(),
            user: req.user.clone(),
        }
    }

    /// In the child: only async-signal-safe calls (close_range or fcntl,
    /// open, write, close, setsid, sigprocmask, sigaction, setrlimit, setgroups, setresgid,
    /// setresuid, prctl).
    fn run(&self) -> std::io::Result<()> {
        if !self.inherit_fds {
            cloexec_above_stdio();
        }
        if let Some(procs) = &self.cgroup_procs {
            // Into the invocation's cgroup first, while still privileged.
            write_file(procs, b"0");
        }
        if self.reset_oom {
            write_file(c"/proc/self/oom_score_adj", b"0");
        }
        if self.new_session {
            nix::unistd::setsid()?;
        }
        // A program starts with no signal blocked (the warden blocks the
        // ones it reads from a signalfd) and SIGPIPE at its default (Rust
        // ignores it); exec keeps both otherwise.
        nix::sys::signal::sigprocmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&nix::sys::signal::SigSet::empty()),
            None,
        )?;
        // SAFETY: restoring the default disposition installs no handler.
        unsafe {
            nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl)?;
        }
        // The fd limit busvisor raised for itself is not the service's.
        if let Some((soft, hard)) = self.nofile {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, soft, hard);
        }
        if let Some(c) = &self.user {
            // As the launch helper does (initgroups, setgid, setuid), all
            // three ids, and checked: a half-dropped service is worse than
            // none.
            nix::unistd::setgroups(&c.groups)?;
            nix::unistd::setresgid(c.gid, c.gid, c.gid)?;
            nix::unistd::setresuid(c.uid, c.uid, c.uid)?;
            if nix::unistd::geteuid() != c.uid || nix::unistd::getegid() != c.gid {
                return Err(std::io::Error::from(nix::errno::Errno::EPERM));
            }
        }
        // If busvisor dies without stopping its services, they hear about
        // it (set after the uid change, which would clear it).
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
        Ok(())
    }
}

/// In the child: mark every fd above 2 close-on-exec, so that a service
/// gets only its stdio and not what busvisor inherited (a harness's pipe
/// would never reach EOF while a service lives). std passes the stdio as
/// 0, 1 and 2, and its exec-error pipe is close-on-exec already.
/// Async-signal-safe: raw syscalls only (also what `launch` gives the bus).
pub(crate) fn cloexec_above_stdio() {
    // SAFETY: close_range(2) takes three integers and touches no memory
    // of this process; nix has no wrapper.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return;
    }
    // Kernels before 5.11: every fd up to the limit (at most 2^20).
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft.min(1 << 20));
    for fd in 3..limit as i32 {
        // SAFETY: fcntl(2) on an integer fd; an fd that is not open gives EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 {
            // SAFETY: as above.
            unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        }
    }
}

pub(crate) fn spawn_now(req: &SpawnRequest) -> std::io::Result<Spawned> {
    let Some((program, args)) = req.argv.split_first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty command line",
        ));
    };
    let resolved = resolve_program(program, req)?;
    let mut cmd = Command::new(&resolved);
    cmd.arg0(program).args(args).env_clear().envs(&req.env);
    if req.capture {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    if let Some(dir) = &req.cwd {
        cmd.current_dir(dir);
    }
    // Held from the cgroup's creation until the child is in it (spawn
    // returns after the exec): pruning empty cgroups takes it too, so it
    // cannot remove a cgroup between its mkdir and its first process.
    let guard = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let setup = ChildSetup::new(req);
    // SAFETY: the closure runs in the forked child before exec; `run` calls
    // only async-signal-safe syscalls on data made before the fork, and
    // allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || setup.run());
    }
    let child = cmd.spawn();
    drop(guard);
    let mut child = child?;
    // The reaper owns the child's exit status: never wait through `Child`.
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    Ok(Spawned {
        pid: child.id() as i32,
        program: resolved,
        stdout,
        stderr,
    })
}
