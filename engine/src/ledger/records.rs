//! The ledger's on-disk record format: versioned protobuf messages.
//!
//! Every value starts with a one-byte format version followed by the
//! protobuf encoding of that version's message, so fields can be added
//! compatibly and a future incompatible layout gets a new version byte.
//! Keys are fixed-width big-endian so RocksDB iterates them in order.

use alloy::primitives::{Address, B256, U256};
use prost::Message;

use crate::{
    Error, Result,
    domain::{
        AcceptedAsset, Authorization, ChannelRecord, ChannelSnapshot, IdempotencyKey, IntentKey, IntentState, Merchant,
        PaymentId, PaymentRecord, PaymentState, PaymentStatus, PendingKey, SettlementEvent, SettlementPolicy,
        SignatureKind, TxIntent,
    },
};

/// The version byte of the records below.
const V1: u8 = 1;

#[derive(Clone, PartialEq, Message)]
struct PolicyV1 {
    /// 1 direct, 2 batched, 3 channel.
    #[prost(uint32, tag = "1")]
    kind: u32,
    #[prost(uint32, tag = "2")]
    max_rows: u32,
    #[prost(uint64, tag = "3")]
    max_wait_ms: u64,
    #[prost(uint64, tag = "4")]
    claim_interval_secs: u64,
    #[prost(bytes = "vec", tag = "5")]
    claim_threshold: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct StatusV1 {
    /// 1 accepted … 6 expired, as [`state_code`].
    #[prost(uint32, tag = "1")]
    state: u32,
    #[prost(bytes = "vec", optional, tag = "2")]
    transaction: Option<Vec<u8>>,
    #[prost(uint64, optional, tag = "3")]
    block: Option<u64>,
    #[prost(string, optional, tag = "4")]
    failure_reason: Option<String>,
    #[prost(uint64, tag = "5")]
    updated_at_ms: u64,
}

#[derive(Clone, PartialEq, Message)]
struct PaymentV1 {
    #[prost(bytes = "vec", tag = "1")]
    id: Vec<u8>,
    #[prost(string, tag = "2")]
    merchant_id: String,
    #[prost(uint32, tag = "3")]
    merchant_number: u32,
    #[prost(uint64, tag = "4")]
    chain_id: u64,
    #[prost(bytes = "vec", tag = "5")]
    asset: Vec<u8>,
    #[prost(string, tag = "6")]
    eip712_name: String,
    #[prost(string, tag = "7")]
    eip712_version: String,
    #[prost(bytes = "vec", tag = "8")]
    from: Vec<u8>,
    #[prost(bytes = "vec", tag = "9")]
    to: Vec<u8>,
    #[prost(bytes = "vec", tag = "10")]
    value: Vec<u8>,
    #[prost(bytes = "vec", tag = "11")]
    valid_after: Vec<u8>,
    #[prost(bytes = "vec", tag = "12")]
    valid_before: Vec<u8>,
    #[prost(bytes = "vec", tag = "13")]
    nonce: Vec<u8>,
    #[prost(bytes = "vec", tag = "14")]
    signature: Vec<u8>,
    #[prost(bytes = "vec", tag = "15")]
    digest: Vec<u8>,
    #[prost(message, optional, tag = "16")]
    policy: Option<PolicyV1>,
    #[prost(message, optional, tag = "17")]
    status: Option<StatusV1>,
    #[prost(uint64, tag = "18")]
    accepted_at_ms: u64,
    /// Hash of the idempotency key it was accepted with.
    #[prost(bytes = "vec", optional, tag = "19")]
    idempotency: Option<Vec<u8>>,
    /// How the token checks its signature: 0 (absent in older records)
    /// ECDSA, 1 ERC-1271, 2 ERC-6492.
    #[prost(uint32, tag = "20")]
    signature_kind: u32,
}

#[derive(Clone, PartialEq, Message)]
struct AssetV1 {
    #[prost(uint64, tag = "1")]
    chain_id: u64,
    #[prost(bytes = "vec", tag = "2")]
    asset: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct MerchantV1 {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(uint32, tag = "2")]
    number: u32,
    #[prost(bytes = "vec", repeated, tag = "3")]
    pay_to: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "4")]
    assets: Vec<AssetV1>,
    #[prost(message, optional, tag = "5")]
    policy: Option<PolicyV1>,
    #[prost(bytes = "vec", optional, tag = "6")]
    api_key_sha256: Option<Vec<u8>>,
    #[prost(uint64, tag = "7")]
    updated_at_ms: u64,
}

