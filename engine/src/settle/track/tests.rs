//! Every branch of following a settlement transaction, on a
//! [`ScriptedChain`]: written ahead, then concluded from its receipt;
//! rebroadcast after a crash; abandoned when its nonce went to another
//! transaction (each payment then concluded by what the chain shows);
//! replaced by fee bumps; reverted for a passing or a lasting reason;
//! reorged out and mined again or not; forgotten once final; and nonces
//! floored past pending intents at a restart. No node runs.

use std::{sync::Arc, time::Duration};

use alloy::primitives::{Address, B256, U256};
use x402_chain::AuthorizationSpent;

use crate::{
    Engine,
    balance::{BalanceSource, ConfiguredBalances},
    domain::{
        IntentState, PaymentId, PaymentRecord, PaymentState, PaymentStatus, Requirements, SettlementPolicy, TxIntent,
    },
    engine::MerchantUpdate,
    ledger::{Ledger, MemoryLedger},
    pipeline::{PipelineConfig, SubmitOutcome},
    settle::{Settler, SettlerConfig, Work},
    testing::ScriptedChain,
};
use x402_devnet::Payer;

const TOKEN: Address = Address::repeat_byte(0x5f);
const PAY_TO: Address = Address::repeat_byte(0x70);

/// An engine with one direct merchant, a scripted chain and a settler
/// that is driven step by step (not spawned).
struct Bench {
    engine: Arc<Engine>,
    chain: Arc<ScriptedChain>,
    settler: Arc<Settler<ScriptedChain>>,
    payer: Payer,
}

/// A settler following each transaction for at most 100 ms, never
/// bumping, concluding from one confirmation.
fn quick() -> SettlerConfig {
    SettlerConfig {
        poll: Duration::from_millis(10),
        receipt_timeout: Duration::from_millis(100),
        stuck_after: Duration::from_secs(3600),
        finality_depth: 3,
        ..SettlerConfig::default()
    }
}

/// A settler that bumps a transaction unmined for 30 ms, at most
/// `max_bumps` times, and follows it for 10 s.
fn bumping(max_bumps: u32) -> SettlerConfig {
    SettlerConfig {
        stuck_after: Duration::from_millis(30),
        receipt_timeout: Duration::from_secs(10),
        max_bumps,
        ..quick()
    }
}

impl Bench {
    async fn new(config: SettlerConfig) -> Self {
        let ledger: Arc<dyn Ledger> = Arc::new(MemoryLedger::new());
        let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
        let engine = tokio::task::block_in_place(|| Engine::start(ledger, &balances, &PipelineConfig::default(), None));
        let engine = Arc::new(engine.unwrap());
        let chain = Arc::new(ScriptedChain::new());
        let settler = Arc::new(Settler::new(engine.clone(), chain.clone(), config));
        Self { engine, chain, settler, payer: Payer::random() }
    }

    /// An accepted direct payment, as the ledger has it.
    async fn pay(&self) -> PaymentRecord {
        let update = MerchantUpdate {
            id: "m".into(),
            pay_to: vec![PAY_TO],
            assets: Vec::new(),
            policy: SettlementPolicy::Direct,
            api_key: None,
        };
        let merchant = self.engine.upsert_merchant(update).await.unwrap();
        let requirements =
            Requirements { scheme: "exact".into(), ..crate::testing::channel_requirements(TOKEN, PAY_TO) };
        let now = crate::domain::unix_millis() / 1000;
        let nonce = B256::from(rand::random::<[u8; 32]>());
        let payload = self.payer.sign_exact(&requirements, now - 60, now + 600, nonce);
        let submission = crate::domain::Submission::new(requirements, crate::domain::PaymentInput::Exact(payload));
        let SubmitOutcome::Accepted { id, .. } = self.engine.submit(merchant, submission).await.unwrap() else {
            panic!("not accepted");
        };
        self.engine.payment(id).await.unwrap().unwrap()
    }

    async fn status(&self, id: PaymentId) -> PaymentStatus {
        self.engine.payment(id).await.unwrap().unwrap().status
    }

    async fn intents(&self) -> Vec<TxIntent> {
        self.engine.intents().await.unwrap()
    }

    /// The one intent recorded.
    async fn intent(&self) -> TxIntent {
        let intents = self.intents().await;
        let [intent] = intents.as_slice() else { panic!("one intent: {intents:?}") };
        intent.clone()
    }

