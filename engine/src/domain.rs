//! Domain types: payments, their ids and states, merchants and settlement
//! policies. Everything inside the engine works on these; the gRPC adapter
//! converts at the edge.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
};

use alloy::primitives::{Address, B256, U256, keccak256};
pub use x402_wire::{Authorization, ChannelExtra, DepositPayload, ExactPayload, Network, Requirements, VoucherPayload};

/// Unix time in milliseconds, by the system clock.
pub(crate) fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Where the pipeline and the settler read the time (Unix time): the
/// system clock in a node, or a clock a test sets or steps, so that time
/// rules (`validBefore` margins, replay retention, claim intervals, expiry
/// before settlement) can be tested without waiting for them, and so that
/// a node can be run through clock steps.
///
/// Cheap to clone and to read: the system clock is a `SystemTime` read, a
/// set clock an atomic load.
#[derive(Clone, Default)]
pub struct Clock {
    source: Source,
    /// A lower bound of the time the clock never reads below, as Unix
    /// milliseconds minus [`monotonic_ms`]: the chain's latest block time
    /// run on by the monotonic clock since it was read, kept by the node, so
    /// that a clock behind the chain does not take authorizations the token
    /// would refuse as expired. (Run on, it never stands still between
    /// blocks; monotonic, a step of the system clock does not move it.)
    floor: Option<Arc<AtomicI64>>,
}

/// The time a payment is verified at, in Unix seconds. `latest` is what
/// the clock reads (never below the chain's latest block time), and the
/// `validBefore` check counts from it, so that a host clock behind the
/// chain does not take an expired authorization; `earliest` is what it
/// reads without the chain's help (never more), and the `validAfter`
/// check counts from it, so that a node reporting a block from the future
/// does not make x402d take an authorization before it is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// For `validBefore`.
    pub latest: u64,
    /// For `validAfter`.
    pub earliest: u64,
}

impl From<u64> for Now {
    fn from(secs: u64) -> Self {
        Self { latest: secs, earliest: secs }
    }
}

/// Milliseconds of the monotonic clock since this process first asked.
fn monotonic_ms() -> i64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    i64::try_from(START.get_or_init(std::time::Instant::now).elapsed().as_millis()).unwrap_or(i64::MAX)
}

#[derive(Clone, Default)]
enum Source {
    #[default]
    System,
    /// Stands at this time until moved.
    Set(Arc<AtomicU64>),
    /// The system clock shifted by this many milliseconds.
    Offset(Arc<AtomicI64>),
}

impl Clock {
    /// The system clock.
    pub const fn system() -> Self {
        Self { source: Source::System, floor: None }
    }

    /// A clock standing at `now_ms` until it is moved.
    pub fn set_at(now_ms: u64) -> Self {
        Self { source: Source::Set(Arc::new(AtomicU64::new(now_ms))), floor: None }
    }

    /// The system clock, shifted by what [`Clock::step`] adds: a clock that
    /// jumps (an NTP correction, a resumed virtual machine) and runs on.
    pub fn stepping() -> Self {
        Self { source: Source::Offset(Arc::new(AtomicI64::new(0))), floor: None }
    }

    /// This clock, never reading below what [`Clock::raise_floor`] set.
    #[must_use]
    pub fn with_floor(self) -> Self {
        Self { floor: Some(Arc::new(AtomicI64::new(i64::MIN))), ..self }
    }

    /// The time is at least `ms` (Unix milliseconds) now: from now on the
    /// clock reads no less than `ms` plus the monotonic time since, if it
    /// has a floor ([`Clock::with_floor`]), but never more than
    /// [`Clock::MAX_FLOOR_LEAD_MS`] ahead of what it read without one (one
    /// block time far in the future, from a faulty node, moves it that much
    /// at most). A floor is never lowered.
    pub fn raise_floor(&self, ms: u64) {
        if let Some(floor) = &self.floor {
            let ms = ms.min(self.unfloored_ms().saturating_add(Self::MAX_FLOOR_LEAD_MS));
            let bound = i64::try_from(ms).unwrap_or(i64::MAX).saturating_sub(monotonic_ms());
            floor.fetch_max(bound, Ordering::SeqCst);
        }
    }

    /// How far a floor may move the clock ahead, in milliseconds: a host
    /// clock up to 10 minutes behind is corrected whole.
    pub const MAX_FLOOR_LEAD_MS: u64 = 600_000;

    /// The time to verify a payment at: see [`Now`].
    pub fn verification_time(&self) -> Now {
        Now { latest: self.now_secs(), earliest: self.unfloored_ms() / 1000 }
    }

