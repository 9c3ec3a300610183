//! `hivetrain peer` and `hivetrain relay`, one process each: members made with
//! `peer id`, a run made with `peer ticket`, every member joining it from the ticket.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use super::Sandbox;

fn hivetrain(sandbox: &Sandbox) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hivetrain"));
    command
        .env("HIVETRAIN_CACHE_DIR", sandbox.path("cache"))
        .env_remove("HIVETRAIN_KEY")
        .current_dir(sandbox.dir.path());
    command
}

/// A process killed when the test ends, however it ends.
pub(crate) struct Running(pub(crate) Option<Child>);

impl Running {
    pub(crate) fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }

    /// Its output once it exits, killed first if it is still running at `deadline`.
    pub(crate) fn finish(mut self, deadline: std::time::Instant) -> std::process::Output {
        let mut child = self.0.take().expect("running");
        while child.try_wait().expect("wait").is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        child.wait_with_output().expect("output")
    }
}

impl Running {
    /// Kills it now.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The final hash line of a peer's output (`version N hash HEX`).
pub(crate) fn final_hash(stdout: &str) -> Option<&str> {
    stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("version ") && l.contains(" hash "))
}

/// A relay's two lines: what it is, and the string a ticket names it with.
pub(crate) fn relay_lines(relay: &mut Running) -> (String, String) {
    let mut reader = BufReader::new(relay.child().stdout.take().expect("stdout"));
    let (mut line, mut reference) = (String::new(), String::new());
    reader.read_line(&mut line).expect("the relay's first line");
    reader
        .read_line(&mut reference)
        .expect("the relay's string");
    assert!(
        reference.starts_with("hivetrain-relay1:"),
        "{line}{reference}"
    );
    (line, reference.trim().to_owned())
}