    /// Settles `p` directly; its transaction is broadcast and, unless the
    /// chain mines it at once, left pending after the short follow.
    async fn settle(&self, p: &PaymentRecord) {
        self.settler.settle_direct(p.clone()).await.unwrap();
    }

    /// Settles `p` on a task, and returns once its transaction was sent
    /// twice: the original and a fee bump.
    async fn settle_until_bumped(&self, p: &PaymentRecord) -> tokio::task::JoinHandle<crate::Result<()>> {
        let task = tokio::spawn({
            let settler = self.settler.clone();
            let p = p.clone();
            async move { settler.settle_direct(p).await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.chain.broadcasts().len() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "never bumped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        task
    }

    /// A spend of `p`'s authorization found on chain, at a block past
    /// `p`'s acceptance.
    fn spent(&self, p: &PaymentRecord, canceled: bool, transfer: Option<(Address, U256)>) -> AuthorizationSpent {
        let now = crate::domain::unix_millis() / 1000;
        let spent = AuthorizationSpent { tx: B256::repeat_byte(0xcc), block: 1, timestamp: now, canceled, transfer };
        self.chain.spend(p.asset, p.authorization.from, p.authorization.nonce, spent);
        spent
    }
}

/// The intent and `Submitted` are durable before the broadcast: a
/// broadcast that fails leaves both, and the next round's resolution sends
/// the same bytes and concludes the payment from the receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_is_written_ahead_and_a_failed_broadcast_is_sent_again_by_the_next_round() {
    let b = Bench::new(quick()).await;
    let p = b.pay().await;
    b.chain.fail_broadcasts(1);
    assert!(b.settler.settle_direct(p.clone()).await.is_err(), "the node was unreachable");
    let intent = b.intent().await;
    assert_eq!(intent.state, IntentState::Pending);
    assert_eq!(intent.payments, vec![p.id]);
    let submitted = b.status(p.id).await;
    assert_eq!((submitted.state, submitted.transaction), (PaymentState::Submitted, Some(intent.tx_hashes[0])));
    assert!(b.chain.broadcasts().is_empty());

    b.chain.auto_mine(true);
    b.settler.resolve(intent.clone()).await.unwrap();
    assert_eq!(b.chain.broadcasts(), intent.tx_hashes, "the recorded bytes, sent once");
    let confirmed = b.status(p.id).await;
    assert_eq!((confirmed.state, confirmed.transaction), (PaymentState::Confirmed, Some(intent.tx_hashes[0])));
    assert!(matches!(b.intent().await.state, IntentState::Included { success: true, .. }));
}

/// A pending intent whose transaction was mined meanwhile (while x402d was
/// down) is concluded from the receipt, not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_intent_mined_meanwhile_is_concluded_without_sending_again() {
    let b = Bench::new(quick()).await;
    let p = b.pay().await;
    b.settle(&p).await;
    let intent = b.intent().await;
    assert_eq!(intent.state, IntentState::Pending, "not mined within the follow");
    b.chain.mine(intent.tx_hashes[0]);
    b.settler.resolve(intent.clone()).await.unwrap();
    assert_eq!(b.chain.broadcasts().len(), 1);
    assert_eq!(b.status(p.id).await.state, PaymentState::Confirmed);
}

/// A pending intent whose nonce another transaction of the signer took can
/// never be mined: it is abandoned, and a payment whose authorization is
/// still unspent goes back to the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_whose_nonce_was_taken_is_abandoned_and_an_unspent_payment_queued_again() {
    let b = Bench::new(quick()).await;
    let p = b.pay().await;
    b.settle(&p).await;
    let intent = b.intent().await;
    b.chain.take_nonce(intent.nonce);
    b.settler.resolve(intent).await.unwrap();
    assert!(b.intents().await.is_empty(), "abandoned and forgotten");
    assert_eq!(b.status(p.id).await.state, PaymentState::Queued);
}

/// Abandoned, a payment whose payer cancelled the authorization meanwhile
/// is `Failed` as cancelled, with the cancellation: never `Confirmed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_payment_whose_payer_cancelled_fails_as_cancelled() {
    let b = Bench::new(quick()).await;
    let p = b.pay().await;
    b.settle(&p).await;
    let intent = b.intent().await;
    b.chain.take_nonce(intent.nonce);
    let cancel = b.spent(&p, true, None);
    b.settler.resolve(intent).await.unwrap();
    let status = b.status(p.id).await;
    assert_eq!(status.state, PaymentState::Failed);
    assert_eq!(status.failure_reason.as_deref(), Some(super::super::AUTHORIZATION_CANCELED));
    assert_eq!(status.transaction, Some(cancel.tx));
}

