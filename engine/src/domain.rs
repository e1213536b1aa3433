//! Domain types: payments, their ids and states, merchants and settlement
//! policies. Everything inside the engine works on these; the gRPC adapter
//! converts at the edge.

use std::fmt;

use alloy::primitives::{Address, B256, U256, keccak256};
pub use x402_wire::{Authorization, ChannelExtra, DepositPayload, ExactPayload, Network, Requirements, VoucherPayload};

/// Unix time in milliseconds.
pub(crate) fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A token balance on one chain: its owner's holding of `token`. The
/// balance cache reads balances by it, and the shards reserve open
/// payments against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BalanceKey {
    pub chain_id: u64,
    pub token: Address,
    pub owner: Address,
}

/// The id of an `exact` payment: `keccak256(chainId ‖ token ‖ from ‖ nonce)`
/// with the chain id as a 32-byte big-endian word and addresses as 20 bytes.
///
/// It names the same thing the token contract uses to refuse a replay (an
/// authorizer's nonce on one token on one chain), so the engine's replay
/// index and the chain agree on what "the same payment" is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PaymentId(pub B256);

impl PaymentId {
    /// Computes the id of the payment of `from`'s `nonce` on `token`.
    pub fn new(chain_id: u64, token: Address, from: Address, nonce: B256) -> Self {
        let mut buf = [0u8; 32 + 20 + 20 + 32];
        buf[24..32].copy_from_slice(&chain_id.to_be_bytes());
        buf[32..52].copy_from_slice(token.as_slice());
        buf[52..72].copy_from_slice(from.as_slice());
        buf[72..].copy_from_slice(nonce.as_slice());
        Self(keccak256(buf))
    }
}

impl fmt::Debug for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PaymentId({})", self.0)
    }
}

impl fmt::Display for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The payment part of a submit: typed, or the raw `PAYMENT-SIGNATURE`
/// header (decoded by a verifier thread, off the async runtime).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PaymentInput {
    Exact(ExactPayload),
    Header(String),
    /// An x402 `batch-settlement` voucher.
    Voucher(Box<VoucherPayload>),
}

/// One payment as a gateway submits it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submission {
    pub requirements: Requirements,
    pub input: PaymentInput,
    /// The client's proof that this submit retries an earlier one (gRPC
    /// `idempotency_key`, x402's `payment-identifier` extension).
    pub idempotency: Option<IdempotencyKey>,
}

impl Submission {
    /// A submission without an idempotency key.
    pub const fn new(requirements: Requirements, input: PaymentInput) -> Self {
        Self { requirements, input, idempotency: None }
    }
}

/// A client's idempotency key, kept as its hash. A payment already recorded
/// is answered as a new acceptance only to a submit from the same merchant
/// that carries the same key: a retry of a request whose answer was lost.
/// Any other submit of it is a replay.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(pub B256);

impl IdempotencyKey {
    /// Shortest key accepted (x402 `payment-identifier`: 16 to 128 characters).
    pub const MIN_LEN: usize = 16;
    /// Longest key accepted.
    pub const MAX_LEN: usize = 128;

    /// Checks `key` (16–128 characters of `[A-Za-z0-9_-]`, the
    /// `payment-identifier` rule) and keeps its hash.
    pub fn parse(key: &str) -> Result<Self, &'static str> {
        if !(Self::MIN_LEN..=Self::MAX_LEN).contains(&key.len()) {
            return Err("must be 16 to 128 characters");
        }
        if !key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')) {
            return Err("may contain only letters, digits, '_' and '-'");
        }
        Ok(Self(keccak256(key.as_bytes())))
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({})", self.0)
    }
}

/// Where a payment stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PaymentState {
    Accepted,
    Queued,
    Submitted,
    Confirmed,
    Failed,
    Expired,
}

impl PaymentState {
    /// Whether the payment is still owed: its value stays reserved against
    /// the payer's balance until it is settled or given up.
    pub const fn is_open(self) -> bool {
        matches!(self, Self::Accepted | Self::Queued | Self::Submitted)
    }
}

/// A payment's state with what settlement has learned about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentStatus {
    pub state: PaymentState,
    pub transaction: Option<B256>,
    pub block: Option<u64>,
    pub failure_reason: Option<String>,
    pub updated_at_ms: u64,
}

impl PaymentStatus {
    /// A status with no settlement details.
    pub const fn new(state: PaymentState, updated_at_ms: u64) -> Self {
        Self { state, transaction: None, block: None, failure_reason: None, updated_at_ms }
    }
}

/// How a merchant's payments are settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettlementPolicy {
    /// One `transferWithAuthorization` transaction per payment.
    Direct,
    /// Many payments per Multicall3 transaction.
    Batched { max_rows: u32, max_wait_ms: u64 },
    /// x402 `batch-settlement` channels, claimed periodically.
    Channel { claim_interval_secs: u64, claim_threshold: U256 },
}

impl SettlementPolicy {
    /// The strategy's name, a bounded metric label.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Batched { .. } => "batched",
            Self::Channel { .. } => "channel",
        }
    }
}

/// A network and token a merchant accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptedAsset {
    pub chain_id: u64,
    pub asset: Address,
}

