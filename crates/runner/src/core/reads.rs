//! What the read-only routes serve (status, metrics, the ledger's views, models, the run's
//! data), with no wait on the core's lock: a snapshot the core publishes after each
//! change ([`Published`], an `Arc` swapped under a lock held for a pointer copy), the
//! ledger behind a read-write lock that the core takes for writing only to append an
//! entry the store already committed, and a read-only connection to the store (in WAL
//! mode its reads see the last commit and never wait for the writer).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ed25519_dalek::SigningKey;
use ledger::Ledger;
use protocol::WorkerId;
use protocol::api::{RoundStatus, RunInfo, Status};
use store::Store;

use run::{Class, RunError};

/// The ledger, shared by the core (which appends) and [`Reads`].
#[derive(Clone)]
pub struct SharedLedger(Arc<RwLock<Ledger>>);

impl SharedLedger {
    pub(super) fn new(ledger: Ledger) -> SharedLedger {
        SharedLedger(Arc::new(RwLock::new(ledger)))
    }

    /// The ledger for reading; a poisoned lock stops the process.
    pub fn read(&self) -> RwLockReadGuard<'_, Ledger> {
        self.0.read().unwrap_or_else(|_| {
            crate::drive::stop(&"a thread panicked while it appended to the ledger")
        })
    }

    /// [`Ledger::prepare`] under a read lock held only for the call (a guard held
    /// through a `match` on its result would be held across the arms too).
    pub(super) fn prepare(
        &self,
        draft: ledger::Draft,
        now_ms: u64,
        authority: &SigningKey,
    ) -> Result<ledger::Prepared, ledger::LedgerError> {
        self.read().prepare(draft, now_ms, authority)
    }

    pub(super) fn write(&self) -> RwLockWriteGuard<'_, Ledger> {
        self.0.write().unwrap_or_else(|_| {
            crate::drive::stop(&"a thread panicked while it appended to the ledger")
        })
    }
}

/// The run as of the core's last change.
#[derive(Clone, Debug)]
pub struct Published {
    pub round: u64,
    pub version: u64,
    pub initial_loss: f32,
    pub workers: u64,
    pub units_queued: u32,
    pub units_leased: u32,
    pub units_accepted: u32,
    /// The current version's safetensors and their blake3.
    pub checkpoint: Arc<Vec<u8>>,
    pub checkpoint_hash: String,
    /// The current version's trainable floats (what inference serves, over the run's
    /// frozen base when it has one).
    pub params: Arc<Vec<f32>>,
    /// Tokens one accepted update trained on.
    pub tokens_per_unit: u64,
    /// The lease a unit is given, in ms (what a worker's tier is measured against).
    pub lease_ms: u64,
}

/// A handle on what the read-only routes serve; clones share it.
#[derive(Clone)]
pub struct Reads {
    pub(super) published: Arc<RwLock<Arc<Published>>>,
    pub(super) ledger: SharedLedger,
    pub(super) authority: Arc<SigningKey>,
    /// A read-only connection to the run's store.
    pub(super) store: Arc<Mutex<Store>>,
    pub(super) run_info: Arc<RunInfo>,
    pub(super) corpus: Arc<Vec<u8>>,
    pub(super) tokenizer: Arc<Vec<u8>>,
    /// What serving reads and writes text with: the run's tokenizer, or a fine-tune's
    /// base's tokenizer and chat template.
    pub(super) vocab: Arc<dyn inference::Vocab>,
    pub(super) model: worker::unit::RunModel,
    /// A fine-tune's base file.
    pub(super) base: Option<Arc<Vec<u8>>>,
    /// Bumped by the store after each commit that changed a round's figures.
    pub(super) epoch: store::RoundsEpoch,
    /// Store answers as of an epoch (or a version), so that a read between two such
    /// commits is answered from memory.
    pub(super) cache: Arc<Mutex<ReadCache>>,
}

/// How many `/v1/status?rounds=N` views (by their first round) the cache keeps.
const ROUND_VIEWS_CACHED: usize = 4;

/// What the read routes answered from the store, with the epoch (or version) it holds
/// for. Each entry is replaced, never accumulated: at most [`ROUND_VIEWS_CACHED`] round
/// views, one count, one loss.
#[derive(Debug, Default)]
pub(super) struct ReadCache {
    /// `(epoch, first, rows)`: [`Store::rounds_from`]`(first)`, the latest used last.
    rounds: Vec<(u64, u64, Arc<Vec<store::RoundRow>>)>,
    /// `(epoch, (count, tokens))`: [`Store::accepted_totals`].
    accepted: Option<(u64, (u64, u64))>,
    /// `(version, loss)`: the holdout loss of a version (a version's row never changes
    /// its loss).
    holdout: Option<(u64, f32)>,
}

impl std::fmt::Debug for Reads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reads").finish_non_exhaustive()
    }
}

fn internal(e: store::StoreError) -> RunError {
    RunError::internal(&e)
}

