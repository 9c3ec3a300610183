//! The crash harness: a real `hivetrain coordinator` process with real `hivetrain worker`
//! processes on loopback, the coordinator killed with SIGKILL at seeded moments and
//! started again each time, then the run checked for what a crash must never do: a gap
//! in the versions, an update a worker was told was accepted missing from the store, a
//! mint missing or repeated, a broken ledger.
//!
//! It lives here, not in xtask, so that `cargo xtask chaos` (the long run) and the CLI's
//! integration test (a few kills in CI) run the same code: the test has the binary from
//! `CARGO_BIN_EXE_hivetrain`, xtask builds it.
//!
//! The moments are aimed from what the processes print: the coordinator's `update
//! accepted` log line comes right after the update's row and mint are committed and
//! before the reply (and, for the round's K-th, before the aggregation that follows under
//! the same lock); `spot-check: ...` lines end one re-run and the next begins; a new
//! version starts both workers training, and their uploads (read, scored, written) fill
//! the end of the time a round's first acceptance takes.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use protocol::WorkerId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a chaos run is asked to do.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// The `hivetrain` binary.
    pub binary: PathBuf,
    /// An empty or absent directory the run lives in (coordinator store, keys, logs).
    pub dir: PathBuf,
    /// SIGKILLs of the coordinator.
    pub kills: u32,
    /// Seed of the kill schedule (and of the run's weights and data).
    pub seed: u64,
    /// Worker processes.
    pub workers: u32,
    /// Loopback port of the coordinator (the same at every restart).
    pub port: u16,
    /// Also run the same seed without kills, to the same version, and compare.
    pub reference: bool,
}

/// Where a kill was aimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Moment {
    /// While the restarted coordinator opens the store, replays the ledger and resumes.
    Startup,
    /// Late in a round's training, when the workers' uploads are being read and scored.
    Upload,
    /// Right after an update's row and mint are committed, before its reply.
    LedgerAppend,
    /// Right after a round's K-th acceptance: the aggregation and holdout scoring.
    Aggregation,
    /// Inside a spot-check re-run.
    Replay,
    /// A uniform random time after the coordinator is up.
    Uniform,
}

impl Moment {
    const ALL: [Moment; 6] = [
        Moment::Startup,
        Moment::Upload,
        Moment::LedgerAppend,
        Moment::Aggregation,
        Moment::Replay,
        Moment::Uniform,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Moment::Startup => "startup",
            Moment::Upload => "upload",
            Moment::LedgerAppend => "ledger append",
            Moment::Aggregation => "aggregation",
            Moment::Replay => "replay",
            Moment::Uniform => "uniform",
        }
    }
}

/// What a chaos run did and found.
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    /// Kills by the moment they were aimed at: (on its event, after waiting in vain).
    pub kills: BTreeMap<Moment, (u32, u32)>,
    pub coordinator_starts: u32,
    pub worker_restarts: u32,
    /// The newest version in the store.
    pub versions: u64,
    /// Accepted updates in the store.
    pub accepted_stored: u64,
    /// Updates the workers were told were accepted.
    pub accepted_told: u64,
    /// Told accepted, but no row, or no blob though the row says it is kept.
    pub lost: Vec<u64>,
    /// Units with more than one mint, or a mint for no accepted update.
    pub duplicate_mints: Vec<String>,
    /// `hivetrain ledger verify` passed (and the harness's own replay of the ledger).
    pub ledger_verified: bool,
    /// Versions compared with an unkilled run of the same seed: (compared, identical).
    pub reference: Option<(u64, u64)>,
    /// Every failed check, in words.
    pub failures: Vec<String>,
    /// The kills and their restarts alone.
    pub kill_seconds: f64,
    /// Everything, the checks and the unkilled run included.
    pub seconds: f64,
}

