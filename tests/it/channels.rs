//! `batch-settlement` channels on a real anvil chain: payers deposit into
//! the channel contract, stream cumulative vouchers through x402d, and the
//! engine claims them with the receiver authorizer's key, many channels per
//! transaction, then settles the receiver.

use std::time::Duration;

use alloy::{
    network::EthereumWallet,
    primitives::{Address, B256, U256, address},
    providers::{DynProvider, Provider, ProviderBuilder, ext::AnvilApi},
    signers::local::PrivateKeySigner,
};
use tokio_stream::wrappers::ReceiverStream;
use x402_chain::contracts::{
    BATCH_SETTLEMENT_ADDRESS, ERC3009_DEPOSIT_COLLECTOR_ADDRESS, X402BatchSettlement, X402TestToken,
};
use x402_channel::{ChannelConfig, ChannelDomain};
use x402_engine::{
    channels::{ChannelExtra, VoucherPayload},
    config::{ChainConfig, PolicyConfig},
    domain::{PaymentInput, Requirements, Submission},
    grpc::submit_request,
    node::Node,
};
use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet as devnet;
use x402_devnet::Anvil;
use x402_devnet::Payer;
use x402_load::{self as load, LoadConfig, Work};

pub(crate) const MC_KEY: &str = "test-merchant-channel-key-1";
pub(crate) const RECEIVER: Address = address!("0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65");
pub(crate) const WITHDRAW_DELAY: u64 = 900;
/// What each payer holds of the test token at the start.
pub(crate) const MINTED: u64 = 10u64.pow(12);
/// What one request costs (the voucher's step).
pub(crate) const PRICE: u128 = 10;

/// A chain with funded payers and the keys x402d settles channels with.
pub(crate) struct Setup {
    pub(crate) anvil: Anvil,
    pub(crate) payers: Vec<Payer>,
    /// Settles (sends the claims).
    pub(crate) signer: PrivateKeySigner,
    /// Signs the claims.
    pub(crate) authorizer: PrivateKeySigner,
    /// Anvil's account 0, for the test's own transactions.
    pub(crate) wallet: DynProvider,
}

/// An in-process x402d node settling channels.
pub(crate) struct Engine {
    _dir: tempfile::TempDir,
    pub(crate) node: Node,
}

impl Setup {
    pub(crate) async fn new(payers: usize) -> Self {
        let anvil = Anvil::spawn(&[]).unwrap();
        let payers: Vec<Payer> = (0..payers).map(|_| Payer::random()).collect();
        let addresses: Vec<Address> = payers.iter().map(Payer::address).collect();
        devnet::deploy(anvil.endpoint(), &addresses, U256::from(MINTED)).await.unwrap();
        let signer = PrivateKeySigner::random();
        devnet::fund_ether(anvil.endpoint(), &[signer.address()]).await.unwrap();
        let deployer: PrivateKeySigner = devnet::DEV_DEPLOYER_KEY.parse().unwrap();
        let wallet = ProviderBuilder::new()
            .wallet(EthereumWallet::from(deployer))
            .connect_http(anvil.endpoint().parse().unwrap())
            .erased();
        Self { anvil, payers, signer, authorizer: PrivateKeySigner::random(), wallet }
    }

    /// The merchant `mc` paid through channels, claiming every
    /// `claim_interval_secs`.
    pub(crate) fn merchant(claim_interval_secs: u64) -> PolicyConfig {
        PolicyConfig::Channel { claim_interval_secs, claim_threshold: u128::MAX.to_string() }
    }

    /// Starts an in-process node on this chain.
    async fn engine(&self, claim_interval_secs: u64) -> Engine {
        self.engine_with(Self::merchant(claim_interval_secs)).await
    }

    /// [`Setup::engine`], with the facilitator's per-merchant channel
    /// transaction limit set to `burst`, refilled `per_minute`.
    async fn engine_limited(&self, claim_interval_secs: u64, burst: u32, per_minute: u32) -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let mut config = self.node_config(dir.path(), Self::merchant(claim_interval_secs), |_| {});
        config.facilitator.channel_tx_burst = burst;
        config.facilitator.channel_tx_per_minute = per_minute;
        Engine { node: start_node(&config).await, _dir: dir }
    }

    /// Starts an in-process node whose merchant `mc` has `policy`.
    pub(crate) async fn engine_with(&self, policy: PolicyConfig) -> Engine {
        self.engine_configured(policy, |_| {}).await
    }

    /// [`Setup::engine_with`], with its `[chain]` changed by `configure`.
    pub(crate) async fn engine_configured(
        &self,
        policy: PolicyConfig,
        configure: impl FnOnce(&mut ChainConfig),
    ) -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let config = self.node_config(dir.path(), policy, configure);
        Engine { node: start_node(&config).await, _dir: dir }
    }

    /// The test config with `mc` on `policy` and this chain's `[chain]`,
    /// changed by `configure`.
    pub(crate) fn node_config(
        &self,
        dir: &std::path::Path,
        policy: PolicyConfig,
        configure: impl FnOnce(&mut ChainConfig),
    ) -> x402_engine::config::Config {
        let mut config = config_value(dir);
        config.merchants.push(merchant_config("mc", RECEIVER, MC_KEY, policy));
        let mut chain = ChainConfig::with_keys(
            self.anvil.endpoint(),
            vec![self.signer.to_bytes().to_string()],
            Some(self.authorizer.to_bytes().to_string()),
        );
        chain.receipt_poll_ms = 50;
        chain.channel_poll_ms = 200;
        configure(&mut chain);
        config.chain = Some(chain);
        config
    }

    pub(crate) fn config(&self, payer: &Payer) -> ChannelConfig {
        self.salted_config(payer, B256::ZERO)
    }

    /// `payer`'s channel to merchant `mc` with `salt` (one of many).
    pub(crate) fn salted_config(&self, payer: &Payer, salt: B256) -> ChannelConfig {
        payer.channel_config(RECEIVER, self.authorizer.address(), TOKEN, WITHDRAW_DELAY, salt)
    }

    pub(crate) fn domain() -> ChannelDomain {
        ChannelDomain::new(31337, BATCH_SETTLEMENT_ADDRESS)
    }

    /// `payer` deposits `amount` into its channel through the ERC-3009
    /// collector (the test relays the transaction).
    pub(crate) async fn deposit(&self, payer: &Payer, amount: u128) {
        self.deposit_into(payer, self.config(payer), amount).await;
    }

    /// [`Setup::deposit`] into the channel of `config`.
    pub(crate) async fn deposit_into(&self, payer: &Payer, config: ChannelConfig, amount: u128) {
        let id = Self::domain().channel_id(&config);
        let deposit = payer.sign_deposit(
            &requirements(RECEIVER),
            ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
            id,
            amount,
            now() + 3600,
            U256::from(1),
        );
        let receipt = X402BatchSettlement::new(BATCH_SETTLEMENT_ADDRESS, &self.wallet)
            .deposit(
                config.into(),
                amount,
                ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
                x402_chain::channel::deposit_collector_data(
                    U256::from(deposit.valid_after),
                    U256::from(deposit.valid_before),
                    deposit.salt,
                    &deposit.signature,
                ),
            )
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
        assert!(receipt.status(), "deposit reverted");
    }

    pub(crate) async fn receiver_balance(&self) -> U256 {
        self.token_balance(RECEIVER).await
    }

    /// `owner`'s balance of the test token.
    pub(crate) async fn token_balance(&self, owner: Address) -> U256 {
        X402TestToken::new(TOKEN, &self.wallet).balanceOf(owner).call().await.unwrap()
    }

    pub(crate) async fn onchain(&self, payer: &Payer) -> (u128, u128) {
        self.onchain_of(&self.config(payer)).await
    }

    /// The balance and claimed total of the channel of `config`.
    pub(crate) async fn onchain_of(&self, config: &ChannelConfig) -> (u128, u128) {
        let id = Self::domain().channel_id(config);
        let state = X402BatchSettlement::new(BATCH_SETTLEMENT_ADDRESS, &self.wallet).channels(id).call().await.unwrap();
        (state.balance, state.totalClaimed)
    }

    /// Transactions the engine's settlement key has sent.
    async fn sent(&self) -> u64 {
        self.wallet.get_transaction_count(self.signer.address()).await.unwrap()
    }
}

