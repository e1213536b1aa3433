//! The x402 facilitator HTTP API of an x402d node settling on anvil, called
//! as the reference resource server calls it: `/supported`, `/verify`,
//! `/settle` with x402 v2 JSON bodies.

use std::time::Duration;

use alloy::{
    primitives::{Address, B256, U256},
    providers::ProviderBuilder,
    signers::local::PrivateKeySigner,
};
use serde_json::{Value, json};
use x402_chain::{anvil::Anvil, contracts::X402TestToken, devnet};
use x402_engine::{
    config::{ChainConfig, PolicyConfig},
    facilitator::exact_request_json as body,
    node::Node,
    payer::Payer,
};

use crate::common::*;

struct Setup {
    anvil: Anvil,
    _dir: tempfile::TempDir,
    node: Node,
    payer: Payer,
    signer: Address,
    http: reqwest::Client,
}

impl Setup {
    async fn new(settle_wait_ms: u64) -> Self {
        let anvil = Anvil::spawn(&[]).unwrap();
        let payer = Payer::random();
        devnet::deploy(anvil.endpoint(), &[payer.address()], U256::from(1_000_000)).await.unwrap();
        let signer = PrivateKeySigner::random();
        devnet::fund_ether(anvil.endpoint(), &[signer.address()]).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_value(dir.path());
        // m2 batches: a settle waits for its batch, at most 1.5 s.
        config.merchants[1].policy = PolicyConfig::Batched { max_rows: 100, max_wait_ms: 1_500 };
        let mut chain = ChainConfig::with_keys(anvil.endpoint(), vec![signer.to_bytes().to_string()], None);
        chain.receipt_poll_ms = 50;
        config.chain = Some(chain);
        config.facilitator.settle_wait_ms = settle_wait_ms;
        let node = start_node(&config).await;
        Self { anvil, _dir: dir, node, payer, signer: signer.address(), http: reqwest::Client::new() }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.node.endpoints().http)
    }

    async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        let mut req = self.http.post(self.url(path)).json(body);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    async fn balance(&self, owner: Address) -> U256 {
        let provider = ProviderBuilder::new().connect_http(self.anvil.endpoint().parse().unwrap());
        X402TestToken::new(TOKEN, &provider).balanceOf(owner).call().await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_settle_and_supported_follow_the_x402_facilitator_api() {
    let s = Setup::new(30_000).await;

    let supported: Value = s.http.get(s.url("/supported")).send().await.unwrap().json().await.unwrap();
    assert_eq!(supported["kinds"][0], json!({"x402Version": 2, "scheme": "exact", "network": "eip155:31337"}));
    assert_eq!(supported["signers"]["eip155:*"], json!([s.signer.to_string()]));

    let req = requirements(PAY_TO);
    let payload = s.payer.sign_exact(&req, now() - 600, now() + 600, random_nonce());
    let (status, _) = s.post("/verify", None, &body(&req, &payload)).await;
    assert_eq!(status, 401, "a merchant key is required");

    // /verify checks and changes nothing.
    let (status, verified) = s.post("/verify", Some(M1_KEY), &body(&req, &payload)).await;
    assert_eq!(status, 200);
    assert_eq!(verified, json!({"isValid": true, "payer": s.payer.address().to_string()}));
    let (_, again) = s.post("/verify", Some(M1_KEY), &body(&req, &payload)).await;
    assert_eq!(again["isValid"], true, "verifying twice reserves nothing");

    // A tampered amount: a business failure, HTTP 200 with the reason.
    let mut tampered = body(&req, &payload);
    tampered["paymentPayload"]["payload"]["authorization"]["value"] = json!("999");
    let (status, invalid) = s.post("/verify", Some(M1_KEY), &tampered).await;
    assert_eq!(status, 200);
    assert_eq!(invalid["isValid"], false);
    assert_eq!(invalid["invalidReason"], "invalid_exact_evm_signature");

    // /settle records it and answers once it is on chain.
    let before = s.balance(PAY_TO).await;
    let (status, settled) = s.post("/settle", Some(M1_KEY), &body(&req, &payload)).await;
    assert_eq!(status, 200);
    assert_eq!(settled["success"], true, "{settled}");
    assert_eq!(settled["network"], NETWORK);
    assert_eq!(settled["payer"], s.payer.address().to_string());
    let tx: B256 = settled["transaction"].as_str().unwrap().parse().unwrap();
    assert_eq!(s.balance(PAY_TO).await, before + U256::from(AMOUNT));

    // A replay pays nothing more and answers the original outcome.
    let (_, replayed) = s.post("/settle", Some(M1_KEY), &body(&req, &payload)).await;
    assert_eq!(replayed["success"], true);
    assert_eq!(replayed["transaction"], tx.to_string());
    assert_eq!(s.balance(PAY_TO).await, before + U256::from(AMOUNT));
    // The same nonce with other terms is refused.
    let other = s.payer.sign_exact(&req, now() - 600, now() + 500, payload.authorization.nonce);
    let (_, refused) = s.post("/settle", Some(M1_KEY), &body(&req, &other)).await;
    assert_eq!(refused["success"], false);
    assert_eq!(refused["errorReason"], "invalid_exact_evm_nonce_already_used");
    assert_eq!(refused["transaction"], "");
    assert_eq!(refused["network"], NETWORK);

    // Malformed bodies are HTTP errors, not business failures.
    let (status, error) = s.post("/settle", Some(M1_KEY), &json!({"x402Version": 2})).await;
    assert_eq!(status, 422, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_that_cannot_finish_in_time_is_pending_and_settles_later() {
    // Waits 200 ms; m2's batch goes out after 1.5 s.
    let s = Setup::new(200).await;
    let req = requirements(PAY_TO_2);
    let payload = s.payer.sign_exact(&req, now() - 600, now() + 600, random_nonce());
    let (status, pending) = s.post("/settle", Some(M2_KEY), &body(&req, &payload)).await;
    assert_eq!(status, 200);
    assert_eq!(pending["success"], false);
    assert_eq!(pending["errorReason"], "settlement_pending", "{pending}");
    assert_eq!(pending["network"], NETWORK);

    // The reference server retries once; by then (or a little later) the
    // batch is mined and the same request answers with it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let done = loop {
        let (_, answer) = s.post("/settle", Some(M2_KEY), &body(&req, &payload)).await;
        if answer["success"] == true {
            break answer;
        }
        assert_eq!(answer["errorReason"], "settlement_pending", "{answer}");
        assert!(tokio::time::Instant::now() < deadline, "never settled");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(done["transaction"].as_str().unwrap().len(), 66);
    assert_eq!(s.balance(PAY_TO_2).await, U256::from(AMOUNT));
}
