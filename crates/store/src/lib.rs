//! The coordinator's persistence: one SQLite database (WAL, migrations by
//! `PRAGMA user_version`) for workers, work units, leases, rounds, updates, verdicts and
//! model versions, and a content-addressed blob directory for checkpoints and updates.
//!
//! The one rule that makes restarts safe: a blob is written and fsynced before the row
//! that names it is committed ([`Blobs::put`] returns only when the blob is durable), and
//! every state change the coordinator makes is one transaction ([`Store::write`]) that
//! also holds the scheduler's serialized state. A coordinator killed at any point
//! restarts from the last committed transaction with nothing accepted lost.
//!
//! This is the only crate that knows SQL.

mod blobs;

use std::cell::Cell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use protocol::{WorkAddress, WorkUnit};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

pub use blobs::{AlignedBuf, BlobHash, Blobs, Swept};

/// What can go wrong with the store. Each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the database {path} failed")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("blob {path} does not match its hash: the store is corrupt")]
    CorruptBlob { path: PathBuf },
    #[error(
        "the database {path} was written by a newer hivetrain (schema {found}, this build knows {known})"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("the database {path} holds a bad {what}: {message}")]
    BadRow {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
}

/// Schema migrations, applied in order; `user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    registered_ms INTEGER NOT NULL
);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY,
    base_version INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    aggregated_ms INTEGER,
    version INTEGER
);
CREATE TABLE units (
    id INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    step_offset INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    lr REAL NOT NULL
);
CREATE TABLE leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    unit INTEGER NOT NULL,
    worker TEXT NOT NULL,
    leased_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL
);
CREATE TABLE updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    unit INTEGER NOT NULL UNIQUE,
    round INTEGER NOT NULL,
    worker TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    blob TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    norm REAL NOT NULL,
    weight INTEGER NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE INDEX updates_round ON updates (round);
CREATE TABLE rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    round INTEGER NOT NULL,
    worker TEXT NOT NULL,
    unit INTEGER NOT NULL,
    code TEXT NOT NULL,
    sentence TEXT NOT NULL
);
CREATE TABLE versions (
    version INTEGER PRIMARY KEY,
    parent INTEGER,
    round INTEGER,
    checkpoint TEXT NOT NULL,
    optimizer TEXT,
    holdout_loss REAL NOT NULL,
    created_ms INTEGER NOT NULL,
    updates TEXT NOT NULL
);
"#,
    r#"
CREATE TABLE ledger (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    reference TEXT NOT NULL,
    from_account TEXT,
    to_account TEXT,
    entry TEXT NOT NULL,
    UNIQUE (kind, reference)
);
CREATE INDEX ledger_from ON ledger (from_account);
CREATE INDEX ledger_to ON ledger (to_account);
"#,
    r#"
CREATE TABLE api_keys (
    hash TEXT PRIMARY KEY,
    wallet TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
"#,
    r#"
CREATE TABLE payloads (
    hash TEXT PRIMARY KEY,
    unit INTEGER NOT NULL
);
CREATE TABLE checks (
    unit INTEGER PRIMARY KEY,
    worker TEXT NOT NULL,
    state TEXT NOT NULL,
    distance REAL,
    decided_ms INTEGER
);
CREATE INDEX checks_worker ON checks (worker, state);
CREATE INDEX checks_state ON checks (state);
CREATE TABLE trust (
    worker TEXT PRIMARY KEY,
    verified INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE trust ADD COLUMN failed_unit INTEGER;
CREATE INDEX rejections_worker_round ON rejections (worker, round);
"#,
    // `GET /v1/status` (and the dashboard, every 5 s) counts each round's rejections.
    r#"
CREATE INDEX rejections_round ON rejections (round);
"#,
    // Registrations are bounded: a worker with no accepted update may be dropped for a
    // newer one (`Store::idle_workers`), so its row says whether it ever contributed.
    r#"
ALTER TABLE workers ADD COLUMN productive INTEGER NOT NULL DEFAULT 0;
UPDATE workers SET productive = 1 WHERE id IN (SELECT worker FROM updates);
CREATE INDEX workers_idle ON workers (productive, registered_ms);
"#,
    // Idempotent inference requests: what each asked (blake3 of route and body) and the
    // reply it got, kept for a retention time so a retry is answered, never generated
    // again for free. Revoked API keys are deleted, not kept.
    r#"
CREATE TABLE replies (
    reference TEXT PRIMARY KEY,
    wallet TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    charged INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX replies_created ON replies (created_ms);
CREATE INDEX replies_wallet ON replies (wallet, created_ms);
DELETE FROM api_keys WHERE revoked_ms IS NOT NULL;
"#,
    // Retention: a pruned blob's row stays (history, ledger references) and says when
    // its blob was removed. The partial indexes hold only what is still on disk.
    r#"
ALTER TABLE versions ADD COLUMN checkpoint_pruned_ms INTEGER;
ALTER TABLE versions ADD COLUMN optimizer_pruned_ms INTEGER;
ALTER TABLE updates ADD COLUMN blob_pruned_ms INTEGER;
CREATE INDEX versions_kept ON versions (version)
    WHERE checkpoint_pruned_ms IS NULL OR (optimizer IS NOT NULL AND optimizer_pruned_ms IS NULL);
CREATE INDEX updates_kept ON updates (round) WHERE blob_pruned_ms IS NULL;
"#,
    // A refusal on the score keeps the payload's blake3, so that agreement (a second key
    // sending the same bytes for the unit) survives a restart: without it, a crash
    // between two honest workers' refusals of a unit whose data scores low leaves the
    // unit refused for both, and the round without it.
    r#"
ALTER TABLE rejections ADD COLUMN payload TEXT;
"#,
    // What a worker computes on, measured when it started (issue 17): shown on the
    // dashboard; its class decides how its units' re-runs are compared.
    r#"
ALTER TABLE workers ADD COLUMN device TEXT;
ALTER TABLE workers ADD COLUMN class TEXT;
ALTER TABLE workers ADD COLUMN tokens_per_s REAL;
"#,
    // Checks by volunteers (`run::Replicas`): each unit waiting for a volunteer of its
    // worker's class, in order, and, once leased, the fresh id, the volunteer and the
    // lease's end. At most `run::PENDING_CHECKS_MAX` rows, rewritten when they change.
    // A volunteer's check that did not match is kept in `disputes` until the
    // coordinator's own re-run of the unit decides it (one row per queued unit at most).
    r#"
CREATE TABLE replicas (
    seq INTEGER PRIMARY KEY,
    unit INTEGER NOT NULL UNIQUE,
    worker TEXT NOT NULL,
    class TEXT NOT NULL,
    queued_ms INTEGER NOT NULL,
    check_id INTEGER,
    checker TEXT,
    deadline_ms INTEGER
);
CREATE TABLE disputes (
    unit INTEGER PRIMARY KEY,
    check_id INTEGER NOT NULL,
    checker TEXT NOT NULL
);
"#,
    // Who trained each update on what (issue 17): its worker's determinism class and tier
    // when it was accepted (the unit's row holds its shard and its sized steps).
    r#"
ALTER TABLE updates ADD COLUMN class TEXT;
ALTER TABLE updates ADD COLUMN tier TEXT;
"#,
    // A third replica (issue 17): a check by a volunteer that settles a first
    // volunteer's disputed check of a unit the coordinator cannot re-run names that
    // check's id and volunteer.
    r#"
ALTER TABLE replicas ADD COLUMN disputed_check INTEGER;
ALTER TABLE replicas ADD COLUMN disputed_by TEXT;
"#,
];

/// Where an accepted update stands with the replay spot-checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckState {
    /// Waiting for a validator to re-run it.
    Queued,
    /// Not sampled (it is re-checked if its worker is later caught).
    Unchecked,
    /// Re-run and matched.
    Verified,
    /// Re-run and did not match: its credit was clawed back.
    Failed,
    /// Could not be re-run: its update's blob or its base version's checkpoint was
    /// pruned by the retention policy before its turn came.
    Skipped,
}

impl CheckState {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Queued => "queued",
            CheckState::Unchecked => "unchecked",
            CheckState::Verified => "verified",
            CheckState::Failed => "failed",
            CheckState::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<CheckState> {
        [
            CheckState::Queued,
            CheckState::Unchecked,
            CheckState::Verified,
            CheckState::Failed,
            CheckState::Skipped,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// A check waiting for a volunteer of its worker's class, or leased to one.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaRow {
    /// The unit checked.
    pub unit: u64,
    /// Its worker (hex public key).
    pub worker: String,
    /// Its worker's reported class.
    pub class: String,
    pub queued_ms: u64,
    /// Once leased: the fresh id, the volunteer (hex public key), the lease's end.
    pub lease: Option<(u64, String, u64)>,
    /// A third replica's: the disputed check's id and its volunteer (hex public key).
    pub disputed: Option<(u64, String)>,
}

/// An accepted update's spot-check record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckRow {
    pub unit: u64,
    pub worker: String,
    pub state: CheckState,
    /// Relative L2 distance between the update and its re-run (0 when bit-exact).
    pub distance: Option<f32>,
    pub decided_ms: Option<u64>,
}

/// A registered worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerRow {
    /// Hex ed25519 public key.
    pub id: String,
    pub name: String,
    pub registered_ms: u64,
    /// The machine it reported at its last registration (none from older workers).
    pub machine: Option<protocol::api::Machine>,
}

/// An accepted update; its bytes are the blob `blob`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateRow {
    pub unit: u64,
    pub round: u64,
    pub worker: String,
    pub base_version: u64,
    pub blob: BlobHash,
    pub bytes: u64,
    pub norm: f32,
    /// Tokens the coordinator assigned to the unit.
    pub weight: u64,
    pub received_ms: u64,
    /// Its worker's determinism class and tier (`run::Tier`) when it was accepted (none:
    /// not reported, or stored before they were recorded).
    #[serde(default)]
    pub class: Option<String>,
    #[serde(default)]
    pub tier: Option<String>,
}

