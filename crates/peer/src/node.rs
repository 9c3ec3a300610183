//! One peer of a run with no coordinator, pure: messages and timers in, [`Out`]s for its
//! driver to carry out (send, start a timer, train a unit). It holds the run's latest
//! certified version ([`Replica`]), the updates of the round under way, and its seat in
//! the agreement on the next version ([`agree::Peer`]).
//!
//! A height goes: every member trains the unit its replica leased it and sends the
//! signed update to every peer; the height's proposer (drawn from the committee by the
//! run's seed) waits until it holds an update of every member's unit, or
//! [`Timings::collect_ms`], executes the height on them and proposes the value, the
//! updates' bytes travelling with it; every other member executes the same updates and
//! votes for the value only if the accepted units, their weights and the new version's
//! hash are what it computed, bit for bit, and no update it holds of a leased unit is
//! left out. More than two thirds of the votes certify the version; every peer then
//! keeps the replica it executed (never the proposer's word) and starts the next height.
//!
//! While a peer trains its unit of the height, it does not give up on the height's
//! proposals: its propose timeouts and, as proposer, its collect deadline start once its
//! unit is trained (`Node::held_back`). A unit longer than a round's propose timeout (a
//! SmolLM2 unit on a laptop takes minutes; the timeout is seconds) then costs no round:
//! every member votes for a proposal whenever it comes, and gives up on one only after
//! the usual timeouts counted from its own unit's end.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use agree::{Action, Committee, Decision, Height, Value, ValueId};
use ed25519_dalek::SigningKey;
use protocol::{UpdateHeader, WorkUnit, WorkerId};

use crate::PeerError;
use crate::replica::{Executed, Replica, RunSpec};

/// Most updates a peer holds for the round under way: two for each member's unit (an
/// honest member sends one; a second, different one is kept so that a proposal naming
/// either can be checked, a third is dropped).
const UPDATES_PER_UNIT_MAX: usize = 2;

/// Most executed values a peer keeps for the height it is on (one per proposal it
/// checked), as `agree` keeps their proposals.
const EXECUTED_MAX: usize = agree::VALUES_MAX;

/// Most proposals of a later height held until this peer gets there.
const FUTURE_MAX: usize = 16;

/// Most certified heights one chain message carries.
pub const CHAIN_MAX: usize = 64;

/// Bytes of certified heights a peer keeps in memory (their updates, mostly), at most:
/// the oldest go first, the last always stays. A member further behind than that
/// resumes from a chain file (its own, or anyone's: `hivetrain peer join` replays it).
pub const CHAIN_KEEP_BYTES: usize = 4 * crate::wire::MESSAGE_BYTES_MAX;

/// Bytes of certified chain a peer sends one member while it is on one height, at most
/// (one full chain message): a member catching up gains up to a message's worth of
/// heights for every height the run makes, and one that asks again and again gets no
/// more (each answer is a new buffer in the transport's queue: without this, 256 queued
/// answers of 64 MiB each for one asker).
pub const CHAIN_BYTES_PER_HEIGHT: usize = crate::wire::MESSAGE_BYTES_MAX;

/// A certified height's bytes past its updates, at most: the decision with a full
/// committee's signatures and a value naming `ACCEPTED_MAX` updates.
const CERTIFIED_BYTES: usize = 64 + 48 * agree::ACCEPTED_MAX + 96 * agree::COMMITTEE_MAX;

/// A height the chain keeps: its decision and the updates its value names, in order, so
/// that a peer that missed it re-executes it.
#[derive(Clone, Debug)]
pub struct Certified {
    pub decision: Decision,
    pub updates: Vec<Arc<Vec<u8>>>,
}

/// What peers send each other.
#[derive(Clone, Debug)]
pub enum Message {
    /// A vote or a proposal. A proposal may carry the bytes of updates its value names
    /// (none, as sent here: every member sent its own update to every peer, and one who
    /// lacks some asks with `Want`).
    Agree {
        message: Box<agree::Message>,
        updates: Vec<Arc<Vec<u8>>>,
    },
    /// A member's signed update for the round under way.
    Update(Arc<Vec<u8>>),
    /// Asks for updates (by address) that a proposal names and this peer lacks; answered
    /// with an `Update` for each one held.
    Want(Vec<[u8; 32]>),
    /// Asks for the certified heights from `from` on.
    ChainRequest { from: u64 },
    /// Certified heights, in order, at most [`CHAIN_MAX`].
    Chain(Vec<Certified>),
}

/// A timer a peer asks its driver for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Timer {
    /// `agree`'s timer of `height` (a timeout names only its round: one of a height the
    /// peer has left is dropped, not taken for the same round of the next).
    Agree {
        height: u64,
        timeout: agree::Timeout,
    },
    /// Stop waiting for updates and propose what is held.
    Collect { height: u64, round: i64 },
    /// Still on `height` a while after `from` spoke of a later one: ask it for the chain.
    CatchUp { height: u64, from: WorkerId },
}

/// What the driver does for a peer.
#[derive(Clone, Debug)]
pub enum Out {
    Broadcast(Message),
    Send {
        to: WorkerId,
        message: Message,
    },
    Schedule {
        after_ms: u64,
        timer: Timer,
    },
    /// Train `unit` from `base` (the version's trainable floats) and hand the delta to
    /// [`Node::trained`].
    Train {
        unit: WorkUnit,
        base: Arc<Vec<f32>>,
    },
}

