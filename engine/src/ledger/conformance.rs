//! The conformance suite every [`Ledger`] passes, run against
//! [`MemoryLedger`] and [`RocksLedger`], plus a differential property test
//! that applies the same random batches to both.

use alloy::primitives::{Address, B256, U256};
use proptest::prelude::*;

use super::*;
use crate::domain::{
    AcceptedAsset, Authorization, IdempotencyKey, IntentState, PaymentState, PaymentStatus, SettlementPolicy,
    SignatureKind,
};

/// A payment whose id is derived from `seed` and whose deadline is `deadline`.
pub(crate) fn sample_payment(seed: u8, deadline: u64) -> PaymentRecord {
    let from = Address::repeat_byte(seed);
    let nonce = B256::repeat_byte(seed.wrapping_mul(3));
    let asset = Address::repeat_byte(0xaa);
    PaymentRecord {
        id: PaymentId::new(31337, asset, from, nonce),
        merchant_id: "m1".into(),
        merchant_number: 1,
        chain_id: 31337,
        asset,
        eip712_name: "USD Coin".into(),
        eip712_version: "2".into(),
        authorization: Authorization {
            from,
            to: Address::repeat_byte(0xbb),
            value: U256::from(10_000 + u64::from(seed)),
            valid_after: U256::ZERO,
            valid_before: U256::from(deadline),
            nonce,
        },
        signature: vec![seed; 65],
        digest: B256::repeat_byte(seed.wrapping_add(1)),
        policy: SettlementPolicy::Direct,
        status: PaymentStatus::new(PaymentState::Queued, 1_700_000_000_000),
        accepted_at_ms: 1_700_000_000_000,
        idempotency: seed.is_multiple_of(2).then(|| IdempotencyKey(B256::repeat_byte(seed))),
        signature_kind: [SignatureKind::Ecdsa, SignatureKind::Erc1271, SignatureKind::Erc6492][usize::from(seed % 3)],
    }
}

fn sample_merchant(id: &str, number: u32) -> Merchant {
    Merchant {
        id: id.into(),
        number,
        pay_to: vec![Address::repeat_byte(0xbb)],
        assets: vec![AcceptedAsset { chain_id: 31337, asset: Address::repeat_byte(0xaa) }],
        policy: SettlementPolicy::Batched { max_rows: 100, max_wait_ms: 500 },
        api_key_sha256: Some([7; 32]),
        updated_at_ms: 5,
    }
}

fn event(sequence: u64, p: &PaymentRecord) -> SettlementEvent {
    // Every other event is a channel's.
    let channel = sequence.is_multiple_of(2).then_some(crate::domain::ChannelSnapshot {
        charged: u128::from(sequence) * 7,
        total_claimed: u128::from(sequence),
        balance: u128::MAX,
    });
    SettlementEvent {
        sequence,
        merchant_number: p.merchant_number,
        payment_id: p.id,
        status: p.status.clone(),
        channel,
    }
}

fn pending_of(p: &PaymentRecord) -> PendingKey {
    PendingKey { merchant_number: p.merchant_number, deadline: p.authorization.valid_before_secs(), id: p.id }
}

fn empty_ledger_is_empty(ledger: &dyn Ledger) {
    assert!(ledger.channels().unwrap().is_empty());
    assert_eq!(ledger.channel(&B256::repeat_byte(1)).unwrap(), None);
    assert_eq!(ledger.payment(&sample_payment(1, 1).id).unwrap(), None);
    assert!(ledger.pending().unwrap().is_empty());
    assert!(ledger.merchants().unwrap().is_empty());
    assert!(ledger.events_after(0, 10).unwrap().is_empty());
    assert_eq!(ledger.last_event_sequence().unwrap(), 0);
    let mut n = 0;
    ledger.for_each_payment(&mut |_| n += 1).unwrap();
    assert_eq!(n, 0);
}

