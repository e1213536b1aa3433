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
use x402_chain::contracts::X402TestToken;
use x402_engine::{
    config::{AssetConfig, ChainConfig, Config, PolicyConfig},
    domain::{ExactPayload, Requirements},
    facilitator::exact_request_json as body,
    node::Node,
};

use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet as devnet;
use x402_devnet::Anvil;
use x402_devnet::Payer;

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
        Self::on(settle_wait_ms, &[]).await
    }

    /// [`Setup::new`] on an anvil started with `anvil_args`.
    async fn on(settle_wait_ms: u64, anvil_args: &[&str]) -> Self {
        Self::with(settle_wait_ms, anvil_args, |_| {}).await
    }

    /// [`Setup::on`] with the node's config changed by `adjust`.
    async fn with(settle_wait_ms: u64, anvil_args: &[&str], adjust: impl FnOnce(&mut Config)) -> Self {
        let anvil = Anvil::spawn(anvil_args).unwrap();
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
        adjust(&mut config);
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
    assert_ne!(tx, B256::ZERO);
    assert_eq!(s.balance(PAY_TO).await, before + U256::from(AMOUNT));

    // A replay is refused, by /verify and by /settle: the payment is
    // already paid for and must not be served again.
    let (_, reverified) = s.post("/verify", Some(M1_KEY), &body(&req, &payload)).await;
    assert_eq!(reverified["isValid"], false, "{reverified}");
    assert_eq!(reverified["invalidReason"], "invalid_exact_evm_nonce_already_used");
    let (_, replayed) = s.post("/settle", Some(M1_KEY), &body(&req, &payload)).await;
    assert_eq!(replayed["success"], false, "{replayed}");
    assert_eq!(replayed["errorReason"], "invalid_exact_evm_nonce_already_used");
    assert_eq!(replayed["transaction"], "");
    assert_eq!(replayed["network"], NETWORK);
    assert_eq!(s.balance(PAY_TO).await, before + U256::from(AMOUNT));
    // Another merchant replaying it learns nothing of it either.
    let (_, foreign) = s.post("/verify", Some(M2_KEY), &body(&req, &payload)).await;
    assert_eq!(foreign["isValid"], false, "{foreign}");
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
    // Waits 1 s, on a chain that mines nothing until the test says so; m2
    // batches for 4 s.
    let s = Setup::with(1_000, &[], |config| {
        config.merchants[1].policy = PolicyConfig::Batched { max_rows: 100, max_wait_ms: 4_000 };
    })
    .await;
    {
        use alloy::providers::ext::AnvilApi;
        let control = ProviderBuilder::new().connect_http(s.anvil.endpoint().parse().unwrap());
        control.anvil_set_auto_mine(false).await.unwrap();
    }
    let settle = |key: &'static str, req: Requirements, payload: ExactPayload| {
        let s = &s;
        async move { s.post("/settle", Some(key), &body(&req, &payload)).await.1 }
    };
    let pending_tx = |answer: &Value| {
        assert_eq!(answer["success"], false, "{answer}");
        assert_eq!(answer["errorReason"], "settlement_pending", "{answer}");
        assert_eq!(answer["network"], NETWORK);
        answer["transaction"].as_str().unwrap().to_owned()
    };

    // m1 settles directly: broadcast at once, not mined, so
    // the answer is pending with the transaction. The reference server then
    // retries once with the same body; that retry waits for the outcome
    // again, and any further /settle of it is a replay.
    let direct = requirements(PAY_TO);
    let paid = s.payer.sign_exact(&direct, now() - 600, now() + 600, random_nonce());
    let tx = pending_tx(&settle(M1_KEY, direct.clone(), paid.clone()).await);
    assert_eq!(tx.len(), 66, "the pending answer names the transaction");
    let retried = settle(M1_KEY, direct.clone(), paid.clone()).await;
    assert_eq!(pending_tx(&retried), tx, "{retried}");
    let replayed = settle(M1_KEY, direct.clone(), paid.clone()).await;
    assert_eq!(replayed["errorReason"], "invalid_exact_evm_nonce_already_used", "{replayed}");

    // m2 batches: pending with no transaction yet, which the reference does
    // not retry: a second /settle is a replay. The payment settles all the same.
    let batched = requirements(PAY_TO_2);
    let queued = s.payer.sign_exact(&batched, now() - 600, now() + 600, random_nonce());
    assert_eq!(pending_tx(&settle(M2_KEY, batched.clone(), queued.clone()).await), "");
    let replayed = settle(M2_KEY, batched.clone(), queued.clone()).await;
    assert_eq!(replayed["errorReason"], "invalid_exact_evm_nonce_already_used", "{replayed}");

    devnet::set_interval_mining(s.anvil.endpoint(), 1).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for (req, payload) in [(&direct, &paid), (&batched, &queued)] {
        loop {
            let record = s.node.engine().payment(payload_id(req, payload)).await.unwrap().unwrap();
            if record.status.state == x402_engine::domain::PaymentState::Confirmed {
                assert!(record.status.transaction.is_some());
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never settled");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert_eq!(s.balance(PAY_TO).await, U256::from(AMOUNT));
    assert_eq!(s.balance(PAY_TO_2).await, U256::from(AMOUNT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_identifier_re_authorizes_nothing_and_names_one_payment() {
    let s = Setup::new(30_000).await;
    let req = requirements(PAY_TO);
    let with_id = |payload: &x402_engine::domain::ExactPayload, id: &str| {
        let mut b = body(&req, payload);
        b["paymentPayload"]["extensions"] =
            json!({ "payment-identifier": { "info": { "required": false, "id": id } } });
        b
    };
    let payload = s.payer.sign_exact(&req, now() - 600, now() + 600, random_nonce());
    let (_, settled) = s.post("/settle", Some(M1_KEY), &with_id(&payload, "pay_0123456789abcdef")).await;
    assert_eq!(settled["success"], true, "{settled}");

    // The client wrote the id and did not sign it: a replay of the header
    // carries it too, so the same id and payload are refused like any
    // replay, by /verify and /settle.
    let (_, verified) = s.post("/verify", Some(M1_KEY), &with_id(&payload, "pay_0123456789abcdef")).await;
    assert_eq!(verified["isValid"], false, "{verified}");
    assert_eq!(verified["invalidReason"], "invalid_exact_evm_nonce_already_used");
    for id in ["pay_0123456789abcdef", "pay_fedcba9876543210"] {
        let (_, replayed) = s.post("/settle", Some(M1_KEY), &with_id(&payload, id)).await;
        assert_eq!(replayed["success"], false, "{replayed}");
        assert_eq!(replayed["errorReason"], "invalid_exact_evm_nonce_already_used", "{replayed}");
    }
    assert_eq!(s.balance(PAY_TO).await, U256::from(AMOUNT));

    // The same id with another payment: 409, and nothing recorded.
    let second = s.payer.sign_exact(&req, now() - 600, now() + 600, random_nonce());
    let (status, conflict) = s.post("/settle", Some(M1_KEY), &with_id(&second, "pay_0123456789abcdef")).await;
    assert_eq!(status, 409, "{conflict}");
    assert!(s.node.engine().payment(payload_id(&req, &second)).await.unwrap().is_none());
    // A malformed id is a bad request.
    let (status, _) = s.post("/settle", Some(M1_KEY), &with_id(&second, "short")).await;
    assert_eq!(status, 400);
    assert_eq!(s.balance(PAY_TO).await, U256::from(AMOUNT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_nothing_would_settle_are_refused_and_not_advertised() {
    let s = Setup::with(30_000, &[], |config| {
        config.merchants[0].assets = ["eip155:31337", "eip155:8453"]
            .map(|network| AssetConfig { network: network.into(), asset: TOKEN.to_string() })
            .into();
        config.merchants.push(merchant_config(
            "mc",
            PAY_TO_2,
            "test-merchant-channel-key-9",
            PolicyConfig::Channel { claim_interval_secs: 60, claim_threshold: "1000".into() },
        ));
    })
    .await;
    let supported: Value = s.http.get(s.url("/supported")).send().await.unwrap().json().await.unwrap();
    let networks: Vec<&Value> = supported["kinds"].as_array().unwrap().iter().map(|k| &k["network"]).collect();
    assert!(networks.iter().all(|n| *n == NETWORK), "{supported}");

    let mut m1 = payments(s.node.endpoints().grpc, M1_KEY).await;
    let mut base = requirements(PAY_TO);
    base.network = "eip155:8453".into();
    let payload = s.payer.sign_exact(&base, now() - 600, now() + 600, random_nonce());
    let resp = m1.submit(exact_submit(1, &base, &payload)).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Rejected, "{resp:?}");
    assert_eq!(resp.reason, "invalid_network", "{}", resp.message);

    let mut mc = payments(s.node.endpoints().grpc, "test-merchant-channel-key-9").await;
    let req = requirements(PAY_TO_2);
    let payload = s.payer.sign_exact(&req, now() - 600, now() + 600, random_nonce());
    let resp = mc.submit(exact_submit(2, &req, &payload)).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Rejected, "{resp:?}");
    assert_eq!(resp.reason, "invalid_exact_evm_scheme", "{}", resp.message);
}

/// The facilitator listener authenticates from the headers before it reads
/// a body, reads at most `MAX_BODY` of one, and serves a bounded number of
/// requests at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_authenticated_first_bounded_in_size_and_in_number() {
    let s = Setup::with(30_000, &[], |config| {
        config.facilitator.max_concurrent = 2;
        config.facilitator.max_concurrent_per_merchant = 1;
    })
    .await;
    let raw = |key: Option<&'static str>, body: Vec<u8>| {
        let mut req = s.http.post(s.url("/verify")).header("content-type", "application/json").body(body);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(raw(None, b"not json".to_vec()).await, 401);
    assert_eq!(raw(Some("not-a-merchant-key-000"), b"not json".to_vec()).await, 401);
    let huge = format!("{{\"x402Version\": 2, \"pad\": \"{}\"}}", "x".repeat(x402_engine::facilitator::MAX_BODY));
    assert_eq!(raw(Some(M1_KEY), huge.into_bytes()).await, 413);

    // One /settle of m2 waiting for its batch (m2 batches for 1.5 s) holds
    // m2's only place: m2's next request meanwhile is told to come back,
    // while m1 is still served; with m1 waiting too, every place is taken.
    let req = requirements(PAY_TO_2);
    let payload = s.payer.sign_exact(&req, now() - 600, now() + 600, random_nonce());
    let settle_body = body(&req, &payload);
    let waiting = s.post("/settle", Some(M2_KEY), &settle_body);
    let others = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let verify = |key: &'static str| {
            let req = requirements(if key == M1_KEY { PAY_TO } else { PAY_TO_2 });
            let payload = s.payer.sign_exact(&req, now() - 600, now() + 600, random_nonce());
            s.http.post(s.url("/verify")).bearer_auth(key).json(&body(&req, &payload)).send()
        };
        let m2 = verify(M2_KEY).await.unwrap().status().as_u16();
        let m1 = verify(M1_KEY).await.unwrap().status().as_u16();
        (m2, m1)
    };
    let ((_, settled), (m2, m1)) = tokio::join!(waiting, others);
    assert_eq!((m2, m1), (503, 200), "m2 is at its share, m1 is not");
    assert_eq!(settled["success"], true, "{settled}");
    // Once it answered, the place is free again.
    let (status, _) = s.post("/verify", Some(M1_KEY), &body(&req, &payload)).await;
    assert_eq!(status, 200);
}
