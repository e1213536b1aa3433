//! `x402d-load`: a load generator for x402d's gRPC API and any x402
//! facilitator's `POST /verify` and `/settle`.
//!
//! It talks to the engine only through its public APIs (the gRPC messages of
//! `x402-proto`, the x402 JSON of `x402-wire`) and signs as payers do
//! (`x402-devnet`'s [`Payer`](x402_devnet::Payer)), so what it measures is
//! what a gateway or a resource server would see.
//!
//! Work is signed before timing starts, on every core, unless a run at a
//! fixed rate signs as it goes ([`Work::Live`]). gRPC work is streamed over
//! `streams` concurrent `SubmitStream`s:
//!
//! - `exact` payments go out as fast as the pace allows (open loop);
//! - a channel's vouchers go out one at a time, each after the answer to the
//!   one before (closed loop per channel), since a client signs its next
//!   cumulative amount after the charged total it was told.
//!
//! Each payment's ack latency runs from its send to its answer. The report
//! has the throughput, latency percentiles and rejections by reason, and,
//! when a process is watched, its resident size over the run.

#![warn(missing_docs)]

mod http;
mod sign;

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{metadata::MetadataValue, transport::Channel};
use x402_proto::v1::{self as pb, payment_service_client::PaymentServiceClient};

pub use self::{
    http::{HttpLoadConfig, run_verify},
    sign::{ChannelPlan, Vouchers, exact_payloads, live_signer, sign, verify_bodies, vouchers},
};

/// Where to send the work, and how fast.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// gRPC endpoint, e.g. `http://127.0.0.1:50051`.
    pub endpoint: String,
    /// The merchant's API key.
    pub api_key: String,
    /// Concurrent `SubmitStream`s.
    pub streams: usize,
    /// Offered payments per second over all streams; `None`: full speed.
    pub rate: Option<u64>,
    /// A process (the server, on this machine) whose resident size to
    /// sample over the run.
    pub watch_pid: Option<u32>,
}

/// Signs one payment per call.
pub type Signer = Arc<dyn Fn() -> pb::SubmitRequest + Send + Sync>;

/// What a run sends.
pub enum Work {
    /// Payments, each sent as soon as the pace allows.
    Open(Vec<pb::SubmitRequest>),
    /// Sequences (a channel's vouchers): each one's next request is sent
    /// after the answer to its previous.
    Sequences(Vec<Vec<pb::SubmitRequest>>),
    /// `payments` signed as they are sent, by `sign` (on a thread of each
    /// stream's own).
    Live {
        /// How many to send.
        payments: usize,
        /// Signs the next one.
        sign: Signer,
    },
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Self::Open(_) => "Open",
            Self::Sequences(_) => "Sequences",
            Self::Live { .. } => "Live",
        };
        write!(f, "Work::{kind}({} payments)", self.len())
    }
}

impl Work {
    /// Payments in the work.
    pub fn len(&self) -> usize {
        match self {
            Self::Open(r) => r.len(),
            Self::Sequences(s) => s.iter().map(Vec::len).sum(),
            Self::Live { payments, .. } => *payments,
        }
    }

    /// Whether it has no payment.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The work split over `streams`: sequences stay whole.
    fn split(self, streams: usize) -> Vec<(usize, Source)> {
        match self {
            Self::Open(requests) => {
                let mut parts: Vec<Vec<_>> = (0..streams).map(|_| Vec::new()).collect();
                for (i, r) in requests.into_iter().enumerate() {
                    parts[i % streams].push(r);
                }
                parts.into_iter().map(|p| (p.len(), Source::Open(p.into_iter()))).collect()
            }
            Self::Sequences(sequences) => {
                let mut parts: Vec<Vec<_>> = (0..streams).map(|_| Vec::new()).collect();
                for (i, s) in sequences.into_iter().enumerate() {
                    parts[i % streams].push(s.into_iter());
                }
                parts
                    .into_iter()
                    .map(|seqs| {
                        let n = seqs.iter().map(ExactSizeIterator::len).sum();
                        let ready = (0..seqs.len() as u32).collect();
                        (n, Source::Closed { seqs, ready, answered: None })
                    })
                    .collect()
            }
            Self::Live { payments, sign } => (0..streams)
                .map(|s| {
                    let n = payments / streams + usize::from(s < payments % streams);
                    let (tx, rx) = mpsc::channel(64);
                    let sign = sign.clone();
                    std::thread::spawn(move || {
                        for _ in 0..n {
                            if tx.blocking_send(sign()).is_err() {
                                return;
                            }
                        }
                    });
                    (n, Source::Live(rx))
                })
                .collect(),
        }
    }
}

