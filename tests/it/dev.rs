//! `x402d dev`: the embedded defaults on a fresh machine — a local chain
//! with the token and Multicall3, funded payers, demo merchants that take
//! payments, and a stop (clean, or SIGKILL) that takes the chain down with it.

use alloy::{
    primitives::{Address, U256},
    providers::{Provider, ProviderBuilder},
    signers::local::PrivateKeySigner,
};
use x402_chain::contracts::{MULTICALL3_ADDRESS, X402TestToken};
use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet::Payer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_a_funded_chain_and_settles_payments() {
    let mut daemon = Daemon::dev();
    let rpc = daemon.banner_value("chain").split_whitespace().next().unwrap().to_owned();
    let token: Address = daemon.banner_value("token").split_whitespace().next().unwrap().parse().unwrap();
    let payer_key = daemon.banner_value("payer key").split_whitespace().next().unwrap().to_owned();
    let merchant_key = daemon
        .banner
        .iter()
        .find(|l| l.contains("demo-direct"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .to_owned();

    // The chain has the token, Multicall3 and funded payers.
    let provider = ProviderBuilder::new().connect_http(rpc.parse().unwrap());
    assert_eq!(provider.get_chain_id().await.unwrap(), 31337);
    assert!(!provider.get_code_at(MULTICALL3_ADDRESS).await.unwrap().is_empty());
    let signer: PrivateKeySigner = payer_key.parse().unwrap();
    let balance = X402TestToken::new(token, &provider).balanceOf(signer.address()).call().await.unwrap();
    assert_eq!(balance, U256::from(1_000_000_000u64));

    // A demo merchant takes a payment from a dev payer.
    let mut client = payments(daemon.grpc, &merchant_key).await;
    let mut req = requirements(PAY_TO);
    req.asset = token;
    let payload = Payer::new(signer).sign_exact(&req, now() - 600, now() + 3600, random_nonce());
    let resp = client.submit(exact_submit(1, &req, &payload)).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");

    // ... and settles it on the chain.
    let token_contract = X402TestToken::new(token, &provider);
    let before = token_contract.balanceOf(PAY_TO).call().await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let get = pb::GetPaymentRequest { payment_id: resp.payment_id.clone() };
        let status = client.get_payment(get).await.unwrap().into_inner().status.unwrap();
        if status.state == pb::PaymentState::Confirmed as i32 {
            assert_eq!(status.transaction.len(), 32);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not confirmed in time: {status:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let paid = token_contract.balanceOf(PAY_TO).call().await.unwrap() - before;
    assert_eq!(paid, U256::from(AMOUNT));

    // The second chain: the same merchant takes a payment there, and it
    // settles there.
    let second_rpc = daemon.banner_value("chain two").split_whitespace().next().unwrap().to_owned();
    let second = ProviderBuilder::new().connect_http(second_rpc.parse().unwrap());
    assert_eq!(second.get_chain_id().await.unwrap(), 31338);
    req.network = "eip155:31338".into();
    let payload = Payer::new(payer_key.parse().unwrap()).sign_exact(&req, now() - 600, now() + 3600, random_nonce());
    let resp = client.submit(exact_submit(2, &req, &payload)).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");
    let second_token = X402TestToken::new(token, &second);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while second_token.balanceOf(PAY_TO).call().await.unwrap() != U256::from(AMOUNT) {
        assert!(tokio::time::Instant::now() < deadline, "not settled on the second chain in time");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Stopping x402d stops its chains.
    daemon.stop();
    assert!(provider.get_chain_id().await.is_err(), "anvil is gone with x402d");
    assert!(second.get_chain_id().await.is_err(), "the second anvil is gone with x402d");

    // So does killing it, when no code of x402d runs: anvil's watchdog ends it.
    let mut daemon = Daemon::dev();
    let rpc = daemon.banner_value("chain").split_whitespace().next().unwrap().to_owned();
    let provider = ProviderBuilder::new().connect_http(rpc.parse().unwrap());
    assert_eq!(provider.get_chain_id().await.unwrap(), 31337);
    let ledger = std::path::PathBuf::from(daemon.banner_value("ledger"));
    daemon.kill();
    // Its temporary ledger stays behind a SIGKILL: the test removes it.
    std::fs::remove_dir_all(&ledger).unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while provider.get_chain_id().await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "anvil outlived a SIGKILLed x402d by 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `x402d load …` is `x402d-load …`: the load generator is its own program
/// (so the server carries none of its code), found beside `x402d` first,
/// with every argument passed on as given.
#[test]
fn load_runs_the_load_generator_beside_the_binary_with_its_arguments() {
    use std::{os::unix::fs::PermissionsExt as _, process::Command};
    let dir = tempfile::tempdir().unwrap();
    let x402d = dir.path().join("x402d");
    std::fs::copy(env!("CARGO_BIN_EXE_x402d"), &x402d).unwrap();

    let run =
        || Command::new(&x402d).args(["load", "--rate", "5", "-n", "1", "--json"]).env("PATH", "").output().unwrap();
    let missing = run();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("x402d-load") && err.contains("cargo build --release -p x402-load"), "{err}");

    let fake = dir.path().join("x402d-load");
    std::fs::write(&fake, "#!/bin/sh\necho \"load generator got: $*\"\nexit 3\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let forwarded = run();
    assert_eq!(String::from_utf8_lossy(&forwarded.stdout), "load generator got: --rate 5 -n 1 --json\n");
    assert_eq!(forwarded.status.code(), Some(3), "its exit status is x402d's");
}
