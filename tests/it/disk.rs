//! Disk and ledger faults under sustained load with settlement running, on
//! a real RocksDB on a small filesystem of its own and a real anvil:
//! random failed, lost-fsync and stalled commits (seeded), a write stall
//! held for seconds, the disk filled for real, bursts of failing commits
//! and unreadable records. Gateways retry what they are told is
//! unavailable, with their idempotency keys, as a real gateway does.
//!
//! Afterwards: every payment acknowledged is in the ledger (read again
//! from disk after the node stopped) and settled exactly once on chain;
//! the ledger holds no payment that was not acknowledged; no reservation
//! is left; nothing waited forever; and acceptance came back by itself
//! once the disk had room.
//!
//! `X402D_SOAK_SECS` sets how long the load runs (default 20).

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use alloy::primitives::{Address, B256, U256};
use x402_chain::Chain;
use x402_engine::{
    domain::{PaymentId, PaymentState, Submission},
    ledger::{Ledger, RocksLedger, RocksOptions},
    pipeline::SubmitOutcome,
    settle::{Settler, SettlerConfig},
    testing::{FaultyLedger, RandomFaults, Tmpfs},
};
use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet::{self as devnet, Payer};

/// What each payer may spend, as configured: far more than the run uses,
/// so that it binds only if reservations leak.
const BALANCE: u64 = 1_000_000_000;
const MINTED: u64 = 1_000_000_000_000;
const PAYERS: usize = 8;
const CLIENTS: usize = 4;
/// Per client, per second.
const RATE: u64 = 12;

