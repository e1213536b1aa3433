//! Payers with code against all-EOA traffic, on a local anvil: the whole
//! pipeline in process (RocksDB, fsync'd group commit), with balances and
//! code read from the chain (cached) and the signatures of contract wallets
//! proved on chain in batches (`ChainSignatures`: one `eth_call` of the
//! signature probe runs many payments' transfers, each alone). Pre-signed payments, 4,096 in
//! flight: all-EOA, then one in ten from ERC-1271 contract wallets.
//!
//! Printed: the throughput of each run, the proof `eth_call`s per
//! contract-wallet payment, and the calls taken by 100 contract payments
//! arriving at once. Nothing settles (no settler runs), so the chain is
//! asked only for balances, code and proofs; every payer pays once before
//! timing starts, so its balance and code are cached.
//!
//! `cargo bench --workspace --bench wallets` (needs anvil: `npm ci`).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use alloy::{
    network::EthereumWallet,
    primitives::{Address, B256, U256},
    providers::ProviderBuilder,
    signers::local::PrivateKeySigner,
};
use x402_benches::{merchant, now, requirements};
use x402_chain::{
    AlloyChain, TxConfig,
    contracts::{X402TestToken, X402TestWallet},
};
use x402_devnet::{Anvil, Payer};
use x402_engine::{
    balance::{BalanceSource, ChainBalances, ChainBalancesConfig},
    domain::{PaymentInput, Submission},
    ledger::{Ledger, RocksLedger, RocksOptions},
    pipeline::{Pipeline, PipelineConfig, SubmitOutcome},
    signature::{ChainSignatures, ChainSignaturesConfig},
};

const PAYERS: usize = 100;
const WALLETS: usize = 100;
const PAYMENTS: usize = 20_480;
const IN_FLIGHT: usize = 4096;

/// A payer: an EOA paying for itself, or a wallet its owner signs for.
struct From {
    key: Payer,
    address: Address,
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run());
}

async fn run() {
    let anvil = Anvil::spawn(&[]).expect("anvil (npm ci)");
    let eoas: Vec<From> =
        (0..PAYERS).map(|_| Payer::random()).map(|key| From { address: key.address(), key }).collect();
    let addresses: Vec<Address> = eoas.iter().map(|p| p.address).collect();
    x402_devnet::deploy(anvil.endpoint(), &addresses, U256::from(10u64.pow(15))).await.unwrap();
    let deployer: PrivateKeySigner = x402_devnet::DEV_DEPLOYER_KEY.parse().unwrap();
    let provider =
        ProviderBuilder::new().wallet(EthereumWallet::from(deployer)).connect_http(anvil.endpoint().parse().unwrap());
    let token = X402TestToken::new(x402_benches::TOKEN, &provider);
    let mut wallets = Vec::with_capacity(WALLETS);
    for n in 0..WALLETS {
        let key = Payer::random();
        let address = *X402TestWallet::deploy(&provider, key.address()).await.unwrap().address();
        token.mint(address, U256::from(10u64.pow(15))).send().await.unwrap().get_receipt().await.unwrap();
        wallets.push(From { key, address });
        if n % 25 == 24 {
            eprintln!("deployed {} contract wallets", n + 1);
        }
    }
    let chain = Arc::new(AlloyChain::connect(anvil.endpoint(), Vec::new(), TxConfig::default()).await.unwrap());
    let balances: Arc<dyn BalanceSource> = Arc::new(ChainBalances::new(
        chain.clone(),
        ChainBalancesConfig { ttl: std::time::Duration::from_secs(3600), ..ChainBalancesConfig::default() },
    ));
    let signatures = Arc::new(ChainSignatures::new(chain, ChainSignaturesConfig::default()));
    let dir = tempfile::tempdir().unwrap();
    let ledger: Arc<dyn Ledger> = Arc::new(RocksLedger::open(dir.path(), RocksOptions { sync: true }).unwrap());
    let config = PipelineConfig {
        signatures: signatures.clone(),
        settled_chains: Some(vec![31337]),
        ..PipelineConfig::default()
    };
    let pipeline = Pipeline::start(&config, &ledger, &balances).unwrap();
    let calls = || signatures.stats().calls.load(Ordering::Relaxed);

    // Every payer once: balances and code cached before timing.
    let everyone: Vec<&From> = eoas.iter().chain(&wallets).collect();
    submit_all(&pipeline, sign(&everyone, everyone.len())).await;

    let all_eoa: Vec<&From> = eoas.iter().collect();
    let eoa_run = sign(&all_eoa, PAYMENTS);
    let started = Instant::now();
    submit_all(&pipeline, eoa_run).await;
    let eoa_secs = started.elapsed().as_secs_f64();

    // One payment in ten from a contract wallet (ten wallets).
    let mixed: Vec<&From> = (0..PAYERS).map(|i| if i % 10 == 9 { &wallets[i] } else { &eoas[i] }).collect();
    let mixed_run = sign(&mixed, PAYMENTS);
    let (before, started) = (calls(), Instant::now());
    submit_all(&pipeline, mixed_run).await;
    let (mixed_secs, mixed_calls) = (started.elapsed().as_secs_f64(), calls() - before);
    let contract_payments = PAYMENTS / 10;

    // A hundred contract payments at once, one per wallet.
    let burst: Vec<&From> = wallets.iter().collect();
    let before = calls();
    submit_all(&pipeline, sign(&burst, WALLETS)).await;
    let burst_calls = calls() - before;

    println!("| run | payments | throughput | proof calls |");
    println!("| --- | --- | --- | --- |");
    println!("| all EOA | {PAYMENTS} | {:.0}/s | 0 |", PAYMENTS as f64 / eoa_secs);
    println!(
        "| 10% contract wallets | {PAYMENTS} ({contract_payments} contract) | {:.0}/s | {mixed_calls} ({:.4} per contract payment) |",
        PAYMENTS as f64 / mixed_secs,
        mixed_calls as f64 / contract_payments as f64
    );
    println!(
        "| {WALLETS} contract wallets at once | {WALLETS} | - | {burst_calls} ({:.3} per payment) |",
        burst_calls as f64 / WALLETS as f64
    );
    pipeline.shutdown();
}

/// `n` payments from `from`, round robin, each with a fresh nonce.
fn sign(from: &[&From], n: usize) -> Vec<Submission> {
    let req = requirements();
    let (after, before) = (now() - 600, now() + 3600);
    (0..n)
        .map(|i| {
            let p = from[i % from.len()];
            let payload = p.key.sign_exact_from(p.address, &req, after, before, nonce());
            Submission::new(req.clone(), PaymentInput::Exact(payload))
        })
        .collect()
}

/// A nonce never used before in this process.
fn nonce() -> B256 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    alloy::primitives::keccak256([n.to_be_bytes(), now().to_be_bytes()].concat())
}

/// Submits `submissions`, `IN_FLIGHT` at a time; every one must be accepted.
async fn submit_all(pipeline: &Pipeline, submissions: Vec<Submission>) {
    let merchant = Arc::new(merchant());
    for window in submissions.chunks(IN_FLIGHT) {
        let receivers: Vec<_> = window
            .iter()
            .map(|s| pipeline.try_submit(merchant.clone(), s.clone()).expect("the queue holds a window"))
            .collect();
        for rx in receivers {
            let outcome = rx.await.unwrap();
            assert!(matches!(outcome, SubmitOutcome::Accepted { .. }), "{outcome:?}");
        }
    }
}
