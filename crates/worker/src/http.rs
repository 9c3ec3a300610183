//! The worker's [`Transport`] over the coordinator's HTTP API (`/v1/...`), with blocking
//! calls (the `http` feature: the simulator trains units without it).

use std::io::Read;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use protocol::api::{
    BaseInfo, ErrorBody, HeartbeatRequest, LeaseReply, RegisterRequest, RunInfo, SubmitReply,
};

use crate::transport::{
    BASE_BYTES_MAX, CORPUS_BYTES_MAX, JSON_REPLY_BYTES_MAX, MODEL_BYTES_MAX, Refusal,
    TOKENIZER_BYTES_MAX, Transport, TransportError,
};

/// Most bytes reserved up front for a body, whatever its `Content-Length` says: a larger
/// body grows its buffer as it arrives, so a false length costs no memory.
const PREALLOCATE_BYTES_MAX: u64 = 64 << 20;

/// How large a body may be: at most `bytes_max`, or exactly that when `exact`.
struct Bound<'a> {
    what: &'a str,
    bytes_max: u64,
    /// The bound's name (a constant), or where an exact size was declared.
    name: &'a str,
    exact: bool,
}

impl<'a> Bound<'a> {
    const fn at_most(what: &'a str, bytes_max: u64, name: &'a str) -> Bound<'a> {
        Bound {
            what,
            bytes_max,
            name,
            exact: false,
        }
    }
}

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
        let bound = Bound::at_most(
            "an error reply",
            JSON_REPLY_BYTES_MAX,
            "JSON_REPLY_BYTES_MAX",
        );
        let text = self
            .read_bounded(response, path, &bound)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
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

    /// Reads the body of `response` to `bound`: a `Content-Length` over it is refused
    /// before the body is read, and the body itself is read to one byte past it.
    fn read_bounded(
        &self,
        mut response: reqwest::blocking::Response,
        path: &str,
        bound: &Bound<'_>,
    ) -> Result<Vec<u8>, TransportError> {
        let too_large = || TransportError::TooLarge {
            what: bound.what.to_owned(),
            url: self.url(path),
            bytes_max: bound.bytes_max,
            bound: bound.name.to_owned(),
        };
        let declared = response.content_length();
        if declared.is_some_and(|n| n > bound.bytes_max) {
            return Err(too_large());
        }
        let reserve = declared.unwrap_or(0).min(PREALLOCATE_BYTES_MAX) as usize;
        let mut bytes = Vec::with_capacity(reserve);
        (&mut response)
            .take(bound.bytes_max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| TransportError::Unreachable {
                url: self.url(path),
                message: error_chain(&e),
            })?;
        if bytes.len() as u64 > bound.bytes_max {
            return Err(too_large());
        }
        if bound.exact && (bytes.len() as u64) < bound.bytes_max {
            return Err(TransportError::BadReply {
                what: path.to_owned(),
                message: format!(
                    "{} is {} bytes, short of the {} bytes of {}",
                    bound.what,
                    bytes.len(),
                    bound.bytes_max,
                    bound.name
                ),
            });
        }
        Ok(bytes)
    }

    fn get_bytes(&self, path: &str, bound: &Bound<'_>) -> Result<Vec<u8>, TransportError> {
        let response = self.send(self.client.get(self.url(path)), path)?;
        self.read_bounded(response, path, bound)
    }

    /// Fetches `path`, of exactly the `bytes` the run declares, refusing a declared size
    /// over `bytes_max` (named `name`) before any request.
    fn get_declared(
        &self,
        path: &str,
        what: &str,
        bytes: u64,
        bytes_max: u64,
        name: &str,
    ) -> Result<Vec<u8>, TransportError> {
        if bytes > bytes_max {
            return Err(TransportError::TooLarge {
                what: what.to_owned(),
                url: self.url(path),
                bytes_max,
                bound: format!("{name}; the run declares {bytes} bytes"),
            });
        }
        self.get_bytes(
            path,
            &Bound {
                what,
                bytes_max: bytes,
                name: "the size /v1/run declares",
                exact: true,
            },
        )
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        response: reqwest::blocking::Response,
        path: &str,
    ) -> Result<T, TransportError> {
        let bound = Bound::at_most("a JSON reply", JSON_REPLY_BYTES_MAX, "JSON_REPLY_BYTES_MAX");
        let bytes = self.read_bounded(response, path, &bound)?;
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

    fn corpus(&self, bytes: u64) -> Result<Vec<u8>, TransportError> {
        self.get_declared(
            "/v1/run/corpus",
            "the corpus",
            bytes,
            CORPUS_BYTES_MAX,
            "CORPUS_BYTES_MAX",
        )
    }

    fn tokenizer(&self) -> Result<Vec<u8>, TransportError> {
        let bound = Bound::at_most("the tokenizer", TOKENIZER_BYTES_MAX, "TOKENIZER_BYTES_MAX");
        self.get_bytes("/v1/run/tokenizer", &bound)
    }

    fn base(&self, base: &BaseInfo) -> Result<Vec<u8>, TransportError> {
        self.get_declared(
            "/v1/run/base",
            "the base model",
            base.bytes,
            BASE_BYTES_MAX,
            "BASE_BYTES_MAX",
        )
    }

    fn register(
        &self,
        key: &SigningKey,
        name: &str,
        machine: Option<&protocol::api::Machine>,
    ) -> Result<(), TransportError> {
        let body = to_json(&RegisterRequest {
            name: name.to_owned(),
            machine: machine.cloned(),
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
        let what = format!("model version {version}");
        let bound = Bound::at_most(&what, MODEL_BYTES_MAX, "MODEL_BYTES_MAX");
        self.get_bytes(&format!("/v1/models/{version}"), &bound)
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
