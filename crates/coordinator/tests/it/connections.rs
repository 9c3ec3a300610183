//! Slow, silent and greedy clients over raw sockets: each is cut at its deadline with
//! its code, `/health` answers all the while, and connections past the cap wait in the
//! kernel's queue instead of taking the server down. A worker told that uploads are busy
//! sends its update again.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use test_support as ts;

const HEADER_MS: u64 = 500;
const BODY_MS: u64 = 1_000;
const SEND_MS: u64 = 800;

fn config(dir: &std::path::Path, max_connections: u32) -> coordinator::CoordinatorConfig {
    let mut c = ts::hand_made(ts::tiny_config(dir, 2));
    c.http.max_connections = max_connections;
    c.http.header_timeout_ms = HEADER_MS;
    c.http.body_timeout_ms = BODY_MS;
    c.http.send_timeout_ms = SEND_MS;
    c
}

/// What a client does on its connection.
#[derive(Clone)]
enum Client {
    /// Sends these bytes, then waits.
    Sends(Vec<u8>),
    /// Sends these bytes, then one more byte every 50 ms while the connection lasts.
    Trickles(Vec<u8>),
}

/// What came back on a connection (`"408 body_timeout"`, `"200"`, or `"nothing"`), and
/// when the server closed it, from the connect.
fn run(addr: SocketAddr, client: &Client) -> (String, Duration) {
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr).expect("connect");
    let mut got = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    match client {
        Client::Sends(bytes) => stream.write_all(bytes).expect("send"),
        Client::Trickles(bytes) => {
            stream.write_all(bytes).expect("send");
            stream
                .set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            while start.elapsed() < Duration::from_secs(10) && stream.write_all(b"x").is_ok() {
                match stream.read(&mut buf) {
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        break;
                    }
                    Err(e) if is_wait(&e) => {}
                    Err(_) => break,
                }
            }
        }
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_wait(&e) => panic!("still open after 5 s: {e}"),
            Err(_) => break, // reset: closed too
        }
    }
    (outcome(&got), start.elapsed())
}

fn is_wait(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// The status and error code of the first reply in `bytes`.
fn outcome(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let Some(status) = text.split_whitespace().nth(1) else {
        return "nothing".into();
    };
    let code = text
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(body).ok())
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
    match code {
        Some(code) => format!("{status} {code}"),
        None => status.to_owned(),
    }
}

fn post_head(path: &str, length: u64) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n").into_bytes()
}

/// Runs every client at once; each must get `reply` and be closed `at_ms` after its
/// connect (not before, and at most 800 ms after: the machine may be busy). Meanwhile a
/// new client's `/health` is answered at once.
#[track_caller]
fn check(addr: SocketAddr, cases: &[(&str, Client, &str, u64)]) {
    let threads: Vec<_> = cases
        .iter()
        .map(|(_, client, _, _)| {
            let client = client.clone();
            std::thread::spawn(move || run(addr, &client))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    let health = ts::get(&format!("http://{addr}"), "/health");
    assert_eq!(health.status, 200, "{health:?}");
    assert!(
        asked.elapsed() < Duration::from_millis(300),
        "{:?}",
        asked.elapsed()
    );
    for ((what, _, reply, at_ms), thread) in cases.iter().zip(threads) {
        let (got, closed) = thread.join().expect("client");
        eprintln!("{what}: {got}, closed after {closed:?}");
        assert_eq!(got, *reply, "{what}");
        let at = Duration::from_millis(*at_ms);
        assert!(
            closed + Duration::from_millis(20) >= at && closed <= at + Duration::from_millis(800),
            "{what}: closed after {closed:?}, its deadline is {at:?}"
        );
    }
}

#[test]
fn slow_and_silent_clients_are_cut_at_their_deadlines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ts::start(dir.path(), config(dir.path(), 64));
    let addr = server.addr();
    let mut kilobyte = post_head("/v1/lease", 60_000);
    kilobyte.extend_from_slice(&[b'{'; 1024]);
    let mut update_start = post_head("/v1/updates", 100_000);
    update_start.extend_from_slice(&[0; 1024]);
    let mut declared_500_mb = post_head("/v1/updates", 500 << 20);
    declared_500_mb.extend_from_slice(&[0; 1024]);
    let health = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n".to_vec();
    let mut huge_head = b"GET /health HTTP/1.1\r\nX-Big: ".to_vec();
    huge_head.extend_from_slice(&[b'a'; 100 * 1024]);
    check(
        addr,
        &[
            (
                "a silent socket",
                Client::Sends(vec![]),
                "nothing",
                HEADER_MS,
            ),
            (
                "a head a byte at a time",
                Client::Trickles(b"GET /health HTTP/1.1\r\nX-Slow: ".to_vec()),
                "nothing",
                HEADER_MS,
            ),
            (
                "a kept-alive connection left idle",
                Client::Sends(health),
                "200",
                HEADER_MS,
            ),
            (
                "a JSON body trickling in",
                Client::Trickles(kilobyte),
                "408 body_timeout",
                BODY_MS,
            ),
            (
                "an update trickling in",
                Client::Trickles(update_start),
                "408 body_timeout",
                BODY_MS,
            ),
            (
                "500 MB declared, 1 KB sent, to /v1/updates",
                Client::Sends(declared_500_mb),
                "413 body_too_large",
                0,
            ),
            ("a head of 100 KiB", Client::Sends(huge_head), "431", 0),
            (
                "500 MB declared to a JSON route",
                Client::Sends(post_head("/v1/transfers", 500 << 20)),
                "413 body_too_large",
                0,
            ),
        ],
    );

    // A client that asks for models and takes none of the bytes is cut once the socket
    // is full, before it has them all.
    let one = reqwest::blocking::get(format!("{}/v1/models/0", server.url()))
        .and_then(|r| r.bytes())
        .expect("GET /v1/models/0")
        .len();
    let mut stream = TcpStream::connect(addr).expect("connect");
    let asks = 30;
    stream
        .write_all(&b"GET /v1/models/0 HTTP/1.1\r\nHost: t\r\n\r\n".repeat(asks))
        .expect("send");
    std::thread::sleep(Duration::from_millis(SEND_MS + 600));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if is_wait(&e) => panic!("still open after 5 s, {got} bytes read"),
            Err(_) => break,
        }
    }
    eprintln!(
        "a client that reads nothing: cut after {got} bytes of {}",
        asks * one
    );
    assert!(got < asks * one / 2, "{got} bytes of {}", asks * one);
    assert_eq!(ts::get(&server.url(), "/health").status, 200);
    server.stop();
}

