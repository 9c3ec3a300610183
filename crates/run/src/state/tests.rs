//! The run as data: a sequence of inputs and, for each, what the step must give, written
//! as one line (the effects, then the decision).

use scheduler::{Effect, ScheduleConfig, Scheduler};
use validation::Inspected;
use validation::score::ScorePolicy;

use super::{Decided, Input, Output, Run, Settings};
use crate::checks::{CheckRules, SpotChecks};
use crate::testing::worker;
use crate::{Acceptance, Rules};

const N: usize = 32;

/// `worker`'s update for `unit` on `base`, every value `value`.
fn update(worker: u8, unit: u64, base: u64, value: f32) -> Inspected {
    crate::testing::update(N, worker, unit, base, value)
}

/// `worker` asks for work, with no speed reported.
fn lease(worker: u8) -> Input<'static> {
    Input::Lease {
        worker: crate::testing::worker(worker),
        expected_ms: None,
    }
}

/// A run of two units a round, scoring off, every unit of a new worker re-run.
fn run(scoring: bool) -> Run {
    let schedule = ScheduleConfig {
        units_per_round: 2,
        min_updates: 2,
        ..ScheduleConfig::default()
    };
    let settings = Settings {
        seed: 5,
        acceptance: Rules {
            max_staleness: 1,
            n_params: N as u32,
            delta_norm_max: 100.0,
            median_multiple_max: 4.0,
            check_values: true,
            scoring: ScorePolicy {
                enabled: scoring,
                ..ScorePolicy::default()
            },
            agreement: true,
        },
        checks: CheckRules {
            enabled: true,
            trusted_after: 3,
            tolerance: 0.0,
            cross_class_tolerance: 1e-3,
            max_backlog: 8,
            seed: 5,
        },
        unit_tokens: 1_000,
        flops_per_token: 6_000_000,
    };
    Run::new(
        settings,
        Scheduler::new(schedule, 0),
        Acceptance::default(),
        SpotChecks::default(),
    )
    .expect("a new run holds together")
}

/// One line for what a step gave.
fn describe(out: &Result<Output, crate::RunError>) -> String {
    let out = match out {
        Ok(out) => out,
        Err(e) => return format!("error {}", e.code),
    };
    let mut parts: Vec<String> = out
        .effects
        .iter()
        .map(|e| match *e {
            Effect::Lease { unit, .. } => format!("lease {}", unit.id),
            Effect::NoWork { .. } => "no work".into(),
            Effect::Aggregate { round, .. } => format!("aggregate {round}"),
            Effect::RoundStarted { round, version } => format!("round {round} on {version}"),
            other => format!("{other:?}"),
        })
        .collect();
    match &out.decided {
        Some(Decided::Accepted(a)) => parts.push(format!(
            "accepted {} round {} credit {} {:?}",
            a.unit, a.round, a.mint.amount, a.sample
        )),
        Some(Decided::Refused(validation::Verdict::Rejected { reason, .. })) => {
            parts.push(format!("refused {}", reason.code()))
        }
        Some(Decided::Refused(v)) => parts.push(format!("refused {v:?}")),
        Some(Decided::Checked(o)) => parts.push(format!(
            "checked matched {} claw back {} requeue {:?}",
            o.matched, o.claw_back, o.requeue
        )),
        None => {}
    }
    parts.join(", ")
}

