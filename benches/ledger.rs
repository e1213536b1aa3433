//! The ledger's group commit: one RocksDB `WriteBatch` with fsync holding
//! `n` accepted payments (each a payment record, a queue entry and an
//! event, as the committer writes them), for `n` in 1, 16, 256 and 4,096.
//! The throughput is in payments per second: how much an fsync'd group
//! commit costs per payment at each group size.

use alloy::primitives::{Address, B256, U256};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use x402_engine::{
    domain::{
        Authorization, PaymentId, PaymentRecord, PaymentState, PaymentStatus, PendingKey, SettlementEvent,
        SettlementPolicy,
    },
    ledger::{Ledger, RocksLedger, RocksOptions, Write, WriteBatch},
};

/// The `i`th accepted payment, as the committer records it.
fn payment(i: u64) -> PaymentRecord {
    let from = Address::left_padding_from(&i.to_be_bytes());
    let nonce = B256::left_padding_from(&i.to_be_bytes());
    let asset = x402_benches::TOKEN;
    PaymentRecord {
        id: PaymentId::new(31337, asset, from, nonce),
        merchant_id: "bench".into(),
        merchant_number: 1,
        chain_id: 31337,
        asset,
        eip712_name: "USD Coin".into(),
        eip712_version: "2".into(),
        authorization: Authorization {
            from,
            to: x402_benches::PAY_TO,
            value: U256::from(10_000),
            valid_after: U256::ZERO,
            valid_before: U256::from(2_000_000_000u64),
            nonce,
        },
        signature: vec![0x1b; 65],
        digest: B256::left_padding_from(&(i + 1).to_be_bytes()),
        policy: SettlementPolicy::Direct,
        status: PaymentStatus::new(PaymentState::Queued, 1_700_000_000_000),
        accepted_at_ms: 1_700_000_000_000,
        idempotency: None,
        signature_kind: Default::default(),
    }
}

fn group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = RocksLedger::open(dir.path(), RocksOptions::default()).unwrap();
    let mut group = c.benchmark_group("ledger");
    let mut next = 0u64;
    for n in [1u64, 16, 256, 4096] {
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::new("group_commit", n), &n, |b, &n| {
            b.iter_batched(
                || {
                    let mut batch = WriteBatch::with_capacity(3 * n as usize);
                    for _ in 0..n {
                        next += 1;
                        let record = payment(next);
                        let pending = PendingKey { merchant_number: 1, deadline: 2_000_000_000, id: record.id };
                        batch.push(Write::Event(SettlementEvent {
                            sequence: next,
                            merchant_number: 1,
                            payment_id: record.id,
                            status: record.status.clone(),
                            channel: None,
                        }));
                        batch.push(Write::Enqueue(pending));
                        batch.push(Write::Payment(Box::new(record)));
                    }
                    batch
                },
                |batch| ledger.commit(&batch).unwrap(),
                criterion::BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
