//! The whole network in one process, from one seed: the real coordinator core
//! ([`runner::Core`], with its SQLite store, validation, scoring, spot-checks,
//! aggregation and ledger) driven on a simulated clock by N simulated workers. Honest
//! workers train the tiny model for real through `worker::unit::train`, the function real
//! workers use; attackers send what their [`Attack`] crafts, signed with their own keys.
//! Faults come from the same seed: workers that leave holding a lease (churn), replies
//! after the lease's deadline, duplicate submissions and lost ones. A validator re-runs
//! the units the core samples, taking the simulated time of one unit per check.
//!
//! The same [`Scenario`] gives the same [`Report`], bit for bit.

pub mod matrix;

use std::collections::BTreeMap;
use std::path::Path;

use ed25519_dalek::SigningKey;
use engine::{Backend, Purpose};
use protocol::api::LeaseReply;
use protocol::{UpdateHeader, WorkAddress, WorkUnit, WorkerId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use runner::{CoordinatorConfig, Core};
use serde::Serialize;
use store::CheckState;

/// What a dishonest worker does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attack {
    /// Trains, then sends its delta times -5: the sign-flipping attack of Li et al.
    /// ("RSA", 2019, which used -4), at the smallest whole factor with which a fifth of
    /// the workers turns the mean around (at -4 it only stands still: 0.8 - 0.2 x 4 = 0).
    SignFlip,
    /// Trains, then sends the delta times 100.
    #[serde(rename = "scale_100")]
    Scale100,
    /// Sends Gaussian noise of an honest update's norm, without training.
    Noise,
    /// "A little is enough" (Baruch et al., 2019): the honest deltas' mean minus one
    /// standard deviation, per coordinate.
    Alie,
    /// Inner product manipulation: minus twice the honest deltas' mean.
    Ipm,
    /// A delta holding NaN.
    #[serde(rename = "nan")]
    NaN,
    /// The zero delta, claiming the credit.
    Zero,
    /// Another worker's latest update, slightly perturbed so that it is not byte-equal.
    Copy,
    /// Its own first (honest) update, sent again for every later unit.
    ReplayOld,
    /// Colluding keys that all send the same crafted delta: minus 5 times the honest
    /// deltas' mean, enough for two keys among ten to turn the mean around.
    Sybil,
    /// Honest for 10 units, then 30% of units trained on a quarter of the steps.
    HonestThenLying,
}

impl Attack {
    pub const ALL: [Attack; 11] = [
        Attack::SignFlip,
        Attack::Scale100,
        Attack::Noise,
        Attack::Alie,
        Attack::Ipm,
        Attack::NaN,
        Attack::Zero,
        Attack::Copy,
        Attack::ReplayOld,
        Attack::Sybil,
        Attack::HonestThenLying,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Attack::SignFlip => "sign_flip",
            Attack::Scale100 => "scale_100",
            Attack::Noise => "noise",
            Attack::Alie => "alie",
            Attack::Ipm => "ipm",
            Attack::NaN => "nan",
            Attack::Zero => "zero",
            Attack::Copy => "copy",
            Attack::ReplayOld => "replay_old",
            Attack::Sybil => "sybil",
            Attack::HonestThenLying => "honest_then_lying",
        }
    }

    pub fn from_name(name: &str) -> Option<Attack> {
        Attack::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Free riders claim credit for work they did not do.
    pub fn free_rider(self) -> bool {
        matches!(
            self,
            Attack::Zero | Attack::Noise | Attack::Copy | Attack::ReplayOld
        )
    }

    /// Attacks after credit rather than the model: the free riders and the lazy lies of
    /// honest-then-lying workers. What they take shows in the credit the plain mean pays
    /// them; what the other attacks take shows in the plain mean's loss.
    pub fn steals_credit(self) -> bool {
        self.free_rider() || self == Attack::HonestThenLying
    }
}

