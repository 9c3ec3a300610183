//! The coordinator's knobs, in one struct: defaults that work on a laptop, overridable by
//! a TOML file, then by environment variables and flags (the CLI applies those).

use std::path::{Path, PathBuf};

use aggregation::{Combine, OuterConfig};
use protocol::{Codec, Limits};
use scheduler::ScheduleConfig;
use serde::{Deserialize, Serialize};

/// Everything that defines a training run and how the coordinator runs it.
///
/// The run-defining part (model, data, schedule, codec, outer optimizer) is stored with
/// the run when it is created; a restarted coordinator must be given the same values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Model preset: `tiny`, `small`, `medium` or `base` (a model trained from scratch;
    /// not used by a fine-tune).
    pub preset: String,
    /// Fine-tune a pretrained model instead of training `preset` from scratch: the base
    /// brings its shape and its tokenizer (`preset` and `tokenizer` are then not used).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finetune: Option<FinetuneConfig>,
    /// Seed of the initial weights and of the units' data seeds.
    pub seed: u64,
    /// Corpus file (text or JSON lines) served to workers.
    pub corpus: PathBuf,
    /// tokenizer.json served to workers.
    pub tokenizer: PathBuf,
    /// Sequences per local step.
    pub batch: u32,
    /// Tokens per sequence (0: the model's context).
    pub seq: u32,
    /// Rounds, units, leases, H, inner learning rate, shards, MAX_STALENESS.
    pub schedule: ScheduleConfig,
    /// The outer optimizer (DiLoCo by default).
    pub outer: OuterConfig,
    /// How the round's deltas are combined before the outer step: the weighted mean, or a
    /// Byzantine-robust rule (`aggregation::robust`).
    pub combine: Combine,
    /// The codec workers encode updates with.
    pub codec: Codec,
    /// DELTA_NORM_MAX: largest accepted L2 norm of an update.
    pub delta_norm_max: f32,
    /// Largest accepted multiple of the median update norm (the lower middle of the
    /// norms accepted in this round and the last aggregated one).
    pub median_norm_multiple: f32,
    /// Holdout batches scored for every version.
    pub holdout_batches: u32,
    /// Where the coordinator's own computations run: holdout evaluation, scoring,
    /// re-runs and serving. Not part of the run's identity (CPU results are the same bits
    /// at any thread count).
    pub devices: DevicesConfig,
    /// Replaced by `devices.holdout`: refused when set (with a sentence naming the new
    /// key). Kept so that a run stored before devices existed still reads back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Largest clock difference accepted in a signed request, in ms.
    pub max_clock_skew_ms: u64,
    /// Sizes checked before anything is allocated.
    pub limits: Limits,
    /// The inference API: prices, rate limit, dividends. Not part of the run's identity:
    /// a restarted coordinator may change it.
    pub serving: ServingConfig,
    /// Scored updates: the loss before and after applying each update alone. Not part of
    /// the run's identity.
    pub scoring: validation::score::ScorePolicy,
    /// Replay spot-checks of accepted units. Not part of the run's identity.
    pub spot_check: SpotCheckConfig,
    /// Bounds on what anyone with a key can make the coordinator keep. Not part of the
    /// run's identity.
    pub records: RecordLimits,
    /// Connections and request bodies: deadlines and caps. Not part of the run's identity.
    pub http: HttpLimits,
    /// Which checkpoints, optimizer states and update blobs stay on disk. Not part of
    /// the run's identity: a restarted coordinator may keep more or fewer.
    pub retention: RetentionConfig,
    /// Take every well-formed update's values unchecked: no finiteness check, no norm
    /// bounds. Only the simulator's plain-mean baseline sets it, to show what an attack
    /// does to a mean that takes whatever it is sent; no file, variable or flag can.
    #[serde(skip)]
    pub unchecked_values: bool,
}

