//! The standard x402 facilitator HTTP API, so that resource servers built on
//! the reference middleware can use x402d without a change:
//!
//! - `POST /verify` runs every check of a submit against the same state
//!   (replay index, reservations) and changes nothing;
//! - `POST /settle` records the payment durably, then waits for its
//!   merchant's strategy to settle it: `direct` and `batched` answer with
//!   the confirmed transaction. Past `settle_wait` it answers the
//!   reference's `settlement_pending` (the payment still settles);
//! - a payment already recorded is paid for once only: `/verify` answers it
//!   `isValid: false` and `/settle` `success: false`, both with
//!   `invalid_exact_evm_nonce_already_used`, so the resource server serves
//!   it once. The one exception is the `/settle` retry the reference server
//!   makes after a `settlement_pending` answer with a transaction (once, by
//!   the same merchant). An x402 `payment-identifier` is the client's and
//!   unsigned, so a replay carries it too: it re-authorizes nothing, and the
//!   same id with another payment of the merchant is HTTP 409;
//! - `GET /supported` lists each network literally with the signers;
//! - `GET /settlements…` and `GET /channels/{id}` tell a merchant where its
//!   payments and channels stand (see [`status`]);
//! - `batch-settlement` follows the reference facilitator: the resource
//!   server keeps the charged totals (see the `channels` module).
//!
//! Bodies are x402 v2, or v1 for `exact` (`maxAmountRequired`, v1 network
//! names, answered with the v1 name); business failures are HTTP 200 with a
//! full body, as the reference clients require. A merchant authenticates with
//! `Authorization: Bearer <its API key>`, as on gRPC.

mod channels;
pub mod status;

use std::{sync::Arc, time::Duration};

use alloy::{
    primitives::{Address, U256},
    signers::local::PrivateKeySigner,
};
use axum::{
    Extension, Json, Router,
    extract::{State, rejection::JsonRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use serde::Deserialize;
use tokio::time::Instant;
use x402_chain::Chain as _;
use x402_wire::{SettleResponse, SupportedKind, SupportedResponse, VerifyResponse, X402_VERSION};

use crate::{
    Engine, SubmitOutcome,
    channels::ChannelExtra,
    domain::{IdempotencyKey, Merchant, PaymentId, PaymentInput, PaymentState, Requirements, Submission},
    reason::{InvalidField, Reason},
};

/// What `/supported` advertises and how long `/settle` waits.
#[derive(Clone, Debug)]
pub struct FacilitatorInfo {
    /// CAIP-2 networks served, listed literally.
    pub networks: Vec<String>,
    /// Settlement signer addresses.
    pub signers: Vec<Address>,
    /// How long `/settle` waits for a settlement before answering
    /// `settlement_pending`.
    pub settle_wait: Duration,
    /// `batch-settlement` on each chain settled (none on a record-only node).
    pub channels: Vec<ChannelFacilitator>,
    /// `/verify` and `/settle` requests served at once; past it, 503.
    pub max_concurrent: usize,
    /// Of those, the most one merchant may have at once.
    pub max_concurrent_per_merchant: usize,
}

/// The largest `/verify` or `/settle` body read, in bytes (a request is
/// about 2 KiB; a claim of many channels more).
pub const MAX_BODY: usize = 256 * 1024;

pub use self::channels::{ChannelFacilitator, SpendLimiter};

#[derive(Clone)]
struct Api {
    engine: Arc<Engine>,
    info: Arc<FacilitatorInfo>,
    pending_retries: Arc<PendingRetries>,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Each merchant's share of `in_flight`, by merchant number.
    merchant_in_flight: Arc<std::sync::Mutex<std::collections::HashMap<u32, Arc<tokio::sync::Semaphore>>>>,
    /// Settlement status reads served at once ([`status::STATUS_READS`]).
    status_reads: Arc<tokio::sync::Semaphore>,
    /// Each merchant's share of them, by merchant number.
    status_reads_per_merchant: Arc<std::sync::Mutex<std::collections::HashMap<u32, Arc<tokio::sync::Semaphore>>>>,
}

/// The facilitator routes, to merge into the HTTP listener's router.
/// `/verify` and `/settle` authenticate the merchant before their body is
/// read, read at most [`MAX_BODY`] bytes of it, and are served
/// [`FacilitatorInfo::max_concurrent`] at a time.
pub fn router(engine: Arc<Engine>, info: FacilitatorInfo) -> Router {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(info.max_concurrent));
    let api = Api {
        engine,
        info: Arc::new(info),
        pending_retries: Arc::default(),
        in_flight,
        merchant_in_flight: Arc::default(),
        status_reads: Arc::new(tokio::sync::Semaphore::new(status::STATUS_READS)),
        status_reads_per_merchant: Arc::default(),
    };
    Router::new()
        .route("/verify", post(verify))
        .route("/settle", post(settle))
        .route("/settlements", get(status::settlements))
        .route("/settlements/{id}", get(status::settlement))
        .route("/channels/{id}", get(status::channel))
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), admit))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .route("/supported", get(supported))
        .with_state(api)
}

