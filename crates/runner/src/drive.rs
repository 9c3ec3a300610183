//! How the server's threads (HTTP handlers, the ticker, the spot-checker) change the
//! core: under its one lock, held only for the cheap part. A change that makes a round
//! due leaves the aggregation to [`run`], which takes the job under the lock, runs it
//! with the lock released (decoding, the outer step, the holdout evaluation and two
//! fsynced blobs), and commits it under the lock again; requests meanwhile are served
//! against the round as it stands (leases are told to come back).
//!
//! A thread that panicked while holding the lock may have left the core's memory
//! half-changed, unlike the store (a transaction commits whole or not at all): the
//! process stops instead of carrying on, and a restart resumes from the last commit.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::core::{AggregationJob, Core, CoreError};

/// The exit status of a coordinator stopped because its state can no longer be trusted
/// (`EX_SOFTWARE`).
const EXIT_BROKEN: i32 = 70;

/// Stops the process: the core's memory no longer matches its store.
pub fn stop(why: &dyn std::fmt::Display) -> ! {
    tracing::error!(
        "stopping: {why}; the store holds every committed change, so restarting the coordinator on the same directory resumes from the last commit"
    );
    eprintln!(
        "hivetrain coordinator: stopping: {why}; restart it on the same directory to resume from the last commit"
    );
    std::process::exit(EXIT_BROKEN)
}

/// The core, locked. Dropping it releases the lock and then makes every store commit
/// made so far durable (group commit, [`store::Durability::sync`]) before the caller goes
/// on: so whatever a thread tells the outside after its lock is gone (an accepted update,
/// a lease, a charge) is on disk, and no fsync ever runs under the lock. Threads that
/// release the lock at once share one fsync.
pub struct Locked<'a> {
    guard: Option<MutexGuard<'a, Core>>,
    durability: Arc<store::Durability>,
}

impl Deref for Locked<'_> {
    type Target = Core;
    fn deref(&self) -> &Core {
        match &self.guard {
            Some(guard) => guard,
            None => unreachable!("the guard is taken only by drop"),
        }
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Core {
        match &mut self.guard {
            Some(guard) => guard,
            None => unreachable!("the guard is taken only by drop"),
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Err(e) = self.durability.sync() {
            // The disk may not hold what was committed (an fsync error is not retried:
            // the kernel may have dropped the pages it failed to write).
            stop(&format!(
                "the store's commits could not be made durable: {}",
                run::RunError::internal(&e).message
            ));
        }
    }
}

/// The core, locked; a poisoned lock stops the process.
pub fn lock(core: &Mutex<Core>) -> Locked<'_> {
    let guard = core.lock().unwrap_or_else(|_| {
        stop(&"a thread panicked while it held the run's state, which may be half-changed")
    });
    Locked {
        durability: guard.durability(),
        guard: Some(guard),
    }
}

/// Runs `f` on the core at `clock()`, then any aggregation it made due, outside the lock.
pub fn run<T>(
    core: &Mutex<Core>,
    clock: &(dyn Fn() -> u64 + Send + Sync),
    f: impl FnOnce(&mut Core, u64) -> T,
) -> T {
    let (out, job) = {
        let mut core = lock(core);
        let out = f(&mut core, clock());
        core.publish();
        (out, core.aggregation_job())
    };
    aggregate(core, clock, job);
    out
}

/// Runs `job` outside the lock and commits it, again as long as the round changed
/// meanwhile. A failure is logged and left pending: the next call that finds the round
/// due (the ticker's, within a second) takes it again.
fn aggregate(
    core: &Mutex<Core>,
    clock: &(dyn Fn() -> u64 + Send + Sync),
    job: Result<Option<AggregationJob>, CoreError>,
) {
    let mut job = job;
    loop {
        let next = match job {
            Ok(Some(next)) => next,
            Ok(None) => return,
            Err(e) => {
                tracing::error!("aggregation: {e}");
                return;
            }
        };
        let round = next.round();
        let started = std::time::Instant::now();
        let done = next.run();
        let mut core = lock(core);
        job = match core.finish_aggregation(done, clock()) {
            Ok(true) => {
                core.publish();
                tracing::info!(
                    round,
                    version = core.version(),
                    seconds = started.elapsed().as_secs_f32(),
                    "round aggregated"
                );
                return;
            }
            Ok(false) => core.aggregation_job(),
            Err(e) => Err(e),
        };
    }
}