/// A fine-tune of a pretrained model: the base file, what trains, and how the corpus
/// reads. The base is named by the SHA-256 of its bytes, stored with the run: a
/// restarted coordinator refuses a file whose bytes changed, and workers fetch it once
/// (`GET /v1/run/base`) and check that hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// The pretrained base: a GGUF file (`hivetrain model fetch` caches SmolLM2's).
    pub base: PathBuf,
    /// A LoRA adapter trained on the frozen base (rank, alpha, target projections);
    /// left out, every weight trains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<engine::LoraConfig>,
    /// `chat` (JSON lines of `{"messages": [...]}`, rendered through the base's chat
    /// template, the loss on the assistant's turns) or `text` (tokenized by the base's
    /// tokenizer into one stream).
    #[serde(default = "chat")]
    pub data: protocol::api::DataFormat,
}

fn chat() -> protocol::api::DataFormat {
    protocol::api::DataFormat::Chat
}

/// Which accepted units are re-run and compared, and by how many threads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpotCheckConfig {
    /// Re-run sampled units (off: accepted units are never checked).
    pub enabled: bool,
    /// Consecutive verified units after which a worker's units are checked with
    /// probability 1 / that count (BOINC's adaptive replication).
    pub trusted_after: u64,
    /// Largest relative L2 distance between an update and its re-run that still counts
    /// as a match. 0: bit-exact, which CPU training on the same CPU model guarantees;
    /// workers on other CPUs (other `gemm` kernels) or GPUs need a tolerance.
    pub tolerance: f32,
    /// The same for a worker of another determinism class than the coordinator's CPU
    /// (another `gemm` kernel path or cache size), or one that reported none: the larger
    /// of this and `tolerance` applies. Default: `engine::CROSS_CLASS_REPLAY_TOLERANCE`,
    /// calibrated from measured honest differences (ARCHITECTURE.md, Determinism).
    pub cross_class_tolerance: f32,
    /// The same for a GPU worker's unit re-run on the coordinator's CPU (bf16 against
    /// f32): `engine::GPU_CPU_REPLAY_TOLERANCE`, from the differences measured in a run.
    pub gpu_tolerance: f32,
    /// Most units waiting to be re-run; units sampled beyond it stay unchecked (and are
    /// re-checked if their worker is later caught).
    pub max_backlog: u32,
    /// Send every sampled unit's re-run to a volunteer of its worker's class (BOINC's
    /// replication), even when the worker is of the coordinator's own CPU class. Off, a
    /// unit goes to a volunteer only when its worker reported another class than the
    /// coordinator's CPU (ARCHITECTURE.md, "Determinism").
    pub replicate: bool,
    /// How long a check waits for a volunteer of its class before the coordinator
    /// re-runs it itself (within the cross-class tolerance), in ms.
    pub replica_wait_ms: u64,
    /// Replaced by `devices.replay`: refused when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
}

/// Device names (`cpu` for every core, `cpu:N` for N threads; the engine checks them at
/// start) of the coordinator's four kinds of model work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevicesConfig {
    /// Each new version's loss on the holdout batches (forward only).
    pub holdout: String,
    /// Scored updates: the losses before and after one update alone (forward only; a
    /// backend per update scored at once, from a pool of at most `scoring_memory_mb`).
    pub scoring: String,
    /// Replay spot-checks: re-training a unit (a training backend, with optimizer state).
    pub replay: String,
    /// Generations of the inference API (forward only; one backend per generation).
    pub serving: String,
    /// Memory the scoring backends and the replay checker may hold, in MB: the
    /// coordinator takes the replay checker's one training backend off this budget (when
    /// spot-checks are on) and opens at most the rest over one evaluation backend's bytes
    /// (`engine::backend_bytes` at the run's model and batch), at least one and at most
    /// `http.upload_concurrency`. Left out: a
    /// quarter of the machine's available memory, at most 4096 MB (1024 MB where
    /// /proc/meminfo cannot be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scoring_memory_mb: Option<u64>,
}

