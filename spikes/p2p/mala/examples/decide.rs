//! Spike: drive Malachite's IO-free core (informalsystems-malachitebft-core-consensus 0.5.0)
//! with 4 in-process validators, ed25519-dalek 2.2 signatures, and a hivetrain-like value,
//! until every node decides height 1. No tokio, no network, no clock: a message queue.
use std::collections::VecDeque;
use std::fmt;

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use informalsystems_malachitebft_core_consensus::{
    self as mc, process, Effect, Input, LocallyProposedValue, Params, Resumable, SignedConsensusMsg,
    State, ConsensusMsg,
};
use informalsystems_malachitebft_core_types::{
    self as mt, Context, NilOrVal, Round, SignedMessage, ThresholdParams, ValuePayload, VoteType,
    VotingPower,
};
use sha2::{Digest, Sha256};

// ---------------- hivetrain-shaped types ----------------
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Addr(pub [u8; 32]);
impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}{:02x}{:02x}{:02x}", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}
impl mt::Address for Addr {}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct H(pub u64);
impl fmt::Display for H {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { write!(f, "{}", self.0) }
}
impl mt::Height for H {
    const ZERO: Self = H(0);
    const INITIAL: Self = H(1);
    fn increment_by(&self, n: u64) -> Self { H(self.0 + n) }
    fn decrement_by(&self, n: u64) -> Option<Self> { self.0.checked_sub(n).map(H) }
    fn as_u64(&self) -> u64 { self.0 }
}

