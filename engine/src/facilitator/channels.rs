//! `batch-settlement` over the facilitator API, as the reference resource
//! server uses it: the **server** keeps each channel's charged total and
//! checks vouchers against it; the facilitator checks what the chain says
//! and executes what the server asks:
//!
//! - `/verify` of a `voucher`, `deposit` or `refund` payload: the config
//!   against the requirements, the channel id, the voucher's (and the
//!   deposit's) signature, then the channel on chain — it must hold a
//!   balance, the voucher must fit it and be above what is claimed. The
//!   answer's `extra` is the channel on chain (`balance`, `totalClaimed`,
//!   `withdrawRequestedAt`, `refundNonce`), which the server mirrors;
//! - `/settle` of a `deposit` puts it on chain (simulated first, never
//!   twice); of a server-authored `claim` sends `claimWithSignature` (signed
//!   with the engine's receiver authorizer key when the server sent no
//!   signature); of a `settle` sends `settle(receiver, token)`; a `voucher`
//!   needs nothing on chain.
//!
//! Over gRPC x402d keeps the charged totals itself (see
//! [`crate::channels`]); here it does not, since the reference server does.

use std::{sync::Arc, time::Duration};

use alloy::{
    primitives::{B256, Bytes},
    signers::{SignerSync, local::PrivateKeySigner},
    sol_types::SolCall,
};
use serde::Deserialize;
use x402_chain::{
    AlloyChain, Chain,
    channel::{ClaimRow, claim_and_settle_calldata, claim_batch, decode_state, state_calldata},
    contracts::X402BatchSettlement,
};
use x402_channel::{ChannelConfig, ChannelDomain, OnChain};

use super::{Api, FacilitatorRequest, Failure, SettleResponse, VerifyResponse, channel_requirements};
use crate::{
    channels::{ChannelContracts, DepositFailure, VerifiedVoucher, put_deposit, verify_voucher},
    domain::Merchant,
    reason::{InvalidField, Reason},
    verify::{Refusal, Uint, parse_address, parse_b256, parse_hex, parse_uint},
};

/// What the facilitator needs to act on channels.
#[derive(Clone, Debug)]
pub struct ChannelFacilitator {
    pub chain: Arc<AlloyChain>,
    pub contracts: ChannelContracts,
    /// Signs claim batches the server sends unsigned.
    pub authorizer: Option<PrivateKeySigner>,
    /// How long a claim or settle transaction is waited for.
    pub receipt_timeout: Duration,
}

