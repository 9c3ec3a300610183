//! The HTTP API (`/v1/...`) over [`Core`]. A driver: it authenticates, bounds bodies,
//! reads the clock, and hands everything else to the core under one mutex, on a
//! blocking thread (validation is CPU work), through [`crate::drive`] (which runs an
//! aggregation a request makes due outside the mutex).
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the dashboard (`dashboard.html`: version, loss chart, contributors, rounds) |
//! | `GET /health` | liveness |
//! | `GET /v1/run` | [`protocol::api::RunInfo`] |
//! | `GET /v1/run/corpus`, `GET /v1/run/tokenizer` | the run's data, by hash in `RunInfo` |
//! | `GET /v1/run/base` | a fine-tune's base model file, by hash in `RunInfo::base` |
//! | `POST /v1/workers` (signed) | register a worker name |
//! | `POST /v1/lease` (signed) | a unit of work, or when to come back |
//! | `POST /v1/heartbeat` (signed) | extend a lease |
//! | `GET /v1/models/{version}` | the version's safetensors (immutable, `ETag` = blake3) |
//! | `POST /v1/updates` | a signed binary update; the reply is its verdict |
//! | `GET /v1/status` | rounds, losses, units (`?rounds=N`: the newest N rounds) |
//! | `GET /v1/ledger?from=N&limit=M` | ledger entries ([`ledger::wire::EntriesPage`]) |
//! | `GET /v1/ledger/head` | a signed tree head ([`ledger::TreeHead`]) |
//! | `GET /v1/ledger/proof/{seq}?size=N` | an inclusion proof against a head of size N |
//! | `GET /v1/wallets/{key}` | a wallet's balance, totals and entries (`?entries=N`: the newest N) |
//! | `POST /v1/transfers` (signed) | move credit to another wallet |
//! | `GET /v1/leaderboard` | wallets by credit earned |
//! | `GET /v1/stats` | network totals |
//! | `GET /metrics` | Prometheus metrics (OpenMetrics text; `metrics.rs`) |

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use protocol::WorkerId;
use protocol::api::{HeartbeatRequest, RegisterRequest};
use run::RunError;
use serde::de::DeserializeOwned;

use crate::core::Core;
use crate::error::ApiError;

/// Largest JSON request body.
const JSON_BODY_MAX: usize = 64 * 1024;

/// The state every handler shares.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) core: Arc<Mutex<Core>>,
    /// What the read-only routes serve, without the core's lock.
    pub(crate) reads: crate::core::Reads,
    pub(crate) clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// From the config, which does not change while serving (read here so that no
    /// async task waits on the core's mutex).
    pub(crate) max_clock_skew_ms: u64,
    /// The exact size of an update of this run (its codec, its parameter count): the
    /// limit of an update's body.
    pub(crate) update_bytes: u64,
    pub(crate) limits: protocol::Limits,
    /// When a request body must have arrived.
    pub(crate) body_deadline: BodyDeadline,
    /// Update bodies read and processed at once (`http.upload_concurrency`).
    pub(crate) uploads: Arc<tokio::sync::Semaphore>,
    /// The permits `uploads` started with, for the metrics.
    pub(crate) uploads_limit: usize,
    pub(crate) blobs: store::Blobs,
    /// Update bodies are read into these, reused: a fresh 10 MB buffer per update costs
    /// more in page faults than reading into it. Each holds `update_bytes` and never
    /// grows; one is taken or made only under an upload permit and put back before the
    /// permit is released, so there are never more than `http.upload_concurrency`.
    pub(crate) buffers: Arc<Mutex<Vec<store::AlignedBuf>>>,
    /// Backends of the run's model that score updates: a fixed pool sized at start by
    /// `devices.scoring_memory_mb`, each opened on first need from `scoring`.
    pub(crate) scorers: Arc<crate::pool::Pool<Box<dyn engine::Backend>>>,
    pub(crate) scoring: crate::core::BackendSpec,
    pub(crate) serving: crate::openai::Inference,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

/// What a client told `uploads_busy` waits before trying again, in seconds.
const UPLOADS_RETRY_AFTER_S: u64 = 1;
/// Longest an update waits for a free scoring backend before `scorers_busy`: a few
/// scorings at the larger presets, so a short burst is absorbed and a flood is refused.
const SCORER_WAIT_MS: u64 = 10_000;
/// What a client told `scorers_busy` waits before trying again, in seconds.
const SCORERS_RETRY_AFTER_S: u64 = 2;