/// Authenticates the merchant from the headers alone, and takes a place
/// among the requests served at once, before anything reads the body.
async fn admit(
    State(api): State<Api>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, Failure> {
    let merchant = api.merchant(request.headers())?;
    let share = api
        .merchant_in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(merchant.number)
        .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(api.info.max_concurrent_per_merchant)))
        .clone();
    let Ok(_share) = share.try_acquire_owned() else {
        let message = format!("merchant {:?} has too many facilitator requests at once; retry", merchant.id);
        return Err(Failure(StatusCode::SERVICE_UNAVAILABLE, message));
    };
    let Ok(_place) = api.in_flight.clone().try_acquire_owned() else {
        return Err(Failure(StatusCode::SERVICE_UNAVAILABLE, "too many facilitator requests at once; retry".into()));
    };
    request.extensions_mut().insert(merchant);
    Ok(next.run(request).await)
}

/// The payments whose `/settle` was answered `settlement_pending` with a
/// transaction, each allowing one more `/settle` by the same merchant: the
/// reference resource server retries such a settle once, with the same
/// body, to learn the outcome. Any other `/settle` of a recorded payment is
/// a replay. In memory only: after a restart the retry is refused (the
/// payment still settles), which is the safe side.
#[derive(Debug, Default)]
struct PendingRetries {
    allowed: std::sync::Mutex<std::collections::HashMap<PaymentId, (u32, Instant)>>,
}

impl PendingRetries {
    /// How long a pending answer's retry stays allowed.
    const TTL: Duration = Duration::from_secs(300);
    /// Most retries allowed at once; past it (after expired ones are
    /// dropped) no more are granted.
    const MAX: usize = 100_000;

    fn grant(&self, id: PaymentId, merchant: u32) {
        let now = Instant::now();
        let mut allowed = self.allowed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if allowed.len() >= Self::MAX {
            allowed.retain(|_, (_, until)| *until > now);
        }
        if allowed.len() < Self::MAX {
            allowed.insert(id, (merchant, now + Self::TTL));
        }
    }

    /// Takes the retry allowed for `id` to `merchant`, if there is one.
    fn take(&self, id: PaymentId, merchant: u32) -> bool {
        let mut allowed = self.allowed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match allowed.get(&id) {
            Some(&(m, until)) if m == merchant => {
                allowed.remove(&id);
                until > Instant::now()
            }
            _ => false,
        }
    }
}

/// A `/verify` or `/settle` body: its parts are decoded by scheme, so that
/// errors name the field (`paymentRequirements.payTo`, …).
type FacilitatorRequest = x402_wire::FacilitatorRequest<serde_json::Value, serde_json::Value>;

/// The x402 extension carrying a client's id for its payment. Unsigned, so
/// it proves nothing; an id names one payment of a merchant (409 else).
const PAYMENT_IDENTIFIER: &str = "payment-identifier";

/// The `payment-identifier` id a payment payload carries, if any.
fn payment_identifier(payload: &serde_json::Value) -> Result<Option<IdempotencyKey>, InvalidField> {
    let Some(extension) = payload.get("extensions").and_then(|e| e.get(PAYMENT_IDENTIFIER)) else {
        return Ok(None);
    };
    let field = "paymentPayload.extensions.payment-identifier.info.id";
    match extension.get("info").and_then(|i| i.get("id")) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(id)) => {
            IdempotencyKey::parse(id).map(Some).map_err(|m| InvalidField::new(field, m))
        }
        Some(_) => Err(InvalidField::new(field, "is not a string")),
    }
}

/// The `batch-settlement` fields of a requirements' `extra`.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChannelExtraJson {
    #[serde(default, with = "x402_wire::fields::opt_address")]
    receiver_authorizer: Option<Address>,
    #[serde(default, with = "x402_wire::fields::opt_u64_decimal")]
    withdraw_delay: Option<u64>,
}

