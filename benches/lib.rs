//! Shared fixtures of the x402d benchmarks: signed payments made before
//! timing starts, and an engine configuration for them.

use alloy::primitives::{Address, B256, U256, address};
use x402_devnet::Payer;
use x402_engine::domain::{AcceptedAsset, Merchant, PaymentInput, Requirements, SettlementPolicy, Submission};

pub const PAY_TO: Address = address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8");
pub const TOKEN: Address = address!("0x5FbDB2315678afecb367f032d93F642f64180aa3");
pub const MERCHANT_KEY: &str = "bench-merchant-key-0123456789";

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

pub fn requirements() -> Requirements {
    Requirements {
        scheme: "exact".into(),
        network: "eip155:31337".into(),
        amount: U256::from(10_000),
        asset: TOKEN,
        pay_to: PAY_TO,
        max_timeout_seconds: 60,
        eip712_name: "USD Coin".into(),
        eip712_version: "2".into(),
    }
}

pub fn merchant() -> Merchant {
    Merchant {
        id: "bench".into(),
        number: 1,
        pay_to: vec![PAY_TO],
        assets: vec![AcceptedAsset { chain_id: 31337, asset: TOKEN }],
        policy: SettlementPolicy::Direct,
        api_key_sha256: None,
        updated_at_ms: 0,
    }
}

/// `n` distinct valid payments from `payers` keys, round robin.
pub fn signed_submissions(payers: &[Payer], n: usize) -> Vec<Submission> {
    let req = requirements();
    let (after, before) = (now() - 600, now() + 3600);
    (0..n)
        .map(|i| {
            let nonce = B256::from(rand_bytes());
            let payload = payers[i % payers.len()].sign_exact(&req, after, before, nonce);
            Submission::new(req.clone(), PaymentInput::Exact(payload))
        })
        .collect()
}

fn rand_bytes() -> [u8; 32] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = [0u8; 32];
    out[..8].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    out[8..16].copy_from_slice(&now().to_be_bytes());
    out[16..24].copy_from_slice(&std::process::id().to_be_bytes().repeat(2));
    out
}
