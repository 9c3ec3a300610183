//! The OpenAI-compatible inference API, paid for with credit.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/models` | `hivetrain` (the newest version) and `hivetrain-vN`; a fine-tune's newest version by its name, `{base}@{sha256 prefix}+{lora\|full}-vN` (`Reads::model_name`), with `hivetrain` and `hivetrain-vN` its aliases |
//! | `POST /v1/completions` | a completion, or server-sent events with `stream: true` |
//! | `POST /v1/chat/completions` | a chat completion (the template is the model's `inference::Vocab`: `inference::chat_prompt` for a GPT-2 of the run) |
//! | `GET /v1/keys/challenge` | a challenge for a wallet to sign |
//! | `POST /v1/keys` | an API key for a wallet that signed a challenge |
//! | `POST /v1/keys/revoke` | revokes the key in `Authorization`, or every key of a wallet that signed a challenge |
//!
//! A request carries `Authorization: Bearer hk-...`; its key's wallet pays. The order:
//! the key and its rate limit, the body, the model's weights (under the core's lock),
//! the prompt's tokens, a hold on the price at `max_tokens` from the wallet's available
//! credit (402 if short; concurrent requests hold in turn, so together they never spend
//! more than the balance), generation on a blocking thread with no lock held, then one
//! spend entry for the tokens used, which releases the hold. `Idempotency-Key` names one
//! request (bound to the blake3 of its route and exact body): a retry of the same request
//! is answered with the stored reply and charged nothing; the key with another request is
//! `idempotency_key_reused` (422), and while the first is generating `request_in_progress`
//! (409).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use inference::api::{
    AssistantMessage, ChatChoice, ChatChunk, ChatCompletion, ChatRequest, ChunkChoice, Completion,
    CompletionChoice, CompletionRequest, Delta, ModelCard, ModelList, Usage,
};
use inference::{Finish, Plan};
use protocol::WorkerId;
use serde::{Deserialize, Serialize};

use crate::core::Core;
use crate::core::serving::{
    Finished, HoldId, KEY_CHALLENGE_CONTEXT, ModelSnapshot, REVOKE_CHALLENGE_CONTEXT, RequestName,
    Reservation,
};
use crate::error::ApiError;
use crate::http::{Shared, read_body, with_core};

/// Largest inference request body.
const BODY_MAX: usize = 256 * 1024;
/// Streamed pieces waiting for a slow client before generation waits too.
const STREAM_QUEUE: usize = 32;
/// Most API keys whose rate-limit state is kept.
const BUCKETS_MAX: usize = 100_000;

/// What the inference routes need beyond the core, fixed at start.
#[derive(Clone)]
pub(crate) struct Inference {
    pub(crate) requests_per_minute: u32,
    /// Where generations run (`devices.serving`).
    pub(crate) device: String,
    pub(crate) limits: inference::Limits,
    pub(crate) buckets: Arc<Mutex<HashMap<String, Bucket>>>,
    /// Generations that may run at once; the others wait up to [`BUSY_WAIT`].
    pub(crate) generations: Arc<tokio::sync::Semaphore>,
}

/// How long a request waits for a free generation slot before a 503.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A token bucket: `requests_per_minute` requests of burst, refilled evenly.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    at_ms: u64,
}

pub(crate) fn router() -> Router<Shared> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/keys/challenge", get(key_challenge))
        .route("/v1/keys", post(issue_key))
        .route("/v1/keys/revoke", post(revoke_key))
}

fn seconds(now_ms: u64) -> u64 {
    now_ms / 1000
}

async fn models(State(shared): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    let (ids, now) = (shared.reads.model_ids(), (shared.clock)());
    Ok(axum::Json(ModelList {
        object: "list".into(),
        data: ids
            .into_iter()
            .map(|id| ModelCard {
                id,
                object: "model".into(),
                created: seconds(now),
                owned_by: "hivetrain".into(),
            })
            .collect(),
    }))
}

#[derive(Serialize)]
struct ChallengeReply {
    challenge: String,
    expires_ms: u64,
    /// The exact bytes to sign with the wallet's key for a key.
    message: String,
    /// The exact bytes to sign to revoke every key of the wallet.
    revoke_message: String,
}