/// Abandoned, a payment that someone else's transaction settled to its
/// payee is `Confirmed` with that transaction; one spent on another
/// transfer is `Failed` with `nonce_already_used`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_payment_spent_by_someone_else_is_concluded_by_that_spend() {
    let b = Bench::new(quick()).await;
    let paid = b.pay().await;
    let diverted = b.pay().await;
    for p in [&paid, &diverted] {
        b.settle(p).await;
    }
    let intents = b.intents().await;
    assert_eq!(intents.len(), 2);
    let to_payee = b.spent(&paid, false, Some((PAY_TO, paid.authorization.value)));
    b.spent(&diverted, false, Some((Address::repeat_byte(0x99), diverted.authorization.value)));
    for intent in intents {
        b.chain.take_nonce(intent.nonce);
        b.settler.resolve(intent).await.unwrap();
    }
    let status = b.status(paid.id).await;
    assert_eq!((status.state, status.transaction), (PaymentState::Confirmed, Some(to_payee.tx)));
    let status = b.status(diverted.id).await;
    assert_eq!(status.state, PaymentState::Failed);
    assert_eq!(status.failure_reason.as_deref(), Some("invalid_exact_evm_nonce_already_used"));
}

/// The search for how an authorization was spent fails (the node cannot
/// be reached): the payment is not called `Failed` on a guess; the next
/// round finds the spend and confirms it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_search_for_a_spend_decides_nothing() {
    let b = Bench::new(quick()).await;
    let paid = b.pay().await;
    b.settle(&paid).await;
    let intent = b.intent().await;
    let to_payee = b.spent(&paid, false, Some((PAY_TO, paid.authorization.value)));
    b.chain.take_nonce(intent.nonce);
    b.chain.fail_log_searches(1);
    assert!(b.settler.resolve(intent.clone()).await.is_err(), "the node's failure is the round's");
    assert!(b.status(paid.id).await.state.is_open(), "{:?}", b.status(paid.id).await);
    b.settler.resolve(intent).await.unwrap();
    let status = b.status(paid.id).await;
    assert_eq!((status.state, status.transaction), (PaymentState::Confirmed, Some(to_payee.tx)));
}

