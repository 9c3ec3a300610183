//! Agreement in the simulator as data: each scenario (peers, faults) over many seeds,
//! and what must hold of every run: every peer that sends decides every height once,
//! all on the same value, the honest one (a wrong proposer's value never), certified by
//! more than two thirds of the committee. A failing run prints its scenario and seed.

use agree::sim::{self, Settings, honest_value};

/// Seeds each scenario runs.
const SEEDS: u64 = 24;

struct Scenario {
    name: &'static str,
    peers: usize,
    withholding: &'static [usize],
    wrong_proposers: &'static [usize],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "4 honest peers",
        peers: 4,
        withholding: &[],
        wrong_proposers: &[],
    },
    Scenario {
        name: "4 peers, one withholding every message",
        peers: 4,
        withholding: &[0],
        wrong_proposers: &[],
    },
    Scenario {
        name: "4 peers, one proposing wrong versions",
        peers: 4,
        withholding: &[],
        wrong_proposers: &[1],
    },
    Scenario {
        name: "7 peers, one withholding and one proposing wrong versions",
        peers: 7,
        withholding: &[2],
        wrong_proposers: &[5],
    },
];

/// Checks one run; returns how many heights it decided past round 0 (a faulty or slow
/// proposer's round timed out).
#[track_caller]
fn check(scenario: &Scenario, seed: u64) -> usize {
    let settings = Settings {
        withholding: scenario.withholding.to_vec(),
        wrong_proposers: scenario.wrong_proposers.to_vec(),
        ..Settings::new(seed, scenario.peers)
    };
    let report = sim::run(&settings);
    let at = format!("{}, seed {seed}", scenario.name);
    assert_eq!(report.failure, None, "{at}");
    let quorum = scenario.peers * 2 / 3 + 1;
    for peer in (0..scenario.peers).filter(|p| !scenario.withholding.contains(p)) {
        for height in 1..=settings.heights {
            let decided: Vec<_> = report
                .decisions
                .iter()
                .filter(|d| d.peer == peer && d.height == height)
                .collect();
            assert_eq!(decided.len(), 1, "{at}: peer {peer}, height {height}");
            let d = decided[0];
            assert_eq!(
                d.value,
                honest_value(height),
                "{at}: peer {peer}, height {height}"
            );
            assert!(
                d.signatures >= quorum,
                "{at}: height {height} certified by {} of {}",
                d.signatures,
                scenario.peers
            );
        }
    }
    report.decisions.iter().filter(|d| d.round > 0).count()
}

#[test]
fn peers_agree_on_every_version_whatever_the_seed() {
    for scenario in SCENARIOS {
        let late: usize = (0..SEEDS).map(|seed| check(scenario, seed)).sum();
        // A fault costs rounds: the seeds drew the faulty peer as a proposer.
        let faulty = !scenario.withholding.is_empty() || !scenario.wrong_proposers.is_empty();
        assert_eq!(late > 0, faulty, "{}: {late} decisions past round 0", scenario.name);
    }
}

/// The same settings give the same run: decisions, rounds, times and message counts.
#[test]
fn a_seed_gives_the_same_run() {
    let settings = Settings {
        withholding: vec![0],
        wrong_proposers: vec![1],
        ..Settings::new(7, 4)
    };
    let (a, b) = (sim::run(&settings), sim::run(&settings));
    assert_eq!(a.decisions, b.decisions);
    assert_eq!(
        (a.messages, a.events, a.end_ms),
        (b.messages, b.events, b.end_ms)
    );
}

/// With more than a third of the committee silent, nothing is decided (and nothing
/// wrong): the run stops at its limit with no decision.
#[test]
fn a_silent_third_stops_the_run_without_a_wrong_decision() {
    let settings = Settings {
        withholding: vec![0, 1],
        limit_ms: 60_000,
        ..Settings::new(3, 4)
    };
    let report = sim::run(&settings);
    assert_eq!(report.failure, None);
    assert!(report.decisions.is_empty(), "{:?}", report.decisions);
}