/// How a peer behaves when it proposes (tests: the dishonest ones must be caught).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Honest,
    /// Proposes the right updates with another version hash.
    WrongAggregate,
    /// Leaves the first other member's update out of its value.
    DropsUpdate,
    /// Signs two values for one round: one to each half of the committee.
    Equivocates,
    /// Sends its update to every member but the height's first proposer, so that
    /// proposer's value leaves it out and the others refuse it.
    WithholdsUpdate,
    /// Sends updates that are not what its training gave (each value 5% larger): a
    /// plausible update, inside every bound, that only a re-run catches.
    LiesInTraining,
    /// Sends re-runs of the units it checks that are not what its training gave (5%
    /// larger): a false accusation, which a third member's re-run refutes.
    FalseChecks,
}

/// How long before the round's propose timeout a proposer proposes what it has: for its
/// proposal to reach the members, and a member missing some of its updates to get them.
pub const PROPOSE_MARGIN_MS: u64 = 500;

/// How long a peer waits, on the driver's clock.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timings {
    pub agree: agree::Timeouts,
    /// How long a proposer waits for the round's updates before it proposes what it has,
    /// in round 0; round r waits r + 1 times as long (up to 9 times), but never past
    /// [`PROPOSE_MARGIN_MS`] short of the round's propose timeout (a proposal that comes
    /// after it fails the round at every member, and the next round's would too). On 4
    /// peers sharing 2 cores, with re-runs, 1.5 s let a version take 1 of the 4 units
    /// trained for it, 2.5 s 3 or 4.
    pub collect_ms: u64,
    /// How long a peer that hears of a later height waits before it asks for the chain:
    /// at a height's end most peers hear the next height's first votes before their own
    /// decision, which comes a moment later; only one still behind after this asks.
    pub catch_up_ms: u64,
}

impl Timings {
    /// How long the proposer of `round` waits for updates: `collect_ms` times r + 1 (up
    /// to 9), ending [`PROPOSE_MARGIN_MS`] before the round's propose timeout.
    pub fn collect_after_ms(&self, round: agree::Round) -> u64 {
        let rounds = u64::try_from(round.as_i64()).unwrap_or(0).min(8);
        let propose = self.agree.duration_ms(agree::Timeout::propose(round));
        self.collect_ms
            .saturating_mul(1 + rounds)
            .min(propose.saturating_sub(PROPOSE_MARGIN_MS))
    }
}

impl Default for Timings {
    fn default() -> Timings {
        Timings {
            agree: agree::Timeouts::default(),
            collect_ms: 2_500,
            catch_up_ms: 1_000,
        }
    }
}

/// One peer.
pub struct Node {
    key: SigningKey,
    id: WorkerId,
    spec: Arc<RunSpec>,
    committee: Committee,
    agree: agree::Peer,
    timings: Timings,
    behaviour: Behaviour,
    /// The latest certified version.
    replica: Replica,
    /// Updates of the round on `replica`'s version, by address, in arrival order.
    pool: Vec<([u8; 32], Arc<Vec<u8>>)>,
    /// Updates that arrived for the next version, held until it is certified.
    early: Vec<Arc<Vec<u8>>>,
    /// Members' re-runs of checks this replica does not lease (yet), with the version
    /// they arrived at: at most one a member, each kept two heights.
    early_checks: Vec<(u64, Arc<Vec<u8>>)>,
    /// Values this peer executed at this height, by id.
    executed: BTreeMap<ValueId, Executed>,
    /// The value asked for by `agree`, while updates are awaited, and whether its
    /// collect deadline passed (then the first update that arrives is proposed).
    building: Option<(Height, agree::Round, bool)>,
    /// Proposals of later heights.
    future: Vec<(agree::Message, Vec<Arc<Vec<u8>>>)>,
    /// Proposals of this height waiting for updates they name (asked for with `Want`).
    waiting: Vec<agree::Message>,
    /// The newest certified heights (at most [`CHAIN_KEEP_BYTES`] of them, and at least
    /// the last): what this peer serves to members that catch up. The driver keeps all
    /// of them (a chain file).
    chain: Vec<Certified>,
    chain_bytes: usize,
    /// Who proposed the last certified value (drawn from that height's committee).
    last_proposer: Option<WorkerId>,
    /// The heights a chain was asked for (once each).
    asked: BTreeSet<u64>,
    /// The run's last version for this peer's driver, once it says (`Node::stop_at`).
    last_version: Option<u64>,
    /// Rebroadcasts of this peer's votes on that last height so far.
    last_height_rebroadcasts: u32,
    /// Members proven to have signed two values for one slot.
    equivocators: BTreeSet<agree::Address>,
    /// Updates this peer passed on after a proposal left them out, this height.
    forwarded: BTreeSet<([u8; 32], WorkerId)>,
    /// Sends decided inside `check`, taken out by `proposal`.
    outbox: Vec<Out>,
    /// Proofs not yet acted on by a certified version, for this peer's next value (at
    /// most `agree::EVIDENCE_MAX`, one a culprit).
    evidence: Vec<Vec<u8>>,
    /// What this peer answered each member this height: chain bytes sent, and the
    /// updates it sent on `Want` (each once a member; at most members times the pool).
    chain_sent: BTreeMap<WorkerId, usize>,
    wanted: BTreeSet<(WorkerId, [u8; 32])>,
    /// This peer's last re-run sent (check id, signed bytes): held again, not trained
    /// again, while its check is still leased (a proposer left it out of a height; the
    /// peers that got it keep it, so it is not sent again).
    sent_check: Option<(u64, Arc<Vec<u8>>)>,
    /// What waits for this peer's unit of the height to be trained (`Node::held_back`).
    held: HeldBack,
}

