//! Configuration: one TOML file, environment overrides and CLI flags (the
//! last two applied by `main.rs`). Secrets come from the environment or
//! files and are never logged.
//!
//! `engine/x402d.example.toml` is the committed, tested example.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use alloy::primitives::{Address, U256};
use serde::Deserialize;

use crate::{
    Error, Result,
    balance::ConfiguredBalances,
    domain::{AcceptedAsset, Network, SettlementPolicy},
    engine::MerchantUpdate,
    pipeline::PipelineConfig,
    verify::MinValidity,
};
use x402_wire::fields::parse_decimal_u256;

/// The whole configuration file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`: the listeners.
    pub server: ServerConfig,
    /// `[ledger]`: where the ledger lives, and its retention.
    pub ledger: LedgerConfig,
    /// `[pipeline]`: acceptance pipeline sizing.
    pub pipeline: PipelineSection,
    /// `[auth]`: where the admin key comes from.
    pub auth: AuthConfig,
    /// `[balances]`: payer balances given in the file.
    pub balances: BalancesConfig,
    /// `[[merchants]]`: merchants upserted at start.
    pub merchants: Vec<MerchantConfig>,
    /// `[chain]`: the chain payments settle on; without it (and without
    /// `[[chains]]`) payments stay queued.
    pub chain: Option<ChainConfig>,
    /// `[[chains]]`: more chains settled by the same process, one table
    /// each (after `[chain]`, if both are given). Each has its own
    /// transaction manager, settler, balance and code cache and proofs.
    pub chains: Vec<ChainConfig>,
    /// `[facilitator]`: the x402 facilitator HTTP API.
    pub facilitator: FacilitatorConfig,
}

/// The x402 facilitator HTTP API (`/verify`, `/settle`, `/supported` on the
/// HTTP listener).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FacilitatorConfig {
    /// How long `/settle` waits for a payment to settle before answering
    /// `settlement_pending` (it settles all the same).
    pub settle_wait_ms: u64,
    /// `/verify` and `/settle` requests served at once; past it they are
    /// answered 503 (a waiting `/settle` counts until it answers).
    pub max_concurrent: usize,
    /// Of those, how many one merchant may have at once, so that one
    /// tenant's waiting `/settle` calls cannot take every place.
    pub max_concurrent_per_merchant: usize,
    /// Channel transactions (deposits, claims, refunds, settles) x402d
    /// sends at once for one merchant's `/settle` calls, paying their gas;
    /// past it they wait for the refill (429).
    pub channel_tx_burst: u32,
    /// The refill of that burst, per minute.
    pub channel_tx_per_minute: u32,
}

impl Default for FacilitatorConfig {
    fn default() -> Self {
        Self {
            settle_wait_ms: 30_000,
            max_concurrent: 4096,
            max_concurrent_per_merchant: 1024,
            channel_tx_burst: 20,
            channel_tx_per_minute: 60,
        }
    }
}

