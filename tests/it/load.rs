//! `x402d load`'s generator against an in-process node.

use x402_engine::{
    load::{self, LoadConfig},
    payer::Payer,
};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_streams_every_payment_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&config_value(dir.path())).await;
    let payers: Vec<Payer> = (0..8).map(|_| Payer::random()).collect();
    let requirements = requirements(PAY_TO);
    let requests = load::sign(&payers, &requirements, 2_000);
    assert_eq!(requests.len(), 2_000);
    let config = LoadConfig {
        endpoint: format!("http://{}", node.endpoints().grpc),
        api_key: M1_KEY.into(),
        payments: 2_000,
        payers,
        streams: 3,
        rate: None,
        requirements,
    };
    let report = load::run(&config, requests.clone(), |_, _| {}).await.unwrap();
    assert_eq!((report.payments, report.accepted), (2_000, 2_000), "{report:?}");
    assert!(report.rejected.is_empty());
    assert!(report.per_second > 0.0 && report.latency_p50_us > 0);
    assert!(report.latency_p50_us <= report.latency_p99_us && report.latency_p99_us <= report.latency_max_us);

    // The same payments again are duplicates, counted apart from rejections.
    let again = load::run(&config, requests, |_, _| {}).await.unwrap();
    assert_eq!(again.accepted, 0);
    assert_eq!(again.rejected.get("duplicate"), Some(&2_000), "{again:?}");
}
