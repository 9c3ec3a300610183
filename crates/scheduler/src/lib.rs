//! The coordinator's scheduling core: rounds, work units and leases, as a pure state
//! machine. `Scheduler::tick(now_ms, seed, events) -> effects` has no IO and no clock;
//! the HTTP coordinator, the simulator and (later) the peer-to-peer node drive it.
//!
//! Round r starts from model version v and issues K work units, each naming its data
//! exactly (a `protocol::WorkAddress`: shard, offset, H steps, seed) and its learning
//! rate, as a `protocol::WorkUnit`, the record the store and the wire use too. A unit is
//! leased to one worker at a time until a deadline; an expired lease returns the unit to
//! the queue with the same data. The round asks for aggregation when K updates are
//! accepted, or at the round timeout with at least MIN; the driver aggregates and reports
//! the new version, which starts the next round. Updates based on a version more than
//! MAX_STALENESS behind are rejected by validation; this crate tells validation what a
//! unit's lease is (`lease_view`). A lease lasts `lease_ms` past its last heartbeat and
//! never past its hard deadline: `slack` times what the unit is expected to take that
//! worker (the slowest of its last measured arrivals, else the speed it reported, else
//! `lease_max_ms`), clamped between `lease_ms` and `lease_max_ms` (`Arrivals`).
//!
//! Units are sized per worker when `unit_ms` is set (issue 17's tiers): a unit's first
//! lease gives it the steps its worker trains in `unit_ms` (from the same measured
//! arrivals or reported speed), within `steps_min_per_unit..=steps_max_per_unit`, so a GPU
//! rig and a laptop each get a unit that finishes by its deadline. A sized unit keeps its
//! size (the same data) if it is queued again; the driver weighs it by its steps.
//!
//! The whole state is serde-serializable, so a coordinator persists it and resumes the
//! round it was in after a restart.

use std::collections::{BTreeMap, BTreeSet};

use protocol::{WorkAddress, WorkUnit, WorkerId};
use serde::{Deserialize, Serialize};

/// The knobs of scheduling (part of the coordinator's config).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Work units per round (K).
    pub units_per_round: u32,
    /// Fewest accepted updates that let a timed-out round aggregate (MIN).
    pub min_updates: u32,
    /// How long a round may wait for its K updates, in ms.
    pub round_timeout_ms: u64,
    /// How long a lease lasts without a heartbeat, in ms.
    pub lease_ms: u64,
    /// The longest a lease may last however often it is renewed, in ms (BOINC's
    /// deadline): past it the unit is queued again and its holder gets no other unit of
    /// the round, so a key that only sends heartbeats cannot hold a round back.
    pub lease_max_ms: u64,
    /// Local steps per unit (H).
    pub steps_per_unit: u32,
    /// Inner learning rate given to workers (of the first round, when it decays).
    pub inner_lr: f32,
    /// Rounds over which the units' learning rate falls from `inner_lr` to a tenth of it
    /// along a cosine, then stays (0: constant). As a data-parallel run anneals its
    /// learning rate over its steps, DiLoCo's units anneal over the rounds.
    pub lr_decay_rounds: u64,
    /// Shards of the train stream (units of one round read different shards).
    pub n_shards: u32,
    /// Largest accepted `current version - base version` of an update.
    pub max_staleness: u64,
    /// A lease's hard deadline is this multiple of what its unit is expected to take the
    /// worker (its measured arrivals, else its reported speed), clamped between
    /// `lease_ms` and `lease_max_ms`: a fast worker that stalls frees its unit sooner,
    /// and nothing waits longer than `lease_max_ms`. At least 1; 3 leaves room for a
    /// busy machine, a slow download and the spread of a worker's own arrivals.
    pub slack: f64,
    /// How long a unit should take the worker it is first leased to, in ms. 0 (the
    /// default): every unit trains `steps_per_unit` steps. Otherwise a unit's first lease
    /// sizes it to the steps its worker trains in this time (by its measured arrivals,
    /// else the speed it reported; unknown: `steps_per_unit`), within
    /// [`ScheduleConfig::unit_steps_bounds`]: a GPU rig trains long units and a laptop
    /// short ones, each finishing by its deadline. For a run that mixes them.
    pub unit_ms: u64,
    /// Fewest steps of a sized unit (0: a quarter of `steps_per_unit`, at least 1).
    pub steps_min_per_unit: u32,
    /// Most steps of a sized unit, the largest H (0: 4 times `steps_per_unit`). Bounded so
    /// that one update cannot outweigh a round (its weight is its tokens) and a unit's H
    /// stays near the one the run was tuned for (its norm is judged per base unit).
    pub steps_max_per_unit: u32,
}

impl Default for ScheduleConfig {
    /// Sized for a 2-core laptop running a few tiny or small workers.
    fn default() -> Self {
        ScheduleConfig {
            units_per_round: 3,
            min_updates: 2,
            round_timeout_ms: 600_000,
            lease_ms: 300_000,
            lease_max_ms: 1_200_000,
            steps_per_unit: 50,
            inner_lr: 2e-3,
            lr_decay_rounds: 0,
            n_shards: 16,
            max_staleness: 1,
            slack: 3.0,
            unit_ms: 0,
            steps_min_per_unit: 0,
            steps_max_per_unit: 0,
        }
    }
}

impl ScheduleConfig {
    /// The hard deadline's length for a unit expected to take `expected_ms` (`None`:
    /// unknown, the longest lease): `slack * expected_ms`, within `lease_ms` and
    /// `lease_max_ms`. A `slack` below 1 or not a number counts as 1.
    pub fn hard_lease_ms(&self, expected_ms: Option<u64>) -> u64 {
        let Some(expected_ms) = expected_ms else {
            return self.lease_max_ms;
        };
        let slack = if self.slack >= 1.0 { self.slack } else { 1.0 };
        // An f64 past u64::MAX converts to u64::MAX (`as` saturates).
        let scaled = (expected_ms as f64 * slack) as u64;
        scaled.clamp(self.lease_ms.min(self.lease_max_ms), self.lease_max_ms)
    }

    /// The fewest and most steps of a sized unit (`steps_min_per_unit`,
    /// `steps_max_per_unit`, their zeros resolved), the fewer never above the more.
    pub fn unit_steps_bounds(&self) -> (u32, u32) {
        let base = self.steps_per_unit.max(1);
        let min = match self.steps_min_per_unit {
            0 => (base / 4).max(1),
            n => n,
        };
        let max = match self.steps_max_per_unit {
            0 => base.saturating_mul(4),
            n => n,
        };
        (min.min(max), max)
    }

    /// The steps of a unit first leased to a worker for whom a unit of `steps_per_unit`
    /// steps is expected to take `expected_ms` (`None`: unknown): `steps_per_unit` when
    /// sizing is off or the time unknown, else the steps that fill `unit_ms`, within
    /// [`ScheduleConfig::unit_steps_bounds`].
    pub fn unit_steps(&self, expected_ms: Option<u64>) -> u32 {
        match expected_ms {
            Some(expected_ms) if self.unit_ms > 0 => {
                let (min, max) = self.unit_steps_bounds();
                // A worker measured at 0 ms a unit is as fast as sizing goes.
                let per_step_ms = expected_ms as f64 / self.steps_per_unit.max(1) as f64;
                let steps = (self.unit_ms as f64 / per_step_ms).floor();
                // NaN and infinities fall to the bounds (`as` saturates; NaN is 0).
                (steps.min(max as f64) as u32).clamp(min, max)
            }
            _ => self.steps_per_unit,
        }
    }

    /// What a unit of `steps` steps is expected to take a worker for whom one of
    /// `steps_per_unit` steps takes `expected_ms`.
    pub fn scaled_ms(&self, expected_ms: u64, steps: u32) -> u64 {
        let base = self.steps_per_unit.max(1) as u128;
        let scaled = expected_ms as u128 * steps as u128 / base;
        scaled.min(u64::MAX as u128) as u64
    }

    /// The learning rate of round `round`'s units.
    pub fn round_lr(&self, round: u64) -> f32 {
        if self.lr_decay_rounds == 0 {
            return self.inner_lr;
        }
        let progress = round.min(self.lr_decay_rounds) as f64 / self.lr_decay_rounds as f64;
        let min = self.inner_lr as f64 / 10.0;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (min + cosine * (self.inner_lr as f64 - min)) as f32
    }
}

/// Where a unit stands.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum UnitStatus {
    Queued,
    Leased {
        worker: WorkerId,
        /// When the lease ends unless renewed.
        deadline_ms: u64,
        /// When it ends however often it is renewed (at most `lease_max_ms` after it
        /// began; a lease stored before the limit existed has none).
        #[serde(default = "no_limit")]
        hard_deadline_ms: u64,
        /// When it began (a lease stored before arrivals were measured has none, and
        /// its arrival is not measured).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        leased_ms: Option<u64>,
    },
    Accepted {
        worker: WorkerId,
    },
}

fn no_limit() -> u64 {
    u64::MAX
}

/// Whether a lease that ends at `now_ms` ends overdue: at its hard deadline, and that
/// deadline let heartbeats renew it past its first `lease_ms`. A lease whose hard
/// deadline is its first one (a worker measured fast) could not be renewed, so ending
/// it is a plain expiry, as for a worker that sent no heartbeat: its holder may take
/// another unit. A lease stored without its start counts as renewable, as before.
fn overdue(hard_deadline_ms: u64, leased_ms: Option<u64>, lease_ms: u64, now_ms: u64) -> bool {
    hard_deadline_ms <= now_ms
        && leased_ms.is_none_or(|start| hard_deadline_ms > start.saturating_add(lease_ms))
}

