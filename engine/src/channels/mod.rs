//! x402 `batch-settlement` vouchers in the pipeline.
//!
//! A voucher goes through the same stages as an `exact` payment:
//!
//! ```text
//!  verifier thread: requirements vs channel config, channel id, voucher signature (ecrecover)
//!        │
//!  shard (by channel id): channel state → voucher rules → new charged total
//!        │                  └─ unknown channel: parked while its state is read from the chain
//!  committer: the channel record, fsync'd with its group → ACCEPTED
//! ```
//!
//! One shard owns each channel, so the requests of one channel are checked
//! one at a time, in arrival order, without a lock. A payer's channels are
//! independent (each has its own balance), so they are sharded by channel
//! id, not by payer.

mod header;

use std::{collections::HashMap, sync::Arc};

use alloy::primitives::{Address, B256, Bytes, U256};
use secp256k1::PublicKey;
use x402_chain::{Chain, Eip3009Domain, Follow, ReceiveWithAuthorization, send_and_follow};
use x402_channel::{Channel, ChannelConfig, ChannelDomain, OnChain, Voucher};

use crate::{
    Error,
    domain::{ChannelRecord, Merchant, Network, Requirements},
    ecdsa::{Signature, recover_signer},
    reason::{Reason, Refusal, Rejection},
};

pub(crate) use self::header::{decode as decode_header, decode_value as decode_payload};

pub use crate::domain::{ChannelExtra, DepositPayload, VoucherPayload};

/// Where the channel contracts are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelContracts {
    /// The channel contract.
    pub channels: Address,
    /// Its ERC-3009 deposit collector.
    pub collector: Address,
}

impl Default for ChannelContracts {
    fn default() -> Self {
        Self {
            channels: x402_chain::contracts::BATCH_SETTLEMENT_ADDRESS,
            collector: x402_chain::contracts::ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        }
    }
}

/// A deposit whose authorization verified: what the channel contract's
/// `deposit` is called with.
#[derive(Clone, Debug)]
pub struct VerifiedDeposit {
    pub amount: u128,
    pub collector: Address,
    pub collector_data: Bytes,
    /// The ERC-3009 nonce: spent once the deposit is on chain.
    pub nonce: B256,
}

/// A voucher that passed the stateless checks.
#[derive(Clone, Debug)]
pub struct VerifiedVoucher {
    pub chain_id: u64,
    pub contract: Address,
    pub channel_id: B256,
    pub config: ChannelConfig,
    pub max_claimable: u128,
    pub signature: Bytes,
    /// The required amount: the voucher must be the charged total plus it.
    pub amount: u128,
    /// What is actually charged (≤ `amount`).
    pub charge: u128,
    /// A deposit to put on chain before the voucher is checked.
    pub deposit: Option<VerifiedDeposit>,
    /// A refund request of up to this much (`u128::MAX`: all not charged).
    pub refund: Option<u128>,
    /// Only check it (x402 `/verify`): nothing is recorded or sent.
    pub dry_run: bool,
}

/// A channel as answers show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelView {
    pub id: B256,
    pub charged: u128,
    pub signed_max_claimable: u128,
    pub balance: u128,
    pub total_claimed: u128,
    pub withdraw_finalize_after: Option<u64>,
    pub refund_nonce: u64,
}

impl From<&Channel> for ChannelView {
    fn from(c: &Channel) -> Self {
        Self {
            id: c.id,
            charged: c.charged,
            signed_max_claimable: c.voucher.as_ref().map_or(0, |v| v.max_claimable),
            balance: c.onchain.balance,
            total_claimed: c.onchain.total_claimed,
            withdraw_finalize_after: c.onchain.withdrawal.map(|w| w.finalize_after),
            refund_nonce: c.onchain.refund_nonce,
        }
    }
}

