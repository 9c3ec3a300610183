//! Several peers agreeing in one process from one seed: a simulated clock, a network
//! that delays each message by a seeded draw, timers, and faults: peers that withhold
//! every message, proposers whose values are wrong, proposers who equivocate (another
//! valid value to half the committee), a partition that holds the messages crossing it
//! until it heals, and clocks that run at different rates. Deterministic: the same
//! settings give the same run, so a failing seed can be run again.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use ed25519_dalek::SigningKey;

use crate::{Action, Committee, Counted, Height, Message, Peer, Timeout, Timeouts, Value};

/// Most events a simulation takes before it gives up (a bound on a livelock).
pub const EVENTS_MAX: usize = 1_000_000;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Settings {
    pub seed: u64,
    pub peers: usize,
    /// Heights to decide, from 1.
    pub heights: u64,
    /// Peers (by index) that receive but never send.
    pub withholding: Vec<usize>,
    /// Peers (by index) that propose a value whose hash is wrong.
    pub wrong_proposers: Vec<usize>,
    /// Peers (by index) that propose the honest value to even-numbered peers and
    /// [`other_value`] (valid too) to odd-numbered ones.
    pub equivocating: Vec<usize>,
    /// Peers cut off from the rest from `from_ms` until `until_ms`: a message crossing
    /// the cut in that time arrives after it heals.
    pub partition: Option<Partition>,
    /// Each peer's timers run at a seeded rate between 0.5 and 2 times the others'.
    pub skewed_clocks: bool,
    /// Each message takes 1 to this many ms (a seeded draw).
    pub delay_max_ms: u64,
    pub timeouts: Timeouts,
    /// Simulated time by which every height must be decided.
    pub limit_ms: u64,
}

impl Settings {
    pub fn new(seed: u64, peers: usize) -> Settings {
        Settings {
            seed,
            peers,
            heights: 3,
            withholding: Vec::new(),
            wrong_proposers: Vec::new(),
            equivocating: Vec::new(),
            partition: None,
            skewed_clocks: false,
            delay_max_ms: 50,
            timeouts: Timeouts::default(),
            limit_ms: 600_000,
        }
    }
}

/// A group of peers cut off from the others for a while.
#[derive(Clone, Debug)]
pub struct Partition {
    pub group: Vec<usize>,
    pub from_ms: u64,
    pub until_ms: u64,
}

/// One peer's decision of one height.
#[derive(Clone, Debug, PartialEq)]
pub struct Decided {
    pub peer: usize,
    pub height: u64,
    pub round: i64,
    pub value: Value,
    pub signatures: usize,
    pub at_ms: u64,
}

/// What a simulation gave.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// In the order they happened.
    pub decisions: Vec<Decided>,
    pub messages: u64,
    pub events: usize,
    /// Equivocations the peers proved: (the peer that saw it, the culprit's index).
    pub equivocations: Vec<(usize, usize)>,
    pub end_ms: u64,
    /// Why it stopped early, if it did (an error of a peer, or the event bound).
    pub failure: Option<String>,
}

/// The honest value of `height`: what every peer's re-execution gives.
pub fn honest_value(height: u64) -> Value {
    let mut h = blake3::Hasher::new();
    h.update(b"version");
    h.update(&height.to_le_bytes());
    Value {
        base_version: height - 1,
        accepted: vec![Counted {
            unit: height,
            weight: 100,
        }],
        version_hash: *h.finalize().as_bytes(),
    }
}

/// Another valid value of `height` (an equivocator's second): the same version reached
/// by another weighting that every peer's re-execution accepts too.
pub fn other_value(height: u64) -> Value {
    let mut v = honest_value(height);
    v.accepted[0].weight += 1;
    v
}

/// Whether a peer's re-execution accepts `v`.
fn valid(v: &Value) -> bool {
    let height = v.base_version + 1;
    *v == honest_value(height) || *v == other_value(height)
}

/// A dishonest proposer's value: another hash.
fn wrong_value(height: u64, peer: usize) -> Value {
    let mut v = honest_value(height);
    v.version_hash[0] ^= 1 + peer as u8;
    v
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Deliver {
        to: usize,
        message: Box<MessageOrd>,
    },
    Fire {
        peer: usize,
        height: u64,
        timeout: (u8, i64),
    },
    Build {
        peer: usize,
        height: u64,
        round: i64,
    },
}

