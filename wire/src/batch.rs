//! The `batch-settlement` scheme's payloads: vouchers against a payment
//! channel, with an optional deposit or refund request.

use alloy::primitives::{Address, B256, Bytes, U256};
use x402_channel::ChannelConfig;

/// The `batch-settlement` fields of the requirements (x402 `extra`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelExtra {
    /// `extra.receiverAuthorizer`.
    pub receiver_authorizer: Address,
    /// `extra.withdrawDelay`, seconds.
    pub withdraw_delay: u64,
}

/// A voucher payment as a gateway submits it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoucherPayload {
    /// The network the payer signed for.
    pub network: String,
    pub config: ChannelConfig,
    /// The voucher's channel id, as the client computed it.
    pub channel_id: B256,
    pub max_claimable: u128,
    pub signature: Bytes,
    /// What the request costs, at most the required amount; `None` charges
    /// the amount.
    pub charge: Option<u128>,
    pub extra: ChannelExtra,
    /// A deposit made with this request.
    pub deposit: Option<DepositPayload>,
    /// A cooperative refund request of up to this much (`None` inside: all
    /// not charged); the voucher is then the charged total.
    pub refund: Option<Option<u128>>,
}

/// The payer's ERC-3009 `ReceiveWithAuthorization` of a deposit, made out
/// to the deposit collector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepositPayload {
    pub amount: u128,
    pub valid_after: u64,
    pub valid_before: u64,
    pub salt: U256,
    pub signature: Bytes,
}
