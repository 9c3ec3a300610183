//! Agreement on each version among peers with no coordinator (issue 18's first slice):
//! Malachite's Tendermint core (`informalsystems-malachitebft-core-*`, chosen by the
//! measured spike in `spikes/p2p`) carrying hivetrain's value, signed with hivetrain's
//! ed25519 keys, its proposer drawn from the committee by a seed everyone knows.
//!
//! Pure, as `run` is: a [`Peer`] takes inputs ([`Peer::start`], [`Peer::receive`],
//! [`Peer::propose`], [`Peer::timeout`]) and returns [`Action`]s for its driver to carry
//! out (send a message to every peer, start a timer, build a value, apply a decided
//! one). It reads no clock, opens no socket and draws no randomness: the simulator drives
//! several peers from one seed, and a networked driver will drive one.
//!
//! A height is a version: height `h` agrees on the value that makes version `h` from
//! version `h - 1`. More than two thirds of the committee's votes decide it (safe while
//! fewer than a third are dishonest); a proposer whose value is not valid, or who is
//! silent, costs a round: its timeout moves the committee to the next proposer. A peer
//! votes for a proposal only if its driver re-executed the value and found it valid
//! ([`Peer::receive`]'s `valid`): Malachite itself marks a proposal's value valid
//! unchecked in the mode used here.

use std::collections::BTreeMap;

pub mod sim;
pub mod wire;
use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use informalsystems_malachitebft_core_consensus::{
    self as mc, ConsensusMsg, Effect, Input, LocallyProposedValue, Params, Resumable,
    SignedConsensusMsg, State, process,
};
use informalsystems_malachitebft_core_types::{
    self as mt, NilOrVal, SignedMessage, ThresholdParams, ValuePayload, VoteType, VotingPower,
};
pub use informalsystems_malachitebft_core_types::{Round, Timeout, TimeoutKind};

/// Most committee members.
pub const COMMITTEE_MAX: usize = 256;

/// Most accepted updates one value names.
pub const ACCEPTED_MAX: usize = 4_096;

/// Most proofs of equivocation one value carries.
pub const EVIDENCE_MAX: usize = 4;

/// Most bytes one proof of equivocation takes (two proposals naming `ACCEPTED_MAX`
/// updates each fit).
pub const EVIDENCE_BYTES_MAX: usize = 1 << 20;

/// Most values a peer keeps by id for the height it is on (each proposal it saw).
pub const VALUES_MAX: usize = 64;

/// Most signed messages a peer keeps to catch equivocations (a few rounds of a full
/// committee's proposals and votes).
pub const SEEN_MAX: usize = 8 * COMMITTEE_MAX;

/// A peer's public key: its address in the committee.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address(pub [u8; 32]);

/// The first four bytes of `bytes` in hex: how keys and ids show in logs.
fn short_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8; 32]) -> fmt::Result {
    bytes[..4].iter().try_for_each(|b| write!(f, "{b:02x}"))
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        short_hex(f, &self.0)
    }
}

impl mt::Address for Address {}

/// A height: the version being agreed on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Height(pub u64);

impl fmt::Display for Height {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl mt::Height for Height {
    const ZERO: Self = Height(0);
    const INITIAL: Self = Height(1);

    fn increment_by(&self, n: u64) -> Self {
        Height(self.0.saturating_add(n))
    }

    fn decrement_by(&self, n: u64) -> Option<Self> {
        self.0.checked_sub(n).map(Height)
    }

    fn as_u64(&self) -> u64 {
        self.0
    }
}

/// An update a value counts in the new version: its unit and its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Counted {
    pub unit: u64,
    pub weight: u64,
}

/// What a height agrees on: the updates the proposer stepped through the run core, in
/// order (the events it saw), the accepted ones among them (with their weights) that
/// version `height` aggregates from version `height - 1`, and the hash of the result.
/// Every committee member re-executes the same pure functions on the same updates and
/// checks the accepted list and the hash bit for bit before it votes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Value {
    /// The version it is built on (`height - 1`).
    pub base_version: u64,
    /// The updates stepped, in order, by their address (`protocol::update::stored_address`:
    /// the blake3 that names a signed update's bytes). At most [`ACCEPTED_MAX`].
    pub updates: Vec<[u8; 32]>,
    pub accepted: Vec<Counted>,
    /// Proofs of equivocation the new version acts on, each two conflicting messages of
    /// one member as `wire::equivocation_to_bytes`; at most [`EVIDENCE_MAX`]. Every
    /// member checks each ([`Equivocation::culprit`]) when it re-executes the value.
    pub evidence: Vec<Vec<u8>>,
    /// The hash of the new version's parameters.
    pub version_hash: [u8; 32],
}

