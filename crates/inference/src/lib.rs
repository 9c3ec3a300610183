//! Text generation as a service: an OpenAI request becomes a checked [`Plan`] (prompt
//! tokens, sampling, stops, limits), and [`run`] generates it with the engine's KV cache,
//! handing out text as it becomes final (whole UTF-8 characters, never a piece of a
//! stop string) and stopping at a stop string, the end-of-text token or the token limit.
//!
//! No IO and no clock: the server passes the backend, the model's [`Vocab`] (its
//! tokenizer and chat format) and a fallback seed.

pub mod api;
mod vocab;

pub use vocab::{PretrainedVocab, Vocab, VocabError};

// The tests of plans and runs use hivetrain's GPT-2 tokenizer by its name.
#[cfg(test)]
use data::TextTokenizer;

use engine::generate::SamplingParams;
use engine::{Backend, EngineError};

use crate::api::{ChatRequest, CompletionRequest, Message, Sampling};

/// What requests may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest `max_tokens`.
    pub max_tokens: u64,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: u64,
    /// Longest prompt, in tokens.
    pub prompt_tokens: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_tokens: 1024,
            default_max_tokens: 64,
            prompt_tokens: 4096,
        }
    }
}

/// At most this many stop strings, each of 1 to [`STOP_BYTES_MAX`] bytes (OpenAI's limits).
pub const STOPS_MAX: usize = 4;
pub const STOP_BYTES_MAX: usize = 64;

/// A request that cannot be served as asked: a stable code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub code: &'static str,
    pub message: String,
}

fn refuse(code: &'static str, message: impl Into<String>) -> RequestError {
    RequestError {
        code,
        message: message.into(),
    }
}

/// A checked request, ready to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stops: Vec<String>,
    pub stream: bool,
    /// Send a last chunk with the usage (`stream_options.include_usage`).
    pub include_usage: bool,
}

/// The prompt the chat endpoint feeds a GPT-2 of hivetrain's (its [`Vocab`]): each message as a speaker's turn the way
/// the corpus writes them (`NAME:` on its line, the text, a blank line), the system
/// message first without a name, then `ASSISTANT:` for the model to go on. Chat replies
/// stop at a blank line (the end of a turn) unless the request names its own stops.
pub fn chat_prompt(messages: &[Message]) -> String {
    let mut prompt = String::new();
    for m in messages {
        let text = m.content.text();
        match m.role.as_str() {
            "system" | "developer" => prompt.push_str(&format!("{}\n\n", text.trim_end())),
            role => prompt.push_str(&format!(
                "{}:\n{}\n\n",
                role.to_uppercase(),
                text.trim_end()
            )),
        }
    }
    prompt.push_str("ASSISTANT:\n");
    prompt
}

/// The stop of a chat turn when the request names none.
pub const CHAT_STOP: &str = "\n\n";

/// Checks a completion request.
pub fn plan_completion(
    request: &CompletionRequest,
    vocab: &dyn Vocab,
    limits: &Limits,
    seed: u64,
) -> Result<Plan, RequestError> {
    let prompts = request.prompt.clone().into_vec();
    let [prompt] = prompts.as_slice() else {
        return Err(refuse(
            "unsupported",
            format!(
                "one prompt per request is served; this one has {}",
                prompts.len()
            ),
        ));
    };
    plan(prompt, &request.sampling, vocab, limits, seed, &[])
}

/// Checks a chat request; the prompt and the default stops are the vocabulary's chat
/// format's.
pub fn plan_chat(
    request: &ChatRequest,
    vocab: &dyn Vocab,
    limits: &Limits,
    seed: u64,
) -> Result<Plan, RequestError> {
    if request.messages.is_empty() {
        return Err(refuse(
            "empty_prompt",
            "messages is empty: send at least one",
        ));
    }
    if let Some(m) = request.messages.iter().find(|m| {
        !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant"
        )
    }) {
        return Err(refuse(
            "bad_role",
            format!(
                "role {:?} is not one of system, developer, user, assistant",
                m.role
            ),
        ));
    }
    if request
        .messages
        .iter()
        .all(|m| m.content.text().trim().is_empty())
    {
        return Err(refuse("empty_prompt", "every message is empty"));
    }
    let prompt = vocab
        .chat_prompt(&request.messages)
        .map_err(|e| refuse("bad_prompt", e.to_string()))?;
    plan(
        &prompt,
        &request.sampling,
        vocab,
        limits,
        seed,
        vocab.chat_stops(),
    )
}

