//! What busvisor generates about itself for packagers and shells: man pages
//! and completion scripts, made from the clap definitions (`Cli::command()`)
//! so that they follow every subcommand and flag as it is added, and the
//! list of service names a completion offers, asked of the running bus.
//! The subcommands are hidden: they are tools for packaging
//! (`scripts/build-deb`, docs/PACKAGING.md), not for daily use.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Arg, CommandFactory, Subcommand};
use clap_complete::Shell;

use crate::cli::{Cli, ClientArgs};

/// The name the scripts complete and the man pages document.
const BIN: &str = "busvisor";

/// How long a completion may wait for the bus: a shell must not hang on a
/// bus that does not answer.
const NAMES_TIMEOUT: Duration = Duration::from_secs(2);

/// The value name of every argument that takes a service (id or bus name);
/// the completion offers the running bus's services there.
const SERVICE_VALUE_NAME: &str = "NAME";

#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Print the completion script for SHELL.
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write busvisor.1 and a page per subcommand (busvisor-list.1, ...)
    /// into DIR; without DIR, print busvisor.1.
    #[command(hide = true)]
    Man { dir: Option<PathBuf> },
    /// Print the id and the bus names of every service the bus knows, one
    /// per line (what the completions offer for NAME).
    #[command(hide = true, name = "complete-names")]
    CompleteNames(ClientArgs),
}

pub fn main(cmd: GenerateCommand) -> ExitCode {
    let res = match cmd {
        GenerateCommand::Completions { shell } => completions(shell, &mut io::stdout().lock()),
        GenerateCommand::Man { dir: Some(dir) } => man_pages(&dir),
        GenerateCommand::Man { dir: None } => {
            clap_mangen::Man::new(Cli::command()).render(&mut io::stdout().lock())
        }
        GenerateCommand::CompleteNames(args) => return complete_names(&args),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("busvisor: {e}");
            ExitCode::FAILURE
        }
    }
}

/// busvisor.1 and busvisor-SUBCOMMAND.1 for every visible subcommand.
fn man_pages(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    clap_mangen::generate_to(Cli::command(), dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing man pages to {}: {e}", dir.display()),
        )
    })
}

/// clap_complete's script, and for bash a wrapper that completes NAME from
/// the running bus.
fn completions(shell: Shell, out: &mut dyn Write) -> io::Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, BIN, out);
    if shell == Shell::Bash {
        out.write_all(bash_service_names(&NameSlots::of(&Cli::command())).as_bytes())?;
    }
    out.flush()
}

/// Where a service name goes on the command line, read from the clap
/// definitions.
#[derive(Debug, Default, PartialEq)]
struct NameSlots {
    /// Subcommands whose positional argument is NAME, with how many names
    /// they take (`usize::MAX`: any number).
    positional: Vec<(String, usize)>,
    /// Options whose value is NAME (`--service`).
    options: Vec<String>,
    /// Every other option that takes a value, so that its value is not
    /// taken for a positional argument.
    value_options: Vec<String>,
}

impl NameSlots {
    fn of(cmd: &clap::Command) -> NameSlots {
        let mut slots = NameSlots::default();
        let mut all = vec![cmd];
        all.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()));
        for (i, c) in all.into_iter().enumerate() {
            for a in c.get_arguments() {
                let names = is_service(a);
                if a.is_positional() {
                    if names && i > 0 {
                        let most = a.get_num_args().map_or(1, |r| r.max_values());
                        slots.positional.push((c.get_name().to_owned(), most));
                    }
                    continue;
                }
                if !a.get_action().takes_values() || a.is_require_equals_set() {
                    continue;
                }
                let list = if names {
                    &mut slots.options
                } else {
                    &mut slots.value_options
                };
                let flags = a.get_long().map(|l| format!("--{l}")).into_iter();
                for f in flags.chain(a.get_short().map(|s| format!("-{s}"))) {
                    if !list.contains(&f) {
                        list.push(f);
                    }
                }
            }
        }
        slots
    }
}

fn is_service(a: &Arg) -> bool {
    a.get_value_names()
        .is_some_and(|v| v.iter().any(|n| n.as_str() == SERVICE_VALUE_NAME))
}

