//! Why a payment is refused: stable x402 reason codes plus a human message.
//!
//! Rejections are data, not errors: verification returning one is the engine
//! working as intended.

use std::{borrow::Cow, fmt};

/// An x402 reason code: the `exact` scheme's in the order verification
/// checks them, then the `batch-settlement` scheme's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Step 1: the scheme is not `exact`.
    Scheme,
    /// Step 2: `extra.name` or `extra.version` is missing.
    MissingEip712Domain,
    /// Step 3: the payload's network is not the requirements' network.
    NetworkMismatch,
    /// The network or token is not one this merchant accepts.
    InvalidNetwork,
    /// Step 4: the signature does not recover to `authorization.from`.
    Signature,
    /// Step 5: `authorization.to` is not `payTo` (or `payTo` is not the merchant's).
    RecipientMismatch,
    /// Step 6: `validBefore` is too close (or past).
    ValidBefore,
    /// Step 7: `validAfter` is in the future.
    ValidAfter,
    /// Step 8: `authorization.value` is not the required amount.
    Value,
    /// Step 9: the nonce was spent by a different payment.
    NonceAlreadyUsed,
    /// Step 9: the payer's balance minus pending payments does not cover it.
    InsufficientBalance,
    /// `batch-settlement`: the voucher's channel id is not its config's.
    ChannelIdMismatch,
    /// `batch-settlement`: the channel has no balance on chain.
    ChannelNotFound,
    /// `batch-settlement`: the voucher is not signed by the payer's authorizer.
    VoucherSignature,
    /// `batch-settlement`: the voucher exceeds the channel's balance.
    CumulativeExceedsBalance,
    /// `batch-settlement`: the voucher is not above the claimed total.
    CumulativeBelowClaimed,
    /// `batch-settlement`: the voucher is not the charged total plus the amount.
    CumulativeAmountMismatch,
    /// `batch-settlement`: the channel's receiver is not `payTo`.
    ReceiverMismatch,
    /// `batch-settlement`: the channel's receiver authorizer is not `extra.receiverAuthorizer`.
    ReceiverAuthorizerMismatch,
    /// `batch-settlement`: the channel's token is not `asset`.
    TokenMismatch,
    /// `batch-settlement`: the channel's withdraw delay is not `extra.withdrawDelay`.
    WithdrawDelayMismatch,
    /// `batch-settlement`: the payer's withdrawal is about to be finalized.
    WithdrawalPending,
    /// `batch-settlement`: the deposit's ERC-3009 authorization is not the payer's.
    DepositSignature,
    /// `batch-settlement`: the deposit transaction would revert or reverted.
    DepositFailed,
    /// The submit's idempotency key already named another payment of the
    /// merchant (HTTP answers 409).
    IdempotencyKeyReused,
}

impl Reason {
    /// Every reason, for metrics pre-registration and tests.
    pub const ALL: [Self; 25] = [
        Self::Scheme,
        Self::MissingEip712Domain,
        Self::NetworkMismatch,
        Self::InvalidNetwork,
        Self::Signature,
        Self::RecipientMismatch,
        Self::ValidBefore,
        Self::ValidAfter,
        Self::Value,
        Self::NonceAlreadyUsed,
        Self::InsufficientBalance,
        Self::ChannelIdMismatch,
        Self::ChannelNotFound,
        Self::VoucherSignature,
        Self::CumulativeExceedsBalance,
        Self::CumulativeBelowClaimed,
        Self::CumulativeAmountMismatch,
        Self::ReceiverMismatch,
        Self::ReceiverAuthorizerMismatch,
        Self::TokenMismatch,
        Self::WithdrawDelayMismatch,
        Self::WithdrawalPending,
        Self::DepositSignature,
        Self::DepositFailed,
        Self::IdempotencyKeyReused,
    ];