/// A message in the event queue (ordered by its place in the queue, not its content).
#[derive(Clone, Debug)]
struct MessageOrd(Message);

impl PartialEq for MessageOrd {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for MessageOrd {}
impl PartialOrd for MessageOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for MessageOrd {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

fn kind_code(t: Timeout) -> (u8, i64) {
    let k = match t.kind {
        crate::TimeoutKind::Propose => 0,
        crate::TimeoutKind::Prevote => 1,
        crate::TimeoutKind::Precommit => 2,
        crate::TimeoutKind::Rebroadcast => 3,
    };
    (k, t.round.as_i64())
}

fn timeout_of((k, round): (u8, i64)) -> Timeout {
    let round = informalsystems_malachitebft_core_types::Round::new(round as u32);
    match k {
        0 => Timeout::propose(round),
        1 => Timeout::prevote(round),
        2 => Timeout::precommit(round),
        _ => Timeout::new(round, crate::TimeoutKind::Rebroadcast),
    }
}

/// Runs `settings` to its end: every peer that sends has decided every height, or the
/// limit passed, or a peer failed.
pub fn run(settings: &Settings) -> Report {
    let keys: Vec<SigningKey> = (0..settings.peers)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&settings.seed.to_le_bytes());
            seed[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            SigningKey::from_bytes(&seed)
        })
        .collect();
    let publics: Vec<_> = keys.iter().map(|k| k.verifying_key()).collect();
    let Some(committee) = Committee::new(&publics) else {
        return Report {
            failure: Some("no committee of these keys".into()),
            ..Report::default()
        };
    };
    let mut peers: Vec<Peer> = Vec::with_capacity(keys.len());
    for key in keys {
        match Peer::new(key, committee.clone(), settings.seed) {
            Some(p) => peers.push(p),
            None => unreachable!("every key is a member"),
        }
    }
    let mut sim = Sim {
        settings,
        committee: committee.clone(),
        relayed: std::collections::BTreeSet::new(),
        queue: BinaryHeap::new(),
        seq: 0,
        now_ms: 0,
        report: Report::default(),
    };
    let honest: Vec<usize> = (0..peers.len())
        .filter(|i| !settings.withholding.contains(i))
        .collect();
    for i in 0..peers.len() {
        match peers[i].start(Height(1)) {
            Ok(actions) => sim.act(&peers, i, 1, actions),
            Err(e) => return sim.fail(format!("peer {i} start: {e}")),
        }
    }
    while let Some(Reverse((at, _, event))) = sim.queue.pop() {
        sim.now_ms = at;
        sim.report.events += 1;
        if at > settings.limit_ms || sim.report.events > EVENTS_MAX {
            break;
        }
        let (i, height, result) = match event {
            Event::Deliver { to, message } => {
                let h = peers[to].height().0;
                // Gossip: a peer passes each proposal on the first time it sees it, so an
                // equivocator's two proposals meet somewhere.
                if let crate::SignedConsensusMsg::Proposal(p) = &message.0 {
                    let id = (
                        to,
                        crate::Value::id_of(&p.message.value),
                        p.message.round.as_i64(),
                    );
                    if sim.relayed.insert(id) && !settings.withholding.contains(&to) {
                        sim.send(to, &message.0, |_| true);
                    }
                }
                (to, h, peers[to].receive(message.0, valid))
            }
            Event::Fire {
                peer,
                height,
                timeout,
            } => {
                // A timer of a height the peer has left.
                if peers[peer].height().0 != height {
                    continue;
                }
                (peer, height, peers[peer].timeout(timeout_of(timeout)))
            }
            Event::Build {
                peer,
                height,
                round,
            } => {
                if peers[peer].height().0 != height {
                    continue;
                }
                let value = if settings.wrong_proposers.contains(&peer) {
                    wrong_value(height, peer)
                } else {
                    honest_value(height)
                };
                let round = informalsystems_malachitebft_core_types::Round::new(round as u32);
                (
                    peer,
                    height,
                    peers[peer].propose(Height(height), round, value),
                )
            }
        };
        let actions = match result {
            Ok(actions) => actions,
            Err(e) => return sim.fail(format!("peer {i} at height {height}: {e}")),
        };
        let decided: Vec<u64> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Decided(d) => Some(d.height.0),
                _ => None,
            })
            .collect();
        sim.act(&peers, i, height, actions);
        for h in decided {
            if h < settings.heights {
                match peers[i].start(Height(h + 1)) {
                    Ok(actions) => sim.act(&peers, i, h + 1, actions),
                    Err(e) => return sim.fail(format!("peer {i} start {}: {e}", h + 1)),
                }
            }
        }
        let done = honest.iter().all(|&p| {
            sim.report
                .decisions
                .iter()
                .any(|d| d.peer == p && d.height == settings.heights)
        });
        if done {
            break;
        }
    }
    sim.report.end_ms = sim.now_ms;
    sim.report
}