    /// Moves a set clock on by `by` (the system clock moves by itself: no effect).
    pub fn advance(&self, by: std::time::Duration) {
        self.step(i64::try_from(by.as_millis()).unwrap_or(i64::MAX));
    }

    /// Moves a set or stepping clock by `ms`, back when negative (the system
    /// clock: no effect).
    pub fn step(&self, ms: i64) {
        match &self.source {
            Source::System => {}
            Source::Set(now) => {
                let _ = now.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| Some(t.saturating_add_signed(ms)));
            }
            Source::Offset(offset) => {
                let _ = offset.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| Some(o.saturating_add(ms)));
            }
        }
    }

    /// Unix time in milliseconds.
    pub fn now_ms(&self) -> u64 {
        let now = self.unfloored_ms();
        let floor = self.floor.as_ref().map_or(i64::MIN, |floor| floor.load(Ordering::Relaxed));
        if floor == i64::MIN {
            return now;
        }
        now.max(u64::try_from(floor.saturating_add(monotonic_ms())).unwrap_or(0))
    }

    /// What the clock reads without its floor.
    fn unfloored_ms(&self) -> u64 {
        match &self.source {
            Source::System => unix_millis(),
            Source::Set(now) => now.load(Ordering::SeqCst),
            Source::Offset(offset) => unix_millis().saturating_add_signed(offset.load(Ordering::SeqCst)),
        }
    }

    /// Unix time in seconds.
    pub fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::System => f.write_str("Clock::system"),
            Source::Set(ms) => write!(f, "Clock::set_at({})", ms.load(Ordering::SeqCst)),
            Source::Offset(ms) => write!(f, "Clock::stepping({:+} ms)", ms.load(Ordering::SeqCst)),
        }
    }
}

/// A token balance on one chain: its owner's holding of `token`. The
/// balance cache reads balances by it, and the shards reserve open
/// payments against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BalanceKey {
    /// The chain's EIP-155 id.
    pub chain_id: u64,
    /// The token contract.
    pub token: Address,
    /// The holder: a payment's payer.
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
    /// An x402 `exact` payment: an EIP-3009 authorization and its signature.
    Exact(ExactPayload),
    /// The untouched base64 `PAYMENT-SIGNATURE` header, of either scheme.
    Header(String),
    /// An x402 `batch-settlement` voucher.
    Voucher(Box<VoucherPayload>),
}

