//! `x402d-load` (also run as `x402d load`): its flags (the defaults fit
//! `x402d dev`) and its run.

use std::{
    io::{IsTerminal as _, Write as _},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use alloy::{primitives::Address, signers::local::PrivateKeySigner};
use anyhow::Context as _;
use clap::Parser;
use clap::ValueEnum;
use x402_chain::contracts::{BATCH_SETTLEMENT_ADDRESS, ERC3009_DEPOSIT_COLLECTOR_ADDRESS};
use x402_channel::ChannelDomain;
use x402_devnet::{self as devnet, DEV_PAY_TO, Payer, dev_authorizer};
use x402_load::{self as load, HttpLoadConfig, LoadConfig, LoadReport, Progress, Work};

/// What to pay with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scheme {
    /// EIP-3009 `exact` payments.
    Exact,
    /// `batch-settlement` channel vouchers: channels are opened (a deposit
    /// each, on chain) before timing starts.
    Voucher,
}

/// Stream pre-signed payments at a running x402d (by default the one
/// `x402d dev` starts, as its batched merchant) and report throughput, ack
/// latency and rejections.
#[derive(Debug, Parser)]
#[command(name = "x402d-load", version)]
struct LoadArgs {
    /// gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// Post `exact` payments to this facilitator's `/verify` (e.g.
    /// `http://127.0.0.1:8402`) instead of streaming them over gRPC.
    #[arg(long, conflicts_with = "scheme")]
    verify_url: Option<String>,
    /// With --verify-url: post to `/settle` instead. Each request records
    /// its payment and waits for it to settle, up to the facilitator's wait.
    #[arg(long, requires = "verify_url")]
    settle: bool,
    /// The merchant's API key (default: the `x402d dev` merchant of the scheme).
    #[arg(long, env = "X402D_LOAD_KEY")]
    key: Option<String>,
    /// What to pay with.
    #[arg(long, value_enum, default_value_t = Scheme::Exact)]
    scheme: Scheme,
    /// Payments to send (vouchers: beyond each channel's first request).
    #[arg(long, short = 'n', default_value_t = 100_000)]
    payments: usize,
    /// Concurrent SubmitStreams, or requests in flight with --verify-url.
    #[arg(long, short = 'c', default_value_t = 4)]
    streams: usize,
    /// Offered payments per second (all streams together); full speed when absent.
    #[arg(long)]
    rate: Option<u64>,
    /// With --rate: run this many seconds, signing each payment as it is sent
    /// (valid for --ttl seconds), as paying clients do.
    #[arg(long, requires = "rate")]
    duration: Option<u64>,
    /// Validity of live-signed payments, seconds.
    #[arg(long, default_value_t = 120)]
    ttl: u64,
    /// Channels to open with --scheme voucher (each has one voucher in flight).
    #[arg(long, default_value_t = 512)]
    channels: usize,
    /// The receiver authorizer of --scheme voucher channels (default: `x402d dev`'s).
    #[arg(long)]
    receiver_authorizer: Option<Address>,
    /// Sample this process's resident size (the server's pid, on this machine).
    #[arg(long)]
    watch_pid: Option<u32>,
    /// Payer private keys, comma separated (default: the `x402d dev` payers).
    #[arg(long, value_delimiter = ',')]
    payer_keys: Vec<String>,
    /// Use this many random payer keys instead (for servers that do not check balances).
    #[arg(long)]
    random_payers: Option<usize>,
    /// Amount per payment, in the token's atomic units.
    #[arg(long, default_value_t = 100)]
    amount: u64,
    /// The merchant's address.
    #[arg(long, default_value = DEV_PAY_TO)]
    pay_to: Address,
    /// The token.
    #[arg(long, default_value_t = devnet::DEV_TOKEN_ADDRESS)]
    token: Address,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = LoadArgs::parse();
    let payers: Vec<Payer> = match args.random_payers {
        Some(n) => (0..n.max(1)).map(|_| Payer::random()).collect(),
        None if args.payer_keys.is_empty() => devnet::dev_payers(),
        None => args
            .payer_keys
            .iter()
            .map(|k| k.parse::<PrivateKeySigner>().map(Payer::new))
            .collect::<Result<_, _>>()
            .context("a payer key is not a 32-byte hex private key")?,
    };
    let requirements = load::dev_requirements(args.pay_to, args.token, args.amount);
    let n = args.payments;
    let key = args.key.clone().unwrap_or_else(|| {
        match args.scheme {
            Scheme::Exact => "dev-batched-key-not-secret",
            Scheme::Voucher => "dev-channel-key-not-secret",
        }
        .into()
    });
    let config = LoadConfig {
        endpoint: args.endpoint.clone(),
        api_key: key.clone(),
        streams: args.streams,
        rate: args.rate,
        watch_pid: args.watch_pid,
    };
    let started = std::time::Instant::now();
    let report = if let Some(url) = &args.verify_url {
        eprintln!("signing {n} payments from {} payers…", payers.len());
        let r = requirements.clone();
        let bodies = tokio::task::spawn_blocking(move || {
            let payments = load::exact_payloads(&payers, &r, n);
            load::verify_bodies(&r, &payments)
        })
        .await?;
        let signing_seconds = started.elapsed().as_secs_f64();
        let path = if args.settle { "settle" } else { "verify" };
        eprintln!("signed in {signing_seconds:.1} s; posting to {url}/{path}, {} in flight", args.streams);
        let http = HttpLoadConfig {
            url: url.clone(),
            settle: args.settle,
            api_key: Some(key),
            concurrency: args.streams,
            rate: args.rate,
            watch_pid: args.watch_pid,
        };
        let mut report = load::run_verify(&http, bodies, progress_line).await?;
        report.signing_seconds = signing_seconds;
        report
    } else {
        let work = match (args.scheme, args.duration) {
            (Scheme::Exact, Some(secs)) => {
                let payments = (args.rate.unwrap_or(1) * secs) as usize;
                eprintln!("{payments} payments over {secs} s, signed as sent (valid {} s)", args.ttl);
                Work::Live { payments, sign: Arc::new(load::live_signer(payers, requirements, args.ttl)) }
            }
            (Scheme::Exact, None) => {
                eprintln!("signing {n} payments from {} payers…", payers.len());
                let r = requirements.clone();
                Work::Open(tokio::task::spawn_blocking(move || load::sign(&payers, &r, n)).await?)
            }
            (Scheme::Voucher, _) => open_channels(&args, &config, payers, requirements).await?,
        };
        let signing_seconds = started.elapsed().as_secs_f64();
        eprintln!("ready in {signing_seconds:.1} s; sending over {} streams", args.streams);
        let mut report = load::run(&config, work, progress_line).await?;
        report.signing_seconds = signing_seconds;
        report
    };
    eprintln!();
    print(&report, args.json)
}

