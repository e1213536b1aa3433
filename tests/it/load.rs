//! `x402d load`'s generator against an in-process node.

use crate::common::*;
use x402_devnet::Payer;
use x402_load::{self as load, HttpLoadConfig, LoadConfig, Work};

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
        streams: 3,
        rate: None,
        watch_pid: Some(std::process::id()),
    };
    let report = load::run(&config, Work::Open(requests.clone()), |_| {}).await.unwrap();
    assert_eq!((report.payments, report.accepted), (2_000, 2_000), "{report:?}");
    assert!(report.rejected.is_empty());
    assert!(report.per_second > 0.0 && report.latency_p50_us > 0);
    assert!(report.latency_p50_us <= report.latency_p99_us && report.latency_p99_us <= report.latency_max_us);
    assert!(!report.rss_kib.is_empty() && report.rss_kib.iter().all(|&(_, kib)| kib > 0), "{report:?}");

    // The same payments again are duplicates, counted apart from rejections.
    let again = load::run(&config, Work::Open(requests), |_| {}).await.unwrap();
    assert_eq!(again.accepted, 0);
    assert_eq!(again.rejected.get("duplicate"), Some(&2_000), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_posts_verify_requests_and_counts_the_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let mut node_config = config_value(dir.path());
    node_config.facilitator.settle_wait_ms = 300;
    let node = start_node(&node_config).await;
    let payers: Vec<Payer> = (0..4).map(|_| Payer::random()).collect();
    let requirements = requirements(PAY_TO);
    let mut payments = load::exact_payloads(&payers, &requirements, 300);
    payments[7].signature[5] ^= 0x55;
    let bodies = load::verify_bodies(&requirements, &payments);
    let config = HttpLoadConfig {
        url: format!("http://{}", node.endpoints().http),
        settle: false,
        api_key: Some(M1_KEY.into()),
        concurrency: 8,
        rate: Some(3_000),
        watch_pid: None,
    };
    let report = load::run_verify(&config, bodies.clone(), |_| {}).await.unwrap();
    assert_eq!((report.payments, report.accepted), (300, 299), "{report:?}");
    assert_eq!(report.rejected.values().sum::<u64>(), 1, "{report:?}");
    assert!(report.latency_p50_us > 0 && report.latency_p99_us <= report.latency_max_us);

    // `/verify` records nothing: the same requests verify again.
    let again = load::run_verify(&config, bodies.clone(), |_| {}).await.unwrap();
    assert_eq!(again.accepted, 299, "{again:?}");

    // Without the merchant's key every request is refused.
    let anonymous = HttpLoadConfig { api_key: None, rate: None, ..config.clone() };
    let refused = load::run_verify(&anonymous, bodies.clone(), |_| {}).await.unwrap();
    assert_eq!((refused.accepted, refused.rejected.get("http 401")), (0, Some(&300)), "{refused:?}");

    // `/settle` records them; with no chain none settles within the wait.
    let settle = HttpLoadConfig { settle: true, rate: None, ..config };
    let pending = load::run_verify(&settle, bodies[..20].to_vec(), |_| {}).await.unwrap();
    assert_eq!((pending.accepted, pending.rejected.get("settlement_pending")), (0, Some(&19)), "{pending:?}");
    assert_eq!(pending.rejected.values().sum::<u64>(), 20, "{pending:?}");
}