/// What happened, as the driver tells it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A worker asks for work; `expected_ms` is how long the driver expects a unit to
    /// take it from the speed it reported (`None`: no report), used while the worker
    /// has no measured arrival.
    LeaseRequest {
        worker: WorkerId,
        expected_ms: Option<u64>,
        /// The most steps a unit sized for this worker may have (`None`: the run's
        /// `steps_max_per_unit`): the driver's bound for a worker whose long units
        /// could not be checked (a GPU's, re-run on a CPU).
        #[serde(default)]
        steps_max: Option<u32>,
    },
    /// A worker says it is still on a unit (extends the lease).
    Heartbeat { worker: WorkerId, unit: u64 },
    /// The worker's update for the unit arrived while its lease held and is being judged:
    /// the lease holds `lease_ms` more from now, past its hard deadline if need be, so
    /// that the time the driver takes to score the update is not counted against the
    /// worker. A verdict ends it either way (an update refused on its content releases
    /// the unit, [`Event::UpdateRefused`]); a worker that sends again extends it again,
    /// each time by one more upload that is judged.
    Arrived { worker: WorkerId, unit: u64 },
    /// Validation accepted the worker's update for the unit.
    UpdateAccepted { worker: WorkerId, unit: u64 },
    /// Validation refused the worker's update for the unit on its content (not its
    /// timing): the lease ends and the unit is queued for another worker.
    UpdateRefused { worker: WorkerId, unit: u64 },
    /// The driver aggregated `round` into model version `version`.
    Aggregated { round: u64, version: u64 },
}

/// What the driver must do.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Effect {
    /// Give this unit to the worker, until the deadline.
    Lease {
        worker: WorkerId,
        unit: WorkUnit,
        deadline_ms: u64,
    },
    /// Nothing to give now; ask again later.
    NoWork {
        worker: WorkerId,
        retry_after_ms: u64,
    },
    /// The worker's lease on the unit expired; the unit is queued again.
    LeaseExpired { worker: WorkerId, unit: u64 },
    /// The worker's lease on the unit reached `lease_max_ms`, renewed or not: the unit is
    /// queued again and the worker gets no other unit of this round.
    LeaseOverdue { worker: WorkerId, unit: u64 },
    /// Aggregate these accepted units of `round` (on `base_version`) into the next version.
    Aggregate {
        round: u64,
        base_version: u64,
        accepted: u32,
    },
    /// A new round started on `version`.
    RoundStarted { round: u64, version: u64 },
}

/// What validation needs to know of a unit's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseView {
    pub unit: u64,
    pub worker: WorkerId,
    pub base_version: u64,
    pub submitted: bool,
    /// The lease ended by time and the unit is queued for anyone: its holder's update is
    /// still taken until the unit is leased again, but nothing renews the lease.
    pub expired: bool,
}

/// The scheduler's whole state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scheduler {
    config: ScheduleConfig,
    round: u64,
    version: u64,
    round_started_ms: Option<u64>,
    /// Waiting for the driver to aggregate this round.
    aggregating: bool,
    next_unit_id: u64,
    /// Next step offset of each shard's stream.
    shard_offsets: Vec<u64>,
    units: BTreeMap<u64, (WorkUnit, UnitStatus)>,
    /// Workers whose update for a unit of this round was refused on its content: the unit
    /// goes to someone else.
    #[serde(default)]
    refused: BTreeMap<u64, Vec<WorkerId>>,
    /// Units of closed rounds still leased when their round closed: their updates are
    /// taken into a later round while at most `max_staleness` versions behind and
    /// before their deadline, so a slow worker's training is not lost.
    #[serde(default)]
    late: BTreeMap<u64, LateLease>,
    /// Workers whose lease of this round reached its hard deadline after heartbeats
    /// renewed it: until the next round, they get only a unit that no one else took for
    /// `lease_ms` after it was queued (with every worker barred outright, a round of
    /// honest workers all slower than expected never ended). At most one entry per lease
    /// the round handed out.
    #[serde(default)]
    overdue: Vec<WorkerId>,
    /// When each unit of the round was last queued (issued, or freed by an expiry, an
    /// overrun or a refusal): at most one entry per unit of the round.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    queued_ms: BTreeMap<u64, u64>,
    /// How long each worker's recent units took it, from lease to accepted update (or to
    /// the hard deadline it overran: a lower bound): what its next hard deadline is sized
    /// from.
    #[serde(default, skip_serializing_if = "Arrivals::is_empty")]
    arrivals: Arrivals,
    /// Units of this round already sized by a lease (`unit_ms`): queued again, they keep
    /// their steps.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    sized: BTreeSet<u64>,
    /// Queued units whose last lease ended by time (expired or overdue), with that
    /// lease's holder: until the unit is leased again or the round ends, the holder's
    /// update is still taken and its heartbeats still answered, as BOINC takes a late
    /// result while its work unit is not done, so a slow machine's training is not lost
    /// when no one else took its unit. At most one entry per unit of the round.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    expired: BTreeMap<u64, ExpiredLease>,
}

/// The lease a queued unit last had, ended by time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiredLease {
    pub worker: WorkerId,
    /// When it began (`None` in states stored before it was kept).
    pub leased_ms: Option<u64>,
}

/// Arrival durations remembered per worker (its most recent ones).
pub const ARRIVALS_PER_WORKER_MAX: usize = 8;

/// Workers whose arrivals are remembered; a new one past it replaces the one whose last
/// arrival is oldest. The scheduler's state is copied on every step and written with
/// every commit, so this stays small: a worker forgotten falls back on its reported
/// speed until its next arrival.
pub const ARRIVAL_WORKERS_MAX: usize = 256;

/// Measured arrival times: per worker, how long its last units took from lease to
/// accepted update, in ms. Bounded by [`ARRIVALS_PER_WORKER_MAX`] and
/// [`ARRIVAL_WORKERS_MAX`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Arrivals {
    workers: Vec<WorkerArrivals>,
}

/// One worker's arrivals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct WorkerArrivals {
    worker: WorkerId,
    /// When its last arrival was measured.
    last_ms: u64,
    /// Its most recent durations, oldest first.
    durations_ms: Vec<u64>,
}

impl Arrivals {
    /// Whether no arrival is remembered.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Workers remembered.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// `worker`'s remembered durations, oldest first (empty when none).
    pub fn of(&self, worker: WorkerId) -> &[u64] {
        self.workers
            .iter()
            .find(|w| w.worker == worker)
            .map_or(&[], |w| &w.durations_ms)
    }

    /// What a unit of `steps_per_unit` steps is expected to take `worker`, from its
    /// arrivals (each scaled to that many steps): the slowest of the
    /// last [`ARRIVALS_PER_WORKER_MAX`]. With eight samples a p90 is the slowest one
    /// anyway, and the slowest is the one rule that gives every recent unit of the
    /// worker room; one outlier cannot lengthen a lease past `lease_max_ms` and ages
    /// out after eight more units.
    pub fn expected_ms(&self, worker: WorkerId) -> Option<u64> {
        self.of(worker).iter().copied().max()
    }

    /// Records that `worker`'s unit of `steps` steps leased at `leased_ms` arrived at
    /// `now_ms`, as the time `base_steps` steps would have taken at that pace.
    fn record(
        &mut self,
        worker: WorkerId,
        leased_ms: u64,
        now_ms: u64,
        steps: u32,
        base_steps: u32,
    ) {
        let took = now_ms.saturating_sub(leased_ms) as u128;
        let duration_ms =
            (took * base_steps.max(1) as u128 / steps.max(1) as u128).min(u64::MAX as u128) as u64;
        let index = match self.workers.iter().position(|w| w.worker == worker) {
            Some(index) => index,
            None => {
                if self.workers.len() >= ARRIVAL_WORKERS_MAX
                    && let Some(oldest) = self
                        .workers
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, w)| w.last_ms)
                        .map(|(i, _)| i)
                {
                    self.workers.swap_remove(oldest);
                }
                self.workers.push(WorkerArrivals {
                    worker,
                    last_ms: now_ms,
                    durations_ms: Vec::with_capacity(ARRIVALS_PER_WORKER_MAX),
                });
                self.workers.len() - 1
            }
        };
        let entry = &mut self.workers[index];
        entry.last_ms = entry.last_ms.max(now_ms);
        if entry.durations_ms.len() >= ARRIVALS_PER_WORKER_MAX {
            entry.durations_ms.remove(0);
        }
        entry.durations_ms.push(duration_ms);
    }
}

/// A lease that outlived its round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LateLease {
    pub unit: WorkUnit,
    pub worker: WorkerId,
    pub deadline_ms: u64,
    /// When it ends however often it is renewed.
    #[serde(default = "no_limit")]
    pub hard_deadline_ms: u64,
    /// When it began (none if stored before arrivals were measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased_ms: Option<u64>,
    /// The round whose aggregate its accepted update joins.
    pub accepted_in: Option<u64>,
}

// SplitMix64, for per-unit seeds derived from the tick's seed.
use protocol::splitmix64 as mix;

impl Scheduler {
    /// A scheduler at round 0 on model `version`, no units issued yet.
    pub fn new(config: ScheduleConfig, version: u64) -> Scheduler {
        Scheduler {
            config,
            round: 0,
            version,
            round_started_ms: None,
            aggregating: false,
            next_unit_id: 1,
            shard_offsets: vec![0; config.n_shards.max(1) as usize],
            units: BTreeMap::new(),
            refused: BTreeMap::new(),
            late: BTreeMap::new(),
            overdue: Vec::new(),
            queued_ms: BTreeMap::new(),
            arrivals: Arrivals::default(),
            sized: BTreeSet::new(),
            expired: BTreeMap::new(),
        }
    }