/// Timers a peer holds back while it trains its unit of the height: the newest propose
/// timeout and the newest collect deadline (one of an older round is moot once a newer
/// one is asked for), so at most two.
#[derive(Clone, Copy, Debug, Default)]
struct HeldBack {
    /// The unit of the height this peer is training, until [`Node::trained`] has it.
    unit: Option<u64>,
    propose: Option<agree::Timeout>,
    collect: Option<(Height, agree::Round)>,
}

impl Node {
    /// A member of the run signing with `key`, at `genesis`.
    pub fn new(
        key: SigningKey,
        spec: Arc<RunSpec>,
        genesis: Replica,
        timings: Timings,
        behaviour: Behaviour,
    ) -> Result<Node, PeerError> {
        Node::resume(key, spec, genesis, Vec::new(), timings, behaviour)
    }

    /// A member of the run at `replica` (a version replayed from a chain file:
    /// `crate::audit`), holding `chain`, the newest certified heights up to it, to serve
    /// to members that catch up.
    pub fn resume(
        key: SigningKey,
        spec: Arc<RunSpec>,
        replica: Replica,
        mut chain: Vec<Certified>,
        timings: Timings,
        behaviour: Behaviour,
    ) -> Result<Node, PeerError> {
        let keys: Vec<_> = spec
            .members
            .iter()
            .filter_map(|m| ed25519_dalek::VerifyingKey::from_bytes(&m.0).ok())
            .collect();
        Committee::new(&keys)
            .filter(|c| c.len() == spec.members.len())
            .ok_or(PeerError::Invalid("the members are not a committee"))?;
        if !spec.members.contains(&WorkerId::of(&key)) {
            return Err(PeerError::Invalid("this key is not a member"));
        }
        let committee = replica.committee(&spec)?;
        let agree = agree::Peer::following(key.clone(), committee.clone(), spec.settings.seed);
        chain.retain(|c| c.decision.height.0 <= replica.version());
        let mut chain_bytes = chain.iter().map(certified_bytes).sum();
        trim_chain(&mut chain, &mut chain_bytes);
        Ok(Node {
            id: WorkerId::of(&key),
            key,
            spec,
            committee,
            agree,
            timings,
            behaviour,
            replica,
            pool: Vec::new(),
            early: Vec::new(),
            early_checks: Vec::new(),
            executed: BTreeMap::new(),
            building: None,
            future: Vec::new(),
            waiting: Vec::new(),
            chain,
            chain_bytes,
            last_proposer: None,
            asked: BTreeSet::new(),
            last_version: None,
            last_height_rebroadcasts: 0,
            equivocators: BTreeSet::new(),
            evidence: Vec::new(),
            forwarded: BTreeSet::new(),
            outbox: Vec::new(),
            chain_sent: BTreeMap::new(),
            wanted: BTreeSet::new(),
            sent_check: None,
            held: HeldBack::default(),
        })
    }

    pub fn id(&self) -> WorkerId {
        self.id
    }

    /// The committee of the height this peer is on (`Replica::seats`).
    pub fn committee(&self) -> &Committee {
        &self.committee
    }

    /// The run's fixed part.
    pub fn spec(&self) -> &Arc<RunSpec> {
        &self.spec
    }

    /// The latest certified version.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The newest certified heights this peer keeps, in order (all of a short run; at
    /// most [`CHAIN_KEEP_BYTES`] of a long one).
    pub fn chain(&self) -> &[Certified] {
        &self.chain
    }

    /// Who proposed the last certified value, if any since this peer started.
    pub fn last_proposer(&self) -> Option<WorkerId> {
        self.last_proposer
    }

    /// Members this peer holds a proof of equivocation against.
    pub fn equivocators(&self) -> &BTreeSet<agree::Address> {
        &self.equivocators
    }

    /// The driver stops at `version`. On that last height, with no later one to hear of,
    /// a peer whose votes are being sent again (a while without a decision) asks the
    /// members for the chain: one that decided it (finished, and lingering) answers.
    pub fn stop_at(&mut self, version: u64) {
        self.last_version = Some(version);
    }

    /// Starts the run's first height: its unit to train, its seat in the agreement.
    pub fn start(&mut self) -> Result<Vec<Out>, PeerError> {
        let actions = self.agree.start(Height(self.replica.version() + 1))?;
        let mut out = self.train();
        self.act(actions, &mut out)?;
        Ok(out)
    }

