//! The crash sweep: an `x402d` process aborted (as by a power cut) at each
//! step of each chain action, through the crash points compiled into test
//! builds (feature `failpoints`): a transaction signed but not recorded,
//! recorded but not broadcast, broadcast but not mined (then anvil's pool
//! kept or flushed), mined but not concluded; a claim concluded but its
//! channels not synced; a deposit signed but not sent, mined but not
//! used; a claim, refund or deposit of the HTTP facilitator signed, sent
//! or mined but not answered. At each it restarts on the same ledger and
//! chain. Afterwards every payment the ledger holds is settled exactly once
//! on chain (and none it does not hold is), every voucher is claimed, every
//! refund made once and every deposit counted once.

use std::time::Duration;

use alloy::{
    primitives::{Address, U256},
    providers::ext::AnvilApi,
};
use x402_chain::Chain;
use x402_proto::v1 as pb;

use crate::{
    channels::{self, MC_KEY, PRICE, Setup},
    common::*,
};

/// The steps every chain transaction of settlement goes through.
const SEND_POINTS: [&str; 4] = ["settle::signed", "settle::recorded", "settle::broadcast", "settle::mined"];

/// Waits for `daemon` to abort at its crash point.
async fn crashed(daemon: &mut Daemon, point: &str) {
    use std::os::unix::process::ExitStatusExt;
    let status = daemon.exited_within(Duration::from_secs(30)).await;
    let status = status.unwrap_or_else(|| panic!("{point}: the crash point was never reached"));
    assert_eq!(status.signal(), Some(6), "{point}: aborted there, not {status}");
}

/// An `x402d` settling channels of `s` under `dir` (its `[chain]` ending
/// with `extra`), aborting at `point` if given; its config and section.
fn channel_daemon(
    s: &Setup,
    dir: &std::path::Path,
    extra: &str,
    point: Option<&str>,
) -> (Daemon, String, ChainSection) {
    let section = ChainSection::new(s.anvil.endpoint(), &s.signer, Some(&s.authorizer), extra);
    let config = channels::channel_daemon_config(dir, &section);
    let crash = point.map(crash_at);
    let mut env = vec![("X402D_TEST_MC_KEY", MC_KEY)];
    if let Some(crash) = &crash {
        env.push(("FAILPOINTS", crash));
    }
    let daemon = Daemon::start_with_env(dir, &config, &section.env(&env));
    (daemon, config, section)
}

/// `point=return`: abort there.
fn crash_at(point: &str) -> String {
    format!("{point}=return")
}

/// Pending transactions stay in the pool until [`release`] for a crash
/// after the broadcast, so that the crash lands before they are mined.
async fn hold_pool(s: &Setup, point: &str) {
    if point.ends_with("::broadcast") {
        s.wallet.anvil_set_auto_mine(false).await.unwrap();
    }
}

/// The pool kept or flushed (the node restarted, or dropped them), then
/// mining on again.
async fn release(s: &Setup, flush: bool) {
    if flush {
        s.wallet.anvil_drop_all_transactions().await.unwrap();
    }
    s.wallet.evm_mine(None).await.unwrap();
    s.wallet.anvil_set_auto_mine(true).await.unwrap();
}