/// The reference's reason for a settlement broadcast but not yet seen mined.
const SETTLEMENT_PENDING: &str = "settlement_pending";

/// Why a payment already recorded is refused.
const ALREADY_PAID: &str = "this payment was already recorded: it pays for one request only";

/// A request that cannot be served: an HTTP status and a JSON error.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<JsonRejection> for Failure {
    fn from(e: JsonRejection) -> Self {
        Self(e.status(), e.body_text())
    }
}

impl From<InvalidField> for Failure {
    fn from(e: InvalidField) -> Self {
        Self(StatusCode::BAD_REQUEST, e.to_string())
    }
}

impl Api {
    fn merchant(&self, headers: &HeaderMap) -> Result<Arc<Merchant>, Failure> {
        let key = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Failure(StatusCode::UNAUTHORIZED, "Authorization: Bearer <merchant key> is required".into())
            })?;
        self.engine.authenticate(key.trim()).ok_or_else(|| Failure(StatusCode::UNAUTHORIZED, "unknown API key".into()))
    }
}

/// The requirements of a facilitator request, with the `batch-settlement`
/// fields of `extra`.
fn channel_requirements(r: &serde_json::Value) -> Result<(Requirements, ChannelExtra), InvalidField> {
    const FIELD: &str = "paymentRequirements";
    let invalid = |e: x402_wire::FieldError| InvalidField::new(e.under(FIELD), e.message);
    let requirements: Requirements = x402_wire::from_value(r.clone()).map_err(invalid)?;
    let extra: ChannelExtraJson = match r.get("extra") {
        Some(extra) if !extra.is_null() => x402_wire::from_value(extra.clone())
            .map_err(|e| InvalidField::new(e.under(&format!("{FIELD}.extra")), e.message))?,
        _ => ChannelExtraJson::default(),
    };
    let extra = ChannelExtra {
        receiver_authorizer: extra.receiver_authorizer.unwrap_or(Address::ZERO),
        withdraw_delay: extra.withdraw_delay.unwrap_or(0),
    };
    Ok((requirements, extra))
}

/// The scheme a request's requirements name (`""` when they name none: the
/// decoder then says what is missing).
fn scheme(body: &FacilitatorRequest) -> &str {
    body.payment_requirements.get("scheme").and_then(serde_json::Value::as_str).unwrap_or_default()
}

/// The submission of an `exact` facilitator request: the requirements, and
/// the payment payload as the header the gRPC path takes (an x402 v1
/// payload is an `X-PAYMENT` header's content, which it reads too).
fn submission(body: &FacilitatorRequest) -> Result<Submission, InvalidField> {
    let requirements = if body.x402_version == x402_wire::v1::X402_V1 {
        let v1: x402_wire::v1::RequirementsV1 = x402_wire::from_value(body.payment_requirements.clone())
            .map_err(|e| InvalidField::new(e.under("paymentRequirements"), e.message))?;
        v1.to_v2()
    } else {
        channel_requirements(&body.payment_requirements)?.0
    };
    let idempotency = payment_identifier(&body.payment_payload)?;
    let header = base64::engine::general_purpose::STANDARD.encode(body.payment_payload.to_string());
    Ok(Submission { requirements, input: PaymentInput::Header(header), idempotency })
}

/// The body, if it is x402 v2 or v1.
fn versioned(body: Result<Json<FacilitatorRequest>, JsonRejection>) -> Result<FacilitatorRequest, Failure> {
    let body = body.map_err(Failure::from)?.0;
    if body.x402_version != X402_VERSION && body.x402_version != x402_wire::v1::X402_V1 {
        let message = format!("is {}, only 1 and 2 are supported", body.x402_version);
        return Err(InvalidField::new("x402Version", message).into());
    }
    Ok(body)
}

/// Whether `body` is `batch-settlement`, which x402 v1 has not.
fn is_channel(body: &FacilitatorRequest) -> bool {
    body.x402_version == X402_VERSION && scheme(body) == "batch-settlement"
}

fn overloaded() -> Failure {
    Failure(StatusCode::SERVICE_UNAVAILABLE, "the verification pipeline is full; retry shortly".into())
}

/// An outcome a facilitator `exact` request cannot have: vouchers go to
/// [`channels`], and a submit is not a dry run.
fn not_exact() -> Failure {
    Failure(StatusCode::INTERNAL_SERVER_ERROR, "an exact payment came back as another kind".into())
}

