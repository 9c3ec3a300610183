//! Spot-checks as data: a sequence of steps (a unit accepted, a unit taken, a re-run
//! judged) and what each must give.

use validation::spot_check::Trust;

use super::{CheckRules, Outcome, ReplayClass, Sample, SpotChecks};
use crate::testing::worker;

fn rules() -> CheckRules {
    CheckRules {
        enabled: true,
        trusted_after: 2,
        tolerance: 0.0,
        cross_class_tolerance: 1e-3,
        gpu_tolerance: 0.5,
        max_backlog: 3,
        seed: 7,
    }
}

/// One step and what it must give.
enum Step {
    /// Unit accepted from a worker (`force`: agreement asks for a re-run): its sample.
    Accept(u64, u8, bool, Option<Sample>),
    /// The next unit to re-run.
    Next(Option<u64>),
    /// A re-run of a unit of a worker at a distance, with the worker's unchecked units:
    /// whether it matched, what is requeued, the worker's verified count after it.
    Judge(u64, u8, f32, &'static [u64], bool, &'static [u64], u64),
}

/// Runs `steps` from a fresh state under `rules`; returns the state for further checks.
fn check(name: &str, rules: CheckRules, steps: &[Step]) -> SpotChecks {
    let mut checks = SpotChecks::default();
    for (i, step) in steps.iter().enumerate() {
        match *step {
            Step::Accept(unit, w, force, want) => {
                let got = checks.sample(&rules, unit, worker(w), force);
                assert_eq!(got, want, "{name}, step {i}: the sample of unit {unit}");
                if let Some(sample) = got {
                    checks.sampled(unit, sample);
                }
            }
            Step::Next(want) => assert_eq!(checks.take(), want, "{name}, step {i}: next"),
            Step::Judge(unit, w, distance, unchecked, matched, requeue, verified) => {
                let outcome = checks.judge(
                    &rules,
                    unit,
                    worker(w),
                    distance,
                    ReplayClass::Same,
                    unchecked,
                );
                assert_eq!(
                    (outcome.matched, outcome.requeue.as_slice()),
                    (matched, requeue),
                    "{name}, step {i}: the judgement of unit {unit}"
                );
                assert_eq!(outcome.claw_back, !matched, "{name}, step {i}");
                assert_eq!(outcome.trust.verified, verified, "{name}, step {i}: trust");
                checks.decided(unit, worker(w), &outcome);
                assert_eq!(checks.failed(unit), !matched, "{name}, step {i}: failed");
            }
        }
    }
    checks
}

#[test]
fn a_new_worker_is_checked_and_a_full_backlog_leaves_units_unchecked_unless_forced() {
    use Sample::*;
    use Step::*;
    check(
        "backlog",
        rules(),
        &[
            Accept(1, 1, false, Some(Queued)),
            Accept(2, 1, false, Some(Queued)),
            Accept(3, 2, false, Some(Queued)),
            // The backlog (3) is full: sampled, but left unchecked.
            Accept(4, 2, false, Some(Unchecked)),
            // Agreement forces a re-run past the bound.
            Accept(5, 3, true, Some(Queued)),
            Next(Some(1)),
            Next(Some(2)),
            Next(Some(3)),
            Next(Some(5)),
            Next(None),
        ],
    );
    let off = CheckRules {
        enabled: false,
        ..rules()
    };
    check("off", off, &[Accept(1, 1, true, None), Next(None)]);
}

#[test]
fn a_match_raises_trust_and_a_mismatch_resets_it_and_requeues_the_workers_units_first() {
    use Sample::*;
    use Step::*;
    let checks = check(
        "caught",
        CheckRules {
            max_backlog: 10,
            ..rules()
        },
        &[
            Accept(1, 1, false, Some(Queued)),
            Accept(2, 2, false, Some(Queued)),
            Accept(3, 1, false, Some(Queued)),
            Next(Some(1)),
            Judge(1, 1, 0.0, &[], true, &[], 1),
            Next(Some(2)),
            // Worker 2's unit 2 does not match: its unchecked units 7 and 9 go first.
            Judge(2, 2, 1e-3, &[7, 9], false, &[7, 9], 0),
            Next(Some(7)),
            Next(Some(9)),
            Next(Some(3)),
            // A NaN distance is no match.
            Judge(3, 1, f32::NAN, &[], false, &[], 0),
            Next(None),
        ],
    );
    assert_eq!(
        checks.trust(worker(2)),
        Trust {
            verified: 0,
            failed_unit: Some(2)
        }
    );
}