async fn key_challenge(State(shared): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    let (challenge, expires_ms) = with_core(&shared, |core, now| core.key_challenge(now)).await?;
    Ok(axum::Json(ChallengeReply {
        message: format!("{KEY_CHALLENGE_CONTEXT}{challenge}"),
        revoke_message: format!("{REVOKE_CHALLENGE_CONTEXT}{challenge}"),
        challenge,
        expires_ms,
    }))
}

/// `POST /v1/keys`.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyRequest {
    pub wallet: String,
    pub challenge: String,
    /// Hex ed25519 signature of the wallet over `hivetrain-api-key-v1\n` + challenge.
    pub signature: String,
}

/// The reply of `POST /v1/keys`.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyReply {
    pub api_key: String,
    pub wallet: String,
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the request body is not the expected JSON: {e}"),
        )
    })
}

async fn issue_key(
    State(shared): State<Shared>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let request: KeyRequest = parse_json(&read_body(body, 4096, shared.body_deadline).await?)?;
    let (key, wallet) = with_core(&shared, move |core, now| {
        core.issue_api_key(&request.wallet, &request.challenge, &request.signature, now)
    })
    .await?;
    Ok(axum::Json(KeyReply {
        api_key: key,
        wallet: wallet.to_string(),
    }))
}

/// With `Authorization`, revokes that key; without, revokes every key of the wallet
/// whose signed challenge (a [`KeyRequest`] over `revoke_message`) is the body.
async fn revoke_key(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    if headers.contains_key(header::AUTHORIZATION) {
        let key = bearer(&headers)?;
        with_core(&shared, move |core, _| core.revoke_api_key(&key)).await?;
        return Ok(axum::Json(
            serde_json::json!({ "revoked": true, "keys": 1 }),
        ));
    }
    let request: KeyRequest = parse_json(&read_body(body, 4096, shared.body_deadline).await?)?;
    let keys = with_core(&shared, move |core, now| {
        core.revoke_api_keys_of(&request.wallet, &request.challenge, &request.signature, now)
    })
    .await?;
    Ok(axum::Json(
        serde_json::json!({ "revoked": true, "keys": keys }),
    ))
}

/// The API key of `Authorization: Bearer ...`.
fn bearer(headers: &HeaderMap) -> Result<String, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                "send an API key as `Authorization: Bearer hk-...` (`hivetrain wallet api-key` makes one)",
            )
        })
}

/// Takes one request from the key's bucket, or says when to come back.
fn rate_limit(serving: &Inference, key: &str, now_ms: u64) -> Result<(), ApiError> {
    let per_minute = serving.requests_per_minute.max(1) as f64;
    let mut buckets = serving
        .buckets
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if buckets.len() >= BUCKETS_MAX && !buckets.contains_key(key) {
        // Full buckets carry no state worth keeping.
        buckets.retain(|_, b| {
            b.tokens + (now_ms.saturating_sub(b.at_ms)) as f64 * per_minute / 60_000.0 < per_minute
        });
    }
    let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
        tokens: per_minute,
        at_ms: now_ms,
    });
    let refill = now_ms.saturating_sub(bucket.at_ms) as f64 * per_minute / 60_000.0;
    bucket.tokens = (bucket.tokens + refill).min(per_minute);
    bucket.at_ms = now_ms;
    if bucket.tokens >= 1.0 {
        bucket.tokens -= 1.0;
        return Ok(());
    }
    let wait_s = ((1.0 - bucket.tokens) * 60.0 / per_minute).ceil().max(1.0) as u64;
    Err(ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!(
            "this API key may make {} requests a minute; retry in {wait_s} s",
            serving.requests_per_minute
        ),
    )
    .with_header(header::RETRY_AFTER, &wait_s.to_string()))
}

