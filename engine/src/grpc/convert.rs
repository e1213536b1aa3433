//! Conversions between the generated `x402.engine.v1` types and domain
//! types, and from engine errors to `tonic::Status`. The only module that
//! names both.

use alloy::primitives::{Address, B256, U256};
use tonic::Status;
use x402_proto::v1 as pb;

use crate::{
    Error,
    channels::{ChannelExtra, ChannelView, DepositPayload, VoucherPayload},
    domain::{
        AcceptedAsset, Authorization, ExactPayload, IdempotencyKey, Merchant, PaymentInput, PaymentRecord,
        PaymentState, PaymentStatus, Requirements, SettlementEvent, SettlementPolicy, Submission,
    },
    engine::MerchantUpdate,
    pipeline::SubmitOutcome,
    reason::InvalidField,
    verify::MAX_HEADER_LEN,
};
use x402_wire::fields::parse_decimal_u256;

/// Longest accepted short string (scheme, network, EIP-712 name/version, ids).
const MAX_SHORT_STRING: usize = 256;
/// Longest accepted signature: room for an ERC-6492 wrapper to be named in
/// the rejection, no more.
const MAX_SIGNATURE_LEN: usize = 4096;

pub(super) fn invalid_argument(err: &InvalidField) -> Status {
    Status::invalid_argument(err.to_string())
}

/// The gRPC status of a failed call: the caller's mistakes are theirs
/// (`INVALID_ARGUMENT`, `ALREADY_EXISTS`, `FAILED_PRECONDITION`), anything
/// that may pass later is `UNAVAILABLE` (retry: every call it can answer
/// is idempotent, and a payment is never accepted unrecorded), and the
/// rest, the server's own faults and configuration included, is
/// `INTERNAL`.
pub(super) fn status_from_error(err: &Error) -> Status {
    match err {
        Error::DuplicateApiKey { .. } => Status::already_exists(err.to_string()),
        Error::InvalidMerchant(_) => Status::invalid_argument(err.to_string()),
        Error::UnknownChain(_) => Status::failed_precondition(err.to_string()),
        Error::PipelineStopped | Error::PipelineThreadDied(_) => Status::unavailable(err.to_string()),
        // The storage's own words (file paths, the database's messages) are
        // for the operator's log, not for a merchant.
        _ if ledger_fault(err) => {
            tracing::warn!(%err, "a call failed on the ledger");
            Status::unavailable("the ledger cannot be written or read just now; nothing was recorded; retry")
        }
        _ if err.is_retryable() => Status::unavailable(err.for_clients()),
        _ => Status::internal(err.to_string()),
    }
}

/// Whether `err` is the ledger's storage failing (perhaps inside a failed
/// commit).
fn ledger_fault(err: &Error) -> bool {
    match err {
        Error::Storage(_) | Error::LedgerClosed(_) | Error::Io(_) => true,
        Error::Commit(cause) => ledger_fault(cause),
        _ => false,
    }
}

fn short_string(field: &'static str, value: String) -> Result<String, InvalidField> {
    if value.len() > MAX_SHORT_STRING {
        return Err(InvalidField::new(field, format!("is longer than {MAX_SHORT_STRING} bytes")));
    }
    Ok(value)
}

fn address(field: &'static str, bytes: &[u8]) -> Result<Address, InvalidField> {
    x402_wire::fields::address_from_bytes(bytes)
        .ok_or_else(|| InvalidField::new(field, format!("must be 20 bytes, got {}", bytes.len())))
}

fn word(field: &'static str, bytes: &[u8]) -> Result<B256, InvalidField> {
    x402_wire::fields::word_from_bytes(bytes)
        .ok_or_else(|| InvalidField::new(field, format!("must be 32 bytes, got {}", bytes.len())))
}

fn decimal(field: &'static str, value: &str) -> Result<U256, InvalidField> {
    parse_decimal_u256(value).ok_or_else(|| InvalidField::new(field, format!("{value:.80?} is not a decimal uint256")))
}

