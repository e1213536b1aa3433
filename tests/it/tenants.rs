//! The adversarial multi-tenant soak: honest merchants stream exact
//! payments (direct and batched) and vouchers at a fixed rate, beside a
//! hostile merchant that replays their payments over gRPC and HTTP, calls
//! their channels, floods settlement watches from sequence 0, sends
//! malformed and oversized input and pays from a payer with code, while
//! the provider's latency spikes and it rate-limits.
//!
//! Measured: the honest gateways' ack latency, that everything they were
//! told was accepted settles, that the hostile merchant got nothing
//! (served nothing, moved nothing, saw nothing of the others), and the
//! process's memory and file descriptors before and after.
//!
//! `X402D_SOAK_SECS` sets how long the load runs (default 15).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use alloy::{
    primitives::{Address, B256, U256, address},
    providers::ext::AnvilApi,
};
use x402_chain::Chain;
use x402_engine::{
    domain::{PaymentId, PaymentState},
    facilitator::exact_request_json,
};
use x402_proto::v1 as pb;

use crate::{
    channels::{self, MC_KEY, PRICE, Setup},
    common::*,
    rpc_proxy::{Fault, FaultProxy},
};
use x402_devnet::Payer;

const MX_KEY: &str = "test-merchant-hostile-key-01";
const HOSTILE_PAY_TO: Address = address!("0x976EA74026E726554dB657fA54763abd0C3a0aa9");

/// The process's resident memory (KiB) and open file descriptors.
fn resources() -> (u64, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (rss, std::fs::read_dir("/proc/self/fd").unwrap().count())
}

