//! The devnet crate's error type.

/// `Result` with the devnet crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong setting up or measuring a local chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The local anvil node could not be installed or started.
    #[error("anvil: {0}")]
    Anvil(String),
    /// A call to the chain failed.
    #[error(transparent)]
    Chain(#[from] x402_chain::Error),
    /// A measurement did not go as the chain should make it go (a payment
    /// not settled, a claim reverted).
    #[error("measuring: {0}")]
    Measure(String),
}

impl From<alloy::transports::TransportError> for Error {
    fn from(e: alloy::transports::TransportError) -> Self {
        Self::Chain(e.into())
    }
}

impl From<alloy::contract::Error> for Error {
    fn from(e: alloy::contract::Error) -> Self {
        Self::Chain(e.into())
    }
}

impl From<alloy::providers::PendingTransactionError> for Error {
    fn from(e: alloy::providers::PendingTransactionError) -> Self {
        Self::Chain(e.into())
    }
}