async fn sweep_exact(pay_to: Address, key: &str) {
    const PER_POINT: usize = 3;
    let s = Setup::new(SEND_POINTS.len() * 2 * PER_POINT).await;
    let chain = x402_chain::AlloyChain::connect(s.anvil.endpoint(), Vec::new(), Default::default()).await.unwrap();
    let mut payers = s.payers.iter();
    let mut recorded_total = 0u64;
    for point in SEND_POINTS {
        // Flushing the pool changes something only after a broadcast.
        let flushes: &[bool] = if point == "settle::broadcast" { &[false, true] } else { &[false] };
        for &flush in flushes {
            let dir = tempfile::tempdir().unwrap();
            let section = ChainSection::new(s.anvil.endpoint(), &s.signer, None, "");
            let config = format!("{}{}", config(dir.path()), section.toml);
            let crash = crash_at(point);
            hold_pool(&s, point).await;
            let mut daemon = Daemon::start_with_env(dir.path(), &config, &section.env(&[("FAILPOINTS", &crash)]));
            let mut client = payments(daemon.grpc, key).await;
            let mut sent = Vec::new();
            for i in 0..PER_POINT {
                let payer = payers.next().unwrap();
                let req = requirements(pay_to);
                let payload = payer.sign_exact(&req, now() - 600, now() + 3600, random_nonce());
                // The process may die under a later submit: an answer or not.
                let answer = client.submit(exact_submit(i as u64, &req, &payload)).await;
                let acked = answer.is_ok_and(|a| outcome(a.get_ref()) == pb::Outcome::Accepted);
                sent.push((payload, acked));
            }
            crashed(&mut daemon, point).await;
            release(&s, flush).await;

            let mut daemon = Daemon::start_with_env(dir.path(), &config, &section.env(&[]));
            let mut client = payments(daemon.grpc, key).await;
            let mut recorded = 0u64;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            for (payload, acked) in &sent {
                let id = payload_id(&requirements(pay_to), payload);
                let spent = loop {
                    let got = client.get_payment(pb::GetPaymentRequest { payment_id: id.0.to_vec() }).await;
                    let payment = match got {
                        Ok(payment) => payment,
                        Err(status) if status.code() == tonic::Code::NotFound => {
                            assert!(!acked, "{point} (flush {flush}): an acknowledged payment was lost");
                            break false;
                        }
                        Err(status) => {
                            assert!(tokio::time::Instant::now() < deadline, "{point}: {status:?}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let state = payment.into_inner().status.unwrap().state;
                    if state == pb::PaymentState::Confirmed as i32 {
                        recorded += 1;
                        break true;
                    }
                    assert_ne!(state, pb::PaymentState::Failed as i32, "{point}: a payment failed");
                    assert!(tokio::time::Instant::now() < deadline, "{point} (flush {flush}): still not confirmed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                let a = &payload.authorization;
                let used = chain.authorization_state(TOKEN, a.from, a.nonce).await.unwrap();
                assert_eq!(used, spent, "{point} (flush {flush}): recorded and spent on chain go together");
            }
            daemon.stop();
            recorded_total += recorded;
            let paid = chain.token_balance(TOKEN, pay_to).await.unwrap();
            assert_eq!(paid, U256::from(AMOUNT * recorded_total), "{point}: settled exactly once");
        }
    }
    assert!(recorded_total >= SEND_POINTS.len() as u64, "{recorded_total} payments recorded in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_settlement_crashed_at_any_step_is_settled_once_after_restart() {
    sweep_exact(PAY_TO, M1_KEY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_crashed_at_any_step_is_settled_once_after_restart() {
    sweep_exact(PAY_TO_2, M2_KEY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_crashed_at_any_step_is_claimed_once_after_restart() {
    const CHANNELS: usize = 2;
    const VOUCHERS: usize = 5;
    let points: Vec<&str> = SEND_POINTS.iter().copied().chain(["claims::concluded"]).collect();
    let s = Setup::new(points.len() * 2 * CHANNELS).await;
    let mut claimed_total = 0u128;
    for (round, (point, flush)) in points.iter().flat_map(|p| [(*p, false), (*p, true)]).enumerate() {
        let payers = &s.payers[round * CHANNELS..(round + 1) * CHANNELS];
        for payer in payers {
            s.deposit(payer, 10_000).await;
        }
        let dir = tempfile::tempdir().unwrap();
        let (mut daemon, config, section) = channel_daemon(&s, dir.path(), "channel_poll_ms = 200\n", Some(point));
        let mut client = payments(daemon.grpc, MC_KEY).await;
        for n in 0..VOUCHERS {
            for payer in payers {
                let voucher = channels::voucher(n as u64, payer, &s.config(payer), PRICE * n as u128, PRICE);
                let answer = client.submit(voucher).await.unwrap().into_inner();
                assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
            }
        }
        hold_pool(&s, point).await;
        channels::set_claim_interval(daemon.grpc, 1).await;
        crashed(&mut daemon, point).await;
        release(&s, flush && point == "settle::broadcast").await;

        let config = config.replace("claim_interval_secs = 3600", "claim_interval_secs = 1");
        let mut daemon = Daemon::start_with_env(dir.path(), &config, &section.env(&[("X402D_TEST_MC_KEY", MC_KEY)]));
        let charged = PRICE * VOUCHERS as u128;
        claimed_total += charged * CHANNELS as u128;
        for payer in payers {
            channels::eventually(60, &format!("{point}: the channel claimed"), || async {
                s.onchain(payer).await.1 == charged
            })
            .await;
        }
        daemon.stop();
        assert_eq!(s.receiver_balance().await, U256::from(claimed_total), "{point} (flush {flush}): claimed once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposit_crashed_at_any_step_counts_once_after_restart() {
    const DEPOSIT: u128 = 5_000;
    let points = [
        ("deposit::signed", false),
        ("deposit::broadcast", false),
        ("deposit::broadcast", true),
        ("deposit::mined", false),
    ];
    let s = Setup::new(points.len()).await;
    for ((point, flush), payer) in points.iter().zip(&s.payers) {
        let dir = tempfile::tempdir().unwrap();
        let (mut daemon, config, section) = channel_daemon(&s, dir.path(), "", Some(point));
        let mut client = payments(daemon.grpc, MC_KEY).await;
        let config_of = s.config(payer);
        let deposit = channels::deposit_voucher(1, payer, &config_of, DEPOSIT);
        hold_pool(&s, point).await;
        assert!(client.submit(deposit.clone()).await.is_err(), "{point}: answered though the process died");
        crashed(&mut daemon, point).await;
        release(&s, *flush).await;

        // The gateway sends the same request again to the restarted node.
        let mut daemon = Daemon::start_with_env(dir.path(), &config, &section.env(&[("X402D_TEST_MC_KEY", MC_KEY)]));
        let mut client = payments(daemon.grpc, MC_KEY).await;
        let answer = client.submit(deposit).await.unwrap().into_inner();
        assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{point}: {}", answer.message);
        assert_eq!(s.onchain(payer).await, (DEPOSIT, 0), "{point}: deposited once");
        daemon.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_crashed_at_any_step_is_made_once_after_restart() {
    const DEPOSIT: u128 = 1_000;
    const VOUCHERS: u64 = 3;
    let points: Vec<&str> = SEND_POINTS.iter().copied().chain(["claims::concluded"]).collect();
    let rounds: Vec<(&str, bool)> = points
        .iter()
        .flat_map(|p| [(*p, false), (*p, true)])
        .filter(|(p, flush)| !flush || p.ends_with("::broadcast"))
        .collect();
    let s = Setup::new(rounds.len()).await;
    let charged = PRICE * u128::from(VOUCHERS);
    for ((point, flush), payer) in rounds.into_iter().zip(&s.payers) {
        s.deposit(payer, DEPOSIT).await;
        let before = s.token_balance(payer.address()).await;
        let dir = tempfile::tempdir().unwrap();
        let (mut daemon, config, section) = channel_daemon(&s, dir.path(), "channel_poll_ms = 200\n", Some(point));
        let mut client = payments(daemon.grpc, MC_KEY).await;
        let config_of = s.config(payer);
        for n in 0..VOUCHERS {
            let voucher = channels::voucher(n, payer, &config_of, PRICE * u128::from(n), PRICE);
            let answer = client.submit(voucher).await.unwrap().into_inner();
            assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
        }
        hold_pool(&s, point).await;
        let answer =
            client.submit(channels::refund_voucher(10, payer, &config_of, charged)).await.unwrap().into_inner();
        assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{point}: {}", answer.message);
        crashed(&mut daemon, point).await;
        release(&s, flush).await;

        let mut daemon = Daemon::start_with_env(dir.path(), &config, &section.env(&[("X402D_TEST_MC_KEY", MC_KEY)]));
        channels::eventually(60, &format!("{point} (flush {flush}): the refund"), || async {
            s.onchain(payer).await == (charged, charged)
        })
        .await;
        daemon.stop();
        let refunded = s.token_balance(payer.address()).await - before;
        assert_eq!(refunded, U256::from(DEPOSIT - charged), "{point} (flush {flush}): refunded once");
    }
}

/// What a resource server asks the HTTP facilitator to put on chain.
#[derive(Clone, Copy, Debug)]
enum HttpCall {
    Deposit,
    Claim,
    Refund,
}

/// The HTTP facilitator's channel transactions, each crashed at every step
/// before its answer: the resource server, its request unanswered, sends
/// it again to the restarted node. A deposit is then made once and answered
/// as made; a claim is claimed once (a claim sent again changes nothing on
/// chain); a refund is made once, and the one sent again after it landed is
/// answered with its used nonce and the channel to mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_channel_call_crashed_at_any_step_is_made_once_after_restart() {
    const DEPOSIT: u128 = 500;
    const CHARGED: u128 = 3 * PRICE;
    let mut rounds = Vec::new();
    for (call, prefix) in [(HttpCall::Deposit, "deposit"), (HttpCall::Claim, "channel"), (HttpCall::Refund, "channel")]
    {
        for step in ["signed", "broadcast", "mined"] {
            for flush in [false, true] {
                if !flush || step == "broadcast" {
                    rounds.push((call, format!("{prefix}::{step}"), flush));
                }
            }
        }
    }
    let s = Setup::new(rounds.len()).await;
    let http = reqwest::Client::new();
    for ((call, point, flush), payer) in rounds.into_iter().zip(&s.payers) {
        let config = s.config(payer);
        let domain = Setup::domain();
        let id = domain.channel_id(&config);
        let claims = serde_json::json!([{
            "voucher": { "channel": channels::config_json(&config), "maxClaimableAmount": CHARGED.to_string() },
            "signature": payer.sign_voucher(&domain, id, CHARGED).to_string(),
            "totalClaimed": CHARGED.to_string(),
        }]);
        let payload = match call {
            HttpCall::Deposit => channels::payload_json(payer, &config, PRICE, Some(DEPOSIT)),
            HttpCall::Claim => serde_json::json!({ "type": "claim", "claims": claims }),
            HttpCall::Refund => serde_json::json!({
                "type": "refund", "channelConfig": channels::config_json(&config), "amount": DEPOSIT.to_string(),
                "refundNonce": "0", "claims": claims,
            }),
        };
        let payload = match call {
            HttpCall::Deposit => payload,
            _ => {
                serde_json::json!({ "x402Version": 2, "accepted": channels::requirements_json(&config, 0), "payload": payload })
            }
        };
        let amount = if matches!(call, HttpCall::Deposit) { PRICE } else { 0 };
        let body = serde_json::json!({
            "x402Version": 2, "paymentPayload": payload,
            "paymentRequirements": channels::requirements_json(&config, amount),
        });
        if !matches!(call, HttpCall::Deposit) {
            s.deposit(payer, DEPOSIT).await;
        }
        let before = s.token_balance(payer.address()).await;
        let dir = tempfile::tempdir().unwrap();
        let (mut daemon, config_toml, section) = channel_daemon(&s, dir.path(), "", Some(&point));
        hold_pool(&s, &point).await;
        let settle = |daemon: &Daemon| {
            http.post(format!("http://{}/settle", daemon.http)).bearer_auth(MC_KEY).json(&body).send()
        };
        assert!(settle(&daemon).await.is_err(), "{point}: answered though the process died");
        crashed(&mut daemon, &point).await;
        release(&s, flush).await;
        let landed = point.ends_with("::mined") || (point.ends_with("::broadcast") && !flush);

        // The server sends the same request again to the restarted node.
        let mut daemon =
            Daemon::start_with_env(dir.path(), &config_toml, &section.env(&[("X402D_TEST_MC_KEY", MC_KEY)]));
        let answer: serde_json::Value = settle(&daemon).await.unwrap().json().await.unwrap();
        daemon.stop();
        let what = format!("{call:?} at {point} (flush {flush}): {answer}");
        let refunded = s.token_balance(payer.address()).await - before;
        match call {
            HttpCall::Deposit => {
                assert_eq!(answer["success"], true, "{what}");
                assert_eq!(answer["extra"]["channelState"]["balance"], DEPOSIT.to_string(), "{what}");
                assert_eq!(s.onchain(payer).await, (DEPOSIT, 0), "{what}: deposited once");
            }
            HttpCall::Claim => {
                assert_eq!(answer["success"], true, "{what}");
                assert_eq!(s.onchain(payer).await, (DEPOSIT, CHARGED), "{what}: claimed once");
            }
            HttpCall::Refund => {
                if landed {
                    assert_eq!(answer["success"], false, "{what}");
                    assert!(answer["errorMessage"].as_str().unwrap().contains("refund nonce 0 is used"), "{what}");
                    assert_eq!(answer["extra"]["channelState"]["refundNonce"], "1", "{what}");
                } else {
                    assert_eq!(answer["success"], true, "{what}");
                }
                assert_eq!(s.onchain(payer).await, (CHARGED, CHARGED), "{what}");
                assert_eq!(refunded, U256::from(DEPOSIT - CHARGED), "{what}: refunded once");
            }
        }
    }
}