fn batch_is_applied_whole(ledger: &dyn Ledger) {
    let payments: Vec<_> = (1..=5).map(|i| sample_payment(i, 100 - u64::from(i))).collect();
    let mut batch = WriteBatch::default();
    for (i, p) in payments.iter().enumerate() {
        batch.push(Write::Payment(Box::new(p.clone())));
        batch.push(Write::Enqueue(pending_of(p)));
        batch.push(Write::Event(event(i as u64 + 1, p)));
    }
    batch.push(Write::Merchant(sample_merchant("m1", 1)));
    ledger.commit(&batch).unwrap();

    for p in &payments {
        assert_eq!(ledger.payment(&p.id).unwrap().as_ref(), Some(p));
    }
    let mut seen = Vec::new();
    ledger.for_each_payment(&mut |p| seen.push(p.id)).unwrap();
    let mut expected: Vec<_> = payments.iter().map(|p| p.id).collect();
    expected.sort();
    assert_eq!(seen, expected, "payments come in id order");

    let pending = ledger.pending().unwrap();
    let deadlines: Vec<_> = pending.iter().map(|k| k.deadline).collect();
    assert_eq!(deadlines, vec![95, 96, 97, 98, 99], "queue comes in deadline order");
    assert_eq!(ledger.merchants().unwrap(), vec![sample_merchant("m1", 1)]);
    assert_eq!(ledger.last_event_sequence().unwrap(), 5);
}

fn updates_replace_and_dequeue_removes(ledger: &dyn Ledger) {
    let mut p = sample_payment(9, 50);
    let mut batch = WriteBatch::default();
    batch.push(Write::Payment(Box::new(p.clone())));
    batch.push(Write::Enqueue(pending_of(&p)));
    ledger.commit(&batch).unwrap();

    p.status = PaymentStatus {
        state: PaymentState::Confirmed,
        transaction: Some(B256::repeat_byte(1)),
        block: Some(42),
        failure_reason: None,
        updated_at_ms: 9,
    };
    let mut batch = WriteBatch::default();
    batch.push(Write::Payment(Box::new(p.clone())));
    batch.push(Write::Dequeue(pending_of(&p)));
    batch.push(Write::Merchant(sample_merchant("m2", 2)));
    batch.push(Write::Merchant(sample_merchant("m1", 1)));
    ledger.commit(&batch).unwrap();

    assert_eq!(ledger.payment(&p.id).unwrap(), Some(p));
    assert!(ledger.pending().unwrap().is_empty());
    let ids: Vec<_> = ledger.merchants().unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, vec!["m1", "m2"], "merchants come in id order");
}

fn events_page_from_a_cursor(ledger: &dyn Ledger) {
    let p = sample_payment(3, 10);
    let mut batch = WriteBatch::default();
    for seq in 1..=300 {
        batch.push(Write::Event(event(seq, &p)));
    }
    ledger.commit(&batch).unwrap();
    let page = ledger.events_after(0, 100).unwrap();
    assert_eq!(page.len(), 100);
    assert_eq!(page[0].sequence, 1);
    assert_eq!(page[99].sequence, 100);
    let page = ledger.events_after(255, 100).unwrap();
    assert_eq!(page.iter().map(|e| e.sequence).collect::<Vec<_>>(), (256..=300).collect::<Vec<_>>());
    assert_eq!(page[0], event(256, &p));
    assert!(ledger.events_after(300, 100).unwrap().is_empty());
    assert!(ledger.events_after(u64::MAX, 100).unwrap().is_empty());
    assert_eq!(ledger.last_event_sequence().unwrap(), 300);
}

fn sample_intent(signer: u8, nonce: u64, state: IntentState) -> TxIntent {
    TxIntent {
        chain_id: 31337,
        signer: Address::repeat_byte(signer),
        nonce,
        tx_hashes: vec![B256::repeat_byte(signer), B256::repeat_byte(signer.wrapping_add(1))],
        raw: vec![0x02, signer, 0xff],
        payments: vec![sample_payment(signer, 5).id, sample_payment(signer.wrapping_add(7), 5).id],
        state,
        created_at_ms: 10,
        updated_at_ms: 11,
    }
}

