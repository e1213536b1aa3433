//! The pipeline end to end in process: submits, duplicates, parking behind
//! balance reads and channel reads, commit failures, restarts.

use std::sync::atomic::{AtomicBool, Ordering};
use x402_devnet::Payer;

use alloy::primitives::{B256, U256, address};

use super::*;
use crate::domain::BalanceKey;
use crate::{
    balance::{Account, ConfiguredBalances},
    domain::{PaymentInput, Requirements},
    ledger::{MemoryLedger, WriteBatch},
    reason::Reason,
    testing::ManualBalances,
};

/// A memory ledger whose commits fail while `failing` is set, and wait
/// while a test holds `stall`.
#[derive(Debug, Default)]
struct FlakyLedger {
    inner: MemoryLedger,
    failing: AtomicBool,
    stall: std::sync::Mutex<()>,
    /// `for_each_payment` calls: reads of the whole history.
    full_scans: std::sync::atomic::AtomicUsize,
    /// The next this many commits fail.
    fail_next: std::sync::atomic::AtomicUsize,
    /// Commits begun (counted before the stall).
    entered: std::sync::atomic::AtomicUsize,
    /// The next this many commits are written, then reported failed (an
    /// fsync error after the write reached the log).
    lose_next: std::sync::atomic::AtomicUsize,
    /// The last event's sequence cannot be read.
    hide_events: AtomicBool,
    /// The next this many reads of the last event's sequence fail.
    hide_sequence_next: std::sync::atomic::AtomicUsize,
    /// Events cannot be read (nor, so, a failed group's fate).
    hide_event_reads: AtomicBool,
}

impl Ledger for FlakyLedger {
    fn commit(&self, batch: &WriteBatch) -> Result<()> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        drop(self.stall.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if self.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(Error::Io(std::io::Error::other("one write lost")));
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::Io(std::io::Error::other("disk on fire")));
        }
        self.inner.commit(batch)?;
        if self.lose_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(Error::Io(std::io::Error::other("fsync: Input/output error")));
        }
        Ok(())
    }
    fn payment(&self, id: &PaymentId) -> Result<Option<crate::domain::PaymentRecord>> {
        self.inner.payment(id)
    }
    fn for_each_payment(&self, visit: &mut dyn FnMut(crate::domain::PaymentRecord)) -> Result<()> {
        self.full_scans.fetch_add(1, Ordering::SeqCst);
        self.inner.for_each_payment(visit)
    }
    fn for_each_payment_valid_from(
        &self,
        from: u64,
        visit: &mut dyn FnMut(crate::domain::PaymentRecord),
    ) -> Result<()> {
        self.inner.for_each_payment_valid_from(from, visit)
    }
    fn prune(&self, before: u64) -> Result<crate::ledger::Pruned> {
        self.inner.prune(before)
    }
    fn pruned(&self, ids: &[PaymentId]) -> Result<Vec<PaymentId>> {
        self.inner.pruned(ids)
    }
    fn pending(&self) -> Result<Vec<crate::domain::PendingKey>> {
        self.inner.pending()
    }
    fn merchants(&self) -> Result<Vec<Merchant>> {
        self.inner.merchants()
    }
    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<crate::domain::SettlementEvent>> {
        if self.hide_events.load(Ordering::SeqCst) || self.hide_event_reads.load(Ordering::SeqCst) {
            return Err(Error::Io(std::io::Error::other("the ledger is reopening")));
        }
        self.inner.events_after(after, limit)
    }
    fn last_event_sequence(&self) -> Result<u64> {
        let once =
            self.hide_sequence_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if once || self.hide_events.load(Ordering::SeqCst) {
            return Err(Error::Io(std::io::Error::other("the ledger is reopening")));
        }
        self.inner.last_event_sequence()
    }
    fn intents(&self) -> Result<Vec<crate::domain::TxIntent>> {
        self.inner.intents()
    }
    fn channels(&self) -> Result<Vec<crate::domain::ChannelRecord>> {
        self.inner.channels()
    }
    fn channel(&self, id: &alloy::primitives::B256) -> Result<Option<crate::domain::ChannelRecord>> {
        self.inner.channel(id)
    }
}

const PAY_TO: Address = address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8");

fn merchant() -> Arc<Merchant> {
    Arc::new(crate::testing::direct_merchant(PAY_TO))
}

fn submission(payer: &Payer, nonce: u8) -> Submission {
    let requirements = Requirements {
        scheme: "exact".into(),
        network: "eip155:31337".into(),
        amount: U256::from(100),
        asset: address!("0x5FbDB2315678afecb367f032d93F642f64180aa3"),
        pay_to: PAY_TO,
        max_timeout_seconds: 60,
        eip712_name: "USD Coin".into(),
        eip712_version: "2".into(),
    };
    let now = crate::domain::unix_millis() / 1000;
    let payload = payer.sign_exact(&requirements, now - 60, now + 600, B256::repeat_byte(nonce));
    Submission::new(requirements, PaymentInput::Exact(payload))
}

fn start(ledger: &Arc<FlakyLedger>, payer: &Payer, balance: u64) -> Pipeline {
    let balances = ConfiguredBalances::new(None).with_account(
        31337,
        address!("0x5FbDB2315678afecb367f032d93F642f64180aa3"),
        payer.address(),
        U256::from(balance),
    );
    let ledger: Arc<dyn Ledger> = ledger.clone();
    let balances: Arc<dyn BalanceSource> = Arc::new(balances);
    let config = PipelineConfig { verifiers: 2, shards: 3, ..PipelineConfig::default() };
    Pipeline::start(&config, &ledger, &balances).unwrap()
}

/// `payer`'s voucher of `max` for its channel of `config` (authorizer
/// `authorizer`, 900 s withdraw delay), on the local chain.
fn voucher_payload(
    payer: &Payer,
    domain: &x402_channel::ChannelDomain,
    config: &x402_channel::ChannelConfig,
    authorizer: Address,
    max: u128,
) -> crate::channels::VoucherPayload {
    let id = domain.channel_id(config);
    crate::channels::VoucherPayload {
        network: "eip155:31337".into(),
        config: config.clone(),
        channel_id: id,
        max_claimable: max,
        signature: payer.sign_voucher(domain, id, max),
        charge: None,
        extra: crate::channels::ChannelExtra { receiver_authorizer: authorizer, withdraw_delay: 900 },
        deposit: None,
        refund: None,
    }
}

fn submit(pipeline: &Pipeline, s: Submission) -> SubmitOutcome {
    pipeline.try_submit(merchant(), s).unwrap().blocking_recv().unwrap()
}

mod model;

#[test]
fn a_failed_commit_accepts_nothing_and_forgets_the_payment() {
    let ledger = Arc::new(FlakyLedger::default());
    let payer = Payer::random();
    // The balance covers exactly one payment: a leaked reservation would show.
    let pipeline = start(&ledger, &payer, 100);
    let first = submission(&payer, 1);
    ledger.failing.store(true, Ordering::SeqCst);
    assert!(matches!(submit(&pipeline, first.clone()), SubmitOutcome::Unavailable(_)));
    ledger.failing.store(false, Ordering::SeqCst);
    assert!(matches!(submit(&pipeline, first.clone()), SubmitOutcome::Accepted { .. }));
    assert!(matches!(submit(&pipeline, first), SubmitOutcome::Duplicate { .. }));
    let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, submission(&payer, 2)) else {
        panic!("the second payment exceeds the balance");
    };
    assert_eq!(rejection.reason, Reason::InsufficientBalance);
}

