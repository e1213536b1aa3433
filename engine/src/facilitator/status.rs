//! Where a merchant's settlements stand, over HTTP. x402 has no standard
//! answer to "where is my settlement?", and x402d has the ledger to give
//! one. The routes are x402d's own, authenticated as `/verify` and
//! `/settle` are (`Authorization: Bearer <merchant key>`), and a merchant
//! sees only its own payments and channels:
//!
//! - `GET /settlements/{paymentId}`: one payment;
//! - `GET /settlements?transaction=0x…`: the payments a settlement
//!   transaction settled, or tried to (any of its fee-bumped versions, or
//!   the transaction that spent an authorization elsewhere), ordered by
//!   id, all of them or the first `limit`. Each answers its *current*
//!   `transaction`: a payment sent again after a reorg or a lost nonce
//!   names the later one;
//! - `GET /settlements?limit=N`: the merchant's most recently changed
//!   payments, newest first (`N` up to [`MAX_LIMIT`], [`DEFAULT_LIMIT`]
//!   when absent);
//! - `GET /channels/{channelId}`: a channel x402d keeps for the merchant
//!   (its vouchers came over gRPC).
//!
//! Another merchant's payment or channel is answered 404, as one that does
//! not exist: the routes tell nobody what others were paid.

use std::sync::Arc;

use alloy::primitives::{Address, B256, U256};
use axum::{
    Extension, Json,
    extract::{Path, Query, State},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};

use super::{Api, Failure};
use crate::{
    channels::ChannelView,
    domain::{ChannelRecord, Merchant, PaymentId, PaymentRecord, PaymentState},
};

/// Payments listed when a request names no `limit`.
pub const DEFAULT_LIMIT: usize = 20;
/// The most payments one list answers.
pub const MAX_LIMIT: usize = 100;

/// Where one payment stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettlementJson {
    /// The payment's id (chain, token, payer and nonce), 0x-hex.
    pub payment_id: B256,
    /// The merchant it pays.
    pub merchant: String,
    /// The CAIP-2 network it is paid on.
    pub network: String,
    /// The token.
    #[serde(with = "x402_wire::fields::address")]
    pub asset: Address,
    /// Who pays.
    #[serde(with = "x402_wire::fields::address")]
    pub payer: Address,
    /// Who is paid.
    #[serde(with = "x402_wire::fields::address")]
    pub pay_to: Address,
    /// Atomic token units, a decimal string.
    #[serde(with = "x402_wire::fields::decimal")]
    pub amount: U256,
    /// The authorization's `validBefore` (Unix seconds).
    pub valid_before: u64,
    /// How it is settled: `direct`, `batched` or `channel`.
    pub strategy: String,
    /// `accepted`, `queued`, `submitted`, `confirmed`, `failed` or `expired`.
    pub state: String,
    /// The settlement transaction once there is one (or the one that spent
    /// the authorization elsewhere).
    pub transaction: Option<B256>,
    /// The block that transaction was mined in, once known.
    pub block: Option<u64>,
    /// The x402 reason code of a failed or expired payment.
    pub failure_reason: Option<String>,
    /// When it was accepted (Unix milliseconds).
    pub accepted_at_ms: u64,
    /// When its state last changed (Unix milliseconds).
    pub updated_at_ms: u64,
}

/// A list of payments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementsJson {
    /// The payments, in the order the route gives.
    pub settlements: Vec<SettlementJson>,
}

