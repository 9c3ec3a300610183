//! The core's side of serving the model: which weights a model name means, API keys
//! bound to wallets, the price check before a generation and the one charge after it,
//! and the dividends that pay the query revenue out to contributors. Generation itself
//! runs outside the core's lock (`crate::openai`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use axum::http::StatusCode;
use data::TextTokenizer;
use ed25519_dalek::{Signature, VerifyingKey};
use engine::GptConfig;
use ledger::{Account, Draft, Ledger, Prepared};
use protocol::WorkerId;

use super::Core;
use crate::error::ApiError;

/// The name of the newest version; `hivetrain-vN` pins version N.
pub const MODEL_NAME: &str = "hivetrain";
/// API keys start with this.
pub const API_KEY_PREFIX: &str = "hk-";
/// What a wallet signs to get an API key: this, then the challenge's hex.
pub const KEY_CHALLENGE_CONTEXT: &str = "hivetrain-api-key-v1\n";
const CHALLENGE_TTL_MS: u64 = 300_000;
const CHALLENGES_MAX: usize = 4096;
/// Meta key: the ledger entry from which the next dividend counts credit earned.
pub(super) const META_DIVIDEND_FROM: &str = "dividend_from";

/// The weights and tokenizer a request generates with, taken under the lock and used
/// outside it.
#[derive(Clone)]
pub struct ModelSnapshot {
    pub id: String,
    pub version: u64,
    pub config: GptConfig,
    pub params: Arc<Vec<f32>>,
    pub tokenizer: Arc<TextTokenizer>,
}

/// Serving state kept by the core.
#[derive(Debug, Default)]
pub(super) struct Serving {
    /// blake3 hex of each live key -> its wallet.
    pub(super) api_keys: std::collections::HashMap<String, WorkerId>,
    /// Challenge hex -> expiry.
    pub(super) challenges: BTreeMap<String, u64>,
    pub(super) dividend_from: u64,
    pub(super) last_dividend_ms: u64,
}

fn random_hex() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| ApiError::internal(&std::io::Error::other(e)))?;
    Ok(hex::encode(bytes))
}

fn key_hash(key: &str) -> String {
    blake3::hash(key.as_bytes()).to_hex().to_string()
}