/// The API; `training: false` leaves out the routes workers use (`hivetrain serve`).
pub(crate) fn router(shared: Shared, training: bool) -> Router {
    let workers = Router::new()
        .route("/v1/workers", post(register))
        .route("/v1/lease", post(lease))
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/updates", post(submit));
    let base = if training { workers } else { Router::new() };
    base.route("/health", get(|| async { "ok" }))
        .route("/v1/run", get(run_info))
        .route("/v1/run/corpus", get(corpus))
        .route("/v1/run/tokenizer", get(tokenizer))
        .route("/v1/run/base", get(base_model))
        .route("/v1/models/{version}", get(model))
        .route("/v1/status", get(status))
        .route("/v1/ledger", get(ledger_page))
        .route("/v1/ledger/head", get(tree_head))
        .route("/v1/ledger/proof/{seq}", get(inclusion_proof))
        .route("/v1/wallets/{wallet}", get(wallet))
        .route("/v1/transfers", post(transfer))
        .route("/v1/leaderboard", get(leaderboard))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(crate::metrics::scrape))
        .route("/", get(dashboard))
        .merge(crate::openai::router())
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see GET /v1/status and the coordinator's API table",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            crate::metrics::track,
        ))
        .with_state(shared)
}

/// Runs `f` on the core, on a blocking thread.
pub(crate) async fn with_core<T: Send + 'static, E: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&mut Core, u64) -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    ApiError: From<E>,
{
    let core = shared.core.clone();
    let clock = shared.clock.clone();
    Ok(
        tokio::task::spawn_blocking(move || crate::drive::run(&core, clock.as_ref(), f))
            .await
            .map_err(|e| ApiError::internal(&e))??,
    )
}

/// Runs `f` on what the read-only routes serve, on a blocking thread (a store read or
/// a large copy), never waiting for the core's lock.
pub(crate) async fn read<T: Send + 'static, E: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&crate::core::Reads) -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    ApiError: From<E>,
{
    let reads = shared.reads.clone();
    Ok(tokio::task::spawn_blocking(move || f(&reads))
        .await
        .map_err(|e| ApiError::internal(&e))??)
}

/// When a request body must have arrived in full: `allowance` after the handler starts
/// reading it, plus the time its bytes take at `min_bytes_per_s` (so a large body sent
/// at a fair rate is never cut, and a trickle is cut soon after the allowance).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyDeadline {
    allowance: std::time::Duration,
    min_bytes_per_s: u64,
}

impl BodyDeadline {
    pub(crate) fn new(http: &crate::config::HttpLimits) -> BodyDeadline {
        BodyDeadline {
            allowance: std::time::Duration::from_millis(http.body_timeout_ms),
            min_bytes_per_s: http.body_min_bytes_per_s.max(1),
        }
    }

    fn at(&self, start: tokio::time::Instant, received: usize) -> tokio::time::Instant {
        let transfer_ms = (received as u64).saturating_mul(1000) / self.min_bytes_per_s;
        start + self.allowance + std::time::Duration::from_millis(transfer_ms)
    }
}

/// The refusal of an update that found every scoring backend busy for `SCORER_WAIT_MS`.
fn scorers_busy() -> RunError {
    RunError::new(
        run::Class::Busy {
            retry_after_s: SCORERS_RETRY_AFTER_S,
        },
        "scorers_busy",
        format!(
            "the coordinator is scoring as many updates as its memory allows; send this one again in {SCORERS_RETRY_AFTER_S} s"
        ),
    )
}

/// Reads a body of at most `max` bytes by its deadline.
pub(crate) async fn read_body(
    body: Body,
    max: usize,
    deadline: BodyDeadline,
) -> Result<axum::body::Bytes, ApiError> {
    let declared = refuse_declared_over(&body, max)?;
    let mut bytes = Vec::with_capacity(declared);
    read_chunks(body, max, deadline, |chunk| bytes.extend_from_slice(chunk)).await?;
    Ok(bytes.into())
}

/// The body's declared length (`Content-Length`; 0 when chunked), or a 413 when it is
/// over `max`: refused before a byte of it is read or a byte reserved for it.
fn refuse_declared_over(body: &Body, max: usize) -> Result<usize, ApiError> {
    use axum::body::HttpBody;
    let declared = body.size_hint().lower();
    usize::try_from(declared)
        .ok()
        .filter(|&d| d <= max)
        .ok_or_else(|| too_large(max))
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the request body is over the limit of {max} bytes"),
    )
}

