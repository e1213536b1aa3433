//! `POST /verify` (or `/settle`) under load: the same payments to any x402
//! facilitator (x402d's, or the reference one), over `concurrency`
//! keep-alive connections.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Deserialize;

use super::{LoadError, LoadReport, Progress, StreamResult, Ticker};

/// Where `/verify` is, and how hard to press it.
#[derive(Clone, Debug)]
pub struct HttpLoadConfig {
    /// The facilitator's base URL: requests go to `<url>/verify`, or
    /// `<url>/settle` with `settle`.
    pub url: String,
    /// Post to `/settle`: each request records its payment and waits for it
    /// to settle (up to the facilitator's wait); a success is a settlement.
    pub settle: bool,
    /// Sent as `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// Requests in flight, each on a connection of its own.
    pub concurrency: usize,
    /// Offered requests per second; `None`: as fast as answers come.
    pub rate: Option<u64>,
    /// A process whose resident size to sample over the run.
    pub watch_pid: Option<u32>,
}

/// The part of a verify (`isValid`, `invalidReason`) or settle
/// (`success`, `errorReason`) response the report counts.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Verdict {
    #[serde(default, alias = "success")]
    is_valid: bool,
    #[serde(default, alias = "errorReason")]
    invalid_reason: Option<String>,
}

/// Posts each of `bodies` (JSON `/verify` or `/settle` requests) once.
pub async fn run_verify(
    config: &HttpLoadConfig,
    bodies: Vec<Vec<u8>>,
    progress: impl Fn(Progress) + Send + Sync + 'static,
) -> Result<LoadReport, LoadError> {
    let concurrency = config.concurrency.max(1);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| LoadError::Config(e.to_string()))?;
    let path = if config.settle { "settle" } else { "verify" };
    let url = format!("{}/{path}", config.url.trim_end_matches('/'));
    let auth = config.api_key.as_ref().map(|k| format!("Bearer {k}"));
    let n = bodies.len();
    let bodies: Arc<Vec<bytes::Bytes>> = Arc::new(bodies.into_iter().map(bytes::Bytes::from).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let ticker = Ticker::start(n as u64, config.watch_pid, progress);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, auth, bodies, next) =
                (client.clone(), url.clone(), auth.clone(), bodies.clone(), next.clone());
            let (done, rate) = (ticker.done.clone(), config.rate);
            tokio::spawn(async move {
                let mut result: StreamResult = (0, BTreeMap::new(), Vec::new());
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    if let Some(rate) = rate {
                        tokio::time::sleep_until(
                            (started + Duration::from_secs_f64(i as f64 / rate.max(1) as f64)).into(),
                        )
                        .await;
                    }
                    let sent = Instant::now();
                    let mut request = client.post(&url).header("content-type", "application/json").body(body.clone());
                    if let Some(auth) = &auth {
                        request = request.header("authorization", auth);
                    }
                    let outcome = match request.send().await {
                        Ok(resp) if resp.status().is_success() => match resp.json::<Verdict>().await {
                            Ok(Verdict { is_valid: true, .. }) => None,
                            Ok(Verdict { invalid_reason, .. }) => {
                                Some(invalid_reason.unwrap_or_else(|| "invalid".into()))
                            }
                            Err(e) => Some(format!("unreadable answer: {e}")),
                        },
                        Ok(resp) => Some(format!("http {}", resp.status().as_u16())),
                        Err(e) => Some(format!("error: {e}")),
                    };
                    result.2.push(sent.elapsed().as_micros() as u64);
                    match outcome {
                        None => result.0 += 1,
                        Some(reason) => *result.1.entry(reason).or_default() += 1,
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                result
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("verify workers do not panic"));
    }
    Ok(ticker.finish(n, results).await)
}
