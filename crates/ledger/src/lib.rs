//! hivetrain's credit ledger: what volunteers earned for validated work, and what they
//! spent, transferred and were paid.
//!
//! The ledger is a list of entries, append-only. Each entry names its kind (mint for
//! accepted work, clawback, spend, transfer, dividend), the accounts it moves credit from
//! and to, an amount in integer micro-credits (no floating point anywhere in money), a
//! reference (the update or request it is for) and a time; it carries the hash of the
//! entry before it, its own blake3 hash over all of that, and the coordinator's ed25519
//! signature over its hash. A Merkle tree over the entry hashes ([`merkle`]) gives signed
//! tree heads and inclusion proofs.
//!
//! Invariants, checked on every append and on every load ([`Ledger::replay`]):
//! no balance below zero; the sum of balances equals minted minus burned; a kind and
//! reference pair (the idempotency key) appears at most once, so a retried credit or
//! charge is a no-op and every accepted update has at most one mint (the coordinator
//! checks "exactly one" against its updates).
//!
//! No IO and no clock: the caller passes the time and the signing key; the store
//! persists the entries.

pub mod merkle;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use protocol::WorkerId;
use serde::{Deserialize, Serialize};

/// Micro-credits per credit.
pub const MICROS_PER_CREDIT: u64 = 1_000_000;
/// Training FLOPs one micro-credit stands for: a credit is 10^15 FLOPs (a petaFLOP) of
/// assigned training.
pub const FLOPS_PER_MICRO: u128 = 1_000_000_000;

/// The credit for training `n_params` parameters on `tokens` tokens: about 6 FLOPs per
/// parameter per token (forward and backward), the same for a laptop and a GPU rig.
/// Computed from what the coordinator assigned, never from what a worker claims.
pub fn credit_for_work(n_params: u64, tokens: u64) -> u64 {
    credit_for_flops(6 * n_params as u128 * tokens as u128)
}

/// The credit for `tokens` tokens of training at `flops_per_token` FLOPs each (what the
/// run's model specification says a token of its training costs: 6 per parameter when
/// every weight is trained, less with a frozen base).
pub fn credit_for_training(flops_per_token: u64, tokens: u64) -> u64 {
    credit_for_flops(flops_per_token as u128 * tokens as u128)
}

/// Micro-credits for `flops` FLOPs of assigned training, saturating.
fn credit_for_flops(flops: u128) -> u64 {
    u64::try_from(flops / FLOPS_PER_MICRO).unwrap_or(u64::MAX)
}

/// Formats micro-credits as credits with six decimals.
pub fn format_credits(micros: u64) -> String {
    format!(
        "{}.{:06}",
        micros / MICROS_PER_CREDIT,
        micros % MICROS_PER_CREDIT
    )
}

/// A 32-byte hash, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 32]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl Digest {
    pub fn parse(text: &str) -> Option<Digest> {
        let mut d = [0u8; 32];
        hex::decode_to_slice(text, &mut d).ok()?;
        Some(Digest(d))
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(d)?;
        Digest::parse(&text).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// An ed25519 signature, written as 128 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub [u8; 64]);

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sig({})", hex::encode(self.0))
    }
}

impl Serialize for Sig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sig, D::Error> {
        let text = String::deserialize(d)?;
        let mut b = [0u8; 64];
        hex::decode_to_slice(&text, &mut b)
            .map_err(|_| serde::de::Error::custom("expected 128 hex digits"))?;
        Ok(Sig(b))
    }
}

/// Who holds credit: a worker's wallet (its public key) or the pool that query revenue
/// flows into until it is paid out as dividends.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Account {
    Wallet(WorkerId),
    Pool,
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Wallet(id) => write!(f, "{id}"),
            Account::Pool => f.write_str("pool"),
        }
    }
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Wallet(id) => write!(f, "Wallet({})", &id.to_string()[..8]),
            Account::Pool => f.write_str("Pool"),
        }
    }
}

impl Account {
    /// Parses `pool` or a wallet's 64 hex digits.
    pub fn parse(text: &str) -> Option<Account> {
        match text {
            "pool" => Some(Account::Pool),
            _ => WorkerId::parse(text).map(Account::Wallet),
        }
    }

    fn encode(account: Option<&Account>, out: &mut Vec<u8>) {
        match account {
            None => out.push(0),
            Some(Account::Wallet(id)) => {
                out.push(1);
                out.extend_from_slice(&id.0);
            }
            Some(Account::Pool) => out.push(2),
        }
    }
}

