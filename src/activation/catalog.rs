//! The catalog of activatable services: where the definitions come from,
//! when they were read, and the reload in progress.
//!
//! Definitions are read only off the lock: [`scan`] and [`dirs_changed`]
//! run on the blocking pool, and the result is installed under the lock.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::definition::{Catalog, ServiceDirSpec, SystemScan};
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

/// Definitions read from the service directories, and the files skipped.
pub(crate) type Scanned = (Catalog, Vec<String>);

/// Read every definition. File I/O: never under the lock.
pub(crate) fn scan(dirs: &Dirs) -> Scanned {
    let system = dirs.system.then_some(SystemScan {
        systemd_activation: dirs.systemd_activation,
    });
    Catalog::scan(&dirs.toml, &dirs.dbus, system)
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

    /// Install what a scan read.
    pub(crate) fn install(&mut self, catalog: Catalog) {
        self.catalog = catalog;
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