    /// This peer's unit, or its check, is trained: its signed update goes to every peer.
    pub fn trained(
        &mut self,
        unit: &WorkUnit,
        delta: &[f32],
        nonce: u64,
    ) -> Result<Vec<Out>, PeerError> {
        let check = self.replica.check_of(&self.id) == Some(unit);
        if self.replica.unit_of(&self.id) != Some(unit) && !check {
            return Ok(Vec::new());
        }
        let lies = match self.behaviour {
            Behaviour::LiesInTraining => !check,
            Behaviour::FalseChecks => check,
            _ => false,
        };
        let lie: Vec<f32>;
        let delta = if lies {
            lie = delta.iter().map(|x| x * 1.05).collect();
            &lie[..]
        } else {
            delta
        };
        let header = UpdateHeader {
            work_unit: unit.id,
            base_version: unit.base_version,
            worker: self.id,
            nonce,
            codec: self.spec.codec,
            n_params: delta.len() as u32,
        };
        let bytes = Arc::new(protocol::encode_update(&header, delta, &self.key));
        if check {
            self.sent_check = Some((unit.id, bytes.clone()));
        }
        self.hold(bytes.clone());
        let mut out = if self.behaviour == Behaviour::WithholdsUpdate {
            let height = agree::Height(self.replica.version() + 1);
            let first =
                self.committee
                    .proposer(self.spec.settings.seed, height, agree::Round::new(0));
            self.spec
                .members
                .iter()
                .filter(|m| **m != self.id && m.0 != first.0)
                .map(|m| Out::Send {
                    to: *m,
                    message: Message::Update(bytes.clone()),
                })
                .collect()
        } else {
            vec![Out::Broadcast(Message::Update(bytes))]
        };
        if !check && self.held.unit == Some(unit.id) {
            self.release_held(&mut out);
        }
        self.try_build(false, &mut out)?;
        Ok(out)
    }

    /// Whether this peer is still training its unit of the height: its propose timeouts
    /// and collect deadlines wait for it.
    pub fn held_back(&self) -> bool {
        self.held.unit.is_some()
    }

    /// This peer's unit of the height is trained: the timers held back start now.
    fn release_held(&mut self, out: &mut Vec<Out>) {
        let held = std::mem::take(&mut self.held);
        if let Some(timeout) = held.propose {
            out.push(self.agree_timer(timeout));
        }
        if let Some((height, round)) = held.collect {
            out.push(self.collect_timer(height, round));
        }
    }

    /// The driver's timer for `agree`'s `timeout` on this height.
    fn agree_timer(&self, timeout: agree::Timeout) -> Out {
        Out::Schedule {
            after_ms: self.timings.agree.duration_ms(timeout),
            timer: Timer::Agree {
                height: self.agree.height().0,
                timeout,
            },
        }
    }

    /// The proposer's collect deadline of `round`: longer each round, as Tendermint's
    /// timeouts grow (members slower than `collect_ms`, a loaded machine, make the first
    /// rounds fail, not all), but in time for the members' propose timeout.
    fn collect_timer(&self, height: Height, round: agree::Round) -> Out {
        Out::Schedule {
            after_ms: self.timings.collect_after_ms(round),
            timer: Timer::Collect {
                height: height.0,
                round: round.as_i64(),
            },
        }
    }

