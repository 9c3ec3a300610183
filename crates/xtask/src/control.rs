//! `cargo xtask bench control`: the coordinator's control plane under many workers.
//!
//! A `hivetrain coordinator` child process (the real binary, talked to only through its
//! public HTTP API on loopback) serves N simulated workers, each with its own ed25519
//! key, in a closed loop: lease, heartbeat the unit a few times, read `/v1/status`;
//! beside them, readers poll `/metrics`. Every request's latency is kept per route. The
//! load runs twice on the same coordinator: while it is idle (no update has been sent,
//! so nothing aggregates) and while real `hivetrain worker` child processes train and
//! send updates that the coordinator scores, re-runs and aggregates. A bare axum server
//! in this process, answering the same four routes with fixed replies, takes the same
//! load as the ceiling. With `--baseline-bin` a second binary is measured the same way
//! in the same run, and the ratios are printed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ed25519_dalek::SigningKey;
use protocol::api::{LeaseReply, Status};

/// Goal of the issue: durable lease operations (grants and heartbeats) per second.
const GOAL_DURABLE_PER_S: f64 = 1_000.0;

#[derive(Debug, clap::Args)]
pub(crate) struct ControlBench {
    /// The `hivetrain` binary whose coordinator is measured (default: this checkout's
    /// target/release/hivetrain, built first with `cargo build --release`).
    #[arg(long)]
    coordinator_bin: Option<PathBuf>,
    /// A second `hivetrain` binary measured the same way in the same run (the code
    /// before a change, say); both tables are printed, then the ratios.
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    /// The binary whose `hivetrain worker` trains during the busy phase, the same for
    /// both coordinators (default: this checkout's release binary).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Simulated workers, each with its own key, each in a closed loop.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Heartbeats each simulated worker sends on its unit per cycle (lease, these,
    /// one status read).
    #[arg(long, default_value_t = 3)]
    heartbeats: usize,
    /// Readers of `/metrics`, each in a closed loop beside the workers.
    #[arg(long, default_value_t = 1)]
    metrics_readers: usize,
    /// Seconds each phase runs.
    #[arg(long, default_value_t = 15.0)]
    seconds: f64,
    /// Real `hivetrain worker` processes that train during the busy phase (one engine
    /// thread each; on a real network they run on other machines, here they take CPU
    /// from the coordinator); 0 skips the busy phase.
    #[arg(long, default_value_t = 1)]
    train_workers: usize,
    /// Local steps per unit (H) of the run: short units make short rounds, so several
    /// aggregations fall in the busy phase.
    #[arg(long, default_value_t = 5)]
    local_steps: u32,
    /// The busy phase runs `--seconds` and then on until at least this many
    /// aggregations happened in it (0: `--seconds` only).
    #[arg(long, default_value_t = 2)]
    busy_aggregations: u64,
    /// The busy phase's longest run, in seconds, whatever the aggregations.
    #[arg(long, default_value_t = 180.0)]
    busy_max_seconds: f64,
    /// Seconds a round waits before it aggregates what it has (at least one update).
    #[arg(long, default_value_t = 5)]
    round_timeout: u64,
    /// Longest wait, in seconds, for the busy phase's first aggregation (the workers
    /// fetch the corpus and the model, train, send, the coordinator scores).
    #[arg(long, default_value_t = 300)]
    warmup_timeout: u64,
    /// Threads of this process's client runtime (the load generator shares the
    /// machine's cores with the coordinator).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Skip the bare axum ceiling.
    #[arg(long)]
    no_ceiling: bool,
    /// Directory for the runs' stores and logs (default: a temporary directory, removed
    /// at the end). Its disk is part of what is measured: grants and heartbeats are
    /// committed with fsync.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The routes the load exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Lease,
    Heartbeat,
    Status,
    Metrics,
}

impl Route {
    const ALL: [Route; 4] = [
        Route::Lease,
        Route::Heartbeat,
        Route::Status,
        Route::Metrics,
    ];

    fn name(self) -> &'static str {
        match self {
            Route::Lease => "POST /v1/lease",
            Route::Heartbeat => "POST /v1/heartbeat",
            Route::Status => "GET /v1/status",
            Route::Metrics => "GET /metrics",
        }
    }

    /// The p99 goal, in ms.
    fn goal_p99_ms(self) -> f64 {
        match self {
            Route::Lease | Route::Heartbeat => 50.0,
            Route::Status | Route::Metrics => 20.0,
        }
    }
}

