//! Several peers agreeing in one process from one seed: a simulated clock, a network
//! that delays each message by a seeded draw, timers, and faults: peers that withhold
//! every message, proposers whose values are wrong, proposers who equivocate (another
//! valid value to half the committee), a partition that holds the messages crossing it
//! until it heals, clocks that run at different rates, and messages lost on the way (a
//! seeded share: each peer's rebroadcast of its votes is what recovers them). A peer
//! that hears of a height past its own asks the message's signer for the certified chain
//! and catches up from it (each decision's certificate checked, each value re-executed);
//! one still on the last height at a rebroadcast asks any peer that decided it.
//! Deterministic: the same settings give the same run, so a failing seed can be run
//! again.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use ed25519_dalek::SigningKey;

use crate::{
    Action, Committee, Counted, Decision, Height, Message, Peer, Timeout, Timeouts, Value,
};

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
    /// The percentage of proposals and votes lost on the way (a seeded draw for each
    /// message to each peer; a certified chain asked for always arrives).
    pub loss_percent: u64,
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
            loss_percent: 0,
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
    /// Caught up from another peer's certified chain rather than voted.
    pub synced: bool,
}

/// What a simulation gave.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// In the order they happened.
    pub decisions: Vec<Decided>,
    pub messages: u64,
    /// Of those, the ones lost on the way.
    pub lost: u64,
    pub events: usize,
    /// Equivocations the peers proved: (the peer that saw it, the culprit's index).
    pub equivocations: Vec<(usize, usize)>,
    /// The proofs themselves, in the same order.
    pub proofs: Vec<crate::Equivocation>,
    /// Each peer's certified chain: its decisions in height order, with certificates.
    pub chains: Vec<Vec<Decision>>,
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
        updates: vec![*blake3::hash(&height.to_le_bytes()).as_bytes()],
        evidence: Vec::new(),
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
        message: Box<Unordered<Message>>,
    },
    /// A certified chain, from a peer asked for it.
    Sync {
        to: usize,
        chain: Box<Unordered<Vec<Decision>>>,
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

/// What an event carries (ordered by the event's place in the queue, not its content).
#[derive(Clone, Debug)]
struct Unordered<T>(T);

impl<T> PartialEq for Unordered<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl<T> Eq for Unordered<T> {}
impl<T> PartialOrd for Unordered<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Unordered<T> {
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

/// The peers' keys, by index: derived from the seed.
pub fn keys(settings: &Settings) -> Vec<SigningKey> {
    (0..settings.peers)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&settings.seed.to_le_bytes());
            seed[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            SigningKey::from_bytes(&seed)
        })
        .collect()
}

