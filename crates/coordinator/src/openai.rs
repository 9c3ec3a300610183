//! The OpenAI-compatible inference API, paid for with credit.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/models` | `hivetrain` (the newest version) and `hivetrain-vN` |
//! | `POST /v1/completions` | a completion, or server-sent events with `stream: true` |
//! | `POST /v1/chat/completions` | a chat completion (the template is `inference::chat_prompt`) |
//! | `GET /v1/keys/challenge` | a challenge for a wallet to sign |
//! | `POST /v1/keys` | an API key for a wallet that signed a challenge |
//! | `POST /v1/keys/revoke` | revokes the key in `Authorization` |
//!
//! A request carries `Authorization: Bearer hk-...`; its key's wallet pays. The order:
//! the key and its rate limit, the body, the model's weights (under the core's lock),
//! the prompt's tokens, the price at `max_tokens` against the balance (402 if short),
//! generation on a blocking thread with no lock held, then one spend entry for the
//! tokens used. `Idempotency-Key` names a request: a retry with the same key is not
//! charged twice (and, with no seed given, samples the same text).

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

use crate::core::serving::{KEY_CHALLENGE_CONTEXT, ModelSnapshot};
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
    pub(crate) threads: u32,
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
    let (ids, now) = with_core(&shared, |core, now| Ok((core.model_ids(), now))).await?;
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
    /// The exact bytes to sign with the wallet's key.
    message: String,
}

async fn key_challenge(State(shared): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    let (challenge, expires_ms) = with_core(&shared, |core, now| core.key_challenge(now)).await?;
    Ok(axum::Json(ChallengeReply {
        message: format!("{KEY_CHALLENGE_CONTEXT}{challenge}"),
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

async fn revoke_key(
    State(shared): State<Shared>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let key = bearer(&headers)?;
    with_core(&shared, move |core, now| core.revoke_api_key(&key, now)).await?;
    Ok(axum::Json(serde_json::json!({ "revoked": true })))
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

/// The request's name: its `Idempotency-Key`, or a fresh one.
fn request_id(headers: &HeaderMap) -> Result<String, ApiError> {
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
            Ok(key.to_owned())
        }
        None => {
            let mut bytes = [0u8; 16];
            getrandom::fill(&mut bytes)
                .map_err(|e| ApiError::internal(&std::io::Error::other(e)))?;
            Ok(hex::encode(bytes))
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
    let (wallet, id) = admit(&shared, &headers).await?;
    let request = parse_json(&read_body(body, BODY_MAX, shared.body_deadline).await?)?;
    serve(shared, wallet, id, Job::Completion(request)).await
}

async fn chat_completions(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (wallet, id) = admit(&shared, &headers).await?;
    let request = parse_json(&read_body(body, BODY_MAX, shared.body_deadline).await?)?;
    serve(shared, wallet, id, Job::Chat(request)).await
}

/// The paying wallet and the request's id, after the key and its rate limit.
async fn admit(shared: &Shared, headers: &HeaderMap) -> Result<(WorkerId, String), ApiError> {
    let key = bearer(headers)?;
    let wallet = with_core(shared, {
        let key = key.clone();
        move |core, _| core.api_key_wallet(&key)
    })
    .await?;
    rate_limit(&shared.serving, &key, (shared.clock)())?;
    Ok((wallet, request_id(headers)?))
}

/// What the generation thread reports at the end.
struct Done {
    text: String,
    usage: Usage,
    finish: Finish,
    charged: u64,
}

async fn serve(
    shared: Shared,
    wallet: WorkerId,
    id: String,
    job: Job,
) -> Result<Response, ApiError> {
    let name = match &job {
        Job::Completion(r) => r.model.clone(),
        Job::Chat(r) => r.model.clone(),
    };
    let model = with_core(&shared, move |core, _| core.snapshot(&name)).await?;
    let limits = shared.serving.limits;
    let seed = u64::from_le_bytes(
        blake3::hash(id.as_bytes()).as_bytes()[..8]
            .try_into()
            .unwrap_or_default(),
    );
    let (plan, chat) = {
        let tokenizer = model.tokenizer.clone();
        let planned = tokio::task::spawn_blocking(move || match &job {
            Job::Completion(r) => (
                inference::plan_completion(r, &tokenizer, &limits, seed),
                false,
            ),
            Job::Chat(r) => (inference::plan_chat(r, &tokenizer, &limits, seed), true),
        })
        .await
        .map_err(|e| ApiError::internal(&e))?;
        let plan = planned
            .0
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code, e.message))?;
        (plan, planned.1)
    };
    let (prompt_tokens, max_tokens) = (plan.prompt.len() as u64, plan.max_tokens as u64);
    let paid_id = id.clone();
    with_core(&shared, move |core, _| {
        core.check_funds(wallet, &paid_id, prompt_tokens, max_tokens)
    })
    .await?;
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
    let created = seconds((shared.clock)());
    let object_id = format!("{}-{id}", if chat { "chatcmpl" } else { "cmpl" });
    let model_id = model.id.clone();
    if plan.stream {
        return Ok(stream(
            shared, wallet, id, model, plan, chat, object_id, created, permit,
        ));
    }
    let done = tokio::task::spawn_blocking({
        let shared = shared.clone();
        move || {
            let _permit = permit;
            generate(&shared, wallet, &id, &model, &plan, &mut |_| true)
        }
    })
    .await
    .map_err(|e| ApiError::internal(&e))??;
    let mut response = if chat {
        axum::Json(ChatCompletion {
            id: object_id,
            object: "chat.completion".into(),
            created,
            model: model_id,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content: done.text,
                },
                logprobs: None,
                finish_reason: done.finish.reason().into(),
            }],
            usage: done.usage,
        })
        .into_response()
    } else {
        axum::Json(Completion {
            id: object_id,
            object: "text_completion".into(),
            created,
            model: model_id,
            choices: vec![CompletionChoice {
                text: done.text,
                index: 0,
                logprobs: None,
                finish_reason: Some(done.finish.reason().into()),
            }],
            usage: Some(done.usage),
        })
        .into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&done.charged.to_string()) {
        response.headers_mut().insert("x-hivetrain-charged", v);
    }
    Ok(response)
}

