//! The adversarial multi-tenant soak: honest merchants stream exact
//! payments (direct and batched) and vouchers at a fixed rate, beside a
//! hostile merchant that replays their payments over gRPC and HTTP, calls
//! their channels, floods settlement watches from sequence 0, sends
//! malformed and oversized input, floods a stream with payments from
//! unfunded payers and pays from a payer with code; a
//! hostile payer parks vouchers behind slow deposits and opens 1-wei
//! channels; the provider's latency spikes and it rate-limits, and the
//! node's clock steps by up to 20 s ahead and back (the chain's time,
//! which the clock never reads below, catches the steps back up).
//!
//! Measured: the honest gateways' ack latency, that everything they were
//! told was accepted settles (payments due within 40 s too, with
//! the clock 20 s ahead), that the hostile merchant got nothing (served
//! nothing, moved nothing, saw nothing of the others), the accounting (what
//! the ledger confirms is what moved on chain, no reservation outlives its
//! payment, no payment stays open past its `validBefore`), and the
//! process's memory, file descriptors and settlement queue before and
//! after.
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
    domain::{Clock, IntentState, PaymentId, PaymentInput, PaymentState, Submission},
    facilitator::exact_request_json,
    node::Node,
    pipeline::SubmitOutcome,
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
    /// Accepted payments due in 40 s.
    short: Vec<(x402_engine::domain::ExactPayload, PaymentId, Address)>,
    /// Payments due in 40 s refused at once, the clock ahead.
    refused_short: u64,
    vouchers: Vec<u64>,
    latencies: Vec<Duration>,
}

