//! End to end over gRPC on loopback: an in-process `x402d` node (RocksDB in
//! a temp dir, fsync'd group commit) and a tonic client in the same process
//! streaming pre-signed payments from 50 payers over one `SubmitStream`;
//! throughput per payment, each acknowledged ACCEPTED only once durable.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tonic::{Request, metadata::MetadataValue};
use x402_benches::{MERCHANT_KEY, PAY_TO, signed_submissions};
use x402_devnet::Payer;
use x402_engine::{
    config::{Config, MerchantConfig, PolicyConfig},
    grpc::submit_request,
    node::Node,
};
use x402_proto::v1::{self as pb, payment_service_client::PaymentServiceClient};

const PER_ITER: usize = 8192;

fn grpc_stream(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.ledger.path = dir.path().join("ledger");
    // Measures verification and the group commit: nothing settles.
    config.pipeline.record_only = true;
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.http_addr = "127.0.0.1:0".parse().unwrap();
    config.merchants.push(MerchantConfig {
        id: "bench".into(),
        pay_to: vec![PAY_TO.to_string()],
        assets: Vec::new(),
        policy: PolicyConfig::Direct,
        api_key: Some(MERCHANT_KEY.into()),
        api_key_env: None,
        api_key_file: None,
    });
    let node = runtime.block_on(Node::start(&config)).unwrap();
    let addr = node.endpoints().grpc;
    let payers: Vec<Payer> = (0..50).map(|_| Payer::random()).collect();
    let bearer: MetadataValue<_> = format!("Bearer {MERCHANT_KEY}").parse().unwrap();

    let mut group = c.benchmark_group("grpc");
    group.throughput(Throughput::Elements(PER_ITER as u64));
    group.sample_size(10);
    group.bench_function("submit_stream", |b| {
        b.iter_custom(|iters| {
            let batches: Vec<Vec<pb::SubmitRequest>> = (0..iters)
                .map(|_| {
                    signed_submissions(&payers, PER_ITER)
                        .into_iter()
                        .enumerate()
                        .map(|(i, s)| submit_request(i as u64, &s))
                        .collect()
                })
                .collect();
            runtime.block_on(async {
                let channel =
                    tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
                let bearer = bearer.clone();
                let mut client = PaymentServiceClient::with_interceptor(channel, move |mut req: Request<()>| {
                    req.metadata_mut().insert("authorization", bearer.clone());
                    Ok(req)
                });
                let started = std::time::Instant::now();
                for batch in batches {
                    let mut responses = client.submit_stream(tokio_stream::iter(batch)).await.unwrap().into_inner();
                    let mut n = 0;
                    while let Some(resp) = responses.message().await.unwrap() {
                        assert_eq!(resp.outcome, pb::Outcome::Accepted as i32, "{resp:?}");
                        n += 1;
                    }
                    assert_eq!(n, PER_ITER);
                }
                started.elapsed()
            })
        })
    });
    group.finish();
    runtime.block_on(node.wait(async {})).unwrap();
}

criterion_group!(benches, grpc_stream);
criterion_main!(benches);
