//! The one error type of the HTTP edge: a status, a stable code and a sentence.

use axum::http::StatusCode;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use protocol::api::{ErrorBody, ErrorDetail};
use run::{Class, RunError};
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
        ApiError::from(RunError::internal(error))
    }

    /// The reply to a rejected update.
    pub fn rejected(reason: Reject, sentence: String) -> ApiError {
        ApiError::from(RunError::rejected(reason, sentence))
    }

    /// The reply to a verdict that is a rejection (an acceptance here is a bug, reported
    /// as one).
    pub fn from_verdict(verdict: validation::Verdict) -> ApiError {
        ApiError::from(RunError::from_verdict(verdict))
    }
}

/// The run's refusals and failures as HTTP replies: the status is the edge's choice, the
/// code and sentence the run's. An internal failure's cause is logged with a reference
/// and the client gets the reference only.
impl From<RunError> for ApiError {
    fn from(e: RunError) -> ApiError {
        let status = match e.class {
            Class::Invalid => StatusCode::BAD_REQUEST,
            Class::Unauthenticated => StatusCode::UNAUTHORIZED,
            Class::Forbidden => StatusCode::FORBIDDEN,
            Class::NotFound => StatusCode::NOT_FOUND,
            Class::Conflict => StatusCode::CONFLICT,
            Class::Gone => StatusCode::GONE,
            Class::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            Class::InsufficientCredit => StatusCode::PAYMENT_REQUIRED,
            Class::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Class::TooMany { .. } => StatusCode::TOO_MANY_REQUESTS,
            Class::Internal => {
                static REFERENCES: std::sync::atomic::AtomicU64 =
                    std::sync::atomic::AtomicU64::new(1);
                let reference = REFERENCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(reference, "internal error: {}", e.message);
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!(
                        "the coordinator failed on this request (internal error #{reference} in its log); retry later, and tell its operator if it persists"
                    ),
                );
            }
        };
        let error = ApiError::new(status, &e.code, e.message);
        match e.class {
            Class::Busy { retry_after_s } | Class::TooMany { retry_after_s } => {
                error.with_header(header::RETRY_AFTER, &retry_after_s.to_string())
            }
            _ => error,
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