/// What the load saw in one phase.
#[derive(Debug, Default)]
struct Tally {
    /// Latency of every request, in ms, by route (`Route::ALL` order).
    latencies: [Vec<f32>; 4],
    /// Requests without a 2xx reply (or without a reply), by route.
    errors: [u64; 4],
    /// "route status" (or "route transport") -> count.
    error_kinds: BTreeMap<String, u64>,
    /// Lease replies naming a unit the worker did not hold: new leases, committed.
    grants: u64,
    /// Lease replies naming the unit the worker already held (nothing changes, nothing
    /// is written on 4ce3163).
    re_leases: u64,
    /// Lease replies with no unit.
    no_work: u64,
    /// Heartbeats answered 2xx.
    heartbeats: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        for (a, b) in self.latencies.iter_mut().zip(other.latencies) {
            a.extend(b);
        }
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        for (k, v) in other.error_kinds {
            *self.error_kinds.entry(k).or_default() += v;
        }
        self.grants += other.grants;
        self.re_leases += other.re_leases;
        self.no_work += other.no_work;
        self.heartbeats += other.heartbeats;
    }

    fn record(&mut self, route: Route, started: Instant, outcome: &Result<u16, String>) {
        let i = route as usize;
        self.latencies[i].push(started.elapsed().as_secs_f32() * 1000.0);
        let kind = match outcome {
            Ok(status) if (200..300).contains(status) => return,
            Ok(status) => status.to_string(),
            Err(e) => e.clone(),
        };
        self.errors[i] += 1;
        *self
            .error_kinds
            .entry(format!("{} {kind}", route.name()))
            .or_default() += 1;
    }
}