    /// The x402 reason code.
    pub const fn code(self) -> &'static str {
        match self {
            Self::Scheme => "invalid_exact_evm_scheme",
            Self::MissingEip712Domain => "invalid_exact_evm_missing_eip712_domain",
            Self::NetworkMismatch => "invalid_exact_evm_network_mismatch",
            Self::InvalidNetwork => "invalid_network",
            Self::Signature => "invalid_exact_evm_signature",
            Self::RecipientMismatch => "invalid_exact_evm_recipient_mismatch",
            Self::ValidBefore => "invalid_exact_evm_payload_authorization_valid_before",
            Self::ValidAfter => "invalid_exact_evm_payload_authorization_valid_after",
            Self::Value => "invalid_exact_evm_authorization_value",
            Self::NonceAlreadyUsed => "invalid_exact_evm_nonce_already_used",
            Self::InsufficientBalance => "invalid_exact_evm_insufficient_balance",
            Self::ChannelIdMismatch => "invalid_batch_settlement_evm_channel_id_mismatch",
            Self::ChannelNotFound => "invalid_batch_settlement_evm_channel_not_found",
            Self::VoucherSignature => "invalid_batch_settlement_evm_voucher_signature",
            Self::CumulativeExceedsBalance => "invalid_batch_settlement_evm_cumulative_exceeds_balance",
            Self::CumulativeBelowClaimed => "invalid_batch_settlement_evm_cumulative_below_claimed",
            Self::CumulativeAmountMismatch => "invalid_batch_settlement_evm_cumulative_amount_mismatch",
            Self::ReceiverMismatch => "invalid_batch_settlement_evm_receiver_mismatch",
            Self::ReceiverAuthorizerMismatch => "invalid_batch_settlement_evm_receiver_authorizer_mismatch",
            Self::TokenMismatch => "invalid_batch_settlement_evm_token_mismatch",
            Self::WithdrawDelayMismatch => "invalid_batch_settlement_evm_withdraw_delay_mismatch",
            Self::WithdrawalPending => "invalid_batch_settlement_evm_withdrawal_pending",
            Self::DepositSignature => "invalid_batch_settlement_evm_deposit_signature",
            Self::DepositFailed => "invalid_batch_settlement_evm_deposit_transaction_failed",
            Self::IdempotencyKeyReused => "payment_identifier_reused",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refused payment: the reason code and what exactly was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The reason code (the x402 reference's where it has one).
    pub reason: Reason,
    /// What exactly was wrong, for people.
    pub message: Cow<'static, str>,
}

impl Rejection {
    pub(crate) fn new(reason: Reason, message: impl Into<Cow<'static, str>>) -> Self {
        Self { reason, message: message.into() }
    }
}

/// A request that cannot be processed as sent: the field and what is wrong
/// with it. Answered as `INVALID_ARGUMENT`; changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    /// The field's path in the request (`requirements.amount`, `paymentPayload.payload.voucher.signature`).
    pub field: Cow<'static, str>,
    /// What is wrong with it.
    pub message: Cow<'static, str>,
}

impl InvalidField {
    pub(crate) fn new(field: impl Into<Cow<'static, str>>, message: impl Into<Cow<'static, str>>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Why stage 1 refused a submit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A verification rule failed.
    Rejected {
        /// The payment's id, once the checks got far enough to compute it.
        id: Option<crate::domain::PaymentId>,
        /// Who signed, once known.
        payer: Option<alloy::primitives::Address>,
        /// The rule that failed.
        rejection: Rejection,
    },
    /// The request is malformed.
    Invalid(InvalidField),
}

impl From<InvalidField> for Refusal {
    fn from(value: InvalidField) -> Self {
        Self::Invalid(value)
    }
}

impl From<x402_channel::VoucherError> for Reason {
    fn from(e: x402_channel::VoucherError) -> Self {
        use x402_channel::VoucherError as E;
        match e {
            E::ChannelNotFound => Self::ChannelNotFound,
            E::CumulativeAmountMismatch { .. } => Self::CumulativeAmountMismatch,
            E::CumulativeExceedsBalance { .. } => Self::CumulativeExceedsBalance,
            E::CumulativeBelowClaimed { .. } => Self::CumulativeBelowClaimed,
            E::WithdrawalClosing { .. } => Self::WithdrawalPending,
        }
    }
}