/// An EVM chain to settle on.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// JSON-RPC endpoint.
    pub rpc_url: String,
    /// Environment variable holding the settlement signer keys (hex,
    /// separated by commas or whitespace).
    pub signer_keys_env: Option<String>,
    /// File holding the settlement signer keys, one per line.
    pub signer_keys_file: Option<PathBuf>,
    /// The keys themselves; set only by code (`x402d dev`, tests).
    #[serde(skip)]
    pub signer_keys: Vec<String>,
    /// Receipt polling interval.
    #[serde(default = "default_receipt_poll_ms")]
    pub receipt_poll_ms: u64,
    /// Longest wait for one answer of the node, in milliseconds: a request
    /// the node never answers fails after this and is retried.
    #[serde(default = "default_rpc_timeout_ms")]
    pub rpc_timeout_ms: u64,
    /// Blocks on top of the including block before a payment is confirmed.
    #[serde(default = "default_confirmations")]
    pub confirmations: u64,
    /// Seconds a payer balance read from the chain is used before its next
    /// use re-reads it (in the background, the old value served meanwhile).
    #[serde(default = "default_balance_ttl_secs")]
    pub balance_ttl_secs: u64,
    /// How often `Transfer` logs are read to refresh the cached balances of
    /// the payers they name.
    #[serde(default = "default_balance_poll_ms")]
    pub balance_poll_ms: u64,
    /// The `batch-settlement` channel contract; the public deployment's
    /// address when absent.
    pub channel_contract: Option<alloy::primitives::Address>,
    /// Its ERC-3009 deposit collector; the public deployment's address when
    /// absent.
    pub deposit_collector: Option<alloy::primitives::Address>,
    /// Environment variable holding the receiver authorizer key that signs
    /// channel claims (hex). Without it, vouchers are verified and recorded
    /// but not claimed.
    pub receiver_authorizer_key_env: Option<String>,
    /// File holding the receiver authorizer key.
    pub receiver_authorizer_key_file: Option<PathBuf>,
    /// The key itself; set only by code (`x402d dev`, tests).
    #[serde(skip)]
    pub receiver_authorizer_key: Option<String>,
    /// How often channel events are read and due claims looked for.
    #[serde(default = "default_channel_poll_ms")]
    pub channel_poll_ms: u64,
    /// The smallest channel deposit x402d puts on chain (and pays the gas
    /// of), in token units, decimal; none when absent. A deposit must
    /// cover at least the voucher it comes with in any case.
    #[serde(default)]
    pub min_deposit: Option<String>,
    /// An unmined settlement transaction is replaced by a fee bump after
    /// this many seconds.
    #[serde(default = "default_stuck_after_secs")]
    pub stuck_after_secs: u64,
    /// Fee bumps per transaction at most.
    #[serde(default = "default_max_bumps")]
    pub max_bumps: u32,
    /// Blocks on top of an included transaction after which it is no longer
    /// watched for reorgs.
    #[serde(default = "default_finality_depth")]
    pub finality_depth: u64,
    /// A batch goes out once its earliest `validBefore` is this close.
    #[serde(default = "default_batch_deadline_margin_secs")]
    pub batch_deadline_margin_secs: u64,
    /// The Multicall3 contract batches go through; the canonical address
    /// when absent.
    pub multicall: Option<alloy::primitives::Address>,
    /// The wallet factories whose counterfactual (ERC-6492) signatures are
    /// accepted: their deployment is simulated with each check, and made
    /// by the settlement transaction. Signatures naming any other factory
    /// are refused. None by default.
    #[serde(default)]
    pub erc6492_factories: Vec<alloy::primitives::Address>,
}

impl ChainConfig {
    /// How transactions outside the settler (channel deposits, the HTTP
    /// facilitator's channel calls) are followed to their receipts.
    pub fn follow(&self) -> x402_chain::Follow {
        x402_chain::Follow {
            stuck_after: std::time::Duration::from_secs(self.stuck_after_secs),
            max_bumps: self.max_bumps,
            ..x402_chain::Follow::default()
        }
    }

    /// The settler's pacing from this section.
    pub fn settler(&self) -> crate::settle::SettlerConfig {
        let d = crate::settle::SettlerConfig::default();
        crate::settle::SettlerConfig {
            stuck_after: std::time::Duration::from_secs(self.stuck_after_secs),
            max_bumps: self.max_bumps,
            finality_depth: self.finality_depth,
            batch_deadline_margin_secs: self.batch_deadline_margin_secs,
            multicall: self.multicall.unwrap_or(d.multicall),
            ..d
        }
    }
}

const fn default_stuck_after_secs() -> u64 {
    30
}

const fn default_max_bumps() -> u32 {
    5
}

const fn default_finality_depth() -> u64 {
    64
}

const fn default_batch_deadline_margin_secs() -> u64 {
    20
}

const fn default_channel_poll_ms() -> u64 {
    500
}

const fn default_receipt_poll_ms() -> u64 {
    200
}

const fn default_rpc_timeout_ms() -> u64 {
    10_000
}

const fn default_confirmations() -> u64 {
    1
}

const fn default_balance_ttl_secs() -> u64 {
    30
}

const fn default_balance_poll_ms() -> u64 {
    1000
}

impl ChainConfig {
    /// A chain at `rpc_url` with keys given by code (`x402d dev`, tests)
    /// and every other setting at its default.
    pub fn with_keys(
        rpc_url: impl Into<String>,
        signer_keys: Vec<String>,
        receiver_authorizer_key: Option<String>,
    ) -> Self {
        Self {
            rpc_url: rpc_url.into(),
            signer_keys_env: None,
            signer_keys_file: None,
            signer_keys,
            receipt_poll_ms: default_receipt_poll_ms(),
            rpc_timeout_ms: default_rpc_timeout_ms(),
            confirmations: default_confirmations(),
            balance_ttl_secs: default_balance_ttl_secs(),
            balance_poll_ms: default_balance_poll_ms(),
            channel_contract: None,
            deposit_collector: None,
            receiver_authorizer_key_env: None,
            receiver_authorizer_key_file: None,
            receiver_authorizer_key,
            channel_poll_ms: default_channel_poll_ms(),
            min_deposit: None,
            stuck_after_secs: default_stuck_after_secs(),
            max_bumps: default_max_bumps(),
            finality_depth: default_finality_depth(),
            batch_deadline_margin_secs: default_batch_deadline_margin_secs(),
            multicall: None,
            erc6492_factories: Vec::new(),
        }
    }

