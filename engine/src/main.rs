//! `x402d`: the x402 settlement engine.
//!
//! - `x402d serve --config x402d.toml` runs it from a configuration file;
//! - `x402d dev` runs it on embedded defaults with demo merchants and keys;
//! - `x402d gas-report` measures settlement gas per payment on a local anvil.

use std::{net::SocketAddr, path::PathBuf};

use alloy::{
    primitives::{Address, U256},
    signers::local::PrivateKeySigner,
};
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use x402_devnet::{
    self as devnet, Anvil, DEV_ADMIN_KEY, DEV_MERCHANTS, DEV_MINT, DEV_PAY_TO, DEV_PAYER_KEYS, DEV_TOKEN_NAME,
    DEV_TOKEN_VERSION, Devnet, dev_authorizer,
};

/// Every request allocates (decoded messages, answers, ledger records) on
/// several threads at once; mimalloc's per-thread free lists cost about
/// half of what glibc's arenas did in the voucher profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use x402_engine::{
    config::{AssetConfig, ChainConfig, Config, MerchantConfig, PolicyConfig},
    node::Node,
};

mod status_cli;

#[derive(Debug, Parser)]
#[command(name = "x402d", version, about = "x402 settlement engine: verify, record and settle x402 payments")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run from a configuration file.
    Serve {
        /// TOML configuration (see engine/x402d.example.toml); defaults apply without one.
        #[arg(long, short, env = "X402D_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Run on embedded defaults: a local anvil chain with the test token and
    /// Multicall3, funded test payers, a fresh ledger, demo merchants for
    /// every strategy and printed keys. Nothing to configure.
    Dev {
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Run the load generator, `x402d-load` (installed beside x402d), with
    /// these arguments: see `x402d load --help`.
    #[command(disable_help_flag = true)]
    Load {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Show a payment, asked of a running node: where its settlement stands.
    Payment {
        /// The payment id (0x-hex, 32 bytes), as submits answer it.
        id: String,
        #[command(flatten)]
        node: status_cli::NodeArgs,
    },
    /// List a merchant's payments, asked of a running node: the most
    /// recently changed, or those of one settlement transaction.
    Payments {
        /// Those this transaction settled, or tried to (any fee-bumped version).
        #[arg(long)]
        transaction: Option<String>,
        /// How many of the most recently changed (at most 100).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        node: status_cli::NodeArgs,
    },
    /// Show a payment channel x402d keeps, asked of a running node.
    Channel {
        /// The channel id (0x-hex, 32 bytes).
        id: String,
        #[command(flatten)]
        node: status_cli::NodeArgs,
    },
    /// Measure gas per settled payment on a local anvil: direct, and
    /// batched through Multicall3 at each batch size.
    GasReport {
        /// Rows per batch to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,10,100,500")]
        rows: Vec<usize>,
        /// Payments per payer in the mix, comma separated: one report each.
        #[arg(long, value_delimiter = ',', default_value = "1,10")]
        per_payer: Vec<usize>,
    },
}

/// Flags (and environment variables) that override the file.
#[derive(Debug, Args)]
struct Overrides {
    /// gRPC listen address.
    #[arg(long, env = "X402D_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// HTTP listen address: the x402 facilitator API (/verify, /settle,
    /// /supported), /metrics and /healthz.
    #[arg(long, env = "X402D_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// Ledger directory.
    #[arg(long, env = "X402D_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl Overrides {
    fn apply(self, config: &mut Config) {
        if let Some(addr) = self.grpc_addr {
            config.server.grpc_addr = addr;
        }
        if let Some(addr) = self.http_addr {
            config.server.http_addr = addr;
        }
        if let Some(dir) = self.data_dir {
            config.ledger.path = dir;
        }
    }
}

fn dev_config(data_dir: PathBuf, devnet: &Devnet) -> Config {
    let mut config = Config::default();
    config.ledger.path = data_dir;
    config.auth.admin_key = Some(DEV_ADMIN_KEY.into());
    config.merchants = DEV_MERCHANTS
        .iter()
        .map(|(id, key)| MerchantConfig {
            id: (*id).into(),
            pay_to: vec![DEV_PAY_TO.into()],
            assets: vec![AssetConfig {
                network: format!("eip155:{}", devnet.chain_id),
                asset: devnet.token.to_string(),
            }],
            policy: match *id {
                "demo-direct" => PolicyConfig::Direct,
                "demo-batched" => PolicyConfig::Batched { max_rows: 250, max_wait_ms: 2000 },
                _ => PolicyConfig::Channel { claim_interval_secs: 60, claim_threshold: "1000000".into() },
            },
            api_key: Some((*key).into()),
            api_key_env: None,
            api_key_file: None,
        })
        .collect();
    config
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The crash points named in FAILPOINTS (test builds only).
    #[cfg(feature = "failpoints")]
    let _crash_points = fail::FailScenario::setup();
    let cli = Cli::parse();
    // Kept alive until the node stops: the dev ledger directory and chain.
    let mut devnet = None;
    let (config, _dev_dir) = match cli.command {
        Command::Load { args } => return run_load(&args),
        Command::Payment { id, node } => return status_cli::show(status_cli::Query::Payment(id), node).await,
        Command::Payments { transaction, limit, node } => {
            return status_cli::show(status_cli::Query::Payments { transaction, limit }, node).await;
        }
        Command::Channel { id, node } => return status_cli::show(status_cli::Query::Channel(id), node).await,
        Command::GasReport { rows, per_payer } => {
            for n in per_payer {
                let report = x402_devnet::gas::measure(&rows, n, |step| eprintln!("gas report: {step}")).await?;
                println!("{report}");
            }
            return Ok(());
        }
        Command::Serve { config, overrides } => {
            let mut config = match config {
                Some(path) => Config::from_file(&path)?,
                None => Config::default(),
            };
            overrides.apply(&mut config);
            (config, None)
        }
        Command::Dev { overrides } => {
            let dir =
                tempfile::Builder::new().prefix("x402d-dev-").tempdir().context("creating the dev data directory")?;
            let (anvil, chain) = start_devnet(&[]).await?;
            let mut config = dev_config(dir.path().to_path_buf(), &chain);
            let signers: Vec<PrivateKeySigner> = (0..4).map(|_| PrivateKeySigner::random()).collect();
            let addresses: Vec<Address> = signers.iter().map(PrivateKeySigner::address).collect();
            devnet::fund_ether(anvil.endpoint(), &addresses).await.context("funding settlement signers")?;
            let authorizer = dev_authorizer();
            let mut chain_config = ChainConfig::with_keys(
                anvil.endpoint(),
                signers.iter().map(|s| s.to_bytes().to_string()).collect(),
                Some(authorizer.to_bytes().to_string()),
            );
            chain_config.receipt_poll_ms = 100;
            chain_config.balance_poll_ms = 500;
            // Blocks come every second: ten blocks unmined is stuck.
            chain_config.stuck_after_secs = 10;
            config.chain = Some(chain_config.clone());
            // A second chain, settled (and its channels claimed) by the same
            // process.
            let (second, second_chain) = start_devnet(&["--chain-id", "31338"]).await?;
            devnet::fund_ether(second.endpoint(), &addresses).await.context("funding settlement signers")?;
            config.chains = vec![ChainConfig { rpc_url: second.endpoint().to_owned(), ..chain_config }];
            for merchant in &mut config.merchants {
                merchant.assets.push(AssetConfig {
                    network: format!("eip155:{}", second_chain.chain_id),
                    asset: second_chain.token.to_string(),
                });
            }
            devnet = Some((anvil, chain, authorizer.address(), second, second_chain));
            overrides.apply(&mut config);
            (config, Some(dir))
        }
    };

    let node = Node::start(&config).await.context("starting x402d")?;
    let endpoints = node.endpoints();
    println!("x402d listening grpc={} http={}", endpoints.grpc, endpoints.http);
    if let Some((anvil, chain, authorizer, second, second_chain)) = &devnet {
        let second = (second.endpoint(), second_chain.chain_id);
        print_dev_banner(&config, endpoints.http, anvil.endpoint(), chain, *authorizer, second);
    }
    node.wait(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// `x402d load …`: runs `x402d-load …`, from beside this binary or else
/// from `PATH`. The load generator is its own program so that the server
/// carries none of its dependencies (an HTTP client, signing at volume).
fn run_load(args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    const LOAD: &str = "x402d-load";
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join(LOAD))).filter(|p| p.is_file());
    let program = beside.map_or_else(|| LOAD.into(), std::path::PathBuf::into_os_string);
    let err = std::process::Command::new(&program).args(args).exec();
    Err(anyhow::anyhow!(
        "cannot run {}: {err}; build it with `cargo build --release -p x402-load` and put it beside x402d or on PATH",
        program.to_string_lossy()
    ))
}

/// Starts anvil (with `args`) and deploys the token and Multicall3, funding
/// the dev payers.
async fn start_devnet(args: &'static [&'static str]) -> anyhow::Result<(Anvil, Devnet)> {
    let anvil = tokio::task::spawn_blocking(|| Anvil::spawn(args)).await?.context("starting anvil")?;
    let payers: Vec<Address> =
        DEV_PAYER_KEYS.iter().map(|k| k.parse::<PrivateKeySigner>().map(|s| s.address())).collect::<Result<_, _>>()?;
    let chain =
        devnet::deploy(anvil.endpoint(), &payers, U256::from(DEV_MINT)).await.context("deploying the dev contracts")?;
    // From here on a block a second, as on a real chain (automine also slows
    // down as blocks pile up).
    devnet::set_interval_mining(anvil.endpoint(), 1).await.context("switching anvil to interval mining")?;
    Ok((anvil, chain))
}

fn print_dev_banner(
    config: &Config,
    http: SocketAddr,
    rpc: &str,
    chain: &Devnet,
    authorizer: Address,
    (second_rpc, second_id): (&str, u64),
) {
    println!();
    println!("ledger      {}", config.ledger.path.display());
    println!("admin key   {DEV_ADMIN_KEY}");
    for (id, key) in DEV_MERCHANTS {
        println!("merchant    {id:<13} key {key}");
    }
    println!("pay to      {DEV_PAY_TO}");
    println!("chain       {rpc} (eip155:{}, anvil)", chain.chain_id);
    println!("token       {} (\"{DEV_TOKEN_NAME}\" version {DEV_TOKEN_VERSION}, 6 decimals)", chain.token);
    println!("multicall3  {}", chain.multicall);
    for key in DEV_PAYER_KEYS {
        println!("payer key   {key} (holds {} tokens)", DEV_MINT / 1_000_000);
    }
    println!("channels    {} (deposit collector {})", chain.channels, chain.deposit_collector);
    println!("authorizer  {authorizer} (receiver authorizer: x402d signs channel claims with its key)");
    println!("settlement  direct, batched and channel payments settle on this chain");
    println!(
        "chain two   {second_rpc} (eip155:{second_id}, anvil: the same token, payers, merchants and channel contract)"
    );
    println!("balances    read from the chain, refreshed from Transfer logs");
    println!("metrics     http://{http}/metrics");
    println!();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
