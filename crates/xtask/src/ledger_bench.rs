//! `cargo xtask bench ledger`: what a long ledger costs the coordinator. Replay (every
//! restart and `hivetrain ledger verify` does one), a signed tree head, an inclusion
//! proof and one wallet's view, each against the straightforward way in the same run:
//! signatures verified one by one on one core, the Merkle root and path hashed again
//! from every entry, every entry scanned for the wallet's.

use std::time::Instant;

use anyhow::{Context, ensure};
use ed25519_dalek::{SigningKey, Verifier};
use ledger::{Draft, Ledger, merkle};
use protocol::WorkerId;

#[derive(Debug, clap::Args)]
pub(crate) struct LedgerBench {
    /// Entries in the ledger (mints, spread over the wallets).
    #[arg(long, default_value_t = 200_000)]
    entries: u64,
    /// Wallets the mints go to.
    #[arg(long, default_value_t = 250)]
    wallets: u64,
}

fn seconds(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}

pub(crate) fn run(args: LedgerBench) -> anyhow::Result<()> {
    ensure!(
        args.entries > 0 && args.wallets > 0,
        "--entries and --wallets must be positive"
    );
    let key = SigningKey::from_bytes(&[7; 32]);
    let wallets: Vec<WorkerId> = (0..args.wallets)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&i.to_le_bytes());
            WorkerId::of(&SigningKey::from_bytes(&seed))
        })
        .collect();
    let mut ledger = Ledger::new(key.verifying_key());
    let started = Instant::now();
    for i in 0..args.entries {
        let to = wallets[(i % args.wallets) as usize];
        ledger
            .append(Draft::mint(to, 1_000, format!("update:{i}")), i, &key)
            .context("append")?;
    }
    let append = seconds(started);
    let entries = ledger.entries().to_vec();

    let started = Instant::now();
    let replayed = Ledger::replay(key.verifying_key(), entries.clone()).context("replay")?;
    let replay = seconds(started);
    let started = Instant::now();
    for e in &entries {
        let signature = ed25519_dalek::Signature::from_bytes(&e.signature.0);
        ensure!(
            key.verifying_key().verify(&e.hash.0, &signature).is_ok(),
            "entry {} does not verify",
            e.seq
        );
    }
    let one_by_one = seconds(started);

    let n = entries.len();
    let hashes: Vec<ledger::Digest> = entries.iter().map(|e| e.hash).collect();
    let started = Instant::now();
    let head = replayed.tree_head(0, &key);
    let head_time = seconds(started);
    let started = Instant::now();
    let root = merkle::root(&hashes);
    let root_again = seconds(started);
    ensure!(
        head.root == root,
        "the grown tree's root differs from the recursion's"
    );
    let index = n / 3;
    let started = Instant::now();
    let proof = replayed
        .inclusion_proof(index as u64, n as u64)
        .context("proof")?;
    let proof_time = seconds(started);
    let started = Instant::now();
    let again = merkle::inclusion_proof(&hashes, index).context("proof")?;
    let proof_again = seconds(started);
    ensure!(
        proof == again,
        "the grown tree's proof differs from the recursion's"
    );

    let wallet = ledger::Account::Wallet(wallets[0]);
    let started = Instant::now();
    let view = replayed.wallet_view(&wallet, None);
    let view_time = seconds(started);
    let started = Instant::now();
    let scanned = entries
        .iter()
        .filter(|e| e.from == Some(wallet) || e.to == Some(wallet))
        .count();
    let scan_time = seconds(started);
    ensure!(
        view.entries.len() == scanned,
        "the wallet's index misses entries"
    );

    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!(
        "{} entries over {} wallets, {cores} cores; appending them took {:.2} s ({:.1} us an entry, signing included)",
        args.entries,
        args.wallets,
        append,
        append * 1e6 / n as f64
    );
    println!("| what | hivetrain | straightforward | speed-up |");
    println!("|---|---|---|---|");
    println!(
        "| replay (every check) vs signatures alone, one by one | {replay:.3} s | {one_by_one:.3} s | {:.1}x |",
        one_by_one / replay
    );
    println!(
        "| signed tree head vs root from every entry | {:.1} us | {:.1} us | {:.0}x |",
        head_time * 1e6,
        root_again * 1e6,
        root_again / head_time
    );
    println!(
        "| inclusion proof vs path from every entry | {:.1} us | {:.1} us | {:.0}x |",
        proof_time * 1e6,
        proof_again * 1e6,
        proof_again / proof_time
    );
    println!(
        "| one wallet's view ({scanned} entries) vs a scan of every entry | {:.1} us | {:.1} us | {:.0}x |",
        view_time * 1e6,
        scan_time * 1e6,
        scan_time / view_time
    );
    Ok(())
}
