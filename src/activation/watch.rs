//! Reload the service definitions when a watched directory changes
//! (inotify), as dbus-daemon does for its service directories.

use std::path::PathBuf;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tracing::{debug, info, warn};

use crate::supervision::SupervisorHandle;

/// Watch `dirs` (those that exist) and reload on any change, coalescing
/// bursts of events (an editor's save is several).
pub(crate) fn spawn(sup: SupervisorHandle, dirs: Vec<PathBuf>) {
    let inotify = match Inotify::init(InitFlags::IN_CLOEXEC) {
        Ok(i) => i,
        Err(e) => return warn!("cannot watch service directories: {e}"),
    };
    let flags = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_ATTRIB;
    let mut watched = 0;
    for d in &dirs {
        match inotify.add_watch(d.as_path(), flags) {
            Ok(_) => watched += 1,
            Err(e) => debug!(dir = %d.display(), "not watched: {e}"),
        }
    }
    if watched == 0 {
        return;
    }
    // A plain thread blocked in read(2): no fd registration with the runtime
    // needed; the reload itself runs on the supervisor's task.
    let spawned = std::thread::Builder::new()
        .name("busvisor-watch".into())
        .spawn(move || {
            loop {
                if let Err(e) = inotify.read_events() {
                    return warn!("inotify read failed: {e}");
                }
                // Let the burst finish (an editor's save is several events), then drain it.
                std::thread::sleep(Duration::from_millis(100));
                while readable_now(&inotify) {
                    if inotify.read_events().is_err() {
                        break;
                    }
                }
                info!("a service directory changed: reloading definitions");
                sup.reload();
            }
        });
    if let Err(e) = spawned {
        warn!("cannot watch service directories: {e}");
    }
}

fn readable_now(inotify: &Inotify) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}