/// One payment as a gateway submits it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submission {
    /// The x402 payment requirements the gateway asks payment for (scheme,
    /// network, asset, amount, `payTo`, the token's EIP-712 domain).
    pub requirements: Requirements,
    /// The signed payment offered for them.
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
    /// Accepted and recorded but not yet queued for settlement (the engine
    /// itself records a new payment as `Queued`).
    Accepted,
    /// Recorded and waiting to be settled; again so after an attempt that
    /// failed for a passing reason, or when its transaction's nonce went to
    /// another transaction.
    Queued,
    /// In a settlement transaction, recorded before its broadcast, that is
    /// not yet concluded; again so when a reorg drops its block.
    Submitted,
    /// Settled: a transaction moving its value to the payee is mined with the
    /// required confirmations (`transaction`, `block`).
    Confirmed,
    /// Ended unpaid by the chain's verdict: its transfer reverts, or its
    /// authorization was cancelled or spent otherwise (`failure_reason`).
    Failed,
    /// Ended unsent: its `validBefore` came too close before it was submitted.
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
    /// Where the payment stands.
    pub state: PaymentState,
    /// The settlement transaction once submitted, or the transaction that
    /// spent or cancelled its authorization elsewhere; for a channel event,
    /// the claim or refund.
    pub transaction: Option<B256>,
    /// The number of the block that transaction was mined in, once known.
    pub block: Option<u64>,
    /// The x402 reason code once failed or expired.
    pub failure_reason: Option<String>,
    /// Unix milliseconds of the last state change.
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
    Batched {
        /// Most rows per transaction (a batch takes the smallest among its
        /// merchants'); at least 1.
        max_rows: u32,
        /// Milliseconds a batch's oldest row may wait before it goes out.
        max_wait_ms: u64,
    },
    /// x402 `batch-settlement` channels, claimed periodically.
    Channel {
        /// Seconds after its last claim a channel with anything unclaimed is
        /// claimed.
        claim_interval_secs: u64,
        /// Unclaimed value, atomic token units, at which a channel is claimed
        /// at once.
        claim_threshold: U256,
    },
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
    /// The network's EIP-155 chain id.
    pub chain_id: u64,
    /// The token contract.
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
    /// Chosen by the operator: 1–64 characters of `[A-Za-z0-9_.-]`
    /// ([`validate_merchant_id`]).
    pub id: String,
    /// Small number assigned at creation; keys the pending queue.
    pub number: u32,
    /// The addresses it is paid at (at least one); a payment's `payTo` must be
    /// one of them.
    pub pay_to: Vec<Address>,
    /// Accepted networks and tokens; empty accepts any.
    pub assets: Vec<AcceptedAsset>,
    /// How its payments are settled; a change applies to payments accepted
    /// after it.
    pub policy: SettlementPolicy,
    /// SHA-256 of the API key; the key itself is never stored.
    pub api_key_sha256: Option<[u8; 32]>,
    /// Unix milliseconds of its last upsert.
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
    /// Its id, from its chain, token, payer and nonce (see [`PaymentId`]).
    pub id: PaymentId,
    /// The merchant it pays.
    pub merchant_id: String,
    /// That merchant's [`Merchant::number`].
    pub merchant_number: u32,
    /// The chain it is paid on (EIP-155 id).
    pub chain_id: u64,
    /// The token contract it is paid in.
    pub asset: Address,
    /// The token's EIP-712 domain name the authorization was signed under.
    pub eip712_name: String,
    /// The token's EIP-712 domain version the authorization was signed under.
    pub eip712_version: String,
    /// The signed EIP-3009 `transferWithAuthorization` parameters: payer,
    /// payee, value (atomic token units), validity window (unix seconds)
    /// and nonce.
    pub authorization: Authorization,
    /// The payer's signature of the authorization, as the token will be
    /// given it: 65 bytes from a payer without code; from a payer with code,
    /// whatever its `isValidSignature` approved (an ERC-6492 wrapper kept
    /// only while the wallet is not deployed).
    pub signature: Vec<u8>,
    /// How the token will check [`PaymentRecord::signature`], so how it is
    /// settled.
    pub signature_kind: SignatureKind,
    /// The EIP-712 digest the payer signed; two submits of one payment id
    /// are the same payment exactly when their digests are equal.
    pub digest: B256,
    /// Its merchant's settlement policy when it was accepted; it is settled
    /// by this one.
    pub policy: SettlementPolicy,
    /// Its current state and what settlement has learned.
    pub status: PaymentStatus,
    /// Unix milliseconds when it was accepted.
    pub accepted_at_ms: u64,
    /// The idempotency key it was accepted with, if any.
    pub idempotency: Option<IdempotencyKey>,
}

/// How the token checks a payment's signature, as found when it was
/// accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SignatureKind {
    /// `ecrecover`: the payer held no code. Settled with the `(v, r, s)`
    /// function, which every EIP-3009 token has.
    #[default]
    Ecdsa,
    /// ERC-1271 `isValidSignature`: the payer held code (a contract wallet,
    /// an EIP-7702 delegated EOA). Settled with the `bytes signature`
    /// function, the signature passed as the wallet approved it.
    Erc1271,
    /// ERC-6492: the payer's wallet was not deployed yet, and its signature
    /// carries the (allowlisted) factory call that deploys it. Settled by
    /// one transaction that makes that call, then the `bytes signature`
    /// transfer with the wallet's inner signature.
    Erc6492,
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
    /// The payment's [`Merchant::number`]: the queue is ordered by merchant
    /// first.
    pub merchant_number: u32,
    /// `validBefore`, seconds.
    pub deadline: u64,
    /// The payment; breaks ties between equal deadlines.
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
    Included {
        /// The version that was mined (one of `tx_hashes`).
        tx: B256,
        /// The number of the block it was mined in.
        block: u64,
        /// That block's hash: another at that height means a reorg.
        block_hash: B256,
        /// The receipt status: whether it executed without reverting.
        success: bool,
    },
    /// Given up: its nonce was taken by another transaction.
    Abandoned,
}

