//! Calls of the `batch-settlement` channel contract that the engine makes
//! through [`crate::Chain`]: reading a channel's state in one call.

use alloy::{
    primitives::{B256, Bytes},
    sol_types::SolCall,
};
use x402_channel::{OnChain, Withdrawal};

use crate::{Error, Result, contracts::X402BatchSettlement as C};

/// Calldata reading `channels(id)`, `pendingWithdrawals(id)` and
/// `refundNonce(id)` at once, through the contract's own `multicall`.
pub fn state_calldata(id: B256) -> Bytes {
    C::multicallCall {
        data: vec![
            C::channelsCall { channelId: id }.abi_encode().into(),
            C::pendingWithdrawalsCall { channelId: id }.abi_encode().into(),
            C::refundNonceCall { channelId: id }.abi_encode().into(),
        ],
    }
    .abi_encode()
    .into()
}

/// Decodes the result of [`state_calldata`]'s call for a channel whose
/// config has `withdraw_delay` (seconds).
pub fn decode_state(output: &[u8], withdraw_delay: u64) -> Result<OnChain> {
    let decode = |what: &str, e: alloy::sol_types::Error| Error::Decode(format!("{what}: {e}"));
    let results = C::multicallCall::abi_decode_returns(output).map_err(|e| decode("multicall", e))?;
    let [channel, withdrawal, nonce] = results.as_slice() else {
        return Err(Error::Decode(format!("multicall returned {} results, not 3", results.len())));
    };
    let channel = C::channelsCall::abi_decode_returns(channel).map_err(|e| decode("channels", e))?;
    let withdrawal =
        C::pendingWithdrawalsCall::abi_decode_returns(withdrawal).map_err(|e| decode("pendingWithdrawals", e))?;
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
}
