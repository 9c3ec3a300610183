//! Peers over iroh: QUIC with TLS 1.3, each endpoint's identity its ed25519 key (the
//! peer's hivetrain key: the same 32-byte seed gives the same public key in iroh's
//! ed25519 and in hivetrain's). A message is one unidirectional stream on a connection
//! kept per peer; the receiver names the sender by the key the TLS handshake proved, and
//! refuses connections from keys that are not members. Dialled by the addresses a peer
//! learns from the run's ticket: sockets, and the run's own relay (`crate::relay`) when it
//! has one, through which iroh punches a direct path where the NATs allow and forwards
//! the packets where they do not. No relay or address lookup of a third party is used.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use iroh::endpoint::{Connection, SendStream, presets};
use iroh::{
    Endpoint, EndpointAddr, EndpointId, RelayConfig, RelayMap, RelayMode, RelayUrl, SecretKey,
};
use iroh_relay::RelayQuicConfig;
use iroh_relay::tls::CaTlsConfig;
use protocol::WorkerId;
use tokio::sync::mpsc;

use crate::relay::RelayRef;
use crate::{MeshError, QUEUE_MAX, Transport};

/// The protocol peers speak on iroh.
pub const ALPN: &[u8] = b"hivetrain/peer/1";

/// How long a dial may take before the message it carries is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams sent whose receipt is awaited when a peer's queue closes, at most (older ones
/// were acknowledged long before, in practice).
const UNACKED_MAX: usize = 64;

/// How long a closing transport waits for its last messages to be acknowledged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one message may take to go out (a peer that stopped reading holds streams
/// open: its connection is dropped and dialled again for the next message).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long closing the endpoint waits for peers to acknowledge it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Streams a connection may have open at once from the other side (each a message being
/// read): what one peer can make this one hold.
const STREAMS_PER_CONNECTION_MAX: usize = 16;

/// Connections one member may have open to this peer at once (one is the rule; a few
/// cover a reconnect racing the old connection's close).
const CONNECTIONS_PER_MEMBER_MAX: usize = 4;

/// One peer's end of the run's network over iroh.
pub struct IrohTransport {
    id: WorkerId,
    endpoint: Endpoint,
    inbox: mpsc::Receiver<(WorkerId, Vec<u8>)>,
    /// A queue per member, drained by that member's sending task.
    outboxes: BTreeMap<WorkerId, mpsc::Sender<Arc<Vec<u8>>>>,
    /// The sending tasks, awaited on shutdown.
    senders: Vec<tokio::task::JoinHandle<()>>,
    addresses: Arc<Mutex<BTreeMap<WorkerId, EndpointAddr>>>,
    relay: Option<RelayUrl>,
    /// Each member's connection as its sending task last dialled it.
    links: Links,
}

type Links = Arc<Mutex<BTreeMap<WorkerId, Connection>>>;

/// How a peer reaches another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Not connected (yet, or any more).
    None,
    /// UDP between the two, NATs punched through where there are any.
    Direct,
    /// Through the run's relay.
    Relayed,
}

/// A view of how a peer's messages reach the other members.
#[derive(Clone)]
pub struct Paths(Links);

impl Paths {
    /// How messages reach `member` now.
    pub fn of(&self, member: WorkerId) -> Path {
        let links = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(connection) = links.get(&member) else {
            return Path::None;
        };
        if connection.close_reason().is_some() {
            return Path::None;
        }
        let paths = connection.paths();
        let selected = paths.iter().find(|p| p.is_selected());
        match selected {
            Some(p) if p.is_ip() => Path::Direct,
            Some(p) if p.is_relay() => Path::Relayed,
            _ => Path::None,
        }
    }
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::None => "none",
            Path::Direct => "direct",
            Path::Relayed => "relayed",
        }
    }
}

/// An iroh endpoint id for a hivetrain key.
fn endpoint_id(worker: &WorkerId) -> Option<EndpointId> {
    EndpointId::from_bytes(&worker.0).ok()
}

