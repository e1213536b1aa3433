//! Test harness: x402d processes and in-process nodes on free loopback
//! ports, authenticated clients, and signed payments.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use alloy::primitives::{Address, B256, U256, address};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use x402_devnet as devnet;
use x402_devnet::Payer;
use x402_engine::{
    config::{Config, MerchantConfig, PolicyConfig},
    domain::{ExactPayload, PaymentInput, Requirements, Submission},
    grpc::submit_request,
    node::Node,
};
use x402_proto::v1::{
    self as pb, merchant_admin_service_client::MerchantAdminServiceClient, payment_service_client::PaymentServiceClient,
};

pub(crate) const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub(crate) const M1_KEY: &str = "test-merchant-one-key-0123";
pub(crate) const M2_KEY: &str = "test-merchant-two-key-0123";
pub(crate) const PAY_TO: Address = address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8");
pub(crate) const PAY_TO_2: Address = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
pub(crate) const TOKEN: Address = devnet::DEV_TOKEN_ADDRESS;
pub(crate) const NETWORK: &str = "eip155:31337";
pub(crate) const AMOUNT: u64 = 10_000;

pub(crate) use x402_devnet::unix_now as now;

/// A config for tests: ledger under `dir`, two direct merchants `m1` and `m2`.
pub(crate) fn config(dir: &Path) -> String {
    format!(
        r#"
[ledger]
path = "{ledger}"

[pipeline]
shards = 2
record_only = true

[[merchants]]
id = "m1"
pay_to = ["{PAY_TO}"]
policy = {{ strategy = "direct" }}
api_key_env = "X402D_TEST_M1_KEY"

[[merchants]]
id = "m2"
pay_to = ["{PAY_TO_2}"]
policy = {{ strategy = "batched", max_rows = 100, max_wait_ms = 500 }}
api_key_env = "X402D_TEST_M2_KEY"
"#,
        ledger = dir.join("ledger").display()
    )
}

/// The same configuration as [`config`], as a value with inline keys, for
/// in-process nodes.
pub(crate) fn config_value(dir: &Path) -> Config {
    let mut config = Config::from_toml(&config(dir)).unwrap();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.http_addr = "127.0.0.1:0".parse().unwrap();
    config.auth.admin_key = Some(ADMIN_KEY.into());
    config.merchants[0].api_key = Some(M1_KEY.into());
    config.merchants[1].api_key = Some(M2_KEY.into());
    config
}

pub(crate) fn merchant_config(id: &str, pay_to: Address, key: &str, policy: PolicyConfig) -> MerchantConfig {
    MerchantConfig {
        id: id.into(),
        pay_to: vec![pay_to.to_string()],
        assets: Vec::new(),
        policy,
        api_key: Some(key.into()),
        api_key_env: None,
        api_key_file: None,
    }
}

/// An `x402d` process.
pub(crate) struct Daemon {
    child: Child,
    /// What it printed on stdout up to the end of its banner.
    pub(crate) banner: Vec<String>,
    pub(crate) grpc: SocketAddr,
    #[allow(dead_code, reason = "kept for tests of the HTTP listener")]
    pub(crate) http: SocketAddr,
}

