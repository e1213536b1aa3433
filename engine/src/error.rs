//! The engine's error type.

/// `Result` with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong inside the engine (payment rejections are not errors:
/// see [`crate::Rejection`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RocksDB failed.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
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
    Schema { found: u32, expected: u32 },
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
    DuplicateApiKey { merchant: String },
    /// The gRPC server failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// gRPC reflection could not be set up.
    #[error("grpc reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A configuration value is wrong.
    #[error("config: {0}")]
    Config(String),
    /// File or socket I/O failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub const fn is_retryable(&self) -> bool {
        matches!(self, Self::Rocks(_) | Self::Io(_) | Self::LedgerClosed(_))
    }
}
