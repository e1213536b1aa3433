//! The chain crate's error type.

/// `Result` with the chain crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong talking to a chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The local anvil node could not be installed or started.
    #[error("anvil: {0}")]
    Anvil(String),
}