/// The `q` quantile of sorted values (nearest rank: the smallest value with at least
/// `q` of the values at or below it).
fn quantile(sorted: &[f32], q: f64) -> f32 {
    if sorted.is_empty() {
        return f32::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One route's figures in a phase.
#[derive(Clone, Copy, Debug)]
struct RouteFigures {
    requests: usize,
    errors: u64,
    median: f32,
    p99: f32,
    /// The tail p99 can miss: a phase of a minute with two aggregations that each hold
    /// the lock for a second stalls well under 1% of its requests.
    p999: f32,
    max: f32,
}

/// A phase's figures.
#[derive(Debug)]
struct Phase {
    seconds: f64,
    routes: [RouteFigures; 4],
    tally: Tally,
    /// CPU used during the phase, in cores (CPU-seconds / seconds): the server and
    /// this load generator.
    cpu: Option<(f64, f64)>,
    /// What the coordinator did meanwhile (not for the ceiling).
    work: Option<Work>,
}

impl Phase {
    fn new(mut tally: Tally, seconds: f64) -> Phase {
        let routes = std::array::from_fn(|i| {
            let l = &mut tally.latencies[i];
            l.sort_by(f32::total_cmp);
            RouteFigures {
                requests: l.len(),
                errors: tally.errors[i],
                median: quantile(l, 0.5),
                p99: quantile(l, 0.99),
                p999: quantile(l, 0.999),
                max: l.last().copied().unwrap_or(f32::NAN),
            }
        });
        Phase {
            seconds,
            routes,
            tally,
            cpu: None,
            work: None,
        }
    }

    /// Grants and acknowledged heartbeats per second: each is a committed, fsynced
    /// transaction on 4ce3163.
    fn durable_per_s(&self) -> f64 {
        (self.tally.grants + self.tally.heartbeats) as f64 / self.seconds
    }

    /// Lease and heartbeat requests answered 2xx per second (re-leases included): what
    /// compares with the ceiling, which writes nothing.
    fn lease_ops_per_s(&self) -> f64 {
        let ok = |r: Route| {
            let f = &self.routes[r as usize];
            f.requests as u64 - f.errors
        };
        (ok(Route::Lease) + ok(Route::Heartbeat)) as f64 / self.seconds
    }

    fn requests_per_s(&self) -> f64 {
        self.routes.iter().map(|r| r.requests).sum::<usize>() as f64 / self.seconds
    }
}

/// What the coordinator did during a phase, from `/v1/status`, `/metrics` and its log.
#[derive(Debug, Default)]
struct Work {
    versions: (u64, u64),
    rounds: (u64, u64),
    /// Update verdicts during the phase, by verdict (`accepted` or a refusal's code).
    verdicts: BTreeMap<String, u64>,
    /// Spot-check re-runs finished during the phase (lines of the coordinator's log).
    replays: u64,
}

/// One simulated worker: its key and the unit it holds.
#[derive(Debug)]
struct SimWorker {
    key: SigningKey,
    unit: Option<u64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sends a request, reads the whole reply: (status, body), or what went wrong.
async fn exchange(request: reqwest::RequestBuilder) -> Result<(u16, bytes::Bytes), String> {
    let response = request.send().await.map_err(|e| kind_of(&e))?;
    let status = response.status().as_u16();
    let body = response.bytes().await.map_err(|e| kind_of(&e))?;
    Ok((status, body))
}

fn kind_of(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect error".into()
    } else {
        "transport error".into()
    }
}

fn signed(
    client: &reqwest::Client,
    url: &str,
    key: &SigningKey,
    path: &str,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    // The worker's own signing (crates/worker's HttpTransport::post_signed).
    let mut request = client
        .post(format!("{url}{path}"))
        .header("content-type", "application/json");
    for (name, value) in protocol::auth::sign_request(key, "POST", path, now_ms(), &body) {
        request = request.header(name, value);
    }
    request.body(body)
}

/// One simulated worker's closed loop until `deadline`.
async fn worker_loop(
    client: reqwest::Client,
    url: Arc<str>,
    mut worker: SimWorker,
    heartbeats: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> (SimWorker, Tally) {
    let mut tally = Tally::default();
    let stopped = || stop.load(Ordering::Relaxed);
    while !stopped() {
        let started = Instant::now();
        let reply = exchange(signed(&client, &url, &worker.key, "/v1/lease", Vec::new())).await;
        tally.record(
            Route::Lease,
            started,
            &reply.as_ref().map(|r| r.0).map_err(Clone::clone),
        );
        done.fetch_add(1, Ordering::Relaxed);
        if let Ok((200, body)) = &reply {
            match serde_json::from_slice::<LeaseReply>(body) {
                Ok(LeaseReply::Lease { unit, .. }) => {
                    if worker.unit == Some(unit.id) {
                        tally.re_leases += 1;
                    } else {
                        tally.grants += 1;
                        worker.unit = Some(unit.id);
                    }
                }
                Ok(LeaseReply::NoWork { .. }) => {
                    tally.no_work += 1;
                    worker.unit = None;
                }
                Err(_) => {
                    *tally
                        .error_kinds
                        .entry("POST /v1/lease unreadable reply".into())
                        .or_default() += 1;
                }
            }
        }
        if let Some(unit) = worker.unit {
            let body =
                serde_json::to_vec(&protocol::api::HeartbeatRequest { unit }).unwrap_or_default();
            for _ in 0..heartbeats {
                if stopped() {
                    break;
                }
                let started = Instant::now();
                let reply = exchange(signed(
                    &client,
                    &url,
                    &worker.key,
                    "/v1/heartbeat",
                    body.clone(),
                ))
                .await;
                let outcome = reply.map(|r| r.0);
                tally.record(Route::Heartbeat, started, &outcome);
                done.fetch_add(1, Ordering::Relaxed);
                match outcome {
                    Ok(s) if (200..300).contains(&s) => tally.heartbeats += 1,
                    // not_leased: the round moved on; lease again.
                    Ok(409) => {
                        worker.unit = None;
                        break;
                    }
                    _ => {}
                }
            }
        }
        if stopped() {
            break;
        }
        let started = Instant::now();
        let reply = exchange(client.get(format!("{url}/v1/status?rounds=50"))).await;
        tally.record(Route::Status, started, &reply.map(|r| r.0));
        done.fetch_add(1, Ordering::Relaxed);
    }
    (worker, tally)
}

/// A `/metrics` reader's closed loop until `deadline`.
async fn metrics_loop(
    client: reqwest::Client,
    url: Arc<str>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let reply = exchange(client.get(format!("{url}/metrics"))).await;
        tally.record(Route::Metrics, started, &reply.map(|r| r.0));
        done.fetch_add(1, Ordering::Relaxed);
    }
    tally
}

/// When a phase ends.
#[derive(Clone, Copy, Debug)]
enum Until {
    /// After `--seconds`.
    Seconds,
    /// After `--seconds`, once the version is at least `version` (or after
    /// `--busy-max-seconds`).
    Version(u64),
}

/// Runs the load against `url` until `until`; returns the workers (with the units they
/// now hold) and the phase's figures.
fn run_load(
    args: &ControlBench,
    url: &str,
    workers: Vec<SimWorker>,
    label: &str,
    until: Until,
) -> anyhow::Result<(Vec<SimWorker>, Phase)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    // A fresh client per phase: the server closes connections idle for long between
    // phases, and a request on a closed pooled connection would count as an error.
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()?;
    let url: Arc<str> = Arc::from(url);
    let done = Arc::new(AtomicU64::new(0));
    let bar = progress(label, args.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let (workers, tally) = runtime.block_on(async {
        let handles: Vec<_> = workers
            .into_iter()
            .map(|w| {
                tokio::spawn(worker_loop(
                    client.clone(),
                    url.clone(),
                    w,
                    args.heartbeats,
                    stop.clone(),
                    done.clone(),
                ))
            })
            .collect();
        let readers: Vec<_> = (0..args.metrics_readers)
            .map(|_| {
                tokio::spawn(metrics_loop(
                    client.clone(),
                    url.clone(),
                    stop.clone(),
                    done.clone(),
                ))
            })
            .collect();
        let ticker = {
            let (bar, done) = (bar.clone(), done.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let secs = started.elapsed().as_secs_f64();
                    bar.set_position((secs * 10.0) as u64);
                    bar.set_message(format!(
                        "{} requests, {:.0}/s",
                        done.load(Ordering::Relaxed),
                        done.load(Ordering::Relaxed) as f64 / secs
                    ));
                }
            })
        };
        // Ends the phase; its own status reads are not counted.
        let controller = {
            let (url, stop, bar) = (url.clone(), stop.clone(), bar.clone());
            let (seconds, max) = (args.seconds, args.busy_max_seconds.max(args.seconds));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
                if let Until::Version(want) = until {
                    let client = reqwest::Client::new();
                    while started.elapsed().as_secs_f64() < max {
                        let version = async {
                            let r = client.get(format!("{url}/v1/status?rounds=1")).send().await;
                            r.ok()?.json::<Status>().await.ok().map(|s| s.version)
                        };
                        match version.await {
                            Some(v) if v >= want => break,
                            v => bar.set_prefix(format!(
                                "busy (at version {}, running on to version {want})",
                                v.map_or("?".into(), |v| v.to_string())
                            )),
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
                stop.store(true, Ordering::Relaxed);
            })
        };
        let mut tally = Tally::default();
        let mut workers = Vec::new();
        for h in handles {
            let (w, t) = h.await.context("a simulated worker panicked")?;
            workers.push(w);
            tally.merge(t);
        }
        for h in readers {
            tally.merge(h.await.context("a metrics reader panicked")?);
        }
        ticker.abort();
        controller
            .await
            .context("the phase's controller panicked")?;
        anyhow::Ok((workers, tally))
    })?;
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok((workers, Phase::new(tally, seconds)))
}

fn progress(label: &str, seconds: f64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new((seconds * 10.0) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}

/// A child process killed (and reaped) when dropped.
struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (and how).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child whose output goes to `log`, with no `HIVETRAIN_*` variable of this shell.
fn spawn_logged(mut command: Command, log: &Path) -> anyhow::Result<ChildGuard> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("HIVETRAIN_") {
            command.env_remove(&name);
        }
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    Ok(ChildGuard { child })
}

/// The last `n` lines of a log, for an error message.
fn tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A free loopback port (bound, read, released: the coordinator binds it next).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU-seconds a process has used (user + system, its dead threads included).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // utime and stime are fields 14 and 15 (indices 11 and 12 here), in clock ticks
    // (100 a second on Linux).
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// A coordinator child process serving a fresh run.
struct Coord {
    child: ChildGuard,
    url: String,
    log: PathBuf,
}

/// Starts `bin coordinator` on a fresh run in `dir` and waits for it to answer.
fn start_coordinator(
    args: &ControlBench,
    root: &Path,
    bin: &Path,
    dir: &Path,
) -> anyhow::Result<Coord> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let log = dir.join("coordinator.log");
    // Enough units for every simulated worker and every trainer to hold one; leases that
    // outlast the run (nothing expires in the idle phase); rounds that aggregate after
    // `round_timeout` with whatever was accepted: with no updates (the idle phase)
    // nothing aggregates.
    let units = args.workers + args.train_workers + 2;
    let mut command = Command::new(bin);
    command
        .arg("coordinator")
        .arg("--dir")
        .arg(dir.join("run"))
        .arg("--bind")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--preset", "small"])
        .args(["--units-per-round", &units.to_string()])
        .args(["--min-updates", "1"])
        .args(["--round-timeout", &args.round_timeout.to_string()])
        .args(["--lease", "3600", "--lease-max", "7200"])
        .args(["--local-steps", &args.local_steps.to_string()])
        .arg("--corpus")
        .arg(root.join("data/shakespeare.txt"))
        .arg("--tokenizer")
        .arg(root.join("data/tokenizer.json"))
        // Its log counts the re-runs.
        .env("RUST_LOG", "info");
    let mut child = spawn_logged(command, &log)?;
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.exited() {
            bail!(
                "the coordinator ({}) exited ({status}):\n{}",
                bin.display(),
                tail(&log, 20)
            );
        }
        if let Ok(r) = client.get(format!("{url}/health")).send()
            && r.status().is_success()
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "the coordinator did not answer within 300 s:\n{}",
                tail(&log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Coord { child, url, log })
}