/// Probabilities of faults, per unit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Faults {
    /// The worker leaves holding its lease and comes back later.
    pub churn: f64,
    /// The reply comes after the lease's deadline.
    pub late: f64,
    /// The update is sent twice.
    pub duplicate: f64,
    /// The update is lost on the way.
    pub drop: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            churn: 0.03,
            late: 0.02,
            duplicate: 0.03,
            drop: 0.02,
        }
    }
}

/// How the coordinator defends itself.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Defense {
    /// The coordinator as configured: scoring, spot-checks, norm bounds, and `combine`.
    Full(aggregation::Combine),
    /// The plain weighted mean of every well-formed update (the FedAvg family's
    /// aggregation), with no scoring, no spot-checks and no norm bounds: the baseline
    /// that shows an attack bites.
    Plain,
}

/// One simulated run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scenario {
    pub seed: u64,
    pub honest: usize,
    /// The attack and how many workers make it.
    pub attack: Option<(Attack, usize)>,
    /// Model versions to train.
    pub rounds: u64,
    /// Local steps per unit (H).
    pub steps: u32,
    pub defense: Defense,
    /// Score updates (off: a defended run relies on the checks, re-runs and `combine`).
    pub scoring: bool,
    pub faults: Faults,
}

impl Scenario {
    /// A run of `honest` honest workers with `attackers` making `attack` (or none).
    pub fn new(seed: u64, honest: usize, attack: Option<(Attack, usize)>) -> Scenario {
        Scenario {
            seed,
            honest,
            attack,
            rounds: 12,
            steps: 10,
            defense: Defense::Full(CoordinatorConfig::default().combine),
            scoring: true,
            faults: Faults::default(),
        }
    }
}

/// Counts over one class of workers' updates: the honest workers' all, the attackers'
/// lies (an attacker's honest work, such as the first unit whose update a replayer sends
/// again, is counted apart in `honest_work`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Tally {
    pub workers: usize,
    /// Updates that reached the coordinator (duplicates not counted twice).
    pub submitted: u64,
    pub accepted: u64,
    /// Rejected by validation, by code.
    pub rejected: BTreeMap<String, u64>,
    /// Accepted, later found false by a re-run.
    pub failed_checks: u64,
    /// Accepted and never clawed back.
    pub credited: u64,
    /// Micro-credits held at the end (honest work's credit included).
    pub balance: u64,
    /// Units of honest work done by attackers, and how many were credited.
    pub honest_work: (u64, u64),
}

impl Tally {
    fn rejected_with(&self, codes: &[&str]) -> u64 {
        codes
            .iter()
            .map(|c| self.rejected.get(*c).copied().unwrap_or(0))
            .sum()
    }

    /// Rejections that judge the update itself (not its timing or its lease).
    pub fn judged_false(&self) -> u64 {
        self.rejected_with(JUDGED) + self.failed_checks
    }
}

/// Rejection codes that judge an update's content.
const JUDGED: &[&str] = &[
    "no_progress",
    "harmful",
    "not_own_data",
    "copied",
    "norm_outlier",
    "norm_too_large",
    "non_finite",
    "wrong_shape",
];

/// What a run gives.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub initial_loss: f32,
    pub final_loss: f32,
    pub versions: u64,
    pub honest: Tally,
    pub attackers: Tally,
    /// Lies of honest-then-lying workers that reached the coordinator, and how many of
    /// those were caught (refused on their content, or clawed back after a re-run) by
    /// the end.
    pub lies: u64,
    pub lies_caught: u64,
    /// Honest units accepted while their worker was trusted, and how many were re-run.
    pub trusted_units: u64,
    pub trusted_checks: u64,
    /// Re-runs done by the validator.
    pub checks: u64,
    /// Simulated seconds.
    pub sim_seconds: f64,
}

