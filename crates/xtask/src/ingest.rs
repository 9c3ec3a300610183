//! `cargo xtask bench ingest`: how many int8 updates of a 10M-parameter model the real
//! coordinator accepts per second over loopback HTTP (signature, hash, decode,
//! validation, accumulation, fsynced blob and committed row for each), against the raw
//! goodput of a loopback TCP socket measured in the same run.

use std::io::{Read, Write};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use coordinator::{Coordinator, CoordinatorConfig};
use ed25519_dalek::SigningKey;
use protocol::api::LeaseReply;
use protocol::{Codec, UpdateHeader, WorkerId};

#[derive(Debug, clap::Args)]
pub(crate) struct IngestBench {
    /// Model preset (medium: about 10M parameters).
    #[arg(long, default_value = "medium")]
    preset: String,
    /// Updates sent (each from its own worker key and unit).
    #[arg(long, default_value_t = 200)]
    updates: usize,
    /// Client connections sending at once.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Directory for the coordinator's store (default: a temporary directory). Its disk
    /// is part of what is measured: every update is fsynced.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn now_ms() -> u64 {
    coordinator::system_ms()
}

fn post_signed(
    client: &reqwest::blocking::Client,
    url: &str,
    key: &SigningKey,
    path: &str,
    body: &str,
) -> anyhow::Result<reqwest::blocking::Response> {
    let mut request = client.post(format!("{url}{path}"));
    for (name, value) in protocol::auth::sign_request(key, "POST", path, now_ms(), body.as_bytes())
    {
        request = request.header(name, value);
    }
    let response = request.body(body.to_owned()).send()?;
    ensure!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    Ok(response)
}