fn intents_are_kept_in_signer_nonce_order(ledger: &dyn Ledger) {
    let mut batch = WriteBatch::default();
    // Nonce 256 after 255: big-endian keys sort numerically.
    for (signer, nonce) in [(2u8, 256u64), (1, 7), (2, 255)] {
        batch.push(Write::Intent(Box::new(sample_intent(signer, nonce, IntentState::Pending))));
    }
    ledger.commit(&batch).unwrap();
    let keys: Vec<_> = ledger.intents().unwrap().iter().map(|i| (i.signer, i.nonce)).collect();
    assert_eq!(
        keys,
        vec![(Address::repeat_byte(1), 7), (Address::repeat_byte(2), 255), (Address::repeat_byte(2), 256)]
    );
    // Resolving one replaces it.
    let included =
        IntentState::Included { tx: B256::repeat_byte(2), block: 99, block_hash: B256::repeat_byte(3), success: true };
    let mut batch = WriteBatch::default();
    batch.push(Write::Intent(Box::new(sample_intent(2, 255, included))));
    batch.push(Write::Intent(Box::new(sample_intent(1, 7, IntentState::Abandoned))));
    ledger.commit(&batch).unwrap();
    let intents = ledger.intents().unwrap();
    assert_eq!(intents.len(), 3);
    assert_eq!(intents[0], sample_intent(1, 7, IntentState::Abandoned));
    assert_eq!(intents[1], sample_intent(2, 255, included));
    assert_eq!(intents[2], sample_intent(2, 256, IntentState::Pending));

    // A settled intent is forgotten once buried; the others stay.
    let mut batch = WriteBatch::default();
    batch.push(Write::ForgetIntent(sample_intent(2, 255, included).key()));
    ledger.commit(&batch).unwrap();
    let keys: Vec<_> = ledger.intents().unwrap().iter().map(|i| (i.signer, i.nonce)).collect();
    assert_eq!(keys, vec![(Address::repeat_byte(1), 7), (Address::repeat_byte(2), 256)]);
    // One intent by its key.
    let pending = sample_intent(2, 256, IntentState::Pending);
    assert_eq!(ledger.intent(&pending.key()).unwrap(), Some(pending));
    assert_eq!(ledger.intent(&sample_intent(2, 255, included).key()).unwrap(), None);
}

/// A channel whose id is `seed` repeated, with some state in every field.
pub(crate) fn sample_channel(seed: u8, charged: u128, withdrawing: bool) -> ChannelRecord {
    use x402_channel::{Channel, ChannelConfig, OnChain, SignedVoucher, Withdrawal};
    let config = ChannelConfig {
        payer: Address::repeat_byte(seed),
        payerAuthorizer: Address::repeat_byte(seed.wrapping_add(1)),
        receiver: Address::repeat_byte(0xaa),
        receiverAuthorizer: Address::repeat_byte(0xab),
        token: Address::repeat_byte(0xac),
        withdrawDelay: alloy::primitives::aliases::U40::from(900),
        salt: B256::repeat_byte(seed),
    };
    let mut channel = Channel::new(config, B256::repeat_byte(seed));
    channel.charged = charged;
    channel.voucher =
        (charged > 0).then(|| SignedVoucher { max_claimable: charged + 5, signature: vec![seed; 65].into() });
    channel.onchain = OnChain {
        balance: u128::MAX - 1,
        total_claimed: charged / 2,
        withdrawal: withdrawing.then_some(Withdrawal { amount: 77, finalize_after: 1_700_000_900 }),
        refund_nonce: 3,
    };
    channel.synced_at = 1_700_000_000;
    ChannelRecord {
        chain_id: 31337,
        contract: Address::repeat_byte(0x40),
        merchant_id: format!("m{seed}"),
        channel,
        last_claim_at: 1_699_999_999,
        updated_at_ms: 1_700_000_000_123,
        claim_requested: withdrawing,
        refund_requested: seed.is_multiple_of(3).then_some(u128::from(seed) << 100),
        contract_signer: seed.is_multiple_of(2),
    }
}