fn requirements(req: Option<pb::PaymentRequirements>) -> Result<Requirements, InvalidField> {
    let r = req.ok_or_else(|| InvalidField::new("requirements", "is required"))?;
    Ok(Requirements {
        scheme: short_string("requirements.scheme", r.scheme)?,
        network: short_string("requirements.network", r.network)?,
        amount: decimal("requirements.amount", &r.amount)?,
        asset: address("requirements.asset", &r.asset)?,
        pay_to: address("requirements.pay_to", &r.pay_to)?,
        max_timeout_seconds: r.max_timeout_seconds,
        eip712_name: short_string("requirements.eip712_name", r.eip712_name)?,
        eip712_version: short_string("requirements.eip712_version", r.eip712_version)?,
    })
}

fn exact(p: pb::ExactPayment) -> Result<ExactPayload, InvalidField> {
    let a = p.authorization.ok_or_else(|| InvalidField::new("exact.authorization", "is required"))?;
    if p.signature.len() > MAX_SIGNATURE_LEN {
        return Err(InvalidField::new("exact.signature", format!("is longer than {MAX_SIGNATURE_LEN} bytes")));
    }
    Ok(ExactPayload {
        network: short_string("exact.network", p.network)?,
        authorization: Authorization {
            from: address("exact.authorization.from", &a.from)?,
            to: address("exact.authorization.to", &a.to)?,
            value: decimal("exact.authorization.value", &a.value)?,
            valid_after: U256::from(a.valid_after),
            valid_before: U256::from(a.valid_before),
            nonce: word("exact.authorization.nonce", &a.nonce)?,
        },
        signature: p.signature,
    })
}

fn uint128(field: &'static str, value: &str) -> Result<u128, InvalidField> {
    let v = decimal(field, value)?;
    u128::try_from(v).map_err(|_| InvalidField::new(field, format!("{v} does not fit a uint128")))
}

/// `extra.receiverAuthorizer` and `extra.withdrawDelay` of the requirements.
fn channel_extra(r: &pb::PaymentRequirements) -> Result<ChannelExtra, InvalidField> {
    Ok(ChannelExtra {
        receiver_authorizer: if r.receiver_authorizer.is_empty() {
            Address::ZERO
        } else {
            address("requirements.receiver_authorizer", &r.receiver_authorizer)?
        },
        withdraw_delay: r.withdraw_delay,
    })
}

fn voucher(p: pb::VoucherPayment, r: &pb::PaymentRequirements) -> Result<VoucherPayload, InvalidField> {
    let c = p.channel_config.ok_or_else(|| InvalidField::new("voucher.channel_config", "is required"))?;
    let v = p.voucher.ok_or_else(|| InvalidField::new("voucher.voucher", "is required"))?;
    if v.signature.len() > MAX_SIGNATURE_LEN {
        return Err(InvalidField::new(
            "voucher.voucher.signature",
            format!("is longer than {MAX_SIGNATURE_LEN} bytes"),
        ));
    }
    let withdraw_delay = alloy::primitives::aliases::U40::try_from(c.withdraw_delay)
        .map_err(|_| InvalidField::new("voucher.channel_config.withdraw_delay", "does not fit a uint40"))?;
    Ok(VoucherPayload {
        network: short_string("voucher.network", p.network)?,
        config: x402_channel::ChannelConfig {
            payer: address("voucher.channel_config.payer", &c.payer)?,
            payerAuthorizer: address("voucher.channel_config.payer_authorizer", &c.payer_authorizer)?,
            receiver: address("voucher.channel_config.receiver", &c.receiver)?,
            receiverAuthorizer: address("voucher.channel_config.receiver_authorizer", &c.receiver_authorizer)?,
            token: address("voucher.channel_config.token", &c.token)?,
            withdrawDelay: withdraw_delay,
            salt: word("voucher.channel_config.salt", &c.salt)?,
        },
        channel_id: word("voucher.voucher.channel_id", &v.channel_id)?,
        max_claimable: uint128("voucher.voucher.max_claimable_amount", &v.max_claimable_amount)?,
        signature: v.signature.into(),
        charge: if p.charge.is_empty() { None } else { Some(uint128("voucher.charge", &p.charge)?) },
        extra: channel_extra(r)?,
        deposit: p.deposit.map(deposit).transpose()?,
        refund: match p.refund {
            Some(r) if r.amount.is_empty() => Some(None),
            Some(r) => Some(Some(uint128("voucher.refund.amount", &r.amount)?)),
            None => None,
        },
    })
}