#[derive(Clone, PartialEq, Message)]
struct EventV1 {
    #[prost(uint32, tag = "1")]
    merchant_number: u32,
    #[prost(bytes = "vec", tag = "2")]
    payment_id: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    status: Option<StatusV1>,
    #[prost(message, optional, tag = "4")]
    channel: Option<ChannelSnapshotV1>,
}

#[derive(Clone, PartialEq, Message)]
struct ChannelSnapshotV1 {
    #[prost(bytes = "vec", tag = "1")]
    charged: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    total_claimed: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    balance: Vec<u8>,
}

fn versioned(message: &impl Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + message.encoded_len());
    out.push(V1);
    message.encode(&mut out).expect("a Vec grows as needed");
    out
}

fn unversioned(bytes: &[u8]) -> Result<&[u8]> {
    match bytes.split_first() {
        Some((&V1, rest)) => Ok(rest),
        Some(_) => Err(Error::Corrupt("unknown record version")),
        None => Err(Error::Corrupt("empty record")),
    }
}

fn address(bytes: &[u8]) -> Result<Address> {
    x402_wire::fields::address_from_bytes(bytes).ok_or(Error::Corrupt("address is not 20 bytes"))
}

fn word(bytes: &[u8]) -> Result<B256> {
    x402_wire::fields::word_from_bytes(bytes).ok_or(Error::Corrupt("word is not 32 bytes"))
}

fn uint(bytes: &[u8]) -> Result<U256> {
    (bytes.len() == 32).then(|| U256::from_be_slice(bytes)).ok_or(Error::Corrupt("uint256 is not 32 bytes"))
}

fn uint_bytes(value: U256) -> Vec<u8> {
    value.to_be_bytes::<32>().to_vec()
}

const fn state_code(state: PaymentState) -> u32 {
    match state {
        PaymentState::Accepted => 1,
        PaymentState::Queued => 2,
        PaymentState::Submitted => 3,
        PaymentState::Confirmed => 4,
        PaymentState::Failed => 5,
        PaymentState::Expired => 6,
    }
}

fn state_from_code(code: u32) -> Result<PaymentState> {
    Ok(match code {
        1 => PaymentState::Accepted,
        2 => PaymentState::Queued,
        3 => PaymentState::Submitted,
        4 => PaymentState::Confirmed,
        5 => PaymentState::Failed,
        6 => PaymentState::Expired,
        _ => return Err(Error::Corrupt("unknown payment state")),
    })
}

fn policy_to(policy: &SettlementPolicy) -> PolicyV1 {
    match policy {
        SettlementPolicy::Direct => PolicyV1 { kind: 1, ..Default::default() },
        SettlementPolicy::Batched { max_rows, max_wait_ms } => {
            PolicyV1 { kind: 2, max_rows: *max_rows, max_wait_ms: *max_wait_ms, ..Default::default() }
        }
        SettlementPolicy::Channel { claim_interval_secs, claim_threshold } => PolicyV1 {
            kind: 3,
            claim_interval_secs: *claim_interval_secs,
            claim_threshold: uint_bytes(*claim_threshold),
            ..Default::default()
        },
    }
}

fn policy_from(policy: Option<PolicyV1>) -> Result<SettlementPolicy> {
    let p = policy.ok_or(Error::Corrupt("missing policy"))?;
    Ok(match p.kind {
        1 => SettlementPolicy::Direct,
        2 => SettlementPolicy::Batched { max_rows: p.max_rows, max_wait_ms: p.max_wait_ms },
        3 => SettlementPolicy::Channel {
            claim_interval_secs: p.claim_interval_secs,
            claim_threshold: uint(&p.claim_threshold)?,
        },
        _ => return Err(Error::Corrupt("unknown settlement policy")),
    })
}

fn status_to(status: &PaymentStatus) -> StatusV1 {
    StatusV1 {
        state: state_code(status.state),
        transaction: status.transaction.map(|t| t.to_vec()),
        block: status.block,
        failure_reason: status.failure_reason.clone(),
        updated_at_ms: status.updated_at_ms,
    }
}

fn status_from(status: Option<StatusV1>) -> Result<PaymentStatus> {
    let s = status.ok_or(Error::Corrupt("missing status"))?;
    Ok(PaymentStatus {
        state: state_from_code(s.state)?,
        transaction: s.transaction.as_deref().map(word).transpose()?,
        block: s.block,
        failure_reason: s.failure_reason,
        updated_at_ms: s.updated_at_ms,
    })
}

