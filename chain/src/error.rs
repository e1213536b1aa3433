//! The chain crate's error type.

use alloy::transports::TransportError;

/// `Result` with the chain crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong talking to a chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The local anvil node could not be installed or started.
    #[error("anvil: {0}")]
    Anvil(String),
    /// A JSON-RPC call failed.
    #[error("rpc: {0}")]
    Rpc(#[from] TransportError),
    /// A contract call or deployment failed.
    #[error("contract: {0}")]
    Contract(#[from] alloy::contract::Error),
    /// A node or contract answered something that does not decode.
    #[error("decoding: {0}")]
    Decode(String),
    /// A transaction could not be signed.
    #[error("signing: {0}")]
    Sign(String),
    /// The node has seen this signer's nonce used: sign the call again.
    #[error("nonce {nonce} of {signer} is already used on chain")]
    NonceTooLow { signer: alloy::primitives::Address, nonce: u64 },
    /// A setting is wrong.
    #[error("config: {0}")]
    Config(String),
    /// A sent transaction could not be followed to its receipt.
    #[error("pending transaction: {0}")]
    PendingTransaction(#[from] alloy::providers::PendingTransactionError),
}

impl Error {
    /// Whether retrying later may succeed (the node may come back).
    pub const fn is_retryable(&self) -> bool {
        matches!(self, Self::Rpc(_) | Self::PendingTransaction(_) | Self::NonceTooLow { .. })
    }
}
