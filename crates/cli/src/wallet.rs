//! `hivetrain wallet`, `leaderboard`, `stats` and `ledger`: credit as a contributor sees
//! it, read from a coordinator's ledger endpoints, and a ledger checked without trusting
//! the coordinator.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use ed25519_dalek::{SigningKey, VerifyingKey};
use ledger::merkle::{InclusionProof, verify_inclusion};
use ledger::wire::{EntriesPage, LeaderRow, Stats, TransferRequest, WalletView};
use ledger::{Account, Digest, Entry, Kind, Ledger, MICROS_PER_CREDIT, TreeHead, format_credits};
use protocol::WorkerId;
use serde::de::DeserializeOwned;

/// Where the coordinator is and who is asking.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Remote {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "HIVETRAIN_COORDINATOR",
        default_value = "http://127.0.0.1:8480"
    )]
    pub(crate) coordinator: String,
    /// Your key file (your wallet; default: the config dir's hivetrain/worker.key).
    #[arg(long, env = "HIVETRAIN_KEY")]
    pub(crate) key: Option<PathBuf>,
}

impl Remote {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.coordinator.trim_end_matches('/'))
    }

    pub(crate) fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = reqwest::blocking::get(self.url(path))
            .with_context(|| format!("cannot reach the coordinator at {}", self.coordinator))?;
        read(response, path)
    }

    /// The key file's key; it must exist (it is made by `hivetrain worker`).
    pub(crate) fn key(&self) -> anyhow::Result<SigningKey> {
        let path = match &self.key {
            Some(p) => p.clone(),
            None => worker::identity::default_path()?,
        };
        if !path.exists() {
            bail!(
                "no key at {}: run `hivetrain worker` once to make your wallet, or pass --key",
                path.display()
            );
        }
        Ok(worker::identity::load_or_create(&path)?.0)
    }

    /// The wallet named, or the key file's.
    pub(crate) fn wallet(&self, named: Option<&str>) -> anyhow::Result<WorkerId> {
        match named {
            Some(text) => WorkerId::parse(text).with_context(|| {
                format!("{text:?} is not a wallet: a wallet is a worker's 64-hex-digit public key")
            }),
            None => Ok(WorkerId::of(&self.key()?)),
        }
    }
}