/// The requirements of a channel-paid request of `PRICE`.
fn channel_requirements() -> Requirements {
    Requirements { scheme: "batch-settlement".into(), amount: U256::from(PRICE), ..requirements(RECEIVER) }
}

/// A voucher for the request after `charged`, with the actual `charge`.
pub(crate) fn voucher(
    request_id: u64,
    payer: &Payer,
    config: &ChannelConfig,
    charged: u128,
    charge: u128,
) -> pb::SubmitRequest {
    let mut req = priced_voucher(request_id, payer, config, charged, PRICE);
    let Some(pb::submit_request::Payment::Voucher(v)) = req.payment.as_mut() else { unreachable!() };
    v.charge = charge.to_string();
    req
}

/// A voucher for a request priced `price` after `charged`, charged in full.
pub(crate) fn priced_voucher(
    request_id: u64,
    payer: &Payer,
    config: &ChannelConfig,
    charged: u128,
    price: u128,
) -> pb::SubmitRequest {
    priced_voucher_on(31337, request_id, payer, config, charged, price)
}

/// [`priced_voucher`] for a channel on chain `chain_id`.
pub(crate) fn priced_voucher_on(
    chain_id: u64,
    request_id: u64,
    payer: &Payer,
    config: &ChannelConfig,
    charged: u128,
    price: u128,
) -> pb::SubmitRequest {
    let domain = ChannelDomain::new(chain_id, BATCH_SETTLEMENT_ADDRESS);
    let id = domain.channel_id(config);
    let max = charged + price;
    let network = format!("eip155:{chain_id}");
    let payload = VoucherPayload {
        network: network.clone(),
        config: config.clone(),
        channel_id: id,
        max_claimable: max,
        signature: payer.sign_voucher(&domain, id, max),
        charge: None,
        extra: ChannelExtra { receiver_authorizer: config.receiverAuthorizer, withdraw_delay: WITHDRAW_DELAY },
        deposit: None,
        refund: None,
    };
    submit_request(
        request_id,
        &Submission::new(
            Requirements { amount: U256::from(price), network, ..channel_requirements() },
            PaymentInput::Voucher(Box::new(payload)),
        ),
    )
}

/// The payer's request for its money back: a zero-charge voucher of what it
/// was `charged`, refunding the rest.
pub(crate) fn refund_voucher(
    request_id: u64,
    payer: &Payer,
    config: &ChannelConfig,
    charged: u128,
) -> pb::SubmitRequest {
    let mut refund = priced_voucher(request_id, payer, config, charged, 0);
    let Some(pb::submit_request::Payment::Voucher(v)) = refund.payment.as_mut() else { unreachable!() };
    v.refund = Some(pb::ChannelRefund { amount: String::new() });
    refund
}

/// The requirements of a channel-paid request as the reference server
/// writes them, with `extra`.
pub(crate) fn requirements_json(config: &ChannelConfig, amount: u128) -> serde_json::Value {
    requirements_json_on(31337, config, amount)
}

/// [`requirements_json`] on chain `chain_id`.
pub(crate) fn requirements_json_on(chain_id: u64, config: &ChannelConfig, amount: u128) -> serde_json::Value {
    serde_json::json!({
        "scheme": "batch-settlement", "network": format!("eip155:{chain_id}"), "asset": TOKEN.to_string(), "payTo": RECEIVER.to_string(),
        "amount": amount.to_string(), "maxTimeoutSeconds": 60,
        "extra": { "receiverAuthorizer": config.receiverAuthorizer.to_string(), "withdrawDelay": WITHDRAW_DELAY,
                   "name": "USD Coin", "version": "2" },
    })
}

/// A channel config as the reference client writes it.
pub(crate) fn config_json(config: &ChannelConfig) -> serde_json::Value {
    serde_json::json!({
        "payer": config.payer.to_string(), "payerAuthorizer": config.payerAuthorizer.to_string(),
        "receiver": config.receiver.to_string(), "receiverAuthorizer": config.receiverAuthorizer.to_string(),
        "token": config.token.to_string(), "withdrawDelay": WITHDRAW_DELAY, "salt": config.salt.to_string(),
    })
}

/// A `voucher` (or, with `deposit`, a `deposit`) `PaymentPayload` for `max`.
pub(crate) fn payload_json(
    payer: &Payer,
    config: &ChannelConfig,
    max: u128,
    deposit: Option<u128>,
) -> serde_json::Value {
    payload_json_on(31337, payer, config, max, deposit)
}

/// [`payload_json`] for a channel on chain `chain_id`.
pub(crate) fn payload_json_on(
    chain_id: u64,
    payer: &Payer,
    config: &ChannelConfig,
    max: u128,
    deposit: Option<u128>,
) -> serde_json::Value {
    let domain = ChannelDomain::new(chain_id, BATCH_SETTLEMENT_ADDRESS);
    let id = domain.channel_id(config);
    let voucher = serde_json::json!({
        "channelId": id.to_string(),
        "maxClaimableAmount": max.to_string(),
        "signature": payer.sign_voucher(&domain, id, max).to_string(),
    });
    let mut payload =
        serde_json::json!({ "type": "voucher", "channelConfig": config_json(config), "voucher": voucher });
    if let Some(amount) = deposit {
        let d = payer.sign_deposit(
            &Requirements { network: format!("eip155:{chain_id}"), ..requirements(RECEIVER) },
            ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
            id,
            amount,
            now() + 600,
            U256::from(9),
        );
        payload["type"] = "deposit".into();
        payload["deposit"] = serde_json::json!({
            "amount": amount.to_string(),
            "authorization": { "erc3009Authorization": {
                "validAfter": d.valid_after.to_string(), "validBefore": d.valid_before.to_string(),
                "salt": format!("0x{:064x}", d.salt), "signature": d.signature.to_string(),
            }},
        });
    }
    serde_json::json!({ "x402Version": 2, "accepted": requirements_json_on(chain_id, config, PRICE), "payload": payload })
}

/// A voucher as the reference client sends it: the raw `PAYMENT-SIGNATURE`
/// header, passed through by the gateway with its own requirements.
fn header_voucher(request_id: u64, payer: &Payer, config: &ChannelConfig, charged: u128) -> pb::SubmitRequest {
    use base64::Engine as _;
    let json = payload_json(payer, config, charged + PRICE, None);
    let header = base64::engine::general_purpose::STANDARD.encode(json.to_string());
    let mut req = header_submit(request_id, &channel_requirements(), header);
    let r = req.requirements.as_mut().unwrap();
    r.receiver_authorizer = config.receiverAuthorizer.to_vec();
    r.withdraw_delay = WITHDRAW_DELAY;
    req
}

/// The first request of a channel, with the deposit that funds it.
pub(crate) fn deposit_voucher(
    request_id: u64,
    payer: &Payer,
    config: &ChannelConfig,
    deposit: u128,
) -> pb::SubmitRequest {
    priced_deposit_voucher(request_id, payer, config, PRICE, deposit)
}

/// [`deposit_voucher`] with a voucher of `max` for a request of [`PRICE`].
fn priced_deposit_voucher(
    request_id: u64,
    payer: &Payer,
    config: &ChannelConfig,
    max: u128,
    deposit: u128,
) -> pb::SubmitRequest {
    deposit_voucher_on(31337, request_id, payer, config, max, deposit)
}

