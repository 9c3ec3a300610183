//! Peers behind NATs, in Linux network namespaces each test makes itself (nothing
//! leaves them): an "internet" namespace with the run's relay and two public members,
//! and two homes, each a router that masquerades for one member behind it.
//!
//! Ignored by `cargo test` (they need root, `ip` and `nft`); `.ci/run` runs them where
//! it can: `cargo test --release -p cli --test it nat:: -- --ignored --test-threads 1`.
//!
//! - Port-preserving NATs (endpoint-independent mapping, the router dropping new
//!   connections from outside): the two members behind them reach each other directly,
//!   through holes punched with the relay's help.
//! - Symmetric NATs (a random port per destination): those two reach each other only
//!   through the relay, and the run certifies every version all the same.
//! - The relay killed mid-run, then one member of four: every version is still
//!   certified by the three left, and none that was certified is lost.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Sandbox;
use super::peers::{Running, final_hash};

/// How a home's router maps its member's ports.
#[derive(Clone, Copy)]
enum Nat {
    /// The same public port for every destination, nothing let in unasked.
    PortPreserving,
    /// A random public port for every destination.
    Symmetric,
}

/// Namespaces made for one test, deleted when it ends.
struct Lab {
    prefix: String,
}

const RELAY: &str = "10.99.0.1";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    /// The internet (a bridge, the relay's address on it) and two homes behind `nat`.
    fn new(name: &str, nat: Nat) -> Lab {
        let prefix = format!("ht{}{name}", std::process::id() % 10_000);
        let lab = Lab { prefix };
        let inet = lab.ns("inet");
        ip(&["netns", "add", &inet]);
        ip(&["-n", &inet, "link", "set", "lo", "up"]);
        ip(&["-n", &inet, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &inet, "link", "set", "br0", "up"]);
        ip(&[
            "-n",
            &inet,
            "addr",
            "add",
            &format!("{RELAY}/24"),
            "dev",
            "br0",
        ]);
        for home in 1..=2 {
            let (router, host) = (lab.ns(&format!("r{home}")), lab.ns(&format!("h{home}")));
            ip(&["netns", "add", &router]);
            ip(&["netns", "add", &host]);
            for ns in [&router, &host] {
                ip(&["-n", ns, "link", "set", "lo", "up"]);
            }
            // The router's WAN side on the internet's bridge.
            let port = format!("wan{home}");
            ip(&[
                "-n", &inet, "link", "add", &port, "type", "veth", "peer", "name", "wan", "netns",
                &router,
            ]);
            ip(&["-n", &inet, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("10.99.0.1{home}/24"),
                "dev",
                "wan",
            ]);
            ip(&["-n", &router, "link", "set", "wan", "up"]);
            // Its LAN side, and the member's host behind it.
            ip(&[
                "-n", &router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0",
                "netns", &host,
            ]);
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("192.168.{home}.1/24"),
                "dev",
                "lan",
            ]);
            ip(&["-n", &router, "link", "set", "lan", "up"]);
            ip(&[
                "-n",
                &host,
                "addr",
                "add",
                &format!("192.168.{home}.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &host, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &host,
                "route",
                "add",
                "default",
                "via",
                &format!("192.168.{home}.1"),
            ]);
            lab.exec(&router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            let masquerade = match nat {
                Nat::PortPreserving => "masquerade",
                Nat::Symmetric => "masquerade random,fully-random",
            };
            // The input drop keeps a probe from outside from claiming the member's port
            // first (Linux conntrack would then remap it): ../shared/P2P-NOTES.md.
            let rules = format!(
                "table ip nat {{\n chain post {{\n type nat hook postrouting priority 100;\n oifname \"wan\" {masquerade}\n }}\n}}\n\
                 table ip filter {{\n chain input {{\n type filter hook input priority 0;\n iifname \"wan\" ct state new drop\n }}\n}}\n"
            );
            let file = std::env::temp_dir().join(format!("{router}.nft"));
            std::fs::write(&file, rules).expect("write the rules");
            lab.exec(&router, &["nft", "-f", &file.display().to_string()]);
            let _ = std::fs::remove_file(&file);
        }
        lab
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn exec(&self, ns: &str, command: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(command)
            .output()
            .expect("run ip netns exec");
        assert!(
            out.status.success(),
            "{command:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `hivetrain ARGS` in namespace `ns`.
    fn hivetrain(&self, sandbox: &Sandbox, ns: &str) -> Command {
        let mut command = Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                &self.ns(ns),
                env!("CARGO_BIN_EXE_hivetrain"),
            ])
            .env("HIVETRAIN_CACHE_DIR", sandbox.path("cache"))
            .env_remove("HIVETRAIN_KEY")
            .current_dir(sandbox.dir.path());
        command
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in ["h1", "h2", "r1", "r2", "inet"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(ns)])
                .output();
        }
    }
}

