//! The bodies of the HTTP facilitator API (`/verify`, `/settle`,
//! `/supported`), as the reference resource-server middleware sends and
//! reads them.

use serde::{Deserialize, Serialize};

use crate::{ExactEvmPayload, ExactPayload, PaymentPayload, Requirements, X402_VERSION};

/// A `/verify` or `/settle` request: the payment and the requirements it
/// must meet. `P` is the payment payload: [`PaymentPayload`] of a scheme,
/// or a raw `serde_json::Value` for a decoder that reads it by scheme.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FacilitatorRequest<P, R = Requirements> {
    /// `x402Version`: the protocol version, [`X402_VERSION`].
    pub x402_version: u32,
    /// `paymentPayload`: the payer's payment, as it sent it.
    pub payment_payload: P,
    /// `paymentRequirements`: the resource server's own requirements the payment must meet.
    pub payment_requirements: R,
}

impl FacilitatorRequest<PaymentPayload<ExactEvmPayload>> {
    /// The request of a resource server for `payment` of `requirements`.
    pub fn exact(requirements: &Requirements, payment: &ExactPayload) -> Self {
        Self {
            x402_version: X402_VERSION,
            payment_payload: PaymentPayload::exact(requirements, payment),
            payment_requirements: requirements.clone(),
        }
    }
}

/// The answer to `/verify`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyResponse {
    /// `isValid`: whether the payment meets the requirements (a refusal is still HTTP 200 with this body).
    pub is_valid: bool,
    /// The reason code (`invalid_exact_evm_…`, …) when not valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_reason: Option<String>,
    /// `invalidMessage`: what is wrong, in words for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_message: Option<String>,
    /// The payer's address, 0x-hex, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    /// Scheme data; `batch-settlement` gives the channel's on-chain state (`channelId`, `balance`, `totalClaimed`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

/// The answer to `/settle`. `transaction` is empty when there is none
/// (the reference writes `""`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleResponse {
    /// Whether settlement succeeded (a failure is still HTTP 200 with this body).
    pub success: bool,
    /// `errorReason`: the reason code when not successful.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    /// `errorMessage`: what went wrong, in words for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// The payer's address, 0x-hex, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    /// The transaction hash, 0x-hex; `""` when no transaction was sent.
    #[serde(default)]
    pub transaction: String,
    /// The CAIP-2 network of the settlement, present on failure too.
    pub network: String,
    /// A decimal amount, when the scheme moves one (deposits, refunds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    /// Scheme data; `batch-settlement` gives `{channelState}`, the channel's on-chain state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

/// One scheme on one network that `/supported` lists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupportedKind {
    /// `x402Version` of this kind.
    pub x402_version: u32,
    /// The scheme, such as `exact` or `batch-settlement`.
    pub scheme: String,
    /// The CAIP-2 network, literally (`eip155:31337`, not a wildcard).
    pub network: String,
    /// Scheme data; `batch-settlement` gives `{receiverAuthorizer}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

/// The answer to `/supported`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupportedResponse {
    /// The scheme and network pairs this facilitator verifies and settles.
    pub kinds: Vec<SupportedKind>,
    /// Names of the x402 extensions supported.
    pub extensions: Vec<String>,
    /// Settlement signers by CAIP-2 pattern (`"eip155:*"`).
    pub signers: std::collections::BTreeMap<String, Vec<String>>,
}