/// After a crash mid-follow, the intent's latest version (a bump) answers
/// "nonce too low" because its original was mined: no reason to abandon
/// it. It is followed until the receipt is deep enough, then concluded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_whose_own_version_took_the_nonce_is_concluded_not_abandoned() {
    let b = Bench::new(bumping(1)).await;
    let p = b.pay().await;
    let task = b.settle_until_bumped(&p).await;
    task.abort();
    let _ = task.await;
    let intent = b.intent().await;
    assert_eq!(intent.tx_hashes.len(), 2);
    // The original is mined, one confirmation short of counting.
    b.chain.require_confirmations(2);
    b.chain.mine(intent.tx_hashes[0]);
    let resolving = tokio::spawn({
        let settler = b.settler.clone();
        async move { settler.resolve(intent).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.chain.mine_blocks(1);
    resolving.await.unwrap().unwrap();
    let status = b.status(p.id).await;
    assert_eq!(status.state, PaymentState::Confirmed, "{status:?}");
    assert_eq!(status.transaction, Some(b.intent().await.tx_hashes[0]));
}

/// A transaction unmined past `stuck_after` is replaced by a fee bump at
/// the same nonce, recorded before it is sent; whichever version is mined
/// concludes the payment, here the bump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_transaction_is_replaced_by_a_fee_bump_written_ahead_and_the_bump_concludes_it() {
    let b = Bench::new(bumping(5)).await;
    let p = b.pay().await;
    let task = b.settle_until_bumped(&p).await;
    let broadcasts = b.chain.broadcasts();
    let intent = b.intent().await;
    assert_eq!(intent.tx_hashes, broadcasts[..2], "the bump was recorded before it was sent");
    let bumped = x402_chain::SignedTx::from_raw(intent.raw.clone().into(), intent.signer).unwrap();
    assert_eq!(bumped.hash, broadcasts[1]);
    assert_eq!(bumped.nonce, intent.nonce);
    assert_eq!(b.status(p.id).await.transaction, Some(broadcasts[1]), "Submitted with the bump");

    b.chain.mine(broadcasts[1]);
    task.await.unwrap().unwrap();
    let status = b.status(p.id).await;
    assert_eq!((status.state, status.transaction), (PaymentState::Confirmed, Some(broadcasts[1])));
}

/// A pending transaction the node refuses to take again (its fees fell
/// below the base fee while x402d was down) is followed anyway and
/// replaced by a fee bump, which concludes it: never left pending, holding
/// up the signer's later nonces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebroadcast_the_node_refuses_is_replaced_by_a_fee_bump() {
    let b = Bench::new(bumping(5)).await;
    let p = b.pay().await;
    b.chain.fail_broadcasts(1);
    assert!(b.settler.settle_direct(p.clone()).await.is_err());
    let intent = b.intent().await;
    b.chain.refuse_broadcasts(1);
    let resolving = tokio::spawn({
        let settler = b.settler.clone();
        async move { settler.resolve(intent).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.chain.broadcasts().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never replaced");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let bump = b.chain.broadcasts()[0];
    assert_eq!(b.intent().await.tx_hashes[1], bump, "the bump was recorded first");
    b.chain.mine(bump);
    resolving.await.unwrap().unwrap();
    let status = b.status(p.id).await;
    assert_eq!((status.state, status.transaction), (PaymentState::Confirmed, Some(bump)));
}

/// The original mined after it was bumped concludes the payment as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_mined_after_a_bump_concludes_it() {
    let b = Bench::new(bumping(1)).await;
    let p = b.pay().await;
    let task = b.settle_until_bumped(&p).await;
    // No more bumps than `max_bumps`.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(b.chain.broadcasts().len(), 2);
    let original = b.chain.broadcasts()[0];
    b.chain.mine(original);
    task.await.unwrap().unwrap();
    let status = b.status(p.id).await;
    assert_eq!((status.state, status.transaction), (PaymentState::Confirmed, Some(original)));
}

/// A direct payment whose transaction reverted: queued again when it ran
/// out of gas (x402d's fault) and would pass now; failed with the token's
/// reason when the token refuses it; failed when it reverted for no reason
/// the simulation still shows (else a payer could have x402d pay for
/// reverted transactions without end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverted_direct_payment_is_queued_again_only_when_it_ran_out_of_gas() {
    let b = Bench::new(quick()).await;
    let cases: [(bool, Option<&str>, PaymentState, Option<&str>); 3] = [
        (true, None, PaymentState::Queued, None),
        (
            false,
            Some("execution reverted: FiatTokenV2: transfer amount exceeds balance"),
            PaymentState::Failed,
            Some("invalid_exact_evm_insufficient_balance"),
        ),
        (false, None, PaymentState::Failed, Some("invalid_exact_evm_transaction_simulation_failed")),
    ];
    for (out_of_gas, simulation, state, reason) in cases {
        let p = b.pay().await;
        b.settle(&p).await;
        let intent = b.intents().await.into_iter().find(|i| i.payments == [p.id]).unwrap();
        b.chain.revert(intent.tx_hashes[0], out_of_gas);
        // The simulation at sending passed; the one that concludes answers this.
        b.chain.simulate_next([simulation.map(str::to_owned)]);
        b.settler.resolve(intent.clone()).await.unwrap();
        let status = b.status(p.id).await;
        assert_eq!((status.state, status.failure_reason.as_deref()), (state, reason), "out of gas: {out_of_gas}");
        if state == PaymentState::Failed {
            assert_eq!(status.transaction, Some(intent.tx_hashes[0]), "failed with the reverted transaction");
        }
    }
}

/// A transaction that a reorg took off the chain and that was mined again
/// is concluded from its new receipt; one not mined again goes back to
/// `Pending` (its payment `Submitted`, owed again) and its same bytes are
/// sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorged_transaction_is_concluded_again_or_sent_again() {
    let b = Bench::new(quick()).await;
    b.chain.auto_mine(true);
    let p = b.pay().await;
    b.settle(&p).await;
    let intent = b.intent().await;
    let IntentState::Included { block: first, .. } = intent.state else { panic!("{intent:?}") };
    let hash = intent.tx_hashes[0];

    b.chain.reorg_out(hash);
    b.chain.mine(hash);
    b.settler.reorged(intent).await.unwrap();
    let intent = b.intent().await;
    let IntentState::Included { block: again, .. } = intent.state else { panic!("{intent:?}") };
    assert!(again > first, "concluded from the new receipt");
    assert_eq!(b.status(p.id).await.block, Some(again));

    b.chain.auto_mine(false);
    b.chain.reorg_out(hash);
    b.settler.reorged(intent).await.unwrap();
    let pending = b.intent().await;
    assert_eq!(pending.state, IntentState::Pending);
    let status = b.status(p.id).await;
    assert_eq!((status.state, status.transaction), (PaymentState::Submitted, Some(hash)), "owed again");
    b.chain.auto_mine(true);
    b.settler.resolve(pending).await.unwrap();
    assert_eq!(b.chain.broadcasts(), vec![hash, hash], "the same bytes, sent again");
    assert_eq!(b.status(p.id).await.state, PaymentState::Confirmed);
}

