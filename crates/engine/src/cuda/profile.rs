//! Where a training step's GPU time goes. With `HIVETRAIN_CUDA_PROFILE` set in the
//! environment, a backend records an event on its stream at each phase boundary, folds
//! the times between them into per-phase totals after each step, and prints the table
//! (and the host's wall time over the same steps) to standard error when dropped. Off,
//! it costs one branch per phase. Events time the stream, not a kernel: a phase's time
//! includes any gap before its first kernel, so a host that cannot keep the GPU fed shows
//! as phases longer than their kernels.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaStream};

use super::CudaError;

/// The environment variable that turns profiling on.
pub(crate) const PROFILE_ENV: &str = "HIVETRAIN_CUDA_PROFILE";
/// Marks one step may hold (a bound: a phase per layer part, 12 layers, is about 250).
const MARKS_MAX: usize = 4096;

#[derive(Default)]
struct Totals {
    /// Per phase: milliseconds and how many times it ran.
    phases: BTreeMap<&'static str, (f64, u64)>,
    steps: u64,
    wall_ms: f64,
}

pub(crate) struct Profile {
    marks: Mutex<Vec<(&'static str, CudaEvent)>>,
    totals: Mutex<Totals>,
    started: Mutex<Option<Instant>>,
}

impl Profile {
    /// A profile when the environment asks for one.
    pub(crate) fn from_env() -> Option<Profile> {
        std::env::var_os(PROFILE_ENV).map(|_| Profile {
            marks: Mutex::new(Vec::new()),
            totals: Mutex::new(Totals::default()),
            started: Mutex::new(None),
        })
    }

    /// Starts a step's wall clock.
    pub(crate) fn begin(&self) {
        *lock(&self.started) = Some(Instant::now());
    }

    /// The phase `label` starts here on `stream` (inside a training step only).
    pub(crate) fn mark(&self, stream: &CudaStream, label: &'static str) -> Result<(), CudaError> {
        let mut marks = lock(&self.marks);
        if lock(&self.started).is_some() && marks.len() < MARKS_MAX {
            let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
            marks.push((label, stream.record_event(Some(flags))?));
        }
        Ok(())
    }

    /// Folds the step's marks into the totals; the stream has been synchronized.
    pub(crate) fn end(&self) -> Result<(), CudaError> {
        let mut marks = lock(&self.marks);
        let mut totals = lock(&self.totals);
        for pair in marks.windows(2) {
            let ms = pair[0].1.elapsed_ms(&pair[1].1)? as f64;
            let entry = totals.phases.entry(pair[0].0).or_insert((0.0, 0));
            entry.0 += ms;
            entry.1 += 1;
        }
        marks.clear();
        if let Some(start) = lock(&self.started).take() {
            totals.steps += 1;
            totals.wall_ms += start.elapsed().as_secs_f64() * 1e3;
        }
        Ok(())
    }

    /// The table: each phase's milliseconds a step and share of the GPU's total.
    pub(crate) fn report(&self) -> String {
        let totals = lock(&self.totals);
        let steps = totals.steps.max(1) as f64;
        let gpu: f64 = totals.phases.values().map(|(ms, _)| ms).sum();
        let mut rows: Vec<_> = totals.phases.iter().collect();
        rows.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
        let mut out = format!(
            "cuda profile over {} steps: {:.2} ms a step on the stream, {:.2} ms wall\n",
            totals.steps,
            gpu / steps,
            totals.wall_ms / steps
        );
        for (label, (ms, count)) in rows {
            out.push_str(&format!(
                "  {label:<22} {:>8.3} ms  {:>5.1}%  ({} a step)\n",
                ms / steps,
                100.0 * ms / gpu.max(1e-9),
                *count as f64 / steps
            ));
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
