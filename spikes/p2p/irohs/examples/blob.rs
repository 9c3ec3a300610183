//! Spike: two iroh 1.4.1 endpoints in one process on loopback, relays disabled and no
//! address lookup (presets::Minimal), dial by direct address. Transfer 100 MB random data
//! (1) via iroh-blobs 0.104 (MemStore, BLAKE3-verified), (2) via a raw QUIC bi-stream,
//! (3) via plain tokio TCP. Args: size in MB (default 100).
use std::time::Instant;

use anyhow::Result;
use iroh::{endpoint::presets, protocol::Router, Endpoint, EndpointAddr};
use iroh_blobs::{store::mem::MemStore, BlobsProtocol};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RAW_ALPN: &[u8] = b"hivetrain-spike/raw/0";

async fn ep(alpns: Vec<Vec<u8>>) -> Result<Endpoint> {
    Ok(Endpoint::builder(presets::Minimal)
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0")?
        .alpns(alpns)
        .bind()
        .await?)
}

fn direct(e: &Endpoint) -> EndpointAddr {
    let mut a = EndpointAddr::new(e.id());
    for s in e.bound_sockets() {
        a = a.with_ip_addr(s);
    }
    a
}

fn mbps(n: usize, secs: f64) -> f64 { n as f64 / 1e6 / secs }

#[tokio::main]
async fn main() -> Result<()> {
    let mb: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(100);
    let n = mb * 1_000_000;
    let mut data = vec![0u8; n];
    rand::rng().fill_bytes(&mut data);
    let data = bytes::Bytes::from(data);

    // ed25519-dalek 2.2 (hivetrain's) and iroh's key type (ed25519-dalek 3.0 inside) in one
    // binary: same 32-byte seed -> same public key, and a 2.2 signature verifies under iroh.
    let k22 = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let sk = iroh::SecretKey::from_bytes(&k22.to_bytes());
    assert_eq!(sk.public().as_bytes(), k22.verifying_key().as_bytes());
    let sig22 = ed25519_dalek::Signer::sign(&k22, b"msg");
    sk.public().verify(b"msg", &iroh::Signature::from_bytes(&sig22.to_bytes()))?;
    println!("ed25519-dalek 2.2 key/signature interoperate with iroh key {}", sk.public().fmt_short());

    // ---------- (1) iroh-blobs ----------
    let provider_store = MemStore::new();
    let t = Instant::now();
    let tag = provider_store.add_bytes(data.clone()).await?; // hashes (BLAKE3 outboard)
    let t_add = t.elapsed().as_secs_f64();
    let provider_ep = ep(vec![iroh_blobs::ALPN.to_vec()]).await?;
    let router = Router::builder(provider_ep.clone())
        .accept(iroh_blobs::ALPN, BlobsProtocol::new(&provider_store, None))
        .spawn();
    let getter_store = MemStore::new();
    let getter_ep = ep(vec![]).await?;
    let addr = direct(&provider_ep);
    println!("provider addr: {addr:?}");
    let t = Instant::now();
    let conn = getter_ep.connect(addr.clone(), iroh_blobs::ALPN).await?;
    let t_conn = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let stats = getter_store.remote().fetch(conn.clone(), tag.hash).await?;
    let t_fetch = t.elapsed().as_secs_f64();
    let got = getter_store.get_bytes(tag.hash).await?;
    assert_eq!(got.len(), n);
    assert!(got == data);
    println!("iroh-blobs: hash {} ; add_bytes {:.3}s ({:.0} MB/s) ; connect {:.3}s ; fetch {:.3}s = {:.0} MB/s (stats.elapsed {:?}, payload bytes {})",
        tag.hash, t_add, mbps(n, t_add), t_conn, t_fetch, mbps(n, t_fetch), stats.elapsed, stats.total_bytes_read());
    conn.close(0u32.into(), b"done");

    // ---------- (2) raw QUIC bi-stream on iroh ----------
    let server = ep(vec![RAW_ALPN.to_vec()]).await?;
    let srv_addr = direct(&server);
    let d2 = data.clone();
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let _req = recv.read_to_end(64).await.unwrap();
        send.write_all(&d2).await.unwrap();
        send.finish().unwrap();
        conn.closed().await;
        server.close().await;
    });
    let client = ep(vec![]).await?;
    let t = Instant::now();
    let conn = client.connect(srv_addr, RAW_ALPN).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(b"get").await?;
    send.finish()?;
    let t2 = Instant::now();
    let buf = recv.read_to_end(n + 1).await?;
    let t_raw = t2.elapsed().as_secs_f64();
    let t_raw_total = t.elapsed().as_secs_f64();
    assert_eq!(buf.len(), n);
    println!("raw QUIC stream: {:.3}s = {:.0} MB/s (incl. connect {:.3}s)", t_raw, mbps(n, t_raw), t_raw_total);
    conn.close(0u32.into(), b"done");
    client.close().await;
    let _ = srv.await;

    // ---------- (3) plain tokio TCP ----------
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let la = l.local_addr()?;
    let d3 = data.clone();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(&d3).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(la).await?;
    let mut buf = Vec::with_capacity(n);
    s.read_to_end(&mut buf).await?;
    let t_tcp = t.elapsed().as_secs_f64();
    assert_eq!(buf.len(), n);
    println!("tokio TCP: {:.3}s = {:.0} MB/s", t_tcp, mbps(n, t_tcp));

    router.shutdown().await?;
    getter_ep.close().await;
    Ok(())
}
