//! Checks by volunteers (BOINC's replication): a sampled unit whose worker is of another
//! determinism class than the coordinator's own re-runs (or every sampled unit, with
//! `replicate` on) waits here for a volunteer of the worker's class, who is leased it as
//! an ordinary unit under a fresh id, trains it, and uploads as usual; the two payloads
//! are then compared bit for bit (within `spot_check.tolerance`), never across classes.
//!
//! What is kept: the checks waiting for a volunteer, in order, and those leased, by the
//! fresh id the volunteer knows them by; together at most [`PENDING_CHECKS_MAX`]. The
//! driver stores them (a `replicas` row each, rewritten when they change) and a restart
//! resumes them ([`Replicas::resume`]); their units' check rows stay `queued`.

use std::collections::{BTreeMap, VecDeque};

use protocol::{WorkUnit, WorkerId};

use crate::Replica;

/// Most checks waiting for a volunteer or leased to one. A unit sampled while it is
/// full goes to the coordinator's own re-run when the coordinator can run its class
/// ([`coordinator_runs`]), else it stays unchecked (re-run if its worker is caught).
pub const PENDING_CHECKS_MAX: usize = 64;

/// The run's settings for checks by volunteers.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaRules {
    /// Send every sampled unit to a volunteer of its worker's class, even one of the
    /// coordinator's own class (`spot_check.replicate`; tests on CPUs of one class).
    pub replicate: bool,
    /// How long a check waits for a volunteer of the class before it falls back to the
    /// coordinator's own re-run (`spot_check.replica_wait_ms`).
    pub wait_ms: u64,
    /// The determinism class of the coordinator's own re-runs (`engine::cpu_class()`).
    pub checker_class: String,
    /// Whether the driver re-runs checks itself (the coordinator's checker thread). A
    /// run with no coordinator (`crates/peer`) has no one to: every sampled unit waits
    /// for a volunteer however long it takes, a disputed unit always goes to a third
    /// volunteer, and a unit with no room left stays unchecked.
    pub own_reruns: bool,
}

/// Longest GPU unit the coordinator re-runs on its CPU: measured (BENCHMARKS.md, "A GPU's
/// unit against a CPU's re-run of it"), a 50-step bf16 unit lies 9.2% from the CPU's f32
/// re-run, inside the cross-class tolerance (15%), and the distance grows with the steps.
pub const GPU_ON_CPU_STEPS_MAX: u32 = 50;

/// Whether the coordinator can re-run a unit of `class` of `steps` steps itself (within
/// the cross-class tolerance when it is another class): CPU classes, and GPU classes
/// (`cuda/...`) for units of at most [`GPU_ON_CPU_STEPS_MAX`] steps, the longest whose
/// honest GPU-to-CPU distance was measured inside that tolerance.
pub fn coordinator_runs(class: &str, steps: u32) -> bool {
    class.starts_with("cpu/") || (class.starts_with("cuda/") && steps <= GPU_ON_CPU_STEPS_MAX)
}

/// The most steps a unit of a worker of `class` may be sized to so that it can still
/// be checked: no bound while another volunteer of the class is active (`peer`: it
/// re-runs the unit bit for bit, whatever its length), else what the coordinator can
/// re-run ([`coordinator_runs`]): [`GPU_ON_CPU_STEPS_MAX`] for a GPU class, no bound for
/// a CPU class (any length, bit for bit or within the cross-class tolerance) or for a
/// class the coordinator never re-runs.
pub fn checkable_steps_max(class: &str, peer: bool) -> Option<u32> {
    (!peer && class.starts_with("cuda/")).then_some(GPU_ON_CPU_STEPS_MAX)
}

/// Most workers [`ClassPeers`] remembers; past it, the one seen longest ago is
/// forgotten.
pub const CLASS_PEERS_MAX: usize = 1024;

/// Who asked for work lately, and of which determinism class: whether a worker's unit
/// has another volunteer of its class to check it ([`checkable_steps_max`]).
///
/// Soft state, not stored: after a restart it fills again as workers lease, and until a
/// second volunteer of a class leases, that class's units are sized for the
/// coordinator's own re-run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClassPeers {
    /// By worker: its class and when it last leased.
    seen: BTreeMap<WorkerId, (String, u64)>,
}

