//! Payment-channel logic of the x402 `batch-settlement` EVM scheme.
//!
//! Pure logic, no I/O:
//! - [`ChannelDomain`]: the channel id and the EIP-712 digests of vouchers,
//!   refunds and claim batches, with the same domain (`"x402 Batch
//!   Settlement"`, version `"1"`) and type strings as the public contract, so
//!   signatures made for it verify here;
//! - [`Channel`]: the server's state of one channel (charged total, highest
//!   signed voucher, mirror of the contract), the voucher rules
//!   ([`Channel::check_voucher`]) and what a claim may take;
//! - [`ClaimPolicy`]: when claims are due.
//!
//! No feature flags.

#![warn(missing_docs)]

mod config;
mod state;

pub use config::{ChannelConfig, ChannelDomain, ClaimBatch, ClaimEntry, Refund, Voucher};
pub use state::{Channel, ClaimPolicy, ClaimReason, OnChain, SignedVoucher, VoucherError, Withdrawal};
