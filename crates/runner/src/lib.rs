//! A training run held by one process: the store (SQLite rows and content-addressed
//! blobs), the signed ledger, and the engine work a run needs (scoring, replays,
//! aggregation, serving), around the decisions of [`run`] and [`scheduler`].
//!
//! [`Core`] is the only thing that changes a run; [`drive`] is how threads share it (one
//! lock, held only for the cheap part; heavy work outside it). It knows nothing of HTTP:
//! the coordinator's server and the simulator both drive it, and its errors are
//! [`run::RunError`]s, which each driver turns into its own replies.

pub mod config;
pub mod core;
pub mod drive;

pub use crate::config::CoordinatorConfig;
pub use crate::core::{Core, CoreError, MAX_REJECTIONS_RECORDED};
