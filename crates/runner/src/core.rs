//! A run's state in one process and the one place that changes it: what the run decides
//! (`run::Run`), the current model version, the round's accepted updates, the outer
//! optimizer, and the store they are persisted in.
//!
//! Every change follows the same order: step a copy of the run, write blobs (fsynced),
//! commit one transaction holding the rows the step's output names and the scheduler's
//! serialized state, then keep the copy. A crash at any point leaves the store at the
//! last committed transaction, which [`Core::open`] resumes from.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use aggregation::OuterOptimizer;
use ed25519_dalek::SigningKey;
use engine::train::OwnedBatch;
use engine::{Backend, ModelSpec, Purpose};
use ledger::{Draft, Ledger, Prepared};
use protocol::api::{LeaseReply, RunInfo, Status, SubmitReply};
use protocol::{SignedUpdate, UpdateHeader, WorkUnit, WorkerId};
use run::{Decided, Input, Output};
use scheduler::{Effect, Scheduler, UnitStatus};
use store::{BlobHash, RejectionRow, Store, Tx, UpdateRow, VersionRow, WorkerRow};
use validation::{Inspected, Reject, Verdict};
use worker::unit::RunModel;

use crate::config::CoordinatorConfig;

mod aggregate;
pub mod checks;
pub mod prepare;
pub mod reads;
pub mod retention;
pub mod serving;
pub use aggregate::{Aggregated, AggregationJob};
pub use checks::{BackendSpec, CheckJob, CheckOutcome, ScoreTask};
pub use reads::{Published, Reads, SharedLedger};
use run::{Class, RunError};

/// Why the coordinator cannot start or go on.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Checkpoint(#[from] engine::checkpoint::CheckpointError),
    #[error(transparent)]
    Aggregation(#[from] aggregation::AggregationError),
    #[error(
        "the store in {dir} holds a run with a different config; give the same settings, or a new --dir for a new run (stored: {stored})"
    )]
    ConfigMismatch { dir: String, stored: String },
    #[error(
        "another hivetrain process (a coordinator or `hivetrain serve`) has the run in {dir} open; stop it first, or give another --dir"
    )]
    Busy { dir: String },
    #[error("cannot lock the run in {dir}: {source}")]
    Lock { dir: String, source: std::io::Error },
    #[error("the store is inconsistent: {0}")]
    Inconsistent(String),
    #[error("{dir} holds no run: give the directory a coordinator (or the demo) used")]
    NoRun { dir: String },
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error(
        "the ledger in {dir} does not verify ({error}); it was changed outside hivetrain, or {dir}/ledger.key is not the key that signed it"
    )]
    Ledger {
        dir: String,
        error: ledger::VerifyError,
    },
}

/// Takes the run directory's lock (`<dir>/coordinator.lock`, an advisory lock the OS
/// drops when the process ends, however it ends), waiting up to [`LOCK_WAIT`] for a
/// holder that is closing.
fn lock_dir(dir: &Path) -> Result<std::fs::File, CoreError> {
    let failed = |source| CoreError::Lock {
        dir: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(failed)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("coordinator.lock"))
        .map_err(failed)?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(CoreError::Busy {
                    dir: dir.display().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(failed(e)),
        }
    }
}

/// Rejections of one worker's updates recorded in one round; later ones are answered
/// alike but not stored.
pub const MAX_REJECTIONS_RECORDED: u64 = 64;

/// Longest a lease renewal stays in memory before it is written: what a crash can lose
/// of heartbeats.
pub const HEARTBEAT_FLUSH_MS: u64 = 1_000;

/// How long opening a run waits for another holder of its lock to let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The current version, ready to serve.
struct Current {
    version: u64,
    params: Arc<Vec<f32>>,
    checkpoint: Arc<Vec<u8>>,
    checkpoint_hash: BlobHash,
}

/// One accepted update of the current round. Its values stay in its blob until the round
/// aggregates, so memory does not grow with the updates of a round.
struct Accepted {
    blob: BlobHash,
    weight: u64,
}

/// What the core keeps of a registered worker's report (its `workers` row's machine).
#[derive(Clone, Debug, Default)]
struct Registered {
    /// Tokens a second (`None` from workers before the report).
    speed: Option<f64>,
    /// Its determinism class (`None` from workers before the report).
    class: Option<String>,
}

impl Registered {
    fn of(machine: Option<&protocol::api::Machine>) -> Registered {
        Registered {
            speed: machine.map(|m| m.tokens_per_s),
            class: machine.map(|m| m.class.clone()),
        }
    }
}

/// The coordinator's state. Not `Sync`: the HTTP layer holds it behind one mutex.
pub struct Core {
    /// Held while the core is open: one process writes a run at a time (the ledger's
    /// next entry and the scheduler's state live in this process's memory).
    _lock: std::fs::File,
    config: CoordinatorConfig,
    store: Store,
    /// What the run decides (scheduling, acceptance, spot-checks, credit), stepped on a
    /// copy and kept once its output is committed.
    run: run::Run,
    /// The run's model: its architecture, which tensors a delta carries, and its frozen
    /// floats (a LoRA run's base). `current.params` are its trainable floats.
    model: RunModel,
    seq: usize,
    current: Current,
    /// The outer optimizer; out (in an [`AggregationJob`]) while a round aggregates.
    outer: Option<Box<dyn OuterOptimizer>>,
    accepted: BTreeMap<u64, Accepted>,
    /// Evaluates the holdout; out with the outer optimizer while a round aggregates.
    evaluator: Option<Box<dyn Backend>>,
    holdout: Arc<Vec<OwnedBatch>>,
    /// Since when lease renewals are in memory only ([`Core::heartbeat`]).
    unsaved_since_ms: Option<u64>,
    /// Set by a driver that runs aggregations outside its lock: [`Core::after`] leaves a
    /// due round to it.
    deferred: bool,
    corpus: Arc<Vec<u8>>,
    tokenizer: Arc<Vec<u8>>,
    run_info: RunInfo,
    /// Registered workers, each with the speed it reported (tokens a second; `None`
    /// from workers before the report): what sizes its leases' hard deadlines until its
    /// arrivals are measured. Kept here, as the `workers` rows say, so that a lease
    /// reads no row; as many as `records.workers_max`. With it, the determinism class
    /// it reported: which checks by volunteers it may be leased.
    workers: HashMap<WorkerId, Registered>,
    initial_loss: f32,
    /// Credit for accepted work, spends and payouts; every entry is committed in the
    /// same transaction as what it is for, then appended here.
    ledger: SharedLedger,
    /// Signs the ledger's entries and tree heads (`<dir>/ledger.key`).
    authority: Arc<SigningKey>,
    /// What the read-only routes serve, published after each change.
    reads: Reads,
    serving: serving::Serving,
    /// The train split (scoring batches and spot-check re-runs read it).
    train: Arc<data::Examples>,
    /// A version's random scoring batches and its loss on them, made once per version.
    random_loss: Option<Arc<checks::RandomBatches>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("round", &self.run.scheduler().round())
            .field("version", &self.current.version)
            .finish()
    }
}

const META_CONFIG: &str = "config";
/// The ledger authority's key file, in the store's directory.
const LEDGER_KEY: &str = "ledger.key";

pub use run::credit::mint_reference;