/// The simulated workers' keys (the same for every binary), registered, each with a
/// first lease.
fn join_workers(url: &str, n: usize) -> anyhow::Result<Vec<SimWorker>> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let post = |key: &SigningKey, path: &str, body: Vec<u8>| -> anyhow::Result<bytes::Bytes> {
        let mut request = client
            .post(format!("{url}{path}"))
            .header("content-type", "application/json");
        for (name, value) in protocol::auth::sign_request(key, "POST", path, now_ms(), &body) {
            request = request.header(name, value);
        }
        let response = request.body(body).send()?;
        let status = response.status();
        let bytes = response.bytes()?;
        ensure!(
            status.is_success(),
            "{path}: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
        Ok(bytes)
    };
    (0..n)
        .map(|i| {
            let mut seed = [0xC7u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let key = SigningKey::from_bytes(&seed);
            let name = serde_json::to_vec(&protocol::api::RegisterRequest {
                name: format!("bench-sim-{i}"),
                machine: None,
            })?;
            post(&key, "/v1/workers", name)?;
            let unit = match serde_json::from_slice(&post(&key, "/v1/lease", Vec::new())?)? {
                LeaseReply::Lease { unit, .. } => Some(unit.id),
                LeaseReply::NoWork { .. } => None,
            };
            Ok(SimWorker { key, unit })
        })
        .collect()
}

/// Where the coordinator stands: version, round, update verdicts, re-runs done.
fn snapshot(url: &str, log: &Path) -> anyhow::Result<(u64, u64, BTreeMap<String, u64>, u64)> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let status: Status = client
        .get(format!("{url}/v1/status?rounds=1"))
        .send()?
        .error_for_status()?
        .json()?;
    let metrics = client
        .get(format!("{url}/metrics"))
        .send()?
        .error_for_status()?
        .text()?;
    let replays = replays_in(&std::fs::read_to_string(log).unwrap_or_default());
    Ok((
        status.version,
        status.round,
        update_verdicts(&metrics),
        replays,
    ))
}

