//! The lease loop: lease, fetch the base model, train H steps, send the delta, repeat.
//!
//! Stopping (the `stop` flag, set by Ctrl-C) is checked between training steps: a unit
//! in training is abandoned (its lease expires and the coordinator reissues it); an
//! upload in flight is finished first. A crashed worker needs nothing: started again,
//! it asks for a new lease.
//!
//! A lease is heart-beaten from a thread of its own ([`crate::heartbeat`]) from the
//! moment it is granted to the update's verdict; a unit the coordinator withdraws is
//! dropped between stages or steps, and the worker asks for another.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use engine::Backend;
use protocol::api::{LeaseReply, RunInfo, SubmitReply};
use protocol::{UpdateHeader, WorkUnit, WorkerId};

use crate::transport::{Refusal, Transport, TransportError};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// A name shown on the coordinator's tables.
    pub name: String,
    /// Compute device (`cpu`, `cpu:N`).
    pub device: String,
    /// Stop after this many units (accepted or not); none: run until stopped.
    pub max_units: Option<u64>,
    /// Where the corpus, tokenizer and token cache are kept.
    pub data_dir: PathBuf,
    /// Give up when the coordinator cannot be reached for this long.
    pub unreachable_timeout: Duration,
}

/// What a run of the loop did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub units: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub abandoned: u64,
    /// Units the coordinator withdrew before their update was sent.
    pub withdrawn: u64,
    /// Heartbeats that renewed a lease.
    pub heartbeats: u64,
    /// Bytes of the updates sent.
    pub bytes_sent: u64,
}

/// Why the loop ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Checkpoint(#[from] engine::checkpoint::CheckpointError),
    #[error(transparent)]
    Setup(#[from] Box<crate::setup::SetupError>),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the coordinator sent {what} whose hash does not match what it announced")]
    HashMismatch { what: String },
    #[error(
        "the coordinator's model has {got} parameters but the run announces {want}; is the coordinator consistent?"
    )]
    ModelShape { got: usize, want: u32 },
    #[error(
        "the run announces model {id} with {trainable} trainable floats but updates of {n_params}; is the coordinator consistent?"
    )]
    ModelSpec {
        id: String,
        trainable: usize,
        n_params: u32,
    },
}

/// Where the loop tells what it does (the CLI draws progress bars; tests stay quiet).
pub trait Reporter {
    fn message(&mut self, _text: &str) {}
    fn unit_started(&mut self, _unit: &WorkUnit) {}
    fn step(&mut self, _step: u32, _loss: f32, _tokens_per_second: f64) {}
    fn uploading(&mut self, _bytes: u64) {}
    fn verdict(&mut self, _unit: &WorkUnit, _verdict: &Result<SubmitReply, Refusal>) {}
}

/// A reporter that says nothing.
impl Reporter for () {}

/// The run's model and data, fetched and prepared once.
struct RunData {
    info: RunInfo,
    model: crate::unit::RunModel,
    train: data::Examples,
}

