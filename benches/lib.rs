//! Shared fixtures of the x402d benchmarks: signed payments made before
//! timing starts, and an engine configuration for them.

use alloy::primitives::{Address, B256, address};
use x402_devnet::Payer;
use x402_engine::domain::{AcceptedAsset, Merchant, PaymentInput, Requirements, SettlementPolicy, Submission};

pub const PAY_TO: Address = address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8");
pub const TOKEN: Address = x402_devnet::DEV_TOKEN_ADDRESS;
pub const MERCHANT_KEY: &str = "bench-merchant-key-0123456789";

pub use x402_devnet::unix_now as now;

/// `exact` requirements of 10,000 of the dev token, paid to [`PAY_TO`].
pub fn requirements() -> Requirements {
    x402_devnet::dev_requirements(PAY_TO, TOKEN, 10_000)
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