    /// The measured arrival times the next hard deadlines are sized from.
    pub fn arrivals(&self) -> &Arrivals {
        &self.arrivals
    }

    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    /// The lease of `unit` if it is leased or accepted in the current round, or a late
    /// lease of a closed round, or the lease that ended by time on a unit queued since
    /// (its holder's update is still taken: `expired`).
    pub fn lease_view(&self, unit: u64) -> Option<LeaseView> {
        if let Some(l) = self.late.get(&unit) {
            return Some(LeaseView {
                unit,
                worker: l.worker,
                base_version: l.unit.base_version,
                submitted: l.accepted_in.is_some(),
                expired: false,
            });
        }
        let (u, status) = self.units.get(&unit)?;
        match *status {
            UnitStatus::Queued => self.expired.get(&unit).map(|e| LeaseView {
                unit,
                worker: e.worker,
                base_version: u.base_version,
                submitted: false,
                expired: true,
            }),
            UnitStatus::Leased { worker, .. } => Some(LeaseView {
                unit,
                worker,
                base_version: u.base_version,
                submitted: false,
                expired: false,
            }),
            UnitStatus::Accepted { worker } => Some(LeaseView {
                unit,
                worker,
                base_version: u.base_version,
                submitted: true,
                expired: false,
            }),
        }
    }

    /// The current round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The newest model version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The round waiting for the driver to aggregate it, with its base version: after a
    /// restart, the driver aggregates it again (aggregation is deterministic).
    pub fn pending_aggregate(&self) -> Option<(u64, u64)> {
        self.aggregating.then_some((self.round, self.version))
    }

    /// Units of the current round and their status, in id order.
    pub fn units(&self) -> impl Iterator<Item = &(WorkUnit, UnitStatus)> {
        self.units.values()
    }