/// A value's id: the blake3 of its canonical bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ValueId(pub [u8; 32]);

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        short_hex(f, &self.0)
    }
}

impl Value {
    /// Its id: what votes and certificates name.
    pub fn id(&self) -> ValueId {
        mt::Value::id(self)
    }
}

impl mt::Value for Value {
    type Id = ValueId;

    fn id(&self) -> ValueId {
        let mut h = blake3::Hasher::new();
        h.update(b"hivetrain/agree/value/v2");
        h.update(&self.base_version.to_le_bytes());
        h.update(&(self.updates.len() as u64).to_le_bytes());
        for u in &self.updates {
            h.update(u);
        }
        h.update(&(self.accepted.len() as u64).to_le_bytes());
        for c in &self.accepted {
            h.update(&c.unit.to_le_bytes());
            h.update(&c.weight.to_le_bytes());
        }
        h.update(&(self.evidence.len() as u64).to_le_bytes());
        for e in &self.evidence {
            h.update(&(e.len() as u64).to_le_bytes());
            h.update(e);
        }
        h.update(&self.version_hash);
        ValueId(*h.finalize().as_bytes())
    }
}

/// A proposal: a value for a height and round, by the round's proposer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    height: Height,
    round: Round,
    value: Value,
    pol_round: Round,
    proposer: Address,
}

impl mt::Proposal<Ctx> for Proposal {
    fn height(&self) -> Height {
        self.height
    }
    fn round(&self) -> Round {
        self.round
    }
    fn value(&self) -> &Value {
        &self.value
    }
    fn take_value(self) -> Value {
        self.value
    }
    fn pol_round(&self) -> Round {
        self.pol_round
    }
    fn validator_address(&self) -> &Address {
        &self.proposer
    }
}

/// A prevote or precommit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Vote {
    kind: VoteType,
    height: Height,
    round: Round,
    value: NilOrVal<ValueId>,
    voter: Address,
}

impl mt::Vote<Ctx> for Vote {
    fn height(&self) -> Height {
        self.height
    }
    fn round(&self) -> Round {
        self.round
    }
    fn value(&self) -> &NilOrVal<ValueId> {
        &self.value
    }
    fn take_value(self) -> NilOrVal<ValueId> {
        self.value
    }
    fn vote_type(&self) -> VoteType {
        self.kind
    }
    fn validator_address(&self) -> &Address {
        &self.voter
    }
    // No vote extensions.
    fn extension(&self) -> Option<&SignedMessage<Ctx, ()>> {
        None
    }
    fn take_extension(&mut self) -> Option<SignedMessage<Ctx, ()>> {
        None
    }
    fn extend(self, _extension: SignedMessage<Ctx, ()>) -> Self {
        self
    }
}

/// Proposals travel whole (`ValuePayload::ProposalOnly`): no parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoParts;

impl mt::ProposalPart<Ctx> for NoParts {
    fn is_first(&self) -> bool {
        true
    }
    fn is_last(&self) -> bool {
        true
    }
}

/// A committee member: its key and voting power (1 each in this first version).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    address: Address,
    key: VerifyingKey,
    power: VotingPower,
}

/// The committee, ordered by address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committee(Vec<Member>);

