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
    pub x402_version: u32,
    pub payment_payload: P,
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
    pub is_valid: bool,
    /// The reason code (`invalid_exact_evm_…`, …) when not valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

/// The answer to `/settle`. `transaction` is empty when there is none
/// (the reference writes `""`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleResponse {
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    #[serde(default)]
    pub transaction: String,
    pub network: String,
    /// A decimal amount, when the scheme moves one (deposits, refunds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

/// One scheme on one network that `/supported` lists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupportedKind {
    pub x402_version: u32,
    pub scheme: String,
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

/// The answer to `/supported`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupportedResponse {
    pub kinds: Vec<SupportedKind>,
    pub extensions: Vec<String>,
    /// Settlement signers by CAIP-2 pattern (`"eip155:*"`).
    pub signers: std::collections::BTreeMap<String, Vec<String>>,
}
