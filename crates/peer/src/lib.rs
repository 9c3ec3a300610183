//! A run with no coordinator (issue 18): every peer holds the run core ([`run::Run`],
//! unchanged) as a [`Replica`], trains the unit it leases itself, and agrees with the
//! others on each next version through [`agree`], voting for a proposed value only after
//! re-executing it bit for bit.
//!
//! [`Node`] is one peer, pure (messages and timers in, sends and training out);
//! [`local`] runs several in one process from one seed, training the tiny model for
//! real, with dishonest proposers and a late joiner. The networked driver comes next.

pub mod audit;
pub mod local;
pub mod node;
pub mod replica;
pub mod wire;

pub use node::{Behaviour, Certified, Message, Node, Out, Timer, Timings};
pub use replica::{Executed, Replica, RunSpec, SEAT_WINDOW, Tally, version_hash};

/// Why a peer's step failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// What a peer was handed cannot make a version (a malformed update in a value, a
    /// round that accepted nothing) or is not a run (the spec, a key).
    #[error("{0}")]
    Invalid(&'static str),
    /// A certified value that this peer's own execution does not reproduce: its replica
    /// is not the committee's (a bug, or a build that computes differently).
    #[error("height {height} was certified with a value this peer does not compute")]
    Diverged { height: u64 },
    #[error(transparent)]
    Run(#[from] run::RunError),
    #[error(transparent)]
    Agree(#[from] agree::AgreeError),
    #[error(transparent)]
    Aggregation(#[from] aggregation::AggregationError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Worker(#[from] worker::WorkerError),
    #[error(transparent)]
    Core(#[from] runner::CoreError),
    /// A local run that did not finish its heights in time: the seed reproduces it.
    #[error("seed {seed}: {what}")]
    Stalled { seed: u64, what: String },
}