    /// The receiver authorizer key, if one is configured.
    pub fn receiver_authorizer_key(&self) -> Result<Option<String>> {
        if let Some(key) = &self.receiver_authorizer_key {
            return Ok(Some(key.clone()));
        }
        read_secret(
            "chain.receiver_authorizer_key",
            self.receiver_authorizer_key_env.as_deref(),
            self.receiver_authorizer_key_file.as_deref(),
        )
    }

    /// The receiver authorizer, if its key is configured: the key x402d
    /// claims channels with.
    pub fn receiver_authorizer(&self) -> Result<Option<alloy::signers::local::PrivateKeySigner>> {
        self.receiver_authorizer_key()?
            .map(|key| key.parse::<alloy::signers::local::PrivateKeySigner>())
            .transpose()
            .map_err(|_| Error::Config("chain: the receiver authorizer key is not a 32-byte hex private key".into()))
    }

    /// What this chain's channels are held to: its contracts, least
    /// deposit and receiver authorizer.
    pub fn channel_terms(&self) -> Result<crate::channels::ChannelTerms> {
        Ok(crate::channels::ChannelTerms {
            contracts: crate::channels::ChannelContracts {
                channels: self.channel_contract(),
                collector: self.deposit_collector.unwrap_or(x402_chain::contracts::ERC3009_DEPOSIT_COLLECTOR_ADDRESS),
            },
            min_deposit: self.min_deposit()?,
            receiver_authorizer: self.receiver_authorizer()?.map(|signer| signer.address()),
        })
    }

    /// [`ChainConfig::min_deposit`] as a number (0 when absent).
    pub fn min_deposit(&self) -> Result<u128> {
        self.min_deposit.as_deref().map_or(Ok(0), |m| {
            m.trim().parse().map_err(|_| Error::Config(format!("chain: min_deposit {m:?} is not a decimal amount")))
        })
    }

    /// The channel contract vouchers are signed for: `channel_contract`, else
    /// the public deployment's.
    pub fn channel_contract(&self) -> alloy::primitives::Address {
        self.channel_contract.unwrap_or(x402_chain::contracts::BATCH_SETTLEMENT_ADDRESS)
    }

    /// The signer keys, from code, the environment or the file; an error if
    /// none is configured.
    pub fn signer_keys(&self) -> Result<Vec<String>> {
        if !self.signer_keys.is_empty() {
            return Ok(self.signer_keys.clone());
        }
        let text = read_secret("chain.signer_keys", self.signer_keys_env.as_deref(), self.signer_keys_file.as_deref())?
            .ok_or_else(|| Error::Config("chain: signer_keys_env or signer_keys_file is required".into()))?;
        Ok(text.split(|c: char| c == ',' || c.is_whitespace()).filter(|k| !k.is_empty()).map(str::to_owned).collect())
    }
}

/// Listeners.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listener (payments, merchant admin, health, reflection).
    pub grpc_addr: SocketAddr,
    /// HTTP listener (`/metrics`, `/healthz`, the x402 facilitator API).
    pub http_addr: SocketAddr,
    /// TLS for both listeners, gRPC and HTTP; plaintext when absent.
    pub tls: Option<TlsConfig>,
    /// HTTP/2 streams one gRPC connection may have open at once (a stream
    /// per call; a `SubmitStream` is one stream for many payments).
    pub max_concurrent_streams: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8402)),
            tls: None,
            max_concurrent_streams: 256,
        }
    }
}

/// PEM certificate chain and private key.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, served on both listeners.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate.
    pub key_file: PathBuf,
}

/// Where the ledger lives, and how long it keeps settled history.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// Directory of the ledger (default `x402d-data`; `X402D_DATA_DIR` or
    /// `--data-dir` overrides it).
    pub path: PathBuf,
    /// Settled (confirmed, failed, expired) payments whose `validBefore`
    /// is older than this many days, and events older than it, are
    /// deleted. 0 (the default) keeps everything; otherwise at least 1.
    /// Payments still open are kept whatever their age.
    pub retention_days: u64,
    /// How often the retention runs.
    pub prune_every_secs: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self { path: PathBuf::from("x402d-data"), retention_days: 0, prune_every_secs: 3600 }
    }
}