async fn verify(
    State(api): State<Api>,
    Extension(merchant): Extension<Arc<Merchant>>,
    body: Result<Json<FacilitatorRequest>, JsonRejection>,
) -> Result<Json<VerifyResponse>, Failure> {
    let body = versioned(body)?;
    if is_channel(&body) {
        return channels::verify(&api, &merchant, body).await.map(Json);
    }
    let submission = submission(&body)?;
    let outcome = api.engine.verify(merchant, submission).await.map_err(|_| overloaded())?;
    let payer = |p: Address| Some(p.to_string());
    Ok(Json(match outcome {
        SubmitOutcome::Verified { payer: p, .. } | SubmitOutcome::Accepted { payer: p, .. } => {
            VerifyResponse { is_valid: true, payer: payer(p), ..VerifyResponse::default() }
        }
        // Recorded already, whatever `payment-identifier` it carries: see `settle`.
        SubmitOutcome::Duplicate { payer: p, .. } => VerifyResponse {
            is_valid: false,
            invalid_reason: Some(Reason::NonceAlreadyUsed.code().into()),
            invalid_message: Some(ALREADY_PAID.into()),
            payer: payer(p),
            extra: None,
        },
        SubmitOutcome::Rejected { payer: p, rejection, .. } => VerifyResponse {
            is_valid: false,
            invalid_reason: Some(rejection.reason.code().into()),
            invalid_message: Some(rejection.message.into_owned()),
            payer: p.and_then(payer),
            extra: None,
        },
        SubmitOutcome::VoucherAccepted { .. } | SubmitOutcome::VoucherRejected { .. } => return Err(not_exact()),
        SubmitOutcome::Invalid(field) => return Err(field.into()),
        SubmitOutcome::Unavailable(message) => return Err(Failure(StatusCode::SERVICE_UNAVAILABLE, message)),
    }))
}

async fn settle(
    State(api): State<Api>,
    Extension(merchant): Extension<Arc<Merchant>>,
    body: Result<Json<FacilitatorRequest>, JsonRejection>,
) -> Result<Json<SettleResponse>, Failure> {
    let body = versioned(body)?;
    if is_channel(&body) {
        return channels::settle(&api, &merchant, body).await.map(Json);
    }
    let submission = submission(&body)?;
    // Answered in the request's words: a v1 network name for v1.
    let network = match body.x402_version {
        x402_wire::v1::X402_V1 => x402_wire::v1::v1_name_of(&submission.requirements.network),
        _ => submission.requirements.network.clone(),
    };
    let amount = submission.requirements.amount;
    let outcome = api.engine.submit(merchant.clone(), submission).await.map_err(|_| overloaded())?;
    let failed = |reason: &str, message: String, payer: Option<Address>| SettleResponse {
        success: false,
        error_reason: Some(reason.into()),
        error_message: Some(message),
        payer: payer.map(|p| p.to_string()),
        transaction: String::new(),
        network: network.clone(),
        ..SettleResponse::default()
    };
    Ok(Json(match outcome {
        SubmitOutcome::Accepted { id, payer, .. } => {
            settled(&api, Some(&merchant), id, payer, network.clone(), amount).await?
        }
        // A `payment-identifier` is written by the client and not signed:
        // whoever replays the header replays the id too, so over HTTP it
        // proves nothing and never re-authorizes service (it only makes the
        // id with another payment a 409).
        SubmitOutcome::Duplicate { id, payer, .. } => {
            if api.pending_retries.take(id, merchant.number) {
                settled(&api, None, id, payer, network.clone(), amount).await?
            } else {
                failed(Reason::NonceAlreadyUsed.code(), ALREADY_PAID.into(), Some(payer))
            }
        }
        SubmitOutcome::Rejected { rejection, .. } if rejection.reason == Reason::IdempotencyKeyReused => {
            return Err(Failure(StatusCode::CONFLICT, rejection.message.into_owned()));
        }
        SubmitOutcome::Rejected { payer, rejection, .. } => {
            failed(rejection.reason.code(), rejection.message.into_owned(), payer)
        }
        SubmitOutcome::Verified { .. }
        | SubmitOutcome::VoucherAccepted { .. }
        | SubmitOutcome::VoucherRejected { .. } => {
            return Err(not_exact());
        }
        SubmitOutcome::Invalid(field) => return Err(field.into()),
        SubmitOutcome::Unavailable(message) => return Err(Failure(StatusCode::SERVICE_UNAVAILABLE, message)),
    }))
}