impl ClassPeers {
    /// `worker` of `class` asked for work at `now_ms`.
    pub fn saw(&mut self, worker: WorkerId, class: &str, now_ms: u64) {
        match self.seen.get_mut(&worker) {
            Some(entry) if entry.0 == class => entry.1 = now_ms,
            _ => {
                self.seen.insert(worker, (class.to_owned(), now_ms));
            }
        }
        if self.seen.len() > CLASS_PEERS_MAX {
            let oldest = self
                .seen
                .iter()
                .min_by_key(|(w, (_, at))| (*at, **w))
                .map(|(w, _)| *w);
            if let Some(w) = oldest {
                self.seen.remove(&w);
            }
        }
    }

    /// Whether a worker other than `worker` of `class` asked for work within `window_ms`
    /// before `now_ms`.
    pub fn other_active(&self, worker: WorkerId, class: &str, now_ms: u64, window_ms: u64) -> bool {
        self.seen.iter().any(|(w, (c, at))| {
            *w != worker && c == class && now_ms.saturating_sub(*at) <= window_ms
        })
    }

    /// Workers remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// A unit waiting for a volunteer of its worker's class.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingCheck {
    /// The unit as its worker trained it (its id is never shown to the volunteer).
    pub unit: WorkUnit,
    /// Its worker, who may not check it.
    pub worker: WorkerId,
    /// Its worker's reported class: only a volunteer of this class checks it.
    pub class: String,
    /// When it was sampled: the wait bound runs from here, across leases that expire.
    pub queued_ms: u64,
    /// A first volunteer's check that did not match the unit, which this check settles
    /// (a third replica, for a unit the coordinator cannot re-run): that volunteer may
    /// not take it either.
    pub disputed: Option<Replica>,
}

impl PendingCheck {
    /// Whether `worker` is one this check must not go to: the unit's worker, or the
    /// volunteer whose check it settles.
    pub fn excludes(&self, worker: WorkerId) -> bool {
        worker == self.worker || self.disputed.is_some_and(|d| d.checker == worker)
    }
}

/// A check leased to a volunteer under a fresh unit id.
#[derive(Clone, Debug, PartialEq)]
pub struct LeasedCheck {
    /// The fresh id the volunteer knows it by.
    pub id: u64,
    pub check: PendingCheck,
    pub checker: WorkerId,
    /// After it the check is offered again (its wait bound still runs).
    pub deadline_ms: u64,
}

/// Where a sampled unit's re-run goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The coordinator re-runs it (today's checker thread).
    Coordinator,
    /// A volunteer of the worker's class re-runs it.
    Volunteer,
    /// No one can: it stays unchecked.
    Nobody,
}

/// Checks waiting for volunteers and leased to them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Replicas {
    pending: VecDeque<PendingCheck>,
    leased: BTreeMap<u64, LeasedCheck>,
}

impl Replicas {
    /// The checks a stored run had: waiting ones in order, then leased ones; past the
    /// bound (a store written with a larger one), the rest are left out for the caller
    /// to hand to the coordinator's own re-run, and a unit held twice, or leased to its
    /// own worker, is kept once, waiting.
    pub fn resume(
        pending: impl IntoIterator<Item = PendingCheck>,
        leased: impl IntoIterator<Item = LeasedCheck>,
    ) -> Replicas {
        let mut replicas = Replicas::default();
        for l in leased {
            if replicas.len() < PENDING_CHECKS_MAX
                && !replicas.holds(l.check.unit.id)
                && !l.check.excludes(l.checker)
            {
                replicas.leased.insert(l.id, l);
            }
        }
        for p in pending {
            let sound = p.disputed.is_none_or(|d| d.checker != p.worker);
            if replicas.len() < PENDING_CHECKS_MAX && !replicas.holds(p.unit.id) && sound {
                replicas.pending.push_back(p);
            }
        }
        replicas.assert_invariants();
        replicas
    }

    /// The checks waiting, in order.
    pub fn pending(&self) -> impl Iterator<Item = &PendingCheck> {
        self.pending.iter()
    }

    /// The checks leased, by fresh id.
    pub fn leases(&self) -> impl Iterator<Item = &LeasedCheck> {
        self.leased.values()
    }

    /// Where the re-run of a sampled unit whose worker reported `class` goes.
    pub fn route(&self, rules: &ReplicaRules, class: Option<&str>, steps: u32) -> Route {
        let own = |route: Route| {
            if rules.own_reruns {
                route
            } else {
                Route::Nobody
            }
        };
        let Some(class) = class else {
            // No class to match a volunteer by (a worker before the report): today's
            // re-run, within the cross-class tolerance.
            return own(Route::Coordinator);
        };
        if !rules.replicate && class == rules.checker_class {
            return own(Route::Coordinator);
        }
        if self.len() < PENDING_CHECKS_MAX {
            Route::Volunteer
        } else if rules.own_reruns && coordinator_runs(class, steps) {
            Route::Coordinator
        } else {
            Route::Nobody
        }
    }

