//! The catalog of activatable services: where the definitions come from,
//! when they were read, and the reload in progress.
//!
//! Definitions are read only off the lock: [`scan`] and [`dirs_changed`]
//! run on the blocking pool, and the result is installed under the lock.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::definition::{Catalog, ServiceDef, ServiceDirSpec, SystemScan};
use crate::bus::{CallRef, Requester};

/// Where definitions come from: busvisor's TOML directories, then the
/// `[D-BUS Service]` directories of the configuration.
#[derive(Clone, Debug, Default)]
pub(crate) struct Dirs {
    pub(crate) toml: Vec<PathBuf>,
    pub(crate) dbus: Vec<ServiceDirSpec>,
    /// A system bus (`BusConfig::is_system`): definitions are read by its
    /// rules (`activation/system.rs`).
    pub(crate) system: bool,
    /// `--systemd-activation`, which those rules leave systemd's services to.
    pub(crate) systemd_activation: bool,
}

/// Definitions read from the service directories.
pub(crate) struct Scanned {
    /// What loaded, and the files skipped (`Catalog::skipped`).
    pub(crate) catalog: Catalog,
    /// What to log, once: skipped files, conflicts, system-bus refusals.
    pub(crate) warnings: Vec<String>,
    /// The ids whose file has a `FILE.disabled` marker beside it.
    pub(crate) disabled: BTreeSet<String>,
}

/// Read every definition. File I/O: never under the lock.
pub(crate) fn scan(dirs: &Dirs) -> Scanned {
    let system = dirs.system.then_some(SystemScan {
        systemd_activation: dirs.systemd_activation,
    });
    let (catalog, warnings) = Catalog::scan(&dirs.toml, &dirs.dbus, system);
    let disabled = catalog
        .defs()
        .filter(|d| disabled_marker(&d.file).exists())
        .map(|d| d.id.clone())
        .collect();
    Scanned {
        catalog,
        warnings,
        disabled,
    }
}

/// The file whose presence disables the definition in `file`: `FILE.disabled`
/// beside it (`echo.toml.disabled`), made by `busvisor disable`, removed by
/// `busvisor enable`, or by hand.
pub(crate) fn disabled_marker(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".disabled");
    PathBuf::from(name)
}

