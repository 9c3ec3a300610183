//! A [`peer::Node`] on a real clock over a [`Transport`]: messages decoded and handed
//! in, the node's timers kept in order, its units trained on a blocking thread (one at
//! a time, its unit of the round before any check; one the node no longer holds is
//! dropped before it starts), its sends encoded once and queued for each member.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use peer::{Node, Out, Timer};
use protocol::{WorkUnit, WorkerId};
use rand::Rng;
use tokio::time::Instant;

use crate::{MeshError, Transport};

/// Trains a unit from its base version's floats: the worker's function, on the peer's
/// backend.
pub type Train = Box<dyn FnMut(&WorkUnit, &[f32]) -> Result<Vec<f32>, String> + Send>;

/// Called with the node each time it certifies a version (a demo's table, metrics).
pub type OnVersion = Box<dyn FnMut(&Node) + Send>;

/// What a peer sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub messages: u64,
    pub bytes: u64,
    /// Bytes by kind of message: votes and proposals, updates, `Want`s, chain requests,
    /// chains.
    pub by_kind: [u64; 5],
}

/// The index of `message`'s kind in [`Traffic::by_kind`].
fn kind(message: &peer::Message) -> usize {
    match message {
        peer::Message::Agree { .. } => 0,
        peer::Message::Update(_) => 1,
        peer::Message::Want(_) => 2,
        peer::Message::ChainRequest { .. } => 3,
        peer::Message::Chain(_) => 4,
    }
}

/// How long a peer that reached its last version stays to answer members still on it
/// (the updates a proposal names, the chain), training nothing: without it, the last
/// member to certify may find everyone gone. A member that missed the last decision asks
/// for the chain at its second rebroadcast, 4 s or more into its round (`peer::Node`).
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `node` over `transport` until its replica reaches version `until`, and
/// [`LINGER`] after (or until the transport closes). `members` are who a broadcast goes
/// to.
pub async fn run<T: Transport>(
    mut node: Node,
    mut transport: T,
    members: Vec<WorkerId>,
    mut train: Train,
    until: u64,
    mut on_version: OnVersion,
) -> Result<(Node, Traffic), MeshError> {
    let mut traffic = Traffic::default();
    let mut version = node.replica().version();
    let update_max = node.spec().update_bytes();
    let mut timers: BTreeMap<(Instant, u64), Timer> = BTreeMap::new();
    let mut sequence = 0u64;
    let (trained_tx, mut trained_rx) =
        tokio::sync::mpsc::channel::<(WorkUnit, Result<Vec<f32>, String>, Train)>(1);
    // At most a unit and a check: what the node holds now.
    let mut training: VecDeque<(WorkUnit, Arc<Vec<f32>>)> = VecDeque::new();
    let mut busy = false;
    // When the peer leaves, once it reached `until`.
    let mut done: Option<Instant> = None;
    node.stop_at(until);
    let mut outs = node.start()?;
    loop {
        for out in outs.drain(..) {
            match out {
                Out::Broadcast(message) => {
                    let bytes = Arc::new(peer::wire::to_bytes(&message));
                    for member in members.iter().filter(|m| **m != node.id()) {
                        traffic.messages += 1;
                        traffic.bytes += bytes.len() as u64;
                        traffic.by_kind[kind(&message)] += bytes.len() as u64;
                        transport.send(*member, bytes.clone());
                    }
                }
                Out::Send { to, message } => {
                    let bytes = peer::wire::to_bytes(&message);
                    traffic.messages += 1;
                    traffic.bytes += bytes.len() as u64;
                    traffic.by_kind[kind(&message)] += bytes.len() as u64;
                    transport.send(to, Arc::new(bytes));
                }
                Out::Schedule { after_ms, timer } => {
                    sequence += 1;
                    let at = Instant::now() + std::time::Duration::from_millis(after_ms);
                    timers.insert((at, sequence), timer);
                }
                Out::Train { unit, base } => {
                    // The round's unit goes ahead of a check still waiting: the round
                    // waits for units, not for re-runs.
                    if !training.iter().any(|(u, _)| *u == unit) {
                        if node.replica().unit_of(&node.id()) == Some(&unit) {
                            training.push_front((unit, base));
                        } else {
                            training.push_back((unit, base));
                        }
                    }
                }
            }
        }
        if node.replica().version() != version {
            version = node.replica().version();
            on_version(&node);
        }
        if version >= until && done.is_none() {
            done = Some(Instant::now() + LINGER);
        }
        // What the node no longer holds (a version left behind) is not started.
        let replica = node.replica();
        training.retain(|(u, _)| {
            done.is_none()
                && (replica.unit_of(&node.id()) == Some(u)
                    || replica.check_of(&node.id()) == Some(u))
        });
        if !busy && let Some((unit, base)) = training.pop_front() {
            busy = true;
            let tx = trained_tx.clone();
            let mut job = std::mem::replace(&mut train, Box::new(|_, _| Err("in use".into())));
            tokio::task::spawn_blocking(move || {
                let delta = job(&unit, &base);
                let _ = tx.blocking_send((unit, delta, job));
            });
        }
        let next_timer = timers.keys().next().map(|(at, _)| *at);
        tokio::select! {
            received = transport.recv() => {
                let Some((from, bytes)) = received else {
                    return Ok((node, traffic));
                };
                // A message that does not decode is dropped: a member's bug or a hostile one.
                // Once done, the peer only answers: it takes no part in a later height.
                let message = peer::wire::from_bytes(&bytes, update_max).ok().filter(|m| {
                    done.is_none()
                        || matches!(
                            m,
                            peer::Message::Want(_) | peer::Message::ChainRequest { .. }
                        )
                });
                if let Some(message) = message {
                    outs = match node.receive(from, message) {
                        Ok(outs) => outs,
                        // What another member sent that the agreement refused (a vote it
                        // cannot take, a message of a height long past): that message
                        // goes, the peer stays. A certified version this peer cannot
                        // reproduce, or its run refusing its own state, is fatal.
                        Err(e @ (peer::PeerError::Agree(_) | peer::PeerError::Invalid(_))) => {
                            tracing::warn!(peer = %from, "a message refused: {e}");
                            Vec::new()
                        }
                        Err(e) => return Err(e.into()),
                    };
                }
            }
            Some((unit, delta, job)) = trained_rx.recv() => {
                train = job;
                busy = false;
                let delta = delta.map_err(|e| MeshError::Train(format!("unit {}: {e}", unit.id)))?;
                // A unit of a height past the last (started before it) is not sent.
                if done.is_none() {
                    outs = node.trained(&unit, &delta, rand::rng().random())?;
                }
            }
            () = sleep_until(done) => {
                transport.shutdown().await;
                return Ok((node, traffic));
            }
            () = sleep_until(next_timer) => {
                if let Some(((_, _), timer)) = timers.pop_first()
                    && done.is_none()
                {
                    outs = node.timer(timer)?;
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
