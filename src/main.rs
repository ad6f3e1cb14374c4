use std::process::ExitCode;

use clap::Parser;

use busvisor::cli::{Cli, Command, DaemonArgs, RunArgs, normalize_args};
use busvisor::daemon::{self, Options, Output};

/// Log to stderr, never blocking on it; the configuration may add the
/// system log (see `busvisor::logging`).
fn init_logging(level: Option<&str>) {
    busvisor::logging::init(level);
}

/// Service directories as absolute paths, so that definition files are
/// reported in a form any client can use.
fn absolute(dirs: &[std::path::PathBuf]) -> Vec<std::path::PathBuf> {
    dirs.iter()
        .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()))
        .collect()
}

fn daemon_options(a: &DaemonArgs) -> Options {
    Options {
        config_file: a.config_file_to_load(),
        toml_config: a.config.clone(),
        address: a.address.clone(),
        print_address: a.print_address.as_deref().map(Output::from_flag),
        print_pid: a.print_pid.as_deref().map(Output::from_flag),
        services_dirs: absolute(&a.services_dir),
        user_session_default: !a.session
            && !a.system
            && a.config_file.is_none()
            && a.config.is_none(),
        systemd_activation: a.systemd_activation,
        nopidfile: a.nopidfile,
        system: a.system,
        syslog: a.syslog_flag(),
        launched: None,
    }
}

/// `--fork`: start a copy of busvisor with `--nofork` in the background,
/// pass on what it prints to stdout (the address and pid), and leave once it
/// is ready, as dbus-daemon does.
fn fork_main() -> ExitCode {
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;
    let args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--fork")
        .chain([std::ffi::OsString::from("--nofork")])
        .collect();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("busvisor: cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let child = std::process::Command::new(exe)
        .args(args)
        .env(daemon::FORKED_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("busvisor: cannot start the daemon: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The child closes its stdout once it is listening and has printed.
    let mut out = Vec::new();
    if let Some(mut pipe) = child.stdout.take() {
        let _ = pipe.read_to_end(&mut out);
    }
    let _ = std::io::stdout().write_all(&out);
    match child.try_wait() {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(status)) => {
            eprintln!("busvisor: the daemon exited at start ({status})");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("busvisor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn daemon_main(a: DaemonArgs) -> ExitCode {
    if let Err(e) = busvisor::cli::check_daemon_flags(&a.services_dir, a.log_level.as_deref()) {
        eprintln!("busvisor: {e}");
        return ExitCode::from(2);
    }
    // As dbus-daemon: --fork, or the configuration's <fork/>, unless
    // --nofork.
    if !a.nofork
        && std::env::var_os(daemon::FORKED_ENV).is_none()
        && (a.fork || daemon::config_wants_fork(&daemon_options(&a)))
    {
        return fork_main();
    }
    init_logging(a.log_level.as_deref());
    if a.introspect {
        println!("{}", daemon::introspection());
        return ExitCode::SUCCESS;
    }
    match daemon::serve(daemon_options(&a)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("busvisor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_main(a: RunArgs) -> ExitCode {
    if let Err(e) = busvisor::cli::check_daemon_flags(&a.services_dir, a.log_level.as_deref()) {
        eprintln!("busvisor run: {e}");
        return ExitCode::from(2);
    }
    init_logging(Some(a.log_level.as_deref().unwrap_or("warn")));
    // This process stays above the bus and CMD (see busvisor::keeper).
    if let Err(e) = busvisor::keeper::keep(Default::default(), false) {
        eprintln!("busvisor run: {e}");
        return ExitCode::FAILURE;
    }
    let opts = Options {
        config_file: a.config_file.clone(),
        toml_config: a.config.clone(),
        services_dirs: absolute(&a.services_dir),
        ..Default::default()
    };
    match daemon::run(opts, a.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("busvisor run: {e}");
            ExitCode::from(127)
        }
    }
}

/// Whether busvisor was started under dbus-daemon's name (a symlink, or
/// installed in its place): then it is the daemon whatever the flags.
fn invoked_as_dbus_daemon() -> bool {
    std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .is_some_and(|p| p.file_name().is_some_and(|n| n == "dbus-daemon"))
}

/// No subcommand and no flag that asks for a bus: a usage error, never a
/// bus started by accident (exit code 2).
fn no_command(a: &DaemonArgs) -> ! {
    use clap::CommandFactory;
    let given: Vec<&str> = [
        (a.address.is_some(), "--address"),
        (!a.services_dir.is_empty(), "--services-dir"),
        (a.log_level.is_some(), "--log-level"),
    ]
    .into_iter()
    .filter_map(|(on, flag)| on.then_some(flag))
    .collect();
    let what = if given.is_empty() {
        "no command given".to_owned()
    } else {
        format!("{} alone starts no bus", given.join(" and "))
    };
    Cli::command()
        .error(
            clap::error::ErrorKind::MissingSubcommand,
            format!(
                "{what}: a bus starts only with `busvisor daemon`, `run -- CMD`, `launch`, \
                 or dbus-daemon's flags (--session, --system, --config-file, --nofork, \
                 --print-address, ...); `busvisor list`, `status`, ... control a running one"
            ),
        )
        .exit()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(normalize_args(std::env::args_os())) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Some(Command::Daemon(a)) => daemon_main(a),
        Some(Command::Run(a)) => run_main(a),
        Some(Command::Launch(a)) => busvisor::launch::main(a),
        Some(Command::Client(c)) => busvisor::client::main(c),
        Some(Command::Generate(g)) => busvisor::generate::main(g),
        None if cli.daemon.starts_a_bus() || invoked_as_dbus_daemon() => daemon_main(cli.daemon),
        None => no_command(&cli.daemon),
    }
}
