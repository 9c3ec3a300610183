//! hivetrain's coordinator: an axum server around the pure scheduling core.
//!
//! [`Core`] holds the run (scheduler, current model, accepted deltas, outer optimizer,
//! store) and is the only thing that changes it; [`http`] is a driver that
//! authenticates, bounds bodies and reads the clock. [`Coordinator::start`] runs both on
//! a runtime of its own, so the CLI, the demo and the tests start one the same way.

mod connections;
pub mod error;
mod http;
mod metrics;
pub mod openai;
mod pool;
mod priority;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::error::ApiError;
use runner::drive;
pub use runner::{CoordinatorConfig, Core, CoreError, MAX_REJECTIONS_RECORDED, config, core};

/// Serves `app` on `listener` with the coordinator's own accept loop and its bounds
/// (`http`: a cap on connections, deadlines on every wait for the client) until
/// `shutdown` completes: for other servers of the same binary (a peer's dashboard).
pub async fn serve_bounded(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    http: &config::HttpLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limits = connections::ConnectionLimits::new(http);
    connections::serve(listener, app, limits, shutdown).await;
}

/// Milliseconds since the Unix epoch: the coordinator's clock.
pub fn system_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A running coordinator: its address, its core, and a way to stop it.
pub struct Coordinator {
    addr: SocketAddr,
    core: Arc<Mutex<Core>>,
    clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// The accept loop; it ends once every connection has closed after `shutdown`.
    server: Option<tokio::task::JoinHandle<()>>,
    checker: Option<Checker>,
}