/// A payment of `value` signed by `payer` with `nonce`.
fn payment_of(payer: &Payer, nonce: u8, value: u64) -> Submission {
    let mut s = submission(payer, nonce);
    s.requirements.amount = U256::from(value);
    let PaymentInput::Exact(p) = &s.input else { unreachable!("exact") };
    let (after, before) = (p.authorization.valid_after_secs(), p.authorization.valid_before_secs());
    let signed = payer.sign_exact(&s.requirements, after, before, B256::repeat_byte(nonce));
    Submission::new(s.requirements, PaymentInput::Exact(signed))
}

/// A group reported failed whose write reached the disk all the same
/// (its last event is there): its answers stand. The payment is
/// accepted, not "retry" (it will be settled, so a paid request would go
/// unserved), and a settlement's reservation is released as recorded.
#[test]
fn a_group_reported_failed_that_is_on_disk_stands() {
    use crate::domain::PaymentState;
    let ledger = Arc::new(FlakyLedger::default());
    let payer = Payer::random();
    let pipeline = start(&ledger, &payer, 100);
    ledger.lose_next.store(1, Ordering::SeqCst);
    let first = submission(&payer, 1);
    let SubmitOutcome::Accepted { id, .. } = submit(&pipeline, first.clone()) else { panic!("on disk: accepted") };
    assert!(matches!(submit(&pipeline, first), SubmitOutcome::Duplicate { retry: false, .. }));

    ledger.lose_next.store(1, Ordering::SeqCst);
    let mut status = PaymentStatus::new(PaymentState::Confirmed, 1);
    status.transaction = Some(B256::repeat_byte(7));
    pipeline.record_settlement(Vec::new(), vec![Transition { id, status }]).unwrap().blocking_recv().unwrap().unwrap();
    assert!(ledger.pending().unwrap().is_empty());
    // The balance of 100 is free again.
    assert!(matches!(submit(&pipeline, submission(&payer, 2)), SubmitOutcome::Accepted { .. }));
}

/// A group whose fate cannot be read, then a group that is not written
/// at all because the next event number cannot be read either: neither
/// stands, however the ledger reads a moment later. (Before, the second
/// was answered ACCEPTED, with nothing of it on disk, once the last event
/// number could be read again: the first group's events were there.)
#[test]
fn a_group_that_was_never_written_never_stands() {
    let ledger = Arc::new(FlakyLedger::default());
    let payer = Payer::random();
    let pipeline = start(&ledger, &payer, 1_000);
    ledger.lose_next.store(1, Ordering::SeqCst);
    ledger.hide_event_reads.store(true, Ordering::SeqCst);
    ledger.hide_sequence_next.store(2, Ordering::SeqCst);
    assert!(matches!(submit(&pipeline, submission(&payer, 1)), SubmitOutcome::Unavailable(_)));
    ledger.hide_event_reads.store(false, Ordering::SeqCst);
    let second = submission(&payer, 2);
    let outcome = submit(&pipeline, second);
    assert!(matches!(outcome, SubmitOutcome::Unavailable(_)), "nothing of it was written: {outcome:?}");
    let id = PaymentId::new(31337, TOKEN, payer.address(), B256::repeat_byte(2));
    assert!(ledger.payment(&id).unwrap().is_none());
    // The first is on disk: answered from the ledger; the second passes now.
    assert!(matches!(submit(&pipeline, submission(&payer, 3)), SubmitOutcome::Accepted { .. }));
}

/// A write reported failed that reached the disk, when the ledger cannot
/// say so at once: the payment is recorded (and will be settled), so its
/// retry must be answered from the ledger: accepted again for the
/// submit's idempotency key, a duplicate without it. Never "retry"
/// forever, which would leave a paid request unserved.
#[test]
fn a_payment_recorded_by_a_write_reported_failed_is_answered_from_the_ledger() {
    use crate::domain::IdempotencyKey;
    let ledger = Arc::new(FlakyLedger::default());
    let payer = Payer::random();
    let pipeline = start(&ledger, &payer, 1_000);
    let key = IdempotencyKey::parse("pay_0123456789abcdef").unwrap();
    let keyed = Submission { idempotency: Some(key), ..submission(&payer, 1) };
    ledger.lose_next.store(1, Ordering::SeqCst);
    ledger.hide_events.store(true, Ordering::SeqCst);
    assert!(matches!(submit(&pipeline, keyed.clone()), SubmitOutcome::Unavailable(_)));
    ledger.hide_events.store(false, Ordering::SeqCst);
    assert!(ledger.payment(&PaymentId::new(31337, TOKEN, payer.address(), B256::repeat_byte(1))).unwrap().is_some());

    // The retry's own group fails too (it writes another payment): the
    // next retry is answered all the same.
    let stall = ledger.stall.lock().unwrap();
    let entered = ledger.entered.load(Ordering::SeqCst);
    let held = pipeline.try_submit(merchant(), submission(&payer, 5)).unwrap();
    while ledger.entered.load(Ordering::SeqCst) == entered {
        thread::sleep(std::time::Duration::from_millis(1));
    }
    let retried = pipeline.try_submit(merchant(), keyed.clone()).unwrap();
    let beside = pipeline.try_submit(merchant(), submission(&payer, 6)).unwrap();
    thread::sleep(std::time::Duration::from_millis(100));
    ledger.fail_next.store(2, Ordering::SeqCst);
    drop(stall);
    for rx in [held, retried, beside] {
        let outcome = rx.blocking_recv().unwrap();
        assert!(matches!(outcome, SubmitOutcome::Unavailable(_)), "{outcome:?}");
    }
    let again = submit(&pipeline, keyed.clone());
    assert!(matches!(again, SubmitOutcome::Duplicate { retry: true, .. }), "the retry with its key: {again:?}");
    let bare = submit(&pipeline, Submission { idempotency: None, ..keyed });
    assert!(matches!(bare, SubmitOutcome::Duplicate { retry: false, .. }), "without the key: {bare:?}");
    // Its reservation is held once: 900 left of 1,000.
    assert!(matches!(submit(&pipeline, payment_of(&payer, 3, 901)), SubmitOutcome::Rejected { .. }));
    assert!(matches!(submit(&pipeline, payment_of(&payer, 4, 900)), SubmitOutcome::Accepted { .. }));
}