/// The `type` of a `batch-settlement` payload.
#[derive(Deserialize)]
struct Tagged {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimPayload {
    claims: Vec<ClaimJson>,
    claim_authorizer_signature: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimJson {
    voucher: ClaimVoucherJson,
    signature: String,
    total_claimed: Uint,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimVoucherJson {
    channel: ConfigJson,
    max_claimable_amount: Uint,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigJson {
    payer: String,
    payer_authorizer: String,
    receiver: String,
    receiver_authorizer: String,
    token: String,
    withdraw_delay: Uint,
    salt: String,
}

#[derive(Deserialize)]
struct SettlePayload {
    receiver: String,
    token: String,
}

fn invalid(path: &str, message: &str) -> InvalidField {
    InvalidField::new(format!("paymentPayload.payload.{path}"), message.to_owned())
}

fn config(path: &str, c: &ConfigJson) -> Result<ChannelConfig, InvalidField> {
    let address = |field: &str, s: &str| {
        parse_address(s).ok_or_else(|| invalid(&format!("{path}.{field}"), "is not a 20-byte hex address"))
    };
    let delay = parse_uint(&c.withdraw_delay)
        .and_then(|d| u64::try_from(d).ok())
        .and_then(|d| alloy::primitives::aliases::U40::try_from(d).ok())
        .ok_or_else(|| invalid(&format!("{path}.withdrawDelay"), "is not a uint40"))?;
    Ok(ChannelConfig {
        payer: address("payer", &c.payer)?,
        payerAuthorizer: address("payerAuthorizer", &c.payer_authorizer)?,
        receiver: address("receiver", &c.receiver)?,
        receiverAuthorizer: address("receiverAuthorizer", &c.receiver_authorizer)?,
        token: address("token", &c.token)?,
        withdrawDelay: delay,
        salt: parse_b256(&c.salt).ok_or_else(|| invalid(&format!("{path}.salt"), "is not 32 hex bytes"))?,
    })
}

fn uint128(path: &str, v: &Uint) -> Result<u128, InvalidField> {
    parse_uint(v).and_then(|v| u128::try_from(v).ok()).ok_or_else(|| invalid(path, "is not a uint128"))
}

impl ChannelFacilitator {
    fn unavailable(e: impl std::fmt::Display) -> Failure {
        Failure(axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }

    async fn onchain(&self, v: &VerifiedVoucher) -> Result<OnChain, Failure> {
        let out = self.chain.call(v.contract, state_calldata(v.channel_id)).await.map_err(Self::unavailable)?;
        decode_state(&out, v.config.withdrawDelay.to::<u64>()).map_err(Self::unavailable)
    }

    /// Signs, sends and waits for a call of the channel contract.
    async fn send(&self, input: Bytes) -> Result<Result<B256, String>, Failure> {
        let tx = self.chain.sign_call(self.contracts.channels, input, None).await.map_err(Self::unavailable)?;
        self.chain.broadcast(&tx).await.map_err(Self::unavailable)?;
        match self.chain.wait_receipt(&[tx.hash], self.receipt_timeout).await.map_err(Self::unavailable)? {
            Some(r) if r.success => Ok(Ok(r.tx)),
            Some(r) => Ok(Err(format!("transaction {} reverted", r.tx))),
            None => Err(Self::unavailable(format!("transaction {} not mined in {:?}", tx.hash, self.receipt_timeout))),
        }
    }
}

/// The channel on chain as the reference server reads it from `extra`.
fn onchain_extra(id: B256, delay: u64, c: &OnChain) -> serde_json::Value {
    serde_json::json!({
        "channelId": id.to_string(),
        "balance": c.balance.to_string(),
        "totalClaimed": c.total_claimed.to_string(),
        "withdrawRequestedAt": c.withdrawal.map_or(0, |w| w.finalize_after.saturating_sub(delay)),
        "refundNonce": c.refund_nonce.to_string(),
    })
}

/// A `voucher`, `deposit` or `refund` payload, checked statelessly.
fn verified(
    api: &Api,
    merchant: &Merchant,
    body: &FacilitatorRequest,
) -> Result<Result<VerifiedVoucher, Refusal>, Failure> {
    let (requirements, extra) = channel_requirements(&body.payment_requirements)?;
    let header = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(body.payment_payload.to_string())
    };
    let payload = crate::channels::decode_header(&header, extra)?;
    let contracts = api.info.channels.as_ref().map_or_else(ChannelContracts::default, |c| c.contracts);
    Ok(verify_voucher(merchant, &requirements, payload, contracts))
}

fn refused(refusal: Refusal) -> Result<VerifyResponse, Failure> {
    match refusal {
        Refusal::Rejected { payer, rejection, .. } => Ok(VerifyResponse {
            is_valid: false,
            invalid_reason: Some(rejection.reason.code().into()),
            invalid_message: Some(rejection.message.into_owned()),
            payer: payer.map(|p| p.to_string()),
            extra: None,
        }),
        Refusal::Invalid(field) => Err(field.into()),
    }
}

/// `/verify` of a `batch-settlement` payload.
pub(super) async fn verify(
    api: &Api,
    merchant: &Merchant,
    body: FacilitatorRequest,
) -> Result<VerifyResponse, Failure> {
    let channels = api.info.channels.as_ref().ok_or_else(not_configured)?;
    let v = match verified(api, merchant, &body)? {
        Ok(v) => v,
        Err(refusal) => return refused(refusal),
    };
    let onchain = channels.onchain(&v).await?;
    let delay = v.config.withdrawDelay.to::<u64>();
    let deposit = v.deposit.as_ref().map_or(0, |d| d.amount);
    let balance = onchain.balance.saturating_add(deposit);
    let failure = if balance == 0 {
        Some((Reason::ChannelNotFound, "the channel has no balance".to_owned()))
    } else if v.max_claimable > balance {
        Some((Reason::CumulativeExceedsBalance, format!("voucher {} exceeds the balance {balance}", v.max_claimable)))
    } else if v.refund.is_none() && v.max_claimable <= onchain.total_claimed {
        Some((
            Reason::CumulativeBelowClaimed,
            format!("voucher {} is not above the claimed {}", v.max_claimable, onchain.total_claimed),
        ))
    } else {
        None
    };
    let extra = Some(onchain_extra(v.channel_id, delay, &onchain));
    let payer = Some(v.config.payer.to_string());
    Ok(match failure {
        None => VerifyResponse { is_valid: true, payer, extra, ..VerifyResponse::default() },
        Some((reason, message)) => VerifyResponse {
            is_valid: false,
            invalid_reason: Some(reason.code().into()),
            invalid_message: Some(message),
            payer,
            extra,
        },
    })
}

fn not_configured() -> Failure {
    Failure(
        axum::http::StatusCode::NOT_IMPLEMENTED,
        "batch-settlement needs a [chain] with a receiver authorizer key".into(),
    )
}

/// `/settle` of a `batch-settlement` payload.
pub(super) async fn settle(
    api: &Api,
    merchant: &Merchant,
    body: FacilitatorRequest,
) -> Result<SettleResponse, Failure> {
    let channels = api.info.channels.as_ref().ok_or_else(not_configured)?;
    let network = body.payment_requirements.network.clone();
    let kind: Tagged = serde_json::from_value(body.payment_payload["payload"].clone())
        .map_err(|e| InvalidField::new("paymentPayload.payload.type", e.to_string()))?;
    let base = SettleResponse { network: network.clone(), ..SettleResponse::default() };
    let failed = |reason: &str, message: String| SettleResponse {
        error_reason: Some(reason.into()),
        error_message: Some(message),
        ..base.clone()
    };
    match kind.kind.as_str() {
        "claim" => {
            let payload: ClaimPayload = serde_json::from_value(body.payment_payload["payload"].clone())
                .map_err(|e| InvalidField::new("paymentPayload.payload", e.to_string()))?;
            claim(channels, payload, base).await
        }
        "settle" => {
            let payload: SettlePayload = serde_json::from_value(body.payment_payload["payload"].clone())
                .map_err(|e| InvalidField::new("paymentPayload.payload", e.to_string()))?;
            let receiver = parse_address(&payload.receiver).ok_or_else(|| invalid("receiver", "is not an address"))?;
            let token = parse_address(&payload.token).ok_or_else(|| invalid("token", "is not an address"))?;
            let input = X402BatchSettlement::settleCall { receiver, token }.abi_encode().into();
            Ok(match channels.send(input).await? {
                Ok(tx) => SettleResponse { success: true, transaction: tx.to_string(), ..base },
                Err(message) => failed("invalid_batch_settlement_evm_settle_transaction_failed", message),
            })
        }
        "voucher" | "deposit" => {
            let v = match verified(api, merchant, &body)? {
                Ok(v) => v,
                Err(refusal) => {
                    let r = refused(refusal)?;
                    return Ok(SettleResponse {
                        payer: r.payer,
                        ..failed(r.invalid_reason.as_deref().unwrap_or_default(), r.invalid_message.unwrap_or_default())
                    });
                }
            };
            let delay = v.config.withdrawDelay.to::<u64>();
            let payer = Some(v.config.payer.to_string());
            let Some(deposit) = v.deposit.clone() else {
                // A voucher needs nothing on chain: the server claims it later.
                let onchain = channels.onchain(&v).await?;
                let extra = serde_json::json!({ "channelState": onchain_extra(v.channel_id, delay, &onchain) });
                return Ok(SettleResponse { success: true, payer, extra: Some(extra), ..base });
            };
            Ok(match put_deposit(&*channels.chain, &v, &deposit).await {
                Ok((tx, onchain)) => SettleResponse {
                    success: true,
                    payer,
                    transaction: tx.map(|t| t.to_string()).unwrap_or_default(),
                    amount: Some(deposit.amount.to_string()),
                    extra: Some(serde_json::json!({ "channelState": onchain_extra(v.channel_id, delay, &onchain) })),
                    ..base
                },
                Err(DepositFailure::Rejected(message)) => {
                    SettleResponse { payer, ..failed(Reason::DepositFailed.code(), message) }
                }
                Err(DepositFailure::Unavailable(e)) => return Err(ChannelFacilitator::unavailable(e)),
            })
        }
        other => Ok(failed(
            "invalid_batch_settlement_evm_payload_type",
            format!("payload type {other:?} is not settled here (x402d settles voucher, deposit, claim and settle)"),
        )),
    }
}

/// A server-authored claim: `claimWithSignature` with the server's batch
/// signature, or the engine's when the server sent none.
async fn claim(
    channels: &ChannelFacilitator,
    payload: ClaimPayload,
    base: SettleResponse,
) -> Result<SettleResponse, Failure> {
    let chain_id = channels.chain.chain_id();
    let domain = ChannelDomain::new(chain_id, channels.contracts.channels);
    let mut rows = Vec::with_capacity(payload.claims.len());
    for (i, c) in payload.claims.iter().enumerate() {
        let config = config(&format!("claims[{i}].voucher.channel"), &c.voucher.channel)?;
        rows.push(ClaimRow {
            channel_id: domain.channel_id(&config),
            config,
            max_claimable: uint128(
                &format!("claims[{i}].voucher.maxClaimableAmount"),
                &c.voucher.max_claimable_amount,
            )?,
            signature: parse_hex(&c.signature)
                .ok_or_else(|| invalid(&format!("claims[{i}].signature"), "is not 0x-hex"))?
                .into(),
            total_claimed: uint128(&format!("claims[{i}].totalClaimed"), &c.total_claimed)?,
        });
    }
    if rows.is_empty() {
        return Err(invalid("claims", "is empty").into());
    }
    let signature = match &payload.claim_authorizer_signature {
        Some(s) => parse_hex(s).ok_or_else(|| invalid("claimAuthorizerSignature", "is not 0x-hex"))?,
        None => {
            let authorizer = channels.authorizer.as_ref().ok_or_else(not_configured)?;
            if let Some(row) = rows.iter().find(|r| r.config.receiverAuthorizer != authorizer.address()) {
                return Ok(SettleResponse {
                    error_reason: Some(Reason::ReceiverAuthorizerMismatch.code().into()),
                    error_message: Some(format!(
                        "channel {} is authorized by {}, not this facilitator's {}",
                        row.channel_id,
                        row.config.receiverAuthorizer,
                        authorizer.address()
                    )),
                    ..base
                });
            }
            let digest = domain.claim_batch_digest(&claim_batch(&rows));
            authorizer.sign_hash_sync(&digest).map_err(ChannelFacilitator::unavailable)?.as_bytes().to_vec()
        }
    };
    let input = claim_and_settle_calldata(&rows, &signature, &[], &[]);
    Ok(match channels.send(input).await? {
        Ok(tx) => SettleResponse { success: true, transaction: tx.to_string(), ..base },
        Err(message) => SettleResponse {
            error_reason: Some("invalid_batch_settlement_evm_claim_transaction_failed".into()),
            error_message: Some(message),
            ..base
        },
    })
}
