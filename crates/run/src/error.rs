//! The run's one error type: what it refuses or fails at, as a domain [`Class`], a stable
//! code and a sentence. A driver maps the class to its transport (the coordinator's HTTP
//! edge to a status code, a peer-to-peer node to its own reply); nothing here knows HTTP.

use validation::Reject;

/// What kind of refusal or failure an error is, as a caller must act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The request is malformed or asks for something that cannot be (fix the request).
    Invalid,
    /// The signature does not verify against the key it names.
    Unauthenticated,
    /// The caller may not do this: an unknown worker, a lease that is someone else's.
    Forbidden,
    /// What it names does not exist.
    NotFound,
    /// It contradicts the run as it stands: not leased, a duplicate, stale, a copy.
    Conflict,
    /// It existed and was removed (a version the retention policy pruned).
    Gone,
    /// Well-formed and in order, but refused on its content (its norm, its score).
    Unprocessable,
    /// The wallet's available credit does not cover it.
    InsufficientCredit,
    /// A bound of the run is reached: retry after `retry_after_s` seconds.
    Busy { retry_after_s: u64 },
    /// Too many requests from this caller: retry after `retry_after_s` seconds.
    TooMany { retry_after_s: u64 },
    /// The node itself failed (its store, its engine). The message holds the cause, for
    /// the node's log: a driver does not send it to the caller.
    Internal,
}

/// A refusal or failure of the run: its class, a stable code and a sentence that says
/// what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RunError {
    pub class: Class,
    pub code: String,
    pub message: String,
}

impl RunError {
    pub fn new(class: Class, code: &str, message: impl Into<String>) -> RunError {
        RunError {
            class,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// A failure of the node itself, with its whole chain of causes in the message (for
    /// the log; the driver answers the caller without it).
    pub fn internal(error: &dyn std::error::Error) -> RunError {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        RunError::new(Class::Internal, "internal", message)
    }

    /// A failure of the node described in words (a broken internal invariant).
    pub fn broken(what: impl Into<String>) -> RunError {
        RunError::new(Class::Internal, "internal", what)
    }

    /// The refusal of an update for `reason`.
    pub fn rejected(reason: Reject, sentence: String) -> RunError {
        let class = match reason {
            Reject::Malformed | Reject::HashMismatch | Reject::OutOfRange => Class::Invalid,
            Reject::BadSignature => Class::Unauthenticated,
            Reject::NotYourLease => Class::Forbidden,
            Reject::NotLeased
            | Reject::Duplicate
            | Reject::WrongBase
            | Reject::Stale
            | Reject::Copied => Class::Conflict,
            Reject::WrongShape
            | Reject::NonFinite
            | Reject::NormTooLarge
            | Reject::NormOutlier
            | Reject::NoProgress
            | Reject::Harmful
            | Reject::NotOwnData => Class::Unprocessable,
        };
        RunError::new(class, reason.code(), sentence)
    }

    /// The refusal a rejecting verdict stands for (an acceptance here is a bug, reported
    /// as one).
    pub fn from_verdict(verdict: validation::Verdict) -> RunError {
        match verdict {
            validation::Verdict::Rejected { reason, sentence } => {
                RunError::rejected(reason, sentence)
            }
            validation::Verdict::Accepted { .. } => {
                RunError::broken("an accepted verdict taken for a rejection")
            }
        }
    }

    /// Whether the node failed, rather than the request being refused.
    pub fn is_internal(&self) -> bool {
        self.class == Class::Internal
    }
}