/// Pipeline sizing; see [`PipelineConfig`].
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSection {
    /// Verifier threads (stage 1); 0, the default, means one per core.
    pub verifiers: usize,
    /// Payer shards (stage 2), one thread each (default 2).
    pub shards: usize,
    /// Capacity of each queue between stages (default 65536).
    pub queue_capacity: usize,
    /// Most items in one fsync'd group commit (default 4096).
    pub max_group: usize,
    /// Seconds past `validBefore` a payment stays in the in-memory replay
    /// window (default 300).
    pub replay_retention_secs: u64,
    /// `[pipeline.min_validity_secs]`: seconds of validity a payment must
    /// have left when accepted, per strategy.
    pub min_validity_secs: MinValiditySection,
    /// Without a `[chain]`, accept and record payments that nothing will
    /// settle (tests, verification benchmarks). Off by default: a node with
    /// no `[chain]` refuses to start rather than accept payments it can
    /// never settle. With a `[chain]` it has no effect.
    pub record_only: bool,
    /// Per shard: most payments waiting for their payer's balance, and most
    /// vouchers waiting for their channel's read or deposit.
    pub max_parked: usize,
}

impl Default for PipelineSection {
    fn default() -> Self {
        let d = PipelineConfig::default();
        Self {
            verifiers: d.verifiers,
            shards: d.shards,
            queue_capacity: d.queue_capacity,
            max_group: d.max_group,
            replay_retention_secs: d.replay_retention_secs,
            min_validity_secs: MinValiditySection::default(),
            record_only: false,
            max_parked: d.max_parked,
        }
    }
}

/// Seconds of validity a payment must have left, per strategy.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MinValiditySection {
    /// For `direct` merchants (default 6, also the least any strategy gets).
    pub direct: u64,
    /// For `batched` merchants (default 30).
    pub batched: u64,
    /// For `channel` merchants (default 60).
    pub channel: u64,
}

impl Default for MinValiditySection {
    fn default() -> Self {
        let d = MinValidity::default();
        Self { direct: d.direct, batched: d.batched, channel: d.channel }
    }
}

impl PipelineSection {
    /// The [`PipelineConfig`] these settings give (`max_parked` at least 1),
    /// the rest at its defaults for the node to fill in from `[chain]`.
    pub fn to_pipeline(&self) -> PipelineConfig {
        let m = &self.min_validity_secs;
        PipelineConfig {
            verifiers: self.verifiers,
            shards: self.shards,
            queue_capacity: self.queue_capacity,
            max_group: self.max_group,
            min_validity: MinValidity { direct: m.direct, batched: m.batched, channel: m.channel },
            replay_retention_secs: self.replay_retention_secs,
            max_parked: self.max_parked.max(1),
            ..PipelineConfig::default()
        }
    }
}

/// Where the admin key comes from.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The key itself; set only by code (`x402d dev`, tests), never read
    /// from a file.
    #[serde(skip)]
    pub admin_key: Option<String>,
    /// Environment variable holding the admin key.
    pub admin_key_env: Option<String>,
    /// File holding the admin key (trailing whitespace ignored).
    pub admin_key_file: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { admin_key: None, admin_key_env: Some("X402D_ADMIN_KEY".into()), admin_key_file: None }
    }
}

/// Payer balances given in the configuration: what applies without a
/// `[chain]` (whose balances are read from the chain), and for payments on
/// another chain than the `[chain]`'s.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BalancesConfig {
    /// Everyone's balance: `"unlimited"` or atomic units in decimal.
    pub default: String,
    /// `[[balances.accounts]]`: balances of particular payers, in place of
    /// the default.
    pub accounts: Vec<BalanceAccount>,
}

impl Default for BalancesConfig {
    fn default() -> Self {
        Self { default: "unlimited".into(), accounts: Vec::new() }
    }
}

/// One payer's balance of one token (`[[balances.accounts]]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalanceAccount {
    /// The chain, as `eip155:<chain id>`.
    pub network: String,
    /// The token contract, 0x-hex.
    pub token: String,
    /// The payer, 0x-hex.
    pub owner: String,
    /// The balance, atomic token units in decimal.
    pub amount: String,
}

