//! Calls of the `batch-settlement` channel contract that the engine makes
//! through [`crate::Chain`]: reading a channel's state in one call, deposits
//! through the ERC-3009 collector, claims with the receiver authorizer's
//! signature followed by `settle`, and refunds.

use alloy::{
    primitives::{Address, B256, Bytes, U256, keccak256},
    sol_types::{SolCall, SolValue},
};
use x402_channel::{ChannelConfig, ClaimBatch, ClaimEntry, OnChain, Withdrawal};

use crate::{Error, Result, contracts::X402BatchSettlement as C};

/// Calldata reading `channels(id)`, `pendingWithdrawals(id)` and
/// `refundNonce(id)` at once, through the contract's own `multicall`.
pub fn state_calldata(id: B256) -> Bytes {
    states_calldata(&[id])
}

/// Decodes the result of [`state_calldata`]'s call for a channel whose
/// config has `withdraw_delay` (seconds).
pub fn decode_state(output: &[u8], withdraw_delay: u64) -> Result<OnChain> {
    let [state] = <[OnChain; 1]>::try_from(decode_states(output, &[withdraw_delay])?).expect("one channel asked");
    Ok(state)
}

/// The subcalls [`states_calldata`] makes per channel.
const STATE_READS: usize = 3;

/// Calldata reading the state of every channel of `ids` in one `eth_call`:
/// [`state_calldata`]'s three reads per channel, in one `multicall`. About
/// 10,000 gas of reads per channel: a few hundred channels per call stay
/// far below the `eth_call` gas caps of common nodes.
pub fn states_calldata(ids: &[B256]) -> Bytes {
    let data = ids
        .iter()
        .flat_map(|&id| {
            [
                C::channelsCall { channelId: id }.abi_encode().into(),
                C::pendingWithdrawalsCall { channelId: id }.abi_encode().into(),
                C::refundNonceCall { channelId: id }.abi_encode().into(),
            ]
        })
        .collect();
    C::multicallCall { data }.abi_encode().into()
}

/// Decodes the result of [`states_calldata`]'s call, in the order of its
/// ids, given each channel's `withdraw_delay` (seconds) in that order.
pub fn decode_states(output: &[u8], withdraw_delays: &[u64]) -> Result<Vec<OnChain>> {
    let decode = |what: &str, e: alloy::sol_types::Error| Error::Decode(format!("{what}: {e}"));
    let results = C::multicallCall::abi_decode_returns(output).map_err(|e| decode("multicall", e))?;
    if results.len() != STATE_READS * withdraw_delays.len() {
        return Err(Error::Decode(format!(
            "multicall returned {} results, not {}",
            results.len(),
            STATE_READS * withdraw_delays.len()
        )));
    }
    results
        .chunks_exact(STATE_READS)
        .zip(withdraw_delays)
        .map(|(reads, &withdraw_delay)| {
            let [channel, withdrawal, nonce] = reads else { unreachable!("chunks of {STATE_READS}") };
            let channel = C::channelsCall::abi_decode_returns(channel).map_err(|e| decode("channels", e))?;
            let withdrawal = C::pendingWithdrawalsCall::abi_decode_returns(withdrawal)
                .map_err(|e| decode("pendingWithdrawals", e))?;
            let nonce = C::refundNonceCall::abi_decode_returns(nonce).map_err(|e| decode("refundNonce", e))?;
            let initiated_at = withdrawal.initiatedAt.to::<u64>();
            Ok(OnChain {
                balance: channel.balance,
                total_claimed: channel.totalClaimed,
                withdrawal: (initiated_at != 0).then_some(Withdrawal {
                    amount: withdrawal.amount,
                    finalize_after: initiated_at.saturating_add(withdraw_delay),
                }),
                refund_nonce: nonce.try_into().unwrap_or(u64::MAX),
            })
        })
        .collect()
}

