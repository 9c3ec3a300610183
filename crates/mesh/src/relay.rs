//! A relay that anyone can run (`hivetrain relay`): iroh's own relay server. It does two
//! things for peers behind NATs:
//!
//! - it forwards their packets over HTTP (QUIC packets, encrypted end to end between the
//!   peers: the relay sees who talks with whom, never what) when no direct path works;
//! - it tells each peer the public address its NAT gave it (QUIC address discovery, on a
//!   UDP port of its own): the address the other peers punch holes to. This side speaks
//!   TLS with a certificate the relay makes itself when it starts; the run's ticket
//!   carries it, and peers trust that certificate and no other for the relay.
//!
//! Bounded: at most [`CONNECTIONS_MAX`] clients at once, each read at most
//! [`CLIENT_BYTES_PER_SECOND`]; given the run's members, it admits only them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use iroh::RelayUrl;
use iroh_relay::server::{
    Access, AccessControl, ClientRateLimit, ClientRequest, ConnectionId, Limits, QuicConfig,
    RelayConfig, Server, ServerConfig,
};
use protocol::WorkerId;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

use crate::MeshError;

/// Clients connected at once, at most.
pub const CONNECTIONS_MAX: usize = 1024;

/// What the relay reads from one client a second, at most (a burst of one second's worth).
pub const CLIENT_BYTES_PER_SECOND: u32 = 64 << 20;

/// What a relay's shared description starts with.
pub const PREFIX: &str = "hivetrain-relay1:";

/// A relay as peers name it: where it is, and how to trust its address discovery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRef {
    /// Where peers keep their connection to it (`http://HOST:PORT`).
    pub url: String,
    /// The UDP port of its address discovery (on the URL's host); without it, peers
    /// behind NATs reach each other through the relay only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_port: Option<u16>,
    /// Its certificate (DER, URL-safe base64): the only one peers trust for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
}

impl RelayRef {
    /// A relay given by its URL alone (forwarding only).
    pub fn url_only(url: &str) -> RelayRef {
        RelayRef {
            url: url.to_owned(),
            quic_port: None,
            cert: None,
        }
    }

    /// The string to share: what `hivetrain relay` prints and `peer ticket --relay` takes.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a relay serializes");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// A relay's shared string, or a plain URL (forwarding only).
    pub fn parse(text: &str) -> Result<RelayRef, String> {
        let text = text.trim();
        let relay = match text.strip_prefix(PREFIX) {
            Some(body) => {
                let json = URL_SAFE_NO_PAD
                    .decode(body)
                    .map_err(|e| format!("the relay's string is damaged: {e}"))?;
                serde_json::from_slice(&json)
                    .map_err(|e| format!("the relay's string is damaged: {e}"))?
            }
            None => RelayRef::url_only(text),
        };
        relay.check()?;
        Ok(relay)
    }

    /// Refuses a relay no peer could use.
    pub fn check(&self) -> Result<(), String> {
        self.relay_url()?;
        if self.quic_port.is_some() != self.cert.is_some() {
            return Err(
                "a relay's address discovery needs both its port and its certificate".into(),
            );
        }
        self.cert_der()?;
        Ok(())
    }

    /// Its URL, parsed.
    pub fn relay_url(&self) -> Result<RelayUrl, String> {
        let url: RelayUrl = self
            .url
            .parse()
            .map_err(|_| format!("{:?} is not a relay URL", self.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{:?} is not an http:// or https:// URL", self.url));
        }
        Ok(url)
    }

    /// Its certificate, decoded.
    pub fn cert_der(&self) -> Result<Option<CertificateDer<'static>>, String> {
        self.cert
            .as_deref()
            .map(|c| {
                URL_SAFE_NO_PAD
                    .decode(c)
                    .map(CertificateDer::from)
                    .map_err(|_| "the relay's certificate is damaged".to_owned())
            })
            .transpose()
    }
}

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

/// Where a relay serves.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Its HTTP side (TCP): forwarding.
    pub http: SocketAddr,
    /// Its address discovery (UDP), if any: port 0 picks one.
    pub quic_port: Option<u16>,
    /// The host peers reach it at (the URL's, and its certificate's name): default, the
    /// bound IP address (give one when it binds every interface).
    pub public_host: Option<String>,
    /// Admit only these keys (default: anyone).
    pub members: Option<Vec<WorkerId>>,
}

/// A running relay.
pub struct Relay {
    server: Server,
    reference: RelayRef,
}

impl Relay {
    /// Serves a relay.
    pub async fn spawn(options: RelayOptions) -> Result<Relay, MeshError> {
        let bind = |e: String| MeshError::Bind(format!("the relay: {e}"));
        let host = match &options.public_host {
            Some(h) => h.clone(),
            None if options.http.ip().is_unspecified() => {
                return Err(bind(format!(
                    "it listens on every interface ({}): say which address peers reach it at",
                    options.http
                )));
            }
            None => options.http.ip().to_string(),
        };
        let mut relay = RelayConfig::new(options.http);
        relay.limits = Limits::default();
        let per_second = NonZeroU32::new(CLIENT_BYTES_PER_SECOND).expect("non-zero");
        let mut rate = ClientRateLimit::new(per_second);
        rate.max_burst_bytes = Some(per_second);
        relay.limits.client_rx = Some(rate);
        relay.access = Arc::new(Admission {
            members: options
                .members
                .as_ref()
                .map(|m| m.iter().map(|w| w.0).collect()),
            connected: AtomicUsize::new(0),
        });
        let mut config = ServerConfig::default();
        config.relay = Some(relay);
        let mut cert = None;
        if let Some(port) = options.quic_port {
            let (der, tls) = self_signed(&host).map_err(bind)?;
            let mut quic = QuicConfig::new(SocketAddr::new(options.http.ip(), port));
            quic.server_config = Some(tls);
            config.quic = Some(quic);
            cert = Some(URL_SAFE_NO_PAD.encode(der.as_ref()));
        }
        let server = Server::spawn(config)
            .await
            .map_err(|e| bind(e.to_string()))?;
        let http = server
            .http_addr()
            .ok_or_else(|| bind("it has no address".into()))?;
        let url_host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let reference = RelayRef {
            url: format!("http://{url_host}:{}", http.port()),
            quic_port: server.quic_addr().map(|a| a.port()),
            cert,
        };
        reference.check().map_err(bind)?;
        Ok(Relay { server, reference })
    }

    /// How peers name it.
    pub fn reference(&self) -> &RelayRef {
        &self.reference
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        let _ = self.server.shutdown().await;
    }
}

/// A certificate for `host` (a name or an IP address), signed by itself, and the TLS 1.3
/// server configuration that presents it.
fn self_signed(host: &str) -> Result<(CertificateDer<'static>, rustls::ServerConfig), String> {
    let made = rcgen::generate_simple_self_signed(vec![host.to_owned()])
        .map_err(|e| format!("making its certificate: {e}"))?;
    let der = made.cert.der().clone();
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| format!("TLS: {e}"))?
    .with_no_client_auth()
    .with_single_cert(vec![der.clone()], key)
    .map_err(|e| format!("its certificate: {e}"))?;
    Ok((der, tls))
}