/// Stage 1 for vouchers, owned by one verifier thread: the stateless checks
/// of a voucher against the requirements, in the order of the scheme
/// (scheme and network, the config against the requirements, the channel
/// id, then the signature).
///
/// It remembers, per channel, the config whose hash is the channel id and
/// the public key of the voucher signer. A later voucher of the channel
/// then costs a comparison of its config with the remembered one instead
/// of hashing it, its voucher digest with a cached domain separator, and an
/// ECDSA verification against the key instead of a recovery (see
/// [`crate::ecdsa`]).
#[derive(Debug)]
pub struct VoucherVerifier {
    contracts: ChannelContracts,
    /// The channel contract's EIP-712 domain, by chain id.
    domains: HashMap<u64, ChannelDomain>,
    known: KnownChannels,
    /// The chains this node settles; `None`: record only, any chain.
    settled_chains: Option<Vec<u64>>,
    /// Deposits below this are refused.
    min_deposit: u128,
    /// The receiver authorizer x402d claims with, if it holds one: a
    /// channel naming another could never be claimed by x402d.
    claims_with: Option<Address>,
}

/// The channels a verifier thread remembers, in two generations: a channel
/// seen again moves to the recent one, and when the recent one is full the
/// older one is dropped. Channels in use stay known however many others
/// pass by; memory stays bounded at two generations.
#[derive(Debug)]
struct KnownChannels {
    generation: usize,
    recent: HashMap<B256, KnownChannel>,
    older: HashMap<B256, KnownChannel>,
}

impl KnownChannels {
    fn new(generation: usize) -> Self {
        Self { generation: generation.max(1), recent: HashMap::new(), older: HashMap::new() }
    }

    fn get(&mut self, id: &B256) -> Option<&KnownChannel> {
        if !self.recent.contains_key(id) {
            let channel = self.older.remove(id)?;
            self.insert(*id, channel);
        }
        self.recent.get(id)
    }

    fn insert(&mut self, id: B256, channel: KnownChannel) {
        if self.recent.len() >= self.generation && !self.recent.contains_key(&id) {
            self.older = std::mem::take(&mut self.recent);
        }
        self.recent.insert(id, channel);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.recent.len() + self.older.len()
    }
}

/// A channel whose id and signer key a verifier thread has established.
#[derive(Debug)]
struct KnownChannel {
    chain_id: u64,
    config: ChannelConfig,
    signer_key: PublicKey,
}

impl VoucherVerifier {
    /// Channels in a generation of the remembered ones: at most twice as
    /// many are remembered, about 250 bytes each.
    const GENERATION: usize = 32_768;

    pub fn new(contracts: ChannelContracts) -> Self {
        Self {
            contracts,
            domains: HashMap::new(),
            known: KnownChannels::new(Self::GENERATION),
            settled_chains: None,
            min_deposit: 0,
            claims_with: None,
        }
    }

    /// Refuses vouchers on chains other than `chains` (`None`: any).
    pub fn settling(mut self, chains: Option<Vec<u64>>) -> Self {
        self.settled_chains = chains;
        self
    }

    /// Refuses channels whose receiver authorizer is not `authorizer`, the
    /// key x402d claims with (`None`: any).
    #[must_use]
    pub const fn claiming_with(mut self, authorizer: Option<Address>) -> Self {
        self.claims_with = authorizer;
        self
    }

    /// Refuses deposits below `amount` (x402d pays the gas of each).
    #[must_use]
    pub const fn min_deposit(mut self, amount: u128) -> Self {
        self.min_deposit = amount;
        self
    }

    /// Chains whose channel domain is kept at most (any chain id a voucher
    /// names, on a record-only node); past it the cache starts over.
    const MAX_DOMAINS: usize = 64;

    /// The channel contract's domain on `chain_id`, cached.
    fn domain(domains: &mut HashMap<u64, ChannelDomain>, chain_id: u64, contract: Address) -> &ChannelDomain {
        if !domains.contains_key(&chain_id) && domains.len() >= Self::MAX_DOMAINS {
            domains.clear();
        }
        domains.entry(chain_id).or_insert_with(|| ChannelDomain::new(chain_id, contract))
    }

