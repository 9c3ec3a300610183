//! The run as data: a sequence of inputs and, for each, what the step must give, written
//! as one line (the effects, then the decision).

use scheduler::{Effect, ScheduleConfig, Scheduler};
use validation::Inspected;
use validation::score::ScorePolicy;

use super::{Decided, Input, Output, Run, Settings};
use crate::checks::{CheckRules, SpotChecks};
use crate::replicas::{ReplicaRules, Replicas};
use crate::testing::worker;
use crate::{Acceptance, Rules};

const N: usize = 32;

/// The determinism class of every worker here, and of the coordinator's own re-runs.
const CLASS: &str = "cpu/test";

/// `worker`'s update for `unit` on `base`, every value `value`.
fn update(worker: u8, unit: u64, base: u64, value: f32) -> Inspected {
    crate::testing::update(N, worker, unit, base, value)
}

/// `worker` asks for work, with no speed reported.
fn lease(worker: u8) -> Input<'static> {
    Input::Lease {
        worker: crate::testing::worker(worker),
        expected_ms: None,
        class: Some(CLASS),
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
            gpu_tolerance: 0.5,
            max_backlog: 8,
            seed: 5,
        },
        replicas: ReplicaRules {
            replicate: false,
            wait_ms: 1_000,
            checker_class: CLASS.into(),
            own_reruns: true,
        },
        // 20 tokens a step: 1,000 a unit of the default 50 steps.
        step_tokens: 20,
        flops_per_token: 6_000_000,
    };
    scheduled(settings, schedule)
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
        Some(Decided::Checked(o)) => {
            parts.push(format!(
                "checked matched {} claw back {} requeue {:?}",
                o.matched, o.claw_back, o.requeue
            ));
            if let Some(mint) = &o.checker_mint {
                parts.push(format!("checker credit {} {}", mint.amount, mint.reference));
            }
            if let Some(mint) = &o.disputer_mint {
                parts.push(format!(
                    "disputer credit {} {}",
                    mint.amount, mint.reference
                ));
            }
            if let Some((_, trust)) = &o.accuser {
                parts.push(format!(
                    "accuser verified {} failed {:?}",
                    trust.verified, trust.failed_unit
                ));
            }
        }
        Some(Decided::CheckLeased { unit, .. }) => parts.push(format!(
            "check leased as unit {} round {} shard {}",
            unit.id, unit.round, unit.address.shard
        )),
        Some(Decided::Disputed {
            unit, rerun, third, ..
        }) => parts.push(format!("disputed {unit} rerun {rerun} third {third}")),
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
                    class: Some(CLASS),
                },
                "accepted 1 round 0 credit 6 Some(Queued)",
            ),
            (
                4,
                Input::Update {
                    update: &again,
                    copy_of: None,
                    score: None,
                    class: Some(CLASS),
                },
                "refused duplicate",
            ),
            (
                5,
                Input::Update {
                    update: &stranger,
                    copy_of: None,
                    score: None,
                    class: Some(CLASS),
                },
                "refused not_your_lease",
            ),
            (
                6,
                Input::Update {
                    update: &second,
                    copy_of: None,
                    score: None,
                    class: Some(CLASS),
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
                    tokens: 1_000,
                    distance: 0.5,
                    class: crate::checks::ReplayClass::Same,
                    unchecked: &[],
                    replica: None,
                    disputed: None,
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
                    class: Some(CLASS),
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
                    class: Some(CLASS),
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
        run.replicas().clone(),
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
        class: Some(CLASS),
    };
    run.step(10, reported).expect("lease");
    run.step(10, lease(2)).expect("lease");
    let scaled = (config.slack * expected_ms as f64) as u64;
    assert_eq!(hard(&run, 1), Some(10 + scaled.min(config.lease_max_ms)));
    assert_eq!(hard(&run, 2), Some(10 + config.lease_max_ms));
}

/// A fresh run of `settings` on `schedule`.
fn scheduled(settings: Settings, schedule: ScheduleConfig) -> Run {
    Run::new(
        settings,
        Scheduler::new(schedule, 0),
        Acceptance::default(),
        SpotChecks::default(),
        Replicas::default(),
    )
    .expect("a new run holds together")
}

/// A run where every sampled unit goes to a volunteer of its worker's class.
fn replicating() -> Run {
    let mut settings = run(false).settings().clone();
    settings.replicas.replicate = true;
    let schedule = ScheduleConfig {
        units_per_round: 2,
        min_updates: 2,
        ..ScheduleConfig::default()
    };
    scheduled(settings, schedule)
}

