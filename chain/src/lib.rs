//! Chain access for the x402 settlement engine.
//!
//! Today this crate holds the contract-facing types the engine verifies
//! against (the EIP-3009 `TransferWithAuthorization` struct and its EIP-712
//! digest with a cached domain separator), bindings of the contracts in
//! `chain/contracts/` (an EIP-3009 test token and Multicall3, compiled
//! offline with solc-js), a harness that runs a local anvil node, the
//! [`Chain`] trait settlement is written against, and [`AlloyChain`], its
//! implementation on a JSON-RPC node with a transaction manager.
//!
//! No feature flags.

pub mod anvil;
pub mod batch;
mod chain;
pub mod channel;
pub mod contracts;
pub mod devnet;
pub mod eip3009;
mod error;
pub mod gas;
pub mod tx;

pub use chain::{
    AuthorizationSpent, AuthorizationUsed, Chain, ChannelLog, Follow, Receipt, TransferLog, any_included,
    send_and_follow,
};
pub use eip3009::{CancelAuthorization, Eip3009Domain, ReceiveWithAuthorization, TransferWithAuthorization};
pub use error::{Error, Result, redact_urls};
pub use tx::{AlloyChain, SignedTx, TxConfig};
