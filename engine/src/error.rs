//! The engine's error type.

/// `Result` with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong inside the engine (payment rejections are not errors:
/// see [`crate::Rejection`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ledger's storage could not read or write (an I/O error or a
    /// full disk underneath); nothing of the operation took effect.
    #[error("ledger storage: {0}")]
    Storage(String),
    /// A ledger record does not decode.
    #[error("ledger record does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A ledger record is well-formed protobuf but not a valid record.
    #[error("corrupt ledger record: {0}")]
    Corrupt(&'static str),
    /// The ledger is closed after a failed write and could not be opened
    /// again yet (the disk may still be full); retried at the next commit.
    #[error("the ledger is closed after a failed write: {0}")]
    LedgerClosed(String),
    /// The data directory was written by an incompatible version.
    #[error("ledger schema version {found}, this build reads {expected}")]
    Schema {
        /// The version the data directory holds.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// A group commit failed; nothing in it was recorded.
    #[error("ledger commit failed: {0}")]
    Commit(std::sync::Arc<Self>),
    /// A settlement update names a payment the ledger does not have.
    #[error("no payment {0}")]
    UnknownPayment(crate::domain::PaymentId),
    /// A transaction intent would replace the recorded one of another
    /// transaction at its nonce (the nonce was handed out twice): refused,
    /// so that neither is forgotten.
    #[error("intent at {0:?} would replace the recorded intent of another transaction")]
    IntentConflict(crate::domain::IntentKey),
    /// The chain could not be read or written.
    #[error("chain: {0}")]
    Chain(Box<x402_chain::Error>),
    /// An answer awaited (from the chain: a receipt, a read) did not come
    /// in time; the operation may still complete, and can be retried.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A key x402d holds could not sign.
    #[error("signing: {0}")]
    Signing(String),
    /// The request names a chain this node does not settle (no `[chain]`
    /// for it).
    #[error("chain {0} is not settled by this node: no [chain] is configured for it")]
    UnknownChain(u64),
    /// The pipeline has stopped (shutdown or a thread died).
    #[error("pipeline stopped")]
    PipelineStopped,
    /// A pipeline thread died (panicked): the node no longer answers
    /// payments and must be restarted.
    #[error("pipeline thread {0} died")]
    PipelineThreadDied(String),
    /// A merchant update is not acceptable (the field, what is wrong).
    #[error("{0}")]
    InvalidMerchant(String),
    /// An API key is already in use by another merchant.
    #[error("that API key already belongs to merchant {merchant:?}")]
    DuplicateApiKey {
        /// The merchant that has it.
        merchant: String,
    },
    /// The gRPC server failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// gRPC reflection could not be set up.
    #[error("grpc reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A configuration value is wrong (found at start-up, or when a
    /// configured value is first used).
    #[error("config: {0}")]
    Config(String),
    /// File or socket I/O failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether retrying the same operation later may succeed: storage and
    /// I/O failures, a closed ledger, a timeout, a chain that may come back,
    /// and a failed commit for any of those reasons.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage(_) | Self::Io(_) | Self::LedgerClosed(_) | Self::Timeout(_) => true,
            Self::Commit(cause) => cause.is_retryable(),
            Self::Chain(e) => e.is_retryable(),
            _ => false,
        }
    }
}

impl Error {
    /// What a client is told of this error. A chain node's own words (its
    /// provider's limits and plans, its URL, its error codes) are for the
    /// operator's log: a client learns that the chain could not be read
    /// and that it may retry. Everything else says what it is.
    pub fn for_clients(&self) -> String {
        match self {
            // The node's words: its transport, its provider, its pool.
            Self::Chain(e)
                if matches!(
                    **e,
                    x402_chain::Error::Rpc(_)
                        | x402_chain::Error::Contract(_)
                        | x402_chain::Error::PendingTransaction(_)
                ) || e.is_retryable() =>
            {
                tracing::warn!(error = %e, "a chain request failed; the client is told to retry");
                "the chain node could not be reached or gave no usable answer; retry".into()
            }
            Self::Commit(cause) => format!("ledger commit failed: {}", cause.for_clients()),
            other => other.to_string(),
        }
    }
}

impl From<x402_chain::Error> for Error {
    fn from(e: x402_chain::Error) -> Self {
        Self::Chain(Box::new(e))
    }
}