#[test]
fn connections_past_the_cap_wait_their_turn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ts::start(dir.path(), config(dir.path(), 4));
    let addr = server.addr();
    // Ten silent sockets: four are admitted and cut at the header deadline, then the
    // next four, then the last two with the health check behind them.
    let silent: Vec<_> = (0..10)
        .map(|_| {
            let connected = TcpStream::connect(addr).expect("connect");
            std::thread::spawn(move || {
                let mut stream = connected;
                let start = Instant::now();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let _ = stream.read(&mut [0u8; 16]);
                start.elapsed()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let (health, answered) = run(
        addr,
        &Client::Sends(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec()),
    );
    let mut closed: Vec<_> = silent
        .into_iter()
        .map(|t| t.join().expect("socket"))
        .collect();
    closed.sort();
    eprintln!("silent sockets closed after {closed:?}; health answered after {answered:?}");
    let header = Duration::from_millis(HEADER_MS);
    let first_wave = closed.iter().filter(|c| **c < header * 3 / 2).count();
    assert_eq!(first_wave, 4, "{closed:?}");
    assert!(closed[9] < header * 4, "{closed:?}");
    assert_eq!(health, "200");
    assert!(
        answered > header && answered < header * 3,
        "health answered after {answered:?}, {closed:?}"
    );
    assert_eq!(ts::get(&server.url(), "/health").status, 200);
    server.stop();
}

#[test]
fn a_worker_told_uploads_are_busy_sends_its_update_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ts::tiny_config(dir.path(), 1);
    config.http.upload_concurrency = 1;
    let server = ts::start(dir.path(), config);
    // The only upload permit, held by an update that has sent 1 KiB of its body.
    let mut holder = TcpStream::connect(server.addr()).expect("connect");
    let mut head =
        b"POST /v1/updates HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n"
            .to_vec();
    head.extend_from_slice(&[0; 1024]);
    holder.write_all(&head).expect("send");

    let transport = worker::HttpTransport::new(&server.url()).expect("transport");
    let options = worker::WorkerOptions {
        max_units: Some(1),
        ..ts::worker_options(dir.path(), "w")
    };
    let worker = std::thread::spawn(move || {
        let stop = std::sync::atomic::AtomicBool::new(false);
        worker::run(&transport, &ts::key(1), &options, &stop, &mut ())
    });
    let busy = r#"hivetrain_http_requests_total{route="/v1/updates",method="POST",status="503"}"#;
    let started = Instant::now();
    while !ts::get(&server.url(), "/metrics")
        .body
        .as_str()
        .is_some_and(|m| m.contains(busy))
    {
        assert!(
            !worker.is_finished(),
            "the worker stopped before it was told to wait"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no 503 after 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(holder);
    let summary = worker.join().expect("worker thread").expect("worker run");
    assert_eq!((summary.accepted, summary.rejected), (1, 0), "{summary:?}");
    server.stop();
}