fn deposit(d: pb::ChannelDeposit) -> Result<DepositPayload, InvalidField> {
    if d.signature.len() > MAX_SIGNATURE_LEN {
        return Err(InvalidField::new(
            "voucher.deposit.signature",
            format!("is longer than {MAX_SIGNATURE_LEN} bytes"),
        ));
    }
    Ok(DepositPayload {
        amount: uint128("voucher.deposit.amount", &d.amount)?,
        valid_after: d.valid_after,
        valid_before: d.valid_before,
        salt: decimal("voucher.deposit.salt", &d.salt)?,
        signature: d.signature.into(),
    })
}

/// The domain submission of a submit request.
pub(crate) fn submission(req: pb::SubmitRequest) -> Result<Submission, InvalidField> {
    let voucher_extra = req.requirements.clone();
    let requirements = requirements(req.requirements)?;
    let idempotency = if req.idempotency_key.is_empty() {
        None
    } else {
        Some(IdempotencyKey::parse(&req.idempotency_key).map_err(|m| InvalidField::new("idempotency_key", m))?)
    };
    let input = match req.payment {
        Some(pb::submit_request::Payment::Exact(p)) => PaymentInput::Exact(exact(p)?),
        Some(pb::submit_request::Payment::PaymentSignatureHeader(h)) => {
            if h.len() > MAX_HEADER_LEN {
                return Err(InvalidField::new(
                    "payment_signature_header",
                    format!("is {} bytes, more than {MAX_HEADER_LEN}", h.len()),
                ));
            }
            if requirements.scheme == "batch-settlement" {
                let extra = channel_extra(&voucher_extra.unwrap_or_default())?;
                PaymentInput::Voucher(Box::new(crate::channels::decode_header(&h, extra)?))
            } else {
                PaymentInput::Header(h)
            }
        }
        Some(pb::submit_request::Payment::Voucher(p)) => {
            PaymentInput::Voucher(Box::new(voucher(*p, &voucher_extra.unwrap_or_default())?))
        }
        None => {
            return Err(InvalidField::new("payment", "one of exact, payment_signature_header or voucher is required"));
        }
    };
    if idempotency.is_some() && matches!(input, PaymentInput::Voucher(_)) {
        return Err(InvalidField::new("idempotency_key", "applies to exact payments only"));
    }
    Ok(Submission { requirements, input, idempotency })
}

const fn state(s: PaymentState) -> pb::PaymentState {
    match s {
        PaymentState::Accepted => pb::PaymentState::Accepted,
        PaymentState::Queued => pb::PaymentState::Queued,
        PaymentState::Submitted => pb::PaymentState::Submitted,
        PaymentState::Confirmed => pb::PaymentState::Confirmed,
        PaymentState::Failed => pb::PaymentState::Failed,
        PaymentState::Expired => pb::PaymentState::Expired,
    }
}

pub(super) fn status(s: &PaymentStatus) -> pb::PaymentStatus {
    pb::PaymentStatus {
        state: state(s.state) as i32,
        transaction: s.transaction.map(|t| t.to_vec()).unwrap_or_default(),
        block: s.block.unwrap_or_default(),
        failure_reason: s.failure_reason.clone().unwrap_or_default(),
        updated_at_ms: s.updated_at_ms,
    }
}

