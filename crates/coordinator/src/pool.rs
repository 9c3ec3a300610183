//! A fixed pool of scoring backends, sized at start from a memory budget: however many
//! updates arrive at once, the coordinator never holds more evaluation backends than
//! the budget pays for. A request that finds every backend busy waits a bounded time,
//! then is refused (503 `scorers_busy`), instead of allocating one more.
//!
//! Backends are opened on first need (a run that never scores opens none) and kept.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The default scoring memory budget is this share of the machine's available memory
/// (`MemAvailable` of /proc/meminfo): the rest is for training re-runs, holdout
/// evaluation, serving, update buffers and the other processes of the machine.
pub(crate) const SCORING_MEMORY_SHARE_DIVISOR: u64 = 4;
/// Largest default scoring memory budget, in MB: past it, more scorers than a machine
/// has cores to run buy nothing (a `base` evaluation backend at batch 4 x 256 holds
/// 1.16 GB, `examples/memory.rs` in `engine`: three of them).
pub(crate) const SCORING_MEMORY_DEFAULT_MAX_MB: u64 = 4096;
/// The default scoring memory budget where /proc/meminfo cannot be read, in MB.
pub(crate) const SCORING_MEMORY_FALLBACK_MB: u64 = 1024;

/// The scoring memory budget in MB when `[devices] scoring_memory_mb` is left out: a
/// share of the available memory, capped, or a fixed fallback off Linux.
pub(crate) fn default_scoring_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_available_mb(&text))
        .map_or(SCORING_MEMORY_FALLBACK_MB, |mb| {
            (mb / SCORING_MEMORY_SHARE_DIVISOR).min(SCORING_MEMORY_DEFAULT_MAX_MB)
        })
}

/// `MemAvailable` of a /proc/meminfo text, in MB (it is written in kB).
fn mem_available_mb(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kb: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb / 1024)
}

/// How many backends of `backend_bytes` each a budget of `budget_mb` holds once
/// `reserved` bytes of it are taken (the replay checker's training backend): at least one
/// (a run that scores must be able to score), at most `most` (the updates processed at
/// once: a backend beyond them would never be used).
pub(crate) fn pool_size(budget_mb: u64, reserved: u64, backend_bytes: u64, most: usize) -> usize {
    let budget = budget_mb
        .saturating_mul(1024 * 1024)
        .saturating_sub(reserved);
    let fits = budget / backend_bytes.max(1);
    usize::try_from(fits)
        .unwrap_or(usize::MAX)
        .clamp(1, most.max(1))
}

/// A pool of at most `size` items, each lent to one user at a time.
pub(crate) struct Pool<T> {
    state: Mutex<State<T>>,
    returned: Condvar,
    size: usize,
}

struct State<T> {
    idle: Vec<T>,
    /// Items lent out, plus slots reserved by a taker opening a new item.
    in_use: usize,
    /// Items in existence (idle, lent or being opened); never above `size`.
    open: usize,
    /// The most `in_use` has been since start.
    peak_in_use: usize,
}

/// What the pool holds now, for `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PoolCounts {
    pub(crate) size: usize,
    pub(crate) open: usize,
    pub(crate) in_use: usize,
    pub(crate) peak_in_use: usize,
}

/// Why no item was lent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TakeError<E> {
    #[error("all {size} pooled backends stayed busy for {waited_ms} ms")]
    Busy { size: usize, waited_ms: u64 },
    #[error(transparent)]
    Open(E),
}

/// An item lent from a pool; it goes back when dropped (also on an error path or a
/// panic), and one waiting taker is woken.
pub(crate) struct Lease<T> {
    item: Option<T>,
    pool: Arc<Pool<T>>,
}

impl<T> Pool<T> {
    pub(crate) fn new(size: usize) -> Arc<Pool<T>> {
        Arc::new(Pool {
            state: Mutex::new(State {
                idle: Vec::new(),
                in_use: 0,
                open: 0,
                peak_in_use: 0,
            }),
            returned: Condvar::new(),
            size: size.max(1),
        })
    }

