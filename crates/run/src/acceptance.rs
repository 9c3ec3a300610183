//! Whether an update is accepted: [`Acceptance::judge`] before it is scored (form,
//! lease, staleness, norms, a byte-equal copy), [`Acceptance::decide`] after (its score
//! against the version's median gain, and agreement), [`Acceptance::accepted`] once its
//! row is committed, and [`Acceptance::round_closed`] when its round aggregates.
//!
//! Everything here is in memory and rebuilt at a restart from the store
//! ([`Acceptance::resume`]): the norms of this round and the last come back from the
//! update rows, the refusals agreement needs from the rejection rows
//! ([`Acceptance::refused`]); the gains start again (after a restart the median gain
//! starts from the next accepted update).

use std::collections::{BTreeMap, HashMap};

use protocol::WorkerId;
use validation::score::{Score, ScorePolicy};
use validation::{Inspected, LeaseState, Reject, RoundState, Verdict};

/// Refused payloads remembered per unit for agreement (a liar's refusal first must not
/// keep two honest workers from agreeing).
pub const REFUSED_PAYLOADS_KEPT: usize = 4;

/// The run's acceptance settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    /// Largest accepted `current_version - base_version`.
    pub max_staleness: u64,
    /// Values a delta carries.
    pub n_params: u32,
    /// Largest accepted L2 norm of a delta.
    pub delta_norm_max: f32,
    /// Largest accepted multiple of the median norm.
    pub median_multiple_max: f32,
    /// Check values (finite, norm bounds); off only in the simulator's plain-mean
    /// baseline.
    pub check_values: bool,
    /// The score an update must earn (when `enabled`; off, so is the copy check, which
    /// like the score's own-data margin belongs to it).
    pub scoring: ScorePolicy,
    /// Whether re-runs are on: only then may two workers' agreement override a scored
    /// refusal (the override forces a re-run).
    pub agreement: bool,
}

/// What [`Acceptance::decide`] concluded.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Accept {
        work_unit: u64,
        worker: WorkerId,
        norm: f32,
        /// Re-run this unit whatever the sampling says (accepted on agreement).
        force_check: bool,
        /// The update's own-data gain on its base version, for the median bar.
        gain: Option<(u64, f32)>,
    },
    Refuse(Verdict),
}

/// Scoring is on, but the update came without its score (a driver's bug).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("scoring is on, but the update was not scored")]
pub struct Unscored;

/// The state acceptance keeps across updates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Acceptance {
    /// The norms of the updates the last aggregated round accepted, each scaled to a
    /// unit of the run's steps (`validation::RoundState::unit_scale`).
    previous_norms: Vec<f32>,
    /// The norms of this round's accepted updates, by unit, scaled likewise.
    norms: BTreeMap<u64, f32>,
    /// Own-data gains of the updates accepted on one base version.
    gains: Option<(u64, Vec<f32>)>,
    /// The first payloads refused on their score for each unit of the current round, and
    /// who sent them.
    refused_payloads: HashMap<u64, Vec<([u8; 32], WorkerId)>>,
}

impl Acceptance {
    /// The state after a restart: the norms of the last aggregated round and of this
    /// round's accepted updates, scaled to a unit of the run's steps.
    pub fn resume(previous_norms: Vec<f32>, norms: impl IntoIterator<Item = (u64, f32)>) -> Self {
        Acceptance {
            previous_norms,
            norms: norms.into_iter().collect(),
            ..Acceptance::default()
        }
    }

    /// The lower middle of the norms this round and the last aggregated one accepted
    /// (`None` before any). The last round's norms make the first updates of a round
    /// meet a bar that honest work set, so an outlier that arrives first cannot set the
    /// bar itself; the lower middle keeps one outlier of two from setting it either.
    pub fn median_norm(&self) -> Option<f32> {
        let mut norms: Vec<f32> = self
            .previous_norms
            .iter()
            .chain(self.norms.values())
            .copied()
            .collect();
        if norms.is_empty() {
            return None;
        }
        norms.sort_by(f32::total_cmp);
        Some(norms[(norms.len() - 1) / 2])
    }

    /// Whether the accepted update of `unit` is in this round's median bar.
    pub fn holds(&self, unit: u64) -> bool {
        self.norms.contains_key(&unit)
    }