impl Serialize for Account {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Account {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Account, D::Error> {
        let text = String::deserialize(d)?;
        Account::parse(&text)
            .ok_or_else(|| serde::de::Error::custom("expected \"pool\" or 64 hex digits"))
    }
}

/// What an entry does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// New credit for an accepted update: to a wallet.
    Mint,
    /// Credit taken back for work later found false: from a wallet, burned.
    Clawback,
    /// A query's price: from a wallet to the pool.
    Spend,
    /// From one wallet to another.
    Transfer,
    /// The pool paid out: from the pool to a wallet.
    Dividend,
}

impl Kind {
    pub fn code(self) -> &'static str {
        match self {
            Kind::Mint => "mint",
            Kind::Clawback => "clawback",
            Kind::Spend => "spend",
            Kind::Transfer => "transfer",
            Kind::Dividend => "dividend",
        }
    }

    fn tag(self) -> u8 {
        match self {
            Kind::Mint => 1,
            Kind::Clawback => 2,
            Kind::Spend => 3,
            Kind::Transfer => 4,
            Kind::Dividend => 5,
        }
    }
}

/// An entry before it is chained and signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    pub kind: Kind,
    pub from: Option<Account>,
    pub to: Option<Account>,
    pub amount: u64,
    /// What the entry is for (`update:17`, a request id...). With the kind, the
    /// idempotency key: a second draft with the same pair is a no-op.
    pub reference: String,
}

impl Draft {
    pub fn mint(to: WorkerId, amount: u64, reference: impl Into<String>) -> Draft {
        Draft {
            kind: Kind::Mint,
            from: None,
            to: Some(Account::Wallet(to)),
            amount,
            reference: reference.into(),
        }
    }

    pub fn spend(from: WorkerId, amount: u64, reference: impl Into<String>) -> Draft {
        Draft {
            kind: Kind::Spend,
            from: Some(Account::Wallet(from)),
            to: Some(Account::Pool),
            amount,
            reference: reference.into(),
        }
    }

    pub fn transfer(
        from: WorkerId,
        to: WorkerId,
        amount: u64,
        reference: impl Into<String>,
    ) -> Draft {
        Draft {
            kind: Kind::Transfer,
            from: Some(Account::Wallet(from)),
            to: Some(Account::Wallet(to)),
            amount,
            reference: reference.into(),
        }
    }

    pub fn dividend(to: WorkerId, amount: u64, reference: impl Into<String>) -> Draft {
        Draft {
            kind: Kind::Dividend,
            from: Some(Account::Pool),
            to: Some(Account::Wallet(to)),
            amount,
            reference: reference.into(),
        }
    }
}

/// One signed, chained entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// The hash of entry `seq - 1` (zeros for the first).
    pub prev: Digest,
    pub kind: Kind,
    pub from: Option<Account>,
    pub to: Option<Account>,
    pub amount: u64,
    pub reference: String,
    pub time_ms: u64,
    /// blake3 of all the fields above, in a fixed binary layout ([`Entry::compute_hash`]).
    pub hash: Digest,
    /// The ledger authority's ed25519 signature over `hash`.
    pub signature: Sig,
}

impl Entry {
    /// The hash the entry's fields give.
    pub fn compute_hash(&self) -> Digest {
        let mut b = Vec::with_capacity(160 + self.reference.len());
        b.extend_from_slice(b"hivetrain-ledger-entry-v1");
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.prev.0);
        b.push(self.kind.tag());
        Account::encode(self.from.as_ref(), &mut b);
        Account::encode(self.to.as_ref(), &mut b);
        b.extend_from_slice(&self.amount.to_le_bytes());
        b.extend_from_slice(&(self.reference.len() as u64).to_le_bytes());
        b.extend_from_slice(self.reference.as_bytes());
        b.extend_from_slice(&self.time_ms.to_le_bytes());
        Digest(*blake3::hash(&b).as_bytes())
    }

    fn draft(&self) -> Draft {
        Draft {
            kind: self.kind,
            from: self.from,
            to: self.to,
            amount: self.amount,
            reference: self.reference.clone(),
        }
    }
}

/// A signed statement of the tree's size and root at a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeHead {
    pub size: u64,
    pub root: Digest,
    pub time_ms: u64,
    /// The authority's public key, hex.
    pub authority: Digest,
    pub signature: Sig,
}

