//! Chain faults under the settler, on a real anvil: transactions stuck in
//! the mempool are replaced by fee bumps, and a reorg that drops confirmed
//! settlements has them sent again. Either way every payment ends settled
//! exactly once.

use std::time::Duration;

use alloy::{
    primitives::{B256, U256},
    providers::ext::AnvilApi,
    rpc::types::anvil::ReorgOptions,
};
use x402_chain::Chain;
use x402_engine::{
    domain::{IntentState, PaymentId},
    settle::{Settler, SettlerConfig},
};
use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet as devnet;

const MINTED: u64 = 1_000_000;

type Setup = ChainSetup;

async fn setup(payers: usize) -> Setup {
    ChainSetup::start(payers, MINTED, 1, |_| {}).await
}

/// Submits one payment per payer to the direct merchant.
async fn submit_all(s: &Setup) -> Vec<PaymentId> {
    let mut m1 = payments(s.node.endpoints().grpc, M1_KEY).await;
    let requests = s.payers.iter().enumerate().map(|(i, p)| signed_submit(p, PAY_TO, i as u64)).collect();
    let accepted = stream_all(&mut m1, requests).await;
    assert!(accepted.iter().all(|r| outcome(r) == pb::Outcome::Accepted));
    accepted.iter().map(|r| PaymentId(B256::from_slice(&r.payment_id))).collect()
}

/// Waits until every payment is `Confirmed`; returns their (tx, block).
async fn all_confirmed(s: &Setup, ids: &[PaymentId]) -> Vec<(B256, u64)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let mut out = Vec::new();
        for id in ids {
            let record = s.node.engine().payment(*id).await.unwrap().unwrap();
            if record.status.state == x402_engine::domain::PaymentState::Confirmed {
                out.push((record.status.transaction.unwrap(), record.status.block.unwrap()));
            }
        }
        if out.len() == ids.len() {
            return out;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} of {} confirmed", out.len(), ids.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The token moved exactly one payment per payer, and spent every nonce.