/// `worker` of `class` asks for work.
fn lease_as(worker: u8, class: &'static str) -> Input<'static> {
    Input::Lease {
        worker: crate::testing::worker(worker),
        expected_ms: None,
        class: Some(class),
    }
}

/// `update`, accepted as from a worker of `class`.
fn update_as<'a>(update: &'a Inspected, class: Option<&'a str>) -> Input<'a> {
    Input::Update {
        update,
        copy_of: None,
        score: None,
        class,
    }
}

/// Volunteer `checker`'s upload of the check leased as `check`, of `worker`'s `unit`.
fn replayed(unit: u64, worker: u8, check: u64, checker: u8, distance: f32) -> Input<'static> {
    Input::Replayed {
        unit,
        worker: crate::testing::worker(worker),
        tokens: 1_000,
        distance,
        class: crate::checks::ReplayClass::Same,
        unchecked: &[],
        replica: Some(super::Replica {
            check,
            checker: crate::testing::worker(checker),
        }),
        disputed: None,
    }
}

#[test]
fn a_sampled_unit_is_checked_by_a_volunteer_of_its_class_never_its_own_worker() {
    let (first, second) = (update(1, 1, 0, 0.1), update(2, 2, 0, 0.2));
    let run = check(
        "replication",
        replicating(),
        &[
            (0, lease(1), "round 0 on 0, lease 1"),
            (1, lease(2), "lease 2"),
            (
                2,
                update_as(&first, Some(CLASS)),
                "accepted 1 round 0 credit 6 Some(Replicated)",
            ),
            // Its own worker is never leased its check (and the round has no unit left).
            (3, lease(1), "no work"),
            // A worker of another class is not either.
            (4, lease_as(3, "cpu/other"), "no work"),
            // A volunteer of the class is: under a fresh id from the units' sequence,
            // with the unit's data (shard 0, as unit 1) in the current round.
            (5, lease(3), "check leased as unit 3 round 0 shard 0"),
            // It matches bit for bit: the worker's re-run is verified and the checker
            // is paid per FLOP, as a unit, under the check's own id.
            (
                6,
                replayed(1, 1, 3, 3, 0.0),
                "checked matched true claw back false requeue [], checker credit 6 check:3",
            ),
            (
                7,
                update_as(&second, Some(CLASS)),
                "aggregate 0, accepted 2 round 0 credit 6 Some(Replicated)",
            ),
            (8, lease(3), "check leased as unit 4 round 0 shard 1"),
            // A mismatch believes neither side: no credit, no clawback; the unit goes to
            // the coordinator's own re-run.
            (
                9,
                replayed(2, 2, 4, 3, 0.5),
                "disputed 2 rerun true third false",
            ),
            // An upload under a check id no longer leased is a driver's bug.
            (10, replayed(2, 2, 4, 3, 0.0), "error internal"),
        ],
    );
    assert_eq!(run.checks().trust(worker(1)).verified, 1);
    assert_eq!(run.checks().queue().collect::<Vec<_>>(), [2]);
    assert!(run.replicas().is_empty());
    // The coordinator's own re-run settles the dispute: a worker it fails pays its
    // clawback, and the volunteer who disputed it is paid its check; one it clears bit
    // for bit leaves the volunteer unpaid, its check counted as a failed unit of its own.
    let coordinator = |unit, distance, by| Input::Replayed {
        unit,
        worker: worker(2),
        tokens: 1_000,
        distance,
        class: crate::checks::ReplayClass::Same,
        unchecked: &[],
        replica: None,
        disputed: Some(super::Replica {
            check: by,
            checker: worker(3),
        }),
    };
    let run = check(
        "settled",
        run,
        &[(
            11,
            coordinator(2, 0.5, 4),
            "checked matched false claw back true requeue [], checker credit 6 check:4",
        )],
    );
    assert!(run.checks().failed(2));
    check(
        "cleared",
        replicating(),
        &[(
            0,
            coordinator(9, 0.0, 5),
            "checked matched true claw back false requeue [], accuser verified 0 failed Some(5)",
        )],
    );
    // A re-run of another class proves nothing against the volunteer.
    check(
        "cleared across classes",
        replicating(),
        &[(
            0,
            Input::Replayed {
                unit: 9,
                worker: worker(2),
                tokens: 1_000,
                distance: 0.0,
                class: crate::checks::ReplayClass::OtherCpu,
                unchecked: &[],
                replica: None,
                disputed: Some(super::Replica {
                    check: 5,
                    checker: worker(3),
                }),
            },
            "checked matched true claw back false requeue []",
        )],
    );
}