pub(crate) fn encode_payment(p: &PaymentRecord) -> Vec<u8> {
    let a = &p.authorization;
    versioned(&PaymentV1 {
        id: p.id.0.to_vec(),
        merchant_id: p.merchant_id.clone(),
        merchant_number: p.merchant_number,
        chain_id: p.chain_id,
        asset: p.asset.to_vec(),
        eip712_name: p.eip712_name.clone(),
        eip712_version: p.eip712_version.clone(),
        from: a.from.to_vec(),
        to: a.to.to_vec(),
        value: uint_bytes(a.value),
        valid_after: uint_bytes(a.valid_after),
        valid_before: uint_bytes(a.valid_before),
        nonce: a.nonce.to_vec(),
        signature: p.signature.clone(),
        digest: p.digest.to_vec(),
        policy: Some(policy_to(&p.policy)),
        status: Some(status_to(&p.status)),
        accepted_at_ms: p.accepted_at_ms,
        idempotency: p.idempotency.map(|k| k.0.to_vec()),
        signature_kind: match p.signature_kind {
            SignatureKind::Ecdsa => 0,
            SignatureKind::Erc1271 => 1,
            SignatureKind::Erc6492 => 2,
        },
    })
}

pub(crate) fn decode_payment(bytes: &[u8]) -> Result<PaymentRecord> {
    let p = PaymentV1::decode(unversioned(bytes)?)?;
    Ok(PaymentRecord {
        id: PaymentId(word(&p.id)?),
        merchant_id: p.merchant_id,
        merchant_number: p.merchant_number,
        chain_id: p.chain_id,
        asset: address(&p.asset)?,
        eip712_name: p.eip712_name,
        eip712_version: p.eip712_version,
        authorization: Authorization {
            from: address(&p.from)?,
            to: address(&p.to)?,
            value: uint(&p.value)?,
            valid_after: uint(&p.valid_after)?,
            valid_before: uint(&p.valid_before)?,
            nonce: word(&p.nonce)?,
        },
        signature: p.signature,
        digest: word(&p.digest)?,
        policy: policy_from(p.policy)?,
        status: status_from(p.status)?,
        accepted_at_ms: p.accepted_at_ms,
        idempotency: p.idempotency.as_deref().map(word).transpose()?.map(IdempotencyKey),
        signature_kind: match p.signature_kind {
            0 => SignatureKind::Ecdsa,
            1 => SignatureKind::Erc1271,
            2 => SignatureKind::Erc6492,
            _ => return Err(Error::Corrupt("unknown signature kind")),
        },
    })
}

pub(crate) fn encode_merchant(m: &Merchant) -> Vec<u8> {
    versioned(&MerchantV1 {
        id: m.id.clone(),
        number: m.number,
        pay_to: m.pay_to.iter().map(|a| a.to_vec()).collect(),
        assets: m.assets.iter().map(|a| AssetV1 { chain_id: a.chain_id, asset: a.asset.to_vec() }).collect(),
        policy: Some(policy_to(&m.policy)),
        api_key_sha256: m.api_key_sha256.map(|h| h.to_vec()),
        updated_at_ms: m.updated_at_ms,
    })
}

pub(crate) fn decode_merchant(bytes: &[u8]) -> Result<Merchant> {
    let m = MerchantV1::decode(unversioned(bytes)?)?;
    Ok(Merchant {
        id: m.id,
        number: m.number,
        pay_to: m.pay_to.iter().map(|a| address(a)).collect::<Result<_>>()?,
        assets: m
            .assets
            .iter()
            .map(|a| Ok(AcceptedAsset { chain_id: a.chain_id, asset: address(&a.asset)? }))
            .collect::<Result<_>>()?,
        policy: policy_from(m.policy)?,
        api_key_sha256: m
            .api_key_sha256
            .map(|h| <[u8; 32]>::try_from(h.as_slice()).map_err(|_| Error::Corrupt("key hash is not 32 bytes")))
            .transpose()?,
        updated_at_ms: m.updated_at_ms,
    })
}

pub(crate) fn encode_event(e: &SettlementEvent) -> Vec<u8> {
    versioned(&EventV1 {
        merchant_number: e.merchant_number,
        payment_id: e.payment_id.0.to_vec(),
        status: Some(status_to(&e.status)),
        channel: e.channel.map(|c| ChannelSnapshotV1 {
            charged: u128_bytes(c.charged),
            total_claimed: u128_bytes(c.total_claimed),
            balance: u128_bytes(c.balance),
        }),
    })
}

