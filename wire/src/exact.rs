//! Requirements and the `exact` scheme's payment (EIP-3009
//! `transferWithAuthorization`).

use alloy::primitives::{Address, B256, Bytes, U256};
use serde::{Deserialize, Serialize};

use crate::{X402_VERSION, fields};

/// The x402 `PaymentRequirements` of a resource, as the resource server
/// asked for it.
///
/// JSON: `{scheme, network, amount, asset, payTo, maxTimeoutSeconds,
/// extra: {name, version}}`; a missing `extra` or `maxTimeoutSeconds` reads
/// as empty and zero, and other `extra` fields (a scheme's own) are ignored
/// here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "RequirementsJson", from = "RequirementsJson")]
pub struct Requirements {
    /// The payment scheme, such as `exact` or `batch-settlement`.
    pub scheme: String,
    /// The CAIP-2 network, `eip155:<chainId>`, as sent.
    pub network: String,
    /// The amount to pay, atomic token units as a decimal string.
    pub amount: U256,
    /// The token contract (`asset`), 0x-hex.
    pub asset: Address,
    /// `payTo`: the address that receives the payment, 0x-hex.
    pub pay_to: Address,
    /// `maxTimeoutSeconds`: how long the payment may take, seconds; payers set `validBefore` this far ahead.
    pub max_timeout_seconds: u64,
    /// The token's EIP-712 domain name (`extra.name`).
    pub eip712_name: String,
    /// The token's EIP-712 domain version (`extra.version`).
    pub eip712_version: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", expecting = "a PaymentRequirements object")]
struct RequirementsJson {
    scheme: String,
    network: String,
    #[serde(with = "fields::decimal")]
    amount: U256,
    #[serde(with = "fields::address")]
    asset: Address,
    #[serde(with = "fields::address")]
    pay_to: Address,
    #[serde(default)]
    max_timeout_seconds: u64,
    #[serde(default)]
    extra: Option<TokenExtra>,
}

/// The token's EIP-712 domain in `extra` (absent or `null`: empty).
#[derive(Default, Serialize, Deserialize)]
#[serde(expecting = "an extra object")]
struct TokenExtra {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    version: Option<String>,
}

impl From<Requirements> for RequirementsJson {
    fn from(r: Requirements) -> Self {
        Self {
            scheme: r.scheme,
            network: r.network,
            amount: r.amount,
            asset: r.asset,
            pay_to: r.pay_to,
            max_timeout_seconds: r.max_timeout_seconds,
            extra: Some(TokenExtra { name: Some(r.eip712_name), version: Some(r.eip712_version) }),
        }
    }
}

impl From<RequirementsJson> for Requirements {
    fn from(r: RequirementsJson) -> Self {
        Self {
            scheme: r.scheme,
            network: r.network,
            amount: r.amount,
            asset: r.asset,
            pay_to: r.pay_to,
            max_timeout_seconds: r.max_timeout_seconds,
            eip712_name: r.extra.as_ref().and_then(|e| e.name.clone()).unwrap_or_default(),
            eip712_version: r.extra.and_then(|e| e.version).unwrap_or_default(),
        }
    }
}

/// An EIP-3009 `TransferWithAuthorization` as the payer signed it.
///
/// JSON: `{from, to, value, validAfter, validBefore, nonce}`, the numbers
/// as decimal strings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    /// The payer, who signs and whose tokens move.
    #[serde(with = "fields::address")]
    pub from: Address,
    /// The recipient, which must be the requirements' `payTo`.
    #[serde(with = "fields::address")]
    pub to: Address,
    /// The amount, atomic token units as a decimal string; must equal the requirements' `amount`.
    #[serde(with = "fields::decimal")]
    pub value: U256,
    /// `validAfter`: unix seconds from which the authorization may be used.
    #[serde(with = "fields::decimal")]
    pub valid_after: U256,
    /// `validBefore`: unix seconds at which the authorization expires; settlement must land on chain before it.
    #[serde(with = "fields::decimal")]
    pub valid_before: U256,
    /// The payer's random 32-byte EIP-3009 nonce, 0x-hex; spent on chain by the transfer.
    #[serde(with = "fields::word")]
    pub nonce: B256,
}

impl Authorization {
    /// `validBefore` in seconds, saturated to `u64::MAX`.
    pub fn valid_before_secs(&self) -> u64 {
        self.valid_before.saturating_to()
    }

    /// `validAfter` in seconds, saturated to `u64::MAX`.
    pub fn valid_after_secs(&self) -> u64 {
        self.valid_after.saturating_to()
    }
}

/// A typed x402 `exact` payment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExactPayload {
    /// The network the payer signed for (`accepted.network`).
    pub network: String,
    /// The signed `TransferWithAuthorization`.
    pub authorization: Authorization,
    /// As sent: 65 bytes `r ‖ s ‖ v` for an EOA; anything else is refused.
    pub signature: Vec<u8>,
}