#[test]
fn a_payment_the_ledger_already_has_is_never_written_over() {
    let payer = Payer::random();
    let (open, settled) = (submission(&payer, 1), submission(&payer, 2));
    // The records as a first node wrote them.
    let records: Vec<_> = {
        let ledger = Arc::new(FlakyLedger::default());
        let pipeline = start(&ledger, &payer, 1_000);
        [&open, &settled]
            .iter()
            .map(|s| match submit(&pipeline, (*s).clone()) {
                SubmitOutcome::Accepted { id, .. } => ledger.payment(&id).unwrap().unwrap(),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    // A running node whose shards never saw them (a write reported
    // failed that was recorded after all, an entry let go).
    let ledger = Arc::new(FlakyLedger::default());
    let pipeline = start(&ledger, &payer, 200);
    let mut batch = WriteBatch::default();
    batch.push(crate::ledger::Write::Payment(Box::new(records[0].clone())));
    let mut confirmed = records[1].clone();
    confirmed.status.state = crate::domain::PaymentState::Confirmed;
    batch.push(crate::ledger::Write::Payment(Box::new(confirmed.clone())));
    ledger.commit(&batch).unwrap();
    let sequence = ledger.last_event_sequence().unwrap();

    for (s, record) in [(&open, &records[0]), (&settled, &confirmed)] {
        match submit(&pipeline, s.clone()) {
            SubmitOutcome::Duplicate { id, status, .. } => {
                assert_eq!((id, status.state), (record.id, record.status.state));
            }
            other => panic!("a recorded payment answered {other:?}"),
        }
        assert_eq!(ledger.payment(&record.id).unwrap().as_ref(), Some(record), "written over");
    }
    assert_eq!(ledger.last_event_sequence().unwrap(), sequence, "no event for a payment already recorded");
    // The open one is owed and holds its reservation; the settled one
    // holds none: of 200, 100 is left.
    assert!(matches!(submit(&pipeline, submission(&payer, 3)), SubmitOutcome::Accepted { .. }));
    let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, submission(&payer, 4)) else {
        panic!("the open payment's reservation was not kept");
    };
    assert_eq!(rejection.reason, Reason::InsufficientBalance);
}

#[test]
fn a_payment_whose_record_retention_deleted_is_refused() {
    let payer = Payer::random();
    let payment = submission(&payer, 1);
    let ledger = Arc::new(FlakyLedger::default());
    let pipeline = start(&ledger, &payer, 1_000);
    let SubmitOutcome::Accepted { id, .. } = submit(&pipeline, payment.clone()) else { panic!("accepted") };
    drop(pipeline);
    // Settled, then deleted by retention (as if far in the past).
    let mut record = ledger.payment(&id).unwrap().unwrap();
    record.status.state = crate::domain::PaymentState::Confirmed;
    let mut batch = WriteBatch::default();
    batch.push(crate::ledger::Write::Dequeue(crate::domain::PendingKey {
        merchant_number: record.merchant_number,
        deadline: record.authorization.valid_before_secs(),
        id,
    }));
    batch.push(crate::ledger::Write::Payment(Box::new(record)));
    ledger.commit(&batch).unwrap();
    assert_eq!(ledger.prune(u64::MAX).unwrap().payments, 1);

    // Its authorization submitted again: refused, not recorded anew.
    let pipeline = start(&ledger, &payer, 1_000);
    let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, payment) else {
        panic!("a spent nonce was accepted again");
    };
    assert_eq!(rejection.reason, Reason::NonceAlreadyUsed);
    assert_eq!(ledger.payment(&id).unwrap(), None);
}

#[test]
fn only_durable_channel_writes_are_reported_changed() {
    let ledger = Arc::new(FlakyLedger::default());
    let record = crate::ledger::conformance::sample_channel(4, 100, false);
    let id = record.channel.id;
    let mut batch = WriteBatch::default();
    batch.push(crate::ledger::Write::Channel(Box::new(record.clone())));
    ledger.commit(&batch).unwrap();
    let pipeline = start(&ledger, &Payer::random(), 0);
    let changed = pipeline.changed_channels();
    let chain = record.chain_id;
    assert!(changed.take(chain).is_empty(), "restored, not changed");

    let mut onchain = record.channel.onchain;
    onchain.total_claimed += 1;
    ledger.failing.store(true, Ordering::SeqCst);
    assert!(pipeline.sync_channel(id, onchain, None).unwrap().blocking_recv().unwrap().is_err());
    assert!(changed.take(chain).is_empty(), "a failed commit changed nothing on disk");
    ledger.failing.store(false, Ordering::SeqCst);
    pipeline.sync_channel(id, onchain, None).unwrap().blocking_recv().unwrap().unwrap();
    // Another chain's claims take theirs, not this chain's.
    assert!(changed.take(chain + 1).is_empty(), "another chain's");
    assert_eq!(changed.take(chain), std::collections::HashSet::from([id]));
    assert!(changed.take(chain).is_empty(), "taken once");
    assert_eq!(ledger.channel(&id).unwrap().unwrap().channel.onchain.total_claimed, onchain.total_claimed);
}

#[test]
fn state_is_rebuilt_from_the_ledger() {
    let ledger = Arc::new(FlakyLedger::default());
    let payer = Payer::random();
    // Signed once: a resubmit must be byte-identical to be a duplicate.
    let submissions: Vec<_> = (1..=3).map(|n| submission(&payer, n)).collect();
    let ids: Vec<_> = {
        let pipeline = start(&ledger, &payer, 300);
        submissions
            .iter()
            .map(|s| match submit(&pipeline, s.clone()) {
                SubmitOutcome::Accepted { id, .. } => id,
                other => panic!("{other:?}"),
            })
            .collect()
    };
    assert_eq!(ledger.pending().unwrap().len(), 3);
    assert_eq!(ledger.last_event_sequence().unwrap(), 3);
    // Long past its validBefore, and still open (its transaction not
    // mined yet): it holds a reservation all the same. And a history of
    // settled payments start-up need not read.
    let mut old = crate::ledger::conformance::sample_payment(9, 1_000);
    (old.authorization.from, old.asset, old.authorization.value) =
        (payer.address(), address!("0x5FbDB2315678afecb367f032d93F642f64180aa3"), U256::from(100));
    old.status.state = crate::domain::PaymentState::Submitted;
    let mut batch = WriteBatch::default();
    batch.push(crate::ledger::Write::Enqueue(crate::domain::PendingKey {
        merchant_number: old.merchant_number,
        deadline: 1_000,
        id: old.id,
    }));
    batch.push(crate::ledger::Write::Payment(Box::new(old)));
    for seed in 10..50 {
        let mut settled = crate::ledger::conformance::sample_payment(seed, 1_000);
        settled.status.state = crate::domain::PaymentState::Confirmed;
        batch.push(crate::ledger::Write::Payment(Box::new(settled)));
    }
    ledger.commit(&batch).unwrap();

    let pipeline = start(&ledger, &payer, 400);
    assert_eq!(ledger.full_scans.load(Ordering::SeqCst), 0, "start-up read the whole history");
    for (s, id) in submissions.iter().zip(&ids) {
        match submit(&pipeline, s.clone()) {
            SubmitOutcome::Duplicate { id: dup, .. } => assert_eq!(&dup, id),
            other => panic!("{other:?}"),
        }
    }
    // The four restored reservations use up the balance.
    let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, submission(&payer, 4)) else {
        panic!("reservations were restored");
    };
    assert_eq!(rejection.reason, Reason::InsufficientBalance);
    assert_eq!(*pipeline.events().borrow(), 3);
}

