//! The core's side of serving the model: which weights a model name means, API keys
//! bound to wallets (from stateless signed challenges), the hold on a request's price
//! before a generation and the one charge after it (with the stored reply of an
//! idempotent request), and the dividends that pay the query revenue out to
//! contributors. Generation itself runs outside the core's lock (`crate::openai`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::{Signature, VerifyingKey};
use ledger::{Account, Draft, Ledger, Prepared};
use protocol::WorkerId;
use worker::unit::RunModel;

use super::{Core, conflict};
use run::{Class, RunError};

/// The name of the newest version; `hivetrain-vN` pins version N. A fine-tune's replies
/// name their weights after its base and version (`Reads::model_name`), and these stay
/// its aliases.
pub const MODEL_NAME: &str = "hivetrain";
/// Hex digits of the base's sha256 in a fine-tune's model names: 32 bits, enough to tell
/// apart the bases one coordinator's clients meet (the full hash is in `/v1/run`).
pub const BASE_SHA256_PREFIX_CHARS: usize = 8;
/// API keys start with this.
pub const API_KEY_PREFIX: &str = "hk-";
/// What a wallet signs to get an API key: this, then the challenge's hex.
pub const KEY_CHALLENGE_CONTEXT: &str = "hivetrain-api-key-v1\n";
/// What a wallet signs to revoke all of its API keys: this, then the challenge's hex.
pub const REVOKE_CHALLENGE_CONTEXT: &str = "hivetrain-revoke-api-keys-v1\n";
/// How long a key challenge may be used.
pub const CHALLENGE_TTL_MS: u64 = 300_000;
/// Challenges one wallet may have used within a challenge's lifetime: the bound on the
/// memory that single use takes (only signed uses are remembered).
pub const USED_CHALLENGES_PER_WALLET_MAX: usize = 64;
/// A challenge: expiry (8 bytes, big-endian ms), nonce (16), keyed MAC over both (32).
const CHALLENGE_BYTES: usize = 8 + 16 + 32;
/// Meta key: the ledger entry from which the next dividend counts credit earned.
pub(super) const META_DIVIDEND_FROM: &str = "dividend_from";

/// The weights and vocabulary a request generates with, taken under the lock and used
/// outside it.
#[derive(Clone)]
pub struct ModelSnapshot {
    pub id: String,
    pub version: u64,
    /// The run's model (what a backend for the snapshot is opened from).
    pub model: RunModel,
    /// The version's trainable floats.
    pub params: Arc<Vec<f32>>,
    /// The tokenizer and chat format (the run's GPT-2 tokenizer today; a pretrained
    /// model's [`inference::PretrainedVocab`] once the core serves one).
    pub tokenizer: Arc<dyn inference::Vocab>,
}

/// Serving state kept by the core (in memory; a restart voids open challenges and holds,
/// and charges nothing for generations it cut short).
#[derive(Debug)]
pub(super) struct Serving {
    /// blake3 hex of each live key -> its wallet.
    api_keys: HashMap<String, WorkerId>,
    /// Live keys per wallet.
    keys_per_wallet: HashMap<WorkerId, u32>,
    /// Keys the MAC of every challenge; made at start, so challenges need no table.
    challenge_secret: [u8; 32],
    /// The challenges each wallet used (MAC, expiry), until they expire.
    used_challenges: HashMap<WorkerId, Vec<([u8; 32], u64)>>,
    holds: Holds,
    pub(super) dividend_from: u64,
    pub(super) last_dividend_ms: u64,
}