/// The response to a submit with request id `request_id`.
pub(super) fn submit_response(request_id: u64, outcome: SubmitOutcome) -> pb::SubmitResponse {
    let mut resp = pb::SubmitResponse { request_id, ..Default::default() };
    match outcome {
        SubmitOutcome::Accepted { id, payer, status: s } => {
            resp.outcome = pb::Outcome::Accepted as i32;
            resp.payment_id = id.0.to_vec();
            resp.payer = payer.to_vec();
            resp.status = Some(status(&s));
        }
        SubmitOutcome::Duplicate { id, payer, status: s, retry } => {
            // A retry is answered ACCEPTED ("may serve") only while the
            // payment is owed or paid: not once it failed or expired.
            let retry = retry && (s.state.is_open() || s.state == PaymentState::Confirmed);
            resp.outcome = if retry { pb::Outcome::Accepted } else { pb::Outcome::Duplicate } as i32;
            resp.retry = retry;
            resp.payment_id = id.0.to_vec();
            resp.payer = payer.to_vec();
            resp.status = Some(status(&s));
        }
        SubmitOutcome::Rejected { id, payer, rejection } => {
            resp.outcome = pb::Outcome::Rejected as i32;
            resp.payment_id = id.map(|i| i.0.to_vec()).unwrap_or_default();
            resp.payer = payer.map(|p| p.to_vec()).unwrap_or_default();
            resp.reason = rejection.reason.code().to_owned();
            resp.message = rejection.message.into_owned();
        }
        SubmitOutcome::Verified { id, payer } => {
            resp.outcome = pb::Outcome::Accepted as i32;
            resp.payment_id = id.0.to_vec();
            resp.payer = payer.to_vec();
        }
        SubmitOutcome::VoucherAccepted { payer, channel } => {
            resp.outcome = pb::Outcome::Accepted as i32;
            resp.payment_id = channel.id.to_vec();
            resp.payer = payer.to_vec();
            resp.channel = Some(channel_state(&channel));
        }
        SubmitOutcome::VoucherRejected { payer, rejection, channel } => {
            resp.outcome = pb::Outcome::Rejected as i32;
            resp.payer = payer.map(|p| p.to_vec()).unwrap_or_default();
            resp.reason = rejection.reason.code().to_owned();
            resp.message = rejection.message.into_owned();
            resp.payment_id = channel.as_ref().map(|c| c.id.to_vec()).unwrap_or_default();
            resp.channel = channel.as_ref().map(channel_state);
        }
        SubmitOutcome::Invalid(field) => {
            resp.outcome = pb::Outcome::Error as i32;
            resp.error_code = tonic::Code::InvalidArgument as i32;
            resp.message = field.to_string();
        }
        SubmitOutcome::Unavailable(message) => {
            resp.outcome = pb::Outcome::Error as i32;
            resp.error_code = tonic::Code::Unavailable as i32;
            resp.message = message;
        }
    }
    resp
}

pub(super) fn channel(record: &crate::domain::ChannelRecord) -> pb::ChannelState {
    channel_state(&ChannelView::from(&record.channel))
}

fn channel_state(c: &ChannelView) -> pb::ChannelState {
    pb::ChannelState {
        channel_id: c.id.to_vec(),
        charged_cumulative_amount: c.charged.to_string(),
        signed_max_claimable: c.signed_max_claimable.to_string(),
        balance: c.balance.to_string(),
        total_claimed: c.total_claimed.to_string(),
        withdraw_finalize_after: c.withdraw_finalize_after.unwrap_or(0),
        refund_nonce: c.refund_nonce,
    }
}

pub(super) fn policy(p: &SettlementPolicy) -> pb::SettlementPolicy {
    use pb::settlement_policy::Strategy;
    let strategy = match p {
        SettlementPolicy::Direct => Strategy::Direct(pb::DirectPolicy {}),
        SettlementPolicy::Batched { max_rows, max_wait_ms } => {
            Strategy::Batched(pb::BatchedPolicy { max_rows: *max_rows, max_wait_ms: *max_wait_ms })
        }
        SettlementPolicy::Channel { claim_interval_secs, claim_threshold } => Strategy::Channel(pb::ChannelPolicy {
            claim_interval_secs: *claim_interval_secs,
            claim_threshold: claim_threshold.to_string(),
        }),
    };
    pb::SettlementPolicy { strategy: Some(strategy) }
}

