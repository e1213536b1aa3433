//! `x402d load`: a load generator for the gRPC API.
//!
//! It signs every payment before timing starts (on every core), then
//! streams them over `streams` concurrent `SubmitStream`s, at full speed or
//! at a fixed offered rate, and measures each payment's ack latency (from
//! its send to its answer). The report has the throughput, latency
//! percentiles and rejections by reason.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use alloy::primitives::{Address, B256, U256};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{metadata::MetadataValue, transport::Channel};
use x402_proto::v1::{self as pb, payment_service_client::PaymentServiceClient};

use crate::{
    domain::{PaymentInput, Requirements, Submission},
    grpc::submit_request,
    payer::Payer,
};

/// What to send, where.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// gRPC endpoint, e.g. `http://127.0.0.1:50051`.
    pub endpoint: String,
    /// The merchant's API key.
    pub api_key: String,
    /// Payments to send.
    pub payments: usize,
    /// Payer keys, used round robin.
    pub payers: Vec<Payer>,
    /// Concurrent `SubmitStream`s.
    pub streams: usize,
    /// Offered payments per second over all streams; `None`: full speed.
    pub rate: Option<u64>,
    /// The requirements every payment pays.
    pub requirements: Requirements,
}

/// What a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    pub payments: usize,
    pub accepted: u64,
    /// Rejections by x402 reason, `duplicate`s, and errors by gRPC code.
    pub rejected: BTreeMap<String, u64>,
    pub seconds: f64,
    pub per_second: f64,
    /// Ack latency, microseconds.
    pub latency_p50_us: u64,
    pub latency_p95_us: u64,
    pub latency_p99_us: u64,
    pub latency_max_us: u64,
    /// Seconds spent signing before timing started.
    pub signing_seconds: f64,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "payments    {} in {:.2} s: {:.0}/s", self.payments, self.seconds, self.per_second)?;
        writeln!(f, "accepted    {}", self.accepted)?;
        for (reason, n) in &self.rejected {
            writeln!(f, "rejected    {n} {reason}")?;
        }
        write!(
            f,
            "ack latency p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.latency_p50_us as f64 / 1000.0,
            self.latency_p95_us as f64 / 1000.0,
            self.latency_p99_us as f64 / 1000.0,
            self.latency_max_us as f64 / 1000.0
        )
    }
}

/// Errors of a run: the endpoint or the key.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, tonic::transport::Error),
    #[error("the API key is not a valid header value")]
    Key,
    #[error("the stream failed: {0}")]
    Stream(#[from] tonic::Status),
}

/// Signs `n` payments of `requirements` from `payers`, on every core.
pub fn sign(payers: &[Payer], requirements: &Requirements, n: usize) -> Vec<pb::SubmitRequest> {
    let now = crate::domain::unix_millis() / 1000;
    let threads = std::thread::available_parallelism().map_or(2, |p| p.get()).min(n.max(1));
    let per = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t * per..((t + 1) * per).min(n))
                        .map(|i| {
                            let mut nonce = [0u8; 32];
                            nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
                            nonce[8..16].copy_from_slice(&crate::domain::unix_millis().to_be_bytes());
                            nonce[16..].copy_from_slice(&run_tail());
                            let payload = payers[i % payers.len()].sign_exact(
                                requirements,
                                now - 600,
                                now + 3600,
                                B256::from(nonce),
                            );
                            let submission =
                                Submission { requirements: requirements.clone(), input: PaymentInput::Exact(payload) };
                            submit_request(i as u64, &submission)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("signing threads do not panic")).collect()
    })
}

/// The process id, so that two runs in the same millisecond differ.
fn run_tail() -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&std::process::id().to_be_bytes());
    out
}

