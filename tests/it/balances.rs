//! Payer balances read from a real anvil chain by an `x402d` process: the
//! reservation check uses the balance on chain, and tokens the payer
//! receives count once the log follower has seen their `Transfer`.

use std::time::Duration;

use alloy::{
    network::EthereumWallet,
    primitives::{Address, U256, address},
    providers::{ProviderBuilder, ext::AnvilApi},
    signers::local::PrivateKeySigner,
};
use x402_chain::contracts::X402TestToken;
use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet as devnet;
use x402_devnet::Anvil;
use x402_devnet::Payer;

/// A batched merchant that will not settle during the test: its
/// reservations stay, so only what the chain says can make room.
const M3_KEY: &str = "test-merchant-three-key-01";
const PAY_TO_3: Address = address!("0x90F79bf6EB2c4f870365E785982E1f101E93b906");

/// A signed payment of `value` units to m3.
fn payment(payer: &Payer, value: u64, request_id: u64) -> pb::SubmitRequest {
    payment_in(TOKEN, payer, value, request_id)
}

/// [`payment`] in the token at `asset`.
fn payment_in(asset: Address, payer: &Payer, value: u64, request_id: u64) -> pb::SubmitRequest {
    let mut req = requirements(PAY_TO_3);
    req.amount = U256::from(value);
    req.asset = asset;
    let payload = payer.sign_exact(&req, now() - 600, now() + 3600, random_nonce());
    exact_submit(request_id, &req, &payload)
}

/// An `x402d` process whose merchant m3 settles on `anvil`, with `extra`
/// in its `[chain]`.
fn m3_daemon(anvil: &Anvil, signer: &PrivateKeySigner, dir: &std::path::Path, extra: &str) -> Daemon {
    let chain = ChainSection::new(anvil.endpoint(), signer, None, extra);
    let config = format!(
        r#"{}
[[merchants]]
id = "m3"
pay_to = ["{PAY_TO_3}"]
policy = {{ strategy = "batched", max_rows = 1000, max_wait_ms = 3600000 }}
api_key_env = "X402D_TEST_M3_KEY"
{}"#,
        config(dir),
        chain.toml
    );
    Daemon::start_with_env(dir, &config, &chain.env(&[("X402D_TEST_M3_KEY", M3_KEY)]))
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
    let daemon = m3_daemon(&anvil, &signer, dir.path(), "balance_ttl_secs = 3600\nbalance_poll_ms = 100\n");
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

/// A payer with code (here an EOA delegated by EIP-7702 to an address with
/// no code: the token checks its signature with ERC-1271, and nothing
/// answers) is refused as the token refuses it, however well its key signed
/// and whatever its balance, and so is a payment in an asset address that holds no contract;
/// the balance cache reads the code beside the balance, never on a shard
/// thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payers_with_code_and_assets_without_a_contract_are_refused() {
    let anvil = Anvil::spawn(&[]).unwrap();
    let (plain, delegated) = (Payer::random(), Payer::random());
    devnet::deploy(anvil.endpoint(), &[plain.address(), delegated.address()], U256::from(10u64.pow(9))).await.unwrap();
    let signer = PrivateKeySigner::random();
    devnet::fund_ether(anvil.endpoint(), &[signer.address()]).await.unwrap();
    // The EIP-7702 delegation designator: 0xef0100 ++ the delegate.
    let control = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    let designator = [&[0xef, 0x01, 0x00][..], Address::repeat_byte(0x77).as_slice()].concat();
    control.anvil_set_code(delegated.address(), designator.into()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let daemon = m3_daemon(&anvil, &signer, dir.path(), "");
    let mut m3 = payments(daemon.grpc, M3_KEY).await;

    let answer = m3.submit(payment(&delegated, 60, 1)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a payer with code was accepted");
    assert_eq!(answer.reason, "invalid_exact_evm_signature", "{}", answer.message);
    assert!(answer.message.contains("invalid signature"), "{}", answer.message);
    let plain_answer = m3.submit(payment(&plain, 60, 2)).await.unwrap().into_inner();
    assert_eq!(outcome(&plain_answer), pb::Outcome::Accepted, "{}", plain_answer.message);

    let nowhere = Address::repeat_byte(0x42);
    let answer = m3.submit(payment_in(nowhere, &plain, 60, 3)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a payment in no token was accepted");
    assert_eq!(answer.reason, "invalid_network", "{}", answer.message);
    assert!(answer.message.contains("no contract"), "{}", answer.message);
}
