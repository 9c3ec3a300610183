//! Several peers in one process from one seed: each a [`Node`] with its own key and
//! replica, on a simulated clock, with seeded message delays, every member training the
//! tiny model for real through `worker::unit::train` (the workers' function), proposers
//! that lie (a wrong aggregate, a dropped update, two values signed for one round) and a
//! peer that is away for the first heights and catches up from the certified chain,
//! and agreement messages lost on the way.
//! The same scenario gives the same [`Report`], field for field.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use engine::Purpose;
use protocol::{WorkUnit, WorkerId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use runner::CoordinatorConfig;

use crate::PeerError;
use crate::node::{Behaviour, Message, Node, Out, Timer, Timings};
use crate::replica::{Replica, RunSpec};

/// What a unit's training takes on the simulated clock, by default.
const TRAIN_MS: u64 = 1_000;

/// A local run.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    pub seed: u64,
    pub peers: usize,
    /// Versions to certify.
    pub heights: u64,
    /// Local steps of a unit.
    pub steps: u32,
    /// Peers that misbehave when they propose, by index.
    pub dishonest: Vec<(usize, Behaviour)>,
    /// A peer that hears and says nothing until this time (ms), by index.
    pub away: Option<(usize, u64)>,
    /// A peer that never gets the updates other members broadcast, by index: it asks the
    /// proposer for those a proposal names.
    pub deaf_to_updates: Option<usize>,
    /// Message delays, uniform in this range (ms).
    pub delay_ms: (u64, u64),
    /// The percentage of agreement messages (proposals and votes) lost on the way, a
    /// seeded draw for each message to each member.
    pub lost_percent: u32,
    /// What a unit's (or a re-run's) training takes on the simulated clock (ms).
    pub train_ms: u64,
}

impl Scenario {
    /// `peers` honest peers certifying `heights` versions.
    pub fn new(seed: u64, peers: usize, heights: u64) -> Scenario {
        Scenario {
            seed,
            peers,
            heights,
            steps: 4,
            dishonest: Vec::new(),
            away: None,
            deaf_to_updates: None,
            delay_ms: (5, 80),
            lost_percent: 0,
            train_ms: TRAIN_MS,
        }
    }
}

/// What one peer ends with.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerReport {
    pub id: WorkerId,
    pub version: u64,
    /// Its replica's version hash.
    pub hash: [u8; 32],
    /// The id of each certified value, in height order.
    pub chain: Vec<agree::ValueId>,
    /// The agreement round each height was decided in (0: its first proposer's).
    pub rounds: Vec<i64>,
    /// Who proposed each certified value (by index).
    pub proposers: Vec<usize>,
    /// Micro-credits per worker, as this peer's replica counts them.
    pub credit: BTreeMap<WorkerId, u64>,
    /// The peers (by index) this one holds a proof of equivocation against.
    pub equivocators: Vec<usize>,
    /// The peers (by index) its certified chain punished for equivocating.
    pub punished: Vec<usize>,
    /// What the run's re-runs found, as its replica counts them.
    pub checks: crate::replica::Tally,
    /// The peers (by index) whose unit failed a re-run.
    pub caught: Vec<usize>,
    /// The peers (by index) seated on the committee of its next height.
    pub seated: Vec<usize>,
}

/// A local run's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub seed: u64,
    pub peers: Vec<PeerReport>,
    /// Holdout loss of version 0 and of the last version (peer 0's).
    pub initial_loss: f32,
    pub final_loss: f32,
    /// Simulated time to the last certified version.
    pub sim_ms: u64,
    /// Messages sent between peers, and their bytes on the wire (`crate::wire`).
    pub messages: u64,
    pub bytes: u64,
    /// For each height: from the last arrival of one of its updates (anywhere) to the last
    /// peer's certification of it, in simulated ms (the agreement's own cost: proposal,
    /// re-execution, two voting steps).
    pub certify_after_updates_ms: Vec<u64>,
}

/// The run every local scenario trains: the tiny model on `corpus`, every member one
/// unit a round, scoring off (every member re-executes every update's checks and the
/// aggregate instead), re-runs on (sampled units re-run by other members, bit for bit).
pub fn config(scenario: &Scenario, corpus: &Path, tokenizer: &Path) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        preset: "tiny".into(),
        seed: scenario.seed,
        corpus: corpus.to_owned(),
        tokenizer: tokenizer.to_owned(),
        batch: 4,
        seq: 32,
        holdout_batches: 8,
        ..CoordinatorConfig::default()
    };
    c.scoring.enabled = false;
    let s = &mut c.schedule;
    s.units_per_round = scenario.peers as u32;
    s.min_updates = 1;
    s.steps_per_unit = scenario.steps;
    s.inner_lr = 3e-3;
    s.n_shards = 8;
    s.max_staleness = 0;
    s.round_timeout_ms = 30_000;
    s.lease_ms = 60_000;
    s.lease_max_ms = 120_000;
    c
}

