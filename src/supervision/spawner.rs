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
/// child writes itself into when it cannot be born there. None if the
/// cgroup cannot be made (the environment token still finds the service).
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
    /// The child was created in its cgroup (clone3): no move.
    born_in_cgroup: bool,
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
            born_in_cgroup: false,
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
        if let Some(procs) = self.cgroup_procs.as_ref().filter(|_| !self.born_in_cgroup) {
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
    // Held from the cgroup's creation until the child is in it (spawn
    // returns after the exec): pruning empty cgroups takes it too, so it
    // cannot remove a cgroup between its mkdir and its first process.
    let guard = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut setup = ChildSetup::new(req);
    if setup.cgroup_procs.is_some() {
        // Born in its cgroup where the kernel can (clone3, Linux 5.7): a
        // move costs an RCU grace period, about 10 ms.
        setup.born_in_cgroup = true;
        if let Some(spawned) = clone3::spawn(req, program, &resolved, &setup) {
            drop(guard);
            return spawned;
        }
        setup.born_in_cgroup = false;
    }
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

/// Starting a process in its cgroup: `clone3(CLONE_INTO_CGROUP)`, then
/// what std's `Command::spawn` does (stdio, directory, exec, the exec
/// error reported through a close-on-exec pipe), since std cannot pass a
/// cgroup to the kernel.
mod clone3 {
    use std::ffi::{CString, c_char};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;

    use super::{ChildSetup, SpawnRequest, Spawned};

    /// `struct clone_args` of linux/sched.h, to its `cgroup` field (v2).
    #[repr(C, align(8))]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }

    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

    fn cstring(b: &[u8]) -> std::io::Result<CString> {
        CString::new(b).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a NUL byte in an argument",
            )
        })
    }

    /// A null-terminated array of pointers into `strings` (which must
    /// outlive it), for execve.
    fn pointers(strings: &[CString]) -> Vec<*const c_char> {
        strings
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    }

    /// Everything the child uses, made before the fork.
    struct Prepared {
        path: CString,
        argv: Vec<CString>,
        envp: Vec<CString>,
        cwd: Option<CString>,
        /// stdin for a service (`run`'s command keeps busvisor's).
        null: Option<OwnedFd>,
        out: Option<(OwnedFd, OwnedFd)>,
        err: Option<(OwnedFd, OwnedFd)>,
        /// Carries the exec's errno; closes on a successful exec.
        report: (OwnedFd, OwnedFd),
    }

    fn prepare(req: &SpawnRequest, program: &str, resolved: &Path) -> std::io::Result<Prepared> {
        let argv = std::iter::once(program)
            .chain(req.argv[1..].iter().map(String::as_str))
            .map(|a| cstring(a.as_bytes()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let envp = req
            .env
            .iter()
            .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let cwd = req
            .cwd
            .as_ref()
            .map(|d| cstring(d.as_os_str().as_bytes()))
            .transpose()?;
        let pipe = || {
            req.capture
                .then(|| nix::unistd::pipe2(OFlag::O_CLOEXEC))
                .transpose()
        };
        let null = req
            .capture
            .then(|| {
                open(
                    c"/dev/null",
                    OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
            })
            .transpose()?;
        Ok(Prepared {
            path: cstring(resolved.as_os_str().as_bytes())?,
            argv,
            envp,
            cwd,
            null,
            out: pipe()?,
            err: pipe()?,
            report: nix::unistd::pipe2(OFlag::O_CLOEXEC)?,
        })
    }

    /// The exec's outcome, from the report pipe: None when it closed empty
    /// (the exec succeeded), else the errno the child sent.
    fn exec_error(report: &OwnedFd) -> Option<i32> {
        let mut buf = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match nix::unistd::read(report, &mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        (got == 4).then(|| i32::from_ne_bytes(buf))
    }

    /// None when the kernel cannot (no clone3 or no CLONE_INTO_CGROUP, or
    /// the cgroup cannot be opened): the caller forks the usual way.
    pub(super) fn spawn(
        req: &SpawnRequest,
        program: &str,
        resolved: &Path,
        setup: &ChildSetup,
    ) -> Option<std::io::Result<Spawned>> {
        let dir = req.cgroup.as_deref()?;
        let cgroup = open(
            dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let p = match prepare(req, program, resolved) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let argv_p = pointers(&p.argv);
        let envp_p = pointers(&p.envp);
        let pid = clone_into(&cgroup);
        if pid == 0 {
            in_child(setup, &p, &argv_p, &envp_p);
        }
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            // ENOSYS: no clone3; E2BIG or EINVAL: no cgroup field or flag.
            return match e.raw_os_error() {
                Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL) => None,
                _ => Some(Err(e)),
            };
        }
        let pid = pid as i32;
        let Prepared {
            out, err, report, ..
        } = p;
        drop(report.1);
        if let Some(errno) = exec_error(&report.0) {
            // The exec failed: the child is ours to reap (the reaper waits
            // for the spawn lock, which the caller holds).
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            return Some(Err(std::io::Error::from_raw_os_error(errno)));
        }
        Some(Ok(Spawned {
            pid,
            program: resolved.to_owned(),
            stdout: out.map(|p| p.0),
            stderr: err.map(|p| p.0),
        }))
    }

    /// clone3(2) into `cgroup`, with fork semantics: returns twice, the
    /// child's pid in the parent and 0 in the child, or -1.
    fn clone_into(cgroup: &OwnedFd) -> libc::c_long {
        let args = CloneArgs {
            flags: CLONE_INTO_CGROUP,
            pidfd: 0,
            child_tid: 0,
            parent_tid: 0,
            exit_signal: libc::SIGCHLD as u64,
            stack: 0,
            stack_size: 0,
            tls: 0,
            set_tid: 0,
            set_tid_size: 0,
            cgroup: cgroup.as_raw_fd() as u64,
        };
        // SAFETY: clone3(2), which nix lacks, with no stack of its own and
        // no CLONE_VM: fork semantics, the child a copy of this process
        // with only this thread. In the child, the caller goes straight to
        // `in_child`, which makes only async-signal-safe system calls on
        // memory made before the fork (no allocation, no lock) and ends in
        // execve or _exit.
        unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        }
    }

    /// The forked child: set up and exec, or report the errno and exit.
    fn in_child(
        setup: &ChildSetup,
        p: &Prepared,
        argv: &[*const c_char],
        envp: &[*const c_char],
    ) -> ! {
        let errno = child(
            setup,
            &p.path,
            argv,
            envp,
            p.cwd.as_deref(),
            p.null.as_ref(),
            p.out.as_ref().map(|p| &p.1),
            p.err.as_ref().map(|p| &p.1),
        );
        let bytes = errno.to_ne_bytes();
        // SAFETY: write(2) and _exit(2) in the forked child, on a pipe fd
        // and a stack buffer; nothing else runs after.
        unsafe {
            libc::write(p.report.1.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127);
        }
    }

    /// In the forked child: stdio, directory, the rest of the setup, exec.
    /// Returns the errno of what failed.
    #[allow(clippy::too_many_arguments)]
    fn child(
        setup: &ChildSetup,
        path: &CString,
        argv: &[*const c_char],
        envp: &[*const c_char],
        cwd: Option<&std::ffi::CStr>,
        null: Option<&OwnedFd>,
        out: Option<&OwnedFd>,
        err: Option<&OwnedFd>,
    ) -> i32 {
        let errno = |e: nix::errno::Errno| e as i32;
        // dup2 leaves the new fds without close-on-exec.
        let stdio = [(null, 0), (out, 1), (err, 2)];
        for (fd, to) in stdio {
            if let Some(fd) = fd {
                // SAFETY: dup2(2) on two integer fds, in the child.
                if unsafe { libc::dup2(fd.as_raw_fd(), to) } < 0 {
                    return errno(nix::errno::Errno::last());
                }
            }
        }
        if let Some(dir) = cwd
            && let Err(e) = nix::unistd::chdir(dir)
        {
            return errno(e);
        }
        if let Err(e) = setup.run() {
            return e.raw_os_error().unwrap_or(libc::EINVAL);
        }
        // SAFETY: execve(2) with a path and two null-terminated pointer
        // arrays built before the fork, whose strings are alive (the
        // parent's copies, in this copy of its memory).
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        errno(nix::errno::Errno::last())
    }
}