async fn settled_once(s: &Setup) {
    assert_eq!(s.chain.token_balance(TOKEN, PAY_TO).await.unwrap(), U256::from(AMOUNT * s.payers.len() as u64));
    for payer in &s.payers {
        assert_eq!(s.chain.token_balance(TOKEN, payer.address()).await.unwrap(), U256::from(MINTED - AMOUNT));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_transactions_are_replaced_by_fee_bumps() {
    let s = setup(5).await;
    // Nothing is mined until the test says so.
    s.control.anvil_set_auto_mine(false).await.unwrap();
    let config = SettlerConfig { stuck_after: Duration::from_millis(800), ..SettlerConfig::default() };
    let settler = Settler::spawn(s.node.engine().clone(), s.chain.clone(), config, None);
    let ids = submit_all(&s).await;

    // Each transaction waits unmined and is replaced, recorded before it is sent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let intents = s.node.engine().intents().await.unwrap();
        let bumped = intents.iter().filter(|i| i.tx_hashes.len() >= 2).count();
        if intents.len() == ids.len() && bumped == ids.len() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{bumped} of {} intents bumped", intents.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.control.anvil_mine(Some(3), None).await.unwrap();
    devnet::set_interval_mining(s.anvil.endpoint(), 1).await.unwrap();

    let confirmed = all_confirmed(&s, &ids).await;
    settler.abort();
    let intents = s.node.engine().intents().await.unwrap();
    for (tx, _) in &confirmed {
        // Mined as a replacement, not as first sent.
        let intent = intents.iter().find(|i| i.tx_hashes.contains(tx)).expect("an intent per transaction");
        assert_ne!(intent.tx_hashes[0], *tx);
        assert!(matches!(intent.state, IntentState::Included { tx: t, success: true, .. } if t == *tx));
    }
    settled_once(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_that_drops_settlements_has_them_sent_again() {
    let s = setup(8).await;
    let settler = Settler::spawn(s.node.engine().clone(), s.chain.clone(), SettlerConfig::default(), None);
    let ids = submit_all(&s).await;
    let before = all_confirmed(&s, &ids).await;
    let first = before.iter().map(|(_, block)| *block).min().unwrap();

    // Replace every block from the first settlement on with empty ones.
    let head = s.chain.block_number().await.unwrap();
    let depth = head - first + 1;
    s.control.anvil_reorg(ReorgOptions { depth, tx_block_pairs: Vec::new() }).await.unwrap();
    let dropped = s.chain.token_balance(TOKEN, PAY_TO).await.unwrap();
    assert!(dropped < U256::from(AMOUNT * ids.len() as u64), "the reorg undid settlements");
    // The chain goes on making blocks, as a real one does: a transaction the
    // reorg put back in the pool (so that its rebroadcast is "already
    // known") is mined by the next block, not left waiting for a fee bump.
    devnet::set_interval_mining(s.anvil.endpoint(), 1).await.unwrap();

    // The settler notices, reopens the payments and sends the same signed
    // transactions again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let after = loop {
        let now = all_confirmed(&s, &ids).await;
        let mut moved = true;
        for ((_, old), (_, new)) in before.iter().zip(&now) {
            moved &= new != old && s.chain.block_hash(*new).await.unwrap().is_some();
        }
        if moved && s.chain.token_balance(TOKEN, PAY_TO).await.unwrap() == U256::from(AMOUNT * ids.len() as u64) {
            break now;
        }
        assert!(tokio::time::Instant::now() < deadline, "not re-settled: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    settler.abort();
    for ((tx_before, _), (tx_after, block)) in before.iter().zip(&after) {
        // The same signed bytes: one transaction per payment, ever.
        assert_eq!(tx_before, tx_after);
        let receipt = s.chain.receipt(*tx_after).await.unwrap().unwrap();
        assert_eq!(receipt.block, *block);
    }
    settled_once(&s).await;
}

/// `transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)`.
const TRANSFER_WITH_AUTHORIZATION: [u8; 4] = [0xe3, 0xee, 0x16, 0x0e];

/// A provider that rate-limits the settlement's simulations (HTTP 429 with
/// a JSON-RPC error body) is an outage, not a verdict: the payments stay
/// queued, are retried, and all settle once the provider answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_simulations_are_retried_and_every_payment_settles() {
    let s = setup(20).await;
    let proxy = RpcProxy::start(s.anvil.endpoint()).await;
    proxy.set(Some(RpcFault {
        selector: TRANSFER_WITH_AUTHORIZATION,
        status: 429,
        code: -32005,
        message: "request rate exceeded",
    }));
    let signer = alloy::signers::local::PrivateKeySigner::random();
    devnet::fund_ether(s.anvil.endpoint(), &[signer.address()]).await.unwrap();
    let chain =
        x402_chain::AlloyChain::connect(&proxy.url, vec![signer], x402_chain::TxConfig::default()).await.unwrap();
    let config = SettlerConfig { poll: Duration::from_millis(200), ..SettlerConfig::default() };
    let settler = Settler::spawn(s.node.engine().clone(), std::sync::Arc::new(chain), config, None);
    let ids = submit_all(&s).await;

    // While the provider refuses, nothing fails and nothing is sent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(proxy.hits() >= ids.len() as u64, "the simulations were refused ({} hits)", proxy.hits());
    for id in &ids {
        let record = s.node.engine().payment(*id).await.unwrap().unwrap();
        assert_eq!(record.status.state, x402_engine::domain::PaymentState::Queued, "{:?}", record.status);
    }
    proxy.set(None);
    all_confirmed(&s, &ids).await;
    settler.abort();
    settled_once(&s).await;
}

/// A crash between recording an intent and broadcasting it, then a restart
/// whose node never saw that transaction: the signer's next nonce comes
/// after the recorded intent (not from the node's count alone), no intent
/// is overwritten, and every payment settles once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_an_unsent_intent_orphans_no_payment() {
    use x402_engine::{
        domain::{PaymentState, PaymentStatus, TxIntent},
        pipeline::{IntentChange, Transition},
    };
    let s = setup(4).await;
    let ids = submit_all(&s).await;

    // The first payment's transaction was signed and written ahead, and the
    // process died before broadcasting it.
    let first = s.node.engine().payment(ids[0]).await.unwrap().unwrap();
    let signature: [u8; 65] = first.signature.as_slice().try_into().unwrap();
    let calldata =
        x402_chain::eip3009::transfer_with_authorization_calldata(&(&first.authorization).into(), &signature);
    let tx = s.chain.sign_call(TOKEN, calldata, Some(200_000)).await.unwrap();
    let intent = TxIntent {
        chain_id: s.chain.chain_id(),
        signer: tx.signer,
        nonce: tx.nonce,
        tx_hashes: vec![tx.hash],
        raw: tx.raw.to_vec(),
        payments: vec![ids[0]],
        state: IntentState::Pending,
        created_at_ms: 1,
        updated_at_ms: 1,
    };
    let mut submitted = PaymentStatus::new(PaymentState::Submitted, 1);
    submitted.transaction = Some(tx.hash);
    s.node
        .engine()
        .record_settlement(vec![IntentChange::Record(intent)], vec![Transition { id: ids[0], status: submitted }])
        .await
        .unwrap();
    // A restarted process knows only the node's count, which misses it.
    s.chain.resync_nonce(tx.signer).await.unwrap();

    // Nothing is mined for a while: the rebroadcast intent waits in the
    // pool while the other payments are sent.
    s.control.anvil_set_auto_mine(false).await.unwrap();
    let config = SettlerConfig {
        receipt_timeout: Duration::from_secs(1),
        stuck_after: Duration::from_secs(60),
        ..SettlerConfig::default()
    };
    let settler = Settler::spawn(s.node.engine().clone(), s.chain.clone(), config, None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    devnet::set_interval_mining(s.anvil.endpoint(), 1).await.unwrap();
    let confirmed = all_confirmed(&s, &ids).await;
    settler.abort();
    assert_eq!(confirmed[0].0, tx.hash, "the recorded transaction was sent, not replaced");
    settled_once(&s).await;
}