/// `hivetrain_updates_total{verdict="..."} N` lines of a scrape.
fn update_verdicts(metrics: &str) -> BTreeMap<String, u64> {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("hivetrain_updates_total{verdict=\"")?;
            let (verdict, rest) = rest.split_once("\"}")?;
            Some((verdict.to_owned(), rest.trim().parse().ok()?))
        })
        .collect()
}

/// Re-runs the coordinator logged as done (matched or not).
fn replays_in(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("spot-check: the unit"))
        .count() as u64
}

/// Both phases against one coordinator binary, with its run in `dir/label`.
fn measure_coordinator(
    args: &ControlBench,
    root: &Path,
    bin: &Path,
    worker_bin: &Path,
    dir: &Path,
    label: &str,
) -> anyhow::Result<(Phase, Option<Phase>)> {
    // The trainers' data (corpus, tokenizer, token cache) is shared between binaries:
    // the second run does not tokenize again.
    let data = dir.to_owned();
    let dir = &dir.join(label);
    println!("\ncoordinator {}", bin.display());
    let coord = start_coordinator(args, root, bin, dir)?;
    let workers = join_workers(&coord.url, args.workers)?;
    let pid = coord.child.pid().to_string();
    let me = std::process::id().to_string();

    let phase = |workers: Vec<SimWorker>,
                 label: &str,
                 aggregations: u64|
     -> anyhow::Result<(Vec<SimWorker>, Phase)> {
        let before = snapshot(&coord.url, &coord.log)?;
        let until = match aggregations {
            0 => Until::Seconds,
            n => Until::Version(before.0 + n),
        };
        let cpu = (cpu_seconds(&pid), cpu_seconds(&me));
        let (workers, mut phase) = run_load(args, &coord.url, workers, label, until)?;
        let cpu_after = (cpu_seconds(&pid), cpu_seconds(&me));
        let after = snapshot(&coord.url, &coord.log)?;
        if let ((Some(a), Some(b)), (Some(c), Some(d))) = (cpu, cpu_after) {
            phase.cpu = Some(((c - a) / phase.seconds, (d - b) / phase.seconds));
        }
        let verdicts = after
            .2
            .iter()
            .map(|(k, v)| (k.clone(), v - before.2.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect();
        phase.work = Some(Work {
            versions: (before.0, after.0),
            rounds: (before.1, after.1),
            verdicts,
            replays: after.3 - before.3,
        });
        Ok((workers, phase))
    };

    println!(
        "idle: {} simulated workers and {} /metrics reader(s), {} s, no updates sent",
        args.workers, args.metrics_readers, args.seconds
    );
    let (workers, idle) = phase(workers, "idle", 0)?;
    print_phase(&idle);
    if args.train_workers == 0 {
        return Ok((idle, None));
    }

    let mut trainers = Vec::new();
    for i in 0..args.train_workers {
        let mut command = Command::new(worker_bin);
        command
            .arg("worker")
            .args(["--coordinator", &coord.url])
            .args(["--name", &format!("bench-trainer-{i}")])
            .args(["--device", "cpu:1"])
            .arg("--key")
            .arg(dir.join(format!("trainer-{i}.key")))
            .arg("--data-dir")
            .arg(data.join(format!("trainer-{i}-data")))
            .args(["--unreachable-timeout", "60"]);
        trainers.push(spawn_logged(
            command,
            &dir.join(format!("trainer-{i}.log")),
        )?);
    }
    println!(
        "busy: {} trainer(s) started; waiting for the first aggregation",
        args.train_workers
    );
    let started = Instant::now();
    loop {
        let (version, ..) = snapshot(&coord.url, &coord.log)?;
        if version >= 1 {
            break;
        }
        for (i, t) in trainers.iter_mut().enumerate() {
            if let Some(status) = t.exited() {
                bail!(
                    "trainer {i} exited ({status}):\n{}",
                    tail(&dir.join(format!("trainer-{i}.log")), 20)
                );
            }
        }
        ensure!(
            started.elapsed() < Duration::from_secs(args.warmup_timeout),
            "no aggregation within {} s:\n{}",
            args.warmup_timeout,
            tail(&coord.log, 20)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "busy: the same load while {} trainer(s) train and send updates (scored, re-run, aggregated), {} s and on until {} aggregations fell in it (at most {} s)",
        args.train_workers, args.seconds, args.busy_aggregations, args.busy_max_seconds
    );
    let (_, busy) = phase(workers, "busy", args.busy_aggregations)?;
    if let Some(w) = &busy.work
        && w.versions.1 - w.versions.0 < args.busy_aggregations
    {
        println!(
            "  warning: fewer aggregations than --busy-aggregations in {:.0} s: the machine is slower than the units and rounds assume (lower --local-steps or raise --busy-max-seconds)",
            busy.seconds
        );
    }
    print_phase(&busy);
    drop(trainers);
    drop(coord);
    Ok((idle, Some(busy)))
}

/// The ceiling: a bare axum server in this process answering the same routes with fixed
/// replies, on its own runtime of 2 threads (as the coordinator's).
fn ceiling(args: &ControlBench) -> anyhow::Result<Phase> {
    use axum::routing::{get, post};
    let lease = serde_json::to_vec(&LeaseReply::Lease {
        unit: protocol::WorkUnit {
            id: 1,
            round: 0,
            base_version: 0,
            address: protocol::WorkAddress {
                shard: 0,
                offset: 0,
                steps: 10,
                seed: 1,
            },
            lr: 2e-3,
        },
        model_blake3: "0".repeat(64),
        lease_ms: 3_600_000,
        heartbeat_ms: 1_200_000,
    })?;
    let status = serde_json::to_vec(&Status {
        round: 0,
        version: 0,
        initial_holdout_loss: 9.0,
        workers: args.workers as u64,
        units_queued: 2,
        units_leased: args.workers as u32,
        units_accepted: 0,
        rounds: Vec::new(),
    })?;
    let json = |bytes: Vec<u8>| {
        let bytes = bytes::Bytes::from(bytes);
        move |_body: bytes::Bytes| {
            let bytes = bytes.clone();
            async move { ([("content-type", "application/json")], bytes) }
        }
    };
    let status_reply = {
        let bytes = bytes::Bytes::from(status);
        move || {
            let bytes = bytes.clone();
            async move { ([("content-type", "application/json")], bytes) }
        }
    };
    let app = axum::Router::new()
        .route("/v1/lease", post(json(lease)))
        .route(
            "/v1/heartbeat",
            post(|_body: bytes::Bytes| async { axum::http::StatusCode::NO_CONTENT }),
        )
        .route("/v1/status", get(status_reply))
        .route(
            "/metrics",
            get(|| async { "# TYPE hivetrain_round gauge\nhivetrain_round 0\n# EOF\n" }),
        );
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = server.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let url = format!("http://{}", listener.local_addr()?);
    server.spawn(async move { axum::serve(listener, app).await });
    let workers = (0..args.workers)
        .map(|i| {
            let mut seed = [0x5Au8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            SimWorker {
                key: SigningKey::from_bytes(&seed),
                unit: Some(1),
            }
        })
        .collect();
    println!(
        "\nceiling: a bare axum server (fixed replies, no signature check, no store), the same load, {} s",
        args.seconds
    );
    let me = std::process::id().to_string();
    let cpu = cpu_seconds(&me);
    let (_, mut phase) = run_load(args, &url, workers, "ceiling", Until::Seconds)?;
    if let (Some(a), Some(b)) = (cpu, cpu_seconds(&me)) {
        // Server and client share this process.
        phase.cpu = Some((f64::NAN, (b - a) / phase.seconds));
    }
    server.shutdown_timeout(Duration::from_secs(5));
    print_phase(&phase);
    Ok(phase)
}

fn ms(x: f32) -> String {
    if x.is_nan() {
        "-".into()
    } else if x < 10.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.1}")
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn print_phase(p: &Phase) {
    println!(
        "  {:<20} {:>9} {:>7} {:>10} {:>8} {:>9} {:>8}",
        "route", "requests", "errors", "median ms", "p99 ms", "p99.9 ms", "max ms"
    );
    for r in Route::ALL {
        let f = &p.routes[r as usize];
        println!(
            "  {:<20} {:>9} {:>7} {:>10} {:>8} {:>9} {:>8}",
            r.name(),
            f.requests,
            f.errors,
            ms(f.median),
            ms(f.p99),
            ms(f.p999),
            ms(f.max)
        );
    }
    let t = &p.tally;
    println!(
        "  {:.1} s; {:.0} requests/s; lease and heartbeat replies {:.0}/s",
        p.seconds,
        p.requests_per_s(),
        p.lease_ops_per_s()
    );
    if p.work.is_some() {
        println!(
            "  durable lease operations {:.0}/s: grants {:.1}/s ({}), heartbeats {:.0}/s ({}); re-leases of a held unit (nothing written) {}, no work {}",
            p.durable_per_s(),
            t.grants as f64 / p.seconds,
            t.grants,
            t.heartbeats as f64 / p.seconds,
            t.heartbeats,
            t.re_leases,
            t.no_work
        );
    }
    if let Some((server, client)) = p.cpu {
        if server.is_nan() {
            println!("  CPU: {client:.2} cores (server and load generator, one process)");
        } else {
            println!("  CPU: coordinator {server:.2} cores, load generator {client:.2} cores");
        }
    }
    if let Some(w) = &p.work {
        let verdicts = if w.verdicts.is_empty() {
            "none".to_owned()
        } else {
            w.verdicts
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  meanwhile: {} aggregations (version {} -> {}, round {} -> {}); updates received: {verdicts} (each accepted one scored); {} re-runs finished",
            w.versions.1 - w.versions.0,
            w.versions.0,
            w.versions.1,
            w.rounds.0,
            w.rounds.1,
            w.replays
        );
    }
    if !t.error_kinds.is_empty() {
        let kinds: Vec<String> = t
            .error_kinds
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        println!("  errors: {}", kinds.join("; "));
    }
    if p.work.is_some() {
        let mut goals = vec![format!(
            ">= {GOAL_DURABLE_PER_S:.0} durable ops/s {}",
            met(p.durable_per_s() >= GOAL_DURABLE_PER_S)
        )];
        for r in Route::ALL {
            let f = &p.routes[r as usize];
            goals.push(format!(
                "{} p99 <= {:.0} ms {}",
                r.name(),
                r.goal_p99_ms(),
                met(f.requests > 0 && f64::from(f.p99) <= r.goal_p99_ms())
            ));
        }
        println!("  goal: {}", goals.join("; "));
    }
}

/// `new / old` as a ratio.
fn ratio(new: f64, old: f64) -> String {
    if old > 0.0 && new.is_finite() {
        format!("{:.2}x", new / old)
    } else {
        "-".into()
    }
}

fn print_comparison(name: &str, candidate: &Phase, baseline: &Phase) {
    println!(
        "\n{name}: --coordinator-bin (candidate) against --baseline-bin (rates: above 1x is better; latencies: below 1x is better)"
    );
    println!(
        "  {:<34} {:>10} {:>10} {:>9}",
        "", "baseline", "candidate", "ratio"
    );
    let row = |what: &str, b: f64, c: f64| {
        println!("  {what:<34} {b:>10.1} {c:>10.1} {:>9}", ratio(c, b));
    };
    row(
        "durable lease ops/s",
        baseline.durable_per_s(),
        candidate.durable_per_s(),
    );
    row(
        "lease+heartbeat replies/s",
        baseline.lease_ops_per_s(),
        candidate.lease_ops_per_s(),
    );
    for r in Route::ALL {
        let (b, c) = (&baseline.routes[r as usize], &candidate.routes[r as usize]);
        for (what, bv, cv) in [
            ("median", b.median, c.median),
            ("p99", b.p99, c.p99),
            ("p99.9", b.p999, c.p999),
        ] {
            row(
                &format!("{} {what} ms", r.name()),
                f64::from(bv),
                f64::from(cv),
            );
        }
    }
}

fn print_against_ceiling(name: &str, p: &Phase, ceiling: &Phase) {
    println!(
        "  {name}: lease+heartbeat replies {:.0}/s = {} of the ceiling's {:.0}/s; all requests {:.0}/s = {} of {:.0}/s",
        p.lease_ops_per_s(),
        ratio(p.lease_ops_per_s(), ceiling.lease_ops_per_s()),
        ceiling.lease_ops_per_s(),
        p.requests_per_s(),
        ratio(p.requests_per_s(), ceiling.requests_per_s()),
        ceiling.requests_per_s(),
    );
}

/// This checkout's release `hivetrain`, built (or found up to date) first.
fn release_binary(root: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "cli",
            "--bin",
            "hivetrain",
        ])
        .current_dir(root)
        .status()
        .context("running cargo build --release -p cli")?;
    ensure!(status.success(), "cargo build --release -p cli failed");
    Ok(root.join("target/release/hivetrain"))
}

pub(crate) fn run(root: &Path, args: ControlBench) -> anyhow::Result<()> {
    ensure!(args.workers > 0, "--workers must be at least 1");
    ensure!(args.seconds > 0.0, "--seconds must be positive");
    let root = root.canonicalize()?;
    let own = match (&args.coordinator_bin, &args.worker_bin) {
        (Some(_), Some(_)) => None,
        _ => Some(release_binary(&root)?),
    };
    let coordinator_bin = match &args.coordinator_bin {
        Some(p) => p.clone(),
        None => own.clone().context("the release binary")?,
    };
    let worker_bin = match &args.worker_bin {
        Some(p) => p.clone(),
        None => own.clone().context("the release binary")?,
    };
    for bin in [
        Some(&coordinator_bin),
        args.baseline_bin.as_ref(),
        Some(&worker_bin),
    ]
    .into_iter()
    .flatten()
    {
        ensure!(bin.is_file(), "no binary at {}", bin.display());
    }
    let temp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    println!(
        "control plane: {} simulated workers (lease, {} heartbeats, status), {} /metrics reader(s), {} s a phase, {} client thread(s), {} cores here; small preset, {} units a round, H = {}, rounds time out after {} s; store in {}",
        args.workers,
        args.heartbeats,
        args.metrics_readers,
        args.seconds,
        args.client_threads,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.workers + args.train_workers + 2,
        args.local_steps,
        args.round_timeout,
        dir.display()
    );

    let ceiling = if args.no_ceiling {
        None
    } else {
        Some(ceiling(&args)?)
    };
    let candidate = measure_coordinator(
        &args,
        &root,
        &coordinator_bin,
        &worker_bin,
        &dir,
        "candidate",
    )?;
    let baseline = match &args.baseline_bin {
        Some(bin) => Some(measure_coordinator(
            &args,
            &root,
            bin,
            &worker_bin,
            &dir,
            "baseline",
        )?),
        None => None,
    };

    println!("\nsummary");
    if let Some(c) = &ceiling {
        print_against_ceiling("idle", &candidate.0, c);
        if let Some(busy) = &candidate.1 {
            print_against_ceiling("busy", busy, c);
        }
        if let Some(b) = &baseline {
            print_against_ceiling("baseline idle", &b.0, c);
            if let Some(busy) = &b.1 {
                print_against_ceiling("baseline busy", busy, c);
            }
        }
    }
    if let Some(b) = &baseline {
        print_comparison("idle", &candidate.0, &b.0);
        if let (Some(c), Some(b)) = (&candidate.1, &b.1) {
            print_comparison("busy", c, b);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f32> = (1..=100).map(|x| x as f32).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn verdicts_and_replays_are_read_from_a_scrape_and_a_log() {
        let scrape = "# TYPE hivetrain_updates counter\nhivetrain_updates_total{verdict=\"accepted\"} 7\nhivetrain_updates_total{verdict=\"stale\"} 2\nhivetrain_update_bytes_total 123\n# EOF\n";
        let v = update_verdicts(scrape);
        assert_eq!(v.get("accepted"), Some(&7));
        assert_eq!(v.get("stale"), Some(&2));
        assert_eq!(v.len(), 2);
        let log = "x INFO spot-check: the unit matches its re-run unit=3\ny WARN spot-check: the unit does not match its re-run\nz ERROR spot-check: store gone\n";
        assert_eq!(replays_in(log), 2);
    }
}
