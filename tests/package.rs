//! The Debian package, built as docs/PACKAGING.md says (scripts/build-deb:
//! a release build, man pages and completions made from it, cargo-deb).
//! Its files, control fields and maintainer scripts are checked; the
//! extracted package's binary is the bus of a real dbus-run-session, its
//! example services answer, its man pages render and its bash completion
//! loads and completes service names from the running bus; and, as root, it
//! is installed with dpkg into a fresh debootstrap root, used there, and
//! purged.
//!
//! The package is built once for all the tests here, into
//! `<target>/package-test/` (remade on every run). Building needs cargo-deb
//! (`cargo install cargo-deb --locked`; CI's .ci/run installs it).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::CommandFactory;
use common::{ChildGuard, ToolOutput, run_tool_env};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const DOC: &str = "usr/share/doc/busvisor";
const BASH_COMPLETION: &str = "usr/share/bash-completion/completions/busvisor";

/// A release build from nothing takes minutes on a small machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

struct Package {
    deb: PathBuf,
    /// The package extracted with `dpkg-deb -x`.
    root: PathBuf,
}

/// The target directory this test was built in (`<target>/<profile>/busvisor`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_busvisor"))
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned()
}

fn package() -> &'static Package {
    static PACKAGE: OnceLock<Result<Package, String>> = OnceLock::new();
    match PACKAGE.get_or_init(build_package) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn build_package() -> Result<Package, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let has_cargo_deb = Command::new(&cargo)
        .args(["deb", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_cargo_deb {
        return Err(
            "cargo-deb is not installed; this test builds the Debian package with it. \
                    Install it with: cargo install cargo-deb --locked"
                .to_owned(),
        );
    }
    let target = target_dir();
    let dir = target.join("package-test");
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("deb");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let log_path = dir.join("build.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let child = Command::new(Path::new(REPO).join("scripts/build-deb"))
        .arg("--output")
        .arg(&out)
        .env("CARGO", &cargo)
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        // Its own process group, so that a timeout ends cargo too.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run scripts/build-deb: {e}"))?;
    let mut child = ChildGuard::new(child);
    let status = child.wait_timeout(BUILD_TIMEOUT);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => {}
        Some(s) => return Err(format!("scripts/build-deb failed ({s}):\n{log}")),
        None => {
            let group = nix::unistd::Pid::from_raw(child.pid() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            return Err(format!(
                "scripts/build-deb took over {BUILD_TIMEOUT:?}:\n{log}"
            ));
        }
    }
    eprintln!("package built in {:.1?}", started.elapsed());
    let debs: Vec<PathBuf> = std::fs::read_dir(&out)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    let [deb] = debs.as_slice() else {
        return Err(format!("expected one .deb in {}: {debs:?}", out.display()));
    };
    let root = dir.join("root");
    let x = tool("dpkg-deb", &["-x", &s(deb), &s(&root)], &[]);
    if !x.success() {
        return Err(format!("dpkg-deb -x: {x:?}"));
    }
    Ok(Package {
        deb: deb.clone(),
        root,
    })
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn tool(program: &str, args: &[&str], env: &[(&str, &str)]) -> ToolOutput {
    run_tool_env(program, args, env, TOOL_TIMEOUT)
}

/// Every path under `dir`, relative to it, with whether it is executable.
fn files_under(dir: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            for (rel, x) in files_under(&p) {
                out.push((Path::new(p.file_name().unwrap()).join(rel), x));
            }
        } else {
            let x = p.metadata().unwrap().permissions().mode() & 0o111 != 0;
            out.push((PathBuf::from(p.file_name().unwrap()), x));
        }
    }
    out
}

/// The subcommands that get a man page (clap_mangen skips hidden ones).
fn visible_subcommands() -> Vec<String> {
    busvisor::cli::Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_owned())
        .collect()
}