/// Sends pre-signed `requests` as `config` says; `progress` is told the
/// number answered so far, every ~250 ms.
pub async fn run(
    config: &LoadConfig,
    requests: Vec<pb::SubmitRequest>,
    progress: impl Fn(u64, Duration) + Send + Sync + 'static,
) -> Result<LoadReport, LoadError> {
    let channel = Channel::from_shared(config.endpoint.clone())
        .map_err(|_| LoadError::Key)?
        .connect()
        .await
        .map_err(|e| LoadError::Connect(config.endpoint.clone(), e))?;
    let key: MetadataValue<_> = format!("Bearer {}", config.api_key).parse().map_err(|_| LoadError::Key)?;
    let n = requests.len();
    let streams = config.streams.max(1);
    let mut parts: Vec<Vec<pb::SubmitRequest>> = (0..streams).map(|_| Vec::with_capacity(n / streams + 1)).collect();
    for (i, r) in requests.into_iter().enumerate() {
        parts[i % streams].push(r);
    }
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let ticker = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                progress(done.load(Ordering::Relaxed), started.elapsed());
            }
        })
    };
    // Each stream's pace: its share of the offered rate.
    let interval = config.rate.map(|r| Duration::from_secs_f64(streams as f64 / r.max(1) as f64));
    let mut tasks = Vec::with_capacity(streams);
    for part in parts {
        let mut client = PaymentServiceClient::new(channel.clone());
        let (key, done) = (key.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = mpsc::channel::<pb::SubmitRequest>(1024);
            let mut request = tonic::Request::new(ReceiverStream::new(rx));
            request.metadata_mut().insert("authorization", key);
            let sent: Arc<Vec<AtomicU64>> = Arc::new((0..part.len()).map(|_| AtomicU64::new(0)).collect());
            let base = Instant::now();
            let index: BTreeMap<u64, usize> = part.iter().enumerate().map(|(i, r)| (r.request_id, i)).collect();
            let sender = {
                let sent = sent.clone();
                tokio::spawn(async move {
                    let mut pace = interval.map(tokio::time::interval);
                    for (i, req) in part.into_iter().enumerate() {
                        if let Some(pace) = pace.as_mut() {
                            pace.tick().await;
                        }
                        sent[i].store(base.elapsed().as_micros() as u64, Ordering::Relaxed);
                        if tx.send(req).await.is_err() {
                            return;
                        }
                    }
                })
            };
            let mut inbound = client.submit_stream(request).await?.into_inner();
            let mut latencies = Vec::with_capacity(index.len());
            let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
            let mut accepted = 0u64;
            while let Some(resp) = inbound.message().await? {
                let at = base.elapsed().as_micros() as u64;
                if let Some(&i) = index.get(&resp.request_id) {
                    latencies.push(at.saturating_sub(sent[i].load(Ordering::Relaxed)));
                }
                match pb::Outcome::try_from(resp.outcome) {
                    Ok(pb::Outcome::Accepted) => accepted += 1,
                    Ok(pb::Outcome::Duplicate) => *outcomes.entry("duplicate".into()).or_default() += 1,
                    Ok(pb::Outcome::Rejected) => *outcomes.entry(resp.reason).or_default() += 1,
                    _ => *outcomes.entry(format!("error {}: {}", resp.error_code, resp.message)).or_default() += 1,
                }
                done.fetch_add(1, Ordering::Relaxed);
                if latencies.len() == index.len() {
                    break;
                }
            }
            sender.abort();
            Ok::<_, tonic::Status>((accepted, outcomes, latencies))
        }));
    }
    let mut report = LoadReport { payments: n, ..LoadReport::default() };
    let mut latencies = Vec::with_capacity(n);
    for task in tasks {
        let (accepted, outcomes, lat) = task.await.expect("stream tasks do not panic")?;
        report.accepted += accepted;
        for (reason, count) in outcomes {
            *report.rejected.entry(reason).or_default() += count;
        }
        latencies.extend(lat);
    }
    ticker.abort();
    report.seconds = started.elapsed().as_secs_f64();
    report.per_second = n as f64 / report.seconds.max(f64::EPSILON);
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    report.latency_p50_us = pct(0.50);
    report.latency_p95_us = pct(0.95);
    report.latency_p99_us = pct(0.99);
    report.latency_max_us = latencies.last().copied().unwrap_or(0);
    Ok(report)
}

/// The requirements `x402d dev`'s merchants accept: its token on anvil.
pub fn dev_requirements(pay_to: Address, token: Address, amount: u64) -> Requirements {
    Requirements {
        scheme: "exact".into(),
        network: "eip155:31337".into(),
        amount: U256::from(amount),
        asset: token,
        pay_to,
        max_timeout_seconds: 60,
        eip712_name: x402_chain::devnet::DEV_TOKEN_NAME.into(),
        eip712_version: x402_chain::devnet::DEV_TOKEN_VERSION.into(),
    }
}
