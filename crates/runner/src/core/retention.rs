//! The retention policy: which checkpoints, optimizer states and update blobs stay on
//! disk as the run goes, and the cleanup of what a crash leaves behind.
//!
//! Rows are never removed (the registry, the ledger's references and the check records
//! are history); a pruned blob's row is marked in the same transaction as the version
//! that made it unneeded, and the blob is removed after the commit. A crash between the
//! two leaves a blob that no row names, which the next [`Core::open`] sweeps away with
//! the temporary files of writes a crash cut short.

use std::collections::BTreeSet;
use std::path::Path;

use store::{BlobHash, CheckState, KeptUpdate, Store, Swept, Tx, VersionRow};

use super::{Core, CoreError, META_CONFIG, META_SCHEDULER, META_TOKENIZER, lock_dir};
use crate::config::{CoordinatorConfig, RetentionConfig};
use run::{Class, RunError};

/// The `meta` values that name blobs (kept by every sweep).
const META_BLOBS: &[&str] = &[META_TOKENIZER];

/// Where the run stands, as far as retention is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunPoint {
    /// The newest version (its checkpoint is served, its optimizer state resumes the run).
    pub version: u64,
    /// The round in progress (its accepted updates wait for aggregation).
    pub round: u64,
    /// Late updates are accepted on bases up to this many versions old.
    pub max_staleness: u64,
}

/// What to let go of: (version or unit, blob) pairs whose rows are marked and whose
/// blobs are removed once no row names them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub checkpoints: Vec<(u64, BlobHash)>,
    pub optimizers: Vec<(u64, BlobHash)>,
    pub updates: Vec<(u64, BlobHash)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.checkpoints.is_empty() && self.optimizers.is_empty() && self.updates.is_empty()
    }
}

/// The policy, as a function of the rows whose blobs are still on disk (no IO):
///
/// - an update's blob stays while its round is one of the last `update_rounds` before
///   the current one (or the current one: it waits for aggregation), or while its
///   re-run is queued;
/// - a checkpoint stays for version 0, the newest `keep_last` versions, the newest
///   `max_staleness + 1` (the bases late workers train on), every `keep_every`-th
///   version, and the base version of every update whose blob stays (a re-run starts
///   from it);
/// - only the newest version's optimizer state stays: it is all a restart needs.
pub fn plan(
    policy: &RetentionConfig,
    at: RunPoint,
    versions: &[VersionRow],
    updates: &[KeptUpdate],
) -> Plan {
    let mut out = Plan::default();
    if !policy.enabled {
        return out;
    }
    let first_round = at.round.saturating_sub(u64::from(policy.update_rounds));
    let mut bases = BTreeSet::new();
    for u in updates {
        if u.round >= first_round || u.check == Some(CheckState::Queued) {
            bases.insert(u.base_version);
        } else {
            out.updates.push((u.unit, u.blob.clone()));
        }
    }
    let newest = u64::from(policy.keep_last.max(1)).max(at.max_staleness.saturating_add(1));
    for v in versions {
        let keep = v.version == 0
            || v.version.saturating_add(newest) > at.version
            || (policy.keep_every > 0 && v.version.is_multiple_of(u64::from(policy.keep_every)))
            || bases.contains(&v.version);
        if v.checkpoint_pruned_ms.is_none() && !keep {
            out.checkpoints.push((v.version, v.checkpoint.clone()));
        }
        if let (Some(state), None) = (&v.optimizer, v.optimizer_pruned_ms)
            && v.version < at.version
        {
            out.optimizers.push((v.version, state.clone()));
        }
    }
    out
}

/// Marks the plan's rows as pruned at `now_ms` (in the caller's transaction).
pub fn mark(tx: &Tx<'_>, plan: &Plan, now_ms: u64) -> Result<(), store::StoreError> {
    for (version, _) in &plan.checkpoints {
        tx.prune_checkpoint(*version, now_ms)?;
    }
    for (version, _) in &plan.optimizers {
        tx.prune_optimizer(*version, now_ms)?;
    }
    for (unit, _) in &plan.updates {
        tx.prune_update(*unit, now_ms)?;
    }
    Ok(())
}

/// Removes the plan's blobs that no row names any more (after [`mark`] committed); the
/// bytes freed.
fn remove(store: &Store, plan: &Plan) -> Result<u64, store::StoreError> {
    let mut freed = 0;
    let blobs = plan
        .checkpoints
        .iter()
        .chain(&plan.optimizers)
        .chain(&plan.updates)
        .map(|(_, blob)| blob)
        .collect::<BTreeSet<_>>();
    for blob in blobs {
        // An optimizer state can be the same bytes as a newer one (an outer rule with
        // no state stores the empty blob for every version).
        if store.blob_live(blob, META_BLOBS)? {
            continue;
        }
        freed += store.blobs().size(blob).unwrap_or(0);
        store.blobs().remove(blob)?;
    }
    Ok(freed)
}