/// Runs the lease loop until `stop`, `max_units`, or an error that retrying cannot fix.
pub fn run(
    transport: &dyn Transport,
    key: &SigningKey,
    options: &WorkerOptions,
    stop: &AtomicBool,
    reporter: &mut dyn Reporter,
) -> Result<Summary, WorkerError> {
    let data = retrying(options, stop, || prepare(transport, options, reporter))?;
    let Some(data) = data else {
        return Ok(Summary::default());
    };
    let machine = measure(&data, options)?;
    reporter.message(&format!(
        "this machine: {}, {:.0} tokens/s on the run's model (class {})",
        machine.device, machine.tokens_per_s, machine.class
    ));
    if retrying(options, stop, || {
        transport
            .register(key, &options.name, Some(&machine))
            .map_err(WorkerError::from)
    })?
    .is_none()
    {
        return Ok(Summary::default());
    }
    reporter.message(&format!(
        "worker {} ({}) joined: {} model, {} params, {} codec",
        options.name,
        WorkerId::of(key),
        data.info.model.id(),
        data.info.n_params,
        codec_name(data.info.codec)
    ));
    let mut summary = Summary::default();
    let mut model: Option<(u64, Box<dyn Backend>, Vec<f32>)> = None;
    while !stop.load(Ordering::SeqCst) && options.max_units.is_none_or(|m| summary.units < m) {
        let Some(reply) = retrying(options, stop, || {
            match transport.lease(key) {
                // A coordinator bounds its registrations and may have dropped ours while
                // we had no lease: join again.
                Err(TransportError::Refused(r)) if r.code == "unknown_worker" => {
                    transport.register(key, &options.name, Some(&machine))?;
                    transport.lease(key)
                }
                other => other,
            }
            .map_err(WorkerError::from)
        })?
        else {
            break;
        };
        let (unit, model_blake3, heartbeat_ms) = match reply {
            LeaseReply::NoWork { retry_after_ms } => {
                sleep_unless_stopped(stop, Duration::from_millis(retry_after_ms.min(10_000)));
                continue;
            }
            LeaseReply::Lease {
                unit,
                model_blake3,
                heartbeat_ms,
                ..
            } => (unit, model_blake3, heartbeat_ms),
        };
        reporter.unit_started(&unit);
        summary.units += 1;
        let beat = || transport.heartbeat(key, unit.id);
        let every = Duration::from_millis(heartbeat_ms);
        let (outcome, renewed) = crate::heartbeat::while_beating(every, beat, |heartbeats| {
            let lease = Lease {
                unit: &unit,
                model_blake3: &model_blake3,
                heartbeats,
            };
            let outcome = work(
                transport, key, options, &data, &mut model, &lease, stop, reporter,
            );
            (outcome, heartbeats.renewed())
        });
        summary.heartbeats += renewed;
        let outcome = outcome?;
        match outcome {
            Outcome::Verdict { verdict, bytes } => {
                summary.bytes_sent += bytes;
                match &verdict {
                    Ok(_) => summary.accepted += 1,
                    Err(_) => summary.rejected += 1,
                }
                reporter.verdict(&unit, &verdict);
            }
            Outcome::Withdrawn(message) => {
                summary.withdrawn += 1;
                reporter.message(&format!(
                    "unit {} was withdrawn: {message}; asking for another",
                    unit.id
                ));
            }
            Outcome::Stopped => {
                summary.abandoned += 1;
                reporter.message(&format!(
                    "stopping: unit {} abandoned (its lease will expire and it will be reissued)",
                    unit.id
                ));
                break;
            }
        }
    }
    Ok(summary)
}

/// A unit as leased, and its heartbeats.
struct Lease<'a> {
    unit: &'a WorkUnit,
    model_blake3: &'a str,
    heartbeats: &'a crate::heartbeat::Heartbeats,
}

impl Lease<'_> {
    /// Reports the heartbeats that failed since the last call, and whether the unit is
    /// still this worker's (the coordinator's sentence if not).
    fn still_ours(&self, reporter: &mut dyn Reporter) -> Result<(), String> {
        for failure in self.heartbeats.take_failures() {
            reporter.message(&failure);
        }
        self.heartbeats.withdrawn().map_or(Ok(()), Err)
    }
}

/// How one leased unit ended.
enum Outcome {
    /// Sent (`bytes`), and the coordinator's verdict.
    Verdict {
        verdict: Result<SubmitReply, Refusal>,
        bytes: u64,
    },
    /// The coordinator withdrew the unit (its round ended, or the lease expired) before
    /// its update was sent: the worker asks for another.
    Withdrawn(String),
    /// Stopped by the `stop` flag before the update was sent.
    Stopped,
}