/// The key of peer `i` of a run seeded `seed` (tests and demos: a real peer's key is
/// its worker key).
pub fn key(seed: u64, i: usize) -> SigningKey {
    SigningKey::from_bytes(blake3::hash(format!("peer {seed} {i}").as_bytes()).as_bytes())
}

/// The committee of `scenario`'s peers.
fn committee(scenario: &Scenario) -> agree::Committee {
    let keys: Vec<_> = (0..scenario.peers)
        .map(|i| key(scenario.seed, i).verifying_key())
        .collect();
    agree::Committee::new(&keys).expect("distinct keys")
}

/// The peer (by index) drawn to propose at `height`, `round` of `scenario` by the
/// committee of every member: the draw of every height while each member keeps its seat
/// (`Replica::seats`: every member works in these scenarios, or is away for fewer than
/// `SEAT_WINDOW` versions).
pub fn proposer(scenario: &Scenario, height: u64, round: i64) -> usize {
    let round = u32::try_from(round).map_or(agree::Round::Nil, agree::Round::new);
    let address = committee(scenario).proposer(scenario.seed, agree::Height(height), round);
    (0..scenario.peers)
        .find(|&i| key(scenario.seed, i).verifying_key().to_bytes() == address.0)
        .expect("a member")
}

enum Event {
    Deliver {
        to: usize,
        from: usize,
        message: Message,
    },
    Timer {
        node: usize,
        timer: Timer,
    },
    Trained {
        node: usize,
        unit: WorkUnit,
        base: Arc<Vec<f32>>,
    },
}

/// What the peers a process runs start from: the run's model and data (made once,
/// shared), its fixed part (with every member's public key), version 0, and the secret
/// keys of the peers this process runs (all of a local run's; one for `hivetrain peer`).
pub struct Setup {
    pub config: CoordinatorConfig,
    pub prepared: runner::core::prepare::Prepared,
    pub spec: Arc<RunSpec>,
    pub genesis: Replica,
    /// The keys of the peers this process runs, by index.
    pub keys: Vec<SigningKey>,
}

impl Setup {
    /// The run of `scenario` (the token cache in `cache`).
    pub fn new(
        scenario: &Scenario,
        corpus: &Path,
        tokenizer: &Path,
        cache: &Path,
    ) -> Result<Setup, PeerError> {
        let keys: Vec<_> = (0..scenario.peers).map(|i| key(scenario.seed, i)).collect();
        let members = keys.iter().map(WorkerId::of).collect();
        Setup::from_config(
            config(scenario, corpus, tokenizer),
            members,
            keys,
            cache,
            engine::cpu_class(),
        )
    }

    /// The run `config` describes among `members` of determinism class `class`, with a
    /// peer of each of `keys` here. Sampled units (`config.spot_check`) are re-run by
    /// members, never by a driver of its own.
    pub fn from_config(
        config: CoordinatorConfig,
        mut members: Vec<WorkerId>,
        keys: Vec<SigningKey>,
        cache: &Path,
        class: String,
    ) -> Result<Setup, PeerError> {
        config
            .check()
            .map_err(|e| PeerError::Core(runner::CoreError::Config(e)))?;
        let prepared = runner::core::prepare::prepare(&config, cache)?;
        let spec_model = prepared.model.spec.clone();
        let n_params = spec_model.trainable_len();
        let step_tokens = config.batch as u64 * prepared.seq as u64;
        members.sort();
        let mut settings = runner::core::settings(
            &config,
            n_params as u32,
            step_tokens,
            spec_model.train_flops_per_token(),
        );
        settings.replicas = run::ReplicaRules {
            replicate: true,
            wait_ms: u64::MAX,
            checker_class: class.clone(),
            own_reruns: false,
        };
        let spec = Arc::new(RunSpec {
            settings,
            schedule: config.schedule,
            outer: config.outer,
            combine: config.combine,
            limits: config.limits,
            codec: config.codec,
            n_params,
            members,
            class,
        });
        let genesis = Replica::genesis(&spec, prepared.initial.clone())?;
        Ok(Setup {
            config,
            prepared,
            spec,
            genesis,
            keys,
        })
    }

    /// Peer `i`, behaving so.
    pub fn node(
        &self,
        i: usize,
        behaviour: Behaviour,
        timings: Timings,
    ) -> Result<Node, PeerError> {
        Node::new(
            self.keys[i].clone(),
            self.spec.clone(),
            self.genesis.clone(),
            timings,
            behaviour,
        )
    }

