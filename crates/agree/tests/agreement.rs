//! Agreement in the simulator as data: each scenario (peers, faults) over many seeds,
//! and what must hold of every run: every peer that sends decides every height once,
//! all on the same value, a valid one (the honest one unless an equivocator offered
//! another valid one; a wrong proposer's value never), certified by more than two
//! thirds of the committee; an equivocation is proven against its culprit and no one
//! else. A failing run prints its scenario and seed.

use agree::sim::{self, Partition, Settings, honest_value, other_value};

/// Seeds each scenario runs.
const SEEDS: u64 = 24;

struct Scenario {
    name: &'static str,
    peers: usize,
    withholding: &'static [usize],
    wrong_proposers: &'static [usize],
    equivocating: &'static [usize],
    /// Cut off, from, until (ms).
    partition: Option<(&'static [usize], u64, u64)>,
    skewed_clocks: bool,
    /// Percent of proposals and votes lost on the way.
    loss_percent: u64,
}

const HONEST: Scenario = Scenario {
    name: "",
    peers: 4,
    withholding: &[],
    wrong_proposers: &[],
    equivocating: &[],
    partition: None,
    skewed_clocks: false,
    loss_percent: 0,
};

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "4 honest peers",
        ..HONEST
    },
    Scenario {
        name: "4 peers, one withholding every message",
        withholding: &[0],
        ..HONEST
    },
    Scenario {
        name: "4 peers, one proposing wrong versions",
        wrong_proposers: &[1],
        ..HONEST
    },
    Scenario {
        name: "4 peers, one equivocating",
        equivocating: &[2],
        ..HONEST
    },
    Scenario {
        name: "4 peers, two cut off for 20 s",
        partition: Some((&[0, 1], 500, 20_500)),
        ..HONEST
    },
    Scenario {
        name: "4 peers, clocks at 0.5 to 2 times",
        skewed_clocks: true,
        ..HONEST
    },
    Scenario {
        name: "7 peers, one withholding, one proposing wrong versions, clocks skewed",
        peers: 7,
        withholding: &[2],
        wrong_proposers: &[5],
        skewed_clocks: true,
        ..HONEST
    },
    // The majority goes on without the one cut off, which catches up from the certified
    // chain once it hears of a later height.
    Scenario {
        name: "7 peers, one cut off for 10 s",
        peers: 7,
        partition: Some((&[6], 0, 10_000)),
        ..HONEST
    },
    Scenario {
        name: "7 peers, one equivocating, three cut off for 10 s",
        peers: 7,
        equivocating: &[3],
        partition: Some((&[0, 5, 6], 0, 10_000)),
        ..HONEST
    },
    // Every live member's vote is needed (3 of 4 with one silent): a lost vote stalls
    // the height until its member sends it again.
    Scenario {
        name: "4 peers, one withholding, 5% of messages lost",
        withholding: &[3],
        loss_percent: 5,
        ..HONEST
    },
    Scenario {
        name: "7 peers, 20% of messages lost, clocks skewed",
        peers: 7,
        skewed_clocks: true,
        loss_percent: 20,
        ..HONEST
    },
];

/// What a scenario's runs showed together.
#[derive(Default)]
struct Seen {
    /// Heights decided past round 0 (a round timed out).
    late: usize,
    /// Equivocations proven.
    equivocations: usize,
    /// Heights caught up from a certified chain.
    synced: usize,
    /// Messages lost on the way.
    lost: u64,
}

/// Checks one run and adds what it showed to `seen`.
#[track_caller]
fn check(scenario: &Scenario, seed: u64, seen: &mut Seen) {
    let settings = Settings {
        withholding: scenario.withholding.to_vec(),
        wrong_proposers: scenario.wrong_proposers.to_vec(),
        equivocating: scenario.equivocating.to_vec(),
        partition: scenario
            .partition
            .map(|(group, from_ms, until_ms)| Partition {
                group: group.to_vec(),
                from_ms,
                until_ms,
            }),
        skewed_clocks: scenario.skewed_clocks,
        loss_percent: scenario.loss_percent,
        ..Settings::new(seed, scenario.peers)
    };
    let report = sim::run(&settings);
    let at = format!("{}, seed {seed}", scenario.name);
    assert_eq!(report.failure, None, "{at}");
    let quorum = scenario.peers * 2 / 3 + 1;
    for height in 1..=settings.heights {
        let mut values = Vec::new();
        for peer in (0..scenario.peers).filter(|p| !scenario.withholding.contains(p)) {
            let decided: Vec<_> = report
                .decisions
                .iter()
                .filter(|d| d.peer == peer && d.height == height)
                .collect();
            assert_eq!(decided.len(), 1, "{at}: peer {peer}, height {height}");
            let d = decided[0];
            assert!(
                d.signatures >= quorum,
                "{at}: height {height} certified by {} of {}",
                d.signatures,
                scenario.peers
            );
            values.push(d.value.clone());
        }
        values.dedup();
        assert_eq!(values.len(), 1, "{at}: height {height} decided two values");
        let allowed = if scenario.equivocating.is_empty() {
            vec![honest_value(height)]
        } else {
            vec![honest_value(height), other_value(height)]
        };
        assert!(
            allowed.contains(&values[0]),
            "{at}: height {height} decided {:?}",
            values[0]
        );
    }
    for &(witness, culprit) in &report.equivocations {
        assert!(
            scenario.equivocating.contains(&culprit),
            "{at}: peer {witness} proved an equivocation of honest peer {culprit}"
        );
    }
    seen.late += report.decisions.iter().filter(|d| d.round > 0).count();
    seen.equivocations += report.equivocations.len();
    seen.synced += report.decisions.iter().filter(|d| d.synced).count();
    seen.lost += report.lost;
}

