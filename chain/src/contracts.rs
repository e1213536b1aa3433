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

/// Multicall3's address on public chains; `x402d dev` puts it there too.
pub const MULTICALL3_ADDRESS: Address = alloy::primitives::address!("0xcA11bde05977b3631167028862bE2a173976CA11");

#[cfg(test)]
mod tests {
    use std::path::Path;

    use alloy::primitives::hex;

    /// Each artifact records the SHA-256 of the source it was built from; a
    /// source edited without `npm run compile-contracts` fails here.
    #[test]
    fn artifacts_match_their_sources() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts");
        let mut checked = 0;
        for entry in std::fs::read_dir(root.join("src")).unwrap() {
            let path = entry.unwrap().path();
            let source = std::fs::read(&path).unwrap();
            let hash = hex::encode(sha256(&source));
            let name = path.file_stem().unwrap().to_str().unwrap();
            let artifact: serde_json::Value =
                serde_json::from_slice(&std::fs::read(root.join("out").join(format!("{name}.json"))).unwrap()).unwrap();
            assert_eq!(
                artifact["sourceHash"].as_str().unwrap(),
                hash,
                "{name}.sol changed since it was compiled: run `npm run compile-contracts`"
            );
            checked += 1;
        }
        assert!(checked >= 2);
    }

    fn sha256(data: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(data).into()
    }
}
