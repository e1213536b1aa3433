//! The x402 v2 wire format, defined once: what a resource server, a payer
//! and a facilitator send each other, as typed Rust values.
//!
//! - [`Requirements`]: a resource's `PaymentRequirements`;
//! - [`Authorization`] and [`ExactPayload`]: an `exact` EIP-3009 payment;
//!   [`ExactEvmPayload`] and [`PaymentPayload`] are its JSON form (the
//!   `PAYMENT-SIGNATURE` header's content);
//! - [`VoucherPayload`], [`DepositPayload`], [`ChannelExtra`]: the
//!   `batch-settlement` scheme's payloads and requirement fields;
//! - [`FacilitatorRequest`], [`VerifyResponse`], [`SettleResponse`],
//!   [`SupportedResponse`]: the HTTP facilitator's bodies;
//! - [`Network`]: a CAIP-2 `eip155:<chainId>` network;
//! - [`v1`]: the x402 v1 bodies (`maxAmountRequired`, v1 network names,
//!   `X-PAYMENT`), read into these types;
//! - [`from_slice`] and [`from_value`]: outside input into these types, a
//!   [`FieldError`] naming the field when it does not fit;
//! - [`fields`]: the field formats (decimal uint256, 0x-hex addresses,
//!   words and bytes) with their parsers, for every decoder of outside input.
//!
//! Every type that has a JSON form derives both directions from one
//! definition: what x402d writes, it reads back. It writes numbers as
//! decimal strings and addresses checksummed, as the reference
//! implementation does; it reads a little more than it writes, as the
//! reference clients send it (JSON numbers for amounts, addresses in any
//! case, decimal deposit salts).
//!
//! No feature flags.

#![warn(missing_docs)]

mod batch;
mod decode;
mod exact;
mod facilitator;
pub mod fields;
mod network;
pub mod v1;

pub use batch::{
    ChannelConfigJson, ChannelExtra, ChannelPayloadJson, ChannelPayloadType, ChannelStateExtra, ChannelStateJson,
    ClaimJson, ClaimPayloadJson, ClaimVoucherJson, DepositAuthorizationJson, DepositJson, DepositPayload,
    Erc3009AuthorizationJson, PayloadType, RefundPayloadJson, SettlePayloadJson, VoucherJson, VoucherPayload,
};
pub use decode::{FieldError, from_slice, from_value};
pub use exact::{Accepted, Authorization, ExactEvmPayload, ExactPayload, PaymentPayload, Requirements};
pub use facilitator::{FacilitatorRequest, SettleResponse, SupportedKind, SupportedResponse, VerifyResponse};
pub use fields::DecimalU256;
pub use network::{Network, V1_NETWORKS};

/// The x402 protocol version this crate speaks.
pub const X402_VERSION: u32 = 2;