/// The clock steps the soak puts the node through, in seconds from true time.
const CLOCK_OFFSETS: [i64; 5] = [-20, -10, 0, 10, 20];
/// Vouchers sent behind each parked channel's deposit, before any answer.
const PARKED: u64 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tenants_get_nothing_and_honest_ones_lose_nothing() {
    const CHANNELS: usize = 2;
    let secs: u64 = std::env::var("X402D_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let s = Setup::new(7).await;
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
        chain.min_deposit = Some("100".into());
    });
    config.merchants.push(merchant_config("mx", HOSTILE_PAY_TO, MX_KEY, x402_engine::config::PolicyConfig::Direct));
    let clock = Clock::stepping();
    let node = Node::start_with_clock(&config, clock.clone()).await.unwrap();
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
                // One in five is due in 40 s: through the clock's steps it is
                // settled in time, or (the clock ahead) refused up front.
                let short = n.is_multiple_of(5);
                let valid_before = now() + if short { 40 } else { 3600 };
                let payload = payer.sign_exact(&req, now() - 600, valid_before, random_nonce());
                let mut request = exact_submit(n, &req, &payload);
                request.idempotency_key = format!("honest-{n:012}");
                let started = Instant::now();
                let resp = answered(client, &request).await;
                if short && outcome(&resp) == pb::Outcome::Rejected {
                    // Refused up front by a clock ahead: too little time
                    // left to settle it, by that clock. Nobody is served.
                    assert_eq!(resp.reason, "invalid_exact_evm_payload_authorization_valid_before", "{resp:?}");
                    honest.lock().unwrap().refused_short += 1;
                    continue;
                }
                assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");
                let id = PaymentId(B256::from_slice(&resp.payment_id));
                {
                    let mut h = honest.lock().unwrap();
                    h.latencies.push(started.elapsed());
                    if short {
                        h.short.push((payload, id, pay_to));
                    } else {
                        h.accepted.push((request, payload, id, pay_to));
                    }
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
    // The node's clock steps back and forth.
    let stepper = {
        let clock = clock.clone();
        tokio::spawn(async move {
            let (mut rng, mut offset, mut steps) = (0x5eed_u64, 0i64, 0u64);
            while Instant::now() < deadline {
                rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let target = CLOCK_OFFSETS[(rng >> 33) as usize % CLOCK_OFFSETS.len()] * 1000;
                if target != offset {
                    clock.step(target - offset);
                    (offset, steps) = (target, steps + 1);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            clock.step(-offset);
            steps
        })
    };
    // A hostile payer: each round a 1-wei channel (refused before anything
    // goes on chain), then a channel whose vouchers are sent right behind
    // its deposit, parked there until it lands through the slow provider.
    let parker = {
        let payer = s.payers[6].clone();
        let salts = 2 * (secs as usize * 4 + 8);
        let mut configs: Vec<_> = (1..=salts).map(|i| s.salted_config(&payer, B256::from(U256::from(i)))).collect();
        configs.reverse();
        tokio::spawn(async move {
            let mut mc = payments(grpc, MC_KEY).await;
            let (mut opened, mut tiny) = (Vec::new(), Vec::new());
            while Instant::now() < deadline {
                let (Some(one_wei), Some(config)) = (configs.pop(), configs.pop()) else { break };
                let answer = answered(&mut mc, &channels::deposit_voucher(1, &payer, &one_wei, 1)).await;
                assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a 1-wei channel: {answer:?}");
                tiny.push(one_wei);
                let (tx, rx) = tokio::sync::mpsc::channel(PARKED as usize + 1);
                tx.send(channels::deposit_voucher(0, &payer, &config, 1_000)).await.unwrap();
                for n in 1..=PARKED {
                    tx.send(channels::voucher(n, &payer, &config, PRICE * u128::from(n), PRICE)).await.unwrap();
                }
                let Ok(answers) = mc.submit_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await else {
                    continue;
                };
                let mut answers = answers.into_inner();
                let mut accepted = 0u128;
                for _ in 0..=PARKED {
                    match answers.message().await {
                        Ok(Some(a)) if outcome(&a) == pb::Outcome::Accepted => accepted += 1,
                        Ok(Some(_)) => {}
                        _ => break,
                    }
                }
                opened.push((config, PRICE * accepted));
            }
            (opened, tiny)
        })
    };
    // A hostile flood: bursts of payments from payers nobody funded, 200 at
    // once over one stream, each payer new (so not cached: the node reads
    // its balance).
    let flood = tokio::spawn(async move {
        let mut mx = payments(grpc, MX_KEY).await;
        let mut sent = 0u64;
        while Instant::now() < deadline {
            let burst: Vec<_> = (0..200).map(|i| signed_submit(&Payer::random(), HOSTILE_PAY_TO, i)).collect();
            for answer in stream_all(&mut mx, burst).await {
                // Refused for its balance, or UNAVAILABLE when the read of
                // it failed (the provider's faults): never accepted.
                let refused = outcome(&answer) == pb::Outcome::Rejected
                    && answer.reason == "invalid_exact_evm_insufficient_balance";
                let unavailable =
                    outcome(&answer) == pb::Outcome::Error && answer.error_code == tonic::Code::Unavailable as i32;
                assert!(refused || unavailable, "an unfunded payer's payment: {answer:?}");
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        sent
    });
    // The settlement queue, sampled.
    let sampler = {
        let engine = node.engine().clone();
        tokio::spawn(async move {
            let mut deepest = 0;
            while Instant::now() < deadline {
                deepest = deepest.max(engine.settlement_queue_head(100_000).await.unwrap().len());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            deepest
        })
    };
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
    let answer = answered(&mut mx, &signed_submit(&coded, HOSTILE_PAY_TO, 1)).await;
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a payer with code: {answer:?}");
    assert_eq!(answer.reason, "invalid_exact_evm_signature", "{answer:?}");

    for task in tasks {
        task.await.unwrap();
    }
    let attempts = hostile.await.unwrap();
    for watch in watches {
        watch.await.unwrap();
    }
    let clock_steps = stepper.await.unwrap();
    let (opened, tiny) = parker.await.unwrap();
    let deepest_queue = sampler.await.unwrap();
    let flooded = flood.await.unwrap();
    proxy.heal();

    // Everything the honest merchants were told was accepted settles, the
    // payments due soon too: the clock steps do not expire what the chain
    // would still take.
    let (accepted, short, refused_short, vouchers, mut latencies) = {
        let h = honest.lock().unwrap();
        (h.accepted.clone(), h.short.clone(), h.refused_short, h.vouchers.clone(), h.latencies.clone())
    };
    let engine = node.engine();
    channels::eventually(180, "every honest payment concluded and every channel claimed", || async {
        for (_, _, id, _) in &accepted {
            let record = engine.payment(*id).await.unwrap().unwrap();
            assert_ne!(record.status.state, PaymentState::Failed, "{:?}", record.status);
            if record.status.state != PaymentState::Confirmed {
                return false;
            }
        }
        for (payload, id, _) in &short {
            let status = engine.payment(*id).await.unwrap().unwrap().status;
            let left = payload.authorization.valid_before_secs().saturating_sub(now());
            assert!(
                !matches!(status.state, PaymentState::Failed | PaymentState::Expired),
                "a payment due in 40 s, with {left} s still left on chain: {status:?}"
            );
            if status.state != PaymentState::Confirmed {
                return false;
            }
        }
        for (c, n) in vouchers.iter().enumerate() {
            if s.onchain(&s.payers[c]).await.1 != PRICE * u128::from(*n as u32) {
                return false;
            }
        }
        for (config, charged) in &opened {
            if s.onchain_of(config).await.1 != *charged {
                return false;
            }
        }
        true
    })
    .await;
    let chain = x402_chain::AlloyChain::connect(s.anvil.endpoint(), Vec::new(), Default::default()).await.unwrap();
    // What the ledger confirms is what moved on chain, and nothing else did.
    let mut confirmed: Vec<Address> = accepted.iter().map(|(_, _, _, to)| *to).collect();
    for (payload, _, to) in &short {
        let a = &payload.authorization;
        assert!(chain.authorization_state(TOKEN, a.from, a.nonce).await.unwrap(), "confirmed, so spent on chain");
        confirmed.push(*to);
    }
    let paid = |to: Address| U256::from(AMOUNT) * U256::from(confirmed.iter().filter(|t| **t == to).count());
    assert_eq!(chain.token_balance(TOKEN, PAY_TO).await.unwrap(), paid(PAY_TO));
    assert_eq!(chain.token_balance(TOKEN, PAY_TO_2).await.unwrap(), paid(PAY_TO_2));
    let mut spent = U256::ZERO;
    for payer in &s.payers[2..5] {
        spent += U256::from(channels::MINTED) - chain.token_balance(TOKEN, payer.address()).await.unwrap();
    }
    assert_eq!(spent, U256::from(AMOUNT) * U256::from(confirmed.len()), "the payers paid for what was confirmed");
    // No payment is left open (none past its `validBefore`), no intent
    // pending, and no reservation outlives its payment: each payer may pay
    // its whole balance again, and not a unit more.
    assert!(engine.settlement_queue_head(100_000).await.unwrap().is_empty(), "a payment left open");
    // (A claim round may still be concluding its last transaction.)
    channels::eventually(60, "no intent pending", || async {
        engine.intents().await.unwrap().iter().all(|i| i.state != IntentState::Pending)
    })
    .await;
    let m2 = engine.merchant("m2").unwrap();
    for payer in &s.payers[2..5] {
        let balance: u64 = chain.token_balance(TOKEN, payer.address()).await.unwrap().to();
        let fits = |value: u64| {
            let requirements = x402_devnet::dev_requirements(PAY_TO_2, TOKEN, value);
            let payload = payer.sign_exact(&requirements, now() - 600, now() + 600, random_nonce());
            let probe = Submission::new(requirements, PaymentInput::Exact(payload));
            let m2 = m2.clone();
            async move { matches!(engine.verify(m2, probe).await.unwrap(), SubmitOutcome::Verified { .. }) }
        };
        // A settled payment's reservation gives way to the balance read
        // after its settlement: the next read, at most.
        channels::eventually(10, "the whole balance free", || fits(balance)).await;
        assert!(!fits(balance + 1).await, "more than the balance fits");
    }
    // The hostile payer's 1-wei channels hold nothing.
    for config in &tiny {
        assert_eq!(s.onchain_of(config).await, (0, 0), "a 1-wei channel was opened");
    }
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
         replays, foreign channel calls and malformed requests, 16 watches from 0, {flooded} payments from unfunded \
         payers, all refused or empty; {} parked \
         channels ({} vouchers), {} 1-wei channels refused; {clock_steps} clock steps, {} payments due in 40 s all settled \
         ({refused_short} refused up front); settlement queue at most {deepest_queue}; RSS {} -> {} MiB, fds {} -> {}; provider faults \
         {:?}",
        accepted.len() + short.len(),
        vouchers.iter().sum::<u64>(),
        p(0.5),
        p(0.99),
        opened.len(),
        opened.iter().map(|(_, charged)| charged / PRICE).sum::<u128>(),
        tiny.len(),
        short.len(),
        before.0 >> 10,
        after.0 >> 10,
        before.1,
        after.1,
        proxy.injected(),
    );
    // The node's connections to its provider are bounded by its balance
    // reads at once (32, each `balanceOf` and `eth_getCode`) and kept idle
    // for a while; through the in-process proxy each counts three times.
    assert!(after.1 < before.1 + 300, "file descriptors grew from {} to {}", before.1, after.1);
    assert!(deepest_queue < 1_000, "the settlement queue grew to {deepest_queue}");
}

/// Submits `request` until it is answered (a provider fault makes the node
/// answer UNAVAILABLE: retry).
async fn answered(client: &mut Payments, request: &pb::SubmitRequest) -> pb::SubmitResponse {
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(60), "no answer in a minute");
        match client.submit(request.clone()).await {
            Ok(resp) => return resp.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
}