/// Checks a merchant id: 1–64 characters of `[A-Za-z0-9_.-]`.
pub fn validate_merchant_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > 64 {
        return Err("must be 1 to 64 characters");
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err("may contain only letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

/// A merchant: who is paid, how, and how it authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merchant {
    pub id: String,
    /// Small number assigned at creation; keys the pending queue.
    pub number: u32,
    pub pay_to: Vec<Address>,
    /// Accepted networks and tokens; empty accepts any.
    pub assets: Vec<AcceptedAsset>,
    pub policy: SettlementPolicy,
    /// SHA-256 of the API key; the key itself is never stored.
    pub api_key_sha256: Option<[u8; 32]>,
    pub updated_at_ms: u64,
}

impl Merchant {
    /// Whether the merchant accepts `asset` on `chain_id`.
    pub fn accepts(&self, chain_id: u64, asset: Address) -> bool {
        self.assets.is_empty() || self.assets.iter().any(|a| a.chain_id == chain_id && a.asset == asset)
    }
}

/// A payment accepted and recorded in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentRecord {
    pub id: PaymentId,
    pub merchant_id: String,
    pub merchant_number: u32,
    pub chain_id: u64,
    pub asset: Address,
    pub eip712_name: String,
    pub eip712_version: String,
    pub authorization: Authorization,
    pub signature: Vec<u8>,
    /// The EIP-712 digest the payer signed; two submits of one payment id
    /// are the same payment exactly when their digests are equal.
    pub digest: B256,
    pub policy: SettlementPolicy,
    pub status: PaymentStatus,
    pub accepted_at_ms: u64,
    /// The idempotency key it was accepted with, if any.
    pub idempotency: Option<IdempotencyKey>,
}

impl PaymentRecord {
    /// The balance it is paid from (and its value reserved against while
    /// open).
    pub const fn balance_key(&self) -> BalanceKey {
        BalanceKey { chain_id: self.chain_id, token: self.asset, owner: self.authorization.from }
    }
}

/// An entry of the settlement queue: a merchant's payment ordered by the
/// deadline by which it must be on chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PendingKey {
    pub merchant_number: u32,
    /// `validBefore`, seconds.
    pub deadline: u64,
    pub id: PaymentId,
}

/// Where a transaction intent stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntentState {
    /// Signed, perhaps broadcast; no version of it is known to be mined.
    Pending,
    /// One version (`tx`) was mined in `block` (hash `block_hash`, to tell
    /// a reorg); `success` is its receipt status. Watched until it is
    /// buried past the finality depth, then forgotten.
    Included { tx: B256, block: u64, block_hash: B256, success: bool },
    /// Given up: its nonce was taken by another transaction.
    Abandoned,
}

/// A settlement transaction, recorded with its signed bytes **before** it
/// is broadcast, so that after a crash it is resolved (receipt by hash,
/// `authorizationState`, or rebroadcast) and its payments are settled once,
/// never twice and never forgotten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxIntent {
    pub chain_id: u64,
    pub signer: Address,
    pub nonce: u64,
    /// Every signed version, oldest first: a fee bump replaces a stuck
    /// transaction at the same nonce, so at most one of them is mined.
    pub tx_hashes: Vec<B256>,
    /// The latest version's signed EIP-2718 bytes.
    pub raw: Vec<u8>,
    /// The payments it settles.
    pub payments: Vec<PaymentId>,
    pub state: IntentState,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl TxIntent {
    /// The ledger key: one intent per signer nonce on a chain.
    pub const fn key(&self) -> IntentKey {
        IntentKey { chain_id: self.chain_id, signer: self.signer, nonce: self.nonce }
    }
}

/// A `batch-settlement` channel as the engine keeps it: the channel state
/// machine of [`x402_channel::Channel`], where its contract is, and the
/// merchant it pays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelRecord {
    pub chain_id: u64,
    /// The channel contract.
    pub contract: Address,
    pub merchant_id: String,
    pub channel: x402_channel::Channel,
    /// Unix seconds of the last claim this engine made for it (before the
    /// first claim: of its first voucher).
    pub last_claim_at: u64,
    /// A claim was asked for (an operator's "claim now").
    pub claim_requested: bool,
    /// A cooperative refund was asked for, of up to this much
    /// (`u128::MAX`: everything not charged).
    pub refund_requested: Option<u128>,
    pub updated_at_ms: u64,
}

/// Identifies a [`TxIntent`]: a signer's nonce on a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IntentKey {
    pub chain_id: u64,
    pub signer: Address,
    pub nonce: u64,
}

/// A payment state change, in ledger order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettlementEvent {
    pub sequence: u64,
    pub merchant_number: u32,
    /// The payment, or for a channel event the channel id.
    pub payment_id: PaymentId,
    pub status: PaymentStatus,
    /// A channel event (a claim or a refund went through): the channel
    /// after it.
    pub channel: Option<ChannelSnapshot>,
}

/// A channel's totals, as events carry them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSnapshot {
    pub charged: u128,
    pub total_claimed: u128,
    pub balance: u128,
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::address;

    #[test]
    fn payment_id_depends_on_every_part() {
        let token = address!("0x5FbDB2315678afecb367f032d93F642f64180aa3");
        let from = address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
        let base = PaymentId::new(1, token, from, B256::ZERO);
        assert_ne!(base, PaymentId::new(2, token, from, B256::ZERO));
        assert_ne!(base, PaymentId::new(1, from, token, B256::ZERO));
        assert_ne!(base, PaymentId::new(1, token, from, B256::repeat_byte(1)));
        assert_eq!(base, PaymentId::new(1, token, from, B256::ZERO));
    }
}