fn policy_from(p: Option<pb::SettlementPolicy>) -> Result<SettlementPolicy, InvalidField> {
    use pb::settlement_policy::Strategy;
    match p.and_then(|p| p.strategy) {
        Some(Strategy::Direct(_)) => Ok(SettlementPolicy::Direct),
        Some(Strategy::Batched(b)) => {
            if b.max_rows == 0 {
                return Err(InvalidField::new("merchant.policy.batched.max_rows", "must be at least 1"));
            }
            Ok(SettlementPolicy::Batched { max_rows: b.max_rows, max_wait_ms: b.max_wait_ms })
        }
        Some(Strategy::Channel(c)) => Ok(SettlementPolicy::Channel {
            claim_interval_secs: c.claim_interval_secs,
            claim_threshold: decimal("merchant.policy.channel.claim_threshold", &c.claim_threshold)?,
        }),
        None => Err(InvalidField::new("merchant.policy", "one of direct, batched or channel is required")),
    }
}

pub(super) fn merchant(m: &Merchant) -> pb::Merchant {
    pb::Merchant {
        id: m.id.clone(),
        pay_to: m.pay_to.iter().map(|a| a.to_vec()).collect(),
        assets: m
            .assets
            .iter()
            .map(|a| pb::AcceptedAsset { network: format!("eip155:{}", a.chain_id), asset: a.asset.to_vec() })
            .collect(),
        policy: Some(policy(&m.policy)),
        has_api_key: m.api_key_sha256.is_some(),
        updated_at_ms: m.updated_at_ms,
    }
}

/// Shortest API key accepted.
const MIN_API_KEY_LEN: usize = 16;

pub(crate) fn merchant_update(req: pb::UpsertMerchantRequest) -> Result<MerchantUpdate, InvalidField> {
    let m = req.merchant.ok_or_else(|| InvalidField::new("merchant", "is required"))?;
    crate::domain::validate_merchant_id(&m.id).map_err(|msg| InvalidField::new("merchant.id", msg))?;
    let pay_to = m.pay_to.iter().map(|a| address("merchant.pay_to", a)).collect::<Result<_, _>>()?;
    let assets = m
        .assets
        .iter()
        .map(|a| {
            let network = crate::domain::Network::parse(&a.network).ok_or_else(|| {
                InvalidField::new("merchant.assets.network", format!("{:?} is not eip155:<chain id>", a.network))
            })?;
            Ok(AcceptedAsset { chain_id: network.chain_id(), asset: address("merchant.assets.asset", &a.asset)? })
        })
        .collect::<Result<_, InvalidField>>()?;
    let api_key = match req.api_key {
        k if k.is_empty() => None,
        k if k.len() < MIN_API_KEY_LEN => {
            return Err(InvalidField::new("api_key", format!("must be at least {MIN_API_KEY_LEN} characters")));
        }
        k => Some(short_string("api_key", k)?),
    };
    Ok(MerchantUpdate { id: m.id, pay_to, assets, policy: policy_from(m.policy)?, api_key })
}

pub(super) fn payment(p: &PaymentRecord) -> pb::Payment {
    pb::Payment {
        payment_id: p.id.0.to_vec(),
        merchant_id: p.merchant_id.clone(),
        network: format!("eip155:{}", p.chain_id),
        asset: p.asset.to_vec(),
        authorization: Some((&p.authorization).into()),
        signature: p.signature.clone(),
        policy: Some(policy(&p.policy)),
        status: Some(status(&p.status)),
        accepted_at_ms: p.accepted_at_ms,
    }
}