pub(crate) fn decode_event(sequence: u64, bytes: &[u8]) -> Result<SettlementEvent> {
    let e = EventV1::decode(unversioned(bytes)?)?;
    Ok(SettlementEvent {
        sequence,
        merchant_number: e.merchant_number,
        payment_id: PaymentId(word(&e.payment_id)?),
        status: status_from(e.status)?,
        channel: match e.channel {
            Some(c) => Some(ChannelSnapshot {
                charged: u128_from(&c.charged)?,
                total_claimed: u128_from(&c.total_claimed)?,
                balance: u128_from(&c.balance)?,
            }),
            None => None,
        },
    })
}

#[derive(Clone, PartialEq, Message)]
struct IntentV1 {
    #[prost(uint64, tag = "1")]
    chain_id: u64,
    #[prost(bytes = "vec", tag = "2")]
    signer: Vec<u8>,
    #[prost(uint64, tag = "3")]
    nonce: u64,
    #[prost(bytes = "vec", repeated, tag = "4")]
    tx_hashes: Vec<Vec<u8>>,
    #[prost(bytes = "vec", tag = "5")]
    raw: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "6")]
    payments: Vec<Vec<u8>>,
    /// 1 pending, 2 included, 3 abandoned.
    #[prost(uint32, tag = "7")]
    state: u32,
    #[prost(bytes = "vec", tag = "8")]
    included_tx: Vec<u8>,
    #[prost(uint64, tag = "9")]
    included_block: u64,
    #[prost(bool, tag = "10")]
    included_success: bool,
    #[prost(uint64, tag = "11")]
    created_at_ms: u64,
    #[prost(uint64, tag = "12")]
    updated_at_ms: u64,
    #[prost(bytes = "vec", tag = "13")]
    included_block_hash: Vec<u8>,
}

pub(crate) fn encode_intent(i: &TxIntent) -> Vec<u8> {
    let (state, included_tx, included_block, included_block_hash, included_success) = match i.state {
        IntentState::Pending => (1, Vec::new(), 0, Vec::new(), false),
        IntentState::Included { tx, block, block_hash, success } => {
            (2, tx.to_vec(), block, block_hash.to_vec(), success)
        }
        IntentState::Abandoned => (3, Vec::new(), 0, Vec::new(), false),
    };
    versioned(&IntentV1 {
        chain_id: i.chain_id,
        signer: i.signer.to_vec(),
        nonce: i.nonce,
        tx_hashes: i.tx_hashes.iter().map(|h| h.to_vec()).collect(),
        raw: i.raw.clone(),
        payments: i.payments.iter().map(|p| p.0.to_vec()).collect(),
        state,
        included_tx,
        included_block,
        included_success,
        included_block_hash,
        created_at_ms: i.created_at_ms,
        updated_at_ms: i.updated_at_ms,
    })
}

pub(crate) fn decode_intent(bytes: &[u8]) -> Result<TxIntent> {
    let i = IntentV1::decode(unversioned(bytes)?)?;
    let state = match i.state {
        1 => IntentState::Pending,
        2 => IntentState::Included {
            tx: word(&i.included_tx)?,
            block: i.included_block,
            block_hash: word(&i.included_block_hash)?,
            success: i.included_success,
        },
        3 => IntentState::Abandoned,
        _ => return Err(Error::Corrupt("unknown intent state")),
    };
    Ok(TxIntent {
        chain_id: i.chain_id,
        signer: address(&i.signer)?,
        nonce: i.nonce,
        tx_hashes: i.tx_hashes.iter().map(|h| word(h)).collect::<Result<_>>()?,
        raw: i.raw,
        payments: i.payments.iter().map(|p| word(p).map(PaymentId)).collect::<Result<_>>()?,
        state,
        created_at_ms: i.created_at_ms,
        updated_at_ms: i.updated_at_ms,
    })
}

