//! The one error type of the HTTP edge: a status, a stable code and a sentence.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use protocol::api::{ErrorBody, ErrorDetail};
use validation::Reject;

/// A refusal or failure as the client sees it (`{"error": {"code", "message"}}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    /// A header the reply carries (`Retry-After` of a 429).
    pub header: Option<(axum::http::HeaderName, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.into(),
            header: None,
        }
    }

    /// The same error, with a header on its reply.
    pub fn with_header(mut self, name: axum::http::HeaderName, value: &str) -> ApiError {
        self.header = Some((name, value.to_owned()));
        self
    }

    /// A failure of the coordinator itself (store, engine): a 500 whose sentence gives a
    /// reference to the log line that holds the cause. The cause (a store path, an
    /// engine error) stays in the log: clients learn nothing of the server's insides.
    pub fn internal(error: &dyn std::error::Error) -> ApiError {
        static REFERENCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        let reference = REFERENCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(reference, "internal error: {message}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!(
                "the coordinator failed on this request (internal error #{reference} in its log); retry later, and tell its operator if it persists"
            ),
        )
    }

    /// The reply to a rejected update.
    pub fn rejected(reason: Reject, sentence: String) -> ApiError {
        let status = match reason {
            Reject::Malformed | Reject::HashMismatch | Reject::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Reject::BadSignature => StatusCode::UNAUTHORIZED,
            Reject::NotYourLease => StatusCode::FORBIDDEN,
            Reject::NotLeased | Reject::Duplicate | Reject::WrongBase | Reject::Stale => {
                StatusCode::CONFLICT
            }
            Reject::Copied => StatusCode::CONFLICT,
            Reject::WrongShape
            | Reject::NonFinite
            | Reject::NormTooLarge
            | Reject::NormOutlier
            | Reject::NoProgress
            | Reject::Harmful
            | Reject::NotOwnData => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, reason.code(), sentence)
    }

    /// The reply to a verdict that is a rejection (an acceptance here is a bug, reported
    /// as one).
    pub fn from_verdict(verdict: validation::Verdict) -> ApiError {
        match verdict {
            validation::Verdict::Rejected { reason, sentence } => {
                ApiError::rejected(reason, sentence)
            }
            validation::Verdict::Accepted { .. } => ApiError::internal(&std::io::Error::other(
                "an accepted verdict taken for a rejection",
            )),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some((name, value)) = self.header
            && let Ok(value) = axum::http::HeaderValue::from_str(&value)
        {
            response.headers_mut().insert(name, value);
        }
        response
    }
}