impl Reads {
    /// The run as last published.
    pub fn published(&self) -> Arc<Published> {
        self.published
            .read()
            .unwrap_or_else(|_| crate::drive::stop(&"a thread panicked while it published"))
            .clone()
    }

    pub(super) fn publish(&self, next: Published) {
        *self
            .published
            .write()
            .unwrap_or_else(|_| crate::drive::stop(&"a thread panicked while it published")) =
            Arc::new(next);
    }

    pub fn ledger(&self) -> &SharedLedger {
        &self.ledger
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // The connection is only read: a panic cannot leave it half-changed.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn run_info(&self) -> RunInfo {
        RunInfo {
            version: self.published().version,
            ..(*self.run_info).clone()
        }
    }

    pub fn corpus(&self) -> Arc<Vec<u8>> {
        self.corpus.clone()
    }

    pub fn tokenizer(&self) -> Arc<Vec<u8>> {
        self.tokenizer.clone()
    }

    /// A fine-tune's base file (`RunInfo::base`); none for a run from scratch.
    pub fn base(&self) -> Option<Arc<Vec<u8>>> {
        self.base.clone()
    }

    /// The run's progress, round by round.
    pub fn status(&self, now_ms: u64, newest: Option<u64>) -> Result<Status, RunError> {
        let p = self.published();
        let first = Self::first_round(&p, newest);
        let rows = match self.cached_rounds(first) {
            Some(rows) => rows,
            None => {
                let epoch = self.epoch.get();
                let rows = Arc::new(self.store().rounds_from(first).map_err(internal)?);
                let mut cache = self.cache();
                cache.rounds.retain(|(_, f, _)| *f != first);
                if cache.rounds.len() == ROUND_VIEWS_CACHED {
                    cache.rounds.remove(0);
                }
                cache.rounds.push((epoch, first, rows.clone()));
                rows
            }
        };
        Ok(Self::status_of(&p, &rows, now_ms))
    }

    /// [`Reads::status`] from memory alone: `None` when it needs a store read (a round's
    /// figures changed since the view was last read). What the HTTP route tries first,
    /// on its own thread.
    pub fn status_cached(&self, now_ms: u64, newest: Option<u64>) -> Option<Status> {
        let p = self.published();
        let rows = self.cached_rounds(Self::first_round(&p, newest))?;
        Some(Self::status_of(&p, &rows, now_ms))
    }