impl Committee {
    /// The committee of `keys` (its order does not matter), each of one vote; `None`
    /// if empty, past [`COMMITTEE_MAX`], or a key appears twice.
    pub fn new(keys: &[VerifyingKey]) -> Option<Committee> {
        if keys.is_empty() || keys.len() > COMMITTEE_MAX {
            return None;
        }
        let mut members: Vec<Member> = keys
            .iter()
            .map(|k| Member {
                address: Address(k.to_bytes()),
                key: *k,
                power: 1,
            })
            .collect();
        members.sort_by_key(|m| m.address);
        members.dedup_by_key(|m| m.address);
        (members.len() == keys.len()).then_some(Committee(members))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether this committee certified `decision`: its certificate is of its height,
    /// round and value, with valid precommit signatures of distinct members holding more
    /// than two thirds of the votes. What a peer that missed a height (a partition, a
    /// late join) checks each decision of the chain it is sent with, before it
    /// re-executes the value and starts the next height.
    pub fn certifies(&self, decision: &Decision) -> bool {
        let c = &decision.certificate;
        c.height == decision.height
            && c.round == decision.round
            && c.value_id == mt::Value::id(&decision.value)
            && commit_certified(c, self).is_ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The proposer of `round` at `height` for the run seeded `seed`: a uniform draw
    /// over the members, the same on every peer.
    pub fn proposer(&self, seed: u64, height: Height, round: Round) -> Address {
        let r = round.as_i64().max(0) as u64;
        let draw = protocol::splitmix64(
            seed ^ protocol::splitmix64(height.0 ^ r.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        );
        self.0[(draw % self.0.len() as u64) as usize].address
    }
}

impl mt::Validator<Ctx> for Member {
    fn address(&self) -> &Address {
        &self.address
    }
    fn public_key(&self) -> &VerifyingKey {
        &self.key
    }
    fn voting_power(&self) -> VotingPower {
        self.power
    }
}

impl mt::ValidatorSet<Ctx> for Committee {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn total_voting_power(&self) -> VotingPower {
        self.0.iter().map(|m| m.power).sum()
    }
    fn get_by_address(&self, address: &Address) -> Option<&Member> {
        self.0
            .binary_search_by_key(address, |m| m.address)
            .ok()
            .map(|i| &self.0[i])
    }
    fn get_by_index(&self, index: usize) -> Option<&Member> {
        self.0.get(index)
    }
}

/// An ed25519 signature (Malachite wants it ordered).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sig(pub [u8; 64]);

/// ed25519 (hivetrain's keys) as the signing scheme.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ed25519;

impl mt::SigningScheme for Ed25519 {
    type DecodingError = String;
    type Signature = Sig;
    type PublicKey = VerifyingKey;
    type PrivateKey = SigningKey;

    fn decode_signature(bytes: &[u8]) -> Result<Sig, String> {
        bytes
            .try_into()
            .map(Sig)
            .map_err(|_| format!("a signature is 64 bytes, not {}", bytes.len()))
    }

    fn encode_signature(signature: &Sig) -> Vec<u8> {
        signature.0.to_vec()
    }
}

/// hivetrain's types for Malachite, and the seeded proposer draw.
#[derive(Clone, Debug)]
pub struct Ctx {
    seed: u64,
}

impl mt::Context for Ctx {
    type Address = Address;
    type Height = Height;
    type ProposalPart = NoParts;
    type Proposal = Proposal;
    type Validator = Member;
    type ValidatorSet = Committee;
    type Value = Value;
    type Vote = Vote;
    type Extension = ();
    type SigningScheme = Ed25519;

    fn select_proposer<'a>(
        &self,
        committee: &'a Committee,
        height: Height,
        round: Round,
    ) -> &'a Member {
        let address = committee.proposer(self.seed, height, round);
        match mt::ValidatorSet::get_by_address(committee, &address) {
            Some(m) => m,
            None => unreachable!("the proposer is drawn from the committee"),
        }
    }

    fn new_proposal(
        &self,
        height: Height,
        round: Round,
        value: Value,
        pol_round: Round,
        proposer: Address,
    ) -> Proposal {
        Proposal {
            height,
            round,
            value,
            pol_round,
            proposer,
        }
    }

    fn new_prevote(
        &self,
        height: Height,
        round: Round,
        value: NilOrVal<ValueId>,
        voter: Address,
    ) -> Vote {
        Vote {
            kind: VoteType::Prevote,
            height,
            round,
            value,
            voter,
        }
    }

    fn new_precommit(
        &self,
        height: Height,
        round: Round,
        value: NilOrVal<ValueId>,
        voter: Address,
    ) -> Vote {
        Vote {
            kind: VoteType::Precommit,
            height,
            round,
            value,
            voter,
        }
    }
}

/// The bytes a vote's signature covers.
fn vote_bytes(v: &Vote) -> Vec<u8> {
    let mut b = b"hivetrain/agree/vote/v1".to_vec();
    b.push(match v.kind {
        VoteType::Prevote => 0,
        VoteType::Precommit => 1,
    });
    b.extend(v.height.0.to_le_bytes());
    b.extend(v.round.as_i64().to_le_bytes());
    match &v.value {
        NilOrVal::Nil => b.push(0),
        NilOrVal::Val(id) => {
            b.push(1);
            b.extend(id.0);
        }
    }
    b.extend(v.voter.0);
    b
}

/// The bytes a proposal's signature covers (its value by id).
fn proposal_bytes(p: &Proposal) -> Vec<u8> {
    let mut b = b"hivetrain/agree/proposal/v1".to_vec();
    b.extend(p.height.0.to_le_bytes());
    b.extend(p.round.as_i64().to_le_bytes());
    b.extend(p.pol_round.as_i64().to_le_bytes());
    b.extend(mt::Value::id(&p.value).0);
    b.extend(p.proposer.0);
    b
}

fn verified(message: &ConsensusMsg<Ctx>, signature: &Sig, key: &VerifyingKey) -> bool {
    let bytes = match message {
        ConsensusMsg::Vote(v) => vote_bytes(v),
        ConsensusMsg::Proposal(p) => proposal_bytes(p),
    };
    key.verify(&bytes, &Signature::from_bytes(&signature.0))
        .is_ok()
}

/// Whether `certificate`'s precommit signatures are valid and of distinct members
/// holding more than two thirds of the committee's votes.
// The error is what Malachite's `CertificateValidity` resumes with.
#[allow(clippy::result_large_err)]
fn commit_certified(
    certificate: &mt::CommitCertificate<Ctx>,
    committee: &Committee,
) -> Result<(), mt::CertificateError<Ctx>> {
    let total = mt::ValidatorSet::total_voting_power(committee);
    let expected = total * 2 / 3 + 1;
    let mut signers = std::collections::BTreeSet::new();
    let mut signed = 0;
    for s in &certificate.commit_signatures {
        let Some(member) = mt::ValidatorSet::get_by_address(committee, &s.address) else {
            return Err(mt::CertificateError::UnknownValidator(s.address));
        };
        let vote = Vote {
            kind: VoteType::Precommit,
            height: certificate.height,
            round: certificate.round,
            value: NilOrVal::Val(certificate.value_id),
            voter: s.address,
        };
        let ok = member
            .key
            .verify(&vote_bytes(&vote), &Signature::from_bytes(&s.signature.0))
            .is_ok();
        if !ok {
            return Err(mt::CertificateError::InvalidCommitSignature(s.clone()));
        }
        if !signers.insert(s.address) {
            return Err(mt::CertificateError::DuplicateVote(s.address));
        }
        signed += member.power;
    }
    if signed < expected {
        return Err(mt::CertificateError::NotEnoughVotingPower {
            signed,
            total,
            expected,
        });
    }
    Ok(())
}

/// What a certificate is answered with until sync verifies them: as if no one signed.
fn unverified(committee: &Committee) -> mt::CertificateError<Ctx> {
    let total = mt::ValidatorSet::total_voting_power(committee);
    mt::CertificateError::NotEnoughVotingPower {
        signed: 0,
        total,
        expected: total * 2 / 3 + 1,
    }
}

/// A signed vote or proposal, as peers send them.
pub type Message = SignedConsensusMsg<Ctx>;

/// A height's decision: the value and the commit signatures that certify it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub height: Height,
    pub round: Round,
    pub value: Value,
    /// The members' precommit signatures that certify it (more than two thirds): what a
    /// peer that missed the height checks ([`Committee::certifies`]).
    pub certificate: Certificate,
}

