//! What a peer serves about its run, as it sees it (`hivetrain peer join --http ADDR`):
//! a dashboard page (`/`), its data as JSON (`/v1/peer`) and Prometheus metrics
//! (`/metrics`): the latest certified version and its holdout loss, the members with
//! how this peer reaches each (direct, relayed, or not now) and the credit the chain
//! mints them. Read-only, behind the coordinator's bounded accept loop.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use mesh::quic::{Path, Paths};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use protocol::WorkerId;
use serde::Serialize;

/// Versions whose loss the page keeps (the newest).
const HISTORY_MAX: usize = 1_000;

/// One certified version, as the page lists it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct VersionRow {
    pub version: u64,
    pub round: i64,
    pub proposer: String,
    pub accepted: usize,
    pub holdout_loss: Option<f32>,
    pub seconds: f64,
}

/// The run as this peer sees it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PeerView {
    pub run: String,
    pub me: String,
    pub model: String,
    pub versions_wanted: u64,
    pub version: u64,
    pub hash: String,
    pub relay: Option<String>,
    pub members: Vec<MemberView>,
    pub history: Vec<VersionRow>,
    /// What the run's re-runs found, as the certified chain has it.
    pub reruns: Reruns,
}

/// Re-runs of sampled units by other members (`peer::Tally`).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Reruns {
    pub matched: u64,
    pub failed: u64,
    pub disputed: u64,
    pub refuted: u64,
    pub waiting: usize,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct MemberView {
    pub id: String,
    /// `self`, `direct`, `relayed` or `none`.
    pub path: String,
    pub credit_micros: u64,
    pub punished: bool,
    /// A unit of its failed a re-run (its credit for it clawed back).
    pub caught: bool,
}

/// What the handlers share: the view the peer updates at every version, and the live
/// paths.
pub(crate) struct Dashboard {
    view: Mutex<PeerView>,
    paths: Paths,
    me: WorkerId,
    members: Vec<WorkerId>,
    started: Instant,
    registry: Registry,
    version: Gauge,
    loss: Gauge<f64, AtomicU64>,
    path: Family<Vec<(&'static str, String)>, Gauge>,
    credit: Family<Vec<(&'static str, String)>, Gauge>,
    reruns: Family<Vec<(&'static str, String)>, Gauge>,
}

impl Dashboard {
    pub(crate) fn new(
        view: PeerView,
        paths: Paths,
        me: WorkerId,
        members: Vec<WorkerId>,
    ) -> Dashboard {
        let mut registry = Registry::with_prefix("hivetrain_peer");
        let version = Gauge::default();
        registry.register("version", "The latest certified version", version.clone());
        let loss = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "holdout_loss",
            "The holdout loss of the latest certified version",
            loss.clone(),
        );
        let path = Family::default();
        registry.register(
            "member_path",
            "How this peer reaches each other member: 1 on its current path (direct, relayed or none)",
            path.clone(),
        );
        let credit = Family::default();
        registry.register(
            "credit_micros",
            "Micro-credits the certified chain mints each member",
            credit.clone(),
        );
        let reruns = Family::default();
        registry.register(
            "reruns",
            "Re-runs of sampled units by other members, by outcome (matched, failed, disputed, refuted), over the certified chain",
            reruns.clone(),
        );
        Dashboard {
            view: Mutex::new(view),
            reruns,
            paths,
            me,
            members,
            started: Instant::now(),
            registry,
            version,
            loss,
            path,
            credit,
        }
    }

    /// Records a certified version.
    pub(crate) fn certified(&self, node: &peer::Node, row: VersionRow) {
        let replica = node.replica();
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        view.version = replica.version();
        view.hash = hex::encode(replica.hash());
        for m in &mut view.members {
            let id = WorkerId::parse(&m.id).unwrap_or(WorkerId([0; 32]));
            m.credit_micros = replica.credit().get(&id).copied().unwrap_or(0);
            m.punished = replica.punished().contains(&id);
            m.caught = replica.caught().contains(&id);
            self.credit
                .get_or_create(&vec![("member", short(&id))])
                .set(m.credit_micros as i64);
        }
        let t = replica.tally();
        view.reruns = Reruns {
            matched: t.matched,
            failed: t.failed,
            disputed: t.disputed,
            refuted: t.refuted,
            waiting: replica.checks_waiting(),
        };
        for (outcome, n) in [
            ("matched", t.matched),
            ("failed", t.failed),
            ("disputed", t.disputed),
            ("refuted", t.refuted),
        ] {
            self.reruns
                .get_or_create(&vec![("outcome", outcome.to_owned())])
                .set(n as i64);
        }
        self.version.set(replica.version() as i64);
        if let Some(loss) = row.holdout_loss {
            self.loss.set(f64::from(loss));
        }
        if view.history.len() == HISTORY_MAX {
            view.history.remove(0);
        }
        view.history.push(row);
    }

    /// The seconds since the peer started.
    pub(crate) fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The view with each member's path now.
    fn snapshot(&self) -> PeerView {
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (m, id) in view.members.iter_mut().zip(&self.members) {
            m.path = if *id == self.me {
                "self".into()
            } else {
                self.paths.of(*id).as_str().into()
            };
        }
        view
    }
}

pub(crate) fn short(id: &WorkerId) -> String {
    id.to_string()[..8].to_owned()
}

/// The routes.
pub(crate) fn router(dashboard: Arc<Dashboard>) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/v1/peer", get(status))
        .route("/metrics", get(metrics))
        .with_state(dashboard)
}

async fn page() -> Html<&'static str> {
    Html(include_str!("peer_dashboard.html"))
}

async fn status(State(d): State<Arc<Dashboard>>) -> axum::Json<PeerView> {
    axum::Json(d.snapshot())
}

async fn metrics(State(d): State<Arc<Dashboard>>) -> impl IntoResponse {
    for id in d.members.iter().filter(|m| **m != d.me) {
        let now = d.paths.of(*id);
        for path in [Path::Direct, Path::Relayed, Path::None] {
            let labels = vec![("member", short(id)), ("path", path.as_str().to_owned())];
            d.path.get_or_create(&labels).set(i64::from(path == now));
        }
    }
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &d.registry).is_err() {
        text.clear();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// A member list for a new view, every credit 0.
pub(crate) fn members_view(members: &[WorkerId]) -> Vec<MemberView> {
    members
        .iter()
        .map(|m| MemberView {
            id: m.to_string(),
            path: "none".into(),
            credit_micros: 0,
            punished: false,
            caught: false,
        })
        .collect()
}