/// What a run in the lab ends with: each member's output, in member order.
struct Outcome {
    outputs: Vec<String>,
    /// Each member's standard error (its logs).
    logs: Vec<String>,
    seconds: f64,
}

/// Members 0 and 1 behind the two homes' NATs (found through the relay), members 2 and 3
/// on the internet at known sockets; `versions` to certify. `disrupt` runs once the
/// first version is certified, with the relay and the members.
fn run(
    lab: &Lab,
    versions: u64,
    steps: u32,
    disrupt: impl FnOnce(&mut Running, &mut [Option<Running>]),
) -> Outcome {
    let sandbox = Sandbox::new();
    let keys: Vec<String> = (0..4)
        .map(|i| {
            let out = lab
                .hivetrain(&sandbox, "inet")
                .args(["peer", "id", "--key"])
                .arg(sandbox.path(&format!("k{i}")))
                .output()
                .expect("peer id");
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .collect();
    let mut relay = Running(Some(
        lab.hivetrain(&sandbox, "inet")
            .args([
                "relay",
                "--listen",
                &format!("{RELAY}:3340"),
                "--discovery-port",
                "7842",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("relay"),
    ));
    let (_, relay_ref) = super::peers::relay_lines(&mut relay);
    let mut ticket = lab.hivetrain(&sandbox, "inet");
    ticket.args(["peer", "ticket", "--versions", &versions.to_string()]);
    ticket.args(["--local-steps", &steps.to_string(), "--out", "run.ticket"]);
    ticket.args(["--relay", &relay_ref]);
    for (i, key) in keys.iter().enumerate() {
        let member = if i < 2 {
            key.clone()
        } else {
            format!("{key}@{RELAY}:{}", 7000 + i)
        };
        ticket.args(["--member", &member]);
    }
    let out = ticket.output().expect("peer ticket");
    assert!(out.status.success(), "{out:?}");

    let started = Instant::now();
    let mut peers: Vec<Option<Running>> = (0..4)
        .map(|i| {
            let ns = ["h1", "h2", "inet", "inet"][i];
            Some(Running(Some(
                lab.hivetrain(&sandbox, ns)
                    .args(["peer", "join", "run.ticket", "--device", "cpu:1", "--key"])
                    .arg(sandbox.path(&format!("k{i}")))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("peer join"),
            )))
        })
        .collect();
    // Member 3's table says when version 1 is certified.
    let deadline = started + Duration::from_secs(300);
    let stdout = peers[3]
        .as_mut()
        .and_then(|p| p.child().stdout.take())
        .expect("member 3's output");
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let first = line.split_whitespace().next() == Some("1");
        seen.push(line);
        if first {
            disrupt(&mut relay, &mut peers);
            break;
        }
    }
    let mut outputs = Vec::new();
    let mut logs = Vec::new();
    let mut reader = Some(reader);
    for (i, peer) in peers.into_iter().enumerate() {
        let Some(peer) = peer else {
            outputs.push(String::new());
            logs.push(String::new());
            continue;
        };
        let out = peer.finish(deadline);
        let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if i == 3 {
            if let Some(r) = reader.take() {
                let _ = r.join();
            }
            seen.extend(lines.try_iter());
            stdout = seen.join("\n") + "\n";
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "member {i} failed:\n{stdout}\n{stderr}"
        );
        outputs.push(stdout);
        logs.push(stderr.into_owned());
    }
    Outcome {
        outputs,
        logs,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// How member `from` last reached member `to` (`direct` or `relayed`), from its summary.
fn path(outcome: &Outcome, from: usize, to: &str) -> String {
    let line = outcome.outputs[from]
        .lines()
        .find(|l| l.starts_with("reached: "))
        .expect("a reached line");
    line.trim_start_matches("reached: ")
        .split(", ")
        .find(|p| p.starts_with(to))
        .and_then(|p| p.split_whitespace().nth(1))
        .unwrap_or("none")
        .to_owned()
}

/// Member `i`'s short key, as its output names it.
fn short(outcome: &Outcome, i: usize) -> String {
    outcome.outputs[i]
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(2))
        .map(|k| k.trim_end_matches(':').to_owned())
        .expect("a first line")
}

fn same_last_version(outcome: &Outcome, versions: u64) {
    let hashes: Vec<&str> = outcome
        .outputs
        .iter()
        .filter(|o| !o.is_empty())
        .map(|o| final_hash(o).expect("a final hash"))
        .collect();
    let want = format!("version {versions} hash ");
    assert!(hashes.iter().all(|h| h.starts_with(&want)), "{hashes:?}");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
}

#[test]
#[ignore = "needs root, ip and nft: run by .ci/run where it can"]
fn nat_members_behind_port_preserving_nats_reach_each_other_directly() {
    let lab = Lab::new("pp", Nat::PortPreserving);
    let outcome = run(&lab, 6, 40, |_, _| {});
    same_last_version(&outcome, 6);
    let (a, b) = (short(&outcome, 0), short(&outcome, 1));
    eprintln!(
        "port-preserving NATs: 3 versions in {:.1} s; member 0 reached member 1 {}, member 1 reached member 0 {}",
        outcome.seconds,
        path(&outcome, 0, &b),
        path(&outcome, 1, &a)
    );
    assert_eq!(
        path(&outcome, 0, &b),
        "direct",
        "{}\n{}",
        outcome.outputs[0],
        outcome.logs[0]
    );
    assert_eq!(path(&outcome, 1, &a), "direct", "{}", outcome.outputs[1]);
}

#[test]
#[ignore = "needs root, ip and nft: run by .ci/run where it can"]
fn nat_members_behind_symmetric_nats_reach_each_other_through_the_relay() {
    let lab = Lab::new("sy", Nat::Symmetric);
    let outcome = run(&lab, 3, 4, |_, _| {});
    same_last_version(&outcome, 3);
    let (a, b) = (short(&outcome, 0), short(&outcome, 1));
    eprintln!(
        "symmetric NATs: 3 versions in {:.1} s; member 0 reached member 1 {}",
        outcome.seconds,
        path(&outcome, 0, &b)
    );
    assert_eq!(path(&outcome, 0, &b), "relayed", "{}", outcome.outputs[0]);
    assert_eq!(path(&outcome, 1, &a), "relayed", "{}", outcome.outputs[1]);
}

#[test]
#[ignore = "needs root, ip and nft: run by .ci/run where it can"]
fn nat_killing_the_relay_then_a_member_loses_no_certified_version() {
    let lab = Lab::new("kl", Nat::PortPreserving);
    let outcome = run(&lab, 4, 4, |relay, peers| {
        relay.kill();
        if let Some(p) = peers[2].take() {
            drop(p);
        }
    });
    eprintln!(
        "relay and member 2 killed after version 1: 4 versions in {:.1} s\n{}",
        outcome.seconds, outcome.outputs[3]
    );
    same_last_version(&outcome, 4);
}
