//! The engine's verification agrees with a real EIP-3009 token on a real
//! anvil chain: what x402d accepts settles, what it rejects for its
//! signature the token refuses too.

use alloy::{
    primitives::{Bytes, U256},
    providers::ProviderBuilder,
    signers::local::PrivateKeySigner,
};
use x402_chain::contracts::X402TestToken;
use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet::Anvil;
use x402_devnet::Payer;

/// Anvil's funded development account 0 (public test key).
const DEPLOYER_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_payments_settle_on_a_real_token() {
    let anvil = Anvil::spawn(&[]).expect("anvil starts");
    let deployer: PrivateKeySigner = DEPLOYER_KEY.parse().unwrap();
    let provider = ProviderBuilder::new().wallet(deployer).connect_http(anvil.endpoint().parse().unwrap());
    let token = X402TestToken::deploy(&provider, "USD Coin".into(), "2".into()).await.expect("token deploys");
    assert_eq!(*token.address(), TOKEN, "first deployment of account 0 lands at the well-known address");

    let payer = Payer::random();
    token.mint(payer.address(), U256::from(1_000_000)).send().await.unwrap().get_receipt().await.unwrap();

    // x402d accepts the payment ...
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&config_value(dir.path())).await;
    let mut m1 = payments(node.endpoints().grpc, M1_KEY).await;
    let req = requirements(PAY_TO);
    let payload = payer.sign_exact(&req, now() - 600, now() + 3600, random_nonce());
    let submit = exact_submit(1, &req, &payload);
    let resp = m1.submit(submit).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");

    // ... and the token settles exactly that authorization.
    let a = &payload.authorization;
    let receipt = token
        .transferWithAuthorization_0(
            a.from,
            a.to,
            a.value,
            a.valid_after,
            a.valid_before,
            a.nonce,
            Bytes::from(payload.signature.clone()),
        )
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(receipt.status(), "transferWithAuthorization succeeded");
    assert_eq!(token.balanceOf(PAY_TO).call().await.unwrap(), U256::from(AMOUNT));
    assert_eq!(token.balanceOf(payer.address()).call().await.unwrap(), U256::from(1_000_000 - AMOUNT));
    assert!(token.authorizationState(a.from, a.nonce).call().await.unwrap());

    // The malleated twin of a fresh signature (high s): x402d rejects it, and
    // so does the token, so an accepted payment can never fail on chain for it.
    let fresh = payer.sign_exact(&req, now() - 600, now() + 3600, random_nonce());
    let mut high = fresh.signature.clone();
    let n = U256::from_be_bytes(alloy::primitives::hex!(
        "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141"
    ));
    let s = U256::from_be_slice(&high[32..64]);
    high[32..64].copy_from_slice(&(n - s).to_be_bytes::<32>());
    high[64] = if high[64] == 27 { 28 } else { 27 };
    let mut malleated = fresh.clone();
    malleated.signature = high.clone();
    let resp = m1.submit(exact_submit(2, &req, &malleated)).await.unwrap().into_inner();
    assert_eq!(resp.reason, "invalid_exact_evm_signature", "{resp:?}");
    let f = &fresh.authorization;
    let call = token.transferWithAuthorization_0(
        f.from,
        f.to,
        f.value,
        f.valid_after,
        f.valid_before,
        f.nonce,
        Bytes::from(high),
    );
    let Err(err) = call.call().await else { panic!("the token refuses a high-s signature") };
    assert!(err.to_string().contains("invalid signature"), "{err}");
}

/// The RPC URL often holds the provider's API key: no error shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_never_show_the_rpc_url() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_value(dir.path());
    config.chain = Some(x402_engine::config::ChainConfig::with_keys(
        "http://127.0.0.1:1/v3/secret-api-key-0123",
        vec![alloy::signers::local::PrivateKeySigner::random().to_bytes().to_string()],
        None,
    ));
    let Err(err) = x402_engine::node::Node::start(&config).await else { panic!("no node answers there") };
    // What logs and answers show: the error and its causes, displayed.
    let mut shown = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        shown = format!("{shown}: {cause}");
        source = cause.source();
    }
    assert!(!shown.contains("secret-api-key"), "{shown}");
}