/// Four processes certify three versions of a run made from a ticket: two members listed
/// with their sockets, two only by key (found through the run's relay, a fifth
/// process). Every member ends on the same version hash, and the loss fell.
#[test]
fn four_peer_processes_certify_a_run_from_its_ticket_through_a_relay() {
    let sandbox = Sandbox::new();
    let keys: Vec<String> = (0..4)
        .map(|i| {
            let out = hivetrain(&sandbox)
                .args(["peer", "id", "--key"])
                .arg(sandbox.path(&format!("k{i}")))
                .output()
                .expect("peer id");
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .collect();
    let mut relay = Running(Some(
        hivetrain(&sandbox)
            .args(["relay", "--listen", "127.0.0.1:0", "--discovery-port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("relay"),
    ));
    let (line, relay_ref) = relay_lines(&mut relay);
    assert!(line.starts_with("relay at http://127.0.0.1:"), "{line}");
    // Two members on sockets the test picks (free a moment ago), two found by key alone.
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .expect("a free port")
                .port()
        })
        .collect();
    let mut ticket = hivetrain(&sandbox);
    ticket.args([
        "peer",
        "ticket",
        "--versions",
        "3",
        "--local-steps",
        "4",
        "--relay",
        &relay_ref,
    ]);
    ticket.args(["--out", "run.ticket"]);
    for (i, key) in keys.iter().enumerate() {
        let member = match ports.get(i) {
            Some(port) => format!("{key}@127.0.0.1:{port}"),
            None => key.clone(),
        };
        ticket.args(["--member", &member]);
    }
    let out = ticket.output().expect("peer ticket");
    assert!(out.status.success(), "{out:?}");

    let started = std::time::Instant::now();
    let mut peers: Vec<Running> = (0..4)
        .map(|i| {
            let mut command = hivetrain(&sandbox);
            command
                .args(["peer", "join", "run.ticket", "--device", "cpu:1", "--key"])
                .arg(sandbox.path(&format!("k{i}")))
                .arg("--dir")
                .arg(sandbox.path(&format!("peer{i}")));
            if i == 0 {
                command.args(["--http", "127.0.0.1:0"]);
            }
            Running(Some(
                command
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("peer join"),
            ))
        })
        .collect();
    // Member 0 serves its view of the run while it runs.
    let stdout = peers[0].child().stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut first = Vec::new();
    let dashboard = loop {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("member 0's dashboard line");
        first.push(line.clone());
        if let Some(rest) = line.strip_prefix("dashboard at ") {
            break rest.split_whitespace().next().expect("a URL").to_owned();
        }
    };
    let get = |path: &str| {
        reqwest::blocking::get(format!("{}{}", dashboard.trim_end_matches('/'), path))
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.text())
            .expect("the dashboard answers")
    };
    let view: serde_json::Value = serde_json::from_str(&get("/v1/peer")).expect("json");
    let members = view["members"].as_array().expect("members");
    assert_eq!(members.len(), 4, "{view}");
    assert_eq!(
        members.iter().filter(|m| m["path"] == "self").count(),
        1,
        "{view}"
    );
    assert!(
        members.iter().all(|m| ["self", "direct", "relayed", "none"]
            .contains(&m["path"].as_str().unwrap_or_default())),
        "{view}"
    );
    assert!(view["version"].as_u64().is_some_and(|v| v <= 3), "{view}");
    let metrics = get("/metrics");
    assert!(metrics.contains("hivetrain_peer_version"), "{metrics}");
    let page = get("/");
    assert!(page.contains("hivetrain peer"));
    // Values reach the page as text only: members are whoever the creator admitted.
    assert!(!page.contains("innerHTML"));
    // The page's script, run by Node against this peer with a small stand-in for the
    // DOM, renders the run as the peer sees it.
    let shown = test_support::render_under_node(
        sandbox.dir.path(),
        &page,
        DOM,
        RENDER,
        dashboard.trim_end_matches('/'),
    );
    let run = shown["run"].as_str().expect("run");
    assert!(
        run.starts_with("run ") && run.contains("| version "),
        "{shown}"
    );
    assert!(
        shown["reruns"]
            .as_str()
            .is_some_and(|r| r.starts_with("re-runs by other members: ")),
        "{shown}"
    );
    let rows = shown["members"].as_array().expect("members");
    assert_eq!(rows.len(), 4, "{shown}");
    assert_eq!(
        rows.iter()
            .filter(|r| r.as_str().is_some_and(|r| r.contains("|self|")))
            .count(),
        1,
        "{shown}"
    );
    // Far past what it takes (about 12 s here): a peer that hangs fails the test.
    let deadline = started + std::time::Duration::from_secs(300);
    let mut outputs = Vec::new();
    let mut reader = Some(reader);
    for peer in peers {
        let out = peer.finish(deadline);
        let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if outputs.is_empty() {
            if let Some(r) = reader.take() {
                let _ = r.join();
            }
            first.extend(lines.try_iter());
            stdout = first.join("\n") + "\n";
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "a peer failed:\n{stdout}\n{stderr}");
        outputs.push(stdout);
    }
    eprintln!(
        "4 peer processes and a relay: 3 versions in {:.1} s\n{}",
        started.elapsed().as_secs_f64(),
        outputs[0]
    );
    let hashes: Vec<&str> = outputs
        .iter()
        .map(|o| final_hash(o).expect("a final hash line"))
        .collect();
    assert!(
        hashes.iter().all(|h| h.starts_with("version 3 hash ")),
        "{hashes:?}"
    );
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    let loss = |version: &str| -> Option<f32> {
        outputs[0]
            .lines()
            .find(|l| l.split_whitespace().next() == Some(version))
            .and_then(|l| l.split_whitespace().nth(4))
            .and_then(|v| v.parse().ok())
    };
    let (first, last) = (loss("1").expect("version 1"), loss("3").expect("version 3"));
    assert!(last < first, "holdout loss {first} -> {last}");

    // Anyone with the ticket checks a peer's stored chain: every certificate, every
    // value re-executed, the same last version; a byte changed in it is caught.
    let chain = sandbox.path("peer2/chain.bin");
    let verify = |chain: &std::path::Path| {
        let out = hivetrain(&sandbox)
            .args(["ledger", "verify", "--ticket", "run.ticket", "--chain"])
            .arg(chain)
            .output()
            .expect("ledger verify");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = verify(&chain);
    assert!(ok, "{text}");
    let hash = hashes[0].trim_start_matches("version 3 hash ");
    assert!(
        text.contains(&format!(
            "ok: 3 certified versions, each re-executed bit for bit; version 3 hash {hash}"
        )),
        "{text}"
    );
    assert_eq!(text.matches("certified by ").count(), 3, "{text}");
    // Members re-ran sampled units of the first versions, and every re-run matched.
    let reruns = text
        .lines()
        .find_map(|l| l.strip_prefix("re-runs of sampled units by other members: "))
        .unwrap_or_else(|| panic!("no re-runs line:\n{text}"));
    let matched: u64 = reruns
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(matched > 0 && reruns.contains(" 0 failed"), "{reruns}");
    let mut bytes = std::fs::read(&chain).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    let tampered = sandbox.write("tampered.bin", &bytes);
    let (ok, text) = verify(&tampered);
    assert!(!ok, "a tampered chain verified:\n{text}");
    assert!(text.contains("the chain is not the run's"), "{text}");

    // The creator extends the run to 5 versions: every member resumes from its chain,
    // one of them from a chain whose last height a crash cut short (it replays 2 and
    // catches up on 3 from the others).
    let bytes = std::fs::read(sandbox.path("peer1/chain.bin")).expect("read");
    std::fs::write(sandbox.path("peer1/chain.bin"), &bytes[..bytes.len() - 50]).expect("cut");
    let mut more = hivetrain(&sandbox);
    more.args(["peer", "ticket", "--versions", "5", "--local-steps", "4"]);
    more.args(["--relay", &relay_ref, "--out", "more.ticket"]);
    for (i, key) in keys.iter().enumerate() {
        let member = match ports.get(i) {
            Some(port) => format!("{key}@127.0.0.1:{port}"),
            None => key.clone(),
        };
        more.args(["--member", &member]);
    }
    assert!(more.output().expect("peer ticket").status.success());
    let peers: Vec<Running> = (0..4)
        .map(|i| {
            Running(Some(
                hivetrain(&sandbox)
                    .args(["peer", "join", "more.ticket", "--device", "cpu:1", "--key"])
                    .arg(sandbox.path(&format!("k{i}")))
                    .arg("--dir")
                    .arg(sandbox.path(&format!("peer{i}")))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("peer join"),
            ))
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let outputs: Vec<String> = peers
        .into_iter()
        .map(|p| {
            let out = p.finish(deadline);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "a resumed peer failed:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            text
        })
        .collect();
    assert!(
        outputs[1].contains("resumed at version 2"),
        "{}",
        outputs[1]
    );
    assert!(
        outputs[0].contains("resumed at version 3"),
        "{}",
        outputs[0]
    );
    let hashes: Vec<&str> = outputs
        .iter()
        .map(|o| final_hash(o).expect("a final hash line"))
        .collect();
    assert!(
        hashes.iter().all(|h| h.starts_with("version 5 hash ")),
        "{hashes:?}"
    );
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    let (ok, text) = verify(&sandbox.path("peer1/chain.bin"));
    assert!(ok && text.contains("ok: 5 certified versions"), "{text}");
}

/// What a member cannot join with: each case the arguments after `peer join`, and the
/// words of the sentence it is refused with.
#[test]
fn a_peer_refuses_what_it_cannot_join_with_a_sentence() {
    let sandbox = Sandbox::new();
    let key = |name: &str| {
        let out = hivetrain(&sandbox)
            .args(["peer", "id", "--key"])
            .arg(sandbox.path(name))
            .output()
            .expect("peer id");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (member, stranger) = (key("member"), key("stranger"));
    let out = hivetrain(&sandbox)
        .args(["peer", "ticket", "--out", "run.ticket", "--member", &member])
        .output()
        .expect("peer ticket");
    assert!(out.status.success(), "{out:?}");
    sandbox.write("other.txt", b"not the run's corpus");
    let member_key = sandbox.path("member").display().to_string();
    let stranger_key = sandbox.path("stranger").display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run.ticket", "--key", &stranger_key],
            "is not a member of run",
        ),
        (vec!["hivetrain-run1:AAAA", "--key", &member_key], "damaged"),
        (vec!["no such ticket", "--key", &member_key], "starts with"),
        (
            vec!["run.ticket", "--key", &member_key, "--corpus", "other.txt"],
            "is not the run's",
        ),
        (
            vec!["run.ticket", "--key", "missing.key"],
            "run `hivetrain peer id`",
        ),
    ];
    for (args, words) in cases {
        let out = hivetrain(&sandbox)
            .args(["peer", "join"])
            .args(&args)
            .output()
            .expect("peer join");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} joined");
        assert!(stderr.contains(words), "{args:?}: {stderr}");
    }
    let out = hivetrain(&sandbox)
        .args(["peer", "ticket", "--member", &stranger, "--member", "0123"])
        .output()
        .expect("peer ticket");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a member's key"),
        "{out:?}"
    );
}

/// A stand-in for the browser: elements that keep their text, children, attributes and
/// table rows (the first row the header); `fetch` against the peer's URL (the first
/// argument); no timers.
const DOM: &str = r#"
const base = process.argv[2];
const realFetch = fetch;
globalThis.fetch = (path) => realFetch(base + path);
class El {
  constructor(tag) {
    this.tag = tag; this.children = []; this.textContent = ""; this.attrs = {}; this.className = "";
    this.rows = [new Object()];
    this.width = { baseVal: { value: 640 } }; this.height = { baseVal: { value: 160 } };
  }
  appendChild(c) { this.children.push(c); return c; }
  replaceChildren(...cs) { this.children = cs; }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  insertRow() { const r = new El("tr"); this.rows.push(r); return r; }
  deleteRow(i) { this.rows.splice(i, 1); }
  insertCell() { const c = new El("td"); this.children.push(c); return c; }
}
const elements = {};
const element = (id) => (elements[id] ??= new El(id));
globalThis.document = {
  getElementById: element,
  createElement: (tag) => new El(tag),
  createElementNS: (_ns, tag) => new El(tag),
};
globalThis.setInterval = () => 0;
"#;

/// After the page's script: render once more, waiting for it, and print what is shown.
const RENDER: &str = r#"
await refresh();
const row = (r) => r.children.map((c) => c.textContent).join("|");
console.log(JSON.stringify({
  me: element("me").textContent,
  run: element("run").textContent,
  reruns: element("reruns").textContent,
  members: element("members").rows.slice(1).map(row),
  versions: element("versions").rows.slice(1).map(row),
  chart: element("loss").children[0]?.attrs.points ?? "",
}));
"#;