/// What the package must hold: path (without "./") to mode.
fn expected_files() -> BTreeMap<String, &'static str> {
    let mut want = BTreeMap::new();
    want.insert("usr/bin/busvisor".to_owned(), "-rwxr-xr-x");
    let man = "usr/share/man/man1";
    want.insert(format!("{man}/busvisor.1.gz"), "-rw-r--r--");
    let subs = visible_subcommands();
    for must in ["daemon", "run", "list", "status", "start", "stop", "logs"] {
        assert!(subs.iter().any(|c| c == must), "{must} in {subs:?}");
    }
    for sub in subs {
        want.insert(format!("{man}/busvisor-{sub}.1.gz"), "-rw-r--r--");
    }
    for f in [
        BASH_COMPLETION,
        "usr/share/zsh/vendor-completions/_busvisor",
        "usr/share/fish/vendor_completions.d/busvisor.fish",
        "usr/share/doc/busvisor/copyright",
        "usr/share/doc/busvisor/README.md",
    ] {
        want.insert(f.to_owned(), "-rw-r--r--");
    }
    for (rel, _) in files_under(&Path::new(REPO).join("docs")) {
        if rel.extension().is_some_and(|x| x == "md") {
            want.insert(format!("{DOC}/{}", rel.display()), "-rw-r--r--");
        }
    }
    for (rel, _) in files_under(&Path::new(REPO).join("services.d")) {
        // Definitions and their scripts, not what python leaves beside them.
        if !rel.extension().is_some_and(|x| x == "toml" || x == "py")
            || rel.components().count() > 1
        {
            continue;
        }
        want.insert(
            format!("{DOC}/examples/services.d/{}", rel.display()),
            "-rw-r--r--",
        );
    }
    for (rel, exec) in files_under(&Path::new(REPO).join("contrib")) {
        let mode = if exec { "-rwxr-xr-x" } else { "-rw-r--r--" };
        want.insert(format!("{DOC}/examples/contrib/{}", rel.display()), mode);
    }
    want
}

#[test]
fn package_holds_the_files_and_fields_it_should() {
    let p = package();
    let deb = s(&p.deb);

    // Files: exactly the expected ones, owned by root, with their modes.
    let list = tool("dpkg-deb", &["-c", &deb], &[]);
    list.assert_ok();
    let mut got = BTreeMap::new();
    for line in list.stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 6, "dpkg-deb -c line {line:?}");
        assert_eq!(f[1], "0/0", "owned by root: {line}");
        if f[0].starts_with('-') {
            let path = f[5].trim_start_matches("./").to_owned();
            got.insert(path, f[0].to_owned());
        } else {
            assert!(
                f[0].starts_with("drwxr-xr-x"),
                "only files and dirs: {line}"
            );
        }
    }
    let want = expected_files();
    let want_modes: BTreeMap<String, String> = want
        .iter()
        .map(|(k, v)| (k.clone(), (*v).to_owned()))
        .collect();
    assert_eq!(got, want_modes, "the package's files:\n{}", list.stdout);

    // Control fields.
    let field = |name: &str| {
        let o = tool("dpkg-deb", &["-f", &deb, name], &[]);
        o.assert_ok();
        o.stdout.trim().to_owned()
    };
    assert_eq!(field("Package"), "busvisor");
    assert_eq!(field("Version"), format!("{}-1", env!("CARGO_PKG_VERSION")));
    let arch = tool("dpkg", &["--print-architecture"], &[]);
    assert_eq!(field("Architecture"), arch.assert_ok().stdout.trim());
    assert_eq!(field("Section"), "admin");
    assert_eq!(field("Priority"), "optional");
    assert!(
        field("Depends").starts_with("libc6 (>= "),
        "{}",
        field("Depends")
    );
    let maint = field("Maintainer");
    assert!(maint.contains('<') && maint.ends_with('>'), "{maint}");
    let desc = field("Description");
    assert!(
        desc.starts_with(env!("CARGO_PKG_DESCRIPTION")),
        "summary from Cargo.toml: {desc}"
    );
    assert!(
        desc.contains("PACKAGING.md"),
        "extended description: {desc}"
    );
    let installed_kib: u64 = field("Installed-Size").parse().unwrap();
    assert!(installed_kib > 1000, "Installed-Size {installed_kib}");
    let info = tool("dpkg-deb", &["-I", &deb], &[]);
    assert!(info.assert_ok().stdout.contains(" Package: busvisor"));

    // Maintainer scripts: none (nothing to create, divert or start), and
    // no conffiles (nothing in /etc).
    let control = tempfile::tempdir().unwrap();
    tool("dpkg-deb", &["-e", &deb, &s(control.path())], &[]).assert_ok();
    let mut members: Vec<String> = std::fs::read_dir(control.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    members.sort();
    members.retain(|m| m != "md5sums");
    assert_eq!(members, ["control"], "control members");

    // The binary is stripped (debug = 1 in the release profile is for
    // profiling, not for the package).
    let sections = tool(
        "readelf",
        &["-S", &s(&p.root.join("usr/bin/busvisor"))],
        &[],
    );
    assert!(
        !sections.assert_ok().stdout.contains(".debug_info"),
        "the packaged binary still has debug info"
    );
}