impl Serving {
    /// The serving state of a run whose live keys are `api_keys` (blake3 hex, wallet).
    pub(super) fn new(
        api_keys: Vec<(String, String)>,
        dividend_from: u64,
        now_ms: u64,
    ) -> Result<Serving, keys::KeyError> {
        let mut challenge_secret = [0u8; 32];
        getrandom::fill(&mut challenge_secret)
            .map_err(|e| keys::KeyError::Randomness(e.to_string()))?;
        let api_keys: HashMap<String, WorkerId> = api_keys
            .into_iter()
            .filter_map(|(hash, wallet)| WorkerId::parse(&wallet).map(|w| (hash, w)))
            .collect();
        let mut keys_per_wallet = HashMap::new();
        for wallet in api_keys.values() {
            *keys_per_wallet.entry(*wallet).or_insert(0) += 1;
        }
        Ok(Serving {
            api_keys,
            keys_per_wallet,
            challenge_secret,
            used_challenges: HashMap::new(),
            holds: Holds::default(),
            dividend_from,
            last_dividend_ms: now_ms,
        })
    }
}

/// Credit set aside for generations under way: each request's price at `max_tokens`,
/// from the check before it generates to its charge after.
#[derive(Debug, Default)]
struct Holds {
    next: u64,
    by_id: HashMap<u64, Hold>,
    /// Micro-credits held per wallet (the sum of its holds).
    held: HashMap<WorkerId, u64>,
    /// Idempotent requests under way: reference -> the hash of what each asked.
    in_flight: HashMap<String, String>,
}

#[derive(Debug)]
struct Hold {
    wallet: WorkerId,
    amount: u64,
    reference: String,
    /// The request's hash, when it came with an `Idempotency-Key`.
    request_hash: Option<String>,
}

/// A request's name: its `Idempotency-Key` (with the blake3 hex of what it asked, its
/// route and exact body), or a fresh random id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestName {
    pub id: String,
    pub request_hash: Option<String>,
}

/// A hold on a wallet's credit, released by [`Core::settle`] or [`Core::release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HoldId(u64);

/// What [`Core::reserve`] decided.
#[derive(Debug)]
pub enum Reservation {
    /// The price at `max_tokens` is held: generate, then settle.
    Held(HoldId),
    /// The same idempotent request was answered before: its stored reply, charged
    /// nothing more.
    Replay(store::ReplyRow),
}

/// What a finished generation produced: what the wallet pays for and, for an idempotent
/// request, what its retries are answered with.
#[derive(Clone, Debug)]
pub struct Finished {
    pub model: String,
    pub text: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub finish_reason: String,
}

fn random_hex() -> Result<String, RunError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| RunError::internal(&std::io::Error::other(e)))?;
    Ok(hex::encode(bytes))
}

fn key_hash(key: &str) -> String {
    blake3::hash(key.as_bytes()).to_hex().to_string()
}

fn unauthorized(code: &str, message: impl Into<String>) -> RunError {
    RunError::new(Class::Unauthenticated, code, message)
}

fn challenge_mac(secret: &[u8; 32], expires_ms: u64, nonce: &[u8]) -> blake3::Hash {
    let mut mac = blake3::Hasher::new_keyed(secret);
    mac.update(b"hivetrain-key-challenge-v1");
    mac.update(&expires_ms.to_be_bytes());
    mac.update(nonce);
    mac.finalize()
}

fn bad_challenge() -> RunError {
    unauthorized(
        "bad_challenge",
        "the challenge is not one this coordinator made, or it is used or expired: GET /v1/keys/challenge for a new one",
    )
}

fn parse_wallet(wallet: &str) -> Result<WorkerId, RunError> {
    WorkerId::parse(wallet).ok_or_else(|| {
        RunError::new(
            Class::Invalid,
            "bad_wallet",
            format!("{wallet:?} is not a wallet: 64 hex digits of a worker's public key"),
        )
    })
}

impl super::Reads {
    /// The prefix of a fine-tune's version names, `{base}@{sha256}+{lora|full}-v` (see
    /// [`Self::model_name`]); none for a run from scratch.
    fn finetune_name_prefix(&self) -> Option<String> {
        let base = self.run_info.base.as_ref()?;
        let stem = base.name.strip_suffix(".gguf").unwrap_or(&base.name);
        let stem = worker::setup::plain_name(stem);
        let sha = base
            .sha256
            .get(..BASE_SHA256_PREFIX_CHARS)
            .unwrap_or(&base.sha256);
        let kind = if self.model.spec.lora().is_some() {
            "lora"
        } else {
            "full"
        };
        Some(format!("{stem}@{sha}+{kind}-v"))
    }

