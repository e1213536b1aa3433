//! Chain access for the x402 settlement engine.
//!
//! Today this crate holds the contract-facing types the engine verifies
//! against: the EIP-3009 `TransferWithAuthorization` struct, its EIP-712
//! digest with a cached domain separator, and the token interface the
//! settlement layer calls. The `Chain` trait, its alloy implementation and
//! the transaction manager build on these.
//!
//! No feature flags.

pub mod eip3009;

pub use eip3009::{Eip3009Domain, TransferWithAuthorization};