/// A height's commit certificate.
pub type Certificate = mt::CommitCertificate<Ctx>;

impl Decision {
    /// How many members' precommits certify it.
    pub fn signatures(&self) -> usize {
        self.certificate.commit_signatures.len()
    }
}

/// What the driver does after a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send to every other member.
    Broadcast(Message),
    /// Call [`Peer::timeout`] with it after [`Timeouts::duration_ms`].
    Schedule(Timeout),
    /// This peer proposes at `height`, `round`: build the value (run the round's core)
    /// and give it to [`Peer::propose`].
    BuildValue { height: Height, round: Round },
    /// The height is decided: apply the value, then [`Peer::start`] the next height.
    Decided(Decision),
    /// A member signed two different proposals or votes for one round: the proof, for
    /// the driver to act on (as on a failed re-run: its trust reset, its seat lost).
    Equivocation(Box<Equivocation>),
}

/// Two messages one member signed for the same height, round and kind (proposal,
/// prevote, precommit) with different values: checkable by anyone with the committee's
/// keys alone ([`Equivocation::culprit`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Equivocation {
    pub first: Message,
    pub second: Message,
}

/// Where two messages conflict: height, round, kind (0 proposal, 1 prevote, 2
/// precommit), signer.
type Slot = (Height, i64, u8, Address);

