//! Update bodies against a real `hivetrain coordinator` process: oversized ones are
//! refused before they are read, uploads past the cap get a 503 with `Retry-After`, and
//! the process's resident memory stays put.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::{Sandbox, repo, small_corpus};

/// Bodies each client tries to send: far over a tiny run's update (about 290 KB).
const BODY_BYTES: usize = 48 << 20;
const UPLOADS: usize = 4;
/// Most the coordinator's resident memory may grow while 8 clients try to send 384 MiB.
const GROWTH_MAX_KIB: u64 = 24 << 10;

/// The coordinator process, killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `VmRSS` and `VmHWM` (the peak) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Starts `hivetrain coordinator` on a tiny run that reads `UPLOADS` bodies at once.
fn start(sandbox: &Sandbox) -> (Child, SocketAddr) {
    let config = format!(
        "preset = \"tiny\"\ncorpus = {:?}\ntokenizer = {:?}\nbatch = 4\nholdout_batches = 4\n[devices]\nholdout = \"cpu:1\"\n[spot_check]\nenabled = false\n[http]\nupload_concurrency = {UPLOADS}\n",
        small_corpus(sandbox),
        repo("data/tokenizer.json"),
    );
    let config = sandbox.write("coordinator.toml", config.as_bytes());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hivetrain"))
        .args(["coordinator", "--bind", "127.0.0.1:0", "--dir"])
        .arg(sandbox.path("run"))
        .arg("--config")
        .arg(&config)
        .env("HIVETRAIN_CACHE_DIR", sandbox.path("cache"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("hivetrain coordinator");
    let stderr = child.stderr.take().expect("stderr");
    let child = Child(child);
    let mut lines = std::io::BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("a line").expect("stderr");
        if let Some(rest) = line.strip_prefix("coordinator listening on http://") {
            let addr = rest.split_whitespace().next().expect("an address");
            break addr.parse().expect("an address");
        }
    };
    // Read the rest, so the coordinator never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

/// The status and error code of the reply on `stream` (`"413 body_too_large"`), and
/// its `Retry-After`.
fn reply(stream: &mut TcpStream) -> (String, Option<String>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("nothing");
    let code = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(|c| format!(" {c}")))
        .unwrap_or_default();
    let retry_after = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("retry-after:")
            .map(|v| v.trim().to_owned())
    });
    (format!("{status}{code}"), retry_after)
}

/// The coordinator's `hivetrain_uploads{what="in_flight"}` gauge.
fn uploads_in_flight(addr: SocketAddr) -> Option<usize> {
    let mut stream = send(addr, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix("hivetrain_uploads{what=\"in_flight\"} "))
        .and_then(|n| n.trim().parse().ok())
}

/// Opens a connection and sends `request` on it.
fn send(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.write_all(request).expect("send");
    stream
}

/// An update's head with `headers`, and `body`.
fn post(headers: &str, body: &[u8]) -> Vec<u8> {
    let mut request =
        format!("POST /v1/updates HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}\r\n")
            .into_bytes();
    request.extend_from_slice(body);
    request
}

/// Sends zeros as chunks up to `BODY_BYTES`, stopping when the server replies or
/// closes: 1 KiB, then `barrier` twice, then 1 MiB chunks.
fn chunked_zeros(addr: SocketAddr, barrier: &Barrier) -> (String, Option<String>) {
    let mut first = post("Transfer-Encoding: chunked\r\n", b"400\r\n");
    first.extend_from_slice(&[0u8; 1024]);
    first.extend_from_slice(b"\r\n");
    let mut stream = send(addr, &first);
    let mut chunk = format!("{:x}\r\n", 1 << 20).into_bytes();
    chunk.extend_from_slice(&vec![0u8; 1 << 20]);
    chunk.extend_from_slice(b"\r\n");
    barrier.wait();
    barrier.wait();
    for _ in 1..BODY_BYTES >> 20 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    reply(&mut stream)
}

#[test]
fn oversized_and_concurrent_uploads_leave_resident_memory_alone() {
    let sandbox = Sandbox::new();
    let (child, addr) = start(&sandbox);
    let pid = child.0.id();
    // Warm up what any request uses (runtime threads, the first buffers).
    let junk = post("Content-Length: 4\r\n", b"junk");
    assert_eq!(reply(&mut send(addr, &junk)).0, "400 malformed");
    let (rss_before, peak_before) = memory_kib(pid);

    let started = Instant::now();
    let barrier = Arc::new(Barrier::new(UPLOADS + 1));
    let chunked: Vec<_> = (0..UPLOADS)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || chunked_zeros(addr, &barrier))
        })
        .collect();
    let declared: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                // The head alone: the refusal must not wait for the body.
                let head = post(&format!("Content-Length: {BODY_BYTES}\r\n"), b"");
                reply(&mut send(addr, &head))
            })
        })
        .collect();
    // While the chunked uploads hold every permit, one more is told to come back. The
    // metrics say when they do: a probe sent before then would take a permit itself and
    // could turn a late chunked upload away. Counted from here, not from the start: on a
    // loaded machine (CI runs this beside the crash harness and the demo) the server may
    // take a while to read the heads. Well inside the body deadline
    // (`http.body_timeout_ms`, 30 s), after which the uploads would let go of their
    // permits.
    barrier.wait();
    let waiting = Instant::now();
    let in_flight = loop {
        let n = uploads_in_flight(addr);
        if n == Some(UPLOADS) || waiting.elapsed() > Duration::from_secs(20) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(in_flight, Some(UPLOADS), "uploads holding a permit");
    let busy = reply(&mut send(addr, &junk));
    barrier.wait();
    assert_eq!(busy, ("503 uploads_busy".into(), Some("1".into())));
    for thread in declared {
        assert_eq!(
            thread.join().expect("client"),
            ("413 body_too_large".into(), None)
        );
    }
    for thread in chunked {
        assert_eq!(
            thread.join().expect("client"),
            ("413 body_too_large".into(), None)
        );
    }
    let seconds = started.elapsed().as_secs_f32();

    let (rss_after, peak_after) = memory_kib(pid);
    eprintln!(
        "{} MiB offered in {seconds:.1} s; resident {rss_before} -> {rss_after} KiB, peak {peak_before} -> {peak_after} KiB",
        (2 * UPLOADS * BODY_BYTES) >> 20
    );
    assert!(
        rss_after < rss_before + GROWTH_MAX_KIB
            && peak_after < peak_before.max(rss_before) + GROWTH_MAX_KIB,
        "resident {rss_before} -> {rss_after} KiB, peak {peak_before} -> {peak_after} KiB"
    );
    let health = send(addr, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(reply(&mut { health }).0, "200");
}