/// A settlement transaction, recorded with its signed bytes **before** it
/// is broadcast, so that after a crash it is resolved (receipt by hash,
/// `authorizationState`, or rebroadcast) and its payments are settled once,
/// never twice and never forgotten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxIntent {
    /// The chain it is sent on (EIP-155 id).
    pub chain_id: u64,
    /// The settlement signer that signs it (and pays its gas).
    pub signer: Address,
    /// The signer's account nonce, shared by every version.
    pub nonce: u64,
    /// Every signed version, oldest first: a fee bump replaces a stuck
    /// transaction at the same nonce, so at most one of them is mined.
    pub tx_hashes: Vec<B256>,
    /// The latest version's signed EIP-2718 bytes.
    pub raw: Vec<u8>,
    /// The payments it settles.
    pub payments: Vec<PaymentId>,
    /// Pending, included in a block, or abandoned.
    pub state: IntentState,
    /// Unix milliseconds when it was first recorded.
    pub created_at_ms: u64,
    /// Unix milliseconds of its last change (a fee bump, an inclusion, a
    /// reorg).
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
    /// The chain the channel is on (EIP-155 id).
    pub chain_id: u64,
    /// The channel contract.
    pub contract: Address,
    /// The merchant it pays.
    pub merchant_id: String,
    /// Its state: terms, charges, latest voucher and on-chain state as last
    /// read.
    pub channel: x402_channel::Channel,
    /// Unix seconds of the last claim this engine made for it (before the
    /// first claim: of its first voucher).
    pub last_claim_at: u64,
    /// A claim was asked for (an operator's "claim now").
    pub claim_requested: bool,
    /// A cooperative refund was asked for, of up to this much
    /// (`u128::MAX`: everything not charged).
    pub refund_requested: Option<u128>,
    /// Unix milliseconds of the last change to this record.
    pub updated_at_ms: u64,
    /// Its voucher signer is a contract: a voucher of it was proved on
    /// chain (ERC-1271), so every voucher of it is, even one whose
    /// signature recovers (an EIP-7702 delegate decides, not the key).
    pub contract_signer: bool,
}

/// Identifies a [`TxIntent`]: a signer's nonce on a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IntentKey {
    /// The chain's EIP-155 id.
    pub chain_id: u64,
    /// The settlement signer's address.
    pub signer: Address,
    /// The signer's account nonce.
    pub nonce: u64,
}

/// A payment state change, in ledger order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettlementEvent {
    /// Position in ledger order, one more than the event before (the first
    /// is 1); `WatchSettlements` resumes after it.
    pub sequence: u64,
    /// The [`Merchant::number`] of the merchant it concerns; events are
    /// indexed by it.
    pub merchant_number: u32,
    /// The payment, or for a channel event the channel id.
    pub payment_id: PaymentId,
    /// The payment's new status; for a channel event `Confirmed` with the
    /// claim or refund transaction, or `Failed` when its claim is
    /// quarantined.
    pub status: PaymentStatus,
    /// A channel event (a claim or a refund went through): the channel
    /// after it.
    pub channel: Option<ChannelSnapshot>,
}

/// A channel's totals, as events carry them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSnapshot {
    /// Charged for served requests so far (cumulative), atomic token units.
    pub charged: u128,
    /// Claimed by the receiver so far (cumulative), atomic token units.
    pub total_claimed: u128,
    /// Deposited and neither withdrawn nor refunded, atomic token units.
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

#[cfg(test)]
mod clock_tests {
    use super::{Clock, unix_millis};

    /// A clock behind reads no earlier than its floor, and runs on from it
    /// (it does not stand at the floor between raises); a floor below the
    /// clock changes nothing, and a floor is never lowered.
    #[test]
    fn a_clock_behind_its_floor_runs_on_from_the_floor() {
        let clock = Clock::stepping().with_floor();
        clock.step(-120_000);
        let behind = clock.now_ms();
        assert!(behind + 100_000 < unix_millis());
        clock.raise_floor(unix_millis());
        let floored = clock.now_ms();
        assert!(floored + 1_000 >= unix_millis(), "{floored}");
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(clock.now_ms() >= floored + 30, "it runs on");
        clock.raise_floor(0);
        assert!(clock.now_ms() >= floored + 30, "never lowered");
        let far = Clock::stepping().with_floor();
        far.raise_floor(unix_millis() + 3_600_000);
        assert!(far.now_ms() <= unix_millis() + Clock::MAX_FLOOR_LEAD_MS + 100, "an hour ahead moves it a minute");
        assert!(far.now_ms() + 1_000 >= unix_millis() + Clock::MAX_FLOOR_LEAD_MS);
        let at = far.verification_time();
        assert!(at.earliest <= unix_millis() / 1000 + 1, "validAfter counts without the floor: {at:?}");
        assert!(at.latest >= at.earliest + Clock::MAX_FLOOR_LEAD_MS / 1000 - 1, "{at:?}");
        let ahead = Clock::stepping().with_floor();
        ahead.step(60_000);
        ahead.raise_floor(unix_millis());
        assert!(ahead.now_ms() >= unix_millis() + 59_000, "a floor below the clock changes nothing");
    }
}
