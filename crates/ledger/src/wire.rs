//! What the coordinator's ledger endpoints send, and what the CLI reads.

use serde::{Deserialize, Serialize};

use crate::{Account, Digest, Entry, Kind, Ledger};

/// `GET /v1/wallets/{key}`: one wallet's totals and its entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletView {
    pub wallet: String,
    /// All amounts in micro-credits.
    pub balance: u64,
    /// Minted for accepted work.
    pub earned: u64,
    /// Accepted updates (mints).
    pub units: u64,
    /// Spent on queries.
    pub spent: u64,
    pub sent: u64,
    pub received: u64,
    pub dividends: u64,
    pub clawed_back: u64,
    /// The entries that name the wallet, oldest first: all of them, or the newest N
    /// with `?entries=N` (the totals always count every entry).
    pub entries: Vec<Entry>,
}

/// One row of `GET /v1/leaderboard`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRow {
    pub wallet: String,
    pub name: String,
    /// The device its worker last reported (empty when it reported none).
    #[serde(default)]
    pub device: String,
    /// Its tier on this run (`fast`, `steady`, `slow`; empty when unknown).
    #[serde(default)]
    pub tier: String,
    pub earned: u64,
    pub units: u64,
    pub balance: u64,
}

/// `GET /v1/stats`: network totals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub entries: u64,
    pub minted: u64,
    pub burned: u64,
    pub pool: u64,
    pub wallets: u64,
    pub workers: u64,
    pub accepted_updates: u64,
    pub tokens_trained: u64,
    pub current_version: u64,
    /// The hash of the newest entry.
    pub head: Digest,
}

/// `GET /v1/ledger?from=N&limit=M`: a page of entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntriesPage {
    pub entries: Vec<Entry>,
    /// The ledger's size when the page was read.
    pub size: u64,
    /// Where the next page starts, if there is one.
    pub next: Option<u64>,
}

/// `POST /v1/transfers` (signed by the sending wallet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRequest {
    /// The receiving wallet, 64 hex digits.
    pub to: String,
    /// Micro-credits.
    pub amount: u64,
    /// A name of the sender's choosing for this transfer; sending it again is a no-op.
    pub reference: String,
}

impl Ledger {
    /// A wallet's totals over all its entries, and its entries (the newest `newest`, or
    /// all).
    pub fn wallet_view(&self, wallet: &Account, newest: Option<usize>) -> WalletView {
        let mut v = WalletView {
            wallet: wallet.to_string(),
            balance: self.balance(wallet),
            ..WalletView::default()
        };
        let mine: Vec<&Entry> = self.entries_of(wallet).collect();
        for e in &mine {
            let from = e.from.as_ref() == Some(wallet);
            match (e.kind, from) {
                (Kind::Mint, _) => {
                    v.earned += e.amount;
                    v.units += 1;
                }
                (Kind::Spend, _) => v.spent += e.amount,
                (Kind::Transfer, true) => v.sent += e.amount,
                (Kind::Transfer, false) => v.received += e.amount,
                (Kind::Dividend, _) => v.dividends += e.amount,
                (Kind::Clawback, _) => v.clawed_back += e.amount,
            }
        }
        let skip = newest.map_or(0, |n| mine.len().saturating_sub(n));
        v.entries = mine[skip..].iter().map(|&e| e.clone()).collect();
        v
    }
}