    /// Checks `payload` for `merchant` against `requirements`.
    pub fn verify(
        &mut self,
        merchant: &Merchant,
        requirements: &Requirements,
        payload: VoucherPayload,
    ) -> Result<VerifiedVoucher, Refusal> {
        let contracts = self.contracts;
        let contract = contracts.channels;
        let reject = |reason, message: String| Refusal::Rejected {
            id: None,
            payer: None,
            rejection: Rejection::new(reason, message),
        };
        if requirements.scheme != "batch-settlement" {
            return Err(reject(
                Reason::Scheme,
                format!("scheme {:?} is not \"batch-settlement\"", requirements.scheme),
            ));
        }
        if payload.network != requirements.network {
            return Err(reject(
                Reason::NetworkMismatch,
                format!("payload network {:?} differs from required {:?}", payload.network, requirements.network),
            ));
        }
        let Some(network) = Network::parse(&requirements.network) else {
            return Err(reject(
                Reason::InvalidNetwork,
                format!("network {:?} is not an eip155 network", requirements.network),
            ));
        };
        let chain_id = network.chain_id();
        if let Err(message) = crate::verify::settles(self.settled_chains.as_deref(), network) {
            return Err(reject(Reason::InvalidNetwork, message));
        }
        if !merchant.accepts(chain_id, requirements.asset) {
            return Err(reject(
                Reason::InvalidNetwork,
                format!("merchant does not accept token {} on {network}", requirements.asset),
            ));
        }
        let c = &payload.config;
        if c.token != requirements.asset {
            return Err(reject(
                Reason::TokenMismatch,
                format!("channel token {} is not asset {}", c.token, requirements.asset),
            ));
        }
        if c.receiver != requirements.pay_to || !merchant.pay_to.contains(&requirements.pay_to) {
            return Err(reject(
                Reason::ReceiverMismatch,
                format!(
                    "channel receiver {} is not payTo {} of merchant {:?}",
                    c.receiver, requirements.pay_to, merchant.id
                ),
            ));
        }
        if c.receiverAuthorizer != payload.extra.receiver_authorizer {
            return Err(reject(
                Reason::ReceiverAuthorizerMismatch,
                format!(
                    "channel receiverAuthorizer {} is not extra.receiverAuthorizer {}",
                    c.receiverAuthorizer, payload.extra.receiver_authorizer
                ),
            ));
        }
        if let Some(ours) = self.claims_with
            && c.receiverAuthorizer != ours
        {
            return Err(reject(
                Reason::ReceiverAuthorizerMismatch,
                format!(
                    "channel receiverAuthorizer {} is not the one x402d claims with ({ours}): its vouchers could \
                     never be claimed",
                    c.receiverAuthorizer
                ),
            ));
        }
        if c.withdrawDelay.to::<u64>() != payload.extra.withdraw_delay {
            return Err(reject(
                Reason::WithdrawDelayMismatch,
                format!(
                    "channel withdrawDelay {} is not extra.withdrawDelay {}",
                    c.withdrawDelay, payload.extra.withdraw_delay
                ),
            ));
        }
        let domain = Self::domain(&mut self.domains, chain_id, contract);
        // A remembered channel with this very config: its id is the config's hash.
        let known = self
            .known
            .get(&payload.channel_id)
            .filter(|k| k.chain_id == chain_id && k.config == payload.config)
            .map(|k| k.signer_key);
        let id = match known {
            Some(_) => payload.channel_id,
            None => domain.channel_id(c),
        };
        if id != payload.channel_id {
            return Err(reject(
                Reason::ChannelIdMismatch,
                format!("voucher channel id {} is not the config's {id}", payload.channel_id),
            ));
        }
        let signer = voucher_signer(c);
        let signature = <&[u8; 65]>::try_from(payload.signature.as_ref()).map_err(|_| {
            reject(
                Reason::VoucherSignature,
                format!(
                    "signature is {} bytes, not 65 (ERC-1271 payer signatures need an on-chain check and are not accepted)",
                    payload.signature.len()
                ),
            )
        })?;
        let signature = Signature::parse(signature).map_err(|m| reject(Reason::VoucherSignature, m))?;
        let digest = domain.voucher_digest(&Voucher { channelId: id, maxClaimableAmount: payload.max_claimable });
        let not_signed = |m: String| Refusal::Rejected {
            id: None,
            payer: Some(c.payer),
            rejection: Rejection::new(Reason::VoucherSignature, format!("voucher {m}")),
        };
        match known {
            Some(key) if signature.verify(digest, &key) => {}
            Some(_) => return Err(not_signed(format!("not signed by {signer}"))),
            None => {
                let signer_key = signature.recover_as(digest, signer).map_err(not_signed)?;
                self.known.insert(id, KnownChannel { chain_id, config: c.clone(), signer_key });
            }
        }
        let amount: u128 = match payload.refund {
            // A refund charges nothing: its voucher is the charged total.
            Some(_) => 0,
            None => requirements.amount.try_into().map_err(|_| {
                reject(Reason::Value, format!("amount {} does not fit a uint128 voucher", requirements.amount))
            })?,
        };
        let deposit = match &payload.deposit {
            Some(d) if d.amount < self.min_deposit => {
                return Err(reject(
                    Reason::DepositFailed,
                    format!("deposit {} is below this facilitator's minimum deposit {}", d.amount, self.min_deposit),
                ));
            }
            Some(d) => Some(verify_deposit(requirements, chain_id, &payload.config, id, d, contracts.collector)?),
            None => None,
        };
        let charge = payload.charge.unwrap_or(amount);
        if charge > amount {
            return Err(Refusal::Invalid(crate::reason::InvalidField::new(
                "voucher.charge",
                format!("{charge} is above the required amount {amount}"),
            )));
        }
        Ok(VerifiedVoucher {
            chain_id,
            contract,
            channel_id: id,
            config: payload.config,
            max_claimable: payload.max_claimable,
            signature: payload.signature,
            amount,
            charge,
            deposit,
            refund: payload.refund.map(|r| r.unwrap_or(u128::MAX)),
            dry_run: false,
        })
    }
}