/// Waits for every task of `work` to end, and takes their payments back.
async fn finish(work: &mut Work) {
    while work.len() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        work.reap();
    }
}

/// The intents round: an included intent is watched until it is buried
/// `finality_depth` blocks deep, then forgotten; one whose block left the
/// chain is taken up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intents_round_forgets_final_intents_and_takes_up_reorged_ones() {
    let b = Bench::new(quick()).await;
    b.chain.auto_mine(true);
    let p = b.pay().await;
    b.settle(&p).await;
    let hash = b.intent().await.tx_hashes[0];
    let mut work = Work::default();
    let mut head = None;

    b.chain.reorg_out(hash);
    b.chain.auto_mine(false);
    b.settler.intents_round(&mut work, &mut head).await.unwrap();
    assert_eq!(work.len(), 1, "the reorged intent is taken up");
    finish(&mut work).await;
    assert_eq!(b.intent().await.state, IntentState::Pending);

    b.chain.auto_mine(true);
    b.settler.intents_round(&mut work, &mut head).await.unwrap();
    finish(&mut work).await;
    assert!(matches!(b.intent().await.state, IntentState::Included { .. }), "sent again and mined");

    b.chain.mine_blocks(1);
    b.settler.intents_round(&mut work, &mut head).await.unwrap();
    assert_eq!(b.intents().await.len(), 1, "not final yet");
    b.chain.mine_blocks(2);
    b.settler.intents_round(&mut work, &mut head).await.unwrap();
    assert!(b.intents().await.is_empty(), "final: forgotten");
    assert_eq!(b.status(p.id).await.state, PaymentState::Confirmed);
}

/// After a restart on a node that never saw a pending intent's
/// transaction, the signer's next nonce starts past it, so that no new
/// intent takes its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonces_start_past_the_pending_intents_after_a_restart() {
    let b = Bench::new(quick()).await;
    let p = b.pay().await;
    b.settle(&p).await;
    let pending = b.intent().await;
    b.chain.forget_nonces();
    b.settler.floor_nonces().await.unwrap();
    let q = b.pay().await;
    b.settle(&q).await;
    let nonces: Vec<u64> = b.intents().await.iter().map(|i| i.nonce).collect();
    assert!(nonces.contains(&pending.nonce) && nonces.contains(&(pending.nonce + 1)), "{nonces:?}");
    assert_eq!(b.status(p.id).await.transaction, Some(pending.tx_hashes[0]), "the first intent is kept");
}

/// A process stopped between signing a transaction without an intent (a
/// deposit, an HTTP channel call) and sending it left its nonce a gap below
/// a recorded intent: the start fills it, and leaves the intent's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_below_a_recorded_intent_is_filled_at_start() {
    let b = Bench::new(quick()).await;
    let unsent =
        x402_chain::Chain::sign_call(&*b.chain, TOKEN, alloy::primitives::Bytes::from_static(b"deposit"), None)
            .await
            .unwrap();
    let p = b.pay().await;
    b.settle(&p).await;
    let pending = b.intent().await;
    assert_eq!((unsent.nonce, pending.nonce), (0, 1));
    assert!(!b.chain.nonce_taken(0));
    b.settler.floor_nonces().await.unwrap();
    assert!(b.chain.nonce_taken(0), "the gap was filled");
    assert!(!b.chain.nonce_taken(1), "the intent's nonce is its own");
}