/// The contrib/ files as packaged: every script parses with the system's
/// sh, and the Xsession.d snippet, sourced as Xsession does (`set -e`),
/// leaves a session bus that is already set alone.
#[test]
fn packaged_contrib_scripts_parse_and_the_xsession_snippet_defers() {
    let contrib = package().root.join(DOC).join("examples/contrib");
    let files = files_under(&contrib);
    assert!(files.len() >= 3, "{files:?}");
    for (rel, _) in &files {
        let out = tool("sh", &["-n", &s(&contrib.join(rel))], &[]);
        assert!(out.success(), "sh -n {}: {}", rel.display(), out.stderr);
    }
    let snippet = contrib.join("xsession/74busvisor_launch");
    let out = tool(
        "sh",
        &[
            "-e",
            "-c",
            ". \"$0\"; echo \"$DBUS_SESSION_BUS_ADDRESS\"",
            &s(&snippet),
        ],
        &[("DBUS_SESSION_BUS_ADDRESS", "unix:path=/run/user/1/bus")],
    );
    assert_eq!(out.assert_ok().stdout, "unix:path=/run/user/1/bus\n");
}

/// `dbus-run-session --dbus-daemon=<root>/usr/bin/busvisor`: the packaged
/// binary is the session bus, and answers as busvisor.
#[test]
fn packaged_busvisor_is_dbus_run_session_s_bus() {
    let bin = s(&package().root.join("usr/bin/busvisor"));
    let out = tool(
        "dbus-run-session",
        &[
            &format!("--dbus-daemon={bin}"),
            "--",
            "sh",
            "-c",
            "gdbus call --session --dest org.freedesktop.DBus \
             --object-path /org/freedesktop/DBus --method org.freedesktop.DBus.GetId \
             && exec \"$0\" list --json",
            &bin,
        ],
        &[],
    );
    out.assert_ok();
    assert_bus_id_then_list(&out.stdout);
}

/// gdbus's `('<32 hex digits>',)`, then `busvisor list --json` (a JSON
/// value: only busvisor answers it, so the bus was busvisor).
fn assert_bus_id_then_list(stdout: &str) {
    let (first, rest) = stdout.split_once('\n').expect("two outputs");
    let id = first
        .strip_prefix("('")
        .and_then(|r| r.strip_suffix("',)"))
        .unwrap_or_else(|| panic!("GetId answer: {stdout:?}"));
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "bus id {id:?}"
    );
    serde_json::from_str::<serde_json::Value>(rest)
        .unwrap_or_else(|e| panic!("busvisor list --json: {e}: {rest:?}"));
}

/// The example services as installed (under /usr/share/doc) work when a
/// bus is pointed at them.
#[test]
fn packaged_example_services_answer() {
    let root = &package().root;
    let services = root.join(DOC).join("examples/services.d");
    let out = tool(
        &s(&root.join("usr/bin/busvisor")),
        &[
            "run",
            "--services-dir",
            &s(&services),
            "--",
            "gdbus",
            "call",
            "--session",
            "--dest",
            "org.busvisor.Example.Echo",
            "--object-path",
            "/org/busvisor/Example/Echo",
            "--method",
            "org.busvisor.Example.Echo.Echo",
            "hello from the package",
        ],
        &[],
    );
    assert_eq!(out.assert_ok().stdout.trim(), "('hello from the package',)");
}