/// Who signs a channel's vouchers: its payer authorizer, or the payer when
/// there is none.
pub(crate) fn voucher_signer(config: &ChannelConfig) -> Address {
    if config.payerAuthorizer.is_zero() { config.payer } else { config.payerAuthorizer }
}

/// A deposit's authorization must be the payer's `ReceiveWithAuthorization`
/// of the amount to the collector, bound to this channel, in the token's
/// EIP-712 domain.
fn verify_deposit(
    requirements: &Requirements,
    chain_id: u64,
    config: &ChannelConfig,
    channel_id: B256,
    d: &DepositPayload,
    collector: Address,
) -> Result<VerifiedDeposit, Refusal> {
    let reject = |message: String| Refusal::Rejected {
        id: None,
        payer: Some(config.payer),
        rejection: Rejection::new(Reason::DepositSignature, message),
    };
    if requirements.eip712_name.is_empty() || requirements.eip712_version.is_empty() {
        return Err(Refusal::Rejected {
            id: None,
            payer: None,
            rejection: Rejection::new(Reason::MissingEip712Domain, "a deposit needs extra.name and extra.version"),
        });
    }
    let nonce = x402_chain::channel::deposit_nonce(channel_id, d.salt);
    let message = ReceiveWithAuthorization {
        from: config.payer,
        to: collector,
        value: U256::from(d.amount),
        validAfter: U256::from(d.valid_after),
        validBefore: U256::from(d.valid_before),
        nonce,
    };
    let domain = Eip3009Domain::new(&requirements.eip712_name, &requirements.eip712_version, chain_id, config.token);
    let digest = domain.signing_hash(&message);
    let signature = <&[u8; 65]>::try_from(d.signature.as_ref())
        .map_err(|_| reject(format!("deposit signature is {} bytes, not 65", d.signature.len())))?;
    let signer = recover_signer(signature, digest).map_err(reject)?;
    if signer != config.payer {
        return Err(reject(format!("deposit authorization signed by {signer}, not the payer {}", config.payer)));
    }
    Ok(VerifiedDeposit { amount: d.amount, collector, collector_data: collector_data(d), nonce })
}

/// The deposit collector's `collectorData` for the authorization of `d`.
fn collector_data(d: &DepositPayload) -> Bytes {
    x402_chain::channel::deposit_collector_data(
        U256::from(d.valid_after),
        U256::from(d.valid_before),
        d.salt,
        &d.signature,
    )
}