/// Why the harness itself could not run (a failed check is a [`ChaosReport::failures`]).
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error("{what}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("{0}")]
    Run(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ChaosError {
    let what = what.into();
    move |source| ChaosError::Io { what, source }
}

/// How long one kill waits for its event before killing anyway.
const EVENT_WAIT: Duration = Duration::from_secs(20);
/// How long a start may take to print `coordinator listening`.
const START_WAIT: Duration = Duration::from_secs(60);
/// A round's K (and MIN): every round aggregates exactly this many updates.
const UNITS_PER_ROUND: u32 = 2;

/// What the processes print that the harness acts on.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// The coordinator of this start is listening.
    Listening(u32),
    /// It accepted an update of `round` (start, round).
    Accepted(u32, u64),
    /// It finished a re-run.
    SpotCheck(u32),
    /// Its `version N:` line.
    Version(u32, u64),
    /// It exited; the last lines it printed.
    Exited(u32, String),
}

/// A worker was told its update of `unit` was accepted, with this credit (as printed).
#[derive(Debug, Clone, PartialEq)]
struct Told {
    worker: String,
    unit: u64,
    credit: String,
}

/// The run's TOML: the tiny preset, K = MIN = 2 and no staleness (so every version is
/// the same two units whatever the timing), every unit re-run (so re-runs go on all
/// along), and leases short enough that one lost with a kill comes back soon.
fn config_toml(corpus: &Path, tokenizer: &Path, seed: u64) -> String {
    format!(
        "preset = \"tiny\"\nseed = {seed}\ncorpus = {corpus:?}\ntokenizer = {tokenizer:?}\nbatch = 4\nholdout_batches = 4\n\
         [schedule]\nunits_per_round = {UNITS_PER_ROUND}\nmin_updates = {UNITS_PER_ROUND}\nsteps_per_unit = 10\ninner_lr = 0.003\nn_shards = 4\n\
         lease_ms = 15000\nlease_max_ms = 120000\nround_timeout_ms = 600000\nmax_staleness = 0\n\
         [spot_check]\ntrusted_after = 1000000\n[devices]\nholdout = \"cpu:1\"\n"
    )
}

/// How long a round takes from its new version to its first acceptance (training and
/// upload), learned as the run goes, to aim kills at uploads.
struct Timing {
    round_time: Duration,
    version_seen: Option<Instant>,
}

impl Timing {
    /// Learns from an event; never picks it (so it can stand in a `wait_for`).
    fn note(&mut self, at: Instant, event: &Event) -> bool {
        match event {
            Event::Version(..) => self.version_seen = Some(at),
            Event::Accepted(..) => {
                if let Some(seen) = self.version_seen.take() {
                    let took = at.saturating_duration_since(seen);
                    self.round_time = (self.round_time * 3 + took) / 4;
                }
            }
            _ => {}
        }
        false
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// SIGINT (the Ctrl-C that stops a worker after its upload, a coordinator cleanly),
    /// then waits up to `wait`; killed past it. Whether it stopped by itself.
    fn interrupt(mut self, wait: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.0.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

/// One run directory's processes and what they printed.
struct Run<'a> {
    options: &'a ChaosOptions,
    dir: PathBuf,
    config: PathBuf,
    events: Receiver<(Instant, Event)>,
    sender: Sender<(Instant, Event)>,
    /// The worker stderr readers, joined at the end so that no told line is missed.
    readers: Vec<std::thread::JoinHandle<()>>,
    starts: u32,
    coordinator: Option<Proc>,
    workers: Vec<(String, Proc)>,
    worker_restarts: u32,
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

impl<'a> Run<'a> {
    fn new(options: &'a ChaosOptions, dir: &Path) -> Result<Run<'a>, ChaosError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let corpus = crate::small_corpus(&options.dir);
        let config = dir.join("coordinator.toml");
        let text = config_toml(
            &corpus,
            &crate::repo_root().join("data/tokenizer.json"),
            options.seed,
        );
        std::fs::write(&config, text).map_err(io("writing the config"))?;
        let (sender, events) = channel();
        Ok(Run {
            options,
            dir: dir.to_owned(),
            config,
            events,
            sender,
            starts: 0,
            coordinator: None,
            workers: Vec::new(),
            worker_restarts: 0,
            readers: Vec::new(),
        })
    }

    fn log(&self, name: &str) -> Result<std::fs::File, ChaosError> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .map_err(io(format!("opening the log {name}")))
    }

    /// Spawns the coordinator (start number `self.starts`); its stderr goes to the
    /// events and to `coordinator.log`.
    fn spawn_coordinator(&mut self) -> Result<(), ChaosError> {
        self.starts += 1;
        let start = self.starts;
        let mut child = Command::new(&self.options.binary)
            .arg("coordinator")
            .arg("--dir")
            .arg(self.dir.join("store"))
            .args(["--bind", &format!("127.0.0.1:{}", self.options.port)])
            .arg("--config")
            .arg(&self.config)
            .env("HIVETRAIN_CACHE_DIR", self.options.dir.join("cache"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("starting hivetrain coordinator"))?;
        let stderr = child.stderr.take();
        let mut log = self.log("coordinator.log")?;
        let sender = self.sender.clone();
        std::thread::spawn(move || {
            let mut tail = std::collections::VecDeque::new();
            let _ = writeln!(log, "=== start {start}");
            for line in stderr.into_iter().flat_map(|s| BufReader::new(s).lines()) {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if let Some(event) = coordinator_event(start, &line) {
                    let _ = sender.send((Instant::now(), event));
                }
                tail.push_back(line);
                if tail.len() > 5 {
                    tail.pop_front();
                }
            }
            let tail: Vec<String> = tail.into();
            let _ = sender.send((Instant::now(), Event::Exited(start, tail.join("\n"))));
        });
        self.coordinator = Some(Proc(child));
        Ok(())
    }

    /// Waits for an event that `want` picks (of the current start), up to `wait`.
    /// An exit of the current coordinator is an error.
    fn wait_for(
        &mut self,
        wait: Duration,
        mut want: impl FnMut(Instant, &Event) -> bool,
    ) -> Result<Option<Event>, ChaosError> {
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((_, Event::Exited(start, tail))) if start == self.starts => {
                    return Err(ChaosError::Run(format!(
                        "the coordinator (start {start}) exited by itself; it printed:\n{tail}"
                    )));
                }
                Ok((at, event)) if want(at, &event) => return Ok(Some(event)),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ChaosError::Run("the event channel closed".into()));
                }
            }
            self.keep_workers()?;
        }
    }

    /// Starts the coordinator and waits until it listens.
    fn start_coordinator(&mut self) -> Result<(), ChaosError> {
        self.spawn_coordinator()?;
        let start = self.starts;
        match self.wait_for(START_WAIT, |_, e| *e == Event::Listening(start))? {
            Some(_) => Ok(()),
            None => Err(ChaosError::Run(format!(
                "the coordinator (start {start}) did not listen within {START_WAIT:?}"
            ))),
        }
    }

    fn kill_coordinator(&mut self) {
        // Dropping sends SIGKILL and reaps it.
        self.coordinator = None;
    }

    fn spawn_worker(&mut self, n: u32) -> Result<(String, Proc), ChaosError> {
        let name = format!("w{n}");
        let child = Command::new(&self.options.binary)
            .arg("worker")
            .args(["--coordinator", &url(self.options.port)])
            .args(["--name", &name, "--device", "cpu:1"])
            .arg("--key")
            .arg(self.options.dir.join(format!("{name}.key")))
            .arg("--data-dir")
            .arg(self.options.dir.join(format!("{name}-data")))
            .args(["--unreachable-timeout", "300"])
            .env("HIVETRAIN_CACHE_DIR", self.options.dir.join("cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = child.map_err(io("starting hivetrain worker"))?;
        let stderr = child.stderr.take();
        let mut log = self.log(&format!("{name}.log"))?;
        // The log is what the checks read (`told`), so a kept run can be checked again.
        let reader = std::thread::spawn(move || {
            for line in stderr.into_iter().flat_map(|s| BufReader::new(s).lines()) {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
            }
        });
        self.readers.push(reader);
        Ok((name, Proc(child)))
    }

    fn start_workers(&mut self) -> Result<(), ChaosError> {
        for n in 0..self.options.workers {
            let worker = self.spawn_worker(n)?;
            self.workers.push(worker);
        }
        Ok(())
    }

    /// Starts again a worker that exited (the workers retry an unreachable coordinator
    /// for minutes, so this is for anything else that ends one).
    fn keep_workers(&mut self) -> Result<(), ChaosError> {
        for n in 0..self.workers.len() {
            if let Ok(Some(_)) = self.workers[n].1.0.try_wait() {
                self.workers[n] = self.spawn_worker(n as u32)?;
                self.worker_restarts += 1;
            }
        }
        Ok(())
    }

    /// Stops the workers with Ctrl-C (each finishes an upload in flight), then the
    /// coordinator; first running `hivetrain ledger verify` against it.
    fn stop(&mut self) -> Result<bool, ChaosError> {
        for (_, worker) in self.workers.drain(..) {
            worker.interrupt(Duration::from_secs(60));
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let verify = Command::new(&self.options.binary)
            .args(["ledger", "verify", "--coordinator", &url(self.options.port)])
            .arg("--key")
            .arg(self.options.dir.join("w0.key"))
            .env("HIVETRAIN_CACHE_DIR", self.options.dir.join("cache"))
            .output()
            .map_err(io("running hivetrain ledger verify"))?;
        let mut log = self.log("ledger-verify.log")?;
        let _ = log.write_all(&verify.stdout);
        let _ = log.write_all(&verify.stderr);
        if let Some(coordinator) = self.coordinator.take() {
            coordinator.interrupt(Duration::from_secs(30));
        }
        Ok(verify.status.success())
    }
}

fn coordinator_event(start: u32, line: &str) -> Option<Event> {
    if line.starts_with("coordinator listening on ") {
        return Some(Event::Listening(start));
    }
    if line.contains("update accepted") {
        let round = field(line, "round=")?.parse().ok()?;
        return Some(Event::Accepted(start, round));
    }
    if line.contains("spot-check: the unit") {
        return Some(Event::SpotCheck(start));
    }
    let version = line.strip_prefix("version ")?.split(':').next()?;
    Some(Event::Version(start, version.parse().ok()?))
}

/// The value after `name` in a tracing line, up to a space.
fn field<'l>(line: &'l str, name: &str) -> Option<&'l str> {
    let at = line.find(name)? + name.len();
    line[at..].split_whitespace().next()
}

/// `unit 12: accepted (norm 11.216; 2 accepted this round; +0.000004 credits)`.
fn told_accepted(line: &str) -> Option<(u64, String)> {
    let rest = line.strip_prefix("unit ")?;
    let (unit, rest) = rest.split_once(": accepted (")?;
    let credit = rest.rsplit_once('+')?.1.strip_suffix(" credits)")?;
    Some((unit.parse().ok()?, credit.to_owned()))
}

/// `worker w0 (HEX) joined: ...`.
fn joined_id(line: &str) -> Option<String> {
    let rest = line.strip_prefix("worker ")?;
    let (_, rest) = rest.split_once(" (")?;
    let (id, rest) = rest.split_once(')')?;
    rest.starts_with(" joined").then(|| id.to_owned())
}

/// Runs the kills and the checks. `progress` is told each kill done (and what it is
/// doing, in a few words).
pub fn run(
    options: &ChaosOptions,
    progress: &mut dyn FnMut(u32, &str),
) -> Result<ChaosReport, ChaosError> {
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut report = ChaosReport::default();
    let mut run = Run::new(options, &options.dir.join("chaos"))?;
    progress(0, "starting the coordinator and the workers");
    run.start_coordinator()?;
    run.start_workers()?;
    let mut timing = Timing {
        round_time: Duration::from_secs(3),
        version_seen: None,
    };
    // The first kill finds the coordinator up already: it is not aimed at a start.
    let mut moment = Moment::ALL[rng.random_range(1..Moment::ALL.len())];
    for kill in 0..options.kills {
        progress(kill, moment.name());
        let start = run.starts;
        let hit = match moment {
            Moment::Startup => {
                // Spawned at the end of the last iteration, not waited for.
                std::thread::sleep(Duration::from_millis(rng.random_range(0..1500)));
                true
            }
            Moment::Uniform => {
                let delay = Duration::from_millis(rng.random_range(0..4000));
                run.wait_for(delay, |at, e| timing.note(at, e))?;
                true
            }
            Moment::LedgerAppend | Moment::Aggregation => {
                let mut accepted: HashMap<u64, u32> = HashMap::new();
                let got = run.wait_for(EVENT_WAIT, |at, e| {
                    timing.note(at, e);
                    let Event::Accepted(s, round) = e else {
                        return false;
                    };
                    let n = accepted.entry(*round).or_default();
                    *n += 1;
                    // The K-th of a round starts its aggregation under the same lock;
                    // an earlier one is an append alone.
                    *s == start && (moment == Moment::LedgerAppend || *n >= UNITS_PER_ROUND)
                })?;
                if moment == Moment::Aggregation {
                    std::thread::sleep(Duration::from_millis(rng.random_range(0..150)));
                }
                got.is_some()
            }
            Moment::Replay => {
                let got = run.wait_for(EVENT_WAIT, |at, e| {
                    timing.note(at, e);
                    matches!(e, Event::SpotCheck(s) if *s == start)
                })?;
                // The next re-run starts now; one of the tiny unit takes about 1.5 s on
                // the 2-core machine.
                std::thread::sleep(Duration::from_millis(rng.random_range(100..1200)));
                got.is_some()
            }
            Moment::Upload => {
                let got = run.wait_for(EVENT_WAIT, |at, e| {
                    timing.note(at, e);
                    matches!(e, Event::Version(s, _) if *s == start)
                })?;
                // Uploads (read, scored, written) fill the end of a round's training.
                let frac = rng.random_range(0.55..1.0);
                std::thread::sleep(timing.round_time.mul_f64(frac));
                got.is_some()
            }
        };
        let counts = report.kills.entry(moment).or_default();
        if hit {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
        run.kill_coordinator();
        run.keep_workers()?;
        moment = Moment::ALL[rng.random_range(0..Moment::ALL.len())];
        if moment == Moment::Startup && kill + 1 < options.kills {
            run.spawn_coordinator()?;
        } else {
            run.start_coordinator()?;
        }
    }
    report.kill_seconds = started.elapsed().as_secs_f64();
    progress(options.kills, "finishing: one more version without kills");
    let start = run.starts;
    let version_after = run.wait_for(
        EVENT_WAIT * 3,
        |_, e| matches!(e, Event::Version(s, _) if *s == start),
    )?;
    if version_after.is_none() {
        report
            .failures
            .push("no new version within 60 s after the last restart".into());
    }
    progress(options.kills, "stopping and checking");
    report.ledger_verified = run.stop()?;
    report.coordinator_starts = run.starts;
    report.worker_restarts = run.worker_restarts;
    if !report.ledger_verified {
        report
            .failures
            .push("hivetrain ledger verify failed (chaos/ledger-verify.log)".into());
    }
    let store_dir = run.dir.join("store");
    check(&run.dir, &mut report)?;
    if options.reference && report.versions > 0 {
        progress(options.kills, "the same seed without kills");
        let mut reference = Run::new(options, &options.dir.join("reference"))?;
        reference.start_coordinator()?;
        reference.start_workers()?;
        let want = report.versions;
        let start = reference.starts;
        let wait = EVENT_WAIT * (want as u32 + 3);
        let reached = reference.wait_for(
            wait,
            |_, e| matches!(e, Event::Version(s, v) if *s == start && *v >= want),
        )?;
        reference.stop()?;
        if reached.is_none() {
            report
                .failures
                .push(format!("the unkilled run did not reach version {want}"));
        }
        compare(&store_dir, &reference.dir.join("store"), &mut report)?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What the workers of a run printed (their `wN.log` in `run_dir`): each update they were
/// told was accepted, and each worker's id.
fn told(run_dir: &Path) -> Result<(Vec<Told>, HashMap<String, String>), ChaosError> {
    let (mut told, mut ids) = (Vec::new(), HashMap::new());
    for n in 0.. {
        let worker = format!("w{n}");
        let path = run_dir.join(format!("{worker}.log"));
        if !path.exists() {
            break;
        }
        let text =
            std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
        for line in text.lines() {
            if let Some((unit, credit)) = told_accepted(line) {
                let worker = worker.clone();
                told.push(Told {
                    worker,
                    unit,
                    credit,
                });
            } else if let Some(id) = joined_id(line) {
                ids.insert(worker.clone(), id);
            }
        }
    }
    Ok((told, ids))
}

/// Checks a stopped run (`run_dir` of a kept chaos run: its `store` and the workers'
/// logs) again; the figures of [`ChaosReport`] that come from the store and the logs.
pub fn check_run(run_dir: &Path) -> Result<ChaosReport, ChaosError> {
    let mut report = ChaosReport {
        ledger_verified: true,
        ..ChaosReport::default()
    };
    check(run_dir, &mut report)?;
    Ok(report)
}

/// The checks on the store after the kills (`ledger_verified` is cleared if the
/// harness's own replay of the ledger fails).
fn check(run_dir: &Path, report: &mut ChaosReport) -> Result<(), ChaosError> {
    let (told, ids) = told(run_dir)?;
    let dir = &run_dir.join("store");
    let store = store::Store::open(dir)?;
    let fail = |report: &mut ChaosReport, m: String| report.failures.push(m);
    // Versions 0..=N, each the child of the one before.
    let versions = store.versions()?;
    for (i, v) in versions.iter().enumerate() {
        let parent = (i > 0).then(|| i as u64 - 1);
        if v.version != i as u64 || v.parent != parent {
            fail(
                report,
                format!(
                    "version {} (parent {:?}) where version {i} (parent {parent:?}) belongs",
                    v.version, v.parent
                ),
            );
        }
        if v.checkpoint_pruned_ms.is_none() && store.blobs().size(&v.checkpoint).is_none() {
            fail(
                report,
                format!("version {}: its checkpoint blob is missing", v.version),
            );
        }
        if i > 0 && v.updates.len() != UNITS_PER_ROUND as usize {
            fail(
                report,
                format!(
                    "version {} aggregates {} updates",
                    v.version,
                    v.updates.len()
                ),
            );
        }
    }
    report.versions = versions.last().map_or(0, |v| v.version);
    // Every update a worker was told was accepted: its row, its blob, its worker.
    let kept: std::collections::HashSet<u64> =
        store.updates_kept()?.iter().map(|u| u.unit).collect();
    let units = store.accepted_units()?;
    report.accepted_stored = units.len() as u64;
    report.accepted_told = told.len() as u64;
    let entries = store.ledger_entries()?;
    let mut mints: HashMap<String, Vec<&ledger::Entry>> = HashMap::new();
    for e in entries.iter().filter(|e| e.kind == ledger::Kind::Mint) {
        mints.entry(e.reference.clone()).or_default().push(e);
    }
    let mut told_units = std::collections::HashSet::new();
    for t in &told {
        if !told_units.insert(t.unit) {
            fail(report, format!("unit {} was told accepted twice", t.unit));
        }
        let Some(row) = store.update(t.unit)? else {
            report.lost.push(t.unit);
            fail(
                report,
                format!("unit {} was told accepted but has no row", t.unit),
            );
            continue;
        };
        if kept.contains(&t.unit) && store.blobs().size(&row.blob).is_none() {
            report.lost.push(t.unit);
            fail(
                report,
                format!("unit {}: its row is kept but its blob is missing", t.unit),
            );
        }
        if ids.get(&t.worker) != Some(&row.worker) {
            fail(
                report,
                format!("unit {} is stored as another worker's", t.unit),
            );
        }
        let minted = mints.get(&coordinator::core::mint_reference(t.unit));
        if let Some([mint]) = minted.map(|m| m.as_slice())
            && ledger::format_credits(mint.amount) != t.credit
        {
            fail(
                report,
                format!(
                    "unit {}: told +{} credits, minted {}",
                    t.unit,
                    t.credit,
                    ledger::format_credits(mint.amount)
                ),
            );
        }
    }
    // Exactly one mint per accepted update, to its worker, and no other mint.
    for &unit in &units {
        let reference = coordinator::core::mint_reference(unit);
        match mints.get(&reference).map(|m| m.as_slice()) {
            Some([mint]) => {
                let worker = store.update(unit)?.and_then(|r| WorkerId::parse(&r.worker));
                if worker.is_none() || mint.to != worker.map(ledger::Account::Wallet) {
                    fail(
                        report,
                        format!("the mint of unit {unit} is not to its worker"),
                    );
                }
            }
            Some(many) => {
                report.duplicate_mints.push(reference.clone());
                fail(report, format!("unit {unit} has {} mints", many.len()));
            }
            None => fail(report, format!("accepted unit {unit} has no mint")),
        }
    }
    let accepted: std::collections::HashSet<String> = units
        .iter()
        .map(|&u| coordinator::core::mint_reference(u))
        .collect();
    for reference in mints.keys().filter(|r| !accepted.contains(*r)) {
        report.duplicate_mints.push(reference.clone());
        fail(
            report,
            format!("mint {reference} is for no accepted update"),
        );
    }
    // The ledger replayed here too: no balance below zero (every spend and clawback
    // covered), and the balances sum to what was minted less what was burned.
    let (authority, _) = keys::load_or_create(&dir.join("ledger.key"))
        .map_err(|e| ChaosError::Run(format!("the ledger key: {e}")))?;
    match ledger::Ledger::replay(authority.verifying_key(), entries) {
        Ok(ledger) => {
            let sum: u128 = ledger.balances().values().map(|&b| b as u128).sum();
            if sum != ledger.minted() - ledger.burned() {
                fail(
                    report,
                    format!(
                        "balances sum to {sum} micro-credits, minted {} less burned {}",
                        ledger.minted(),
                        ledger.burned()
                    ),
                );
            }
        }
        Err(e) => {
            report.ledger_verified = false;
            fail(report, format!("the ledger does not replay: {e}"));
        }
    }
    Ok(())
}

/// Compares each version with the unkilled run's: the same units (shard, offset, seed)
/// and the same checkpoint bytes. Kills only delay work here (K = MIN, no staleness,
/// bit-exact CPU training), so a difference is a failure.
fn compare(killed: &Path, reference: &Path, report: &mut ChaosReport) -> Result<(), ChaosError> {
    let (a, b) = (store::Store::open(killed)?, store::Store::open(reference)?);
    let (va, vb) = (a.versions()?, b.versions()?);
    let (mut compared, mut same) = (0, 0);
    for (x, y) in va.iter().zip(&vb) {
        compared += 1;
        let address = |s: &store::Store, units: &[u64]| -> Result<Vec<_>, ChaosError> {
            let mut out = Vec::new();
            for &u in units {
                out.push(s.unit(u)?.map(|r| {
                    (
                        r.address.shard,
                        r.address.offset,
                        r.address.steps,
                        r.address.seed,
                    )
                }));
            }
            out.sort_by_key(|a| format!("{a:?}"));
            Ok(out)
        };
        let same_units = address(&a, &x.updates)? == address(&b, &y.updates)?;
        if same_units && x.checkpoint == y.checkpoint {
            same += 1;
        } else {
            report.failures.push(format!(
                "version {} differs from the unkilled run's ({})",
                x.version,
                if same_units {
                    "same units, other weights"
                } else {
                    "other units"
                }
            ));
        }
    }
    report.reference = Some((compared, same));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_lines_are_read() {
        let cases: &[(&str, Option<Event>)] = &[
            (
                "coordinator listening on http://127.0.0.1:1 (round 0, version 0); workers join with",
                Some(Event::Listening(3)),
            ),
            (
                "2026-11-30T11:51:13.811637Z  INFO coordinator::core: update accepted unit=2 worker=d2 round=7 norm=12.9 credit=4 code=\"accepted\"",
                Some(Event::Accepted(3, 7)),
            ),
            (
                "2026-11-30T11:51:15.773549Z  INFO coordinator: spot-check: the unit matches its re-run unit=2 worker=d2",
                Some(Event::SpotCheck(3)),
            ),
            (
                "version 12: holdout loss 7.9368, 2 accepted, 0 rejected, 7.0 s",
                Some(Event::Version(3, 12)),
            ),
            ("opening the run in run (tiny preset)", None),
        ];
        for (line, want) in cases {
            assert_eq!(coordinator_event(3, line), *want, "{line}");
        }
        assert_eq!(
            told_accepted(
                "unit 12: accepted (norm 11.216; 2 accepted this round; +0.000004 credits)"
            ),
            Some((12, "0.000004".to_owned()))
        );
        assert_eq!(told_accepted("unit 12: rejected, stale (stale)"), None);
        assert_eq!(
            joined_id("worker w0 (1d25) joined: tiny model, 289664 params"),
            Some("1d25".to_owned())
        );
    }
}