/// One stream's requests.
enum Source {
    Open(std::vec::IntoIter<pb::SubmitRequest>),
    Closed {
        seqs: Vec<std::vec::IntoIter<pb::SubmitRequest>>,
        /// Sequences whose next request may go.
        ready: VecDeque<u32>,
        /// Sequences answered since: set when the stream starts.
        answered: Option<mpsc::UnboundedReceiver<u32>>,
    },
    Live(mpsc::Receiver<pb::SubmitRequest>),
}

/// No sequence: the request stands alone.
const ALONE: u32 = u32::MAX;

impl Source {
    /// The next request to send, and its sequence.
    async fn next(&mut self) -> Option<(u32, pb::SubmitRequest)> {
        match self {
            Self::Open(requests) => requests.next().map(|r| (ALONE, r)),
            Self::Live(rx) => rx.recv().await.map(|r| (ALONE, r)),
            Self::Closed { seqs, ready, answered } => loop {
                let s = match ready.pop_front() {
                    Some(s) => s,
                    None => answered.as_mut()?.recv().await?,
                };
                if let Some(r) = seqs[s as usize].next() {
                    return Some((s, r));
                }
            },
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    /// Payments sent.
    pub payments: usize,
    /// Payments answered `ACCEPTED`.
    pub accepted: u64,
    /// Rejections by x402 reason, `duplicate`s, and errors by code.
    pub rejected: BTreeMap<String, u64>,
    /// Wall-clock seconds from the first send to the last answer.
    pub seconds: f64,
    /// Payments answered per second.
    pub per_second: f64,
    /// Ack latency, median, microseconds.
    pub latency_p50_us: u64,
    /// 95th percentile, microseconds.
    pub latency_p95_us: u64,
    /// 99th percentile, microseconds.
    pub latency_p99_us: u64,
    /// The slowest, microseconds.
    pub latency_max_us: u64,
    /// Seconds spent signing before timing started.
    pub signing_seconds: f64,
    /// The watched process's resident size, `(seconds into the run, KiB)`,
    /// every 10 seconds and at the end.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rss_kib: Vec<(u64, u64)>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "payments    {} in {:.2} s: {:.0}/s", self.payments, self.seconds, self.per_second)?;
        writeln!(f, "accepted    {}", self.accepted)?;
        for (reason, n) in &self.rejected {
            writeln!(f, "rejected    {n} {reason}")?;
        }
        if let (Some(first), Some(last)) = (self.rss_kib.first(), self.rss_kib.last()) {
            let max = self.rss_kib.iter().map(|s| s.1).max().unwrap_or(0);
            writeln!(
                f,
                "server rss  {:.0} MiB at {} s, {:.0} MiB at {} s, max {:.0} MiB",
                first.1 as f64 / 1024.0,
                first.0,
                last.1 as f64 / 1024.0,
                last.0,
                max as f64 / 1024.0
            )?;
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
    /// The endpoint did not answer.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, tonic::transport::Error),
    /// The endpoint or the key is malformed.
    #[error("the endpoint or API key is not valid: {0}")]
    Config(String),
    /// A stream ended with a gRPC error.
    #[error("the stream failed: {0}")]
    Stream(#[from] tonic::Status),
}

/// Where a run stands, for a progress line.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Payments answered so far.
    pub done: u64,
    /// Payments in the run.
    pub total: u64,
    /// Time since the run started.
    pub elapsed: Duration,
    /// The watched process's resident size, KiB.
    pub rss_kib: Option<u64>,
}

/// A process's resident size in KiB, from `/proc` (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Counts answers, tells `progress` every ~250 ms and samples the watched
/// process every 10 s, until stopped.
struct Ticker {
    done: Arc<AtomicU64>,
    started: Instant,
    task: tokio::task::JoinHandle<Vec<(u64, u64)>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Ticker {
    fn start(total: u64, watch_pid: Option<u32>, progress: impl Fn(Progress) + Send + Sync + 'static) -> Self {
        let done = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = {
            let done = done.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                let mut next_sample = Duration::ZERO;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = &mut stopped => break,
                    }
                    let elapsed = started.elapsed();
                    let rss = watch_pid.and_then(rss_kib);
                    if let Some(rss) = rss
                        && elapsed >= next_sample
                    {
                        samples.push((elapsed.as_secs(), rss));
                        next_sample += Duration::from_secs(10);
                    }
                    progress(Progress { done: done.load(Ordering::Relaxed), total, elapsed, rss_kib: rss });
                }
                if let Some(rss) = watch_pid.and_then(rss_kib) {
                    samples.push((started.elapsed().as_secs(), rss));
                }
                samples
            })
        };
        Self { done, started, task, stop }
    }