/// A fresh channel record for a voucher's channel, not yet synced.
pub(crate) fn new_record(merchant: &Merchant, v: &VerifiedVoucher) -> ChannelRecord {
    ChannelRecord {
        chain_id: v.chain_id,
        contract: v.contract,
        merchant_id: merchant.id.clone(),
        channel: Channel::new(v.config.clone(), v.channel_id),
        // The claim interval counts from the first voucher.
        last_claim_at: crate::domain::unix_millis() / 1000,
        updated_at_ms: 0,
        claim_requested: false,
        refund_requested: None,
    }
}

/// The merchant's claim policy (defaults when it does not settle by channel).
pub(crate) fn claim_policy(merchant: &Merchant) -> x402_channel::ClaimPolicy {
    match &merchant.policy {
        crate::domain::SettlementPolicy::Channel { claim_interval_secs, claim_threshold } => {
            x402_channel::ClaimPolicy {
                interval_secs: *claim_interval_secs,
                threshold: u128::try_from(*claim_threshold).unwrap_or(u128::MAX),
                ..x402_channel::ClaimPolicy::default()
            }
        }
        _ => x402_channel::ClaimPolicy::default(),
    }
}

/// What a claim (or refund) transaction did for a channel, to record with
/// the channel's fresh state and announce on `WatchSettlements`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claimed {
    /// Unix seconds: the channel's claim interval restarts here.
    pub at: u64,
    pub tx: B256,
    pub block: u64,
    pub merchant_number: u32,
    /// It served a "claim now" request.
    pub served_claim: bool,
    /// It served a refund request of this much.
    pub served_refund: Option<u128>,
}

/// What a claim round did for a channel, to record with its fresh state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// A claim or refund transaction served it (or found nothing to do).
    Claimed(Claimed),
    /// Its part of a claim reverts on its own: it is left out of claims
    /// for a while, and announced on `WatchSettlements` as `FAILED` with
    /// `reason`.
    Quarantined { merchant_number: u32, reason: String },
}

/// Why a read of a channel gave no state to check its vouchers against.
#[derive(Clone, Debug)]
pub enum ReadFailure {
    /// The voucher signer holds code (a contract wallet, or an EOA delegated
    /// by EIP-7702): the contract checks its vouchers with ERC-1271, which
    /// x402d does not verify, so they are refused.
    SignerHasCode(Address),
    /// The chain could not be reached; retryable.
    Unavailable(Arc<Error>),
}

impl ReadFailure {
    /// The message of a voucher refused because its signer holds code.
    pub fn signer_has_code(signer: Address) -> String {
        format!(
            "voucher signer {signer} holds code (a contract wallet or an EIP-7702 delegated account): the \
             channel contract checks its vouchers with ERC-1271, which x402d does not verify yet"
        )
    }
}

/// What a read of a channel's on-chain state came to.
pub type ChannelFetched = Result<OnChain, ReadFailure>;

/// Reports a channel read to the shard that asked.
pub type ChannelNotifier = Arc<dyn Fn(B256, ChannelFetched) + Send + Sync>;

/// Why a deposit did not land.
#[derive(Clone, Debug)]
pub enum DepositFailure {
    /// The contract refuses it (simulation or receipt): the request is
    /// rejected with this message.
    Rejected(String),
    /// The chain could not be reached; retryable.
    Unavailable(Arc<Error>),
}

/// Reports a deposit's outcome (the channel's state after it) to the shard
/// that asked.
pub type DepositNotifier = Arc<dyn Fn(B256, Result<OnChain, DepositFailure>) + Send + Sync>;

/// Reads channels' on-chain state and puts deposits on chain for the
/// shards, off their threads.
pub trait ChannelSource: Send + Sync + std::fmt::Debug + 'static {
    /// Starts reading `v`'s channel, and whether its voucher signer holds
    /// code; calls `notify` once with the result.
    fn fetch(&self, v: &VerifiedVoucher, notify: ChannelNotifier);

    /// Starts putting `v`'s deposit on chain (unless its authorization is
    /// already spent: then it landed before), then reads the channel;
    /// calls `notify` once.
    fn deposit(&self, v: &VerifiedVoucher, notify: DepositNotifier);
}

