//! Interoperability with the reference x402 packages (pinned in the root
//! `package.json`): the scripts in `tests/interop/` run an `@x402/express`
//! resource server whose facilitator is this x402d node, and pay it with
//! `@x402/fetch` and the `@x402/evm` clients, on anvil with the project's
//! token; `tests/interop/v1/` does the same with the x402 v1 packages
//! (`x402-express`, `x402-fetch` 1.x, pinned in their own `package.json`).

use std::{path::Path, process::Command};

use alloy::{
    primitives::{Address, U256},
    providers::{DynProvider, Provider, ProviderBuilder},
    signers::local::PrivateKeySigner,
};
use serde_json::Value;
use x402_chain::contracts::X402TestToken;
use x402_engine::{config::ChainConfig, node::Node};

use crate::common::*;
use x402_devnet as devnet;
use x402_devnet::Anvil;

/// Anvil, a funded payer and an x402d node (m1 paid to `PAY_TO`) whose
/// facilitator API the script uses.
struct Interop {
    anvil: Anvil,
    payer: PrivateKeySigner,
    node: Node,
    provider: DynProvider,
    _dir: tempfile::TempDir,
}

impl Interop {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// [`Interop::start`] on an anvil started with `args`.
    async fn start_with(args: &[&str]) -> Self {
        let anvil = Anvil::spawn(args).unwrap();
        let payer = PrivateKeySigner::random();
        devnet::deploy(anvil.endpoint(), &[payer.address()], U256::from(1_000_000)).await.unwrap();
        let signer = PrivateKeySigner::random();
        devnet::fund_ether(anvil.endpoint(), &[signer.address()]).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_value(dir.path());
        let authorizer = PrivateKeySigner::random().to_bytes().to_string();
        let mut chain = ChainConfig::with_keys(anvil.endpoint(), vec![signer.to_bytes().to_string()], Some(authorizer));
        chain.receipt_poll_ms = 50;
        config.chain = Some(chain);
        let node = start_node(&config).await;
        let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap()).erased();
        Self { anvil, payer, node, provider, _dir: dir }
    }

    /// Runs `tests/interop/<script>` and returns its JSON lines.
    async fn run(&self, script: &str) -> Vec<Value> {
        run_script(script, self.node.endpoints().http, self.anvil.endpoint(), &self.payer, None).await
    }

    async fn balance(&self, owner: Address) -> U256 {
        X402TestToken::new(TOKEN, &self.provider).balanceOf(owner).call().await.unwrap()
    }
}