/// The ERC-3009 nonce of a deposit into `channel_id`: binds the payer's
/// authorization to that one channel.
pub fn deposit_nonce(channel_id: B256, salt: U256) -> B256 {
    keccak256((channel_id, salt).abi_encode())
}

/// The collector's `collectorData`: `abi.encode(validAfter, validBefore,
/// salt, signature)`.
pub fn deposit_collector_data(valid_after: U256, valid_before: U256, salt: U256, signature: &[u8]) -> Bytes {
    (valid_after, valid_before, salt, Bytes::copy_from_slice(signature)).abi_encode_params().into()
}

/// `deposit(config, amount, collector, collectorData)`.
pub fn deposit_calldata(config: &ChannelConfig, amount: u128, collector: Address, collector_data: Bytes) -> Bytes {
    C::depositCall { config: config.clone().into(), amount, collector, collectorData: collector_data }
        .abi_encode()
        .into()
}

/// One channel's row of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRow {
    /// The channel's config.
    pub config: ChannelConfig,
    /// Its id.
    pub channel_id: B256,
    /// The signed voucher's ceiling and its signature.
    pub max_claimable: u128,
    /// The voucher signer's signature of it.
    pub signature: Bytes,
    /// The cumulative total the claim brings the channel to.
    pub total_claimed: u128,
}

/// The `ClaimBatch` the receiver authorizer signs for `rows`.
pub fn claim_batch(rows: &[ClaimRow]) -> ClaimBatch {
    ClaimBatch {
        claims: rows
            .iter()
            .map(|r| ClaimEntry {
                channelId: r.channel_id,
                maxClaimableAmount: r.max_claimable,
                totalClaimed: r.total_claimed,
            })
            .collect(),
    }
}

/// A cooperative refund signed by the receiver authorizer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefundRow {
    /// The channel's config.
    pub config: ChannelConfig,
    /// What goes back to the payer, in atomic token units.
    pub amount: u128,
    /// The channel's refund nonce it was signed for.
    pub nonce: U256,
    /// The receiver authorizer's signature of the refund.
    pub signature: [u8; 65],
}

/// One transaction (the contract's `multicall`) that claims `rows` with the
/// authorizer's batch signature (no claim if `rows` is empty), pays each
/// `(receiver, token)` of `settle`, then makes `refunds`. Replaying it is
/// harmless: a claim at or below the recorded total changes nothing, a
/// settle with nothing claimed pays nothing, and a refund's nonce is spent.
pub fn claim_and_settle_calldata(
    rows: &[ClaimRow],
    authorizer_signature: &[u8],
    settle: &[(Address, Address)],
    refunds: &[RefundRow],
) -> Bytes {
    let mut data: Vec<Bytes> = Vec::with_capacity(1 + settle.len() + refunds.len());
    if !rows.is_empty() {
        let claims = rows
            .iter()
            .map(|r| C::VoucherClaim {
                voucher: C::Voucher { channel: r.config.clone().into(), maxClaimableAmount: r.max_claimable },
                signature: r.signature.clone(),
                totalClaimed: r.total_claimed,
            })
            .collect();
        let signature = Bytes::copy_from_slice(authorizer_signature);
        data.push(
            C::claimWithSignatureCall { voucherClaims: claims, authorizerSignature: signature }.abi_encode().into(),
        );
    }
    data.extend(settle.iter().map(|&(receiver, token)| Bytes::from(C::settleCall { receiver, token }.abi_encode())));
    data.extend(refunds.iter().map(|r| {
        Bytes::from(
            C::refundWithSignatureCall {
                config: r.config.clone().into(),
                amount: r.amount,
                nonce: r.nonce,
                receiverAuthorizerSignature: Bytes::copy_from_slice(&r.signature),
            }
            .abi_encode(),
        )
    }));
    C::multicallCall { data }.abi_encode().into()
}

/// `refund(config, amount)`, sent by the receiver or its authorizer.
pub fn refund_calldata(config: &ChannelConfig, amount: u128) -> Bytes {
    C::refundCall { config: config.clone().into(), amount }.abi_encode().into()
}
