//! How the peers of a run with no coordinator reach each other (issue 18), and the driver
//! that runs a [`peer::Node`] over a network.
//!
//! [`Transport`] is hivetrain's own trait: authenticated messages between the run's
//! members, whatever carries them. [`memory::MemTransport`] carries them between peers in
//! one process; [`quic::IrohTransport`] over iroh (QUIC with TLS 1.3: a peer's address
//! is its ed25519 key, the same key that signs its updates and votes, so a message's
//! sender is the key the connection proved). Both pass one conformance suite
//! (`tests/it/transport.rs`). [`drive::run`] is the event loop: messages, timers and
//! finished training in, the node's sends, timers and training out.

pub mod drive;
pub mod memory;
pub mod quic;
pub mod relay;
pub mod ticket;

use std::future::Future;
use std::sync::Arc;

use protocol::WorkerId;

/// Messages waiting to go to one peer, at most; past it a message to that peer is
/// dropped (agreement's timeouts and the chain sync recover what a slow peer missed).
pub const QUEUE_MAX: usize = 256;

/// Messages from the run's members. A message's sender is authenticated by the
/// transport; its bytes are not (the node checks every signature inside).
pub trait Transport: Send + 'static {
    /// This peer's key.
    fn id(&self) -> WorkerId;
    /// Queues `bytes` for `to` and returns at once. Never to itself; a message over
    /// `peer::wire::MESSAGE_BYTES_MAX`, to a non-member, or past [`QUEUE_MAX`] queued
    /// for `to` is dropped.
    fn send(&self, to: WorkerId, bytes: Arc<Vec<u8>>);
    /// The next message from another member, and who sent it; `None` once closed.
    fn recv(&mut self) -> impl Future<Output = Option<(WorkerId, Vec<u8>)>> + Send;
    /// Sends what is queued (waiting a bounded time) and closes.
    fn shutdown(self) -> impl Future<Output = ()> + Send;
}

/// Why a transport or a driver stopped.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("the network could not start: {0}")]
    Bind(String),
    #[error(transparent)]
    Peer(#[from] peer::PeerError),
    #[error("a unit's training failed: {0}")]
    Train(String),
}