/// The request's name: its `Idempotency-Key` bound to what it asks (the blake3 of its
/// route and exact body), or a fresh id.
fn request_name(headers: &HeaderMap, route: &str, body: &[u8]) -> Result<RequestName, ApiError> {
    match headers.get("idempotency-key") {
        Some(value) => {
            let key = value.to_str().unwrap_or_default().trim();
            if key.is_empty() || key.len() > 128 || key.chars().any(char::is_control) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_idempotency_key",
                    "an Idempotency-Key must be 1 to 128 printable characters",
                ));
            }
            let mut asked = blake3::Hasher::new();
            asked.update(route.as_bytes());
            asked.update(&[0]);
            asked.update(body);
            Ok(RequestName {
                id: key.to_owned(),
                request_hash: Some(asked.finalize().to_hex().to_string()),
            })
        }
        None => {
            let mut bytes = [0u8; 16];
            getrandom::fill(&mut bytes)
                .map_err(|e| ApiError::internal(&std::io::Error::other(e)))?;
            Ok(RequestName {
                id: hex::encode(bytes),
                request_hash: None,
            })
        }
    }
}

enum Job {
    Completion(CompletionRequest),
    Chat(ChatRequest),
}

async fn completions(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let wallet = admit(&shared, &headers).await?;
    let body = read_body(body, BODY_MAX, shared.body_deadline).await?;
    let name = request_name(&headers, "/v1/completions", &body)?;
    let request = parse_json(&body)?;
    serve(shared, wallet, name, Job::Completion(request)).await
}

async fn chat_completions(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let wallet = admit(&shared, &headers).await?;
    let body = read_body(body, BODY_MAX, shared.body_deadline).await?;
    let name = request_name(&headers, "/v1/chat/completions", &body)?;
    let request = parse_json(&body)?;
    serve(shared, wallet, name, Job::Chat(request)).await
}

/// The paying wallet, after the key and its rate limit.
async fn admit(shared: &Shared, headers: &HeaderMap) -> Result<WorkerId, ApiError> {
    let key = bearer(headers)?;
    let wallet = with_core(shared, {
        let key = key.clone();
        move |core, _| core.api_key_wallet(&key)
    })
    .await?;
    rate_limit(&shared.serving, &key, (shared.clock)())?;
    Ok(wallet)
}

fn lock(core: &Mutex<Core>) -> crate::drive::Locked<'_> {
    crate::drive::lock(core)
}

/// A hold on the paying wallet's credit. Settled, it becomes the charge; dropped
/// unsettled (the generation failed, or the client left before it began), it is released.
struct HoldGuard {
    core: Arc<Mutex<Core>>,
    hold: Option<HoldId>,
}

impl HoldGuard {
    fn settle(mut self, finished: &Finished, now_ms: u64) -> Result<u64, ApiError> {
        let hold = self
            .hold
            .take()
            .ok_or_else(|| ApiError::internal(&std::io::Error::other("a hold settled twice")))?;
        Ok(lock(&self.core).settle(hold, finished, now_ms)?)
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if let Some(hold) = self.hold.take() {
            let core = self.core.clone();
            let release = move || lock(&core).release(hold);
            // Never wait for the core's lock on an async worker thread.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(release)),
                Err(_) => release(),
            }
        }
    }
}

enum Reserved {
    Held(HoldGuard),
    Replay(store::ReplyRow),
}

/// Holds the request's price at `max_tokens`, or finds its stored reply. The guard is
/// made on the blocking thread, so a client that leaves while this runs releases it.
async fn reserve(
    shared: &Shared,
    wallet: WorkerId,
    name: RequestName,
    prompt_tokens: u64,
    max_tokens: u64,
) -> Result<Reserved, ApiError> {
    let core = shared.core.clone();
    let clock = shared.clock.clone();
    tokio::task::spawn_blocking(move || {
        let reservation = lock(&core).reserve(wallet, &name, prompt_tokens, max_tokens, clock())?;
        Ok(match reservation {
            Reservation::Held(hold) => Reserved::Held(HoldGuard {
                core,
                hold: Some(hold),
            }),
            Reservation::Replay(row) => Reserved::Replay(row),
        })
    })
    .await
    .map_err(|e| ApiError::internal(&e))?
}

/// What the generation thread reports at the end.
struct Done {
    text: String,
    usage: Usage,
    finish: Finish,
    charged: u64,
}

/// What every reply and chunk of one request repeats.
#[derive(Clone)]
struct Envelope {
    chat: bool,
    object_id: String,
    created: u64,
    model: String,
}

impl Envelope {
    fn new(chat: bool, id: &str, created: u64, model: String) -> Envelope {
        Envelope {
            chat,
            object_id: format!("{}-{id}", if chat { "chatcmpl" } else { "cmpl" }),
            created,
            model,
        }
    }