#[test]
fn a_tolerance_admits_a_small_distance_and_trusted_workers_are_sampled_less() {
    use Step::*;
    let loose = CheckRules {
        tolerance: 1e-4,
        trusted_after: 2,
        max_backlog: 1_000,
        ..rules()
    };
    // Three matches make worker 1 trusted (verified 3 >= 2): from then on a unit is
    // checked with probability 1/3, so of 300 units about 100 are queued.
    let mut steps = vec![
        Judge(100, 1, 5e-5, &[], true, &[], 1),
        Judge(101, 1, 0.0, &[], true, &[], 2),
        Judge(102, 1, 0.0, &[], true, &[], 3),
    ];
    steps.push(Next(None));
    let mut checks = check("trusted", loose, &steps);
    let queued = (1_000..1_300)
        .filter(|&u| checks.sample(&loose, u, worker(1), false) == Some(Sample::Queued))
        .count();
    assert!((70..=130).contains(&queued), "{queued} of 300 sampled");
    // An untrusted worker has every unit checked.
    assert!(
        (1_000..1_300).all(|u| checks.sample(&loose, u, worker(2), false) == Some(Sample::Queued))
    );
    let outcome: Outcome = checks.judge(&loose, 2_000, worker(1), 2e-4, ReplayClass::Same, &[]);
    assert!(!outcome.matched);
    checks.decided(2_000, worker(1), &outcome);
    assert_eq!(checks.trust(worker(1)).verified, 0);
}

#[test]
fn resuming_drops_queued_duplicates_and_failed_units() {
    let checks = SpotChecks::resume([(worker(1), Trust::default())], [4, 5, 4, 6], [6]);
    let mut checks = checks;
    assert_eq!(
        [checks.take(), checks.take(), checks.take()],
        [Some(4), Some(5), None]
    );
}

/// A worker of another determinism class (or one that reported none) is judged with
/// the cross-class tolerance, a GPU's within the GPU tolerance; one of the checker's
/// class with the run's own, bit for bit by default.
#[test]
fn another_class_is_judged_within_the_cross_class_tolerance() {
    use ReplayClass::*;
    let checks = SpotChecks::default();
    let rules = rules();
    for (distance, class, matched) in [
        (0.0, Same, true),
        (1e-6, Same, false),
        (1e-6, OtherCpu, true),
        (9e-4, OtherCpu, true),
        (2e-3, OtherCpu, false),
        (f32::NAN, OtherCpu, false),
        (0.3, Gpu, true),
        (0.6, Gpu, false),
        (1.0, Gpu, false),
        (f32::NAN, Gpu, false),
    ] {
        let outcome = checks.judge(&rules, 1, worker(1), distance, class, &[]);
        assert_eq!(
            outcome.matched, matched,
            "distance {distance}, class {class:?}"
        );
    }
    // How a reported class stands to the checker's.
    let cpu = "cpu/gemm-x86-v3/test";
    assert_eq!(ReplayClass::of(Some(cpu), cpu), Same);
    assert_eq!(ReplayClass::of(Some("cpu/other"), cpu), OtherCpu);
    assert_eq!(ReplayClass::of(None, cpu), OtherCpu);
    assert_eq!(ReplayClass::of(Some("cuda/sm90/132sm"), cpu), Gpu);
    // The larger of the two applies: a run that tolerates more keeps its own.
    let loose = CheckRules {
        tolerance: 1e-2,
        ..rules
    };
    assert!(
        checks
            .judge(&loose, 1, worker(1), 5e-3, ReplayClass::OtherCpu, &[])
            .matched
    );
}