    /// The name replies give version `version`. A run from scratch's is `hivetrain-vN`.
    /// A fine-tune's says which base and version answered: the base's file name without
    /// `.gguf` (characters other than ASCII letters, digits, `.`, `-` and `_` written
    /// `_`), `@`, the first [`BASE_SHA256_PREFIX_CHARS`] hex digits of its sha256, `+lora`
    /// (an adapter on the frozen base) or `+full` (every weight trained), `-v` and the
    /// version: `SmolLM2-135M-Instruct.Q4_1@b179c952+lora-v4`.
    pub fn model_name(&self, version: u64) -> String {
        match self.finetune_name_prefix() {
            Some(prefix) => format!("{prefix}{version}"),
            None => format!("{MODEL_NAME}-v{version}"),
        }
    }

    /// The model names `GET /v1/models` lists: a fine-tune's newest version by its name
    /// (its aliases `hivetrain` and `hivetrain-vN` are accepted but not listed); for a
    /// run from scratch, `hivetrain` and the newest pinned.
    pub fn model_ids(&self) -> Vec<String> {
        let version = self.published().version;
        match self.finetune_name_prefix() {
            Some(_) => vec![self.model_name(version)],
            None => vec![MODEL_NAME.to_owned(), format!("{MODEL_NAME}-v{version}")],
        }
    }

    /// The weights of `name` (`hivetrain`: the newest; `hivetrain-vN` or a fine-tune's
    /// version name: version N, its checkpoint decoded here, with no lock held).
    pub fn snapshot(&self, name: &str) -> Result<ModelSnapshot, RunError> {
        let current = self.published();
        let prefix = self.finetune_name_prefix();
        let unknown = || {
            let message = match &prefix {
                Some(prefix) => format!(
                    "there is no model {name:?}: use {:?} (the newest), {prefix}N for version N up to {}, or the aliases {MODEL_NAME:?} (the newest) and {MODEL_NAME}-vN",
                    format!("{prefix}{}", current.version),
                    current.version
                ),
                None => format!(
                    "there is no model {name:?}: use {MODEL_NAME:?} (the newest) or {MODEL_NAME}-vN for a version up to {}",
                    current.version
                ),
            };
            RunError::new(Class::NotFound, "model_not_found", message)
        };
        let pinned = |rest: &str| {
            // Only the canonical spelling of a number (no sign, no leading zero).
            rest.parse::<u64>().ok().filter(|n| n.to_string() == rest)
        };
        // A fine-tune's own names first: its base's file name may start with `hivetrain`.
        let named = prefix
            .as_deref()
            .and_then(|p| name.strip_prefix(p))
            .and_then(pinned);
        let version = match (named, name.strip_prefix(MODEL_NAME)) {
            (Some(version), _) => version,
            (None, Some("")) => current.version,
            (None, Some(rest)) => rest
                .strip_prefix("-v")
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(unknown)?,
            (None, None) => return Err(unknown()),
        };
        let params = if version == current.version {
            current.params.clone()
        } else {
            let (bytes, _) = self.model(version).map_err(|_| unknown())?;
            let ckpt =
                engine::checkpoint::trained_from_bytes(Path::new(name), &bytes, &self.model.spec)
                    .map_err(|e| RunError::internal(&e))?;
            Arc::new(ckpt.trainable)
        };
        let id = match &prefix {
            Some(prefix) => format!("{prefix}{version}"),
            None if version == current.version && name == MODEL_NAME => MODEL_NAME.to_owned(),
            None => format!("{MODEL_NAME}-v{version}"),
        };
        Ok(ModelSnapshot {
            id,
            version,
            model: self.model.clone(),
            params,
            tokenizer: self.vocab.clone(),
        })
    }
}

