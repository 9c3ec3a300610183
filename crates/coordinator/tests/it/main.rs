//! The coordinator over real HTTP: training rounds with real workers, every bad input
//! refused with its code and without effect, restarts that lose nothing, and what stays
//! on disk.

mod bad_input;
mod checks;
mod connections;
mod finetune;
mod flow;
mod hostile;
mod inference;
mod late;
mod ledger;
mod metrics;
mod replay;
mod replication;
mod restart;
mod retention;
mod rounds;
mod scorers;
