//! Interoperability with the reference x402 packages (pinned in the root
//! `package.json`): `tests/interop/exact.mjs` runs an `@x402/express`
//! resource server whose facilitator is this x402d node, and pays it with
//! `@x402/fetch` and an `@x402/evm` exact signer, on anvil with the
//! project's token.

use std::{path::Path, process::Command};

use alloy::{
    primitives::{Address, U256},
    providers::ProviderBuilder,
    signers::local::PrivateKeySigner,
};
use serde_json::Value;
use x402_chain::{anvil::Anvil, contracts::X402TestToken, devnet};
use x402_engine::config::ChainConfig;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_express_server_and_fetch_client_pay_through_x402d() {
    let anvil = Anvil::spawn(&[]).unwrap();
    let payer = PrivateKeySigner::random();
    devnet::deploy(anvil.endpoint(), &[payer.address()], U256::from(1_000_000)).await.unwrap();
    let signer = PrivateKeySigner::random();
    devnet::fund_ether(anvil.endpoint(), &[signer.address()]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_value(dir.path());
    let mut chain = ChainConfig::with_keys(anvil.endpoint(), vec![signer.to_bytes().to_string()], None);
    chain.receipt_poll_ms = 50;
    config.chain = Some(chain);
    let node = start_node(&config).await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/exact.mjs");
    let (http, payer_key) = (node.endpoints().http, payer.to_bytes().to_string());
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .env("FACILITATOR_URL", format!("http://{http}"))
            .env("MERCHANT_KEY", M1_KEY)
            .env("PAY_TO", PAY_TO.to_string())
            .env("TOKEN", TOKEN.to_string())
            .env("PAYER_KEY", payer_key)
            .output()
            .expect("node runs (npm ci installs the reference packages)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    eprintln!("{stdout}");
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let scenario =
        |name: &str| lines.iter().find(|l| l["scenario"] == name).unwrap_or_else(|| panic!("{name}: {stdout}"));

    assert_eq!(scenario("unpaid")["status"], 402);
    let paid = scenario("paid");
    assert_eq!(paid["status"], 200);
    assert_eq!(paid["network"], NETWORK);
    assert_eq!(paid["payer"].as_str().unwrap().parse::<Address>().unwrap(), payer.address());
    // The transaction is on chain and moved the price, once: the replayed
    // signature did not pay again.
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    let tx = paid["transaction"].as_str().unwrap().parse().unwrap();
    let receipt = alloy::providers::Provider::get_transaction_receipt(&provider, tx).await.unwrap().unwrap();
    assert!(receipt.status());
    let token = X402TestToken::new(TOKEN, &provider);
    assert_eq!(token.balanceOf(PAY_TO).call().await.unwrap(), U256::from(1_000));
    assert_eq!(token.balanceOf(payer.address()).call().await.unwrap(), U256::from(1_000_000 - 1_000));
    // A replayed /settle answers the original outcome (an idempotent retry).
    let replayed = scenario("replayed");
    assert_eq!(replayed["status"], 200);
    assert_eq!(replayed["transaction"], paid["transaction"], "a replay answers the original settlement");
    let tampered = scenario("tampered");
    assert_eq!(tampered["status"], 402);
    assert_eq!(tampered["error"], "invalid_exact_evm_signature", "{stdout}");
}