/// Generates on this (blocking) thread, then charges the wallet once.
fn generate(
    shared: &Shared,
    wallet: WorkerId,
    id: &str,
    model: &ModelSnapshot,
    plan: &Plan,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Done, ApiError> {
    let device = format!("cpu:{}", shared.serving.threads.max(1));
    let mut backend = engine::open_backend(&device, model.config, (*model.params).clone())
        .map_err(|e| ApiError::internal(&e))?;
    let outcome = inference::run(backend.as_mut(), &model.tokenizer, plan, on_text)
        .map_err(|e| ApiError::internal(&e))?;
    let usage = Usage::new(plan.prompt.len() as u64, outcome.completion_tokens);
    shared
        .metrics
        .served(usage.prompt_tokens, usage.completion_tokens);
    let charged = {
        let mut core = shared
            .core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        core.charge(
            wallet,
            id,
            usage.prompt_tokens,
            usage.completion_tokens,
            (shared.clock)(),
        )?
    };
    Ok(Done {
        text: outcome.text,
        usage,
        finish: outcome.finish,
        charged,
    })
}

/// Server-sent events: one chunk per piece of text, a last chunk with the finish reason
/// (and, if asked, one with the usage), then `[DONE]`. A client that goes away cancels
/// the generation; it is charged for the tokens generated.
#[allow(clippy::too_many_arguments)]
fn stream(
    shared: Shared,
    wallet: WorkerId,
    id: String,
    model: ModelSnapshot,
    plan: Plan,
    chat: bool,
    object_id: String,
    created: u64,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(STREAM_QUEUE);
    let chunk = {
        let model_name = model.id.clone();
        move |text: Option<&str>,
              finish: Option<&str>,
              usage: Option<Usage>,
              first: bool|
              -> String {
            let json = if chat {
                serde_json::to_string(&ChatChunk {
                    id: object_id.clone(),
                    object: "chat.completion.chunk".into(),
                    created,
                    model: model_name.clone(),
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
                    id: object_id.clone(),
                    object: "text_completion".into(),
                    created,
                    model: model_name.clone(),
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
    };
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut first = true;
        if chat {
            // The role comes first, as OpenAI sends it.
            let _ = tx.blocking_send(chunk(Some(""), None, None, true));
            first = false;
        }
        let result = generate(&shared, wallet, &id, &model, &plan, &mut |piece| {
            let sent = tx
                .blocking_send(chunk(Some(piece), None, None, first))
                .is_ok();
            first = false;
            sent
        });
        match result {
            Ok(done) => {
                let _ = tx.blocking_send(chunk(None, Some(done.finish.reason()), None, first));
                if plan.include_usage {
                    let _ = tx.blocking_send(chunk(None, None, Some(done.usage), false));
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