/// A merchant defined in the file; upserted at start.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MerchantConfig {
    /// 1–64 characters of `[A-Za-z0-9_.-]`.
    pub id: String,
    /// Addresses it is paid at, 0x-hex; at least one is required.
    #[serde(default)]
    pub pay_to: Vec<String>,
    /// Networks and tokens it accepts; empty or absent accepts any.
    #[serde(default)]
    pub assets: Vec<AssetConfig>,
    /// How its payments are settled: `policy = { strategy = "direct" }` and
    /// the strategy's parameters.
    pub policy: PolicyConfig,
    /// The key itself; set only by code (`x402d dev`, tests).
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Environment variable holding the merchant's API key.
    pub api_key_env: Option<String>,
    /// File holding the merchant's API key.
    pub api_key_file: Option<PathBuf>,
}

/// A network and token a merchant accepts (`assets = [{ network, asset }]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AssetConfig {
    /// The chain, as `eip155:<chain id>`.
    pub network: String,
    /// The token contract, 0x-hex.
    pub asset: String,
}

/// A settlement strategy and its parameters.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "strategy", rename_all = "snake_case", deny_unknown_fields)]
pub enum PolicyConfig {
    /// `strategy = "direct"`: one `transferWithAuthorization` transaction per
    /// payment.
    Direct,
    /// `strategy = "batched"`: many payments per Multicall3 transaction.
    Batched {
        /// Most rows per transaction; at least 1.
        max_rows: u32,
        /// Milliseconds a batch's oldest row may wait before it goes out.
        max_wait_ms: u64,
    },
    /// `strategy = "channel"`: x402 `batch-settlement` channels, claimed
    /// periodically.
    Channel {
        /// Seconds after its last claim a channel with anything unclaimed is
        /// claimed.
        claim_interval_secs: u64,
        /// Unclaimed value at which a channel is claimed at once, atomic token
        /// units in decimal.
        claim_threshold: String,
    },
}

impl Config {
    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Every chain settled: `[chain]`, then each of `[[chains]]`. The first
    /// is the primary one: `batch-settlement` channels and the clock's
    /// floor are its.
    pub fn chain_configs(&self) -> Vec<&ChainConfig> {
        self.chain.iter().chain(&self.chains).collect()
    }

    /// The admin key, from the environment or a file.
    pub fn admin_key(&self) -> Result<Option<String>> {
        if let Some(key) = &self.auth.admin_key {
            return Ok(Some(key.clone()));
        }
        read_secret("auth.admin_key", self.auth.admin_key_env.as_deref(), self.auth.admin_key_file.as_deref())
    }

    /// The balance source the file describes.
    pub fn balances(&self) -> Result<ConfiguredBalances> {
        let default = match self.balances.default.as_str() {
            "unlimited" => None,
            amount => Some(decimal("balances.default", amount)?),
        };
        let mut balances = ConfiguredBalances::new(default);
        for (i, a) in self.balances.accounts.iter().enumerate() {
            let field = |name: &str| format!("balances.accounts[{i}].{name}");
            balances = balances.with_account(
                network(&field("network"), &a.network)?.chain_id(),
                address(&field("token"), &a.token)?,
                address(&field("owner"), &a.owner)?,
                decimal(&field("amount"), &a.amount)?,
            );
        }
        Ok(balances)
    }

    /// The merchants the file defines, with their keys read.
    pub fn merchant_updates(&self) -> Result<Vec<MerchantUpdate>> {
        self.merchants
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let field = |name: &str| format!("merchants[{i}].{name}");
                crate::domain::validate_merchant_id(&m.id)
                    .map_err(|msg| Error::Config(format!("{}: {msg}", field("id"))))?;
                let policy = match &m.policy {
                    PolicyConfig::Direct => SettlementPolicy::Direct,
                    PolicyConfig::Batched { max_rows, max_wait_ms } => {
                        if *max_rows == 0 {
                            return Err(Error::Config(format!("{}: must be at least 1", field("policy.max_rows"))));
                        }
                        SettlementPolicy::Batched { max_rows: *max_rows, max_wait_ms: *max_wait_ms }
                    }
                    PolicyConfig::Channel { claim_interval_secs, claim_threshold } => SettlementPolicy::Channel {
                        claim_interval_secs: *claim_interval_secs,
                        claim_threshold: decimal(&field("policy.claim_threshold"), claim_threshold)?,
                    },
                };
                Ok(MerchantUpdate {
                    id: m.id.clone(),
                    pay_to: m.pay_to.iter().map(|a| address(&field("pay_to"), a)).collect::<Result<_>>()?,
                    assets: m
                        .assets
                        .iter()
                        .map(|a| {
                            Ok(AcceptedAsset {
                                chain_id: network(&field("assets.network"), &a.network)?.chain_id(),
                                asset: address(&field("assets.asset"), &a.asset)?,
                            })
                        })
                        .collect::<Result<_>>()?,
                    policy,
                    api_key: match &m.api_key {
                        Some(key) => Some(key.clone()),
                        None => read_secret(&field("api_key"), m.api_key_env.as_deref(), m.api_key_file.as_deref())?,
                    },
                })
            })
            .collect()
    }
}

