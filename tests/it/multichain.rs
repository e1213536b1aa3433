//! One x402d settling on two chains at once (`[[chains]]`): two anvils, one
//! node; each chain has its own settler, balance cache and proofs. Payments
//! on either settle on their own chain, through `direct` and `batched`;
//! `/supported` lists both; a payment on a chain the node does not settle
//! is refused; and the reference client pays on either.

use std::time::Duration;

use alloy::{
    primitives::{Address, B256, U256},
    providers::{Provider, ProviderBuilder},
    signers::local::PrivateKeySigner,
};
use x402_chain::contracts::{BATCH_SETTLEMENT_ADDRESS, X402BatchSettlement, X402TestToken};
use x402_devnet::{Anvil, Payer};
use x402_engine::config::{ChainConfig, PolicyConfig};
use x402_proto::v1 as pb;

use crate::{
    channels::{MC_KEY, RECEIVER},
    common::*,
};

/// The second chain's id.
const OTHER: u64 = 31_338;

struct TwoChains {
    anvils: [Anvil; 2],
    payer: Payer,
    /// Each chain's receiver authorizer (channels of merchant `mc`).
    authorizers: [PrivateKeySigner; 2],
    node: x402_engine::node::Node,
    _dir: tempfile::TempDir,
}

impl TwoChains {
    async fn start() -> Self {
        let anvils = [Anvil::spawn(&[]).unwrap(), Anvil::spawn(&["--chain-id", "31338"]).unwrap()];
        let payer = Payer::random();
        let signer = PrivateKeySigner::random();
        for anvil in &anvils {
            x402_devnet::deploy(anvil.endpoint(), &[payer.address()], U256::from(1_000_000)).await.unwrap();
            x402_devnet::fund_ether(anvil.endpoint(), &[signer.address()]).await.unwrap();
        }
        let authorizers = [PrivateKeySigner::random(), PrivateKeySigner::random()];
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_value(dir.path());
        let channels = PolicyConfig::Channel { claim_interval_secs: 3600, claim_threshold: "30".into() };
        config.merchants.push(merchant_config("mc", RECEIVER, MC_KEY, channels));
        config.chains = anvils
            .iter()
            .zip(&authorizers)
            .enumerate()
            .map(|(i, (anvil, authorizer))| {
                let mut chain = ChainConfig::with_keys(
                    anvil.endpoint(),
                    vec![signer.to_bytes().to_string()],
                    Some(authorizer.to_bytes().to_string()),
                );
                chain.receipt_poll_ms = 50;
                chain.channel_poll_ms = 200;
                // Each chain's own least deposit: none, then 800.
                chain.min_deposit = (i == 1).then(|| "800".into());
                chain
            })
            .collect();
        let node = start_node(&config).await;
        Self { anvils, payer, authorizers, node, _dir: dir }
    }

    async fn balance(&self, chain: usize, owner: Address) -> U256 {
        let provider = ProviderBuilder::new().connect_http(self.anvils[chain].endpoint().parse().unwrap());
        X402TestToken::new(TOKEN, &provider).balanceOf(owner).call().await.unwrap()
    }