/// Every accepted update has exactly one mint, and every mint is for an accepted update
/// or for a volunteer's check (`check:<id>`, whose checked unit's row is not kept).
fn check_mints(ledger: &Ledger, units: &[u64]) -> Result<(), CoreError> {
    for &unit in units {
        if ledger
            .find(ledger::Kind::Mint, &mint_reference(unit))
            .is_none()
        {
            return Err(CoreError::Inconsistent(format!(
                "the accepted update of unit {unit} has no mint in the ledger"
            )));
        }
    }
    let mints = ledger
        .entries()
        .iter()
        .filter(|e| e.kind == ledger::Kind::Mint && !run::credit::is_check_reference(&e.reference))
        .count();
    if mints != units.len() {
        return Err(CoreError::Inconsistent(format!(
            "the ledger holds {mints} mints for {} accepted updates",
            units.len()
        )));
    }
    Ok(())
}
const META_SCHEDULER: &str = "scheduler";
/// The SHA-256 of a fine-tune's base file, stored when the run is created.
const META_BASE_SHA256: &str = "base_sha256";

/// Refuses a base file whose bytes are not those the run was created with.
fn check_base(store: &Store, info: &protocol::api::BaseInfo) -> Result<(), CoreError> {
    match store.meta(META_BASE_SHA256)? {
        Some(stored) if stored == info.sha256 => Ok(()),
        Some(stored) => Err(crate::config::ConfigError::Invalid(format!(
            "the base file {} has SHA-256 {}, but this run was created from a base with {stored}: give the run's base file",
            info.name, info.sha256
        ))
        .into()),
        None => Err(CoreError::Inconsistent(
            "a fine-tune's store holds no base hash".into(),
        )),
    }
}

/// The base hash a version's checkpoint names, for a fine-tune.
fn base_sha(base: &Option<(Arc<Vec<u8>>, protocol::api::BaseInfo)>) -> Option<&str> {
    base.as_ref().map(|(_, info)| info.sha256.as_str())
}
/// The blob hash of the run's tokenizer.json (the registry reads it).
pub const META_TOKENIZER: &str = "tokenizer";

/// The reply to an entry the ledger refuses.
fn ledger_refusal(e: ledger::LedgerError) -> RunError {
    match e {
        ledger::LedgerError::Insufficient { .. } => RunError::new(
            Class::InsufficientCredit,
            "insufficient_credit",
            e.to_string(),
        ),
        ledger::LedgerError::Conflict { .. } => conflict("reference_reused", e.to_string()),
        ledger::LedgerError::Shape { .. } | ledger::LedgerError::NoSuchMint(_) => {
            RunError::new(Class::Invalid, "bad_entry", e.to_string())
        }
        ledger::LedgerError::Overflow | ledger::LedgerError::Stale { .. } => RunError::internal(&e),
    }
}

fn conflict(code: &str, message: impl Into<String>) -> RunError {
    RunError::new(Class::Conflict, code, message)
}

