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
    init_logging(Some(a.log_level.as_deref().unwrap_or("warn")));
    // This process stays above the bus and CMD (see busvisor::keeper).
    if let Err(e) = busvisor::keeper::keep(Default::default(), false) {
        eprintln!("busvisor run: {e}");
        return ExitCode::FAILURE;
    }
    let rt = match daemon::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("busvisor run: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = Options {
        config_file: a.config_file.clone(),
        toml_config: a.config.clone(),
        services_dirs: absolute(&a.services_dir),
        ..Default::default()
    };
    match rt.block_on(daemon::run_command(opts, a.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("busvisor run: {e}");
            ExitCode::from(127)
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(normalize_args(std::env::args_os())) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Some(Command::Daemon(a)) => daemon_main(a),
        Some(Command::Run(a)) => run_main(a),
        Some(Command::Client(c)) => busvisor::client::main(c),
        Some(Command::Generate(g)) => busvisor::generate::main(g),
        None => daemon_main(cli.daemon),
    }
}
