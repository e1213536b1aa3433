//! A JSON-RPC proxy between x402d and anvil that misbehaves as real
//! providers and nodes do, at a seeded random rate per request: HTTP 429
//! and 503 with JSON-RPC error bodies, -32005 and "header not found", an
//! answer that never comes, a connection dropped, a body cut short or not
//! JSON at all, a node that lags (receipts not found yet, a head behind),
//! a pool that drops transactions it acknowledged, and a nonce count that
//! lies. Written on plain TCP so that it can hang up mid-request.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// One way to misbehave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Fault {
    /// HTTP 429 with a JSON-RPC error -32005 body.
    RateLimited,
    /// HTTP 503 with a JSON-RPC error body.
    Unavailable,
    /// HTTP 200, JSON-RPC error -32000 "header not found".
    HeaderNotFound,
    /// No answer at all, the connection held open.
    Hang,
    /// The connection closed without an answer.
    Dropped,
    /// The upstream answer cut in half.
    Truncated,
    /// HTTP 200 with an HTML page.
    Garbage,
    /// `eth_getTransactionReceipt` answered `null` (a node behind).
    StaleReceipt,
    /// `eth_blockNumber` answered three blocks behind.
    LagBehind,
    /// `eth_getTransactionCount` answered one lower than the truth.
    LowNonce,
    /// `eth_sendRawTransaction` acknowledged with the hash, never forwarded.
    DropTx,
    /// Answered right, 400 ms late (a latency spike).
    Slow,
}

impl Fault {
    /// Every fault.
    pub(crate) const ALL: [Self; 12] = [
        Self::RateLimited,
        Self::Unavailable,
        Self::HeaderNotFound,
        Self::Hang,
        Self::Dropped,
        Self::Truncated,
        Self::Garbage,
        Self::StaleReceipt,
        Self::LagBehind,
        Self::LowNonce,
        Self::DropTx,
        Self::Slow,
    ];

    /// The method it is limited to, if any.
    const fn method(self) -> Option<&'static str> {
        match self {
            Self::StaleReceipt => Some("eth_getTransactionReceipt"),
            Self::LagBehind => Some("eth_blockNumber"),
            Self::LowNonce => Some("eth_getTransactionCount"),
            Self::DropTx => Some("eth_sendRawTransaction"),
            _ => None,
        }
    }

    /// Error texts a provider sends that must never reach an x402d client.
    pub(crate) const LEAKS: [&'static str; 4] =
        ["request rate exceeded", "upstream unavailable", "header not found", "<html"];
}

#[derive(Debug)]
struct Script {
    /// Faults per thousand requests.
    per_mille: u32,
    kinds: Vec<Fault>,
    state: u64,
}

impl Script {
    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// The fault for a request of `method` (`None` for a batch), if this one gets one.
    fn draw(&mut self, method: Option<&str>) -> Option<Fault> {
        if self.kinds.is_empty() || (self.next() % 1000) as u32 >= self.per_mille {
            return None;
        }
        let fits: Vec<Fault> =
            self.kinds.iter().copied().filter(|k| k.method().is_none() || k.method() == method).collect();
        (!fits.is_empty()).then(|| fits[(self.next() % fits.len() as u64) as usize])
    }
}

struct Shared {
    upstream: String,
    http: reqwest::Client,
    script: Mutex<Script>,
    injected: Mutex<BTreeMap<Fault, u64>>,
    requests: std::sync::atomic::AtomicU64,
}

/// The proxy; it stops when dropped.
pub(crate) struct FaultProxy {
    pub(crate) url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy in front of `upstream`, passing everything through until
    /// [`FaultProxy::inject`].
    pub(crate) async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            http: reqwest::Client::new(),
            script: Mutex::new(Script { per_mille: 0, kinds: Vec::new(), state: 1 }),
            injected: Mutex::default(),
            requests: std::sync::atomic::AtomicU64::new(0),
        });
        let serving = shared.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, serving.clone()));
            }
        });
        Self { url, shared, server }
    }

    /// From now on, `per_mille` of requests get one of `kinds` (those that
    /// fit the request), drawn from `seed`.
    pub(crate) fn inject(&self, per_mille: u32, kinds: &[Fault], seed: u64) {
        *self.shared.script.lock().unwrap() = Script { per_mille, kinds: kinds.to_vec(), state: seed | 1 };
    }

    /// No more faults.
    pub(crate) fn heal(&self) {
        self.inject(0, &[], 1);
    }

    /// Faults injected so far, by kind.
    pub(crate) fn injected(&self) -> BTreeMap<Fault, u64> {
        self.shared.injected.lock().unwrap().clone()
    }

    /// Requests seen so far.
    pub(crate) fn requests(&self) -> u64 {
        self.shared.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Reads one HTTP/1.1 request: its body, or `None` at the end of the connection.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let mut chunk = [0u8; 8192];
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + length].to_vec();
            buf.drain(..end + 4 + length);
            return Some(body);
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!("HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await
}