/// Reads a secret from the environment variable `env` or else `file`.
fn read_secret(field: &str, env: Option<&str>, file: Option<&Path>) -> Result<Option<String>> {
    if let Some(var) = env
        && let Ok(value) = std::env::var(var)
        && !value.trim().is_empty()
    {
        return Ok(Some(value.trim().to_owned()));
    }
    if let Some(path) = file {
        let value = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{field}: cannot read {}: {e}", path.display())))?;
        let value = value.trim().to_owned();
        if value.is_empty() {
            return Err(Error::Config(format!("{field}: {} is empty", path.display())));
        }
        return Ok(Some(value));
    }
    Ok(None)
}

fn address(field: &str, s: &str) -> Result<Address> {
    Address::from_str(s).map_err(|_| Error::Config(format!("{field}: {s:?} is not a 20-byte hex address")))
}

fn network(field: &str, s: &str) -> Result<Network> {
    Network::parse(s).ok_or_else(|| Error::Config(format!("{field}: {s:?} is not eip155:<chain id>")))
}

fn decimal(field: &str, s: &str) -> Result<U256> {
    parse_decimal_u256(s).ok_or_else(|| Error::Config(format!("{field}: {s:?} is not a decimal amount")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../x402d.example.toml");

    #[test]
    fn example_config_parses_and_resolves() {
        let config = Config::from_toml(EXAMPLE).unwrap();
        assert_ne!(config, Config::default(), "the example sets values");
        assert!(config.server.tls.is_none());
        assert_eq!(config.merchants.len(), 3);
        let updates = config.merchant_updates().unwrap();
        assert_eq!(updates[0].policy, SettlementPolicy::Direct);
        assert_eq!(updates[1].policy, SettlementPolicy::Batched { max_rows: 250, max_wait_ms: 2000 });
        assert!(matches!(updates[2].policy, SettlementPolicy::Channel { claim_interval_secs: 60, .. }));
        config.balances().unwrap();
        let pipeline = config.pipeline.to_pipeline();
        assert_eq!(pipeline.shards, config.pipeline.shards);
        let chain = config.chain.as_ref().expect("the example settles on a chain");
        assert_eq!(chain.confirmations, 1);
        assert_eq!((chain.balance_ttl_secs, chain.balance_poll_ms), (30, 1000));
        assert!(chain.signer_keys().is_err(), "no keys in this test's environment, and the error says so");
        assert_eq!((chain.stuck_after_secs, chain.max_bumps, chain.finality_depth), (30, 5, 64));
        assert_eq!(chain.channel_poll_ms, 500);
        assert_eq!(config.facilitator.settle_wait_ms, 30_000);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let err = Config::from_toml("[server]\ngrpc_adr = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.to_string().contains("grpc_adr"), "{err}");
        let config =
            Config::from_toml("[[merchants]]\nid = \"m\"\npay_to = [\"0x12\"]\npolicy = { strategy = \"direct\" }\n")
                .unwrap();
        let err = config.merchant_updates().unwrap_err();
        assert!(err.to_string().contains("merchants[0].pay_to"), "{err}");
        let config = Config::from_toml("[balances]\ndefault = \"lots\"\n").unwrap();
        assert!(config.balances().unwrap_err().to_string().contains("balances.default"));
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.key");
        std::fs::write(&path, "file-admin-key-0123456789\n").unwrap();
        let config = Config {
            auth: AuthConfig {
                admin_key: None,
                admin_key_env: Some("X402D_TEST_UNSET_VARIABLE".into()),
                admin_key_file: Some(path),
            },
            ..Config::default()
        };
        assert_eq!(config.admin_key().unwrap().as_deref(), Some("file-admin-key-0123456789"));
    }
}