/// Runs `tests/interop/<script>` against the x402d node at `http`, paying as
/// `payer` on `network` (the script's default when `None`) through the node
/// at `rpc`; returns its JSON lines.
pub(crate) async fn run_script(
    script: &str,
    http: std::net::SocketAddr,
    rpc: &str,
    payer: &PrivateKeySigner,
    network: Option<&str>,
) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop").join(script);
    let (rpc, payer_key, network) = (rpc.to_owned(), payer.to_bytes().to_string(), network.map(str::to_owned));
    let output = tokio::task::spawn_blocking(move || {
        let mut command = Command::new("node");
        command
            .arg(script)
            .env("FACILITATOR_URL", format!("http://{http}"))
            .env("MERCHANT_KEY", M1_KEY)
            .env("PAY_TO", PAY_TO.to_string())
            .env("TOKEN", TOKEN.to_string())
            .env("PAYER_KEY", payer_key)
            .env("RPC_URL", rpc);
        if let Some(network) = network {
            command.env("NETWORK", network);
        }
        command.output().expect("node runs (npm ci installs the reference packages)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    eprintln!("{stdout}");
    stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_express_server_and_fetch_client_pay_through_x402d() {
    let t = Interop::start().await;
    let lines = t.run("exact.mjs").await;
    let scenario =
        |name: &str| lines.iter().find(|l| l["scenario"] == name).unwrap_or_else(|| panic!("{name}: {lines:?}"));

    assert_eq!(scenario("unpaid")["status"], 402);
    let paid = scenario("paid");
    assert_eq!(paid["status"], 200);
    assert_eq!(paid["network"], NETWORK);
    assert_eq!(paid["payer"].as_str().unwrap().parse::<Address>().unwrap(), t.payer.address());
    let tx = paid["transaction"].as_str().unwrap().parse().unwrap();
    let receipt = t.provider.get_transaction_receipt(tx).await.unwrap().unwrap();
    assert!(receipt.status());
    replays_are_refused_and_one_racer_is_served(scenario("replayed"), scenario("raced"));
    // The chain saw two payments of the price, no more.
    assert_eq!(t.balance(PAY_TO).await, U256::from(2_000));
    assert_eq!(t.balance(t.payer.address()).await, U256::from(1_000_000 - 2_000));
    let tampered = scenario("tampered");
    assert_eq!(tampered["status"], 402);
    assert_eq!(tampered["error"], "invalid_exact_evm_signature", "{lines:?}");
}

/// Every replay of the paid signature, one after another or at once, is
/// refused with a 402 and never served (`replayed`); of ten copies of one
/// fresh payment sent at once, exactly one is served (`raced`).
fn replays_are_refused_and_one_racer_is_served(replayed: &Value, raced: &Value) {
    for kind in ["sequential", "concurrent"] {
        let answers = replayed[kind].as_array().unwrap();
        assert_eq!(answers.len(), 10);
        for answer in answers {
            assert_eq!(answer["status"], 402, "{kind} replay: {replayed}");
            assert_eq!(answer["served"], false, "{kind} replay served: {replayed}");
        }
    }
    let raced = raced["copies"].as_array().unwrap();
    assert_eq!(raced.len(), 10);
    let served = raced.iter().filter(|c| c["status"] == 200 && c["served"] == true).count();
    assert_eq!(served, 1, "{raced:?}");
    assert!(raced.iter().all(|c| c["status"] == 200 || c["status"] == 402), "{raced:?}");
}

/// The x402 v1 reference packages end to end, installed apart
/// (`tests/interop/v1`): an `x402-express` 1.x server whose facilitator is
/// x402d and an `x402-fetch` 1.x client, on an anvil with Base Sepolia's
/// chain id. The 402 names `base-sepolia` and `maxAmountRequired`; the paid
/// request is served and settled on chain; replays of its `X-PAYMENT` are
/// refused, one of ten racing copies of a fresh one is served, and a
/// tampered one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_express_server_and_fetch_client_pay_through_x402d() {
    let t = Interop::start_with(&["--chain-id", "84532"]).await;
    let lines = t.run("v1/exact.mjs").await;
    let scenario =
        |name: &str| lines.iter().find(|l| l["scenario"] == name).unwrap_or_else(|| panic!("{name}: {lines:?}"));

    let unpaid = scenario("unpaid");
    assert_eq!(
        (&unpaid["status"], &unpaid["x402Version"], &unpaid["network"], &unpaid["maxAmountRequired"]),
        (&402.into(), &1.into(), &"base-sepolia".into(), &"1000".into()),
        "{unpaid}"
    );
    let paid = scenario("paid");
    assert_eq!((&paid["status"], &paid["success"]), (&200.into(), &true.into()), "{paid}");
    assert_eq!(paid["network"], "base-sepolia", "answered in v1 words: {paid}");
    assert_eq!(paid["payer"].as_str().unwrap().parse::<Address>().unwrap(), t.payer.address());
    let tx = paid["transaction"].as_str().unwrap().parse().unwrap();
    assert!(t.provider.get_transaction_receipt(tx).await.unwrap().unwrap().status());
    replays_are_refused_and_one_racer_is_served(scenario("replayed"), scenario("raced"));
    assert_eq!(scenario("tampered")["status"], 402, "{lines:?}");
    // The paid request and the raced one settle; nothing else does.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while t.balance(PAY_TO).await != U256::from(2_000) {
        assert!(tokio::time::Instant::now() < deadline, "the raced payment was not settled");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(t.balance(t.payer.address()).await, U256::from(1_000_000 - 2_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_batch_settlement_client_and_server_pay_through_x402d_channels() {
    let t = Interop::start().await;
    let lines = t.run("channel.mjs").await;
    let paid: Vec<&Value> = lines.iter().filter(|l| l["step"] == "paid").collect();
    assert_eq!(paid.len(), 3, "{lines:?}");
    assert!(paid.iter().all(|p| p["status"] == 200));
    assert!(lines.iter().any(|l| l["step"] == "claimed"), "{lines:?}");
    // Three requests of 1,000 were claimed from the channel and paid out,
    // and the refund returned the rest of the deposit: the payer spent
    // exactly 3,000.
    assert_eq!(t.balance(PAY_TO).await, U256::from(3_000));
    assert!(lines.iter().any(|l| l["step"] == "refunded"), "{lines:?}");
    assert_eq!(t.balance(t.payer.address()).await, U256::from(1_000_000 - 3_000));
}

/// An x402 v1 payment, signed by the reference v1 scheme and sent in v1
/// bodies by the reference facilitator client, verifies and settles on a
/// chain with a v1 name (an anvil with Base Sepolia's chain id); a replay
/// is refused; `/supported` lists the v1 kind; and an `X-PAYMENT` header
/// goes through gRPC's raw-header field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_client_pays_through_x402d() {
    use x402_proto::v1 as pb;
    let t = Interop::start_with(&["--chain-id", "84532"]).await;
    let lines = t.run("exact_v1.mjs").await;
    let scenario =
        |name: &str| lines.iter().find(|l| l["scenario"] == name).unwrap_or_else(|| panic!("{name}: {lines:?}"));

    let kinds = scenario("supported")["kinds"].as_array().unwrap().clone();
    assert!(
        kinds.iter().any(|k| k["x402Version"] == 1 && k["scheme"] == "exact" && k["network"] == "base-sepolia"),
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k["x402Version"] == 2 && k["network"] == "eip155:84532"), "{kinds:?}");

    let verified = scenario("verified");
    assert_eq!(verified["isValid"], true, "{verified}");
    assert_eq!(verified["payer"].as_str().unwrap().parse::<Address>().unwrap(), t.payer.address());
    let settled = scenario("settled");
    assert_eq!(settled["success"], true, "{settled}");
    assert_eq!(settled["network"], "base-sepolia", "answered in v1 words");
    let tx = settled["transaction"].as_str().unwrap().parse().unwrap();
    assert!(t.provider.get_transaction_receipt(tx).await.unwrap().unwrap().status());
    let replayed = scenario("replayed");
    assert_eq!(replayed["success"], false, "{replayed}");
    assert_eq!(replayed["errorReason"], "invalid_exact_evm_nonce_already_used");
    let tampered = scenario("tampered");
    assert_eq!(tampered["isValid"], false);
    assert_eq!(tampered["invalidReason"], "invalid_exact_evm_signature", "{tampered}");

    // The X-PAYMENT header through gRPC, against the gateway's typed (v2)
    // requirements of the same payment.
    let header = scenario("header")["header"].as_str().unwrap().to_owned();
    let mut req = x402_devnet::dev_requirements(PAY_TO, TOKEN, 1000);
    req.network = "eip155:84532".into();
    let mut client = payments(t.node.endpoints().grpc, M1_KEY).await;
    let answer = client.submit(header_submit(1, &req, header)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while t.balance(PAY_TO).await != U256::from(2_000) {
        assert!(tokio::time::Instant::now() < deadline, "the X-PAYMENT payment was not settled");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
