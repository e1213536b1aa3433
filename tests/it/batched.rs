//! The `batched` strategy on a real anvil chain: many payments per
//! Multicall3 `aggregate3` transaction, rows sabotaged before sending or
//! between simulation and inclusion failing alone with their reason, and a
//! crash after a batch's broadcast.

use std::{collections::HashSet, time::Duration};

use alloy::{
    network::TransactionBuilder,
    primitives::{Address, B256, Bytes, U256},
    providers::{Provider, ProviderBuilder, RootProvider, ext::AnvilApi},
    rpc::types::TransactionRequest,
    signers::local::PrivateKeySigner,
};
use x402_chain::{
    AlloyChain, Chain, TxConfig,
    eip3009::{cancel_authorization_calldata, transfer_with_authorization_calldata},
};
use x402_engine::{
    config::PolicyConfig,
    domain::{Authorization, ExactPayload, PaymentId, PaymentRecord, PaymentState},
    settle::{Settler, SettlerConfig},
};
use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet as devnet;
use x402_devnet::Anvil;
use x402_devnet::Payer;

const MINTED: u64 = AMOUNT * 10;
const ELSEWHERE: Address = Address::repeat_byte(0x99);

type Setup = ChainSetup;

/// Anvil with the token, `payers` payers holding `MINTED` each, and an
/// in-process node whose merchant m2 batches up to `max_rows`.
async fn setup(payers: usize, max_rows: u32, max_wait_ms: u64) -> Setup {
    ChainSetup::start(payers, MINTED, 2, |config| {
        config.merchants[1].policy = PolicyConfig::Batched { max_rows, max_wait_ms };
    })
    .await
}

/// A payment by `payer` to m2, signed here so the test knows its nonce.
fn payment(payer: &Payer) -> ExactPayload {
    payer.sign_exact(&requirements(PAY_TO_2), now() - 600, now() + 3600, random_nonce())
}

async fn submit(s: &Setup, payloads: &[ExactPayload]) -> Vec<PaymentId> {
    let mut m2 = payments(s.node.endpoints().grpc, M2_KEY).await;
    let req = requirements(PAY_TO_2);
    let requests = payloads.iter().enumerate().map(|(i, p)| exact_submit(i as u64, &req, p)).collect();
    let accepted = stream_all(&mut m2, requests).await;
    assert!(accepted.iter().all(|r| outcome(r) == pb::Outcome::Accepted));
    accepted.iter().map(|r| PaymentId(B256::from_slice(&r.payment_id))).collect()
}

async fn records(s: &Setup, ids: &[PaymentId]) -> Vec<PaymentRecord> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(s.node.engine().payment(*id).await.unwrap().unwrap());
    }
    out
}