fn plan(
    prompt: &str,
    s: &Sampling,
    vocab: &dyn Vocab,
    limits: &Limits,
    seed: u64,
    default_stops: &[&str],
) -> Result<Plan, RequestError> {
    if prompt.trim().is_empty() {
        return Err(refuse("empty_prompt", "the prompt is empty"));
    }
    if s.n.is_some_and(|n| n != 1) {
        return Err(refuse(
            "unsupported",
            "n must be 1: one choice per request is served",
        ));
    }
    let max_tokens = match s.max_completion_tokens.or(s.max_tokens) {
        None => limits.default_max_tokens,
        Some(n) if n >= 1 && n as u64 <= limits.max_tokens => n as u64,
        Some(n) => {
            return Err(refuse(
                "bad_max_tokens",
                format!("max_tokens is {n}; it must be 1 to {}", limits.max_tokens),
            ));
        }
    };
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(refuse(
            "bad_temperature",
            format!("temperature is {temperature}; it must be 0 to 2"),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(refuse(
            "bad_top_p",
            format!("top_p is {top_p}; it must be above 0 and at most 1"),
        ));
    }
    let top_k = match s.top_k {
        None | Some(-1) => 0,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(refuse(
                "bad_top_k",
                format!("top_k is {k}; it must be 0 or more (0 or -1: all tokens)"),
            ));
        }
    };
    let stops = match &s.stop {
        Some(stop) => stop.clone().into_vec(),
        None => default_stops.iter().map(|s| (*s).to_owned()).collect(),
    };
    if stops.len() > STOPS_MAX
        || stops
            .iter()
            .any(|s| s.is_empty() || s.len() > STOP_BYTES_MAX)
    {
        return Err(refuse(
            "bad_stop",
            format!("stop must be at most {STOPS_MAX} strings of 1 to {STOP_BYTES_MAX} bytes"),
        ));
    }
    let ids = vocab
        .encode(prompt)
        .map_err(|e| refuse("bad_prompt", e.to_string()))?;
    if ids.len() as u64 > limits.prompt_tokens {
        return Err(refuse(
            "prompt_too_long",
            format!(
                "the prompt is {} tokens; at most {} are served",
                ids.len(),
                limits.prompt_tokens
            ),
        ));
    }
    Ok(Plan {
        prompt: ids,
        max_tokens: max_tokens as usize,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: s.seed.map_or(seed, |s| s as u64),
        },
        stops,
        stream: s.stream,
        include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// Why generation ended, as OpenAI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop string or a stop token ([`Vocab::stop_tokens`]).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The receiver of the text went away.
    Cancelled,
}

impl Finish {
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Stop | Finish::Cancelled => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a generation produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub text: String,
    /// Tokens the model generated (a stop token and a stop string's tokens included:
    /// they were computed).
    pub completion_tokens: u64,
    pub finish: Finish,
}

/// Generates `plan`, calling `on_text` with each piece of text as it becomes final (the
/// pieces concatenate to `Outcome::text`); `on_text` returning false cancels.
/// A stop token ends generation and is never text.
pub fn run(
    backend: &mut dyn Backend,
    vocab: &dyn Vocab,
    plan: &Plan,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Outcome, EngineError> {
    let stop_tokens = vocab.stop_tokens();
    // Text that could still be the start of a stop string is held back.
    let hold = plan.stops.iter().map(|s| s.len()).max().unwrap_or(1) - 1;
    let mut ids: Vec<u32> = Vec::new();
    let mut text = String::new();
    let mut emitted = 0usize;
    let mut generated = 0u64;
    let mut finish = Finish::Length;
    let mut cut: Option<usize> = None;
    engine::generate::generate(
        backend,
        &plan.prompt,
        plan.max_tokens,
        &plan.sampling,
        &mut |id| {
            generated += 1;
            if stop_tokens.contains(&id) {
                finish = Finish::Stop;
                return false;
            }
            ids.push(id);
            text = vocab.decode(&ids);
            let from = emitted.saturating_sub(STOP_BYTES_MAX);
            if let Some(at) = plan
                .stops
                .iter()
                .filter_map(|s| {
                    text.get(from..)
                        .and_then(|t| t.find(s.as_str()))
                        .map(|i| from + i)
                })
                .min()
            {
                cut = Some(at);
                finish = Finish::Stop;
                return false;
            }
            // Final text: not the held-back tail, not an unfinished UTF-8 character
            // (decoded as U+FFFD until its last byte comes).
            let mut end = text.trim_end_matches('\u{FFFD}').len().saturating_sub(hold);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            if end > emitted {
                let piece = &text[emitted..end];
                emitted = end;
                if !on_text(piece) {
                    finish = Finish::Cancelled;
                    return false;
                }
            }
            true
        },
    )?;
    // Held-back pieces never hold a whole stop string, so a stop starts at or after
    // what was handed out.
    let end = match finish {
        Finish::Cancelled => emitted,
        _ => cut.unwrap_or(text.len()).max(emitted),
    };
    if end > emitted {
        on_text(&text[emitted..end]);
    }
    text.truncate(end);
    Ok(Outcome {
        text,
        completion_tokens: generated,
        finish,
    })
}

#[cfg(test)]
mod tests;