/// Largest `devices.scoring_memory_mb`: 16 TiB, past any machine's memory (a larger
/// number is a typo, such as bytes given for MB).
pub const SCORING_MEMORY_MB_MAX: u64 = 16 * 1024 * 1024;

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            holdout: "cpu".into(),
            scoring: "cpu:1".into(),
            replay: "cpu:1".into(),
            serving: "cpu:1".into(),
            scoring_memory_mb: None,
        }
    }
}

impl Default for SpotCheckConfig {
    fn default() -> Self {
        SpotCheckConfig {
            enabled: true,
            trusted_after: 10,
            tolerance: 0.0,
            cross_class_tolerance: engine::CROSS_CLASS_REPLAY_TOLERANCE,
            gpu_tolerance: engine::GPU_CPU_REPLAY_TOLERANCE,
            max_backlog: 10_000,
            replicate: false,
            replica_wait_ms: 600_000,
            threads: None,
        }
    }
}

/// Bounds on the rows that keys anyone can make leave behind: registrations and
/// rejection records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecordLimits {
    /// Most registered workers. Past it, a new registration drops the oldest one that
    /// never had an update accepted and holds no lease (its worker registers again when
    /// told `unknown_worker`); if there is none, it is refused with 503
    /// `registrations_full`.
    pub workers_max: u64,
    /// Most rejection records kept, over all keys and rounds (each key also has at most
    /// `MAX_REJECTIONS_RECORDED` a round); the oldest go first.
    pub rejections_max: u64,
}

impl Default for RecordLimits {
    fn default() -> Self {
        RecordLimits {
            workers_max: 100_000,
            rejections_max: 100_000,
        }
    }
}

/// What one client can hold of the server: open connections, time, upload buffers.
/// Every connection is admitted under a permit, and every read has a deadline; a slow or
/// silent client is cut at its deadline and never holds more than its permit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Most connections open at once. Past it, new connections wait in the kernel's
    /// accept queue until one closes (the descriptor limit is raised to fit at start).
    pub max_connections: u32,
    /// Longest wait for a request's head (its line and headers), from when the server
    /// starts waiting for it: at the connection's open and after each reply. So it is
    /// also how long a connection may sit idle, new or between requests.
    pub header_timeout_ms: u64,
    /// Longest wait for a request body, beyond the time its bytes take at
    /// `body_min_bytes_per_s`: a body must arrive in full within `body_timeout_ms` +
    /// bytes / `body_min_bytes_per_s` of the handler starting to read it (else 408
    /// `body_timeout`).
    pub body_timeout_ms: u64,
    /// The slowest upload rate a body is given time for, in bytes a second.
    pub body_min_bytes_per_s: u64,
    /// Longest a reply may wait on a client that takes none of its bytes; then the
    /// connection is closed.
    pub send_timeout_ms: u64,
    /// Update bodies read at once, each into a buffer of the run's update size (more get
    /// 503 `uploads_busy` with `Retry-After`). With it, the update buffers never hold more
    /// than this many updates' bytes.
    pub upload_concurrency: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 512,
            header_timeout_ms: 20_000,
            body_timeout_ms: 30_000,
            body_min_bytes_per_s: 64 * 1024,
            send_timeout_ms: 30_000,
            upload_concurrency: 8,
        }
    }
}

/// Which blobs the coordinator keeps as the run goes; applied at each new version. Rows
/// are never removed: a pruned version stays in the registry, marked, and
/// `GET /v1/models/{v}` answers 410 `version_pruned` for it.
///
/// Always kept, whatever the numbers: version 0, the newest `max_staleness + 1`
/// versions (late workers train on them), the current optimizer state (all a restart
/// needs), the current round's updates, every update with a queued re-run, and the base
/// version of every update kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Prune as the run goes (off: every blob is kept, as before retention existed).
    pub enabled: bool,
    /// Checkpoints of the newest versions kept (at least 1).
    pub keep_last: u32,
    /// Every version that is a multiple of this keeps its checkpoint for good (0: none).
    pub keep_every: u32,
    /// Rounds before the current one whose update blobs are kept, so that a worker
    /// caught lying has its units of that window re-run and clawed back. An older unit
    /// cannot be re-run: its check is recorded as `skipped`.
    pub update_rounds: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        // At the `small` preset (21 MB a checkpoint, 42 MB an optimizer state, 5 MB an
        // int8 update) and the demo's 2 updates a round, this keeps about 0.6 GB once 17
        // rounds have passed and adds one 21 MB checkpoint every 100 versions: about
        // 30 MB an hour at 25 s a round, where keeping everything took 10.7 GB (README,
        // "Disk use").
        RetentionConfig {
            enabled: true,
            keep_last: 4,
            keep_every: 100,
            update_rounds: 16,
        }
    }
}