#[test]
fn settlement_transitions_are_recorded_and_release_reservations() {
    use crate::domain::{IntentState, PaymentState, TxIntent};

    let ledger = Arc::new(FlakyLedger::default());
    let payer = Payer::random();
    let pipeline = start(&ledger, &payer, 100);
    let first = submission(&payer, 1);
    let SubmitOutcome::Accepted { id, .. } = submit(&pipeline, first.clone()) else { panic!("accepted") };
    let record = |state, block: Option<u64>| -> Result<()> {
        let mut status = PaymentStatus::new(state, 1);
        status.transaction = Some(B256::repeat_byte(7));
        status.block = block;
        let intent = TxIntent {
            chain_id: 31337,
            signer: Address::repeat_byte(1),
            nonce: 0,
            tx_hashes: vec![B256::repeat_byte(7)],
            raw: vec![2, 1],
            payments: vec![id],
            state: IntentState::Pending,
            created_at_ms: 1,
            updated_at_ms: 1,
        };
        pipeline
            .record_settlement(vec![IntentChange::Record(intent)], vec![Transition { id, status }])?
            .blocking_recv()
            .unwrap()
    };

    // Its waiters wake when its event is durable, not before, and
    // nobody else's do.
    use futures::FutureExt;
    let (waiter, other) = (pipeline.wait_for_payment(id), pipeline.wait_for_payment(PaymentId(B256::ZERO)));
    let (woken, not_woken) = (waiter.notified(), other.notified());
    ledger.failing.store(true, Ordering::SeqCst);
    assert!(record(PaymentState::Submitted, None).is_err());
    ledger.failing.store(false, Ordering::SeqCst);
    let mut woken = woken;
    assert!(woken.as_mut().now_or_never().is_none(), "a failed commit wakes nobody");

    // Submitted: still owed, still queued, the balance still reserved.
    record(PaymentState::Submitted, None).unwrap();
    assert!(woken.now_or_never().is_some());
    assert!(not_woken.now_or_never().is_none());
    assert_eq!(ledger.pending().unwrap().len(), 1);
    assert_eq!(ledger.intents().unwrap().len(), 1);
    assert!(matches!(submit(&pipeline, submission(&payer, 2)), SubmitOutcome::Rejected { .. }));

    // Confirmed: off the queue, reservation released, a duplicate says so.
    record(PaymentState::Confirmed, Some(42)).unwrap();
    let stored = ledger.payment(&id).unwrap().unwrap();
    assert_eq!(stored.status.state, PaymentState::Confirmed);
    assert_eq!(stored.status.block, Some(42));
    assert!(ledger.pending().unwrap().is_empty());
    let states: Vec<_> = ledger.events_after(0, 10).unwrap().iter().map(|e| e.status.state).collect();
    assert_eq!(states, [PaymentState::Queued, PaymentState::Submitted, PaymentState::Confirmed]);
    assert_eq!(*pipeline.events().borrow(), 3);
    match submit(&pipeline, first) {
        SubmitOutcome::Duplicate { status, .. } => assert_eq!(status.state, PaymentState::Confirmed),
        other => panic!("{other:?}"),
    }
    assert!(matches!(submit(&pipeline, submission(&payer, 2)), SubmitOutcome::Accepted { .. }));

    // An unknown payment is refused and nothing of the update is written.
    let unknown = Transition { id: PaymentId(B256::ZERO), status: PaymentStatus::new(PaymentState::Failed, 1) };
    let err = pipeline.record_settlement(Vec::new(), vec![unknown]).unwrap().blocking_recv().unwrap();
    assert!(matches!(err, Err(Error::UnknownPayment(_))));
    assert_eq!(ledger.last_event_sequence().unwrap(), 4);
}

#[test]
fn a_recorded_payment_is_a_retry_only_with_its_key_from_its_merchant() {
    use crate::domain::IdempotencyKey;

    let ledger = Arc::new(FlakyLedger::default());
    let payer = Payer::random();
    let key = IdempotencyKey::parse("pay_0123456789abcdef").unwrap();
    // Signed once each: a submit must be byte-identical to be the same payment.
    let signed: Vec<Submission> = (0..=3).map(|n| submission(&payer, n)).collect();
    let keyed = |nonce: usize| Submission { idempotency: Some(key), ..signed[nonce].clone() };
    let retried = |outcome: SubmitOutcome| matches!(outcome, SubmitOutcome::Duplicate { retry: true, .. });
    let replayed = |outcome: SubmitOutcome| matches!(outcome, SubmitOutcome::Duplicate { retry: false, .. });
    {
        let pipeline = start(&ledger, &payer, 1_000);
        assert!(matches!(submit(&pipeline, keyed(1)), SubmitOutcome::Accepted { .. }));
        assert!(retried(submit(&pipeline, keyed(1))), "same key, same payment, same merchant");
        assert!(replayed(submit(&pipeline, signed[1].clone())), "no key: a replay");
        let other_key = IdempotencyKey::parse("pay_fedcba9876543210").unwrap();
        let other = Submission { idempotency: Some(other_key), ..signed[1].clone() };
        assert!(replayed(submit(&pipeline, other)), "another key: a replay");
        let mut m2 = crate::testing::direct_merchant(PAY_TO);
        m2.id = "m2".into();
        m2.number = 2;
        let foreign = pipeline.try_submit(Arc::new(m2), keyed(1)).unwrap().blocking_recv().unwrap();
        assert!(replayed(foreign), "another merchant with the key: a replay");

        // The key with another payment is refused, and that payment is
        // neither recorded nor reserved.
        let SubmitOutcome::Rejected { rejection, id, .. } = submit(&pipeline, keyed(2)) else {
            panic!("the key names payment 1")
        };
        assert_eq!(rejection.reason, Reason::IdempotencyKeyReused);
        assert!(ledger.payment(&id.unwrap()).unwrap().is_none());
        assert!(matches!(submit(&pipeline, signed[2].clone()), SubmitOutcome::Accepted { .. }));
    }
    // After a restart: the same answers, from the ledger.
    let pipeline = start(&ledger, &payer, 1_000);
    let again = submit(&pipeline, keyed(1));
    assert!(retried(again.clone()), "{again:?}");
    assert!(replayed(submit(&pipeline, signed[1].clone())));
    let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, keyed(3)) else { panic!("still taken") };
    assert_eq!(rejection.reason, Reason::IdempotencyKeyReused);
}

#[test]
fn a_ledger_stalled_under_load_recovers_and_loses_nothing() {
    use crate::domain::PaymentState;

    // Queues of two: every queue is full while the ledger stalls, and
    // settlement updates keep sending the shard answers.
    let ledger = Arc::new(FlakyLedger::default());
    let payers: Vec<Payer> = (0..4).map(|_| Payer::random()).collect();
    let config =
        PipelineConfig { verifiers: 2, shards: 1, queue_capacity: 2, max_group: 2, ..PipelineConfig::default() };
    let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
    let dyn_ledger: Arc<dyn Ledger> = ledger.clone();
    let pipeline = Arc::new(Pipeline::start(&config, &dyn_ledger, &balances).unwrap());
    let first = submission(&payers[0], 1);
    let settled: Vec<PaymentId> = std::iter::once(first.clone())
        .chain((2..=40).map(|n| submission(&payers[0], n)))
        .map(|s| match submit(&pipeline, s) {
            SubmitOutcome::Accepted { id, .. } => id,
            other => panic!("{other:?}"),
        })
        .collect();
    let load: Vec<Submission> = payers[1..].iter().flat_map(|p| (1..=200).map(move |n| submission(p, n))).collect();

    let stall = ledger.stall.lock().unwrap();
    let (done_tx, done) = std::sync::mpsc::channel();
    let submitter = {
        let (pipeline, done_tx) = (pipeline.clone(), done_tx.clone());
        thread::spawn(move || {
            let mut replies = Vec::new();
            for s in load {
                let mut s = s;
                loop {
                    match pipeline.try_submit(merchant(), s) {
                        Ok(rx) => break replies.push(rx),
                        Err(Overloaded(back)) => {
                            s = *back;
                            thread::sleep(std::time::Duration::from_micros(200));
                        }
                    }
                }
            }
            let outcomes: Vec<_> = replies.into_iter().map(|rx| rx.blocking_recv().unwrap()).collect();
            done_tx.send(()).unwrap();
            outcomes
        })
    };
    let settler = {
        let pipeline = pipeline.clone();
        thread::spawn(move || {
            for id in settled {
                let confirmed = Transition { id, status: PaymentStatus::new(PaymentState::Confirmed, 1) };
                pipeline.record_settlement(Vec::new(), vec![confirmed]).unwrap().blocking_recv().unwrap().unwrap();
            }
            done_tx.send(()).unwrap();
        })
    };
    thread::sleep(std::time::Duration::from_millis(300));
    drop(stall);
    for _ in 0..2 {
        done.recv_timeout(std::time::Duration::from_secs(30)).expect("the pipeline deadlocked after the stall");
    }
    settler.join().unwrap();
    let outcomes = submitter.join().unwrap();

    // Every payment acknowledged is on disk; the settled ones are confirmed.
    assert_eq!(outcomes.len(), 600);
    for outcome in &outcomes {
        let SubmitOutcome::Accepted { id, .. } = outcome else { panic!("{outcome:?}") };
        assert!(ledger.payment(id).unwrap().is_some(), "acknowledged but not recorded");
    }
    assert_eq!(ledger.pending().unwrap().len(), 600);
    let replay = submit(&pipeline, first);
    assert!(matches!(replay, SubmitOutcome::Duplicate { .. }), "{replay:?}");
}

