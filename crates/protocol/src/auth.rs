//! Signed requests: a worker signs each JSON request with its key, so nobody can lease,
//! heartbeat or register in its name.
//!
//! The signed message is `hivetrain-request-v1\n{METHOD}\n{path}\n{time_ms}\n{blake3 hex
//! of the body}`; the worker id, the time and the signature travel in three headers. The
//! coordinator refuses a time further than its allowed skew from its own clock.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::WorkerId;

pub const HEADER_WORKER: &str = "x-hivetrain-worker";
pub const HEADER_TIME: &str = "x-hivetrain-time";
pub const HEADER_SIGNATURE: &str = "x-hivetrain-signature";

/// Why a request's signature headers are refused. Each has a stable `code()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the request is not signed: send the x-hivetrain-worker, -time and -signature headers")]
    Missing,
    #[error("the x-hivetrain-worker header is not a 64-hex-digit ed25519 public key")]
    BadWorker,
    #[error("the x-hivetrain-time header is not a time in ms")]
    BadTime,
    #[error(
        "the request's time is {skew_ms} ms away from the coordinator's clock (at most {max_ms} allowed); check this machine's clock"
    )]
    Skew { skew_ms: u64, max_ms: u64 },
    #[error("the request's signature does not verify against its worker key")]
    BadSignature,
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "unsigned_request",
            AuthError::BadWorker => "bad_worker_id",
            AuthError::BadTime => "bad_request_time",
            AuthError::Skew { .. } => "clock_skew",
            AuthError::BadSignature => "bad_signature",
        }
    }
}

fn message(method: &str, path: &str, time_ms: u64, body: &[u8]) -> Vec<u8> {
    format!(
        "hivetrain-request-v1\n{method}\n{path}\n{time_ms}\n{}",
        blake3::hash(body).to_hex()
    )
    .into_bytes()
}

/// The three header values (worker, time, signature) for a request.
pub fn sign_request(
    key: &SigningKey,
    method: &str,
    path: &str,
    time_ms: u64,
    body: &[u8],
) -> [(&'static str, String); 3] {
    let signature = key.sign(&message(method, path, time_ms, body));
    [
        (HEADER_WORKER, WorkerId::of(key).to_string()),
        (HEADER_TIME, time_ms.to_string()),
        (HEADER_SIGNATURE, hex::encode(signature.to_bytes())),
    ]
}

/// Checks the headers of a request received at `now_ms`; returns the signer.
#[allow(clippy::too_many_arguments)]
pub fn verify_request(
    worker: Option<&str>,
    time: Option<&str>,
    signature: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: u64,
    max_skew_ms: u64,
) -> Result<WorkerId, AuthError> {
    let (Some(worker), Some(time), Some(signature)) = (worker, time, signature) else {
        return Err(AuthError::Missing);
    };
    let id = WorkerId::parse(worker).ok_or(AuthError::BadWorker)?;
    let time_ms: u64 = time.parse().map_err(|_| AuthError::BadTime)?;
    let skew_ms = now_ms.abs_diff(time_ms);
    if skew_ms > max_skew_ms {
        return Err(AuthError::Skew {
            skew_ms,
            max_ms: max_skew_ms,
        });
    }
    let key = VerifyingKey::from_bytes(&id.0).map_err(|_| AuthError::BadWorker)?;
    let mut sig = [0u8; 64];
    hex::decode_to_slice(signature, &mut sig).map_err(|_| AuthError::BadSignature)?;
    key.verify_strict(
        &message(method, path, time_ms, body),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| AuthError::BadSignature)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(
        tamper: impl Fn(&mut [(&'static str, String); 3], &mut u64, &mut Vec<u8>),
        want: Result<(), &str>,
    ) {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut body = b"{\"unit\":1}".to_vec();
        let mut headers = sign_request(&key, "POST", "/v1/heartbeat", 1_000, &body);
        let mut now = 1_500;
        tamper(&mut headers, &mut now, &mut body);
        let got = verify_request(
            Some(&headers[0].1),
            Some(&headers[1].1),
            Some(&headers[2].1),
            "POST",
            "/v1/heartbeat",
            &body,
            now,
            60_000,
        );
        assert_eq!(got.map(|_| ()).map_err(|e| e.code()), want);
    }

    #[test]
    fn requests_verify_only_as_signed() {
        check(|_, _, _| {}, Ok(()));
        check(|_, _, body| body.push(b' '), Err("bad_signature"));
        check(|h, _, _| h[1].1 = "1001".into(), Err("bad_signature"));
        check(|_, now, _| *now = 100_000, Err("clock_skew"));
        check(|h, _, _| h[0].1 = "zz".into(), Err("bad_worker_id"));
        check(
            |h, _, _| h[0].1 = WorkerId([9; 32]).to_string(),
            Err("bad_signature"),
        );
        check(|h, _, _| h[1].1 = "soon".into(), Err("bad_request_time"));
        check(|h, _, _| h[2].1 = "00".into(), Err("bad_signature"));
    }
}
