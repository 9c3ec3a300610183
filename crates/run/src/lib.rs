//! What a training run decides, as values with no IO, no clock and no randomness of their
//! own: the driver (the HTTP coordinator, the simulator through it, later a peer-to-peer
//! node) reads the store and the clock, hands the facts in, and persists what comes out.
//!
//! This crate grows in slices (issue 15). Today it owns [`Acceptance`]: every rule that
//! decides whether an update is accepted beyond `validation`'s stateless checks (the
//! median-norm bar over this round and the last, the byte-equal copy, the score against
//! the version's median gain, agreement between two workers' byte-equal refusals), with
//! the state those rules keep. Scheduling is still `scheduler`, driven by the
//! coordinator's core.

pub mod acceptance;
pub mod checks;
pub mod credit;
pub mod error;
pub mod replicas;
pub mod state;
#[cfg(test)]
mod testing;
pub mod tier;

pub use acceptance::{Acceptance, Decision, Rules};
pub use checks::{CheckRules, ReplayClass, Sample, SpotChecks, draw};
pub use error::{Class, RunError};
pub use replicas::{PENDING_CHECKS_MAX, ReplicaRules, Replicas};
pub use state::{Accepted, Decided, Input, Output, Replica, Run, Settings};
pub use tier::Tier;