fn unauthorized(code: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

impl Core {
    /// The model names `GET /v1/models` lists: the newest, and the newest pinned.
    pub fn model_ids(&self) -> Vec<String> {
        vec![
            MODEL_NAME.to_owned(),
            format!("{MODEL_NAME}-v{}", self.current.version),
        ]
    }

    /// The weights of `name` (`hivetrain`: the newest; `hivetrain-vN`: version N).
    pub fn snapshot(&self, name: &str) -> Result<ModelSnapshot, ApiError> {
        let unknown = || {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "there is no model {name:?}: use {MODEL_NAME:?} (the newest) or {MODEL_NAME}-vN for a version up to {}",
                    self.current.version
                ),
            )
        };
        let version = match name.strip_prefix(MODEL_NAME) {
            Some("") => self.current.version,
            Some(rest) => rest
                .strip_prefix("-v")
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(unknown)?,
            None => return Err(unknown()),
        };
        let params = if version == self.current.version {
            self.current.params.clone()
        } else {
            let (bytes, _) = self.model(version).map_err(|_| unknown())?;
            let ckpt = engine::checkpoint::from_bytes(Path::new(name), &bytes, Some(self.model))
                .map_err(|e| ApiError::internal(&e))?;
            Arc::new(ckpt.params)
        };
        Ok(ModelSnapshot {
            id: if version == self.current.version && name == MODEL_NAME {
                MODEL_NAME.to_owned()
            } else {
                format!("{MODEL_NAME}-v{version}")
            },
            version,
            config: self.model,
            params,
            tokenizer: self.text_tokenizer.clone(),
        })
    }

    /// A fresh challenge for a wallet to sign, and when it expires.
    pub fn key_challenge(&mut self, now_ms: u64) -> Result<(String, u64), ApiError> {
        let s = &mut self.serving;
        s.challenges.retain(|_, expires| *expires > now_ms);
        if s.challenges.len() >= CHALLENGES_MAX {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many open key challenges; try again in a few minutes",
            ));
        }
        let challenge = random_hex()?;
        let expires = now_ms + CHALLENGE_TTL_MS;
        s.challenges.insert(challenge.clone(), expires);
        Ok((challenge, expires))
    }

    /// Issues an API key bound to `wallet`, which signed `challenge` (each challenge
    /// serves once); returns the key and the wallet.
    pub fn issue_api_key(
        &mut self,
        wallet: &str,
        challenge: &str,
        signature: &str,
        now_ms: u64,
    ) -> Result<(String, WorkerId), ApiError> {
        let id = WorkerId::parse(wallet).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_wallet",
                format!("{wallet:?} is not a wallet: 64 hex digits of a worker's public key"),
            )
        })?;
        match self.serving.challenges.get(challenge) {
            Some(&expires) if expires > now_ms => {}
            _ => {
                return Err(unauthorized(
                    "bad_challenge",
                    "the challenge is unknown, used or expired: GET /v1/keys/challenge for a new one",
                ));
            }
        }
        let mut sig = [0u8; 64];
        let verified = hex::decode_to_slice(signature, &mut sig).is_ok()
            && VerifyingKey::from_bytes(&id.0).is_ok_and(|key| {
                key.verify_strict(
                    format!("{KEY_CHALLENGE_CONTEXT}{challenge}").as_bytes(),
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
        let key = format!("{API_KEY_PREFIX}{}", random_hex()?);
        let hash = key_hash(&key);
        self.store
            .write(|tx| tx.insert_api_key(&hash, &id.to_string(), now_ms))
            .map_err(|e| ApiError::internal(&e))?;
        self.serving.challenges.remove(challenge);
        self.serving.api_keys.insert(hash, id);
        Ok((key, id))
    }

    /// The wallet an API key spends from.
    pub fn api_key_wallet(&self, key: &str) -> Result<WorkerId, ApiError> {
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

    /// Revokes an API key (the key itself authorizes this).
    pub fn revoke_api_key(&mut self, key: &str, now_ms: u64) -> Result<(), ApiError> {
        self.api_key_wallet(key)?;
        let hash = key_hash(key);
        self.store
            .write(|tx| tx.revoke_api_key(&hash, now_ms))
            .map_err(|e| ApiError::internal(&e))?;
        self.serving.api_keys.remove(&hash);
        Ok(())
    }

    /// Refuses, with 402, a request the wallet could not pay for at its longest (a retry
    /// of a request already paid for, by its id, passes: it is not charged again).
    pub fn check_funds(
        &self,
        wallet: WorkerId,
        request_id: &str,
        prompt_tokens: u64,
        max_tokens: u64,
    ) -> Result<(), ApiError> {
        if self
            .ledger
            .find(ledger::Kind::Spend, &format!("{wallet}:{request_id}"))
            .is_some()
        {
            return Ok(());
        }
        let serving = &self.config.serving;
        let price = serving.price(prompt_tokens, max_tokens);
        let balance = self.ledger.balance(&Account::Wallet(wallet));
        if balance < price {
            return Err(ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_credit",
                format!(
                    "this request may cost {} credits ({prompt_tokens} prompt tokens at {} and up to {max_tokens} tokens at {} micro-credits each); wallet {wallet} holds {} credits",
                    ledger::format_credits(price),
                    serving.price_prompt_token,
                    serving.price_output_token,
                    ledger::format_credits(balance)
                ),
            ));
        }
        Ok(())
    }

    /// Charges a finished request once: a spend entry of its price (at most the
    /// balance, should two requests have raced), keyed by `request_id` so a retry with
    /// the same id is not charged again. Returns the micro-credits charged.
    pub fn charge(
        &mut self,
        wallet: WorkerId,
        request_id: &str,
        prompt_tokens: u64,
        completion_tokens: u64,
        now_ms: u64,
    ) -> Result<u64, ApiError> {
        let reference = format!("{wallet}:{request_id}");
        if let Some(e) = self.ledger.find(ledger::Kind::Spend, &reference) {
            return Ok(e.amount);
        }
        let price = self.config.serving.price(prompt_tokens, completion_tokens);
        let amount = price.min(self.ledger.balance(&Account::Wallet(wallet)));
        if amount == 0 {
            return Ok(0);
        }
        self.append(Draft::spend(wallet, amount, reference), now_ms)?;
        Ok(amount)
    }

    /// Claws back the credit of unit `unit`'s accepted update, found false by a later
    /// check: an entry of its own (the mint stays in history), at most what the wallet
    /// still holds. A second clawback of the same unit is a no-op.
    pub fn claw_back(&mut self, unit: u64, now_ms: u64) -> Result<ledger::Entry, ApiError> {
        let reference = super::mint_reference(unit);
        if let Some(e) = self.ledger.find(ledger::Kind::Clawback, &reference) {
            return Ok(e.clone());
        }
        let draft = self
            .ledger
            .clawback_draft(&reference)
            .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "no_such_mint", e.to_string()))?;
        self.append(draft, now_ms)
    }

    /// Pays the pool out to the wallets that earned credit since the last payout, in
    /// proportion (one dividend entry each, all in one transaction). Returns how many.
    pub fn pay_dividends(&mut self, now_ms: u64) -> Result<usize, ApiError> {
        let from = self.serving.dividend_from;
        let period = format!("dividend-{}", self.ledger.len());
        let drafts = self.ledger.dividend_drafts(from, &period);
        let mut next: Ledger = self.ledger.clone();
        let mut entries = Vec::with_capacity(drafts.len());
        for d in drafts {
            match next.prepare(d, now_ms, &self.authority) {
                Ok(Prepared::New(entry)) => {
                    next.commit((*entry).clone())
                        .map_err(|e| ApiError::internal(&e))?;
                    entries.push(*entry);
                }
                Ok(Prepared::Existing(_)) => {}
                Err(e) => return Err(ApiError::internal(&e)),
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
            .map_err(|e| ApiError::internal(&e))?;
        self.ledger = next;
        self.serving.dividend_from = next_from;
        self.serving.last_dividend_ms = now_ms;
        Ok(entries.len())
    }

    /// Pays dividends when the configured interval has passed since the last payout.
    pub fn dividends_if_due(&mut self, now_ms: u64) -> Result<(), ApiError> {
        let interval = self.config.serving.dividend_interval_s.saturating_mul(1000);
        if interval > 0 && now_ms >= self.serving.last_dividend_ms.saturating_add(interval) {
            self.pay_dividends(now_ms)?;
        }
        Ok(())
    }
}
