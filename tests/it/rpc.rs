//! RPC faults, on a real anvil behind [`FaultProxy`]: a node that never
//! answers is given up on, and a soak of all three strategies (direct,
//! batched, payment channels) through a provider that fails a share of
//! every kind of request in every way it can. Every accepted payment ends
//! confirmed exactly once on chain and in the ledger, every voucher is
//! claimed, and no provider's error text reaches a client.
//!
//! `X402D_SOAK_SECS` sets how long the load runs (default 20).

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use alloy::primitives::{Address, B256, U256};
use x402_chain::Chain;
use x402_engine::domain::{IntentState, PaymentId, PaymentState};
use x402_proto::v1 as pb;

use crate::{
    channels::{self, MC_KEY, PRICE, Setup},
    common::*,
    rpc_proxy::{Fault, FaultProxy},
};
use x402_devnet as devnet;

/// A node that takes requests and never answers: each fails after the
/// client's timeout instead of holding its caller forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_answers_is_an_error_after_the_timeout() {
    let anvil = devnet::Anvil::spawn(&[]).unwrap();
    let proxy = FaultProxy::start(anvil.endpoint()).await;
    let config = x402_chain::TxConfig { rpc_timeout: Duration::from_millis(500), ..x402_chain::TxConfig::default() };
    let chain = x402_chain::AlloyChain::connect(&proxy.url, Vec::new(), config).await.unwrap();
    proxy.inject(1000, &[Fault::Hang], 7);
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(30), chain.block_number()).await;
    let answer = answer.expect("an answer, not a wait for ever");
    assert!(answer.is_err(), "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    proxy.heal();
    assert!(chain.block_number().await.is_ok());
}

/// What the gateways saw.
#[derive(Default)]
struct Seen {
    /// Accepted exact payments, with their merchant's `pay_to`.
    accepted: Vec<(PaymentId, Address)>,
    /// Vouchers accepted, per channel (by payer index).
    vouchers: Vec<u64>,
    unavailable: u64,
}