#[test]
fn packaged_man_pages_render_without_warnings() {
    let man1 = package().root.join("usr/share/man/man1");
    let mut pages = 0;
    for (rel, _) in files_under(&man1) {
        let name = rel.to_string_lossy().trim_end_matches(".1.gz").to_owned();
        let out = tool(
            "man",
            &["--warnings", "-l", &s(&man1.join(&rel))],
            &[
                ("MANPAGER", "cat"),
                ("MANWIDTH", "100"),
                ("LC_ALL", "C.UTF-8"),
            ],
        );
        out.assert_ok();
        assert!(
            out.stderr.is_empty(),
            "{name}: groff warnings: {}",
            out.stderr
        );
        // Justified text: compare with single spaces.
        let text = out.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            text.contains(&format!("NAME {name} - ")),
            "{name}: NAME section:\n{}",
            out.stdout
        );
        if name == "busvisor" {
            for sub in visible_subcommands() {
                assert!(
                    text.contains(&format!("busvisor-{sub}(1)")),
                    "busvisor(1) names busvisor-{sub}(1):\n{}",
                    out.stdout
                );
            }
        }
        if name == "busvisor-logs" {
            assert!(text.contains("--follow"), "{}", out.stdout);
        }
        pages += 1;
    }
    assert_eq!(pages, visible_subcommands().len() + 1);
}

/// A bash script that loads the package's completion as bash-completion
/// does (by command name, from `$XDG_DATA_DIRS/bash-completion/completions`),
/// then defines `comp LINE`: complete LINE as if TAB were pressed at its
/// end, printing the candidates one per line.
const BASH_PRELUDE: &str = r#"
. /usr/share/bash-completion/bash_completion
__load_completion busvisor || { echo "no completion for busvisor" >&2; exit 1; }
comp() {
    COMP_LINE=$1
    COMP_POINT=${#1}
    read -ra COMP_WORDS <<< "$1"
    [[ $1 == *' ' ]] && COMP_WORDS+=('')
    COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
    COMPREPLY=()
    local spec f
    spec=$(complete -p busvisor)
    f=${spec##*-F }
    f=${f%% *}
    "$f" busvisor "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    printf '%s\n' "${COMPREPLY[@]}"
}
"#;

fn bash_completion_env(root: &Path) -> Vec<(&'static str, String)> {
    let path = format!(
        "{}:{}",
        s(&root.join("usr/bin")),
        std::env::var("PATH").unwrap_or_default()
    );
    vec![
        ("XDG_DATA_DIRS", s(&root.join("usr/share"))),
        ("PATH", path),
        ("HOME", "/nonexistent".to_owned()),
    ]
}

fn sorted_lines(s: &str) -> Vec<&str> {
    let mut v: Vec<&str> = s.lines().filter(|l| !l.is_empty()).collect();
    v.sort();
    v
}

#[test]
fn packaged_bash_completion_loads_and_completes() {
    let root = &package().root;
    let env_owned = bash_completion_env(root);
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // Loaded from its installed place; subcommands come from clap.
    let script = format!(
        "{BASH_PRELUDE}\ncomplete -p busvisor\necho ---\ncomp 'busvisor st'\necho ---\ncomp 'busvisor logs -'"
    );
    let out = tool("bash", &["--norc", "--noprofile", "-c", &script], &env);
    out.assert_ok();
    let parts: Vec<&str> = out.stdout.split("---\n").collect();
    assert_eq!(parts.len(), 3, "{}", out.stdout);
    let spec = parts[0].trim();
    assert!(
        spec.starts_with("complete ") && spec.ends_with(" busvisor") && spec.contains(" -F "),
        "complete -p busvisor: {spec}"
    );
    assert_eq!(sorted_lines(parts[1]), ["start", "status", "stop"]);
    for opt in ["--follow", "--lines", "--address"] {
        assert!(parts[2].lines().any(|l| l == opt), "{opt}: {}", parts[2]);
    }

    // No bus: no names, and at once.
    let started = Instant::now();
    let mut no_bus = env.clone();
    no_bus.push(("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus"));
    let script = format!("{BASH_PRELUDE}\ncomp 'busvisor start '");
    let out = tool("bash", &["--norc", "--noprofile", "-c", &script], &no_bus);
    assert_eq!(out.assert_ok().stdout.trim(), "", "no bus, no names");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Service names come from the running bus: bash runs on a bus of the
/// packaged binary that has the packaged example services.
#[test]
fn packaged_bash_completion_asks_the_bus_for_names() {
    let root = &package().root;
    let env_owned = bash_completion_env(root);
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let services = s(&root.join(DOC).join("examples/services.d"));
    let script = format!(
        "{BASH_PRELUDE}
comp 'busvisor start '; echo ---
comp 'busvisor status org.busvisor.Example.E'; echo ---
comp \"busvisor --address=$DBUS_SESSION_BUS_ADDRESS stop ec\"; echo ---
comp \"busvisor restart --address $DBUS_SESSION_BUS_ADDRESS cr\"; echo ---
comp 'busvisor events --service da'; echo ---
comp 'busvisor logs echo '; echo ---
comp 'busvisor list '"
    );
    let out = tool(
        &s(&root.join("usr/bin/busvisor")),
        &[
            "run",
            "--services-dir",
            &services,
            "--",
            "bash",
            "--norc",
            "--noprofile",
            "-c",
            &script,
        ],
        &env,
    );
    out.assert_ok();
    let parts: Vec<&str> = out.stdout.split("---\n").collect();
    assert_eq!(parts.len(), 7, "{}", out.stdout);
    let all = sorted_lines(parts[0]);
    for name in ["echo", "org.busvisor.Example.Echo", "crasher", "daemon"] {
        assert!(all.contains(&name), "{name} in {all:?}");
    }
    assert_eq!(sorted_lines(parts[1]), ["org.busvisor.Example.Echo"]);
    assert_eq!(sorted_lines(parts[2]), ["echo"]);
    assert_eq!(sorted_lines(parts[3]), ["crasher"]);
    assert_eq!(sorted_lines(parts[4]), ["daemon"]);
    // logs takes one NAME: then options, not names.
    let after_name = sorted_lines(parts[5]);
    assert!(!after_name.contains(&"echo"), "{after_name:?}");
    assert!(after_name.contains(&"--follow"), "{after_name:?}");
    // list takes no NAME.
    let list = sorted_lines(parts[6]);
    assert!(
        !list.contains(&"echo") && list.contains(&"--json"),
        "{list:?}"
    );
}

// ------------------------------------------------------------ debootstrap

/// The Debian mirror apt uses for this system's release, and the release.
fn apt_mirror() -> (String, String) {
    let os = std::fs::read_to_string("/etc/os-release").expect("/etc/os-release");
    let codename = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_owned())
        .expect("VERSION_CODENAME in /etc/os-release");
    let targets = tool(
        "apt-get",
        &[
            "indextargets",
            "--format",
            "$(REPO_URI) $(RELEASE) $(IDENTIFIER)",
        ],
        &[],
    );
    let mirror = targets
        .assert_ok()
        .stdout
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[1] == codename && f[2] == "Packages").then(|| f[0].to_owned())
        })
        .unwrap_or_else(|| panic!("no apt source for {codename}:\n{}", targets.stdout));
    (mirror, codename)
}