fn channels_round_trip_in_id_order(ledger: &dyn Ledger) {
    let mut batch = WriteBatch::default();
    for (seed, charged, withdrawing) in [(9u8, 0u128, false), (2, 100, true), (5, 1, false)] {
        batch.push(Write::Channel(Box::new(sample_channel(seed, charged, withdrawing))));
    }
    ledger.commit(&batch).unwrap();
    let channels = ledger.channels().unwrap();
    assert_eq!(channels, vec![sample_channel(2, 100, true), sample_channel(5, 1, false), sample_channel(9, 0, false)]);
    // A later voucher replaces the record.
    let mut batch = WriteBatch::default();
    batch.push(Write::Channel(Box::new(sample_channel(5, 250, true))));
    ledger.commit(&batch).unwrap();
    assert_eq!(ledger.channels().unwrap()[1], sample_channel(5, 250, true));
    assert_eq!(ledger.channel(&B256::repeat_byte(5)).unwrap(), Some(sample_channel(5, 250, true)));
    assert_eq!(ledger.channel(&B256::repeat_byte(2)).unwrap(), Some(sample_channel(2, 100, true)));
    assert_eq!(ledger.channel(&B256::repeat_byte(3)).unwrap(), None);
}

fn start_up_reads_recent_payments_and_retention_prunes_settled_history(ledger: &dyn Ledger) {
    use crate::domain::PaymentState::{Confirmed, Failed, Submitted};
    let payment = |seed, valid_before, state| {
        let mut p = sample_payment(seed, valid_before);
        p.status.state = state;
        p
    };
    let old_settled = payment(1, 100, Confirmed);
    let old_open = payment(2, 100, Submitted);
    let recent = payment(3, 5_000, Confirmed);
    let old_failed = payment(4, 200, Failed);
    let mut batch = WriteBatch::default();
    for p in [&old_settled, &old_open, &recent, &old_failed] {
        batch.push(Write::Payment(Box::new(p.clone())));
    }
    for (sequence, at) in [(1, 100), (2, 150), (3, 5_000), (4, 120)] {
        let mut e = event(sequence, &recent);
        e.status.updated_at_ms = at * 1000;
        batch.push(Write::Event(e));
    }
    ledger.commit(&batch).unwrap();
    let ids = |from| {
        let mut ids = Vec::new();
        ledger.for_each_payment_valid_from(from, &mut |p| ids.push(p.id)).unwrap();
        ids.sort_unstable();
        ids
    };
    let mut want = vec![recent.id, old_failed.id];
    want.sort_unstable();
    assert_eq!(ids(150), want);
    assert_eq!(ids(0).len(), 4);

    // Settled before 1000: gone; the open one stays, whatever its age. The
    // events before the first one as recent (and never the newest).
    let pruned = ledger.prune(1_000).unwrap();
    assert_eq!(pruned, super::Pruned { payments: 2, events: 2 });
    assert_eq!(ledger.payment(&old_settled.id).unwrap(), None);
    assert_eq!(ledger.payment(&old_failed.id).unwrap(), None);
    let mut gone = ledger.pruned(&[old_settled.id, old_open.id, recent.id, old_failed.id]).unwrap();
    gone.sort_unstable();
    let mut want = vec![old_settled.id, old_failed.id];
    want.sort_unstable();
    assert_eq!(gone, want, "a pruned payment's id is kept: its nonce stays spent");
    assert_eq!(ledger.payment(&old_open.id).unwrap(), Some(old_open.clone()));
    assert_eq!(ledger.payment(&recent.id).unwrap(), Some(recent.clone()));
    let sequences: Vec<u64> = ledger.events_after(0, 10).unwrap().iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, [3, 4]);
    assert_eq!(ledger.last_event_sequence().unwrap(), 4);
    let mut want = vec![old_open.id, recent.id];
    want.sort_unstable();
    assert_eq!(ids(0), want);
    assert_eq!(ledger.prune(1_000).unwrap(), super::Pruned::default(), "nothing more to prune");
    // Even far in the future the newest event stays.
    ledger.prune(u64::MAX).unwrap();
    assert_eq!(ledger.last_event_sequence().unwrap(), 4);
}