struct Sim<'a> {
    settings: &'a Settings,
    committee: Committee,
    /// Proposals each peer has passed on: (peer, value id, round).
    relayed: std::collections::BTreeSet<(usize, crate::ValueId, i64)>,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    seq: u64,
    now_ms: u64,
    report: Report,
}

impl Sim<'_> {
    fn push(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, event)));
    }

    fn fail(mut self, why: String) -> Report {
        self.report.failure = Some(why);
        self.report.end_ms = self.now_ms;
        self.report
    }

    /// When a message sent now from `from` to `to` arrives: a seeded delay, after the
    /// partition heals if it crosses it.
    fn arrival(&self, from: usize, to: usize) -> u64 {
        let draw = protocol::splitmix64(self.settings.seed ^ self.seq.wrapping_mul(31));
        let delay = 1 + draw % self.settings.delay_max_ms.max(1);
        let sent = match &self.settings.partition {
            Some(p)
                if (p.from_ms..p.until_ms).contains(&self.now_ms)
                    && p.group.contains(&from) != p.group.contains(&to) =>
            {
                p.until_ms
            }
            _ => self.now_ms,
        };
        sent + delay
    }

    /// How long `peer`'s timer of `ms` takes on the simulated clock.
    fn timer_ms(&self, peer: usize, ms: u64) -> u64 {
        if !self.settings.skewed_clocks {
            return ms;
        }
        // 50 to 200 percent.
        let rate = 50 + protocol::splitmix64(self.settings.seed ^ (peer as u64 + 1)) % 151;
        ms * rate / 100
    }

    /// Sends `message` from `from` to every other peer that `to` admits.
    fn send(&mut self, from: usize, message: &Message, to: impl Fn(usize) -> bool) {
        for peer in (0..self.settings.peers).filter(|&p| p != from && to(p)) {
            self.report.messages += 1;
            let at = self.arrival(from, peer);
            self.push(
                at,
                Event::Deliver {
                    to: peer,
                    message: Box::new(MessageOrd(message.clone())),
                },
            );
        }
    }

    fn act(&mut self, peers: &[Peer], from: usize, height: u64, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Broadcast(message) => {
                    if self.settings.withholding.contains(&from) {
                        continue;
                    }
                    let second = if self.settings.equivocating.contains(&from) {
                        match &message {
                            crate::SignedConsensusMsg::Proposal(p) => {
                                peers[from].resigned(&message, other_value(p.message.height.0))
                            }
                            crate::SignedConsensusMsg::Vote(_) => None,
                        }
                    } else {
                        None
                    };
                    match second {
                        Some(other) => {
                            self.send(from, &message, |to| to % 2 == 0);
                            self.send(from, &other, |to| to % 2 == 1);
                        }
                        None => self.send(from, &message, |_| true),
                    }
                }
                Action::Schedule(timeout) => {
                    let ms = self.settings.timeouts.duration_ms(timeout);
                    let at = self.now_ms + self.timer_ms(from, ms);
                    self.push(
                        at,
                        Event::Fire {
                            peer: from,
                            height,
                            timeout: kind_code(timeout),
                        },
                    );
                }
                Action::BuildValue { height, round } => self.push(
                    self.now_ms,
                    Event::Build {
                        peer: from,
                        height: height.0,
                        round: round.as_i64(),
                    },
                ),
                Action::Decided(d) => self.report.decisions.push(Decided {
                    peer: from,
                    height: d.height.0,
                    round: d.round.as_i64(),
                    value: d.value,
                    signatures: d.signatures,
                    at_ms: self.now_ms,
                }),
                Action::Equivocation(proof) => {
                    let culprit = proof
                        .culprit(&self.committee)
                        .and_then(|address| peers.iter().position(|p| p.address() == address));
                    if let Some(culprit) = culprit {
                        self.report.equivocations.push((from, culprit));
                    }
                }
            }
        }
    }
}
