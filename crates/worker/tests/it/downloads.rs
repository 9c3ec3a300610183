//! Every body the HTTP transport reads has a bound: a real server that sends more (with
//! or without saying so in `Content-Length`) is refused with `TransportError::TooLarge`,
//! and a run that declares a base larger than `BASE_BYTES_MAX` is refused before a
//! request is made.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use expect_test::{Expect, expect};
use protocol::api::BaseInfo;
use worker::{HttpTransport, Transport, TransportError};

/// What the server answers every request with.
struct Reply {
    status: u16,
    /// The `Content-Length` header, which may lie; none: the body ends when the
    /// connection closes.
    content_length: Option<u64>,
    /// More header lines, each ending in `\r\n`.
    headers: &'static str,
    body: Vec<u8>,
}

fn ok(content_length: Option<u64>, body_bytes: usize) -> Reply {
    Reply {
        status: 200,
        content_length,
        headers: "",
        body: vec![b' '; body_bytes],
    }
}

/// Serves `reply` to every connection on a fresh port; returns its URL and the count of
/// requests it read.
fn serve(reply: Reply) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            counted.fetch_add(1, Ordering::SeqCst);
            let length = reply
                .content_length
                .map(|n| format!("content-length: {n}\r\n"))
                .unwrap_or_default();
            let head = format!(
                "HTTP/1.1 {} X\r\nconnection: close\r\n{length}{}\r\n",
                reply.status, reply.headers
            );
            // The client hangs up once it has refused: a failed write is expected.
            let _ = stream
                .write_all(head.as_bytes())
                .and_then(|()| stream.write_all(&reply.body));
        }
    });
    (url, requests)
}

type Call = fn(&HttpTransport) -> Result<Vec<u8>, TransportError>;

fn base_of(bytes: u64) -> BaseInfo {
    BaseInfo {
        name: "b.gguf".into(),
        sha256: "0".repeat(64),
        bytes,
    }
}

/// Calls `call` against a server answering `reply`; `expect` is the outcome (the
/// server's URL written `URL`) and the count of requests the server read.
#[track_caller]
fn check(reply: Reply, call: Call, expect: Expect) {
    let (url, requests) = serve(reply);
    let transport = HttpTransport::new(&url).expect("transport");
    let outcome = match call(&transport) {
        Ok(bytes) => format!("{} bytes", bytes.len()),
        Err(e) => e.to_string().replace(&url, "URL"),
    };
    let requests = requests.load(Ordering::SeqCst);
    expect.assert_eq(&format!("{outcome}\nrequests: {requests}"));
}