/// Removes the blob directory's temporary files and the blobs no row names. Only with
/// the run's lock held and no blob being written (at open).
pub fn sweep(store: &Store) -> Result<Swept, store::StoreError> {
    store.blobs().sweep(&store.live_blobs(META_BLOBS)?)
}

/// The plan for the run at `at`, from the store, with `new_version` (not yet committed)
/// counted among the versions.
fn plan_from_store(
    store: &Store,
    policy: &RetentionConfig,
    at: RunPoint,
    new_version: Option<&VersionRow>,
) -> Result<Plan, store::StoreError> {
    if !policy.enabled {
        return Ok(Plan::default());
    }
    let mut versions = store.versions_kept()?;
    versions.extend(new_version.cloned());
    Ok(plan(policy, at, &versions, &store.updates_kept()?))
}

/// "0, 4-7, 100": versions as ranges.
fn ranges(versions: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < versions.len() {
        let mut j = i;
        while j + 1 < versions.len() && versions[j + 1] == versions[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            versions[i].to_string()
        } else {
            format!("{}-{}", versions[i], versions[j])
        });
        i = j + 1;
    }
    parts.join(", ")
}

/// The versions whose checkpoints are on disk, as ranges ("0, 4-7").
pub fn kept_versions(store: &Store) -> Result<String, store::StoreError> {
    let kept: Vec<u64> = store
        .versions_kept()?
        .iter()
        .filter(|v| v.checkpoint_pruned_ms.is_none())
        .map(|v| v.version)
        .collect();
    Ok(ranges(&kept))
}

impl Core {
    /// The plan for a new version `row`, the scheduler then at `round`.
    pub(super) fn retention_plan(&self, row: &VersionRow, round: u64) -> Result<Plan, CoreError> {
        let at = RunPoint {
            version: row.version,
            round,
            max_staleness: self.config.schedule.max_staleness,
        };
        Ok(plan_from_store(
            &self.store,
            &self.config.retention,
            at,
            Some(row),
        )?)
    }

    /// Removes a committed plan's blobs. A failure is logged, not returned: the version
    /// is committed, and what is left is swept at the next open.
    pub(super) fn remove_pruned(&self, plan: &Plan) {
        if plan.is_empty() {
            return;
        }
        if let Err(e) = remove(&self.store, plan) {
            tracing::warn!("retention: {e} (swept at the next start)");
        }
    }
}

/// 410 `version_pruned` for a version whose checkpoint was pruned, naming the versions
/// `store` keeps.
pub(super) fn pruned_reply(store: &Store, version: u64) -> RunError {
    let kept = kept_versions(store).unwrap_or_else(|e| format!("unknown ({e})"));
    RunError::new(
        Class::Gone,
        "version_pruned",
        format!(
            "version {version}'s checkpoint was removed by the run's retention policy; the versions kept are {kept}"
        ),
    )
}

/// What [`prune_run`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Versions whose checkpoint was removed.
    pub checkpoints: Vec<u64>,
    /// Versions whose optimizer state was removed.
    pub optimizers: Vec<u64>,
    /// Update blobs removed.
    pub updates: usize,
    /// Temporary files and blobs no row named.
    pub swept: Swept,
    /// Bytes freed, all told.
    pub bytes: u64,
    /// The versions whose checkpoints remain, as ranges.
    pub kept: String,
}