/// [`priced_deposit_voucher`] for a channel on chain `chain_id`.
pub(crate) fn deposit_voucher_on(
    chain_id: u64,
    request_id: u64,
    payer: &Payer,
    config: &ChannelConfig,
    max: u128,
    deposit: u128,
) -> pb::SubmitRequest {
    let mut req = priced_voucher_on(chain_id, request_id, payer, config, max - PRICE, PRICE);
    let id = ChannelDomain::new(chain_id, BATCH_SETTLEMENT_ADDRESS).channel_id(config);
    let d = payer.sign_deposit(
        &Requirements { network: format!("eip155:{chain_id}"), ..requirements(RECEIVER) },
        ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        id,
        deposit,
        now() + 600,
        U256::from(7),
    );
    let Some(pb::submit_request::Payment::Voucher(v)) = req.payment.as_mut() else { unreachable!() };
    v.deposit = Some(pb::ChannelDeposit {
        amount: d.amount.to_string(),
        valid_after: d.valid_after,
        valid_before: d.valid_before,
        salt: d.salt.to_string(),
        signature: d.signature.to_vec(),
    });
    req
}

/// Sends each wave over one `SubmitStream` and waits for all its answers
/// before the next, as clients do: a channel's next voucher follows the
/// answer to its last.
async fn stream_waves(client: &mut Payments, waves: Vec<Vec<pb::SubmitRequest>>) -> Vec<pb::SubmitResponse> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut inbound = client.submit_stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut out = Vec::new();
    for wave in waves {
        let n = wave.len();
        for req in wave {
            tx.send(req).await.unwrap();
        }
        for _ in 0..n {
            out.push(inbound.message().await.unwrap().expect("an answer per voucher"));
        }
    }
    out
}

/// An `x402d serve` configuration under `dir` whose merchant `mc` is paid
/// through channels claimed hourly (or sooner by the admin API), settling
/// by `chain`.
pub(crate) fn channel_daemon_config(dir: &std::path::Path, chain: &ChainSection) -> String {
    format!(
        r#"{}
[[merchants]]
id = "mc"
pay_to = ["{RECEIVER}"]
policy = {{ strategy = "channel", claim_interval_secs = 3600, claim_threshold = "{}" }}
api_key_env = "X402D_TEST_MC_KEY"
{}"#,
        config(dir),
        u128::MAX,
        chain.toml
    )
}

/// Sets merchant `mc`'s claim interval through the admin API.
pub(crate) async fn set_claim_interval(grpc: std::net::SocketAddr, claim_interval_secs: u64) {
    let mut admin = admin(grpc, ADMIN_KEY).await;
    let mut merchant = admin.get_merchant(pb::GetMerchantRequest { id: "mc".into() }).await.unwrap().into_inner();
    merchant.policy = Some(pb::SettlementPolicy {
        strategy: Some(pb::settlement_policy::Strategy::Channel(pb::ChannelPolicy {
            claim_interval_secs,
            claim_threshold: u128::MAX.to_string(),
        })),
    });
    admin
        .upsert_merchant(pb::UpsertMerchantRequest { merchant: Some(merchant), api_key: String::new() })
        .await
        .unwrap();
}