#[test]
fn peers_agree_on_every_version_whatever_the_seed() {
    for scenario in SCENARIOS {
        let mut seen = Seen::default();
        for seed in 0..SEEDS {
            check(scenario, seed, &mut seen);
        }
        // The seeds drew each faulty proposer: a withheld or wrong proposal costs a
        // round (and with no fault and no partition, no round is lost), an
        // equivocation is proven.
        let costs_rounds = !scenario.withholding.is_empty() || !scenario.wrong_proposers.is_empty();
        let clean = !costs_rounds
            && scenario.equivocating.is_empty()
            && scenario.partition.is_none()
            && !scenario.skewed_clocks
            && scenario.loss_percent == 0;
        if costs_rounds || clean {
            assert_eq!(
                seen.late > 0,
                costs_rounds,
                "{}: {} decisions past round 0",
                scenario.name,
                seen.late
            );
        }
        // A peer the others went on without needs the chain (any peer may take it when a
        // later height's message reaches it before its own decision).
        let left_behind = scenario
            .partition
            .is_some_and(|(group, ..)| group.len() * 3 < scenario.peers);
        assert!(
            seen.synced > 0 || !left_behind,
            "{}: no height caught up",
            scenario.name
        );
        assert_eq!(
            seen.lost > 0,
            scenario.loss_percent > 0,
            "{}: {} messages lost",
            scenario.name,
            seen.lost
        );
        assert_eq!(
            seen.equivocations > 0,
            !scenario.equivocating.is_empty(),
            "{}: {} equivocations proven",
            scenario.name,
            seen.equivocations
        );
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

/// The committee of a simulation's peers.
fn committee_of(settings: &Settings) -> agree::Committee {
    let keys: Vec<_> = sim::keys(settings)
        .iter()
        .map(|k| k.verifying_key())
        .collect();
    agree::Committee::new(&keys).expect("a committee")
}

/// A decision's certificate convinces a peer that missed the height only as it was
/// made: its value, enough distinct signers, this committee's keys.
#[test]
fn a_tampered_certificate_certifies_nothing() {
    let settings = Settings::new(11, 4);
    let report = sim::run(&settings);
    assert_eq!(report.failure, None);
    let committee = committee_of(&settings);
    let decision = report.chains[0][0].clone();
    assert!(committee.certifies(&decision));
    let tampered = |change: &dyn Fn(&mut agree::Decision)| {
        let mut d = decision.clone();
        change(&mut d);
        committee.certifies(&d)
    };
    // Another value, height or round than the one signed.
    assert!(!tampered(&|d| d.value.accepted[0].weight += 1));
    assert!(!tampered(&|d| d.height = agree::Height(d.height.0 + 1)));
    assert!(!tampered(&|d| d.round = d.round.increment()));
    // Two thirds or fewer of the votes: 2 of 4.
    assert!(!tampered(&|d| d.certificate.commit_signatures.truncate(2)));
    // One signer counted twice to make up the number.
    assert!(!tampered(&|d| {
        let first = d.certificate.commit_signatures[0].clone();
        d.certificate.commit_signatures.truncate(2);
        d.certificate.commit_signatures.push(first);
    }));
    // A signature moved to another signer.
    assert!(!tampered(&|d| {
        let s = d.certificate.commit_signatures[1].signature;
        d.certificate.commit_signatures[0].signature = s;
    }));
    // Another committee (another run's keys).
    assert!(!committee_of(&Settings::new(12, 4)).certifies(&decision));
}

/// An equivocation proof names its culprit only as made: two messages of one slot with
/// different values, both signed by the culprit. Nothing else frames a peer.
#[test]
fn a_forged_equivocation_frames_no_one() {
    let settings = Settings {
        equivocating: vec![2],
        ..Settings::new(0, 4)
    };
    let report = sim::run(&settings);
    assert_eq!(report.failure, None);
    let committee = committee_of(&settings);
    let proof = report
        .proofs
        .first()
        .expect("an equivocation proven")
        .clone();
    let culprit = sim::keys(&settings)[2].verifying_key().to_bytes();
    assert_eq!(proof.culprit(&committee), Some(agree::Address(culprit)));
    let forged = |first: agree::Message, second: agree::Message| {
        agree::Equivocation { first, second }.culprit(&committee)
    };
    // One message twice: no conflict.
    assert_eq!(forged(proof.first.clone(), proof.first.clone()), None);
    // The second message under the first's signature: not the culprit's signature.
    let mut swapped = proof.second.clone();
    match (&mut swapped, &proof.first) {
        (agree::Message::Proposal(s), agree::Message::Proposal(f)) => s.signature = f.signature,
        (agree::Message::Vote(s), agree::Message::Vote(f)) => s.signature = f.signature,
        _ => panic!("a proof of two kinds"),
    }
    assert_eq!(forged(proof.first.clone(), swapped), None);
    // Not checkable against another run's committee.
    assert_eq!(proof.culprit(&committee_of(&Settings::new(1, 4))), None);
}

/// A committee is bounded and has each key once: past `COMMITTEE_MAX` members, an empty
/// one, or a key listed twice is refused.
#[test]
fn a_committee_is_bounded_and_has_each_key_once() {
    let keys = |n: usize| -> Vec<_> {
        sim::keys(&Settings::new(1, n))
            .iter()
            .map(|k| k.verifying_key())
            .collect()
    };
    assert_eq!(
        agree::Committee::new(&keys(agree::COMMITTEE_MAX)).map(|c| c.len()),
        Some(agree::COMMITTEE_MAX)
    );
    assert!(agree::Committee::new(&keys(agree::COMMITTEE_MAX + 1)).is_none());
    assert!(agree::Committee::new(&[]).is_none());
    let mut twice = keys(4);
    twice.push(twice[0]);
    assert!(agree::Committee::new(&twice).is_none());
}

/// Every message, decision and proof of equivocation goes through bytes and back unchanged, and re-encodes to
/// the same bytes; a decoded certificate still certifies; bytes cut short or with one
/// more are refused.
#[test]
fn messages_and_decisions_go_through_bytes_unchanged() {
    use agree::wire;
    let settings = Settings {
        equivocating: vec![2],
        ..Settings::new(3, 4)
    };
    let report = sim::run(&settings);
    assert_eq!(report.failure, None);
    let committee = committee_of(&settings);
    // A proposal and a nil prevote, made by peers as a driver sees them.
    let keys = sim::keys(&settings);
    let mut messages: Vec<agree::Message> = Vec::new();
    for key in &keys {
        let mut peer =
            agree::Peer::new(key.clone(), committee.clone(), settings.seed).expect("a member");
        let mut actions = peer.start(agree::Height(1)).expect("start");
        if let Some((height, round)) = actions.iter().find_map(|a| match a {
            agree::Action::BuildValue { height, round } => Some((*height, *round)),
            _ => None,
        }) {
            actions.extend(
                peer.propose(height, round, sim::honest_value(1))
                    .expect("propose"),
            );
        } else {
            let timeout = agree::Timeout::new(agree::Round::new(0), agree::TimeoutKind::Propose);
            actions.extend(peer.timeout(timeout).expect("timeout"));
        }
        messages.extend(actions.into_iter().filter_map(|a| match a {
            agree::Action::Broadcast(m) => Some(m),
            _ => None,
        }));
    }
    for proof in &report.proofs {
        messages.push(proof.first.clone());
        messages.push(proof.second.clone());
        let bytes = wire::equivocation_to_bytes(proof);
        let back = wire::equivocation_from_bytes(&bytes).expect("decodes");
        assert_eq!(&back, proof);
        assert!(back.culprit(&committee).is_some());
        assert!(wire::equivocation_from_bytes(&bytes[..bytes.len() - 1]).is_err());
    }
    assert!(!report.proofs.is_empty());
    let kinds = |m: &agree::Message| matches!(m, agree::Message::Proposal(_));
    assert!(
        messages.iter().any(kinds) && !messages.iter().all(kinds),
        "both kinds"
    );
    for message in &messages {
        let bytes = wire::message_to_bytes(message);
        let back = wire::message_from_bytes(&bytes).expect("decodes");
        assert_eq!(&back, message);
        assert_eq!(wire::message_to_bytes(&back), bytes);
        for cut in 0..bytes.len() {
            assert!(
                wire::message_from_bytes(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(wire::message_from_bytes(&longer).is_err());
    }
    let chain = &report.chains[0];
    assert!(!chain.is_empty());
    for decision in chain {
        let bytes = wire::decision_to_bytes(decision);
        let mut reader = wire::Reader(&bytes);
        let back = wire::decision_from_bytes(&mut reader).expect("decodes");
        reader.done().expect("all read");
        assert_eq!(&back, decision);
        assert!(committee.certifies(&back));
        assert!(wire::decision_from_bytes(&mut wire::Reader(&bytes[..bytes.len() - 1])).is_err());
    }
}