#[derive(Clone, PartialEq, Message)]
struct ChannelV1 {
    #[prost(uint64, tag = "1")]
    chain_id: u64,
    #[prost(bytes = "vec", tag = "2")]
    contract: Vec<u8>,
    #[prost(string, tag = "3")]
    merchant_id: String,
    #[prost(bytes = "vec", tag = "4")]
    id: Vec<u8>,
    // The config.
    #[prost(bytes = "vec", tag = "5")]
    payer: Vec<u8>,
    #[prost(bytes = "vec", tag = "6")]
    payer_authorizer: Vec<u8>,
    #[prost(bytes = "vec", tag = "7")]
    receiver: Vec<u8>,
    #[prost(bytes = "vec", tag = "8")]
    receiver_authorizer: Vec<u8>,
    #[prost(bytes = "vec", tag = "9")]
    token: Vec<u8>,
    #[prost(uint64, tag = "10")]
    withdraw_delay: u64,
    #[prost(bytes = "vec", tag = "11")]
    salt: Vec<u8>,
    // The server's state; uint128 amounts as 16 bytes big-endian.
    #[prost(bytes = "vec", tag = "12")]
    charged: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "13")]
    voucher_max_claimable: Option<Vec<u8>>,
    #[prost(bytes = "vec", tag = "14")]
    voucher_signature: Vec<u8>,
    // The on-chain mirror.
    #[prost(bytes = "vec", tag = "15")]
    balance: Vec<u8>,
    #[prost(bytes = "vec", tag = "16")]
    total_claimed: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "17")]
    withdrawal_amount: Option<Vec<u8>>,
    #[prost(uint64, tag = "18")]
    withdrawal_finalize_after: u64,
    #[prost(uint64, tag = "19")]
    refund_nonce: u64,
    #[prost(uint64, tag = "20")]
    synced_at: u64,
    #[prost(uint64, tag = "21")]
    last_claim_at: u64,
    #[prost(uint64, tag = "22")]
    updated_at_ms: u64,
    #[prost(bool, tag = "23")]
    claim_requested: bool,
    #[prost(bytes = "vec", optional, tag = "24")]
    refund_requested: Option<Vec<u8>>,
    /// Its voucher signer is a contract (false in older records).
    #[prost(bool, tag = "25")]
    contract_signer: bool,
}

fn u128_bytes(value: u128) -> Vec<u8> {
    value.to_be_bytes().to_vec()
}

fn u128_from(bytes: &[u8]) -> Result<u128> {
    Ok(u128::from_be_bytes(bytes.try_into().map_err(|_| Error::Corrupt("uint128 is not 16 bytes"))?))
}

pub(crate) fn encode_channel(r: &ChannelRecord) -> Vec<u8> {
    let c = &r.channel;
    versioned(&ChannelV1 {
        chain_id: r.chain_id,
        contract: r.contract.to_vec(),
        merchant_id: r.merchant_id.clone(),
        id: c.id.to_vec(),
        payer: c.config.payer.to_vec(),
        payer_authorizer: c.config.payerAuthorizer.to_vec(),
        receiver: c.config.receiver.to_vec(),
        receiver_authorizer: c.config.receiverAuthorizer.to_vec(),
        token: c.config.token.to_vec(),
        withdraw_delay: c.config.withdrawDelay.to::<u64>(),
        salt: c.config.salt.to_vec(),
        charged: u128_bytes(c.charged),
        voucher_max_claimable: c.voucher.as_ref().map(|v| u128_bytes(v.max_claimable)),
        voucher_signature: c.voucher.as_ref().map(|v| v.signature.to_vec()).unwrap_or_default(),
        balance: u128_bytes(c.onchain.balance),
        total_claimed: u128_bytes(c.onchain.total_claimed),
        withdrawal_amount: c.onchain.withdrawal.map(|w| u128_bytes(w.amount)),
        withdrawal_finalize_after: c.onchain.withdrawal.map_or(0, |w| w.finalize_after),
        refund_nonce: c.onchain.refund_nonce,
        synced_at: c.synced_at,
        last_claim_at: r.last_claim_at,
        updated_at_ms: r.updated_at_ms,
        claim_requested: r.claim_requested,
        refund_requested: r.refund_requested.map(u128_bytes),
        contract_signer: r.contract_signer,
    })
}