impl TreeHead {
    fn message(size: u64, root: &Digest, time_ms: u64) -> Vec<u8> {
        let mut b = b"hivetrain-ledger-tree-head-v1".to_vec();
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&root.0);
        b.extend_from_slice(&time_ms.to_le_bytes());
        b
    }

    /// Whether the head is signed by `authority`.
    pub fn verify(&self, authority: &VerifyingKey) -> bool {
        self.authority.0 == authority.to_bytes()
            && authority
                .verify(
                    &TreeHead::message(self.size, &self.root, self.time_ms),
                    &ed25519_dalek::Signature::from_bytes(&self.signature.0),
                )
                .is_ok()
    }
}

/// Why an append was refused. Nothing is written when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("{account} holds {balance} micro-credits; {amount} are needed")]
    Insufficient {
        account: Account,
        balance: u64,
        amount: u64,
    },
    #[error("a {kind} entry must {rule}")]
    Shape {
        kind: &'static str,
        rule: &'static str,
    },
    #[error(
        "a {kind} entry with reference {reference:?} exists with other accounts or amount (entry {seq})"
    )]
    Conflict {
        kind: &'static str,
        reference: String,
        seq: u64,
    },
    #[error("no mint with reference {0:?} to claw back")]
    NoSuchMint(String),
    #[error("the amount would overflow the ledger's totals")]
    Overflow,
    #[error("entry {seq} was prepared for an earlier state of the ledger")]
    Stale { seq: u64 },
}

/// Why a list of entries is not a valid ledger: the first broken entry and what is wrong
/// with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry {seq}: {reason}")]
pub struct VerifyError {
    pub seq: u64,
    pub reason: String,
}

/// The result of an append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// A new entry with this sequence number.
    New(u64),
    /// The same entry (kind, reference, accounts, amount) exists already: nothing added.
    Existing(u64),
}

impl Appended {
    pub fn seq(self) -> u64 {
        match self {
            Appended::New(s) | Appended::Existing(s) => s,
        }
    }
}

/// The result of [`Ledger::prepare`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// A new entry, signed, not yet added.
    New(Box<Entry>),
    /// The same entry exists already.
    Existing(u64),
}

/// The entries and what follows from them.
#[derive(Clone, Debug)]
pub struct Ledger {
    authority: VerifyingKey,
    entries: Vec<Entry>,
    /// The Merkle tree over the entries' hashes, grown with them.
    tree: merkle::Tree,
    /// Each account's entries (sequence numbers, in order), so one wallet's view reads
    /// its own entries only.
    by_account: HashMap<Account, Vec<u64>>,
    /// Each wallet's mints: total amount and count (what the leaderboard ranks by).
    earned: BTreeMap<WorkerId, (u64, u64)>,
    balances: BTreeMap<Account, u64>,
    minted: u128,
    burned: u128,
    keys: HashMap<(Kind, String), u64>,
}

impl Ledger {
    /// An empty ledger whose entries `authority` signs.
    pub fn new(authority: VerifyingKey) -> Ledger {
        Ledger {
            authority,
            entries: Vec::new(),
            tree: merkle::Tree::default(),
            by_account: HashMap::new(),
            earned: BTreeMap::new(),
            balances: BTreeMap::new(),
            minted: 0,
            burned: 0,
            keys: HashMap::new(),
        }
    }

