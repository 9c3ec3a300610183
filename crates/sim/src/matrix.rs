//! The robustness issue's measurements over simulated runs: for each attack, the run
//! defended as configured and the plain weighted mean, against the clean run of as many
//! honest workers with the same seed; and the figures each claim is judged on.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::{Attack, Defense, Report, Scenario, SimError};

/// Honest workers of a run with 20% attackers (IPM: 5 honest, 4 attackers, 44%).
pub fn workers(attack: Attack) -> (usize, usize) {
    match attack {
        Attack::Ipm => (5, 4),
        _ => (8, 2),
    }
}

/// One attack's three runs.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub attack: Attack,
    /// The attackers' share of the workers.
    pub share: f64,
    /// Final holdout loss of the same network with every worker honest.
    pub clean: f32,
    pub defended: Report,
    /// The same attack on the plain mean (when the sweep runs it).
    pub plain: Option<Report>,
}

impl Row {
    /// Defended final loss over the clean one.
    pub fn defended_ratio(&self) -> f64 {
        f64::from(self.defended.final_loss) / f64::from(self.clean)
    }

    /// Plain-mean final loss over the clean one (non-finite when the model diverged).
    pub fn plain_ratio(&self) -> Option<f64> {
        self.plain
            .as_ref()
            .map(|p| f64::from(p.final_loss) / f64::from(self.clean))
    }

    /// Whether the attack takes what it is after from the plain mean (when the sweep ran
    /// it): at least half its lies credited for an attack on credit
    /// ([`Attack::steals_credit`]), a final loss at least 20% above clean (or diverged)
    /// for an attack on the model.
    pub fn plain_bites(&self) -> Option<bool> {
        let plain = self.plain.as_ref()?;
        Some(if self.attack.steals_credit() {
            let a = &plain.attackers;
            a.submitted > 0 && 2 * a.credited >= a.submitted
        } else {
            self.plain_ratio()
                .is_some_and(|r| !r.is_finite() || r >= 1.2)
        })
    }
}

/// The settings of a sweep.
#[derive(Clone, Debug)]
pub struct Sweep {
    pub seed: u64,
    pub rounds: u64,
    /// Versions of the honest-then-lying run (it must outlive the 10 honest units).
    pub lying_rounds: u64,
    pub combine: aggregation::Combine,
    pub attacks: Vec<Attack>,
    /// Also run each attack on the plain mean.
    pub plain: bool,
    /// Score updates in the defended runs.
    pub scoring: bool,
}

/// Runs every attack of `sweep` (defended and plain) and the clean runs they compare
/// with, each in a fresh directory under `work`; `progress` hears of each run.
pub fn run_sweep(
    sweep: &Sweep,
    work: &Path,
    corpus: &Path,
    tokenizer: &Path,
    progress: &mut dyn FnMut(&str, &Report),
) -> Result<Vec<Row>, SimError> {
    let mut n = 0;
    let mut one = |scenario: &Scenario, label: &str| -> Result<Report, SimError> {
        n += 1;
        let dir = work.join(format!("run-{n}"));
        std::fs::create_dir_all(&dir).map_err(|e| SimError::Failed(e.to_string()))?;
        let report = crate::run(scenario, &dir, corpus, tokenizer);
        let _ = std::fs::remove_dir_all(&dir);
        let report = report?;
        progress(label, &report);
        Ok(report)
    };
    let mut clean: BTreeMap<(usize, u64), f32> = BTreeMap::new();
    let mut rows = Vec::new();
    for &attack in &sweep.attacks {
        let (honest, attackers) = workers(attack);
        let rounds = if attack == Attack::HonestThenLying {
            sweep.lying_rounds
        } else {
            sweep.rounds
        };
        let base = Scenario {
            rounds,
            defense: Defense::Full(sweep.combine),
            scoring: sweep.scoring,
            ..Scenario::new(sweep.seed, honest, Some((attack, attackers)))
        };
        let key = (honest + attackers, rounds);
        let clean_loss = match clean.get(&key) {
            Some(l) => *l,
            None => {
                let s = Scenario {
                    honest: honest + attackers,
                    attack: None,
                    ..base.clone()
                };
                let l = one(&s, &format!("clean, {} workers", key.0))?.final_loss;
                clean.insert(key, l);
                l
            }
        };
        let defended = one(&base, &format!("{} defended", attack.name()))?;
        let plain = if sweep.plain {
            Some(one(
                &Scenario {
                    defense: Defense::Plain,
                    ..base.clone()
                },
                &format!("{} plain mean", attack.name()),
            )?)
        } else {
            None
        };
        rows.push(Row {
            attack,
            share: attackers as f64 / (honest + attackers) as f64,
            clean: clean_loss,
            defended,
            plain,
        });
    }
    Ok(rows)
}

/// The claims, each with its measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct Claims {
    /// Largest defended/clean loss ratio (goal <= 1.05).
    pub worst_defended_ratio: f64,
    /// Attacks that did not take what they are after from the plain mean
    /// ([`Row::plain_bites`]).
    pub attacks_that_do_not_bite: Vec<Attack>,
    /// Lies of the attacks on credit that the plain mean credited, of those sent.
    pub plain_credited: (u64, u64),
    /// Attackers' lies credited (accepted and never clawed back), of their lies that
    /// reached the coordinator, over all runs (goal 0).
    pub lies_credited: (u64, u64),
    /// Free riders' units credited, of their units submitted (goal <= 1%).
    pub free_rider_credited: (u64, u64),
    /// Honest units refused or clawed back on their content, of those submitted in the
    /// defended runs (goal <= 1%).
    pub honest_refused: (u64, u64),
    /// The honest-then-lying workers' lies caught, of their lies (goal >= 95%).
    pub lies_caught: (u64, u64),
    /// Units of trusted honest workers re-run, of their units (goal <= 15%).
    pub trusted_overhead: (u64, u64),
}

pub fn claims(rows: &[Row]) -> Claims {
    let mut c = Claims {
        worst_defended_ratio: 0.0,
        attacks_that_do_not_bite: Vec::new(),
        plain_credited: (0, 0),
        lies_credited: (0, 0),
        free_rider_credited: (0, 0),
        honest_refused: (0, 0),
        lies_caught: (0, 0),
        trusted_overhead: (0, 0),
    };
    for r in rows {
        c.worst_defended_ratio = c.worst_defended_ratio.max(r.defended_ratio());
        if r.plain_bites() == Some(false) && !c.attacks_that_do_not_bite.contains(&r.attack) {
            c.attacks_that_do_not_bite.push(r.attack);
        }
        if let (true, Some(p)) = (r.attack.steals_credit(), &r.plain) {
            c.plain_credited.0 += p.attackers.credited;
            c.plain_credited.1 += p.attackers.submitted;
        }
        let d = &r.defended;
        c.lies_credited.0 += d.attackers.credited;
        c.lies_credited.1 += d.attackers.submitted;
        if r.attack.free_rider() {
            c.free_rider_credited.0 += d.attackers.credited;
            c.free_rider_credited.1 += d.attackers.submitted;
        }
        c.honest_refused.0 += d.honest.judged_false();
        c.honest_refused.1 += d.honest.submitted;
        c.lies_caught.0 += d.lies_caught;
        c.lies_caught.1 += d.lies;
        c.trusted_overhead.0 += d.trusted_checks;
        c.trusted_overhead.1 += d.trusted_units;
    }
    c
}

/// `part / whole` as a percentage (0 when `whole` is 0).
pub fn percent((part, whole): (u64, u64)) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}