    /// A message from peer `from`.
    pub fn receive(&mut self, from: WorkerId, message: Message) -> Result<Vec<Out>, PeerError> {
        let mut out = Vec::new();
        match message {
            Message::Update(bytes) => {
                if self.hold(bytes) {
                    self.try_build(false, &mut out)?;
                    self.retry_waiting(&mut out)?;
                }
            }
            Message::Want(addresses) => {
                // From the round's pool, or the last certified height's updates (a member
                // still on the height this peer just certified).
                let last = self.chain.last();
                for address in addresses
                    .iter()
                    .take(self.spec.members.len() * UPDATES_PER_UNIT_MAX)
                {
                    let held = self
                        .pool
                        .iter()
                        .find(|(a, _)| a == address)
                        .map(|(_, b)| b)
                        .or_else(|| {
                            let c = last?;
                            let i = c.decision.value.updates.iter().position(|a| a == address)?;
                            c.updates.get(i)
                        });
                    if let Some(bytes) = held
                        && self.wanted.insert((from, *address))
                    {
                        out.push(Out::Send {
                            to: from,
                            message: Message::Update(bytes.clone()),
                        });
                    }
                }
            }
            Message::Agree { message, updates } => {
                let message = *message;
                let height = agree::message_height(&message);
                let current = self.agree.height();
                // A peer a height or more ahead: this one may have missed a decision (it
                // was away, or cut off), so it asks for the certified chain, once a
                // height, if it is still behind a moment later.
                if height > current && self.asked.insert(current.0) {
                    out.push(Out::Schedule {
                        after_ms: self.timings.catch_up_ms,
                        timer: Timer::CatchUp {
                            height: current.0,
                            from,
                        },
                    });
                }
                match &message {
                    agree::Message::Proposal(_) if height > current => {
                        if self.future.len() < FUTURE_MAX {
                            self.future.push((message, updates));
                        }
                    }
                    agree::Message::Proposal(_) if height < current => {}
                    agree::Message::Proposal(p) => {
                        for bytes in &updates {
                            self.hold(bytes.clone());
                        }
                        let missing = self.missing(agree::proposal_value(p));
                        if missing.is_empty() {
                            self.proposal(message, &mut out)?;
                        } else if self.waiting.len() < FUTURE_MAX {
                            self.waiting.push(message);
                            out.push(Out::Send {
                                to: from,
                                message: Message::Want(missing),
                            });
                        }
                    }
                    agree::Message::Vote(_) => {
                        let actions = self.agree.receive(message, |_| false)?;
                        self.act(actions, &mut out)?;
                    }
                }
            }
            // Answered to members only, within the asker's budget for this height.
            Message::ChainRequest { from: height } if self.spec.members.contains(&from) => {
                let spent = self.chain_sent.get(&from).copied().unwrap_or(0);
                let budget = CHAIN_BYTES_PER_HEIGHT.saturating_sub(spent);
                let mut size = 0;
                let chain: Vec<_> = self
                    .chain
                    .iter()
                    .skip_while(|c| c.decision.height.0 < height)
                    .take(CHAIN_MAX)
                    .take_while(|c| {
                        size += certified_bytes(c);
                        size <= budget
                    })
                    .cloned()
                    .collect();
                if !chain.is_empty() {
                    *self.chain_sent.entry(from).or_default() +=
                        chain.iter().map(certified_bytes).sum::<usize>();
                    out.push(Out::Send {
                        to: from,
                        message: Message::Chain(chain),
                    });
                }
            }
            Message::ChainRequest { .. } => {}
            Message::Chain(chain) => {
                for certified in chain.into_iter().take(CHAIN_MAX) {
                    if certified.decision.height.0 == self.replica.version() + 1 {
                        self.catch_up(certified, &mut out)?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// A timer this peer asked for fired.
    pub fn timer(&mut self, timer: Timer) -> Result<Vec<Out>, PeerError> {
        let mut out = Vec::new();
        match timer {
            Timer::Agree { height, timeout } => {
                if height == self.agree.height().0 {
                    // On the last height a while (its votes sent again twice, 4 s or
                    // more into its round: `mesh::drive::LINGER` outlasts it): it may
                    // have missed the decision, and no later height will tell it. A
                    // member that has it (lingering) answers with the chain. On any
                    // other height the members that went on are heard of, and it asks
                    // them then. Asking on every height's first rebroadcast sent 7.6 MB
                    // of chains a peer a version among 16 loaded peers, mostly to peers
                    // a moment behind.
                    if self.last_version == Some(height) && self.agree.rebroadcasting(timeout) {
                        self.last_height_rebroadcasts += 1;
                    }
                    if self.last_height_rebroadcasts >= 2 && self.agree.rebroadcasting(timeout) {
                        for member in self.spec.members.iter().filter(|m| **m != self.id) {
                            out.push(Out::Send {
                                to: *member,
                                message: Message::ChainRequest { from: height },
                            });
                        }
                    }
                    let actions = self.agree.timeout(timeout)?;
                    self.act(actions, &mut out)?;
                }
            }
            Timer::CatchUp { height, from } => {
                if height == self.agree.height().0 {
                    out.push(Out::Send {
                        to: from,
                        message: Message::ChainRequest { from: height },
                    });
                }
            }
            Timer::Collect { height, round } => {
                if self
                    .building
                    .is_some_and(|(h, r, _)| h.0 == height && r.as_i64() == round)
                {
                    self.try_build(true, &mut out)?;
                }
            }
        }
        Ok(out)
    }

    /// Keeps `bytes` if it is an update of a unit leased on this version (at most
    /// [`UPDATES_PER_UNIT_MAX`] for a unit), or of the next version (for later). Whether
    /// it was new and kept for this round.
    fn hold(&mut self, bytes: Arc<Vec<u8>>) -> bool {
        let Ok(update) = validation::inspect(&bytes, &self.spec.limits) else {
            return false;
        };
        if update.header.base_version == self.replica.version() + 1 {
            if self.early.len() < self.spec.members.len() * UPDATES_PER_UNIT_MAX {
                self.early.push(bytes);
            }
            return false;
        }
        if !self.replica.expects(&update) {
            // A member's update on an older version that this replica leases nothing for:
            // a re-run of a check leased at a height this peer has not certified yet (or
            // a stale one). Kept for the next two heights, within the bound, and held
            // again as the peer moves on.
            let worker = update.header.worker;
            let member = self.spec.members.contains(&worker);
            let one = self
                .early_checks
                .iter()
                .any(|(_, b)| worker_of(b, &self.spec) == Some(worker));
            if member && !one && update.header.base_version < self.replica.version() {
                self.early_checks.push((self.replica.version(), bytes));
            }
            return false;
        }
        if self.pool.iter().any(|(a, _)| *a == update.address) {
            return false;
        }
        let same_unit = self
            .pool
            .iter()
            .filter(|(_, b)| unit_of(b, &self.spec) == Some(update.header.work_unit))
            .count();
        if same_unit >= UPDATES_PER_UNIT_MAX {
            return false;
        }
        self.pool.push((update.address, bytes));
        true
    }

    /// The units of the round this peer holds an update of.
    ///
    /// Units of the round only, not re-runs of checks: a proposer does not wait for a
    /// re-run, and a member does not refuse a value that leaves one out. A re-run is not
    /// on the round's path: one that misses a height is kept by every peer that holds
    /// it and named by a later height's value (its check stays leased meanwhile; a
    /// proposer that leaves it out delays it a height, and proposers rotate).
    fn held_units(&self) -> BTreeSet<u64> {
        self.pool
            .iter()
            .filter_map(|(_, b)| unit_of(b, &self.spec))
            .filter(|u| self.replica.is_round_unit(*u))
            .collect()
    }

    /// Proposes once every member's unit has an update here, or, once the collect
    /// deadline passed (`deadline`, or earlier), with what is held as soon as that
    /// includes a unit of the round (until then the round's propose timeout may move on).
    fn try_build(&mut self, deadline: bool, out: &mut Vec<Out>) -> Result<(), PeerError> {
        let Some((height, round, passed)) = self.building else {
            return Ok(());
        };
        let deadline = deadline || passed;
        let complete = self.held_units().len() >= self.replica.units();
        // With every unit in, the re-runs held ride along.
        if !complete && !deadline {
            return Ok(());
        }
        // One update a unit, the first that arrived, in unit order.
        let mut chosen: BTreeMap<u64, Arc<Vec<u8>>> = BTreeMap::new();
        for (_, bytes) in &self.pool {
            if let Some(unit) = unit_of(bytes, &self.spec) {
                chosen.entry(unit).or_insert_with(|| bytes.clone());
            }
        }
        let mut updates: Vec<Arc<Vec<u8>>> = chosen.into_values().collect();
        if self.behaviour == Behaviour::DropsUpdate
            && let Some(i) = updates
                .iter()
                .position(|b| worker_of(b, &self.spec) != Some(self.id))
        {
            updates.remove(i);
        }
        // Nothing to propose yet: the deadline is remembered, and the first update
        // that arrives is proposed (members still on their training, such as a re-run
        // ahead of the round's unit on a loaded machine, need not cost the round).
        let any_unit = updates
            .iter()
            .any(|b| unit_of(b, &self.spec).is_some_and(|u| self.replica.is_round_unit(u)));
        if !any_unit {
            self.building = Some((height, round, true));
            return Ok(());
        }
        self.building = None;
        let slices: Vec<&[u8]> = updates.iter().map(|b| b.as_slice()).collect();
        let Ok(mut executed) = self.replica.execute(&self.spec, &slices, &self.evidence) else {
            return Ok(());
        };
        if self.behaviour == Behaviour::WrongAggregate {
            executed.value.version_hash[0] ^= 0x5a;
        }
        let value = executed.value.clone();
        self.executed.insert(agree::Value::id(&value), executed);
        let actions = self.agree.propose(height, round, value.clone())?;
        for action in actions {
            match action {
                Action::Broadcast(proposal @ agree::Message::Proposal(_)) => {
                    self.send_proposal(proposal, &value, updates.clone(), out)?;
                }
                other => self.act(vec![other], out)?,
            }
        }
        Ok(())
    }

    /// Sends this peer's signed proposal; an equivocating peer signs a second value (the
    /// same updates in another order: valid too) for half of the committee.
    fn send_proposal(
        &mut self,
        proposal: agree::Message,
        value: &Value,
        updates: Vec<Arc<Vec<u8>>>,
        out: &mut Vec<Out>,
    ) -> Result<(), PeerError> {
        if self.behaviour != Behaviour::Equivocates || updates.len() < 2 {
            out.push(Out::Broadcast(Message::Agree {
                message: Box::new(proposal),
                updates: Vec::new(),
            }));
            return Ok(());
        }
        let mut reversed = updates.clone();
        reversed.reverse();
        let slices: Vec<&[u8]> = reversed.iter().map(|b| b.as_slice()).collect();
        let other = self.replica.execute(&self.spec, &slices, &value.evidence)?;
        debug_assert_ne!(other.value, *value);
        let second = self
            .agree
            .resigned(&proposal, other.value.clone())
            .ok_or(PeerError::Invalid("not a proposal"))?;
        for (i, member) in self.spec.members.iter().enumerate() {
            if *member == self.id {
                continue;
            }
            let message = if i % 2 == 0 {
                proposal.clone()
            } else {
                second.clone()
            };
            out.push(Out::Send {
                to: *member,
                message: Message::Agree {
                    message: Box::new(message),
                    updates: Vec::new(),
                },
            });
        }
        Ok(())
    }

    /// The updates `value` names that this peer does not hold.
    fn missing(&self, value: &Value) -> Vec<[u8; 32]> {
        value
            .updates
            .iter()
            .filter(|a| !self.pool.iter().any(|(held, _)| held == *a))
            .copied()
            .collect()
    }

    /// Takes up the waiting proposals whose updates have all arrived.
    fn retry_waiting(&mut self, out: &mut Vec<Out>) -> Result<(), PeerError> {
        let waiting = std::mem::take(&mut self.waiting);
        for message in waiting {
            let ready = match &message {
                agree::Message::Proposal(p) => self.missing(agree::proposal_value(p)).is_empty(),
                agree::Message::Vote(_) => false,
            };
            if ready {
                self.proposal(message, out)?;
            } else {
                self.waiting.push(message);
            }
        }
        Ok(())
    }

    /// A proposal of this height: executed on this peer's replica and voted for only if
    /// it matches bit for bit and leaves no held update out. A proposal is passed on the
    /// first time it is seen (gossip), so a proposer that signs two values is caught by
    /// whoever sees both.
    fn proposal(&mut self, message: agree::Message, out: &mut Vec<Out>) -> Result<(), PeerError> {
        let agree::Message::Proposal(p) = &message else {
            return Ok(());
        };
        let value = agree::proposal_value(p).clone();
        let id = agree::Value::id(&value);
        let first_time = !self.executed.contains_key(&id);
        let valid = self.check(&value, agree::message_round(&message));
        out.append(&mut self.outbox);
        // Passed on without the updates: every member sent its own to every peer.
        if first_time && valid {
            out.push(Out::Broadcast(Message::Agree {
                message: Box::new(message.clone()),
                updates: Vec::new(),
            }));
        }
        let actions = self.agree.receive(message, |_| valid)?;
        self.act(actions, out)
    }

    /// Whether `value` names an update of every unit this peer holds one of, and is what
    /// this peer computes from the updates it names. Executed values are kept by id.
    fn check(&mut self, value: &Value, round: i64) -> bool {
        let Ok(bytes) = self.named(value) else {
            return false;
        };
        let named: BTreeSet<u64> = bytes
            .iter()
            .filter_map(|b| unit_of(b, &self.spec))
            .collect();
        if !self.held_units().is_subset(&named) {
            self.forward_left_out(&named, round);
            return false;
        }
        let id = agree::Value::id(value);
        if let Some(executed) = self.executed.get(&id) {
            return executed.value == *value;
        }
        let slices: Vec<&[u8]> = bytes.iter().map(|b| b.as_slice()).collect();
        match self.replica.execute(&self.spec, &slices, &value.evidence) {
            Ok(executed) if executed.value == *value => {
                if self.executed.len() < EXECUTED_MAX {
                    self.executed.insert(id, executed);
                }
                true
            }
            _ => false,
        }
    }

    /// Sends the proposers of the next two rounds the held updates of units a refused
    /// proposal (of `round`) left out, once an update a proposer a height: a member that
    /// sent its update to some peers and not to the proposer then costs the run one
    /// round, not one a proposer it avoids. Not to every peer: most hold it already
    /// (that is why they refuse), and N peers forwarding to N peers is N squared
    /// updates a late unit, which swamped a loaded 16-peer run.
    fn forward_left_out(&mut self, named: &BTreeSet<u64>, round: i64) {
        let height = self.agree.height();
        let next: BTreeSet<WorkerId> = (1..=2)
            .filter_map(|d| u32::try_from(round + d).ok())
            .map(|r| {
                let a =
                    self.committee
                        .proposer(self.spec.settings.seed, height, agree::Round::new(r));
                WorkerId(a.0)
            })
            .filter(|w| *w != self.id)
            .collect();
        for (address, bytes) in &self.pool {
            // Units of the round only: a re-run left out waits for a later height.
            let left_out = unit_of(bytes, &self.spec)
                .is_some_and(|u| self.replica.is_round_unit(u) && !named.contains(&u));
            if !left_out {
                continue;
            }
            for to in &next {
                if self.forwarded.insert((*address, *to)) {
                    self.outbox.push(Out::Send {
                        to: *to,
                        message: Message::Update(bytes.clone()),
                    });
                }
            }
        }
    }

    /// Carries out `agree`'s actions.
    fn act(&mut self, actions: Vec<Action>, out: &mut Vec<Out>) -> Result<(), PeerError> {
        for action in actions {
            match action {
                Action::Broadcast(message) => out.push(Out::Broadcast(Message::Agree {
                    message: Box::new(message),
                    updates: Vec::new(),
                })),
                Action::Schedule(timeout)
                    if self.held_back() && timeout.kind == agree::TimeoutKind::Propose =>
                {
                    self.held.propose = Some(timeout);
                }
                Action::Schedule(timeout) => out.push(self.agree_timer(timeout)),
                Action::BuildValue { height, round } => {
                    self.building = Some((height, round, false));
                    if self.held_back() {
                        self.held.collect = Some((height, round));
                    } else {
                        out.push(self.collect_timer(height, round));
                    }
                    self.try_build(false, out)?;
                }
                Action::Decided(decision) => self.decided(decision, out)?,
                Action::Equivocation(proof) => {
                    if let Some(culprit) = proof.culprit(&self.committee) {
                        self.equivocators.insert(culprit);
                        // For this peer's next value, unless one pending names it already.
                        let bytes = agree::wire::equivocation_to_bytes(&proof);
                        let pending = self.evidence.iter().any(|e| {
                            self.replica.culprit(&self.spec, e) == Some(WorkerId(culprit.0))
                        });
                        if !pending
                            && self.evidence.len() < agree::EVIDENCE_MAX
                            && self.replica.culprit(&self.spec, &bytes).is_some()
                        {
                            self.evidence.push(bytes);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The height is certified: this peer keeps the version it executed for the value.
    fn decided(&mut self, decision: Decision, out: &mut Vec<Out>) -> Result<(), PeerError> {
        let id = agree::Value::id(&decision.value);
        let updates = self.named(&decision.value)?;
        let executed = match self.executed.remove(&id) {
            Some(e) => e,
            None => {
                let slices: Vec<&[u8]> = updates.iter().map(|b| b.as_slice()).collect();
                self.replica
                    .execute(&self.spec, &slices, &decision.value.evidence)?
            }
        };
        if executed.value != decision.value {
            return Err(PeerError::Diverged {
                height: decision.height.0,
            });
        }
        self.advance(executed, Certified { decision, updates }, out)
    }

    /// The bytes of the updates `value` names, from the round's pool.
    fn named(&self, value: &Value) -> Result<Vec<Arc<Vec<u8>>>, PeerError> {
        value
            .updates
            .iter()
            .map(|address| {
                self.pool
                    .iter()
                    .find(|(a, _)| a == address)
                    .map(|(_, b)| b.clone())
                    .ok_or(PeerError::Invalid(
                        "a decided value names an update not held",
                    ))
            })
            .collect()
    }

    /// A certified height this peer missed: its certificate checked against the
    /// committee, its value re-executed from the updates sent with it.
    fn catch_up(&mut self, certified: Certified, out: &mut Vec<Out>) -> Result<(), PeerError> {
        if !self.committee.certifies(&certified.decision)
            || certified.updates.len() != certified.decision.value.updates.len()
        {
            return Ok(());
        }
        let slices: Vec<&[u8]> = certified.updates.iter().map(|b| b.as_slice()).collect();
        let evidence = &certified.decision.value.evidence;
        let Ok(executed) = self.replica.execute(&self.spec, &slices, evidence) else {
            return Ok(());
        };
        if executed.value != certified.decision.value {
            return Err(PeerError::Diverged {
                height: certified.decision.height.0,
            });
        }
        self.advance(executed, certified, out)
    }

    /// Keeps the next version, starts its height, and replays what waited for it.
    fn advance(
        &mut self,
        executed: Executed,
        certified: Certified,
        out: &mut Vec<Out>,
    ) -> Result<(), PeerError> {
        let d = &certified.decision;
        let proposer = self
            .committee
            .proposer(self.spec.settings.seed, d.height, d.round);
        self.last_proposer = Some(WorkerId(proposer.0));
        self.replica = executed.replica;
        self.chain_bytes += certified_bytes(&certified);
        self.chain.push(certified);
        trim_chain(&mut self.chain, &mut self.chain_bytes);
        let (replica, spec) = (&self.replica, &self.spec);
        self.evidence.retain(|e| replica.culprit(spec, e).is_some());
        self.executed.clear();
        self.waiting.clear();
        self.forwarded.clear();
        self.chain_sent.clear();
        self.wanted.clear();
        self.building = None;
        self.held = HeldBack::default();
        // Re-runs of checks still leased on the new version stay (a value left them out).
        let pool = std::mem::take(&mut self.pool);
        self.pool = pool
            .into_iter()
            .filter(|(_, b)| {
                validation::inspect(b, &self.spec.limits).is_ok_and(|u| {
                    !self.replica.is_round_unit(u.header.work_unit) && self.replica.expects(&u)
                })
            })
            .collect();
        let height = Height(self.replica.version() + 1);
        self.asked.retain(|h| *h >= height.0);
        // The committee the certified chain seats for the next height.
        self.committee = self.replica.committee(&self.spec)?;
        let actions = self.agree.start_with(height, self.committee.clone())?;
        out.extend(self.train());
        for bytes in std::mem::take(&mut self.early) {
            self.hold(bytes);
        }
        let version = self.replica.version();
        for (at, bytes) in std::mem::take(&mut self.early_checks) {
            let expected = validation::inspect(&bytes, &self.spec.limits)
                .is_ok_and(|u| self.replica.expects(&u));
            if expected {
                self.hold(bytes);
            } else if at + 2 > version {
                self.early_checks.push((at, bytes));
            }
        }
        self.act(actions, out)?;
        let future = std::mem::take(&mut self.future);
        for (message, updates) in future {
            match agree::message_height(&message) {
                h if h == height => {
                    for bytes in &updates {
                        self.hold(bytes.clone());
                    }
                    self.proposal(message, out)?;
                }
                h if h > height => self.future.push((message, updates)),
                _ => {}
            }
        }
        self.try_build(false, out)
    }

    /// This peer's unit of the round, to train, and its check: to train, or, if it was
    /// trained and sent already, held again.
    fn train(&mut self) -> Vec<Out> {
        self.held.unit = self.replica.unit_of(&self.id).map(|u| u.id);
        let mut out: Vec<Out> = self
            .replica
            .unit_of(&self.id)
            .map(|unit| Out::Train {
                unit: *unit,
                base: self.replica.params().clone(),
            })
            .into_iter()
            .collect();
        let Some(check) = self.replica.check_of(&self.id).copied() else {
            self.sent_check = None;
            return out;
        };
        match self.sent_check.clone() {
            // Sent already: every peer that got it keeps it while its check is leased.
            Some((id, bytes)) if id == check.id => {
                self.hold(bytes);
            }
            _ => {
                if let Some(base) = self.replica.base_of(check.base_version) {
                    out.push(Out::Train {
                        unit: check,
                        base: base.clone(),
                    });
                }
            }
        }
        out
    }
}

/// Drops the oldest heights past [`CHAIN_KEEP_BYTES`], keeping the last.
fn trim_chain(chain: &mut Vec<Certified>, bytes: &mut usize) {
    let mut drop = 0;
    while *bytes > CHAIN_KEEP_BYTES && drop + 1 < chain.len() {
        *bytes -= certified_bytes(&chain[drop]);
        drop += 1;
    }
    chain.drain(..drop);
}

/// What a certified height takes in a chain message, at most.
fn certified_bytes(c: &Certified) -> usize {
    CERTIFIED_BYTES + c.updates.iter().map(|u| u.len() + 4).sum::<usize>()
}

/// The unit an update's header names, if it parses.
fn unit_of(bytes: &[u8], spec: &RunSpec) -> Option<u64> {
    protocol::SignedUpdate::parse(bytes, &spec.limits)
        .ok()
        .map(|u| u.header.work_unit)
}

/// The worker an update's header names, if it parses.
fn worker_of(bytes: &[u8], spec: &RunSpec) -> Option<WorkerId> {
    protocol::SignedUpdate::parse(bytes, &spec.limits)
        .ok()
        .map(|u| u.header.worker)
}