/// No chain configured: channels cannot be read, so vouchers are answered
/// UNAVAILABLE.
#[derive(Debug, Default)]
pub struct NoChannels;

impl ChannelSource for NoChannels {
    fn fetch(&self, v: &VerifiedVoucher, notify: ChannelNotifier) {
        notify(v.channel_id, Err(ReadFailure::Unavailable(Arc::new(Error::UnknownChain(v.chain_id)))));
    }

    fn deposit(&self, v: &VerifiedVoucher, notify: DepositNotifier) {
        notify(v.channel_id, Err(DepositFailure::Unavailable(Arc::new(Error::UnknownChain(v.chain_id)))));
    }
}

/// Reads channels through a [`Chain`] with one `eth_call` each.
#[derive(Debug)]
pub struct ChainChannels<C> {
    chain: Arc<C>,
    /// How deposit transactions are followed to their receipts.
    follow: Follow,
    runtime: tokio::runtime::Handle,
}

impl<C: Chain> ChainChannels<C> {
    /// Must be called inside a tokio runtime, where the reads will run.
    pub fn new(chain: Arc<C>, follow: Follow) -> Self {
        Self { chain, follow, runtime: tokio::runtime::Handle::current() }
    }
}

impl<C: Chain> ChannelSource for ChainChannels<C> {
    fn fetch(&self, v: &VerifiedVoucher, notify: ChannelNotifier) {
        if v.chain_id != self.chain.chain_id() {
            return NoChannels.fetch(v, notify);
        }
        let (chain, id, contract) = (self.chain.clone(), v.channel_id, v.contract);
        let (withdraw_delay, signer) = (v.config.withdrawDelay.to::<u64>(), voucher_signer(&v.config));
        self.runtime.spawn(async move {
            let (read, code) = futures::future::join(
                chain.call(contract, x402_chain::channel::state_calldata(id)),
                chain.has_code(signer),
            )
            .await;
            let unavailable = |e: x402_chain::Error| ReadFailure::Unavailable(Arc::new(Error::from(e)));
            let fetched = match code {
                Ok(true) => Err(ReadFailure::SignerHasCode(signer)),
                Ok(false) => {
                    read.and_then(|out| x402_chain::channel::decode_state(&out, withdraw_delay)).map_err(unavailable)
                }
                Err(e) => Err(unavailable(e)),
            };
            if let Err(ReadFailure::Unavailable(e)) = &fetched {
                tracing::warn!(channel = %id, error = %e, "reading a channel's state failed");
            }
            notify(id, fetched);
        });
    }

    fn deposit(&self, v: &VerifiedVoucher, notify: DepositNotifier) {
        if v.chain_id != self.chain.chain_id() {
            return NoChannels.deposit(v, notify);
        }
        let Some(d) = v.deposit.clone() else { return };
        let (chain, v, follow) = (self.chain.clone(), v.clone(), self.follow);
        self.runtime.spawn(async move {
            let outcome = put_deposit(&*chain, &v, &d, follow).await.map(|(_, onchain)| onchain);
            if let Err(e) = &outcome {
                tracing::warn!(channel = %v.channel_id, error = ?e, "a channel deposit failed");
            }
            notify(v.channel_id, outcome);
        });
    }
}

