//! Bindings of the contracts in `chain/contracts/`, generated from the
//! committed artifacts (`chain/contracts/out/*.json`, built offline by
//! `npm run compile-contracts`).

#![allow(missing_docs, clippy::too_many_arguments)]

use alloy::{primitives::Address, sol};

sol!(
    /// The EIP-3009 / EIP-2612 test token (USDC-like, 6 decimals).
    #[allow(missing_debug_implementations, unreachable_pub)]
    #[sol(rpc)]
    X402TestToken,
    "contracts/out/X402TestToken.json"
);

sol!(
    /// Multicall3-compatible `aggregate3`.
    #[allow(missing_debug_implementations, unreachable_pub)]
    #[sol(rpc)]
    Multicall3,
    "contracts/out/Multicall3.json"
);

sol!(
    /// The x402 `batch-settlement` payment-channel contract.
    #[allow(missing_debug_implementations, unreachable_pub)]
    #[derive(Debug, PartialEq, Eq)]
    #[sol(rpc)]
    X402BatchSettlement,
    "contracts/out/X402BatchSettlement.json"
);

sol!(
    /// The ERC-3009 deposit collector of [`X402BatchSettlement`].
    #[allow(missing_debug_implementations, unreachable_pub)]
    #[sol(rpc)]
    ERC3009DepositCollector,
    "contracts/out/ERC3009DepositCollector.json"
);

sol!(
    /// Runs many signature checks in one `eth_call`, each alone with its own
    /// gas allowance; placed by a state override, never deployed.
    #[allow(missing_debug_implementations, unreachable_pub)]
    #[derive(Debug, PartialEq, Eq)]
    X402SignatureProbe,
    "contracts/out/X402SignatureProbe.json"
);

sol!(
    /// An ERC-1271 contract wallet owned by one EOA (tests).
    #[allow(missing_debug_implementations, unreachable_pub)]
    #[sol(rpc)]
    X402TestWallet,
    "contracts/out/X402TestWallet.json"
);

sol!(
    /// A CREATE2 factory of [`X402TestWallet`]s, for counterfactual
    /// (ERC-6492) wallets (tests).
    #[allow(missing_debug_implementations, unreachable_pub)]
    #[sol(rpc)]
    X402TestWalletFactory,
    "contracts/out/X402TestWalletFactory.json"
);

sol!(
    /// Code an EOA delegates to by EIP-7702, approving signatures by its own
    /// key (tests).
    #[allow(missing_debug_implementations, unreachable_pub)]
    #[sol(rpc)]
    X402TestDelegate,
    "contracts/out/X402TestDelegate.json"
);

sol!(
    /// A hostile wallet whose `isValidSignature` runs out of gas (tests).
    #[allow(missing_debug_implementations, unreachable_pub)]
    #[sol(rpc)]
    X402TestGasBurner,
    "contracts/out/X402TestGasBurner.json"
);

sol!(
    /// A hostile delegate that approves in simulations and burns its gas in
    /// paid transactions (tests).
    #[allow(missing_debug_implementations, unreachable_pub)]
    #[sol(rpc)]
    X402TestPricedBurner,
    "contracts/out/X402TestPricedBurner.json"
);

/// The public `batch-settlement` contract's address; `x402d dev` puts ours
/// there too, so clients built for the public deployment work unchanged.
pub const BATCH_SETTLEMENT_ADDRESS: Address = alloy::primitives::address!("0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003");
/// The public ERC-3009 deposit collector's address; `x402d dev` puts ours
/// there, bound to [`BATCH_SETTLEMENT_ADDRESS`].
pub const ERC3009_DEPOSIT_COLLECTOR_ADDRESS: Address =
    alloy::primitives::address!("0x4020806089470a89826cB9fB1f4059150b550004");

impl From<X402BatchSettlement::ChannelConfig> for x402_channel::ChannelConfig {
    fn from(c: X402BatchSettlement::ChannelConfig) -> Self {
        Self {
            payer: c.payer,
            payerAuthorizer: c.payerAuthorizer,
            receiver: c.receiver,
            receiverAuthorizer: c.receiverAuthorizer,
            token: c.token,
            withdrawDelay: c.withdrawDelay,
            salt: c.salt,
        }
    }
}

impl From<x402_channel::ChannelConfig> for X402BatchSettlement::ChannelConfig {
    fn from(c: x402_channel::ChannelConfig) -> Self {
        Self {
            payer: c.payer,
            payerAuthorizer: c.payerAuthorizer,
            receiver: c.receiver,
            receiverAuthorizer: c.receiverAuthorizer,
            token: c.token,
            withdrawDelay: c.withdrawDelay,
            salt: c.salt,
        }
    }
}

/// Multicall3's address on public chains; `x402d dev` puts it there too.
pub const MULTICALL3_ADDRESS: Address = alloy::primitives::address!("0xcA11bde05977b3631167028862bE2a173976CA11");

#[cfg(test)]
mod tests {
    use std::path::Path;

    use alloy::primitives::hex;

    /// Each artifact records the SHA-256 of the source it was built from; a
    /// source edited without `npm run compile-contracts` fails here. A
    /// source may hold several contracts, each with its artifact.
    #[test]
    fn artifacts_match_their_sources() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts");
        let sources: Vec<String> = std::fs::read_dir(root.join("src"))
            .unwrap()
            .map(|entry| hex::encode(sha256(&std::fs::read(entry.unwrap().path()).unwrap())))
            .collect();
        let mut built = std::collections::HashSet::new();
        for entry in std::fs::read_dir(root.join("out")).unwrap() {
            let path = entry.unwrap().path();
            let artifact: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let hash = artifact["sourceHash"].as_str().unwrap().to_owned();
            assert!(
                sources.contains(&hash),
                "{} was built from a source that has changed since: run `npm run compile-contracts`",
                path.display()
            );
            built.insert(hash);
        }
        assert_eq!(built.len(), sources.len(), "a source has no artifact: run `npm run compile-contracts`");
        assert!(built.len() >= 5);
    }

    fn sha256(data: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(data).into()
    }
}