/// Reads `body` to its end, handing each piece to `sink`: at most `max` bytes (a 413 at
/// the first piece past it, whatever the body declared), all of them by `deadline`
/// (a 408 `body_timeout`). Not cancel-safe: dropped, the body is lost.
async fn read_chunks(
    mut body: Body,
    max: usize,
    deadline: BodyDeadline,
    mut sink: impl FnMut(&[u8]),
) -> Result<(), ApiError> {
    use http_body_util::BodyExt;
    let start = tokio::time::Instant::now();
    let mut received = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline.at(start, received), body.frame()).await
        {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!(
                        "the request body did not arrive in time: {received} bytes in {} ms; send it in full within {} ms plus 1 s per {} bytes",
                        start.elapsed().as_millis(),
                        deadline.allowance.as_millis(),
                        deadline.min_bytes_per_s
                    ),
                ));
            }
            Ok(None) => return Ok(()),
            Ok(Some(frame)) => frame.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "truncated_body",
                    format!("the request body could not be read in full: {e}"),
                )
            })?,
        };
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        if chunk.len() > max - received {
            return Err(too_large(max));
        }
        received += chunk.len();
        sink(&chunk);
    }
}

/// Checks a signed JSON request; returns the signer and the parsed body.
async fn signed<T: DeserializeOwned>(
    shared: &Shared,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(WorkerId, T), ApiError> {
    let bytes = read_body(body, JSON_BODY_MAX, shared.body_deadline).await?;
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let max_skew = shared.max_clock_skew_ms;
    let worker = protocol::auth::verify_request(
        h(protocol::auth::HEADER_WORKER),
        h(protocol::auth::HEADER_TIME),
        h(protocol::auth::HEADER_SIGNATURE),
        method.as_str(),
        path,
        &bytes,
        (shared.clock)(),
        max_skew,
    )
    .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string()))?;
    let body = if bytes.is_empty() {
        &b"null"[..]
    } else {
        &bytes[..]
    };
    let value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the request body is not the expected JSON: {e}"),
        )
    })?;
    Ok((worker, value))
}

async fn run_info(State(shared): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    let info = shared.reads.run_info();
    Ok(axum::Json(info))
}

/// Shared bytes as a body without a copy: a flood of requests for a large file (a
/// fine-tune's base is about 100 MB) costs no memory beyond the one copy held.
struct SharedBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn bytes_reply(bytes: Arc<Vec<u8>>, etag: &str, content_type: &'static str) -> Response {
    let body = Body::from(bytes::Bytes::from_owner(SharedBytes(bytes)));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        headers.insert(header::ETAG, v);
    }
    response
}

async fn corpus(State(shared): State<Shared>) -> Result<Response, ApiError> {
    let (bytes, hash) = (shared.reads.corpus(), shared.reads.run_info().corpus_sha256);
    Ok(bytes_reply(bytes, &hash, "application/octet-stream"))
}

async fn base_model(State(shared): State<Shared>) -> Result<Response, ApiError> {
    match (shared.reads.base(), shared.reads.run_info().base) {
        (Some(bytes), Some(info)) => {
            Ok(bytes_reply(bytes, &info.sha256, "application/octet-stream"))
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_base",
            "this run trains a model from scratch: it has no base model to fetch",
        )),
    }
}

async fn tokenizer(State(shared): State<Shared>) -> Result<Response, ApiError> {
    let (bytes, hash) = (
        shared.reads.tokenizer(),
        shared.reads.run_info().tokenizer_sha256,
    );
    Ok(bytes_reply(bytes, &hash, "application/json"))
}

async fn register(
    State(shared): State<Shared>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let (worker, request): (WorkerId, RegisterRequest) =
        signed(&shared, &method, "/v1/workers", &headers, body).await?;
    with_core(&shared, move |core, now| {
        core.register(worker, &request.name, request.machine.as_ref(), now)
    })
    .await?;
    Ok(axum::Json(
        serde_json::json!({ "worker": worker.to_string() }),
    ))
}

async fn lease(
    State(shared): State<Shared>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let (worker, ()): (WorkerId, ()) =
        signed(&shared, &method, "/v1/lease", &headers, body).await?;
    let reply = with_core(&shared, move |core, now| core.lease(worker, now)).await?;
    Ok(axum::Json(reply))
}

