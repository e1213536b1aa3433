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

    /// The network an x402 v1 name stands for (`base-sepolia`, …), as the
    /// reference's v1 table maps them ([`V1_NETWORKS`]).
    pub fn from_v1_name(name: &str) -> Option<Self> {
        V1_NETWORKS.iter().find(|(n, _)| *n == name).map(|(_, id)| Self(*id))
    }

    /// This network's x402 v1 name, if v1 has one.
    pub fn v1_name(self) -> Option<&'static str> {
        V1_NETWORKS.iter().find(|(_, id)| *id == self.0).map(|(n, _)| *n)
    }
}

/// The x402 v1 EVM network names and their chain ids, as the reference
/// maps them (`@x402/evm`'s v1 `EVM_NETWORK_CHAIN_ID_MAP`). v1 bodies name
/// networks so; v2 bodies use CAIP-2 ids.
pub const V1_NETWORKS: [(&str, u64); 21] = [
    ("ethereum", 1),
    ("sepolia", 11_155_111),
    ("abstract", 2741),
    ("abstract-testnet", 11_124),
    ("base-sepolia", 84_532),
    ("base", 8453),
    ("avalanche-fuji", 43_113),
    ("avalanche", 43_114),
    ("iotex", 4689),
    ("sei", 1329),
    ("sei-testnet", 1328),
    ("polygon", 137),
    ("polygon-amoy", 80_002),
    ("peaq", 3338),
    ("story", 1514),
    ("educhain", 41_923),
    ("skale-base-sepolia", 324_705_682),
    ("megaeth", 4326),
    ("monad", 143),
    ("stable", 988),
    ("stable-testnet", 2201),
];

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

    /// The v1 names map to their chains and back, each name and each chain
    /// once; anything else (a CAIP-2 id, another case, an unknown chain) is
    /// no v1 name.
    #[test]
    fn v1_names_map_to_their_chains_and_back() {
        assert_eq!(Network::from_v1_name("base"), Some(Network(8453)));
        assert_eq!(Network::from_v1_name("base-sepolia"), Some(Network(84_532)));
        assert_eq!(Network::from_v1_name("polygon-amoy"), Some(Network(80_002)));
        assert_eq!(Network(43_113).v1_name(), Some("avalanche-fuji"));
        for bad in ["eip155:8453", "Base", "base ", "", "anvil"] {
            assert_eq!(Network::from_v1_name(bad), None, "{bad:?}");
        }
        assert_eq!(Network(31_337).v1_name(), None, "anvil has no v1 name");
        for (name, id) in V1_NETWORKS {
            assert_eq!(Network::from_v1_name(name), Some(Network(id)));
            assert_eq!(Network(id).v1_name(), Some(name), "{name}: one name per chain");
        }
    }
}