/// A minimal root of this system's release with what the test runs there
/// (dbus-run-session, gdbus, bash-completion), kept in the target dir
/// between runs: debootstrap takes a minute or two.
fn debootstrap_root() -> PathBuf {
    // It lives in sbin, which a PATH may lack.
    let path = format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    );
    let debootstrap = path
        .split(':')
        .map(|d| Path::new(d).join("debootstrap"))
        .find(|p| p.is_file());
    let debootstrap = debootstrap.unwrap_or_else(|| {
        panic!(
            "debootstrap is not installed; this test installs the package into a \
         debootstrap root. Install it with: apt-get install debootstrap (.ci/run does)"
        )
    });
    let (mirror, codename) = apt_mirror();
    let root = target_dir().join("package-debootstrap").join(&codename);
    // What the test runs there: dbus-run-session and gdbus, bash-completion,
    // and for the system bus dbus's system.conf and messagebus user.
    let include = "--include=dbus,dbus-daemon,dbus-bin,libglib2.0-bin,bash-completion";
    let done = root.join(".busvisor-test-complete");
    if std::fs::read_to_string(&done).is_ok_and(|d| d == include) {
        return root;
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let started = Instant::now();
    let out = run_tool_env(
        &s(&debootstrap),
        &["--variant=minbase", include, &codename, &s(&root), &mirror],
        &[],
        Duration::from_secs(15 * 60),
    );
    assert!(
        out.success(),
        "debootstrap failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    eprintln!("debootstrap {codename} in {:.1?}", started.elapsed());
    std::fs::write(&done, include).unwrap();
    root
}

/// Run `args` inside `root`, in a mount and pid namespace of their own with
/// a /proc of that namespace (gone, with every process, when it ends).
fn in_root(root: &Path, args: &[&str]) -> ToolOutput {
    let proc_dir = format!("--mount-proc={}", s(&root.join("proc")));
    let mut all = vec![
        "--mount",
        "--pid",
        "--fork",
        &proc_dir,
        "chroot",
        root.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    tool(
        "unshare",
        &all,
        &[("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), ("LC_ALL", "C")],
    )
}

#[test]
fn package_installs_runs_and_purges_in_a_debootstrap_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: debootstrap, chroot and dpkg in a root need root");
        return;
    }
    // The root is made while the other tests build the package.
    let root = debootstrap_root();
    let p = package();
    let in_chroot = "/tmp/busvisor.deb";
    std::fs::copy(&p.deb, root.join(&in_chroot[1..])).unwrap();

    // Installed with its dependencies checked; twice (idempotent).
    for _ in 0..2 {
        in_root(&root, &["dpkg", "-i", in_chroot]).assert_ok();
    }
    let status = in_root(&root, &["dpkg-query", "-W", "-f=${Status}", "busvisor"]);
    assert_eq!(status.assert_ok().stdout, "install ok installed");
    let listed = in_root(&root, &["dpkg", "-L", "busvisor"]);
    let files: Vec<String> = listed
        .assert_ok()
        .stdout
        .lines()
        .filter(|f| root.join(&f[1..]).is_file())
        .map(str::to_owned)
        .collect();
    assert!(files.iter().any(|f| f == "/usr/bin/busvisor"), "{files:?}");
    assert_eq!(files.len(), expected_files().len(), "{files:?}");

    // The installed binary is dbus-run-session's bus.
    let out = in_root(
        &root,
        &[
            "dbus-run-session",
            "--dbus-daemon=/usr/bin/busvisor",
            "--",
            "sh",
            "-c",
            "gdbus call --session --dest org.freedesktop.DBus \
             --object-path /org/freedesktop/DBus --method org.freedesktop.DBus.GetId \
             && busvisor list --json",
        ],
    );
    out.assert_ok();
    assert_bus_id_then_list(&out.stdout);

    // bash-completion finds the completion where it is installed.
    let out = in_root(
        &root,
        &[
            "bash",
            "--norc",
            "-c",
            ". /usr/share/bash-completion/bash_completion && __load_completion busvisor \
             && complete -p busvisor",
        ],
    );
    let spec = out.assert_ok().stdout.trim().to_owned();
    assert!(
        spec.ends_with(" busvisor") && spec.contains(" -F "),
        "{spec}"
    );

    // The runit service of contrib/, as installed, runs the system bus
    // (dbus's system.conf, its messagebus user) until TERM, and cleans up.
    let out = in_root(
        &root,
        &[
            "sh",
            "-c",
            "/usr/share/doc/busvisor/examples/contrib/runit/busvisor/run >/tmp/run.log 2>&1 &
             pid=$!
             i=0
             while [ ! -S /run/dbus/system_bus_socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
             gdbus call --system --dest org.freedesktop.DBus --object-path /org/freedesktop/DBus \
                 --method org.freedesktop.DBus.GetId && busvisor --system list --json
             kill -TERM $pid
             wait $pid
             echo \"exit $?\" >&2
             test ! -e /run/dbus/system_bus_socket || echo 'socket left' >&2
             cat /tmp/run.log >&2",
        ],
    );
    out.assert_ok();
    assert_bus_id_then_list(&out.stdout);
    assert!(out.stderr.starts_with("exit 0\n"), "{}", out.stderr);
    assert!(!out.stderr.contains("socket left"), "{}", out.stderr);

    // Purged: nothing of it is left.
    in_root(&root, &["dpkg", "--purge", "busvisor"]).assert_ok();
    let left: Vec<&String> = files
        .iter()
        .filter(|f| root.join(&f[1..]).exists())
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    let status = in_root(&root, &["dpkg-query", "-W", "-f=${Status}", "busvisor"]);
    assert!(
        !status.stdout.contains("installed"),
        "after purge: {status:?}"
    );
    std::fs::remove_file(root.join(&in_chroot[1..])).unwrap();
}