    /// The verdict on an update before its score: `validation::judge` against the round
    /// (`current_version`, `lease`: the unit's lease, if any), then, with scoring on, a
    /// byte-equal copy (`copy_of`: the unit already accepted with this payload hash).
    pub fn judge(
        &self,
        update: &Inspected,
        rules: &Rules,
        current_version: u64,
        lease: Option<&LeaseState>,
        unit_scale: f32,
        copy_of: Option<u64>,
    ) -> Verdict {
        let round = RoundState {
            current_version,
            max_staleness: rules.max_staleness,
            n_params: rules.n_params,
            delta_norm_max: rules.delta_norm_max,
            median_norm: self.median_norm(),
            median_multiple_max: rules.median_multiple_max,
            unit_scale,
            check_values: rules.check_values,
        };
        let verdict = validation::judge(update, &round, lease);
        // A byte-equal copy is the cheapest copy to catch; like the score's own-data
        // margin it belongs to scoring (off, only a re-run finds it).
        match (verdict, copy_of) {
            (Verdict::Accepted { .. }, Some(unit)) if rules.scoring.enabled => Verdict::reject(
                Reject::Copied,
                format!(
                    "the update's values are those of the update already accepted for unit {unit}: send the delta of your own unit's training"
                ),
            ),
            (verdict, _) => verdict,
        }
    }

    /// The decision on an update judged `verdict` (by [`Acceptance::judge`], against the
    /// round as it stands now) and scored `score` (required when scoring is on). A
    /// scored refusal that another worker's byte-equal update for the same unit also
    /// got is overridden: training is deterministic, so two keys agreeing bit for bit is
    /// what a re-run shows, and the unit's data, not the workers, is what scores low.
    /// The update is then accepted with a re-run forced, so two colluding keys agreeing
    /// on a lie are still caught and clawed back. Harmful updates are never overridden,
    /// and nothing is without re-runs. Remembers the refusal otherwise.
    pub fn decide(
        &mut self,
        update: &Inspected,
        verdict: Verdict,
        score: Option<&Score>,
        rules: &Rules,
    ) -> Result<Decision, Unscored> {
        let Verdict::Accepted {
            work_unit,
            worker,
            norm,
        } = verdict
        else {
            return Ok(Decision::Refuse(verdict));
        };
        let accept = |force_check, gain| Decision::Accept {
            work_unit,
            worker,
            norm,
            force_check,
            gain,
        };
        let policy = &rules.scoring;
        if !policy.enabled {
            return Ok(accept(false, None));
        }
        let score = score.ok_or(Unscored)?;
        let version = update.header.base_version;
        let median = match &self.gains {
            Some((v, gains)) if *v == version => validation::score::median_gain(gains),
            _ => None,
        };
        Ok(match policy.judge(score, median) {
            None => accept(false, Some((version, score.own_gain()))),
            Some(refused) if self.agreed(update, &refused, rules) => accept(true, None),
            Some(refused) => Decision::Refuse(refused),
        })
    }

    /// Whether another worker sent the same bytes for the same unit and was refused alike
    /// on its score; remembers this refusal otherwise.
    fn agreed(&mut self, update: &Inspected, refused: &Verdict, rules: &Rules) -> bool {
        let Verdict::Rejected { reason, .. } = refused else {
            return false;
        };
        if !matches!(reason, Reject::NoProgress | Reject::NotOwnData) || !rules.agreement {
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

    /// Remembers a refusal on the score that the store kept (after a restart), as
    /// [`Acceptance::decide`] did when it was made.
    pub fn refused(&mut self, unit: u64, payload_hash: [u8; 32], worker: WorkerId) {
        let seen = self.refused_payloads.entry(unit).or_default();
        if seen.len() < REFUSED_PAYLOADS_KEPT && !seen.contains(&(payload_hash, worker)) {
            seen.push((payload_hash, worker));
        }
    }

    /// Records an accepted update once its row is committed: its norm (scaled to a unit
    /// of the run's steps) joins the median bar, and its gain the median gain if it is on the current version (a late one's
    /// gain, on an older base, is not comparable).
    pub fn accepted(
        &mut self,
        unit: u64,
        norm: f32,
        gain: Option<(u64, f32)>,
        current_version: u64,
    ) {
        self.norms.insert(unit, norm);
        if let Some((version, gain)) = gain.filter(|(v, _)| *v == current_version) {
            match &mut self.gains {
                Some((v, gains)) if *v == version => gains.push(gain),
                _ => self.gains = Some((version, vec![gain])),
            }
        }
    }

    /// The round aggregated: its norms become the last round's, and what agreement
    /// remembered of it goes.
    pub fn round_closed(&mut self) {
        self.previous_norms = std::mem::take(&mut self.norms).into_values().collect();
        self.refused_payloads.clear();
    }
}

#[cfg(test)]
mod tests;