/// The proposal body: events seen, accepted updates (id, weight), hash of the new version.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RoundValue {
    pub events: Vec<Vec<u8>>,
    pub accepted: Vec<([u8; 32], u32)>,
    pub new_version: [u8; 32],
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VId(pub [u8; 32]);
impl fmt::Display for VId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}{:02x}{:02x}{:02x}", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}
impl mt::Value for RoundValue {
    type Id = VId;
    fn id(&self) -> VId {
        let mut h = Sha256::new();
        for e in &self.events { h.update((e.len() as u64).to_le_bytes()); h.update(e); }
        for (u, w) in &self.accepted { h.update(u); h.update(w.to_le_bytes()); }
        h.update(self.new_version);
        VId(h.finalize().into())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prop { h: H, r: Round, v: RoundValue, pol: Round, who: Addr }
impl mt::Proposal<Ctx> for Prop {
    fn height(&self) -> H { self.h }
    fn round(&self) -> Round { self.r }
    fn value(&self) -> &RoundValue { &self.v }
    fn take_value(self) -> RoundValue { self.v }
    fn pol_round(&self) -> Round { self.pol }
    fn validator_address(&self) -> &Addr { &self.who }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct V { t: VoteType, h: H, r: Round, v: NilOrVal<VId>, who: Addr, ext: Option<SignedMessage<Ctx, ()>> }
impl mt::Vote<Ctx> for V {
    fn height(&self) -> H { self.h }
    fn round(&self) -> Round { self.r }
    fn value(&self) -> &NilOrVal<VId> { &self.v }
    fn take_value(self) -> NilOrVal<VId> { self.v }
    fn vote_type(&self) -> VoteType { self.t }
    fn validator_address(&self) -> &Addr { &self.who }
    fn extension(&self) -> Option<&SignedMessage<Ctx, ()>> { self.ext.as_ref() }
    fn take_extension(&mut self) -> Option<SignedMessage<Ctx, ()>> { self.ext.take() }
    fn extend(mut self, e: SignedMessage<Ctx, ()>) -> Self { self.ext = Some(e); self }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part;
impl mt::ProposalPart<Ctx> for Part {
    fn is_first(&self) -> bool { true }
    fn is_last(&self) -> bool { true }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Val { addr: Addr, pk: VerifyingKey, power: VotingPower }
impl mt::Validator<Ctx> for Val {
    fn address(&self) -> &Addr { &self.addr }
    fn public_key(&self) -> &VerifyingKey { &self.pk }
    fn voting_power(&self) -> VotingPower { self.power }
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VSet(Vec<Val>);
impl mt::ValidatorSet<Ctx> for VSet {
    fn count(&self) -> usize { self.0.len() }
    fn total_voting_power(&self) -> VotingPower { self.0.iter().map(|v| v.power).sum() }
    fn get_by_address(&self, a: &Addr) -> Option<&Val> { self.0.iter().find(|v| &v.addr == a) }
    fn get_by_index(&self, i: usize) -> Option<&Val> { self.0.get(i) }
}

// ed25519-dalek 2.2 as the signing scheme (Signature wrapped: Malachite wants Ord).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sig(pub [u8; 64]);
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ed;
impl mt::SigningScheme for Ed {
    type DecodingError = String;
    type Signature = Sig;
    type PublicKey = VerifyingKey;
    type PrivateKey = SigningKey;
    fn decode_signature(b: &[u8]) -> Result<Sig, String> {
        b.try_into().map(Sig).map_err(|_| "bad len".to_string())
    }
    fn encode_signature(s: &Sig) -> Vec<u8> { s.0.to_vec() }
}

#[derive(Clone, Debug)]
pub struct Ctx;
impl Context for Ctx {
    type Address = Addr;
    type Height = H;
    type ProposalPart = Part;
    type Proposal = Prop;
    type Validator = Val;
    type ValidatorSet = VSet;
    type Value = RoundValue;
    type Vote = V;
    type Extension = ();
    type SigningScheme = Ed;
    fn select_proposer<'a>(&self, vs: &'a VSet, h: H, r: Round) -> &'a Val {
        // hivetrain would use its seeded committee draw here.
        let i = (h.0 as usize + r.as_i64().max(0) as usize) % vs.0.len();
        &vs.0[i]
    }
    fn new_proposal(&self, h: H, r: Round, v: RoundValue, pol: Round, who: Addr) -> Prop { Prop { h, r, v, pol, who } }
    fn new_prevote(&self, h: H, r: Round, v: NilOrVal<VId>, who: Addr) -> V { V { t: VoteType::Prevote, h, r, v, who, ext: None } }
    fn new_precommit(&self, h: H, r: Round, v: NilOrVal<VId>, who: Addr) -> V { V { t: VoteType::Precommit, h, r, v, who, ext: None } }
}

// Canonical bytes to sign (a real codec would be used in hivetrain).
fn vote_bytes(v: &V) -> Vec<u8> {
    let mut b = vec![b'v', v.t as u8];
    b.extend(v.h.0.to_le_bytes());
    b.extend(v.r.as_i64().to_le_bytes());
    match &v.v { NilOrVal::Nil => b.push(0), NilOrVal::Val(id) => { b.push(1); b.extend(id.0) } }
    b.extend(v.who.0);
    b
}
fn prop_bytes(p: &Prop) -> Vec<u8> {
    let mut b = vec![b'p'];
    b.extend(p.h.0.to_le_bytes());
    b.extend(p.r.as_i64().to_le_bytes());
    b.extend(p.pol.as_i64().to_le_bytes());
    b.extend(mt::Value::id(&p.v).0);
    b.extend(p.who.0);
    b
}

// ---------------- the in-process "simulator" ----------------
struct Node { key: SigningKey, state: State<Ctx>, decided: Option<(Round, VId)> }

fn main() {
    let t0 = std::time::Instant::now();
    let keys: Vec<SigningKey> = (0..4u8).map(|i| SigningKey::from_bytes(&[i + 1; 32])).collect();
    let mut vals: Vec<Val> = keys.iter().map(|k| {
        let pk = k.verifying_key();
        Val { addr: Addr(pk.to_bytes()), pk, power: 1 }
    }).collect();
    vals.sort_by(|a, b| a.addr.cmp(&b.addr));
    let vset = VSet(vals);
    let metrics = informalsystems_malachitebft_metrics::Metrics::default();

    let mut nodes: Vec<Node> = keys.into_iter().map(|key| {
        let addr = Addr(key.verifying_key().to_bytes());
        let params = Params {
            initial_height: H(1),
            initial_validator_set: vset.clone(),
            address: addr,
            threshold_params: ThresholdParams::default(),
            value_payload: ValuePayload::ProposalOnly,
        };
        Node { key, state: State::new(Ctx, params, 100), decided: None }
    }).collect();

    // Inbox of (destination node, input). Broadcast = push to every other node.
    let mut queue: VecDeque<(usize, Input<Ctx>)> = VecDeque::new();
    for i in 0..nodes.len() { queue.push_back((i, Input::StartHeight(H(1), vset.clone()))); }
    let mut steps = 0usize;
    let mut effects = 0usize;
    while let Some((i, input)) = queue.pop_front() {
        steps += 1;
        let n = nodes.len();
        let node = &mut nodes[i];
        let key = node.key.clone();
        let vs = vset.clone();
        let mut out: Vec<(usize, Input<Ctx>)> = Vec::new();
        let mut decided = None;
        let res: Result<(), mc::Error<Ctx>> = process!(
            input: input,
            state: &mut node.state,
            metrics: &metrics,
            with: effect => {
                effects += 1;
                let r: Result<mc::Resume<Ctx>, String> = Ok(match effect {
                    Effect::ResetTimeouts(r) | Effect::CancelAllTimeouts(r) => r.resume_with(()),
                    Effect::CancelTimeout(_, r) | Effect::ScheduleTimeout(_, r) => r.resume_with(()), // no timers needed on the happy path
                    Effect::GetValidatorSet(_, r) => r.resume_with(Some(vs.clone())),
                    Effect::StartRound(_, _, _, _, r) => r.resume_with(()),
                    Effect::GetValue(h, round, _, r) => {
                        // Proposer: hivetrain would run its pure round core here.
                        let v = RoundValue { events: vec![b"join:peer7".to_vec()], accepted: vec![([7; 32], 3)], new_version: [42; 32] };
                        out.push((i, Input::Propose(LocallyProposedValue::new(h, round, v))));
                        r.resume_with(())
                    }
                    Effect::PublishConsensusMsg(msg, r) => {
                        for j in 0..n { if j != i {
                            out.push((j, match msg.clone() {
                                SignedConsensusMsg::Vote(v) => Input::Vote(v),
                                SignedConsensusMsg::Proposal(p) => Input::Proposal(p),
                            }));
                        } }
                        r.resume_with(())
                    }
                    Effect::PublishLivenessMsg(_, r) | Effect::RepublishVote(_, r) | Effect::RepublishRoundCertificate(_, r) => r.resume_with(()),
                    Effect::RestreamProposal(.., r) | Effect::SyncValue(_, r) | Effect::WalAppend(_, r) => r.resume_with(()),
                    Effect::Decide(cert, _ext, r) => { decided = Some((cert.round, cert.value_id, cert.commit_signatures.len())); r.resume_with(()) }
                    Effect::SignVote(v, r) => { let s = key.sign(&vote_bytes(&v)); r.resume_with(SignedMessage::new(v, Sig(s.to_bytes()))) }
                    Effect::SignProposal(p, r) => { let s = key.sign(&prop_bytes(&p)); r.resume_with(SignedMessage::new(p, Sig(s.to_bytes()))) }
                    Effect::VerifySignature(sm, pk, r) => {
                        let bytes = match &sm.message { ConsensusMsg::Vote(v) => vote_bytes(v), ConsensusMsg::Proposal(p) => prop_bytes(p) };
                        let ok = pk.verify(&bytes, &ed25519_dalek::Signature::from_bytes(&sm.signature.0)).is_ok();
                        r.resume_with(ok)
                    }
                    Effect::VerifyCommitCertificate(.., r) | Effect::VerifyPolkaCertificate(.., r) | Effect::VerifyRoundCertificate(.., r) => r.resume_with(Ok(())),
                    Effect::ExtendVote(.., r) => r.resume_with(None),
                    Effect::VerifyVoteExtension(.., r) => r.resume_with(Ok(())),
                });
                r
            }
        );
        if let Err(e) = res { eprintln!("node {i}: error {e:?}"); }
        if let Some((r, id, sigs)) = decided {
            println!("node {i} decided height 1 round {} value {id} with {sigs} commit signatures", r.as_i64());
            node.decided = Some((r, id));
        }
        queue.extend(out);
    }
    let all = nodes.iter().filter(|n| n.decided.is_some()).count();
    println!("{all}/4 nodes decided; {steps} inputs, {effects} effects, {:?}", t0.elapsed());
    assert_eq!(all, 4);
}