    fn first_round(p: &Published, newest: Option<u64>) -> u64 {
        newest.map_or(0, |n| (p.round + 1).saturating_sub(n))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ReadCache> {
        // Each entry is replaced whole: a panic cannot leave one half-written.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached_rounds(&self, first: u64) -> Option<Arc<Vec<store::RoundRow>>> {
        let epoch = self.epoch.get();
        self.cache()
            .rounds
            .iter()
            .find(|(e, f, _)| *e == epoch && *f == first)
            .map(|(_, _, rows)| rows.clone())
    }

    /// The status of snapshot `p` over `rows`. The rows are at least as new as `p` (the
    /// store bumps the epoch after its commit, the core publishes after that); rows
    /// committed after the snapshot was taken wait for the next one.
    fn status_of(p: &Published, rows: &[store::RoundRow], now_ms: u64) -> Status {
        let rounds = rows
            .iter()
            .filter(|r| r.round <= p.round)
            .map(|r| RoundStatus {
                round: r.round,
                base_version: r.base_version,
                version: r.version.filter(|v| *v <= p.version),
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
        Status {
            round: p.round,
            version: p.version,
            initial_holdout_loss: p.initial_loss,
            workers: p.workers,
            units_queued: p.units_queued,
            units_leased: p.units_leased,
            units_accepted: p.units_accepted,
            rounds,
        }
    }

    /// The checkpoint of `version` and its blake3 (410 `version_pruned` when the
    /// retention policy removed it).
    pub fn model(&self, version: u64) -> Result<(Arc<Vec<u8>>, String), RunError> {
        let p = self.published();
        if version == p.version {
            return Ok((p.checkpoint.clone(), p.checkpoint_hash.clone()));
        }
        let unknown = || {
            RunError::new(
                Class::NotFound,
                "unknown_version",
                format!(
                    "there is no model version {version}; the newest is {}",
                    p.version
                ),
            )
        };
        // Versions after the current one do not exist yet: no store read for them (and
        // none for a number the store cannot hold).
        if version > p.version {
            return Err(unknown());
        }
        let store = self.store();
        let row = store
            .version(version)
            .map_err(internal)?
            .ok_or_else(unknown)?;
        if row.checkpoint_pruned_ms.is_some() {
            return Err(super::retention::pruned_reply(&store, version));
        }
        let bytes = store.blobs().get(&row.checkpoint).map_err(internal)?;
        Ok((Arc::new(bytes), row.checkpoint.to_string()))
    }

    /// A page of ledger entries from `from`, at most `limit` of them.
    pub fn ledger_page(&self, from: u64, limit: u64) -> ledger::wire::EntriesPage {
        let ledger = self.ledger.read();
        let entries = ledger.entries();
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
        self.ledger.read().tree_head(now_ms, &self.authority)
    }

    /// The inclusion proof of entry `seq` in the tree of the first `size` entries.
    pub fn inclusion_proof(
        &self,
        seq: u64,
        size: u64,
    ) -> Result<ledger::merkle::InclusionProof, RunError> {
        let ledger = self.ledger.read();
        let len = ledger.len() as u64;
        if size == 0 || size > len || seq >= size {
            return Err(RunError::new(
                Class::NotFound,
                "no_such_entry",
                format!(
                    "no entry {seq} in a tree of {size} entries (the ledger holds {len}); take size from a tree head"
                ),
            ));
        }
        ledger
            .inclusion_proof(seq, size)
            .ok_or_else(|| RunError::internal(&std::io::Error::other("proof out of range")))
    }

    /// A wallet's totals and its entries (the newest `newest` of them, or all).
    pub fn wallet(&self, wallet: WorkerId, newest: Option<usize>) -> ledger::wire::WalletView {
        self.ledger
            .read()
            .wallet_view(&ledger::Account::Wallet(wallet), newest)
    }

    /// Wallets by credit earned, most first.
    pub fn leaderboard(&self) -> Result<Vec<ledger::wire::LeaderRow>, RunError> {
        let published = self.published();
        let workers: HashMap<String, store::WorkerRow> = self
            .store()
            .workers()
            .map_err(internal)?
            .into_iter()
            .map(|w| (w.id.clone(), w))
            .collect();
        let ledger = self.ledger.read();
        let mut rows: Vec<ledger::wire::LeaderRow> = ledger
            .earned()
            .iter()
            .map(|(&w, &(earned, units))| {
                let row = workers.get(&w.to_string());
                let machine = row.and_then(|r| r.machine.as_ref());
                ledger::wire::LeaderRow {
                    wallet: w.to_string(),
                    name: row.map(|r| r.name.clone()).unwrap_or_default(),
                    device: machine.map(|m| m.device.clone()).unwrap_or_default(),
                    tier: machine
                        .map(|m| {
                            run::Tier::of(
                                m.tokens_per_s,
                                published.tokens_per_unit,
                                published.lease_ms,
                            )
                            .name()
                            .to_owned()
                        })
                        .unwrap_or_default(),
                    earned,
                    units,
                    balance: ledger.balance(&ledger::Account::Wallet(w)),
                }
            })
            .collect();
        rows.sort_by(|a, b| b.earned.cmp(&a.earned).then(a.wallet.cmp(&b.wallet)));
        Ok(rows)
    }

    /// Network totals.
    pub fn stats(&self) -> Result<ledger::wire::Stats, RunError> {
        let accepted = match self.cached_accepted() {
            Some(n) => n,
            None => {
                let epoch = self.epoch.get();
                let n = self.store().accepted_totals().map_err(internal)?;
                self.cache().accepted = Some((epoch, n));
                n
            }
        };
        Ok(self.stats_of(accepted))
    }

    /// [`Reads::stats`] from memory alone, or `None` when it needs a store read.
    pub fn stats_cached(&self) -> Option<ledger::wire::Stats> {
        self.cached_accepted().map(|n| self.stats_of(n))
    }

    fn cached_accepted(&self) -> Option<(u64, u64)> {
        let epoch = self.epoch.get();
        self.cache()
            .accepted
            .filter(|(e, _)| *e == epoch)
            .map(|(_, n)| n)
    }

    fn stats_of(&self, (accepted, tokens): (u64, u64)) -> ledger::wire::Stats {
        let p = self.published();
        let saturate = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
        let ledger = self.ledger.read();
        ledger::wire::Stats {
            entries: ledger.len() as u64,
            minted: saturate(ledger.minted()),
            burned: saturate(ledger.burned()),
            pool: ledger.balance(&ledger::Account::Pool),
            wallets: ledger
                .balances()
                .keys()
                .filter(|a| matches!(a, ledger::Account::Wallet(_)))
                .count() as u64,
            workers: p.workers,
            accepted_updates: accepted,
            tokens_trained: tokens,
            current_version: p.version,
            head: ledger.head_hash(),
        }
    }

    /// The holdout loss of the published version.
    pub fn holdout_loss(&self) -> Result<f32, RunError> {
        let version = self.published().version;
        if let Some(loss) = self.cached_holdout(version) {
            return Ok(loss);
        }
        let loss = self
            .store()
            .version(version)
            .map_err(internal)?
            .map(|v| v.holdout_loss)
            .ok_or_else(|| RunError::internal(&std::io::Error::other("no current version row")))?;
        self.cache().holdout = Some((version, loss));
        Ok(loss)
    }

    /// [`Reads::holdout_loss`] from memory alone, or `None` when it needs a store read.
    pub fn holdout_loss_cached(&self) -> Option<f32> {
        self.cached_holdout(self.published().version)
    }

    fn cached_holdout(&self, version: u64) -> Option<f32> {
        self.cache()
            .holdout
            .filter(|(v, _)| *v == version)
            .map(|(_, loss)| loss)
    }
}