impl Report {
    /// The run's seed, for a failing check to print.
    pub fn seed(&self) -> u64 {
        self.scenario.seed
    }
}

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Core(#[from] runner::CoreError),
    #[error("the coordinator failed: {0}")]
    Run(#[from] run::RunError),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Worker(#[from] worker::WorkerError),
    #[error(
        "the run of seed {seed} did not reach {rounds} versions in {sim_seconds} simulated seconds"
    )]
    Stalled {
        seed: u64,
        rounds: u64,
        sim_seconds: u64,
    },
}

/// A submission that reached the coordinator.
struct Submission {
    unit: u64,
    /// The update is the unit's honest training.
    honest_work: bool,
    /// Accepted, or refused with this code.
    outcome: Result<(), String>,
}

/// Simulated milliseconds a nominal worker takes for one unit.
const UNIT_MS: u64 = 10_000;
const START_MS: u64 = 1_700_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Honest,
    Attacker(Attack),
}

enum State {
    Idle {
        at: u64,
    },
    Busy {
        at: u64,
        unit: u64,
        update: Vec<u8>,
        honest_work: bool,
    },
    Away {
        until: u64,
    },
}

impl State {
    fn at(&self) -> u64 {
        match self {
            State::Idle { at } | State::Busy { at, .. } => *at,
            State::Away { until } => *until,
        }
    }
}

struct SimWorker {
    key: SigningKey,
    id: WorkerId,
    role: Role,
    /// Multiplies the nominal unit time.
    speed: f64,
    state: State,
    units: u32,
    first_delta: Option<Vec<f32>>,
}

/// The coordinator's config for a scenario: the tiny model on `corpus`.
pub fn config(scenario: &Scenario, corpus: &Path, tokenizer: &Path) -> CoordinatorConfig {
    let workers = scenario.honest + scenario.attack.map_or(0, |(_, n)| n);
    let mut c = CoordinatorConfig {
        preset: "tiny".into(),
        seed: scenario.seed,
        corpus: corpus.to_owned(),
        tokenizer: tokenizer.to_owned(),
        batch: 4,
        seq: 32,
        holdout_batches: 16,
        devices: runner::config::DevicesConfig {
            holdout: "cpu:1".into(),
            ..Default::default()
        },
        ..CoordinatorConfig::default()
    };
    let s = &mut c.schedule;
    s.units_per_round = workers as u32;
    s.min_updates = (workers as u32 / 2).max(1);
    s.steps_per_unit = scenario.steps;
    s.inner_lr = 3e-3;
    s.n_shards = 8;
    s.lease_ms = 3 * UNIT_MS;
    s.round_timeout_ms = 4 * UNIT_MS;
    match scenario.defense {
        Defense::Full(combine) => {
            c.combine = combine;
            c.scoring.enabled = scenario.scoring;
        }
        Defense::Plain => {
            c.combine = aggregation::Combine::Mean;
            c.scoring.enabled = false;
            c.spot_check.enabled = false;
            c.unchecked_values = true;
        }
    }
    c
}