/// Make (`disable`) or remove the marker of the definition in `file`. Err:
/// why it cannot be done (a directory the bus cannot write), so that the
/// caller keeps the setting until the bus stops instead. File I/O: never
/// under the lock.
pub(crate) fn set_disabled_marker(file: &Path, disable: bool) -> std::io::Result<()> {
    let marker = disabled_marker(file);
    if disable {
        std::fs::write(
            &marker,
            "# busvisor: this definition is disabled (`busvisor enable` removes this file)\n",
        )
    } else {
        match std::fs::remove_file(&marker) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// What `busvisor check` found: the definitions that load, and every
/// problem as the bus would log it.
#[derive(Default)]
pub(crate) struct CheckReport {
    pub(crate) defs: Vec<std::sync::Arc<ServiceDef>>,
    pub(crate) problems: Vec<String>,
}

/// Check definitions without a bus: each path a directory (its `*.toml`
/// and `*.service` files) or one file; `system`: by the system bus's rules.
/// File I/O: the CLI's, never the bus's.
pub(crate) fn check(paths: &[PathBuf], system: bool) -> CheckReport {
    let mut report = CheckReport::default();
    for path in paths {
        let (dir, only) = if path.is_dir() {
            (path.clone(), None)
        } else {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            (parent.unwrap_or(Path::new(".")).to_owned(), Some(path))
        };
        if !dir.is_dir() || only.is_some_and(|f| !f.exists()) {
            report
                .problems
                .push(format!("{}: no such file or directory", path.display()));
            continue;
        }
        let dirs = Dirs {
            toml: vec![dir.clone()],
            dbus: vec![ServiceDirSpec {
                path: dir.clone(),
                strict_naming: false,
            }],
            system,
            systemd_activation: false,
        };
        let scanned = scan(&dirs);
        // A single file: what the directory's scan says about that file.
        let about = |f: &Path| only.is_none_or(|o| same_file(o, f));
        let prefix = only.map(|o| {
            let name = o.file_name().unwrap_or_default();
            dir.join(name).display().to_string()
        });
        let shown = |w: &&String| prefix.as_ref().is_none_or(|p| w.starts_with(p.as_str()));
        report
            .problems
            .extend(scanned.warnings.iter().filter(shown).cloned());
        for d in scanned.catalog.defs().filter(|d| about(&d.file)) {
            match &d.argv {
                Err(e) => report
                    .problems
                    .push(format!("{}: Exec: {e}", d.file.display())),
                Ok(argv) if d.exec_path.is_none() => report.problems.push(format!(
                    "{}: the program {:?} is not found in PATH",
                    d.file.display(),
                    argv.first().map_or("", String::as_str)
                )),
                Ok(_) => {}
            }
            report.defs.push(d.clone());
        }
        if only.is_some_and(|f| f.extension().is_none_or(|e| e != "toml" && e != "service")) {
            report.problems.push(format!(
                "{}: not a definition file (*.toml or *.service)",
                path.display()
            ));
        }
    }
    report
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Whether a service directory changed since `since` (a stat per directory:
/// adding, removing or renaming a file changes it). File I/O: never under
/// the lock.
pub(crate) fn dirs_changed(dirs: &Dirs, since: SystemTime) -> bool {
    dirs.toml
        .iter()
        .chain(dirs.dbus.iter().map(|d| &d.path))
        .filter_map(|d| std::fs::metadata(d).and_then(|m| m.modified()).ok())
        .any(|m| m >= since)
}

/// Callers of ReloadConfig or Reload waiting for the next scan, whether a
/// scan runs, and whether another was asked for since it started.
#[derive(Default)]
pub(crate) struct Reload {
    pub(crate) waiters: Vec<CallRef>,
    pub(crate) running: bool,
    pub(crate) requested: bool,
}

impl Reload {
    /// Ask for a scan; true when none runs yet and the caller must start one.
    pub(crate) fn request(&mut self, caller: Option<CallRef>) -> bool {
        self.waiters.extend(caller);
        self.requested = true;
        !std::mem::replace(&mut self.running, true)
    }

    /// A scan begins: it serves these callers.
    pub(crate) fn begin(&mut self) -> Vec<CallRef> {
        self.requested = false;
        std::mem::take(&mut self.waiters)
    }

    /// A scan is installed: true when another was asked for meanwhile.
    pub(crate) fn again(&mut self) -> bool {
        if !self.requested {
            self.running = false;
        }
        self.requested
    }
}

pub(crate) struct CatalogState {
    pub(crate) catalog: Catalog,
    pub(crate) dirs: Dirs,
    /// When the catalog was last read.
    pub(crate) scanned_at: SystemTime,
    pub(crate) reload: Reload,
    /// Names asked for that no loaded definition provides, waiting for a
    /// look at the directories, and whether that look is under way.
    pub(crate) misses: Vec<(String, Requester)>,
    pub(crate) resolving: bool,
    /// The XML configuration, re-read at each reload for its policy.
    pub(crate) config_file: Option<std::path::PathBuf>,
    /// Ids disabled until the bus stops (`busvisor disable` where the
    /// marker file could not be written), and those enabled likewise over
    /// a marker that could not be removed.
    pub(crate) disabled: BTreeSet<String>,
    pub(crate) enabled: BTreeSet<String>,
    /// The ids with a marker at the last scan.
    pub(crate) marked: BTreeSet<String>,
    /// The problems the last scan found: a rescan logs only new ones.
    logged: BTreeSet<String>,
}

impl Default for CatalogState {
    fn default() -> Self {
        CatalogState {
            catalog: Catalog::default(),
            dirs: Dirs::default(),
            scanned_at: SystemTime::UNIX_EPOCH,
            reload: Reload::default(),
            misses: Vec::new(),
            resolving: false,
            config_file: None,
            disabled: BTreeSet::new(),
            enabled: BTreeSet::new(),
            marked: BTreeSet::new(),
            logged: BTreeSet::new(),
        }
    }
}

impl CatalogState {
    /// Note a lookup miss; true when no look at the directories is under
    /// way yet and the caller must start one.
    pub(crate) fn miss(&mut self, name: &str, requester: Requester) -> bool {
        if !self.misses.iter().any(|(n, _)| n == name) {
            self.misses.push((name.to_owned(), requester));
        }
        !std::mem::replace(&mut self.resolving, true)
    }

    /// Of a scan's warnings, those the last scan did not have: each
    /// problem is logged once, not at every rescan.
    pub(crate) fn new_warnings<'a>(&mut self, warnings: &'a [String]) -> Vec<&'a String> {
        let now: BTreeSet<String> = warnings.iter().cloned().collect();
        let new = warnings
            .iter()
            .filter(|w| !self.logged.contains(*w))
            .collect();
        self.logged = now;
        new
    }

    /// Whether messages may activate the service `id`.
    pub(crate) fn is_enabled(&self, id: &str) -> bool {
        !self.disabled.contains(id) && (!self.marked.contains(id) || self.enabled.contains(id))
    }

    /// Install what a scan read.
    pub(crate) fn install(&mut self, catalog: Catalog, marked: BTreeSet<String>) {
        self.catalog = catalog;
        self.marked = marked;
        // A margin for changes made during the scan and for coarse timestamps:
        // at worst a miss soon after a scan reads the directories again.
        self.scanned_at = SystemTime::now() - Duration::from_secs(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(serial: u32) -> CallRef {
        let call = crate::wire::Message::method_call("/", "ReloadConfig")
            .serial(std::num::NonZeroU32::new(serial).unwrap())
            .build(&())
            .unwrap();
        CallRef { from: 1, call }
    }

    #[test]
    fn reloads_coalesce() {
        let mut r = Reload::default();
        assert!(
            r.request(Some(caller(1))),
            "the first request starts a scan"
        );
        assert_eq!(r.begin().len(), 1);
        // Requests during the scan share the next one.
        assert!(!r.request(Some(caller(2))));
        assert!(!r.request(Some(caller(3))));
        assert!(!r.request(None));
        assert!(r.again());
        assert_eq!(r.begin().len(), 2);
        assert!(!r.again(), "nothing asked during the second scan");
        assert!(r.request(None), "idle again: a new request starts a scan");
    }

    #[test]
    fn misses_coalesce() {
        let mut c = CatalogState::default();
        let who = Requester::default();
        assert!(c.miss("a.b", who.clone()), "the first miss starts a look");
        assert!(!c.miss("a.b", who.clone()));
        assert!(!c.miss("c.d", who));
        let names: Vec<&str> = c.misses.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.b", "c.d"], "one entry per name");
    }

    #[test]
    fn each_problem_is_logged_once() {
        let mut c = CatalogState::default();
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let first = w(&["a: bad", "b: bad"]);
        assert_eq!(c.new_warnings(&first).len(), 2);
        assert!(
            c.new_warnings(&first).is_empty(),
            "a rescan says nothing new"
        );
        let next = w(&["b: bad", "c: bad"]);
        assert_eq!(c.new_warnings(&next), [&next[1]]);
        // Fixed, then broken again: said again.
        assert_eq!(c.new_warnings(&w(&["c: bad"])).len(), 0);
        assert_eq!(c.new_warnings(&first).len(), 2);
    }

    #[test]
    fn disabled_by_marker_or_until_the_bus_stops() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("echo.toml");
        std::fs::write(&file, "name = \"org.x.Echo\"\nexec = [\"/bin/true\"]\n").unwrap();
        assert_eq!(disabled_marker(&file), d.path().join("echo.toml.disabled"));
        let dirs = Dirs {
            toml: vec![d.path().to_owned()],
            ..Dirs::default()
        };
        assert!(scan(&dirs).disabled.is_empty());
        set_disabled_marker(&file, true).unwrap();
        let scanned = scan(&dirs);
        assert!(scanned.disabled.contains("echo"));
        let mut c = CatalogState::default();
        c.install(scanned.catalog, scanned.disabled);
        assert!(!c.is_enabled("echo"));
        // Enabled over a marker it could not remove: until the bus stops.
        c.enabled.insert("echo".into());
        assert!(c.is_enabled("echo"));
        set_disabled_marker(&file, false).unwrap();
        set_disabled_marker(&file, false).unwrap();
        assert!(!disabled_marker(&file).exists());
        c.disabled.insert("other".into());
        assert!(!c.is_enabled("other"));
    }

    #[test]
    fn check_reports_each_file_and_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("ok.toml"),
            "name = \"org.x.A\"\nexec = [\"/bin/true\"]\n",
        )
        .unwrap();
        std::fs::write(d.path().join("bad.toml"), "name = \"org.x.B\"\n").unwrap();
        let r = check(&[d.path().to_owned()], false);
        assert_eq!(r.defs.len(), 1);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(
            r.problems[0].contains("bad.toml:1:1: missing field `exec`"),
            "{:?}",
            r.problems
        );
        let r = check(&[d.path().join("ok.toml")], false);
        assert_eq!((r.defs.len(), r.problems.len()), (1, 0), "{:?}", r.problems);
        let r = check(&[d.path().join("nope.toml")], false);
        assert!(r.problems[0].ends_with("no such file or directory"));
    }

    #[test]
    fn changed_dirs_are_seen() {
        let d = tempfile::tempdir().unwrap();
        let dirs = Dirs {
            toml: vec![d.path().to_owned()],
            ..Dirs::default()
        };
        assert!(dirs_changed(&dirs, SystemTime::UNIX_EPOCH));
        let later = SystemTime::now() + Duration::from_secs(60);
        assert!(!dirs_changed(&dirs, later));
        let missing = Dirs {
            toml: vec![d.path().join("nope")],
            ..Dirs::default()
        };
        assert!(!dirs_changed(&missing, SystemTime::UNIX_EPOCH));
    }
}