impl IrohTransport {
    /// Binds an endpoint for `key` on `bind` (a UDP socket address) that talks with
    /// `members` only, keeping a connection to `relay` when one is given.
    pub async fn bind(
        key: &SigningKey,
        bind: SocketAddr,
        members: &[WorkerId],
        relay: Option<&RelayRef>,
    ) -> Result<IrohTransport, MeshError> {
        let secret = SecretKey::from_bytes(&key.to_bytes());
        let mut builder = Endpoint::builder(presets::Minimal)
            .clear_ip_transports()
            .bind_addr(bind)
            .map_err(|e| MeshError::Bind(e.to_string()))?
            .secret_key(secret)
            .alpns(vec![ALPN.to_vec()]);
        let relay_url = match relay {
            Some(relay) => {
                let url = relay.relay_url().map_err(MeshError::Bind)?;
                let quic = relay.quic_port.map(RelayQuicConfig::new);
                let config = RelayConfig::new(url.clone(), quic);
                builder = builder.relay_mode(RelayMode::Custom(RelayMap::from(config)));
                // The relay's own certificate, and no other, for its address discovery.
                if let Some(cert) = relay.cert_der().map_err(MeshError::Bind)? {
                    builder = builder.ca_tls_config(CaTlsConfig::custom_roots([cert]));
                }
                Some(url)
            }
            None => None,
        };
        let endpoint = builder
            .bind()
            .await
            .map_err(|e| MeshError::Bind(e.to_string()))?;
        let id = WorkerId::of(key);
        let (inbox_tx, inbox) = mpsc::channel(QUEUE_MAX);
        let addresses = Arc::new(Mutex::new(BTreeMap::new()));
        let links: Links = Arc::default();
        let mut outboxes = BTreeMap::new();
        let mut senders = Vec::new();
        for member in members.iter().filter(|m| **m != id) {
            let (tx, rx) = mpsc::channel(QUEUE_MAX);
            outboxes.insert(*member, tx);
            senders.push(tokio::spawn(sending(
                endpoint.clone(),
                *member,
                rx,
                addresses.clone(),
                links.clone(),
            )));
        }
        let allowed: Vec<WorkerId> = members.to_vec();
        tokio::spawn(accepting(endpoint.clone(), allowed, inbox_tx));
        Ok(IrohTransport {
            id,
            endpoint,
            inbox,
            outboxes,
            senders,
            addresses,
            relay: relay_url,
            links,
        })
    }

    /// Where this peer is reached: its key, the sockets it is bound to, and its relay.
    pub fn addr(&self) -> EndpointAddr {
        let mut addr = EndpointAddr::new(self.endpoint.id());
        for socket in self.endpoint.bound_sockets() {
            addr = addr.with_ip_addr(socket);
        }
        if let Some(relay) = &self.relay {
            addr = addr.with_relay_url(relay.clone());
        }
        addr
    }

    /// Waits until the relay (if any) has accepted this peer, at most `limit`: a peer
    /// that other members can only reach through the relay is not reachable before.
    pub async fn online(&self, limit: Duration) -> bool {
        if self.relay.is_none() {
            return true;
        }
        tokio::time::timeout(limit, self.endpoint.online())
            .await
            .is_ok()
    }

    /// How this peer's messages reach each member, as it changes (for a dashboard, or a
    /// table).
    pub fn paths(&self) -> Paths {
        Paths(self.links.clone())
    }

    /// Where `member` is reached (from the run's ticket, or its announcement).
    pub fn learn(&self, member: WorkerId, addr: EndpointAddr) {
        if self.outboxes.contains_key(&member) && endpoint_id(&member) == Some(addr.id) {
            self.addresses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(member, addr);
        }
    }
}

impl Transport for IrohTransport {
    fn id(&self) -> WorkerId {
        self.id
    }

    fn send(&self, to: WorkerId, bytes: Arc<Vec<u8>>) {
        if bytes.len() > peer::wire::MESSAGE_BYTES_MAX {
            return;
        }
        if let Some(tx) = self.outboxes.get(&to) {
            let _ = tx.try_send(bytes);
        }
    }

    async fn recv(&mut self) -> Option<(WorkerId, Vec<u8>)> {
        self.inbox.recv().await
    }