    /// Stops, and reports the `payments` that `results` (one per stream or
    /// worker) answered.
    async fn finish(self, payments: usize, results: Vec<StreamResult>) -> LoadReport {
        let mut report = LoadReport { payments, ..LoadReport::default() };
        let mut latencies = Vec::with_capacity(payments);
        for (accepted, outcomes, lat) in results {
            report.accepted += accepted;
            for (reason, count) in outcomes {
                *report.rejected.entry(reason).or_default() += count;
            }
            latencies.extend(lat);
        }
        report.seconds = self.started.elapsed().as_secs_f64();
        let _ = self.stop.send(());
        report.rss_kib = self.task.await.unwrap_or_default();
        report.per_second = report.payments as f64 / report.seconds.max(f64::EPSILON);
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
        report
    }
}

/// What one stream (or HTTP worker) saw: accepted, the other outcomes by
/// reason, and each answer's latency.
type StreamResult = (u64, BTreeMap<String, u64>, Vec<u64>);

/// Sends `work` as `config` says; `progress` is told where the run stands
/// every ~250 ms.
pub async fn run(
    config: &LoadConfig,
    work: Work,
    progress: impl Fn(Progress) + Send + Sync + 'static,
) -> Result<LoadReport, LoadError> {
    let channel = Channel::from_shared(config.endpoint.clone())
        .map_err(|e| LoadError::Config(e.to_string()))?
        .connect()
        .await
        .map_err(|e| LoadError::Connect(config.endpoint.clone(), e))?;
    let key: MetadataValue<_> =
        format!("Bearer {}", config.api_key).parse().map_err(|_| LoadError::Config("the API key".into()))?;
    let n = work.len();
    let streams = config.streams.max(1);
    // Each stream's pace: its share of the offered rate.
    let interval = config.rate.map(|r| Duration::from_secs_f64(streams as f64 / r.max(1) as f64));
    let ticker = Ticker::start(n as u64, config.watch_pid, progress);
    let tasks: Vec<_> = work
        .split(streams)
        .into_iter()
        .map(|(count, source)| {
            let client = PaymentServiceClient::new(channel.clone());
            tokio::spawn(stream(client, key.clone(), count, source, interval, ticker.done.clone()))
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("stream tasks do not panic")?);
    }
    Ok(ticker.finish(n, results).await)
}

/// One `SubmitStream` sending `count` requests from `source`. Request ids
/// are rewritten to the send order, which indexes the send times.
async fn stream(
    mut client: PaymentServiceClient<Channel>,
    key: MetadataValue<tonic::metadata::Ascii>,
    count: usize,
    mut source: Source,
    interval: Option<Duration>,
    done: Arc<AtomicU64>,
) -> Result<StreamResult, tonic::Status> {
    let (tx, rx) = mpsc::channel::<pb::SubmitRequest>(1024);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", key);
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    let sequence_of: Arc<Vec<AtomicU32>> = Arc::new((0..count).map(|_| AtomicU32::new(ALONE)).collect());
    let (answered_tx, answered_rx) = mpsc::unbounded_channel();
    if let Source::Closed { answered, .. } = &mut source {
        *answered = Some(answered_rx);
    }
    let base = Instant::now();
    let sender = {
        let (sent, sequence_of) = (sent.clone(), sequence_of.clone());
        tokio::spawn(async move {
            let mut pace = interval.map(tokio::time::interval);
            for k in 0..count {
                let Some((s, mut req)) = source.next().await else { return };
                if let Some(pace) = pace.as_mut() {
                    pace.tick().await;
                }
                req.request_id = k as u64;
                sequence_of[k].store(s, Ordering::Relaxed);
                sent[k].store(base.elapsed().as_micros() as u64, Ordering::Relaxed);
                if tx.send(req).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut inbound = client.submit_stream(request).await?.into_inner();
    let mut latencies = Vec::with_capacity(count);
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut accepted = 0u64;
    while latencies.len() < count
        && let Some(resp) = inbound.message().await?
    {
        let at = base.elapsed().as_micros() as u64;
        let k = resp.request_id as usize;
        if k < count {
            latencies.push(at.saturating_sub(sent[k].load(Ordering::Relaxed)));
            let s = sequence_of[k].load(Ordering::Relaxed);
            if s != ALONE {
                let _ = answered_tx.send(s);
            }
        }
        match pb::Outcome::try_from(resp.outcome) {
            Ok(pb::Outcome::Accepted) => accepted += 1,
            Ok(pb::Outcome::Duplicate) => *outcomes.entry("duplicate".into()).or_default() += 1,
            Ok(pb::Outcome::Rejected) => *outcomes.entry(resp.reason).or_default() += 1,
            _ => *outcomes.entry(format!("error {}: {}", resp.error_code, resp.message)).or_default() += 1,
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    sender.abort();
    Ok((accepted, outcomes, latencies))
}

/// The requirements `x402d dev`'s merchants accept: its token on anvil.
pub use x402_devnet::dev_requirements;