#[test]
fn a_pending_intent_is_replaced_only_by_a_version_of_itself() {
    use crate::domain::{IntentState, TxIntent};

    let ledger = Arc::new(FlakyLedger::default());
    let payer = Payer::random();
    let pipeline = start(&ledger, &payer, 1_000);
    let ids: Vec<PaymentId> = (1..=2)
        .map(|n| match submit(&pipeline, submission(&payer, n)) {
            SubmitOutcome::Accepted { id, .. } => id,
            other => panic!("{other:?}"),
        })
        .collect();
    let intent = |payment: PaymentId, hashes: &[u8]| TxIntent {
        chain_id: 31337,
        signer: Address::repeat_byte(1),
        nonce: 5,
        tx_hashes: hashes.iter().map(|h| B256::repeat_byte(*h)).collect(),
        raw: vec![2, *hashes.last().unwrap()],
        payments: vec![payment],
        state: IntentState::Pending,
        created_at_ms: 1,
        updated_at_ms: 1,
    };
    let record = |i: TxIntent| {
        pipeline.record_settlement(vec![IntentChange::Record(i)], Vec::new()).unwrap().blocking_recv().unwrap()
    };
    record(intent(ids[0], &[1])).unwrap();
    record(intent(ids[0], &[1, 2])).expect("a fee bump: a version of the same transaction");
    for other in [intent(ids[1], &[3]), intent(ids[0], &[4])] {
        let err = record(other).unwrap_err();
        assert!(matches!(err, Error::IntentConflict(_)), "{err}");
    }
    // Nor twice in one update (one group).
    let twice = vec![IntentChange::Record(intent(ids[0], &[1, 2])), IntentChange::Record(intent(ids[1], &[5]))];
    let err = pipeline.record_settlement(twice, Vec::new()).unwrap().blocking_recv().unwrap().unwrap_err();
    assert!(matches!(err, Error::IntentConflict(_)), "{err}");
    assert_eq!(ledger.intents().unwrap(), vec![intent(ids[0], &[1, 2])], "the pending intent was kept");
}

