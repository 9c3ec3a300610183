//! How a worker talks to a coordinator. The lease loop sees only [`Transport`]; HTTP is
//! one implementation (a peer-to-peer one can follow).

use ed25519_dalek::SigningKey;
use protocol::api::{LeaseReply, RunInfo, SubmitReply};

/// The coordinator said no, with its code and sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// Why a call did not get an answer, or got a refusal.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Nothing came back (connection refused, reset, timeout): worth retrying.
    #[error("cannot reach the coordinator at {url}: {message}")]
    Unreachable { url: String, message: String },
    /// The coordinator answered that it is busy (503: `scorers_busy`, `uploads_busy`,
    /// `busy`): the same request succeeds later. It answered, so this is not counted as
    /// unreachable; the worker waits `retry_after` and asks again, for at most
    /// [`crate::BUSY_WAIT_MAX`].
    #[error("the coordinator at {url} is busy: {refusal}")]
    Busy {
        url: String,
        refusal: Refusal,
        retry_after: std::time::Duration,
    },
    /// The coordinator answered with an error.
    #[error("the coordinator refused: {0}")]
    Refused(Refusal),
    /// The answer was not what the protocol says.
    #[error("the coordinator's reply to {what} is not understood: {message}")]
    BadReply { what: String, message: String },
}

/// The calls a worker makes. Each is one request; retries are the caller's.
pub trait Transport: Send + Sync {
    fn run_info(&self) -> Result<RunInfo, TransportError>;
    fn corpus(&self) -> Result<Vec<u8>, TransportError>;
    fn tokenizer(&self) -> Result<Vec<u8>, TransportError>;
    /// The pretrained base of a fine-tune (`RunInfo::base`).
    fn base(&self) -> Result<Vec<u8>, TransportError>;
    fn register(&self, key: &SigningKey, name: &str) -> Result<(), TransportError>;
    fn lease(&self, key: &SigningKey) -> Result<LeaseReply, TransportError>;
    fn heartbeat(&self, key: &SigningKey, unit: u64) -> Result<(), TransportError>;
    fn model(&self, version: u64) -> Result<Vec<u8>, TransportError>;
    fn submit(&self, update: Vec<u8>) -> Result<SubmitReply, TransportError>;
}