    /// Rebuilds a ledger from stored or downloaded entries, checking every sequence
    /// number, chain link, hash, signature and invariant; the error names the first
    /// entry that fails. Signatures are checked first, in batches spread over the cores
    /// (a replay is what a restart or `ledger verify` waits for).
    pub fn replay(
        authority: VerifyingKey,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Ledger, VerifyError> {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let bad_signature = first_bad_signature(&authority, &entries);
        let mut ledger = Ledger::new(authority);
        for (i, entry) in entries.into_iter().enumerate() {
            ledger.replay_one(entry, bad_signature != Some(i))?;
        }
        Ok(ledger)
    }

    /// Checks and adds one entry of a replay whose signature was checked already.
    fn replay_one(&mut self, entry: Entry, signed: bool) -> Result<(), VerifyError> {
        let fail = |reason: String| VerifyError {
            seq: entry.seq,
            reason,
        };
        let want_seq = self.entries.len() as u64;
        if entry.seq != want_seq {
            return Err(fail(format!("out of order: expected entry {want_seq}")));
        }
        if entry.prev != self.head_hash() {
            return Err(fail(
                "its previous-entry hash does not match the entry before it".into(),
            ));
        }
        if entry.compute_hash() != entry.hash {
            return Err(fail("its hash does not match its contents".into()));
        }
        if !signed {
            return Err(fail("its signature is not the ledger authority's".into()));
        }
        match self.apply(&entry.draft()) {
            Ok(None) => {}
            Ok(Some(_)) => {
                return Err(fail(format!(
                    "it repeats the {} reference {:?}",
                    entry.kind.code(),
                    entry.reference
                )));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
        self.push(entry);
        self.check_invariants().map_err(|reason| VerifyError {
            seq: want_seq,
            reason,
        })
    }

    pub fn authority(&self) -> VerifyingKey {
        self.authority
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The hash of the last entry (zeros when empty): the next entry's `prev`.
    pub fn head_hash(&self) -> Digest {
        self.entries.last().map(|e| e.hash).unwrap_or_default()
    }

    pub fn balance(&self, account: &Account) -> u64 {
        self.balances.get(account).copied().unwrap_or(0)
    }

    /// Every account with a nonzero balance.
    pub fn balances(&self) -> &BTreeMap<Account, u64> {
        &self.balances
    }

    /// All credit ever minted.
    pub fn minted(&self) -> u128 {
        self.minted
    }

    /// All credit clawed back.
    pub fn burned(&self) -> u128 {
        self.burned
    }

    /// The entry with this kind and reference, if any.
    pub fn find(&self, kind: Kind, reference: &str) -> Option<&Entry> {
        self.keys
            .get(&(kind, reference.to_owned()))
            .map(|&seq| &self.entries[seq as usize])
    }

    /// Checks `draft` against the rules and balances without appending it: the error
    /// an append would return, or `None` when it would be a no-op repeat.
    pub fn check(&self, draft: &Draft) -> Result<Option<u64>, LedgerError> {
        self.plan(draft)
    }

    /// Appends `draft`, chained to the last entry and signed by `key` (which must be the
    /// authority's), at `time_ms`. A draft whose kind and reference exist already returns
    /// that entry's number and adds nothing; with other accounts or amount it is a
    /// conflict.
    pub fn append(
        &mut self,
        draft: Draft,
        time_ms: u64,
        key: &SigningKey,
    ) -> Result<Appended, LedgerError> {
        match self.prepare(draft, time_ms, key)? {
            Prepared::Existing(seq) => Ok(Appended::Existing(seq)),
            Prepared::New(entry) => {
                let seq = entry.seq;
                self.commit(*entry)?;
                Ok(Appended::New(seq))
            }
        }
    }

    /// The entry `append` would add, built and signed but not added, so a caller can
    /// persist it first and [`Ledger::commit`] it after.
    pub fn prepare(
        &self,
        draft: Draft,
        time_ms: u64,
        key: &SigningKey,
    ) -> Result<Prepared, LedgerError> {
        debug_assert_eq!(key.verifying_key(), self.authority);
        if let Some(seq) = self.plan(&draft)? {
            return Ok(Prepared::Existing(seq));
        }
        let mut entry = Entry {
            seq: self.entries.len() as u64,
            prev: self.head_hash(),
            kind: draft.kind,
            from: draft.from,
            to: draft.to,
            amount: draft.amount,
            reference: draft.reference,
            time_ms,
            hash: Digest::default(),
            signature: Sig([0; 64]),
        };
        entry.hash = entry.compute_hash();
        entry.signature = Sig(key.sign(&entry.hash.0).to_bytes());
        Ok(Prepared::New(Box::new(entry)))
    }

    /// Adds an entry from [`Ledger::prepare`] (and nothing appended since).
    pub fn commit(&mut self, entry: Entry) -> Result<(), LedgerError> {
        if entry.seq != self.entries.len() as u64 || entry.prev != self.head_hash() {
            return Err(LedgerError::Stale { seq: entry.seq });
        }
        if self.apply(&entry.draft())?.is_some() {
            return Err(LedgerError::Stale { seq: entry.seq });
        }
        let seq = entry.seq;
        self.push(entry);
        if let Err(reason) = self.check_invariants() {
            // Unreachable by construction; a broken invariant must never be kept.
            panic!("ledger invariant broken by entry {seq}: {reason}");
        }
        Ok(())
    }

    /// The draft that claws back the mint `mint_reference`: its amount, or what is left
    /// of the wallet's balance if it was spent since (history is never edited; the
    /// shortfall is the clawback entry's difference from the mint's).
    pub fn clawback_draft(&self, mint_reference: &str) -> Result<Draft, LedgerError> {
        let mint = self
            .find(Kind::Mint, mint_reference)
            .ok_or_else(|| LedgerError::NoSuchMint(mint_reference.to_owned()))?;
        let wallet = mint.to.ok_or(LedgerError::Shape {
            kind: "mint",
            rule: "name a wallet",
        })?;
        Ok(Draft {
            kind: Kind::Clawback,
            from: Some(wallet),
            to: None,
            amount: mint.amount.min(self.balance(&wallet)),
            reference: mint_reference.to_owned(),
        })
    }

    /// The dividends that pay out the pool's balance to the wallets that earned credit in
    /// mints `[from_seq, ..)`, in proportion to the credit each earned there (rounded
    /// down; the remainder stays in the pool). References are `{period}:{wallet}`.
    pub fn dividend_drafts(&self, from_seq: u64, period: &str) -> Vec<Draft> {
        let pool = self.balance(&Account::Pool) as u128;
        let mut earned: BTreeMap<WorkerId, u128> = BTreeMap::new();
        for e in self.entries.iter().skip(from_seq as usize) {
            if let (Kind::Mint, Some(Account::Wallet(w))) = (e.kind, e.to) {
                *earned.entry(w).or_default() += e.amount as u128;
            }
        }
        let total: u128 = earned.values().sum();
        if pool == 0 || total == 0 {
            return Vec::new();
        }
        earned
            .into_iter()
            .filter_map(|(w, e)| {
                let amount = (pool * e / total) as u64;
                (amount > 0).then(|| Draft::dividend(w, amount, format!("{period}:{w}")))
            })
            .collect()
    }

    /// A signed head of the tree over every entry so far.
    pub fn tree_head(&self, time_ms: u64, key: &SigningKey) -> TreeHead {
        let size = self.entries.len() as u64;
        let root = self.tree.root(self.entries.len());
        TreeHead {
            size,
            root,
            time_ms,
            authority: Digest(self.authority.to_bytes()),
            signature: Sig(key
                .sign(&TreeHead::message(size, &root, time_ms))
                .to_bytes()),
        }
    }

    /// The inclusion proof of entry `seq` in the tree of the first `size` entries.
    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Option<merkle::InclusionProof> {
        let size = usize::try_from(size).ok()?.min(self.tree.len());
        self.tree.inclusion_proof(usize::try_from(seq).ok()?, size)
    }

    /// Adds an applied entry to the list, the tree and the indexes.
    fn push(&mut self, entry: Entry) {
        self.tree.push(&entry.hash);
        for account in [entry.from, entry.to].into_iter().flatten() {
            self.by_account.entry(account).or_default().push(entry.seq);
        }
        if let (Kind::Mint, Some(Account::Wallet(w))) = (entry.kind, entry.to) {
            let row = self.earned.entry(w).or_default();
            row.0 += entry.amount;
            row.1 += 1;
        }
        self.entries.push(entry);
    }

    /// The entries that name `account` (as sender or receiver), in order.
    pub fn entries_of(&self, account: &Account) -> impl Iterator<Item = &Entry> {
        self.by_account
            .get(account)
            .into_iter()
            .flatten()
            .map(|&seq| &self.entries[seq as usize])
    }

    /// Each wallet's mints: the credit its accepted work earned and how many units.
    pub fn earned(&self) -> &BTreeMap<WorkerId, (u64, u64)> {
        &self.earned
    }

    /// Applies a draft's effect on balances and keys, all or nothing. `Ok(Some(seq))`:
    /// the same draft exists as entry `seq`, nothing changed.
    fn apply(&mut self, d: &Draft) -> Result<Option<u64>, LedgerError> {
        if let Some(seq) = self.plan(d)? {
            return Ok(Some(seq));
        }
        if let Some(from) = d.from {
            let left = self.balance(&from) - d.amount;
            if left == 0 {
                self.balances.remove(&from);
            } else {
                self.balances.insert(from, left);
            }
        }
        if let Some(to) = d.to {
            *self.balances.entry(to).or_default() += d.amount;
        }
        match d.kind {
            Kind::Mint => self.minted += d.amount as u128,
            Kind::Clawback => self.burned += d.amount as u128,
            _ => {}
        }
        self.keys
            .insert((d.kind, d.reference.clone()), self.entries.len() as u64);
        Ok(None)
    }

    /// Every check `apply` makes, changing nothing.
    fn plan(&self, d: &Draft) -> Result<Option<u64>, LedgerError> {
        if let Some(&seq) = self.keys.get(&(d.kind, d.reference.clone())) {
            let existing = &self.entries[seq as usize];
            return if existing.draft() == *d {
                Ok(Some(seq))
            } else {
                Err(LedgerError::Conflict {
                    kind: d.kind.code(),
                    reference: d.reference.clone(),
                    seq,
                })
            };
        }
        shape(d)?;
        if d.kind == Kind::Clawback {
            match self.find(Kind::Mint, &d.reference) {
                None => return Err(LedgerError::NoSuchMint(d.reference.clone())),
                Some(mint) if mint.to != d.from || d.amount > mint.amount => {
                    return Err(LedgerError::Shape {
                        kind: "clawback",
                        rule: "take at most the mint's amount from the wallet it credited",
                    });
                }
                Some(_) => {}
            }
        }
        if let Some(from) = d.from {
            let balance = self.balance(&from);
            if balance < d.amount {
                return Err(LedgerError::Insufficient {
                    account: from,
                    balance,
                    amount: d.amount,
                });
            }
        }
        if let Some(to) = d.to {
            self.balance(&to)
                .checked_add(d.amount)
                .ok_or(LedgerError::Overflow)?;
        }
        Ok(None)
    }

    fn check_invariants(&self) -> Result<(), String> {
        let sum: u128 = self.balances.values().map(|&b| b as u128).sum();
        if self.burned > self.minted || sum != self.minted - self.burned {
            return Err(format!(
                "balances sum to {sum} but {} were minted and {} burned",
                self.minted, self.burned
            ));
        }
        if self.keys.len() != self.entries.len() {
            return Err("an idempotency key is used twice".into());
        }
        Ok(())
    }
}

/// The position of the first entry in `entries` whose signature is not `authority`'s
/// over its hash, if any. Each core takes a contiguous part and checks it in batches
/// (ed25519 batch verification, about twice as fast as one by one), one by one only
/// within a batch that fails, and stops at its first bad entry.
fn first_bad_signature(authority: &VerifyingKey, entries: &[Entry]) -> Option<usize> {
    const BATCH: usize = 256;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let part = entries.len().div_ceil(cores).max(BATCH);
    std::thread::scope(|scope| {
        let parts: Vec<_> = entries
            .chunks(part)
            .enumerate()
            .map(|(p, entries)| {
                scope.spawn(move || {
                    entries.chunks(BATCH).enumerate().find_map(|(b, batch)| {
                        bad_in_batch(authority, batch).map(|i| p * part + b * BATCH + i)
                    })
                })
            })
            .collect();
        parts
            .into_iter()
            .filter_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .min()
    })
}

fn bad_in_batch(authority: &VerifyingKey, entries: &[Entry]) -> Option<usize> {
    let signature = |e: &Entry| ed25519_dalek::Signature::from_bytes(&e.signature.0);
    let messages: Vec<&[u8]> = entries.iter().map(|e| &e.hash.0[..]).collect();
    let signatures: Vec<_> = entries.iter().map(signature).collect();
    let keys = vec![*authority; entries.len()];
    if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
        return None;
    }
    entries
        .iter()
        .position(|e| authority.verify(&e.hash.0, &signature(e)).is_err())
}

/// The accounts each kind of entry must name.
fn shape(d: &Draft) -> Result<(), LedgerError> {
    let wallet = |a: Option<Account>| matches!(a, Some(Account::Wallet(_)));
    let (ok, rule) = match d.kind {
        Kind::Mint => (
            d.from.is_none() && wallet(d.to) && d.amount > 0,
            "credit a wallet from nowhere with a positive amount",
        ),
        Kind::Clawback => (
            wallet(d.from) && d.to.is_none(),
            "take from a wallet to nowhere",
        ),
        Kind::Spend => (
            wallet(d.from) && d.to == Some(Account::Pool) && d.amount > 0,
            "move a positive amount from a wallet to the pool",
        ),
        Kind::Transfer => (
            wallet(d.from) && wallet(d.to) && d.from != d.to && d.amount > 0,
            "move a positive amount between two different wallets",
        ),
        Kind::Dividend => (
            d.from == Some(Account::Pool) && wallet(d.to) && d.amount > 0,
            "move a positive amount from the pool to a wallet",
        ),
    };
    if d.reference.is_empty() || d.reference.len() > 256 {
        return Err(LedgerError::Shape {
            kind: d.kind.code(),
            rule: "have a reference of 1 to 256 bytes",
        });
    }
    if ok {
        Ok(())
    } else {
        Err(LedgerError::Shape {
            kind: d.kind.code(),
            rule,
        })
    }
}

#[cfg(test)]
mod tests;