/// What the gateways saw.
#[derive(Default)]
struct Seen {
    /// Acknowledged payments, with their merchant's `pay_to`.
    accepted: Vec<(PaymentId, Address)>,
    /// When each was acknowledged, and how long its answer took (retries included).
    acked_at: Vec<(Instant, Duration)>,
    unavailable: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_faults_under_load_lose_nothing_and_acceptance_resumes_by_itself() {
    // At least 12 s: the phases of faults take that long.
    let secs: u64 = std::env::var("X402D_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20).max(12);
    let fs = Tmpfs::mount(48).expect("a tmpfs for the ledger (needs root)");
    let rocks = RocksLedger::open(fs.path().join("ledger"), RocksOptions::default()).unwrap();
    let ledger = Arc::new(FaultyLedger::new(Arc::new(rocks)));

    let anvil = devnet::Anvil::spawn(&[]).unwrap();
    let payers: Vec<Payer> = (0..PAYERS).map(|_| Payer::random()).collect();
    let addresses: Vec<_> = payers.iter().map(Payer::address).collect();
    devnet::deploy(anvil.endpoint(), &addresses, U256::from(MINTED)).await.unwrap();
    let signers: Vec<_> = (0..2).map(|_| alloy::signers::local::PrivateKeySigner::random()).collect();
    let funded: Vec<_> = signers.iter().map(|s| s.address()).collect();
    devnet::fund_ether(anvil.endpoint(), &funded).await.unwrap();
    devnet::set_interval_mining(anvil.endpoint(), 1).await.unwrap();
    let chain = Arc::new(
        x402_chain::AlloyChain::connect(anvil.endpoint(), signers, x402_chain::TxConfig::default()).await.unwrap(),
    );

    let dir = tempfile::tempdir().unwrap();
    let balances: Arc<dyn x402_engine::balance::BalanceSource> =
        Arc::new(x402_engine::balance::ConfiguredBalances::new(Some(U256::from(BALANCE))));
    let node = x402_engine::node::Node::start_with(&config_value(dir.path()), ledger.clone(), balances).await.unwrap();
    let settler_config = SettlerConfig { poll: Duration::from_millis(200), ..SettlerConfig::default() };
    let settler = Settler::spawn(node.engine().clone(), chain.clone(), settler_config, None);

    // The gateways: m1 settles direct, m2 batched.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (grpc, seen, payers) = (node.endpoints().grpc, seen.clone(), payers.clone());
        clients.push(tokio::spawn(async move {
            let mut m1 = payments(grpc, M1_KEY).await;
            let mut m2 = payments(grpc, M2_KEY).await;
            let mut n = 0u64;
            let start = tokio::time::Instant::now();
            while Instant::now() < deadline {
                n += 1;
                let payer = &payers[(c + n as usize * CLIENTS) % PAYERS];
                let (client, pay_to) = if n.is_multiple_of(4) { (&mut m1, PAY_TO) } else { (&mut m2, PAY_TO_2) };
                let mut request = signed_submit(payer, pay_to, n);
                request.idempotency_key = format!("gw{c}-{n:012}");
                let (id, took) = submit_until_answered(client, request, &seen).await;
                {
                    let mut seen = seen.lock().unwrap();
                    seen.accepted.push((id, pay_to));
                    seen.acked_at.push((Instant::now(), took));
                }
                tokio::time::sleep_until(start + Duration::from_millis(n * 1000 / RATE)).await;
            }
        }));
    }

    // The faults, in phases over the run.
    let phase = |share: u64| Duration::from_millis(secs * 1000 * share / 100);
    let random =
        RandomFaults { seed: 0x5eed, fail_before: 20, fail_after: 20, stalls: 20, stall: Duration::from_millis(250) };
    ledger.random(Some(random));
    tokio::time::sleep(phase(20)).await;
    // A write stall of 2 s: submits wait, or are told to retry; none is lost.
    {
        let ledger = ledger.clone();
        tokio::task::spawn_blocking(move || {
            let _held = ledger.hold();
            std::thread::sleep(Duration::from_secs(2));
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(phase(10)).await;
    // The disk full, for real, for 3 s.
    ledger.random(None);
    let (filler, filled) = fs.fill("filler").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    std::fs::remove_file(&filler).unwrap();
    let space_back = Instant::now();
    tokio::time::sleep(phase(10)).await;
    // Bursts of failing commits and a second of unreadable records.
    ledger.random(Some(RandomFaults { seed: 0xfa11, ..random }));
    for _ in 0..4 {
        ledger.fail_next(3);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    ledger.fail_reads(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    ledger.fail_reads(false);
    ledger.random(None);
    for client in clients {
        client.await.unwrap();
    }
    let injected = ledger.injected();

    // Acceptance came back by itself after the disk had room.
    let (accepted, acked_at, unavailable) = {
        let seen = seen.lock().unwrap();
        (seen.accepted.clone(), seen.acked_at.clone(), seen.unavailable)
    };
    let resumed = acked_at.iter().map(|(at, _)| *at).filter(|at| *at > space_back).min();
    let resumed = resumed.expect("a payment was accepted after the disk had room again") - space_back;
    assert!(injected.inner_failed > 0, "the full disk refused no write");
    assert!(injected.failed_after > 0 && injected.failed_before > 0 && injected.stalled > 0, "{injected:?}");

    // Every acknowledged payment settles, once.
    let ids: HashSet<PaymentId> = accepted.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), accepted.len(), "a payment acknowledged twice");
    let wait = Instant::now() + Duration::from_secs(240);
    loop {
        let mut open = 0;
        for id in &ids {
            let record = node.engine().payment(*id).await.unwrap().expect("an acknowledged payment is recorded");
            assert_ne!(record.status.state, PaymentState::Failed, "{:?}", record.status);
            open += usize::from(record.status.state != PaymentState::Confirmed);
        }
        if open == 0 {
            break;
        }
        assert!(Instant::now() < wait, "{open} of {} payments still open", ids.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let paid = |to: Address| U256::from(AMOUNT) * U256::from(accepted.iter().filter(|(_, t)| *t == to).count());
    assert_eq!(chain.token_balance(TOKEN, PAY_TO).await.unwrap(), paid(PAY_TO), "direct");
    assert_eq!(chain.token_balance(TOKEN, PAY_TO_2).await.unwrap(), paid(PAY_TO_2), "batched");
    let mut spent = U256::ZERO;
    for payer in &payers {
        spent += U256::from(MINTED) - chain.token_balance(TOKEN, payer.address()).await.unwrap();
    }
    assert_eq!(spent, U256::from(AMOUNT * accepted.len() as u64), "the payers paid for exactly what was served");

    // No reservation is left: each payer may pay its whole balance again,
    // and not a unit more.
    let m1 = node.engine().merchant("m1").unwrap();
    for payer in &payers {
        for (value, fits) in [(BALANCE, true), (BALANCE + 1, false)] {
            let requirements = devnet::dev_requirements(PAY_TO, TOKEN, value);
            let payload = payer.sign_exact(&requirements, now() - 600, now() + 600, random_nonce());
            let probe = Submission::new(requirements, x402_engine::domain::PaymentInput::Exact(payload));
            let outcome = node.engine().verify(m1.clone(), probe).await.unwrap();
            assert_eq!(matches!(outcome, SubmitOutcome::Verified { .. }), fits, "{value}: {outcome:?}");
        }
    }
    settler.abort();
    let _ = settler.await;
    node.wait(std::future::ready(())).await.unwrap();

    // On disk, read again: exactly the acknowledged payments, all confirmed.
    drop(ledger);
    let reopened = RocksLedger::open(fs.path().join("ledger"), RocksOptions::default()).unwrap();
    let mut recorded = HashSet::new();
    reopened
        .for_each_payment(&mut |p| {
            assert_eq!(p.status.state, PaymentState::Confirmed, "{:?}", p.id);
            recorded.insert(p.id);
        })
        .unwrap();
    assert_eq!(recorded, ids, "the ledger holds exactly the acknowledged payments");
    assert!(reopened.pending().unwrap().is_empty());

    let mut latencies: Vec<Duration> = acked_at.iter().map(|(_, took)| *took).collect();
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "disk soak: {secs} s, {} payments acknowledged and settled once ({} direct, {} batched), {unavailable} \
         answers to retry; injected: {} commits refused, {} written but reported failed, {} stalled, {} reads \
         refused, a 2 s write stall, the disk filled ({} KiB) for 3 s ({} commits refused by RocksDB); acceptance back {:?} after space was; ack \
         latency p50 {:?} p99 {:?} max {:?}",
        accepted.len(),
        accepted.iter().filter(|(_, t)| *t == PAY_TO).count(),
        accepted.iter().filter(|(_, t)| *t == PAY_TO_2).count(),
        injected.failed_before,
        injected.failed_after,
        injected.stalled,
        injected.reads_failed,
        filled >> 10,
        injected.inner_failed,
        resumed,
        p(0.5),
        p(0.99),
        latencies.last().unwrap(),
    );
}

/// Submits `request` until it gets a final answer, retrying (the same
/// request, with its idempotency key) while told the node is unavailable;
/// returns the accepted payment and how long that took. Anything but an
/// acceptance fails the test, as does a minute without one.
async fn submit_until_answered(
    client: &mut Payments,
    request: pb::SubmitRequest,
    seen: &Mutex<Seen>,
) -> (PaymentId, Duration) {
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(60), "no final answer in a minute: the node hangs");
        let answer = tokio::time::timeout(Duration::from_secs(30), client.submit(request.clone())).await;
        match answer.expect("a submit answered within 30 s") {
            Ok(resp) => {
                let resp = resp.into_inner();
                assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");
                return (PaymentId(B256::from_slice(&resp.payment_id)), started.elapsed());
            }
            Err(status) if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted) => {
                seen.lock().unwrap().unavailable += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
}