    /// Checks waiting or leased.
    pub fn len(&self) -> usize {
        self.pending.len() + self.leased.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `unit` waits here or is leased.
    pub fn holds(&self, unit: u64) -> bool {
        self.pending.iter().any(|p| p.unit.id == unit)
            || self.leased.values().any(|l| l.check.unit.id == unit)
    }

    /// Adds a check at the back (the caller routed it here, so there is room).
    pub fn push(&mut self, check: PendingCheck) {
        assert!(
            self.len() < PENDING_CHECKS_MAX,
            "a check was pushed past PENDING_CHECKS_MAX"
        );
        self.pending.push_back(check);
        self.assert_invariants();
    }

    /// The index of the first check `worker` of `class` may take: of its class, never
    /// its own unit nor one that settles its own disputed check; none while it holds a
    /// check.
    pub fn offer(&self, worker: WorkerId, class: &str) -> Option<usize> {
        if self.leased.values().any(|l| l.checker == worker) {
            return None;
        }
        self.pending
            .iter()
            .position(|p| p.class == class && !p.excludes(worker))
    }

    /// Leases the check at `index` ([`Replicas::offer`]) to `checker` under the fresh
    /// `id`; the unit the volunteer is given: the original's training inputs under `id`
    /// and the current `round`, nothing that names the original unit or its worker.
    pub fn lease(
        &mut self,
        index: usize,
        id: u64,
        round: u64,
        checker: WorkerId,
        deadline_ms: u64,
    ) -> Option<WorkUnit> {
        let check = self.pending.remove(index)?;
        let unit = WorkUnit {
            id,
            round,
            ..check.unit
        };
        self.leased.insert(
            id,
            LeasedCheck {
                id,
                check,
                checker,
                deadline_ms,
            },
        );
        self.assert_invariants();
        Some(unit)
    }

    /// The check leased under `id`.
    pub fn leased(&self, id: u64) -> Option<&LeasedCheck> {
        self.leased.get(&id)
    }

    /// Ends the check leased under `id` (its upload came).
    pub fn finish(&mut self, id: u64) -> Option<LeasedCheck> {
        self.leased.remove(&id)
    }

    /// Time passes: a lease past its deadline is offered again at the front; a check
    /// waiting `wait_ms` or more leaves, and is returned for the caller to send to the
    /// coordinator's own re-run. A check of a class the coordinator cannot run, or of a
    /// run whose driver re-runs nothing (`own_reruns` off), is never returned: it waits
    /// for a volunteer, holding its place in the bound.
    pub fn expire(&mut self, now_ms: u64, rules: &ReplicaRules) -> Vec<PendingCheck> {
        let wait_ms = rules.wait_ms;
        let expired: Vec<u64> = self
            .leased
            .values()
            .filter(|l| now_ms >= l.deadline_ms)
            .map(|l| l.id)
            .collect();
        for id in expired.into_iter().rev() {
            if let Some(l) = self.leased.remove(&id) {
                self.pending.push_front(l.check);
            }
        }
        let mut out = Vec::new();
        self.pending.retain(|p| {
            let due = rules.own_reruns
                && now_ms.saturating_sub(p.queued_ms) >= wait_ms
                && coordinator_runs(&p.class, p.unit.address.steps);
            if due {
                out.push(p.clone());
            }
            !due
        });
        self.assert_invariants();
        out
    }

    /// Holds after every change: within the bound, a unit held once, no one checking
    /// its own unit or settling its own dispute.
    fn assert_invariants(&self) {
        assert!(self.len() <= PENDING_CHECKS_MAX, "checks past their bound");
        let mut seen = std::collections::HashSet::new();
        for unit in self
            .pending
            .iter()
            .map(|p| p.unit.id)
            .chain(self.leased.values().map(|l| l.check.unit.id))
        {
            assert!(seen.insert(unit), "unit {unit} is checked twice at once");
        }
        for l in self.leased.values() {
            assert!(
                !l.check.excludes(l.checker),
                "unit {} is leased for a check to its own worker or its disputer",
                l.check.unit.id
            );
        }
        for p in &self.pending {
            assert!(
                p.disputed.is_none_or(|d| d.checker != p.worker),
                "unit {}'s worker disputes its own unit",
                p.unit.id
            );
        }
    }
}

#[cfg(test)]
mod tests;