#[test]
fn the_lease_of_a_check_names_neither_the_unit_nor_its_worker() {
    let first = update(1, 1, 0, 0.1);
    let mut run = check(
        "blind",
        replicating(),
        &[
            (0, lease(1), "round 0 on 0, lease 1"),
            (1, lease(2), "lease 2"),
            (
                2,
                update_as(&first, Some(CLASS)),
                "accepted 1 round 0 credit 6 Some(Replicated)",
            ),
        ],
    );
    let original = *run.unit(1).expect("unit 1");
    let out = run.step(3, lease(3)).expect("a lease");
    let Some(Decided::CheckLeased {
        worker: w, unit, ..
    }) = out.decided
    else {
        panic!("no check leased: {out:?}");
    };
    assert_eq!(w, worker(3));
    // The same training inputs, under an id and round of its own: a `WorkUnit` has no
    // field for a worker, and its id is the next of the units' sequence.
    assert_eq!(
        (unit.base_version, unit.address, unit.lr),
        (original.base_version, original.address, original.lr)
    );
    assert_eq!((unit.id, unit.round), (3, 0));
    // The next round's units continue the sequence after it, so the id stands out from
    // none of them.
    let leased = run.check_lease(3).expect("leased");
    assert_eq!((leased.check.unit.id, leased.check.worker), (1, worker(1)));
}

#[test]
fn a_check_no_volunteer_takes_falls_back_to_the_coordinator() {
    let first = update(1, 1, 0, 0.1);
    let mut run = check(
        "fallback",
        replicating(),
        &[
            (0, lease(1), "round 0 on 0, lease 1"),
            (1, lease(2), "lease 2"),
            (
                2,
                update_as(&first, Some(CLASS)),
                "accepted 1 round 0 credit 6 Some(Replicated)",
            ),
            (3, lease(3), "check leased as unit 3 round 0 shard 0"),
        ],
    );
    // The volunteer's lease runs out (the longest lease, no speed reported): the check
    // is offered again, and once it has waited `wait_ms` it is the coordinator's.
    let deadline = run.check_lease(3).expect("leased").deadline_ms;
    run.step(deadline, Input::Tick).expect("tick");
    assert!(run.check_lease(3).is_none());
    assert_eq!(run.take_check(), Some(1));
    assert!(run.replicas().is_empty());
}

#[test]
fn a_worker_of_another_class_is_checked_by_volunteers_and_one_of_ours_by_the_coordinator() {
    let (ours, theirs, unknown) = (
        update(1, 1, 0, 0.1),
        update(2, 2, 0, 0.2),
        update(3, 3, 0, 0.3),
    );
    let schedule = ScheduleConfig {
        units_per_round: 3,
        min_updates: 3,
        ..ScheduleConfig::default()
    };
    let plain = run(false);
    let run = Run::new(
        plain.settings().clone(),
        Scheduler::new(schedule, 0),
        Acceptance::default(),
        SpotChecks::default(),
        Replicas::default(),
    )
    .expect("a run");
    let run = check(
        "route",
        run,
        &[
            (0, lease(1), "round 0 on 0, lease 1"),
            (1, lease(2), "lease 2"),
            (2, lease(3), "lease 3"),
            (
                3,
                update_as(&ours, Some(CLASS)),
                "accepted 1 round 0 credit 6 Some(Queued)",
            ),
            (
                4,
                update_as(&theirs, Some("cpu/other")),
                "accepted 2 round 0 credit 6 Some(Replicated)",
            ),
            // No class reported: nothing to match a volunteer by.
            (
                5,
                update_as(&unknown, None),
                "aggregate 0, accepted 3 round 0 credit 6 Some(Queued)",
            ),
            (
                6,
                lease_as(4, "cpu/other"),
                "check leased as unit 4 round 0 shard 1",
            ),
        ],
    );
    assert_eq!(run.checks().queue().collect::<Vec<_>>(), [1, 3]);
}