/// The `payload` of an `exact` EVM [`PaymentPayload`]:
/// `{signature, authorization}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExactEvmPayload {
    /// The payer's EIP-712 signature of `authorization`, 0x-hex (65 bytes `r ‖ s ‖ v` for an EOA).
    #[serde(with = "fields::bytes")]
    pub signature: Bytes,
    /// The signed `TransferWithAuthorization`.
    pub authorization: Authorization,
}

/// An x402 `PaymentPayload`: what a payer sends in the `PAYMENT-SIGNATURE`
/// header (base64 of this JSON), `P` being the scheme's payload. `A` is
/// how much of `accepted` to read: all of it, or only the [`Accepted`]
/// scheme and network a verifier needs (it checks the payment against the
/// resource server's own requirements, not the copy the payer echoes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayload<P, A = Requirements> {
    /// `x402Version`: the protocol version, [`X402_VERSION`].
    pub x402_version: u32,
    /// The resource paid for, as the resource server described it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<serde_json::Value>,
    /// The requirements the payer chose to pay.
    pub accepted: A,
    /// The scheme's payload (`exact`: [`ExactEvmPayload`]).
    pub payload: P,
    /// Extensions (`payment-identifier`, …), by name; kept as sent (a
    /// decoder reads the ones it knows, the others are none of its business).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<serde_json::Value>,
}

/// The part of a payload's `accepted` requirements a verifier reads: the
/// scheme and network the payer chose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The scheme the payer chose.
    pub scheme: String,
    /// The CAIP-2 network the payer signed for.
    pub network: String,
}

impl PaymentPayload<ExactEvmPayload> {
    /// The payload of `payment`, paying `accepted`.
    pub fn exact(accepted: &Requirements, payment: &ExactPayload) -> Self {
        Self {
            x402_version: X402_VERSION,
            resource: None,
            accepted: accepted.clone(),
            payload: ExactEvmPayload {
                signature: Bytes::copy_from_slice(&payment.signature),
                authorization: payment.authorization.clone(),
            },
            extensions: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use alloy::primitives::address;

    use super::*;

    fn requirements() -> Requirements {
        Requirements {
            scheme: "exact".into(),
            network: "eip155:84532".into(),
            amount: U256::from(10_000),
            asset: address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
            pay_to: address!("0x209693Bc6afc0C5328bA36FaF03C514EF312287C"),
            max_timeout_seconds: 60,
            eip712_name: "USDC".into(),
            eip712_version: "2".into(),
        }
    }

    #[test]
    fn requirements_read_what_they_write_in_the_reference_shape() {
        let json = serde_json::to_value(requirements()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "scheme": "exact", "network": "eip155:84532", "amount": "10000",
                "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
                "payTo": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
                "maxTimeoutSeconds": 60, "extra": { "name": "USDC", "version": "2" },
            })
        );
        assert_eq!(serde_json::from_value::<Requirements>(json.clone()).unwrap(), requirements());
        // What clients leave out or send as null reads as empty.
        for extra in [serde_json::Value::Null, serde_json::json!({ "name": null, "version": null })] {
            let mut sparse = json.clone();
            sparse["extra"] = extra;
            sparse.as_object_mut().unwrap().remove("maxTimeoutSeconds");
            let r: Requirements = serde_json::from_value(sparse).unwrap();
            assert_eq!((r.eip712_name.as_str(), r.eip712_version.as_str(), r.max_timeout_seconds), ("", "", 0));
        }
    }

    #[test]
    fn a_payment_payload_round_trips_and_names_a_bad_field() {
        let payment = ExactPayload {
            network: "eip155:84532".into(),
            authorization: Authorization {
                from: address!("0x857b06519E91e3A54538791bDbb0E22373e36b66"),
                to: requirements().pay_to,
                value: U256::from(10_000),
                valid_after: U256::ZERO,
                valid_before: U256::from(1_740_672_154u64),
                nonce: B256::repeat_byte(0xf3),
            },
            signature: vec![0x2d; 65],
        };
        let body = PaymentPayload::exact(&requirements(), &payment);
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["payload"]["authorization"]["validBefore"], "1740672154");
        assert_eq!(json["payload"]["signature"], format!("0x{}", "2d".repeat(65)));
        assert_eq!(serde_json::from_value::<PaymentPayload<ExactEvmPayload>>(json.clone()).unwrap(), body);

        let mut bad = json.clone();
        bad["payload"]["authorization"]["nonce"] = "0x1234".into();
        let err = decode_error(bad);
        assert!(err.contains(fields::NOT_A_WORD), "{err}");

        // What a client is told names the x402 object, not a Rust type.
        let mut no_requirements = json;
        no_requirements["accepted"] = serde_json::Value::Null;
        let err = decode_error(no_requirements);
        assert!(err.contains("a PaymentRequirements object") && !err.contains("Json"), "{err}");
    }

    fn decode_error(json: serde_json::Value) -> String {
        serde_json::from_value::<PaymentPayload<ExactEvmPayload>>(json).unwrap_err().to_string()
    }
}