/// A message's slot, and what it says there.
fn slot(message: &Message) -> (Slot, Option<ValueId>) {
    match message {
        SignedConsensusMsg::Proposal(p) => {
            let p = &p.message;
            (
                (p.height, p.round.as_i64(), 0, p.proposer),
                Some(mt::Value::id(&p.value)),
            )
        }
        SignedConsensusMsg::Vote(v) => {
            let v = &v.message;
            let kind = match v.kind {
                VoteType::Prevote => 1,
                VoteType::Precommit => 2,
            };
            let value = match v.value {
                NilOrVal::Nil => None,
                NilOrVal::Val(id) => Some(id),
            };
            ((v.height, v.round.as_i64(), kind, v.voter), value)
        }
    }
}

/// The value a signed proposal carries.
pub fn proposal_value(proposal: &SignedMessage<Ctx, Proposal>) -> &Value {
    &proposal.message.value
}

/// The height `message` is for.
pub fn message_height(message: &Message) -> Height {
    slot(message).0.0
}

/// The round `message` is for (-1: none).
pub fn message_round(message: &Message) -> i64 {
    slot(message).0.1
}

/// The member who signed `message` (by its own word: [`Peer::receive`] checks).
pub fn message_signer(message: &Message) -> Address {
    slot(message).0.3
}

/// Whether `message` is signed by the member it names.
fn signed_by_its_member(message: &Message, committee: &Committee) -> bool {
    let ((_, _, _, who), _) = slot(message);
    let Some(member) = mt::ValidatorSet::get_by_address(committee, &who) else {
        return false;
    };
    match message {
        SignedConsensusMsg::Proposal(p) => verified(
            &ConsensusMsg::Proposal(p.message.clone()),
            &p.signature,
            &member.key,
        ),
        SignedConsensusMsg::Vote(v) => verified(
            &ConsensusMsg::Vote(v.message.clone()),
            &v.signature,
            &member.key,
        ),
    }
}

impl Equivocation {
    /// The member who signed both, if this is a proof: the same height, round, kind and
    /// signer, different values, and both signatures that member's.
    pub fn culprit(&self, committee: &Committee) -> Option<Address> {
        let (a, va) = slot(&self.first);
        let (b, vb) = slot(&self.second);
        let proof = a == b
            && va != vb
            && signed_by_its_member(&self.first, committee)
            && signed_by_its_member(&self.second, committee);
        proof.then_some(a.3)
    }
}

/// How long each step waits, growing with the round so that a slow network catches up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub propose_ms: u64,
    pub vote_ms: u64,
    /// Added per round.
    pub step_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            propose_ms: 3_000,
            vote_ms: 1_000,
            step_ms: 500,
        }
    }
}

impl Timeouts {
    /// How long after it is scheduled `timeout` fires.
    pub fn duration_ms(&self, timeout: Timeout) -> u64 {
        let base = match timeout.kind {
            TimeoutKind::Propose => self.propose_ms,
            TimeoutKind::Prevote | TimeoutKind::Precommit => self.vote_ms,
            // Soon enough that a peer that finished the run (it lingers a few seconds to
            // answer) still hears a member that missed the last decision.
            TimeoutKind::Rebroadcast => 2 * self.vote_ms,
        };
        let round = timeout.round.as_i64().max(0) as u64;
        base.saturating_add(self.step_ms.saturating_mul(round))
    }
}