#[derive(Default)]
struct Honest {
    /// Accepted exact payments: the request, the payment, its id and its
    /// merchant's `pay_to`.
    accepted: Vec<(pb::SubmitRequest, x402_engine::domain::ExactPayload, PaymentId, Address)>,
    vouchers: Vec<u64>,
    latencies: Vec<Duration>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tenants_get_nothing_and_honest_ones_lose_nothing() {
    const CHANNELS: usize = 2;
    let secs: u64 = std::env::var("X402D_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let s = Setup::new(6).await;
    for payer in &s.payers[..CHANNELS] {
        s.deposit(payer, 1_000_000).await;
    }
    // A payer with code (a contract wallet, or a 7702-delegated account).
    let coded = s.payers[5].clone();
    s.wallet.anvil_set_code(coded.address(), vec![0x60, 0x00, 0xf3].into()).await.unwrap();
    x402_devnet::set_interval_mining(s.anvil.endpoint(), 1).await.unwrap();
    let proxy = FaultProxy::start(s.anvil.endpoint()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = s.node_config(dir.path(), Setup::merchant(2), |chain| {
        chain.rpc_url = proxy.url.clone();
        chain.rpc_timeout_ms = 2_000;
    });
    config.merchants.push(merchant_config("mx", HOSTILE_PAY_TO, MX_KEY, x402_engine::config::PolicyConfig::Direct));
    let node = start_node(&config).await;
    let (grpc, http) = (node.endpoints().grpc, node.endpoints().http);
    // Latency spikes and rate limits: 5% of node requests.
    proxy.inject(50, &[Fault::Slow, Fault::RateLimited], 0x7e4a);
    let before = resources();

    let honest = Arc::new(Mutex::new(Honest { vouchers: vec![0; CHANNELS], ..Honest::default() }));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    // Honest exact payments, 10 a second, a quarter direct.
    {
        let (honest, payers) = (honest.clone(), s.payers.clone());
        tasks.push(tokio::spawn(async move {
            let mut m1 = payments(grpc, M1_KEY).await;
            let mut m2 = payments(grpc, M2_KEY).await;
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let payer = &payers[2 + n as usize % 3];
                let (client, pay_to) = if n.is_multiple_of(4) { (&mut m1, PAY_TO) } else { (&mut m2, PAY_TO_2) };
                let req = requirements(pay_to);
                let payload = payer.sign_exact(&req, now() - 600, now() + 3600, random_nonce());
                let mut request = exact_submit(n, &req, &payload);
                request.idempotency_key = format!("honest-{n:012}");
                let started = Instant::now();
                let resp = loop {
                    assert!(started.elapsed() < Duration::from_secs(60), "no answer in a minute");
                    match client.submit(request.clone()).await {
                        Ok(resp) => break resp.into_inner(),
                        Err(status) if status.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(status) => panic!("{status:?}"),
                    }
                };
                assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");
                let id = PaymentId(B256::from_slice(&resp.payment_id));
                {
                    let mut h = honest.lock().unwrap();
                    h.latencies.push(started.elapsed());
                    h.accepted.push((request, payload, id, pay_to));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // Honest vouchers, one channel per task.
    for c in 0..CHANNELS {
        let (honest, payer, channel) = (honest.clone(), s.payers[c].clone(), s.config(&s.payers[c]));
        tasks.push(tokio::spawn(async move {
            let mut mc = payments(grpc, MC_KEY).await;
            let mut charged = 0u128;
            while Instant::now() < deadline {
                let request = channels::voucher(charged as u64, &payer, &channel, charged, PRICE);
                let resp = mc.submit(request).await.unwrap().into_inner();
                assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");
                charged += PRICE;
                honest.lock().unwrap().vouchers[c] += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // The hostile merchant: replays, other tenants' channels, malformed
    // and oversized input, a payer with code.
    let hostile = {
        let (honest, channel_ids) = (
            honest.clone(),
            s.payers[..CHANNELS].iter().map(|p| Setup::domain().channel_id(&s.config(p))).collect::<Vec<_>>(),
        );
        tokio::spawn(async move {
            let mut mx = payments(grpc, MX_KEY).await;
            let mut m1 = payments(grpc, M1_KEY).await;
            let mut m2 = payments(grpc, M2_KEY).await;
            let web = reqwest::Client::new();
            let post = |path: &str, key: &str, body: String| {
                web.post(format!("http://{http}{path}"))
                    .bearer_auth(key)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
            };
            let mut attempts = 0u64;
            while Instant::now() < deadline {
                let replay = honest.lock().unwrap().accepted.last().cloned();
                if let Some((mut request, payload, _, pay_to)) = replay {
                    let (own, own_key) = if pay_to == PAY_TO { (&mut m1, M1_KEY) } else { (&mut m2, M2_KEY) };
                    // Over gRPC: as another merchant, and as its own merchant without its key.
                    let foreign = mx.submit(request.clone()).await.map(|r| outcome(r.get_ref()));
                    assert_ne!(foreign.ok(), Some(pb::Outcome::Accepted), "another merchant's payment served");
                    request.idempotency_key.clear();
                    let again = own.submit(request.clone()).await.unwrap().into_inner();
                    assert_eq!(outcome(&again), pb::Outcome::Duplicate, "a replay to its own merchant: {again:?}");
                    // Over HTTP: /settle and /verify refuse it, to its own merchant too.
                    let body = exact_request_json(&requirements(pay_to), &payload).to_string();
                    for (path, key) in
                        [("/settle", own_key), ("/settle", MX_KEY), ("/verify", own_key), ("/verify", MX_KEY)]
                    {
                        let answer: serde_json::Value =
                            post(path, key, body.clone()).await.unwrap().json().await.unwrap();
                        let ok = answer["success"] == true || answer["isValid"] == true;
                        assert!(!ok, "{path} as {key} accepted a replay to {pay_to}: {answer}");
                        if key == own_key {
                            let reason = answer["errorReason"].as_str().or(answer["invalidReason"].as_str());
                            assert_eq!(reason, Some("invalid_exact_evm_nonce_already_used"), "{answer}");
                        }
                    }
                    attempts += 6;
                }
                // Other tenants' channels.
                for id in &channel_ids {
                    let refused = |code: Option<tonic::Code>| {
                        matches!(code, Some(tonic::Code::NotFound | tonic::Code::PermissionDenied))
                    };
                    let claim = mx.claim_channel(pb::ClaimChannelRequest { channel_id: id.to_vec() }).await;
                    assert!(
                        refused(claim.as_ref().err().map(tonic::Status::code)),
                        "another's channel claimed: {claim:?}"
                    );
                    let refund = pb::RefundChannelRequest { channel_id: id.to_vec(), amount: String::new() };
                    let refund = mx.refund_channel(refund).await;
                    assert!(refused(refund.as_ref().err().map(tonic::Status::code)), "another's channel: {refund:?}");
                    attempts += 2;
                }
                // Malformed and oversized input.
                for body in ["{", "[]", "{\"x402Version\":2,\"paymentPayload\":7}"] {
                    let status = post("/settle", MX_KEY, body.into()).await.unwrap().status();
                    assert!(status.is_client_error(), "{body}: {status}");
                }
                let huge = format!("{{\"x402Version\":2,\"pad\":\"{}\"}}", "x".repeat(4 << 20));
                let status = post("/verify", MX_KEY, huge).await.map(|r| r.status());
                assert!(status.is_err() || status.unwrap().is_client_error(), "an oversized body was read");
                let mut header = signed_submit(&Payer::random(), HOSTILE_PAY_TO, 1);
                header.payment = Some(pb::submit_request::Payment::PaymentSignatureHeader("!!".repeat(5_000)));
                assert!(mx.submit(header).await.is_err(), "a malformed header was taken");
                attempts += 5;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            attempts
        })
    };
    // Watches from sequence 0 by the hostile merchant: they see nothing of the others.
    let mut watches = Vec::new();
    for _ in 0..16 {
        let mut mx = payments(grpc, MX_KEY).await;
        let mut stream =
            mx.watch_settlements(pb::WatchSettlementsRequest { after_sequence: 0 }).await.unwrap().into_inner();
        watches.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                    Ok(Ok(Some(event))) => panic!("the hostile merchant saw another's event: {event:?}"),
                    Ok(other) => panic!("the watch ended: {other:?}"),
                    Err(_) => {}
                }
            }
        }));
    }
    // The payer with code pays the hostile merchant: refused.
    let mut mx = payments(grpc, MX_KEY).await;
    let coded_payment = signed_submit(&coded, HOSTILE_PAY_TO, 1);
    let answer = loop {
        match mx.submit(coded_payment.clone()).await {
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answer => break answer.unwrap().into_inner(),
        }
    };
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a payer with code: {answer:?}");
    assert_eq!(answer.reason, "invalid_exact_evm_signature", "{answer:?}");

    for task in tasks {
        task.await.unwrap();
    }
    let attempts = hostile.await.unwrap();
    for watch in watches {
        watch.await.unwrap();
    }
    proxy.heal();

    // Everything the honest merchants were told was accepted settles.
    let (accepted, vouchers, mut latencies) = {
        let h = honest.lock().unwrap();
        (h.accepted.clone(), h.vouchers.clone(), h.latencies.clone())
    };
    let engine = node.engine();
    channels::eventually(180, "every honest payment confirmed and every channel claimed", || async {
        for (_, _, id, _) in &accepted {
            let record = engine.payment(*id).await.unwrap().unwrap();
            assert_ne!(record.status.state, PaymentState::Failed, "{:?}", record.status);
            if record.status.state != PaymentState::Confirmed {
                return false;
            }
        }
        for (c, n) in vouchers.iter().enumerate() {
            if s.onchain(&s.payers[c]).await.1 != PRICE * u128::from(*n as u32) {
                return false;
            }
        }
        true
    })
    .await;
    let chain = x402_chain::AlloyChain::connect(s.anvil.endpoint(), Vec::new(), Default::default()).await.unwrap();
    let paid = |to: Address| U256::from(AMOUNT) * U256::from(accepted.iter().filter(|(_, _, _, t)| *t == to).count());
    assert_eq!(chain.token_balance(TOKEN, PAY_TO).await.unwrap(), paid(PAY_TO));
    assert_eq!(chain.token_balance(TOKEN, PAY_TO_2).await.unwrap(), paid(PAY_TO_2));
    assert_eq!(
        chain.token_balance(TOKEN, HOSTILE_PAY_TO).await.unwrap(),
        U256::ZERO,
        "the hostile merchant got nothing"
    );
    let after = resources();

    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "tenant soak: {secs} s; honest: {} payments and {} vouchers, all settled, ack p50 {:?} p99 {:?}; hostile: {attempts} \
         replays, foreign channel calls and malformed requests, 16 watches from 0, all refused or empty; RSS {} -> {} \
         MiB, fds {} -> {}; provider faults {:?}",
        accepted.len(),
        vouchers.iter().sum::<u64>(),
        p(0.5),
        p(0.99),
        before.0 >> 10,
        after.0 >> 10,
        before.1,
        after.1,
        proxy.injected(),
    );
    assert!(after.1 < before.1 + 100, "file descriptors grew from {} to {}", before.1, after.1);
}