/// Steps `run` through `steps` (each input at its time) and checks each line.
fn check(name: &str, mut run: Run, steps: &[(u64, Input<'_>, &str)]) -> Run {
    for (i, (now, input, want)) in steps.iter().enumerate() {
        let mut next = run.clone();
        let got = describe(&next.step(*now, *input));
        assert_eq!(got, *want, "{name}, step {i}");
        run = next;
    }
    run
}

#[test]
fn a_round_leases_accepts_refuses_aggregates_and_checks() {
    let (first, again, stranger, second) = (
        update(1, 1, 0, 0.1),
        update(1, 1, 0, 0.1),
        update(3, 2, 0, 0.1),
        update(2, 2, 0, 0.2),
    );
    // 1,000 tokens at 6 MFLOPs each: 6 micro-credits.
    let run = check(
        "round",
        run(false),
        &[
            (0, lease(1), "round 0 on 0, lease 1"),
            (1, lease(2), "lease 2"),
            (2, lease(3), "no work"),
            (
                3,
                Input::Update {
                    update: &first,
                    copy_of: None,
                    score: None,
                },
                "accepted 1 round 0 credit 6 Some(Queued)",
            ),
            (
                4,
                Input::Update {
                    update: &again,
                    copy_of: None,
                    score: None,
                },
                "refused duplicate",
            ),
            (
                5,
                Input::Update {
                    update: &stranger,
                    copy_of: None,
                    score: None,
                },
                "refused not_your_lease",
            ),
            (
                6,
                Input::Update {
                    update: &second,
                    copy_of: None,
                    score: None,
                },
                "aggregate 0, accepted 2 round 0 credit 6 Some(Queued)",
            ),
            (
                7,
                Input::Aggregated {
                    round: 0,
                    version: 1,
                },
                "round 1 on 1",
            ),
            // A second commit of the same round is a driver's bug.
            (
                8,
                Input::Aggregated {
                    round: 0,
                    version: 1,
                },
                "error internal",
            ),
            (
                9,
                Input::Replayed {
                    unit: 1,
                    worker: worker(1),
                    distance: 0.5,
                    same_class: true,
                    unchecked: &[],
                },
                "checked matched false claw back true requeue []",
            ),
        ],
    );
    assert_eq!(run.version(), 1);
    assert!(run.checks().failed(1));
    // Each accepted update measured its worker's arrival, from lease to update.
    let arrivals = run.scheduler().arrivals();
    assert_eq!(arrivals.of(worker(1)), &[3]);
    assert_eq!(arrivals.of(worker(2)), &[5]);
    // Unit 1's update sent again after its round closed is refused.
    let late = update(1, 1, 0, 0.1);
    assert!(matches!(
        run.judge(&late, None),
        validation::Verdict::Rejected { .. }
    ));
}

#[test]
fn a_refusal_releases_the_unit_and_an_unscored_update_is_a_drivers_bug() {
    let unscored = update(1, 1, 0, 0.1);
    check(
        "release",
        run(true),
        &[
            (0, lease(1), "round 0 on 0, lease 1"),
            (
                1,
                Input::Update {
                    update: &unscored,
                    copy_of: None,
                    score: None,
                },
                "error internal",
            ),
            (
                2,
                Input::Refused {
                    worker: worker(1),
                    unit: 1,
                },
                "",
            ),
            // The unit went back to the queue: the next worker gets it.
            (3, lease(2), "lease 1"),
        ],
    );
}

#[test]
fn a_stored_run_that_does_not_hold_together_is_refused_not_run() {
    let accepted = update(1, 1, 0, 0.1);
    let run = check(
        "accept one",
        run(false),
        &[
            (0, lease(1), "round 0 on 0, lease 1"),
            (
                1,
                Input::Update {
                    update: &accepted,
                    copy_of: None,
                    score: None,
                },
                "accepted 1 round 0 credit 6 Some(Queued)",
            ),
        ],
    );
    // The scheduler as stored, rebuilt without the accepted update's norm (a store
    // that lost its updates row, say): the median bar would no longer cover the round.
    let rebuilt = Run::new(
        run.settings().clone(),
        run.scheduler().clone(),
        Acceptance::default(),
        run.checks().clone(),
    );
    let e = rebuilt.expect_err("an accepted unit without its norm is refused");
    assert!(e.is_internal(), "{e}");
    assert!(
        e.message.contains("unit 1 is accepted in round 0"),
        "{}",
        e.message
    );
}

/// The speed a worker reported sizes its lease's hard deadline: the scheduler's slack
/// times it, within the lease and the longest lease.
#[test]
fn a_reported_speed_sizes_the_hard_deadline() {
    let mut run = run(false);
    let hard = |run: &Run, who: u8| {
        run.scheduler().units().find_map(|(_, s)| match *s {
            scheduler::UnitStatus::Leased {
                worker: w,
                hard_deadline_ms,
                ..
            } if w == worker(who) => Some(hard_deadline_ms),
            _ => None,
        })
    };
    let config = *run.scheduler().config();
    let expected_ms = config.lease_ms;
    let reported = Input::Lease {
        worker: worker(1),
        expected_ms: Some(expected_ms),
    };
    run.step(10, reported).expect("lease");
    run.step(10, lease(2)).expect("lease");
    let scaled = (config.slack * expected_ms as f64) as u64;
    assert_eq!(hard(&run, 1), Some(10 + scaled.min(config.lease_max_ms)));
    assert_eq!(hard(&run, 2), Some(10 + config.lease_max_ms));
}