async fn heartbeat(
    State(shared): State<Shared>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let (worker, request): (WorkerId, HeartbeatRequest) =
        signed(&shared, &method, "/v1/heartbeat", &headers, body).await?;
    with_core(&shared, move |core, now| {
        core.heartbeat(worker, request.unit, now)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn model(
    State(shared): State<Shared>,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    let version: u64 = version.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_version",
            format!("{version:?} is not a version number"),
        )
    })?;
    if version > protocol::ID_MAX {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "out_of_range",
            format!(
                "version {version} is above the largest version number, {}",
                protocol::ID_MAX
            ),
        ));
    }
    let (bytes, hash) = read(&shared, move |reads| reads.model(version)).await?;
    Ok(bytes_reply(bytes, &hash, "application/octet-stream"))
}

/// An update goes through validation in three stages so that the core's lock is held
/// only for the cheap ones: inspection (hash, signature, one pass over the payload) with
/// no lock, the precheck against the round under the lock, the fsynced blob with no lock,
/// then the judgement again and the committed row under the lock. Two requests thus
/// overlap everything but two short critical sections.
async fn submit(State(shared): State<Shared>, body: Body) -> Result<impl IntoResponse, ApiError> {
    let max = usize::try_from(shared.update_bytes).unwrap_or(usize::MAX);
    refuse_declared_over(&body, max)?;
    // A permit bounds the bodies read and held at once, and so the buffers.
    let permit = shared.uploads.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "uploads_busy",
            format!(
                "the coordinator is receiving as many updates as it reads at once; send this one again in {UPLOADS_RETRY_AFTER_S} s"
            ),
        )
        .with_header(header::RETRY_AFTER, &UPLOADS_RETRY_AFTER_S.to_string())
    })?;
    let pooled = shared
        .buffers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .pop();
    let mut bytes = match pooled {
        Some(buffer) if buffer.capacity() >= max => buffer,
        _ => store::AlignedBuf::with_capacity(max),
    };
    read_body_into(body, max, shared.body_deadline, &mut bytes).await?;
    let core = shared.core.clone();
    let clock = shared.clock.clone();
    let (limits, blobs) = (shared.limits, shared.blobs.clone());
    let (scorers, buffers) = (shared.scorers.clone(), shared.buffers.clone());
    let scoring = shared.scoring.clone();
    let (received, reply) = tokio::task::spawn_blocking(move || {
        let reply = (|| {
            let update = validation::inspect(&bytes, &limits).map_err(RunError::from_verdict)?;
            let task = crate::drive::run(&core, clock.as_ref(), |core, now| {
                core.precheck(&update, now)
            })?;
            let score = match task {
                Some(task) => {
                    let delta = protocol::SignedUpdate::parse(&bytes, &limits)
                        .and_then(|u| u.decode())
                        .map_err(|e| RunError::internal(&e))?;
                    // Opened outside every lock (allocating a backend takes a while),
                    // on a lowered thread: it computes at the heavy work's priority.
                    let wait = std::time::Duration::from_millis(SCORER_WAIT_MS);
                    let open = || crate::priority::on_lowered_thread(|| scoring.open());
                    let mut backend = scorers.take(wait, open).map_err(|e| match e {
                        crate::pool::TakeError::Open(e) => e,
                        busy @ crate::pool::TakeError::Busy { .. } => {
                            tracing::warn!("{busy}; an update is refused for now");
                            scorers_busy()
                        }
                    })?;
                    Some(task.run(backend.as_mut(), &delta)?)
                }
                None => None,
            };
            let blob = store::BlobHash::from_digest(&update.address);
            blobs
                .put_aligned(&mut bytes, &blob)
                .map_err(|e| RunError::internal(&e))?;
            crate::drive::run(&core, clock.as_ref(), |core, now| {
                core.accept(&update, &blob, bytes.len() as u64, score, now)
            })
        })();
        let received = bytes.len() as u64;
        // Back in the pool before the permit is released (here, even if the request
        // was dropped meanwhile), so buffers never outnumber permits.
        buffers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(bytes);
        drop(permit);
        (received, reply)
    })
    .await
    .map_err(|e| ApiError::internal(&e))?;
    shared.metrics.update(match &reply {
        Ok(_) => Ok(received),
        Err(e) => Err(&e.code),
    });
    Ok(axum::Json(reply?))
}

