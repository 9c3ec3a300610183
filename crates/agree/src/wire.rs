//! Proposals, votes and certified decisions as bytes, for a networked driver. Fixed-width
//! little-endian fields, counts before lists, every count bounded before anything is
//! allocated, and nothing left over: a decoded message re-encodes to the same bytes.
//! Decoding checks no signature ([`crate::Peer::receive`] and
//! [`crate::Committee::certifies`] do).

use informalsystems_malachitebft_core_types::{
    self as mt, NilOrVal, Round, SignedMessage, VoteType,
};

use crate::{
    ACCEPTED_MAX, Address, COMMITTEE_MAX, Certificate, Counted, Decision, EVIDENCE_BYTES_MAX,
    EVIDENCE_MAX, Equivocation, Height, Message, Proposal, Sig, Value, ValueId, Vote,
};

/// Why bytes are not a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not an agreement message: {0}")]
pub struct WireError(pub &'static str);

/// Reads fields off the front of a byte slice.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError("cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of at most `max` items.
    pub fn count(&mut self, max: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError("a count past its bound"));
        }
        Ok(n)
    }

    /// Whether every byte was read.
    pub fn done(&self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError("bytes past the end"))
        }
    }
}

fn read_round(r: &mut Reader<'_>) -> Result<Round, WireError> {
    match r.u64()? as i64 {
        -1 => Ok(Round::Nil),
        n => u32::try_from(n)
            .map(Round::new)
            .map_err(|_| WireError("a round out of range")),
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    out.extend(v.base_version.to_le_bytes());
    out.extend((v.updates.len() as u32).to_le_bytes());
    for u in &v.updates {
        out.extend(u);
    }
    out.extend((v.accepted.len() as u32).to_le_bytes());
    for c in &v.accepted {
        out.extend(c.unit.to_le_bytes());
        out.extend(c.weight.to_le_bytes());
    }
    out.extend((v.evidence.len() as u32).to_le_bytes());
    for e in &v.evidence {
        out.extend((e.len() as u32).to_le_bytes());
        out.extend(e);
    }
    out.extend(v.version_hash);
}

fn value(r: &mut Reader<'_>) -> Result<Value, WireError> {
    let base_version = r.u64()?;
    let n = r.count(ACCEPTED_MAX)?;
    let updates = (0..n).map(|_| r.array()).collect::<Result<_, _>>()?;
    let n = r.count(ACCEPTED_MAX)?;
    let accepted = (0..n)
        .map(|_| {
            Ok(Counted {
                unit: r.u64()?,
                weight: r.u64()?,
            })
        })
        .collect::<Result<_, _>>()?;
    let n = r.count(EVIDENCE_MAX)?;
    let evidence = (0..n)
        .map(|_| {
            let len = r.count(EVIDENCE_BYTES_MAX)?;
            Ok(r.take(len)?.to_vec())
        })
        .collect::<Result<_, WireError>>()?;
    Ok(Value {
        base_version,
        updates,
        accepted,
        evidence,
        version_hash: r.array()?,
    })
}

/// A signed proposal or vote as bytes.
pub fn message_to_bytes(message: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    match message {
        Message::Proposal(p) => {
            let m = &p.message;
            out.push(0);
            out.extend(m.height.0.to_le_bytes());
            out.extend(m.round.as_i64().to_le_bytes());
            out.extend(m.pol_round.as_i64().to_le_bytes());
            out.extend(m.proposer.0);
            put_value(&mut out, &m.value);
            out.extend(p.signature.0);
        }
        Message::Vote(v) => {
            let m = &v.message;
            out.push(1);
            out.push(match m.kind {
                VoteType::Prevote => 0,
                VoteType::Precommit => 1,
            });
            out.extend(m.height.0.to_le_bytes());
            out.extend(m.round.as_i64().to_le_bytes());
            match &m.value {
                NilOrVal::Nil => out.push(0),
                NilOrVal::Val(id) => {
                    out.push(1);
                    out.extend(id.0);
                }
            }
            out.extend(m.voter.0);
            out.extend(v.signature.0);
        }
    }
    out
}

/// A message from its bytes (signatures unchecked).
pub fn message_from_bytes(bytes: &[u8]) -> Result<Message, WireError> {
    let mut r = Reader(bytes);
    let message = match r.u8()? {
        0 => {
            let height = Height(r.u64()?);
            let round = read_round(&mut r)?;
            let pol_round = read_round(&mut r)?;
            let proposer = Address(r.array()?);
            let value = value(&mut r)?;
            let proposal = Proposal {
                height,
                round,
                value,
                pol_round,
                proposer,
            };
            Message::Proposal(SignedMessage::new(proposal, Sig(r.array()?)))
        }
        1 => {
            let kind = match r.u8()? {
                0 => VoteType::Prevote,
                1 => VoteType::Precommit,
                _ => return Err(WireError("an unknown vote kind")),
            };
            let height = Height(r.u64()?);
            let round = read_round(&mut r)?;
            let value = match r.u8()? {
                0 => NilOrVal::Nil,
                1 => NilOrVal::Val(ValueId(r.array()?)),
                _ => return Err(WireError("an unknown vote value")),
            };
            let vote = Vote {
                kind,
                height,
                round,
                value,
                voter: Address(r.array()?),
            };
            Message::Vote(SignedMessage::new(vote, Sig(r.array()?)))
        }
        _ => return Err(WireError("an unknown message kind")),
    };
    r.done()?;
    Ok(message)
}

/// A certified decision as bytes.
pub fn decision_to_bytes(decision: &Decision) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(decision.height.0.to_le_bytes());
    out.extend(decision.round.as_i64().to_le_bytes());
    put_value(&mut out, &decision.value);
    let c = &decision.certificate;
    out.extend(c.height.0.to_le_bytes());
    out.extend(c.round.as_i64().to_le_bytes());
    out.extend(c.value_id.0);
    out.extend((c.commit_signatures.len() as u32).to_le_bytes());
    for s in &c.commit_signatures {
        out.extend(s.address.0);
        out.extend(s.signature.0);
    }
    out
}