    /// The whole (not streamed) reply.
    fn reply(&self, text: String, finish: &str, usage: Usage, charged: u64) -> Response {
        let mut response = if self.chat {
            axum::Json(ChatCompletion {
                id: self.object_id.clone(),
                object: "chat.completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content: text,
                    },
                    logprobs: None,
                    finish_reason: finish.into(),
                }],
                usage,
            })
            .into_response()
        } else {
            axum::Json(Completion {
                id: self.object_id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    text,
                    index: 0,
                    logprobs: None,
                    finish_reason: Some(finish.into()),
                }],
                usage: Some(usage),
            })
            .into_response()
        };
        if let Ok(v) = HeaderValue::from_str(&charged.to_string()) {
            response.headers_mut().insert("x-hivetrain-charged", v);
        }
        response
    }

    /// One streamed chunk: a piece of text, the finish reason, or the usage.
    fn chunk(
        &self,
        text: Option<&str>,
        finish: Option<&str>,
        usage: Option<Usage>,
        first: bool,
    ) -> String {
        let json = if self.chat {
            serde_json::to_string(&ChatChunk {
                id: self.object_id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: if usage.is_some() {
                    Vec::new()
                } else {
                    vec![ChunkChoice {
                        index: 0,
                        delta: Delta {
                            role: first.then(|| "assistant".to_owned()),
                            content: text.map(str::to_owned),
                        },
                        logprobs: None,
                        finish_reason: finish.map(str::to_owned),
                    }]
                },
                usage,
            })
        } else {
            serde_json::to_string(&Completion {
                id: self.object_id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: if usage.is_some() {
                    Vec::new()
                } else {
                    vec![CompletionChoice {
                        text: text.unwrap_or_default().to_owned(),
                        index: 0,
                        logprobs: None,
                        finish_reason: finish.map(str::to_owned),
                    }]
                },
                usage,
            })
        };
        json.unwrap_or_default()
    }
}

/// The stored reply of an idempotent request answered before, as it was asked (whole,
/// or as server-sent events holding the whole text in one chunk); charged nothing.
fn replay(
    row: store::ReplyRow,
    id: &str,
    chat: bool,
    stream: bool,
    include_usage: bool,
) -> Response {
    let envelope = Envelope::new(chat, id, seconds(row.created_ms), row.model.clone());
    let usage = Usage::new(row.prompt_tokens, row.completion_tokens);
    let mut response = if stream {
        let mut events = Vec::with_capacity(5);
        if chat {
            events.push(envelope.chunk(Some(""), None, None, true));
        }
        events.push(envelope.chunk(Some(&row.text), None, None, !chat));
        events.push(envelope.chunk(None, Some(&row.finish_reason), None, false));
        if include_usage {
            events.push(envelope.chunk(None, None, Some(usage), false));
        }
        events.push("[DONE]".to_owned());
        let events = futures_util::stream::iter(
            events
                .into_iter()
                .map(|data| Ok::<_, Infallible>(Event::default().data(data))),
        );
        Sse::new(events).into_response()
    } else {
        envelope.reply(row.text, &row.finish_reason, usage, 0)
    };
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

async fn serve(
    shared: Shared,
    wallet: WorkerId,
    name: RequestName,
    job: Job,
) -> Result<Response, ApiError> {
    let (model_name, sampling) = match &job {
        Job::Completion(r) => (r.model.clone(), &r.sampling),
        Job::Chat(r) => (r.model.clone(), &r.sampling),
    };
    let chat = matches!(job, Job::Chat(_));
    let (stream_asked, include_usage) = (
        sampling.stream,
        sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    );
    // A retry of a request answered before needs no weights and no plan.
    if name.request_hash.is_some() {
        let asked = name.clone();
        let stored = with_core(&shared, move |core, now| {
            core.idempotent_reply(wallet, &asked, now)
        })
        .await?;
        if let Some(row) = stored {
            return Ok(replay(row, &name.id, chat, stream_asked, include_usage));
        }
    }
    let model = crate::http::read(&shared, move |reads| reads.snapshot(&model_name)).await?;
    let limits = shared.serving.limits;
    let seed = u64::from_le_bytes(
        blake3::hash(name.id.as_bytes()).as_bytes()[..8]
            .try_into()
            .unwrap_or_default(),
    );
    let plan = {
        let tokenizer = model.tokenizer.clone();
        tokio::task::spawn_blocking(move || match &job {
            Job::Completion(r) => inference::plan_completion(r, &*tokenizer, &limits, seed),
            Job::Chat(r) => inference::plan_chat(r, &*tokenizer, &limits, seed),
        })
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code, e.message))?
    };
    let (prompt_tokens, max_tokens) = (plan.prompt.len() as u64, plan.max_tokens as u64);
    let id = name.id.clone();
    let hold = match reserve(&shared, wallet, name, prompt_tokens, max_tokens).await? {
        Reserved::Held(hold) => hold,
        Reserved::Replay(row) => {
            return Ok(replay(row, &id, chat, stream_asked, include_usage));
        }
    };
    let permit = tokio::time::timeout(
        BUSY_WAIT,
        shared.serving.generations.clone().acquire_owned(),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "every generation slot has been taken for 30 s; retry shortly",
        )
        .with_header(header::RETRY_AFTER, "5")
    })?;
    let envelope = Envelope::new(chat, &id, seconds((shared.clock)()), model.id.clone());
    if plan.stream {
        return Ok(stream(shared, hold, model, plan, envelope, permit));
    }
    let done = tokio::task::spawn_blocking({
        let shared = shared.clone();
        move || {
            let _permit = permit;
            generate(&shared, hold, &model, &plan, &mut |_| true)
        }
    })
    .await
    .map_err(|e| ApiError::internal(&e))??;
    Ok(envelope.reply(done.text, done.finish.reason(), done.usage, done.charged))
}