/// Units sized per worker: with spot-checks on, a GPU's unit is sized no longer than the
/// coordinator's CPU can re-run within the GPU tolerance, unless another volunteer of its
/// class leased within the longest lease (it re-runs any length bit for bit); a CPU's up
/// to the run's most.
#[test]
fn a_gpus_sized_unit_stays_checkable() {
    let base = run(false);
    let schedule = ScheduleConfig {
        units_per_round: 3,
        min_updates: 2,
        unit_ms: 60_000,
        ..ScheduleConfig::default()
    };
    const GPU: &str = "cuda/sm90/132sm/test";
    let capped = crate::replicas::GPU_ON_CPU_STEPS_MAX;
    let now = 10;
    // (checks on, the worker's class, another worker's lease just before: its class;
    // the worker's unit's steps). How long a lease counts is `ClassPeers`'s test: here
    // an older one would have expired, and its unit, sized for the other worker, would
    // be leased again as it is.
    let table: [(bool, &str, Option<&str>, u32); 5] = [
        (true, GPU, None, capped),
        (true, CLASS, None, 200),
        (false, GPU, None, 200),
        // A second volunteer of the class re-runs a long unit bit for bit; one of
        // another class cannot.
        (true, GPU, Some(GPU), 200),
        (true, GPU, Some("cuda/sm80/108sm/test"), capped),
    ];
    for (checks, class, peer, want) in table {
        let mut settings = base.settings().clone();
        settings.checks.enabled = checks;
        let mut run = scheduled(settings, schedule);
        if let Some(peer_class) = peer {
            let lease = Input::Lease {
                worker: worker(2),
                expected_ms: Some(1_000),
                class: Some(peer_class),
            };
            run.step(now - 1, lease).expect("the other's lease");
        }
        // A base unit in 1 s: 60 s would be 3,000 steps, four times 50 the most.
        let lease = Input::Lease {
            worker: worker(1),
            expected_ms: Some(1_000),
            class: Some(class),
        };
        run.step(now, lease).expect("lease");
        let steps: Vec<u32> = run
            .scheduler()
            .units()
            .filter(|(_, s)| {
                matches!(s, scheduler::UnitStatus::Leased { worker: w, .. } if *w == worker(1))
            })
            .map(|(u, _)| u.address.steps)
            .collect();
        assert_eq!(steps, [want], "{class}, checks {checks}, other {peer:?}");
    }
}

/// A disputed check of a unit the coordinator cannot re-run (a GPU class, more than
/// `GPU_ON_CPU_STEPS_MAX` steps) goes to a third volunteer of the class, never the
/// disputer, and that check decides two to one: agreeing with the worker it clears the
/// unit and refutes the first volunteer; agreeing with the first volunteer the unit
/// fails and both volunteers are paid.
#[test]
fn a_third_volunteer_settles_a_disputed_check_the_coordinator_cannot_run() {
    const GPU: &str = "cuda/sm90/132sm/test";
    let gpu_run = || {
        let schedule = ScheduleConfig {
            units_per_round: 2,
            min_updates: 2,
            steps_per_unit: crate::replicas::GPU_ON_CPU_STEPS_MAX + 10,
            ..ScheduleConfig::default()
        };
        scheduled(run(false).settings().clone(), schedule)
    };
    let first = update(1, 1, 0, 0.1);
    // 60 steps of 20 tokens at 6 MFLOPs each: 7 micro-credits (a check is paid on the
    // tokens its input says, 1,000 in `replayed`: 6).
    let disputed: &[(u64, Input<'_>, &str)] = &[
        (0, lease_as(1, GPU), "round 0 on 0, lease 1"),
        (1, lease_as(2, GPU), "lease 2"),
        (
            2,
            update_as(&first, Some(GPU)),
            "accepted 1 round 0 credit 7 Some(Replicated)",
        ),
        (
            3,
            lease_as(3, GPU),
            "check leased as unit 3 round 0 shard 0",
        ),
        (
            4,
            replayed(1, 1, 3, 3, 0.5),
            "disputed 1 rerun false third true",
        ),
        // The disputer is not leased the third check; another volunteer is.
        (5, lease_as(3, GPU), "no work"),
        (
            6,
            lease_as(4, GPU),
            "check leased as unit 4 round 0 shard 0",
        ),
    ];
    let run = check("disputed", gpu_run(), disputed);
    assert_eq!(run.replicas().leases().count(), 1);
    let cleared = check(
        "cleared two to one",
        run.clone(),
        &[(
            7,
            replayed(1, 1, 4, 4, 0.0),
            "checked matched true claw back false requeue [], checker credit 6 check:4, accuser verified 0 failed Some(3)",
        )],
    );
    assert_eq!(cleared.checks().trust(worker(1)).verified, 1);
    assert!(cleared.replicas().is_empty());
    let failed = check(
        "failed two to one",
        run,
        &[(
            7,
            replayed(1, 1, 4, 4, 0.5),
            "checked matched false claw back true requeue [], checker credit 6 check:4, disputer credit 6 check:3",
        )],
    );
    assert!(failed.checks().failed(1));
    assert!(failed.replicas().is_empty());
}
