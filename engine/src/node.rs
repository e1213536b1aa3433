//! Running x402d: open the ledger, start the engine, serve gRPC and HTTP,
//! stop cleanly on a signal.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Identity, ServerTlsConfig};
use x402_chain::{AlloyChain, Chain, TxConfig};

use crate::{
    Engine, Error, Result,
    balance::{BalanceSource, ChainBalances, ChainBalancesConfig},
    config::{ChainConfig, Config, TlsConfig},
    domain::Clock,
    ledger::{Ledger, RocksLedger, RocksOptions},
    settle::{ClaimsConfig, Settler},
};

/// How long open streams may delay a shutdown.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Where a running node listens.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints {
    /// The gRPC API.
    pub grpc: SocketAddr,
    /// The HTTP listener: the facilitator API, `/metrics`, `/healthz`.
    pub http: SocketAddr,
}

/// A started node; [`Node::wait`] serves until the shutdown signal.
#[derive(Debug)]
pub struct Node {
    engine: Arc<Engine>,
    endpoints: Endpoints,
    grpc: tokio::task::JoinHandle<Result<()>>,
    http: tokio::task::JoinHandle<Result<()>>,
    stop: watch::Sender<bool>,
    /// One settler per chain.
    settlers: Vec<tokio::task::JoinHandle<()>>,
    retention: Option<tokio::task::JoinHandle<()>>,
    /// Keeps the clock's floor at the chain's latest block time.
    chain_time: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Opens the ledger in `config.ledger.path`, upserts the configured
    /// merchants and binds both listeners. With a `[chain]`, payer balances
    /// are read from it (cached) and payments settle on it; otherwise the
    /// configured balances apply.
    pub async fn start(config: &Config) -> Result<Self> {
        Self::start_with_clock(config, Clock::system()).await
    }

    /// Like [`Node::start`], with the pipeline and settlement reading the
    /// time from `clock` (tests run a node through clock steps).
    pub async fn start_with_clock(config: &Config, clock: Clock) -> Result<Self> {
        install_crypto_provider();
        let chains = connect_chains(config).await?;
        // One cache per chain, each asking the next for other chains' payers,
        // the configured balances last.
        let mut balances: Arc<dyn BalanceSource> = Arc::new(config.balances()?);
        for (section, chain) in chains.iter().rev() {
            let cache = ChainBalancesConfig {
                ttl: std::time::Duration::from_secs(section.balance_ttl_secs),
                poll: std::time::Duration::from_millis(section.balance_poll_ms.max(1)),
                ..ChainBalancesConfig::default()
            };
            tracing::info!(chain_id = chain.chain_id(), ttl = ?cache.ttl, poll = ?cache.poll, "payer balances read from the chain");
            balances = Arc::new(ChainBalances::new(chain.clone(), cache).with_fallback(balances));
        }
        let path = config.ledger.path.clone();
        std::fs::create_dir_all(&path).map_err(|e| Error::Config(format!("ledger.path {}: {e}", path.display())))?;
        let ledger: Arc<dyn Ledger> = Arc::new(open_ledger(path).await?);
        Self::run(config, ledger, balances, chains, clock).await
    }

    /// Like [`Node::start`], on a given ledger and balance source (the
    /// chains are still settled on).
    pub async fn start_with(
        config: &Config,
        ledger: Arc<dyn Ledger>,
        balances: Arc<dyn BalanceSource>,
    ) -> Result<Self> {
        install_crypto_provider();
        let chains = connect_chains(config).await?;
        Self::run(config, ledger, balances, chains, Clock::system()).await
    }