fn one_merchants_events_and_channels_are_read_apart(ledger: &dyn Ledger) {
    let p = sample_payment(1, 100);
    let mut batch = WriteBatch::default();
    for sequence in 1..=10 {
        let mut e = event(sequence, &p);
        e.merchant_number = if sequence % 3 == 0 { 2 } else { 1 };
        batch.push(Write::Event(e));
    }
    for seed in 1..=4 {
        let mut c = sample_channel(seed, 10, false);
        c.merchant_id = if seed % 2 == 0 { "m2".into() } else { "m1".into() };
        batch.push(Write::Channel(Box::new(c)));
    }
    ledger.commit(&batch).unwrap();
    let sequences = |m, after, limit| -> Vec<u64> {
        ledger.merchant_events_after(m, after, limit).unwrap().iter().map(|e| e.sequence).collect()
    };
    assert_eq!(sequences(2, 0, 10), [3, 6, 9]);
    assert_eq!(sequences(1, 0, 3), [1, 2, 4]);
    assert_eq!(sequences(1, 4, 10), [5, 7, 8, 10]);
    assert_eq!(sequences(3, 0, 10), Vec::<u64>::new());
    for m in ["m1", "m2"] {
        let channels = ledger.merchant_channels(m).unwrap();
        assert_eq!(channels.len(), 2);
        assert!(channels.iter().all(|c| c.merchant_id == m));
    }
    assert!(ledger.merchant_channels("m").unwrap().is_empty(), "a prefix of another id is not it");
    let all = ledger.channels().unwrap();
    let m1: Vec<_> = all.iter().filter(|c| c.merchant_id == "m1").cloned().collect();
    assert_eq!(ledger.merchant_channels("m1").unwrap(), m1, "in id order, whole");
}

fn payments_are_found_by_their_transactions_and_events_read_newest_first(ledger: &dyn Ledger) {
    let (a, b) = (B256::repeat_byte(0xa1), B256::repeat_byte(0xb2));
    let submitted = |seed, tx| {
        let mut p = sample_payment(seed, 100);
        p.status = PaymentStatus { transaction: Some(tx), ..PaymentStatus::new(PaymentState::Submitted, 5) };
        p
    };
    let (p1, p2, p3) = (submitted(1, a), submitted(2, b), sample_payment(3, 100));
    let mut batch = WriteBatch::default();
    for p in [&p1, &p2, &p3] {
        batch.push(Write::Payment(Box::new(p.clone())));
    }
    for sequence in 1..=10 {
        let mut e = event(sequence, &p3);
        e.merchant_number = if sequence % 3 == 0 { 2 } else { 1 };
        batch.push(Write::Event(e));
    }
    ledger.commit(&batch).unwrap();
    // A fee bump: p1's transaction is now `b`; a lookup by `a` still finds it.
    let mut bumped = p1.clone();
    bumped.status.transaction = Some(b);
    let mut batch = WriteBatch::default();
    batch.push(Write::Payment(Box::new(bumped.clone())));
    ledger.commit(&batch).unwrap();
    let ids =
        |tx: B256| -> Vec<PaymentId> { ledger.payments_by_transaction(&tx).unwrap().iter().map(|p| p.id).collect() };
    assert_eq!(ledger.payments_by_transaction(&a).unwrap(), [bumped.clone()], "found by an earlier version");
    let mut both = vec![p1.id, p2.id];
    both.sort();
    assert_eq!(ids(b), both);
    assert!(ids(B256::repeat_byte(0xc3)).is_empty());
    assert!(ids(B256::ZERO).is_empty(), "a payment without a transaction is not under zero");

    // Retention deletes p1 (settled, past its deadline): it is found no more.
    let mut confirmed = bumped;
    confirmed.status.state = PaymentState::Confirmed;
    let mut batch = WriteBatch::default();
    batch.push(Write::Payment(Box::new(confirmed)));
    ledger.commit(&batch).unwrap();
    ledger.prune(1_000).unwrap();
    assert!(ids(a).is_empty());
    assert_eq!(ids(b), [p2.id], "p2 is still open");

    let sequences = |m, before, limit| -> Vec<u64> {
        ledger.merchant_events_before(m, before, limit).unwrap().iter().map(|e| e.sequence).collect()
    };
    assert_eq!(sequences(1, 11, 3), [10, 8, 7]);
    assert_eq!(sequences(1, 5, 10), [4, 2, 1]);
    assert_eq!(sequences(2, u64::MAX, 10), [9, 6, 3]);
    assert!(sequences(1, 0, 10).is_empty());
    assert!(sequences(1, 1, 10).is_empty());
    assert!(sequences(3, u64::MAX, 10).is_empty());
}

