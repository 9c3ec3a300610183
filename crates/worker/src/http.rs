//! The worker's [`Transport`] over the coordinator's HTTP API (`/v1/...`), with blocking
//! calls (the `http` feature: the simulator trains units without it).

use std::time::Duration;

use ed25519_dalek::SigningKey;
use protocol::api::{
    ErrorBody, HeartbeatRequest, LeaseReply, RegisterRequest, RunInfo, SubmitReply,
};

use crate::transport::{Refusal, Transport, TransportError};

/// The HTTP API of `coordinator` (`/v1/...`), with blocking calls.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    base: String,
    client: reqwest::blocking::Client,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl HttpTransport {
    /// A transport to the coordinator at `base` (`http://host:port`).
    pub fn new(base: &str) -> Result<HttpTransport, TransportError> {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| TransportError::Unreachable {
                url: base.to_owned(),
                message: e.to_string(),
            })?;
        Ok(HttpTransport {
            base: base.trim_end_matches('/').to_owned(),
            client,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn send(
        &self,
        request: reqwest::blocking::RequestBuilder,
        path: &str,
    ) -> Result<reqwest::blocking::Response, TransportError> {
        let response = request.send().map_err(|e| TransportError::Unreachable {
            url: self.url(path),
            message: error_chain(&e),
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let retry_after = retry_after(&response);
        let text = response.text().unwrap_or_default();
        let refusal = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => Refusal {
                status,
                code: body.error.code,
                message: body.error.message,
            },
            Err(_) => Refusal {
                status,
                code: format!("http_{status}"),
                message: text.chars().take(200).collect(),
            },
        };
        if status == 503 {
            return Err(TransportError::Busy {
                url: self.url(path),
                refusal,
                retry_after,
            });
        }
        Err(TransportError::Refused(refusal))
    }

    fn get_bytes(&self, path: &str) -> Result<Vec<u8>, TransportError> {
        let response = self.send(self.client.get(self.url(path)), path)?;
        response
            .bytes()
            .map(|b| b.to_vec())
            .map_err(|e| TransportError::Unreachable {
                url: self.url(path),
                message: error_chain(&e),
            })
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        response: reqwest::blocking::Response,
        path: &str,
    ) -> Result<T, TransportError> {
        let bytes = response.bytes().map_err(|e| TransportError::Unreachable {
            url: self.url(path),
            message: error_chain(&e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| TransportError::BadReply {
            what: path.to_owned(),
            message: e.to_string(),
        })
    }

    fn post_signed(
        &self,
        key: &SigningKey,
        path: &str,
        body: Vec<u8>,
    ) -> Result<reqwest::blocking::Response, TransportError> {
        let mut request = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json");
        for (name, value) in protocol::auth::sign_request(key, "POST", path, now_ms(), &body) {
            request = request.header(name, value);
        }
        self.send(request.body(body), path)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Longest `Retry-After` a worker honours; a larger one (or none) is read as this or
/// [`BUSY_RETRY_DEFAULT`], so a coordinator cannot park a worker with one answer.
pub const BUSY_RETRY_AFTER_MAX: Duration = Duration::from_secs(60);
/// The wait before asking a busy coordinator again when its answer names none.
pub const BUSY_RETRY_DEFAULT: Duration = Duration::from_secs(2);

/// The wait a 503 answer asks for (`Retry-After` in seconds), bounded.
fn retry_after(response: &reqwest::blocking::Response) -> Duration {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(BUSY_RETRY_DEFAULT, |s| {
            Duration::from_secs(s).min(BUSY_RETRY_AFTER_MAX)
        })
}

impl Transport for HttpTransport {
    fn run_info(&self) -> Result<RunInfo, TransportError> {
        let path = "/v1/run";
        let response = self.send(self.client.get(self.url(path)), path)?;
        self.json(response, path)
    }

    fn corpus(&self) -> Result<Vec<u8>, TransportError> {
        self.get_bytes("/v1/run/corpus")
    }

    fn tokenizer(&self) -> Result<Vec<u8>, TransportError> {
        self.get_bytes("/v1/run/tokenizer")
    }

    fn base(&self) -> Result<Vec<u8>, TransportError> {
        self.get_bytes("/v1/run/base")
    }

    fn register(&self, key: &SigningKey, name: &str) -> Result<(), TransportError> {
        let body = to_json(&RegisterRequest {
            name: name.to_owned(),
        });
        self.post_signed(key, "/v1/workers", body).map(|_| ())
    }

    fn lease(&self, key: &SigningKey) -> Result<LeaseReply, TransportError> {
        let path = "/v1/lease";
        let response = self.post_signed(key, path, Vec::new())?;
        self.json(response, path)
    }

    fn heartbeat(&self, key: &SigningKey, unit: u64) -> Result<(), TransportError> {
        let body = to_json(&HeartbeatRequest { unit });
        self.post_signed(key, "/v1/heartbeat", body).map(|_| ())
    }

    fn model(&self, version: u64) -> Result<Vec<u8>, TransportError> {
        self.get_bytes(&format!("/v1/models/{version}"))
    }

    fn submit(&self, update: Vec<u8>) -> Result<SubmitReply, TransportError> {
        let path = "/v1/updates";
        let response = self.send(
            self.client
                .post(self.url(path))
                .header("content-type", "application/octet-stream")
                .body(update),
            path,
        )?;
        self.json(response, path)
    }
}
