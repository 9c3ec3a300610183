//! The coordinator's state and the one place that changes it: the scheduler, the current
//! model version, the round's accepted updates, the outer optimizer, and the store they
//! are persisted in.
//!
//! Every change follows the same order: compute the next scheduler state on a copy,
//! write blobs (fsynced), commit one transaction holding the rows and the scheduler's
//! serialized state, then swap the copy in. A crash at any point leaves the store at the
//! last committed transaction, which [`Core::open`] resumes from.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;

use aggregation::{OuterOptimizer, WeightedDelta};
use axum::http::StatusCode;
use ed25519_dalek::SigningKey;
use engine::train::OwnedBatch;
use engine::{Backend, GptConfig, ModelSpec, Preset, Purpose};
use ledger::{Draft, Ledger, Prepared};
use protocol::api::{LeaseReply, RoundStatus, RunInfo, Status, SubmitReply, UnitSpec};
use protocol::{SignedUpdate, UpdateHeader, WorkerId};
use scheduler::{Effect, Event, Scheduler, UnitStatus};
use store::{BlobHash, RejectionRow, Store, Tx, UnitRow, UpdateRow, VersionRow, WorkerRow};
use validation::{Inspected, LeaseState, Reject, RoundState, Verdict};

use crate::config::CoordinatorConfig;

pub mod checks;
pub mod retention;
pub mod serving;
use crate::error::ApiError;
pub use checks::{CheckJob, CheckOutcome, ScoreTask};

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

/// Refused payloads remembered per unit for agreement (a liar's refusal first must not
/// keep two honest workers from agreeing).
const REFUSED_PAYLOADS_KEPT: usize = 4;

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
    norm: f32,
}

/// The coordinator's state. Not `Sync`: the HTTP layer holds it behind one mutex.
pub struct Core {
    /// Held while the core is open: one process writes a run at a time (the ledger's
    /// next entry and the scheduler's state live in this process's memory).
    _lock: std::fs::File,
    config: CoordinatorConfig,
    store: Store,
    scheduler: Scheduler,
    /// The run's model: its architecture and which tensors a delta carries.
    model: ModelSpec,
    seq: usize,
    current: Current,
    outer: Box<dyn OuterOptimizer>,
    accepted: BTreeMap<u64, Accepted>,
    /// The norms of the updates the last aggregated round accepted: with this round's,
    /// the pool whose median bounds an update's norm (`median_norm`).
    previous_norms: Vec<f32>,
    evaluator: Box<dyn Backend>,
    holdout: Vec<OwnedBatch>,
    corpus: Arc<Vec<u8>>,
    tokenizer: Arc<Vec<u8>>,
    run_info: RunInfo,
    workers: HashSet<WorkerId>,
    initial_loss: f32,
    /// Credit for accepted work, spends and payouts; every entry is committed in the
    /// same transaction as what it is for.
    ledger: Ledger,
    /// Signs the ledger's entries and tree heads (`<dir>/ledger.key`).
    authority: SigningKey,
    text_tokenizer: Arc<data::TextTokenizer>,
    serving: serving::Serving,
    /// The train split (scoring batches and spot-check re-runs read it).
    train: Arc<Vec<u32>>,
    /// Consecutive verified units per worker.
    trust: HashMap<WorkerId, validation::spot_check::Trust>,
    /// Units waiting to be re-run (their rows say `queued`).
    check_queue: VecDeque<u64>,
    /// Units whose re-run did not match: kept out of any aggregate not yet formed.
    failed: HashSet<u64>,
    /// Own-data gains of the updates accepted on a base version (in memory: after a
    /// restart the median starts again from the next accepted update).
    gains: (u64, Vec<f32>),
    /// A version's random scoring batches and its loss on them, made once per version.
    random_loss: Option<(u64, Arc<Vec<OwnedBatch>>, f32)>,
    /// The first payloads refused on their score for each unit of the current round, and
    /// who sent them (in memory: after a restart, agreement starts again).
    refused_payloads: HashMap<u64, Vec<([u8; 32], WorkerId)>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("round", &self.scheduler.round())
            .field("version", &self.current.version)
            .finish()
    }
}

const META_CONFIG: &str = "config";
/// The ledger authority's key file, in the store's directory.
const LEDGER_KEY: &str = "ledger.key";

/// The ledger reference of the mint for an accepted update.
pub fn mint_reference(unit: u64) -> String {
    format!("update:{unit}")
}

/// Every accepted update has exactly one mint, and every mint is for an accepted update.
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
        .filter(|e| e.kind == ledger::Kind::Mint)
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
/// The blob hash of the run's tokenizer.json (the registry reads it).
pub const META_TOKENIZER: &str = "tokenizer";