    /// Lets every sending task deliver its queue (each waits at most [`FLUSH_TIMEOUT`]
    /// for acknowledgements), then closes the endpoint.
    async fn shutdown(self) {
        let IrohTransport {
            endpoint,
            outboxes,
            senders,
            ..
        } = self;
        drop(outboxes);
        // Each task waits for its acknowledgements itself; one stuck on a peer that is
        // gone (a stream it cannot open until the connection times out) is cut off.
        let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
        for mut task in senders {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
        // Closing waits for every peer to acknowledge; one that left first never does.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.close()).await;
    }
}

/// Sends `member`'s queue in order, one stream a message, on a connection dialled when
/// first needed and again after it fails (the message that found it broken is tried once
/// more on the new one, then dropped). When the queue closes (the transport is dropped)
/// it waits up to [`FLUSH_TIMEOUT`] for the peer to acknowledge what was sent: dropping a
/// connection discards stream data not yet delivered.
async fn sending(
    endpoint: Endpoint,
    member: WorkerId,
    mut queue: mpsc::Receiver<Arc<Vec<u8>>>,
    addresses: Arc<Mutex<BTreeMap<WorkerId, EndpointAddr>>>,
    links: Links,
) {
    let mut connection: Option<Connection> = None;
    let mut unacked: std::collections::VecDeque<SendStream> = std::collections::VecDeque::new();
    while let Some(bytes) = queue.recv().await {
        for _attempt in 0..2 {
            if connection.is_none() {
                let addr = addresses
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&member)
                    .cloned();
                let Some(addr) = addr else { break };
                match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect(addr, ALPN)).await {
                    Ok(Ok(c)) => {
                        links
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(member, c.clone());
                        connection = Some(c);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %member, "could not connect: {e}");
                        break;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %member, "connecting timed out");
                        break;
                    }
                }
            }
            let Some(c) = &connection else { break };
            let written = tokio::time::timeout(WRITE_TIMEOUT, write(c, &bytes))
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
            match written {
                Ok(stream) => {
                    if unacked.len() == UNACKED_MAX {
                        unacked.pop_front();
                    }
                    unacked.push_back(stream);
                    break;
                }
                Err(e) => {
                    tracing::debug!(peer = %member, "sending failed: {e}");
                    connection = None;
                }
            }
        }
        if endpoint.is_closed() {
            return;
        }
    }
    let acknowledged = async {
        for stream in unacked {
            let _ = stream.stopped().await;
        }
    };
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, acknowledged).await;
}

async fn write(connection: &Connection, bytes: &[u8]) -> Result<SendStream, String> {
    let mut stream = connection.open_uni().await.map_err(|e| e.to_string())?;
    stream.write_all(bytes).await.map_err(|e| e.to_string())?;
    stream.finish().map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Takes connections from members (a key that is not one, or one already holding
/// [`CONNECTIONS_PER_MEMBER_MAX`], is closed at once) and reads each of their streams as
/// one message, at most `MESSAGE_BYTES_MAX` bytes.
async fn accepting(
    endpoint: Endpoint,
    members: Vec<WorkerId>,
    inbox: mpsc::Sender<(WorkerId, Vec<u8>)>,
) {
    let open: Arc<Mutex<BTreeMap<WorkerId, usize>>> = Arc::default();
    while let Some(incoming) = endpoint.accept().await {
        let members = members.clone();
        let inbox = inbox.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            let from = WorkerId(*connection.remote_id().as_bytes());
            if !members.contains(&from) {
                connection.close(1u32.into(), b"not a member of this run");
                return;
            }
            let Some(_slot) = Slot::take(&open, from) else {
                connection.close(2u32.into(), b"too many connections");
                return;
            };
            let streams = Arc::new(tokio::sync::Semaphore::new(STREAMS_PER_CONNECTION_MAX));
            loop {
                let Ok(permit) = streams.clone().acquire_owned().await else {
                    return;
                };
                let Ok(mut stream) = connection.accept_uni().await else {
                    return;
                };
                let inbox = inbox.clone();
                tokio::spawn(async move {
                    if let Ok(bytes) = stream.read_to_end(peer::wire::MESSAGE_BYTES_MAX).await {
                        let _ = inbox.send((from, bytes)).await;
                    }
                    drop(permit);
                });
            }
        });
    }
}

/// One of a member's open connections, given back when dropped.
struct Slot {
    open: Arc<Mutex<BTreeMap<WorkerId, usize>>>,
    member: WorkerId,
}

impl Slot {
    fn take(open: &Arc<Mutex<BTreeMap<WorkerId, usize>>>, member: WorkerId) -> Option<Slot> {
        let mut counts = open.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(member).or_default();
        if *n >= CONNECTIONS_PER_MEMBER_MAX {
            return None;
        }
        *n += 1;
        Some(Slot {
            open: open.clone(),
            member,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.member) {
            *n = n.saturating_sub(1);
        }
    }
}