fn error_body(request: &Value, code: i64, message: &str) -> Vec<u8> {
    let one = |r: &Value| json!({ "jsonrpc": "2.0", "id": r["id"], "error": { "code": code, "message": message } });
    let answer = match request {
        Value::Array(calls) => Value::Array(calls.iter().map(one).collect()),
        call => one(call),
    };
    serde_json::to_vec(&answer).unwrap()
}

async fn serve(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    while let Some(body) = read_request(&mut stream, &mut buf).await {
        shared.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let method = request["method"].as_str().map(str::to_owned);
        let fault = shared.script.lock().unwrap().draw(method.as_deref());
        if let Some(fault) = fault {
            *shared.injected.lock().unwrap().entry(fault).or_default() += 1;
        }
        let sent = match fault {
            Some(Fault::RateLimited) => {
                respond(&mut stream, 429, "application/json", &error_body(&request, -32005, "request rate exceeded"))
                    .await
            }
            Some(Fault::Unavailable) => {
                respond(&mut stream, 503, "application/json", &error_body(&request, -32603, "upstream unavailable"))
                    .await
            }
            Some(Fault::HeaderNotFound) => {
                respond(&mut stream, 200, "application/json", &error_body(&request, -32000, "header not found")).await
            }
            Some(Fault::Hang) => {
                tokio::time::sleep(Duration::from_secs(600)).await;
                return;
            }
            Some(Fault::Dropped) => return,
            Some(Fault::Garbage) => {
                respond(&mut stream, 200, "text/html", b"<html><body>502 Bad Gateway</body></html>").await
            }
            Some(Fault::DropTx) => {
                let raw = request["params"][0].as_str().unwrap_or_default();
                let bytes = alloy::primitives::hex::decode(raw).unwrap_or_default();
                let hash = alloy::primitives::keccak256(bytes);
                let answer = json!({ "jsonrpc": "2.0", "id": request["id"], "result": hash });
                respond(&mut stream, 200, "application/json", &serde_json::to_vec(&answer).unwrap()).await
            }
            Some(Fault::StaleReceipt) => {
                let answer = json!({ "jsonrpc": "2.0", "id": request["id"], "result": null });
                respond(&mut stream, 200, "application/json", &serde_json::to_vec(&answer).unwrap()).await
            }
            other => {
                if other == Some(Fault::Slow) {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                let upstream = shared
                    .http
                    .post(&shared.upstream)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                let Ok(upstream) = upstream else { return };
                let status = upstream.status().as_u16();
                let Ok(mut bytes) = upstream.bytes().await.map(|b| b.to_vec()) else { return };
                match other {
                    Some(Fault::Truncated) => bytes.truncate(bytes.len() / 2),
                    Some(Fault::LagBehind | Fault::LowNonce) => bytes = lower_result(&bytes, other),
                    _ => {}
                }
                respond(&mut stream, status, "application/json", &bytes).await
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// A quantity answer made smaller: three blocks behind, or one nonce lower.
fn lower_result(bytes: &[u8], fault: Option<Fault>) -> Vec<u8> {
    let Ok(mut answer) = serde_json::from_slice::<Value>(bytes) else { return bytes.to_vec() };
    let by = if fault == Some(Fault::LagBehind) { 3 } else { 1 };
    if let Some(n) = answer["result"].as_str().and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok()) {
        answer["result"] = json!(format!("0x{:x}", n.saturating_sub(by)));
    }
    serde_json::to_vec(&answer).unwrap()
}