/// The reply to an entry the ledger refuses.
fn ledger_refusal(e: ledger::LedgerError) -> ApiError {
    match e {
        ledger::LedgerError::Insufficient { .. } => ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_credit",
            e.to_string(),
        ),
        ledger::LedgerError::Conflict { .. } => conflict("reference_reused", e.to_string()),
        ledger::LedgerError::Shape { .. } | ledger::LedgerError::NoSuchMint(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_entry", e.to_string())
        }
        ledger::LedgerError::Overflow | ledger::LedgerError::Stale { .. } => ApiError::internal(&e),
    }
}

fn conflict(code: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, code, message)
}

impl Core {
    /// Opens the run stored in `dir`, or creates it from `config` (version 0 from the
    /// seed). A run that was mid-round resumes that round; one that was aggregating
    /// aggregates again.
    pub fn open(dir: &Path, config: CoordinatorConfig, now_ms: u64) -> Result<Core, CoreError> {
        config.check()?;
        let lock = lock_dir(dir)?;
        let tokenizer_bytes =
            std::fs::read(&config.tokenizer).map_err(|source| data::DataError::Read {
                path: config.tokenizer.clone(),
                source,
            })?;
        let tokenizer = data::TextTokenizer::load(&config.tokenizer)?;
        let corpus = std::fs::read(&config.corpus).map_err(|source| data::DataError::Read {
            path: config.corpus.clone(),
            source,
        })?;
        let tokens = data::cache::load_or_build(&config.corpus, &tokenizer, &dir.join("cache"))?;
        let preset = Preset::from_name(&config.preset)
            .ok_or_else(|| crate::config::ConfigError::Invalid("unknown preset".into()))?;
        let model = ModelSpec::preset(preset, tokenizer.vocab_size());
        let seq = if config.seq == 0 {
            model.n_ctx()
        } else {
            config.seq as usize
        };
        if seq > model.n_ctx() {
            return Err(crate::config::ConfigError::Invalid(format!(
                "seq {seq} exceeds the {} preset's context of {}",
                config.preset,
                model.n_ctx()
            ))
            .into());
        }
        let dataset = data::Dataset::split(&config.corpus, &tokens.tokens, seq)?;
        let batch = config.batch as usize;
        let holdout: Vec<OwnedBatch> = dataset
            .holdout_starts(seq, config.holdout_batches as usize * batch)
            .chunks(batch)
            .map(|starts| owned(data::address::batch_at(&dataset.holdout, starts, seq)))
            .collect();
        let n_params = model.n_params();
        let mut evaluator = engine::open_model(
            &config.devices.holdout,
            &model,
            vec![0.0; n_params],
            Purpose::Eval,
        )?;
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
            .build_with(config.combine, model.trainable_len());
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
                let bytes = store.blobs().get(&row.checkpoint)?;
                let ckpt = engine::checkpoint::from_bytes(dir, &bytes, None)?;
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
                    params: Arc::new(ckpt.params),
                    checkpoint: Arc::new(bytes),
                    checkpoint_hash: row.checkpoint,
                };
                (scheduler, current, initial)
            }
            None => {
                let params = engine::init_params(model.gpt_config(), config.seed)?;
                evaluator.set_params(&params)?;
                let loss = engine::train::evaluate(evaluator.as_mut(), &holdout)?;
                let bytes = checkpoint_bytes(model.gpt_config(), &params, 0, None)?;
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

        let previous_norms = match scheduler.round().checked_sub(1) {
            Some(previous) => store
                .updates_of_round(previous)?
                .iter()
                .map(|row| row.norm)
                .collect(),
            None => Vec::new(),
        };
        let accepted = store
            .updates_of_round(scheduler.round())?
            .into_iter()
            .map(|row| {
                (
                    row.unit,
                    Accepted {
                        blob: row.blob,
                        weight: row.weight,
                        norm: row.norm,
                    },
                )
            })
            .collect();
        let workers = store
            .workers()?
            .iter()
            .filter_map(|w| WorkerId::parse(&w.id))
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
            .collect();
        let check_queue = store
            .checks(Some(store::CheckState::Queued))?
            .into_iter()
            .map(|c| c.unit)
            .collect();
        let failed = store
            .checks(Some(store::CheckState::Failed))?
            .into_iter()
            .map(|c| c.unit)
            .collect();
        let serving = serving::Serving::new(
            store.api_keys()?,
            store
                .meta(serving::META_DIVIDEND_FROM)?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            now_ms,
        )?;
        let run_info = RunInfo {
            preset: config.preset.clone(),
            n_params: model.trainable_len() as u32,
            model: model.clone(),
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
            version: current.version,
        };
        let mut core = Core {
            config,
            store,
            scheduler,
            model,
            seq,
            current,
            outer,
            accepted,
            previous_norms,
            evaluator,
            holdout,
            corpus: Arc::new(corpus),
            tokenizer: Arc::new(tokenizer_bytes),
            run_info,
            workers,
            initial_loss,
            ledger,
            authority,
            text_tokenizer: Arc::new(tokenizer),
            serving,
            train: Arc::new(dataset.train),
            trust,
            check_queue,
            failed,
            random_loss: None,
            gains: (u64::MAX, Vec::new()),
            refused_payloads: HashMap::new(),
            _lock: lock,
        };
        core.aggregate_if_pending(now_ms)?;
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
        self.scheduler.round()
    }

    /// The current parameters (for tests that compare models bit for bit).
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

    /// Registers (or renames) a worker.
    pub fn register(&mut self, worker: WorkerId, name: &str, now_ms: u64) -> Result<(), ApiError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_name",
                "a worker name must be 1 to 64 printable characters",
            ));
        }
        let row = WorkerRow {
            id: worker.to_string(),
            name: name.to_owned(),
            registered_ms: now_ms,
        };
        let full = self.workers.len() as u64 >= self.config.records.workers_max;
        let dropped = if full && !self.workers.contains(&worker) {
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
            .map_err(|e| ApiError::internal(&e))?;
        if let Some(old) = dropped {
            self.workers.remove(&old);
        }
        self.workers.insert(worker);
        Ok(())
    }

    /// The registration a new one replaces when `records.workers_max` are registered:
    /// the oldest of a worker that never had an update accepted and holds no lease now.
    /// Anyone can register any number of keys, so registrations that did nothing are
    /// what a flood is made of; a dropped worker that comes back is told
    /// `unknown_worker` and registers again.
    fn idle_registration(&self) -> Result<WorkerId, ApiError> {
        /// Registrations looked at per attempt (more holding leases than this is a
        /// network that needs a higher `records.workers_max`).
        const CANDIDATES: u64 = 64;
        let holders: HashSet<WorkerId> = self
            .scheduler
            .units()
            .filter_map(|(_, s)| match *s {
                UnitStatus::Leased { worker, .. } => Some(worker),
                _ => None,
            })
            .chain(self.scheduler.late().map(|l| l.worker))
            .collect();
        self.store
            .idle_workers(CANDIDATES)
            .map_err(|e| ApiError::internal(&e))?
            .iter()
            .filter_map(|id| WorkerId::parse(id))
            .find(|w| !holders.contains(w))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "registrations_full",
                    format!(
                        "the coordinator holds its most registrations ({}), all of workers that contributed or hold a lease; retry later",
                        self.config.records.workers_max
                    ),
                )
                .with_header(axum::http::header::RETRY_AFTER, "60")
            })
    }

    fn known(&self, worker: WorkerId) -> Result<(), ApiError> {
        if self.workers.contains(&worker) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "unknown_worker",
                format!("worker {worker} is not registered: POST /v1/workers first"),
            ))
        }
    }

    /// Gives the worker a unit, or tells it when to come back.
    pub fn lease(&mut self, worker: WorkerId, now_ms: u64) -> Result<LeaseReply, ApiError> {
        self.known(worker)?;
        let effects = self.advance(now_ms, &[Event::LeaseRequest { worker }], |_| Ok(()))?;
        let reply = effects.iter().find_map(|e| match *e {
            Effect::Lease {
                worker: w,
                unit,
                deadline_ms,
            } if w == worker => Some(LeaseReply::Lease {
                unit: unit_spec(&unit),
                model_blake3: self.current.checkpoint_hash.to_string(),
                lease_ms: deadline_ms.saturating_sub(now_ms),
                heartbeat_ms: (self.config.schedule.lease_ms / 3).max(1),
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

    /// Extends the worker's lease on `unit`.
    pub fn heartbeat(&mut self, worker: WorkerId, unit: u64, now_ms: u64) -> Result<(), ApiError> {
        self.known(worker)?;
        self.tick(now_ms)?;
        match self.scheduler.lease_view(unit) {
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
        let effects = self.advance(now_ms, &[Event::Heartbeat { worker, unit }], |_| Ok(()))?;
        self.after(&effects, now_ms)
    }

    /// Advances time: expires leases, times rounds out, aggregates when due.
    pub fn tick(&mut self, now_ms: u64) -> Result<(), ApiError> {
        let effects = self.advance(now_ms, &[], |_| Ok(()))?;
        self.after(&effects, now_ms)
    }

    /// Validates and, if accepted, stores one update: [`validation::inspect`], then
    /// [`Core::precheck`], the blob, and [`Core::accept`]. The HTTP server runs the same
    /// stages but holds the core's lock only for the two cheap ones.
    pub fn submit(&mut self, bytes: &[u8], now_ms: u64) -> Result<SubmitReply, ApiError> {
        let update = self.inspect(bytes, now_ms)?;
        let score = match self.precheck(&update, now_ms)? {
            Some(task) => {
                let delta = SignedUpdate::parse(bytes, &self.config.limits)
                    .and_then(|u| u.decode())
                    .map_err(|e| ApiError::internal(&e))?;
                Some(task.run(self.evaluator.as_mut(), &delta)?)
            }
            None => None,
        };
        let blob = BlobHash::from_digest(&update.address);
        self.store
            .blobs()
            .put_as(bytes, &blob)
            .map_err(|e| ApiError::internal(&e))?;
        self.accept(&update, &blob, bytes.len() as u64, score, now_ms)
    }

    /// The stage of validation that needs no round state, with its rejection recorded.
    /// (The HTTP server calls [`validation::inspect`] itself, outside the lock.)
    fn inspect(&mut self, bytes: &[u8], now_ms: u64) -> Result<Inspected, ApiError> {
        validation::inspect(bytes, &self.config.limits).or_else(|verdict| {
            self.reject(verdict, None, now_ms)
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
    ) -> Result<Option<ScoreTask>, ApiError> {
        // Expire what is due first, so the lease checked is the one that counts.
        self.tick(now_ms)?;
        match self.judge(update)? {
            // The same update accepted before, sent again: `accept` answers it as then.
            verdict @ Verdict::Rejected { .. }
                if self.accepted_reply(update, &verdict)?.is_some() =>
            {
                Ok(None)
            }
            Verdict::Accepted { work_unit, .. } => {
                let unit = self.scheduler.unit(work_unit).map(unit_spec);
                match unit {
                    Some(unit) => self.score_task(&unit, update.header.base_version),
                    None => Ok(None),
                }
            }
            verdict => self
                .reject(verdict, Some(&update.header), now_ms)
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
    ) -> Result<SubmitReply, ApiError> {
        self.tick(now_ms)?;
        let mut verdict = self.judge(update)?;
        if let Some(reply) = self.accepted_reply(update, &verdict)? {
            return Ok(reply);
        }
        let mut gain = None;
        let mut force_check = false;
        if let Verdict::Accepted { .. } = verdict
            && self.config.scoring.enabled
        {
            match score {
                Some(score) => {
                    let version = update.header.base_version;
                    let median = match &self.gains {
                        (v, gains) if *v == version => validation::score::median_gain(gains),
                        _ => None,
                    };
                    match self.config.scoring.judge(&score, median) {
                        Some(rejected) if self.agreed(update, &rejected) => force_check = true,
                        Some(rejected) => verdict = rejected,
                        None => gain = Some((version, score.own_gain())),
                    }
                }
                None => {
                    return Err(ApiError::internal(&std::io::Error::other(
                        "scoring is on, but the update was not scored",
                    )));
                }
            }
        }
        let (work_unit, worker, norm) = match verdict {
            Verdict::Accepted {
                work_unit,
                worker,
                norm,
            } => (work_unit, worker, norm),
            verdict => {
                let referenced = self
                    .store
                    .blob_referenced(blob)
                    .map_err(|e| ApiError::internal(&e))?;
                if !referenced {
                    self.store
                        .blobs()
                        .remove(blob)
                        .map_err(|e| ApiError::internal(&e))?;
                }
                return self
                    .reject(verdict, Some(&update.header), now_ms)
                    .map(|never| match never {});
            }
        };
        let base_version = update.header.base_version;
        let weight =
            self.config.schedule.steps_per_unit as u64 * self.config.batch as u64 * self.seq as u64;
        // Credit for the work the coordinator assigned (at least one micro-credit, so
        // every accepted update has its mint), committed with the update's row.
        let credit = ledger::credit_for_training(self.model.train_flops_per_token(), weight).max(1);
        let mint = match self.ledger.prepare(
            Draft::mint(worker, credit, mint_reference(work_unit)),
            now_ms,
            &self.authority,
        ) {
            Ok(Prepared::New(entry)) => *entry,
            Ok(Prepared::Existing(seq)) => {
                return Err(ApiError::internal(&CoreError::Inconsistent(format!(
                    "unit {work_unit} already has its mint, entry {seq}"
                ))));
            }
            Err(e) => return Err(ApiError::internal(&e)),
        };
        let row = UpdateRow {
            unit: work_unit,
            round: self.scheduler.round(),
            worker: worker.to_string(),
            base_version,
            blob: blob.clone(),
            bytes: n_bytes,
            norm,
            weight,
            received_ms: now_ms,
        };
        let check = self.sample_check(work_unit, worker, force_check);
        let payload = hex::encode(update.payload_hash);
        let effects = self.advance(
            now_ms,
            &[Event::UpdateAccepted {
                worker,
                unit: work_unit,
            }],
            |tx| {
                tx.insert_update(&row)?;
                tx.insert_payload(&payload, work_unit)?;
                if let Some(check) = &check {
                    tx.set_check(check)?;
                }
                tx.insert_entry(&mint)
            },
        )?;
        if let Some(store::CheckRow {
            state: store::CheckState::Queued,
            ..
        }) = check
        {
            self.check_queue.push_back(work_unit);
        }
        // The median bar is of updates on the current version (a late one's gain, on an
        // older base, is not comparable).
        if let Some((version, gain)) = gain.filter(|(v, _)| *v == self.current.version) {
            if self.gains.0 != version {
                self.gains = (version, Vec::new());
            }
            self.gains.1.push(gain);
        }
        self.ledger
            .commit(mint)
            .map_err(|e| ApiError::internal(&e))?;
        self.accepted.insert(
            work_unit,
            Accepted {
                blob: blob.clone(),
                weight,
                norm,
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

    /// A page of ledger entries from `from`, at most `limit` of them.
    pub fn ledger_page(&self, from: u64, limit: u64) -> ledger::wire::EntriesPage {
        let entries = self.ledger.entries();
        let size = entries.len() as u64;
        let start = from.min(size) as usize;
        let end = start + (limit.min(size - start as u64)) as usize;
        ledger::wire::EntriesPage {
            entries: entries[start..end].to_vec(),
            size,
            next: (end < entries.len()).then_some(end as u64),
        }
    }

    /// A signed head of the ledger's Merkle tree as it stands.
    pub fn tree_head(&self, now_ms: u64) -> ledger::TreeHead {
        self.ledger.tree_head(now_ms, &self.authority)
    }

    /// The inclusion proof of entry `seq` in the tree of the first `size` entries.
    pub fn inclusion_proof(
        &self,
        seq: u64,
        size: u64,
    ) -> Result<ledger::merkle::InclusionProof, ApiError> {
        let len = self.ledger.len() as u64;
        if size == 0 || size > len || seq >= size {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_such_entry",
                format!(
                    "no entry {seq} in a tree of {size} entries (the ledger holds {len}); take size from a tree head"
                ),
            ));
        }
        self.ledger
            .inclusion_proof(seq, size)
            .ok_or_else(|| ApiError::internal(&std::io::Error::other("proof out of range")))
    }

    /// A wallet's totals and its entries (the newest `newest` of them, or all).
    pub fn wallet(&self, wallet: WorkerId, newest: Option<usize>) -> ledger::wire::WalletView {
        self.ledger
            .wallet_view(&ledger::Account::Wallet(wallet), newest)
    }

    /// Wallets by credit earned, most first.
    pub fn leaderboard(&self) -> Result<Vec<ledger::wire::LeaderRow>, ApiError> {
        let names: HashMap<String, String> = self
            .store
            .workers()
            .map_err(|e| ApiError::internal(&e))?
            .into_iter()
            .map(|w| (w.id, w.name))
            .collect();
        let mut rows: Vec<ledger::wire::LeaderRow> = self
            .ledger
            .earned()
            .iter()
            .map(|(&w, &(earned, units))| ledger::wire::LeaderRow {
                wallet: w.to_string(),
                name: names.get(&w.to_string()).cloned().unwrap_or_default(),
                earned,
                units,
                balance: self.ledger.balance(&ledger::Account::Wallet(w)),
            })
            .collect();
        rows.sort_by(|a, b| b.earned.cmp(&a.earned).then(a.wallet.cmp(&b.wallet)));
        Ok(rows)
    }

    /// Network totals.
    pub fn stats(&self) -> Result<ledger::wire::Stats, ApiError> {
        let accepted = self
            .store
            .accepted_count()
            .map_err(|e| ApiError::internal(&e))?;
        let tokens_per_unit =
            self.config.schedule.steps_per_unit as u64 * self.config.batch as u64 * self.seq as u64;
        let saturate = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
        Ok(ledger::wire::Stats {
            entries: self.ledger.len() as u64,
            minted: saturate(self.ledger.minted()),
            burned: saturate(self.ledger.burned()),
            pool: self.ledger.balance(&ledger::Account::Pool),
            wallets: self
                .ledger
                .balances()
                .keys()
                .filter(|a| matches!(a, ledger::Account::Wallet(_)))
                .count() as u64,
            workers: self.workers.len() as u64,
            accepted_updates: accepted,
            tokens_trained: accepted * tokens_per_unit,
            current_version: self.current.version,
            head: self.ledger.head_hash(),
        })
    }

    /// Moves credit from the signer's wallet to another; repeating a transfer (same
    /// reference, recipient and amount) is a no-op that returns the first entry.
    pub fn transfer(
        &mut self,
        from: WorkerId,
        request: &ledger::wire::TransferRequest,
        now_ms: u64,
    ) -> Result<ledger::Entry, ApiError> {
        let bad =
            |code: &str, message: String| ApiError::new(StatusCode::BAD_REQUEST, code, message);
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
            && self.ledger.find(draft.kind, &draft.reference).is_none()
        {
            return Err(ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
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
    fn append(&mut self, draft: Draft, now_ms: u64) -> Result<ledger::Entry, ApiError> {
        let entry = match self.ledger.prepare(draft, now_ms, &self.authority) {
            Ok(Prepared::New(entry)) => *entry,
            Ok(Prepared::Existing(seq)) => return Ok(self.ledger.entries()[seq as usize].clone()),
            Err(e) => return Err(ledger_refusal(e)),
        };
        self.store
            .write(|tx| tx.insert_entry(&entry))
            .map_err(|e| ApiError::internal(&e))?;
        self.ledger
            .commit(entry.clone())
            .map_err(|e| ApiError::internal(&e))?;
        Ok(entry)
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
    fn judge(&self, update: &Inspected) -> Result<Verdict, ApiError> {
        let lease = self
            .scheduler
            .lease_view(update.header.work_unit)
            .map(|l| LeaseState {
                work_unit: l.unit,
                worker: l.worker,
                base_version: l.base_version,
                submitted: l.submitted,
            });
        let round = RoundState {
            current_version: self.current.version,
            max_staleness: self.config.schedule.max_staleness,
            n_params: self.run_info.n_params,
            delta_norm_max: self.config.delta_norm_max,
            median_norm: self.median_norm(),
            median_multiple_max: self.config.median_norm_multiple,
            check_values: !self.config.unchecked_values,
        };
        let verdict = validation::judge(update, &round, lease.as_ref());
        // A byte-equal copy is the cheapest copy to catch; like the score's own-data
        // margin it belongs to scoring (off, only a re-run finds it).
        if let (Verdict::Accepted { .. }, true) = (&verdict, self.config.scoring.enabled) {
            let seen = self
                .store
                .payload_unit(&hex::encode(update.payload_hash))
                .map_err(|e| ApiError::internal(&e))?;
            if let Some(unit) = seen {
                return Ok(Verdict::reject(
                    Reject::Copied,
                    format!(
                        "the update's values are those of the update already accepted for unit {unit}: send the delta of your own unit's training"
                    ),
                ));
            }
        }
        Ok(verdict)
    }

    /// Records a rejection and returns it as the reply. Rejections of signed updates are
    /// kept (attributable to a key); unsigned garbage is answered and forgotten, so it
    /// cannot fill the disk.
    fn reject(
        &mut self,
        verdict: Verdict,
        header: Option<&UpdateHeader>,
        now_ms: u64,
    ) -> Result<std::convert::Infallible, ApiError> {
        let Verdict::Rejected { reason, sentence } = verdict else {
            return Err(ApiError::from_verdict(verdict));
        };
        let signed = !matches!(
            reason,
            Reject::Malformed | Reject::HashMismatch | Reject::BadSignature | Reject::OutOfRange
        );
        if let (true, Some(h)) = (signed, header) {
            let worker = h.worker.to_string();
            let round = self.scheduler.round();
            // A key's rejections are recorded up to a bound a round, so that one key
            // sending garbage cannot fill the disk; the reply is the same past it.
            let record = self
                .store
                .rejections_of(&worker, round)
                .map_err(|e| ApiError::internal(&e))?
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
            };
            // A refused unit goes to another worker (the refusal row commits with it).
            let refused = reason.releases_unit()
                && self
                    .scheduler
                    .lease_view(h.work_unit)
                    .is_some_and(|l| l.worker == h.worker && !l.submitted);
            if refused {
                let event = Event::UpdateRefused {
                    worker: h.worker,
                    unit: h.work_unit,
                };
                let effects = self.advance(now_ms, &[event], |tx| {
                    if record {
                        tx.insert_rejection(&row)?;
                        tx.trim_rejections(kept)?;
                    }
                    Ok(())
                })?;
                self.after(&effects, now_ms)?;
            } else if record {
                self.store
                    .write(|tx| {
                        tx.insert_rejection(&row)?;
                        tx.trim_rejections(kept)
                    })
                    .map_err(|e| ApiError::internal(&e))?;
            }
        }
        if !signed || header.is_none() {
            tracing::debug!(code = reason.code(), "unsigned update refused: {sentence}");
        }
        Err(ApiError::rejected(reason, sentence))
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
    ) -> Result<Option<SubmitReply>, ApiError> {
        if !matches!(verdict, Verdict::Rejected { .. }) {
            return Ok(None);
        }
        let internal = |e: store::StoreError| ApiError::internal(&e);
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

    /// Whether a scored refusal is overridden because another worker sent the same bytes
    /// for the same unit and was refused alike: training is deterministic, so two keys
    /// agreeing bit for bit is what a re-run shows, and the unit's data, not the
    /// workers, is what scores low. The update is accepted with a re-run forced, so two
    /// colluding keys agreeing on a lie are still caught and clawed back. Harmful updates
    /// are never overridden, and nothing is without re-runs. Remembers this refusal
    /// otherwise.
    fn agreed(&mut self, update: &Inspected, rejected: &Verdict) -> bool {
        let Verdict::Rejected { reason, .. } = rejected else {
            return false;
        };
        if !matches!(reason, Reject::NoProgress | Reject::NotOwnData)
            || !self.config.spot_check.enabled
        {
            return false;
        }
        let (unit, worker) = (update.header.work_unit, update.header.worker);
        let seen = self.refused_payloads.entry(unit).or_default();
        if seen
            .iter()
            .any(|(hash, other)| *hash == update.payload_hash && *other != worker)
        {
            return true;
        }
        if seen.len() < REFUSED_PAYLOADS_KEPT {
            seen.push((update.payload_hash, worker));
        }
        false
    }

    /// The lower middle of the norms this round and the last aggregated one accepted
    /// (`None` before any). The last round's norms make the first updates of a round
    /// meet a bar that honest work set, so an outlier that arrives first cannot set the
    /// bar itself; the lower middle keeps one outlier of two from setting it either.
    fn median_norm(&self) -> Option<f32> {
        let mut norms: Vec<f32> = self
            .previous_norms
            .iter()
            .copied()
            .chain(self.accepted.values().map(|a| a.norm))
            .collect();
        if norms.is_empty() {
            return None;
        }
        norms.sort_by(f32::total_cmp);
        Some(norms[(norms.len() - 1) / 2])
    }

    /// Ticks a copy of the scheduler, commits its effects, `extra` and its state in one
    /// transaction, then keeps the copy.
    fn advance(
        &mut self,
        now_ms: u64,
        events: &[Event],
        extra: impl FnOnce(&Tx<'_>) -> Result<(), store::StoreError>,
    ) -> Result<Vec<Effect>, ApiError> {
        let mut next = self.scheduler.clone();
        let effects = next.tick(now_ms, self.config.seed, events);
        if next != self.scheduler {
            self.store
                .write(|tx| {
                    extra(tx)?;
                    persist_effects(tx, &next, &effects, now_ms)
                })
                .map_err(|e| ApiError::internal(&e))?;
            self.scheduler = next;
        }
        Ok(effects)
    }

    /// Acts on effects that need more than a reply.
    fn after(&mut self, effects: &[Effect], now_ms: u64) -> Result<(), ApiError> {
        if effects
            .iter()
            .any(|e| matches!(e, Effect::Aggregate { .. }))
        {
            self.aggregate_if_pending(now_ms)
                .map_err(|e| ApiError::internal(&e))?;
        }
        Ok(())
    }

    /// Aggregates the round the scheduler waits on, if any, into the next version.
    fn aggregate_if_pending(&mut self, now_ms: u64) -> Result<(), CoreError> {
        let Some((round, base_version)) = self.scheduler.pending_aggregate() else {
            return Ok(());
        };
        if base_version != self.current.version {
            return Err(CoreError::Inconsistent(format!(
                "round {round} is based on version {base_version}, the model is at {}",
                self.current.version
            )));
        }
        // Only units the scheduler counts in this round enter the mean (its own accepted
        // units and late ones of earlier rounds accepted during it), less those whose
        // spot-check already failed.
        let units: Vec<u64> = self
            .scheduler
            .round_updates()
            .into_iter()
            .filter(|u| !self.failed.contains(u))
            .collect();
        let mut deltas = Vec::with_capacity(units.len());
        for unit in &units {
            let a = self.accepted.get(unit).ok_or_else(|| {
                CoreError::Inconsistent(format!(
                    "round {round} counts unit {unit} as accepted but holds no update for it"
                ))
            })?;
            let bytes = self.update_bytes(&a.blob)?;
            let delta = SignedUpdate::parse(&bytes, &self.config.limits)
                .and_then(|u| u.decode())
                .map_err(|e| CoreError::Inconsistent(format!("stored update {unit}: {e}")))?;
            deltas.push((delta, a.weight));
        }
        let updates: Vec<WeightedDelta<'_>> = deltas
            .iter()
            .map(|(delta, weight)| WeightedDelta {
                delta,
                weight: *weight,
            })
            .collect();
        let saved = self.outer.state();
        let mut params = (*self.current.params).clone();
        self.outer.step(&mut params, &updates)?;
        let result = self.commit_version(round, units, params, now_ms);
        if result.is_err() {
            self.outer.load_state(&saved)?;
        }
        result
    }

    fn commit_version(
        &mut self,
        round: u64,
        units: Vec<u64>,
        params: Vec<f32>,
        now_ms: u64,
    ) -> Result<(), CoreError> {
        let version = self.current.version + 1;
        self.evaluator.set_params(&params)?;
        let loss = engine::train::evaluate(self.evaluator.as_mut(), &self.holdout)?;
        // A diverged model (only a run with unchecked values can make one) scores as
        // infinitely bad: SQLite keeps no NaN.
        let loss = if loss.is_nan() { f32::INFINITY } else { loss };
        let bytes = checkpoint_bytes(self.model.gpt_config(), &params, version, Some(round))?;
        let checkpoint = self.store.blobs().put(&bytes)?;
        let state: Vec<u8> = self
            .outer
            .state()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let optimizer = self.store.blobs().put(&state)?;
        let row = VersionRow {
            version,
            parent: Some(self.current.version),
            round: Some(round),
            checkpoint: checkpoint.clone(),
            optimizer: Some(optimizer),
            holdout_loss: loss,
            created_ms: now_ms,
            updates: units,
            checkpoint_pruned_ms: None,
            optimizer_pruned_ms: None,
        };
        let mut next = self.scheduler.clone();
        let effects = next.tick(
            now_ms,
            self.config.seed,
            &[Event::Aggregated { round, version }],
        );
        // What the new version makes unneeded is marked with it, and removed after.
        let prune = self.retention_plan(&row, next.round())?;
        self.store.write(|tx| {
            tx.insert_version(&row)?;
            retention::mark(tx, &prune, now_ms)?;
            persist_effects(tx, &next, &effects, now_ms)
        })?;
        self.scheduler = next;
        self.current = Current {
            version,
            params: Arc::new(params),
            checkpoint: Arc::new(bytes),
            checkpoint_hash: checkpoint,
        };
        self.previous_norms = self.accepted.values().map(|a| a.norm).collect();
        self.accepted.clear();
        self.refused_payloads.clear();
        self.remove_pruned(&prune);
        Ok(())
    }

    /// The checkpoint of `version` and its blake3 (410 `version_pruned` when the
    /// retention policy removed it).
    pub fn model(&self, version: u64) -> Result<(Arc<Vec<u8>>, String), ApiError> {
        if version == self.current.version {
            return Ok((
                self.current.checkpoint.clone(),
                self.current.checkpoint_hash.to_string(),
            ));
        }
        let unknown = || {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_version",
                format!(
                    "there is no model version {version}; the newest is {}",
                    self.current.version
                ),
            )
        };
        // Versions after the current one do not exist yet: no store read for them (and
        // none for a number the store cannot hold).
        if version > self.current.version {
            return Err(unknown());
        }
        let row = self
            .store
            .version(version)
            .map_err(|e| ApiError::internal(&e))?
            .ok_or_else(unknown)?;
        if row.checkpoint_pruned_ms.is_some() {
            return Err(self.pruned_reply(version));
        }
        let bytes = self
            .store
            .blobs()
            .get(&row.checkpoint)
            .map_err(|e| ApiError::internal(&e))?;
        Ok((Arc::new(bytes), row.checkpoint.to_string()))
    }

    /// The run's progress, round by round.
    pub fn status(&self, now_ms: u64, newest: Option<u64>) -> Result<Status, ApiError> {
        let internal = |e: store::StoreError| ApiError::internal(&e);
        let round = self.scheduler.round();
        let first = newest.map_or(0, |n| (round + 1).saturating_sub(n));
        let rounds = self
            .store
            .rounds_from(first)
            .map_err(internal)?
            .into_iter()
            .map(|r| RoundStatus {
                round: r.round,
                base_version: r.base_version,
                version: r.version,
                holdout_loss: r.holdout_loss,
                accepted: r.accepted,
                rejected: r.rejected,
                tokens: r.tokens,
                bytes: r.bytes,
                seconds: r
                    .aggregated_ms
                    .unwrap_or(now_ms)
                    .saturating_sub(r.started_ms) as f64
                    / 1000.0,
            })
            .collect();
        let count = |f: fn(&UnitStatus) -> bool| {
            self.scheduler.units().filter(|(_, s)| f(s)).count() as u32
        };
        Ok(Status {
            round,
            version: self.current.version,
            initial_holdout_loss: self.initial_loss,
            workers: self.workers.len() as u64,
            units_queued: count(|s| matches!(s, UnitStatus::Queued)),
            units_leased: count(|s| matches!(s, UnitStatus::Leased { .. })),
            units_accepted: count(|s| matches!(s, UnitStatus::Accepted { .. })),
            rounds,
        })
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

/// A batch of token ids as the engine takes it.
fn owned(b: data::TokenBatch) -> OwnedBatch {
    OwnedBatch {
        inputs: b.inputs,
        targets: b.targets,
        batch: b.batch,
        seq: b.seq,
    }
}

/// A scheduler's unit as the wire names it.
fn unit_spec(unit: &scheduler::WorkUnit) -> UnitSpec {
    UnitSpec {
        id: unit.id,
        round: unit.round,
        base_version: unit.base_version,
        shard: unit.address.shard,
        offset: unit.address.offset,
        steps: unit.address.steps,
        seed: unit.address.seed,
        lr: unit.lr,
    }
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
                let units: Vec<UnitRow> = scheduler
                    .units()
                    .map(|(u, _)| UnitRow {
                        id: u.id,
                        round: u.round,
                        base_version: u.base_version,
                        shard: u.address.shard,
                        offset: u.address.offset,
                        steps: u.address.steps,
                        seed: u.address.seed,
                        lr: u.lr,
                    })
                    .collect();
                tx.start_round(round, version, now_ms, &units)?;
            }
            Effect::Lease {
                worker,
                unit,
                deadline_ms,
            } => tx.insert_lease(unit.id, &worker.to_string(), now_ms, deadline_ms)?,
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
    model: &GptConfig,
    params: &[f32],
    version: u64,
    round: Option<u64>,
) -> Result<Vec<u8>, CoreError> {
    let mut meta = HashMap::new();
    meta.insert("hivetrain.version".to_owned(), version.to_string());
    if let Some(round) = round {
        meta.insert("hivetrain.round".to_owned(), round.to_string());
    }
    engine::checkpoint::to_bytes(model, params, &meta).map_err(|message| {
        CoreError::Inconsistent(format!("serializing version {version}: {message}"))
    })
}
