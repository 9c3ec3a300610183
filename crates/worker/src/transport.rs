//! How a worker talks to a coordinator. The lease loop sees only [`Transport`]; HTTP is
//! one implementation (a peer-to-peer one can follow).

use ed25519_dalek::SigningKey;
use protocol::api::{BaseInfo, LeaseReply, RunInfo, SubmitReply};

/// Largest pretrained base a worker downloads (`RunInfo::base`): 8 GiB. The worker
/// dequantizes the base into f32 floats in memory, 4 bytes a parameter, so an 8 GiB GGUF
/// of 8-bit weights (about 8B parameters, 32 GB of floats) is already beyond a volunteer's
/// machine; SmolLM2-135M-Instruct is 94 MiB. A run that declares a larger base is refused
/// before a byte is fetched, and the base itself is read to exactly the size declared.
pub const BASE_BYTES_MAX: u64 = 8 << 30;

/// Largest corpus a worker downloads (`RunInfo::corpus_bytes`): 2 GiB, 400 times the
/// bundled Shakespeare (4.8 MiB). The worker holds the corpus and its tokens (4 bytes
/// each, about one per 4 bytes of English) in memory, so this is ~4 GiB of a volunteer's
/// memory. The corpus itself is read to exactly the size the run declares.
pub const CORPUS_BYTES_MAX: u64 = 2 << 30;

/// Largest tokenizer.json a worker downloads: 64 MiB. The bundled GPT-2 one is 530 KiB;
/// the largest HF tokenizers (256k-token vocabularies) are about 33 MiB.
pub const TOKENIZER_BYTES_MAX: u64 = 64 << 20;

/// Largest model version (`GET /v1/models/{version}`) a worker downloads: 2 GiB. A
/// version is its trainable floats as f32 safetensors: 498 MB for the GPT-2 `base`
/// preset, 540 MB for a full fine-tune of SmolLM2-135M, a few MB for a LoRA adapter.
pub const MODEL_BYTES_MAX: u64 = 2 << 30;

/// Largest JSON reply or refusal a worker reads (run info, leases, submit replies,
/// error bodies): 1 MiB. The largest, `/v1/run` with a Llama's spec, is a few KiB.
pub const JSON_REPLY_BYTES_MAX: u64 = 1 << 20;

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
    /// A download is larger than its bound (or than the size the run declared): the
    /// coordinator is broken or hostile, and retrying will not help.
    #[error(
        "{what} from {url} is larger than {bytes_max} bytes ({bound}): the coordinator is broken or is not serving a hivetrain run; tell its operator, or join another coordinator"
    )]
    TooLarge {
        what: String,
        url: String,
        bytes_max: u64,
        /// Which bound: a named constant, or the size the run declared.
        bound: String,
    },
}

/// The calls a worker makes. Each is one request; retries are the caller's.
pub trait Transport: Send + Sync {
    fn run_info(&self) -> Result<RunInfo, TransportError>;
    /// The corpus, of exactly the `bytes` the run declares (`RunInfo::corpus_bytes`), at
    /// most [`CORPUS_BYTES_MAX`].
    fn corpus(&self, bytes: u64) -> Result<Vec<u8>, TransportError>;
    /// The tokenizer.json, at most [`TOKENIZER_BYTES_MAX`].
    fn tokenizer(&self) -> Result<Vec<u8>, TransportError>;
    /// The pretrained base of a fine-tune (`RunInfo::base`), of exactly `base.bytes`, at
    /// most [`BASE_BYTES_MAX`].
    fn base(&self, base: &BaseInfo) -> Result<Vec<u8>, TransportError>;
    /// Joins the run as `name`, with the machine the worker measured when it started.
    fn register(
        &self,
        key: &SigningKey,
        name: &str,
        machine: Option<&protocol::api::Machine>,
    ) -> Result<(), TransportError>;
    fn lease(&self, key: &SigningKey) -> Result<LeaseReply, TransportError>;
    fn heartbeat(&self, key: &SigningKey, unit: u64) -> Result<(), TransportError>;
    /// A model version's checkpoint, at most [`MODEL_BYTES_MAX`].
    fn model(&self, version: u64) -> Result<Vec<u8>, TransportError>;
    fn submit(&self, update: Vec<u8>) -> Result<SubmitReply, TransportError>;
}