/// Applies `policy` to the stopped run in `dir` (`hivetrain model prune`): takes the
/// run's lock as a coordinator does, marks and removes what the policy lets go of, and
/// sweeps temporary files and blobs no row names.
pub fn prune_run(dir: &Path, policy: &RetentionConfig, now_ms: u64) -> Result<Pruned, CoreError> {
    if !dir.join("hivetrain.sqlite3").exists() {
        return Err(CoreError::NoRun {
            dir: dir.display().to_string(),
        });
    }
    let _lock = lock_dir(dir)?;
    let mut store = Store::open(dir)?;
    let config: CoordinatorConfig = store
        .meta(META_CONFIG)?
        .and_then(|json| serde_json::from_str(&json).ok())
        .ok_or_else(|| CoreError::Inconsistent("the run records no readable config".into()))?;
    let scheduler: scheduler::Scheduler = store
        .meta(META_SCHEDULER)?
        .and_then(|json| serde_json::from_str(&json).ok())
        .ok_or_else(|| CoreError::Inconsistent("the run records no scheduler state".into()))?;
    let at = RunPoint {
        version: scheduler.version(),
        round: scheduler.round(),
        max_staleness: config.schedule.max_staleness,
    };
    let plan = plan_from_store(&store, policy, at, None)?;
    store.write(|tx| mark(tx, &plan, now_ms))?;
    let bytes = remove(&store, &plan)?;
    let swept = sweep(&store)?;
    Ok(Pruned {
        checkpoints: plan.checkpoints.iter().map(|(v, _)| *v).collect(),
        optimizers: plan.optimizers.iter().map(|(v, _)| *v).collect(),
        updates: plan.updates.len(),
        swept,
        bytes: bytes + swept.bytes,
        kept: kept_versions(&store)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u64) -> BlobHash {
        BlobHash::of(&n.to_le_bytes())
    }

    fn version(v: u64) -> VersionRow {
        VersionRow {
            version: v,
            parent: v.checked_sub(1),
            round: v.checked_sub(1),
            checkpoint: blob(1000 + v),
            optimizer: (v > 0).then(|| blob(2000 + v)),
            holdout_loss: 5.0,
            created_ms: v,
            updates: Vec::new(),
            checkpoint_pruned_ms: None,
            optimizer_pruned_ms: None,
        }
    }

    /// Update `unit` of `round`, on the base the round started from, in `check` state.
    fn update(unit: u64, round: u64, base_version: u64, check: CheckState) -> KeptUpdate {
        KeptUpdate {
            unit,
            round,
            base_version,
            blob: blob(unit),
            check: Some(check),
        }
    }

    /// The plan for versions 0..=`at.version` (all on disk) and `updates`, as
    /// "checkpoints [..] optimizers [..] updates [..]".
    #[track_caller]
    fn check(policy: RetentionConfig, at: RunPoint, updates: &[KeptUpdate], expect: &str) {
        let versions: Vec<VersionRow> = (0..=at.version).map(version).collect();
        let plan = plan(&policy, at, &versions, updates);
        let ids = |pairs: &[(u64, BlobHash)]| pairs.iter().map(|(v, _)| *v).collect::<Vec<_>>();
        let got = format!(
            "checkpoints {:?} optimizers {:?} updates {:?}",
            ids(&plan.checkpoints),
            ids(&plan.optimizers),
            ids(&plan.updates)
        );
        assert_eq!(got, expect);
    }

    #[test]
    fn the_policy_keeps_what_serving_resuming_late_work_and_rechecks_need() {
        let policy = |keep_last, keep_every, update_rounds| RetentionConfig {
            enabled: true,
            keep_last,
            keep_every,
            update_rounds,
        };
        let at = |version, max_staleness| RunPoint {
            version,
            round: version,
            max_staleness,
        };
        // Version 0, the newest 2, every 4th; only the newest optimizer state.
        check(
            policy(2, 4, 0),
            at(9, 0),
            &[],
            "checkpoints [1, 2, 3, 5, 6, 7] optimizers [1, 2, 3, 4, 5, 6, 7, 8] updates []",
        );
        // Late workers train on the newest max_staleness + 1 whatever keep_last says.
        check(
            policy(1, 0, 0),
            at(5, 2),
            &[],
            "checkpoints [1, 2] optimizers [1, 2, 3, 4] updates []",
        );
        // Updates of the last 2 rounds stay with their bases; an older one stays while
        // its re-run is queued (and so does its base); the rest go, whatever their state.
        check(
            policy(1, 0, 2),
            at(8, 0),
            &[
                update(1, 1, 1, CheckState::Queued),
                update(2, 2, 2, CheckState::Unchecked),
                update(3, 3, 3, CheckState::Verified),
                update(4, 6, 6, CheckState::Unchecked),
                update(5, 7, 6, CheckState::Verified),
                update(6, 8, 8, CheckState::Queued),
            ],
            "checkpoints [2, 3, 4, 5, 7] optimizers [1, 2, 3, 4, 5, 6, 7] updates [2, 3]",
        );
        // Off: nothing goes.
        check(
            RetentionConfig {
                enabled: false,
                ..policy(1, 0, 0)
            },
            at(5, 0),
            &[update(1, 0, 0, CheckState::Verified)],
            "checkpoints [] optimizers [] updates []",
        );
    }

    #[test]
    fn kept_versions_read_as_ranges() {
        assert_eq!(ranges(&[0, 4, 5, 6, 7, 100]), "0, 4-7, 100");
        assert_eq!(ranges(&[3]), "3");
        assert_eq!(ranges(&[]), "");
    }
}
