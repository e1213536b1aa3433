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

use std::sync::Arc;

use alloy::{
    primitives::{Address, B256, Bytes, U256},
    signers::{SignerSync, local::PrivateKeySigner},
    sol_types::SolCall,
};
use x402_chain::{
    AlloyChain, Chain, Follow,
    channel::{ClaimRow, RefundRow, claim_and_settle_calldata, claim_batch, decode_state, state_calldata},
    contracts::X402BatchSettlement,
    follow_sent, send_new,
};
use x402_channel::{ChannelConfig, ChannelDomain, OnChain, Voucher};

use super::{Api, FacilitatorRequest, Failure, SettleResponse, VerifyResponse, channel_requirements};
use crate::{
    channels::{
        ChannelContracts, ChannelTerms, DepositFailure, VerifiedVoucher, VoucherVerifier, put_deposit, voucher_signer,
    },
    domain::Merchant,
    reason::{InvalidField, Reason},
    signature::{Check, Proof, SignatureRequest, SignatureSource},
    verify::Refusal,
};
use x402_wire::{
    ChannelStateExtra, ChannelStateJson, ClaimJson, ClaimPayloadJson, PayloadType, RefundPayloadJson, SettlePayloadJson,
};

/// What the facilitator needs to act on one chain's channels.
#[derive(Clone, Debug)]
pub struct ChannelFacilitator {
    /// The chain the channel contract is on.
    pub chain: Arc<AlloyChain>,
    /// Where the channel contract and its deposit collector are, and the
    /// least deposit (its receiver authorizer is not required of channels
    /// here: a server may claim with its own).
    pub terms: ChannelTerms,
    /// Signs claim batches the server sends unsigned.
    pub authorizer: Option<PrivateKeySigner>,
    /// How claim, settle and deposit transactions are followed to their
    /// receipts.
    pub follow: Follow,
    /// Transactions sent on each merchant's behalf, rate limited.
    pub spending: Arc<SpendLimiter>,
    /// Proves the vouchers of signers with code, as the pipeline's are.
    pub signatures: Arc<dyn SignatureSource>,
}

/// A token bucket per merchant for the transactions x402d sends (and pays
/// the gas of) on a merchant's behalf over HTTP: `burst` at once, then
/// `per_minute`.
#[derive(Debug)]
pub struct SpendLimiter {
    burst: f64,
    per_minute: f64,
    buckets: std::sync::Mutex<std::collections::HashMap<u32, (f64, std::time::Instant)>>,
}

impl SpendLimiter {
    /// A limiter letting each merchant spend `burst` at once, refilled by `per_minute`.
    pub fn new(burst: u32, per_minute: u32) -> Self {
        Self { burst: f64::from(burst), per_minute: f64::from(per_minute), buckets: Default::default() }
    }

    /// Takes one transaction from `merchant`'s bucket; false when it is empty.
    pub fn try_spend(&self, merchant: u32) -> bool {
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, at) = buckets.entry(merchant).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_minute / 60.0).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Where a facilitator request's payload fields are, for errors.
const PAYLOAD: &str = "paymentPayload.payload";

fn invalid(path: &str, message: &str) -> InvalidField {
    InvalidField::new(format!("{PAYLOAD}.{path}"), message.to_owned())
}

/// The request's `paymentPayload.payload` as `T`, a bad field named.
fn payload<T: serde::de::DeserializeOwned>(body: &FacilitatorRequest) -> Result<T, InvalidField> {
    x402_wire::from_value(body.payment_payload.get("payload").cloned().unwrap_or_default())
        .map_err(|e| InvalidField::new(e.under(PAYLOAD), e.message))
}