#[test]
fn the_corpus_is_read_to_exactly_its_declared_size() {
    check(
        ok(Some(10), 10),
        |t| t.corpus(10),
        expect![[r#"
            10 bytes
            requests: 1"#]],
    );
    // A length over the declared size is refused before the body is read.
    check(
        ok(Some(11), 11),
        |t| t.corpus(10),
        expect![[r#"
            the corpus from URL/v1/run/corpus is larger than 10 bytes (the size /v1/run declares): the coordinator is broken or is not serving a hivetrain run; tell its operator, or join another coordinator
            requests: 1"#]],
    );
    // With no length, reading stops one byte past it.
    check(
        ok(None, 1 << 20),
        |t| t.corpus(10),
        expect![[r#"
            the corpus from URL/v1/run/corpus is larger than 10 bytes (the size /v1/run declares): the coordinator is broken or is not serving a hivetrain run; tell its operator, or join another coordinator
            requests: 1"#]],
    );
    check(
        ok(None, 9),
        |t| t.corpus(10),
        expect![[r#"
            the coordinator's reply to /v1/run/corpus is not understood: the corpus is 9 bytes, short of the 10 bytes of the size /v1/run declares
            requests: 1"#]],
    );
    check(
        ok(None, 0),
        |t| t.corpus(worker::CORPUS_BYTES_MAX + 1),
        expect![[r#"
            the corpus from URL/v1/run/corpus is larger than 2147483648 bytes (CORPUS_BYTES_MAX; the run declares 2147483649 bytes): the coordinator is broken or is not serving a hivetrain run; tell its operator, or join another coordinator
            requests: 0"#]],
    );
}

#[test]
fn the_base_is_read_to_exactly_its_declared_size() {
    check(
        ok(Some(16), 16),
        |t| t.base(&base_of(16)),
        expect![[r#"
            16 bytes
            requests: 1"#]],
    );
    check(
        ok(None, 17),
        |t| t.base(&base_of(16)),
        expect![[r#"
            the base model from URL/v1/run/base is larger than 16 bytes (the size /v1/run declares): the coordinator is broken or is not serving a hivetrain run; tell its operator, or join another coordinator
            requests: 1"#]],
    );
    // A declared size over BASE_BYTES_MAX is refused before anything is fetched.
    check(
        ok(None, 0),
        |t| t.base(&base_of(worker::BASE_BYTES_MAX + 1)),
        expect![[r#"
            the base model from URL/v1/run/base is larger than 8589934592 bytes (BASE_BYTES_MAX; the run declares 8589934593 bytes): the coordinator is broken or is not serving a hivetrain run; tell its operator, or join another coordinator
            requests: 0"#]],
    );
}

#[test]
fn tokenizers_models_and_json_replies_have_named_bounds() {
    check(
        ok(Some(worker::TOKENIZER_BYTES_MAX + 1), 0),
        |t| t.tokenizer(),
        expect![[r#"
            the tokenizer from URL/v1/run/tokenizer is larger than 67108864 bytes (TOKENIZER_BYTES_MAX): the coordinator is broken or is not serving a hivetrain run; tell its operator, or join another coordinator
            requests: 1"#]],
    );
    check(
        ok(Some(worker::MODEL_BYTES_MAX + 1), 0),
        |t| t.model(3),
        expect![[r#"
            model version 3 from URL/v1/models/3 is larger than 2147483648 bytes (MODEL_BYTES_MAX): the coordinator is broken or is not serving a hivetrain run; tell its operator, or join another coordinator
            requests: 1"#]],
    );
    let json_max = worker::JSON_REPLY_BYTES_MAX as usize;
    check(
        ok(None, json_max + 1),
        |t| t.run_info().map(|_| Vec::new()),
        expect![[r#"
            a JSON reply from URL/v1/run is larger than 1048576 bytes (JSON_REPLY_BYTES_MAX): the coordinator is broken or is not serving a hivetrain run; tell its operator, or join another coordinator
            requests: 1"#]],
    );
    // An error reply over the bound is read no further: the refusal says only its status.
    check(
        Reply {
            status: 403,
            content_length: None,
            headers: "",
            body: vec![b'x'; json_max + 1],
        },
        |t| t.tokenizer(),
        expect![[r#"
            the coordinator refused:  (http_403)
            requests: 1"#]],
    );
}

/// A 503 is `TransportError::Busy`, not unreachable, carrying the wait its `Retry-After`
/// asks for, bounded by `BUSY_RETRY_AFTER_MAX` (`BUSY_RETRY_DEFAULT` when it names none).
#[test]
fn busy_answers_carry_their_bounded_wait() {
    let body = br#"{"error":{"code":"scorers_busy","message":"busy"}}"#;
    for (headers, expect) in [
        ("retry-after: 7\r\n", std::time::Duration::from_secs(7)),
        ("retry-after: 86400\r\n", worker::BUSY_RETRY_AFTER_MAX),
        ("", worker::BUSY_RETRY_DEFAULT),
    ] {
        let (url, _) = serve(Reply {
            status: 503,
            content_length: Some(body.len() as u64),
            headers,
            body: body.to_vec(),
        });
        let transport = HttpTransport::new(&url).expect("transport");
        match transport.tokenizer() {
            Err(TransportError::Busy {
                refusal,
                retry_after,
                ..
            }) => assert_eq!(
                (refusal.code.as_str(), retry_after),
                ("scorers_busy", expect),
                "{headers:?}"
            ),
            other => panic!("{headers:?}: {other:?}"),
        }
    }
}