    /// Trains `unit` from `base` on `backend`: the workers' function.
    pub fn train(
        &self,
        backend: &mut dyn engine::Backend,
        unit: &WorkUnit,
        base: &[f32],
    ) -> Result<Vec<f32>, PeerError> {
        let data = worker::unit::UnitData {
            train: &self.prepared.train,
            n_shards: self.config.schedule.n_shards,
            batch: self.config.batch as usize,
            seq: self.prepared.seq,
        };
        worker::unit::train(backend, base, data, unit, &mut |_, _| true)?
            .ok_or(PeerError::Invalid("training stopped"))
    }

    /// The holdout loss of `params`.
    pub fn holdout_loss(&self, params: &[f32]) -> Result<f32, PeerError> {
        let mut evaluator = self.prepared.model.open_empty("cpu:1", Purpose::Eval)?;
        evaluator.set_trainable(params)?;
        Ok(engine::train::evaluate(
            evaluator.as_mut(),
            &self.prepared.holdout,
        )?)
    }
}

/// Runs `scenario` (the token cache in `cache`).
pub fn run(
    scenario: &Scenario,
    corpus: &Path,
    tokenizer: &Path,
    cache: &Path,
) -> Result<Report, PeerError> {
    let setup = Setup::new(scenario, corpus, tokenizer, cache)?;
    let spec = setup.spec.clone();
    let mut nodes = Vec::with_capacity(scenario.peers);
    for i in 0..scenario.peers {
        let behaviour = scenario
            .dishonest
            .iter()
            .find(|(p, _)| *p == i)
            .map_or(Behaviour::Honest, |(_, b)| *b);
        nodes.push(setup.node(i, behaviour, Timings::default())?);
    }
    let index: BTreeMap<WorkerId, usize> =
        nodes.iter().enumerate().map(|(i, n)| (n.id(), i)).collect();
    let mut backend = setup.prepared.model.open_empty("cpu:1", Purpose::Train)?;

    let mut rng = ChaCha8Rng::seed_from_u64(scenario.seed);
    let mut queue: BTreeMap<(u64, u64), Event> = BTreeMap::new();
    let mut sequence = 0u64;
    let mut now = 0u64;
    let (mut messages, mut bytes) = (0u64, 0u64);
    let update_max = spec.update_bytes();
    let away = |node: usize, at: u64| {
        scenario
            .away
            .is_some_and(|(p, until)| p == node && at < until)
    };
    let limit = (scenario.heights + 2) * 60_000;

    let mut pending: Vec<(usize, Vec<Out>)> = Vec::new();
    // When each height's last update arrived, and when each peer certified each height.
    let mut last_update: Vec<u64> = Vec::new();
    let mut certified: Vec<Vec<u64>> = vec![Vec::new(); scenario.peers];
    for (i, node) in nodes.iter_mut().enumerate() {
        pending.push((i, node.start()?));
    }
    loop {
        for (from, outs) in pending.drain(..) {
            for out in outs {
                let mut push = |at: u64, event: Event| {
                    sequence += 1;
                    queue.insert((at, sequence), event);
                };
                match out {
                    Out::Broadcast(message) | Out::Send { message, .. } if away(from, now) => {
                        let _ = message;
                    }
                    Out::Broadcast(message) => {
                        let (message, size) = through_wire(&message, update_max)?;
                        let deaf = |to: usize| {
                            matches!(message, Message::Update(_))
                                && scenario.deaf_to_updates == Some(to)
                        };
                        for to in (0..scenario.peers).filter(|&to| to != from && !deaf(to)) {
                            if matches!(message, Message::Agree { .. })
                                && scenario.lost_percent > 0
                                && rng.random_range(0..100) < scenario.lost_percent
                            {
                                continue;
                            }
                            let delay = rng.random_range(scenario.delay_ms.0..=scenario.delay_ms.1);
                            messages += 1;
                            bytes += size;
                            let message = message.clone();
                            push(now + delay, Event::Deliver { to, from, message });
                        }
                    }
                    Out::Send { to, message } => {
                        if let Some(&to) = index.get(&to) {
                            let (message, size) = through_wire(&message, update_max)?;
                            let delay = rng.random_range(scenario.delay_ms.0..=scenario.delay_ms.1);
                            messages += 1;
                            bytes += size;
                            push(now + delay, Event::Deliver { to, from, message });
                        }
                    }
                    Out::Schedule { after_ms, timer } => {
                        push(now + after_ms, Event::Timer { node: from, timer });
                    }
                    Out::Train { unit, base } => {
                        push(
                            now + scenario.train_ms,
                            Event::Trained {
                                node: from,
                                unit,
                                base,
                            },
                        );
                    }
                }
            }
        }
        for (i, n) in nodes.iter().enumerate() {
            let v = n.replica().version() as usize;
            if certified[i].len() < v {
                certified[i].resize(v, now);
            }
        }
        if nodes
            .iter()
            .all(|n| n.replica().version() >= scenario.heights)
        {
            break;
        }
        let Some(((at, _), event)) = queue.pop_first() else {
            return Err(PeerError::Stalled {
                seed: scenario.seed,
                what: "nothing left to happen".into(),
            });
        };
        now = at;
        if now > limit {
            let versions: Vec<u64> = nodes.iter().map(|n| n.replica().version()).collect();
            return Err(PeerError::Stalled {
                seed: scenario.seed,
                what: format!("versions {versions:?} after {} s", now / 1000),
            });
        }
        match event {
            Event::Deliver { to, from, message } => {
                if !away(to, now) {
                    if let Message::Update(bytes) = &message
                        && let Ok(u) = protocol::SignedUpdate::parse(bytes, &spec.limits)
                    {
                        // A re-run counts toward the height it is sent in, not its base's.
                        let replica = nodes[to].replica();
                        let check = replica
                            .check_of(&u.header.worker)
                            .is_some_and(|c| c.id == u.header.work_unit);
                        let base = if check {
                            replica.version()
                        } else {
                            u.header.base_version
                        };
                        let height = base as usize + 1;
                        if last_update.len() <= height {
                            last_update.resize(height + 1, 0);
                        }
                        last_update[height] = last_update[height].max(now);
                    }
                    let sender = nodes[from].id();
                    let outs = nodes[to].receive(sender, message)?;
                    pending.push((to, outs));
                }
            }
            Event::Timer { node, timer } => {
                let outs = nodes[node].timer(timer)?;
                pending.push((node, outs));
            }
            Event::Trained { node, unit, base } => {
                let delta = setup.train(backend.as_mut(), &unit, &base)?;
                let nonce = rng.random();
                let outs = nodes[node].trained(&unit, &delta, nonce)?;
                pending.push((node, outs));
            }
        }
    }

    let initial_loss = setup.holdout_loss(&setup.prepared.initial)?;
    let final_loss = setup.holdout_loss(nodes[0].replica().params())?;
    let peers = nodes
        .iter()
        .map(|n| PeerReport {
            id: n.id(),
            version: n.replica().version(),
            hash: n.replica().hash(),
            chain: n
                .chain()
                .iter()
                .map(|c| agree::Value::id(&c.decision.value))
                .collect(),
            rounds: n
                .chain()
                .iter()
                .map(|c| c.decision.round.as_i64())
                .collect(),
            proposers: n
                .chain()
                .iter()
                .map(|c| proposer(scenario, c.decision.height.0, c.decision.round.as_i64()))
                .collect(),
            credit: n.replica().credit().clone(),
            equivocators: n
                .equivocators()
                .iter()
                .filter_map(|a| index.get(&WorkerId(a.0)).copied())
                .collect(),
            punished: n
                .replica()
                .punished()
                .iter()
                .filter_map(|w| index.get(w).copied())
                .collect(),
            checks: n.replica().tally(),
            seated: n
                .replica()
                .seats(&spec)
                .iter()
                .filter_map(|w| index.get(w).copied())
                .collect(),
            caught: n
                .replica()
                .caught()
                .iter()
                .filter_map(|w| index.get(w).copied())
                .collect(),
        })
        .collect();
    Ok(Report {
        seed: scenario.seed,
        peers,
        initial_loss,
        final_loss,
        sim_ms: now,
        messages,
        bytes,
        certify_after_updates_ms: (1..=scenario.heights as usize)
            .map(|h| {
                let last = certified.iter().filter_map(|c| c.get(h - 1)).max().copied();
                last.unwrap_or(now)
                    .saturating_sub(last_update.get(h).copied().unwrap_or(0))
            })
            .collect(),
    })
}

/// `message` as it arrives: to bytes and back (and the same bytes again), with its
/// size. Every message between local peers crosses the wire format.
fn through_wire(message: &Message, update_max: usize) -> Result<(Message, u64), PeerError> {
    let bytes = crate::wire::to_bytes(message);
    let back = crate::wire::from_bytes(&bytes, update_max)
        .map_err(|_| PeerError::Invalid("a message did not survive its wire format"))?;
    if crate::wire::to_bytes(&back) != bytes {
        return Err(PeerError::Invalid("a message re-encodes to other bytes"));
    }
    Ok((back, bytes.len() as u64))
}