/// Generates on this (blocking) thread, then settles the hold: the wallet is charged once.
fn generate(
    shared: &Shared,
    hold: HoldGuard,
    model: &ModelSnapshot,
    plan: &Plan,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Done, ApiError> {
    let mut backend = model
        .model
        .open(&shared.serving.device, &model.params, engine::Purpose::Eval)
        .map_err(|e| ApiError::internal(&e))?;
    let outcome = inference::run(backend.as_mut(), &*model.tokenizer, plan, on_text)
        .map_err(|e| ApiError::internal(&e))?;
    let usage = Usage::new(plan.prompt.len() as u64, outcome.completion_tokens);
    shared
        .metrics
        .served(usage.prompt_tokens, usage.completion_tokens);
    let finished = Finished {
        model: model.id.clone(),
        text: outcome.text,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        finish_reason: outcome.finish.reason().into(),
    };
    let charged = hold.settle(&finished, (shared.clock)())?;
    Ok(Done {
        text: finished.text,
        usage,
        finish: outcome.finish,
        charged,
    })
}

/// Server-sent events: one chunk per piece of text, a last chunk with the finish reason
/// (and, if asked, one with the usage), then `[DONE]`. A client that goes away cancels
/// the generation; it is charged for the tokens generated.
fn stream(
    shared: Shared,
    hold: HoldGuard,
    model: ModelSnapshot,
    plan: Plan,
    envelope: Envelope,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(STREAM_QUEUE);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut first = true;
        if envelope.chat {
            // The role comes first, as OpenAI sends it.
            let _ = tx.blocking_send(envelope.chunk(Some(""), None, None, true));
            first = false;
        }
        let result = generate(&shared, hold, &model, &plan, &mut |piece| {
            let sent = tx
                .blocking_send(envelope.chunk(Some(piece), None, None, first))
                .is_ok();
            first = false;
            sent
        });
        match result {
            Ok(done) => {
                let _ =
                    tx.blocking_send(envelope.chunk(None, Some(done.finish.reason()), None, first));
                if plan.include_usage {
                    let _ = tx.blocking_send(envelope.chunk(None, None, Some(done.usage), false));
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(
                    serde_json::json!({"error": {"code": e.code, "message": e.message}})
                        .to_string(),
                );
            }
        }
        let _ = tx.blocking_send("[DONE]".to_owned());
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|data| (Ok::<_, Infallible>(Event::default().data(data)), rx))
    });
    Sse::new(events).into_response()
}