/// How the coordinator serves the model and charges for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServingConfig {
    /// Micro-credits per prompt token.
    pub price_prompt_token: u64,
    /// Micro-credits per generated token.
    pub price_output_token: u64,
    /// Requests a minute one API key may make (a burst of this many, refilled evenly).
    pub requests_per_minute: u32,
    /// Largest `max_tokens` of a request.
    pub max_tokens: u64,
    /// Longest prompt, in tokens.
    pub max_prompt_tokens: u64,
    /// Replaced by `devices.serving`: refused when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Generations that run at once (more wait, then get 503 `busy`).
    pub concurrency: u32,
    /// Seconds between payouts of the query-revenue pool as dividends (0: never).
    pub dividend_interval_s: u64,
    /// How long the reply to a request with an `Idempotency-Key` is kept to answer its
    /// retries; after that the key is refused (`idempotency_key_expired`), never served
    /// again for free.
    pub idempotency_retention_s: u64,
    /// Most stored replies per wallet; past it the oldest are dropped (their keys are
    /// then refused as expired).
    pub idempotent_replies_per_wallet_max: u64,
    /// Most live API keys per wallet; past it a new key is refused (`too_many_api_keys`)
    /// until one is revoked.
    pub api_keys_per_wallet_max: u32,
}

impl Default for ServingConfig {
    fn default() -> Self {
        ServingConfig {
            price_prompt_token: 1,
            price_output_token: 2,
            requests_per_minute: 60,
            max_tokens: 1024,
            max_prompt_tokens: 4096,
            threads: None,
            concurrency: 2,
            dividend_interval_s: 3600,
            idempotency_retention_s: 86_400,
            idempotent_replies_per_wallet_max: 1000,
            api_keys_per_wallet_max: 16,
        }
    }
}

impl ServingConfig {
    /// The price of a request, in micro-credits.
    pub fn price(&self, prompt_tokens: u64, completion_tokens: u64) -> u64 {
        prompt_tokens
            .saturating_mul(self.price_prompt_token)
            .saturating_add(completion_tokens.saturating_mul(self.price_output_token))
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            preset: "small".into(),
            finetune: None,
            seed: 1,
            corpus: PathBuf::from("data/shakespeare.txt"),
            tokenizer: PathBuf::from("data/tokenizer.json"),
            batch: 8,
            seq: 0,
            schedule: ScheduleConfig::default(),
            outer: OuterConfig::default(),
            // Chosen by the attack sweep (BENCHMARKS.md, "Dishonest volunteers"): the only
            // rule that held IPM at 44% with scoring off, at 0.1% of clean loss.
            combine: Combine::CenteredClip {
                radius: 1.0,
                iters: 3,
            },
            codec: Codec::Int8Chunk { chunk: 4096 },
            delta_norm_max: 1_000.0,
            median_norm_multiple: 5.0,
            holdout_batches: 8,
            devices: DevicesConfig::default(),
            threads: None,
            max_clock_skew_ms: 300_000,
            limits: Limits::default(),
            serving: ServingConfig::default(),
            scoring: validation::score::ScorePolicy::default(),
            spot_check: SpotCheckConfig::default(),
            records: RecordLimits::default(),
            http: HttpLimits::default(),
            retention: RetentionConfig::default(),
            unchecked_values: false,
        }
    }
}