/// Sends the deposit (simulated first) and waits for its receipt, then
/// reads the channel. An authorization already spent means the deposit
/// landed before (a retried request): only the read is done.
/// Returns the deposit transaction (none when it had landed before) and the
/// channel after it.
pub(crate) async fn put_deposit<C: Chain>(
    chain: &C,
    v: &VerifiedVoucher,
    d: &VerifiedDeposit,
    follow: Follow,
) -> Result<(Option<B256>, OnChain), DepositFailure> {
    let unavailable = |e: x402_chain::Error| DepositFailure::Unavailable(Arc::new(Error::from(e)));
    // Nothing goes on chain for vouchers that would then be refused.
    let signer = voucher_signer(&v.config);
    if chain.has_code(signer).await.map_err(unavailable)? {
        return Err(DepositFailure::Rejected(ReadFailure::signer_has_code(signer)));
    }
    let spent = chain.authorization_state(v.config.token, v.config.payer, d.nonce).await.map_err(unavailable)?;
    let mut sent = None;
    if !spent {
        let input = x402_chain::channel::deposit_calldata(&v.config, d.amount, d.collector, d.collector_data.clone());
        if let Some(revert) = chain.simulate(v.contract, input.clone()).await.map_err(unavailable)? {
            return Err(DepositFailure::Rejected(format!("the deposit would revert: {revert}")));
        }
        let gas = chain.estimate_gas(v.contract, input.clone()).await.map_err(unavailable)?;
        let tx = chain.sign_call(v.contract, input, Some(gas)).await.map_err(unavailable)?;
        let hash = tx.hash;
        tracing::info!(channel = %v.channel_id, tx = %hash, amount = d.amount, "sending a channel deposit");
        match send_and_follow(chain, tx, follow).await.map_err(unavailable)? {
            Some(receipt) if receipt.success => sent = Some(receipt.tx),
            Some(receipt) => {
                return Err(DepositFailure::Rejected(format!("the deposit transaction {} reverted", receipt.tx)));
            }
            None => {
                let e = Error::Timeout(format!("deposit transaction {hash} not mined in {:?}", follow.timeout));
                return Err(DepositFailure::Unavailable(Arc::new(e)));
            }
        }
    }
    let out = chain.call(v.contract, x402_chain::channel::state_calldata(v.channel_id)).await.map_err(unavailable)?;
    let onchain = x402_chain::channel::decode_state(&out, v.config.withdrawDelay.to::<u64>()).map_err(unavailable)?;
    Ok((sent, onchain))
}

#[cfg(test)]
mod tests {
    use alloy::primitives::address;
    use x402_devnet::Payer;

    use super::*;

    const TOKEN: Address = address!("0x5FbDB2315678afecb367f032d93F642f64180aa3");
    const PAY_TO: Address = address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8");
    const AUTHORIZER: Address = address!("0x00000000000000000000000000000000000000aa");

    fn merchant() -> Merchant {
        crate::testing::direct_merchant(PAY_TO)
    }

    fn requirements() -> Requirements {
        crate::testing::channel_requirements(TOKEN, PAY_TO)
    }

    fn domain() -> ChannelDomain {
        ChannelDomain::new(31337, ChannelContracts::default().channels)
    }

    #[test]
    fn the_channel_domain_cache_is_bounded_whatever_chains_vouchers_name() {
        let mut verifier = VoucherVerifier::new(ChannelContracts::default());
        let contract = ChannelContracts::default().channels;
        let config = Payer::random().channel_config(PAY_TO, AUTHORIZER, TOKEN, 900, B256::ZERO);
        for chain_id in 0..10 * VoucherVerifier::MAX_DOMAINS as u64 {
            let domain = VoucherVerifier::domain(&mut verifier.domains, chain_id, contract);
            assert_eq!(domain.channel_id(&config), ChannelDomain::new(chain_id, contract).channel_id(&config));
            assert!(verifier.domains.len() <= VoucherVerifier::MAX_DOMAINS);
        }
    }

    /// `payer`'s voucher of `max` on its channel with `salt`.
    fn voucher(payer: &Payer, salt: u8, max: u128) -> VoucherPayload {
        let config = payer.channel_config(PAY_TO, AUTHORIZER, TOKEN, 900, B256::repeat_byte(salt));
        let channel_id = domain().channel_id(&config);
        VoucherPayload {
            network: "eip155:31337".into(),
            config,
            channel_id,
            max_claimable: max,
            signature: payer.sign_voucher(&domain(), channel_id, max),
            charge: None,
            extra: ChannelExtra { receiver_authorizer: AUTHORIZER, withdraw_delay: 900 },
            deposit: None,
            refund: None,
        }
    }

    fn reason(refusal: Refusal) -> Reason {
        match refusal {
            Refusal::Rejected { rejection, .. } => rejection.reason,
            Refusal::Invalid(field) => panic!("invalid {field:?}"),
        }
    }