/// Runs `scenario` with its store in `dir` (a fresh directory).
pub fn run(
    scenario: &Scenario,
    dir: &Path,
    corpus: &Path,
    tokenizer: &Path,
) -> Result<Report, SimError> {
    let config = config(scenario, corpus, tokenizer);
    let codec = config.codec;
    let faults = scenario.faults;
    let mut rng = ChaCha8Rng::seed_from_u64(scenario.seed);
    let mut now = START_MS;
    let mut core = Core::open(dir, config, now)?;
    let initial_loss = core.holdout_loss()?;
    let info = core.run_info();
    let train = core.train_examples();
    let model = core.run_model().clone();
    let open = || model.open_empty("cpu:1", Purpose::Train);
    let mut backend = open()?;
    let mut checker = open()?;
    let data = worker::unit::UnitData {
        train: &train,
        n_shards: info.n_shards,
        batch: info.batch as usize,
        seq: info.seq as usize,
    };

    let mut workers = Vec::new();
    let roles = std::iter::repeat_n(Role::Honest, scenario.honest).chain(
        scenario
            .attack
            .into_iter()
            .flat_map(|(a, n)| std::iter::repeat_n(Role::Attacker(a), n)),
    );
    for (i, role) in roles.enumerate() {
        let seed: [u8; 32] =
            *blake3::hash(format!("sim {} {i}", scenario.seed).as_bytes()).as_bytes();
        let key = SigningKey::from_bytes(&seed);
        let id = WorkerId::of(&key);
        // Every simulated worker runs on this machine, so it reports this CPU's class
        // (the checker's): its units are re-run bit for bit, as honest workers' are.
        let machine = protocol::api::Machine {
            device: "simulated".into(),
            class: engine::cpu_class(),
            tokens_per_s: 1_000.0,
        };
        core.register(id, &format!("w{i}"), Some(&machine), now)?;
        workers.push(SimWorker {
            key,
            id,
            role,
            speed: rng.random_range(0.6..1.6),
            state: State::Idle {
                at: now + rng.random_range(0..1_000),
            },
            units: 0,
            first_delta: None,
        });
    }
    // Attackers make their update from the honest deltas of the base version.
    let mut honest_pool: (u64, Vec<Vec<f32>>) = (u64::MAX, Vec::new());
    let mut sybil_vector: Option<(u64, Vec<f32>)> = None;
    let mut last_honest: Option<Vec<f32>> = None;
    let mut validator: Option<(u64, u64, Vec<f32>)> = None;
    let mut trusted_units: Vec<u64> = Vec::new();
    let mut submitted: BTreeMap<WorkerId, Vec<Submission>> = BTreeMap::new();
    let mut checks = 0u64;
    let limit = now + scenario.rounds * 40 * UNIT_MS;

    while core.version() < scenario.rounds {
        // The next event: a worker's or the validator's, earliest first (ties: lowest index).
        let (wi, wt) = workers
            .iter()
            .enumerate()
            .map(|(i, w)| (i, w.state.at()))
            .min_by_key(|&(i, t)| (t, i))
            .unwrap_or((0, now));
        if let Some((done, unit, _)) = &validator
            && *done <= wt
        {
            now = now.max(*done);
            let unit = *unit;
            if let Some((_, _, replayed)) = validator.take() {
                core.finish_check(unit, &replayed, now)?;
            }
            continue;
        }
        now = now.max(wt);
        if now > limit {
            return Err(SimError::Stalled {
                seed: scenario.seed,
                rounds: scenario.rounds,
                sim_seconds: (now - START_MS) / 1000,
            });
        }
        if validator.is_none()
            && let Some(job) = core.next_check()?
        {
            let replayed = job.run(checker.as_mut())?;
            checks += 1;
            validator = Some((now + UNIT_MS, job.unit.id, replayed));
        }
        let w = &mut workers[wi];
        match std::mem::replace(&mut w.state, State::Idle { at: now }) {
            State::Away { until } => w.state = State::Idle { at: until },
            State::Idle { .. } => match core.lease(w.id, now)? {
                LeaseReply::NoWork { retry_after_ms } => {
                    w.state = State::Idle {
                        at: now + retry_after_ms.clamp(500, UNIT_MS),
                    };
                }
                LeaseReply::Lease { unit, .. } => {
                    if rng.random_bool(faults.churn) {
                        w.state = State::Away {
                            until: now + 4 * UNIT_MS,
                        };
                        continue;
                    }
                    let version = core.version();
                    if unit.base_version != version {
                        return Err(SimError::Failed(format!(
                            "unit {} was leased on version {} while the model is at {version}",
                            unit.id, unit.base_version
                        )));
                    }
                    let base = core.params().to_vec();
                    if honest_pool.0 != version {
                        honest_pool = (version, Vec::new());
                    }
                    let mut honest_work = false;
                    let delta = match w.role {
                        Role::Honest => {
                            let d = train_unit(backend.as_mut(), &base, data, &unit)?;
                            honest_pool.1.push(d.clone());
                            last_honest = Some(d.clone());
                            if core.trust(w.id).verified >= 10 {
                                trusted_units.push(unit.id);
                            }
                            honest_work = true;
                            d
                        }
                        Role::Attacker(attack) => {
                            let mut ctx = Craft {
                                backend: backend.as_mut(),
                                base: &base,
                                data,
                                unit: &unit,
                                pool: &honest_pool.1,
                                last_honest: last_honest.as_deref(),
                                rng: &mut rng,
                            };
                            match attack {
                                Attack::Sybil => match &sybil_vector {
                                    Some((v, d)) if *v == version => d.clone(),
                                    _ => {
                                        let d = ctx.craft(attack, w)?;
                                        sybil_vector = Some((version, d.clone()));
                                        d
                                    }
                                },
                                Attack::HonestThenLying => {
                                    if w.units >= 10 && ctx.rng.random_bool(0.3) {
                                        let lazy = WorkUnit {
                                            address: WorkAddress {
                                                steps: (unit.address.steps / 4).max(1),
                                                ..unit.address
                                            },
                                            ..unit
                                        };
                                        train_unit(ctx.backend, &base, data, &lazy)?
                                    } else {
                                        honest_work = true;
                                        train_unit(ctx.backend, &base, data, &unit)?
                                    }
                                }
                                Attack::ReplayOld if w.first_delta.is_none() => {
                                    // Its first unit is honest work, kept to be sent again.
                                    honest_work = true;
                                    ctx.craft(attack, w)?
                                }
                                _ => ctx.craft(attack, w)?,
                            }
                        }
                    };
                    w.units += 1;
                    let header = UpdateHeader {
                        work_unit: unit.id,
                        base_version: unit.base_version,
                        worker: w.id,
                        nonce: rng.random(),
                        codec,
                        n_params: model.spec.trainable_len() as u32,
                    };
                    let update = encode(&header, &delta, w.role, &w.key);
                    let mut took = (UNIT_MS as f64 * w.speed) as u64;
                    if rng.random_bool(faults.late) {
                        took += 4 * UNIT_MS;
                    }
                    w.state = State::Busy {
                        at: now + took,
                        unit: unit.id,
                        update,
                        honest_work,
                    };
                }
            },
            State::Busy {
                unit,
                update,
                honest_work,
                ..
            } => {
                w.state = State::Idle { at: now + 100 };
                if rng.random_bool(faults.drop) {
                    continue;
                }
                let copies = if rng.random_bool(faults.duplicate) {
                    2
                } else {
                    1
                };
                for copy in 0..copies {
                    let outcome = match core.submit(&update, now) {
                        Ok(_) => Ok(()),
                        Err(e) if e.is_internal() => return Err(e.into()),
                        Err(e) => Err(e.code),
                    };
                    if copy == 0 {
                        submitted.entry(w.id).or_default().push(Submission {
                            unit,
                            honest_work,
                            outcome,
                        });
                    }
                }
            }
        }
    }
    // The validator goes on after the last version: every sampled unit is checked.
    if let Some((_, unit, replayed)) = validator.take() {
        core.finish_check(unit, &replayed, now)?;
    }
    checks += core.run_checks(checker.as_mut(), now)?.len() as u64;

    let checks_of: BTreeMap<u64, CheckState> = check_states(&core)?;
    let failed = |unit: &u64| checks_of.get(unit) == Some(&CheckState::Failed);
    let tally = |role: fn(&Role) -> bool| -> Tally {
        let mut t = Tally::default();
        for w in workers.iter().filter(|w| role(&w.role)) {
            t.workers += 1;
            t.balance += core.wallet(w.id, Some(0)).balance;
            for s in submitted.get(&w.id).into_iter().flatten() {
                if s.honest_work && w.role != Role::Honest {
                    t.honest_work.0 += 1;
                    if s.outcome.is_ok() && !failed(&s.unit) {
                        t.honest_work.1 += 1;
                    }
                    continue;
                }
                t.submitted += 1;
                match &s.outcome {
                    Ok(()) => {
                        t.accepted += 1;
                        if failed(&s.unit) {
                            t.failed_checks += 1;
                        } else {
                            t.credited += 1;
                        }
                    }
                    Err(code) => *t.rejected.entry(code.clone()).or_default() += 1,
                }
            }
        }
        t
    };
    let honest = tally(|r| *r == Role::Honest);
    let attackers = tally(|r| *r != Role::Honest);
    // The lies of honest-then-lying workers: caught when refused on their content or
    // clawed back. (Lies lost on the way or refused for their timing do not count.)
    let (mut lies, mut lies_caught) = (0, 0);
    for w in workers
        .iter()
        .filter(|w| w.role == Role::Attacker(Attack::HonestThenLying))
    {
        for s in submitted.get(&w.id).into_iter().flatten() {
            if s.honest_work {
                continue;
            }
            let (counts, caught) = match &s.outcome {
                Ok(()) => (true, failed(&s.unit)),
                Err(code) => (JUDGED.contains(&code.as_str()), true),
            };
            if counts {
                lies += 1;
                lies_caught += u64::from(caught);
            }
        }
    }
    let accepted: std::collections::BTreeSet<u64> = submitted
        .values()
        .flatten()
        .filter(|s| s.outcome.is_ok())
        .map(|s| s.unit)
        .collect();
    let trusted_accepted: Vec<u64> = trusted_units
        .iter()
        .copied()
        .filter(|u| accepted.contains(u))
        .collect();
    let trusted_checks = trusted_accepted
        .iter()
        .filter(|u| {
            matches!(
                checks_of.get(u),
                Some(CheckState::Verified | CheckState::Failed)
            )
        })
        .count() as u64;
    Ok(Report {
        scenario: scenario.clone(),
        initial_loss,
        final_loss: core.holdout_loss()?,
        versions: core.version(),
        honest,
        attackers,
        lies,
        lies_caught,
        trusted_units: trusted_accepted.len() as u64,
        trusted_checks,
        checks,
        sim_seconds: (now - START_MS) as f64 / 1000.0,
    })
}