macro_rules! conformance {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn empty_ledger_is_empty() {
                let (_dir, ledger) = $make;
                super::empty_ledger_is_empty(&ledger);
            }

            #[test]
            fn batch_is_applied_whole() {
                let (_dir, ledger) = $make;
                super::batch_is_applied_whole(&ledger);
            }

            #[test]
            fn updates_replace_and_dequeue_removes() {
                let (_dir, ledger) = $make;
                super::updates_replace_and_dequeue_removes(&ledger);
            }

            #[test]
            fn events_page_from_a_cursor() {
                let (_dir, ledger) = $make;
                super::events_page_from_a_cursor(&ledger);
            }

            #[test]
            fn intents_are_kept_in_signer_nonce_order() {
                let (_dir, ledger) = $make;
                super::intents_are_kept_in_signer_nonce_order(&ledger);
            }

            #[test]
            fn start_up_reads_recent_payments_and_retention_prunes_settled_history() {
                let (_dir, ledger) = $make;
                super::start_up_reads_recent_payments_and_retention_prunes_settled_history(&ledger);
            }

            #[test]
            fn one_merchants_events_and_channels_are_read_apart() {
                let (_dir, ledger) = $make;
                super::one_merchants_events_and_channels_are_read_apart(&ledger);
            }

            #[test]
            fn payments_are_found_by_their_transactions_and_events_read_newest_first() {
                let (_dir, ledger) = $make;
                super::payments_are_found_by_their_transactions_and_events_read_newest_first(&ledger);
            }

            #[test]
            fn channels_round_trip_in_id_order() {
                let (_dir, ledger) = $make;
                super::channels_round_trip_in_id_order(&ledger);
            }
        }
    };
}

fn rocks() -> (tempfile::TempDir, RocksLedger) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = RocksLedger::open(dir.path(), RocksOptions::default()).unwrap();
    (dir, ledger)
}

conformance!(memory, ((), MemoryLedger::new()));
conformance!(rocksdb, rocks());

