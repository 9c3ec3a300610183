//! A peer's [`Message`] as bytes: a kind byte, then its fields, counts and lengths before
//! lists and byte strings, each bounded before anything is allocated (an update at most
//! `update_max` bytes, the run's exact update size; a message at most
//! [`MESSAGE_BYTES_MAX`]). Signatures are checked by the node, not here.

use std::sync::Arc;

use agree::wire::{self, Reader, WireError};

use crate::node::{CHAIN_MAX, Certified, Message};

/// Most bytes one message takes (a chain message is cut to fit).
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Most updates one message carries: a proposal names at most one a member's unit and
/// one a member's check.
const UPDATES_MAX: usize = 2 * agree::COMMITTEE_MAX;

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend((bytes.len() as u32).to_le_bytes());
    out.extend(bytes);
}

fn put_updates(out: &mut Vec<u8>, updates: &[Arc<Vec<u8>>]) {
    out.extend((updates.len() as u32).to_le_bytes());
    for u in updates {
        put_bytes(out, u);
    }
}

fn bytes<'a>(r: &mut Reader<'a>, max: usize) -> Result<&'a [u8], WireError> {
    let n = r.count(max)?;
    r.take(n)
}

fn updates(r: &mut Reader<'_>, update_max: usize) -> Result<Vec<Arc<Vec<u8>>>, WireError> {
    let n = r.count(UPDATES_MAX)?;
    (0..n)
        .map(|_| Ok(Arc::new(bytes(r, update_max)?.to_vec())))
        .collect()
}

/// `message` as bytes.
pub fn to_bytes(message: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    match message {
        Message::Agree { message, updates } => {
            out.push(0);
            put_bytes(&mut out, &wire::message_to_bytes(message));
            put_updates(&mut out, updates);
        }
        Message::Update(update) => {
            out.push(1);
            put_bytes(&mut out, update);
        }
        Message::Want(addresses) => {
            out.push(4);
            out.extend((addresses.len() as u32).to_le_bytes());
            for a in addresses {
                out.extend(a);
            }
        }
        Message::ChainRequest { from } => {
            out.push(2);
            out.extend(from.to_le_bytes());
        }
        Message::Chain(chain) => {
            out.push(3);
            out.extend((chain.len() as u32).to_le_bytes());
            for c in chain {
                put_bytes(&mut out, &wire::decision_to_bytes(&c.decision));
                put_updates(&mut out, &c.updates);
            }
        }
    }
    out
}

/// A message from its bytes; `update_max` bounds each update it carries.
pub fn from_bytes(bytes: &[u8], update_max: usize) -> Result<Message, WireError> {
    if bytes.len() > MESSAGE_BYTES_MAX {
        return Err(WireError("a message past its bound"));
    }
    let mut r = Reader(bytes);
    let message = match r.u8()? {
        0 => {
            let agree = wire::message_from_bytes(self::bytes(&mut r, MESSAGE_BYTES_MAX)?)?;
            Message::Agree {
                message: Box::new(agree),
                updates: updates(&mut r, update_max)?,
            }
        }
        1 => Message::Update(Arc::new(self::bytes(&mut r, update_max)?.to_vec())),
        2 => Message::ChainRequest { from: r.u64()? },
        3 => {
            let n = r.count(CHAIN_MAX)?;
            let chain = (0..n)
                .map(|_| {
                    let mut d = Reader(self::bytes(&mut r, MESSAGE_BYTES_MAX)?);
                    let decision = wire::decision_from_bytes(&mut d)?;
                    d.done()?;
                    Ok(Certified {
                        decision,
                        updates: updates(&mut r, update_max)?,
                    })
                })
                .collect::<Result<_, WireError>>()?;
            Message::Chain(chain)
        }
        4 => {
            let n = r.count(UPDATES_MAX)?;
            Message::Want((0..n).map(|_| r.array()).collect::<Result<_, _>>()?)
        }
        _ => return Err(WireError("an unknown peer message")),
    };
    r.done()?;
    Ok(message)
}