/// Asserts that `message` carries none of the provider's error texts.
fn no_leak(message: &str) {
    for leak in Fault::LEAKS {
        assert!(!message.to_lowercase().contains(leak), "a provider's error reached a client: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_settles_everything_once_through_a_faulty_provider() {
    const PAYERS: usize = 6;
    const CHANNELS: usize = 3;
    const DEPOSIT: u128 = 1_000_000;
    let secs: u64 = std::env::var("X402D_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let s = Setup::new(PAYERS).await;
    for payer in &s.payers[..CHANNELS] {
        s.deposit(payer, DEPOSIT).await;
    }
    devnet::set_interval_mining(s.anvil.endpoint(), 1).await.unwrap();
    let proxy = FaultProxy::start(s.anvil.endpoint()).await;
    let e = s
        .engine_configured(Setup::merchant(2), |chain| {
            chain.rpc_url = proxy.url.clone();
            chain.rpc_timeout_ms = 1_000;
            chain.stuck_after_secs = 4;
            chain.balance_ttl_secs = 2;
        })
        .await;
    let grpc = e.node.endpoints().grpc;
    // 8% of requests fail, in every way there is.
    proxy.inject(80, &Fault::ALL, 0x5eed);

    let seen = Arc::new(Mutex::new(Seen { vouchers: vec![0; CHANNELS], ..Seen::default() }));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    // Exact payments, a quarter direct (m1), the rest batched (m2).
    for c in 0..2usize {
        let (seen, payers) = (seen.clone(), s.payers.clone());
        tasks.push(tokio::spawn(async move {
            let mut m1 = payments(grpc, M1_KEY).await;
            let mut m2 = payments(grpc, M2_KEY).await;
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let payer = &payers[(c + 2 * n as usize) % PAYERS];
                let (client, pay_to) = if n.is_multiple_of(4) { (&mut m1, PAY_TO) } else { (&mut m2, PAY_TO_2) };
                let mut request = signed_submit(payer, pay_to, n);
                request.idempotency_key = format!("rpc{c}-{n:012}");
                let resp = until_answered(client, request, &seen).await;
                assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");
                let id = PaymentId(B256::from_slice(&resp.payment_id));
                seen.lock().unwrap().accepted.push((id, pay_to));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // Vouchers, one channel per task, each after the answer to the last.
    for c in 0..CHANNELS {
        let (seen, payer, config) = (seen.clone(), s.payers[c].clone(), s.config(&s.payers[c]));
        tasks.push(tokio::spawn(async move {
            let mut mc = payments(grpc, MC_KEY).await;
            let mut charged = 0u128;
            while Instant::now() < deadline {
                let request = channels::voucher(charged as u64, &payer, &config, charged, PRICE);
                let resp = until_answered(&mut mc, request, &seen).await;
                assert_eq!(outcome(&resp), pb::Outcome::Accepted, "voucher after {charged}: {resp:?}");
                charged += PRICE;
                seen.lock().unwrap().vouchers[c] += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let injected = proxy.injected();
    proxy.heal();

    // Every accepted payment confirmed, exactly once on chain.
    let (accepted, vouchers, unavailable) = {
        let seen = seen.lock().unwrap();
        (seen.accepted.clone(), seen.vouchers.clone(), seen.unavailable)
    };
    let ids: HashSet<PaymentId> = accepted.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), accepted.len());
    let engine = e.node.engine();
    let wait = Instant::now() + Duration::from_secs(180);
    loop {
        let mut open = Vec::new();
        for id in &ids {
            let record = engine.payment(*id).await.unwrap().expect("an accepted payment is recorded");
            assert_ne!(record.status.state, PaymentState::Failed, "{id:?}: {:?}", record.status);
            if record.status.state != PaymentState::Confirmed {
                open.push(record.status);
            }
        }
        let claimed = futures::future::join_all(s.payers[..CHANNELS].iter().map(|p| s.onchain(p))).await;
        let claims_done = claimed.iter().zip(&vouchers).all(|((_, total), n)| *total == PRICE * u128::from(*n as u32));
        // A claim on chain is recorded concluded once its receipt is read
        // through the faulty provider: a moment later.
        let concluded = engine.intents().await.unwrap().iter().all(|i| !matches!(i.state, IntentState::Pending));
        if open.is_empty() && claims_done && concluded {
            break;
        }
        assert!(
            Instant::now() < wait,
            "{} of {} payments still open ({:?}); channels {claimed:?} of {vouchers:?} vouchers",
            open.len(),
            ids.len(),
            open.first()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let chain = x402_chain::AlloyChain::connect(s.anvil.endpoint(), Vec::new(), Default::default()).await.unwrap();
    let paid = |to: Address| U256::from(AMOUNT) * U256::from(accepted.iter().filter(|(_, t)| *t == to).count());
    assert_eq!(chain.token_balance(TOKEN, PAY_TO).await.unwrap(), paid(PAY_TO), "direct");
    assert_eq!(chain.token_balance(TOKEN, PAY_TO_2).await.unwrap(), paid(PAY_TO_2), "batched");
    // Nothing is left in flight: every intent concluded.
    let pending: Vec<_> =
        engine.intents().await.unwrap().into_iter().filter(|i| matches!(i.state, IntentState::Pending)).collect();
    assert!(pending.is_empty(), "intents left pending: {pending:?}");

    let voucher_count: u64 = vouchers.iter().sum();
    eprintln!(
        "rpc soak: {secs} s, {} requests through the provider, faults injected {injected:?}; {} payments ({} direct, \
         {} batched) confirmed once, {voucher_count} vouchers over {CHANNELS} channels claimed, {unavailable} answers \
         to retry, no provider error text in any answer",
        proxy.requests(),
        accepted.len(),
        accepted.iter().filter(|(_, t)| *t == PAY_TO).count(),
        accepted.iter().filter(|(_, t)| *t == PAY_TO_2).count(),
    );
    assert!(injected.len() >= 8, "most kinds of fault were injected: {injected:?}");
}

/// Submits `request` until it is answered for good, retrying (the same
/// request) while told the node is unavailable; a minute without a final
/// answer fails the test, as does a provider's error text in any answer.
async fn until_answered(client: &mut Payments, request: pb::SubmitRequest, seen: &Mutex<Seen>) -> pb::SubmitResponse {
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(60), "no final answer in a minute");
        let answer = tokio::time::timeout(Duration::from_secs(30), client.submit(request.clone())).await;
        match answer.expect("a submit answered within 30 s") {
            Ok(resp) => {
                let resp = resp.into_inner();
                no_leak(&resp.message);
                return resp;
            }
            Err(status) if status.code() == tonic::Code::Unavailable => {
                no_leak(status.message());
                seen.lock().unwrap().unavailable += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
}

/// A payer's balance, a channel's state or a deposit that the provider
/// fails to read or send: the gateway is told to retry, in x402d's words;
/// the provider's own (which can name its plan, its limits or its URL)
/// stay in x402d's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_error_text_never_reaches_a_client() {
    let s = Setup::new(2).await;
    let proxy = FaultProxy::start(s.anvil.endpoint()).await;
    let e = s.engine_configured(Setup::merchant(3600), |chain| chain.rpc_url = proxy.url.clone()).await;
    let grpc = e.node.endpoints().grpc;
    for fault in [Fault::HeaderNotFound, Fault::Unavailable, Fault::Garbage] {
        proxy.inject(1000, &[fault], 3);
        let mut m1 = payments(grpc, M1_KEY).await;
        let fresh = x402_devnet::Payer::random();
        let status = m1.submit(signed_submit(&fresh, PAY_TO, 1)).await.expect_err("its balance cannot be read");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        no_leak(status.message());
        let mut mc = payments(grpc, MC_KEY).await;
        let payer = &s.payers[0];
        let voucher = channels::voucher(1, payer, &s.config(payer), 0, PRICE);
        let status = mc.submit(voucher).await.expect_err("its channel cannot be read");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        no_leak(status.message());
    }
}