    /// The units whose updates the current round aggregates, in id order: its own
    /// accepted units and the late units of earlier rounds accepted during it.
    pub fn round_updates(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .units
            .values()
            .filter(|(_, s)| matches!(s, UnitStatus::Accepted { .. }))
            .map(|(u, _)| u.id)
            .chain(
                self.late
                    .values()
                    .filter(|l| l.accepted_in == Some(self.round))
                    .map(|l| l.unit.id),
            )
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Takes the next unit id for a unit issued outside the scheduler (a volunteer's
    /// check, `run::replicas`), so that it is indistinguishable from the units' ids and
    /// never reused; the scheduler's state (stored) remembers it was taken.
    pub fn reserve_unit_id(&mut self) -> u64 {
        let id = self.next_unit_id;
        self.next_unit_id += 1;
        id
    }

    /// The unit `id` of the current round or a late lease.
    pub fn unit(&self, id: u64) -> Option<&WorkUnit> {
        self.units
            .get(&id)
            .map(|(u, _)| u)
            .or_else(|| self.late.get(&id).map(|l| &l.unit))
    }

    /// Late leases of closed rounds, in unit id order.
    pub fn late(&self) -> impl Iterator<Item = &LateLease> {
        self.late.values()
    }

    /// Advances the state by `events` at time `now_ms`; `seed` feeds the data seeds of
    /// the units a new round issues.
    pub fn tick(&mut self, now_ms: u64, seed: u64, events: &[Event]) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.round_started_ms.is_none() {
            self.start_round(now_ms, seed, &mut effects);
        }
        self.expire_leases(now_ms, &mut effects);
        // A round past its timeout closes before anything else, so that no lease is
        // handed out on a version about to be replaced.
        self.maybe_aggregate(now_ms, &mut effects);
        for event in events {
            match *event {
                Event::LeaseRequest {
                    worker,
                    expected_ms,
                    steps_max,
                } => self.lease(now_ms, worker, expected_ms, steps_max, &mut effects),
                Event::Heartbeat { worker, unit } => {
                    let renewed = now_ms.saturating_add(self.config.lease_ms);
                    if let Some((
                        _,
                        UnitStatus::Leased {
                            worker: holder,
                            deadline_ms,
                            hard_deadline_ms,
                            ..
                        },
                    )) = self.units.get_mut(&unit)
                        && *holder == worker
                    {
                        *deadline_ms = renewed.min(*hard_deadline_ms);
                    }
                    if let Some(l) = self.late.get_mut(&unit)
                        && l.worker == worker
                        && l.accepted_in.is_none()
                    {
                        l.deadline_ms = renewed.min(l.hard_deadline_ms);
                    }
                }
                Event::Arrived { worker, unit } => {
                    let held = now_ms.saturating_add(self.config.lease_ms);
                    if let Some((
                        _,
                        UnitStatus::Leased {
                            worker: holder,
                            deadline_ms,
                            hard_deadline_ms,
                            ..
                        },
                    )) = self.units.get_mut(&unit)
                        && *holder == worker
                    {
                        *deadline_ms = (*deadline_ms).max(held);
                        *hard_deadline_ms = (*hard_deadline_ms).max(held);
                    }
                    if let Some(l) = self.late.get_mut(&unit)
                        && l.worker == worker
                        && l.accepted_in.is_none()
                    {
                        l.deadline_ms = l.deadline_ms.max(held);
                        l.hard_deadline_ms = l.hard_deadline_ms.max(held);
                    }
                }
                Event::UpdateAccepted { worker, unit } => {
                    let base_steps = self.config.steps_per_unit;
                    if let Some((u, status @ UnitStatus::Leased { .. })) = self.units.get_mut(&unit)
                        && let UnitStatus::Leased {
                            worker: holder,
                            leased_ms,
                            ..
                        } = *status
                        && holder == worker
                    {
                        *status = UnitStatus::Accepted { worker };
                        if let Some(leased_ms) = leased_ms {
                            let steps = u.address.steps;
                            self.arrivals
                                .record(worker, leased_ms, now_ms, steps, base_steps);
                        }
                    }
                    // The late update of a unit queued since its lease ended by time.
                    if let Some((u, status @ UnitStatus::Queued)) = self.units.get_mut(&unit)
                        && let Some(e) = self.expired.get(&unit).copied()
                        && e.worker == worker
                    {
                        *status = UnitStatus::Accepted { worker };
                        self.expired.remove(&unit);
                        self.queued_ms.remove(&unit);
                        if let Some(leased_ms) = e.leased_ms {
                            let steps = u.address.steps;
                            self.arrivals
                                .record(worker, leased_ms, now_ms, steps, base_steps);
                        }
                    }
                    if let Some(l) = self.late.get_mut(&unit)
                        && l.worker == worker
                        && l.accepted_in.is_none()
                    {
                        l.accepted_in = Some(self.round);
                        if let Some(leased_ms) = l.leased_ms {
                            let steps = l.unit.address.steps;
                            self.arrivals
                                .record(worker, leased_ms, now_ms, steps, base_steps);
                        }
                    }
                }
                Event::UpdateRefused { worker, unit } => {
                    // A late unit is not issued again: its round is closed.
                    if self
                        .late
                        .get(&unit)
                        .is_some_and(|l| l.worker == worker && l.accepted_in.is_none())
                    {
                        self.late.remove(&unit);
                    }
                    if self.expired.get(&unit).is_some_and(|e| e.worker == worker) {
                        self.expired.remove(&unit);
                        let refused = self.refused.entry(unit).or_default();
                        if !refused.contains(&worker) {
                            refused.push(worker);
                        }
                    }
                    if let Some((_, status @ UnitStatus::Leased { .. })) = self.units.get_mut(&unit)
                        && matches!(status, UnitStatus::Leased { worker: w, .. } if *w == worker)
                    {
                        *status = UnitStatus::Queued;
                        self.queued_ms.insert(unit, now_ms);
                        let refused = self.refused.entry(unit).or_default();
                        if !refused.contains(&worker) {
                            refused.push(worker);
                        }
                    }
                }
                Event::Aggregated { round, version } => {
                    if round == self.round && self.aggregating {
                        self.version = version;
                        self.round += 1;
                        self.aggregating = false;
                        self.units.clear();
                        self.sized.clear();
                        self.refused.clear();
                        self.overdue.clear();
                        self.queued_ms.clear();
                        self.expired.clear();
                        // Aggregated late updates are done; leases too stale are dropped.
                        let (current, max) = (self.version, self.config.max_staleness);
                        self.late.retain(|_, l| {
                            l.accepted_in.is_none()
                                && current.saturating_sub(l.unit.base_version) <= max
                        });
                        self.start_round(now_ms, seed, &mut effects);
                    }
                }
            }
        }
        self.maybe_aggregate(now_ms, &mut effects);
        effects
    }

    /// Accepted units of the current round (late ones join its aggregate but do not
    /// count towards closing it).
    fn accepted(&self) -> u32 {
        self.units
            .values()
            .filter(|(_, s)| matches!(s, UnitStatus::Accepted { .. }))
            .count() as u32
    }

    fn start_round(&mut self, now_ms: u64, seed: u64, effects: &mut Vec<Effect>) {
        self.round_started_ms = Some(now_ms);
        let n_shards = self.config.n_shards.max(1);
        for k in 0..self.config.units_per_round {
            let id = self.next_unit_id;
            self.next_unit_id += 1;
            let shard = ((self.round * self.config.units_per_round as u64 + k as u64)
                % n_shards as u64) as u32;
            let offset = self.shard_offsets[shard as usize];
            self.shard_offsets[shard as usize] += self.config.steps_per_unit as u64;
            let unit = WorkUnit {
                id,
                round: self.round,
                base_version: self.version,
                address: WorkAddress {
                    shard,
                    offset,
                    steps: self.config.steps_per_unit,
                    seed: mix(seed ^ mix(id)),
                },
                lr: self.config.round_lr(self.round),
            };
            self.units.insert(id, (unit, UnitStatus::Queued));
            self.queued_ms.insert(id, now_ms);
        }
        effects.push(Effect::RoundStarted {
            round: self.round,
            version: self.version,
        });
    }

    fn expire_leases(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let lease_ms = self.config.lease_ms;
        let base_steps = self.config.steps_per_unit;
        for (id, (unit, status)) in self.units.iter_mut() {
            if let UnitStatus::Leased {
                worker,
                deadline_ms,
                hard_deadline_ms,
                leased_ms,
            } = *status
                && deadline_ms <= now_ms
            {
                *status = UnitStatus::Queued;
                self.queued_ms.insert(*id, now_ms);
                self.expired.insert(*id, ExpiredLease { worker, leased_ms });
                // The unit takes the worker at least this long (or the worker is gone):
                // its next deadline is sized from that, not from the speed it reported.
                // Without it, a worker whose reported speed promised less than its unit
                // takes got the unit back with the same short deadline, again and again.
                if let Some(leased_ms) = leased_ms {
                    self.arrivals
                        .record(worker, leased_ms, now_ms, unit.address.steps, base_steps);
                }
                if overdue(hard_deadline_ms, leased_ms, lease_ms, now_ms) {
                    if !self.overdue.contains(&worker) {
                        self.overdue.push(worker);
                    }
                    effects.push(Effect::LeaseOverdue { worker, unit: *id });
                } else {
                    effects.push(Effect::LeaseExpired { worker, unit: *id });
                }
            }
        }
        self.late.retain(|id, l| {
            let expired = l.accepted_in.is_none() && l.deadline_ms <= now_ms;
            if expired {
                let (worker, unit) = (l.worker, *id);
                effects.push(
                    if overdue(l.hard_deadline_ms, l.leased_ms, lease_ms, now_ms) {
                        Effect::LeaseOverdue { worker, unit }
                    } else {
                        Effect::LeaseExpired { worker, unit }
                    },
                );
            }
            !expired
        });
    }

    /// Leases a queued unit to `worker` (or gives its own back), sized for the worker on
    /// its first lease (`unit_ms`), its hard deadline from what the unit is expected to
    /// take the worker: by its arrivals, else `expected_ms` (both for a unit of
    /// `steps_per_unit` steps, scaled to the unit's), else `lease_max_ms`.
    fn lease(
        &mut self,
        now_ms: u64,
        worker: WorkerId,
        expected_ms: Option<u64>,
        steps_max: Option<u32>,
        effects: &mut Vec<Effect>,
    ) {
        // One unit per worker at a time: a worker that asks again gets its own unit back.
        let held = self
            .units
            .values()
            .find(|(_, s)| matches!(s, UnitStatus::Leased { worker: w, .. } if *w == worker));
        if let Some((unit, UnitStatus::Leased { deadline_ms, .. })) = held {
            effects.push(Effect::Lease {
                worker,
                unit: *unit,
                deadline_ms: *deadline_ms,
            });
            return;
        }
        let queued = if self.aggregating {
            None
        } else {
            let (refused, queued_ms) = (&self.refused, &self.queued_ms);
            // An overdue worker waits until no one else wanted the unit for a lease's
            // length: keys that only send heartbeats hold no unit twice while others
            // work, and slow honest workers still end a round that only they work.
            let barred = self.overdue.contains(&worker);
            let waited = |unit: u64| {
                queued_ms
                    .get(&unit)
                    .is_some_and(|&at| now_ms >= at.saturating_add(self.config.lease_ms))
            };
            self.units.values_mut().find(|(u, s)| {
                matches!(s, UnitStatus::Queued)
                    && !refused.get(&u.id).is_some_and(|r| r.contains(&worker))
                    && (!barred || waited(u.id))
            })
        };
        let expected_ms = self.arrivals.expected_ms(worker).or(expected_ms);
        match queued {
            Some((unit, status)) => {
                if self.config.unit_ms > 0 && self.sized.insert(unit.id) {
                    let steps = self.config.unit_steps(expected_ms);
                    let steps = steps_max.map_or(steps, |most| steps.min(most.max(1)));
                    // The shard's stream moves past the longer unit (a shorter one leaves
                    // a gap): later rounds' units of the shard never overlap it.
                    let shard = unit.address.shard as usize;
                    if let Some(next) = self.shard_offsets.get_mut(shard) {
                        *next = next
                            .saturating_add(u64::from(steps.saturating_sub(unit.address.steps)));
                    }
                    unit.address.steps = steps;
                }
                let expected_ms =
                    expected_ms.map(|ms| self.config.scaled_ms(ms, unit.address.steps));
                let hard_deadline_ms =
                    now_ms.saturating_add(self.config.hard_lease_ms(expected_ms));
                let deadline_ms = now_ms
                    .saturating_add(self.config.lease_ms)
                    .min(hard_deadline_ms);
                *status = UnitStatus::Leased {
                    worker,
                    deadline_ms,
                    hard_deadline_ms,
                    leased_ms: Some(now_ms),
                };
                // Leased again: the last holder's late update is no longer taken.
                self.expired.remove(&unit.id);
                effects.push(Effect::Lease {
                    worker,
                    unit: *unit,
                    deadline_ms,
                });
            }
            None => effects.push(Effect::NoWork {
                worker,
                retry_after_ms: 1_000,
            }),
        }
    }

    fn maybe_aggregate(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        if self.aggregating {
            return;
        }
        let accepted = self.accepted();
        let started = self.round_started_ms.unwrap_or(now_ms);
        let timed_out = now_ms >= started + self.config.round_timeout_ms;
        if accepted >= self.config.units_per_round
            || (timed_out && accepted >= self.config.min_updates.max(1))
        {
            self.aggregating = true;
            // Units not accepted by now leave the round: leased ones are kept as late
            // leases while staleness is allowed, queued ones are dropped.
            let late = &mut self.late;
            let keep_late = self.config.max_staleness > 0;
            self.units.retain(|id, (unit, s)| match *s {
                UnitStatus::Accepted { .. } => true,
                UnitStatus::Leased {
                    worker,
                    deadline_ms,
                    hard_deadline_ms,
                    leased_ms,
                } => {
                    if keep_late {
                        late.insert(
                            *id,
                            LateLease {
                                unit: *unit,
                                worker,
                                deadline_ms,
                                hard_deadline_ms,
                                leased_ms,
                                accepted_in: None,
                            },
                        );
                    }
                    false
                }
                UnitStatus::Queued => false,
            });
            effects.push(Effect::Aggregate {
                round: self.round,
                base_version: self.version,
                accepted: self.round_updates().len() as u32,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(n: u8) -> WorkerId {
        WorkerId([n; 32])
    }

    /// Worker `n` asks for a unit, its reported speed promising `expected_ms` a unit.
    fn ask(n: u8, expected_ms: Option<u64>) -> Event {
        Event::LeaseRequest {
            worker: w(n),
            expected_ms,
            steps_max: None,
        }
    }

    fn hb(n: u8, unit: u64) -> Event {
        Event::Heartbeat { worker: w(n), unit }
    }

    fn accepted(n: u8, unit: u64) -> Event {
        Event::UpdateAccepted { worker: w(n), unit }
    }

    fn config() -> ScheduleConfig {
        ScheduleConfig {
            units_per_round: 2,
            min_updates: 1,
            round_timeout_ms: 1000,
            lease_ms: 100,
            steps_per_unit: 10,
            n_shards: 4,
            ..ScheduleConfig::default()
        }
    }

    /// Runs (time, events) steps and prints every effect, one per line.
    #[track_caller]
    fn check(steps: &[(u64, Vec<Event>)], expect: expect_test::Expect) {
        check_with(config(), steps, expect)
    }

    /// [`check`] under another config.
    #[track_caller]
    fn check_with(
        config: ScheduleConfig,
        steps: &[(u64, Vec<Event>)],
        expect: expect_test::Expect,
    ) {
        let mut s = Scheduler::new(config, 0);
        let mut out = String::new();
        for (now, events) in steps {
            for e in s.tick(*now, 7, events) {
                let line = match e {
                    Effect::Lease {
                        worker,
                        unit,
                        deadline_ms,
                    } => format!(
                        "lease unit {} (round {}, base v{}, shard {}, offset {}) to w{} until {deadline_ms}",
                        unit.id,
                        unit.round,
                        unit.base_version,
                        unit.address.shard,
                        unit.address.offset,
                        worker.0[0]
                    ),
                    Effect::NoWork { worker, .. } => format!("no work for w{}", worker.0[0]),
                    Effect::LeaseExpired { worker, unit } => {
                        format!("lease of unit {unit} by w{} expired", worker.0[0])
                    }
                    Effect::LeaseOverdue { worker, unit } => {
                        format!("lease of unit {unit} by w{} is overdue", worker.0[0])
                    }
                    Effect::Aggregate {
                        round,
                        base_version,
                        accepted,
                    } => format!("aggregate round {round} on v{base_version} ({accepted} updates)"),
                    Effect::RoundStarted { round, version } => {
                        format!("round {round} starts on v{version}")
                    }
                };
                out.push_str(&format!("t={now}: {line}\n"));
            }
        }
        expect.assert_eq(&out);
    }

    #[test]
    fn the_units_learning_rate_anneals_over_the_rounds() {
        let constant = ScheduleConfig::default();
        assert_eq!(constant.round_lr(0), constant.inner_lr);
        assert_eq!(constant.round_lr(1000), constant.inner_lr);
        let decaying = ScheduleConfig {
            inner_lr: 1e-3,
            lr_decay_rounds: 10,
            ..ScheduleConfig::default()
        };
        let lrs: Vec<String> = [0, 1, 5, 9, 10, 50]
            .iter()
            .map(|&r| format!("{:.6}", decaying.round_lr(r)))
            .collect();
        expect_test::expect!["0.001000 0.000978 0.000550 0.000122 0.000100 0.000100"]
            .assert_eq(&lrs.join(" "));
    }

    /// Heartbeats renew a lease up to `lease_max_ms` and no further: then the unit goes
    /// to another worker, and the holder gets nothing more of the round, so two keys
    /// that only send heartbeats cannot keep a round from reaching MIN.
    #[test]
    fn heartbeats_do_not_keep_a_lease_past_its_hard_limit() {
        use Event::*;
        check_with(
            ScheduleConfig {
                lease_max_ms: 250,
                ..config()
            },
            &[
                (
                    0,
                    vec![
                        LeaseRequest {
                            worker: w(1),
                            expected_ms: None,
                            steps_max: None,
                        },
                        LeaseRequest {
                            worker: w(2),
                            expected_ms: None,
                            steps_max: None,
                        },
                    ],
                ),
                (90, vec![hb(1, 1), hb(2, 2)]),
                (180, vec![hb(1, 1), hb(2, 2)]),
                (
                    250,
                    vec![
                        LeaseRequest {
                            worker: w(1),
                            expected_ms: None,
                            steps_max: None,
                        },
                        LeaseRequest {
                            worker: w(2),
                            expected_ms: None,
                            steps_max: None,
                        },
                        LeaseRequest {
                            worker: w(3),
                            expected_ms: None,
                            steps_max: None,
                        },
                    ],
                ),
                (
                    300,
                    vec![UpdateAccepted {
                        worker: w(3),
                        unit: 1,
                    }],
                ),
            ],
            expect_test::expect![[r#"
                t=0: round 0 starts on v0
                t=0: lease unit 1 (round 0, base v0, shard 0, offset 0) to w1 until 100
                t=0: lease unit 2 (round 0, base v0, shard 1, offset 0) to w2 until 100
                t=250: lease of unit 1 by w1 is overdue
                t=250: lease of unit 2 by w2 is overdue
                t=250: no work for w1
                t=250: no work for w2
                t=250: lease unit 1 (round 0, base v0, shard 0, offset 0) to w3 until 350
            "#]],
        );
    }

    /// Every worker slower than its reported speed promised: both leases overrun their
    /// hard deadlines (heartbeats kept them to it) and both workers are barred. Once no
    /// one else took the freed units for a lease's length (100 ms), the barred may, and
    /// their new hard deadlines are sized from the time they were given (3 x 150 ms, the
    /// lower bound recorded when they overran), so the round ends. Before, it never did:
    /// `hivetrain demo --finetune` on a loaded laptop stalled at version 0 so.
    #[test]
    fn a_round_whose_every_worker_overran_its_deadline_still_ends() {
        let ask = |n| ask(n, Some(40));
        check(
            &[
                (0, vec![ask(1), ask(2)]),
                (90, vec![hb(1, 1), hb(2, 2)]),
                (150, vec![ask(1), ask(2)]),
                (249, vec![ask(1)]),
                (250, vec![ask(1), ask(2)]),
                (340, vec![hb(1, 1), hb(2, 2)]),
                (430, vec![hb(1, 1), hb(2, 2)]),
                (500, vec![accepted(1, 1), accepted(2, 2)]),
            ],
            expect_test::expect![[r#"
                t=0: round 0 starts on v0
                t=0: lease unit 1 (round 0, base v0, shard 0, offset 0) to w1 until 100
                t=0: lease unit 2 (round 0, base v0, shard 1, offset 0) to w2 until 100
                t=150: lease of unit 1 by w1 is overdue
                t=150: lease of unit 2 by w2 is overdue
                t=150: no work for w1
                t=150: no work for w2
                t=249: no work for w1
                t=250: lease unit 1 (round 0, base v0, shard 0, offset 0) to w1 until 350
                t=250: lease unit 2 (round 0, base v0, shard 1, offset 0) to w2 until 350
                t=500: aggregate round 0 on v0 (2 updates)
            "#]],
        );
    }

    /// A unit that outlasts a lease no heartbeat could renew (its hard deadline was its
    /// first: the worker's reported speed promised 30 ms a unit) comes back to its worker
    /// with a deadline sized from the 120 ms it was given, which heartbeats then renew,
    /// not with the same short one: `hivetrain demo --finetune` on a slow laptop trained
    /// each unit again and again, each refused `not_leased` after 120 s.
    #[test]
    fn a_unit_that_outlasts_its_lease_comes_back_with_a_longer_one() {
        let ask = |n| ask(n, Some(30));
        check(
            &[
                (0, vec![ask(1)]),
                (90, vec![hb(1, 1)]),
                (120, vec![ask(1)]),
                (200, vec![hb(1, 1)]),
                (290, vec![hb(1, 1)]),
                (350, vec![accepted(1, 1)]),
            ],
            expect_test::expect![[r#"
                t=0: round 0 starts on v0
                t=0: lease unit 1 (round 0, base v0, shard 0, offset 0) to w1 until 100
                t=120: lease of unit 1 by w1 expired
                t=120: lease unit 1 (round 0, base v0, shard 0, offset 0) to w1 until 220
            "#]],
        );
    }

    /// An update that arrives before its lease's hard deadline holds the lease while it
    /// is scored, past that deadline (w1: a 120 ms hard deadline, arrived at 115, judged
    /// at 210); without the arrival the lease ends at its hard deadline (w2). The
    /// fine-tune demo on a busy laptop refused updates that arrived in time but were
    /// judged after the coordinator had scored them.
    #[test]
    fn an_update_that_arrived_in_time_is_not_late_for_its_scoring() {
        let ask = |n| ask(n, Some(40));
        let arrived = |n, unit| Event::Arrived { worker: w(n), unit };
        check(
            &[
                (0, vec![ask(1), ask(2)]),
                (90, vec![hb(1, 1), hb(2, 2)]),
                (115, vec![arrived(1, 1)]),
                (200, vec![]),
                (210, vec![accepted(1, 1)]),
                // Not the holder's: no effect.
                (220, vec![arrived(1, 2)]),
            ],
            expect_test::expect![[r#"
                t=0: round 0 starts on v0
                t=0: lease unit 1 (round 0, base v0, shard 0, offset 0) to w1 until 100
                t=0: lease unit 2 (round 0, base v0, shard 1, offset 0) to w2 until 100
                t=200: lease of unit 2 by w2 is overdue
            "#]],
        );
    }

    /// A lease that ended by time leaves its holder's update welcome while no one else
    /// has taken the unit (BOINC's late result): accepted, it counts like any other. Once
    /// the unit is leased again, the new holder's lease is the one that counts.
    #[test]
    fn a_late_update_counts_until_its_unit_is_leased_again() {
        let view = |s: &Scheduler, unit| s.lease_view(unit).map(|l| (l.worker, l.submitted));
        // Nobody took unit 1 after w1's lease expired at 100: w1's update is accepted.
        let mut s = Scheduler::new(config(), 0);
        s.tick(0, 7, &[ask(1, None)]);
        let effects = s.tick(150, 7, &[]);
        assert!(effects.contains(&Effect::LeaseExpired {
            worker: w(1),
            unit: 1
        }));
        assert_eq!(view(&s, 1), Some((w(1), false)));
        s.tick(160, 7, &[hb(1, 1), accepted(1, 1)]);
        assert_eq!(view(&s, 1), Some((w(1), true)));
        assert_eq!(s.accepted(), 1);
        // The next asker gets the other unit, not unit 1 again.
        let effects = s.tick(170, 7, &[ask(2, None)]);
        assert!(
            matches!(effects[..], [Effect::Lease { worker, unit, .. }] if worker == w(2) && unit.id == 2),
            "{effects:?}"
        );

        // Unit 1 leased to w2 after w1's expired: w1's update no longer counts.
        let mut s = Scheduler::new(config(), 0);
        s.tick(0, 7, &[ask(1, None)]);
        s.tick(150, 7, &[ask(2, None)]);
        assert_eq!(view(&s, 1), Some((w(2), false)));
        s.tick(160, 7, &[accepted(1, 1)]);
        assert_eq!((view(&s, 1), s.accepted()), (Some((w(2), false)), 0));
        assert!(s.expired.is_empty());

        // A refusal of the late update sends the unit to others, and not back to w1.
        let mut s = Scheduler::new(config(), 0);
        s.tick(0, 7, &[ask(1, None)]);
        s.tick(150, 7, &[]);
        s.tick(
            160,
            7,
            &[Event::UpdateRefused {
                worker: w(1),
                unit: 1,
            }],
        );
        assert_eq!(view(&s, 1), None);
        let effects = s.tick(170, 7, &[ask(1, None)]);
        assert!(
            matches!(effects[..], [Effect::Lease { unit, .. }] if unit.id == 2),
            "{effects:?}"
        );
    }

    #[test]
    fn a_round_leases_aggregates_and_starts_the_next() {
        use Event::*;
        check(
            &[
                (
                    0,
                    vec![
                        LeaseRequest {
                            worker: w(1),
                            expected_ms: None,
                            steps_max: None,
                        },
                        LeaseRequest {
                            worker: w(2),
                            expected_ms: None,
                            steps_max: None,
                        },
                        LeaseRequest {
                            worker: w(3),
                            expected_ms: None,
                            steps_max: None,
                        },
                    ],
                ),
                (
                    10,
                    vec![LeaseRequest {
                        worker: w(1),
                        expected_ms: None,
                        steps_max: None,
                    }],
                ),
                (
                    50,
                    vec![
                        UpdateAccepted {
                            worker: w(1),
                            unit: 1,
                        },
                        UpdateAccepted {
                            worker: w(2),
                            unit: 2,
                        },
                    ],
                ),
                (
                    60,
                    vec![LeaseRequest {
                        worker: w(3),
                        expected_ms: None,
                        steps_max: None,
                    }],
                ),
                (
                    70,
                    vec![
                        Aggregated {
                            round: 0,
                            version: 1,
                        },
                        LeaseRequest {
                            worker: w(3),
                            expected_ms: None,
                            steps_max: None,
                        },
                    ],
                ),
            ],
            expect_test::expect![[r#"
                t=0: round 0 starts on v0
                t=0: lease unit 1 (round 0, base v0, shard 0, offset 0) to w1 until 100
                t=0: lease unit 2 (round 0, base v0, shard 1, offset 0) to w2 until 100
                t=0: no work for w3
                t=10: lease unit 1 (round 0, base v0, shard 0, offset 0) to w1 until 100
                t=50: aggregate round 0 on v0 (2 updates)
                t=60: no work for w3
                t=70: round 1 starts on v1
                t=70: lease unit 3 (round 1, base v1, shard 2, offset 0) to w3 until 170
            "#]],
        );
    }

    #[test]
    fn a_refused_unit_goes_to_another_worker() {
        let mut s = Scheduler::new(config(), 0);
        let lease = |e: &[Effect]| {
            e.iter().find_map(|e| match e {
                Effect::Lease { unit, .. } => Some(unit.id),
                _ => None,
            })
        };
        let first = s.tick(
            0,
            7,
            &[Event::LeaseRequest {
                worker: w(1),
                expected_ms: None,
                steps_max: None,
            }],
        );
        let unit = lease(&first).expect("a lease");
        s.tick(1, 7, &[Event::UpdateRefused { worker: w(1), unit }]);
        // Its refused worker gets the round's other unit; the next worker gets this one.
        let other = lease(&s.tick(
            2,
            7,
            &[Event::LeaseRequest {
                worker: w(1),
                expected_ms: None,
                steps_max: None,
            }],
        ));
        assert!(other.is_some_and(|u| u != unit), "{other:?}");
        assert_eq!(
            lease(&s.tick(
                3,
                7,
                &[Event::LeaseRequest {
                    worker: w(2),
                    expected_ms: None,
                    steps_max: None,
                }]
            )),
            Some(unit)
        );
        // A refusal for a unit not leased to the sender changes nothing.
        let before = s.clone();
        s.tick(3, 7, &[Event::UpdateRefused { worker: w(1), unit }]);
        assert_eq!(s, before);
    }

    #[test]
    fn expired_leases_are_reissued_with_the_same_data_and_late_updates_ignored() {
        use Event::*;
        check(
            &[
                (
                    0,
                    vec![
                        LeaseRequest {
                            worker: w(1),
                            expected_ms: None,
                            steps_max: None,
                        },
                        LeaseRequest {
                            worker: w(2),
                            expected_ms: None,
                            steps_max: None,
                        },
                    ],
                ),
                (
                    60,
                    vec![Heartbeat {
                        worker: w(2),
                        unit: 2,
                    }],
                ),
                (
                    120,
                    vec![LeaseRequest {
                        worker: w(3),
                        expected_ms: None,
                        steps_max: None,
                    }],
                ),
                (
                    130,
                    vec![UpdateAccepted {
                        worker: w(1),
                        unit: 1,
                    }],
                ),
                (
                    140,
                    vec![
                        UpdateAccepted {
                            worker: w(3),
                            unit: 1,
                        },
                        UpdateAccepted {
                            worker: w(2),
                            unit: 2,
                        },
                    ],
                ),
            ],
            expect_test::expect![[r#"
                t=0: round 0 starts on v0
                t=0: lease unit 1 (round 0, base v0, shard 0, offset 0) to w1 until 100
                t=0: lease unit 2 (round 0, base v0, shard 1, offset 0) to w2 until 100
                t=120: lease of unit 1 by w1 expired
                t=120: lease unit 1 (round 0, base v0, shard 0, offset 0) to w3 until 220
                t=140: aggregate round 0 on v0 (2 updates)
            "#]],
        );
    }

    /// A unit still leased when its round closes stays a late lease: its update joins
    /// the next round's aggregate while at most `max_staleness` versions behind and
    /// before its deadline; one not sent by then expires; none is kept with staleness 0.
    #[test]
    fn a_lease_that_outlives_its_round_joins_the_next_aggregate() {
        use Event::*;
        let accepted = |worker, unit| UpdateAccepted {
            worker: w(worker),
            unit,
        };
        let lease = |worker| LeaseRequest {
            worker: w(worker),
            expected_ms: None,
            steps_max: None,
        };
        let aggregated = |round, version| Aggregated { round, version };
        let late = |s: &Scheduler| -> Vec<(u64, Option<u64>)> {
            s.late().map(|l| (l.unit.id, l.accepted_in)).collect()
        };
        let config = ScheduleConfig {
            round_timeout_ms: 50,
            lease_ms: 100,
            ..config()
        };
        let mut s = Scheduler::new(config, 0);
        s.tick(0, 7, &[lease(1), lease(2)]);
        // Round 0 times out at t=60 with unit 1 accepted; unit 2 is still w2's.
        let effects = s.tick(60, 7, &[accepted(1, 1)]);
        assert!(effects.contains(&Effect::Aggregate {
            round: 0,
            base_version: 0,
            accepted: 1,
        }));
        s.tick(60, 7, &[aggregated(0, 1)]);
        assert_eq!(late(&s), vec![(2, None)]);
        let view = s.lease_view(2).expect("late lease");
        assert_eq!(
            (view.worker, view.base_version, view.submitted),
            (w(2), 0, false)
        );
        // w2's update, one version behind, joins round 1; a second one is a duplicate.
        s.tick(70, 7, &[lease(1), lease(3), accepted(2, 2)]);
        assert_eq!(late(&s), vec![(2, Some(1))]);
        // Its arrival is measured from its lease, in round 0.
        assert_eq!(s.arrivals().of(w(2)), &[70]);
        assert!(s.lease_view(2).is_some_and(|v| v.submitted));
        let effects = s.tick(80, 7, &[accepted(1, 3), accepted(3, 4)]);
        assert!(effects.contains(&Effect::Aggregate {
            round: 1,
            base_version: 1,
            accepted: 3,
        }));
        assert_eq!(s.round_updates(), vec![2, 3, 4]);
        s.tick(80, 7, &[aggregated(1, 2)]);
        assert_eq!(late(&s), vec![]);

        // Round 2: unit 6 is still leased when the round closes, and never sent.
        s.tick(90, 7, &[lease(1), lease(2)]);
        s.tick(150, 7, &[accepted(1, 5)]);
        s.tick(150, 7, &[aggregated(2, 3)]);
        assert_eq!(late(&s), vec![(6, None)]);
        let effects = s.tick(190, 7, &[]);
        assert!(effects.contains(&Effect::LeaseExpired {
            worker: w(2),
            unit: 6
        }));
        assert_eq!(late(&s), vec![]);

        // With staleness 0, a closing round keeps no late lease.
        let mut s = Scheduler::new(
            ScheduleConfig {
                max_staleness: 0,
                ..config
            },
            0,
        );
        s.tick(0, 7, &[lease(1), lease(2)]);
        s.tick(60, 7, &[accepted(1, 1)]);
        s.tick(60, 7, &[aggregated(0, 1)]);
        assert_eq!(late(&s), vec![]);
        assert_eq!(s.lease_view(2), None);
    }

    #[test]
    fn a_timed_out_round_aggregates_with_min_updates() {
        use Event::*;
        check(
            &[
                (
                    0,
                    vec![LeaseRequest {
                        worker: w(1),
                        expected_ms: None,
                        steps_max: None,
                    }],
                ),
                (
                    90,
                    vec![UpdateAccepted {
                        worker: w(1),
                        unit: 1,
                    }],
                ),
                (999, vec![]),
                (1000, vec![]),
            ],
            expect_test::expect![[r#"
                t=0: round 0 starts on v0
                t=0: lease unit 1 (round 0, base v0, shard 0, offset 0) to w1 until 100
                t=1000: aggregate round 0 on v0 (1 updates)
            "#]],
        );
    }

    #[test]
    fn state_survives_a_restart() {
        let mut s = Scheduler::new(config(), 0);
        s.tick(
            0,
            7,
            &[
                Event::LeaseRequest {
                    worker: w(1),
                    expected_ms: None,
                    steps_max: None,
                },
                Event::LeaseRequest {
                    worker: w(2),
                    expected_ms: None,
                    steps_max: None,
                },
            ],
        );
        s.tick(
            5,
            7,
            &[Event::UpdateAccepted {
                worker: w(1),
                unit: 1,
            }],
        );
        let saved = serde_json::to_string(&s).expect("serialize");
        let mut restored: Scheduler = serde_json::from_str(&saved).expect("deserialize");
        assert_eq!(restored, s);
        assert_eq!(restored.lease_view(1).map(|l| l.submitted), Some(true));
        let a = s.tick(
            6,
            7,
            &[Event::UpdateAccepted {
                worker: w(2),
                unit: 2,
            }],
        );
        let b = restored.tick(
            6,
            7,
            &[Event::UpdateAccepted {
                worker: w(2),
                unit: 2,
            }],
        );
        assert_eq!(a, b);
    }

    /// The state as the scheduler before `protocol::WorkUnit` stored it (written by that
    /// code): a round with a leased, a queued and a refused unit, and a late lease.
    const STORED_STATE: &str = r#"{"config":{"units_per_round":2,"min_updates":1,"round_timeout_ms":100,"lease_ms":500,"lease_max_ms":1200000,"steps_per_unit":10,"inner_lr":0.002,"lr_decay_rounds":0,"n_shards":4,"max_staleness":1},"round":1,"version":1,"round_started_ms":101,"aggregating":false,"next_unit_id":5,"shard_offsets":[10,10,10,10],"units":{"3":[{"id":3,"round":1,"base_version":1,"address":{"shard":2,"offset":0,"steps":10,"seed":16753576447339095367},"lr":0.002},{"Leased":{"worker":[4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4],"deadline_ms":602,"hard_deadline_ms":1200102}}],"4":[{"id":4,"round":1,"base_version":1,"address":{"shard":3,"offset":0,"steps":10,"seed":4854513374406671322},"lr":0.002},"Queued"]},"refused":{"3":[[3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3]]},"late":{"2":{"unit":{"id":2,"round":0,"base_version":0,"address":{"shard":1,"offset":0,"steps":10,"seed":1988111358474182198},"lr":0.002},"worker":[2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2],"deadline_ms":500,"hard_deadline_ms":1200000,"accepted_in":null}},"overdue":[]}"#;

    #[test]
    fn a_state_stored_by_earlier_code_resumes() {
        let config = ScheduleConfig {
            round_timeout_ms: 100,
            lease_ms: 500,
            ..config()
        };
        let mut s = Scheduler::new(config, 0);
        let lease = |n| Event::LeaseRequest {
            worker: w(n),
            expected_ms: None,
            steps_max: None,
        };
        let accepted = Event::UpdateAccepted {
            worker: w(1),
            unit: 1,
        };
        let aggregated = Event::Aggregated {
            round: 0,
            version: 1,
        };
        let refused = Event::UpdateRefused {
            worker: w(3),
            unit: 3,
        };
        s.tick(0, 7, &[lease(1), lease(2)]);
        s.tick(5, 7, &[accepted]);
        s.tick(100, 7, &[]);
        s.tick(101, 7, &[aggregated]);
        s.tick(102, 7, &[lease(3), refused, lease(4)]);

        // What that code did not keep: when leases began and units were queued, the
        // arrivals measured, the slack and unit sizing (their defaults).
        assert_eq!(s.arrivals.of(w(1)), &[5]);
        s.arrivals = Arrivals::default();
        s.queued_ms.clear();
        for (_, status) in s.units.values_mut() {
            if let UnitStatus::Leased { leased_ms, .. } = status {
                *leased_ms = None;
            }
        }
        for late in s.late.values_mut() {
            late.leased_ms = None;
        }
        let mut stored: Scheduler = serde_json::from_str(STORED_STATE).expect("deserialize");
        assert_eq!(stored, s);
        assert_eq!(
            serde_json::to_string(&s).expect("serialize"),
            STORED_STATE.replacen(
                r#""max_staleness":1}"#,
                r#""max_staleness":1,"slack":3.0,"unit_ms":0,"steps_min_per_unit":0,"steps_max_per_unit":0}"#,
                1
            )
        );
        // A lease stored without its start is not measured when its update arrives.
        stored.tick(
            300,
            7,
            &[Event::UpdateAccepted {
                worker: w(4),
                unit: 3,
            }],
        );
        assert_eq!(stored.arrivals.len(), 0);
    }

    /// Deadlines config: `lease_ms` 100, `lease_max_ms` 1000, slack 3, and rounds that
    /// neither fill nor time out while `check_hard_deadline` runs.
    fn deadline_config() -> ScheduleConfig {
        ScheduleConfig {
            units_per_round: 32,
            round_timeout_ms: 1_000_000,
            lease_max_ms: 1000,
            slack: 3.0,
            ..config()
        }
    }

    /// A worker whose earlier units arrived `arrivals` ms after their lease (one after
    /// another, heartbeats keeping each lease), and that reports units take it `reported_ms`, gets a lease whose hard
    /// deadline is `want_ms` after it began.
    #[track_caller]
    fn check_hard_deadline(arrivals: &[u64], reported_ms: Option<u64>, want_ms: u64) {
        let mut s = Scheduler::new(deadline_config(), 0);
        let mut now = 0;
        let leased = |s: &Scheduler| {
            s.units().find_map(|(u, status)| match *status {
                UnitStatus::Leased {
                    hard_deadline_ms,
                    leased_ms,
                    ..
                } => Some((u.id, hard_deadline_ms, leased_ms)),
                _ => None,
            })
        };
        for &arrival in arrivals {
            s.tick(
                now,
                7,
                &[Event::LeaseRequest {
                    worker: w(1),
                    expected_ms: reported_ms,
                    steps_max: None,
                }],
            );
            let (unit, _, _) = leased(&s).expect("a lease");
            // Heartbeats keep the lease while the unit trains.
            let arrived = now + arrival;
            while now + 50 < arrived {
                now += 50;
                s.tick(now, 7, &[Event::Heartbeat { worker: w(1), unit }]);
            }
            now = arrived;
            let effects = s.tick(now, 7, &[Event::UpdateAccepted { worker: w(1), unit }]);
            assert!(effects.is_empty(), "{effects:?}");
            assert_eq!(leased(&s), None, "unit {unit} accepted");
        }
        s.tick(
            now,
            7,
            &[Event::LeaseRequest {
                worker: w(1),
                expected_ms: reported_ms,
                steps_max: None,
            }],
        );
        let (_, hard_deadline_ms, leased_ms) = leased(&s).expect("a lease");
        assert_eq!(leased_ms, Some(now));
        assert_eq!(hard_deadline_ms - now, want_ms, "after {arrivals:?}");
    }

    #[test]
    fn a_hard_deadline_follows_what_the_unit_is_expected_to_take() {
        // Nothing known: the longest lease, as before deadlines were measured.
        check_hard_deadline(&[], None, 1000);
        // A reported speed: slack times it, within lease_ms and lease_max_ms.
        check_hard_deadline(&[], Some(200), 600);
        check_hard_deadline(&[], Some(10), 100);
        check_hard_deadline(&[], Some(0), 100);
        check_hard_deadline(&[], Some(500), 1000);
        check_hard_deadline(&[], Some(u64::MAX), 1000);
        // Measured arrivals win over the report: the slowest of them.
        check_hard_deadline(&[50], Some(300), 150);
        check_hard_deadline(&[50, 120, 80], Some(10), 360);
        check_hard_deadline(&[40, 50], None, 150);
        check_hard_deadline(&[900], None, 1000);
        // Only the last eight count: the slow first one has aged out.
        check_hard_deadline(&[300, 20, 20, 20, 20, 20, 20, 20, 20], None, 100);
        check_hard_deadline(&[300, 20, 20, 20, 20, 20, 20, 20], None, 900);
    }

    /// Sizing on: base units of 10 steps, 1 s a unit, 2 to 40 steps.
    fn sized_config() -> ScheduleConfig {
        ScheduleConfig {
            units_per_round: 4,
            lease_ms: 100,
            lease_max_ms: 100_000,
            round_timeout_ms: 1_000_000,
            unit_ms: 1_000,
            steps_min_per_unit: 2,
            steps_max_per_unit: 40,
            ..config()
        }
    }

    #[track_caller]
    fn check_unit_steps(config: &ScheduleConfig, expected_ms: Option<u64>, want: u32) {
        assert_eq!(config.unit_steps(expected_ms), want, "{expected_ms:?}");
    }

    #[test]
    fn a_unit_takes_the_steps_its_worker_trains_in_unit_ms() {
        let sized = sized_config();
        check_unit_steps(&sized, None, 10); // unknown: a base unit
        check_unit_steps(&sized, Some(1_000), 10); // 100 ms a step
        check_unit_steps(&sized, Some(400), 25); // 40 ms a step
        check_unit_steps(&sized, Some(300), 33); // 30 ms: floor
        check_unit_steps(&sized, Some(100), 40); // 10 ms: 100 steps, the most
        check_unit_steps(&sized, Some(0), 40);
        check_unit_steps(&sized, Some(4_000), 2); // 400 ms: 2.5 steps
        check_unit_steps(&sized, Some(1_000_000), 2); // the fewest
        check_unit_steps(&sized, Some(u64::MAX), 2);
        // Off: every unit a base unit whatever the speed.
        let off = ScheduleConfig {
            unit_ms: 0,
            ..sized
        };
        check_unit_steps(&off, Some(100), 10);
        check_unit_steps(&off, Some(u64::MAX), 10);
        // The bounds' zeros: a quarter and four times the base unit.
        let default_bounds = ScheduleConfig {
            steps_min_per_unit: 0,
            steps_max_per_unit: 0,
            ..sized
        };
        assert_eq!(default_bounds.unit_steps_bounds(), (2, 40));
        let one = ScheduleConfig {
            steps_per_unit: 1,
            ..default_bounds
        };
        assert_eq!(one.unit_steps_bounds(), (1, 4));
        // A minimum above the maximum gives way to it.
        let crossed = ScheduleConfig {
            steps_min_per_unit: 50,
            ..sized
        };
        assert_eq!(crossed.unit_steps_bounds(), (40, 40));
    }

    /// The leases of a sized run as (worker, unit, steps, hard deadline after the lease).
    #[track_caller]
    fn sized_leases(s: &mut Scheduler, now: u64, events: &[Event]) -> Vec<(u8, u64, u32, u64)> {
        s.tick(now, 7, events);
        s.units()
            .filter_map(|(u, status)| match *status {
                UnitStatus::Leased {
                    worker,
                    hard_deadline_ms,
                    leased_ms: Some(leased_ms),
                    ..
                } if leased_ms == now => Some((
                    worker.0[0],
                    u.id,
                    u.address.steps,
                    hard_deadline_ms - leased_ms,
                )),
                _ => None,
            })
            .collect()
    }

    /// A GPU rig, a laptop and a worker that reported nothing each get a unit sized for
    /// them, with a hard deadline of `slack` times what that unit takes them; a unit
    /// queued again keeps its size and data whoever takes it; the next unit of a fast
    /// worker is sized from its measured arrivals.
    #[test]
    fn units_are_sized_for_the_worker_they_are_first_leased_to() {
        let mut s = Scheduler::new(sized_config(), 0);
        let lease = |n, expected_ms| Event::LeaseRequest {
            worker: w(n),
            expected_ms,
            steps_max: None,
        };
        let hb = |n, unit| Event::Heartbeat { worker: w(n), unit };
        // w1 trains a base unit in 100 ms (40 steps, 400 ms, hard deadline 1.2 s);
        // w2 in 4 s (2 steps, 800 ms: 2.4 s); w3 reported nothing (10 steps, the longest
        // lease).
        let leases = sized_leases(
            &mut s,
            0,
            &[lease(1, Some(100)), lease(2, Some(4_000)), lease(3, None)],
        );
        assert_eq!(
            leases,
            [(1, 1, 40, 1_200), (2, 2, 2, 2_400), (3, 3, 10, 100_000)]
        );
        let first = *s.unit(1).expect("unit 1");
        // w1 stalls: its lease expires (no heartbeat) and w2, whose 2 steps arrived after
        // 200 ms (1 s a base unit, measured, over its report), takes the same 40 steps,
        // with the deadline they take it (4 s, times 3).
        s.tick(50, 7, &[hb(2, 2), hb(3, 3)]);
        s.tick(140, 7, &[hb(2, 2), hb(3, 3)]);
        let leases = sized_leases(
            &mut s,
            200,
            &[
                Event::UpdateAccepted {
                    worker: w(2),
                    unit: 2,
                },
                lease(2, Some(4_000)),
            ],
        );
        assert_eq!(leases, [(2, 1, 40, 12_000)]);
        assert_eq!(s.unit(1), Some(&first), "the same data");
        for now in [230, 320, 410] {
            s.tick(now, 7, &[hb(2, 1), hb(3, 3)]);
        }
        // w3's 10-step unit arrives after 500 ms: its next unit is sized from that pace
        // (50 ms a step: 20 steps, 1 s, hard deadline 3 s), not from its silence.
        let leases = sized_leases(
            &mut s,
            500,
            &[
                Event::UpdateAccepted {
                    worker: w(3),
                    unit: 3,
                },
                lease(3, None),
            ],
        );
        assert_eq!(leases, [(3, 4, 20, 3_000)]);
        assert_eq!(s.arrivals().of(w(3)), &[500]);
        // w2's 2-step unit took 200 ms: 1 s for a base unit.
        assert_eq!(s.arrivals().of(w(2)), &[1_000]);
        // The stream of each shard moved past its sized unit.
        let stored: serde_json::Value = serde_json::to_value(&s).expect("state");
        assert_eq!(stored["shard_offsets"], serde_json::json!([40, 10, 10, 20]));
        assert_eq!(stored["sized"], serde_json::json!([1, 2, 3, 4]));
    }

    /// The driver's bound on a worker's units (a GPU's, that a CPU must be able to
    /// re-run) caps its sizing, even below the run's fewest steps.
    #[test]
    fn a_drivers_bound_caps_a_sized_unit() {
        for (steps_max, want) in [(None, 40), (Some(25), 25), (Some(1), 1), (Some(0), 1)] {
            let mut s = Scheduler::new(sized_config(), 0);
            let request = Event::LeaseRequest {
                worker: w(1),
                expected_ms: Some(100),
                steps_max,
            };
            let leases = sized_leases(&mut s, 0, &[request]);
            // Slack 3 times 10 ms a step, at least the 100 ms lease.
            let hard = (30 * want as u64).max(100);
            assert_eq!(leases, [(1, 1, want, hard)], "{steps_max:?}");
        }
    }

    #[test]
    fn the_slack_counts_as_at_least_one() {
        let hard = |slack: f64, expected_ms| {
            ScheduleConfig {
                slack,
                ..deadline_config()
            }
            .hard_lease_ms(expected_ms)
        };
        assert_eq!(hard(3.0, Some(200)), 600);
        assert_eq!(hard(1.0, Some(200)), 200);
        assert_eq!(hard(0.5, Some(200)), 200);
        assert_eq!(hard(f64::NAN, Some(200)), 200);
        assert_eq!(hard(f64::INFINITY, Some(200)), 1000);
        assert_eq!(hard(f64::INFINITY, Some(0)), 100);
        assert_eq!(hard(3.0, None), 1000);
        // A config with lease_max_ms below lease_ms (refused by the coordinator's
        // config check) still gives the cap, not a panic.
        let inverted = ScheduleConfig {
            lease_ms: 2000,
            ..deadline_config()
        };
        assert_eq!(inverted.hard_lease_ms(Some(200)), 1000);
    }

    /// A worker measured fast gets a short hard deadline: heartbeats renew its lease up
    /// to it, and then the unit goes to someone else.
    #[test]
    fn heartbeats_stop_at_a_measured_deadline() {
        use Event::*;
        let hb = |unit| Heartbeat { worker: w(1), unit };
        check_with(
            deadline_config(),
            &[
                (
                    0,
                    vec![LeaseRequest {
                        worker: w(1),
                        expected_ms: Some(500),
                        steps_max: None,
                    }],
                ),
                (
                    40,
                    vec![
                        UpdateAccepted {
                            worker: w(1),
                            unit: 1,
                        },
                        LeaseRequest {
                            worker: w(1),
                            expected_ms: Some(500),
                            steps_max: None,
                        },
                    ],
                ),
                (100, vec![hb(2)]),
                (140, vec![hb(2)]),
                (
                    160,
                    vec![LeaseRequest {
                        worker: w(2),
                        expected_ms: None,
                        steps_max: None,
                    }],
                ),
            ],
            expect_test::expect![[r#"
                t=0: round 0 starts on v0
                t=0: lease unit 1 (round 0, base v0, shard 0, offset 0) to w1 until 100
                t=40: lease unit 2 (round 0, base v0, shard 1, offset 0) to w1 until 140
                t=160: lease of unit 2 by w1 is overdue
                t=160: lease unit 2 (round 0, base v0, shard 1, offset 0) to w2 until 260
            "#]],
        );
    }

    /// A lease whose hard deadline is its first (a worker measured fast) cannot be
    /// renewed; when it ends, it expires rather than goes overdue, and its holder may
    /// take a unit again.
    #[test]
    fn a_lease_that_could_not_be_renewed_expires() {
        use Event::*;
        let fast = LeaseRequest {
            worker: w(3),
            expected_ms: Some(1),
            steps_max: None,
        };
        check_with(
            deadline_config(),
            &[
                (0, vec![fast]),
                (
                    50,
                    vec![Heartbeat {
                        worker: w(3),
                        unit: 1,
                    }],
                ),
                (100, vec![fast]),
            ],
            expect_test::expect![[r#"
                t=0: round 0 starts on v0
                t=0: lease unit 1 (round 0, base v0, shard 0, offset 0) to w3 until 100
                t=100: lease of unit 1 by w3 expired
                t=100: lease unit 1 (round 0, base v0, shard 0, offset 0) to w3 until 200
            "#]],
        );
    }

    #[test]
    fn arrivals_are_bounded() {
        let id = |n: usize| {
            let mut bytes = [0; 32];
            bytes[..8].copy_from_slice(&(n as u64).to_le_bytes());
            WorkerId(bytes)
        };
        let mut arrivals = Arrivals::default();
        for n in 0..ARRIVALS_PER_WORKER_MAX + 3 {
            arrivals.record(id(0), 0, n as u64, 1, 1);
        }
        let kept: Vec<u64> = (3..ARRIVALS_PER_WORKER_MAX as u64 + 3).collect();
        assert_eq!(arrivals.of(id(0)), kept.as_slice());
        // Workers past the bound replace the one heard from longest ago: worker 0 (last
        // at t=10) survives a stream of newer workers only while it is not the oldest.
        arrivals.record(id(0), 0, 1_000_000, 1, 1);
        for n in 1..=ARRIVAL_WORKERS_MAX {
            arrivals.record(id(n), 0, 100 + n as u64, 1, 1);
        }
        assert_eq!(arrivals.len(), ARRIVAL_WORKERS_MAX);
        assert_eq!(arrivals.of(id(1)), &[] as &[u64]);
        assert_eq!(arrivals.of(id(0)).len(), ARRIVALS_PER_WORKER_MAX);
        assert_eq!(arrivals.of(id(2)), &[102]);
        let state = serde_json::to_string(&arrivals).expect("serialize");
        let back: Arrivals = serde_json::from_str(&state).expect("deserialize");
        assert_eq!(back, arrivals);
    }

    #[test]
    fn same_seed_same_units() {
        let units = |seed| {
            let mut s = Scheduler::new(config(), 0);
            s.tick(0, seed, &[]);
            s.units().map(|(u, _)| u.address).collect::<Vec<_>>()
        };
        assert_eq!(units(1), units(1));
        assert_ne!(units(1), units(2));
    }
}
