//! Credit drafts: what the ledger is asked to record for the run's decisions. The driver
//! signs each draft and commits it in the same transaction as the rows it is for; nothing
//! here signs or stores.

use ledger::Draft;
use protocol::WorkerId;

/// The ledger reference of the mint for the accepted update of `unit` (a clawback names
/// the same reference).
pub fn mint_reference(unit: u64) -> String {
    format!("update:{unit}")
}

/// The ledger reference of the mint for a volunteer's check leased under the fresh id
/// `check` (its own id, as a unit's: the reference names no original unit).
pub fn check_reference(check: u64) -> String {
    format!("check:{check}")
}

/// Whether a mint's `reference` is a volunteer's check's ([`check_reference`]).
pub fn is_check_reference(reference: &str) -> bool {
    reference.starts_with("check:")
}

/// The mint for `checker`'s check leased under `check`, which matched: a check is paid
/// as the unit it re-ran, per FLOP.
pub fn check_mint(checker: WorkerId, check: u64, credit: u64) -> Draft {
    Draft::mint(checker, credit, check_reference(check))
}

/// Credit for one accepted unit: the training FLOPs the run assigned (`tokens` at the
/// model specification's `flops_per_token`), and at least one micro-credit, so that
/// every accepted update has its mint.
pub fn unit_credit(flops_per_token: u64, tokens: u64) -> u64 {
    ledger::credit_for_training(flops_per_token, tokens).max(1)
}

/// The mint for `worker`'s accepted update of `unit`.
pub fn mint(worker: WorkerId, unit: u64, credit: u64) -> Draft {
    Draft::mint(worker, credit, mint_reference(unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(flops_per_token: u64, tokens: u64, want: u64) {
        assert_eq!(
            unit_credit(flops_per_token, tokens),
            want,
            "{tokens} tokens at {flops_per_token} FLOPs"
        );
    }

    #[test]
    fn a_unit_earns_its_flops_and_never_nothing() {
        for (flops, tokens, want) in [
            // No work assigned still mints one micro-credit.
            (0, 0, 1),
            (1, 0, 1),
            // A micro-credit is 10^9 FLOPs, rounded down: 8,192 tokens through 5.3M
            // trained parameters (6 FLOPs each a token) earn 260 of them.
            (6 * 5_304_576, 8_192, 260),
            (1_000_000_000, 3, 3),
            // Saturates instead of wrapping.
            (u64::MAX, u64::MAX, u64::MAX),
        ] {
            check(flops, tokens, want);
        }
        let worker = WorkerId::of(&ed25519_dalek::SigningKey::from_bytes(&[3; 32]));
        let draft = mint(worker, 7, 5);
        assert_eq!((draft.reference.as_str(), draft.amount), ("update:7", 5));
        let draft = check_mint(worker, 9, 5);
        assert_eq!((draft.reference.as_str(), draft.amount), ("check:9", 5));
        assert!(is_check_reference(&draft.reference));
        assert!(!is_check_reference(&mint_reference(9)));
    }
}
