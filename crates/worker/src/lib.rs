//! The volunteer worker: an identity ([`identity`]), a [`Transport`] to a coordinator
//! ([`HttpTransport`] today), and the lease loop ([`run`]): lease a unit, fetch its base
//! model, train H steps on the data the unit names, send the signed, compressed delta,
//! and report the verdict.

mod heartbeat;
#[cfg(feature = "http")]
mod http;
pub mod identity;
mod run;
pub mod setup;
mod transport;
pub mod unit;

#[cfg(feature = "http")]
pub use http::{BUSY_RETRY_AFTER_MAX, BUSY_RETRY_DEFAULT, HttpTransport};
pub use run::{BUSY_WAIT_MAX, Reporter, Summary, WorkerError, WorkerOptions, run};
pub use transport::{
    BASE_BYTES_MAX, CORPUS_BYTES_MAX, JSON_REPLY_BYTES_MAX, MODEL_BYTES_MAX, Refusal,
    TOKENIZER_BYTES_MAX, Transport, TransportError,
};