/// Where a channel stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelJson {
    /// The channel id, 0x-hex.
    pub channel_id: B256,
    /// The merchant it pays.
    pub merchant: String,
    /// The CAIP-2 network it is on.
    pub network: String,
    /// The channel contract.
    #[serde(with = "x402_wire::fields::address")]
    pub contract: Address,
    /// The payer.
    #[serde(with = "x402_wire::fields::address")]
    pub payer: Address,
    /// The receiver.
    #[serde(with = "x402_wire::fields::address")]
    pub receiver: Address,
    /// The token.
    #[serde(with = "x402_wire::fields::address")]
    pub token: Address,
    /// What its vouchers have been charged in total, a decimal string.
    #[serde(with = "x402_wire::fields::u128_decimal")]
    pub charged: u128,
    /// The highest voucher the payer signed, a decimal string.
    #[serde(with = "x402_wire::fields::u128_decimal")]
    pub signed_max_claimable: u128,
    /// Its balance on chain as last read, a decimal string.
    #[serde(with = "x402_wire::fields::u128_decimal")]
    pub balance: u128,
    /// What the receiver has claimed on chain, a decimal string.
    #[serde(with = "x402_wire::fields::u128_decimal")]
    pub total_claimed: u128,
    /// When a pending withdrawal can be finalized (Unix seconds), if one is.
    pub withdraw_finalize_after: Option<u64>,
    /// The contract's refund nonce.
    pub refund_nonce: u64,
    /// When the chain was last read for it (Unix seconds).
    pub synced_at: u64,
}

const fn state_name(state: PaymentState) -> &'static str {
    match state {
        PaymentState::Accepted => "accepted",
        PaymentState::Queued => "queued",
        PaymentState::Submitted => "submitted",
        PaymentState::Confirmed => "confirmed",
        PaymentState::Failed => "failed",
        PaymentState::Expired => "expired",
    }
}

impl From<&PaymentRecord> for SettlementJson {
    fn from(p: &PaymentRecord) -> Self {
        let a = &p.authorization;
        Self {
            payment_id: p.id.0,
            merchant: p.merchant_id.clone(),
            network: format!("eip155:{}", p.chain_id),
            asset: p.asset,
            payer: a.from,
            pay_to: a.to,
            amount: a.value,
            valid_before: a.valid_before_secs(),
            strategy: p.policy.name().into(),
            state: state_name(p.status.state).into(),
            transaction: p.status.transaction,
            block: p.status.block,
            failure_reason: p.status.failure_reason.clone(),
            accepted_at_ms: p.accepted_at_ms,
            updated_at_ms: p.status.updated_at_ms,
        }
    }
}

impl From<&ChannelRecord> for ChannelJson {
    fn from(r: &ChannelRecord) -> Self {
        let (c, view) = (&r.channel, ChannelView::from(&r.channel));
        Self {
            channel_id: c.id,
            merchant: r.merchant_id.clone(),
            network: format!("eip155:{}", r.chain_id),
            contract: r.contract,
            payer: c.config.payer,
            receiver: c.config.receiver,
            token: c.config.token,
            charged: view.charged,
            signed_max_claimable: view.signed_max_claimable,
            balance: view.balance,
            total_claimed: view.total_claimed,
            withdraw_finalize_after: view.withdraw_finalize_after,
            refund_nonce: view.refund_nonce,
            synced_at: c.synced_at,
        }
    }
}

/// Runs `read` (an engine call whose ledger work runs on a blocking
/// thread, up to thousands of records) holding a place until it is done,
/// even if the client went away meanwhile: one of [`STATUS_READS`] for all
/// merchants and one of [`STATUS_READS_PER_MERCHANT`] of its own, else
/// 503. So status polling cannot take the blocking threads settlement
/// reads on, nor one merchant every other's status reads.
async fn read<T: Send + 'static>(
    api: &Api,
    merchant: &Merchant,
    read: impl Future<Output = crate::Result<T>> + Send + 'static,
) -> Result<T, Failure> {
    let busy = |whose: &str| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many settlement status reads {whose} at once; retry shortly"),
        )
    };
    let own = api
        .status_reads_per_merchant
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(merchant.number)
        .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(STATUS_READS_PER_MERCHANT)))
        .clone();
    let own = own.try_acquire_owned().map_err(|_| busy(&format!("of merchant {:?}", merchant.id)))?;
    let all = api.status_reads.clone().try_acquire_owned().map_err(|_| busy("of all merchants"))?;
    let task = tokio::spawn(async move {
        let _places = (own, all);
        read.await
    });
    let done = task.await.map_err(|_| Failure(StatusCode::INTERNAL_SERVER_ERROR, "a status read failed".into()))?;
    done.map_err(|e| unavailable(&e))
}

