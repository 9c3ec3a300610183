//! The volunteer worker: an identity ([`identity`]), a [`Transport`] to a coordinator
//! ([`HttpTransport`] today), and the lease loop ([`run`]): lease a unit, fetch its base
//! model, train H steps on the data the unit names, send the signed, compressed delta,
//! and report the verdict.

pub mod identity;
mod run;
mod transport;
pub mod unit;

pub use run::{Reporter, Summary, WorkerError, WorkerOptions, run};
pub use transport::{HttpTransport, Refusal, Transport, TransportError};