pub(crate) fn decode_channel(bytes: &[u8]) -> Result<ChannelRecord> {
    use x402_channel::{Channel, ChannelConfig, OnChain, SignedVoucher, Withdrawal};
    let m = ChannelV1::decode(unversioned(bytes)?)?;
    let config = ChannelConfig {
        payer: address(&m.payer)?,
        payerAuthorizer: address(&m.payer_authorizer)?,
        receiver: address(&m.receiver)?,
        receiverAuthorizer: address(&m.receiver_authorizer)?,
        token: address(&m.token)?,
        withdrawDelay: alloy::primitives::aliases::U40::try_from(m.withdraw_delay)
            .map_err(|_| Error::Corrupt("withdraw delay above uint40"))?,
        salt: word(&m.salt)?,
    };
    let voucher = match m.voucher_max_claimable {
        Some(max) => Some(SignedVoucher { max_claimable: u128_from(&max)?, signature: m.voucher_signature.into() }),
        None => None,
    };
    let withdrawal = match m.withdrawal_amount {
        Some(amount) => Some(Withdrawal { amount: u128_from(&amount)?, finalize_after: m.withdrawal_finalize_after }),
        None => None,
    };
    Ok(ChannelRecord {
        chain_id: m.chain_id,
        contract: address(&m.contract)?,
        merchant_id: m.merchant_id,
        channel: Channel {
            config,
            id: word(&m.id)?,
            charged: u128_from(&m.charged)?,
            voucher,
            onchain: OnChain {
                balance: u128_from(&m.balance)?,
                total_claimed: u128_from(&m.total_claimed)?,
                withdrawal,
                refund_nonce: m.refund_nonce,
            },
            synced_at: m.synced_at,
        },
        last_claim_at: m.last_claim_at,
        updated_at_ms: m.updated_at_ms,
        claim_requested: m.claim_requested,
        refund_requested: m.refund_requested.as_deref().map(u128_from).transpose()?,
        contract_signer: m.contract_signer,
    })
}

/// `chain_id ‖ signer ‖ nonce`, 36 bytes big-endian.
pub(super) fn intent_key(key: &IntentKey) -> [u8; 36] {
    let mut out = [0u8; 36];
    out[..8].copy_from_slice(&key.chain_id.to_be_bytes());
    out[8..28].copy_from_slice(key.signer.as_slice());
    out[28..].copy_from_slice(&key.nonce.to_be_bytes());
    out
}

/// `merchant_number ‖ deadline ‖ id`, 44 bytes big-endian.
pub(crate) fn pending_key(key: &PendingKey) -> [u8; 44] {
    let mut out = [0u8; 44];
    out[..4].copy_from_slice(&key.merchant_number.to_be_bytes());
    out[4..12].copy_from_slice(&key.deadline.to_be_bytes());
    out[12..].copy_from_slice(key.id.0.as_slice());
    out
}

pub(crate) fn decode_pending_key(bytes: &[u8]) -> Result<PendingKey> {
    if bytes.len() != 44 {
        return Err(Error::Corrupt("pending key is not 44 bytes"));
    }
    Ok(PendingKey {
        merchant_number: u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")),
        deadline: u64::from_be_bytes(bytes[4..12].try_into().expect("8 bytes")),
        id: PaymentId(B256::from_slice(&bytes[12..])),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::conformance::sample_payment;

    #[test]
    fn payment_round_trips_for_every_state_and_policy() {
        let policies = [
            SettlementPolicy::Direct,
            SettlementPolicy::Batched { max_rows: 250, max_wait_ms: 2000 },
            SettlementPolicy::Channel { claim_interval_secs: 60, claim_threshold: U256::from(10).pow(U256::from(70)) },
        ];
        let states = [
            PaymentState::Accepted,
            PaymentState::Queued,
            PaymentState::Submitted,
            PaymentState::Confirmed,
            PaymentState::Failed,
            PaymentState::Expired,
        ];
        for (i, policy) in policies.iter().enumerate() {
            for state in states {
                let mut p = sample_payment(i as u8, 7);
                p.policy = policy.clone();
                p.status.state = state;
                p.status.transaction = Some(B256::repeat_byte(9));
                p.status.block = Some(12);
                p.status.failure_reason = Some("invalid_exact_evm_insufficient_balance".into());
                assert_eq!(decode_payment(&encode_payment(&p)).unwrap(), p);
            }
        }
    }

    #[test]
    fn unknown_version_and_garbage_are_errors() {
        let mut bytes = encode_payment(&sample_payment(1, 1));
        bytes[0] = 2;
        assert!(matches!(decode_payment(&bytes), Err(Error::Corrupt("unknown record version"))));
        assert!(decode_payment(&[]).is_err());
        assert!(decode_payment(&[V1, 0xff, 0xff]).is_err());
    }

    #[test]
    fn pending_keys_sort_by_merchant_then_deadline() {
        let key = |m, d, b| PendingKey { merchant_number: m, deadline: d, id: PaymentId(B256::repeat_byte(b)) };
        let keys = [key(1, 5, 9), key(1, 256, 1), key(2, 1, 0), key(2, 1, 3)];
        for pair in keys.windows(2) {
            assert!(pending_key(&pair[0]) < pending_key(&pair[1]));
            assert_eq!(decode_pending_key(&pending_key(&pair[0])).unwrap(), pair[0]);
        }
    }
}