    async fn run(
        config: &Config,
        ledger: Arc<dyn Ledger>,
        balances: Arc<dyn BalanceSource>,
        chains: Vec<(ChainConfig, Arc<AlloyChain>)>,
        clock: Clock,
    ) -> Result<Self> {
        crate::http::prometheus();
        let admin_key = config.admin_key()?;
        if admin_key.is_none() {
            tracing::warn!("no admin key configured: merchant admin is disabled");
        }
        let updates = config.merchant_updates()?;
        let primary = chains.first();
        // Settling on a chain, the clock never reads below the latest block
        // of the primary one (the chains' clocks agree to seconds; one is
        // followed).
        let (clock, chain_time) = match primary {
            Some((_, chain)) => {
                let clock = clock.with_floor();
                // Read once before anything is served, then followed.
                let behind_logged = raise_to_chain_time(chain, &clock, false).await;
                (clock.clone(), Some(tokio::spawn(follow_chain_time(chain.clone(), clock, behind_logged))))
            }
            None => (clock, None),
        };
        let mut pipeline = config.pipeline.to_pipeline();
        pipeline.clock = clock.clone();
        pipeline.settled_chains = match primary {
            Some(_) => Some(chains.iter().map(|(_, chain)| chain.chain_id()).collect()),
            None if config.pipeline.record_only => None,
            None => {
                return Err(Error::Config(
                    "no [chain] is configured, so nothing would settle the payments this node accepts: configure \
                     [chain], or set record_only = true under [pipeline] to accept and record them anyway (tests, \
                     verification benchmarks)"
                        .into(),
                ));
            }
        };
        // One prover per chain, for the pipeline and the HTTP facilitator.
        let mut provers = crate::signature::ByChain::default();
        for (section, chain) in &chains {
            provers.insert(chain.chain_id(), chain_prover(chain));
            pipeline.erc6492_factories.extend(section.erc6492_factories.iter().map(|f| (chain.chain_id(), *f)));
        }
        let provers = Arc::new(provers);
        pipeline.signatures = provers.clone();
        // Channels on every chain settled whose receiver authorizer key
        // x402d holds (elsewhere it could never claim their vouchers), each
        // chain on its own terms.
        if !chains.is_empty() {
            let mut sources = crate::channels::ByChain::default();
            let mut terms = Vec::with_capacity(chains.len());
            for (section, chain) in &chains {
                let chain_terms = section.channel_terms()?;
                if chain_terms.receiver_authorizer.is_none() {
                    tracing::info!(
                        chain_id = chain.chain_id(),
                        "no receiver authorizer key for this chain: its batch-settlement vouchers are refused over \
                         gRPC (x402d could never claim them)"
                    );
                    continue;
                }
                sources.insert(
                    chain.chain_id(),
                    Arc::new(crate::channels::ChainChannels::new(chain.clone(), section.follow())),
                );
                terms.push((chain.chain_id(), chain_terms));
            }
            pipeline.channels = Arc::new(sources);
            pipeline.channel_chains = Some(terms);
        }
        let engine = tokio::task::block_in_place(|| Engine::start(ledger, &balances, &pipeline, admin_key.as_deref()))?;
        let engine = Arc::new(engine);
        for update in updates {
            let id = update.id.clone();
            let merchant = engine.upsert_merchant(update).await?;
            tracing::info!(merchant = %id, strategy = merchant.policy.name(), has_key = merchant.api_key_sha256.is_some(), "merchant configured");
        }

        let tls = config.server.tls.as_ref().map(load_tls).transpose()?;
        let http_tls = config.server.tls.as_ref().map(load_http_tls).transpose()?;
        let grpc_listener = TcpListener::bind(config.server.grpc_addr).await?;
        let http_listener = TcpListener::bind(config.server.http_addr).await?;
        let endpoints = Endpoints { grpc: grpc_listener.local_addr()?, http: http_listener.local_addr()? };

        let (stop, stopped) = watch::channel(false);
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let facilitator = facilitator_info(config, &engine, &chains, &provers)?;
        if chains.is_empty() {
            tracing::warn!("record only, no [chain] configured: accepted payments stay queued");
        }
        let settlers = chains
            .into_iter()
            .map(|(section, chain)| start_settler(&engine, chain, &section, clock.clone()))
            .collect::<Result<Vec<_>>>()?;
        let streams = config.server.max_concurrent_streams.max(1);
        let grpc =
            tokio::spawn(crate::grpc::serve(engine.clone(), grpc_listener, tls, streams, until(stopped.clone())));
        let api = crate::facilitator::router(engine.clone(), facilitator);
        let http =
            tokio::spawn(crate::http::serve(http_listener, http_tls, api, engine.pipeline_died(), until(stopped)));
        let retention = start_retention(&engine, &config.ledger);
        Ok(Self { engine, endpoints, grpc, http, stop, settlers, retention, chain_time })
    }

    /// Where it listens (the ports it bound, for a config that asked for port 0).
    pub const fn endpoints(&self) -> Endpoints {
        self.endpoints
    }

    /// The engine it runs.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Serves until `shutdown` completes (or a listener fails), then stops
    /// the listeners and lets queued work finish.
    pub async fn wait(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let Self { engine, grpc, http, stop, settlers, retention, chain_time, .. } = self;
        let mut grpc = grpc;
        let mut http = http;
        let mut died = engine.pipeline_died();
        let result = tokio::select! {
            () = shutdown => Ok(()),
            r = &mut grpc => flatten(r),
            r = &mut http => flatten(r),
            // A dead pipeline thread answers nothing again: stop, and exit
            // non-zero so that a supervisor restarts the process.
            Ok(name) = died.wait_for(Option::is_some) => Err(Error::PipelineThreadDied(name.clone().unwrap_or_default())),
        };
        stop.send_replace(true);
        for task in [retention, chain_time].into_iter().flatten() {
            task.abort();
        }
        // Settlement stops between steps: whatever it had recorded is resolved
        // from the ledger's intents on the next start.
        for settler in &settlers {
            settler.abort();
        }
        for settler in settlers {
            let _ = settler.await;
        }
        // Unary calls finish; long-lived streams (watches) would hold a
        // graceful shutdown forever, so they get a grace period.
        for task in [&mut grpc, &mut http] {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut *task).await.is_err() {
                task.abort();
            }
        }
        // Dropping the engine joins the pipeline threads once queued work is
        // recorded: blocking work, off the async workers.
        let _ = tokio::task::spawn_blocking(move || drop(engine)).await;
        result
    }
}

