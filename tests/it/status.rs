//! The settlement status lookup on the HTTP listener: `GET
//! /settlements/{id}`, `GET /settlements?transaction=…`, `GET
//! /settlements?limit=…` and `GET /channels/{id}`, on a real anvil, through
//! every state a payment takes, each answered to its own merchant only.

use std::time::Duration;

use alloy::{
    network::TransactionBuilder,
    primitives::{Address, B256},
    providers::{Provider, ext::AnvilApi},
    rpc::types::TransactionRequest,
};
use serde_json::Value;
use x402_chain::eip3009::cancel_authorization_calldata;
use x402_engine::config::PolicyConfig;
use x402_proto::v1 as pb;

use crate::{
    channels::{self, MC_KEY, PRICE, Setup},
    common::*,
};

const MQ_KEY: &str = "test-merchant-queue-key-0001";
const MF_KEY: &str = "test-merchant-fails-key-0001";
const MQ_PAY_TO: Address = Address::repeat_byte(0x3c);
const MF_PAY_TO: Address = Address::repeat_byte(0x4d);

/// `GET path` as the holder of `key` (none: unauthenticated): the status
/// and the JSON body.
pub(crate) async fn get(http: std::net::SocketAddr, key: Option<&str>, path: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(format!("http://{http}{path}"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Waits until payment `id`, read by its merchant's `key`, is in `state`.
pub(crate) async fn state_becomes(http: std::net::SocketAddr, key: &str, id: B256, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, answer) = get(http, Some(key), &format!("/settlements/{id}")).await;
        assert_eq!(status, 200, "{answer}");
        if answer["state"] == state {
            return answer;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {state}: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `x402d <args…> --node <http> --key <key>`: whether it succeeded, and
/// what it printed on stdout and stderr.
async fn cli(http: std::net::SocketAddr, key: &str, args: &[&str]) -> (bool, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_x402d"));
    command.args(args).args(["--node", &format!("http://{http}"), "--key", key]);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

async fn accepted(client: &mut Payments, request: pb::SubmitRequest) -> B256 {
    let answer = client.submit(request).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{answer:?}");
    B256::from_slice(&answer.payment_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_lookup_answers_every_state_to_its_own_merchant_only() {
    let s = Setup::new(4).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = s.node_config(dir.path(), Setup::merchant(3600), |_| {});
    // mq batches for an hour (its payments wait queued); mf after 5 s.
    let batched = |max_wait_ms| PolicyConfig::Batched { max_rows: 100, max_wait_ms };
    config.merchants.push(merchant_config("mq", MQ_PAY_TO, MQ_KEY, batched(3_600_000)));
    config.merchants.push(merchant_config("mf", MF_PAY_TO, MF_KEY, batched(5_000)));
    let node = start_node(&config).await;
    let (grpc, http) = (node.endpoints().grpc, node.endpoints().http);
    let sign = |payer: usize, pay_to: Address, valid_for: u64| {
        let req = requirements(pay_to);
        let payload = s.payers[payer].sign_exact(&req, now() - 600, now() + valid_for, random_nonce());
        (exact_submit(1, &req, &payload), payload)
    };

    // Queued: mq's payment waits for its batch (before any other batch,
    // which would take it along).
    let mut mq = payments(grpc, MQ_KEY).await;
    let queued = accepted(&mut mq, sign(0, MQ_PAY_TO, 40).0).await;
    let answer = state_becomes(http, MQ_KEY, queued, "queued").await;
    assert_eq!(answer["strategy"], "batched");
    assert_eq!(answer["transaction"], Value::Null);
    assert_eq!(answer["payTo"], MQ_PAY_TO.to_string());
    assert_eq!(answer["amount"], AMOUNT.to_string());
    assert_eq!(answer["network"], NETWORK);

    // Expired: the chain's time passes mq's payment's deadline; the node's
    // clock follows it, and the payment ends unsent.
    s.wallet.anvil_increase_time(60).await.unwrap();
    s.wallet.evm_mine(None).await.unwrap();
    let answer = state_becomes(http, MQ_KEY, queued, "expired").await;
    assert_eq!(answer["failureReason"], "invalid_exact_evm_payload_authorization_valid_before", "{answer}");
    assert_eq!(answer["transaction"], Value::Null);

    // Submitted, then confirmed: m1 settles directly on a chain that mines
    // when the test says.
    s.wallet.anvil_set_auto_mine(false).await.unwrap();
    let mut m1 = payments(grpc, M1_KEY).await;
    let direct = accepted(&mut m1, sign(1, PAY_TO, 3600).0).await;
    let answer = state_becomes(http, M1_KEY, direct, "submitted").await;
    let tx: B256 = answer["transaction"].as_str().unwrap().parse().unwrap();
    assert_eq!(answer["block"], Value::Null);
    let (_, by_tx) = get(http, Some(M1_KEY), &format!("/settlements?transaction={tx}")).await;
    assert_eq!(by_tx["settlements"].as_array().unwrap().len(), 1, "{by_tx}");
    assert_eq!(by_tx["settlements"][0]["paymentId"], direct.to_string());
    s.wallet.evm_mine(None).await.unwrap();
    s.wallet.anvil_set_auto_mine(true).await.unwrap();
    let answer = state_becomes(http, M1_KEY, direct, "confirmed").await;
    assert_eq!(answer["transaction"], tx.to_string());
    let block = answer["block"].as_u64().expect("a block number");
    let receipt = s.wallet.get_transaction_receipt(tx).await.unwrap().expect("mined");
    assert_eq!(receipt.block_number, Some(block), "the block the chain says");
    // The same from the command line, to its merchant only.
    let (ok, out, err) = cli(http, M1_KEY, &["payment", &direct.to_string()]).await;
    assert!(ok, "{err}");
    assert!(out.contains("state         confirmed"), "{out}");
    assert!(out.contains(&format!("transaction   {tx} (block {block})")), "{out}");
    let (ok, _, err) = cli(http, M2_KEY, &["payment", &direct.to_string()]).await;
    assert!(!ok && err.contains("404") && err.contains(&format!("no payment {direct}")), "{err}");
    let (ok, out, err) = cli(http, M1_KEY, &["payments", "--transaction", &tx.to_string()]).await;
    assert!(ok && out.starts_with(&format!("{direct}  confirmed")), "{out}{err}");

    // Failed: the payer cancels its authorization before mf's batch.
    let mut mf = payments(grpc, MF_KEY).await;
    let (request, payload) = sign(2, MF_PAY_TO, 3600);
    let failing = accepted(&mut mf, request).await;
    let nonce = payload.authorization.nonce;
    let signature = s.payers[2].sign_cancel(&requirements(MF_PAY_TO), nonce);
    let cancel = TransactionRequest::default().with_to(TOKEN).with_input(cancel_authorization_calldata(
        s.payers[2].address(),
        nonce,
        &signature,
    ));
    let cancel = s.wallet.send_transaction(cancel).await.unwrap().get_receipt().await.unwrap();
    assert!(cancel.status());
    let answer = state_becomes(http, MF_KEY, failing, "failed").await;
    assert_eq!(answer["failureReason"], "invalid_exact_evm_authorization_canceled", "{answer}");
    assert_eq!(answer["transaction"], cancel.transaction_hash.to_string(), "the transaction that cancelled it");
    let (_, by_cancel) =
        get(http, Some(MF_KEY), &format!("/settlements?transaction={}", cancel.transaction_hash)).await;
    assert_eq!(by_cancel["settlements"][0]["paymentId"], failing.to_string(), "{by_cancel}");

    // Another merchant's payment is answered as one that does not exist;
    // its transactions show it nothing.
    for (key, id) in [(M2_KEY, direct), (MQ_KEY, direct), (M1_KEY, queued), (M1_KEY, B256::repeat_byte(9))] {
        let (status, answer) = get(http, Some(key), &format!("/settlements/{id}")).await;
        assert_eq!(status, 404, "{key} reads {id}: {answer}");
        assert_eq!(answer["error"], format!("no payment {id}"));
    }
    let (status, none) = get(http, Some(M2_KEY), &format!("/settlements?transaction={tx}")).await;
    assert_eq!((status, none["settlements"].as_array().unwrap().len()), (200, 0), "{none}");
    // Bad input names its field; no key is 401.
    for (path, field) in [
        ("/settlements/0x12", "paymentId"),
        (&*format!("/settlements/0x{}", "zz".repeat(32)), "paymentId"),
        ("/settlements?transaction=7", "transaction"),
        ("/settlements?limit=0", "limit"),
        ("/settlements?limit=101", "limit"),
        ("/channels/0x", "channelId"),
    ] {
        let (status, answer) = get(http, Some(M1_KEY), path).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(answer["error"].as_str().unwrap().starts_with(field), "{path}: {answer}");
    }
    let (status, _) = get(http, None, &format!("/settlements/{direct}")).await;
    assert_eq!(status, 401);

    // A merchant's recent payments: its own, newest first.
    let second = accepted(&mut m1, sign(1, PAY_TO, 3600).0).await;
    state_becomes(http, M1_KEY, second, "confirmed").await;
    let (_, recent) = get(http, Some(M1_KEY), "/settlements").await;
    let ids: Vec<&str> =
        recent["settlements"].as_array().unwrap().iter().map(|p| p["paymentId"].as_str().unwrap()).collect();
    assert_eq!(ids, [second.to_string(), direct.to_string()], "{recent}");
    let (_, one) = get(http, Some(M1_KEY), "/settlements?limit=1").await;
    assert_eq!(one["settlements"].as_array().unwrap().len(), 1);
    let (_, theirs) = get(http, Some(MQ_KEY), "/settlements").await;
    let ids: Vec<&str> =
        theirs["settlements"].as_array().unwrap().iter().map(|p| p["paymentId"].as_str().unwrap()).collect();
    assert_eq!(ids, [queued.to_string()], "{theirs}");

    // A channel x402d keeps, to its merchant only.
    let payer = &s.payers[3];
    s.deposit(payer, 1_000).await;
    let config_of = s.config(payer);
    let mut mc = payments(grpc, MC_KEY).await;
    let voucher = mc.submit(channels::voucher(1, payer, &config_of, 0, PRICE)).await.unwrap().into_inner();
    assert_eq!(outcome(&voucher), pb::Outcome::Accepted, "{voucher:?}");
    let id = Setup::domain().channel_id(&config_of);
    let (status, channel) = get(http, Some(MC_KEY), &format!("/channels/{id}")).await;
    assert_eq!(status, 200, "{channel}");
    assert_eq!(channel["channelId"], id.to_string());
    assert_eq!((channel["charged"].as_str(), channel["balance"].as_str()), (Some("10"), Some("1000")), "{channel}");
    assert_eq!(channel["payer"], payer.address().to_string());
    let (status, _) = get(http, Some(M1_KEY), &format!("/channels/{id}")).await;
    assert_eq!(status, 404, "another merchant's channel");
    let (ok, out, err) = cli(http, MC_KEY, &["channel", &id.to_string()]).await;
    assert!(ok && out.contains("charged       10 (highest voucher 10)"), "{out}{err}");
    let (ok, out, err) = cli(http, MC_KEY, &["channel", &id.to_string(), "--json"]).await;
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["channelId"], id.to_string());
}