/// A rejected update from an identified worker (its signature verified).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RejectionRow {
    pub received_ms: u64,
    pub round: u64,
    pub worker: String,
    pub unit: u64,
    pub code: String,
    pub sentence: String,
    /// The payload's blake3 (hex) of a refusal on the score, which agreement needs.
    pub payload: Option<String>,
}

/// A model version in the registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionRow {
    pub version: u64,
    pub parent: Option<u64>,
    /// The round aggregated into this version (none for the initial version).
    pub round: Option<u64>,
    /// The safetensors checkpoint.
    pub checkpoint: BlobHash,
    /// The outer optimizer's state after this version (raw little-endian f32).
    pub optimizer: Option<BlobHash>,
    pub holdout_loss: f32,
    pub created_ms: u64,
    /// Ids (units) of the updates it was built from.
    pub updates: Vec<u64>,
    /// When the retention policy removed its checkpoint (the row stays).
    pub checkpoint_pruned_ms: Option<u64>,
    /// When the retention policy removed its optimizer state.
    pub optimizer_pruned_ms: Option<u64>,
}

/// An update whose blob is still on disk, as the retention policy sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeptUpdate {
    pub unit: u64,
    pub round: u64,
    pub base_version: u64,
    pub blob: BlobHash,
    /// Its spot-check state (none when re-runs are off).
    pub check: Option<CheckState>,
}

/// Per-round figures for status tables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRow {
    pub round: u64,
    pub base_version: u64,
    pub started_ms: u64,
    pub aggregated_ms: Option<u64>,
    pub version: Option<u64>,
    pub accepted: u64,
    pub rejected: u64,
    /// Tokens of the accepted units.
    pub tokens: u64,
    /// Bytes of the accepted updates.
    pub bytes: u64,
    /// Holdout loss of `version`, once aggregated.
    pub holdout_loss: Option<f32>,
}

/// The stored reply of an idempotent inference request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyRow {
    /// `wallet:idempotency key`, the spend entry's reference.
    pub reference: String,
    pub wallet: String,
    /// blake3 hex of what the request asked (its route and exact body).
    pub request_hash: String,
    /// The model id the reply named.
    pub model: String,
    pub text: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub finish_reason: String,
    /// Micro-credits the request was charged.
    pub charged: u64,
    pub created_ms: u64,
}

/// The database and the blobs of one coordinator directory.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    blobs: Blobs,
    /// Commits that changed a round's figures; shared with the store's readers.
    rounds_epoch: Arc<AtomicU64>,
    /// What makes the commits durable, outside the writer's lock.
    durability: Arc<Durability>,
}

/// Group commit: the write connection commits with `synchronous = NORMAL` (the WAL is
/// written, not fsynced), and [`Durability::sync`] fsyncs the WAL afterwards, outside
/// whatever lock serializes the writer. One fsync covers every commit made before it
/// began, so callers that sync at once share it. A commit is durable against a power cut
/// once a `sync` that began after it returns; against a process crash it is durable when
/// the commit returns (its frames are in the OS's page cache). A caller that replies
/// "done" to the outside syncs first.
#[derive(Debug)]
pub struct Durability {
    /// The WAL file (`hivetrain.sqlite3-wal`).
    wal: PathBuf,
    /// The database file, synced instead where the WAL is gone.
    db: PathBuf,
    /// Commits made so far (bumped after each commit returns).
    commits: AtomicU64,
    /// Commits known durable; held while an fsync runs, so later callers wait for it and
    /// then find themselves covered.
    synced: std::sync::Mutex<u64>,
}

impl Durability {
    /// Makes every commit made before this call durable: returns at once if an earlier
    /// sync covered them, else fsyncs the WAL (one fsync for all of them). Returns whether
    /// it fsynced. An error means the disk may not hold what was committed: the caller
    /// must not go on as if it did.
    pub fn sync(&self) -> Result<bool, StoreError> {
        let want = self.commits.load(Ordering::Acquire);
        // Holds only a number: a panic cannot leave it half-written.
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if *synced >= want {
            return Ok(false);
        }
        // Every commit counted by now has returned: its frames are in the WAL.
        let upto = self.commits.load(Ordering::Acquire);
        let file = match std::fs::File::open(&self.wal) {
            Ok(f) => (f, &self.wal),
            // No WAL: everything is in the database file (checkpointed at a close).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = std::fs::File::open(&self.db).map_err(|source| StoreError::Io {
                    path: self.db.clone(),
                    source,
                })?;
                (f, &self.db)
            }
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.wal.clone(),
                    source,
                });
            }
        };
        file.0.sync_data().map_err(|source| StoreError::Io {
            path: file.1.clone(),
            source,
        })?;
        *synced = upto;
        Ok(true)
    }

    /// Commits made so far, and how many of them are known durable.
    pub fn counts(&self) -> (u64, u64) {
        let synced = *self.synced.lock().unwrap_or_else(|p| p.into_inner());
        (self.commits.load(Ordering::Acquire), synced)
    }
}

/// How many commits so far changed a round's figures (its row, its updates or
/// rejections, the version it made), and so what [`Store::rounds_from`] and
/// [`Store::accepted_count`] answer. A reader that reads it before a query and finds it
/// unchanged later knows the query's answer still holds: the read routes' caches key on
/// it. It counts from 0 when the store is opened, and is bumped after the commit.
#[derive(Clone, Debug)]
pub struct RoundsEpoch(Arc<AtomicU64>);

impl RoundsEpoch {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// One transaction's writes; committed together by [`Store::write`].
pub struct Tx<'a> {
    tx: rusqlite::Transaction<'a>,
    path: &'a Path,
    /// Whether a write changed what [`Store::rounds_from`] or
    /// [`Store::accepted_count`] answer (rounds, updates, rejections, versions).
    rounds_changed: Cell<bool>,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx").field("path", &self.path).finish()
    }
}

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

