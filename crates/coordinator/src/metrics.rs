//! Prometheus metrics at `GET /metrics`, in the OpenMetrics text format that the
//! `prometheus-client` crate writes. Counters are kept at the HTTP edge since this
//! process started (requests by route, method and status; their latency; updates by
//! verdict; tokens served); gauges are read from the core at each scrape (version,
//! round, holdout loss, workers, ledger and credit totals, the scoring pool). Every label takes a bounded
//! set of values: routes as matched, known methods, status codes, verdict codes.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ApiError;
use crate::http::{Shared, read};

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Request latencies from 1 ms to about 33 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The registry and a handle on each metric in it.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    request_seconds: Histograms,
    updates: Family<Labels, Counter>,
    update_bytes: Counter,
    tokens: Family<Labels, Counter>,
    version: Gauge,
    round: Gauge,
    holdout_loss: Gauge<f64, AtomicU64>,
    workers: Gauge,
    accepted_updates: Gauge,
    tokens_trained: Gauge,
    ledger_entries: Gauge,
    wallets: Gauge,
    credit: Family<Labels, Gauge>,
    scorers: Family<Labels, Gauge>,
    uploads: Family<Labels, Gauge>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hivetrain");
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            requests.clone(),
        );
        let request_seconds: Histograms = Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_seconds",
            "Time to a reply's headers, by route and method",
            request_seconds.clone(),
        );
        let updates = Family::<Labels, Counter>::default();
        registry.register(
            "updates",
            "Updates received, by verdict (accepted, or the refusal's code)",
            updates.clone(),
        );
        let update_bytes = Counter::default();
        registry.register(
            "update_bytes",
            "Bytes of accepted updates",
            update_bytes.clone(),
        );
        let tokens = Family::<Labels, Counter>::default();
        registry.register(
            "inference_tokens",
            "Tokens of answered completions, by kind (prompt or completion)",
            tokens.clone(),
        );
        let mut gauge = |name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let version = gauge("model_version", "The newest model version");
        let round = gauge("round", "The round being trained");
        let workers = gauge("workers", "Workers registered");
        let accepted_updates = gauge(
            "accepted_updates",
            "Updates accepted over the whole run (stored)",
        );
        let tokens_trained = gauge(
            "tokens_trained",
            "Tokens of the accepted units' training over the whole run",
        );
        let ledger_entries = gauge("ledger_entries", "Entries in the credit ledger");
        let wallets = gauge("wallets", "Wallets holding credit");
        let holdout_loss = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "holdout_loss",
            "Holdout loss of the newest model version",
            holdout_loss.clone(),
        );
        let credit = Family::<Labels, Gauge>::default();
        registry.register(
            "credit_micro",
            "Credit in micro-credits, by what (minted, burned, pool)",
            credit.clone(),
        );
        let scorers = Family::<Labels, Gauge>::default();
        registry.register(
            "scorers",
            "Scoring backends, by what (size: the most the memory budget allows; open; in_use; peak_in_use: the most in use at once since start)",
            scorers.clone(),
        );
        let uploads = Family::<Labels, Gauge>::default();
        registry.register(
            "uploads",
            "Update bodies being read or validated, by what (limit: http.upload_concurrency; in_flight: holding a permit now)",
            uploads.clone(),
        );
        Metrics {
            registry,
            scorers,
            requests,
            request_seconds,
            updates,
            update_bytes,
            tokens,
            version,
            round,
            holdout_loss,
            workers,
            accepted_updates,
            tokens_trained,
            ledger_entries,
            wallets,
            credit,
            uploads,
        }
    }

    /// Counts an update's verdict (`Ok`: accepted, with its size in bytes).
    pub(crate) fn update(&self, verdict: Result<u64, &str>) {
        let code = match verdict {
            Ok(bytes) => {
                self.update_bytes.inc_by(bytes);
                "accepted"
            }
            Err(code) => code,
        };
        self.updates
            .get_or_create(&vec![("verdict", code.to_owned())])
            .inc();
    }

    /// Counts the tokens of an answered completion.
    pub(crate) fn served(&self, prompt_tokens: u64, completion_tokens: u64) {
        for (kind, n) in [("prompt", prompt_tokens), ("completion", completion_tokens)] {
            self.tokens
                .get_or_create(&vec![("kind", kind.to_owned())])
                .inc_by(n);
        }
    }
}

/// The method as a label: the usual ones by name, any other as `other` (a client may
/// send any token as a method; the label's values stay bounded).
fn method_label(method: &Method) -> String {
    match *method {
        Method::GET | Method::POST | Method::PUT | Method::DELETE | Method::HEAD => {
            method.as_str().to_owned()
        }
        _ => "other".to_owned(),
    }
}

/// Middleware: counts and times every request by the route it matched.
pub(crate) async fn track(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let m = &shared.metrics;
    m.request_seconds
        .get_or_create(&vec![("route", route.clone()), ("method", method.clone())])
        .observe(started.elapsed().as_secs_f64());
    m.requests
        .get_or_create(&vec![
            ("route", route),
            ("method", method),
            ("status", response.status().as_u16().to_string()),
        ])
        .inc();
    response
}

/// `GET /metrics`.
pub(crate) async fn scrape(State(shared): State<Shared>) -> Result<Response, ApiError> {
    // From memory on this thread when nothing they count changed since the last scrape;
    // a store read goes to a blocking thread.
    let cached = shared
        .reads
        .stats_cached()
        .zip(shared.reads.holdout_loss_cached())
        .map(|(stats, loss)| (stats, shared.reads.published().round, loss));
    let (stats, round, loss) = match cached {
        Some(gauges) => gauges,
        None => {
            read(&shared, |reads| {
                Ok::<_, ApiError>((
                    reads.stats()?,
                    reads.published().round,
                    reads.holdout_loss()?,
                ))
            })
            .await?
        }
    };
    let m = &shared.metrics;
    let as_gauge = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
    m.version.set(as_gauge(stats.current_version));
    m.round.set(as_gauge(round));
    m.holdout_loss.set(f64::from(loss));
    m.workers.set(as_gauge(stats.workers));
    m.accepted_updates.set(as_gauge(stats.accepted_updates));
    m.tokens_trained.set(as_gauge(stats.tokens_trained));
    m.ledger_entries.set(as_gauge(stats.entries));
    m.wallets.set(as_gauge(stats.wallets));
    for (what, micro) in [
        ("minted", stats.minted),
        ("burned", stats.burned),
        ("pool", stats.pool),
    ] {
        m.credit
            .get_or_create(&vec![("what", what.to_owned())])
            .set(as_gauge(micro));
    }
    let pool = shared.scorers.counts();
    for (what, n) in [
        ("size", pool.size),
        ("open", pool.open),
        ("in_use", pool.in_use),
        ("peak_in_use", pool.peak_in_use),
    ] {
        m.scorers
            .get_or_create(&vec![("what", what.to_owned())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let free = shared.uploads.available_permits();
    for (what, n) in [
        ("limit", shared.uploads_limit),
        ("in_flight", shared.uploads_limit.saturating_sub(free)),
    ] {
        m.uploads
            .get_or_create(&vec![("what", what.to_owned())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &m.registry)
        .map_err(|e| ApiError::internal(&e))?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
