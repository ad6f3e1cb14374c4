//! The bus's threads run under `SCHED_BATCH`.
//!
//! A client's message wakes the bus. Under the default policy the bus
//! preempts whatever runs on the CPU it wakes on, typically the client
//! that just wrote, and serves that one message; the client runs again,
//! writes the next one, and wakes the bus again. Under `SCHED_BATCH` a
//! woken bus thread does not preempt: it runs on an idle CPU at once, as
//! before, and otherwise when the running task blocks or its time slice
//! ends, and then serves everything that arrived meanwhile in one pass.
//! Measured with libdbus clients (docs/BENCHMARKS.md): 2.5-3 times less
//! bus CPU per message on the pipelined and 4 KiB rows, 1.4-2 times the
//! throughput, lower median latency. The price is on a saturated machine,
//! for clients in the bus's own scheduling group (its session's autogroup,
//! as with `busvisor run -- make -j`): there a message may wait for the
//! running task's slice, a few milliseconds at the 99th percentile, as
//! under dbus-daemon in the same situation.
//!
//! Only the runtime's threads switch, and only from the default policy (a
//! policy given with `chrt` is kept); `BUSVISOR_BATCH_SCHEDULING=0` keeps
//! the default. Services do not inherit it: fork copies the policy of the
//! thread that forks (`SCHED_RESET_ON_FORK` would reset only real-time
//! ones), and services are forked by the spawner thread, which the main
//! thread starts and which is no runtime thread (tested:
//! `the_bus_runs_as_a_batch_task_and_its_services_do_not`).

/// The environment variable that turns it off (`0`).
pub(crate) const ENV: &str = "BUSVISOR_BATCH_SCHEDULING";

/// Whether the bus's threads should switch (not turned off).
pub(crate) fn batch_wanted() -> bool {
    std::env::var_os(ENV).is_none_or(|v| v != "0")
}

/// Switch the calling thread to SCHED_BATCH if it runs under the default
/// policy. Failure changes nothing and is not an error.
pub(crate) fn enter_batch() {
    // SAFETY: sched_getscheduler takes a pid (0: this thread) and touches
    // no memory.
    if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
        return;
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads the sched_param it is given, which
    // lives on this stack for the call; pid 0 is the calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_calling_thread_enters_batch() {
        // SAFETY: as in `enter_batch`.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        let before = policy();
        // A thread of its own: the policy is per thread.
        std::thread::spawn(move || {
            assert_eq!(policy(), before);
            enter_batch();
            let want = if before == libc::SCHED_OTHER {
                libc::SCHED_BATCH
            } else {
                before
            };
            assert_eq!(policy(), want);
        })
        .join()
        .unwrap();
        assert_eq!(policy(), before);
    }
}