/// Reads a body of at most `max` bytes by its deadline into `out` (cleared first), which
/// holds `max` bytes without growing.
async fn read_body_into(
    body: Body,
    max: usize,
    deadline: BodyDeadline,
    out: &mut store::AlignedBuf,
) -> Result<(), ApiError> {
    out.clear();
    read_chunks(body, max, deadline, |chunk| out.extend_from_slice(chunk)).await
}

#[derive(serde::Deserialize)]
struct StatusQuery {
    /// The newest this many rounds (default: every round).
    rounds: Option<u64>,
}

async fn status(
    State(shared): State<Shared>,
    query: QueryResult<StatusQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let q = query_or_400(query, "use ?rounds=N for the newest N rounds")?;
    let now = (shared.clock)();
    // From memory on this thread when no round's figures changed since the last read
    // (most reads); a store read goes to a blocking thread.
    let status = match shared.reads.status_cached(now, q.rounds) {
        Some(status) => status,
        None => read(&shared, move |reads| reads.status(now, q.rounds)).await?,
    };
    Ok(axum::Json(status))
}

/// A query string as parsed, or why not.
type QueryResult<T> = Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>;

/// The parsed query, or a 400 `bad_query` that says how to write it (`usage`).
fn query_or_400<T>(query: QueryResult<T>, usage: &str) -> Result<T, ApiError> {
    query.map(|axum::extract::Query(q)| q).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("{e}: {usage}"),
        )
    })
}

/// Largest page of `GET /v1/ledger`.
const LEDGER_PAGE_MAX: u64 = 10_000;

#[derive(serde::Deserialize)]
struct PageQuery {
    #[serde(default)]
    from: u64,
    limit: Option<u64>,
}

async fn ledger_page(
    State(shared): State<Shared>,
    query: QueryResult<PageQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let q = query_or_400(query, "use ?from=N&limit=M")?;
    let limit = q.limit.unwrap_or(LEDGER_PAGE_MAX).min(LEDGER_PAGE_MAX);
    let page = read(&shared, move |reads| {
        Ok::<_, RunError>(reads.ledger_page(q.from, limit))
    })
    .await?;
    Ok(axum::Json(page))
}

async fn tree_head(State(shared): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    let now = (shared.clock)();
    let head = read(&shared, move |reads| {
        Ok::<_, RunError>(reads.tree_head(now))
    })
    .await?;
    Ok(axum::Json(head))
}

#[derive(serde::Deserialize)]
struct ProofQuery {
    size: u64,
}

async fn inclusion_proof(
    State(shared): State<Shared>,
    Path(seq): Path<String>,
    query: QueryResult<ProofQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let seq: u64 = seq.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_seq",
            format!("{seq:?} is not an entry number"),
        )
    })?;
    let q = query_or_400(query, "give the tree size of a head, ?size=N")?;
    let proof = read(&shared, move |reads| reads.inclusion_proof(seq, q.size)).await?;
    Ok(axum::Json(proof))
}

fn parse_wallet(text: &str) -> Result<WorkerId, ApiError> {
    WorkerId::parse(text).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_wallet",
            format!("{text:?} is not a wallet: a wallet is a worker's 64-hex-digit public key"),
        )
    })
}

#[derive(serde::Deserialize)]
struct WalletQuery {
    /// The newest this many entries (default: all).
    entries: Option<usize>,
}

async fn wallet(
    State(shared): State<Shared>,
    Path(wallet): Path<String>,
    query: QueryResult<WalletQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let wallet = parse_wallet(&wallet)?;
    let q = query_or_400(query, "use ?entries=N for the newest N entries")?;
    let view = read(&shared, move |reads| {
        Ok::<_, RunError>(reads.wallet(wallet, q.entries))
    })
    .await?;
    Ok(axum::Json(view))
}

async fn transfer(
    State(shared): State<Shared>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let (from, request): (WorkerId, ledger::wire::TransferRequest) =
        signed(&shared, &method, "/v1/transfers", &headers, body).await?;
    let entry = with_core(&shared, move |core, now| core.transfer(from, &request, now)).await?;
    Ok(axum::Json(entry))
}

/// `GET /`: a page that shows the run, read from the JSON endpoints every 5 s.
async fn dashboard() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("dashboard.html"),
    )
}

async fn leaderboard(State(shared): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    let rows = read(&shared, |reads| reads.leaderboard()).await?;
    Ok(axum::Json(rows))
}

async fn stats(State(shared): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    let stats = read(&shared, |reads| reads.stats()).await?;
    Ok(axum::Json(stats))
}
