//! Chain access for the x402 settlement engine.
//!
//! This crate holds the contract-facing types the engine verifies against
//! (the EIP-3009 `TransferWithAuthorization` struct and its EIP-712 digest
//! with a cached domain separator), bindings of the contracts in
//! `chain/contracts/` (compiled offline with solc-js), the [`Chain`] trait
//! settlement is written against, and [`AlloyChain`], its implementation on
//! a JSON-RPC node with a transaction manager. A local chain to run it on
//! (anvil, the dev deployment, the gas report) is the `x402-devnet` crate's.
//!
//! No feature flags.

#![warn(missing_docs)]

pub mod batch;
mod chain;
pub mod channel;
pub mod contracts;
pub mod eip3009;
mod error;
pub mod signature;
pub mod tx;

pub use chain::{
    AuthorizationSpent, AuthorizationUsed, Chain, ChannelLog, Follow, Receipt, TransferLog, any_included, follow_sent,
    send_and_follow, send_new,
};
pub use eip3009::{CancelAuthorization, Eip3009Domain, ReceiveWithAuthorization, TransferWithAuthorization};
pub use error::{Error, Result, redact_urls};
pub use tx::{AlloyChain, SignedTx, TxConfig};