/// Status reads served at once, all merchants together.
pub const STATUS_READS: usize = 32;
/// Of those, the most one merchant may have at once.
pub const STATUS_READS_PER_MERCHANT: usize = 4;

/// A 32-byte id from a path or query, the field named when it is not one.
fn id32(field: &str, text: &str) -> Result<B256, Failure> {
    let hex = text.strip_prefix("0x").unwrap_or(text);
    if hex.len() != 64 {
        return Err(Failure(StatusCode::BAD_REQUEST, format!("{field}: must be 32 bytes as 0x-hex, got {text:?}")));
    }
    hex.parse().map_err(|_| Failure(StatusCode::BAD_REQUEST, format!("{field}: is not hex: {text:?}")))
}

fn unavailable(e: &crate::Error) -> Failure {
    Failure(StatusCode::SERVICE_UNAVAILABLE, e.for_clients())
}

fn not_found(what: &str, id: B256) -> Failure {
    Failure(StatusCode::NOT_FOUND, format!("no {what} {id}"))
}

/// `GET /settlements/{paymentId}`.
pub(super) async fn settlement(
    State(api): State<Api>,
    Extension(merchant): Extension<Arc<Merchant>>,
    Path(id): Path<String>,
) -> Result<Json<SettlementJson>, Failure> {
    let id = id32("paymentId", &id)?;
    let engine = api.engine.clone();
    match read(&api, &merchant, async move { engine.payment(PaymentId(id)).await }).await? {
        Some(p) if p.merchant_id == merchant.id => Ok(Json(SettlementJson::from(&p))),
        _ => Err(not_found("payment", id)),
    }
}

/// The query of `GET /settlements`.
#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    transaction: Option<String>,
    limit: Option<String>,
}

/// `GET /settlements?transaction=0x…` or `GET /settlements?limit=N`.
pub(super) async fn settlements(
    State(api): State<Api>,
    Extension(merchant): Extension<Arc<Merchant>>,
    Query(query): Query<ListQuery>,
) -> Result<Json<SettlementsJson>, Failure> {
    let limit = match query.limit.as_deref() {
        None => None,
        Some(text) => match text.parse::<usize>() {
            Ok(n @ 1..=MAX_LIMIT) => Some(n),
            _ => {
                let message = format!("limit: must be a whole number from 1 to {MAX_LIMIT}, got {text:?}");
                return Err(Failure(StatusCode::BAD_REQUEST, message));
            }
        },
    };
    let engine = api.engine.clone();
    let payments = match query.transaction.as_deref() {
        // All of them unless limited: a batch holds at most its policy's rows.
        Some(tx) => {
            let tx = id32("transaction", tx)?;
            let mut payments = read(&api, &merchant, async move { engine.payments_by_transaction(tx).await }).await?;
            payments.retain(|p| p.merchant_id == merchant.id);
            payments.truncate(limit.unwrap_or(usize::MAX));
            payments
        }
        None => {
            let (limit, number) = (limit.unwrap_or(DEFAULT_LIMIT), merchant.number);
            read(&api, &merchant, async move { engine.recent_payments(number, limit).await }).await?
        }
    };
    Ok(Json(SettlementsJson { settlements: payments.iter().map(SettlementJson::from).collect() }))
}

/// `GET /channels/{channelId}`.
pub(super) async fn channel(
    State(api): State<Api>,
    Extension(merchant): Extension<Arc<Merchant>>,
    Path(id): Path<String>,
) -> Result<Json<ChannelJson>, Failure> {
    let id = id32("channelId", &id)?;
    let engine = api.engine.clone();
    let channels = read(&api, &merchant, async move { engine.channels_by_id(vec![id]).await }).await?;
    match channels.first() {
        Some(c) if c.merchant_id == merchant.id => Ok(Json(ChannelJson::from(c))),
        _ => Err(not_found("channel", id)),
    }
}