/// Waits, up to the configured wait, for payment `id` to settle; answers
/// its outcome, or `settlement_pending` (with the transaction once there is
/// one). For the settle that recorded it, `first` is its merchant: a
/// pending answer with a transaction then allows that merchant one retry.
async fn settled(
    api: &Api,
    first: Option<&Merchant>,
    id: PaymentId,
    payer: Address,
    network: String,
    amount: U256,
) -> Result<SettleResponse, Failure> {
    let deadline = Instant::now() + api.info.settle_wait;
    let waiter = api.engine.wait_for_payment(id);
    loop {
        // Armed before the read: a change committed after it wakes us.
        let changed = waiter.notified();
        let record = api
            .engine
            .payment(id)
            .await
            .map_err(|e| Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
            .ok_or_else(|| Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("payment {id} vanished")))?;
        let status = &record.status;
        let transaction = status.transaction.map(|t| t.to_string()).unwrap_or_default();
        let base = SettleResponse {
            payer: Some(payer.to_string()),
            transaction,
            network: network.clone(),
            amount: Some(amount.to_string()),
            ..SettleResponse::default()
        };
        match status.state {
            PaymentState::Confirmed => return Ok(SettleResponse { success: true, ..base }),
            PaymentState::Failed | PaymentState::Expired => {
                let reason = status.failure_reason.clone().unwrap_or_else(|| match status.state {
                    PaymentState::Expired => Reason::ValidBefore.code().into(),
                    _ => crate::settle::SIMULATION_FAILED.into(),
                });
                return Ok(SettleResponse {
                    error_message: Some(format!("the payment ended {:?}", status.state)),
                    error_reason: Some(reason),
                    ..base
                });
            }
            PaymentState::Accepted | PaymentState::Queued | PaymentState::Submitted => {}
        }
        let now = Instant::now();
        if now >= deadline {
            if let Some(merchant) = first
                && status.transaction.is_some()
            {
                // The reference server retries once to learn the outcome.
                api.pending_retries.grant(id, merchant.number);
            }
            return Ok(SettleResponse {
                error_reason: Some(SETTLEMENT_PENDING.into()),
                error_message: Some(format!(
                    "not settled within {:?}; it is {:?} and will settle",
                    api.info.settle_wait, status.state
                )),
                ..base
            });
        }
        // Woken by an event of this payment; the timeout is a safety net.
        let _ = tokio::time::timeout((deadline - now).min(Duration::from_secs(1)), changed).await;
    }
}

async fn supported(State(api): State<Api>) -> Json<SupportedResponse> {
    let info = &api.info;
    let mut kinds = Vec::new();
    for network in &info.networks {
        let kind = |scheme: &str, extra| SupportedKind {
            x402_version: X402_VERSION,
            scheme: scheme.into(),
            network: network.clone(),
            extra,
        };
        kinds.push(kind("exact", None));
        // Channels where x402d claims them, with the key it claims with.
        let claimed = info.channels.iter().find(|c| format!("eip155:{}", c.chain.chain_id()) == *network);
        if let Some(authorizer) = claimed.and_then(|c| c.authorizer.as_ref()).map(PrivateKeySigner::address) {
            kinds.push(kind(
                "batch-settlement",
                Some(serde_json::json!({ "receiverAuthorizer": authorizer.to_string() })),
            ));
        }
    }
    // x402 v1, under its network names (a chain v1 has no name for is not
    // listed: a v1 client could not name it).
    for network in &info.networks {
        let name = x402_wire::v1::v1_name_of(network);
        if name != *network {
            let scheme = "exact".into();
            kinds.push(SupportedKind { x402_version: x402_wire::v1::X402_V1, scheme, network: name, extra: None });
        }
    }
    let signers = info.signers.iter().map(ToString::to_string).collect();
    Json(SupportedResponse { kinds, extensions: Vec::new(), signers: [("eip155:*".to_owned(), signers)].into() })
}

/// The `/verify` or `/settle` body a resource server sends for an `exact`
/// `payload` of `requirements`: for clients (the load generator, tests).
pub fn exact_request_json(r: &Requirements, payload: &crate::domain::ExactPayload) -> serde_json::Value {
    serde_json::to_value(x402_wire::FacilitatorRequest::exact(r, payload)).expect("requests serialize")
}