/// How long [`Coordinator::stop`] waits for requests in flight.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The thread that re-runs sampled units (replay spot-checks) one at a time, holding the
/// core's lock only to take a job and to commit its outcome.
struct Checker {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Checker {
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

fn spawn_checker(
    core: Arc<Mutex<Core>>,
    clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    device: String,
) -> Checker {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::spawn(move || {
        // Re-runs train: heavy work, at its priority (and so is the backend's pool).
        priority::lower_this_thread();
        let mut backend: Option<Box<dyn engine::Backend>> = None;
        while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
            let job = drive::lock(&core).next_check();
            let job = match job {
                Ok(Some(job)) => job,
                Ok(None) => {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Err(e) => {
                    tracing::error!("spot-check: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            let replayed = match &mut backend {
                Some(b) => job.run(b.as_mut()),
                None => job.backend(&device).and_then(|mut b| {
                    let out = job.run(b.as_mut());
                    backend = Some(b);
                    out
                }),
            };
            let outcome = replayed.and_then(|r| {
                drive::run(&core, clock.as_ref(), |core, now| {
                    core.finish_check(job.unit.id, &r, now)
                })
            });
            match outcome {
                Ok(o) if !o.matched => tracing::warn!(
                    unit = o.unit,
                    worker = %o.worker,
                    distance = o.distance,
                    clawed_back = o.clawed_back,
                    requeued = o.requeued,
                    checker_credit = o.checker_credit,
                    "spot-check: the unit does not match its re-run; its credit is clawed back and the worker's unchecked units are queued again (and a volunteer who disputed it is paid its check)"
                ),
                Ok(o) => {
                    tracing::info!(unit = o.unit, worker = %o.worker, "spot-check: the unit matches its re-run")
                }
                Err(e) => tracing::error!(unit = job.unit.id, "spot-check: {e}"),
            }
        }
    });
    Checker { stop, thread }
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Why the coordinator did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

impl Coordinator {
    /// Opens (or resumes) the run in `dir` and serves it on `bind` (`127.0.0.1:0` picks a
    /// free port).
    pub fn start(
        dir: &Path,
        config: CoordinatorConfig,
        bind: &str,
    ) -> Result<Coordinator, StartError> {
        Coordinator::start_with_clock(dir, config, bind, Arc::new(system_ms))
    }

    /// As [`Coordinator::start`], with the clock given (tests move time by hand).
    pub fn start_with_clock(
        dir: &Path,
        config: CoordinatorConfig,
        bind: &str,
        clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Result<Coordinator, StartError> {
        Coordinator::start_mode(dir, config, bind, clock, true)
    }

    /// Serves the run in `dir` without training it: the ledger, wallets and the
    /// inference API, no work for workers (`hivetrain serve`). Use it on a run whose
    /// coordinator is stopped: one process at a time owns a store.
    pub fn serve(
        dir: &Path,
        config: CoordinatorConfig,
        bind: &str,
    ) -> Result<Coordinator, StartError> {
        Coordinator::start_mode(dir, config, bind, Arc::new(system_ms), false)
    }

    fn start_mode(
        dir: &Path,
        config: CoordinatorConfig,
        bind: &str,
        clock: Arc<dyn Fn() -> u64 + Send + Sync>,
        training: bool,
    ) -> Result<Coordinator, StartError> {
        let max_clock_skew_ms = config.max_clock_skew_ms;
        let limits = config.limits;
        let (codec, http_limits) = (config.codec, config.http.clone());
        let serving = openai::Inference {
            requests_per_minute: config.serving.requests_per_minute,
            device: config.devices.serving.clone(),
            limits: inference::Limits {
                max_tokens: config.serving.max_tokens,
                default_max_tokens: 64.min(config.serving.max_tokens),
                prompt_tokens: config.serving.max_prompt_tokens,
            },
            buckets: Arc::default(),
            generations: Arc::new(tokio::sync::Semaphore::new(
                config.serving.concurrency as usize,
            )),
        };
        let scoring_memory_mb = config
            .devices
            .scoring_memory_mb
            .unwrap_or_else(pool::default_scoring_memory_mb);
        let spot_check = config.spot_check.clone();
        let replay_device = config.devices.replay.clone();
        // The holdout evaluator the core opens computes at the default priority: the
        // round waits for it (lowered, it made aggregations in the control-plane
        // benchmark 1.6x-2.4x slower), unlike scoring and re-runs (`priority.rs`).
        let mut core = Core::open(dir, config, clock())?;
        core.defer_aggregation();
        let core_blobs = core.blobs();
        let reads = core.reads();
        // The one size an update of this run has; a body is never read past it.
        let update_bytes =
            protocol::update_len(codec, core.run_info().n_params).min(limits.update_bytes_max);
        // Scoring backends: as many as the budget holds of one evaluation backend at the
        // run's model and batch, after the replay checker's one training backend (when
        // spot-checks are on), at least one, at most the updates read at once. A LoRA
        // run's backends share the frozen base the core holds once, so it is not counted
        // per backend.
        let scoring = core.scoring_backend_spec();
        let info = core.run_info();
        let shared = engine::frozen_bytes(&scoring.model.spec);
        let bytes = |purpose| {
            engine::backend_bytes(
                &scoring.model.spec,
                purpose,
                info.batch as usize,
                info.seq as usize,
            )
            .saturating_sub(shared)
        };
        let scorer_bytes = bytes(engine::Purpose::Eval);
        let replay_bytes = if core.config().spot_check.enabled {
            bytes(engine::Purpose::Train)
        } else {
            0
        };
        let scorers = pool::pool_size(
            scoring_memory_mb,
            replay_bytes,
            scorer_bytes,
            http_limits.upload_concurrency as usize,
        );
        tracing::info!(
            scorers,
            scorer_mb = scorer_bytes / (1024 * 1024),
            replay_mb = replay_bytes / (1024 * 1024),
            scoring_memory_mb,
            "scoring backends: at most {scorers}"
        );
        let core = Arc::new(Mutex::new(core));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("coordinator")
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(bind))
            .map_err(|source| StartError::Bind {
                addr: bind.to_owned(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: bind.to_owned(),
            source,
        })?;
        let shared = http::Shared {
            core: core.clone(),
            reads,
            clock: clock.clone(),
            max_clock_skew_ms,
            update_bytes,
            limits,
            body_deadline: http::BodyDeadline::new(&http_limits),
            uploads: Arc::new(tokio::sync::Semaphore::new(
                http_limits.upload_concurrency as usize,
            )),
            uploads_limit: http_limits.upload_concurrency as usize,
            blobs: core_blobs,
            buffers: Arc::default(),
            scorers: pool::Pool::new(scorers),
            scoring,
            serving,
            metrics: Arc::new(metrics::Metrics::new()),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = http::router(shared, training);
        let connection_limits = connections::ConnectionLimits::new(&http_limits);
        let server = runtime.spawn(connections::serve(
            listener,
            app,
            connection_limits,
            async {
                let _ = rx.await;
            },
        ));
        // Time passes without requests too: leases expire, rounds time out.
        let ticking = core.clone();
        let checking_clock = clock.clone();
        let kept_clock = clock.clone();
        runtime.spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(500));
            loop {
                interval.tick().await;
                let core = ticking.clone();
                let clock = clock.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    drive::run(&core, clock.as_ref(), |core, now| {
                        if training {
                            core.tick(now)?;
                            core.flush(now, false)?;
                        }
                        core.dividends_if_due(now)
                    })
                })
                .await;
            }
        });
        let checker = if training && spot_check.enabled {
            Some(spawn_checker(core.clone(), checking_clock, replay_device))
        } else {
            None
        };
        Ok(Coordinator {
            addr,
            core,
            clock: kept_clock,
            runtime: Some(runtime),
            shutdown: Some(tx),
            server: Some(server),
            checker,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Runs `f` on the core once no aggregation is under way (tests read the model and
    /// the store this way), then any aggregation `f` made due.
    pub fn with_core<T>(&self, f: impl FnOnce(&mut Core) -> T) -> T {
        loop {
            let core = drive::lock(&self.core);
            if !core.aggregating() {
                break;
            }
            drop(core);
            std::thread::sleep(Duration::from_millis(5));
        }
        drive::run(&self.core, self.clock.as_ref(), |core, _| f(core))
    }

    /// Stops serving, lets requests in flight finish (for up to 10 s), and closes the
    /// store. Call it from outside the coordinator's runtime, as any blocking call.
    pub fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let (Some(runtime), Some(server)) = (&self.runtime, self.server.take()) {
            let _ = runtime.block_on(async { tokio::time::timeout(STOP_WAIT, server).await });
        }
        if let Some(checker) = self.checker.take() {
            checker.stop();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(10));
        }
        let mut core = drive::lock(&self.core);
        let now = (self.clock)();
        if let Err(e) = core.flush(now, true) {
            tracing::error!("writing the lease renewals kept in memory: {e}");
        }
    }

    /// Stops at once, as a crash would: in-flight requests are dropped mid-way. (Every
    /// committed change is already durable; nothing else is flushed.)
    pub fn kill(mut self) {
        self.shutdown.take();
        if let Some(checker) = self.checker.take() {
            // A kill drops the job in flight: it stays queued in the store.
            checker
                .stop
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(checker) = self.checker.take() {
            checker
                .stop
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
