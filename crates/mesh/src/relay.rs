//! A relay that anyone can run (`hivetrain relay`): iroh's own relay server, over plain
//! HTTP (the messages it forwards are QUIC packets, encrypted end to end between the
//! peers; the relay sees who talks with whom, never what). Peers behind NATs that will
//! not let them reach each other directly keep a connection to it; iroh then tries to
//! punch through and falls back to the relay when it cannot.
//!
//! Bounded: at most [`CONNECTIONS_MAX`] clients at once, each read at most
//! [`CLIENT_BYTES_PER_SECOND`]; given the run's members, it admits only them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use iroh::RelayUrl;
use iroh_relay::server::{
    Access, AccessControl, ClientRateLimit, ClientRequest, ConnectionId, Limits, RelayConfig,
    Server, ServerConfig,
};
use protocol::WorkerId;

use crate::MeshError;

/// Clients connected at once, at most.
pub const CONNECTIONS_MAX: usize = 1024;

/// What the relay reads from one client a second, at most (a burst of one second's worth).
pub const CLIENT_BYTES_PER_SECOND: u32 = 64 << 20;

/// Who may connect.
#[derive(Debug)]
struct Admission {
    /// The run's members, or anyone.
    members: Option<BTreeSet<[u8; 32]>>,
    connected: AtomicUsize,
}

impl AccessControl for Admission {
    async fn on_connect(&self, request: &ClientRequest) -> Access {
        let id = *request.endpoint_id().as_bytes();
        if self.members.as_ref().is_some_and(|m| !m.contains(&id)) {
            tracing::debug!("refused a relay client that is not a member");
            return Access::Deny {
                reason: Some("not a member of this relay's run".into()),
            };
        }
        let admitted = self
            .connected
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < CONNECTIONS_MAX).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            Access::Allow
        } else {
            tracing::warn!("refused a relay client: {CONNECTIONS_MAX} are connected");
            Access::Deny {
                reason: Some(format!("{CONNECTIONS_MAX} clients are connected")),
            }
        }
    }

    fn on_disconnect(&self, _: iroh::EndpointId, _: ConnectionId) {
        self.connected.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running relay.
pub struct Relay {
    server: Server,
    url: RelayUrl,
}

impl Relay {
    /// Serves a relay on `bind` (TCP), for `members` only when given.
    pub async fn spawn(bind: SocketAddr, members: Option<&[WorkerId]>) -> Result<Relay, MeshError> {
        let mut relay = RelayConfig::new(bind);
        relay.limits = Limits::default();
        let per_second = NonZeroU32::new(CLIENT_BYTES_PER_SECOND).expect("non-zero");
        let mut rate = ClientRateLimit::new(per_second);
        rate.max_burst_bytes = Some(per_second);
        relay.limits.client_rx = Some(rate);
        relay.access = Arc::new(Admission {
            members: members.map(|m| m.iter().map(|w| w.0).collect()),
            connected: AtomicUsize::new(0),
        });
        let mut config = ServerConfig::default();
        config.relay = Some(relay);
        let server = Server::spawn(config)
            .await
            .map_err(|e| MeshError::Bind(format!("the relay: {e}")))?;
        let addr = server
            .http_addr()
            .ok_or_else(|| MeshError::Bind("the relay has no address".into()))?;
        let url = format!("http://{addr}")
            .parse()
            .map_err(|_| MeshError::Bind(format!("no URL for {addr}")))?;
        Ok(Relay { server, url })
    }

    /// Where peers reach it (`http://ADDRESS:PORT`; with an unspecified bind address,
    /// give peers one of the machine's addresses instead).
    pub fn url(&self) -> &RelayUrl {
        &self.url
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        let _ = self.server.shutdown().await;
    }
}