/// Waits up to `secs` for `done`.
pub(crate) async fn eventually<F: Future<Output = bool>>(secs: u64, what: &str, mut done: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The charge of a channel's `n`th request: most cost the price, every
/// third costs less (the gateway commits the actual charge).
const fn charge_of(n: usize) -> u128 {
    if n.is_multiple_of(3) { PRICE - 3 } else { PRICE }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_channels_of_a_thousand_vouchers_are_claimed_in_one_transaction() {
    const CHANNELS: usize = 100;
    const VOUCHERS: usize = 1_000;
    // Claims only once every channel has all its vouchers: the interval
    // is lowered afterwards.
    let s = Setup::new(CHANNELS).await;
    let e = s.engine(3600).await;
    for payer in &s.payers {
        s.deposit(payer, PRICE * VOUCHERS as u128).await;
    }

    // Every voucher signed before streaming, on both cores.
    let configs: Vec<ChannelConfig> = s.payers.iter().map(|p| s.config(p)).collect();
    let per_channel: Vec<Vec<pb::SubmitRequest>> = std::thread::scope(|scope| {
        let handles: Vec<_> = s
            .payers
            .chunks(CHANNELS / 2)
            .zip(configs.chunks(CHANNELS / 2))
            .enumerate()
            .map(|(half, (payers, configs))| {
                scope.spawn(move || {
                    payers
                        .iter()
                        .zip(configs)
                        .enumerate()
                        .map(|(i, (payer, config))| {
                            let channel = half * CHANNELS / 2 + i;
                            let mut charged = 0;
                            (0..VOUCHERS)
                                .map(|n| {
                                    let id = (channel * VOUCHERS + n) as u64;
                                    let req = voucher(id, payer, config, charged, charge_of(n));
                                    charged += charge_of(n);
                                    req
                                })
                                .collect::<Vec<_>>()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut per_channel: Vec<_> = per_channel.into_iter().map(Vec::into_iter).collect();
    let waves: Vec<Vec<pb::SubmitRequest>> =
        (0..VOUCHERS).map(|_| per_channel.iter_mut().map(|c| c.next().unwrap()).collect()).collect();

    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;
    let answers = stream_waves(&mut client, waves).await;
    assert_eq!(answers.len(), CHANNELS * VOUCHERS);
    for a in &answers {
        assert_eq!(outcome(a), pb::Outcome::Accepted, "{} {}", a.reason, a.message);
    }
    let per_channel_charge: u128 = (0..VOUCHERS).map(charge_of).sum();
    let last = answers.iter().max_by_key(|a| a.request_id).unwrap();
    assert_eq!(last.channel.as_ref().unwrap().charged_cumulative_amount, per_channel_charge.to_string());
    assert_eq!(s.sent().await, 0, "nothing claimed yet");

    // Lower the claim interval: the next round finds all 100 channels due.
    set_claim_interval(e.node.endpoints().grpc, 1).await;

    let total = per_channel_charge * CHANNELS as u128;
    eventually(60, "the receiver to be paid", || async { s.receiver_balance().await == U256::from(total) }).await;
    assert_eq!(s.sent().await, 1, "one claim-and-settle transaction for the round");
    for payer in &s.payers {
        assert_eq!(s.onchain(payer).await, (PRICE * VOUCHERS as u128, per_channel_charge));
    }

    // The gas of that transaction, per paid request.
    let block = s.wallet.get_block_number().await.unwrap();
    let mut gas = 0;
    for n in 0..=block {
        let receipts = s.wallet.get_block_receipts(n.into()).await.unwrap().unwrap_or_default();
        gas += receipts.iter().filter(|r| r.from == s.signer.address()).map(|r| r.gas_used).sum::<u64>();
    }
    let requests = (CHANNELS * VOUCHERS) as f64;
    eprintln!(
        "channel claim: {gas} gas for {CHANNELS} channels x {VOUCHERS} vouchers = {:.3} gas per paid request, {} per channel",
        gas as f64 / requests,
        gas / CHANNELS as u64
    );
    assert!(gas as f64 / requests < 100.0, "a claim row costs far less than a transfer per request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_is_met_by_a_prompt_claim_and_the_drained_channel_refuses_vouchers() {
    let s = Setup::new(1).await;
    let e = s.engine(3600).await;
    let payer = &s.payers[0];
    let config = s.config(payer);
    s.deposit(payer, 1_000).await;
    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;
    let mut charged = 0;
    for n in 0..10 {
        let answer = client.submit(voucher(n, payer, &config, charged, PRICE)).await.unwrap().into_inner();
        assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
        charged += PRICE;
    }
    assert_eq!(s.onchain(payer).await, (1_000, 0));

    // The payer starts its timed exit: the engine claims well before the
    // delay ends (anvil's clock does not move here).
    let payer_wallet = ProviderBuilder::new()
        .wallet(EthereumWallet::from(payer.signer().clone()))
        .connect_http(s.anvil.endpoint().parse().unwrap());
    s.wallet.anvil_set_balance(payer.address(), U256::from(10u128.pow(18))).await.unwrap();
    let channels = X402BatchSettlement::new(BATCH_SETTLEMENT_ADDRESS, &payer_wallet);
    let initiated = channels.initiateWithdraw(config.clone().into(), 1_000).send().await.unwrap().get_receipt().await;
    assert!(initiated.unwrap().status());
    let started = now();
    eventually(30, "the claim after the withdrawal request", || async { s.onchain(payer).await.1 == charged }).await;
    assert!(now() < started + WITHDRAW_DELAY, "claimed before the delay ends");
    assert_eq!(s.receiver_balance().await, U256::from(charged));

    // Before the delay, finalizing fails; after it, the payer takes the rest.
    assert!(channels.finalizeWithdraw(config.clone().into()).call().await.is_err());
    s.wallet.anvil_increase_time(WITHDRAW_DELAY + 1).await.unwrap();
    s.wallet.evm_mine(None).await.unwrap();
    let finalized = channels.finalizeWithdraw(config.clone().into()).send().await.unwrap().get_receipt().await;
    assert!(finalized.unwrap().status());
    assert_eq!(s.onchain(payer).await, (charged, charged), "drained: balance is what was claimed");

    // The engine follows the contract's events: once it mirrors the
    // finalization, the next voucher has nothing to draw on.
    let id = Setup::domain().channel_id(&config).to_vec();
    eventually(30, "the engine to mirror the drained channel", || {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            let state = client.get_channel(pb::GetChannelRequest { channel_id: id }).await.unwrap().into_inner();
            state.balance == charged.to_string() && state.withdraw_finalize_after == 0
        }
    })
    .await;
    let answer = client.submit(voucher(100, payer, &config, charged, PRICE)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a drained channel accepted a voucher");
    assert_eq!(answer.reason, "invalid_batch_settlement_evm_cumulative_exceeds_balance", "{}", answer.message);
    assert_eq!(answer.channel.unwrap().balance, charged.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voucher_off_the_charged_total_is_refused_with_the_channel_state() {
    let s = Setup::new(1).await;
    let e = s.engine(3600).await;
    let payer = &s.payers[0];
    let config = s.config(payer);
    s.deposit(payer, 100).await;
    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;

    let first = client.submit(voucher(1, payer, &config, 0, 4)).await.unwrap().into_inner();
    assert_eq!(outcome(&first), pb::Outcome::Accepted, "{}", first.message);
    let state = first.channel.unwrap();
    assert_eq!((state.charged_cumulative_amount.as_str(), state.balance.as_str()), ("4", "100"));

    // The client thinks it was charged the full price: its next voucher is
    // off by 6, and the answer tells it where the channel stands.
    let stale = client.submit(voucher(2, payer, &config, PRICE, PRICE)).await.unwrap().into_inner();
    assert_eq!(outcome(&stale), pb::Outcome::Rejected);
    assert_eq!(stale.reason, "invalid_batch_settlement_evm_cumulative_amount_mismatch");
    assert_eq!(stale.channel.unwrap().charged_cumulative_amount, "4");
    let resynced = client.submit(voucher(3, payer, &config, 4, PRICE)).await.unwrap().into_inner();
    assert_eq!(outcome(&resynced), pb::Outcome::Accepted, "{}", resynced.message);
    // The same rules for a voucher passed through as the raw header.
    let raw = client.submit(header_voucher(30, payer, &config, 14)).await.unwrap().into_inner();
    assert_eq!(outcome(&raw), pb::Outcome::Accepted, "{}", raw.message);
    assert_eq!(raw.channel.unwrap().charged_cumulative_amount, "24");
    let raw = client.submit(header_voucher(31, payer, &config, 14)).await.unwrap().into_inner();
    assert_eq!(raw.reason, "invalid_batch_settlement_evm_cumulative_amount_mismatch");

    // Beyond the deposit: a request priced 100 on top of 14 charged.
    let answer = client.submit(priced_voucher(5, payer, &config, 24, 100)).await.unwrap().into_inner();
    assert_eq!(answer.reason, "invalid_batch_settlement_evm_cumulative_exceeds_balance", "{}", answer.message);
    assert_eq!(answer.channel.unwrap().balance, "100");

    // A voucher signed by someone else.
    let thief = Payer::random();
    let forged = client.submit(voucher(6, &thief, &config, 24, PRICE)).await.unwrap().into_inner();
    assert_eq!(forged.reason, "invalid_batch_settlement_evm_voucher_signature");
    // A channel paying someone else.
    let mut elsewhere = config.clone();
    elsewhere.receiver = PAY_TO;
    let wrong = client.submit(voucher(7, payer, &elsewhere, 0, PRICE)).await.unwrap().into_inner();
    assert_eq!(wrong.reason, "invalid_batch_settlement_evm_receiver_mismatch");
    // A channel nobody funded.
    let stranger = Payer::random();
    let unfunded = client.submit(voucher(8, &stranger, &s.config(&stranger), 0, PRICE)).await.unwrap().into_inner();
    assert_eq!(unfunded.reason, "invalid_batch_settlement_evm_channel_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_interrupted_by_sigkill_is_finished_after_restart_and_nothing_is_claimed_twice() {
    const CHANNELS: usize = 5;
    const VOUCHERS: usize = 20;
    let s = Setup::new(CHANNELS).await;
    for payer in &s.payers {
        s.deposit(payer, 10_000).await;
    }
    let configs: Vec<ChannelConfig> = s.payers.iter().map(|p| s.config(p)).collect();

    let dir = tempfile::tempdir().unwrap();
    let chain = ChainSection::new(s.anvil.endpoint(), &s.signer, Some(&s.authorizer), "channel_poll_ms = 200\n");
    let config = channel_daemon_config(dir.path(), &chain);
    let env = chain.env(&[("X402D_TEST_MC_KEY", MC_KEY)]);

    // Blocks only when the test mines them: the claim waits in the pool.
    s.wallet.anvil_set_auto_mine(false).await.unwrap();
    let mut daemon = Daemon::start_with_env(dir.path(), &config, &env);
    let mut client = payments(daemon.grpc, MC_KEY).await;
    let waves = (0..VOUCHERS)
        .map(|n| {
            (0..CHANNELS)
                .map(|c| {
                    let charged = PRICE * n as u128;
                    voucher((c * VOUCHERS + n) as u64, &s.payers[c], &configs[c], charged, PRICE)
                })
                .collect()
        })
        .collect();
    for answer in stream_waves(&mut client, waves).await {
        assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
    }
    let charged = PRICE * VOUCHERS as u128;
    // Every voucher is in: the claims fall due (a claim interval running
    // from the first voucher would fall due at the next whole second,
    // possibly before the last wave).
    set_claim_interval(daemon.grpc, 1).await;

    // The claim is signed, recorded and broadcast: x402d dies before its receipt.
    let pending = || async { s.wallet.get_transaction_count(s.signer.address()).pending().await.unwrap() > 0 };
    eventually(30, "the claim transaction in the pool", pending).await;
    daemon.kill();
    s.wallet.evm_mine(None).await.unwrap();
    s.wallet.anvil_set_auto_mine(true).await.unwrap();
    assert_eq!(s.sent().await, 1);
    assert_eq!(s.receiver_balance().await, U256::from(charged * CHANNELS as u128), "claimed and settled");

    // After a restart the engine learns the claim went through: nothing is
    // claimed again, and every channel's charged total survived. Its claim
    // rounds are 2 s apart now, so that the next vouchers (sent at once)
    // all fall into one round: under CPU load, a round between two of them
    // would make two claims of new vouchers, both legitimate.
    let config = config
        .replace("channel_poll_ms = 200", "channel_poll_ms = 2000")
        .replace("claim_interval_secs = 3600", "claim_interval_secs = 1");
    let daemon = Daemon::start_with_env(dir.path(), &config, &env);
    let mut client = payments(daemon.grpc, MC_KEY).await;
    let next = s.payers.iter().enumerate().map(|(c, p)| voucher(1_000 + c as u64, p, &configs[c], charged, PRICE));
    for answer in stream_waves(&mut client, vec![next.collect()]).await {
        assert_eq!(outcome(&answer), pb::Outcome::Accepted, "charged total lost: {}", answer.message);
        assert_eq!(answer.channel.unwrap().charged_cumulative_amount, (charged + PRICE).to_string());
    }
    // The next round claims only the new vouchers, once.
    let total = (charged + PRICE) * CHANNELS as u128;
    eventually(30, "the second claim", || async { s.receiver_balance().await == U256::from(total) }).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.sent().await, 2, "one claim per round, none repeated");
    for payer in &s.payers {
        assert_eq!(s.onchain(payer).await, (10_000, charged + PRICE));
    }
    // And the engine's mirror shows it.
    let channels = client.list_channels(pb::ListChannelsRequest {}).await.unwrap().into_inner().channels;
    assert_eq!(channels.len(), CHANNELS);
    for c in channels {
        assert_eq!(c.total_claimed, (charged + PRICE).to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposit_with_the_first_voucher_goes_on_chain_before_the_voucher_counts() {
    let s = Setup::new(2).await;
    let e = s.engine(3600).await;
    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;
    let (payer, config) = (&s.payers[0], s.config(&s.payers[0]));

    let first = client.submit(deposit_voucher(1, payer, &config, 500)).await.unwrap().into_inner();
    assert_eq!(outcome(&first), pb::Outcome::Accepted, "{}", first.message);
    let state = first.channel.unwrap();
    assert_eq!((state.balance.as_str(), state.charged_cumulative_amount.as_str()), ("500", "10"));
    assert_eq!(s.onchain(payer).await, (500, 0));
    assert_eq!(s.sent().await, 1, "the deposit transaction");

    // The same request again: the deposit is not made twice, and the
    // voucher it carries is already counted.
    let again = client.submit(deposit_voucher(2, payer, &config, 500)).await.unwrap().into_inner();
    assert_eq!(again.reason, "invalid_batch_settlement_evm_cumulative_amount_mismatch", "{}", again.message);
    assert_eq!(s.onchain(payer).await, (500, 0));
    assert_eq!(s.sent().await, 1);
    let next = client.submit(voucher(3, payer, &config, PRICE, PRICE)).await.unwrap().into_inner();
    assert_eq!(outcome(&next), pb::Outcome::Accepted, "{}", next.message);

    // A deposit authorization signed by another key never reaches the chain.
    let (other, other_config) = (&s.payers[1], s.config(&s.payers[1]));
    let mut forged = deposit_voucher(4, other, &other_config, 500);
    let Some(pb::submit_request::Payment::Voucher(v)) = forged.payment.as_mut() else { unreachable!() };
    let thief = Payer::random().sign_deposit(
        &requirements(RECEIVER),
        ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        Setup::domain().channel_id(&other_config),
        500,
        now() + 600,
        U256::from(7),
    );
    v.deposit.as_mut().unwrap().signature = thief.signature.to_vec();
    let answer = client.submit(forged).await.unwrap().into_inner();
    assert_eq!(answer.reason, "invalid_batch_settlement_evm_deposit_signature", "{}", answer.message);
    // More than the payer holds: the simulation refuses it, nothing is sent.
    let answer = client.submit(deposit_voucher(5, other, &other_config, 10u128.pow(13))).await.unwrap().into_inner();
    assert_eq!(answer.reason, "invalid_batch_settlement_evm_deposit_transaction_failed", "{}", answer.message);
    assert_eq!(s.sent().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_request_claims_the_charges_and_returns_the_rest_and_claim_now_claims() {
    let s = Setup::new(2).await;
    let e = s.engine(3600).await;
    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;
    let mut events =
        client.watch_settlements(pb::WatchSettlementsRequest { after_sequence: 0 }).await.unwrap().into_inner();
    let (payer, config) = (&s.payers[0], s.config(&s.payers[0]));
    s.deposit(payer, 1_000).await;
    for n in 0..3 {
        let answer = client.submit(voucher(n, payer, &config, PRICE * u128::from(n as u8), PRICE)).await.unwrap();
        assert_eq!(outcome(answer.get_ref()), pb::Outcome::Accepted);
    }
    let token = X402TestToken::new(TOKEN, &s.wallet);
    let before = token.balanceOf(payer.address()).call().await.unwrap();

    // The payer asks for its money back: a voucher of what it was charged.
    let answer = client.submit(refund_voucher(10, payer, &config, 3 * PRICE)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
    eventually(30, "the refund", || async { s.onchain(payer).await == (3 * PRICE, 3 * PRICE) }).await;
    assert_eq!(s.receiver_balance().await, U256::from(3 * PRICE), "the charges were claimed and settled first");
    assert_eq!(token.balanceOf(payer.address()).call().await.unwrap(), before + U256::from(1_000 - 3 * PRICE));

    // The claim and refund is announced to the merchant.
    let id = Setup::domain().channel_id(&config);
    let event = loop {
        let event = events.message().await.unwrap().unwrap();
        if event.channel.is_some() {
            break event;
        }
    };
    assert_eq!(event.payment_id, id.to_vec());
    let status = event.status.unwrap();
    assert_eq!(pb::PaymentState::try_from(status.state).unwrap(), pb::PaymentState::Confirmed);
    assert_eq!(status.transaction.len(), 32);
    let channel = event.channel.unwrap();
    assert_eq!((channel.total_claimed.as_str(), channel.balance.as_str()), ("30", "30"));

    // "Claim now" claims a channel whatever its policy says.
    let (other, other_config) = (&s.payers[1], s.config(&s.payers[1]));
    s.deposit(other, 100).await;
    let answer = client.submit(voucher(20, other, &other_config, 0, PRICE)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
    let other_id = Setup::domain().channel_id(&other_config).to_vec();
    client.claim_channel(pb::ClaimChannelRequest { channel_id: other_id.clone() }).await.unwrap();
    eventually(30, "the claim asked for", || async { s.onchain(other).await == (100, PRICE) }).await;
    let unknown = client.claim_channel(pb::ClaimChannelRequest { channel_id: vec![7; 32] }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    // Another merchant cannot touch it.
    let mut m1 = payments(e.node.endpoints().grpc, M1_KEY).await;
    let denied = m1.claim_channel(pb::ClaimChannelRequest { channel_id: other_id }).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_is_claimed_once_its_unclaimed_value_reaches_the_threshold() {
    let s = Setup::new(1).await;
    let e = s.engine_with(PolicyConfig::Channel { claim_interval_secs: 3600, claim_threshold: "50".into() }).await;
    let (payer, config) = (&s.payers[0], s.config(&s.payers[0]));
    s.deposit(payer, 1_000).await;
    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;
    for n in 0..4 {
        let answer = client.submit(voucher(n, payer, &config, PRICE * u128::from(n as u8), PRICE)).await.unwrap();
        assert_eq!(outcome(answer.get_ref()), pb::Outcome::Accepted);
    }
    // 40 unclaimed: below the threshold, nothing is claimed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!((s.onchain(payer).await, s.sent().await), ((1_000, 0), 0));
    // The voucher that crosses it carries the other `v` (as 0/1), which the
    // contract's `ecrecover` would refuse: (r, s) is the payer's signature
    // all the same, and the claim goes out with the `v` the chain needs.
    let mut crossing = voucher(4, payer, &config, 4 * PRICE, PRICE);
    let Some(pb::submit_request::Payment::Voucher(v)) = crossing.payment.as_mut() else { unreachable!() };
    let signature = v.voucher.as_mut().unwrap().signature.as_mut_slice();
    signature[64] = 28 - signature[64];
    let answer = client.submit(crossing).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
    eventually(30, "the claim at the threshold", || async { s.onchain(payer).await == (1_000, 5 * PRICE) }).await;
    assert_eq!(s.receiver_balance().await, U256::from(5 * PRICE));
}

/// The facilitator API as the reference `batch-settlement` server uses it:
/// the server keeps the charged totals, x402d checks the chain, puts
/// deposits on chain and sends the claims and settles the server asks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facilitator_api_verifies_against_the_chain_and_executes_deposits_claims_and_settles() {
    let s = Setup::new(1).await;
    let e = s.engine(3600).await;
    let (payer, config) = (&s.payers[0], s.config(&s.payers[0]));
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        let request = http.post(format!("http://{}{path}", e.node.endpoints().http)).bearer_auth(MC_KEY).json(&body);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<serde_json::Value>().await.unwrap()
        }
    };
    let body = |payload: serde_json::Value, amount: u128| serde_json::json!({ "x402Version": 2, "paymentPayload": payload, "paymentRequirements": requirements_json(&config, amount) });

    // The first request carries the deposit.
    let deposit = payload_json(payer, &config, PRICE, Some(500));
    let verified = post("/verify", body(deposit.clone(), PRICE)).await;
    assert_eq!(verified["isValid"], true, "{verified}");
    assert_eq!(verified["extra"]["balance"], "0", "nothing deposited yet");
    let settled = post("/settle", body(deposit, PRICE)).await;
    assert_eq!(settled["success"], true, "{settled}");
    assert_eq!(settled["transaction"].as_str().unwrap().len(), 66);
    assert_eq!(settled["extra"]["channelState"]["balance"], "500");
    assert_eq!(s.onchain(payer).await, (500, 0));

    // Vouchers are checked against the chain (the server checks its own
    // charged total).
    let voucher = post("/verify", body(payload_json(payer, &config, 3 * PRICE, None), PRICE)).await;
    assert_eq!((voucher["isValid"].clone(), voucher["extra"]["balance"].clone()), (true.into(), "500".into()));
    let greedy = post("/verify", body(payload_json(payer, &config, 600, None), PRICE)).await;
    assert_eq!(greedy["invalidReason"], "invalid_batch_settlement_evm_cumulative_exceeds_balance");
    let thief = post("/verify", body(payload_json(&Payer::random(), &config, 3 * PRICE, None), PRICE)).await;
    assert_eq!(thief["invalidReason"], "invalid_batch_settlement_evm_voucher_signature");

    // The server's claim, unsigned: x402d signs it with its authorizer key.
    let domain = Setup::domain();
    let id = domain.channel_id(&config);
    let claim = serde_json::json!({
        "x402Version": 2,
        "accepted": requirements_json(&config, 0),
        "payload": { "type": "claim", "claims": [{
            "voucher": { "channel": config_json(&config), "maxClaimableAmount": (3 * PRICE).to_string() },
            "signature": payer.sign_voucher(&domain, id, 3 * PRICE).to_string(),
            "totalClaimed": (3 * PRICE).to_string(),
        }]},
    });
    let claimed = post("/settle", body(claim, 0)).await;
    assert_eq!(claimed["success"], true, "{claimed}");
    assert_eq!(s.onchain(payer).await, (500, 3 * PRICE));
    assert_eq!(s.receiver_balance().await, U256::ZERO, "claimed, not yet settled");
    let settle = serde_json::json!({
        "x402Version": 2,
        "accepted": requirements_json(&config, 0),
        "payload": { "type": "settle", "receiver": RECEIVER.to_string(), "token": TOKEN.to_string() },
    });
    let paid = post("/settle", body(settle, 0)).await;
    assert_eq!(paid["success"], true, "{paid}");
    assert_eq!(s.receiver_balance().await, U256::from(3 * PRICE));
    let below = post("/verify", body(payload_json(payer, &config, 3 * PRICE, None), PRICE)).await;
    assert_eq!(below["invalidReason"], "invalid_batch_settlement_evm_cumulative_below_claimed");
}

/// `x402d load --scheme voucher`'s work: channels opened with a deposit
/// each through x402d, then their vouchers, one in flight per channel, each
/// after the answer to the one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_opens_channels_and_pays_each_in_order() {
    const OPENED: usize = 12;
    const VOUCHERS: usize = 50;
    let s = Setup::new(3).await;
    let e = s.engine(3600).await;
    let plan = load::ChannelPlan {
        domain: Setup::domain(),
        collector: ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        token: requirements(RECEIVER),
        receiver_authorizer: s.authorizer.address(),
        withdraw_delay: WITHDRAW_DELAY,
        price: PRICE,
        channels: OPENED,
        vouchers_per_channel: VOUCHERS,
    };
    let signed = load::vouchers(&s.payers, &plan);
    assert_eq!((signed.deposits.len(), signed.sequences.len()), (OPENED, OPENED));
    let config = LoadConfig {
        endpoint: format!("http://{}", e.node.endpoints().grpc),
        api_key: MC_KEY.into(),
        streams: 5,
        rate: None,
        watch_pid: None,
    };
    let opened = load::run(&config, Work::Open(signed.deposits), |_| {}).await.unwrap();
    assert_eq!(opened.accepted, OPENED as u64, "{opened:?}");
    let report = load::run(&config, Work::Sequences(signed.sequences), |_| {}).await.unwrap();
    assert_eq!((report.payments, report.accepted), (OPENED * VOUCHERS, (OPENED * VOUCHERS) as u64), "{report:?}");

    // Each channel was charged its every request, and its deposit covers
    // exactly that.
    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;
    let channels = client.list_channels(pb::ListChannelsRequest {}).await.unwrap().into_inner().channels;
    assert_eq!(channels.len(), OPENED);
    let paid = (PRICE * (VOUCHERS as u128 + 1)).to_string();
    for c in channels {
        assert_eq!((c.charged_cumulative_amount, c.balance), (paid.clone(), paid.clone()));
    }
}

/// Over HTTP a merchant acts only on channels paying one of its own
/// addresses, and not on channels x402d keeps for a gRPC gateway: another
/// tenant's refund, claim or settle moves nothing and costs x402d no gas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_cannot_move_another_merchants_channel_money_over_http() {
    let s = Setup::new(1).await;
    let e = s.engine(3600).await;
    let (payer, config) = (&s.payers[0], s.config(&s.payers[0]));
    s.deposit(payer, 100_000).await;
    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;
    for n in 0..5 {
        let answer = client.submit(voucher(n, payer, &config, PRICE * u128::from(n as u8), PRICE)).await.unwrap();
        assert_eq!(outcome(answer.get_ref()), pb::Outcome::Accepted);
    }
    let domain = Setup::domain();
    let id = domain.channel_id(&config);
    let http = reqwest::Client::new();
    let post = |key: &'static str, payload: serde_json::Value| {
        let body = serde_json::json!({
            "x402Version": 2,
            "paymentPayload": { "x402Version": 2, "accepted": requirements_json(&config, 0), "payload": payload },
            "paymentRequirements": requirements_json(&config, 0),
        });
        let request = http.post(format!("http://{}/settle", e.node.endpoints().http)).bearer_auth(key).json(&body);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let refund = serde_json::json!({
        "type": "refund", "channelConfig": config_json(&config), "amount": "100000", "refundNonce": "0",
    });
    let claim = serde_json::json!({ "type": "claim", "claims": [{
        "voucher": { "channel": config_json(&config), "maxClaimableAmount": (5 * PRICE).to_string() },
        "signature": payer.sign_voucher(&domain, id, 5 * PRICE).to_string(),
        "totalClaimed": (5 * PRICE).to_string(),
    }]});
    let settle = serde_json::json!({ "type": "settle", "receiver": RECEIVER.to_string(), "token": TOKEN.to_string() });

    // m1 is paid at PAY_TO, not at the channel's receiver.
    for payload in [refund.clone(), claim.clone(), settle] {
        let (status, answer) = post(M1_KEY, payload).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["success"], false, "{answer}");
        assert_eq!(answer["errorReason"], "invalid_batch_settlement_evm_receiver_mismatch", "{answer}");
        assert_eq!(answer["transaction"], "");
    }
    // The channel's own merchant keeps it over gRPC: x402d holds its charged
    // total, so an HTTP claim or refund (which would bypass it) is refused.
    for payload in [refund, claim] {
        let (status, answer) = post(MC_KEY, payload).await;
        assert_eq!(status, 409, "{answer}");
    }
    assert_eq!(s.onchain(payer).await, (100_000, 0), "nothing moved");
    assert_eq!(s.sent().await, 0, "x402d sent no transaction");
}

/// A channel whose claim reverts on its own (its payer authorizer got code
/// after signing, as an EIP-7702 delegation to a wallet that refuses the
/// voucher) is quarantined and announced; the other channels due with it
/// are claimed in one transaction. Once its payer starts a withdrawal, the
/// quarantined channel is counted apart and announced again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_whose_claim_reverts_is_quarantined_and_the_others_are_claimed() {
    const CHANNELS: usize = 5;
    const BAD: usize = 2;
    let s = Setup::new(CHANNELS).await;
    // The bad channel's vouchers are signed by a key apart from its payer.
    let delegated = Payer::random();
    let mut configs: Vec<ChannelConfig> = s.payers.iter().map(|p| s.config(p)).collect();
    configs[BAD].payerAuthorizer = delegated.address();
    for (payer, config) in s.payers.iter().zip(&configs) {
        s.deposit_into(payer, config.clone(), 1_000).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let chain = ChainSection::new(s.anvil.endpoint(), &s.signer, Some(&s.authorizer), "channel_poll_ms = 200\n");
    let config = channel_daemon_config(dir.path(), &chain);
    let daemon = Daemon::start_with_env(dir.path(), &config, &chain.env(&[("X402D_TEST_MC_KEY", MC_KEY)]));
    let mut client = payments(daemon.grpc, MC_KEY).await;
    let mut events =
        client.watch_settlements(pb::WatchSettlementsRequest { after_sequence: 0 }).await.unwrap().into_inner();
    let signer = |c: usize| if c == BAD { &delegated } else { &s.payers[c] };
    let waves = (0..3)
        .map(|n| {
            (0..CHANNELS)
                .map(|c| voucher((c * 10 + n) as u64, signer(c), &configs[c], PRICE * n as u128, PRICE))
                .collect()
        })
        .collect();
    for answer in stream_waves(&mut client, waves).await {
        assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
    }
    assert_eq!(s.sent().await, 0, "nothing claimed yet");

    // The authorizer's account gets code that answers no ERC-1271 check:
    // the contract now refuses the bad channel's voucher.
    s.wallet.anvil_set_code(delegated.address(), alloy::primitives::bytes!("00")).await.unwrap();
    // Every channel falls due in the same round.
    set_claim_interval(daemon.grpc, 1).await;

    let good = (CHANNELS - 1) as u128 * 3 * PRICE;
    eventually(60, "the good channels' claim", || async { s.receiver_balance().await == U256::from(good) }).await;
    for (c, payer) in s.payers.iter().enumerate() {
        let claimed = if c == BAD { 0 } else { 3 * PRICE };
        assert_eq!(s.onchain_of(&configs[c]).await, (1_000, claimed), "channel {c} of payer {}", payer.address());
    }

    // The merchant hears of both: the good channels claimed, the bad one
    // quarantined with the revert.
    let bad_id = Setup::domain().channel_id(&configs[BAD]);
    let mut confirmed = 0;
    let mut quarantined = Vec::new();
    while confirmed < CHANNELS - 1 || quarantined.is_empty() {
        let event = tokio::time::timeout(Duration::from_secs(30), events.message()).await.unwrap().unwrap().unwrap();
        let status = event.status.unwrap();
        match pb::PaymentState::try_from(status.state).unwrap() {
            pb::PaymentState::Confirmed => {
                assert_ne!(event.payment_id, bad_id.to_vec(), "the bad channel was not claimed");
                confirmed += 1;
            }
            pb::PaymentState::Failed => {
                assert_eq!(event.payment_id, bad_id.to_vec());
                quarantined.push(status.failure_reason);
            }
            other => panic!("unexpected channel event {other:?}"),
        }
    }
    assert!(quarantined[0].starts_with("channel_claim_quarantined"), "{}", quarantined[0]);
    assert!(!quarantined[0].contains("http://"), "no RPC URL in an event: {}", quarantined[0]);
    let metrics = || async {
        let body = reqwest::get(format!("http://{}/metrics", daemon.http)).await.unwrap().text().await.unwrap();
        let gauge =
            |name: &str| body.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(-1.0);
        (gauge("x402d_channel_claims_quarantined "), gauge("x402d_channel_claims_quarantined_withdrawing "))
    };
    eventually(10, "the quarantine gauge", || async { metrics().await == (1.0, 0.0) }).await;
    // Its vouchers could never be claimed: new ones are refused.
    let answer = client.submit(voucher(100, &delegated, &configs[BAD], 3 * PRICE, PRICE)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a quarantined channel's voucher was accepted");
    assert!(answer.message.contains("claim reverts"), "{}", answer.message);

    // The bad channel's payer starts its timed exit: the quarantined
    // channel is counted apart and announced again.
    let payer = &s.payers[BAD];
    s.wallet.anvil_set_balance(payer.address(), U256::from(10u128.pow(18))).await.unwrap();
    let payer_wallet = ProviderBuilder::new()
        .wallet(EthereumWallet::from(payer.signer().clone()))
        .connect_http(s.anvil.endpoint().parse().unwrap());
    let initiated = X402BatchSettlement::new(BATCH_SETTLEMENT_ADDRESS, &payer_wallet)
        .initiateWithdraw(configs[BAD].clone().into(), 1_000)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(initiated.status());
    eventually(30, "the withdrawing gauge", || async { metrics().await == (1.0, 1.0) }).await;
    let event = tokio::time::timeout(Duration::from_secs(30), events.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(event.payment_id, bad_id.to_vec());
    let status = event.status.unwrap();
    assert_eq!(pb::PaymentState::try_from(status.state).unwrap(), pb::PaymentState::Failed);
    assert!(status.failure_reason.contains("withdrawal"), "{}", status.failure_reason);
    assert_eq!(s.sent().await, 1, "one claim transaction; the bisection only simulated");
}

/// A voucher signer with code (here an EIP-7702 delegation to an address
/// with no code) is asked, as the contract would ask it (ERC-1271), though
/// its signature recovers: its code approves nothing, so its vouchers are
/// refused, before any deposit of its channel goes on chain, since their
/// charges could never be claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vouchers_of_a_signer_whose_code_approves_nothing_are_refused_and_nothing_is_deposited() {
    let s = Setup::new(2).await;
    let e = s.engine(3600).await;
    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;
    let designator = [&[0xef, 0x01, 0x00][..], Address::repeat_byte(0x77).as_slice()].concat();
    for payer in &s.payers {
        s.wallet.anvil_set_code(payer.address(), designator.clone().into()).await.unwrap();
    }

    // A funded channel: its first voucher is refused.
    let (payer, config) = (&s.payers[0], s.config(&s.payers[0]));
    s.wallet.anvil_set_code(payer.address(), alloy::primitives::Bytes::new()).await.unwrap();
    s.deposit(payer, 1_000).await;
    s.wallet.anvil_set_code(payer.address(), designator.into()).await.unwrap();
    let answer = client.submit(voucher(1, payer, &config, 0, PRICE)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a signer with code was accepted");
    assert_eq!(answer.reason, "invalid_batch_settlement_evm_voucher_signature", "{}", answer.message);
    assert!(answer.message.contains("isValidSignature"), "{}", answer.message);

    // A first voucher with its deposit: refused, and nothing goes on chain.
    let (other, other_config) = (&s.payers[1], s.config(&s.payers[1]));
    let answer = client.submit(deposit_voucher(2, other, &other_config, 500)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a deposit for a signer with code was accepted");
    assert!(answer.message.contains("isValidSignature"), "{}", answer.message);
    assert_eq!(s.onchain(other).await, (0, 0));
    assert_eq!(s.sent().await, 0, "no deposit transaction");
}

/// A deposit goes on chain (at x402d's gas cost) only for a voucher that
/// passes once the deposit is made, and only from the configured minimum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_deposited_for_a_voucher_that_would_be_refused_or_below_the_minimum() {
    let s = Setup::new(2).await;
    let e = s.engine_configured(Setup::merchant(3600), |c| c.min_deposit = Some("3".into())).await;
    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;
    let (payer, config) = (&s.payers[0], s.config(&s.payers[0]));

    // A deposit of 5 (above the minimum of 3) cannot pay for a request of
    // 10: refused before the deposit is sent.
    let answer = client.submit(deposit_voucher(1, payer, &config, 5)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "{}", answer.message);
    assert_eq!(answer.reason, "invalid_batch_settlement_evm_cumulative_exceeds_balance", "{}", answer.message);
    // A voucher off the charged total (20 for the first request of 10).
    let answer = client.submit(priced_deposit_voucher(2, payer, &config, 20, 500)).await.unwrap().into_inner();
    assert_eq!(answer.reason, "invalid_batch_settlement_evm_cumulative_amount_mismatch", "{}", answer.message);
    // Below the minimum: refused before anything is read or sent.
    let (other, other_config) = (&s.payers[1], s.config(&s.payers[1]));
    let answer = client.submit(deposit_voucher(3, other, &other_config, 2)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "{}", answer.message);
    assert!(answer.message.contains("minimum deposit 3"), "{}", answer.message);
    assert_eq!((s.onchain(payer).await, s.onchain(other).await), ((0, 0), (0, 0)));
    assert_eq!(s.sent().await, 0, "no deposit was sent");

    // A good one still lands.
    let answer = client.submit(deposit_voucher(4, payer, &config, 500)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
    assert_eq!((s.onchain(payer).await, s.sent().await), ((500, 0), 1));
}

/// A channel whose receiver authorizer is not the key x402d claims with
/// could never be claimed by it: its vouchers are refused (they would be
/// served and never paid).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vouchers_of_a_channel_x402d_cannot_claim_are_refused() {
    let s = Setup::new(1).await;
    let e = s.engine(3600).await;
    let payer = &s.payers[0];
    let config = payer.channel_config(RECEIVER, Address::repeat_byte(0x42), TOKEN, WITHDRAW_DELAY, B256::ZERO);
    s.deposit_into(payer, config.clone(), 1_000).await;
    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;
    let answer = client.submit(voucher(1, payer, &config, 0, PRICE)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a voucher x402d cannot claim was accepted");
    assert_eq!(answer.reason, "invalid_batch_settlement_evm_receiver_authorizer_mismatch", "{}", answer.message);
    // The channel x402d claims for is served as ever.
    s.deposit(payer, 1_000).await;
    let answer = client.submit(voucher(2, payer, &s.config(payer), 0, PRICE)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
}

/// A claim transaction that passed its simulation and reverted on chain
/// announces nothing: no channel of it gets a `CONFIRMED` event for a
/// transaction that claimed nothing. Its channels are then claimed one per
/// transaction; the one that reverts alone too is quarantined, the other is
/// claimed and announced with its own (successful) transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_reverts_on_chain_announces_nothing_and_its_channels_are_then_claimed_alone() {
    let s = Setup::new(2).await;
    let delegated = Payer::random();
    let configs =
        [s.config(&s.payers[0]), ChannelConfig { payerAuthorizer: delegated.address(), ..s.config(&s.payers[1]) }];
    for (payer, config) in s.payers.iter().zip(&configs) {
        s.deposit_into(payer, config.clone(), 1_000).await;
    }
    let engine = s.engine(3600).await;
    let grpc = engine.node.endpoints().grpc;
    let mut client = payments(grpc, MC_KEY).await;
    let mut events =
        client.watch_settlements(pb::WatchSettlementsRequest { after_sequence: 0 }).await.unwrap().into_inner();
    let signers = [&s.payers[0], &delegated];
    for (c, config) in configs.iter().enumerate() {
        let answer = client.submit(voucher(c as u64, signers[c], config, 0, PRICE)).await.unwrap().into_inner();
        assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
    }

    // The claim of both is simulated and sent, but waits in the pool ...
    s.wallet.anvil_set_auto_mine(false).await.unwrap();
    set_claim_interval(grpc, 1).await;
    eventually(30, "the claim transaction in the pool", || async {
        s.wallet.get_transaction_count(s.signer.address()).pending().await.unwrap() == 1
    })
    .await;
    // ... while the second channel's authorizer gets code that refuses its
    // voucher: mined, the claim reverts.
    s.wallet.anvil_set_code(delegated.address(), alloy::primitives::bytes!("00")).await.unwrap();
    s.wallet.anvil_mine(Some(1), None).await.unwrap();
    s.wallet.anvil_set_auto_mine(true).await.unwrap();
    let block = s.wallet.get_block_by_number(alloy::eips::BlockNumberOrTag::Latest).full().await.unwrap().unwrap();
    let reverted = block.transactions.hashes().next().expect("the claim was mined");
    let receipt = s.wallet.get_transaction_receipt(reverted).await.unwrap().unwrap();
    assert!(!receipt.status(), "the claim was meant to revert");

    // Then the good channel alone is claimed; the other is quarantined.
    let ids: Vec<B256> = configs.iter().map(|c| Setup::domain().channel_id(c)).collect();
    let mut seen = (false, false);
    while seen != (true, true) {
        let event = tokio::time::timeout(Duration::from_secs(30), events.message()).await.unwrap().unwrap().unwrap();
        let status = event.status.unwrap();
        let tx = B256::try_from(status.transaction.as_slice()).unwrap_or_default();
        assert_ne!(tx, reverted, "an event for the reverted claim: {status:?}");
        match pb::PaymentState::try_from(status.state).unwrap() {
            pb::PaymentState::Confirmed => {
                assert_eq!(event.payment_id, ids[0].to_vec(), "only the good channel is claimed");
                let receipt = s.wallet.get_transaction_receipt(tx).await.unwrap().expect("a mined claim");
                assert!(receipt.status(), "announced for a claim that reverted");
                seen.0 = true;
            }
            pb::PaymentState::Failed => {
                assert_eq!(event.payment_id, ids[1].to_vec());
                assert!(status.failure_reason.starts_with("channel_claim_quarantined"), "{}", status.failure_reason);
                seen.1 = true;
            }
            other => panic!("unexpected channel event {other:?}"),
        }
    }
    assert_eq!(s.onchain_of(&configs[0]).await, (1_000, PRICE));
    assert_eq!(s.onchain_of(&configs[1]).await, (1_000, 0));
    assert_eq!(s.sent().await, 2, "the reverted claim, then the good channel's alone");
}

/// Transactions x402d sends (and pays the gas of) on a merchant's behalf
/// over HTTP are rate limited per merchant: past its burst of 20, the
/// next call answers 429 and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_transactions_sent_for_a_merchant_over_http_are_rate_limited() {
    let s = Setup::new(1).await;
    // No refill within the test, however slow the machine.
    let e = s.engine_limited(3600, 20, 0).await;
    let config = s.config(&s.payers[0]);
    let http = reqwest::Client::new();
    let body = serde_json::json!({
        "x402Version": 2,
        "paymentPayload": {
            "x402Version": 2,
            "accepted": requirements_json(&config, 0),
            "payload": { "type": "settle", "receiver": RECEIVER.to_string(), "token": TOKEN.to_string() },
        },
        "paymentRequirements": requirements_json(&config, 0),
    });
    let settle = || async {
        let url = format!("http://{}/settle", e.node.endpoints().http);
        let response = http.post(url).bearer_auth(MC_KEY).json(&body).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    for n in 0..20 {
        let (status, answer) = settle().await;
        assert_eq!(status, 200, "call {n}: {answer}");
    }
    let sent = s.sent().await;
    assert_eq!(sent, 20, "a transaction for each call within the burst");
    let (status, answer) = settle().await;
    assert_eq!(status, 429, "past the burst: {answer}");
    assert!(answer.contains("too many channel transactions"), "{answer}");
    assert_eq!(s.sent().await, sent, "nothing sent past the limit");
}