pub(crate) fn run(root: &std::path::Path, args: IngestBench) -> anyhow::Result<()> {
    if args.updates == 0 || args.clients == 0 {
        bail!("--updates and --clients must be at least 1");
    }
    let temp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    let mut config = CoordinatorConfig {
        preset: args.preset.clone(),
        corpus: root.join("data/shakespeare.txt"),
        tokenizer: root.join("data/tokenizer.json"),
        holdout_batches: 1,
        codec: Codec::Int8Chunk { chunk: 4096 },
        ..CoordinatorConfig::default()
    };
    // One round wide enough for every update: nothing aggregates while we measure.
    config.schedule.units_per_round = args.updates as u32 + 1;
    config.schedule.min_updates = 1;
    config.schedule.lease_ms = 3_600_000;
    config.schedule.lease_max_ms = 3_600_000;
    config.schedule.round_timeout_ms = 3_600_000;
    config.schedule.n_shards = 16;
    // The updates are made up, not trained: scoring would refuse them and re-runs would
    // claw them back. What is measured is the path every update takes before those:
    // transport, signature, hash, decode, validation, store.
    config.scoring.enabled = false;
    config.spot_check.enabled = false;
    let server = Coordinator::start(&dir.join("store"), config, "127.0.0.1:0")
        .context("starting the coordinator")?;
    let url = server.url();
    let n = server.with_core(|c| c.params().len());
    let client = reqwest::blocking::Client::new();

    // Register, lease and encode outside the timed part. One delta, encoded once: the
    // coordinator's work does not depend on the values. Each update has its own header,
    // signature and blob, and its own last two values (a byte-equal payload would be
    // refused as a copy).
    let delta: Vec<f32> = (0..n)
        .map(|j| ((((j * 7919) % 2001) as f32) / 1000.0 - 1.0) * 1e-3)
        .collect();
    let codec = Codec::Int8Chunk { chunk: 4096 };
    let payload = codec.encode(&delta);
    let mut bodies = Vec::with_capacity(args.updates);
    for i in 0..args.updates {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let key = SigningKey::from_bytes(&seed);
        post_signed(
            &client,
            &url,
            &key,
            "/v1/workers",
            &format!("{{\"name\":\"bench-{i}\"}}"),
        )?;
        let reply: LeaseReply = post_signed(&client, &url, &key, "/v1/lease", "")?.json()?;
        let LeaseReply::Lease { unit, .. } = reply else {
            bail!("no unit for update {i}");
        };
        let header = UpdateHeader {
            work_unit: unit.id,
            base_version: unit.base_version,
            worker: WorkerId::of(&key),
            nonce: i as u64,
            codec,
            n_params: n as u32,
        };
        let mut own = payload.clone();
        let last = own.len() - 1;
        own[last] = (i % 127) as u8;
        own[last - 1] = (i / 127 % 127) as u8;
        bodies.push(bytes::Bytes::from(protocol::encode_update_payload(
            &header, &own, &key,
        )));
    }
    let bytes_per_update = bodies[0].len();
    println!(
        "{} preset: {n} parameters, int8 update {bytes_per_update} bytes, {} updates from {} clients",
        args.preset, args.updates, args.clients
    );

    // Timed: every update through POST /v1/updates.
    let started = Instant::now();
    let per_client = args.updates.div_ceil(args.clients);
    let results: Vec<anyhow::Result<usize>> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies
            .chunks(per_client)
            .map(|chunk| {
                let url = url.clone();
                s.spawn(move || -> anyhow::Result<usize> {
                    let client = reqwest::blocking::Client::new();
                    let mut accepted = 0;
                    for body in chunk {
                        let r = client
                            .post(format!("{url}/v1/updates"))
                            .body(body.clone()) // a reference count, not a copy
                            .send()?;
                        ensure!(r.status().is_success(), "update refused: {}", r.text()?);
                        accepted += 1;
                    }
                    Ok(accepted)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
            })
            .collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let mut accepted = 0;
    for r in results {
        accepted += r?;
    }
    server.stop();
    let ingest_rate = accepted as f64 / secs;
    let ingest_goodput = ingest_rate * bytes_per_update as f64;

    // Raw loopback TCP: the same bytes through a socket that reads and discards.
    let total = (accepted * bytes_per_update) as u64;
    let raw = raw_goodput(total, bytes_per_update, args.clients)?;
    println!(
        "coordinator: {accepted} updates in {secs:.2} s = {ingest_rate:.1} updates/s, {:.0} MB/s",
        ingest_goodput / 1e6
    );
    println!(
        "raw loopback TCP: {:.0} MB/s ({} clients)",
        raw / 1e6,
        args.clients
    );
    println!(
        "ratio: {:.2}x of raw goodput (goal >= 0.7x; >= 100 updates/s)",
        ingest_goodput / raw
    );
    Ok(())
}

/// Bytes per second of `clients` connections each writing their share of `total` bytes
/// in `chunk`-sized writes to a listener that reads and discards them.
fn raw_goodput(total: u64, chunk: usize, clients: usize) -> anyhow::Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let per_client = total / clients as u64;
    let buffer = vec![7u8; chunk];
    let started = Instant::now();
    let received = std::thread::scope(|s| -> anyhow::Result<u64> {
        let listener = &listener;
        let acceptor = s.spawn(move || -> anyhow::Result<u64> {
            let mut readers = Vec::new();
            for _ in 0..clients {
                let (mut stream, _) = listener.accept()?;
                readers.push(std::thread::spawn(move || {
                    let mut sink = vec![0u8; 1 << 20];
                    let mut got = 0u64;
                    while let Ok(n) = stream.read(&mut sink) {
                        if n == 0 {
                            break;
                        }
                        got += n as u64;
                    }
                    got
                }));
            }
            Ok(readers.into_iter().map(|r| r.join().unwrap_or(0)).sum())
        });
        let writers: Vec<_> = (0..clients)
            .map(|_| {
                let buffer = &buffer;
                s.spawn(move || -> anyhow::Result<()> {
                    let mut stream = std::net::TcpStream::connect(addr)?;
                    let mut sent = 0u64;
                    while sent < per_client {
                        let n = buffer.len().min((per_client - sent) as usize);
                        stream.write_all(&buffer[..n])?;
                        sent += n as u64;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in writers {
            w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        acceptor
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?
    })?;
    Ok(received as f64 / started.elapsed().as_secs_f64())
}
