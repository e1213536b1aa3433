//! Payer balances read from a real anvil chain by an `x402d` process: the
//! reservation check uses the balance on chain, and tokens the payer
//! receives count once the log follower has seen their `Transfer`.

use std::time::Duration;

use alloy::{
    network::EthereumWallet,
    primitives::{Address, U256, address},
    providers::ProviderBuilder,
    signers::local::PrivateKeySigner,
};
use x402_chain::{anvil::Anvil, contracts::X402TestToken, devnet};
use x402_engine::payer::Payer;
use x402_proto::v1 as pb;

use crate::common::*;

/// A batched merchant that will not settle during the test: its
/// reservations stay, so only what the chain says can make room.
const M3_KEY: &str = "test-merchant-three-key-01";
const PAY_TO_3: Address = address!("0x90F79bf6EB2c4f870365E785982E1f101E93b906");

/// A signed payment of `value` units to m3.
fn payment(payer: &Payer, value: u64, request_id: u64) -> pb::SubmitRequest {
    let mut req = requirements(PAY_TO_3);
    req.amount = U256::from(value);
    let payload = payer.sign_exact(&req, now() - 600, now() + 3600, random_nonce());
    exact_submit(request_id, &req, &payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reservation_check_uses_the_balance_on_chain_and_follows_transfers() {
    let anvil = Anvil::spawn(&[]).unwrap();
    let payer = Payer::random();
    devnet::deploy(anvil.endpoint(), &[payer.address()], U256::from(100)).await.unwrap();
    let signer = PrivateKeySigner::random();
    devnet::fund_ether(anvil.endpoint(), &[signer.address()]).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    // A TTL far beyond the test: only the log follower can refresh a balance.
    let chain = ChainSection::new(anvil.endpoint(), &signer, None, "balance_ttl_secs = 3600\nbalance_poll_ms = 100\n");
    let config = format!(
        r#"{}
[[merchants]]
id = "m3"
pay_to = ["{PAY_TO_3}"]
policy = {{ strategy = "batched", max_rows = 1000, max_wait_ms = 3600000 }}
api_key_env = "X402D_TEST_M3_KEY"
{}"#,
        config(dir.path()),
        chain.toml
    );
    let env = chain.env(&[("X402D_TEST_M3_KEY", M3_KEY)]);
    let daemon = Daemon::start_with_env(dir.path(), &config, &env);
    let mut m3 = payments(daemon.grpc, M3_KEY).await;

    // 100 on chain: 60 fits, another 60 on top of it does not.
    let first = m3.submit(payment(&payer, 60, 1)).await.unwrap().into_inner();
    assert_eq!(outcome(&first), pb::Outcome::Accepted, "{}", first.message);
    let second = m3.submit(payment(&payer, 60, 2)).await.unwrap().into_inner();
    assert_eq!(outcome(&second), pb::Outcome::Rejected);
    assert_eq!(second.reason, "invalid_exact_evm_insufficient_balance", "{}", second.message);

    // The payer receives 100 more on chain.
    let minter: PrivateKeySigner = devnet::DEV_DEPLOYER_KEY.parse().unwrap();
    let wallet =
        ProviderBuilder::new().wallet(EthereumWallet::from(minter)).connect_http(anvil.endpoint().parse().unwrap());
    let minted = X402TestToken::new(TOKEN, &wallet)
        .mint(payer.address(), U256::from(100))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(minted.status());

    // Once the follower has seen the mint, 60 more fit on top of the 60
    // still reserved. A refused attempt reserves nothing, so trying again is
    // harmless.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for request_id in 3.. {
        let third = m3.submit(payment(&payer, 60, request_id)).await.unwrap().into_inner();
        if outcome(&third) == pb::Outcome::Accepted {
            break;
        }
        assert_eq!(third.reason, "invalid_exact_evm_insufficient_balance", "{}", third.message);
        assert!(tokio::time::Instant::now() < deadline, "the mint never counted: {}", third.message);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