/// Signs the channels' deposits and vouchers, then opens the channels (their
/// first requests carry the deposits, settled on chain) untimed.
async fn open_channels(
    args: &LoadArgs,
    config: &LoadConfig,
    payers: Vec<Payer>,
    token: x402_wire::Requirements,
) -> anyhow::Result<Work> {
    let channels = args.channels.max(1);
    let plan = load::ChannelPlan {
        domain: ChannelDomain::new(31337, BATCH_SETTLEMENT_ADDRESS),
        collector: ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        token,
        receiver_authorizer: args.receiver_authorizer.unwrap_or_else(|| dev_authorizer().address()),
        withdraw_delay: 900,
        price: u128::from(args.amount),
        channels,
        vouchers_per_channel: args.payments.div_ceil(channels),
    };
    eprintln!(
        "signing {} vouchers in {channels} channels from {} payers…",
        plan.vouchers_per_channel * channels,
        payers.len()
    );
    let signed = tokio::task::spawn_blocking(move || load::vouchers(&payers, &plan)).await?;
    eprintln!("opening {channels} channels: a deposit each, on chain…");
    let setup = LoadConfig { rate: None, watch_pid: None, ..config.clone() };
    let opened = load::run(&setup, Work::Open(signed.deposits), progress_line).await?;
    eprintln!();
    if opened.accepted != channels as u64 {
        anyhow::bail!("{} of {channels} channels opened:\n{opened}", opened.accepted);
    }
    Ok(Work::Sequences(signed.sequences))
}

/// A progress bar with the rate (and the watched process's size) on stderr,
/// redrawn in place on a terminal; elsewhere (a log file, CI) a line every
/// 5 s.
fn progress_line(p: Progress) {
    /// The last 5-second mark a line was written for, off a terminal.
    static LAST_MARK: AtomicU64 = AtomicU64::new(u64::MAX);
    let terminal = std::io::stderr().is_terminal();
    let mark = p.elapsed.as_secs() / 5;
    if !terminal && LAST_MARK.swap(mark, Ordering::Relaxed) == mark {
        return;
    }
    let width = 30;
    let filled = (p.done * width / p.total.max(1)) as usize;
    let rate = p.done as f64 / p.elapsed.as_secs_f64().max(0.001);
    let rss = p.rss_kib.map(|kib| format!(" rss {:.0} MiB", kib as f64 / 1024.0)).unwrap_or_default();
    let bar = format!(
        "[{}{}] {}/{} {rate:.0}/s{rss}",
        "#".repeat(filled),
        ".".repeat(width as usize - filled),
        p.done,
        p.total
    );
    if terminal {
        eprint!("\r{bar}   ");
    } else {
        eprintln!("{bar}");
    }
    let _ = std::io::stderr().flush();
}

fn print(report: &LoadReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