fn arb_write() -> impl Strategy<Value = Write> {
    prop_oneof![
        (any::<u8>(), 1u64..1000, proptest::option::of(0u8..3)).prop_map(|(s, d, tx)| {
            let mut p = sample_payment(s, d);
            p.status.transaction = tx.map(B256::repeat_byte);
            Write::Payment(Box::new(p))
        }),
        (any::<u8>(), 1u64..1000, 0u32..3).prop_map(|(s, d, m)| Write::Enqueue(PendingKey {
            merchant_number: m,
            ..pending_of(&sample_payment(s, d))
        })),
        (any::<u8>(), 1u64..1000).prop_map(|(s, d)| Write::Dequeue(pending_of(&sample_payment(s, d)))),
        (0u64..64, any::<u8>()).prop_map(|(q, s)| Write::Event(event(q, &sample_payment(s, 1)))),
        (0u8..4).prop_map(|n| Write::Merchant(sample_merchant(&format!("m{n}"), u32::from(n)))),
        (0u8..3, 0u64..4, any::<bool>()).prop_map(|(s, n, done)| {
            let state = if done {
                IntentState::Included {
                    tx: B256::repeat_byte(s),
                    block: n,
                    block_hash: B256::repeat_byte(n as u8),
                    success: true,
                }
            } else {
                IntentState::Pending
            };
            Write::Intent(Box::new(sample_intent(s, n, state)))
        }),
        (0u8..3, 0u64..4).prop_map(|(s, n)| Write::ForgetIntent(sample_intent(s, n, IntentState::Pending).key())),
        (0u8..4, any::<u128>(), any::<bool>()).prop_map(|(s, charged, w)| Write::Channel(Box::new(sample_channel(
            s,
            charged / 2,
            w
        )))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// The same batches leave both ledgers answering the same.
    #[test]
    fn rocks_and_memory_agree(batches in proptest::collection::vec(proptest::collection::vec(arb_write(), 0..20), 1..6)) {
        let memory = MemoryLedger::new();
        let (_dir, rocks) = rocks();
        for writes in &batches {
            let mut batch = WriteBatch::default();
            writes.iter().cloned().for_each(|w| batch.push(w));
            memory.commit(&batch).unwrap();
            rocks.commit(&batch).unwrap();
        }
        prop_assert_eq!(memory.pending().unwrap(), rocks.pending().unwrap());
        for per_merchant in [0, 1, 3] {
            prop_assert_eq!(memory.pending_head(per_merchant).unwrap(), rocks.pending_head(per_merchant).unwrap());
        }
        prop_assert_eq!(memory.merchants().unwrap(), rocks.merchants().unwrap());
        prop_assert_eq!(memory.events_after(0, 1000).unwrap(), rocks.events_after(0, 1000).unwrap());
        prop_assert_eq!(memory.last_event_sequence().unwrap(), rocks.last_event_sequence().unwrap());
        prop_assert_eq!(memory.intents().unwrap(), rocks.intents().unwrap());
        prop_assert_eq!(memory.channels().unwrap(), rocks.channels().unwrap());
        for m in 0..3 {
            prop_assert_eq!(memory.merchant_events_after(m, 0, 1000).unwrap(), rocks.merchant_events_after(m, 0, 1000).unwrap());
            for before in [0, 1, 30, u64::MAX] {
                prop_assert_eq!(memory.merchant_events_before(m, before, 7).unwrap(), rocks.merchant_events_before(m, before, 7).unwrap());
            }
            let tx = B256::repeat_byte(m as u8);
            prop_assert_eq!(memory.payments_by_transaction(&tx).unwrap(), rocks.payments_by_transaction(&tx).unwrap());
            let id = format!("m{m}");
            prop_assert_eq!(memory.merchant_channels(&id).unwrap(), rocks.merchant_channels(&id).unwrap());
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        memory.for_each_payment(&mut |p| a.push(p)).unwrap();
        rocks.for_each_payment(&mut |p| b.push(p)).unwrap();
        prop_assert_eq!(a, b);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        memory.for_each_payment_valid_from(500, &mut |p| a.push(p)).unwrap();
        rocks.for_each_payment_valid_from(500, &mut |p| b.push(p)).unwrap();
        a.sort_by_key(|p| p.id);
        b.sort_by_key(|p| p.id);
        prop_assert_eq!(a, b);
    }
}