/// The work of one lease, while its heartbeats go: the base version (fetched, checked
/// and opened unless `model` holds it), the unit trained, its update sent. The base and
/// the backend are kept in `model` for the next unit.
#[allow(clippy::too_many_arguments)]
fn work(
    transport: &dyn Transport,
    key: &SigningKey,
    options: &WorkerOptions,
    data: &RunData,
    model: &mut Option<(u64, Box<dyn Backend>, Vec<f32>)>,
    lease: &Lease<'_>,
    stop: &AtomicBool,
    reporter: &mut dyn Reporter,
) -> Result<Outcome, WorkerError> {
    let unit = lease.unit;
    if model
        .as_ref()
        .is_none_or(|(v, _, _)| *v != unit.base_version)
    {
        let Some(bytes) = retrying(options, stop, || {
            transport
                .model(unit.base_version)
                .map_err(WorkerError::from)
        })?
        else {
            return Ok(Outcome::Stopped);
        };
        if blake3::hash(&bytes).to_hex().as_str() != lease.model_blake3 {
            return Err(WorkerError::HashMismatch {
                what: format!("model version {}", unit.base_version),
            });
        }
        let trained = engine::checkpoint::trained_from_bytes(
            Path::new(&format!("model version {}", unit.base_version)),
            &bytes,
            &data.info.model,
        )?;
        let backend = match model.take() {
            Some((_, mut backend, _)) => {
                backend.set_trainable(&trained.trainable)?;
                backend
            }
            None => data
                .model
                .open(&options.device, &trained.trainable, engine::Purpose::Train)?,
        };
        *model = Some((unit.base_version, backend, trained.trainable));
    }
    let Some((_, backend, base)) = model.as_mut() else {
        return Ok(Outcome::Stopped);
    };
    if let Err(message) = lease.still_ours(reporter) {
        return Ok(Outcome::Withdrawn(message));
    }
    let Some(delta) = train_unit(backend.as_mut(), base, data, lease, stop, reporter)? else {
        return Ok(match lease.still_ours(reporter) {
            Err(message) => Outcome::Withdrawn(message),
            Ok(()) => Outcome::Stopped,
        });
    };
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).unwrap_or_default();
    let header = UpdateHeader {
        work_unit: unit.id,
        base_version: unit.base_version,
        worker: WorkerId::of(key),
        nonce: u64::from_le_bytes(nonce),
        codec: data.info.codec,
        n_params: delta.len() as u32,
    };
    let update = protocol::encode_update(&header, &delta, key);
    reporter.uploading(update.len() as u64);
    let bytes = update.len() as u64;
    // The upload in flight is finished even when stopping; the heartbeats go on while
    // the coordinator scores it.
    let never = AtomicBool::new(false);
    let verdict = retrying(options, &never, || match transport.submit(update.clone()) {
        Ok(reply) => Ok(Ok(reply)),
        Err(TransportError::Refused(refusal)) => Ok(Err(refusal)),
        Err(e) => Err(WorkerError::from(e)),
    })?;
    Ok(match verdict {
        Some(verdict) => Outcome::Verdict { verdict, bytes },
        None => Outcome::Stopped,
    })
}

/// Training steps of the start-up measurement; the last one is timed (the first warms
/// the buffers up).
const MEASURE_STEPS: u32 = 2;

/// Measures this machine on the run's model: its device, its determinism class and the
/// tokens a second of a training step at the run's batch shape, timed on the second of
/// two steps of shard 0 from zeroed trainable weights (what the coordinator sizes work
/// by; the weights do not change the time a step takes).
fn measure(data: &RunData, options: &WorkerOptions) -> Result<protocol::api::Machine, WorkerError> {
    let mut backend = data
        .model
        .open_empty(&options.device, engine::Purpose::Train)?;
    let zeros = vec![0.0f32; data.model.spec.trainable_len()];
    let (batch, seq) = (data.info.batch as usize, data.info.seq as usize);
    let unit = WorkUnit {
        id: 0,
        round: 0,
        base_version: 0,
        address: protocol::WorkAddress {
            shard: 0,
            offset: 0,
            steps: MEASURE_STEPS,
            seed: 0,
        },
        lr: 0.0,
    };
    let unit_data = crate::unit::UnitData {
        train: &data.train,
        n_shards: data.info.n_shards,
        batch,
        seq,
    };
    let mut last = Instant::now();
    let mut step_secs = f64::INFINITY;
    crate::unit::train(backend.as_mut(), &zeros, unit_data, &unit, &mut |_, _| {
        step_secs = last.elapsed().as_secs_f64();
        last = Instant::now();
        true
    })?;
    let class = match engine::resolve_device(&options.device)? {
        engine::Device::Cpu { .. } => engine::cpu_class(),
        engine::Device::Cuda { ordinal } => engine::cuda::probe(ordinal)
            .map_err(engine::EngineError::from)?
            .class(),
    };
    Ok(protocol::api::Machine {
        device: backend.device(),
        class,
        tokens_per_s: ((batch * seq) as f64 / step_secs.max(1e-9))
            .min(protocol::api::MACHINE_TOKENS_PER_S_MAX),
    })
}