/// A bash function that completes NAME with `busvisor complete-names`
/// (passing on the line's `--address` or `--system`) and leaves every other
/// word to clap's `_busvisor`. bash splits words at `=` and `:`, which bus
/// addresses are full of, so it reads the line itself (addresses have no
/// spaces).
fn bash_service_names(slots: &NameSlots) -> String {
    let alternatives = |v: &[String]| {
        if v.is_empty() {
            // A pattern no word matches.
            "''".to_owned()
        } else {
            v.join("|")
        }
    };
    let positional: String = slots
        .positional
        .iter()
        .map(|(cmd, most)| {
            let most = if *most == usize::MAX { 0 } else { *most };
            format!("        {cmd}) most={most} ;;\n")
        })
        .collect();
    format!(
        r#"
# Service names (NAME) come from the running bus: `{BIN} complete-names`,
# with the line's --address or --system; nothing when no bus answers.
_busvisor_service_names() {{
    local line=${{COMP_LINE:0:COMP_POINT}} cur= prev= cmd= w opt= skip=0 n=0 most=-1
    local -a words bus=()
    read -ra words <<< "$line"
    if [[ -n $line && $line != *[[:space:]] ]]; then
        cur=${{words[-1]}}
        unset 'words[-1]'
    fi
    [[ ${{#words[@]}} -gt 1 ]] && prev=${{words[-1]}}
    for w in "${{words[@]:1}}"; do
        if ((skip)); then
            skip=0
            [[ $opt == --address ]] && bus=(--address "$w")
            continue
        fi
        opt=$w
        case $w in
            --address=*) bus=("$w") ;;
            --system) bus=(--system) ;;
            {value_options}|{name_options}) skip=1 ;;
            -*) ;;
            *) if [[ -z $cmd ]]; then cmd=$w; else n=$((n + 1)); fi ;;
        esac
    done
    case $cmd in
{positional}    esac
    local want=0
    case $prev in
        {name_options}) want=1 ;;
        {value_options}) ;;
        *) [[ $cur != -* ]] && ((most == 0 || n < most)) && want=1 ;;
    esac
    if ((want)); then
        local names
        names=$(command "${{words[0]}}" complete-names "${{bus[@]}}" 2>/dev/null)
        COMPREPLY=($(compgen -W "$names" -- "$cur"))
        return 0
    fi
    _busvisor "$@"
}}
if [[ "${{BASH_VERSINFO[0]}}" -eq 4 && "${{BASH_VERSINFO[1]}}" -ge 4 || "${{BASH_VERSINFO[0]}}" -gt 4 ]]; then
    complete -F _busvisor_service_names -o nosort -o bashdefault -o default {BIN}
else
    complete -F _busvisor_service_names -o bashdefault -o default {BIN}
fi
"#,
        value_options = alternatives(&slots.value_options),
        name_options = alternatives(&slots.options),
    )
}

/// Print every service's id and bus names, one per line. Quiet unless
/// something fails, and then only on stderr: a completion hides it.
fn complete_names(args: &ClientArgs) -> ExitCode {
    let rt = match crate::daemon::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("busvisor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        tokio::time::timeout(NAMES_TIMEOUT, async {
            let client = crate::client::Client::connect(args).await?;
            client.all_services().await
        })
        .await
    });
    rt.shutdown_background();
    let services = match res {
        Ok(Ok(s)) => s,
        Ok(Err(crate::client::Failure::Msg(m, _))) => {
            eprintln!("busvisor: {m}");
            return ExitCode::FAILURE;
        }
        Ok(Err(_)) => return ExitCode::FAILURE,
        Err(_) => {
            eprintln!("busvisor: the bus did not answer within {NAMES_TIMEOUT:?}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = io::stdout().lock();
    let mut seen = std::collections::BTreeSet::new();
    for s in &services {
        let names = s
            .get("Names")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_str);
        for name in std::iter::once(crate::client::id_of(s)).chain(names) {
            if !name.is_empty() && seen.insert(name) && writeln!(out, "{name}").is_err() {
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_slots_follow_the_clap_definitions() {
        let slots = NameSlots::of(&Cli::command());
        let positional = |name: &str| {
            slots
                .positional
                .iter()
                .find(|(c, _)| c == name)
                .map(|(_, n)| *n)
        };
        for cmd in ["status", "start", "stop", "restart", "logs"] {
            assert!(positional(cmd).is_some(), "{cmd} takes NAME: {slots:?}");
        }
        assert_eq!(positional("list"), None);
        assert_eq!(positional("run"), None);
        assert!(slots.options.contains(&"--service".to_owned()), "{slots:?}");
        for opt in ["--address", "-n", "--lines", "--config-file"] {
            assert!(
                slots.value_options.contains(&opt.to_owned()),
                "{opt}: {slots:?}"
            );
        }
        // Flags and `--print-address[=FD]` take no separate word.
        for flag in ["--system", "--json", "--print-address", "-f"] {
            assert!(!slots.value_options.contains(&flag.to_owned()), "{flag}");
        }
    }

    #[test]
    fn bash_script_wraps_clap_s_function() {
        let mut out = Vec::new();
        completions(Shell::Bash, &mut out).unwrap();
        let script = String::from_utf8(out).unwrap();
        assert!(script.contains("_busvisor() {"), "clap's function is there");
        assert!(script.contains("complete -F _busvisor_service_names"));
        assert!(script.contains("--service) want=1"), "{script}");
    }

    #[test]
    fn man_pages_per_visible_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        man_pages(dir.path()).unwrap();
        let mut got: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        got.sort();
        assert!(got.contains(&"busvisor.1".to_owned()), "{got:?}");
        assert!(got.contains(&"busvisor-status.1".to_owned()), "{got:?}");
        // Hidden subcommands get no page.
        assert!(!got.iter().any(|f| f.contains("completions")), "{got:?}");
        let page = std::fs::read_to_string(dir.path().join("busvisor-logs.1")).unwrap();
        assert!(page.starts_with(".ie"), "roff: {page}");
        assert!(page.contains("\\-\\-follow"), "{page}");
    }
}