/// A decision from its bytes (its certificate unchecked: [`crate::Committee::certifies`]).
pub fn decision_from_bytes(r: &mut Reader<'_>) -> Result<Decision, WireError> {
    let height = Height(r.u64()?);
    let round = read_round(r)?;
    let value = value(r)?;
    let c_height = Height(r.u64()?);
    let c_round = read_round(r)?;
    let value_id = ValueId(r.array()?);
    let n = r.count(COMMITTEE_MAX)?;
    let commit_signatures = (0..n)
        .map(|_| {
            Ok(mt::CommitSignature::new(
                Address(r.array()?),
                Sig(r.array()?),
            ))
        })
        .collect::<Result<_, WireError>>()?;
    Ok(Decision {
        height,
        round,
        value,
        certificate: Certificate {
            height: c_height,
            round: c_round,
            value_id,
            commit_signatures,
        },
    })
}

/// A proof of equivocation as bytes: its two messages, each length-prefixed.
pub fn equivocation_to_bytes(proof: &Equivocation) -> Vec<u8> {
    let mut out = Vec::new();
    for m in [&proof.first, &proof.second] {
        let bytes = message_to_bytes(m);
        out.extend((bytes.len() as u32).to_le_bytes());
        out.extend(bytes);
    }
    out
}

/// A proof of equivocation from its bytes (whether it proves anything is
/// [`Equivocation::culprit`]'s to say).
pub fn equivocation_from_bytes(bytes: &[u8]) -> Result<Equivocation, WireError> {
    let mut r = Reader(bytes);
    let mut message = || {
        let len = r.count(EVIDENCE_BYTES_MAX)?;
        message_from_bytes(r.take(len)?)
    };
    let (first, second) = (message()?, message()?);
    r.done()?;
    Ok(Equivocation { first, second })
}