impl Core {
    /// Opens the run stored in `dir`, or creates it from `config` (version 0 from the
    /// seed). A run that was mid-round resumes that round; one that was aggregating
    /// aggregates again.
    pub fn open(dir: &Path, config: CoordinatorConfig, now_ms: u64) -> Result<Core, CoreError> {
        config.check()?;
        let lock = lock_dir(dir)?;
        let prepared = prepare::prepare(&config, &dir.join("cache"))?;
        let prepare::Prepared {
            model,
            seq,
            corpus,
            tokenizer_bytes,
            tokenizer,
            format,
            train,
            holdout,
            initial,
            base,
            pretrained,
        } = prepared;
        let mut evaluator = model.open_empty(&config.devices.holdout, Purpose::Eval)?;
        let mut store = Store::open(dir)?;
        // The lock is held and nothing is being written: what a crash left behind (a
        // write cut short, a blob whose row never committed or was let go of) goes.
        let swept = retention::sweep(&store)?;
        if swept != store::Swept::default() {
            tracing::info!(
                temporary = swept.temporary,
                orphans = swept.orphans,
                bytes = swept.bytes,
                "removed the temporary files and the blobs no row names from {}",
                dir.display()
            );
        }
        let mut outer = config
            .outer
            .build_with(config.combine, model.spec.trainable_len());
        let config_json = config.identity_json();

        let (scheduler, current, initial_loss) = match store.meta(META_CONFIG)? {
            Some(stored) => {
                if !config.same_run_as(&stored) {
                    return Err(CoreError::ConfigMismatch {
                        dir: dir.display().to_string(),
                        stored,
                    });
                }
                let json = store
                    .meta(META_SCHEDULER)?
                    .ok_or_else(|| CoreError::Inconsistent("no scheduler state".into()))?;
                let scheduler: Scheduler = serde_json::from_str(&json)
                    .map_err(|e| CoreError::Inconsistent(format!("scheduler state: {e}")))?;
                let row = store.version(scheduler.version())?.ok_or_else(|| {
                    CoreError::Inconsistent(format!("no version {}", scheduler.version()))
                })?;
                if let Some((_, info)) = &base {
                    check_base(&store, info)?;
                }
                let bytes = store.blobs().get(&row.checkpoint)?;
                let ckpt = engine::checkpoint::trained_from_bytes(dir, &bytes, &model.spec)?;
                if let Some(state) = &row.optimizer {
                    let state = store.blobs().get(state)?;
                    let floats: Vec<f32> = state
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    outer.load_state(&floats)?;
                }
                let initial = store
                    .version(0)?
                    .map(|v| v.holdout_loss)
                    .unwrap_or(f32::NAN);
                let current = Current {
                    version: row.version,
                    params: Arc::new(ckpt.trainable),
                    checkpoint: Arc::new(bytes),
                    checkpoint_hash: row.checkpoint,
                };
                (scheduler, current, initial)
            }
            None => {
                let params = initial;
                evaluator.set_trainable(&params)?;
                let loss = engine::train::evaluate(evaluator.as_mut(), &holdout)?;
                let bytes = checkpoint_bytes(&model.spec, &params, 0, None, base_sha(&base))?;
                let hash = store.blobs().put(&bytes)?;
                let mut scheduler = Scheduler::new(config.schedule, 0);
                let effects = scheduler.tick(now_ms, config.seed, &[]);
                let row = VersionRow {
                    version: 0,
                    parent: None,
                    round: None,
                    checkpoint: hash.clone(),
                    optimizer: None,
                    holdout_loss: loss,
                    created_ms: now_ms,
                    updates: Vec::new(),
                    checkpoint_pruned_ms: None,
                    optimizer_pruned_ms: None,
                };
                let tokenizer_hash = store.blobs().put(&tokenizer_bytes)?;
                store.write(|tx| {
                    tx.set_meta(META_CONFIG, &config_json)?;
                    tx.set_meta(META_TOKENIZER, tokenizer_hash.as_str())?;
                    if let Some((_, info)) = &base {
                        tx.set_meta(META_BASE_SHA256, &info.sha256)?;
                    }
                    tx.insert_version(&row)?;
                    persist_effects(tx, &scheduler, &effects, now_ms)
                })?;
                let current = Current {
                    version: 0,
                    params: Arc::new(params),
                    checkpoint: Arc::new(bytes),
                    checkpoint_hash: hash,
                };
                (scheduler, current, loss)
            }
        };

        // The median bar's norms are scaled to a unit of the run's steps: a row's weight
        // is its unit's steps times a step's tokens.
        let unit_tokens =
            u64::from(config.schedule.steps_per_unit) * config.batch as u64 * seq as u64;
        let scaled = |row: &store::UpdateRow| match row.weight {
            0 => row.norm,
            weight => (f64::from(row.norm) * unit_tokens as f64 / weight as f64) as f32,
        };
        let previous_norms = match scheduler.round().checked_sub(1) {
            Some(previous) => store
                .updates_of_round(previous)?
                .iter()
                .map(scaled)
                .collect(),
            None => Vec::new(),
        };
        let this_round = store.updates_of_round(scheduler.round())?;
        let acceptance = run::Acceptance::resume(
            previous_norms,
            this_round.iter().map(|row| (row.unit, scaled(row))),
        );
        let mut acceptance = acceptance;
        for (unit, worker, payload) in store.refused_payloads(scheduler.round())? {
            let hash = hex::decode(&payload)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok());
            if let (Some(hash), Some(worker)) = (hash, WorkerId::parse(&worker)) {
                acceptance.refused(unit, hash, worker);
            }
        }
        let accepted = this_round
            .into_iter()
            .map(|row| {
                (
                    row.unit,
                    Accepted {
                        blob: row.blob,
                        weight: row.weight,
                    },
                )
            })
            .collect();
        let workers = store
            .workers()?
            .iter()
            .filter_map(|w| {
                WorkerId::parse(&w.id).map(|id| (id, Registered::of(w.machine.as_ref())))
            })
            .collect();
        let (authority, _) = keys::load_or_create(&dir.join(LEDGER_KEY))?;
        let ledger =
            Ledger::replay(authority.verifying_key(), store.ledger_entries()?).map_err(|e| {
                CoreError::Ledger {
                    dir: dir.display().to_string(),
                    error: e,
                }
            })?;
        check_mints(&ledger, &store.accepted_units()?)?;
        let trust = store
            .trust()?
            .into_iter()
            .filter_map(|(w, verified, failed_unit)| {
                let trust = validation::spot_check::Trust {
                    verified,
                    failed_unit,
                };
                WorkerId::parse(&w).map(|w| (w, trust))
            })
            .collect::<Vec<_>>();
        let units = |state| -> Result<Vec<u64>, store::StoreError> {
            Ok(store
                .checks(Some(state))?
                .into_iter()
                .map(|c| c.unit)
                .collect())
        };
        let queued = units(store::CheckState::Queued)?;
        let replicas = resume_replicas(&store, &queued)?;
        let checks = run::SpotChecks::resume(
            trust,
            queued.into_iter().filter(|&u| !replicas.holds(u)),
            units(store::CheckState::Failed)?,
        );
        let serving = serving::Serving::new(
            store.api_keys()?,
            store
                .meta(serving::META_DIVIDEND_FROM)?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            now_ms,
        )?;
        let run_info = RunInfo {
            preset: match &config.finetune {
                None => config.preset.clone(),
                Some(_) => model.spec.name.clone(),
            },
            n_params: model.spec.trainable_len() as u32,
            model: model.spec.clone(),
            batch: config.batch,
            seq: seq as u32,
            n_shards: config.schedule.n_shards,
            codec: config.codec,
            corpus_name: config
                .corpus
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "corpus.txt".into()),
            corpus_sha256: data::sha256_hex(&corpus),
            corpus_bytes: corpus.len() as u64,
            tokenizer_sha256: data::sha256_hex(&tokenizer_bytes),
            data: format,
            base: base.as_ref().map(|(_, info)| info.clone()),
            version: current.version,
        };
        let base = base.map(|(bytes, _)| bytes);
        let ledger = SharedLedger::new(ledger);
        // A fine-tune serves chats through its base's template; a base without one
        // (or a run from scratch) through the speaker format of the run's tokenizer.
        let vocab: Arc<dyn inference::Vocab> =
            match pretrained.as_deref().map(inference::PretrainedVocab::new) {
                Some(Ok(vocab)) => Arc::new(vocab),
                _ => Arc::new(tokenizer),
            };
        let authority = Arc::new(authority);
        let corpus = Arc::new(corpus);
        let tokenizer_bytes = Arc::new(tokenizer_bytes);
        let reads = Reads {
            published: Arc::new(std::sync::RwLock::new(Arc::new(Published {
                round: 0,
                version: 0,
                initial_loss,
                workers: 0,
                units_queued: 0,
                units_leased: 0,
                units_accepted: 0,
                checkpoint: current.checkpoint.clone(),
                checkpoint_hash: current.checkpoint_hash.to_string(),
                params: current.params.clone(),
                tokens_per_unit: 0,
                lease_ms: 0,
            }))),
            ledger: ledger.clone(),
            authority: authority.clone(),
            store: Arc::new(std::sync::Mutex::new(store.reader()?)),
            run_info: Arc::new(run_info.clone()),
            corpus: corpus.clone(),
            tokenizer: tokenizer_bytes.clone(),
            vocab,
            model: model.clone(),
            base,
            epoch: store.rounds_epoch(),
            cache: Arc::default(),
        };
        let settings = settings(
            &config,
            run_info.n_params,
            config.batch as u64 * seq as u64,
            model.spec.train_flops_per_token(),
        );
        let mut core = Core {
            reads,
            config,
            store,
            run: run::Run::new(settings, scheduler, acceptance, checks, replicas)
                .map_err(|e| CoreError::Inconsistent(e.message))?,
            model,
            seq,
            current,
            outer: Some(outer),
            accepted,
            evaluator: Some(evaluator),
            holdout: Arc::new(holdout),
            deferred: false,
            unsaved_since_ms: None,
            corpus,
            tokenizer: tokenizer_bytes,
            run_info,
            workers,
            initial_loss,
            ledger,
            authority,
            serving,
            train: Arc::new(train),
            random_loss: None,
            _lock: lock,
        };
        core.aggregate_if_pending(now_ms)?;
        core.publish();
        Ok(core)
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The bytes of a stored update, checked against its blob name.
    pub fn update_bytes(&self, blob: &BlobHash) -> Result<Vec<u8>, CoreError> {
        Ok(self
            .store
            .blobs()
            .get_checked(blob, |b| update_intact(b, blob))?)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn version(&self) -> u64 {
        self.current.version
    }

    pub fn round(&self) -> u64 {
        self.run.scheduler().round()
    }

    /// The current version's trainable floats (for tests that compare models bit for bit).
    pub fn params(&self) -> &[f32] {
        &self.current.params[..]
    }

    pub fn run_info(&self) -> RunInfo {
        RunInfo {
            version: self.current.version,
            ..self.run_info.clone()
        }
    }

    pub fn corpus(&self) -> Arc<Vec<u8>> {
        self.corpus.clone()
    }

    pub fn tokenizer(&self) -> Arc<Vec<u8>> {
        self.tokenizer.clone()
    }

    /// Registers (or renames) a worker, with the machine it measured when it started.
    pub fn register(
        &mut self,
        worker: WorkerId,
        name: &str,
        machine: Option<&protocol::api::Machine>,
        now_ms: u64,
    ) -> Result<(), RunError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(RunError::new(
                Class::Invalid,
                "bad_name",
                "a worker name must be 1 to 64 printable characters",
            ));
        }
        if let Some(problem) = machine.and_then(|m| m.problem()) {
            return Err(RunError::new(Class::Invalid, "bad_machine", problem));
        }
        let row = WorkerRow {
            id: worker.to_string(),
            name: name.to_owned(),
            registered_ms: now_ms,
            machine: machine.cloned(),
        };
        let full = self.workers.len() as u64 >= self.config.records.workers_max;
        let dropped = if full && !self.workers.contains_key(&worker) {
            Some(self.idle_registration()?)
        } else {
            None
        };
        self.store
            .write(|tx| {
                if let Some(old) = dropped {
                    tx.remove_worker(&old.to_string())?;
                }
                tx.upsert_worker(&row)
            })
            .map_err(|e| RunError::internal(&e))?;
        if let Some(old) = dropped {
            self.workers.remove(&old);
        }
        self.workers.insert(worker, Registered::of(machine));
        Ok(())
    }

    /// The registration a new one replaces when `records.workers_max` are registered:
    /// the oldest of a worker that never had an update accepted and holds no lease now.
    /// Anyone can register any number of keys, so registrations that did nothing are
    /// what a flood is made of; a dropped worker that comes back is told
    /// `unknown_worker` and registers again.
    fn idle_registration(&self) -> Result<WorkerId, RunError> {
        /// Registrations looked at per attempt (more holding leases than this is a
        /// network that needs a higher `records.workers_max`).
        const CANDIDATES: u64 = 64;
        let holders: HashSet<WorkerId> = self
            .run
            .scheduler()
            .units()
            .filter_map(|(_, s)| match *s {
                UnitStatus::Leased { worker, .. } => Some(worker),
                _ => None,
            })
            .chain(self.run.scheduler().late().map(|l| l.worker))
            .collect();
        self.store
            .idle_workers(CANDIDATES)
            .map_err(|e| RunError::internal(&e))?
            .iter()
            .filter_map(|id| WorkerId::parse(id))
            .find(|w| !holders.contains(w))
            .ok_or_else(|| {
                RunError::new(
                    Class::Busy { retry_after_s: 60 },
                    "registrations_full",
                    format!(
                        "the coordinator holds its most registrations ({}), all of workers that contributed or hold a lease; retry later",
                        self.config.records.workers_max
                    ),
                )
            })
    }

    fn known(&self, worker: WorkerId) -> Result<(), RunError> {
        if self.workers.contains_key(&worker) {
            Ok(())
        } else {
            Err(RunError::new(
                Class::Forbidden,
                "unknown_worker",
                format!("worker {worker} is not registered: POST /v1/workers first"),
            ))
        }
    }

    /// Gives the worker a unit, or tells it when to come back. The unit's hard deadline
    /// is sized by the run from the worker's measured arrivals, else from the speed it
    /// reported at registration (handed in as the time a unit should take it).
    pub fn lease(&mut self, worker: WorkerId, now_ms: u64) -> Result<LeaseReply, RunError> {
        self.known(worker)?;
        let registered = self.workers.get(&worker).cloned().unwrap_or_default();
        let expected_ms = registered
            .speed
            .and_then(|speed| run::tier::unit_ms(speed, self.run.unit_tokens()));
        let input = Input::Lease {
            worker,
            expected_ms,
            class: registered.class.as_deref(),
        };
        let output = self.advance(now_ms, input, |_| Ok(()))?;
        let heartbeat_ms = (self.config.schedule.lease_ms / 3).max(1);
        let effects = output.effects;
        if let Some(Decided::CheckLeased {
            unit, deadline_ms, ..
        }) = output.decided
        {
            // A volunteer's check, answered as an ordinary lease: the unit's base's hash,
            // its lease as long as an ordinary first one (heartbeats are accepted).
            let model_blake3 = self.checkpoint_hash(unit.base_version)?;
            tracing::info!(unit = unit.id, checker = %worker, "a check is leased to a volunteer");
            self.after(&effects, now_ms)?;
            return Ok(LeaseReply::Lease {
                unit,
                model_blake3,
                lease_ms: deadline_ms
                    .min(now_ms.saturating_add(self.config.schedule.lease_ms))
                    .saturating_sub(now_ms),
                heartbeat_ms,
            });
        }
        let reply = effects.iter().find_map(|e| match *e {
            Effect::Lease {
                worker: w,
                unit,
                deadline_ms,
            } if w == worker => Some(LeaseReply::Lease {
                unit,
                model_blake3: self.current.checkpoint_hash.to_string(),
                lease_ms: deadline_ms.saturating_sub(now_ms),
                heartbeat_ms,
            }),
            Effect::NoWork {
                worker: w,
                retry_after_ms,
            } if w == worker => Some(LeaseReply::NoWork { retry_after_ms }),
            _ => None,
        });
        self.after(&effects, now_ms)?;
        Ok(reply.unwrap_or(LeaseReply::NoWork {
            retry_after_ms: 1_000,
        }))
    }

    /// The blake3 of `version`'s checkpoint (what a lease on it names).
    fn checkpoint_hash(&self, version: u64) -> Result<String, RunError> {
        if version == self.current.version {
            return Ok(self.current.checkpoint_hash.to_string());
        }
        self.store
            .version(version)
            .map_err(|e| RunError::internal(&e))?
            .map(|row| row.checkpoint.to_string())
            .ok_or_else(|| {
                RunError::internal(&std::io::Error::other(format!("no version {version}")))
            })
    }

    /// Extends the worker's lease on `unit`.
    pub fn heartbeat(&mut self, worker: WorkerId, unit: u64, now_ms: u64) -> Result<(), RunError> {
        self.known(worker)?;
        self.tick(now_ms)?;
        // A volunteer's check: its lease is not renewed (it was given the hard deadline
        // an ordinary unit of its worker gets), but its heartbeats are answered as one's.
        if self
            .run
            .check_lease(unit)
            .is_some_and(|l| l.checker == worker && now_ms < l.deadline_ms)
        {
            return Ok(());
        }
        match self.run.scheduler().lease_view(unit) {
            Some(l) if l.worker == worker && !l.submitted && l.expired => {
                return Err(conflict(
                    "lease_expired",
                    format!(
                        "your lease on work unit {unit} expired and it is queued for any worker; your update for it is still taken until another worker is leased it, so finish it and send it, or ask for a new lease"
                    ),
                ));
            }
            Some(l) if l.worker == worker && !l.submitted => {}
            _ => {
                return Err(conflict(
                    "not_leased",
                    format!(
                        "work unit {unit} is not leased to you (it expired or the round ended); ask for a new lease"
                    ),
                ));
            }
        }
        self.renew(Input::Heartbeat { worker, unit }, now_ms)
    }

    /// Steps a lease's renewal (a heartbeat, an update's arrival). A renewal is kept in
    /// memory and written with the next commit, or by [`Core::flush`] within
    /// `HEARTBEAT_FLUSH_MS`: heartbeats are most of a run's requests, and one lost in a
    /// crash only ends a lease sooner (its worker's update is refused as `not_leased`,
    /// its unit leased again); nothing accepted or credited is lost.
    fn renew(&mut self, input: Input<'_>, now_ms: u64) -> Result<(), RunError> {
        let (next, output) = self.stepped(now_ms, input)?;
        if output.effects.is_empty() && next.replicas() == self.run.replicas() {
            self.run = next;
            self.unsaved_since_ms.get_or_insert(now_ms);
            return Ok(());
        }
        self.commit(next, &output.effects, now_ms, |_| Ok(()))?;
        self.after(&output.effects, now_ms)
    }

    /// Writes lease renewals kept in memory for `HEARTBEAT_FLUSH_MS` or more (`force`:
    /// any); the server calls it every half second and when it stops.
    pub fn flush(&mut self, now_ms: u64, force: bool) -> Result<(), RunError> {
        let Some(since) = self.unsaved_since_ms else {
            return Ok(());
        };
        if !force && now_ms.saturating_sub(since) < HEARTBEAT_FLUSH_MS {
            return Ok(());
        }
        let scheduler = self.run.scheduler();
        self.store
            .write(|tx| persist_effects(tx, scheduler, &[], now_ms))
            .map_err(|e| RunError::internal(&e))?;
        self.unsaved_since_ms = None;
        Ok(())
    }

    /// Advances time: expires leases, times rounds out, aggregates when due.
    pub fn tick(&mut self, now_ms: u64) -> Result<(), RunError> {
        let effects = self.advance(now_ms, Input::Tick, |_| Ok(()))?.effects;
        self.after(&effects, now_ms)
    }

    /// Validates and, if accepted, stores one update: [`validation::inspect`], then
    /// [`Core::precheck`], the blob, and [`Core::accept`]. The HTTP server runs the same
    /// stages but holds the core's lock only for the two cheap ones.
    pub fn submit(&mut self, bytes: &[u8], now_ms: u64) -> Result<SubmitReply, RunError> {
        let update = self.inspect(bytes, now_ms)?;
        let score = match self.precheck(&update, now_ms)? {
            Some(task) => {
                let delta = SignedUpdate::parse(bytes, &self.config.limits)
                    .and_then(|u| u.decode())
                    .map_err(|e| RunError::internal(&e))?;
                let mut scorer = match self.evaluator.take() {
                    Some(evaluator) => evaluator,
                    None => self.scoring_backend()?,
                };
                let score = task.run(scorer.as_mut(), &delta);
                self.evaluator.get_or_insert(scorer);
                Some(score?)
            }
            None => None,
        };
        let blob = BlobHash::from_digest(&update.address);
        self.store
            .blobs()
            .put_as(bytes, &blob)
            .map_err(|e| RunError::internal(&e))?;
        self.accept(&update, &blob, bytes.len() as u64, score, now_ms)
    }

    /// The stage of validation that needs no round state, with its rejection recorded.
    /// (The HTTP server calls [`validation::inspect`] itself, outside the lock.)
    fn inspect(&mut self, bytes: &[u8], now_ms: u64) -> Result<Inspected, RunError> {
        validation::inspect(bytes, &self.config.limits).or_else(|verdict| {
            self.reject(verdict, None, None, now_ms)
                .map(|never| match never {})
        })
    }

    /// Judges an inspected update against the round as it stands, before its blob is
    /// written; records and returns a rejection. What it returns, when scoring is on, is
    /// the scoring to run (outside the lock) and hand to [`Core::accept`].
    pub fn precheck(
        &mut self,
        update: &Inspected,
        now_ms: u64,
    ) -> Result<Option<ScoreTask>, RunError> {
        // Expire what is due first, so the lease checked is the one that counts.
        self.tick(now_ms)?;
        // A volunteer's check: not scored (it joins no aggregate; it is compared).
        if self.run.check_lease(update.header.work_unit).is_some() {
            return match self.check_refusal(update) {
                Some(verdict) => self
                    .reject(verdict, Some(&update.header), None, now_ms)
                    .map(|never| match never {}),
                None => Ok(None),
            };
        }
        match self.judge(update)? {
            // The same update accepted before, sent again: `accept` answers it as then.
            verdict @ Verdict::Rejected { .. }
                if self.accepted_reply(update, &verdict)?.is_some() =>
            {
                Ok(None)
            }
            Verdict::Accepted { work_unit, .. } => {
                // Judged in time at its arrival: scoring it is not the worker's time.
                let worker = update.header.worker;
                self.renew(
                    Input::Arrived {
                        worker,
                        unit: work_unit,
                    },
                    now_ms,
                )?;
                let unit = self.run.scheduler().unit(work_unit).copied();
                match unit {
                    Some(unit) => self.score_task(&unit, update.header.base_version),
                    None => Ok(None),
                }
            }
            verdict => self
                .reject(
                    verdict,
                    Some(&update.header),
                    Some(update.payload_hash),
                    now_ms,
                )
                .map(|never| match never {}),
        }
    }

    /// Judges the update again (the round may have moved since the precheck), then its
    /// `score` (from the precheck's [`ScoreTask`]; required when scoring is on) and, if
    /// it is accepted, commits its row (naming `blob`, already durable), its mint, its
    /// spot-check record and the scheduler's next state in one transaction. A rejection
    /// here leaves no blob behind unless a row names it.
    pub fn accept(
        &mut self,
        update: &Inspected,
        blob: &BlobHash,
        n_bytes: u64,
        score: Option<validation::score::Score>,
        now_ms: u64,
    ) -> Result<SubmitReply, RunError> {
        self.tick(now_ms)?;
        if self.run.check_lease(update.header.work_unit).is_some() {
            return self.finish_replica(update, blob, now_ms);
        }
        let copy_of = self.copy_of(update)?;
        let verdict = self.run.judge(update, copy_of);
        if let Some(reply) = self.accepted_reply(update, &verdict)? {
            return Ok(reply);
        }
        let class = self
            .workers
            .get(&update.header.worker)
            .and_then(|w| w.class.clone());
        let (next, output) = self.stepped(
            now_ms,
            Input::Update {
                update,
                copy_of,
                score: score.as_ref(),
                class: class.as_deref(),
            },
        )?;
        let accepted = match output.decided {
            Some(Decided::Accepted(accepted)) => accepted,
            Some(Decided::Refused(verdict)) => {
                // What agreement remembers of this refusal is kept; nothing was leased
                // or accepted (time passing may have moved checks by volunteers).
                if next.replicas() != self.run.replicas() {
                    self.store
                        .write(|tx| tx.replace_replicas(&replica_rows(&next)))
                        .map_err(|e| RunError::internal(&e))?;
                }
                self.run = next;
                let referenced = self
                    .store
                    .blob_referenced(blob)
                    .map_err(|e| RunError::internal(&e))?;
                if !referenced {
                    self.store
                        .blobs()
                        .remove(blob)
                        .map_err(|e| RunError::internal(&e))?;
                }
                return self
                    .reject(
                        verdict,
                        Some(&update.header),
                        Some(update.payload_hash),
                        now_ms,
                    )
                    .map(|never| match never {});
            }
            other => {
                return Err(RunError::broken(format!(
                    "an update's step decided {other:?}"
                )));
            }
        };
        let run::Accepted {
            unit: work_unit,
            worker,
            round,
            norm,
            weight,
            mint,
            sample,
        } = accepted;
        let credit = mint.amount;
        let registered = self.workers.get(&worker).cloned().unwrap_or_default();
        // The credit the run drafted, signed and committed with the update's row.
        let mint = match self.ledger.prepare(mint, now_ms, &self.authority) {
            Ok(Prepared::New(entry)) => *entry,
            Ok(Prepared::Existing(seq)) => {
                return Err(RunError::internal(&CoreError::Inconsistent(format!(
                    "unit {work_unit} already has its mint, entry {seq}"
                ))));
            }
            Err(e) => return Err(RunError::internal(&e)),
        };
        let row = UpdateRow {
            unit: work_unit,
            round,
            worker: worker.to_string(),
            base_version: update.header.base_version,
            blob: blob.clone(),
            bytes: n_bytes,
            norm,
            weight,
            received_ms: now_ms,
            class: registered.class.clone(),
            tier: registered.speed.map(|speed| {
                let lease_ms = self.config.schedule.lease_ms;
                run::Tier::of(speed, self.run.unit_tokens(), lease_ms)
                    .name()
                    .to_owned()
            }),
        };
        let check = sample.map(|sample| store::CheckRow {
            unit: work_unit,
            worker: worker.to_string(),
            state: match sample {
                // A check waiting for a volunteer is stored as queued: after a restart
                // the coordinator re-runs it itself.
                run::Sample::Queued | run::Sample::Replicated => store::CheckState::Queued,
                run::Sample::Unchecked => store::CheckState::Unchecked,
            },
            distance: None,
            decided_ms: None,
        });
        let payload = hex::encode(update.payload_hash);
        self.commit(next, &output.effects, now_ms, |tx| {
            tx.insert_update(&row)?;
            tx.insert_payload(&payload, work_unit)?;
            if let Some(check) = &check {
                tx.set_check(check)?;
            }
            tx.insert_entry(&mint)
        })?;
        let effects = output.effects;
        self.ledger_committed(mint);
        self.accepted.insert(
            work_unit,
            Accepted {
                blob: blob.clone(),
                weight,
            },
        );
        let reply = SubmitReply {
            unit: work_unit,
            norm,
            round_accepted: self.accepted.len() as u32,
            credit,
        };
        tracing::info!(
            unit = work_unit,
            worker = %worker,
            round = row.round,
            norm,
            credit,
            code = "accepted",
            "update accepted"
        );
        self.after(&effects, now_ms)?;
        Ok(reply)
    }

    /// What the read-only routes serve, as of the last change.
    pub fn reads(&self) -> Reads {
        self.publish();
        self.reads.clone()
    }

    /// Publishes the run as it stands to [`Reads`].
    pub fn publish(&self) {
        let count = |f: fn(&UnitStatus) -> bool| {
            self.run.scheduler().units().filter(|(_, s)| f(s)).count() as u32
        };
        self.reads.publish(Published {
            round: self.run.scheduler().round(),
            version: self.current.version,
            initial_loss: self.initial_loss,
            workers: self.workers.len() as u64,
            units_queued: count(|s| matches!(s, UnitStatus::Queued)),
            units_leased: count(|s| matches!(s, UnitStatus::Leased { .. })),
            units_accepted: count(|s| matches!(s, UnitStatus::Accepted { .. })),
            checkpoint: self.current.checkpoint.clone(),
            checkpoint_hash: self.current.checkpoint_hash.to_string(),
            params: self.current.params.clone(),
            tokens_per_unit: self.config.schedule.steps_per_unit as u64
                * self.config.batch as u64
                * self.seq as u64,
            lease_ms: self.config.schedule.lease_ms,
        });
    }

    /// A page of ledger entries from `from`, at most `limit` of them.
    pub fn ledger_page(&self, from: u64, limit: u64) -> ledger::wire::EntriesPage {
        self.reads.ledger_page(from, limit)
    }

    /// A signed head of the ledger's Merkle tree as it stands.
    pub fn tree_head(&self, now_ms: u64) -> ledger::TreeHead {
        self.reads.tree_head(now_ms)
    }

    /// A wallet's totals and its entries (the newest `newest` of them, or all).
    pub fn wallet(&self, wallet: WorkerId, newest: Option<usize>) -> ledger::wire::WalletView {
        self.reads.wallet(wallet, newest)
    }

    /// Wallets by credit earned, most first.
    pub fn leaderboard(&self) -> Result<Vec<ledger::wire::LeaderRow>, RunError> {
        self.reads.leaderboard()
    }

    /// Network totals.
    pub fn stats(&self) -> Result<ledger::wire::Stats, RunError> {
        self.reads().stats()
    }

    /// Moves credit from the signer's wallet to another; repeating a transfer (same
    /// reference, recipient and amount) is a no-op that returns the first entry.
    pub fn transfer(
        &mut self,
        from: WorkerId,
        request: &ledger::wire::TransferRequest,
        now_ms: u64,
    ) -> Result<ledger::Entry, RunError> {
        let bad = |code: &str, message: String| RunError::new(Class::Invalid, code, message);
        let to = WorkerId::parse(&request.to)
            .filter(WorkerId::is_public_key)
            .ok_or_else(|| {
                bad(
                    "bad_wallet",
                    format!(
                        "{:?} is not a wallet: a wallet is a worker's ed25519 public key, 64 hex digits (credit sent elsewhere could never be spent)",
                        request.to
                    ),
                )
            })?;
        if to == from {
            return Err(bad(
                "bad_transfer",
                "a wallet cannot transfer to itself".into(),
            ));
        }
        if request.amount == 0 {
            return Err(bad(
                "bad_amount",
                "the amount must be at least 1 micro-credit".into(),
            ));
        }
        let reference = request.reference.trim();
        if reference.is_empty() || reference.len() > 128 || reference.chars().any(char::is_control)
        {
            return Err(bad(
                "bad_reference",
                "the reference must be 1 to 128 printable characters".into(),
            ));
        }
        // References are the sender's own: two senders may use the same one.
        let draft = Draft::transfer(from, to, request.amount, format!("{from}:{reference}"));
        // Credit held by generations under way cannot be sent (a repeat still answers).
        if request.amount > self.available(from)
            && self
                .ledger
                .read()
                .find(draft.kind, &draft.reference)
                .is_none()
        {
            return Err(RunError::new(
                Class::InsufficientCredit,
                "insufficient_credit",
                format!(
                    "wallet {from} has {} credits available (its balance less what requests under way hold)",
                    ledger::format_credits(self.available(from))
                ),
            ));
        }
        self.append(draft, now_ms)
    }

    /// Appends one entry, persisted before it counts; ledger refusals become replies.
    fn append(&mut self, draft: Draft, now_ms: u64) -> Result<ledger::Entry, RunError> {
        let entry = match self.ledger.prepare(draft, now_ms, &self.authority) {
            Ok(Prepared::New(entry)) => *entry,
            Ok(Prepared::Existing(seq)) => {
                return Ok(self.ledger.read().entries()[seq as usize].clone());
            }
            Err(e) => return Err(ledger_refusal(e)),
        };
        self.store
            .write(|tx| tx.insert_entry(&entry))
            .map_err(|e| RunError::internal(&e))?;
        self.ledger_committed(entry.clone());
        Ok(entry)
    }

    /// What makes the store's commits durable, for syncing outside the core's lock.
    pub fn durability(&self) -> std::sync::Arc<store::Durability> {
        self.store.durability()
    }

    /// The blob directory, for writing an update's blob outside the core's lock.
    pub fn blobs(&self) -> store::Blobs {
        self.store.blobs().clone()
    }

    /// The limits updates are parsed under.
    pub fn limits(&self) -> protocol::Limits {
        self.config.limits
    }

    /// The verdict on an update as the round stands (an `Err` only when the store cannot
    /// be read).
    fn judge(&self, update: &Inspected) -> Result<Verdict, RunError> {
        Ok(self.run.judge(update, self.copy_of(update)?))
    }

    /// The unit already accepted with this update's values (the copy check; looked up
    /// only with scoring on, which the check belongs to).
    fn copy_of(&self, update: &Inspected) -> Result<Option<u64>, RunError> {
        if !self.config.scoring.enabled {
            return Ok(None);
        }
        self.store
            .payload_unit(&hex::encode(update.payload_hash))
            .map_err(|e| RunError::internal(&e))
    }

    /// Appends to the in-memory ledger an entry the store has just committed. The
    /// ledger checked the entry when it was prepared under the same lock, so a refusal
    /// now means memory and store disagree: the process stops, and a restart replays
    /// the ledger from the store.
    fn ledger_committed(&self, entry: ledger::Entry) {
        if let Err(e) = self.ledger.write().commit(entry) {
            crate::drive::stop(&format!(
                "the ledger refused an entry the store already committed ({e})"
            ));
        }
    }

    /// Records a rejection and returns it as the reply. Rejections of signed updates are
    /// kept (attributable to a key); unsigned garbage is answered and forgotten, so it
    /// cannot fill the disk.
    fn reject(
        &mut self,
        verdict: Verdict,
        header: Option<&UpdateHeader>,
        payload: Option<[u8; 32]>,
        now_ms: u64,
    ) -> Result<std::convert::Infallible, RunError> {
        let Verdict::Rejected { reason, sentence } = verdict else {
            return Err(RunError::from_verdict(verdict));
        };
        let signed = !matches!(
            reason,
            Reject::Malformed | Reject::HashMismatch | Reject::BadSignature | Reject::OutOfRange
        );
        if let (true, Some(h)) = (signed, header) {
            let worker = h.worker.to_string();
            let round = self.run.scheduler().round();
            // A key's rejections are recorded up to a bound a round, so that one key
            // sending garbage cannot fill the disk; the reply is the same past it.
            let record = self
                .store
                .rejections_of(&worker, round)
                .map_err(|e| RunError::internal(&e))?
                < MAX_REJECTIONS_RECORDED;
            // One line per refused update, as far as it is recorded: past a key's bound
            // its refusals are logged only at debug level, as unsigned garbage is.
            if record {
                tracing::info!(unit = h.work_unit, worker = %h.worker, round, code = reason.code(), "update refused: {sentence}");
            } else {
                tracing::debug!(unit = h.work_unit, worker = %h.worker, code = reason.code(), "update refused (past the key's bound)");
            }
            // And so that many keys cannot either: the oldest records go past the bound.
            let kept = self.config.records.rejections_max;
            let row = RejectionRow {
                received_ms: now_ms,
                round,
                worker,
                unit: h.work_unit,
                code: reason.code().to_owned(),
                sentence: sentence.clone(),
                // What agreement needs after a restart (`run::Acceptance::refused`).
                payload: payload
                    .filter(|_| matches!(reason, Reject::NoProgress | Reject::NotOwnData))
                    .map(hex::encode),
            };
            // A refused unit goes to another worker (the refusal row commits with it).
            let refused = reason.releases_unit()
                && self
                    .run
                    .scheduler()
                    .lease_view(h.work_unit)
                    .is_some_and(|l| l.worker == h.worker && !l.submitted);
            if refused {
                let input = Input::Refused {
                    worker: h.worker,
                    unit: h.work_unit,
                };
                let effects = self
                    .advance(now_ms, input, |tx| {
                        if record {
                            tx.insert_rejection(&row)?;
                            tx.trim_rejections(kept)?;
                        }
                        Ok(())
                    })?
                    .effects;
                self.after(&effects, now_ms)?;
            } else if record {
                self.store
                    .write(|tx| {
                        tx.insert_rejection(&row)?;
                        tx.trim_rejections(kept)
                    })
                    .map_err(|e| RunError::internal(&e))?;
            }
        }
        if !signed || header.is_none() {
            tracing::debug!(code = reason.code(), "unsigned update refused: {sentence}");
        }
        Err(RunError::rejected(reason, sentence))
    }

    /// The reply an accepted update was given, when `update`, refused now (the unit is
    /// no longer leased, already submitted, or the round moved on), is that very update
    /// sent again by its worker: a worker whose reply was lost (a dropped connection, a
    /// coordinator killed after the commit) retries, and learns that it was accepted and
    /// credited instead of being told `duplicate`. Nothing is written.
    fn accepted_reply(
        &self,
        update: &Inspected,
        verdict: &Verdict,
    ) -> Result<Option<SubmitReply>, RunError> {
        if !matches!(verdict, Verdict::Rejected { .. }) {
            return Ok(None);
        }
        let internal = |e: store::StoreError| RunError::internal(&e);
        let unit = update.header.work_unit;
        let Some(row) = self.store.update(unit).map_err(internal)? else {
            return Ok(None);
        };
        if row.worker != update.header.worker.to_string()
            || row.blob != BlobHash::from_digest(&update.address)
        {
            return Ok(None);
        }
        let credit = self
            .ledger
            .read()
            .find(ledger::Kind::Mint, &mint_reference(unit))
            .map_or(0, |e| e.amount);
        let round_accepted = self
            .store
            .updates_of_round(row.round)
            .map_err(internal)?
            .iter()
            .filter(|u| u.received_ms <= row.received_ms)
            .count() as u32;
        Ok(Some(SubmitReply {
            unit,
            norm: row.norm,
            round_accepted,
            credit,
        }))
    }

    /// Steps a copy of the run; the copy is kept by [`Core::commit`] once its output is
    /// committed, or dropped.
    fn stepped(&self, now_ms: u64, input: Input<'_>) -> Result<(run::Run, Output), RunError> {
        let mut next = self.run.clone();
        let output = next.step(now_ms, input)?;
        Ok((next, output))
    }

    /// Commits the rows of `effects`, `extra` and the scheduler's state of `next` in one
    /// transaction when its scheduler moved, then keeps `next`.
    fn commit(
        &mut self,
        next: run::Run,
        effects: &[Effect],
        now_ms: u64,
        extra: impl FnOnce(&Tx<'_>) -> Result<(), store::StoreError>,
    ) -> Result<(), RunError> {
        let replicas_moved = next.replicas() != self.run.replicas();
        if next.scheduler() != self.run.scheduler() || replicas_moved {
            self.store
                .write(|tx| {
                    extra(tx)?;
                    if replicas_moved {
                        tx.replace_replicas(&replica_rows(&next))?;
                    }
                    persist_effects(tx, next.scheduler(), effects, now_ms)
                })
                .map_err(|e| RunError::internal(&e))?;
            self.unsaved_since_ms = None;
        }
        self.run = next;
        Ok(())
    }

    /// Steps the run and commits the step ([`Core::stepped`], then [`Core::commit`]).
    fn advance(
        &mut self,
        now_ms: u64,
        input: Input<'_>,
        extra: impl FnOnce(&Tx<'_>) -> Result<(), store::StoreError>,
    ) -> Result<Output, RunError> {
        let (next, output) = self.stepped(now_ms, input)?;
        self.commit(next, &output.effects, now_ms, extra)?;
        Ok(output)
    }

    /// Acts on effects that need more than a reply.
    /// A round to aggregate is aggregated here and now, unless a driver takes the work
    /// outside its lock ([`Core::defer_aggregation`]).
    fn after(&mut self, effects: &[Effect], now_ms: u64) -> Result<(), RunError> {
        if !self.deferred
            && effects
                .iter()
                .any(|e| matches!(e, Effect::Aggregate { .. }))
        {
            self.aggregate_if_pending(now_ms)
                .map_err(|e| RunError::internal(&e))?;
        }
        Ok(())
    }

    /// The checkpoint of `version` and its blake3 (410 `version_pruned` when the
    /// retention policy removed it).
    pub fn model(&self, version: u64) -> Result<(Arc<Vec<u8>>, String), RunError> {
        self.reads().model(version)
    }

    /// The run's progress, round by round.
    pub fn status(&self, now_ms: u64, newest: Option<u64>) -> Result<Status, RunError> {
        self.reads().status(now_ms, newest)
    }
}

/// The run's settings, from its config: the rules of acceptance and spot-checks, the
/// tokens a step trains and the model's FLOPs per token.
/// The run core's settings for `config`: what every driver of a run (the coordinator's
/// core, a peer) hands `run::Run`.
pub fn settings(
    config: &CoordinatorConfig,
    n_params: u32,
    step_tokens: u64,
    flops_per_token: u64,
) -> run::Settings {
    let spot = &config.spot_check;
    run::Settings {
        seed: config.seed,
        acceptance: run::Rules {
            max_staleness: config.schedule.max_staleness,
            n_params,
            delta_norm_max: config.delta_norm_max,
            median_multiple_max: config.median_norm_multiple,
            check_values: !config.unchecked_values,
            scoring: config.scoring,
            agreement: spot.enabled,
        },
        checks: run::CheckRules {
            enabled: spot.enabled,
            trusted_after: spot.trusted_after,
            tolerance: spot.tolerance,
            cross_class_tolerance: spot.cross_class_tolerance,
            gpu_tolerance: spot.gpu_tolerance,
            max_backlog: spot.max_backlog,
            seed: config.seed,
        },
        replicas: run::ReplicaRules {
            replicate: spot.replicate,
            wait_ms: spot.replica_wait_ms,
            checker_class: engine::cpu_class(),
            own_reruns: true,
        },
        step_tokens,
        flops_per_token,
    }
}

/// Whether a stored update's bytes are what its blob name says: the name is the
/// update's `protocol::update::stored_address` (one pass over the payload when it is
/// received, not two), or, for runs stored before that rule, the hash of all its bytes.
fn update_intact(bytes: &[u8], name: &BlobHash) -> bool {
    name.digest()
        .is_some_and(|d| protocol::update::stored_intact(bytes, &d))
        || BlobHash::of(bytes) == *name
}

/// The checks by volunteers a stored run had, of units still queued for a check (a row
/// that names no stored unit or key is left to the coordinator's own re-run).
fn resume_replicas(store: &Store, queued: &[u64]) -> Result<run::Replicas, CoreError> {
    let queued: HashSet<u64> = queued.iter().copied().collect();
    let (mut pending, mut leased) = (Vec::new(), Vec::new());
    for r in store.replicas()? {
        let (Some(unit), Some(worker)) = (store.unit(r.unit)?, WorkerId::parse(&r.worker)) else {
            continue;
        };
        if !queued.contains(&unit.id) {
            continue;
        }
        let disputed = r.disputed.and_then(|(check, by)| {
            WorkerId::parse(&by).map(|checker| run::Replica { check, checker })
        });
        let check = run::replicas::PendingCheck {
            unit,
            worker,
            class: r.class,
            queued_ms: r.queued_ms,
            disputed,
        };
        match r.lease.and_then(|(id, checker, deadline_ms)| {
            WorkerId::parse(&checker).map(|checker| (id, checker, deadline_ms))
        }) {
            Some((id, checker, deadline_ms)) => leased.push(run::replicas::LeasedCheck {
                id,
                check,
                checker,
                deadline_ms,
            }),
            None => pending.push(check),
        }
    }
    Ok(run::Replicas::resume(pending, leased))
}

/// The rows of `run`'s checks by volunteers: waiting ones in order, then leased ones.
pub(crate) fn replica_rows(run: &run::Run) -> Vec<store::ReplicaRow> {
    let replicas = run.replicas();
    let row = |p: &run::replicas::PendingCheck, lease| store::ReplicaRow {
        unit: p.unit.id,
        worker: p.worker.to_string(),
        class: p.class.clone(),
        queued_ms: p.queued_ms,
        lease,
        disputed: p.disputed.map(|d| (d.check, d.checker.to_string())),
    };
    replicas
        .pending()
        .map(|p| row(p, None))
        .chain(
            replicas
                .leases()
                .map(|l| row(&l.check, Some((l.id, l.checker.to_string(), l.deadline_ms)))),
        )
        .collect()
}

/// Rows for a round that started, a unit that was leased, and the scheduler's state.
fn persist_effects(
    tx: &Tx<'_>,
    scheduler: &Scheduler,
    effects: &[Effect],
    now_ms: u64,
) -> Result<(), store::StoreError> {
    for effect in effects {
        match *effect {
            Effect::RoundStarted { round, version } => {
                let units: Vec<WorkUnit> = scheduler.units().map(|(u, _)| *u).collect();
                tx.start_round(round, version, now_ms, &units)?;
            }
            Effect::Lease {
                worker,
                unit,
                deadline_ms,
            } => {
                // A unit's first lease may have sized it for its worker (`unit_ms`).
                tx.put_unit(&unit)?;
                tx.insert_lease(unit.id, &worker.to_string(), now_ms, deadline_ms)?
            }
            _ => {}
        }
    }
    let json = serde_json::to_string(scheduler).map_err(|e| store::StoreError::BadRow {
        path: "scheduler".into(),
        what: "scheduler state",
        message: e.to_string(),
    })?;
    tx.set_meta(META_SCHEDULER, &json)
}

/// A version's safetensors bytes, with its version and round in the metadata.
fn checkpoint_bytes(
    model: &ModelSpec,
    trainable: &[f32],
    version: u64,
    round: Option<u64>,
    base_sha256: Option<&str>,
) -> Result<Vec<u8>, CoreError> {
    let mut meta = HashMap::new();
    meta.insert("hivetrain.version".to_owned(), version.to_string());
    if let Some(round) = round {
        meta.insert("hivetrain.round".to_owned(), round.to_string());
    }
    if let Some(sha) = base_sha256 {
        meta.insert(BASE_SHA256_METADATA_KEY.to_owned(), sha.to_owned());
    }
    engine::checkpoint::trained_to_bytes(model, trainable, &meta).map_err(|message| {
        CoreError::Inconsistent(format!("serializing version {version}: {message}"))
    })
}

/// Metadata key of a fine-tune's checkpoints: the SHA-256 of the base file the version's
/// trainable tensors go with (`hivetrain model export` checks it).
pub const BASE_SHA256_METADATA_KEY: &str = "hivetrain.base_sha256";