/// Waits until no payment is open any more.
async fn concluded(s: &Setup, ids: &[PaymentId]) -> Vec<PaymentRecord> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let now = records(s, ids).await;
        let open = now.iter().filter(|r| r.status.state.is_open()).count();
        if open == 0 {
            return now;
        }
        assert!(tokio::time::Instant::now() < deadline, "{open} of {} still open", ids.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every payment is `Submitted`.
async fn submitted(s: &Setup, ids: &[PaymentId]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !records(s, ids).await.iter().all(|r| r.status.state == PaymentState::Submitted) {
        assert!(tokio::time::Instant::now() < deadline, "not all submitted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `input` to the token from a key of its own, with a priority fee
/// far above the settler's so that it goes first in a block; not awaited.
async fn send_ahead(s: &Setup, input: Bytes) -> B256 {
    let key = PrivateKeySigner::random();
    s.control.anvil_set_balance(key.address(), U256::from(10u128.pow(20))).await.unwrap();
    let provider = ProviderBuilder::new().wallet(key).connect_http(s.anvil.endpoint().parse().unwrap());
    let tx = TransactionRequest::default()
        .with_to(TOKEN)
        .with_input(input)
        .with_gas_limit(200_000)
        .with_max_fee_per_gas(500_000_000_000)
        .with_max_priority_fee_per_gas(100_000_000_000);
    *provider.send_transaction(tx).await.unwrap().tx_hash()
}

/// Spends the payment's nonce on a different transfer, drains the second
/// payer's balance, and cancels the third payment's authorization: each
/// with a transaction of the payer's own. The fourth payment is sent by
/// someone else first (its own authorization, to its payee).
async fn sabotage(s: &Setup, rows: [(&Payer, &ExactPayload); 4]) -> Vec<B256> {
    let req = requirements(ELSEWHERE);
    let [(used_by, used), (drained_by, _), (cancelled_by, cancelled), (_, front_run)] = rows;

    let same_nonce = used_by.sign_exact(&req, now() - 600, now() + 3600, used.authorization.nonce);
    let sig: [u8; 65] = same_nonce.signature.as_slice().try_into().unwrap();
    let spend = transfer_with_authorization_calldata(&(&same_nonce.authorization).into(), &sig);

    let all = Authorization { value: U256::from(MINTED), ..payment(drained_by).authorization };
    let all = Authorization { to: ELSEWHERE, ..all };
    let sig: [u8; 65] = drained_by.sign_authorization(&req, &all).as_slice().try_into().unwrap();
    let drain = transfer_with_authorization_calldata(&(&all).into(), &sig);

    let nonce = cancelled.authorization.nonce;
    let sig = cancelled_by.sign_cancel(&requirements(PAY_TO_2), nonce);
    let cancel = cancel_authorization_calldata(cancelled_by.address(), nonce, &sig);

    let sig: [u8; 65] = front_run.signature.as_slice().try_into().unwrap();
    let front_run = transfer_with_authorization_calldata(&(&front_run.authorization).into(), &sig);

    let mut hashes = Vec::new();
    for input in [spend, drain, cancel, front_run] {
        hashes.push(send_ahead(s, input).await);
    }
    hashes
}

/// The three sabotaged rows failed with their reasons (the cancelled one
/// naming the cancellation), the one sent by someone else is confirmed
/// with that transaction, every other row is confirmed in one successful
/// batch, and the merchant got exactly those.
async fn three_failed_rest_confirmed(s: &Setup, settled: &[PaymentRecord], sabotage: &[B256]) {
    let reason = |i: usize| settled[i].status.failure_reason.clone().unwrap_or_default();
    assert_eq!(settled[0].status.state, PaymentState::Failed);
    assert_eq!(reason(0), "invalid_exact_evm_nonce_already_used");
    assert_eq!(settled[1].status.state, PaymentState::Failed);
    assert_eq!(reason(1), "invalid_exact_evm_insufficient_balance");
    assert_eq!(settled[2].status.state, PaymentState::Failed);
    assert_eq!(reason(2), "invalid_exact_evm_authorization_canceled", "a cancellation is recorded as such");
    assert_eq!(settled[2].status.transaction, Some(sabotage[2]));
    assert_eq!(
        settled[3].status.state,
        PaymentState::Confirmed,
        "paid by someone else's transaction: {:?}",
        settled[3]
    );
    assert_eq!(settled[3].status.transaction, Some(sabotage[3]));
    let rest = &settled[4..];
    assert!(rest.iter().all(|r| r.status.state == PaymentState::Confirmed), "{rest:?}");
    let txs: HashSet<_> = rest.iter().map(|r| r.status.transaction.unwrap()).collect();
    assert_eq!(txs.len(), 1, "one batch");
    let receipt = s.chain.receipt(*txs.iter().next().unwrap()).await.unwrap().unwrap();
    assert!(receipt.success, "the batch as a whole did not revert");
    let paid = rest.len() as u64 + 1;
    assert_eq!(s.chain.token_balance(TOKEN, PAY_TO_2).await.unwrap(), U256::from(AMOUNT * paid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_payments_settle_in_at_most_five_transactions() {
    let s = setup(100, 250, 2_000).await;
    let settler = Settler::spawn(s.node.engine().clone(), s.chain.clone(), SettlerConfig::default(), None);
    let payloads: Vec<_> = (0..1000).map(|i| payment(&s.payers[i % 100])).collect();
    let ids = submit(&s, &payloads).await;
    let settled = concluded(&s, &ids).await;
    settler.abort();

    assert!(settled.iter().all(|r| r.status.state == PaymentState::Confirmed));
    let txs: HashSet<_> = settled.iter().map(|r| r.status.transaction.unwrap()).collect();
    assert!(txs.len() <= 5, "{} transactions", txs.len());
    assert_eq!(s.chain.token_balance(TOKEN, PAY_TO_2).await.unwrap(), U256::from(AMOUNT * 1000));
    for payer in &s.payers {
        assert_eq!(s.chain.token_balance(TOKEN, payer.address()).await.unwrap(), U256::ZERO);
    }
    for (record, payload) in settled.iter().zip(&payloads) {
        let a = &payload.authorization;
        assert!(s.chain.authorization_state(TOKEN, a.from, a.nonce).await.unwrap());
        let receipt = s.chain.receipt(record.status.transaction.unwrap()).await.unwrap().unwrap();
        assert!(receipt.used(TOKEN, a.from, a.nonce));
        assert_eq!(receipt.block, record.status.block.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_sabotaged_before_sending_fail_alone() {
    let s = setup(20, 100, 300).await;
    let payloads: Vec<_> = s.payers.iter().map(payment).collect();
    let ids = submit(&s, &payloads).await;
    let rows = std::array::from_fn(|i| (&s.payers[i], &payloads[i]));
    let sabotage_txs = sabotage(&s, rows).await;
    for tx in &sabotage_txs {
        assert!(s.chain.wait_receipt(&[*tx], Duration::from_secs(10)).await.unwrap().unwrap().success);
    }

    let settler = Settler::spawn(s.node.engine().clone(), s.chain.clone(), SettlerConfig::default(), None);
    let settled = concluded(&s, &ids).await;
    settler.abort();
    three_failed_rest_confirmed(&s, &settled, &sabotage_txs).await;
    // Taken out before sending: the failed rows name no transaction of x402d's.
    assert!(settled[..2].iter().all(|r| r.status.transaction.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_sabotaged_between_simulation_and_inclusion_fail_alone() {
    let s = setup(20, 100, 300).await;
    // Transactions wait in the mempool until the test mines.
    s.control.anvil_set_auto_mine(false).await.unwrap();
    let settler = Settler::spawn(s.node.engine().clone(), s.chain.clone(), SettlerConfig::default(), None);
    let payloads: Vec<_> = s.payers.iter().map(payment).collect();
    let ids = submit(&s, &payloads).await;
    // The batch was simulated clean and is broadcast; now the payers strike,
    // paying more for their transactions to go first.
    submitted(&s, &ids).await;
    let sabotage_txs = sabotage(&s, std::array::from_fn(|i| (&s.payers[i], &payloads[i]))).await;
    s.control.anvil_mine(Some(1), None).await.unwrap();
    devnet::set_interval_mining(s.anvil.endpoint(), 1).await.unwrap();

    let settled = concluded(&s, &ids).await;
    settler.abort();
    three_failed_rest_confirmed(&s, &settled, &sabotage_txs).await;
    // They were in the batch: the failed rows name its transaction.
    let batch = settled[4].status.transaction;
    assert!(settled[..2].iter().all(|r| r.status.transaction == batch));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_a_batch_broadcast_settles_each_row_once() {
    let anvil = Anvil::spawn(&[]).unwrap();
    let payers: Vec<Payer> = (0..10).map(|_| Payer::random()).collect();
    let addresses: Vec<_> = payers.iter().map(Payer::address).collect();
    devnet::deploy(anvil.endpoint(), &addresses, U256::from(MINTED)).await.unwrap();
    let signer = PrivateKeySigner::random();
    devnet::fund_ether(anvil.endpoint(), &[signer.address()]).await.unwrap();
    let control: RootProvider = ProviderBuilder::default().connect_http(anvil.endpoint().parse().unwrap());
    control.anvil_set_auto_mine(false).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let chain = ChainSection::new(anvil.endpoint(), &signer, None, "");
    let config = format!("{}{}", config(dir.path()), chain.toml);
    let env = chain.env(&[]);
    let mut daemon = Daemon::start_with_env(dir.path(), &config, &env);
    let mut m2 = payments(daemon.grpc, M2_KEY).await;
    let requests = (0..50).map(|i| signed_submit(&payers[i % 10], PAY_TO_2, i as u64)).collect();
    let accepted = stream_all(&mut m2, requests).await;
    assert!(accepted.iter().all(|r| outcome(r) == pb::Outcome::Accepted));

    let statuses = |client: &Payments| {
        let mut client = client.clone();
        let ids: Vec<_> = accepted.iter().map(|r| r.payment_id.clone()).collect();
        async move {
            let mut out = Vec::new();
            for id in ids {
                let get = pb::GetPaymentRequest { payment_id: id };
                out.push(client.get_payment(get).await.unwrap().into_inner().status.unwrap());
            }
            out
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !statuses(&m2).await.iter().all(|s| s.state == pb::PaymentState::Submitted as i32) {
        assert!(tokio::time::Instant::now() < deadline, "the batch was not broadcast");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.kill();
    // Mined while x402d is down.
    control.anvil_mine(Some(1), None).await.unwrap();
    control.anvil_set_auto_mine(true).await.unwrap();

    let daemon = Daemon::start_with_env(dir.path(), &config, &env);
    let m2 = payments(daemon.grpc, M2_KEY).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let done = loop {
        let now = statuses(&m2).await;
        if now.iter().all(|s| s.state == pb::PaymentState::Confirmed as i32) {
            break now;
        }
        assert!(tokio::time::Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let txs: HashSet<_> = done.iter().map(|s| s.transaction.clone()).collect();
    assert_eq!(txs.len(), 1, "the one batch, concluded after the restart");
    let chain = AlloyChain::connect(anvil.endpoint(), Vec::new(), TxConfig::default()).await.unwrap();
    assert_eq!(chain.token_balance(TOKEN, PAY_TO_2).await.unwrap(), U256::from(AMOUNT * 50));
    for payer in &addresses {
        assert_eq!(chain.token_balance(TOKEN, *payer).await.unwrap(), U256::from(MINTED - AMOUNT * 5));
    }
    // One transaction was ever sent by the settlement key.
    assert_eq!(control.get_transaction_count(signer.address()).await.unwrap(), 1);
}

/// An authorization another facilitator settled before x402d accepted it
/// (the payer replays it here): its old transfer paid for something else,
/// so it is `Failed`, never `Confirmed` with the old transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_settled_before_it_was_accepted_is_not_confirmed_by_that_transfer() {
    let s = setup(2, 100, 300).await;
    let payloads: Vec<_> = s.payers.iter().map(payment).collect();
    // Settled elsewhere first, to this merchant, for this very value.
    let sig: [u8; 65] = payloads[0].signature.as_slice().try_into().unwrap();
    let elsewhere =
        send_ahead(&s, transfer_with_authorization_calldata(&(&payloads[0].authorization).into(), &sig)).await;
    assert!(s.chain.wait_receipt(&[elsewhere], Duration::from_secs(10)).await.unwrap().unwrap().success);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let ids = submit(&s, &payloads).await;
    let settler = Settler::spawn(s.node.engine().clone(), s.chain.clone(), SettlerConfig::default(), None);
    let settled = concluded(&s, &ids).await;
    settler.abort();
    assert_eq!(settled[0].status.state, PaymentState::Failed, "{:?}", settled[0].status);
    assert_eq!(settled[0].status.failure_reason.as_deref(), Some("invalid_exact_evm_nonce_already_used"));
    assert_eq!(settled[1].status.state, PaymentState::Confirmed);
    assert_eq!(s.chain.token_balance(TOKEN, PAY_TO_2).await.unwrap(), U256::from(AMOUNT * 2), "paid once each");
}

/// A batch whose nonce another transaction of its signer took (the key used
/// elsewhere at once) can never be mined: it is abandoned, and each row is
/// concluded by what the chain says of its authorization. One cancelled by
/// its payer is `Failed` as cancelled (never `Confirmed`), one someone else
/// sent to its payee is `Confirmed` with that transaction, and one still
/// unspent is queued again and settled in a new batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_batch_concludes_each_row_by_how_its_authorization_was_spent() {
    let s = setup(3, 100, 300).await;
    s.control.anvil_set_auto_mine(false).await.unwrap();
    let config = SettlerConfig {
        receipt_timeout: Duration::from_secs(2),
        stuck_after: Duration::from_secs(1),
        max_bumps: 0,
        ..SettlerConfig::default()
    };
    let settler = Settler::spawn(s.node.engine().clone(), s.chain.clone(), config, None);
    let payloads: Vec<_> = s.payers.iter().map(payment).collect();
    let ids = submit(&s, &payloads).await;
    submitted(&s, &ids).await;
    let intents = s.node.engine().intents().await.unwrap();
    let [intent] = intents.as_slice() else { panic!("one batch: {intents:?}") };

    // The first payer cancels its authorization, the second's is sent to
    // its payee by someone else, and the batch's nonce goes to another
    // transaction of the same key (far higher fees: it replaces the batch).
    let nonce = payloads[0].authorization.nonce;
    let sig = s.payers[0].sign_cancel(&requirements(PAY_TO_2), nonce);
    let cancel = send_ahead(&s, cancel_authorization_calldata(s.payers[0].address(), nonce, &sig)).await;
    let sig: [u8; 65] = payloads[1].signature.as_slice().try_into().unwrap();
    let relayed =
        send_ahead(&s, transfer_with_authorization_calldata(&(&payloads[1].authorization).into(), &sig)).await;
    s.control.anvil_impersonate_account(intent.signer).await.unwrap();
    let taker = TransactionRequest::default()
        .with_from(intent.signer)
        .with_to(intent.signer)
        .with_nonce(intent.nonce)
        .with_gas_limit(21_000)
        .with_max_fee_per_gas(2_000_000_000_000)
        .with_max_priority_fee_per_gas(1_000_000_000_000);
    let taker = *s.control.send_transaction(taker).await.unwrap().tx_hash();
    s.control.anvil_mine(Some(1), None).await.unwrap();
    for tx in [cancel, relayed, taker] {
        assert!(s.chain.receipt(tx).await.unwrap().expect("mined").success);
    }
    assert!(s.chain.receipt(intent.tx_hashes[0]).await.unwrap().is_none(), "the batch was replaced");
    devnet::set_interval_mining(s.anvil.endpoint(), 1).await.unwrap();

    let settled = concluded(&s, &ids).await;
    settler.abort();
    assert_eq!(settled[0].status.state, PaymentState::Failed, "{:?}", settled[0].status);
    assert_eq!(settled[0].status.failure_reason.as_deref(), Some("invalid_exact_evm_authorization_canceled"));
    assert_eq!(settled[0].status.transaction, Some(cancel));
    assert_eq!(settled[1].status.state, PaymentState::Confirmed, "{:?}", settled[1].status);
    assert_eq!(settled[1].status.transaction, Some(relayed));
    assert_eq!(settled[2].status.state, PaymentState::Confirmed, "{:?}", settled[2].status);
    let batch = settled[2].status.transaction.unwrap();
    assert!(s.chain.receipt(batch).await.unwrap().unwrap().success);
    assert_eq!(s.chain.token_balance(TOKEN, PAY_TO_2).await.unwrap(), U256::from(AMOUNT * 2), "paid once each");
    assert!(s.node.engine().intents().await.unwrap().iter().all(|i| i.key() != intent.key()), "abandoned");
}
