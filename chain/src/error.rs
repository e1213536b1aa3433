//! The chain crate's error type.

use alloy::transports::TransportError;

/// `Result` with the chain crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong talking to a chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A JSON-RPC call failed. (Shown without the node's URL, which often
    /// holds the provider's API key.)
    #[error("rpc: {}", redact_urls(&.0.to_string()))]
    Rpc(#[from] TransportError),
    /// A contract call or deployment failed.
    #[error("contract: {}", redact_urls(&.0.to_string()))]
    Contract(#[from] alloy::contract::Error),
    /// A node or contract answered something that does not decode.
    #[error("decoding: {0}")]
    Decode(String),
    /// A transaction could not be signed.
    #[error("signing: {0}")]
    Sign(String),
    /// The node has seen this signer's nonce used: sign the call again.
    #[error("nonce {nonce} of {signer} is already used on chain")]
    NonceTooLow {
        /// The signer.
        signer: alloy::primitives::Address,
        /// The nonce the transaction used.
        nonce: u64,
    },
    /// A setting is wrong.
    #[error("config: {0}")]
    Config(String),
    /// An address that should hold a contract (a token) holds no code.
    #[error("no contract at {0}")]
    NoContract(alloy::primitives::Address),
    /// A sent transaction could not be followed to its receipt.
    #[error("pending transaction: {}", redact_urls(&.0.to_string()))]
    PendingTransaction(#[from] alloy::providers::PendingTransactionError),
}

/// `text` with every URL (`http://…`, `https://…`, `ws://…`, `wss://…`)
/// replaced by `<rpc url>`: an RPC URL often carries the provider's API
/// key, and errors reach merchants and logs.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = ["http://", "https://", "ws://", "wss://"].iter().filter_map(|s| rest.find(s)).min() {
        out.push_str(&rest[..start]);
        out.push_str("<rpc url>");
        let url = &rest[start..];
        let end =
            url.find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>' | ',')).unwrap_or(url.len());
        rest = &url[end..];
    }
    out.push_str(rest);
    out
}

impl Error {
    /// Whether retrying later may succeed (the node may come back).
    pub const fn is_retryable(&self) -> bool {
        matches!(self, Self::Rpc(_) | Self::PendingTransaction(_) | Self::NonceTooLow { .. })
    }

    /// Whether the node ran the call and it reverted (as opposed to the
    /// node failing to answer); see [`crate::tx::is_revert`].
    pub fn is_revert(&self) -> bool {
        matches!(self, Self::Rpc(e) if e.as_error_resp().is_some_and(|r| crate::tx::is_revert(r.code, &r.message)))
    }

    /// Whether the node answered with a JSON-RPC error (it refused the
    /// request), as opposed to not answering.
    pub fn is_error_answer(&self) -> bool {
        matches!(self, Self::Rpc(e) if e.as_error_resp().is_some())
    }

    /// Whether the node ran the call and it failed in execution: it
    /// reverted, or ran out of gas (which anvil answers as an internal
    /// error, -32603 "EVM error OutOfGas", and geth as -32000 "out of gas").
    pub fn is_execution_failure(&self) -> bool {
        self.is_revert()
            || matches!(self, Self::Rpc(e) if e.as_error_resp().is_some_and(|r| {
                let message = r.message.to_ascii_lowercase();
                message.contains("out of gas") || message.contains("outofgas")
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::redact_urls;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_urls("error sending request for url (https://base.example/v2/sk-123): refused"),
            "error sending request for url (<rpc url>): refused"
        );
        assert_eq!(redact_urls("a ws://h:1/k b http://x"), "a <rpc url> b <rpc url>");
        assert_eq!(redact_urls("no url here"), "no url here");
    }
}