/// Why a step failed: Malachite's error, as text (a driver's bug or a peer's message it
/// refused).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("agreement: {0}")]
pub struct AgreeError(pub String);

/// One committee member's agreement state.
pub struct Peer {
    key: SigningKey,
    committee: Committee,
    seed: u64,
    state: State<Ctx>,
    /// The values of proposals for this height and the next, by height and id (at
    /// most [`VALUES_MAX`]): each signed by its round's drawn proposer.
    values: BTreeMap<(Height, ValueId), Value>,
    /// What each member signed for each slot (height, round, kind) of this height and
    /// the next, with the message: a second, different one is an equivocation.
    seen: BTreeMap<Slot, (Option<ValueId>, Message)>,
    /// The one rebroadcast timer acted on, by height and round. Malachite asks for one
    /// at each round's start and each vote, and again each time one fires; only the
    /// newest is scheduled and only it re-sends this peer's votes (a vote lost on the
    /// way, when the quorum needs every live member's, would otherwise stall the height).
    rebroadcast: Option<(Height, Round)>,
}

impl Peer {
    /// A member of `committee` signing with `key`, in the run seeded `seed`, at height 1
    /// once [`Peer::start`]ed. `None` if `key` is not a member.
    pub fn new(key: SigningKey, committee: Committee, seed: u64) -> Option<Peer> {
        let address = Address(key.verifying_key().to_bytes());
        mt::ValidatorSet::get_by_address(&committee, &address)?;
        Some(Peer::following(key, committee, seed))
    }

    /// A peer signing with `key` whether or not `committee` seats it: one without a
    /// seat follows the heights (it checks and learns the decisions) and votes on none
    /// until a committee of a later height ([`Peer::start_with`]) seats it.
    pub fn following(key: SigningKey, committee: Committee, seed: u64) -> Peer {
        let address = Address(key.verifying_key().to_bytes());
        let params = Params {
            initial_height: Height(1),
            initial_validator_set: committee.clone(),
            address,
            threshold_params: ThresholdParams::default(),
            value_payload: ValuePayload::ProposalOnly,
        };
        Peer {
            key,
            committee,
            seed,
            state: State::new(Ctx { seed }, params, 128),
            values: BTreeMap::new(),
            seen: BTreeMap::new(),
            rebroadcast: None,
        }
    }

    pub fn address(&self) -> Address {
        Address(self.key.verifying_key().to_bytes())
    }

    /// The height this peer is on.
    pub fn height(&self) -> Height {
        self.state.height()
    }

    /// Starts `height` (1, then each after a decision) with the same committee.
    pub fn start(&mut self, height: Height) -> Result<Vec<Action>, AgreeError> {
        let committee = self.committee.clone();
        self.start_with(height, committee)
    }

    /// Starts `height` with `committee` (whoever the certified chain seats for it; this
    /// peer follows without voting when it holds no seat).
    pub fn start_with(
        &mut self,
        height: Height,
        committee: Committee,
    ) -> Result<Vec<Action>, AgreeError> {
        self.values.retain(|(h, _), _| *h >= height);
        self.seen.retain(|(h, ..), _| *h >= height);
        self.committee = committee;
        self.step(Input::StartHeight(height, self.committee.clone()))
    }

    /// The committee of the height this peer is on.
    pub fn committee(&self) -> &Committee {
        &self.committee
    }