/// Trains the unit through [`crate::unit::train`], reporting each step and stopping
/// when asked or when the unit is withdrawn (its heartbeats are another thread's).
/// `None`: stopped or withdrawn.
fn train_unit(
    backend: &mut dyn Backend,
    base: &[f32],
    data: &RunData,
    lease: &Lease<'_>,
    stop: &AtomicBool,
    reporter: &mut dyn Reporter,
) -> Result<Option<Vec<f32>>, WorkerError> {
    let (batch, seq) = (data.info.batch as usize, data.info.seq as usize);
    let started = Instant::now();
    let unit_data = crate::unit::UnitData {
        train: &data.train,
        n_shards: data.info.n_shards,
        batch,
        seq,
    };
    crate::unit::train(backend, base, unit_data, lease.unit, &mut |step, loss| {
        let tokens = step as usize * batch * seq;
        reporter.step(
            step,
            loss,
            tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
        );
        lease.still_ours(reporter).is_ok() && !stop.load(Ordering::SeqCst)
    })
}

/// Fetches (or finds in the data dir) the corpus and tokenizer, checks their hashes, and
/// tokenizes the corpus.
fn prepare(
    transport: &dyn Transport,
    options: &WorkerOptions,
    reporter: &mut dyn Reporter,
) -> Result<RunData, WorkerError> {
    let info = transport.run_info()?;
    info.model.validate().map_err(engine::EngineError::from)?;
    if info.model.trainable_len() != info.n_params as usize {
        return Err(WorkerError::ModelSpec {
            id: info.model.id(),
            trainable: info.model.trainable_len(),
            n_params: info.n_params,
        });
    }
    let dir = &options.data_dir;
    let short = |sha: &str| sha.chars().take(16).collect::<String>();
    let corpus_path = dir.join(format!(
        "{}-{}",
        short(&info.corpus_sha256),
        sanitize(&info.corpus_name)
    ));
    let tokenizer_path = dir.join(format!("{}-tokenizer.json", short(&info.tokenizer_sha256)));
    fetch_once(
        &corpus_path,
        &info.corpus_sha256,
        "the corpus",
        reporter,
        || transport.corpus(info.corpus_bytes),
    )?;
    fetch_once(
        &tokenizer_path,
        &info.tokenizer_sha256,
        "the tokenizer",
        reporter,
        || transport.tokenizer(),
    )?;
    let seq = info.seq as usize;
    let (model, pretrained) = match &info.base {
        None => (
            crate::unit::RunModel::trained_in_full(info.model.clone())?,
            None,
        ),
        Some(base) => {
            // The base is kept by its hash: fetched and checked once, whatever the run.
            let path = dir.join(format!(
                "base-{}-{}",
                short(&base.sha256),
                sanitize(&base.name)
            ));
            fetch_once(&path, &base.sha256, "the base model", reporter, || {
                transport.base(base)
            })?;
            let context = info.model.n_ctx();
            let mut loaded = crate::setup::load_base(&path, context).map_err(Box::new)?;
            let model =
                crate::setup::run_model(&info.model, &mut loaded, &path).map_err(Box::new)?;
            (model, Some(loaded.pretrained))
        }
    };
    let (train, _) = crate::setup::examples(
        info.data,
        &corpus_path,
        &tokenizer_path,
        pretrained.as_ref(),
        seq,
        &dir.join("cache"),
    )
    .map_err(Box::new)?;
    Ok(RunData { info, model, train })
}

fn sanitize(name: &str) -> String {
    let clean = crate::setup::plain_name(name);
    if clean.is_empty() || clean.starts_with('.') {
        format!("corpus{clean}")
    } else {
        clean
    }
}

