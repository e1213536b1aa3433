//! Settlement: taking queued payments on chain by their merchant's strategy.
//!
//! [`DirectSettler`] settles `direct` payments, one `transferWithAuthorization`
//! transaction each, earliest deadline first. Every step is recorded through
//! the pipeline's committer before the next one: the transaction intent (with
//! its signed bytes) and `Submitted` before the broadcast, then `Confirmed`,
//! `Failed` or `Expired` with the receipt.

mod direct;

pub use direct::{DirectSettler, SettlerConfig};

use crate::reason::Reason;

/// The reason for a failure no more specific reason explains.
pub(crate) const SIMULATION_FAILED: &str = "invalid_exact_evm_transaction_simulation_failed";

/// The x402 reason for a token revert message (the FiatToken v2 strings the
/// test token shares with USDC).
pub(crate) fn classify_revert(message: &str) -> &'static str {
    let m = message.to_lowercase();
    if m.contains("exceeds balance") {
        Reason::InsufficientBalance.code()
    } else if m.contains("used or canceled") || m.contains("used or cancelled") {
        Reason::NonceAlreadyUsed.code()
    } else if m.contains("expired") {
        Reason::ValidBefore.code()
    } else if m.contains("not yet valid") {
        Reason::ValidAfter.code()
    } else if m.contains("invalid signature") {
        Reason::Signature.code()
    } else {
        SIMULATION_FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverts_map_to_x402_reasons() {
        assert_eq!(
            classify_revert("execution reverted: ERC20: transfer amount exceeds balance"),
            "invalid_exact_evm_insufficient_balance"
        );
        assert_eq!(
            classify_revert("execution reverted: FiatTokenV2: authorization is used or canceled"),
            "invalid_exact_evm_nonce_already_used"
        );
        assert_eq!(
            classify_revert("execution reverted: FiatTokenV2: authorization is expired"),
            "invalid_exact_evm_payload_authorization_valid_before"
        );
        assert_eq!(classify_revert("out of gas"), "invalid_exact_evm_transaction_simulation_failed");
    }
}