impl ChannelFacilitator {
    fn unavailable(e: impl std::fmt::Display) -> Failure {
        Failure(axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }

    /// A chain request failed: the caller is told to retry, in x402d's
    /// words ([`crate::Error::for_clients`]); the node's go to the log.
    fn chain_unavailable(e: impl Into<crate::Error>) -> Failure {
        Self::unavailable(e.into().for_clients())
    }

    /// One transaction on `merchant`'s behalf, or 429 past its rate.
    fn spend(&self, merchant: &Merchant) -> Result<(), Failure> {
        if self.spending.try_spend(merchant.number) {
            Ok(())
        } else {
            Err(Failure(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                format!("merchant {:?} sent too many channel transactions; retry later", merchant.id),
            ))
        }
    }

    /// Whether `v`'s signer signed it, as the contract will check it: a
    /// signature that recovers to a signer without code is its; otherwise
    /// the signer's ERC-1271 `isValidSignature` decides, asked on chain.
    /// `Ok(Ok(proved))`: signed, and whether that was proved on chain.
    async fn signed(&self, v: &VerifiedVoucher) -> Result<Result<bool, String>, Failure> {
        let signer = voucher_signer(&v.config);
        let code = self.chain.has_code(signer).await.map_err(Self::chain_unavailable)?;
        match (&v.unproved, code) {
            (None, false) => return Ok(Ok(false)),
            // Recovers to no one, and no code would approve it.
            (Some(why), false) => return Ok(Err(why.clone())),
            _ => {}
        }
        let check =
            Check::Erc1271 { digest: v.digest, signature: crate::ecdsa::as_claimed(&v.signature, v.digest, signer) };
        let request = SignatureRequest { signer, check, deploy: None };
        match crate::signature::prove(&*self.signatures, v.chain_id, request).await {
            Ok(Proof::Valid) => Ok(Ok(true)),
            Ok(Proof::Refused(_, why)) => Ok(Err(why)),
            Err(e) => Err(Self::unavailable(e.for_clients())),
        }
    }

    async fn onchain(&self, v: &VerifiedVoucher) -> Result<OnChain, Failure> {
        self.read(v.channel_id, v.config.withdrawDelay.to::<u64>()).await
    }

    async fn read(&self, id: B256, withdraw_delay: u64) -> Result<OnChain, Failure> {
        let out = self
            .chain
            .call(self.terms.contracts.channels, state_calldata(id))
            .await
            .map_err(Self::chain_unavailable)?;
        decode_state(&out, withdraw_delay).map_err(Self::chain_unavailable)
    }

    /// Simulates, then signs, sends and waits for a call of the channel
    /// contract; `Ok(Err(reason))` when it would revert or reverted.
    async fn send(&self, input: Bytes) -> Result<Result<B256, String>, Failure> {
        if let Some(revert) =
            self.chain.simulate(self.terms.contracts.channels, input.clone()).await.map_err(Self::chain_unavailable)?
        {
            return Ok(Err(format!("the transaction would revert: {revert}")));
        }
        // The cost varies with the call: estimated for each transaction.
        let gas = self
            .chain
            .estimate_gas(self.terms.contracts.channels, input.clone())
            .await
            .map_err(Self::chain_unavailable)?;
        let tx = self
            .chain
            .sign_call(self.terms.contracts.channels, input, Some(gas))
            .await
            .map_err(Self::chain_unavailable)?;
        let hash = tx.hash;
        crash_point!("channel::signed");
        send_new(&*self.chain, &tx).await.map_err(Self::chain_unavailable)?;
        crash_point!("channel::broadcast");
        match follow_sent(&*self.chain, tx, self.follow).await.map_err(Self::chain_unavailable)? {
            Some(r) if r.success => {
                crash_point!("channel::mined");
                Ok(Ok(r.tx))
            }
            Some(r) => Ok(Err(format!("transaction {} reverted", r.tx))),
            None => Err(Self::unavailable(format!("transaction {hash} not mined in {:?}", self.follow.timeout))),
        }
    }
}

/// The channel on chain as the reference server reads it from `extra`.
fn channel_state(id: B256, delay: u64, c: &OnChain) -> ChannelStateJson {
    ChannelStateJson {
        channel_id: id,
        balance: c.balance,
        total_claimed: c.total_claimed,
        withdraw_requested_at: c.withdrawal.map_or(0, |w| w.finalize_after.saturating_sub(delay)),
        refund_nonce: c.refund_nonce,
    }
}

/// The `extra` of a `/verify` answer: the channel on chain.
fn onchain_extra(id: B256, delay: u64, c: &OnChain) -> serde_json::Value {
    serde_json::to_value(channel_state(id, delay, c)).expect("channel states serialize")
}

/// The `extra` of a `/settle` answer: `{channelState}`.
fn settled_extra(id: B256, delay: u64, c: &OnChain) -> serde_json::Value {
    serde_json::to_value(ChannelStateExtra { channel_state: channel_state(id, delay, c) })
        .expect("channel states serialize")
}

/// A `voucher`, `deposit` or `refund` payload, checked statelessly.
fn verified(
    api: &Api,
    merchant: &Merchant,
    body: &FacilitatorRequest,
) -> Result<Result<VerifiedVoucher, Refusal>, Failure> {
    let (requirements, extra) = channel_requirements(&body.payment_requirements)?;
    let payload = crate::channels::decode_payload(&body.payment_payload, extra)?;
    // Each chain on its terms, but for the receiver authorizer.
    let chains =
        api.info.channels.iter().map(|c| (c.chain.chain_id(), ChannelTerms { receiver_authorizer: None, ..c.terms }));
    let verified = VoucherVerifier::new(ChannelContracts::default()).on_chains(Some(chains.collect())).verify(
        merchant,
        &requirements,
        payload,
    );
    // A signature that does not recover to its signer is left to its
    // signer's code ([`ChannelFacilitator::signed`]).
    Ok(verified)
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
    if api.info.channels.is_empty() {
        return Err(not_configured());
    }
    let v = match verified(api, merchant, &body)? {
        Ok(v) => v,
        Err(refusal) => return refused(refusal),
    };
    let channels = on_chain(api, v.chain_id).ok_or_else(not_configured)?;
    let (onchain, signed) = futures::future::join(channels.onchain(&v), channels.signed(&v)).await;
    let (onchain, signed) = (onchain?, signed?);
    let delay = v.config.withdrawDelay.to::<u64>();
    let deposit = v.deposit.as_ref().map_or(0, |d| d.amount);
    let balance = onchain.balance.saturating_add(deposit);
    let failure = if let Err(why) = signed {
        Some((Reason::VoucherSignature, format!("voucher {why}")))
    } else if balance == 0 {
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

/// The channels of `chain_id`, if this node serves them.
fn on_chain(api: &Api, chain_id: u64) -> Option<&ChannelFacilitator> {
    api.info.channels.iter().find(|c| c.chain.chain_id() == chain_id)
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
    if api.info.channels.is_empty() {
        return Err(not_configured());
    }
    let network = channel_requirements(&body.payment_requirements)?.0.network;
    let kind: PayloadType = payload(&body)?;
    let base = SettleResponse { network: network.clone(), ..SettleResponse::default() };
    let failed = |reason: &str, message: String| SettleResponse {
        error_reason: Some(reason.into()),
        error_message: Some(message),
        ..base.clone()
    };
    // Claims, settles and refunds go to the chain the requirements name.
    let Some(channels) = crate::domain::Network::parse(&network).and_then(|n| on_chain(api, n.chain_id())) else {
        let served: Vec<String> = api.info.channels.iter().map(|c| format!("eip155:{}", c.chain.chain_id())).collect();
        return Ok(failed(
            Reason::InvalidNetwork.code(),
            format!("this node serves no batch-settlement channel on {network:?}: it serves them on {served:?}"),
        ));
    };
    match kind.kind.as_str() {
        "claim" => {
            let payload: ClaimPayloadJson = payload(&body)?;
            claim(api, channels, merchant, payload, base).await
        }
        "settle" => {
            let SettlePayloadJson { receiver, token } = payload(&body)?;
            if let Err(message) = owned(api, merchant, std::iter::once(receiver)) {
                return Ok(failed(Reason::ReceiverMismatch.code(), message));
            }
            channels.spend(merchant)?;
            let input = X402BatchSettlement::settleCall { receiver, token }.abi_encode().into();
            Ok(match channels.send(input).await? {
                Ok(tx) => SettleResponse { success: true, transaction: tx.to_string(), ..base },
                Err(message) => failed("invalid_batch_settlement_evm_settle_transaction_failed", message),
            })
        }
        "refund" => {
            let payload: RefundPayloadJson = payload(&body)?;
            refund(api, channels, merchant, payload, base).await
        }
        "voucher" | "deposit" => {
            let mut v = match verified(api, merchant, &body)? {
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
            // Nothing goes on chain for a voucher its signer did not sign.
            match channels.signed(&v).await? {
                Ok(proved) => v.proved = proved,
                Err(why) => {
                    let message = format!("voucher {why}");
                    return Ok(SettleResponse { payer, ..failed(Reason::VoucherSignature.code(), message) });
                }
            }
            let Some(deposit) = v.deposit.clone() else {
                // A voucher needs nothing on chain: the server claims it later.
                let onchain = channels.onchain(&v).await?;
                let extra = settled_extra(v.channel_id, delay, &onchain);
                return Ok(SettleResponse { success: true, payer, extra: Some(extra), ..base });
            };
            channels.spend(merchant)?;
            Ok(match put_deposit(&*channels.chain, &v, &deposit, channels.follow).await {
                Ok((tx, onchain)) => SettleResponse {
                    success: true,
                    payer,
                    transaction: tx.map(|t| t.to_string()).unwrap_or_default(),
                    amount: Some(deposit.amount.to_string()),
                    extra: Some(settled_extra(v.channel_id, delay, &onchain)),
                    ..base
                },
                Err(DepositFailure::Rejected(message)) => {
                    SettleResponse { payer, ..failed(Reason::DepositFailed.code(), message) }
                }
                Err(DepositFailure::Unavailable(e)) => return Err(ChannelFacilitator::unavailable(e.for_clients())),
            })
        }
        other => Ok(failed(
            "invalid_batch_settlement_evm_payload_type",
            format!("payload type {other:?} is not one of voucher, deposit, refund, claim, settle"),
        )),
    }
}

/// `Err` naming the first of `receivers` that is not `merchant`'s alone:
/// over HTTP a merchant acts on its own channels only, and a receiver
/// address two merchants list belongs to neither for this.
fn owned(api: &Api, merchant: &Merchant, receivers: impl Iterator<Item = Address>) -> Result<(), String> {
    let merchants = api.engine.merchants();
    for r in receivers {
        if !merchant.pay_to.contains(&r) {
            return Err(format!("receiver {r} is not an address of merchant {:?}", merchant.id));
        }
        if let Some(other) = merchants.iter().find(|m| m.id != merchant.id && m.pay_to.contains(&r)) {
            return Err(format!(
                "receiver {r} is an address of merchants {:?} and {:?}: neither acts on its channels over HTTP",
                merchant.id, other.id
            ));
        }
    }
    Ok(())
}

/// Refuses channels that x402d keeps itself (a gRPC gateway's): their
/// charged totals are x402d's, and an HTTP claim or refund would bypass
/// them; `ClaimChannel` and `RefundChannel` act on them.
async fn not_kept(api: &Api, ids: Vec<B256>) -> Result<(), Failure> {
    let kept = api.engine.channels_by_id(ids).await.map_err(ChannelFacilitator::unavailable)?;
    match kept.first() {
        Some(record) => Err(Failure(
            axum::http::StatusCode::CONFLICT,
            format!(
                "channel {} is kept by x402d for merchant {:?} (its vouchers came over gRPC): claim or refund it \
                 with ClaimChannel or RefundChannel",
                record.channel.id, record.merchant_id
            ),
        )),
        None => Ok(()),
    }
}

/// The rows of server-authored claims.
fn claim_rows(domain: &ChannelDomain, claims: &[ClaimJson]) -> Vec<ClaimRow> {
    claims
        .iter()
        .map(|c| {
            let config = c.voucher.channel.clone();
            let channel_id = domain.channel_id(&config);
            let max_claimable = c.voucher.max_claimable_amount;
            // With the `v` the chain needs (x402d's /verify accepts either);
            // one that recovers to no one goes as it is, for the contract to
            // ask the signer's code (the simulation before sending says
            // whether it approves).
            let digest = domain.voucher_digest(&Voucher { channelId: channel_id, maxClaimableAmount: max_claimable });
            let signature = crate::ecdsa::as_claimed(&c.signature, digest, voucher_signer(&config));
            ClaimRow { channel_id, config, max_claimable, signature, total_claimed: c.total_claimed }
        })
        .collect()
}

/// The server's signature, or else the engine's authorizer's of `digest`
/// when every channel in `configs` names it; `Err` answers a mismatch.
fn authorize<'a>(
    channels: &ChannelFacilitator,
    given: Option<&Bytes>,
    mut configs: impl Iterator<Item = (&'a ChannelConfig, B256)>,
    digest: impl FnOnce() -> B256,
) -> Result<Result<Vec<u8>, String>, Failure> {
    if let Some(signature) = given {
        return Ok(Ok(signature.to_vec()));
    }
    let authorizer = channels.authorizer.as_ref().ok_or_else(not_configured)?;
    if let Some((config, id)) = configs.find(|(c, _)| c.receiverAuthorizer != authorizer.address()) {
        return Ok(Err(format!(
            "channel {id} is authorized by {}, not this facilitator's {}",
            config.receiverAuthorizer,
            authorizer.address()
        )));
    }
    Ok(Ok(authorizer.sign_hash_sync(&digest()).map_err(ChannelFacilitator::unavailable)?.as_bytes().to_vec()))
}

/// The claim-batch signature for `rows`: the server's, or this
/// facilitator's (see [`authorize`]).
fn authorize_claims(
    channels: &ChannelFacilitator,
    given: Option<&Bytes>,
    domain: &ChannelDomain,
    rows: &[ClaimRow],
) -> Result<Result<Vec<u8>, String>, Failure> {
    authorize(channels, given, rows.iter().map(|r| (&r.config, r.channel_id)), || {
        domain.claim_batch_digest(&claim_batch(rows))
    })
}

fn mismatch(base: SettleResponse, message: String) -> SettleResponse {
    SettleResponse {
        error_reason: Some(Reason::ReceiverAuthorizerMismatch.code().into()),
        error_message: Some(message),
        ..base
    }
}

/// A server-authored claim: `claimWithSignature` with the server's batch
/// signature, or the engine's when the server sent none.
async fn claim(
    api: &Api,
    channels: &ChannelFacilitator,
    merchant: &Merchant,
    payload: ClaimPayloadJson,
    base: SettleResponse,
) -> Result<SettleResponse, Failure> {
    let domain = ChannelDomain::new(channels.chain.chain_id(), channels.terms.contracts.channels);
    let rows = claim_rows(&domain, &payload.claims);
    if rows.is_empty() {
        return Err(invalid("claims", "is empty").into());
    }
    if let Err(message) = owned(api, merchant, rows.iter().map(|r| r.config.receiver)) {
        return Ok(SettleResponse {
            error_reason: Some(Reason::ReceiverMismatch.code().into()),
            error_message: Some(message),
            ..base
        });
    }
    not_kept(api, rows.iter().map(|r| r.channel_id).collect()).await?;
    channels.spend(merchant)?;
    let signature = match authorize_claims(channels, payload.claim_authorizer_signature.as_ref(), &domain, &rows)? {
        Ok(signature) => signature,
        Err(message) => return Ok(mismatch(base, message)),
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

/// A server-authored cooperative refund: the claims it carries (the
/// server's charges), then `refundWithSignature`, in one transaction.
async fn refund(
    api: &Api,
    channels: &ChannelFacilitator,
    merchant: &Merchant,
    payload: RefundPayloadJson,
    base: SettleResponse,
) -> Result<SettleResponse, Failure> {
    let domain = ChannelDomain::new(channels.chain.chain_id(), channels.terms.contracts.channels);
    let config = payload.channel_config.clone();
    let id = domain.channel_id(&config);
    let (amount, nonce) = (payload.amount, payload.refund_nonce);
    let rows = claim_rows(&domain, &payload.claims);
    if let Err(message) =
        owned(api, merchant, std::iter::once(config.receiver).chain(rows.iter().map(|r| r.config.receiver)))
    {
        return Ok(SettleResponse {
            error_reason: Some(Reason::ReceiverMismatch.code().into()),
            error_message: Some(message),
            ..base
        });
    }
    not_kept(api, std::iter::once(id).chain(rows.iter().map(|r| r.channel_id)).collect()).await?;
    channels.spend(merchant)?;
    let delay = config.withdrawDelay.to::<u64>();
    let before = channels.read(id, delay).await?;
    // A request sent again (its answer lost to a crash or a dropped
    // connection) finds its nonce used: said so, with the channel to mirror.
    if U256::from(before.refund_nonce) > nonce {
        return Ok(SettleResponse {
            error_reason: Some("invalid_batch_settlement_evm_refund_transaction_failed".into()),
            error_message: Some(format!(
                "refund nonce {nonce} is used: the channel is at refund nonce {}, so a refund at {nonce} was made \
                 (this one, if it was sent before)",
                before.refund_nonce
            )),
            extra: Some(settled_extra(id, delay, &before)),
            ..base
        });
    }
    let claimed =
        rows.iter().filter(|r| r.channel_id == id).map(|r| r.total_claimed).fold(before.total_claimed, u128::max);
    if amount == 0 || before.balance <= claimed {
        return Ok(SettleResponse {
            error_reason: Some("invalid_batch_settlement_evm_refund_no_balance".into()),
            error_message: Some("nothing to refund".into()),
            ..base
        });
    }
    let refund_signature =
        match authorize(channels, payload.refund_authorizer_signature.as_ref(), std::iter::once((&config, id)), || {
            domain.refund_digest(&x402_channel::Refund { channelId: id, nonce, amount })
        })? {
            Ok(signature) => signature,
            Err(message) => return Ok(mismatch(base, message)),
        };
    let claim_signature = if rows.is_empty() {
        Vec::new()
    } else {
        match authorize_claims(channels, payload.claim_authorizer_signature.as_ref(), &domain, &rows)? {
            Ok(signature) => signature,
            Err(message) => return Ok(mismatch(base, message)),
        }
    };
    let signature: [u8; 65] =
        refund_signature.as_slice().try_into().map_err(|_| invalid("refundAuthorizerSignature", "is not 65 bytes"))?;
    let refund = RefundRow { config, amount, nonce, signature };
    let input = claim_and_settle_calldata(&rows, &claim_signature, &[], &[refund]);
    Ok(match channels.send(input).await? {
        Ok(tx) => {
            let after = channels.read(id, delay).await?;
            SettleResponse {
                success: true,
                transaction: tx.to_string(),
                amount: Some(before.balance.saturating_sub(after.balance).to_string()),
                extra: Some(settled_extra(id, delay, &after)),
                ..base
            }
        }
        Err(message) => SettleResponse {
            error_reason: Some("invalid_batch_settlement_evm_refund_transaction_failed".into()),
            error_message: Some(message),
            ..base
        },
    })
}

#[cfg(test)]
mod tests {
    use super::SpendLimiter;

    /// A merchant gets its burst of transactions at once, then no more
    /// until the bucket refills; another merchant's bucket is its own.
    #[test]
    fn each_merchant_spends_its_own_burst_then_waits_for_the_refill() {
        let limiter = SpendLimiter::new(3, 60_000);
        assert!((0..3).all(|_| limiter.try_spend(1)));
        assert!(!limiter.try_spend(1), "past the burst");
        assert!(limiter.try_spend(2), "another merchant is not held up");
        // 60,000 a minute: one more every millisecond.
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(limiter.try_spend(1), "refilled");
        let slow = SpendLimiter::new(1, 1);
        assert!(slow.try_spend(7));
        assert!(!slow.try_spend(7), "one a minute");
    }
}