/// How often the chain's latest block time is read for the clock's floor.
const CHAIN_TIME_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Raises `clock`'s floor to the chain's latest block time, every
/// [`CHAIN_TIME_EVERY`]: a clock behind the chain then reads no earlier
/// than the token checks `validBefore` against, and does not accept a
/// payment the chain would refuse as expired. It moves the clock at most
/// [`Clock::MAX_FLOOR_LEAD_MS`] ahead of the system's, so that a node
/// reporting a block from the future cannot take the clock far; and
/// `validAfter` is checked without the floor ([`crate::domain::Now`]). A
/// clock ahead of the chain is left alone here: the settler checks it
/// against the chain before it gives a payment up.
async fn follow_chain_time(chain: Arc<AlloyChain>, clock: Clock, behind_logged: bool) {
    let mut behind_logged = behind_logged;
    loop {
        tokio::time::sleep(CHAIN_TIME_EVERY).await;
        behind_logged = raise_to_chain_time(&chain, &clock, behind_logged).await;
    }
}

/// One read of [`follow_chain_time`]; whether the system clock is (and was
/// logged as) behind the chain, so that it is logged once a stretch.
async fn raise_to_chain_time(chain: &AlloyChain, clock: &Clock, behind_logged: bool) -> bool {
    let secs = match chain.head_time().await {
        Ok(secs) => secs,
        Err(err) => {
            tracing::debug!(%err, "reading the chain's latest block time failed");
            return behind_logged;
        }
    };
    let head_ms = secs.saturating_mul(1000);
    let behind = head_ms.saturating_sub(crate::domain::unix_millis());
    if behind > 5_000 && !behind_logged {
        if behind > Clock::MAX_FLOOR_LEAD_MS {
            tracing::error!(
                behind_ms = behind,
                corrected_ms = Clock::MAX_FLOOR_LEAD_MS,
                "the system clock is behind the chain's latest block by more than x402d corrects (or the node \
                 reports a block from the future): fix the host's time"
            );
        } else {
            tracing::warn!(
                behind_ms = behind,
                "the system clock is behind the chain's latest block; reading time from the chain"
            );
        }
    }
    clock.raise_floor(head_ms);
    behind > 5_000
}

/// Two TLS backends are linked (ring for tonic, aws-lc-rs for alloy's HTTP
/// client), so rustls needs to be told which one to use.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Connects to every chain configured (`[chain]`, then `[[chains]]`), each
/// shared by its settler, balance cache and proofs; two with one chain id
/// are refused.
async fn connect_chains(config: &Config) -> Result<Vec<(ChainConfig, Arc<AlloyChain>)>> {
    let mut chains: Vec<(ChainConfig, Arc<AlloyChain>)> = Vec::new();
    for section in config.chain_configs() {
        let chain = connect_chain(section).await?;
        if let Some((other, _)) = chains.iter().find(|(_, c)| c.chain_id() == chain.chain_id()) {
            return Err(Error::Config(format!(
                "chains: {} and {} are both chain {}: configure each chain once",
                x402_chain::redact_urls(&other.rpc_url),
                x402_chain::redact_urls(&section.rpc_url),
                chain.chain_id()
            )));
        }
        chains.push((section.clone(), Arc::new(chain)));
    }
    Ok(chains)
}

async fn connect_chain(config: &ChainConfig) -> Result<AlloyChain> {
    let signers = config
        .signer_keys()?
        .iter()
        .map(|k| k.parse::<alloy::signers::local::PrivateKeySigner>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| Error::Config("chain: a signer key is not a 32-byte hex private key".into()))?;
    let tx = TxConfig {
        receipt_poll: std::time::Duration::from_millis(config.receipt_poll_ms),
        rpc_timeout: std::time::Duration::from_millis(config.rpc_timeout_ms.max(1)),
        confirmations: config.confirmations,
        ..TxConfig::default()
    };
    Ok(AlloyChain::connect(&config.rpc_url, signers, tx).await?)
}