fn fetch_once(
    path: &Path,
    sha256: &str,
    what: &str,
    reporter: &mut dyn Reporter,
    fetch: impl Fn() -> Result<Vec<u8>, TransportError>,
) -> Result<(), WorkerError> {
    if let Ok(bytes) = std::fs::read(path)
        && data::sha256_hex(&bytes) == sha256
    {
        return Ok(());
    }
    reporter.message(&format!("downloading {what}"));
    let bytes = fetch()?;
    if data::sha256_hex(&bytes) != sha256 {
        return Err(WorkerError::HashMismatch {
            what: what.to_owned(),
        });
    }
    engine::checkpoint::write_atomic(path, &bytes).map_err(|e| WorkerError::Write {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Longest a worker keeps asking a coordinator that answers busy (503) before it gives
/// up: a coordinator that answers is alive and working (scoring a burst of updates on a
/// small machine can take minutes), so this is far longer than an unreachable one is
/// waited for, but bounded.
pub const BUSY_WAIT_MAX: Duration = Duration::from_secs(30 * 60);

/// Runs `f`, retrying while the coordinator is unreachable (backing off up to 10 s) for
/// at most `options.unreachable_timeout`, and while it answers busy (after the wait it
/// asks for) for at most [`BUSY_WAIT_MAX`]; an answer restarts the unreachable clock.
/// `None`: stopped while waiting.
fn retrying<T>(
    options: &WorkerOptions,
    stop: &AtomicBool,
    mut f: impl FnMut() -> Result<T, WorkerError>,
) -> Result<Option<T>, WorkerError> {
    let started = Instant::now();
    let mut unreachable_since = started;
    let mut wait = Duration::from_millis(250);
    loop {
        let (pause, answered) = match f() {
            Ok(v) => return Ok(Some(v)),
            Err(WorkerError::Transport(TransportError::Unreachable { .. }))
                if unreachable_since.elapsed() < options.unreachable_timeout =>
            {
                let pause = wait;
                wait = (wait * 2).min(Duration::from_secs(10));
                (pause, false)
            }
            Err(WorkerError::Transport(TransportError::Busy { retry_after, .. }))
                if started.elapsed() < BUSY_WAIT_MAX =>
            {
                wait = Duration::from_millis(250);
                (retry_after, true)
            }
            Err(e) => return Err(e),
        };
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        sleep_unless_stopped(stop, pause);
        if answered {
            // The wait it asked for is not time unreachable.
            unreachable_since = Instant::now();
        }
    }
}

fn sleep_unless_stopped(stop: &AtomicBool, total: Duration) {
    let until = Instant::now() + total;
    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
    }
}

/// The codec as the config spells it.
pub(crate) fn codec_name(codec: protocol::Codec) -> String {
    match codec {
        protocol::Codec::Fp32 => "fp32".into(),
        protocol::Codec::Fp16 => "fp16".into(),
        protocol::Codec::Int8Chunk { chunk } => format!("int8 (chunks of {chunk})"),
        protocol::Codec::Int8Codebook => "int8 codebook".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the coordinator does on one call.
    #[derive(Clone, Copy, Debug)]
    enum Answer {
        Ok,
        Unreachable,
        Busy(u64),
        Refused,
    }

    /// `retrying` over `answers` (the last repeats) with an unreachable timeout of
    /// `timeout_ms`: whether it succeeded, and the calls made.
    #[track_caller]
    fn check(answers: &[Answer], timeout_ms: u64, expect: (bool, usize)) {
        let options = WorkerOptions {
            name: "w".into(),
            device: "cpu:1".into(),
            max_units: None,
            data_dir: PathBuf::new(),
            unreachable_timeout: Duration::from_millis(timeout_ms),
        };
        let mut calls = 0;
        let result = retrying(&options, &AtomicBool::new(false), || {
            let answer = answers[calls.min(answers.len() - 1)];
            calls += 1;
            let url = "http://coordinator".to_owned();
            let refusal = Refusal {
                status: 503,
                code: "scorers_busy".into(),
                message: "busy".into(),
            };
            Err(WorkerError::Transport(match answer {
                Answer::Ok => return Ok(()),
                Answer::Unreachable => TransportError::Unreachable {
                    url,
                    message: "refused".into(),
                },
                Answer::Busy(ms) => TransportError::Busy {
                    url,
                    refusal,
                    retry_after: Duration::from_millis(ms),
                },
                Answer::Refused => TransportError::Refused(refusal),
            }))
        });
        assert_eq!(
            (matches!(result, Ok(Some(()))), calls),
            expect,
            "{answers:?}"
        );
    }

    #[test]
    fn busy_answers_are_waited_out_and_are_not_unreachable() {
        use Answer::*;
        check(&[Ok], 0, (true, 1));
        check(&[Refused], 1_000, (false, 1));
        // Unreachable past the timeout: given up.
        check(&[Unreachable], 0, (false, 1));
        // Busy for longer than the unreachable timeout: still asked again.
        check(&[Busy(30), Busy(30), Busy(30), Ok], 10, (true, 4));
        // The wait a busy answer asks for restarts the unreachable clock.
        check(&[Busy(60), Unreachable, Ok], 40, (true, 3));
        check(&[Unreachable, Unreachable, Ok], 5_000, (true, 3));
    }
}