    #[test]
    fn a_known_channel_is_checked_against_the_remembered_config_and_key() {
        let (payer, stranger) = (Payer::random(), Payer::random());
        let mut verifier = VoucherVerifier::new(ChannelContracts::default());
        let check = |verifier: &mut VoucherVerifier, payload| verifier.verify(&merchant(), &requirements(), payload);

        // First voucher: the id is hashed and the key recovered, then remembered.
        let first = check(&mut verifier, voucher(&payer, 1, 10)).unwrap();
        assert_eq!(first.channel_id, voucher(&payer, 1, 10).channel_id);
        assert_eq!(verifier.known.len(), 1);
        assert_eq!(check(&mut verifier, voucher(&payer, 1, 20)).unwrap().max_claimable, 20);

        // The remembered id with another config (another salt) is the
        // config's id no more.
        let mut other_config = voucher(&payer, 1, 30);
        other_config.config.salt = B256::repeat_byte(2);
        assert_eq!(reason(check(&mut verifier, other_config).unwrap_err()), Reason::ChannelIdMismatch);

        // A signature by another key, or of another amount, fails against the key.
        let mut forged = voucher(&payer, 1, 30);
        forged.signature = stranger.sign_voucher(&domain(), forged.channel_id, 30);
        assert_eq!(reason(check(&mut verifier, forged).unwrap_err()), Reason::VoucherSignature);
        let mut replayed = voucher(&payer, 1, 30);
        replayed.max_claimable = 40;
        assert_eq!(reason(check(&mut verifier, replayed).unwrap_err()), Reason::VoucherSignature);

        // The same key on another chain is not the remembered channel.
        let mut elsewhere = requirements();
        elsewhere.network = "eip155:8453".into();
        let mut moved = voucher(&payer, 1, 30);
        moved.network = elsewhere.network.clone();
        assert_eq!(reason(verifier.verify(&merchant(), &elsewhere, moved).unwrap_err()), Reason::ChannelIdMismatch);
        assert_eq!(verifier.known.len(), 1);
    }

    #[test]
    fn channels_in_use_stay_known_while_others_pass_by() {
        let key = |byte: u8| KnownChannel {
            chain_id: u64::from(byte),
            config: voucher(&Payer::random(), 1, 1).config,
            signer_key: secp256k1::SecretKey::from_byte_array([byte + 1; 32]).unwrap().public_key(secp256k1::SECP256K1),
        };
        let mut known = KnownChannels::new(3);
        let id = B256::repeat_byte;
        known.insert(id(0), key(0));
        // Channel 0 is used while ten others are seen once each.
        for i in 1..=10 {
            known.insert(id(i), key(i));
            assert_eq!(known.get(&id(0)).map(|k| k.chain_id), Some(0), "after {i}");
            assert!(known.len() <= 6, "{}", known.len());
        }
        // The ones seen once and long ago are gone; the latest are there.
        assert!(known.get(&id(1)).is_none());
        assert_eq!(known.get(&id(10)).map(|k| k.chain_id), Some(10));
    }

    #[test]
    fn a_voucher_with_the_other_v_is_the_signers_and_is_claimed_with_the_right_one() {
        let payer = Payer::random();
        let right = voucher(&payer, 1, 10);
        let mut wrong_v = right.clone();
        let mut signature = wrong_v.signature.to_vec();
        signature[64] = 55 - signature[64];
        wrong_v.signature = signature.into();

        // Unknown channel (recovery) and known channel (verification) alike.
        let mut fresh = VoucherVerifier::new(ChannelContracts::default());
        fresh.verify(&merchant(), &requirements(), wrong_v.clone()).unwrap();
        fresh.verify(&merchant(), &requirements(), wrong_v.clone()).unwrap();

        let digest =
            domain().voucher_digest(&Voucher { channelId: right.channel_id, maxClaimableAmount: right.max_claimable });
        let claimable = crate::ecdsa::claimable(&wrong_v.signature, digest, voucher_signer(&right.config)).unwrap();
        assert_eq!(claimable.as_slice(), right.signature.as_ref());
    }
}
