use std::path::Path;

use engine::Preset;

use super::*;
use crate::api::Content;

fn tokenizer() -> TextTokenizer {
    TextTokenizer::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tokenizer.json"))
        .expect("tokenizer")
}

fn backend(tok: &TextTokenizer) -> Box<dyn Backend> {
    let config = Preset::Tiny.config(tok.vocab_size());
    let params = engine::init_params(&config, 7).expect("params");
    engine::open_backend("cpu:1", config, params).expect("backend")
}

fn completion(json: &str) -> CompletionRequest {
    serde_json::from_str(json).expect("request json")
}

/// Each request's plan, or its refusal's code and sentence.
#[track_caller]
fn check(json: &str, expect: expect_test::Expect) {
    let tok = tokenizer();
    let got = match plan_completion(&completion(json), &tok, &Limits::default(), 99) {
        Ok(p) => format!(
            "ok: {} prompt tokens, max {}, t {} k {} p {} seed {}, stops {:?}, stream {} usage {}",
            p.prompt.len(),
            p.max_tokens,
            p.sampling.temperature,
            p.sampling.top_k,
            p.sampling.top_p,
            p.sampling.seed,
            p.stops,
            p.stream,
            p.include_usage
        ),
        Err(e) => format!("{}: {}", e.code, e.message),
    };
    expect.assert_eq(&got);
}

#[test]
fn requests_are_checked() {
    check(
        r#"{"model":"m","prompt":"KING HENRY:"}"#,
        expect_test::expect![[
            r#"ok: 3 prompt tokens, max 64, t 1 k 0 p 1 seed 99, stops [], stream false usage false"#
        ]],
    );
    check(
        r#"{"model":"m","prompt":["To be"],"max_tokens":5,"temperature":0,"top_k":40,"top_p":0.9,"seed":3,"stop":"\n","stream":true,"stream_options":{"include_usage":true},"logprobs":null,"user":"x"}"#,
        expect_test::expect![[
            r#"ok: 2 prompt tokens, max 5, t 0 k 40 p 0.9 seed 3, stops ["\n"], stream true usage true"#
        ]],
    );
    check(
        r#"{"model":"m","prompt":"  "}"#,
        expect_test::expect!["empty_prompt: the prompt is empty"],
    );
    check(
        r#"{"model":"m","prompt":["a","b"]}"#,
        expect_test::expect!["unsupported: one prompt per request is served; this one has 2"],
    );
    check(
        r#"{"model":"m","prompt":"a","max_tokens":-1}"#,
        expect_test::expect!["bad_max_tokens: max_tokens is -1; it must be 1 to 1024"],
    );
    check(
        r#"{"model":"m","prompt":"a","max_tokens":1000000}"#,
        expect_test::expect!["bad_max_tokens: max_tokens is 1000000; it must be 1 to 1024"],
    );
    check(
        r#"{"model":"m","prompt":"a","temperature":3}"#,
        expect_test::expect!["bad_temperature: temperature is 3; it must be 0 to 2"],
    );
    check(
        r#"{"model":"m","prompt":"a","top_p":0}"#,
        expect_test::expect!["bad_top_p: top_p is 0; it must be above 0 and at most 1"],
    );
    check(
        r#"{"model":"m","prompt":"a","n":2}"#,
        expect_test::expect!["unsupported: n must be 1: one choice per request is served"],
    );
    check(
        r#"{"model":"m","prompt":"a","stop":["1","2","3","4","5"]}"#,
        expect_test::expect!["bad_stop: stop must be at most 4 strings of 1 to 64 bytes"],
    );
}

#[test]
fn the_chat_template_reads_like_the_corpus() {
    let m = |role: &str, text: &str| Message {
        role: role.into(),
        content: Content::Text(text.into()),
    };
    let prompt = chat_prompt(&[
        m("system", "A play."),
        m("user", "Who goes there?"),
        m("assistant", "A friend."),
        m("user", "Speak."),
    ]);
    expect_test::expect![[r#"
        A play.

        USER:
        Who goes there?

        ASSISTANT:
        A friend.

        USER:
        Speak.

        ASSISTANT:
    "#]]
    .assert_eq(&prompt);
    let tok = tokenizer();
    let request = ChatRequest {
        model: "m".into(),
        messages: vec![m("robot", "hi")],
        sampling: Sampling::default(),
    };
    let err = plan_chat(&request, &tok, &Limits::default(), 0).expect_err("bad role");
    assert_eq!(err.code, "bad_role");
    let request = ChatRequest {
        messages: vec![m("user", "Speak.")],
        ..request
    };
    let plan = plan_chat(&request, &tok, &Limits::default(), 0).expect("plan");
    assert_eq!(plan.stops, [CHAT_STOP]);
}

/// Generation stops at a stop string (greedy text up to its first occurrence), the
/// streamed pieces add up to the text, and `max_tokens` bounds the tokens.
#[test]
fn stops_streaming_and_limits() {
    let tok = tokenizer();
    let mut backend = backend(&tok);
    let request =
        completion(r#"{"model":"m","prompt":"KING HENRY:\n","max_tokens":40,"temperature":0}"#);
    let free = plan_completion(&request, &tok, &Limits::default(), 0).expect("plan");
    let mut pieces = Vec::new();
    let full = run(backend.as_mut(), &tok, &free, &mut |t| {
        pieces.push(t.to_owned());
        true
    })
    .expect("run");
    assert_eq!(full.finish, Finish::Length);
    assert_eq!(full.completion_tokens, 40);
    assert_eq!(pieces.concat(), full.text);
    assert!(pieces.len() > 1, "the text comes in pieces");

    // A stop string taken from the middle of that text.
    let chars: Vec<char> = full.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let first = full.text.find(&stop).expect("stop occurs");
    let mut stopped_plan = free.clone();
    stopped_plan.stops = vec![stop.clone()];
    let mut pieces = Vec::new();
    let stopped = run(backend.as_mut(), &tok, &stopped_plan, &mut |t| {
        pieces.push(t.to_owned());
        true
    })
    .expect("run");
    assert_eq!(stopped.finish, Finish::Stop);
    assert_eq!(stopped.text, full.text[..first]);
    assert_eq!(pieces.concat(), stopped.text);
    assert!(stopped.completion_tokens < 40);

    // The receiver going away cancels at once.
    let mut calls = 0;
    let cancelled = run(backend.as_mut(), &tok, &free, &mut |_| {
        calls += 1;
        false
    })
    .expect("run");
    assert_eq!((cancelled.finish, calls), (Finish::Cancelled, 1));
    assert!(full.text.starts_with(&cancelled.text));
}