    /// The state. Every change under this lock is a few integer and `Vec` operations
    /// that cannot panic, so a poisoned lock (a panic elsewhere in a thread that held
    /// it) still guards consistent counts, and is used as is.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn counts(&self) -> PoolCounts {
        let state = self.lock();
        PoolCounts {
            size: self.size,
            open: state.open,
            in_use: state.in_use,
            peak_in_use: state.peak_in_use,
        }
    }

    /// Lends an idle item; else, while fewer than `size` exist, one made by `open`
    /// (called without the lock: opening a backend allocates for a while); else waits
    /// up to `wait` for one to come back. Blocks the calling thread: call it from a
    /// blocking thread.
    pub(crate) fn take<E>(
        self: &Arc<Self>,
        wait: Duration,
        open: impl FnOnce() -> Result<T, E>,
    ) -> Result<Lease<T>, TakeError<E>> {
        let started = Instant::now();
        let mut state = self.lock();
        loop {
            if let Some(item) = state.idle.pop() {
                self.lend(&mut state);
                return Ok(Lease {
                    item: Some(item),
                    pool: self.clone(),
                });
            }
            if state.open < self.size {
                state.open += 1;
                self.lend(&mut state);
                drop(state);
                return match open() {
                    Ok(item) => Ok(Lease {
                        item: Some(item),
                        pool: self.clone(),
                    }),
                    Err(e) => {
                        let mut state = self.lock();
                        state.open -= 1;
                        state.in_use -= 1;
                        drop(state);
                        self.returned.notify_one();
                        Err(TakeError::Open(e))
                    }
                };
            }
            let left = wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(TakeError::Busy {
                    size: self.size,
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            state = self
                .returned
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn lend(&self, state: &mut State<T>) {
        state.in_use += 1;
        state.peak_in_use = state.peak_in_use.max(state.in_use);
        debug_assert!(state.in_use <= self.size && state.open <= self.size);
    }
}

impl<T> std::ops::Deref for Lease<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match &self.item {
            Some(item) => item,
            None => unreachable!("an item is taken out only in drop"),
        }
    }
}

impl<T> std::ops::DerefMut for Lease<T> {
    fn deref_mut(&mut self) -> &mut T {
        match &mut self.item {
            Some(item) => item,
            None => unreachable!("an item is taken out only in drop"),
        }
    }
}

impl<T> Drop for Lease<T> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            let mut state = self.pool.lock();
            state.idle.push(item);
            state.in_use -= 1;
            drop(state);
            self.pool.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_size(budget_mb: u64, reserved: u64, backend_bytes: u64, most: usize, expect: usize) {
        assert_eq!(
            pool_size(budget_mb, reserved, backend_bytes, most),
            expect,
            "{budget_mb} MB less {reserved} B / {backend_bytes} B, at most {most}"
        );
    }

    /// At least one, at most the uploads at once, else what the budget holds after the
    /// replay checker's backend.
    #[test]
    fn the_size_is_what_the_budget_holds_between_one_and_the_uploads() {
        const MB: u64 = 1024 * 1024;
        for (budget_mb, reserved, bytes, most, expect) in [
            (1, 0, 10 * MB, 8, 1),
            (0, 0, 10 * MB, 8, 1),
            (100, 0, 10 * MB, 8, 8),
            (100, 0, 10 * MB, 20, 10),
            (35, 0, 10 * MB, 8, 3),
            (u64::MAX, 0, 1, 8, 8),
            (100, 0, 0, 4, 4),
            // The replay backend's share comes off first.
            (100, 40 * MB, 10 * MB, 20, 6),
            (35, 30 * MB, 10 * MB, 8, 1),
            // A replay backend larger than the budget still leaves one scorer.
            (35, 300 * MB, 10 * MB, 8, 1),
            (u64::MAX, 1 << 40, 1, 8, 8),
        ] {
            check_size(budget_mb, reserved, bytes, most, expect);
        }
    }

    #[test]
    fn mem_available_is_read_in_mb() {
        let text =
            "MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(mem_available_mb(text), Some(8000));
        assert_eq!(mem_available_mb("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available_mb("MemAvailable: lots\n"), None);
    }

    /// Many threads taking at once never hold more than the size; a taker that finds
    /// every item busy past its wait is refused; a failed open frees its slot.
    #[test]
    fn takers_never_hold_more_than_the_size_and_wait_a_bounded_time() {
        let pool = Pool::<u32>::new(2);
        let opened = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..20 {
                        let lease = pool
                            .take(Duration::from_secs(30), || {
                                Ok::<_, std::io::Error>(
                                    opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                                )
                            })
                            .expect("take");
                        assert!(*lease < 2, "opened a third item");
                        std::thread::sleep(Duration::from_micros(200));
                    }
                });
            }
        });
        let counts = pool.counts();
        assert_eq!((counts.open, counts.in_use, counts.peak_in_use), (2, 0, 2));

        let (a, b) = (
            pool.take(Duration::ZERO, || Err(std::io::Error::other("unused"))),
            pool.take(Duration::ZERO, || Err(std::io::Error::other("unused"))),
        );
        let started = Instant::now();
        let busy = pool.take(Duration::from_millis(50), || {
            Err(std::io::Error::other("not called: the pool is full"))
        });
        let refusal = busy.as_ref().err().map(ToString::to_string);
        assert!(
            matches!(busy, Err(TakeError::Busy { size: 2, .. })),
            "{refusal:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop((a, b));

        let fresh = Pool::<u32>::new(1);
        let failed = fresh.take(Duration::ZERO, || Err(std::io::Error::other("no memory")));
        assert!(matches!(failed, Err(TakeError::Open(_))));
        assert_eq!(fresh.counts().open, 0);
        let lease = fresh.take(Duration::ZERO, || Ok::<_, std::io::Error>(7));
        assert_eq!(lease.map(|l| *l).expect("opens after a failure"), 7);
    }
}