impl Daemon {
    /// Writes `config` to `dir/x402d.toml` and starts `x402d serve` on free ports.
    pub(crate) fn start(dir: &Path, config: &str) -> Self {
        Self::start_with_env(dir, config, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub(crate) fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        let path: PathBuf = dir.join("x402d.toml");
        std::fs::write(&path, config).unwrap();
        Self::spawn(&["serve".as_ref(), "--config".as_ref(), path.as_os_str()], "x402d listening", env)
    }

    /// Starts `x402d dev` on free ports and reads its banner.
    pub(crate) fn dev() -> Self {
        Self::spawn(&["dev".as_ref()], "metrics ", &[])
    }

    /// Runs x402d with `args` and reads stdout until a line starting with `last`.
    fn spawn(args: &[&std::ffi::OsStr], last: &str, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_x402d"))
            .args(args)
            .envs(env.iter().copied())
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .env("X402D_ADMIN_KEY", ADMIN_KEY)
            .env("X402D_TEST_M1_KEY", M1_KEY)
            .env("X402D_TEST_M2_KEY", M2_KEY)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("x402d starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut banner = Vec::new();
        while !banner.last().is_some_and(|l: &String| l.starts_with(last)) {
            banner.push(rx.recv_timeout(Duration::from_secs(60)).expect("x402d prints its banner"));
        }
        let line = banner
            .iter()
            .find_map(|l| l.strip_prefix("x402d listening "))
            .expect("x402d prints its endpoints")
            .to_owned();
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .unwrap_or_else(|| panic!("{key} in {line:?}"))
                .parse()
                .unwrap()
        };
        Self { grpc: addr("grpc="), http: addr("http="), child, banner }
    }

    /// Waits up to `timeout` for the process to end by itself (at a crash
    /// point); its exit status, or `None` if it still runs.
    pub(crate) async fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The value of the banner line that starts with `label`.
    pub(crate) fn banner_value(&self, label: &str) -> &str {
        self.banner
            .iter()
            .find_map(|l| l.strip_prefix(label))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{label} in {:?}", self.banner))
    }

    /// SIGTERM and wait for a clean exit.
    pub(crate) fn stop(&mut self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "x402d exits cleanly on SIGTERM: {status}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `[chain]` section of a daemon config settling on the anvil node at
/// `endpoint`, its keys passed in the environment ([`ChainSection::env`]).
pub(crate) struct ChainSection {
    pub(crate) toml: String,
    keys: Vec<(&'static str, String)>,
}

impl ChainSection {
    /// `signer` settles; `authorizer`, if given, signs channel claims;
    /// `extra` is appended to the section (more `key = value` lines).
    pub(crate) fn new(
        endpoint: &str,
        signer: &alloy::signers::local::PrivateKeySigner,
        authorizer: Option<&alloy::signers::local::PrivateKeySigner>,
        extra: &str,
    ) -> Self {
        let mut toml = format!(
            "\n[chain]\nrpc_url = \"{endpoint}\"\nsigner_keys_env = \"X402D_TEST_SIGNER_KEYS\"\nreceipt_poll_ms = 50\n"
        );
        let mut keys = vec![("X402D_TEST_SIGNER_KEYS", signer.to_bytes().to_string())];
        if let Some(authorizer) = authorizer {
            toml.push_str("receiver_authorizer_key_env = \"X402D_TEST_AUTHORIZER_KEY\"\n");
            keys.push(("X402D_TEST_AUTHORIZER_KEY", authorizer.to_bytes().to_string()));
        }
        toml.push_str(extra);
        Self { toml, keys }
    }

    /// The environment carrying the keys, plus `more`.
    pub(crate) fn env<'a>(&'a self, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        self.keys.iter().map(|(k, v)| (*k, v.as_str())).chain(more.iter().copied()).collect()
    }
}

/// Anvil with the test token, funded payers and settlement keys, and an
/// in-process node (not settling: tests start their own settler on
/// [`ChainSetup::chain`]).
pub(crate) struct ChainSetup {
    pub(crate) anvil: x402_devnet::Anvil,
    /// Talks to anvil directly (mining, reorgs, reads).
    pub(crate) control: alloy::providers::RootProvider,
    pub(crate) chain: std::sync::Arc<x402_chain::AlloyChain>,
    pub(crate) payers: Vec<Payer>,
    pub(crate) node: Node,
    _dir: tempfile::TempDir,
}

impl ChainSetup {
    /// `payers` payers holding `minted` each, `signers` funded settlement
    /// keys, and a node on the test config changed by `configure`.
    pub(crate) async fn start(payers: usize, minted: u64, signers: usize, configure: impl FnOnce(&mut Config)) -> Self {
        use alloy::{providers::ProviderBuilder, signers::local::PrivateKeySigner};
        use x402_chain::{AlloyChain, TxConfig};
        let anvil = x402_devnet::Anvil::spawn(&[]).unwrap();
        let payers: Vec<Payer> = (0..payers).map(|_| Payer::random()).collect();
        let addresses: Vec<_> = payers.iter().map(Payer::address).collect();
        devnet::deploy(anvil.endpoint(), &addresses, U256::from(minted)).await.unwrap();
        let signers: Vec<_> = (0..signers).map(|_| PrivateKeySigner::random()).collect();
        let funded: Vec<_> = signers.iter().map(PrivateKeySigner::address).collect();
        devnet::fund_ether(anvil.endpoint(), &funded).await.unwrap();
        let chain = AlloyChain::connect(anvil.endpoint(), signers, TxConfig::default()).await.unwrap();
        let control = ProviderBuilder::default().connect_http(anvil.endpoint().parse().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_value(dir.path());
        configure(&mut config);
        let node = start_node(&config).await;
        Self { anvil, control, chain: std::sync::Arc::new(chain), payers, node, _dir: dir }
    }
}

/// An in-process node.
pub(crate) async fn start_node(config: &Config) -> Node {
    Node::start(config).await.expect("node starts")
}

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub(crate) struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub(crate) type Payments = PaymentServiceClient<InterceptedService<Channel, Bearer>>;
pub(crate) type Admin = MerchantAdminServiceClient<InterceptedService<Channel, Bearer>>;

pub(crate) async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connects")
}

fn bearer(key: &str) -> Bearer {
    Bearer(format!("Bearer {key}").parse().unwrap())
}

pub(crate) async fn payments(addr: SocketAddr, key: &str) -> Payments {
    PaymentServiceClient::with_interceptor(channel(addr).await, bearer(key))
}

pub(crate) async fn admin(addr: SocketAddr, key: &str) -> Admin {
    MerchantAdminServiceClient::with_interceptor(channel(addr).await, bearer(key))
}

/// `exact` requirements of [`AMOUNT`] of the dev token, paid to `pay_to`.
pub(crate) fn requirements(pay_to: Address) -> Requirements {
    devnet::dev_requirements(pay_to, TOKEN, AMOUNT)
}

/// A typed submit of `payload` for `req`, as a Rust gateway sends it.
pub(crate) fn exact_submit(request_id: u64, req: &Requirements, payload: &ExactPayload) -> pb::SubmitRequest {
    submit_request(request_id, &Submission::new(req.clone(), PaymentInput::Exact(payload.clone())))
}

/// A submit of the raw `PAYMENT-SIGNATURE` header for `req`.
pub(crate) fn header_submit(request_id: u64, req: &Requirements, header: String) -> pb::SubmitRequest {
    submit_request(request_id, &Submission::new(req.clone(), PaymentInput::Header(header)))
}

/// A signed, valid payment to `pay_to` as a typed submit.
pub(crate) fn signed_submit(payer: &Payer, pay_to: Address, request_id: u64) -> pb::SubmitRequest {
    let req = requirements(pay_to);
    let payload = payer.sign_exact(&req, now() - 600, now() + 3600, random_nonce());
    exact_submit(request_id, &req, &payload)
}

pub(crate) fn outcome(resp: &pb::SubmitResponse) -> pb::Outcome {
    pb::Outcome::try_from(resp.outcome).unwrap()
}

/// Streams `requests` over one `SubmitStream` and returns the responses
/// ordered by request id.
pub(crate) async fn stream_all(client: &mut Payments, requests: Vec<pb::SubmitRequest>) -> Vec<pb::SubmitResponse> {
    let n = requests.len();
    let mut responses = client.submit_stream(tokio_stream::iter(requests)).await.expect("stream opens").into_inner();
    let mut out = Vec::with_capacity(n);
    while let Some(resp) = responses.message().await.expect("stream stays up") {
        out.push(resp);
    }
    assert_eq!(out.len(), n, "one response per request");
    out.sort_by_key(|r| r.request_id);
    out
}

pub(crate) fn random_nonce() -> B256 {
    B256::from(rand::random::<[u8; 32]>())
}

/// The typed `exact` payment of a submit request built from one.
pub(crate) fn exact_mut(req: &mut pb::SubmitRequest) -> &mut pb::ExactPayment {
    match req.payment.as_mut().unwrap() {
        pb::submit_request::Payment::Exact(e) => e,
        _ => unreachable!("an exact payment"),
    }
}

/// The id x402d gives the `exact` payment `payload` of `req`.
pub(crate) fn payload_id(req: &Requirements, payload: &ExactPayload) -> x402_engine::domain::PaymentId {
    let chain_id = x402_engine::domain::Network::parse(&req.network).unwrap().chain_id();
    x402_engine::domain::PaymentId::new(chain_id, req.asset, payload.authorization.from, payload.authorization.nonce)
}

/// A JSON-RPC proxy in front of a node that answers chosen `eth_call`s
/// with a scripted fault (an HTTP status and a JSON-RPC error body, as a
/// rate-limiting provider does) while a fault is set, and forwards
/// everything else.
pub(crate) struct RpcProxy {
    pub(crate) url: String,
    fault: std::sync::Arc<std::sync::Mutex<Option<RpcFault>>>,
    hits: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// `eth_call`s passed through or answered, by the calldata's selector.
    calls: EthCalls,
    server: tokio::task::JoinHandle<()>,
}

type EthCalls = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>;

/// Answers `eth_call`s whose calldata starts with `selector`.
#[derive(Clone, Debug)]
pub(crate) struct RpcFault {
    pub(crate) selector: [u8; 4],
    pub(crate) status: u16,
    pub(crate) code: i64,
    pub(crate) message: &'static str,
}

impl RpcProxy {
    pub(crate) async fn start(upstream: &str) -> Self {
        use axum::{body::Bytes, extract::State, http::StatusCode, response::IntoResponse, routing::post};
        use serde_json::Value;
        type Shared = (
            String,
            reqwest::Client,
            std::sync::Arc<std::sync::Mutex<Option<RpcFault>>>,
            std::sync::Arc<std::sync::atomic::AtomicU64>,
            EthCalls,
        );
        async fn handle(
            State((upstream, http, fault, hits, seen)): State<Shared>,
            body: Bytes,
        ) -> axum::response::Response {
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            {
                let single = [request.clone()];
                let all = match &request {
                    Value::Array(calls) => calls.as_slice(),
                    _ => &single,
                };
                let mut seen = seen.lock().unwrap();
                for call in all.iter().filter(|c| c["method"] == "eth_call") {
                    let data = [&call["params"][0]["input"], &call["params"][0]["data"]]
                        .iter()
                        .find_map(|d| d.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    *seen.entry(data.chars().take(10).collect()).or_default() += 1;
                }
            }
            let fault = fault.lock().unwrap().clone();
            if let Some(f) = fault {
                let prefix = format!("0x{}", alloy::primitives::hex::encode(f.selector));
                let hit = |call: &Value| {
                    call["method"] == "eth_call"
                        && [&call["params"][0]["input"], &call["params"][0]["data"]]
                            .iter()
                            .any(|d| d.as_str().is_some_and(|d| d.starts_with(&prefix)))
                };
                let calls: Vec<&Value> = match &request {
                    Value::Array(calls) => calls.iter().collect(),
                    call => vec![call],
                };
                if calls.iter().any(|c| hit(c)) {
                    hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let error = |c: &Value| {
                        serde_json::json!({ "jsonrpc": "2.0", "id": c["id"],
                                            "error": { "code": f.code, "message": f.message } })
                    };
                    let answer = match &request {
                        Value::Array(calls) => Value::Array(calls.iter().map(error).collect()),
                        call => error(call),
                    };
                    let status = StatusCode::from_u16(f.status).unwrap();
                    return (status, axum::Json(answer)).into_response();
                }
            }
            match http.post(&upstream).header("content-type", "application/json").body(body).send().await {
                Ok(resp) => {
                    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
                    let bytes = resp.bytes().await.unwrap_or_default();
                    (status, [("content-type", "application/json")], bytes).into_response()
                }
                Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
            }
        }
        let fault = std::sync::Arc::new(std::sync::Mutex::new(None));
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let calls = EthCalls::default();
        let state: Shared = (upstream.to_owned(), reqwest::Client::new(), fault.clone(), hits.clone(), calls.clone());
        let app = axum::Router::new().route("/", post(handle)).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, fault, hits, calls, server }
    }

    /// `eth_call`s of a function with `selector` so far.
    pub(crate) fn eth_calls(&self, selector: [u8; 4]) -> u64 {
        let key = format!("0x{}", alloy::primitives::hex::encode(selector));
        self.calls.lock().unwrap().get(&key).copied().unwrap_or_default()
    }

    /// Sets (or with `None` clears) the fault.
    pub(crate) fn set(&self, fault: Option<RpcFault>) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Calls answered with the fault so far.
    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for RpcProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}