    /// Waits until `owner` holds `want` on `chain`.
    async fn balance_becomes(&self, chain: usize, owner: Address, want: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.balance(chain, owner).await != U256::from(want) {
            assert!(tokio::time::Instant::now() < deadline, "chain {chain}: {owner} never held {want}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A payment of [`AMOUNT`] to `pay_to` on `chain_id`.
fn pay(payer: &Payer, pay_to: Address, chain_id: u64, request_id: u64) -> pb::SubmitRequest {
    let mut req = requirements(pay_to);
    req.network = format!("eip155:{chain_id}");
    let payload = payer.sign_exact(&req, now() - 600, now() + 3600, random_nonce());
    exact_submit(request_id, &req, &payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_settles_on_two_chains_at_once() {
    let t = TwoChains::start().await;
    let grpc = t.node.endpoints().grpc;
    let (mut m1, mut m2) = (payments(grpc, M1_KEY).await, payments(grpc, M2_KEY).await);
    for (chain_id, n) in [(31_337, 1), (OTHER, 2)] {
        for (client, pay_to) in [(&mut m1, PAY_TO), (&mut m2, PAY_TO_2)] {
            let answer = client.submit(pay(&t.payer, pay_to, chain_id, n)).await.unwrap().into_inner();
            assert_eq!(outcome(&answer), pb::Outcome::Accepted, "chain {chain_id}: {}", answer.message);
        }
    }
    // A chain the node does not settle.
    let answer = m1.submit(pay(&t.payer, PAY_TO, 1, 3)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected);
    assert_eq!(answer.reason, "invalid_network", "{}", answer.message);

    // Each settles on its own chain, direct and batched.
    for chain in 0..2 {
        t.balance_becomes(chain, PAY_TO, AMOUNT).await;
        t.balance_becomes(chain, PAY_TO_2, AMOUNT).await;
        t.balance_becomes(chain, t.payer.address(), 1_000_000 - 2 * AMOUNT).await;
    }

    let supported: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/supported", t.node.endpoints().http))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for network in ["eip155:31337", "eip155:31338"] {
        assert!(
            supported["kinds"].as_array().unwrap().iter().any(|k| k["network"] == network && k["scheme"] == "exact"),
            "{network}: {supported}"
        );
    }
}

/// The reference `@x402/express` server and `@x402/fetch` client, paying
/// through one x402d on either of its chains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_client_pays_on_either_chain() {
    let t = TwoChains::start().await;
    let http = t.node.endpoints().http;
    for (chain, network) in [(0, "eip155:31337"), (1, "eip155:31338")] {
        let lines =
            crate::interop::run_script("exact.mjs", http, t.anvils[chain].endpoint(), t.payer.signer(), Some(network))
                .await;
        let paid = lines.iter().find(|l| l["scenario"] == "paid").unwrap_or_else(|| panic!("{lines:?}"));
        assert_eq!(paid["status"], 200, "{network}");
        assert_eq!(paid["network"], network);
        let tx = paid["transaction"].as_str().unwrap().parse().unwrap();
        let provider = ProviderBuilder::new().connect_http(t.anvils[chain].endpoint().parse().unwrap());
        assert!(provider.get_transaction_receipt(tx).await.unwrap().unwrap().status(), "{network}: on its chain");
        // The paid request and the raced one: two payments, on this chain.
        assert_eq!(t.balance(chain, PAY_TO).await, U256::from(2_000), "{network}");
    }
}

/// A channel on each chain, opened by a deposit x402d puts on that chain,
/// paid by vouchers over gRPC and claimed there by that chain's settler
/// with that chain's receiver authorizer; a channel naming the other
/// chain's authorizer is refused before anything goes on chain; a deposit
/// over HTTP goes on the chain its requirements name; and `/supported`
/// lists `batch-settlement` on each with its own authorizer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_served_and_claimed_on_each_chain_on_its_own_terms() {
    use crate::channels::{
        PRICE, WITHDRAW_DELAY, deposit_voucher_on, eventually, payload_json_on, priced_voucher_on, requirements_json_on,
    };

    let t = TwoChains::start().await;
    let mut client = payments(t.node.endpoints().grpc, MC_KEY).await;
    let config_for = |authorizer: &PrivateKeySigner| {
        t.payer.channel_config(RECEIVER, authorizer.address(), TOKEN, WITHDRAW_DELAY, B256::ZERO)
    };
    for (chain, chain_id) in [(0, 31_337), (1, OTHER)] {
        // The other chain's authorizer does not claim here.
        let foreign = config_for(&t.authorizers[1 - chain]);
        let answer = client.submit(deposit_voucher_on(chain_id, 1, &t.payer, &foreign, PRICE, 1_000)).await;
        let answer = answer.unwrap().into_inner();
        assert_eq!(outcome(&answer), pb::Outcome::Rejected, "chain {chain_id}: {}", answer.message);
        assert_eq!(answer.reason, "invalid_batch_settlement_evm_receiver_authorizer_mismatch", "{}", answer.message);

        let config = config_for(&t.authorizers[chain]);
        // 700 is below the second chain's least deposit only.
        let small = config_for(&t.authorizers[chain]);
        let small = x402_channel::ChannelConfig { salt: B256::repeat_byte(7), ..small };
        let answer = client.submit(deposit_voucher_on(chain_id, 9, &t.payer, &small, PRICE, 700)).await;
        let answer = answer.unwrap().into_inner();
        match chain {
            0 => assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message),
            _ => assert_eq!(
                answer.reason, "invalid_batch_settlement_evm_deposit_transaction_failed",
                "{}",
                answer.message
            ),
        }
        let answer = client.submit(deposit_voucher_on(chain_id, 2, &t.payer, &config, PRICE, 1_000)).await;
        let answer = answer.unwrap().into_inner();
        assert_eq!(outcome(&answer), pb::Outcome::Accepted, "chain {chain_id}: {}", answer.message);
        for n in 1..3u8 {
            let voucher =
                priced_voucher_on(chain_id, 2 + u64::from(n), &t.payer, &config, PRICE * u128::from(n), PRICE);
            let answer = client.submit(voucher).await.unwrap().into_inner();
            assert_eq!(outcome(&answer), pb::Outcome::Accepted, "chain {chain_id}, voucher {n}: {}", answer.message);
        }
        // 30 charged reaches the threshold: claimed on this chain.
        let provider = ProviderBuilder::new().connect_http(t.anvils[chain].endpoint().parse().unwrap());
        let contract = X402BatchSettlement::new(BATCH_SETTLEMENT_ADDRESS, &provider);
        let id = x402_channel::ChannelDomain::new(chain_id, BATCH_SETTLEMENT_ADDRESS).channel_id(&config);
        eventually(30, "the claim on this chain", || async {
            contract.channels(id).call().await.unwrap().totalClaimed == 3 * PRICE
        })
        .await;
        let foreign_id = x402_channel::ChannelDomain::new(chain_id, BATCH_SETTLEMENT_ADDRESS).channel_id(&foreign);
        assert_eq!(contract.channels(foreign_id).call().await.unwrap().balance, 0, "nothing deposited");
    }

    // Over HTTP, the chain the requirements name: a deposit into another
    // channel of the payer on the second chain goes on that chain.
    let http = reqwest::Client::new();
    let config = t.payer.channel_config(RECEIVER, t.authorizers[1].address(), TOKEN, WITHDRAW_DELAY, B256::ZERO);
    let config = x402_channel::ChannelConfig { salt: B256::repeat_byte(1), ..config };
    let body = serde_json::json!({
        "x402Version": 2,
        "paymentPayload": payload_json_on(OTHER, &t.payer, &config, PRICE, Some(900)),
        "paymentRequirements": requirements_json_on(OTHER, &config, PRICE),
    });
    let url = format!("http://{}/settle", t.node.endpoints().http);
    let settled: serde_json::Value =
        http.post(url).bearer_auth(MC_KEY).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(settled["success"], true, "{settled}");
    assert_eq!(settled["network"], "eip155:31338");
    let tx = settled["transaction"].as_str().unwrap().parse().unwrap();
    let provider = ProviderBuilder::new().connect_http(t.anvils[1].endpoint().parse().unwrap());
    assert!(provider.get_transaction_receipt(tx).await.unwrap().unwrap().status(), "the deposit is on chain two");
    let id = x402_channel::ChannelDomain::new(OTHER, BATCH_SETTLEMENT_ADDRESS).channel_id(&config);
    let onchain = X402BatchSettlement::new(BATCH_SETTLEMENT_ADDRESS, &provider).channels(id).call().await.unwrap();
    assert_eq!(onchain.balance, 900);

    let supported: serde_json::Value =
        http.get(format!("http://{}/supported", t.node.endpoints().http)).send().await.unwrap().json().await.unwrap();
    for (network, authorizer) in ["eip155:31337", "eip155:31338"].into_iter().zip(&t.authorizers) {
        let kinds = supported["kinds"].as_array().unwrap();
        let channel = kinds.iter().find(|k| k["network"] == network && k["scheme"] == "batch-settlement");
        let channel = channel.unwrap_or_else(|| panic!("{network}: {supported}"));
        assert_eq!(channel["extra"]["receiverAuthorizer"], authorizer.address().to_string(), "{network}");
    }
}
