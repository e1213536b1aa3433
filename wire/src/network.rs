//! CAIP-2 network ids.

use std::fmt;

/// A CAIP-2 EVM network id, `eip155:<chainId>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Network(pub u64);

impl Network {
    /// Parses `eip155:<decimal chain id>`.
    pub fn parse(s: &str) -> Option<Self> {
        let id = s.strip_prefix("eip155:")?;
        if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        id.parse().ok().map(Self)
    }

    /// The chain id.
    pub const fn chain_id(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "eip155:{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_parses_caip2() {
        assert_eq!(Network::parse("eip155:8453"), Some(Network(8453)));
        assert_eq!(Network::parse("eip155:31337").unwrap().to_string(), "eip155:31337");
        for bad in
            ["eip155:", "eip155:-1", "eip155:+1", "eip155:0x1", "solana:1", "8453", "eip155:99999999999999999999999"]
        {
            assert_eq!(Network::parse(bad), None, "{bad}");
        }
    }
}