/// What the facilitator API advertises: the chains' networks (a record-only
/// node: the merchants' networks), the settlement signers, and
/// `batch-settlement` on each chain.
fn facilitator_info(
    config: &Config,
    engine: &Engine,
    chains: &[(ChainConfig, Arc<AlloyChain>)],
    provers: &Arc<crate::signature::ByChain>,
) -> Result<crate::facilitator::FacilitatorInfo> {
    // Only what is settled is advertised; a record-only node lists its
    // merchants' networks.
    let mut networks: Vec<String> = match chains {
        [] => {
            engine.merchants().iter().flat_map(|m| m.assets.iter().map(|a| format!("eip155:{}", a.chain_id))).collect()
        }
        chains => chains.iter().map(|(_, chain)| format!("eip155:{}", chain.chain_id())).collect(),
    };
    networks.sort();
    networks.dedup();
    // One budget for the transactions sent on merchants' behalf, whatever
    // chain they go to.
    let spending = Arc::new(crate::facilitator::SpendLimiter::new(
        config.facilitator.channel_tx_burst,
        config.facilitator.channel_tx_per_minute,
    ));
    let channels = chains
        .iter()
        .map(|(section, chain)| {
            Ok(crate::facilitator::ChannelFacilitator {
                chain: Arc::clone(chain),
                terms: section.channel_terms()?,
                authorizer: section.receiver_authorizer()?,
                follow: section.follow(),
                spending: spending.clone(),
                signatures: provers.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(crate::facilitator::FacilitatorInfo {
        networks,
        signers: chains.iter().flat_map(|(_, chain)| chain.signers()).collect(),
        settle_wait: std::time::Duration::from_millis(config.facilitator.settle_wait_ms),
        max_concurrent: config.facilitator.max_concurrent.max(1),
        max_concurrent_per_merchant: config.facilitator.max_concurrent_per_merchant.max(1),
        channels,
    })
}

/// Proves the signatures of payers with code on `chain`.
fn chain_prover(chain: &Arc<AlloyChain>) -> Arc<dyn crate::signature::SignatureSource> {
    Arc::new(crate::signature::ChainSignatures::new(chain.clone(), crate::signature::ChainSignaturesConfig::default()))
}

/// Starts `chain`'s settler, which also claims the chain's channels when a
/// receiver authorizer key is configured for it.
fn start_settler(
    engine: &Arc<Engine>,
    chain: Arc<AlloyChain>,
    config: &ChainConfig,
    clock: Clock,
) -> Result<tokio::task::JoinHandle<()>> {
    tracing::info!(chain_id = chain.chain_id(), signers = chain.signers().len(), "settling on chain");
    let claims = config.receiver_authorizer()?.map(|authorizer| {
        let mut claims = ClaimsConfig::new(config.channel_contract(), authorizer);
        claims.poll = std::time::Duration::from_millis(config.channel_poll_ms);
        tracing::info!(chain_id = chain.chain_id(), contract = %claims.contract, authorizer = %claims.authorizer.address(), "claiming channels");
        claims
    });
    Ok(Settler::spawn(engine.clone(), chain, crate::settle::SettlerConfig { clock, ..config.settler() }, claims))
}

/// Deletes settled history past `[ledger] retention_days`, every
/// `prune_every_secs` (the first time one period after start).
fn start_retention(engine: &Arc<Engine>, config: &crate::config::LedgerConfig) -> Option<tokio::task::JoinHandle<()>> {
    if config.retention_days == 0 {
        return None;
    }
    let (engine, keep) = (engine.clone(), config.retention_days.saturating_mul(86_400));
    let every = std::time::Duration::from_secs(config.prune_every_secs.max(1));
    tracing::info!(days = config.retention_days, ?every, "settled payments and events are deleted past retention");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let before = crate::domain::unix_millis() / 1000 - keep.min(crate::domain::unix_millis() / 1000);
            match engine.prune(before).await {
                Ok(pruned) => {
                    tracing::info!(before, payments = pruned.payments, events = pruned.events, "ledger pruned")
                }
                Err(err) => tracing::warn!(%err, "pruning the ledger failed; retried next period"),
            }
        }
    }))
}

fn flatten(r: Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    r.map_err(|e| Error::Io(std::io::Error::other(e)))?
}

async fn open_ledger(path: PathBuf) -> Result<RocksLedger> {
    tokio::task::spawn_blocking(move || RocksLedger::open(path, RocksOptions::default()))
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
}

fn read_pem(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Config(format!("server.tls: cannot read {}: {e}", path.display())))
}

fn load_tls(tls: &TlsConfig) -> Result<ServerTlsConfig> {
    let identity = Identity::from_pem(read_pem(&tls.cert_file)?, read_pem(&tls.key_file)?);
    Ok(ServerTlsConfig::new().identity(identity))
}

/// `[server.tls]` for the HTTP listener: the same certificate as gRPC's.
fn load_http_tls(tls: &TlsConfig) -> Result<std::sync::Arc<rustls::ServerConfig>> {
    crate::http::tls_config(&read_pem(&tls.cert_file)?, &read_pem(&tls.key_file)?)
}