/// The same gap left by a running process (the filler failed too, the
/// node was down) is filled by the round that finds an intent above it
/// waiting unmined for twice the fee-bump delay, and not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_holding_up_an_intent_is_filled_by_a_later_round() {
    let clock = crate::domain::Clock::set_at(crate::domain::unix_millis());
    let b = Bench::new(SettlerConfig { clock: clock.clone(), ..quick() }).await;
    x402_chain::Chain::sign_call(&*b.chain, TOKEN, alloy::primitives::Bytes::from_static(b"deposit"), None)
        .await
        .unwrap();
    let p = b.pay().await;
    b.settle(&p).await;
    b.settler.fill_stuck_gaps(&b.intents().await).await;
    assert!(!b.chain.nonce_taken(0), "not waiting long enough yet");
    clock.advance(Duration::from_secs(2 * 3600));
    b.settler.fill_stuck_gaps(&b.intents().await).await;
    assert!(b.chain.nonce_taken(0), "the gap was filled");
    assert!(!b.chain.nonce_taken(1), "the intent's nonce is its own");
}

/// The settler reads the time from its clock: a payment whose validity ran
/// out by that clock (and by the chain's) is concluded `Expired`, stamped
/// by it, and nothing is signed or sent for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_that_ran_out_by_the_settlers_clock_is_expired_and_never_sent() {
    let clock = crate::domain::Clock::set_at(crate::domain::unix_millis());
    let b = Bench::new(SettlerConfig { clock: clock.clone(), ..quick() }).await;
    let p = b.pay().await;
    // By the settler's clock, 2 s of validity are left: inside the 3 s it
    // keeps from `validBefore`. The chain's latest block says so too.
    let left = p.authorization.valid_before_secs() - clock.now_secs();
    clock.advance(Duration::from_secs(left - 2));
    b.chain.set_head_time(clock.now_secs());
    b.settle(&p).await;
    assert!(b.chain.broadcasts().is_empty(), "nothing was sent");
    assert!(b.intents().await.is_empty(), "nothing was signed");
    let status = b.status(p.id).await;
    assert_eq!(status.state, PaymentState::Expired, "{status:?}");
    assert_eq!(status.updated_at_ms, clock.now_ms());
}

/// A clock stepped ahead (an NTP correction, a resumed virtual machine)
/// does not give up a payment the chain would still take: the chain's
/// latest block says 40 s are left, so the payment is settled, not
/// expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepped_ahead_does_not_expire_what_the_chain_still_takes() {
    let clock = crate::domain::Clock::set_at(crate::domain::unix_millis());
    let b = Bench::new(SettlerConfig { clock: clock.clone(), ..quick() }).await;
    b.chain.auto_mine(true);
    let p = b.pay().await;
    let valid_before = p.authorization.valid_before_secs();
    b.chain.set_head_time(valid_before - 40);
    clock.advance(Duration::from_secs(valid_before + 60 - clock.now_secs()));
    b.settle(&p).await;
    let status = b.status(p.id).await;
    assert_eq!(status.state, PaymentState::Confirmed, "{status:?}");
    assert_eq!(b.chain.broadcasts().len(), 1);
}

/// The chain's head trails the true time by a slot: with the clock right,
/// the expiry margin is kept whole, and nothing is sent for a payment due
/// in 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_trails_the_clock_keeps_the_whole_expiry_margin() {
    let clock = crate::domain::Clock::set_at(crate::domain::unix_millis());
    let b = Bench::new(SettlerConfig { clock: clock.clone(), ..quick() }).await;
    b.chain.auto_mine(true);
    let p = b.pay().await;
    let left = p.authorization.valid_before_secs() - clock.now_secs();
    clock.advance(Duration::from_secs(left - 2));
    b.chain.set_head_time(clock.now_secs() - 8);
    b.settle(&p).await;
    let status = b.status(p.id).await;
    assert_eq!(status.state, PaymentState::Expired, "{status:?}");
    assert!(b.chain.broadcasts().is_empty(), "nothing was sent");
}

/// A chain that makes no blocks (on demand, or halted) has a head far
/// behind the clock: at first sight that could be a clock stepped ahead,
/// so the head counts; once the head has stayed `idle_head`, the clock
/// counts. A head that moves meanwhile starts the wait again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_chain_counts_by_the_clock_once_its_head_has_stayed() {
    let config = SettlerConfig { idle_head: Duration::from_millis(100), ..quick() };
    let b = Bench::new(config).await;
    let now = crate::domain::unix_millis() / 1000;
    let due = now + 2;
    b.chain.set_head_time(now - 3_600);
    assert!(!b.settler.expired(due, 3, &mut None).await.unwrap(), "first sight: the head counts");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(b.settler.expired(due, 3, &mut None).await.unwrap(), "the head stayed: the clock counts");
    b.chain.set_head_time(now - 3_599);
    assert!(!b.settler.expired(due, 3, &mut None).await.unwrap(), "the head moved");
}
