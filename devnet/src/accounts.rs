//! The accounts and credentials of `x402d dev`: public on purpose, so that
//! clients (the load generator, demos) can use a dev node without being
//! told them. Never use them anywhere else.

use alloy::{
    primitives::{Address, U256},
    signers::local::PrivateKeySigner,
};
use x402_wire::Requirements;

use crate::{DEV_TOKEN_NAME, DEV_TOKEN_VERSION, Payer};

/// The dev node's admin key.
pub const DEV_ADMIN_KEY: &str = "dev-admin-key-not-secret";
/// The dev merchants, one per settlement strategy, with their API keys.
pub const DEV_MERCHANTS: [(&str, &str); 3] = [
    ("demo-direct", "dev-direct-key-not-secret"),
    ("demo-batched", "dev-batched-key-not-secret"),
    ("demo-channel", "dev-channel-key-not-secret"),
];
/// Where the dev merchants are paid: anvil's well-known development
/// account 1 (mnemonic "test test … junk").
pub const DEV_PAY_TO: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
/// Test tokens minted to each dev payer: 1,000 (6 decimals).
pub const DEV_MINT: u64 = 1_000_000_000;
/// Anvil's well-known development accounts 2–4: the dev payers.
pub const DEV_PAYER_KEYS: [&str; 3] = [
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
];

/// The dev payers.
pub fn dev_payers() -> Vec<Payer> {
    DEV_PAYER_KEYS.iter().map(|k| Payer::new(k.parse().expect("the dev keys are valid"))).collect()
}

/// The dev receiver authorizer: a fixed, public key (like the other dev
/// keys), so that clients such as `x402d load` can open channels to the dev
/// merchant without asking for it.
pub fn dev_authorizer() -> PrivateKeySigner {
    PrivateKeySigner::from_bytes(&alloy::primitives::keccak256("x402d dev receiver authorizer"))
        .expect("a keccak digest is a valid secp256k1 key")
}

/// `exact` requirements of `amount` of `token` (the dev token unless a
/// test deploys another) on the local chain (`eip155:31337`), paid to
/// `pay_to`, with the dev token's EIP-712 domain.
pub fn dev_requirements(pay_to: Address, token: Address, amount: u64) -> Requirements {
    Requirements {
        scheme: "exact".into(),
        network: "eip155:31337".into(),
        amount: U256::from(amount),
        asset: token,
        pay_to,
        max_timeout_seconds: 60,
        eip712_name: DEV_TOKEN_NAME.into(),
        eip712_version: DEV_TOKEN_VERSION.into(),
    }
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
