//! Payment-channel logic of the x402 `batch-settlement` EVM scheme.
//!
//! Pure logic, no I/O: the channel configuration and its id, and the EIP-712
//! digests of vouchers, with the same domain (`"x402 Batch Settlement"`,
//! version `"1"`) and type strings as the public contract, so signatures made
//! for it verify here. The per-channel state machine and claim policies
//! build on these.
//!
//! No feature flags.

mod config;

pub use config::{ChannelConfig, ChannelDomain, Voucher};