/// The spot-check state of every checked unit.
fn check_states(core: &Core) -> Result<BTreeMap<u64, CheckState>, SimError> {
    Ok(core
        .store()
        .checks(None)
        .map_err(|e| SimError::Failed(e.to_string()))?
        .into_iter()
        .map(|c| (c.unit, c.state))
        .collect())
}

fn train_unit(
    backend: &mut dyn Backend,
    base: &[f32],
    data: worker::unit::UnitData<'_>,
    unit: &WorkUnit,
) -> Result<Vec<f32>, SimError> {
    worker::unit::train(backend, base, data, unit, &mut |_, _| true)?
        .ok_or_else(|| SimError::Failed("training stopped".into()))
}

/// The signed update a worker sends. The int8 codecs cannot carry a NaN value (the
/// encoder skips it), so a NaN attacker writes its bytes by hand, as any client can:
/// NaN in the first chunk's scale or the codebook's first entry.
fn encode(header: &UpdateHeader, delta: &[f32], role: Role, key: &SigningKey) -> Vec<u8> {
    let mut payload = header.codec.encode(delta);
    if role == Role::Attacker(Attack::NaN)
        && matches!(
            header.codec,
            protocol::Codec::Int8Chunk { .. } | protocol::Codec::Int8Codebook
        )
    {
        payload[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let header = UpdateHeader {
        n_params: delta.len() as u32,
        ..*header
    };
    protocol::encode_update_payload(&header, &payload, key)
}

/// What an attacker knows when it crafts its update.
struct Craft<'a> {
    backend: &'a mut dyn Backend,
    base: &'a [f32],
    data: worker::unit::UnitData<'a>,
    unit: &'a WorkUnit,
    /// Honest deltas of the same base version sent so far (an omniscient attacker).
    pool: &'a [Vec<f32>],
    last_honest: Option<&'a [f32]>,
    rng: &'a mut ChaCha8Rng,
}

impl Craft<'_> {
    fn honest(&mut self) -> Result<Vec<f32>, SimError> {
        train_unit(self.backend, self.base, self.data, self.unit)
    }

    /// The honest deltas' mean and standard deviation per coordinate (its own honest
    /// training joins them while fewer than two are known).
    fn moments(&mut self) -> Result<(Vec<f32>, Vec<f32>), SimError> {
        let own;
        let pool: Vec<&[f32]> = if self.pool.len() >= 2 {
            self.pool.iter().map(Vec::as_slice).collect()
        } else {
            own = self.honest()?;
            std::iter::once(own.as_slice())
                .chain(self.pool.iter().map(Vec::as_slice))
                .collect()
        };
        let n = pool.len() as f64;
        let d = pool[0].len();
        let mut mean = vec![0f32; d];
        let mut std = vec![0f32; d];
        for j in 0..d {
            let m = pool.iter().map(|p| f64::from(p[j])).sum::<f64>() / n;
            let v = pool
                .iter()
                .map(|p| (f64::from(p[j]) - m).powi(2))
                .sum::<f64>()
                / n;
            mean[j] = m as f32;
            // One sample has no spread: its magnitude stands in, so that the crafted
            // update is never the honest one.
            std[j] = if pool.len() == 1 { m.abs() } else { v.sqrt() } as f32;
        }
        Ok((mean, std))
    }

    fn craft(&mut self, attack: Attack, w: &mut SimWorker) -> Result<Vec<f32>, SimError> {
        let d = self.base.len();
        Ok(match attack {
            Attack::SignFlip => self.honest()?.iter().map(|x| -5.0 * x).collect(),
            Attack::Scale100 => self.honest()?.iter().map(|x| 100.0 * x).collect(),
            Attack::Noise => {
                let norm = self
                    .last_honest
                    .map(|h| h.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt())
                    .unwrap_or(1.0);
                let sigma = (norm / (d as f64).sqrt()).max(1e-6);
                let normal =
                    Normal::new(0.0, sigma).map_err(|e| SimError::Failed(e.to_string()))?;
                (0..d).map(|_| normal.sample(self.rng) as f32).collect()
            }
            Attack::Alie => {
                let (mean, std) = self.moments()?;
                mean.iter().zip(&std).map(|(m, s)| m - s).collect()
            }
            Attack::Ipm => self.moments()?.0.iter().map(|m| -2.0 * m).collect(),
            Attack::Sybil => self.moments()?.0.iter().map(|m| -5.0 * m).collect(),
            Attack::NaN => {
                let mut v = vec![0f32; d];
                v[0] = f32::NAN;
                v
            }
            Attack::Zero => vec![0f32; d],
            Attack::Copy => match self.last_honest {
                Some(h) => {
                    let scale = 1e-4
                        * (h.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / d as f64).sqrt();
                    let normal = Normal::new(0.0, scale.max(1e-9))
                        .map_err(|e| SimError::Failed(e.to_string()))?;
                    h.iter()
                        .map(|x| x + normal.sample(self.rng) as f32)
                        .collect()
                }
                None => vec![0f32; d],
            },
            Attack::ReplayOld => match &w.first_delta {
                Some(first) => first.clone(),
                None => {
                    let first = self.honest()?;
                    w.first_delta = Some(first.clone());
                    first
                }
            },
            Attack::HonestThenLying => self.honest()?,
        })
    }
}
