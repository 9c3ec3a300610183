//! Acceptance as data: a sequence of updates, each with its lease, score and copy
//! lookup, and the decision each must get.

use protocol::WorkerId;
use validation::score::{Score, ScorePolicy};
use validation::{Inspected, LeaseState, Verdict};

use super::{Acceptance, Decision, Rules};
use crate::testing::key;

const N: usize = 64;

fn rules() -> Rules {
    Rules {
        max_staleness: 1,
        n_params: N as u32,
        delta_norm_max: 10.0,
        median_multiple_max: 4.0,
        check_values: true,
        scoring: ScorePolicy::default(),
        agreement: true,
    }
}

/// `worker`'s update for `unit` on `base`, every value `value`.
fn update(worker: u8, unit: u64, base: u64, value: f32) -> Inspected {
    crate::testing::update(N, worker, unit, base, value)
}

fn lease(worker: u8, unit: u64, base: u64) -> LeaseState {
    LeaseState {
        work_unit: unit,
        worker: WorkerId::of(&key(worker)),
        base_version: base,
        submitted: false,
    }
}

/// A score whose own-data loss falls by `own` (relative) and random data's by `random`.
fn score(own: f32, random: f32) -> Score {
    Score {
        own_before: 4.0,
        own_after: 4.0 * (1.0 - own),
        random_before: 4.0,
        random_after: 4.0 * (1.0 - random),
    }
}

/// One update sent to the run.
struct Step {
    worker: u8,
    unit: u64,
    value: f32,
    score: Score,
    copy_of: Option<u64>,
    /// The code it is refused with, or `accepted`, `accepted+check` (agreement).
    expect: &'static str,
}

fn outcome(d: &Decision) -> String {
    match d {
        Decision::Accept {
            force_check: true, ..
        } => "accepted+check".into(),
        Decision::Accept { .. } => "accepted".into(),
        Decision::Refuse(Verdict::Rejected { reason, .. }) => reason.code().into(),
        Decision::Refuse(v) => format!("{v:?}"),
    }
}

/// Runs `steps` on version 0 through judge, decide and (when accepted) accepted.
fn check(rules: Rules, steps: &[Step]) {
    let mut run = Acceptance::default();
    for (i, s) in steps.iter().enumerate() {
        let u = update(s.worker, s.unit, 0, s.value);
        let verdict = run.judge(
            &u,
            &rules,
            0,
            Some(&lease(s.worker, s.unit, 0)),
            1.0,
            s.copy_of,
        );
        let decision = run
            .decide(&u, verdict, Some(&s.score), &rules)
            .expect("scored");
        assert_eq!(outcome(&decision), s.expect, "step {i}");
        if let Decision::Accept {
            work_unit,
            norm,
            gain,
            ..
        } = decision
        {
            run.accepted(work_unit, norm, gain, 0);
        }
    }
}

const GOOD: Score = Score {
    own_before: 4.0,
    own_after: 3.6,
    random_before: 4.0,
    random_after: 3.9,
};

#[test]
fn the_median_norm_bar_holds_from_the_second_update() {
    let step = |unit, value, expect| Step {
        worker: unit as u8,
        unit,
        value,
        score: GOOD,
        copy_of: None,
        expect,
    };
    check(
        rules(),
        &[
            // Nothing accepted yet: no bar but the absolute one (norm 8 for 0.001 x 64).
            step(1, 0.01, "accepted"),
            step(2, 0.012, "accepted"),
            // 5 x the lower middle (0.08): over the 4x bar.
            step(3, 0.05, "norm_outlier"),
            step(4, 0.03, "accepted"),
        ],
    );
}

#[test]
fn a_copy_and_a_low_score_are_refused_and_agreement_overrides_only_a_low_score() {
    let step = |worker, unit, score, copy_of, expect| Step {
        worker,
        unit,
        value: 0.01,
        score,
        copy_of,
        expect,
    };
    let low = score(0.0001, 0.0);
    check(
        rules(),
        &[
            step(1, 1, GOOD, None, "accepted"),
            // The same bytes as unit 1's accepted update.
            step(2, 2, GOOD, Some(1), "copied"),
            step(3, 3, low, None, "no_progress"),
            // A second key refused alike with the same bytes for unit 3: the unit's
            // data scores low; accepted, with a re-run forced.
            step(4, 3, low, None, "accepted+check"),
            // Harm is never overridden, agreed or not.
            step(5, 5, score(0.05, -0.2), None, "harmful"),
            step(6, 5, score(0.05, -0.2), None, "harmful"),
        ],
    );
    // Without re-runs nothing is accepted on agreement.
    check(
        Rules {
            agreement: false,
            ..rules()
        },
        &[
            step(3, 3, low, None, "no_progress"),
            step(4, 3, low, None, "no_progress"),
        ],
    );
    // Without scoring, neither the score nor the copy check applies.
    check(
        Rules {
            scoring: ScorePolicy {
                enabled: false,
                ..ScorePolicy::default()
            },
            ..rules()
        },
        &[
            step(1, 1, GOOD, None, "accepted"),
            step(2, 2, low, Some(1), "accepted"),
        ],
    );
}

#[test]
fn a_closed_round_keeps_its_norms_for_the_next_and_forgets_its_refusals() {
    let rules = rules();
    let mut run = Acceptance::default();
    for (unit, value) in [(1, 0.01f32), (2, 0.02)] {
        let u = update(unit as u8, unit, 0, value);
        let v = run.judge(&u, &rules, 0, Some(&lease(unit as u8, unit, 0)), 1.0, None);
        if let Ok(Decision::Accept { norm, gain, .. }) = run.decide(&u, v, Some(&GOOD), &rules) {
            run.accepted(unit, norm, gain, 0);
        }
    }
    let before = run.median_norm();
    let low = score(0.0001, 0.0);
    let refused = update(3, 3, 0, 0.01);
    let v = run.judge(&refused, &rules, 0, Some(&lease(3, 3, 0)), 1.0, None);
    assert!(matches!(
        run.decide(&refused, v, Some(&low), &rules),
        Ok(Decision::Refuse(_))
    ));
    run.round_closed();
    assert_eq!(
        run.median_norm(),
        before,
        "the last round's norms set the bar"
    );
    // Unit 3's refusal is forgotten: another key's byte-equal refusal is not agreement.
    let again = update(4, 3, 0, 0.01);
    let v = run.judge(&again, &rules, 0, Some(&lease(4, 3, 0)), 1.0, None);
    assert!(matches!(
        run.decide(&again, v, Some(&low), &rules),
        Ok(Decision::Refuse(_))
    ));
    // An unscored update with scoring on is the driver's bug, not a verdict.
    let v = run.judge(&again, &rules, 0, Some(&lease(4, 3, 0)), 1.0, None);
    assert!(run.decide(&again, v, None, &rules).is_err());
}