    /// A message from another member. A proposal whose value `valid` refuses (the
    /// driver re-executed it and the hash differs, or it is malformed) is dropped: this
    /// peer then votes nil when its propose timeout fires.
    pub fn receive(
        &mut self,
        message: Message,
        valid: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Action>, AgreeError> {
        match message {
            SignedConsensusMsg::Vote(v) => {
                let evidence = self.witness(&SignedConsensusMsg::Vote(v.clone()));
                let mut actions = self.step(Input::Vote(v))?;
                actions.extend(evidence);
                Ok(actions)
            }
            SignedConsensusMsg::Proposal(p) => {
                let proposal = &p.message;
                let value = &proposal.value;
                // Only a proposal signed by its round's proposer, for this height or the
                // next, of a valid value, is kept and voted on.
                let current = self.height();
                let proposer = self
                    .committee
                    .proposer(self.seed, proposal.height, proposal.round);
                let genuine = proposal.proposer == proposer
                    && mt::ValidatorSet::get_by_address(&self.committee, &proposer).is_some_and(
                        |m| {
                            verified(
                                &ConsensusMsg::Proposal(proposal.clone()),
                                &p.signature,
                                &m.key,
                            )
                        },
                    );
                let near = proposal.height >= current && proposal.height.0 <= current.0 + 1;
                let bounded = value.accepted.len() <= ACCEPTED_MAX
                    && value.updates.len() <= ACCEPTED_MAX
                    && value.evidence.len() <= EVIDENCE_MAX;
                if !genuine || !near || !bounded || !valid(value) {
                    return Ok(Vec::new());
                }
                self.remember(proposal.height, value.clone());
                let evidence = self.witness(&SignedConsensusMsg::Proposal(p.clone()));
                let mut actions = self.step(Input::Proposal(p))?;
                actions.extend(evidence);
                Ok(actions)
            }
        }
    }

    /// The value this peer proposes for `height`, `round` (after
    /// [`Action::BuildValue`]).
    pub fn propose(
        &mut self,
        height: Height,
        round: Round,
        value: Value,
    ) -> Result<Vec<Action>, AgreeError> {
        self.remember(height, value.clone());
        self.step(Input::Propose(LocallyProposedValue::new(
            height, round, value,
        )))
    }

    /// Whether `timeout` is the rebroadcast timer this peer acts on (the height has
    /// gone on without a decision for a while: its driver may ask for the chain too).
    pub fn rebroadcasting(&self, timeout: Timeout) -> bool {
        timeout.kind == TimeoutKind::Rebroadcast
            && self.rebroadcast == Some((self.height(), timeout.round))
    }

    /// A timer the driver started ([`Action::Schedule`]) fired.
    pub fn timeout(&mut self, timeout: Timeout) -> Result<Vec<Action>, AgreeError> {
        if timeout.kind == TimeoutKind::Rebroadcast {
            // One a newer one replaced (or of a height left): nothing to do.
            if !self.rebroadcasting(timeout) {
                return Ok(Vec::new());
            }
            self.rebroadcast = None;
        }
        self.step(Input::TimeoutElapsed(timeout))
    }

    /// Records what `message` says for its slot if it is signed by its member, for this
    /// height or the next (at most [`SEEN_MAX`] slots); a second, different message for
    /// a slot is an equivocation.
    fn witness(&mut self, message: &Message) -> Option<Action> {
        let (key, value) = slot(message);
        let current = self.height();
        if key.0 < current
            || key.0.0 > current.0 + 1
            || !signed_by_its_member(message, &self.committee)
        {
            return None;
        }
        match self.seen.get(&key) {
            Some((seen, first)) if *seen != value => {
                Some(Action::Equivocation(Box::new(Equivocation {
                    first: first.clone(),
                    second: message.clone(),
                })))
            }
            Some(_) => None,
            None => {
                if self.seen.len() < SEEN_MAX {
                    self.seen.insert(key, (value, message.clone()));
                }
                None
            }
        }
    }

    /// `proposal` signed by this peer with `value` instead: what an equivocating
    /// proposer sends (the simulators' dishonest peers: this crate's and `peer`'s).
    pub fn resigned(&self, proposal: &Message, value: Value) -> Option<Message> {
        let SignedConsensusMsg::Proposal(p) = proposal else {
            return None;
        };
        let other = Proposal {
            value,
            ..p.message.clone()
        };
        let signature = self.key.sign(&proposal_bytes(&other));
        Some(SignedConsensusMsg::Proposal(SignedMessage::new(
            other,
            Sig(signature.to_bytes()),
        )))
    }

    fn remember(&mut self, height: Height, value: Value) {
        if self.values.len() < VALUES_MAX {
            self.values.insert((height, mt::Value::id(&value)), value);
        }
    }

    fn step(&mut self, input: Input<Ctx>) -> Result<Vec<Action>, AgreeError> {
        let mut actions = Vec::new();
        let key = self.key.clone();
        let committee = self.committee.clone();
        let values = &self.values;
        // The height timers are scheduled for (a new height's first round starts here).
        let mut height = self.state.driver.height();
        let rebroadcast = &mut self.rebroadcast;
        let metrics = ();
        let result: Result<(), mc::Error<Ctx>> = process!(
            input: input,
            state: &mut self.state,
            metrics: &metrics,
            with: effect => {
                let resumed: Result<mc::Resume<Ctx>, AgreeError> = Ok(match effect {
                    Effect::ResetTimeouts(r) | Effect::CancelAllTimeouts(r) => r.resume_with(()),
                    // A timeout that fires late is ignored by the state machine (another
                    // round, or a step already left), so cancelling is the driver's
                    // choice, not a duty.
                    Effect::CancelTimeout(_, r) => r.resume_with(()),
                    Effect::ScheduleTimeout(timeout, r) => {
                        if timeout.kind != TimeoutKind::Rebroadcast {
                            actions.push(Action::Schedule(timeout));
                        } else if *rebroadcast != Some((height, timeout.round)) {
                            *rebroadcast = Some((height, timeout.round));
                            actions.push(Action::Schedule(timeout));
                        }
                        r.resume_with(())
                    }
                    Effect::StartRound(h, _, _, _, r) => {
                        height = h;
                        r.resume_with(())
                    }
                    Effect::GetValidatorSet(_, r) => r.resume_with(Some(committee.clone())),
                    Effect::GetValue(height, round, _, r) => {
                        actions.push(Action::BuildValue { height, round });
                        r.resume_with(())
                    }
                    Effect::PublishConsensusMsg(message, r) => {
                        actions.push(Action::Broadcast(message));
                        r.resume_with(())
                    }
                    // This peer's last votes again, as the rebroadcast timer fires.
                    Effect::RepublishVote(vote, r) => {
                        actions.push(Action::Broadcast(SignedConsensusMsg::Vote(vote)));
                        r.resume_with(())
                    }
                    // Round certificates are not on this crate's wire: the votes they
                    // gather are rebroadcast one by one instead.
                    Effect::PublishLivenessMsg(_, r)
                    | Effect::RepublishRoundCertificate(_, r) => r.resume_with(()),
                    Effect::RestreamProposal(.., r)
                    | Effect::SyncValue(_, r)
                    | Effect::WalAppend(_, r) => r.resume_with(()),
                    Effect::Decide(certificate, _, r) => {
                        match values.get(&(certificate.height, certificate.value_id)) {
                            Some(value) => actions.push(Action::Decided(Decision {
                                height: certificate.height,
                                round: certificate.round,
                                value: value.clone(),
                                certificate: certificate.clone(),
                            })),
                            None => {
                                return Err(AgreeError(format!(
                                    "decided value {} was never seen",
                                    certificate.value_id
                                )));
                            }
                        }
                        r.resume_with(())
                    }
                    Effect::SignVote(vote, r) => {
                        let signature = key.sign(&vote_bytes(&vote));
                        r.resume_with(SignedMessage::new(vote, Sig(signature.to_bytes())))
                    }
                    Effect::SignProposal(proposal, r) => {
                        let signature = key.sign(&proposal_bytes(&proposal));
                        r.resume_with(SignedMessage::new(proposal, Sig(signature.to_bytes())))
                    }
                    Effect::VerifySignature(signed, key, r) => {
                        r.resume_with(verified(&signed.message, &signed.signature, &key))
                    }
                    // Certificates arrive only through sync, which this slice does not
                    // use: refused rather than trusted.
                    Effect::VerifyCommitCertificate(certificate, _, _, r) => {
                        r.resume_with(commit_certified(&certificate, &committee))
                    }
                    Effect::VerifyPolkaCertificate(.., r) => r.resume_with(Err(unverified(&committee))),
                    Effect::VerifyRoundCertificate(.., r) => r.resume_with(Err(unverified(&committee))),
                    Effect::ExtendVote(.., r) => r.resume_with(None),
                    Effect::VerifyVoteExtension(.., r) => r.resume_with(Ok(())),
                });
                resumed
            }
        );
        result.map_err(|e| AgreeError(format!("{e:?}")))?;
        Ok(actions)
    }
}
