//! One conformance suite for every `Transport`: what a node relies on, checked on the
//! in-process network and on iroh over loopback.

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use iroh::EndpointAddr;
use mesh::Transport;
use mesh::memory;
use mesh::quic::IrohTransport;
use mesh::relay::{Relay, RelayOptions, RelayRef};
use protocol::WorkerId;

fn keys(n: usize) -> Vec<SigningKey> {
    (0..n)
        .map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32]))
        .collect()
}

/// The next message, or `None` after a second of silence.
async fn next<T: Transport>(t: &mut T) -> Option<(WorkerId, Vec<u8>)> {
    tokio::time::timeout(Duration::from_secs(5), t.recv())
        .await
        .ok()
        .flatten()
}

/// What a node relies on: every member's message reaches every other member once, named
/// by its sender, bytes intact (a large one too); a message past the bound, to itself or
/// to a stranger is dropped, not delivered and not fatal.
async fn check<T: Transport>(mut nets: Vec<T>) {
    let ids: Vec<WorkerId> = nets.iter().map(|t| t.id()).collect();
    let stranger = WorkerId::of(&SigningKey::from_bytes(&[99; 32]));
    for (i, t) in nets.iter().enumerate() {
        t.send(t.id(), Arc::new(b"to myself".to_vec()));
        t.send(stranger, Arc::new(b"to a stranger".to_vec()));
        for (j, to) in ids.iter().enumerate() {
            if i != j {
                t.send(*to, Arc::new(vec![0; peer::wire::MESSAGE_BYTES_MAX + 1]));
                t.send(*to, Arc::new(format!("{i} to {j}").into_bytes()));
            }
        }
    }
    let big: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
    nets[0].send(ids[1], Arc::new(big.clone()));
    for (j, t) in nets.iter_mut().enumerate() {
        let mut got = Vec::new();
        let want = ids.len() - 1 + usize::from(j == 1);
        for _ in 0..want {
            got.push(
                next(t)
                    .await
                    .unwrap_or_else(|| panic!("peer {j} got {} of {want}", got.len())),
            );
        }
        let mut small: Vec<(WorkerId, String)> = got
            .iter()
            .filter(|(_, b)| b.len() < 100)
            .map(|(from, b)| (*from, String::from_utf8_lossy(b).into_owned()))
            .collect();
        small.sort();
        let mut expected: Vec<(WorkerId, String)> = (0..ids.len())
            .filter(|&i| i != j)
            .map(|i| (ids[i], format!("{i} to {j}")))
            .collect();
        expected.sort();
        assert_eq!(small, expected, "peer {j}");
        if j == 1 {
            assert!(
                got.iter().any(|(from, b)| *from == ids[0] && *b == big),
                "the 8 MiB message"
            );
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), t.recv())
                .await
                .is_err(),
            "peer {j} got more than was sent to it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_network_conforms() {
    let ids: Vec<WorkerId> = keys(4).iter().map(WorkerId::of).collect();
    check(memory::network(&ids)).await;
}

/// Iroh endpoints on loopback, each told the others' addresses.
pub(crate) async fn iroh_network(keys: &[SigningKey]) -> Vec<IrohTransport> {
    let ids: Vec<WorkerId> = keys.iter().map(WorkerId::of).collect();
    let mut nets = Vec::new();
    for key in keys {
        let t = IrohTransport::bind(key, "127.0.0.1:0".parse().expect("addr"), &ids, None)
            .await
            .expect("bind");
        nets.push(t);
    }
    let addrs: Vec<_> = nets.iter().map(|t| t.addr()).collect();
    for t in &nets {
        for (id, addr) in ids.iter().zip(&addrs) {
            t.learn(*id, addr.clone());
        }
    }
    nets
}

/// Iroh endpoints on loopback that know each other only by key and `relay` (no socket):
/// they meet at the relay (and punch a direct path from there where they can).
pub(crate) async fn relayed_network(keys: &[SigningKey], relay: &RelayRef) -> Vec<IrohTransport> {
    let url = relay.relay_url().expect("a URL");
    let ids: Vec<WorkerId> = keys.iter().map(WorkerId::of).collect();
    let mut nets = Vec::new();
    for key in keys {
        let t = IrohTransport::bind(key, "127.0.0.1:0".parse().expect("addr"), &ids, Some(relay))
            .await
            .expect("bind");
        assert!(
            t.online(Duration::from_secs(20)).await,
            "the relay took no one"
        );
        nets.push(t);
    }
    for t in &nets {
        for id in &ids {
            let endpoint = iroh::EndpointId::from_bytes(&id.0).expect("a key");
            t.learn(*id, EndpointAddr::new(endpoint).with_relay_url(url.clone()));
        }
    }
    nets
}

/// A relay on loopback with its address discovery, for `members` only when given.
pub(crate) async fn relay(members: Option<Vec<WorkerId>>) -> Relay {
    Relay::spawn(RelayOptions {
        http: "127.0.0.1:0".parse().expect("addr"),
        quic_port: Some(0),
        public_host: None,
        members,
    })
    .await
    .expect("relay")
}

/// The relay forwards between members who know no socket of each other; it admits only
/// the run's members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iroh_conforms_through_a_relay_that_admits_members_only() {
    let keys = keys(4);
    let ids: Vec<WorkerId> = keys.iter().map(WorkerId::of).collect();
    let relay = relay(Some(ids.clone())).await;
    let nets = relayed_network(&keys, relay.reference()).await;
    check(nets).await;
    let stranger = SigningKey::from_bytes(&[98; 32]);
    let outside = IrohTransport::bind(
        &stranger,
        "127.0.0.1:0".parse().expect("addr"),
        &[WorkerId::of(&stranger), ids[0]],
        Some(relay.reference()),
    )
    .await
    .expect("bind");
    assert!(
        !outside.online(Duration::from_secs(3)).await,
        "the relay took a key that is not a member"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iroh_conforms() {
    check(iroh_network(&keys(4)).await).await;
}

/// A key that is not a member cannot put a message in a member's inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iroh_refuses_a_stranger() {
    let members = keys(2);
    let mut nets = iroh_network(&members).await;
    let stranger_key = SigningKey::from_bytes(&[99; 32]);
    let stranger_id = WorkerId::of(&stranger_key);
    // The stranger counts the first member as a member of its own run.
    let stranger = IrohTransport::bind(
        &stranger_key,
        "127.0.0.1:0".parse().expect("addr"),
        &[stranger_id, nets[0].id()],
        None,
    )
    .await
    .expect("bind");
    stranger.learn(nets[0].id(), nets[0].addr());
    stranger.send(nets[0].id(), Arc::new(b"let me in".to_vec()));
    nets[1].send(nets[0].id(), Arc::new(b"a member".to_vec()));
    let (from, bytes) = next(&mut nets[0]).await.expect("the member's message");
    assert_eq!((from, bytes.as_slice()), (nets[1].id(), &b"a member"[..]));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), nets[0].recv())
            .await
            .is_err(),
        "the stranger's message arrived"
    );
}
