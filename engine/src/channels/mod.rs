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
//!
//! Split as `balance/` is: the stateless checks of a voucher (pure,
//! `verify.rs`), the port the shards read channels through
//! ([`ChannelSource`], here), and its chain adapter ([`ChainChannels`],
//! `chain.rs`).

mod chain;
mod header;
mod verify;

use std::sync::Arc;

use alloy::primitives::{Address, B256};
use x402_channel::{Channel, OnChain};

use crate::{
    Error,
    domain::{ChannelRecord, Merchant},
};

pub use self::{
    chain::ChainChannels,
    verify::{ChannelContracts, ChannelTerms, VerifiedDeposit, VerifiedVoucher, VoucherVerifier},
};
pub(crate) use self::{
    chain::put_deposit,
    header::{decode as decode_header, decode_value as decode_payload},
    verify::voucher_signer,
};
pub use crate::domain::{ChannelExtra, DepositPayload, VoucherPayload};

/// A channel as answers show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelView {
    /// The channel id.
    pub id: B256,
    /// What its vouchers have been charged in total, in atomic token units.
    pub charged: u128,
    /// The highest voucher the payer signed (`maxClaimableAmount`).
    pub signed_max_claimable: u128,
    /// The channel's balance on chain, as last read.
    pub balance: u128,
    /// What the receiver has claimed on chain so far.
    pub total_claimed: u128,
    /// When a withdrawal the payer started can be finalized (unix seconds), if one is pending.
    pub withdraw_finalize_after: Option<u64>,
    /// The contract's refund nonce: the next cooperative refund signs it.
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

/// A fresh channel record for a voucher's channel, not yet synced, first
/// paid at `now` (Unix seconds).
pub(crate) fn new_record(merchant: &Merchant, v: &VerifiedVoucher, now: u64) -> ChannelRecord {
    ChannelRecord {
        chain_id: v.chain_id,
        contract: v.contract,
        merchant_id: merchant.id.clone(),
        channel: Channel::new(v.config.clone(), v.channel_id),
        // The claim interval counts from the first voucher.
        last_claim_at: now,
        updated_at_ms: 0,
        claim_requested: false,
        refund_requested: None,
        contract_signer: v.proved,
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
    /// The claim or refund transaction.
    pub tx: B256,
    /// The block it was mined in.
    pub block: u64,
    /// The number of the merchant whose channel it is.
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
    Quarantined {
        /// The number of the merchant whose channel it is.
        merchant_number: u32,
        /// Why its claim reverts, as the simulation said.
        reason: String,
    },
}

/// Why a read of a channel gave no state to check its vouchers against.
#[derive(Clone, Debug)]
pub enum ReadFailure {
    /// The voucher signer holds code (a contract wallet, or an EOA delegated
    /// by EIP-7702) though its signature recovers: the contract checks its
    /// vouchers with ERC-1271, so the shard has them proved on chain.
    SignerHasCode(Address),
    /// The chain could not be reached; retryable.
    Unavailable(Arc<Error>),
}

impl ReadFailure {
    /// The message of a deposit refused because its voucher's signer
    /// holds code that was not asked about the voucher (it gained code
    /// after its channel was first read).
    pub fn signer_has_code(signer: Address) -> String {
        format!(
            "voucher signer {signer} holds code (a contract wallet or an EIP-7702 delegated account) that was \
             not asked about this voucher: the channel contract checks its vouchers with ERC-1271, so nothing \
             is deposited"
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

/// Each chain's channels through its own source; a voucher on another
/// chain is answered as [`NoChannels`] answers it.
#[derive(Debug, Default)]
pub struct ByChain(std::collections::HashMap<u64, Arc<dyn ChannelSource>>);

impl ByChain {
    /// Reads and deposits `chain_id`'s channels through `source`.
    pub fn insert(&mut self, chain_id: u64, source: Arc<dyn ChannelSource>) {
        self.0.insert(chain_id, source);
    }

    fn source(&self, chain_id: u64) -> &dyn ChannelSource {
        self.0.get(&chain_id).map_or(&NoChannels, |source| &**source)
    }
}

impl ChannelSource for ByChain {
    fn fetch(&self, v: &VerifiedVoucher, notify: ChannelNotifier) {
        self.source(v.chain_id).fetch(v, notify);
    }

    fn deposit(&self, v: &VerifiedVoucher, notify: DepositNotifier) {
        self.source(v.chain_id).deposit(v, notify);
    }
}