/// Runs `settings` to its end: every peer that sends has decided every height, or the
/// limit passed, or a peer failed.
pub fn run(settings: &Settings) -> Report {
    let keys = keys(settings);
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
        chains: vec![Vec::new(); settings.peers],
        asked: std::collections::BTreeSet::new(),
        addresses: peers.iter().map(|p| p.address()).collect(),
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
                sim.ask_for_chain(to, h, &message.0);
                // Gossip: a peer passes each proposal on the first time it sees it, so an
                // equivocator's two proposals meet somewhere.
                if let crate::SignedConsensusMsg::Proposal(p) = &message.0 {
                    let id = (
                        to,
                        informalsystems_malachitebft_core_types::Value::id(&p.message.value),
                        p.message.round.as_i64(),
                    );
                    if sim.relayed.insert(id) && !settings.withholding.contains(&to) {
                        sim.send(to, &message.0, |_| true);
                    }
                }
                (to, h, peers[to].receive(message.0, valid))
            }
            Event::Sync { to, chain } => {
                let mut actions = Vec::new();
                let mut height = peers[to].height().0;
                for d in chain.0 {
                    // The next height this peer has not decided, on its own or synced.
                    let next = sim.chains[to].len() as u64 + 1;
                    if d.height.0 != height
                        || d.height.0 != next
                        || !committee.certifies(&d)
                        || !valid(&d.value)
                    {
                        continue;
                    }
                    sim.report.decisions.push(Decided {
                        peer: to,
                        height,
                        round: d.round.as_i64(),
                        value: d.value.clone(),
                        signatures: d.signatures(),
                        at_ms: sim.now_ms,
                        synced: true,
                    });
                    sim.chains[to].push(d);
                    if height >= settings.heights {
                        break;
                    }
                    height += 1;
                    match peers[to].start(Height(height)) {
                        Ok(more) => actions = more,
                        Err(e) => return sim.fail(format!("peer {to} start {height}: {e}")),
                    }
                }
                (to, height, Ok(actions))
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
                let timeout = timeout_of(timeout);
                // Still on the last height a while: it may have missed the decision,
                // and no later height will tell it.
                if height == settings.heights && peers[peer].rebroadcasting(timeout) {
                    sim.ask_any_for_chain(peer, height);
                }
                (peer, height, peers[peer].timeout(timeout))
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
        // A decision starts the next height, whose buffered messages may decide it at
        // once, and so on.
        let mut pending = vec![(height, actions)];
        while let Some((height, actions)) = pending.pop() {
            let decided: Vec<u64> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Decided(d) => Some(d.height.0),
                    _ => None,
                })
                .collect();
            sim.act(&peers, i, height, actions);
            for h in decided.into_iter().filter(|&h| h < settings.heights) {
                match peers[i].start(Height(h + 1)) {
                    Ok(actions) => pending.push((h + 1, actions)),
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
    sim.report.chains = std::mem::take(&mut sim.chains);
    sim.report
}

struct Sim<'a> {
    settings: &'a Settings,
    committee: Committee,
    /// Proposals each peer has passed on: (peer, value id, round).
    relayed: std::collections::BTreeSet<(usize, crate::ValueId, i64)>,
    /// Each peer's decisions in height order: the certified chain it serves.
    chains: Vec<Vec<Decision>>,
    /// The heights each peer has asked a chain from.
    asked: std::collections::BTreeSet<(usize, u64)>,
    /// Each peer's address, by index.
    addresses: Vec<crate::Address>,
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

    /// `peer`, at `height`, got `message` of a later height: it asks the message's signer
    /// (once a height) for the certified chain from its own height, which arrives as the
    /// network allows. A withholding signer answers nothing.
    fn ask_for_chain(&mut self, peer: usize, height: u64, message: &Message) {
        if crate::message_height(message).0 <= height || self.asked.contains(&(peer, height)) {
            return;
        }
        let signer = crate::message_signer(message);
        let Some(from) = self.addresses.iter().position(|a| *a == signer) else {
            return;
        };
        if self.settings.withholding.contains(&from) {
            return;
        }
        self.answer_chain(from, peer, height);
    }

    /// `from` sends `peer` its certified chain from `height`, if it has any of it (then
    /// `peer` asked for that height, and does not again).
    fn answer_chain(&mut self, from: usize, peer: usize, height: u64) {
        let chain: Vec<Decision> = self.chains[from]
            .iter()
            .filter(|d| d.height.0 >= height)
            .cloned()
            .collect();
        if chain.is_empty() {
            return;
        }
        self.asked.insert((peer, height));
        self.report.messages += 1;
        let at = self.arrival(from, peer);
        self.push(
            at,
            Event::Sync {
                to: peer,
                chain: Box::new(Unordered(chain)),
            },
        );
    }

    /// `peer`, on the last height a while, asks the others (once) for the certified
    /// chain from it: the first that has decided it answers.
    fn ask_any_for_chain(&mut self, peer: usize, height: u64) {
        if self.asked.contains(&(peer, height)) {
            return;
        }
        let from = (0..self.settings.peers).find(|&p| {
            p != peer
                && !self.settings.withholding.contains(&p)
                && self.chains[p].len() as u64 >= height
        });
        if let Some(from) = from {
            self.answer_chain(from, peer, height);
        }
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
            let draw =
                protocol::splitmix64(self.settings.seed.rotate_left(17) ^ self.report.messages);
            if draw % 100 < self.settings.loss_percent {
                self.report.lost += 1;
                continue;
            }
            let at = self.arrival(from, peer);
            self.push(
                at,
                Event::Deliver {
                    to: peer,
                    message: Box::new(Unordered(message.clone())),
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
                Action::Decided(d) => {
                    // Decided already from a certified chain (the last height, which no
                    // later start leaves): it must be the same value.
                    let index = d.height.0.saturating_sub(1) as usize;
                    if let Some(known) = self.chains[from].get(index) {
                        if known.value != d.value {
                            self.report.failure = Some(format!(
                                "peer {from} decided height {} twice, two values",
                                d.height.0
                            ));
                        }
                        continue;
                    }
                    self.report.decisions.push(Decided {
                        peer: from,
                        height: d.height.0,
                        round: d.round.as_i64(),
                        value: d.value.clone(),
                        signatures: d.signatures(),
                        at_ms: self.now_ms,
                        synced: false,
                    });
                    self.chains[from].push(d);
                }
                Action::Equivocation(proof) => {
                    let culprit = proof
                        .culprit(&self.committee)
                        .and_then(|address| peers.iter().position(|p| p.address() == address));
                    if let Some(culprit) = culprit {
                        self.report.equivocations.push((from, culprit));
                        self.report.proofs.push(*proof);
                    }
                }
            }
        }
    }
}
