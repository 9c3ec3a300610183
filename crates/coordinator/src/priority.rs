//! The coordinator's model work that no round waits for (scoring updates, replay
//! re-runs) runs at a lower OS priority than its request handling, so that on a
//! machine with few cores a lease, a heartbeat or a status read does not wait behind a
//! forward pass for a core (the control-plane benchmark: BENCHMARKS.md). The work is
//! the same; it only yields the CPU when a request needs it.
//!
//! The holdout evaluation stays at the default priority: every round waits for it, and
//! lowered it made each aggregation of that benchmark (a trainer on the same two cores)
//! 1.6x-2.4x slower, though it took the reads' p99 there to 0.5x-0.8x.
//!
//! On Linux the nice value is a property of each thread and a thread inherits it from
//! the thread that spawns it. An engine backend computes on a thread pool of its own,
//! spawned when the backend is opened: so a backend opened on a lowered thread computes
//! on lowered threads for its whole life, and the request threads that call it only
//! wait. An unprivileged thread can lower its priority but never raise it back, which
//! is why the lowering happens on a thread made for it.

/// The nice value of the heavy work's threads (0 is the default, 19 the lowest). At 10
/// such a thread weighs about a tenth of a default one when both want a core, so a
/// request's thread that wakes takes the core at once; with no requests waiting the
/// work still has every core.
pub(crate) const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread (only it: on Linux `setpriority(PRIO_PROCESS, 0)` names the
/// calling thread) to [`BACKGROUND_NICE`]; threads it spawns from now on inherit that.
/// A failure (a platform without per-thread nice values) leaves the priority as it was:
/// the work runs the same, only without yielding to requests.
pub(crate) fn lower_this_thread() {
    if let Err(e) = rustix::process::setpriority_process(None, BACKGROUND_NICE) {
        tracing::debug!("cannot lower the priority of a model-work thread: {e}");
    }
}

/// Runs `f` on a new thread at [`BACKGROUND_NICE`] and waits for it: what `f` opens
/// (an engine backend and its thread pool) computes at that priority from then on.
pub(crate) fn on_lowered_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let thread = s.spawn(|| {
            lower_this_thread();
            f()
        });
        match thread.join() {
            Ok(out) => out,
            // The panic goes on where it would have without the extra thread.
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread spawned on a lowered thread is lowered too (what an engine backend's
    /// pool relies on), and the caller keeps its own priority.
    #[test]
    fn threads_spawned_on_a_lowered_thread_inherit_its_priority() {
        let own = rustix::process::getpriority_process(None).expect("own priority");
        let (lowered, child) = on_lowered_thread(|| {
            let lowered = rustix::process::getpriority_process(None).expect("priority");
            let child = std::thread::spawn(|| rustix::process::getpriority_process(None))
                .join()
                .expect("child")
                .expect("child's priority");
            (lowered, child)
        });
        // (A test run under a higher nice value than ours stays there: never raised.)
        let want = BACKGROUND_NICE.max(own);
        assert_eq!((lowered, child), (want, want));
        assert_eq!(
            rustix::process::getpriority_process(None).expect("priority"),
            own
        );
    }
}