/// The request a gateway sends for `submission`: the inverse of the
/// server's conversion, for Rust clients (tests, benches; the load generator
/// uses [`x402_proto::encode`] directly).
pub fn submit_request(request_id: u64, submission: &Submission) -> pb::SubmitRequest {
    let r = &submission.requirements;
    match &submission.input {
        PaymentInput::Exact(p) => x402_proto::encode::exact_request(request_id, r, p),
        PaymentInput::Header(h) => x402_proto::encode::header_request(request_id, r, h.clone()),
        PaymentInput::Voucher(v) => x402_proto::encode::voucher_request(request_id, r, v),
    }
}

pub(super) fn event(e: &SettlementEvent) -> pb::SettlementEvent {
    pb::SettlementEvent {
        sequence: e.sequence,
        payment_id: e.payment_id.0.to_vec(),
        status: Some(status(&e.status)),
        channel: e.channel.map(|c| pb::ChannelState {
            channel_id: e.payment_id.0.to_vec(),
            charged_cumulative_amount: c.charged.to_string(),
            total_claimed: c.total_claimed.to_string(),
            balance: c.balance.to_string(),
            ..pb::ChannelState::default()
        }),
    }
}

/// A channel id and an optional uint128 amount of a channel request.
pub(crate) fn channel_request(id: &[u8], amount: Option<&str>) -> Result<(B256, Option<u128>), InvalidField> {
    let id = word("channel_id", id)?;
    let amount = match amount {
        Some("") => Some(u128::MAX),
        Some(a) => Some(uint128("amount", a)?),
        None => None,
    };
    Ok((id, amount))
}

pub(super) fn channel_view(c: &ChannelView) -> pb::ChannelState {
    channel_state(c)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tonic::Code;

    use super::status_from_error;
    use crate::Error;

    /// Every class of failure answers the code a client can act on: a
    /// failed commit is as retryable as what made it fail, and a server
    /// misconfiguration is never the caller's `INVALID_ARGUMENT`.
    #[test]
    fn each_failure_class_has_its_grpc_code() {
        let storage = || Error::Storage("rocksdb: IO error: No space left on device".into());
        let rpc = x402_chain::Error::Rpc(alloy::transports::TransportErrorKind::custom_str("connection refused"));
        let cases = [
            (storage(), Code::Unavailable),
            (Error::Commit(Arc::new(storage())), Code::Unavailable),
            (Error::Commit(Arc::new(Error::LedgerClosed("the disk is full".into()))), Code::Unavailable),
            (Error::Commit(Arc::new(Error::Corrupt("a record"))), Code::Internal),
            (Error::LedgerClosed("the disk is full".into()), Code::Unavailable),
            (Error::Io(std::io::Error::other("broken pipe")), Code::Unavailable),
            (Error::Timeout("deposit transaction not mined".into()), Code::Unavailable),
            (Error::from(rpc), Code::Unavailable),
            (Error::from(x402_chain::Error::Decode("short".into())), Code::Internal),
            (Error::PipelineStopped, Code::Unavailable),
            (Error::PipelineThreadDied("shard-0".into()), Code::Unavailable),
            (Error::InvalidMerchant("pay_to: is required".into()), Code::InvalidArgument),
            (Error::DuplicateApiKey { merchant: "m1".into() }, Code::AlreadyExists),
            (Error::UnknownChain(8453), Code::FailedPrecondition),
            (Error::Config("chain: a signer key is not a 32-byte hex private key".into()), Code::Internal),
            (Error::Signing("the authorizer key refused".into()), Code::Internal),
            (Error::Corrupt("a record"), Code::Internal),
            (Error::Schema { found: 9, expected: 1 }, Code::Internal),
        ];
        for (err, code) in cases {
            assert_eq!(status_from_error(&err).code(), code, "{err}");
        }
        let status = status_from_error(&Error::Commit(Arc::new(storage())));
        assert!(!status.message().contains("rocksdb"), "the storage's words stay in the log: {}", status.message());
    }
}