/// The shard checks validity again by the pipeline's clock (here one the
/// test moves, so nothing waits for real seconds to pass).
#[test]
fn a_payment_whose_validity_ran_out_in_the_shard_queue_is_refused() {
    // One shard, queues of one: with the ledger stalled, the shard waits
    // to hand over a payment while the next one sits in its queue.
    let ledger = Arc::new(FlakyLedger::default());
    let payer = Payer::random();
    let clock = crate::domain::Clock::set_at(crate::domain::unix_millis());
    let config = PipelineConfig {
        verifiers: 1,
        shards: 1,
        queue_capacity: 1,
        max_group: 1,
        clock: clock.clone(),
        ..PipelineConfig::default()
    };
    let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
    let dyn_ledger: Arc<dyn Ledger> = ledger.clone();
    let pipeline = Pipeline::start(&config, &dyn_ledger, &balances).unwrap();
    let now = clock.now_secs();
    let short = {
        let s = submission(&payer, 9);
        let PaymentInput::Exact(mut payload) = s.input.clone() else { unreachable!() };
        payload = payer.sign_exact(&s.requirements, now - 60, now + 8, payload.authorization.nonce);
        Submission::new(s.requirements, PaymentInput::Exact(payload))
    };
    let enqueue = |s: Submission| {
        let mut s = s;
        loop {
            match pipeline.try_submit(merchant(), s) {
                Ok(rx) => break rx,
                Err(Overloaded(back)) => {
                    s = *back;
                    thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
    };
    let stall = ledger.stall.lock().unwrap();
    // One in the stalled commit, one in the commit queue, one the shard
    // holds: then the short one waits in the shard's queue.
    let mut replies: Vec<_> = (1..=3)
        .map(|n| {
            let rx = enqueue(submission(&payer, n));
            thread::sleep(std::time::Duration::from_millis(100));
            rx
        })
        .collect();
    let late = enqueue(short);
    // Verified with 8 s left (the verifier is idle: it has passed the
    // payment on by now), then it waits in the shard's queue past its
    // `validBefore`.
    thread::sleep(std::time::Duration::from_millis(200));
    clock.advance(std::time::Duration::from_secs(9));
    drop(stall);
    let SubmitOutcome::Rejected { rejection, .. } = late.blocking_recv().unwrap() else { panic!("accepted late") };
    assert_eq!(rejection.reason, Reason::ValidBefore, "{}", rejection.message);
    for rx in replies.drain(..) {
        assert!(matches!(rx.blocking_recv().unwrap(), SubmitOutcome::Accepted { .. }));
    }
}

/// Every channel holds 1,000 on chain, nothing claimed.
#[derive(Debug, Default)]
struct FundedChannels;

impl ChannelSource for FundedChannels {
    fn fetch(&self, v: &crate::channels::VerifiedVoucher, notify: crate::channels::ChannelNotifier) {
        let onchain = x402_channel::OnChain { balance: 1_000, total_claimed: 0, withdrawal: None, refund_nonce: 0 };
        notify(v.channel_id, Ok(onchain));
    }
    fn deposit(&self, _: &crate::channels::VerifiedVoucher, _: crate::channels::DepositNotifier) {}
}

/// A voucher write that fails while a later voucher of the channel is
/// already on its way: the later one was built on the failed state and
/// is refused too (not recorded over it), and the channel the shard
/// and the ledger agree on takes both once they are sent again.
#[test]
fn a_failed_voucher_write_takes_back_the_vouchers_built_on_it() {
    use x402_channel::ChannelDomain;

    let ledger = Arc::new(FlakyLedger::default());
    let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
    let config = PipelineConfig { channels: Arc::new(FundedChannels), shards: 1, ..PipelineConfig::default() };
    let dyn_ledger: Arc<dyn Ledger> = ledger.clone();
    let pipeline = Pipeline::start(&config, &dyn_ledger, &balances).unwrap();
    let payer = Payer::random();
    let authorizer = Address::repeat_byte(0xaa);
    let domain = ChannelDomain::new(31337, config.channel_contracts.channels);
    let channel = payer.channel_config(PAY_TO, authorizer, TOKEN, 900, B256::ZERO);
    let id = domain.channel_id(&channel);
    let requirements = crate::testing::channel_requirements(TOKEN, PAY_TO);
    let voucher = |max: u128| {
        let payload = voucher_payload(&payer, &domain, &channel, authorizer, max);
        Submission::new(requirements.clone(), PaymentInput::Voucher(Box::new(payload)))
    };
    let accepted = |o: &SubmitOutcome| matches!(o, SubmitOutcome::VoucherAccepted { .. });
    assert!(accepted(&submit(&pipeline, voucher(10))));

    // The committer stalls with the second voucher; the third follows.
    let stall = ledger.stall.lock().unwrap();
    let second = pipeline.try_submit(merchant(), voucher(20)).unwrap();
    thread::sleep(std::time::Duration::from_millis(200));
    let third = pipeline.try_submit(merchant(), voucher(30)).unwrap();
    thread::sleep(std::time::Duration::from_millis(200));
    ledger.fail_next.store(1, Ordering::SeqCst);
    drop(stall);
    assert!(matches!(second.blocking_recv().unwrap(), SubmitOutcome::Unavailable(_)));
    let third = third.blocking_recv().unwrap();
    assert!(matches!(third, SubmitOutcome::Unavailable(_)), "built on a failed write, answered {third:?}");

    // Sent again, both count, once each, in the ledger as in the shard.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let second = loop {
        let answer = submit(&pipeline, voucher(20));
        if accepted(&answer) || std::time::Instant::now() > deadline {
            break answer;
        }
        thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(accepted(&second), "{second:?}");
    let SubmitOutcome::VoucherAccepted { channel: view, .. } = submit(&pipeline, voucher(30)) else {
        panic!("the third voucher, sent again")
    };
    assert_eq!(view.charged, 30);
    assert_eq!(ledger.channel(&id).unwrap().unwrap().channel.charged, 30);
}

/// Channel reads that never come back.
#[derive(Debug, Default)]
struct SilentChannels;

impl ChannelSource for SilentChannels {
    fn fetch(&self, _: &crate::channels::VerifiedVoucher, _: crate::channels::ChannelNotifier) {}
    fn deposit(&self, _: &crate::channels::VerifiedVoucher, _: crate::channels::DepositNotifier) {}
}

/// Waits (up to 10 s) for `want` of `replies` to say "too many ...,
/// retry", and takes them out; returns how many did. Any other answer
/// fails the test.
fn told_to_retry(replies: &mut Vec<oneshot::Receiver<SubmitOutcome>>, want: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut refused = 0;
    while refused < want && std::time::Instant::now() < deadline {
        replies.retain_mut(|rx| match rx.try_recv() {
            Ok(SubmitOutcome::Unavailable(message)) => {
                assert!(message.contains("too many"), "{message}");
                refused += 1;
                false
            }
            Ok(other) => panic!("{other:?}"),
            Err(_) => true,
        });
        thread::sleep(std::time::Duration::from_millis(10));
    }
    refused
}

#[test]
fn a_flood_of_vouchers_behind_one_channel_read_is_bounded() {
    use x402_channel::ChannelDomain;

    let ledger: Arc<dyn Ledger> = Arc::new(FlakyLedger::default());
    let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
    let config = PipelineConfig { channels: Arc::new(SilentChannels), ..PipelineConfig::default() };
    let pipeline = Pipeline::start(&config, &ledger, &balances).unwrap();
    let payer = Payer::random();
    let authorizer = Address::repeat_byte(0xaa);
    let domain = ChannelDomain::new(31337, config.channel_contracts.channels);
    let channel = payer.channel_config(PAY_TO, authorizer, TOKEN, 900, B256::ZERO);
    let requirements = crate::testing::channel_requirements(TOKEN, PAY_TO);
    let voucher = |max: u128| voucher_payload(&payer, &domain, &channel, authorizer, max);
    let mut replies: Vec<_> = (1..=200u128)
        .map(|n| {
            let submission = Submission::new(requirements.clone(), PaymentInput::Voucher(Box::new(voucher(n * 10))));
            pipeline.try_submit(merchant(), submission).unwrap()
        })
        .collect();
    // The channel read never comes: 64 wait, the rest are told to retry.
    assert_eq!((told_to_retry(&mut replies, 136), replies.len()), (136, 64));
}

#[test]
fn a_flood_of_vouchers_over_many_channels_is_bounded_per_shard() {
    use x402_channel::ChannelDomain;

    let ledger: Arc<dyn Ledger> = Arc::new(FlakyLedger::default());
    let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
    let config =
        PipelineConfig { channels: Arc::new(SilentChannels), shards: 1, max_parked: 100, ..PipelineConfig::default() };
    let pipeline = Pipeline::start(&config, &ledger, &balances).unwrap();
    let authorizer = Address::repeat_byte(0xaa);
    let domain = ChannelDomain::new(31337, config.channel_contracts.channels);
    let requirements = crate::testing::channel_requirements(TOKEN, PAY_TO);
    // Four channels, 40 vouchers each: under the per-channel bound, over
    // the shard's.
    let mut replies = Vec::new();
    for _ in 0..4 {
        let payer = Payer::random();
        let channel = payer.channel_config(PAY_TO, authorizer, TOKEN, 900, B256::ZERO);
        for n in 1..=40u128 {
            let voucher = voucher_payload(&payer, &domain, &channel, authorizer, n * 10);
            let submission = Submission::new(requirements.clone(), PaymentInput::Voucher(Box::new(voucher)));
            replies.push(pipeline.try_submit(merchant(), submission).unwrap());
        }
    }
    assert_eq!((told_to_retry(&mut replies, 60), replies.len()), (60, 100));
}

const TOKEN: Address = address!("0x5FbDB2315678afecb367f032d93F642f64180aa3");

/// A pipeline whose balances a test hands over by hand, with one
/// verifier so that payments reach their shard in submit order.
fn start_manual(ledger: &Arc<FlakyLedger>) -> (Pipeline, Arc<ManualBalances>) {
    let source = Arc::new(ManualBalances::default());
    let ledger: Arc<dyn Ledger> = ledger.clone();
    let balances: Arc<dyn BalanceSource> = source.clone();
    let config = PipelineConfig { verifiers: 1, shards: 3, ..PipelineConfig::default() };
    (Pipeline::start(&config, &ledger, &balances).unwrap(), source)
}

/// Returns once `payer`'s shard has handled everything submitted so far:
/// a payment of another payer of that shard, with a known balance, is
/// answered.
fn drain_shard(pipeline: &Pipeline, source: &ManualBalances, payer: &Payer) {
    let other = std::iter::repeat_with(Payer::random)
        .find(|p| shard_of(p.address(), 3) == shard_of(payer.address(), 3))
        .unwrap();
    source
        .complete(BalanceKey { chain_id: 31337, token: TOKEN, owner: other.address() }, &Ok(Account::Funds(U256::MAX)));
    assert!(matches!(submit(pipeline, submission(&other, 1)), SubmitOutcome::Accepted { .. }));
}

/// A settled payment's reservation is released only once the balance
/// source has read the payer's balance after the settlement: a cached
/// balance from before still holds the settled tokens, and releasing
/// at once would let the payer spend them twice.
#[test]
fn a_settled_payment_is_reserved_until_the_balance_is_read_again() {
    use crate::domain::PaymentState;
    let ledger = Arc::new(FlakyLedger::default());
    let (pipeline, source) = start_manual(&ledger);
    let payer = Payer::random();
    let key = BalanceKey { chain_id: 31337, token: TOKEN, owner: payer.address() };
    source.complete(key, &Ok(Account::Funds(U256::from(100))));
    let SubmitOutcome::Accepted { id, .. } = submit(&pipeline, submission(&payer, 1)) else { panic!("accepted") };

    // Settled on chain: the payer's 100 left, but the cache says 100.
    let mut status = PaymentStatus::new(PaymentState::Confirmed, 1);
    status.transaction = Some(B256::repeat_byte(7));
    pipeline.record_settlement(Vec::new(), vec![Transition { id, status }]).unwrap().blocking_recv().unwrap().unwrap();
    let refused = |n| match submit(&pipeline, submission(&payer, n)) {
        SubmitOutcome::Rejected { rejection, .. } => rejection.reason == Reason::InsufficientBalance,
        other => panic!("{other:?}"),
    };
    assert!(refused(2), "the settled tokens counted again before the balance was read");
    // The read after the settlement: 0 left, and the reservation goes.
    source.complete(key, &Ok(Account::Funds(U256::ZERO)));
    drain_shard(&pipeline, &source, &payer);
    assert!(refused(3));
    // A top-up: the payer may pay again.
    source.complete(key, &Ok(Account::Funds(U256::from(100))));
    assert!(matches!(submit(&pipeline, submission(&payer, 4)), SubmitOutcome::Accepted { .. }));
}

#[test]
fn payments_wait_for_an_unknown_balance_and_resume_in_order() {
    let ledger = Arc::new(FlakyLedger::default());
    let payer = Payer::random();
    let key = BalanceKey { chain_id: 31337, token: TOKEN, owner: payer.address() };
    let (pipeline, source) = start_manual(&ledger);
    let first = submission(&payer, 1);
    let queue = [first.clone(), first, submission(&payer, 2), submission(&payer, 3)];
    let mut replies: Vec<_> = queue.into_iter().map(|s| pipeline.try_submit(merchant(), s).unwrap()).collect();
    drain_shard(&pipeline, &source, &payer);
    assert_eq!(source.waiting(), [key], "one lookup; the later payments wait behind the first");
    assert!(replies.iter_mut().all(|rx| rx.try_recv().is_err()), "nothing is answered before the balance");

    // Room for two payments of 100, taken in arrival order.
    source.complete(key, &Ok(Account::Funds(U256::from(250))));
    let outcomes: Vec<_> = replies.into_iter().map(|rx| rx.blocking_recv().unwrap()).collect();
    assert!(matches!(outcomes[0], SubmitOutcome::Accepted { .. }), "{outcomes:?}");
    assert!(matches!(outcomes[1], SubmitOutcome::Duplicate { .. }), "{outcomes:?}");
    assert!(matches!(outcomes[2], SubmitOutcome::Accepted { .. }), "{outcomes:?}");
    let SubmitOutcome::Rejected { rejection, .. } = &outcomes[3] else { panic!("{outcomes:?}") };
    assert_eq!(rejection.reason, Reason::InsufficientBalance);

    // Known from now on: answered at once, nothing fetched.
    let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, submission(&payer, 4)) else {
        panic!("the balance is used up");
    };
    assert_eq!(rejection.reason, Reason::InsufficientBalance);
    assert!(source.waiting().is_empty());
}

#[test]
fn a_failed_fetch_answers_the_waiting_payments_unavailable() {
    let ledger = Arc::new(FlakyLedger::default());
    let payer = Payer::random();
    let key = BalanceKey { chain_id: 31337, token: TOKEN, owner: payer.address() };
    let (pipeline, source) = start_manual(&ledger);
    let first = submission(&payer, 1);
    let replies = [first.clone(), submission(&payer, 2)].map(|s| pipeline.try_submit(merchant(), s).unwrap());
    drain_shard(&pipeline, &source, &payer);
    let down = Arc::new(Error::Io(std::io::Error::other("node down")));
    source.complete(key, &Err(down));
    for rx in replies {
        match rx.blocking_recv().unwrap() {
            SubmitOutcome::Unavailable(message) => assert!(message.contains("node down"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    // Nothing was recorded or reserved: the same payment passes once the
    // balance is read, on a new lookup.
    let reply = pipeline.try_submit(merchant(), first).unwrap();
    drain_shard(&pipeline, &source, &payer);
    assert_eq!(source.waiting(), [key]);
    source.complete(key, &Ok(Account::Funds(U256::from(100))));
    assert!(matches!(reply.blocking_recv().unwrap(), SubmitOutcome::Accepted { .. }));

    // A payment still waiting at shutdown is answered, not dropped.
    let late = Payer::random();
    let reply = pipeline.try_submit(merchant(), submission(&late, 1)).unwrap();
    drain_shard(&pipeline, &source, &late);
    pipeline.shutdown();
    assert!(matches!(reply.blocking_recv().unwrap(), SubmitOutcome::Unavailable(_)));
}

/// A payer with code: its payments wait for their on-chain proofs, in
/// arrival order, and a burst of them is proved together (asked at once,
/// not one round trip after another); a refused proof refuses only its
/// payment, and a failed one answers UNAVAILABLE.
#[test]
fn a_payer_with_code_waits_for_its_proofs_in_order() {
    use crate::signature::Proof;
    let ledger = Arc::new(FlakyLedger::default());
    let source = Arc::new(ManualBalances::default());
    let signatures = Arc::new(crate::testing::ManualSignatures::default());
    let config =
        PipelineConfig { verifiers: 1, shards: 3, signatures: signatures.clone(), ..PipelineConfig::default() };
    let (ledger_dyn, balances): (Arc<dyn Ledger>, Arc<dyn BalanceSource>) = (ledger.clone(), source.clone());
    let pipeline = Pipeline::start(&config, &ledger_dyn, &balances).unwrap();

    // A wallet owned by `owner`, holding 250: room for two payments of 100.
    let (owner, wallet) = (Payer::random(), Address::repeat_byte(0xaa));
    let key = BalanceKey { chain_id: 31337, token: TOKEN, owner: wallet };
    source.complete(key, &Ok(Account::Contract(U256::from(250))));
    let signed = |by: &Payer, nonce: u8| {
        let mut s = submission(by, nonce);
        let PaymentInput::Exact(payload) = &mut s.input else { unreachable!() };
        payload.authorization.from = wallet;
        payload.signature = by.sign_authorization(&s.requirements, &payload.authorization);
        s
    };
    let queue =
        [signed(&Payer::random(), 1), signed(&owner, 2), signed(&owner, 3), signed(&owner, 4), signed(&owner, 5)];
    let mut replies: Vec<_> = queue.into_iter().map(|s| pipeline.try_submit(merchant(), s).unwrap()).collect();

    // The first is asked alone; the rest wait behind it.
    let first = signatures.wait_for(1);
    assert_eq!(first[0].signer, wallet);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(signatures.waiting().len(), 1, "a later payment was asked before its turn");
    signatures.answer(&first[0], Ok(Proof::Refused(Reason::Signature, "forged".into())));
    let SubmitOutcome::Rejected { rejection, .. } = replies.remove(0).blocking_recv().unwrap() else {
        panic!("a refused proof")
    };
    assert_eq!(rejection.reason, Reason::Signature);
    assert!(rejection.message.contains("forged"), "{}", rejection.message);

    // The next one's turn: it and every payment behind it are asked at once.
    let burst = signatures.wait_for(4);
    assert_eq!(burst.len(), 4);
    // Answered last to first: nothing is decided out of order.
    let down = Arc::new(Error::Io(std::io::Error::other("node down")));
    signatures.answer(&burst[3], Err(down));
    signatures.answer(&burst[2], Ok(Proof::Valid));
    signatures.answer(&burst[1], Ok(Proof::Valid));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(replies.iter_mut().all(|rx| rx.try_recv().is_err()), "answered before the first of them");
    signatures.answer(&burst[0], Ok(Proof::Valid));
    let outcomes: Vec<_> = replies.into_iter().map(|rx| rx.blocking_recv().unwrap()).collect();
    let SubmitOutcome::Accepted { id, .. } = &outcomes[0] else { panic!("{outcomes:?}") };
    assert!(matches!(outcomes[1], SubmitOutcome::Accepted { .. }), "{outcomes:?}");
    let SubmitOutcome::Rejected { rejection, .. } = &outcomes[2] else { panic!("{outcomes:?}") };
    assert_eq!(rejection.reason, Reason::InsufficientBalance, "the third of 100 does not fit in 250");
    assert!(matches!(&outcomes[3], SubmitOutcome::Unavailable(m) if m.contains("node down")), "{outcomes:?}");

    // Recorded as a contract wallet's payment, settled through ERC-1271.
    let record = ledger.payment(id).unwrap().unwrap();
    assert_eq!(record.signature_kind, crate::domain::SignatureKind::Erc1271);

    // 50 left: a payment of 100 "from" the wallet is refused before any
    // proof is asked (a flood naming a funded contract costs no RPC).
    let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, signed(&Payer::random(), 9)) else {
        panic!("over the balance")
    };
    assert_eq!(rejection.reason, Reason::InsufficientBalance);
    assert!(signatures.waiting().is_empty(), "a proof was asked for a payment the balance refuses");
}

/// A channel whose voucher was proved on chain keeps its signer as a
/// contract across a restart: a later voucher that recovers to the signer
/// (an EIP-7702 delegated key, whose delegate the contract asks) is proved
/// too, not accepted on its key alone.
#[test]
fn a_contract_signer_stays_one_across_a_restart() {
    use crate::signature::Proof;
    use x402_channel::ChannelDomain;

    let ledger = Arc::new(FlakyLedger::default());
    let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
    let start = |signatures: &Arc<crate::testing::ManualSignatures>| {
        let config = PipelineConfig {
            channels: Arc::new(FundedChannels),
            shards: 1,
            signatures: signatures.clone(),
            ..PipelineConfig::default()
        };
        let dyn_ledger: Arc<dyn Ledger> = ledger.clone();
        Pipeline::start(&config, &dyn_ledger, &balances).unwrap()
    };
    let payer = Payer::random();
    let authorizer = Address::repeat_byte(0xaa);
    let domain = ChannelDomain::new(31337, crate::channels::ChannelContracts::default().channels);
    let channel = payer.channel_config(PAY_TO, authorizer, TOKEN, 900, B256::ZERO);
    let requirements = crate::testing::channel_requirements(TOKEN, PAY_TO);
    let voucher = |max: u128, recovers: bool| {
        let mut payload = voucher_payload(&payer, &domain, &channel, authorizer, max);
        if !recovers {
            // Not an ECDSA signature: only the signer's code can approve it.
            let mut signature = payload.signature.to_vec();
            signature.push(0);
            payload.signature = signature.into();
        }
        Submission::new(requirements.clone(), PaymentInput::Voucher(Box::new(payload)))
    };

    let signatures = Arc::new(crate::testing::ManualSignatures::default());
    let pipeline = start(&signatures);
    let first = pipeline.try_submit(merchant(), voucher(10, false)).unwrap();
    let asked = signatures.wait_for(1);
    signatures.answer(&asked[0], Ok(Proof::Valid));
    assert!(matches!(first.blocking_recv().unwrap(), SubmitOutcome::VoucherAccepted { .. }));
    pipeline.shutdown();

    let signatures = Arc::new(crate::testing::ManualSignatures::default());
    let pipeline = start(&signatures);
    let second = pipeline.try_submit(merchant(), voucher(20, true)).unwrap();
    let asked = signatures.wait_for(1);
    assert_eq!(asked.len(), 1, "the recovering voucher of a contract signer's channel is proved");
    signatures.answer(&asked[0], Ok(Proof::Valid));
    assert!(matches!(second.blocking_recv().unwrap(), SubmitOutcome::VoucherAccepted { .. }));
}

/// A channel whose signer holds code, its reads of proved vouchers held
/// until the test lets them go.
#[derive(Default)]
struct DelegatedChannels {
    held: std::sync::Mutex<Vec<(B256, crate::channels::ChannelNotifier)>>,
}

impl std::fmt::Debug for DelegatedChannels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DelegatedChannels")
    }
}

impl ChannelSource for DelegatedChannels {
    fn fetch(&self, v: &crate::channels::VerifiedVoucher, notify: crate::channels::ChannelNotifier) {
        if v.proved {
            self.held.lock().unwrap().push((v.channel_id, notify));
        } else {
            notify(v.channel_id, Err(crate::channels::ReadFailure::SignerHasCode(v.config.payer)));
        }
    }
    fn deposit(&self, _: &crate::channels::VerifiedVoucher, _: crate::channels::DepositNotifier) {}
}

/// An EIP-7702 delegated payer's first voucher is proved (its read found
/// code); a voucher that recovers and arrives while the channel is read
/// again is proved too before it counts, not accepted on the key alone.
#[test]
fn a_voucher_queued_behind_a_delegated_signers_read_is_proved() {
    use crate::signature::Proof;
    use x402_channel::ChannelDomain;

    let ledger: Arc<dyn Ledger> = Arc::new(FlakyLedger::default());
    let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
    let (channels, signatures) =
        (Arc::new(DelegatedChannels::default()), Arc::new(crate::testing::ManualSignatures::default()));
    let config = PipelineConfig {
        channels: channels.clone(),
        shards: 1,
        signatures: signatures.clone(),
        ..PipelineConfig::default()
    };
    let pipeline = Pipeline::start(&config, &ledger, &balances).unwrap();
    let payer = Payer::random();
    let authorizer = Address::repeat_byte(0xaa);
    let domain = ChannelDomain::new(31337, config.channel_contracts.channels);
    let channel = payer.channel_config(PAY_TO, authorizer, TOKEN, 900, B256::ZERO);
    let requirements = crate::testing::channel_requirements(TOKEN, PAY_TO);
    let voucher = |max: u128| {
        let payload = voucher_payload(&payer, &domain, &channel, authorizer, max);
        Submission::new(requirements.clone(), PaymentInput::Voucher(Box::new(payload)))
    };

    let first = pipeline.try_submit(merchant(), voucher(10)).unwrap();
    let asked = signatures.wait_for(1);
    signatures.answer(&asked[0], Ok(Proof::Valid));
    // Proved: its channel is read again, and held there.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while channels.held.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the proved voucher's channel was not read");
        thread::sleep(std::time::Duration::from_millis(2));
    }
    let second = pipeline.try_submit(merchant(), voucher(20)).unwrap();
    thread::sleep(std::time::Duration::from_millis(50));
    let (id, notify) = channels.held.lock().unwrap().pop().unwrap();
    notify(id, Ok(x402_channel::OnChain { balance: 1_000, total_claimed: 0, withdrawal: None, refund_nonce: 0 }));
    assert!(matches!(first.blocking_recv().unwrap(), SubmitOutcome::VoucherAccepted { .. }));

    let asked = signatures.wait_for(1);
    assert_eq!(asked.len(), 1, "the second voucher is proved");
    signatures.answer(&asked[0], Ok(Proof::Valid));
    assert!(matches!(second.blocking_recv().unwrap(), SubmitOutcome::VoucherAccepted { .. }));
}
