//! The pipeline's stages in process, on 50 payer keys.
//!
//! - `recover/raw`: one secp256k1 public-key recovery (libsecp256k1): the
//!   bound of the hot path.
//! - `recover/digest_and_recover`: what every payment costs at least: its
//!   EIP-712 digest (domain separator cached) and the recovery.
//! - `verify/stateless`: stage 1 for one payment — EIP-712 digest with a
//!   cached domain separator, recovery and the x402 rule checks.
//! - `voucher/new_channel`: stage 1 for a channel's first voucher: its
//!   config hashed into the channel id, the signer key recovered.
//! - `voucher/known_channel`: stage 1 for a later voucher of a channel the
//!   verifier thread has seen: the config compared with the remembered
//!   one, the voucher digest, an ECDSA verification against the remembered
//!   key (no recovery).
//! - `pipeline/verify_commit`: the whole pipeline (verifier threads, payer
//!   shards, fsync'd group commit to RocksDB in a temp dir), 4,096 payments
//!   in flight, throughput per payment.
//! - `pipeline/verify_only`: the same with the ledger's fsync turned off, to
//!   show what durability costs.

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use x402_benches::{merchant, signed_submissions};
use x402_chain::Eip3009Domain;
use x402_channel::ChannelDomain;
use x402_devnet::Payer;
use x402_engine::{
    balance::{BalanceSource, ConfiguredBalances},
    channels::{ChannelContracts, ChannelExtra, VoucherPayload, VoucherVerifier},
    domain::{PaymentInput, Requirements},
    ledger::{Ledger, RocksLedger, RocksOptions},
    pipeline::{Pipeline, PipelineConfig, SubmitOutcome},
    verify::{Verifier, recover_signer},
};

fn stateless(c: &mut Criterion) {
    let payers: Vec<Payer> = (0..50).map(|_| Payer::random()).collect();
    let submissions = signed_submissions(&payers, 1024);
    let merchant = merchant();

    let PaymentInput::Exact(first) = &submissions[0].input else { unreachable!() };
    let signature: [u8; 65] = first.signature.as_slice().try_into().unwrap();
    let mut verifier = Verifier::default();
    let digest = verifier.verify(&merchant, submissions[0].clone(), x402_benches::now()).unwrap().digest;
    c.bench_function("recover/raw", |b| b.iter(|| recover_signer(&signature, digest).unwrap()));
    let domain = Eip3009Domain::new(
        &submissions[0].requirements.eip712_name,
        &submissions[0].requirements.eip712_version,
        31337,
        submissions[0].requirements.asset,
    );
    let message = x402_chain::TransferWithAuthorization::from(&first.authorization);
    c.bench_function("recover/digest_and_recover", |b| {
        b.iter(|| recover_signer(&signature, domain.signing_hash(&message)).unwrap())
    });

    let mut group = c.benchmark_group("verify");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("stateless", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % submissions.len();
                submissions[i].clone()
            },
            |s| verifier.verify(&merchant, s, x402_benches::now()).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn vouchers(c: &mut Criterion) {
    const CHANNELS: usize = 64;
    let payers: Vec<Payer> = (0..8).map(|_| Payer::random()).collect();
    let merchant = merchant();
    let requirements = Requirements { scheme: "batch-settlement".into(), ..x402_benches::requirements() };
    let domain = ChannelDomain::new(31337, ChannelContracts::default().channels);
    let authorizer = alloy::primitives::Address::repeat_byte(0xaa);
    // Voucher `k` of channel `c`.
    let voucher = |c: usize, k: u128| {
        let payer = &payers[c % payers.len()];
        let salt = alloy::primitives::B256::left_padding_from(&c.to_be_bytes());
        let config = payer.channel_config(x402_benches::PAY_TO, authorizer, x402_benches::TOKEN, 900, salt);
        let id = domain.channel_id(&config);
        let max = 10_000 * (k + 1);
        VoucherPayload {
            network: requirements.network.clone(),
            config,
            channel_id: id,
            max_claimable: max,
            signature: payer.sign_voucher(&domain, id, max),
            charge: None,
            extra: ChannelExtra { receiver_authorizer: authorizer, withdraw_delay: 900 },
            deposit: None,
            refund: None,
        }
    };
    let later: Vec<VoucherPayload> = (0..1024).map(|i| voucher(i % CHANNELS, (i / CHANNELS) as u128 + 1)).collect();

    let mut group = c.benchmark_group("voucher");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("new_channel", |b| {
        b.iter_batched(
            || {
                // A verifier that has seen another channel (its domain is cached).
                let mut verifier = VoucherVerifier::new(ChannelContracts::default());
                verifier.verify(&merchant, &requirements, later[0].clone()).unwrap();
                // The first vouchers of channels 1..CHANNELS.
                i = i % (CHANNELS - 1) + 1;
                (verifier, later[i].clone())
            },
            // The verifier is dropped after timing.
            |(mut verifier, payload)| {
                verifier.verify(&merchant, &requirements, payload).unwrap();
                verifier
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let mut verifier = VoucherVerifier::new(ChannelContracts::default());
    for payload in &later[..CHANNELS] {
        verifier.verify(&merchant, &requirements, payload.clone()).unwrap();
    }
    group.bench_function("known_channel", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % later.len();
                later[i].clone()
            },
            |payload| verifier.verify(&merchant, &requirements, payload).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn whole_pipeline(c: &mut Criterion) {
    const IN_FLIGHT: usize = 4096;
    let payers: Vec<Payer> = (0..50).map(|_| Payer::random()).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let merchant = Arc::new(merchant());
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(IN_FLIGHT as u64));
    group.sample_size(10);
    for (name, sync) in [("verify_commit", true), ("verify_only", false)] {
        let dir = tempfile::tempdir().unwrap();
        let ledger: Arc<dyn Ledger> = Arc::new(RocksLedger::open(dir.path(), RocksOptions { sync }).unwrap());
        let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
        let pipeline = Pipeline::start(&PipelineConfig::default(), &ledger, &balances).unwrap();
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let batches: Vec<_> = (0..iters).map(|_| signed_submissions(&payers, IN_FLIGHT)).collect();
                let started = std::time::Instant::now();
                runtime.block_on(async {
                    for batch in batches {
                        let receivers: Vec<_> = batch
                            .into_iter()
                            .map(|s| pipeline.try_submit(merchant.clone(), s).expect("queue holds a batch"))
                            .collect();
                        for rx in receivers {
                            assert!(matches!(rx.await.unwrap(), SubmitOutcome::Accepted { .. }));
                        }
                    }
                });
                started.elapsed()
            })
        });
        pipeline.shutdown();
    }
    group.finish();
}

criterion_group!(benches, stateless, vouchers, whole_pipeline);
criterion_main!(benches);