/// Why a config file or value is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl CoordinatorConfig {
    /// The fine-tune demo's run, sized for two cores (BENCHMARKS.md, "The fine-tune
    /// demo"): the GGUF `base` with a LoRA adapter (rank 8, alpha 16, all seven
    /// projections) on `data/shakespeare-chat.jsonl`, windows of 256 tokens, batches of 2,
    /// H = 4 at inner lr 1e-3, DiLoCo's default outer step (momentum 0.5), re-runs of each worker's first
    /// two units and then one in two. `hivetrain demo --finetune` and `cargo xtask bench
    /// finetune` both run it.
    pub fn finetune_demo(mut self, base: PathBuf) -> CoordinatorConfig {
        self.finetune = Some(FinetuneConfig {
            base,
            lora: Some(engine::LoraConfig {
                rank: 8,
                alpha: 16.0,
                targets: engine::LoraTarget::ALL.to_vec(),
            }),
            data: protocol::api::DataFormat::Chat,
        });
        self.corpus = PathBuf::from("data/shakespeare-chat.jsonl");
        self.seq = 256;
        self.batch = 2;
        self.holdout_batches = 4;
        self.schedule.steps_per_unit = 4;
        self.schedule.inner_lr = 1e-3;
        self.outer = aggregation::OuterConfig::default();
        // A re-run trains a whole unit again on two cores: check each worker's first two
        // units, then one in two.
        self.spot_check.trusted_after = 2;
        self
    }

    /// Reads a TOML file; keys it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<CoordinatorConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The JSON that identifies the run (everything but `serving`, `scoring`,
    /// `spot_check`, `records`, `http`, `retention` and `devices`), stored with it and
    /// compared on restart.
    pub fn identity_json(&self) -> String {
        let identity = CoordinatorConfig {
            devices: DevicesConfig::default(),
            threads: None,
            serving: ServingConfig::default(),
            scoring: validation::score::ScorePolicy::default(),
            spot_check: SpotCheckConfig::default(),
            records: RecordLimits::default(),
            http: HttpLimits::default(),
            retention: RetentionConfig::default(),
            ..self.clone()
        };
        serde_json::to_string(&identity).unwrap_or_default()
    }

    /// Whether `stored`, a run's stored [`CoordinatorConfig::identity_json`], names the
    /// same run as this config. The stored JSON is read back as a config first, so a
    /// run stored before a setting existed takes that setting's default (and a setting
    /// that left the identity no longer counts).
    pub fn same_run_as(&self, stored: &str) -> bool {
        match serde_json::from_str::<CoordinatorConfig>(stored) {
            Ok(stored) => stored.identity_json() == self.identity_json(),
            Err(_) => stored == self.identity_json(),
        }
    }

    /// The config as TOML (for `hivetrain coordinator --print-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}"))
    }

    /// Checks values that no run can use.
    pub fn check(&self) -> Result<(), ConfigError> {
        let s = &self.schedule;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        let replaced = [
            (self.threads.is_some(), "threads", "devices.holdout"),
            (
                self.spot_check.threads.is_some(),
                "spot_check.threads",
                "devices.replay",
            ),
            (
                self.serving.threads.is_some(),
                "serving.threads",
                "devices.serving",
            ),
        ];
        if let Some((_, old, new)) = replaced.iter().find(|(set, _, _)| *set) {
            return bad(&format!(
                "`{old}` was replaced by `{new}`, a device name: \"cpu\" for every core or \"cpu:N\" for N threads (e.g. {new} = \"cpu:2\")"
            ));
        }
        let devices = &self.devices;
        for (key, device) in [
            ("holdout", &devices.holdout),
            ("scoring", &devices.scoring),
            ("replay", &devices.replay),
            ("serving", &devices.serving),
        ] {
            match engine::resolve_device(device) {
                Err(e) => return bad(&format!("devices.{key}: {e}")),
                Ok(engine::Device::Cuda { .. }) => {
                    return bad(&format!(
                        "devices.{key} = {device:?}: the coordinator computes on the CPU (its scores and re-runs must be the bits CPU workers compute); use \"cpu\" or \"cpu:N\""
                    ));
                }
                Ok(engine::Device::Cpu { .. }) => {}
            }
        }
        if let Some(mb) = devices.scoring_memory_mb
            && !(1..=SCORING_MEMORY_MB_MAX).contains(&mb)
        {
            return bad(&format!(
                "devices.scoring_memory_mb is {mb}: it is the memory in MB that the scoring backends may hold, from 1 to {SCORING_MEMORY_MB_MAX} (leave it out for a quarter of the available memory)"
            ));
        }
        if engine::Preset::from_name(&self.preset).is_none() {
            return bad(&format!(
                "unknown preset {:?}: choose tiny, small, medium or base",
                self.preset
            ));
        }
        if self.batch == 0 || self.holdout_batches == 0 {
            return bad("batch and holdout_batches must be at least 1");
        }
        if s.units_per_round == 0 || s.steps_per_unit == 0 || s.n_shards == 0 {
            return bad("schedule.units_per_round, steps_per_unit and n_shards must be at least 1");
        }
        if s.min_updates > s.units_per_round {
            return bad("schedule.min_updates must not exceed units_per_round");
        }
        if s.lease_ms == 0 || s.round_timeout_ms == 0 {
            return bad("schedule.lease_ms and round_timeout_ms must be positive");
        }
        if s.lease_max_ms < s.lease_ms {
            return bad("schedule.lease_max_ms must be at least schedule.lease_ms");
        }
        if !(s.slack.is_finite() && s.slack >= 1.0) {
            return bad("schedule.slack must be a number of at least 1");
        }
        if s.unit_ms > 0 {
            let (min, max) = s.unit_steps_bounds();
            if s.steps_min_per_unit > max || !(min..=max).contains(&s.steps_per_unit) {
                return bad(
                    "with schedule.unit_ms set, steps_min_per_unit <= steps_per_unit <= steps_max_per_unit must hold (0 leaves a bound at a quarter or four times steps_per_unit)",
                );
            }
            if s.unit_ms as f64 * s.slack > s.lease_max_ms as f64 {
                return bad(
                    "schedule.unit_ms times slack must not exceed lease_max_ms: a unit sized to it would have no room before its deadline",
                );
            }
        }
        let r = &self.records;
        if r.workers_max == 0 || r.rejections_max == 0 || r.rejections_max > protocol::ID_MAX {
            return bad(
                "records.workers_max and rejections_max must be at least 1 (and rejections_max a 63-bit number)",
            );
        }
        if !(s.inner_lr.is_finite() && s.inner_lr > 0.0) {
            return bad("schedule.inner_lr must be a positive number");
        }
        if !(self.delta_norm_max.is_finite() && self.delta_norm_max > 0.0) {
            return bad("delta_norm_max must be a positive number");
        }
        if !(self.median_norm_multiple.is_finite() && self.median_norm_multiple >= 1.0) {
            return bad("median_norm_multiple must be at least 1");
        }
        let p = &self.scoring;
        if !(p.min_gain.is_finite() && p.max_rise.is_finite() && p.own_margin.is_finite()) {
            return bad("scoring.min_gain, max_rise and own_margin must be numbers");
        }
        if !(self.spot_check.tolerance.is_finite() && self.spot_check.tolerance >= 0.0) {
            return bad("spot_check.tolerance must be a number of at least 0");
        }
        let cross = self.spot_check.cross_class_tolerance;
        if !(cross.is_finite() && cross >= 0.0) {
            return bad("spot_check.cross_class_tolerance must be a number of at least 0");
        }
        let gpu = self.spot_check.gpu_tolerance;
        if !(gpu.is_finite() && gpu >= 0.0) {
            return bad("spot_check.gpu_tolerance must be a number of at least 0");
        }
        let h = &self.http;
        let times = [h.header_timeout_ms, h.body_timeout_ms, h.send_timeout_ms];
        if h.max_connections == 0 || h.upload_concurrency == 0 || h.body_min_bytes_per_s == 0 {
            return bad(
                "http.max_connections, upload_concurrency and body_min_bytes_per_s must be at least 1",
            );
        }
        if times.contains(&0) {
            return bad(
                "http.header_timeout_ms, body_timeout_ms and send_timeout_ms must be positive",
            );
        }
        if self.retention.keep_last == 0 {
            return bad(
                "retention.keep_last must be at least 1 (the current version's checkpoint is served)",
            );
        }
        let v = &self.serving;
        if v.requests_per_minute == 0 || v.max_tokens == 0 || v.max_prompt_tokens == 0 {
            return bad(
                "serving.requests_per_minute, max_tokens and max_prompt_tokens must be at least 1",
            );
        }
        if v.idempotency_retention_s == 0
            || v.idempotent_replies_per_wallet_max == 0
            || v.api_keys_per_wallet_max == 0
        {
            return bad(
                "serving.idempotency_retention_s, idempotent_replies_per_wallet_max and api_keys_per_wallet_max must be at least 1",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_overrides_only_what_it_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "preset = \"tiny\"\n[schedule]\nunits_per_round = 5\nmin_updates = 2\nround_timeout_ms = 1000\nlease_ms = 500\nsteps_per_unit = 10\ninner_lr = 0.001\nn_shards = 4\nmax_staleness = 1\n[outer]\nrule = \"fed_avg\"\n",
        )
        .expect("write");
        let c = CoordinatorConfig::from_file(&path).expect("parse");
        assert_eq!(c.preset, "tiny");
        assert_eq!(c.schedule.units_per_round, 5);
        assert_eq!(c.outer, OuterConfig::FedAvg);
        assert_eq!(c.batch, CoordinatorConfig::default().batch);
        c.check().expect("valid");
        let round_trip: CoordinatorConfig = toml::from_str(&c.to_toml()).expect("toml");
        assert_eq!(round_trip, c);

        std::fs::write(&path, "presett = \"tiny\"\n").expect("write");
        let err = CoordinatorConfig::from_file(&path).expect_err("typo");
        assert!(err.to_string().contains("unknown field `presett`"), "{err}");
        let err = CoordinatorConfig {
            batch: 0,
            ..CoordinatorConfig::default()
        }
        .check()
        .expect_err("zero");
        assert!(err.to_string().contains("batch"), "{err}");
    }

    /// The README's fine-tune table reads as written, round-trips, and names the run.
    #[test]
    fn a_finetune_table_reads_as_the_readme_writes_it() {
        let text = "corpus = \"data/shakespeare-chat.jsonl\"\nseq = 256\nbatch = 2\n\n[finetune]\nbase = \"b.gguf\"\ndata = \"chat\"\nlora = { rank = 8, alpha = 16.0, targets = [\"q\", \"k\", \"v\", \"o\", \"gate\", \"up\", \"down\"] }\n";
        let c: CoordinatorConfig = toml::from_str(text).expect("parse");
        let finetune = c.finetune.clone().expect("finetune");
        assert_eq!(finetune.data, protocol::api::DataFormat::Chat);
        let lora = finetune.lora.expect("lora");
        assert_eq!((lora.rank, lora.alpha, lora.targets.len()), (8, 16.0, 7));
        let round_trip: CoordinatorConfig = toml::from_str(&c.to_toml()).expect("toml");
        assert_eq!(round_trip, c);
        // Without `data` a fine-tune reads chat; the base is part of the run's identity.
        let c: CoordinatorConfig =
            toml::from_str("[finetune]\nbase = \"b.gguf\"\n").expect("parse");
        assert_eq!(
            c.finetune.as_ref().map(|f| f.data),
            Some(protocol::api::DataFormat::Chat)
        );
        let other = CoordinatorConfig {
            finetune: None,
            ..c.clone()
        };
        assert!(!other.same_run_as(&c.identity_json()));
    }

    /// The thread counts that `[devices]` replaced are refused with a sentence naming the
    /// new key, a bad device name or scoring memory budget is refused at start, and a
    /// run stored while the thread
    /// counts existed (its identity holds `threads`) still matches.
    #[test]
    fn devices_replace_thread_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        for (text, expect) in [
            (
                "threads = 0\n",
                "`threads` was replaced by `devices.holdout`",
            ),
            (
                "[spot_check]\nthreads = 2\n",
                "`spot_check.threads` was replaced by `devices.replay`",
            ),
            (
                "[serving]\nthreads = 1\n",
                "`serving.threads` was replaced by `devices.serving`",
            ),
            (
                "[devices]\nscoring = \"gpu\"\n",
                "devices.scoring: unknown device \"gpu\"",
            ),
            (
                "[devices]\nreplay = \"cpu:0\"\n",
                "devices.replay: unknown device \"cpu:0\"",
            ),
            (
                "[devices]\nscoring_memory_mb = 0\n",
                "devices.scoring_memory_mb is 0: it is the memory in MB",
            ),
            (
                "[devices]\nscoring_memory_mb = 17592186044416\n",
                "devices.scoring_memory_mb is 17592186044416: it is the memory in MB that the scoring backends may hold, from 1 to 16777216",
            ),
        ] {
            std::fs::write(&path, text).expect("write");
            let c = CoordinatorConfig::from_file(&path).expect("parse");
            let err = c.check().expect_err(text).to_string();
            assert!(err.contains(expect), "{text}: {err}");
        }
        std::fs::write(
            &path,
            "[devices]\nholdout = \"cpu:3\"\nserving = \"cpu\"\nscoring_memory_mb = 512\n",
        )
        .expect("write");
        let c = CoordinatorConfig::from_file(&path).expect("parse");
        c.check().expect("valid");
        assert_eq!(c.devices.holdout, "cpu:3");
        assert_eq!(c.devices.scoring_memory_mb, Some(512));
        assert!(!c.to_toml().contains("threads"), "{}", c.to_toml());

        let mut legacy: serde_json::Value =
            serde_json::from_str(&CoordinatorConfig::default().identity_json()).expect("json");
        let object = legacy.as_object_mut().expect("object");
        object.remove("devices");
        object.insert("threads".into(), 4.into());
        for section in ["spot_check", "serving"] {
            object[section]
                .as_object_mut()
                .expect("section")
                .insert("threads".into(), 1.into());
        }
        assert!(c.same_run_as(&legacy.to_string()));
    }

    /// Settings that are not the run's identity may change on restart, and a run stored
    /// before a setting existed (its JSON lacks the key) matches a config at the default.
    #[test]
    fn a_run_stored_before_a_setting_existed_still_matches() {
        let c = CoordinatorConfig::default();
        let other = CoordinatorConfig {
            retention: RetentionConfig {
                keep_last: 9,
                ..RetentionConfig::default()
            },
            records: RecordLimits {
                workers_max: 7,
                ..RecordLimits::default()
            },
            ..c.clone()
        };
        assert!(other.same_run_as(&c.identity_json()));
        let mut legacy: serde_json::Value = serde_json::from_str(&c.identity_json()).expect("json");
        let object = legacy.as_object_mut().expect("object");
        for key in ["retention", "records", "http"] {
            object.remove(key);
        }
        object["schedule"]
            .as_object_mut()
            .expect("schedule")
            .remove("lease_max_ms");
        object["schedule"]
            .as_object_mut()
            .expect("schedule")
            .remove("slack");
        let legacy = legacy.to_string();
        assert!(c.same_run_as(&legacy));
        let changed = CoordinatorConfig {
            seed: 2,
            ..c.clone()
        };
        assert!(!changed.same_run_as(&legacy));
        let mut longer = c.clone();
        longer.schedule.lease_max_ms *= 2;
        assert!(!longer.same_run_as(&legacy));
        let mut slacker = c.clone();
        slacker.schedule.slack *= 2.0;
        assert!(!slacker.same_run_as(&legacy));
    }
}
