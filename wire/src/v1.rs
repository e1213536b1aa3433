//! x402 v1 bodies, as the v1 packages (`x402`, `x402-express`,
//! `x402-fetch`) and the v2 packages' v1 schemes send them: `x402Version:
//! 1`, `maxAmountRequired`, network names such as `base-sepolia` (mapped by
//! [`V1_NETWORKS`](crate::V1_NETWORKS)), and the `X-PAYMENT` header, the
//! base64 of a [`PaymentPayloadV1`]. x402d reads them into the v2 types it
//! verifies, and answers in v1 words.

use alloy::primitives::{Address, U256};
use serde::{Deserialize, Serialize};

use crate::{Network, Requirements, fields};

/// The protocol version of these bodies.
pub const X402_V1: u32 = 1;

/// A v1 `PaymentRequirements`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequirementsV1 {
    /// The payment scheme (`exact`).
    pub scheme: String,
    /// The v1 network name, such as `base-sepolia`.
    pub network: String,
    /// `maxAmountRequired`: the amount, atomic token units (v2's `amount`).
    #[serde(with = "fields::decimal")]
    pub max_amount_required: U256,
    /// The resource paid for (a URL).
    #[serde(default)]
    pub resource: String,
    /// What the resource is.
    #[serde(default)]
    pub description: String,
    /// The resource's MIME type.
    #[serde(default)]
    pub mime_type: String,
    /// `payTo`: who is paid.
    #[serde(with = "fields::address")]
    pub pay_to: Address,
    /// How long the payment may take, seconds.
    #[serde(default)]
    pub max_timeout_seconds: u64,
    /// The token contract.
    #[serde(with = "fields::address")]
    pub asset: Address,
    /// The resource's output schema, as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<serde_json::Value>,
    /// The token's EIP-712 domain (`{name, version}`), as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

impl RequirementsV1 {
    /// The same requirements in v2 terms: the network as CAIP-2 (a name v1
    /// does not know is kept as it is, and verification refuses it as no
    /// `eip155` network), the token domain from `extra`.
    pub fn to_v2(&self) -> Requirements {
        let text = |key: &str| {
            self.extra.as_ref().and_then(|e| e.get(key)).and_then(serde_json::Value::as_str).unwrap_or_default()
        };
        Requirements {
            scheme: self.scheme.clone(),
            network: caip2_of(&self.network),
            amount: self.max_amount_required,
            asset: self.asset,
            pay_to: self.pay_to,
            max_timeout_seconds: self.max_timeout_seconds,
            eip712_name: text("name").to_owned(),
            eip712_version: text("version").to_owned(),
        }
    }
}

/// A v1 `PaymentPayload`: what the `X-PAYMENT` header carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayloadV1<P> {
    /// `x402Version`: 1.
    pub x402_version: u32,
    /// The scheme paid with.
    pub scheme: String,
    /// The v1 network name signed for.
    pub network: String,
    /// The scheme's payload (`exact`: [`ExactEvmPayload`](crate::ExactEvmPayload)).
    pub payload: P,
}

/// The CAIP-2 id of v1 network `name` (`base-sepolia` → `eip155:84532`);
/// `name` itself when v1 has no such name.
pub fn caip2_of(name: &str) -> String {
    Network::from_v1_name(name).map_or_else(|| name.to_owned(), |n| n.to_string())
}

/// The v1 name of CAIP-2 `network` (`eip155:8453` → `base`); `network`
/// itself when v1 has no name for it.
pub fn v1_name_of(network: &str) -> String {
    Network::parse(network).and_then(Network::v1_name).map_or_else(|| network.to_owned(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The requirements of the v1 packages' documentation (`x402` README:
    /// USDC on Base Sepolia, $0.01), as a v1 server sends them.
    #[test]
    fn documented_v1_requirements_read_as_v2() {
        let json = serde_json::json!({
            "scheme": "exact",
            "network": "base-sepolia",
            "maxAmountRequired": "10000",
            "resource": "https://api.example.com/premium-data",
            "description": "Access to premium market data",
            "mimeType": "application/json",
            "payTo": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
            "maxTimeoutSeconds": 60,
            "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
            "outputSchema": null,
            "extra": { "name": "USDC", "version": "2" }
        });
        let v1: RequirementsV1 = crate::from_value(json).unwrap();
        let v2 = v1.to_v2();
        assert_eq!(v2.network, "eip155:84532");
        assert_eq!(v2.amount, U256::from(10_000));
        assert_eq!((v2.eip712_name.as_str(), v2.eip712_version.as_str()), ("USDC", "2"));
        assert_eq!(v2.max_timeout_seconds, 60);
    }

    #[test]
    fn network_names_map_both_ways() {
        assert_eq!(caip2_of("base"), "eip155:8453");
        assert_eq!(v1_name_of("eip155:8453"), "base");
        assert_eq!(caip2_of("base-goerli"), "base-goerli", "unknown names are kept");
        assert_eq!(v1_name_of("eip155:31337"), "eip155:31337", "no v1 name");
    }
}