impl Core {
    /// A fresh challenge for a wallet to sign, and when it expires. It is stateless (an
    /// expiry and a nonce under a keyed MAC): no flood of requests can use anything up.
    pub fn key_challenge(&self, now_ms: u64) -> Result<(String, u64), RunError> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| RunError::internal(&std::io::Error::other(e)))?;
        let expires_ms = now_ms.saturating_add(CHALLENGE_TTL_MS);
        let mac = challenge_mac(&self.serving.challenge_secret, expires_ms, &nonce);
        let mut bytes = Vec::with_capacity(CHALLENGE_BYTES);
        bytes.extend_from_slice(&expires_ms.to_be_bytes());
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(mac.as_bytes());
        Ok((hex::encode(bytes), expires_ms))
    }

    /// Checks that `wallet` signed `context` + `challenge` with a challenge this process
    /// made, unexpired and not used by that wallet before, then marks it used. Only a
    /// valid signature takes memory, at most [`USED_CHALLENGES_PER_WALLET_MAX`] a wallet.
    fn use_challenge(
        &mut self,
        wallet: WorkerId,
        context: &str,
        challenge: &str,
        signature: &str,
        now_ms: u64,
    ) -> Result<(), RunError> {
        let (mac, expires_ms) =
            self.verify_challenge(wallet, context, challenge, signature, now_ms)?;
        self.remember_challenge(wallet, mac, expires_ms, now_ms)
    }

    /// The MAC and expiry of `challenge`, if this process made it, it has not expired,
    /// and `wallet` signed `context` + `challenge`. Remembers nothing.
    fn verify_challenge(
        &self,
        wallet: WorkerId,
        context: &str,
        challenge: &str,
        signature: &str,
        now_ms: u64,
    ) -> Result<([u8; 32], u64), RunError> {
        let mut bytes = [0u8; CHALLENGE_BYTES];
        hex::decode_to_slice(challenge, &mut bytes).map_err(|_| bad_challenge())?;
        let (expiry, rest) = bytes.split_at(8);
        let (nonce, mac) = rest.split_at(16);
        let mut expiry_bytes = [0u8; 8];
        expiry_bytes.copy_from_slice(expiry);
        let expires_ms = u64::from_be_bytes(expiry_bytes);
        let mut given = [0u8; 32];
        given.copy_from_slice(mac);
        // blake3::Hash compares in constant time.
        if challenge_mac(&self.serving.challenge_secret, expires_ms, nonce)
            != blake3::Hash::from(given)
            || expires_ms <= now_ms
        {
            return Err(bad_challenge());
        }
        let mut sig = [0u8; 64];
        let verified = hex::decode_to_slice(signature, &mut sig).is_ok()
            && VerifyingKey::from_bytes(&wallet.0).is_ok_and(|key| {
                key.verify_strict(
                    format!("{context}{challenge}").as_bytes(),
                    &Signature::from_bytes(&sig),
                )
                .is_ok()
            });
        if !verified {
            return Err(unauthorized(
                "bad_signature",
                "the signature is not the wallet's over the challenge",
            ));
        }
        Ok((given, expires_ms))
    }

    /// Marks a verified challenge used by `wallet`: refused if it was used before, or if
    /// the wallet used [`USED_CHALLENGES_PER_WALLET_MAX`] within a challenge's lifetime.
    fn remember_challenge(
        &mut self,
        wallet: WorkerId,
        given: [u8; 32],
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(), RunError> {
        let used = &mut self.serving.used_challenges;
        used.retain(|_, list| {
            list.retain(|&(_, expires)| expires > now_ms);
            !list.is_empty()
        });
        let list = used.entry(wallet).or_default();
        if list.iter().any(|(m, _)| *m == given) {
            return Err(bad_challenge());
        }
        if list.len() >= USED_CHALLENGES_PER_WALLET_MAX {
            let wait_s = list
                .iter()
                .map(|&(_, expires)| expires)
                .min()
                .unwrap_or(now_ms)
                .saturating_sub(now_ms)
                .div_ceil(1000)
                .max(1);
            return Err(RunError::new(
                Class::TooMany {
                    retry_after_s: wait_s,
                },
                "rate_limited",
                format!(
                    "wallet {wallet} used {USED_CHALLENGES_PER_WALLET_MAX} challenges in the last {} s; retry in {wait_s} s",
                    CHALLENGE_TTL_MS / 1000
                ),
            ));
        }
        list.push((given, expires_ms));
        Ok(())
    }

    /// Issues an API key bound to `wallet`, which signed `challenge` (each challenge
    /// serves a wallet once); returns the key and the wallet. Only a wallet that holds
    /// credit gets one (a key of an empty wallet could buy nothing), and at most
    /// `serving.api_keys_per_wallet_max` live ones: so keys grow only with funded wallets.
    pub fn issue_api_key(
        &mut self,
        wallet: &str,
        challenge: &str,
        signature: &str,
        now_ms: u64,
    ) -> Result<(String, WorkerId), RunError> {
        let id = parse_wallet(wallet)?;
        let balance = self.ledger.read().balance(&Account::Wallet(id));
        if balance == 0 {
            return Err(RunError::new(
                Class::InsufficientCredit,
                "insufficient_credit",
                format!(
                    "wallet {id} holds no credit, and a key could buy nothing: earn credit by training, or receive a transfer, then ask again"
                ),
            ));
        }
        let max = self.config.serving.api_keys_per_wallet_max;
        let live = self.serving.keys_per_wallet.get(&id).copied().unwrap_or(0);
        if live >= max {
            return Err(conflict(
                "too_many_api_keys",
                format!(
                    "wallet {id} has {live} API keys, the most it may hold: revoke one (POST /v1/keys/revoke with it), or all of them with a signed challenge (`hivetrain wallet revoke-keys`)"
                ),
            ));
        }
        self.use_challenge(id, KEY_CHALLENGE_CONTEXT, challenge, signature, now_ms)?;
        let key = format!("{API_KEY_PREFIX}{}", random_hex()?);
        let hash = key_hash(&key);
        self.store
            .write(|tx| tx.insert_api_key(&hash, &id.to_string(), now_ms))
            .map_err(|e| RunError::internal(&e))?;
        self.serving.api_keys.insert(hash, id);
        *self.serving.keys_per_wallet.entry(id).or_insert(0) += 1;
        Ok((key, id))
    }

    /// The wallet an API key spends from.
    pub fn api_key_wallet(&self, key: &str) -> Result<WorkerId, RunError> {
        self.serving
            .api_keys
            .get(&key_hash(key))
            .copied()
            .ok_or_else(|| {
                unauthorized(
                    "invalid_api_key",
                    "the API key is unknown or revoked: get one with `hivetrain wallet api-key`",
                )
            })
    }

    /// Revokes an API key (the key itself authorizes this); its row is deleted.
    pub fn revoke_api_key(&mut self, key: &str) -> Result<(), RunError> {
        let wallet = self.api_key_wallet(key)?;
        let hash = key_hash(key);
        self.store
            .write(|tx| tx.revoke_api_key(&hash))
            .map_err(|e| RunError::internal(&e))?;
        self.serving.api_keys.remove(&hash);
        self.forget_keys(wallet, 1);
        Ok(())
    }

    /// Revokes every API key of `wallet`, which signed `challenge` under
    /// [`REVOKE_CHALLENGE_CONTEXT`] (for a wallet whose keys are lost); returns how many.
    pub fn revoke_api_keys_of(
        &mut self,
        wallet: &str,
        challenge: &str,
        signature: &str,
        now_ms: u64,
    ) -> Result<u32, RunError> {
        let id = parse_wallet(wallet)?;
        let (mac, expires_ms) =
            self.verify_challenge(id, REVOKE_CHALLENGE_CONTEXT, challenge, signature, now_ms)?;
        let hashes: Vec<String> = self
            .serving
            .api_keys
            .iter()
            .filter(|(_, w)| **w == id)
            .map(|(h, _)| h.clone())
            .collect();
        // A wallet with no key has nothing to revoke: its challenge is not remembered, so
        // throwaway keys signing revocations take no memory.
        if hashes.is_empty() {
            return Ok(0);
        }
        self.remember_challenge(id, mac, expires_ms, now_ms)?;
        self.store
            .write(|tx| hashes.iter().try_for_each(|h| tx.revoke_api_key(h)))
            .map_err(|e| RunError::internal(&e))?;
        for h in &hashes {
            self.serving.api_keys.remove(h);
        }
        self.forget_keys(id, hashes.len() as u32);
        Ok(hashes.len() as u32)
    }

    fn forget_keys(&mut self, wallet: WorkerId, n: u32) {
        let counts = &mut self.serving.keys_per_wallet;
        if let Some(live) = counts.get_mut(&wallet) {
            *live = live.saturating_sub(n);
            if *live == 0 {
                counts.remove(&wallet);
            }
        }
    }

    /// How many live API keys `wallet` holds.
    pub fn api_keys_of(&self, wallet: WorkerId) -> u32 {
        self.serving
            .keys_per_wallet
            .get(&wallet)
            .copied()
            .unwrap_or(0)
    }

    /// The credit `wallet` may spend or send now: its balance less what generations
    /// under way hold.
    pub fn available(&self, wallet: WorkerId) -> u64 {
        let held = self.serving.holds.held.get(&wallet).copied().unwrap_or(0);
        self.ledger
            .read()
            .balance(&Account::Wallet(wallet))
            .saturating_sub(held)
    }

    /// The stored reply of an idempotent request, if the same request was answered
    /// before; refuses a key that names another request (`idempotency_key_reused`), is
    /// still generating (`request_in_progress`), or whose reply is no longer kept
    /// (`idempotency_key_expired`). `Ok(None)`: the key is new.
    pub fn idempotent_reply(
        &self,
        wallet: WorkerId,
        name: &RequestName,
        now_ms: u64,
    ) -> Result<Option<store::ReplyRow>, RunError> {
        let Some(hash) = &name.request_hash else {
            return Ok(None);
        };
        let reference = format!("{wallet}:{}", name.id);
        let reused = || {
            RunError::new(
                Class::Unprocessable,
                "idempotency_key_reused",
                format!(
                    "the Idempotency-Key {:?} was sent with another request; a key names one request: use a new key for a new request",
                    name.id
                ),
            )
        };
        if let Some(asked) = self.serving.holds.in_flight.get(&reference) {
            if asked != hash {
                return Err(reused());
            }
            return Err(conflict(
                "request_in_progress",
                format!(
                    "the request with Idempotency-Key {:?} is still being generated; retry when it has finished",
                    name.id
                ),
            ));
        }
        let retention_ms = self
            .config
            .serving
            .idempotency_retention_s
            .saturating_mul(1000);
        let expired = || {
            RunError::new(
                Class::Unprocessable,
                "idempotency_key_expired",
                format!(
                    "the request with Idempotency-Key {:?} was answered and paid for, and its reply is no longer kept (replies are kept {} s); use a new key",
                    name.id, self.config.serving.idempotency_retention_s
                ),
            )
        };
        match self
            .store
            .reply(&reference)
            .map_err(|e| RunError::internal(&e))?
        {
            Some(row) if row.request_hash != *hash => Err(reused()),
            Some(row) if row.created_ms.saturating_add(retention_ms) <= now_ms => Err(expired()),
            Some(row) => Ok(Some(row)),
            None if self
                .ledger
                .read()
                .find(ledger::Kind::Spend, &reference)
                .is_some() =>
            {
                Err(expired())
            }
            None => Ok(None),
        }
    }

    /// Before a generation: answers an idempotent request already answered (its stored
    /// reply), or holds the request's price at `max_tokens` from the wallet's available
    /// credit (402 when short). Holds are in memory: a crash drops them and charges
    /// nothing.
    pub fn reserve(
        &mut self,
        wallet: WorkerId,
        name: &RequestName,
        prompt_tokens: u64,
        max_tokens: u64,
        now_ms: u64,
    ) -> Result<Reservation, RunError> {
        if let Some(row) = self.idempotent_reply(wallet, name, now_ms)? {
            return Ok(Reservation::Replay(row));
        }
        let serving = &self.config.serving;
        let price = serving.price(prompt_tokens, max_tokens);
        let available = self.available(wallet);
        if available < price {
            return Err(RunError::new(
                Class::InsufficientCredit,
                "insufficient_credit",
                format!(
                    "this request may cost {} credits ({prompt_tokens} prompt tokens at {} and up to {max_tokens} tokens at {} micro-credits each); wallet {wallet} has {} credits available ({} held by requests under way)",
                    ledger::format_credits(price),
                    serving.price_prompt_token,
                    serving.price_output_token,
                    ledger::format_credits(available),
                    ledger::format_credits(
                        self.ledger
                            .read()
                            .balance(&Account::Wallet(wallet))
                            .saturating_sub(available)
                    ),
                ),
            ));
        }
        let holds = &mut self.serving.holds;
        let id = holds.next;
        holds.next += 1;
        let reference = format!("{wallet}:{}", name.id);
        if let Some(hash) = &name.request_hash {
            holds.in_flight.insert(reference.clone(), hash.clone());
        }
        *holds.held.entry(wallet).or_insert(0) += price;
        holds.by_id.insert(
            id,
            Hold {
                wallet,
                amount: price,
                reference,
                request_hash: name.request_hash.clone(),
            },
        );
        Ok(Reservation::Held(HoldId(id)))
    }

    fn take_hold(&mut self, hold: HoldId) -> Option<Hold> {
        let holds = &mut self.serving.holds;
        let taken = holds.by_id.remove(&hold.0)?;
        if let Some(held) = holds.held.get_mut(&taken.wallet) {
            *held = held.saturating_sub(taken.amount);
            if *held == 0 {
                holds.held.remove(&taken.wallet);
            }
        }
        if taken.request_hash.is_some() {
            holds.in_flight.remove(&taken.reference);
        }
        Some(taken)
    }

    /// Releases a hold without charging (the generation failed or never started).
    pub fn release(&mut self, hold: HoldId) {
        self.take_hold(hold);
    }

    /// After a generation: releases its hold and charges the real price (at most the
    /// hold), one spend entry, committed in one transaction with the stored reply of an
    /// idempotent request. Returns the micro-credits charged.
    pub fn settle(
        &mut self,
        hold: HoldId,
        finished: &Finished,
        now_ms: u64,
    ) -> Result<u64, RunError> {
        let hold = self.take_hold(hold).ok_or_else(|| {
            RunError::internal(&std::io::Error::other("a generation settled a hold twice"))
        })?;
        let serving = &self.config.serving;
        let price = serving
            .price(finished.prompt_tokens, finished.completion_tokens)
            .min(hold.amount);
        // A clawback may have taken credit since the hold was made.
        let amount = price.min(self.ledger.read().balance(&Account::Wallet(hold.wallet)));
        let entry = if amount == 0 {
            None
        } else {
            let draft = Draft::spend(hold.wallet, amount, hold.reference.clone());
            match self.ledger.prepare(draft, now_ms, &self.authority) {
                Ok(Prepared::New(entry)) => Some(*entry),
                // `reserve` refuses a reference already spent: this is never reached.
                Ok(Prepared::Existing(_)) => {
                    return Err(super::conflict(
                        "idempotency_key_reused",
                        "this request was charged already",
                    ));
                }
                Err(e) => return Err(super::ledger_refusal(e)),
            }
        };
        let reply = hold.request_hash.map(|request_hash| store::ReplyRow {
            reference: hold.reference.clone(),
            wallet: hold.wallet.to_string(),
            request_hash,
            model: finished.model.clone(),
            text: finished.text.clone(),
            prompt_tokens: finished.prompt_tokens,
            completion_tokens: finished.completion_tokens,
            finish_reason: finished.finish_reason.clone(),
            charged: amount,
            created_ms: now_ms,
        });
        let expired_before_ms =
            now_ms.saturating_sub(serving.idempotency_retention_s.saturating_mul(1000));
        let per_wallet_max = serving.idempotent_replies_per_wallet_max;
        self.store
            .write(|tx| {
                if let Some(e) = &entry {
                    tx.insert_entry(e)?;
                }
                if let Some(r) = &reply {
                    tx.insert_reply(r, expired_before_ms, per_wallet_max)?;
                }
                Ok(())
            })
            .map_err(|e| RunError::internal(&e))?;
        if let Some(e) = entry {
            self.ledger_committed(e);
        }
        Ok(amount)
    }

    /// Claws back the credit of unit `unit`'s accepted update, found false by a later
    /// check: an entry of its own (the mint stays in history), at most what the wallet
    /// still holds. A second clawback of the same unit is a no-op.
    pub fn claw_back(&mut self, unit: u64, now_ms: u64) -> Result<ledger::Entry, RunError> {
        let reference = super::mint_reference(unit);
        if let Some(e) = self.ledger.read().find(ledger::Kind::Clawback, &reference) {
            return Ok(e.clone());
        }
        let entry = self
            .clawback_entry(unit, now_ms)?
            .ok_or_else(|| RunError::broken(format!("unit {unit}'s clawback vanished")))?;
        self.store
            .write(|tx| tx.insert_entry(&entry))
            .map_err(|e| RunError::internal(&e))?;
        self.ledger_committed(entry.clone());
        Ok(entry)
    }

    /// The signed clawback of unit `unit`'s mint, prepared and not yet committed (the
    /// caller commits it with what it is for); `None` when the ledger already holds it.
    /// The one way a clawback is made: by a failed re-run ([`Core::finish_check`]) or by
    /// hand ([`Core::claw_back`]).
    pub(super) fn clawback_entry(
        &self,
        unit: u64,
        now_ms: u64,
    ) -> Result<Option<ledger::Entry>, RunError> {
        let reference = super::mint_reference(unit);
        let draft = self
            .ledger
            .read()
            .clawback_draft(&reference)
            .map_err(|e| RunError::new(Class::NotFound, "no_such_mint", e.to_string()))?;
        match self.ledger.prepare(draft, now_ms, &self.authority) {
            Ok(Prepared::New(entry)) => Ok(Some(*entry)),
            Ok(Prepared::Existing(_)) => Ok(None),
            Err(e) => Err(RunError::internal(&e)),
        }
    }

    /// Pays the pool out to the wallets that earned credit since the last payout, in
    /// proportion (one dividend entry each, all in one transaction). Returns how many.
    pub fn pay_dividends(&mut self, now_ms: u64) -> Result<usize, RunError> {
        let from = self.serving.dividend_from;
        let period = format!("dividend-{}", self.ledger.read().len());
        let drafts = self.ledger.read().dividend_drafts(from, &period);
        let mut next: Ledger = self.ledger.read().clone();
        let mut entries = Vec::with_capacity(drafts.len());
        for d in drafts {
            match next.prepare(d, now_ms, &self.authority) {
                Ok(Prepared::New(entry)) => {
                    next.commit((*entry).clone())
                        .map_err(|e| RunError::internal(&e))?;
                    entries.push(*entry);
                }
                Ok(Prepared::Existing(_)) => {}
                Err(e) => return Err(RunError::internal(&e)),
            }
        }
        let next_from = next.len() as u64;
        self.store
            .write(|tx| {
                for e in &entries {
                    tx.insert_entry(e)?;
                }
                tx.set_meta(META_DIVIDEND_FROM, &next_from.to_string())
            })
            .map_err(|e| RunError::internal(&e))?;
        *self.ledger.write() = next;
        self.serving.dividend_from = next_from;
        self.serving.last_dividend_ms = now_ms;
        Ok(entries.len())
    }

    /// Pays dividends when the configured interval has passed since the last payout.
    pub fn dividends_if_due(&mut self, now_ms: u64) -> Result<(), RunError> {
        let interval = self.config.serving.dividend_interval_s.saturating_mul(1000);
        if interval > 0 && now_ms >= self.serving.last_dividend_ms.saturating_add(interval) {
            self.pay_dividends(now_ms)?;
        }
        Ok(())
    }
}