/// A reply's body, or the coordinator's refusal as an error with its code.
pub(crate) fn read<T: DeserializeOwned>(
    response: reqwest::blocking::Response,
    what: &str,
) -> anyhow::Result<T> {
    let status = response.status();
    let text = response.text().context("reading the reply")?;
    if !status.is_success() {
        let body: Option<protocol::api::ErrorBody> = serde_json::from_str(&text).ok();
        match body {
            Some(b) => bail!(
                "{} ({}, HTTP {})",
                b.error.message,
                b.error.code,
                status.as_u16()
            ),
            None => bail!("{what}: HTTP {status}: {text}"),
        }
    }
    serde_json::from_str(&text)
        .with_context(|| format!("{what}: the reply is not what was expected"))
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum WalletCommand {
    /// A wallet's balance and totals (default: yours).
    Balance {
        /// A wallet (64 hex digits).
        wallet: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// The ledger entries of a wallet, oldest first.
    History {
        wallet: Option<String>,
        /// Only the newest N entries (default: every one).
        #[arg(long, value_name = "N")]
        last: Option<usize>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Send credit from your wallet to another.
    Transfer {
        /// The receiving wallet (64 hex digits).
        to: String,
        /// Credits, up to six decimals (0.25 is 250,000 micro-credits).
        amount: String,
        /// A name for this transfer; sending the same one again does nothing (default:
        /// made from the time).
        #[arg(long)]
        reference: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Make an API key for your wallet (for `hivetrain query` or any OpenAI client).
    ApiKey {
        #[command(flatten)]
        remote: Remote,
    },
    /// Revoke every API key of your wallet (signed with your key file: for keys that
    /// are lost, or a wallet at its cap of keys).
    RevokeKeys {
        #[command(flatten)]
        remote: Remote,
    },
    /// Dividends paid to a wallet from query revenue.
    Dividends {
        wallet: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum LedgerCommand {
    /// Check every hash, signature and invariant of the ledger, its signed head, and
    /// your entries' inclusion proofs; exits non-zero at the first broken entry. With
    /// --chain, a run with no coordinator: its certified chain replayed from version 0.
    Verify {
        /// A file from `hivetrain ledger export` (default: download from the coordinator).
        #[arg(long, conflicts_with = "chain")]
        file: Option<PathBuf>,
        /// A peer-to-peer run's certified chain (a peer's chain.bin): every height's
        /// certificate checked against the members, every value executed again, and the
        /// credit it mints printed. Needs --ticket.
        #[arg(long, requires = "ticket")]
        chain: Option<PathBuf>,
        /// The run's ticket (or a file holding it), for --chain.
        #[arg(long)]
        ticket: Option<String>,
        /// Your copy of the run's corpus, for --chain (default: the bundled one).
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// Your copy of the run's tokenizer, for --chain (default: the bundled one).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// The coordinator's ledger key (hex) you expect; without it the key in the
        /// head is printed for you to compare.
        #[arg(long)]
        authority: Option<String>,
        /// Whose inclusion proofs to check (default: your key file's wallet, if any).
        #[arg(long)]
        wallet: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Write the signed head and every entry as JSON lines.
    Export {
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
}

/// Parses credits with up to six decimals into micro-credits, exactly.
pub(crate) fn parse_credits(text: &str) -> anyhow::Result<u64> {
    let bad = || anyhow::anyhow!("{text:?} is not an amount of credits (like 2 or 0.125)");
    let (whole, frac) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
    if whole.is_empty() && frac.is_empty()
        || frac.len() > 6
        || !whole
            .bytes()
            .chain(frac.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let frac: u64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
    whole
        .checked_mul(MICROS_PER_CREDIT)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(bad)
}

fn print_wallet(v: &WalletView) {
    println!("wallet     {}", v.wallet);
    println!("balance    {} credits", format_credits(v.balance));
    println!(
        "earned     {} credits for {} accepted units",
        format_credits(v.earned),
        v.units
    );
    println!("spent      {} credits", format_credits(v.spent));
    println!(
        "transfers  {} sent, {} received",
        format_credits(v.sent),
        format_credits(v.received)
    );
    println!("dividends  {} credits", format_credits(v.dividends));
    if v.clawed_back > 0 {
        println!("clawed back {} credits", format_credits(v.clawed_back));
    }
}

fn print_entries<'a>(entries: impl Iterator<Item = &'a Entry>) {
    println!(
        "{:>6}  {:<9} {:>16}  {:<18} {:<18} reference",
        "entry", "kind", "credits", "from", "to"
    );
    let short = |a: Option<Account>| match a {
        None => "-".to_owned(),
        Some(Account::Pool) => "pool".to_owned(),
        Some(Account::Wallet(w)) => format!("{}..", &w.to_string()[..16]),
    };
    for e in entries {
        println!(
            "{:>6}  {:<9} {:>16}  {:<18} {:<18} {}",
            e.seq,
            e.kind.code(),
            format_credits(e.amount),
            short(e.from),
            short(e.to),
            e.reference
        );
    }
}

pub(crate) fn run_wallet(command: WalletCommand) -> anyhow::Result<()> {
    match command {
        WalletCommand::Balance { wallet, remote } => {
            let id = remote.wallet(wallet.as_deref())?;
            print_wallet(&remote.get(&format!("/v1/wallets/{id}?entries=0"))?);
        }
        WalletCommand::History {
            wallet,
            last,
            remote,
        } => {
            let id = remote.wallet(wallet.as_deref())?;
            let newest = last.map(|n| format!("?entries={n}")).unwrap_or_default();
            let view: WalletView = remote.get(&format!("/v1/wallets/{id}{newest}"))?;
            print_entries(view.entries.iter());
            println!("balance {} credits", format_credits(view.balance));
        }
        WalletCommand::ApiKey { remote } => {
            let key = crate::query::make_api_key(&remote)?;
            println!("{key}");
            eprintln!(
                "an OpenAI client takes it as api_key, with base_url {}; it spends your wallet's credit",
                remote.url("/v1")
            );
        }
        WalletCommand::RevokeKeys { remote } => {
            let n = crate::query::revoke_all_api_keys(&remote)?;
            println!("revoked {n} API keys of your wallet");
        }
        WalletCommand::Dividends { wallet, remote } => {
            let id = remote.wallet(wallet.as_deref())?;
            let view: WalletView = remote.get(&format!("/v1/wallets/{id}"))?;
            print_entries(view.entries.iter().filter(|e| e.kind == Kind::Dividend));
            println!(
                "dividends {} credits in all",
                format_credits(view.dividends)
            );
        }
        WalletCommand::Transfer {
            to,
            amount,
            reference,
            remote,
        } => {
            let amount = parse_credits(&amount)?;
            let key = remote.key()?;
            let reference =
                reference.unwrap_or_else(|| format!("cli-{}", coordinator::system_ms()));
            let request = TransferRequest {
                to,
                amount,
                reference,
            };
            let body = serde_json::to_string(&request)?;
            let mut http = reqwest::blocking::Client::new()
                .post(remote.url("/v1/transfers"))
                .header("content-type", "application/json");
            for (name, value) in protocol::auth::sign_request(
                &key,
                "POST",
                "/v1/transfers",
                coordinator::system_ms(),
                body.as_bytes(),
            ) {
                http = http.header(name, value);
            }
            let response = http.body(body).send().with_context(|| {
                format!("cannot reach the coordinator at {}", remote.coordinator)
            })?;
            let entry: Entry = read(response, "transfer")?;
            println!(
                "sent {} credits to {} (ledger entry {}, reference {:?})",
                format_credits(entry.amount),
                request.to,
                entry.seq,
                request.reference
            );
        }
    }
    Ok(())
}

pub(crate) fn leaderboard(remote: Remote) -> anyhow::Result<()> {
    let rows: Vec<LeaderRow> = remote.get("/v1/leaderboard")?;
    println!(
        "{:>4}  {:<20} {:<18} {:>6} {:>16} {:>16}",
        "#", "name", "wallet", "units", "earned", "balance"
    );
    for (i, r) in rows.iter().enumerate() {
        println!(
            "{:>4}  {:<20} {:<18} {:>6} {:>16} {:>16}",
            i + 1,
            r.name,
            format!("{}..", &r.wallet[..16]),
            r.units,
            format_credits(r.earned),
            format_credits(r.balance)
        );
    }
    Ok(())
}

pub(crate) fn stats(remote: Remote) -> anyhow::Result<()> {
    let s: Stats = remote.get("/v1/stats")?;
    let rows = [
        ("model version", s.current_version.to_string()),
        ("workers", s.workers.to_string()),
        ("accepted updates", s.accepted_updates.to_string()),
        ("tokens trained", s.tokens_trained.to_string()),
        ("credit minted", format_credits(s.minted)),
        ("credit clawed back", format_credits(s.burned)),
        ("revenue pool", format_credits(s.pool)),
        ("wallets", s.wallets.to_string()),
    ];
    for (label, value) in rows {
        println!("{label:<19}{value}");
    }
    println!("{:<19}{} (head {})", "ledger entries", s.entries, s.head);
    Ok(())
}

/// Downloads the head and every entry, the head first (entries appended after it are
/// left out, so the two agree).
fn download(remote: &Remote) -> anyhow::Result<(TreeHead, Vec<Entry>)> {
    let head: TreeHead = remote.get("/v1/ledger/head")?;
    let mut entries = Vec::with_capacity(head.size as usize);
    let mut from = 0;
    while (entries.len() as u64) < head.size {
        let page: EntriesPage = remote.get(&format!("/v1/ledger?from={from}"))?;
        if page.entries.is_empty() {
            bail!(
                "the coordinator sent {} of the head's {} entries",
                entries.len(),
                head.size
            );
        }
        from += page.entries.len() as u64;
        entries.extend(page.entries);
    }
    entries.truncate(head.size as usize);
    Ok((head, entries))
}

/// Reads an export: the head on the first line, then one entry a line. A line that is
/// not an entry is reported as the entry it should have been.
fn read_export(path: &std::path::Path) -> anyhow::Result<(TreeHead, Vec<Entry>)> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let first = lines
        .next()
        .transpose()?
        .with_context(|| format!("{} is empty", path.display()))?;
    let head: TreeHead = serde_json::from_str(&first)
        .with_context(|| format!("{}: line 1 is not a signed tree head", path.display()))?;
    let mut entries = Vec::new();
    for (i, line) in lines.enumerate() {
        let line = line?;
        let entry: Entry = serde_json::from_str(&line).map_err(|e| {
            anyhow::anyhow!("ledger broken at entry {i}: the line does not parse as an entry ({e})")
        })?;
        entries.push(entry);
    }
    Ok((head, entries))
}

pub(crate) fn run_ledger(command: LedgerCommand) -> anyhow::Result<()> {
    match command {
        LedgerCommand::Export { out, remote } => {
            let (head, entries) = download(&remote)?;
            let mut text = serde_json::to_string(&head)? + "\n";
            for e in &entries {
                text.push_str(&serde_json::to_string(e)?);
                text.push('\n');
            }
            match out {
                Some(path) => {
                    std::fs::write(&path, text)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "wrote the head and {} entries to {}",
                        entries.len(),
                        path.display()
                    );
                }
                None => std::io::stdout().write_all(text.as_bytes())?,
            }
            Ok(())
        }
        LedgerCommand::Verify {
            chain: Some(chain),
            ticket,
            corpus,
            tokenizer,
            ..
        } => crate::peer::verify_chain(
            &chain,
            ticket.as_deref().unwrap_or_default(),
            corpus.as_deref(),
            tokenizer.as_deref(),
        ),
        LedgerCommand::Verify {
            file,
            authority,
            wallet,
            remote,
            ..
        } => {
            let online = file.is_none();
            let (head, entries) = match &file {
                Some(path) => read_export(path)?,
                None => download(&remote)?,
            };
            let key = VerifyingKey::from_bytes(&head.authority.0)
                .context("the head's authority is not an ed25519 public key")?;
            if let Some(want) = &authority {
                let want = Digest::parse(want).context("--authority must be 64 hex digits")?;
                if want != head.authority {
                    bail!(
                        "the ledger is signed by {}, not by the expected {want}",
                        head.authority
                    );
                }
            }
            if !head.verify(&key) {
                bail!("the tree head's signature does not verify");
            }
            let ledger = Ledger::replay(key, entries)
                .map_err(|e| anyhow::anyhow!("ledger broken at {e}"))?;
            if ledger.len() as u64 != head.size {
                bail!(
                    "the head covers {} entries but {} were read",
                    head.size,
                    ledger.len()
                );
            }
            let hashes: Vec<Digest> = ledger.entries().iter().map(|e| e.hash).collect();
            if ledger::merkle::root(&hashes) != head.root {
                bail!("the entries do not hash to the head's root");
            }
            // The caller's own entries, each against the head: fetched from the
            // coordinator when online (the server's proof, checked here), computed from
            // the entries otherwise.
            let wallet = match wallet.as_deref() {
                Some(w) => Some(remote.wallet(Some(w))?),
                None => remote.key().ok().map(|k| WorkerId::of(&k)),
            };
            let mut proven = 0;
            if let Some(w) = wallet {
                let account = Account::Wallet(w);
                for e in ledger.entries() {
                    if e.from != Some(account) && e.to != Some(account) {
                        continue;
                    }
                    let proof: InclusionProof = if online {
                        remote.get(&format!("/v1/ledger/proof/{}?size={}", e.seq, head.size))?
                    } else {
                        ledger
                            .inclusion_proof(e.seq, head.size)
                            .context("no proof for an entry in range")?
                    };
                    if !verify_inclusion(&e.hash, &proof, head.size, &head.root) {
                        bail!(
                            "ledger broken at entry {}: its inclusion proof does not verify",
                            e.seq
                        );
                    }
                    proven += 1;
                }
            }
            println!(
                "ledger ok: {} entries, every hash, signature and invariant checked; root {}",
                head.size, head.root
            );
            println!("signed by {}", head.authority);
            if let Some(w) = wallet {
                println!(
                    "{proven} entries of wallet {w} proven in the head; balance {} credits",
                    format_credits(ledger.balance(&Account::Wallet(w)))
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_parse_exactly() {
        let got: Vec<String> = [
            "2",
            "0.125",
            ".5",
            "1.000001",
            "3.",
            "",
            "1.0000001",
            "-1",
            "1e3",
            "x",
        ]
        .iter()
        .map(|t| match parse_credits(t) {
            Ok(m) => m.to_string(),
            Err(_) => "error".into(),
        })
        .collect();
        expect_test::expect!["2000000 125000 500000 1000001 3000000 error error error error error"]
            .assert_eq(&got.join(" "));
    }
}