fn bad_row(path: &Path, what: &'static str, message: impl ToString) -> StoreError {
    StoreError::BadRow {
        path: path.to_owned(),
        what,
        message: message.to_string(),
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`: `dir/hivetrain.sqlite3` and
    /// `dir/blobs/`. Applies pending migrations.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join("hivetrain.sqlite3");
        let mut conn = Connection::open(&path).map_err(sql(&path))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql(&path))?;
        // NORMAL: a commit writes the WAL without an fsync, so the writer's lock is never
        // held across one; `Durability::sync` makes commits survive a power cut (group
        // commit), and SQLite itself fsyncs the WAL before each checkpoint and the
        // database after it. A process crash loses nothing committed either way.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql(&path))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql(&path))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql(&path))?;
        migrate(&mut conn, &path)?;
        let blobs = Blobs::open(dir.join("blobs"))?;
        let durability = Arc::new(Durability {
            wal: dir.join("hivetrain.sqlite3-wal"),
            db: path.clone(),
            commits: AtomicU64::new(0),
            synced: std::sync::Mutex::new(0),
        });
        Ok(Store {
            conn,
            path,
            blobs,
            rounds_epoch: Arc::default(),
            durability,
        })
    }

    /// A second, read-only connection to this store: in WAL mode its reads see the last
    /// commit and never wait for the writer. [`Store::write`] on it fails. It shares
    /// this store's [`Store::rounds_epoch`].
    pub fn reader(&self) -> Result<Store, StoreError> {
        let path = self.path.clone();
        let conn = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql(&path))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql(&path))?;
        Ok(Store {
            conn,
            path,
            blobs: self.blobs.clone(),
            rounds_epoch: self.rounds_epoch.clone(),
            durability: self.durability.clone(),
        })
    }

    /// What makes this store's commits durable (group commit; see [`Durability`]).
    pub fn durability(&self) -> Arc<Durability> {
        self.durability.clone()
    }

    /// The count of this store's commits that changed a round's figures (see
    /// [`RoundsEpoch`]), shared with its readers.
    pub fn rounds_epoch(&self) -> RoundsEpoch {
        RoundsEpoch(self.rounds_epoch.clone())
    }

    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// Runs `f` in one transaction: all of its writes are committed, or none. The commit
    /// survives a process crash when this returns, and a power cut once a
    /// [`Durability::sync`] begun after it returns.
    pub fn write<T>(
        &mut self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.conn.transaction().map_err(sql(&self.path))?;
        let wrapped = Tx {
            tx,
            path: &self.path,
            rounds_changed: Cell::new(false),
        };
        let out = f(&wrapped)?;
        let rounds_changed = wrapped.rounds_changed.get();
        wrapped.tx.commit().map_err(sql(&self.path))?;
        self.durability.commits.fetch_add(1, Ordering::Release);
        // After the commit: a reader that sees the new epoch sees the new rows.
        if rounds_changed {
            self.rounds_epoch.fetch_add(1, Ordering::Release);
        }
        Ok(out)
    }

    /// A value of the `meta` table.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(sql(&self.path))
    }

    /// Whether an update row names `blob`.
    pub fn blob_referenced(&self, blob: &BlobHash) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM updates WHERE blob = ?1)",
                [blob.as_str()],
                |r| r.get(0),
            )
            .map_err(sql(&self.path))
    }

    pub fn worker(&self, id: &str) -> Result<Option<WorkerRow>, StoreError> {
        self.conn
            .query_row(
                "SELECT id, name, registered_ms, device, class, tokens_per_s FROM workers WHERE id = ?1",
                [id],
                worker_row,
            )
            .optional()
            .map_err(sql(&self.path))
    }

    pub fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, name, registered_ms, device, class, tokens_per_s FROM workers ORDER BY registered_ms, id",
            )
            .map_err(sql(&self.path))?;
        let rows = stmt.query_map([], worker_row).map_err(sql(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sql(&self.path))
    }

    /// The accepted updates of `round`, in unit order.
    pub fn updates_of_round(&self, round: u64) -> Result<Vec<UpdateRow>, StoreError> {
        self.query_updates("WHERE round = ?1 ORDER BY unit", [round])
    }

    fn query_updates<P: rusqlite::Params>(
        &self,
        tail: &str,
        params: P,
    ) -> Result<Vec<UpdateRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT unit, round, worker, base_version, blob, bytes, norm, weight, received_ms, class, tier
                 FROM updates {tail}"
            ))
            .map_err(sql(&self.path))?;
        let rows = stmt
            .query_map(params, |r| {
                Ok((
                    UpdateRow {
                        unit: r.get(0)?,
                        round: r.get(1)?,
                        worker: r.get(2)?,
                        base_version: r.get(3)?,
                        blob: BlobHash::of(b""),
                        bytes: r.get(5)?,
                        norm: r.get::<_, f64>(6)? as f32,
                        weight: r.get(7)?,
                        received_ms: r.get(8)?,
                        class: r.get(9)?,
                        tier: r.get(10)?,
                    },
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(sql(&self.path))?;
        let mut out = Vec::new();
        for row in rows {
            let (mut row, blob) = row.map_err(sql(&self.path))?;
            row.blob = BlobHash::parse(&blob).ok_or_else(|| bad_row(&self.path, "blob", blob))?;
            out.push(row);
        }
        Ok(out)
    }

    /// Every model version, oldest first.
    pub fn versions(&self) -> Result<Vec<VersionRow>, StoreError> {
        self.query_versions("ORDER BY version", [])
    }

    /// One model version.
    pub fn version(&self, version: u64) -> Result<Option<VersionRow>, StoreError> {
        Ok(self
            .query_versions("WHERE version = ?1", [version])?
            .into_iter()
            .next())
    }

    fn query_versions<P: rusqlite::Params>(
        &self,
        tail: &str,
        params: P,
    ) -> Result<Vec<VersionRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT version, parent, round, checkpoint, optimizer, holdout_loss, created_ms, updates,
                    checkpoint_pruned_ms, optimizer_pruned_ms
                 FROM versions {tail}"
            ))
            .map_err(sql(&self.path))?;
        type Raw = (
            u64,
            Option<u64>,
            Option<u64>,
            String,
            Option<String>,
            f64,
            u64,
            String,
            Option<u64>,
            Option<u64>,
        );
        let rows = stmt
            .query_map(params, |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ))
            })
            .map_err(sql(&self.path))?;
        let mut out = Vec::new();
        for row in rows {
            let (
                version,
                parent,
                round,
                checkpoint,
                optimizer,
                loss,
                created_ms,
                updates,
                checkpoint_pruned_ms,
                optimizer_pruned_ms,
            ): Raw = row.map_err(sql(&self.path))?;
            let hash =
                |s: &str| BlobHash::parse(s).ok_or_else(|| bad_row(&self.path, "blob hash", s));
            out.push(VersionRow {
                version,
                parent,
                round,
                checkpoint: hash(&checkpoint)?,
                optimizer: optimizer.as_deref().map(hash).transpose()?,
                holdout_loss: loss as f32,
                created_ms,
                updates: serde_json::from_str(&updates)
                    .map_err(|e| bad_row(&self.path, "update list", e))?,
                checkpoint_pruned_ms,
                optimizer_pruned_ms,
            });
        }
        Ok(out)
    }

    /// Per-round figures, oldest first.
    pub fn rounds(&self) -> Result<Vec<RoundRow>, StoreError> {
        self.rounds_from(0)
    }

    /// The rounds from `first` on, as [`Store::rounds`].
    pub fn rounds_from(&self, first: u64) -> Result<Vec<RoundRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT r.round, r.base_version, r.started_ms, r.aggregated_ms, r.version,
                    (SELECT COUNT(*) FROM updates u WHERE u.round = r.round),
                    (SELECT COUNT(*) FROM rejections j WHERE j.round = r.round),
                    (SELECT COALESCE(SUM(weight), 0) FROM updates u WHERE u.round = r.round),
                    (SELECT COALESCE(SUM(bytes), 0) FROM updates u WHERE u.round = r.round),
                    v.holdout_loss
                 FROM rounds r LEFT JOIN versions v ON v.version = r.version
                 WHERE r.round >= ?1 ORDER BY r.round",
            )
            .map_err(sql(&self.path))?;
        let rows = stmt
            .query_map([first], |r| {
                Ok(RoundRow {
                    round: r.get(0)?,
                    base_version: r.get(1)?,
                    started_ms: r.get(2)?,
                    aggregated_ms: r.get(3)?,
                    version: r.get(4)?,
                    accepted: r.get(5)?,
                    rejected: r.get(6)?,
                    tokens: r.get(7)?,
                    bytes: r.get(8)?,
                    holdout_loss: r.get(9)?,
                })
            })
            .map_err(sql(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sql(&self.path))
    }

    /// How many rejections of `worker`'s updates are recorded in `round`.
    pub fn rejections_of(&self, worker: &str, round: u64) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM rejections WHERE worker = ?1 AND round = ?2",
                params![worker, round],
                |r| r.get(0),
            )
            .map_err(sql(&self.path))
    }

    /// The refusals of `round` that kept their payload hash (unit, worker, payload), oldest
    /// first.
    pub fn refused_payloads(&self, round: u64) -> Result<Vec<(u64, String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT unit, worker, payload FROM rejections
                 WHERE round = ?1 AND payload IS NOT NULL ORDER BY id",
            )
            .map_err(sql(&self.path))?;
        let rows = stmt
            .query_map([round], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(sql(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sql(&self.path))
    }

    /// The rejections recorded, oldest first.
    pub fn rejections(&self) -> Result<Vec<RejectionRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT received_ms, round, worker, unit, code, sentence, payload FROM rejections ORDER BY id",
            )
            .map_err(sql(&self.path))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(RejectionRow {
                    received_ms: r.get(0)?,
                    round: r.get(1)?,
                    worker: r.get(2)?,
                    unit: r.get(3)?,
                    code: r.get(4)?,
                    sentence: r.get(5)?,
                    payload: r.get(6)?,
                })
            })
            .map_err(sql(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sql(&self.path))
    }

    /// Every ledger entry, in order (the ledger replays and checks them on load).
    pub fn ledger_entries(&self) -> Result<Vec<ledger::Entry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT entry FROM ledger ORDER BY seq")
            .map_err(sql(&self.path))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql(&self.path))?;
        rows.map(|row| {
            let text = row.map_err(sql(&self.path))?;
            serde_json::from_str(&text).map_err(|e| bad_row(&self.path, "ledger entry", e))
        })
        .collect()
    }

    /// Every API key that is not revoked: (blake3 of the key, wallet).
    pub fn api_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT hash, wallet FROM api_keys WHERE revoked_ms IS NULL")
            .map_err(sql(&self.path))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sql(&self.path))
    }

    /// The stored reply of the idempotent request `reference`, if any.
    pub fn reply(&self, reference: &str) -> Result<Option<ReplyRow>, StoreError> {
        self.conn
            .query_row(
                "SELECT reference, wallet, request_hash, model, text, prompt_tokens,
                        completion_tokens, finish_reason, charged, created_ms
                 FROM replies WHERE reference = ?1",
                [reference],
                |r| {
                    Ok(ReplyRow {
                        reference: r.get(0)?,
                        wallet: r.get(1)?,
                        request_hash: r.get(2)?,
                        model: r.get(3)?,
                        text: r.get(4)?,
                        prompt_tokens: r.get(5)?,
                        completion_tokens: r.get(6)?,
                        finish_reason: r.get(7)?,
                        charged: r.get(8)?,
                        created_ms: r.get(9)?,
                    })
                },
            )
            .optional()
            .map_err(sql(&self.path))
    }

    /// The unit whose accepted update has the payload `hash`, if any.
    pub fn payload_unit(&self, hash: &str) -> Result<Option<u64>, StoreError> {
        self.conn
            .query_row("SELECT unit FROM payloads WHERE hash = ?1", [hash], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql(&self.path))
    }

    /// The spot-check records, in unit order; only those in `state` if given.
    pub fn checks(&self, state: Option<CheckState>) -> Result<Vec<CheckRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT unit, worker, state, distance, decided_ms FROM checks
                 WHERE ?1 IS NULL OR state = ?1 ORDER BY unit",
            )
            .map_err(sql(&self.path))?;
        let rows = stmt
            .query_map([state.map(CheckState::as_str)], |r| {
                Ok((
                    r.get::<_, u64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<f64>>(3)?,
                    r.get::<_, Option<u64>>(4)?,
                ))
            })
            .map_err(sql(&self.path))?;
        let mut out = Vec::new();
        for row in rows {
            let (unit, worker, state, distance, decided_ms) = row.map_err(sql(&self.path))?;
            out.push(CheckRow {
                unit,
                worker,
                state: CheckState::parse(&state)
                    .ok_or_else(|| bad_row(&self.path, "check state", &state))?,
                distance: distance.map(|d| d as f32),
                decided_ms,
            });
        }
        Ok(out)
    }

    /// The volunteer's check that disputed `unit` (its fresh id and the volunteer's hex
    /// key), while the coordinator's own re-run of it has not decided.
    pub fn dispute(&self, unit: u64) -> Result<Option<(u64, String)>, StoreError> {
        self.conn
            .query_row(
                "SELECT check_id, checker FROM disputes WHERE unit = ?1",
                [unit],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql(&self.path))
    }

    /// The checks waiting for volunteers or leased to them, in their order.
    pub fn replicas(&self) -> Result<Vec<ReplicaRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT unit, worker, class, queued_ms, check_id, checker, deadline_ms,
                        disputed_check, disputed_by
                 FROM replicas ORDER BY seq",
            )
            .map_err(sql(&self.path))?;
        let rows = stmt
            .query_map([], |r| {
                let lease = match (r.get(4)?, r.get(5)?, r.get(6)?) {
                    (Some(id), Some(checker), Some(deadline)) => Some((id, checker, deadline)),
                    _ => None,
                };
                let disputed = match (r.get(7)?, r.get(8)?) {
                    (Some(check), Some(by)) => Some((check, by)),
                    _ => None,
                };
                Ok(ReplicaRow {
                    unit: r.get(0)?,
                    worker: r.get(1)?,
                    class: r.get(2)?,
                    queued_ms: r.get(3)?,
                    lease,
                    disputed,
                })
            })
            .map_err(sql(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sql(&self.path))
    }

    /// Each worker's count of consecutive verified units, and its latest unit whose
    /// check failed.
    pub fn trust(&self) -> Result<Vec<(String, u64, Option<u64>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT worker, verified, failed_unit FROM trust ORDER BY worker")
            .map_err(sql(&self.path))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(sql(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sql(&self.path))
    }

    /// One accepted update.
    pub fn update(&self, unit: u64) -> Result<Option<UpdateRow>, StoreError> {
        Ok(self
            .query_updates("WHERE unit = ?1", [unit])?
            .into_iter()
            .next())
    }

    /// One work unit as issued.
    pub fn unit(&self, id: u64) -> Result<Option<WorkUnit>, StoreError> {
        self.conn
            .query_row(
                "SELECT id, round, base_version, shard, step_offset, steps, seed, lr
                 FROM units WHERE id = ?1",
                [id],
                |r| {
                    Ok(WorkUnit {
                        id: r.get(0)?,
                        round: r.get(1)?,
                        base_version: r.get(2)?,
                        address: WorkAddress {
                            shard: r.get(3)?,
                            offset: r.get(4)?,
                            steps: r.get(5)?,
                            seed: r.get::<_, i64>(6)? as u64,
                        },
                        lr: r.get::<_, f64>(7)? as f32,
                    })
                },
            )
            .optional()
            .map_err(sql(&self.path))
    }

    /// The work units of every accepted update (each has exactly one mint).
    pub fn accepted_units(&self) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT unit FROM updates ORDER BY unit")
            .map_err(sql(&self.path))?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(sql(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sql(&self.path))
    }

    /// How many workers are registered.
    pub fn worker_count(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM workers", [], |r| r.get(0))
            .map_err(sql(&self.path))
    }

    /// The oldest `limit` registrations of workers with no accepted update, oldest first.
    pub fn idle_workers(&self, limit: u64) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id FROM workers WHERE productive = 0 ORDER BY registered_ms, id LIMIT ?1",
            )
            .map_err(sql(&self.path))?;
        let rows = stmt
            .query_map([limit], |r| r.get(0))
            .map_err(sql(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sql(&self.path))
    }

    /// How many updates were accepted over the whole run.
    pub fn accepted_count(&self) -> Result<u64, StoreError> {
        self.accepted_totals().map(|(count, _)| count)
    }

    /// How many updates were accepted over the whole run, and the tokens they trained
    /// (their weights: a unit sized per worker counts its own steps).
    pub fn accepted_totals(&self) -> Result<(u64, u64), StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(weight), 0) FROM updates",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(sql(&self.path))
    }

    /// The versions whose checkpoint or optimizer state is still on disk, oldest first.
    pub fn versions_kept(&self) -> Result<Vec<VersionRow>, StoreError> {
        self.query_versions(
            "WHERE checkpoint_pruned_ms IS NULL
                OR (optimizer IS NOT NULL AND optimizer_pruned_ms IS NULL)
             ORDER BY version",
            [],
        )
    }

    /// The accepted updates whose blob is still on disk, in unit order, with their
    /// spot-check state.
    pub fn updates_kept(&self) -> Result<Vec<KeptUpdate>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT u.unit, u.round, u.base_version, u.blob, c.state
                 FROM updates u LEFT JOIN checks c ON c.unit = u.unit
                 WHERE u.blob_pruned_ms IS NULL ORDER BY u.unit",
            )
            .map_err(sql(&self.path))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, u64>(0)?,
                    r.get::<_, u64>(1)?,
                    r.get::<_, u64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .map_err(sql(&self.path))?;
        let mut out = Vec::new();
        for row in rows {
            let (unit, round, base_version, blob, check) = row.map_err(sql(&self.path))?;
            out.push(KeptUpdate {
                unit,
                round,
                base_version,
                blob: BlobHash::parse(&blob).ok_or_else(|| bad_row(&self.path, "blob", &blob))?,
                check: check
                    .map(|c| {
                        CheckState::parse(&c).ok_or_else(|| bad_row(&self.path, "check state", c))
                    })
                    .transpose()?,
            });
        }
        Ok(out)
    }

    /// Every blob a row names and has not let go of: versions' checkpoints and optimizer
    /// states, accepted updates, and the `meta` values under `meta_keys` (blob names the
    /// caller keeps there, such as the run's tokenizer). Whatever else is in the blob
    /// directory is an orphan. A new column that names a blob must be added here.
    pub fn live_blobs(&self, meta_keys: &[&str]) -> Result<HashSet<BlobHash>, StoreError> {
        let mut live = HashSet::new();
        for query in [
            "SELECT checkpoint FROM versions WHERE checkpoint_pruned_ms IS NULL",
            "SELECT optimizer FROM versions
             WHERE optimizer IS NOT NULL AND optimizer_pruned_ms IS NULL",
            "SELECT blob FROM updates WHERE blob_pruned_ms IS NULL",
        ] {
            let mut stmt = self.conn.prepare(query).map_err(sql(&self.path))?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(sql(&self.path))?;
            for row in rows {
                let name = row.map_err(sql(&self.path))?;
                live.insert(
                    BlobHash::parse(&name).ok_or_else(|| bad_row(&self.path, "blob", &name))?,
                );
            }
        }
        for key in meta_keys {
            if let Some(name) = self.meta(key)? {
                live.insert(
                    BlobHash::parse(&name)
                        .ok_or_else(|| bad_row(&self.path, "blob in meta", &name))?,
                );
            }
        }
        Ok(live)
    }

    /// Whether a row that has not let go of it names `blob` (see [`Store::live_blobs`];
    /// `meta_keys` alike).
    pub fn blob_live(&self, blob: &BlobHash, meta_keys: &[&str]) -> Result<bool, StoreError> {
        let named: bool = self
            .conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM versions WHERE checkpoint = ?1 AND checkpoint_pruned_ms IS NULL)
                     OR EXISTS (SELECT 1 FROM versions WHERE optimizer = ?1 AND optimizer_pruned_ms IS NULL)
                     OR EXISTS (SELECT 1 FROM updates WHERE blob = ?1 AND blob_pruned_ms IS NULL)",
                [blob.as_str()],
                |r| r.get(0),
            )
            .map_err(sql(&self.path))?;
        if named {
            return Ok(true);
        }
        for key in meta_keys {
            if self.meta(key)?.as_deref() == Some(blob.as_str()) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Row counts of every table, for tests that check a request wrote nothing.
    pub fn row_counts(&self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        const TABLES: [&str; 14] = [
            "meta",
            "workers",
            "rounds",
            "units",
            "leases",
            "updates",
            "rejections",
            "versions",
            "ledger",
            "api_keys",
            "payloads",
            "checks",
            "trust",
            "replies",
        ];
        TABLES
            .iter()
            .map(|t| {
                self.conn
                    .query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))
                    .map(|n| (*t, n))
                    .map_err(sql(&self.path))
            })
            .collect()
    }
}

impl Tx<'_> {
    fn run<P: rusqlite::Params>(&self, statement: &str, params: P) -> Result<(), StoreError> {
        self.tx
            .execute(statement, params)
            .map(|_| ())
            .map_err(sql(self.path))
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.run(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )
    }

    /// Registers a worker, or renames it.
    pub fn upsert_worker(&self, w: &WorkerRow) -> Result<(), StoreError> {
        let m = w.machine.as_ref();
        self.run(
            "INSERT INTO workers (id, name, registered_ms, device, class, tokens_per_s)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, device = excluded.device,
                 class = excluded.class, tokens_per_s = excluded.tokens_per_s",
            params![
                w.id,
                w.name,
                w.registered_ms,
                m.map(|m| &m.device),
                m.map(|m| &m.class),
                m.map(|m| m.tokens_per_s)
            ],
        )
    }

    pub fn start_round(
        &self,
        round: u64,
        base_version: u64,
        started_ms: u64,
        units: &[WorkUnit],
    ) -> Result<(), StoreError> {
        self.rounds_changed.set(true);
        self.run(
            "INSERT OR IGNORE INTO rounds (round, base_version, started_ms) VALUES (?1, ?2, ?3)",
            params![round, base_version, started_ms],
        )?;
        for u in units {
            self.put_unit(u)?;
        }
        Ok(())
    }

    /// Writes a unit's row, or its steps where it has one: a unit's first lease may size
    /// it for its worker (`schedule.unit_ms`); nothing else of a unit ever changes.
    pub fn put_unit(&self, u: &WorkUnit) -> Result<(), StoreError> {
        self.run(
            "INSERT INTO units (id, round, base_version, shard, step_offset, steps, seed, lr)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (id) DO UPDATE SET steps = excluded.steps",
            params![
                u.id,
                u.round,
                u.base_version,
                u.address.shard,
                u.address.offset,
                u.address.steps,
                u.address.seed as i64,
                u.lr as f64
            ],
        )
    }

    pub fn insert_lease(
        &self,
        unit: u64,
        worker: &str,
        leased_ms: u64,
        deadline_ms: u64,
    ) -> Result<(), StoreError> {
        self.run(
            "INSERT INTO leases (unit, worker, leased_ms, deadline_ms) VALUES (?1, ?2, ?3, ?4)",
            params![unit, worker, leased_ms, deadline_ms],
        )
    }

    /// Records an accepted update; its blob must already be in the blob store.
    pub fn insert_update(&self, u: &UpdateRow) -> Result<(), StoreError> {
        self.rounds_changed.set(true);
        self.run(
            "INSERT INTO updates (unit, round, worker, base_version, blob, bytes, norm, weight, received_ms, class, tier)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                u.unit,
                u.round,
                u.worker,
                u.base_version,
                u.blob.as_str(),
                u.bytes,
                u.norm as f64,
                u.weight,
                u.received_ms,
                u.class,
                u.tier
            ],
        )?;
        // Its worker has contributed: its registration is never dropped.
        self.run(
            "UPDATE workers SET productive = 1 WHERE id = ?1",
            params![u.worker],
        )
    }

    /// Drops a registration (one with no accepted update, for a newer one).
    pub fn remove_worker(&self, id: &str) -> Result<(), StoreError> {
        self.run("DELETE FROM workers WHERE id = ?1", params![id])
    }

    /// Keeps only the newest `keep` rejection records.
    pub fn trim_rejections(&self, keep: u64) -> Result<(), StoreError> {
        self.rounds_changed.set(true);
        self.run(
            "DELETE FROM rejections WHERE id <= (SELECT MAX(id) FROM rejections) - ?1",
            params![keep],
        )
    }

    /// Records the payload hash of an accepted update; a hash already recorded keeps its
    /// first unit (with scoring off, byte-equal updates are accepted).
    pub fn insert_payload(&self, hash: &str, unit: u64) -> Result<(), StoreError> {
        self.run(
            "INSERT OR IGNORE INTO payloads (hash, unit) VALUES (?1, ?2)",
            params![hash, unit],
        )
    }

    /// Sets an accepted update's spot-check record.
    pub fn set_check(&self, c: &CheckRow) -> Result<(), StoreError> {
        self.run(
            "INSERT INTO checks (unit, worker, state, distance, decided_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (unit) DO UPDATE SET state = excluded.state,
                 distance = excluded.distance, decided_ms = excluded.decided_ms",
            params![
                c.unit,
                c.worker,
                c.state.as_str(),
                c.distance.map(f64::from),
                c.decided_ms
            ],
        )
    }

    /// Records that the volunteer `checker`'s check `check` disputed `unit`.
    pub fn insert_dispute(&self, unit: u64, check: u64, checker: &str) -> Result<(), StoreError> {
        self.run(
            "INSERT OR REPLACE INTO disputes (unit, check_id, checker) VALUES (?1, ?2, ?3)",
            params![unit, check, checker],
        )
    }

    /// Forgets `unit`'s dispute (its check is decided or skipped).
    pub fn remove_dispute(&self, unit: u64) -> Result<(), StoreError> {
        self.run("DELETE FROM disputes WHERE unit = ?1", params![unit])
    }

    /// Replaces the checks waiting for volunteers or leased to them (a bounded few).
    pub fn replace_replicas(&self, rows: &[ReplicaRow]) -> Result<(), StoreError> {
        self.run("DELETE FROM replicas", params![])?;
        for (seq, r) in rows.iter().enumerate() {
            let (check_id, checker, deadline_ms) = match &r.lease {
                Some((id, checker, deadline)) => {
                    (Some(*id), Some(checker.as_str()), Some(*deadline))
                }
                None => (None, None, None),
            };
            let (disputed_check, disputed_by) = match &r.disputed {
                Some((check, by)) => (Some(*check), Some(by.as_str())),
                None => (None, None),
            };
            self.run(
                "INSERT INTO replicas (seq, unit, worker, class, queued_ms, check_id, checker, deadline_ms,
                                       disputed_check, disputed_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    seq as u64,
                    r.unit,
                    r.worker,
                    r.class,
                    r.queued_ms,
                    check_id,
                    checker,
                    deadline_ms,
                    disputed_check,
                    disputed_by
                ],
            )?;
        }
        Ok(())
    }

    /// Sets a worker's count of consecutive verified units and its latest failed unit.
    pub fn set_trust(
        &self,
        worker: &str,
        verified: u64,
        failed_unit: Option<u64>,
    ) -> Result<(), StoreError> {
        self.run(
            "INSERT INTO trust (worker, verified, failed_unit) VALUES (?1, ?2, ?3)
             ON CONFLICT (worker) DO UPDATE
             SET verified = excluded.verified, failed_unit = excluded.failed_unit",
            params![worker, verified, failed_unit],
        )
    }

    /// Appends a ledger entry (prepared and signed by the ledger).
    pub fn insert_entry(&self, e: &ledger::Entry) -> Result<(), StoreError> {
        let json =
            serde_json::to_string(e).map_err(|err| bad_row(self.path, "ledger entry", err))?;
        self.run(
            "INSERT INTO ledger (seq, kind, reference, from_account, to_account, entry)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                e.seq,
                e.kind.code(),
                e.reference,
                e.from.map(|a| a.to_string()),
                e.to.map(|a| a.to_string()),
                json
            ],
        )
    }

    /// Records an API key (its blake3 hash: the key itself is never stored).
    pub fn insert_api_key(&self, hash: &str, wallet: &str, now_ms: u64) -> Result<(), StoreError> {
        self.run(
            "INSERT INTO api_keys (hash, wallet, created_ms) VALUES (?1, ?2, ?3)",
            params![hash, wallet, now_ms],
        )
    }

    /// Revokes an API key: its row is deleted (a revoked key takes no room).
    pub fn revoke_api_key(&self, hash: &str) -> Result<(), StoreError> {
        self.run("DELETE FROM api_keys WHERE hash = ?1", params![hash])
    }

    /// Stores an idempotent request's reply, then drops the replies created before
    /// `expired_before_ms` and those of the same wallet past its newest `per_wallet_max`.
    pub fn insert_reply(
        &self,
        r: &ReplyRow,
        expired_before_ms: u64,
        per_wallet_max: u64,
    ) -> Result<(), StoreError> {
        self.run(
            "INSERT INTO replies (reference, wallet, request_hash, model, text, prompt_tokens,
                                  completion_tokens, finish_reason, charged, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                r.reference,
                r.wallet,
                r.request_hash,
                r.model,
                r.text,
                r.prompt_tokens,
                r.completion_tokens,
                r.finish_reason,
                r.charged,
                r.created_ms
            ],
        )?;
        self.run(
            "DELETE FROM replies WHERE created_ms < ?1",
            params![expired_before_ms],
        )?;
        self.run(
            "DELETE FROM replies WHERE wallet = ?1 AND reference NOT IN (
                 SELECT reference FROM replies WHERE wallet = ?1
                 ORDER BY created_ms DESC, rowid DESC LIMIT ?2)",
            params![r.wallet, per_wallet_max],
        )
    }

    pub fn insert_rejection(&self, r: &RejectionRow) -> Result<(), StoreError> {
        self.rounds_changed.set(true);
        self.run(
            "INSERT INTO rejections (received_ms, round, worker, unit, code, sentence, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                r.received_ms,
                r.round,
                r.worker,
                r.unit,
                r.code,
                r.sentence,
                r.payload
            ],
        )
    }

    /// Records a model version (its blobs must already be in the blob store) and closes
    /// the round it came from.
    pub fn insert_version(&self, v: &VersionRow) -> Result<(), StoreError> {
        self.rounds_changed.set(true);
        let updates =
            serde_json::to_string(&v.updates).map_err(|e| bad_row(self.path, "update list", e))?;
        self.run(
            "INSERT INTO versions (version, parent, round, checkpoint, optimizer, holdout_loss, created_ms, updates)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                v.version,
                v.parent,
                v.round,
                v.checkpoint.as_str(),
                v.optimizer.as_ref().map(|h| h.as_str()),
                v.holdout_loss as f64,
                v.created_ms,
                updates
            ],
        )?;
        if let Some(round) = v.round {
            self.run(
                "UPDATE rounds SET aggregated_ms = ?2, version = ?3 WHERE round = ?1",
                params![round, v.created_ms, v.version],
            )?;
        }
        Ok(())
    }
}

impl Tx<'_> {
    /// Marks `version`'s checkpoint as removed at `now_ms` (remove the blob after the
    /// commit, if no row still names it).
    pub fn prune_checkpoint(&self, version: u64, now_ms: u64) -> Result<(), StoreError> {
        self.run(
            "UPDATE versions SET checkpoint_pruned_ms = ?2
             WHERE version = ?1 AND checkpoint_pruned_ms IS NULL",
            params![version, now_ms],
        )
    }

    /// Marks `version`'s optimizer state as removed at `now_ms`.
    pub fn prune_optimizer(&self, version: u64, now_ms: u64) -> Result<(), StoreError> {
        self.run(
            "UPDATE versions SET optimizer_pruned_ms = ?2
             WHERE version = ?1 AND optimizer IS NOT NULL AND optimizer_pruned_ms IS NULL",
            params![version, now_ms],
        )
    }

    /// Marks the blob of `unit`'s accepted update as removed at `now_ms`.
    pub fn prune_update(&self, unit: u64, now_ms: u64) -> Result<(), StoreError> {
        self.run(
            "UPDATE updates SET blob_pruned_ms = ?2 WHERE unit = ?1 AND blob_pruned_ms IS NULL",
            params![unit, now_ms],
        )
    }
}

/// A `workers` row from `SELECT id, name, registered_ms, device, class, tokens_per_s`.
fn worker_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WorkerRow> {
    let (device, class, tokens_per_s): (Option<String>, Option<String>, Option<f64>) =
        (r.get(3)?, r.get(4)?, r.get(5)?);
    Ok(WorkerRow {
        id: r.get(0)?,
        name: r.get(1)?,
        registered_ms: r.get(2)?,
        machine: match (device, class, tokens_per_s) {
            (Some(device), Some(class), Some(tokens_per_s)) => Some(protocol::api::Machine {
                device,
                class,
                tokens_per_s,
            }),
            _ => None,
        },
    })
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql(path))?;
    if found > known {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found,
            known,
        });
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction().map_err(sql(path))?;
        tx.execute_batch(migration).map_err(sql(path))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(sql(path))?;
        tx.commit().map_err(sql(path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(v: u64, checkpoint: BlobHash) -> VersionRow {
        VersionRow {
            version: v,
            parent: v.checked_sub(1),
            round: v.checked_sub(1),
            checkpoint,
            optimizer: None,
            holdout_loss: 5.0,
            created_ms: 10 + v,
            updates: vec![1, 2],
            checkpoint_pruned_ms: None,
            optimizer_pruned_ms: None,
        }
    }

    fn update(unit: u64, blob: BlobHash) -> UpdateRow {
        UpdateRow {
            unit,
            round: 0,
            worker: "ab".repeat(32),
            base_version: 0,
            blob,
            bytes: 3,
            norm: 0.5,
            weight: 100,
            received_ms: 5,
            class: Some("cpu/test".into()),
            tier: Some("fast".into()),
        }
    }

    /// Stored replies are bounded: inserting drops those past the retention time and a
    /// wallet's oldest past its count; other wallets keep theirs.
    #[test]
    fn stored_replies_are_kept_for_a_time_and_a_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        let reply = |wallet: &str, n: u64| ReplyRow {
            reference: format!("{wallet}:{n}"),
            wallet: wallet.to_owned(),
            request_hash: "h".into(),
            model: "hivetrain".into(),
            text: "To be".into(),
            prompt_tokens: 2,
            completion_tokens: 3,
            finish_reason: "length".into(),
            charged: 8,
            created_ms: n * 1000,
        };
        // (wallet, created at n s, then what is kept): a retention of 10 s, 2 a wallet.
        let steps: [(&str, u64, &[&str]); 5] = [
            ("a", 1, &["a:1"]),
            ("b", 2, &["a:1", "b:2"]),
            ("a", 3, &["a:1", "a:3", "b:2"]),
            ("a", 4, &["a:3", "a:4", "b:2"]),
            ("a", 13, &["a:13", "a:4"]),
        ];
        for (wallet, n, kept) in steps {
            let r = reply(wallet, n);
            store
                .write(|tx| tx.insert_reply(&r, (n * 1000).saturating_sub(10_000), 2))
                .expect("insert");
            let mut found: Vec<String> = ["a:1", "b:2", "a:3", "a:4", "a:13"]
                .iter()
                .filter(|k| store.reply(k).expect("read").is_some())
                .map(|k| k.to_string())
                .collect();
            found.sort();
            assert_eq!(found, kept, "after {wallet}:{n}");
        }
        assert_eq!(store.reply("a:13").expect("read"), Some(reply("a", 13)));
    }

    #[test]
    fn rows_survive_reopening_and_a_failed_transaction_writes_nothing() {
        // A seed past i64::MAX: SQLite keeps it as a negative integer.
        let unit = WorkUnit {
            id: 7,
            round: 0,
            base_version: 0,
            address: WorkAddress {
                shard: 3,
                offset: 40,
                steps: 10,
                seed: u64::MAX - 5,
            },
            lr: 2e-3,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut store = Store::open(dir.path()).expect("open");
            let ckpt = store.blobs().put(b"checkpoint").expect("blob");
            let upd = store.blobs().put(b"update").expect("blob");
            store
                .write(|tx| {
                    tx.set_meta("scheduler", "{}")?;
                    tx.start_round(0, 0, 1, &[unit])?;
                    tx.insert_version(&version(1, ckpt.clone()))?;
                    tx.insert_update(&update(7, upd.clone()))
                })
                .expect("write");
            // A second update for the same unit fails: the whole transaction is undone.
            let err = store.write(|tx| {
                tx.set_meta("scheduler", "changed")?;
                tx.insert_update(&update(7, upd.clone()))
            });
            assert!(err.is_err());
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            store.meta("scheduler").expect("meta").as_deref(),
            Some("{}")
        );
        assert_eq!(store.unit(7).expect("unit"), Some(unit));
        assert_eq!(store.unit(8).expect("unit"), None);
        let updates = store.updates_of_round(0).expect("updates");
        assert_eq!(updates.len(), 1);
        assert_eq!(
            store.blobs().get(&updates[0].blob).expect("blob"),
            b"update"
        );
        let versions = store.versions().expect("versions");
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0].updates, vec![1, 2]);
        let rounds = store.rounds().expect("rounds");
        assert_eq!(
            (rounds[0].accepted, rounds[0].tokens, rounds[0].version),
            (1, 100, Some(1))
        );
    }

    /// The rounds epoch moves after each commit that changes what `rounds_from` or
    /// `accepted_count` answer, and after no other: not for a lease or a meta value, not
    /// for a transaction that failed. A reader shares it, and once it has moved the
    /// reader's query sees the commit.
    #[test]
    fn the_rounds_epoch_moves_with_the_rounds_figures_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        let reader = store.reader().expect("reader");
        let epoch = reader.rounds_epoch();
        let upd = store.blobs().put(b"update").expect("blob");
        let unit = WorkUnit {
            id: 7,
            round: 0,
            base_version: 0,
            address: WorkAddress {
                shard: 0,
                offset: 0,
                steps: 1,
                seed: 1,
            },
            lr: 1e-3,
        };
        let rejection = RejectionRow {
            received_ms: 6,
            round: 0,
            worker: "cd".repeat(32),
            unit: 7,
            code: "stale".into(),
            sentence: "too old".into(),
            payload: None,
        };
        type Write<'a> = Box<dyn Fn(&Tx<'_>) -> Result<(), StoreError> + 'a>;
        let steps: Vec<(&str, Write<'_>, u64, (u64, u64))> = vec![
            (
                "a meta value",
                Box::new(|tx| tx.set_meta("k", "v")),
                0,
                (0, 0),
            ),
            (
                "a round starts",
                Box::new(|tx| tx.start_round(0, 0, 1, &[unit])),
                1,
                (0, 0),
            ),
            (
                "a lease",
                Box::new(|tx| tx.insert_lease(7, &"ab".repeat(32), 2, 9)),
                1,
                (0, 0),
            ),
            (
                "an update",
                Box::new(|tx| tx.insert_update(&update(7, upd.clone()))),
                2,
                (1, 0),
            ),
            (
                "the same update again fails",
                Box::new(|tx| tx.insert_update(&update(7, upd.clone()))),
                2,
                (1, 0),
            ),
            (
                "a rejection",
                Box::new(|tx| tx.insert_rejection(&rejection)),
                3,
                (1, 1),
            ),
            (
                "rejections trimmed",
                Box::new(|tx| tx.trim_rejections(0)),
                4,
                (1, 0),
            ),
        ];
        for (what, write, want, (accepted, rejected)) in steps {
            let failed = store.write(|tx| write(tx)).is_err();
            assert_eq!(failed, what.ends_with("fails"), "{what}");
            assert_eq!(epoch.get(), want, "{what}: epoch");
            let rounds = reader.rounds_from(0).expect("rounds");
            let got = rounds.first().map_or((0, 0), |r| (r.accepted, r.rejected));
            assert_eq!(got, (accepted, rejected), "{what}: the reader's round 0");
        }
    }

    /// Group commit: every commit is counted, one sync covers all those before it, a sync
    /// with nothing new makes no fsync, a failed transaction is no commit, and the
    /// reader's handle is the writer's.
    #[test]
    fn one_sync_covers_every_commit_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        let durability = store.durability();
        assert_eq!(durability.counts(), (0, 0), "opening commits nothing");
        for i in 0..3 {
            store
                .write(|tx| tx.set_meta("k", &i.to_string()))
                .expect("write");
        }
        assert_eq!(durability.counts(), (3, 0));
        assert!(durability.sync().expect("sync"), "three commits: one fsync");
        assert_eq!(durability.counts(), (3, 3));
        assert!(!durability.sync().expect("sync"), "nothing new: no fsync");
        let failed = store.write(|tx| {
            tx.set_meta("k", "lost")?;
            Err::<(), _>(StoreError::CorruptBlob {
                path: "undone".into(),
            })
        });
        assert!(failed.is_err());
        assert_eq!(
            durability.counts(),
            (3, 3),
            "a failed transaction commits nothing"
        );
        let reader = store.reader().expect("reader");
        store.write(|tx| tx.set_meta("k", "4")).expect("write");
        assert_eq!(reader.durability().counts(), (4, 3));
        assert!(reader.durability().sync().expect("sync"));
        assert_eq!(durability.counts(), (4, 4));
        assert_eq!(reader.meta("k").expect("meta").as_deref(), Some("4"));
    }

    #[test]
    fn blobs_are_content_addressed_and_checked_on_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let a = store.blobs().put(b"same").expect("put");
        let b = store.blobs().put(b"same").expect("put");
        assert_eq!(a, b);
        assert_eq!(store.blobs().count().expect("count"), 1);
        let path = dir
            .path()
            .join("blobs")
            .join(&a.as_str()[..2])
            .join(a.as_str());
        std::fs::write(&path, b"tampered").expect("write");
        let err = store.blobs().get(&a).expect_err("corrupt");
        assert!(err.to_string().contains("does not match its hash"), "{err}");
        assert!(BlobHash::parse("xyz").is_none());
        assert!(BlobHash::parse(&"A".repeat(64)).is_none());

        // A name made by another rule: stored under it, read back only with that rule.
        let name = BlobHash::from_digest(&[7; 32]);
        assert_eq!(name.digest(), Some([7; 32]));
        store.blobs().put_as(b"by rule", &name).expect("put_as");
        let by_rule = |bytes: &[u8]| bytes.starts_with(b"by");
        assert_eq!(
            store.blobs().get_checked(&name, by_rule).expect("get"),
            b"by rule"
        );
        assert!(
            store.blobs().get(&name).is_err(),
            "not the hash of its bytes"
        );
    }

    /// Blobs of every size round-trip, the large ones through the direct-IO path (sizes
    /// on and off its 4 KiB alignment), and a removed blob is gone.
    #[test]
    fn blobs_of_any_size_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        for len in [
            0,
            1,
            4095,
            4096,
            (1 << 20) - 1,
            1 << 20,
            (1 << 20) + 4097,
            3 << 20,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let hash = store.blobs().put(&bytes).expect("put");
            assert_eq!(store.blobs().get(&hash).expect("get"), bytes, "{len} bytes");

            // The same bytes received in uneven pieces into a reused aligned buffer (it
            // held other bytes before) and written from it, under a name of their own.
            let mut buf = AlignedBuf::default();
            buf.extend_from_slice(&[9; 5000]);
            buf.clear();
            for piece in bytes.chunks(65_521) {
                buf.extend_from_slice(piece);
            }
            assert_eq!(&buf[..], &bytes[..], "{len} bytes buffered");
            let name = BlobHash::from_digest(&[len as u8; 32]);
            store
                .blobs()
                .put_aligned(&mut buf, &name)
                .expect("put_aligned");
            let read = store.blobs().get_checked(&name, |_| true).expect("get");
            assert_eq!(read, bytes, "{len} bytes from the aligned buffer");
            store.blobs().remove(&name).expect("remove");
        }
        assert_eq!(store.blobs().count().expect("count"), 8);
        let hash = store.blobs().put(b"short-lived").expect("put");
        store.blobs().remove(&hash).expect("remove");
        store
            .blobs()
            .remove(&hash)
            .expect("a second remove is a no-op");
        assert!(!store.blobs().contains(&hash));
    }

    /// A pruned row lets go of its blob: the blob is no longer live, and a sweep removes
    /// it with temporary files, keeping every blob a row still names and files that are
    /// not blobs.
    #[test]
    fn pruned_rows_let_go_of_their_blobs_and_a_sweep_removes_what_no_row_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        let blob = |bytes: &[u8]| store.blobs().put(bytes).expect("put");
        let (c1, c2, o2, u7, tok, orphan) = (
            blob(b"c1"),
            blob(b"c2"),
            blob(b"o2"),
            blob(b"u7"),
            blob(b"tok"),
            blob(b"orphan"),
        );
        let v2 = VersionRow {
            optimizer: Some(o2.clone()),
            ..version(2, c2.clone())
        };
        store
            .write(|tx| {
                tx.set_meta("tokenizer", tok.as_str())?;
                tx.insert_version(&version(1, c1.clone()))?;
                tx.insert_version(&v2)?;
                tx.insert_update(&update(7, u7.clone()))
            })
            .expect("write");
        let live = |store: &Store| {
            let mut names: Vec<BlobHash> = store
                .live_blobs(&["tokenizer"])
                .expect("live")
                .into_iter()
                .collect();
            names.sort();
            names
        };
        let mut all = vec![c1.clone(), c2.clone(), o2.clone(), u7.clone(), tok.clone()];
        all.sort();
        assert_eq!(live(&store), all);
        store
            .write(|tx| {
                tx.prune_checkpoint(1, 50)?;
                tx.prune_optimizer(2, 50)?;
                tx.prune_update(7, 50)
            })
            .expect("prune");
        let mut kept = vec![c2.clone(), tok.clone()];
        kept.sort();
        assert_eq!(live(&store), kept);
        assert!(!store.blob_live(&c1, &["tokenizer"]).expect("live"));
        assert!(store.blob_live(&tok, &["tokenizer"]).expect("live"));
        let v = store.version(2).expect("read").expect("row");
        assert_eq!(
            (v.checkpoint_pruned_ms, v.optimizer_pruned_ms),
            (None, Some(50))
        );
        assert_eq!(store.versions_kept().expect("kept").len(), 1);
        assert!(store.updates_kept().expect("kept").is_empty());

        let prefix = dir.path().join("blobs").join(&c2.as_str()[..2]);
        std::fs::write(prefix.join("x.1.0.tmp"), b"cut short").expect("tmp");
        std::fs::write(prefix.join("README"), b"not a blob").expect("other");
        let swept = store
            .blobs()
            .sweep(&store.live_blobs(&["tokenizer"]).expect("live"));
        assert_eq!(
            swept.expect("sweep"),
            Swept {
                temporary: 1,
                orphans: 4,
                bytes: 9 + 2 + 2 + 2 + 6,
            }
        );
        for (blob, present) in [(&c1, false), (&o2, false), (&u7, false), (&orphan, false)] {
            assert_eq!(store.blobs().contains(blob), present, "{blob}");
        }
        assert!(store.blobs().contains(&c2) && store.blobs().contains(&tok));
        assert!(prefix.join("README").exists());
    }

    #[test]
    fn a_newer_schema_is_refused_with_a_sentence() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("open"));
        let conn = Connection::open(dir.path().join("hivetrain.sqlite3")).expect("conn");
        conn.pragma_update(None, "user_version", 99)
            .expect("pragma");
        drop(conn);
        let err = Store::open(dir.path()).expect_err("newer");
        assert!(
            err.to_string().contains("newer hivetrain (schema 99"),
            "{err}"
        );
    }
}
