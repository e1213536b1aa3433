//! Stage 1 of the pipeline: stateless verification of an x402 `exact`
//! payment, steps 1–8 of the protocol, entirely local.
//!
//! A [`Verifier`] is owned by one verifier thread; it caches EIP-712 domain
//! separators so a payment costs one struct hash and one public-key recovery.

use std::collections::HashMap;

use alloy::primitives::{Address, B256};
use base64::Engine as _;
use x402_chain::Eip3009Domain;
use x402_wire::{Accepted, ExactEvmPayload, PaymentPayload};

pub use crate::ecdsa::recover_signer;
use crate::{
    domain::{ExactPayload, IdempotencyKey, Merchant, Network, PaymentId, PaymentInput, Requirements, Submission},
    reason::{InvalidField, Reason, Rejection},
};

/// The largest `PAYMENT-SIGNATURE` header accepted, in bytes.
pub const MAX_HEADER_LEN: usize = 16 * 1024;

/// `validBefore` must leave at least this many seconds (x402 step 6).
const MIN_VALID_BEFORE_MARGIN: u64 = 6;

/// `validAfter` must be more than this many seconds in the past (x402 step
/// 7, made strict as the token is, with room for a chain clock behind ours).
pub const VALID_AFTER_MARGIN: u64 = 2;

use x402_chain::signature::Erc6492;

/// A payment that passed steps 1–8.
#[derive(Clone, Debug)]
pub struct Verified {
    /// The payment's id (chain, token, payer and nonce).
    pub id: PaymentId,
    /// The chain id of the requirements' network.
    pub chain_id: u64,
    /// The requirements it was verified against.
    pub requirements: Requirements,
    /// The payment as the payer signed it.
    pub payload: ExactPayload,
    /// The EIP-712 digest the payer signed.
    pub digest: B256,
    /// What the signature is, as far as stage 1 can tell without the chain.
    pub signature: SignatureCheck,
    /// Only check it (x402 `/verify`): nothing is reserved or recorded.
    pub dry_run: bool,
    /// The submit's idempotency key.
    pub idempotency: Option<IdempotencyKey>,
}

/// What stage 1 found of a payment's signature. Whether it is valid also
/// depends on whether the payer holds code, which the stateful stage learns
/// with its balance: the token checks a signer with code by ERC-1271, even
/// when an ECDSA signature recovers to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureCheck {
    /// It recovers to `authorization.from`: valid for a payer without code.
    Recovered,
    /// It does not (why: the length, another signer): valid only if the
    /// payer holds code that approves it.
    NotRecovered(String),
    /// An ERC-6492 wrapper by an allowlisted factory: valid if the wallet
    /// that factory deploys approves its inner signature.
    Counterfactual(Erc6492),
}

impl Verified {
    /// The payer (`authorization.from`; whether it signed is
    /// [`Verified::signature`]'s to say).
    pub const fn payer(&self) -> Address {
        self.payload.authorization.from
    }
}

pub use crate::reason::Refusal;

/// Minimum seconds of validity a payment must have left when accepted, per
/// settlement strategy: a strategy that settles later needs more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinValidity {
    /// Seconds, for `direct` merchants (`[pipeline.min_validity_secs] direct`).
    pub direct: u64,
    /// Seconds, for `batched` merchants (`[pipeline.min_validity_secs] batched`).
    pub batched: u64,
    /// Seconds, for `channel` merchants (`[pipeline.min_validity_secs] channel`).
    pub channel: u64,
}

impl Default for MinValidity {
    fn default() -> Self {
        Self { direct: MIN_VALID_BEFORE_MARGIN, batched: 30, channel: 60 }
    }
}

impl MinValidity {
    fn for_policy(&self, policy: &crate::domain::SettlementPolicy) -> u64 {
        use crate::domain::SettlementPolicy::*;
        let secs = match policy {
            Direct => self.direct,
            Batched { .. } => self.batched,
            Channel { .. } => self.channel,
        };
        secs.max(MIN_VALID_BEFORE_MARGIN)
    }
}

/// Token domains by (chain, token), then by (name, version).
type DomainCache = HashMap<(u64, Address), Vec<(String, String, Eip3009Domain)>>;

/// Stateless `exact` verification with a cache of domain separators.
#[derive(Debug, Default)]
pub struct Verifier {
    domains: DomainCache,
    /// Domains in `domains`, over all its lists.
    cached: usize,
    min_validity: MinValidity,
    /// The chains this node settles; `None`: record only, any chain.
    settled_chains: Option<Vec<u64>>,
    /// The factories whose ERC-6492 deployments are simulated, by chain.
    factories: Vec<(u64, Address)>,
}

impl Verifier {
    /// Upper bound on cached domains (every (chain, token, name, version)
    /// a payment named, whoever sent it); the cache is dropped when it
    /// grows past it.
    const MAX_DOMAINS: usize = 4096;

    /// A verifier that requires `min_validity` of every payment.
    pub fn new(min_validity: MinValidity) -> Self {
        Self { domains: HashMap::new(), cached: 0, min_validity, settled_chains: None, factories: Vec::new() }
    }

    /// Accepts ERC-6492 signatures of wallets deployed by `factories`, each
    /// on its chain (no other: a factory call is code x402d runs, in
    /// simulation and then in its own settlement transaction).
    pub fn with_factories(mut self, factories: Vec<(u64, Address)>) -> Self {
        self.factories = factories;
        self
    }

    /// Refuses payments on chains other than `chains` (`None`: any).
    pub fn settling(mut self, chains: Option<Vec<u64>>) -> Self {
        self.settled_chains = chains;
        self
    }

    /// Runs steps 1–8 for `merchant` at unix time `now` (one time for both
    /// bounds, or a [`crate::domain::Now`]).
    pub fn verify(
        &mut self,
        merchant: &Merchant,
        submission: Submission,
        now: impl Into<crate::domain::Now>,
    ) -> Result<Verified, Refusal> {
        let crate::domain::Now { latest: now, earliest } = now.into();
        let Submission { requirements, input, idempotency } = submission;
        let (payload, accepted_scheme) = match input {
            PaymentInput::Exact(payload) => (payload, None),
            PaymentInput::Header(header) => {
                let decoded = decode_header(&header)?;
                (decoded.payload, Some(decoded.scheme))
            }
            PaymentInput::Voucher(_) => {
                return Err(Refusal::Rejected {
                    id: None,
                    payer: None,
                    rejection: Rejection::new(Reason::Scheme, "a voucher is not an \"exact\" payment"),
                });
            }
        };
        let auth = &payload.authorization;
        let reject = |id: Option<PaymentId>, reason, message: String| Refusal::Rejected {
            id,
            payer: None,
            rejection: Rejection::new(reason, message),
        };

        // 1. scheme
        if requirements.scheme != "exact" || accepted_scheme.as_deref().is_some_and(|s| s != "exact") {
            let got = accepted_scheme.filter(|s| s != "exact").unwrap_or_else(|| requirements.scheme.clone());
            return Err(reject(None, Reason::Scheme, format!("scheme {got:?} is not \"exact\"")));
        }
        if matches!(merchant.policy, crate::domain::SettlementPolicy::Channel { .. }) {
            // Its settler claims channels only: an exact payment would stay
            // queued forever.
            return Err(reject(
                None,
                Reason::Scheme,
                format!("merchant {:?} is paid through batch-settlement channels, not \"exact\"", merchant.id),
            ));
        }
        // 2. token EIP-712 domain
        if requirements.eip712_name.is_empty() || requirements.eip712_version.is_empty() {
            return Err(reject(None, Reason::MissingEip712Domain, "extra.name and extra.version are required".into()));
        }
        // 3. network
        if payload.network != requirements.network {
            return Err(reject(
                None,
                Reason::NetworkMismatch,
                format!("payload network {:?} differs from required {:?}", payload.network, requirements.network),
            ));
        }
        let Some(network) = Network::parse(&requirements.network) else {
            return Err(reject(
                None,
                Reason::InvalidNetwork,
                format!("network {:?} is not an eip155 network", requirements.network),
            ));
        };
        let chain_id = network.chain_id();
        let id = PaymentId::new(chain_id, requirements.asset, auth.from, auth.nonce);
        if let Err(message) = settles(self.settled_chains.as_deref(), network) {
            return Err(reject(Some(id), Reason::InvalidNetwork, message));
        }
        if !merchant.accepts(chain_id, requirements.asset) {
            return Err(reject(
                Some(id),
                Reason::InvalidNetwork,
                format!("merchant does not accept token {} on {network}", requirements.asset),
            ));
        }
        // 4. signature: recovered here, or left to the chain for a payer
        // with code (the stateful stage knows which payers hold code).
        let domain = self.domain(chain_id, &requirements);
        let digest = domain.signing_hash(&x402_chain::TransferWithAuthorization::from(auth));
        let signature = match Erc6492::unwrap(&payload.signature) {
            None => match check_signature(&payload.signature, digest, auth.from) {
                Ok(()) => SignatureCheck::Recovered,
                Err(why) => SignatureCheck::NotRecovered(why),
            },
            Some(Ok(wrapped)) if self.factories.contains(&(chain_id, wrapped.factory)) => {
                SignatureCheck::Counterfactual(wrapped)
            }
            Some(Ok(wrapped)) => {
                return Err(reject(
                    Some(id),
                    Reason::Signature,
                    format!(
                        "ERC-6492 signature deploys its wallet through factory {}, which is not on this node's \
                         allowlist ([chain] erc6492_factories)",
                        wrapped.factory
                    ),
                ));
            }
            Some(Err(why)) => return Err(reject(Some(id), Reason::Signature, why)),
        };
        // Steps 5–8 refuse a payment signed by its payer for what it says. A
        // signature that does not recover is refused for that first, as the
        // reference does (the payment it would authorize is not this one),
        // and names no payer: only the chain could say it is a wallet's.
        let signed = |reason, message: String| match &signature {
            SignatureCheck::NotRecovered(why) => Refusal::Rejected {
                id: Some(id),
                payer: None,
                rejection: Rejection::new(Reason::Signature, format!("{why} (and {message})")),
            },
            _ => Refusal::Rejected { id: Some(id), payer: Some(auth.from), rejection: Rejection::new(reason, message) },
        };
        // 5. recipient
        if auth.to != requirements.pay_to {
            return Err(signed(
                Reason::RecipientMismatch,
                format!("authorization.to {} is not payTo {}", auth.to, requirements.pay_to),
            ));
        }
        if !merchant.pay_to.contains(&requirements.pay_to) {
            return Err(signed(
                Reason::RecipientMismatch,
                format!("payTo {} is not an address of merchant {:?}", requirements.pay_to, merchant.id),
            ));
        }
        // 6. validBefore, with the strategy's minimum remaining validity
        let min_left = self.min_validity.for_policy(&merchant.policy);
        if auth.valid_before_secs() < now.saturating_add(min_left) {
            return Err(signed(
                Reason::ValidBefore,
                format!(
                    "validBefore {} leaves less than the {min_left} s the {} strategy needs (now {now})",
                    auth.valid_before,
                    merchant.policy.name()
                ),
            ));
        }
        // 7. validAfter: EIP-3009 needs `block.timestamp > validAfter`, and
        // the block that settles it may carry a time a little behind ours.
        if auth.valid_after_secs().saturating_add(VALID_AFTER_MARGIN) >= earliest {
            return Err(signed(
                Reason::ValidAfter,
                format!(
                    "validAfter {} must be more than {VALID_AFTER_MARGIN} s before now ({earliest}): the token \
                     accepts it only in a block whose time is after it",
                    auth.valid_after
                ),
            ));
        }
        // 8. value
        if auth.value != requirements.amount {
            return Err(signed(
                Reason::Value,
                format!("authorization.value {} is not the required amount {}", auth.value, requirements.amount),
            ));
        }
        Ok(Verified { id, chain_id, requirements, payload, digest, signature, dry_run: false, idempotency })
    }

    fn domain(&mut self, chain_id: u64, req: &Requirements) -> &Eip3009Domain {
        let found = self
            .domains
            .get(&(chain_id, req.asset))
            .and_then(|entries| entries.iter().position(|(n, v, _)| *n == req.eip712_name && *v == req.eip712_version));
        if found.is_none() && self.cached >= Self::MAX_DOMAINS {
            self.domains.clear();
            self.cached = 0;
        }
        let entries = self.domains.entry((chain_id, req.asset)).or_default();
        let pos = found.unwrap_or_else(|| {
            let domain = Eip3009Domain::new(&req.eip712_name, &req.eip712_version, chain_id, req.asset);
            entries.push((req.eip712_name.clone(), req.eip712_version.clone(), domain));
            self.cached += 1;
            entries.len() - 1
        });
        &entries[pos].2
    }
}

/// `Err` with the reason when `network` is not among the `settled` chains
/// (`None`: a record-only node, any chain).
pub(crate) fn settles(settled: Option<&[u64]>, network: Network) -> Result<(), String> {
    match settled {
        Some(chains) if !chains.contains(&network.chain_id()) => {
            Err(format!("this node settles no payment on {network}: it settles on {chains:?}"))
        }
        _ => Ok(()),
    }
}

/// Checks that `signature` is a canonical 65-byte ECDSA signature of `digest`
/// by `expected`.
pub fn check_signature(signature: &[u8], digest: B256, expected: Address) -> Result<(), String> {
    if signature.len() != 65 {
        return Err(format!(
            "signature is {} bytes, not 65 (only a payer with code may sign otherwise: it checks its own signatures)",
            signature.len()
        ));
    }
    let recovered = recover_signer(signature.try_into().expect("length checked"), digest)?;
    if recovered != expected {
        return Err(format!("signature recovers to {recovered}, not authorization.from {expected}"));
    }
    Ok(())
}

/// A decoded `PAYMENT-SIGNATURE` header.
#[derive(Debug)]
struct DecodedHeader {
    scheme: String,
    payload: ExactPayload,
}

/// The JSON bytes of a `PAYMENT-SIGNATURE` header (standard base64), within
/// [`MAX_HEADER_LEN`].
pub(crate) fn header_bytes(header: &str) -> Result<Vec<u8>, InvalidField> {
    const FIELD: &str = "payment_signature_header";
    if header.len() > MAX_HEADER_LEN {
        return Err(InvalidField::new(FIELD, format!("is {} bytes, more than {MAX_HEADER_LEN}", header.len())));
    }
    base64::engine::general_purpose::STANDARD
        .decode(header.trim())
        .map_err(|e| InvalidField::new(FIELD, format!("is not base64: {e}")))
}

/// A `PAYMENT-SIGNATURE` header (x402 v2), or an `X-PAYMENT` one (v1: its
/// network a v1 name, read as the CAIP-2 id it stands for).
fn decode_header(header: &str) -> Result<DecodedHeader, InvalidField> {
    const FIELD: &str = "payment_signature_header";
    let json = header_bytes(header)?;
    let parsed = match decode_payment_payload::<ExactEvmPayload>(&json, FIELD) {
        Ok(parsed) => parsed,
        Err(e) if e.field.ends_with("x402Version") && payload_version(&json).and_then(|v| v.as_u64()) == Some(1) => {
            let v1: x402_wire::v1::PaymentPayloadV1<ExactEvmPayload> =
                x402_wire::from_slice(&json).map_err(|e| InvalidField::new(e.under(FIELD), e.message))?;
            return Ok(DecodedHeader {
                scheme: v1.scheme,
                payload: ExactPayload {
                    network: x402_wire::v1::caip2_of(&v1.network),
                    authorization: v1.payload.authorization,
                    signature: v1.payload.signature.into(),
                },
            });
        }
        Err(e) => return Err(e),
    };
    Ok(DecodedHeader {
        scheme: parsed.accepted.scheme,
        payload: ExactPayload {
            network: parsed.accepted.network,
            authorization: parsed.payload.authorization,
            signature: parsed.payload.signature.into(),
        },
    })
}

/// The `x402Version` of the JSON object `json`, if it is a number.
fn payload_version(json: &[u8]) -> Option<serde_json::Value> {
    #[derive(serde::Deserialize)]
    struct Version {
        #[serde(rename = "x402Version")]
        version: Option<serde_json::Value>,
    }
    x402_wire::from_slice::<Version>(json).ok()?.version.filter(serde_json::Value::is_number)
}

/// An x402 `PaymentPayload` (the JSON object `json`) with a payload `P`,
/// its fields named under `field`; a key given twice is refused. A payload
/// of another version is refused as such rather than for its shape. One
/// parse on the way to an accepted payment: the version alone is read only
/// to explain a refusal.
pub(crate) fn decode_payment_payload<P: serde::de::DeserializeOwned>(
    json: &[u8],
    field: &str,
) -> Result<PaymentPayload<P, Accepted>, InvalidField> {
    let wrong_version = |v: &dyn std::fmt::Display| {
        InvalidField::new(format!("{field}.x402Version"), format!("is {v}, only 2 is supported"))
    };
    match x402_wire::from_slice::<PaymentPayload<P, Accepted>>(json) {
        Ok(payload) if payload.x402_version == x402_wire::X402_VERSION => Ok(payload),
        Ok(payload) => Err(wrong_version(&payload.x402_version)),
        // A version that is not even a number is the shape's error.
        Err(e) => match payload_version(json) {
            Some(v) if v.as_u64() != Some(2) => Err(wrong_version(&v)),
            _ => Err(InvalidField::new(e.under(field), e.message)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::U256;
    use alloy::primitives::{address, b256, hex};
    use x402_wire::fields::parse_decimal_u256;

    /// `anvil_eip3009` in `shared/x402/vectors.json`: the signature recovers
    /// to the signer.
    #[test]
    fn anvil_vector_recovers() {
        let sig = hex!(
            "09f9b29ae465f75ab78981cb81948435c0e2c7a9a2879b365657fe801b0da6cb5b8a20b141ef90128c7c2012d93f4e7c72eec04a36e3cb120f7bc696029c61141b"
        );
        let digest = b256!("0xd93f977ef4729e23e1750880476907e01c90f0c7c02d4a7610678f539dff31db");
        let signer = address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
        assert_eq!(recover_signer(&sig, digest).unwrap(), signer);
        // v as 0/1 is normalised.
        let mut v01 = sig;
        v01[64] = 0;
        assert_eq!(recover_signer(&v01, digest).unwrap(), signer);
        // The malleated twin (n - s, flipped v) is refused.
        let n = U256::from_be_bytes(hex!("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141"));
        let mut high = sig;
        high[32..64].copy_from_slice(&(n - U256::from_be_slice(&sig[32..64])).to_be_bytes::<32>());
        high[64] = 28;
        assert!(recover_signer(&high, digest).unwrap_err().contains("half the curve order"));
        // A different digest recovers someone else.
        assert_ne!(recover_signer(&sig, B256::ZERO).ok(), Some(signer));
    }

    /// `permit2_exact_cross_sdk` in `shared/x402/vectors.json`: anvil key 0's
    /// signature over the given digest recovers to it.
    #[test]
    fn permit2_vector_recovers() {
        let sig = hex!(
            "71d701457d5c4c4ccb48ce0cbf1ff80dd2237c2e7a04272043b99e1c667e370d096fec3610f7c96c264294e25eff53a99eb8fd7ed25621b65e23e79a1c41abf51c"
        );
        let digest = b256!("0x93f7d7cc192fe78957fc114318393187c2fc5194c6d9ac26aba364559fac39d2");
        assert_eq!(recover_signer(&sig, digest).unwrap(), address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"));
    }

    /// Payments naming ever new token domains (one name per payment, all
    /// on one token) cannot grow the cache without bound.
    #[test]
    fn the_domain_cache_is_bounded_whatever_names_payments_carry() {
        let mut verifier = Verifier::new(MinValidity::default());
        let base = crate::testing::channel_requirements(Address::repeat_byte(1), Address::repeat_byte(2));
        for n in 0..3 * Verifier::MAX_DOMAINS {
            let req = Requirements { eip712_name: format!("token {n}"), ..base.clone() };
            let domain = verifier.domain(31337, &req).clone();
            assert_eq!(domain, Eip3009Domain::new(&req.eip712_name, "2", 31337, req.asset));
            let cached: usize = verifier.domains.values().map(Vec::len).sum();
            assert!(cached <= Verifier::MAX_DOMAINS, "{cached} domains cached");
            assert_eq!(cached, verifier.cached);
        }
    }

    /// `batch_settlement` voucher in `shared/x402/vectors.json`.
    #[test]
    fn voucher_vector_recovers() {
        let sig = hex!(
            "425af900f98c8b391b0120c8dcaa02a0f9923b083dba75a9874629d3ae69c44f0fa8b92d0a3aa35fe24317d689fb54bdd55f92125851731b9621752ebd76ba9a1c"
        );
        let digest = b256!("0x13a53a592689cfe97daf1169e2fb957a9694c5ecb9c648f1797b724c72786a28");
        assert_eq!(recover_signer(&sig, digest).unwrap(), address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"));
    }

    #[test]
    fn a_signature_of_another_length_is_not_an_ecdsa_one() {
        let err = check_signature(&[0u8; 64], B256::ZERO, Address::ZERO).unwrap_err();
        assert!(err.contains("64 bytes"), "{err}");
    }

    #[test]
    fn decimal_parsing() {
        assert_eq!(parse_decimal_u256("10000"), Some(U256::from(10_000)));
        assert_eq!(parse_decimal_u256(&U256::MAX.to_string()), Some(U256::MAX));
        for bad in [
            "",
            "-1",
            "1e6",
            "0x10",
            " 1",
            "115792089237316195423570985008687907853269984665640564039457584007913129639936",
        ] {
            assert_eq!(parse_decimal_u256(bad), None, "{bad:?}");
        }
    }
}

#[cfg(test)]
mod header_tests {
    use alloy::primitives::{Address, B256, U256};
    use base64::Engine as _;

    use super::*;

    fn header_json() -> serde_json::Value {
        serde_json::json!({
            "x402Version": 2,
            "accepted": { "scheme": "exact", "network": "eip155:31337",
                          "extra": { "name": null, "version": null } },
            "payload": {
                "signature": format!("0x{}", "11".repeat(65)),
                "authorization": {
                    "from": Address::repeat_byte(1).to_string(), "to": Address::repeat_byte(2).to_string(),
                    "value": "10000", "validAfter": "0", "validBefore": "1900000000",
                    "nonce": B256::repeat_byte(3).to_string(),
                },
            },
            "extensions": [],
        })
    }

    fn encode(json: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(json)
    }

    #[test]
    fn a_reference_header_decodes_with_nulls_and_odd_extensions_ignored() {
        let decoded = decode_header(&encode(&header_json().to_string())).unwrap();
        assert_eq!(decoded.scheme, "exact");
        assert_eq!(decoded.payload.authorization.value, U256::from(10_000));
    }

    /// serde reads a struct from a JSON array too: a header that is an
    /// array must not slip past the version check.
    #[test]
    fn only_an_object_of_version_2_is_a_payload() {
        let json = header_json();
        let as_array = serde_json::json!([1, null, json["accepted"], json["payload"], null]).to_string();
        let err = decode_header(&encode(&as_array)).unwrap_err();
        assert_eq!(err.field, "payment_signature_header");
        let mut v3 = json;
        v3["x402Version"] = 3.into();
        assert_eq!(decode_header(&encode(&v3.to_string())).unwrap_err().field, "payment_signature_header.x402Version");
    }

    /// An `X-PAYMENT` header (x402 v1, as the v1 packages' documentation
    /// shows it): its v1 network name is read as the CAIP-2 id.
    #[test]
    fn a_v1_x_payment_header_decodes_with_its_network_mapped() {
        let json = header_json();
        let v1 = serde_json::json!({
            "x402Version": 1,
            "scheme": "exact",
            "network": "base-sepolia",
            "payload": json["payload"],
        });
        let decoded = decode_header(&encode(&v1.to_string())).unwrap();
        assert_eq!(decoded.scheme, "exact");
        assert_eq!(decoded.payload.network, "eip155:84532");
        assert_eq!(decoded.payload.authorization.value, U256::from(10_000));
        // A v1 body missing its payload names the field.
        let err = decode_header(&encode(r#"{"x402Version":1,"scheme":"exact","network":"base"}"#)).unwrap_err();
        assert!(err.field.starts_with("payment_signature_header"), "{err:?}");
    }

    /// A key given twice is refused, not read as its last value: a gateway
    /// that reads the first must not see another payment than x402d.
    #[test]
    fn a_repeated_key_is_refused() {
        let json = header_json().to_string().replacen(r#""value":"10000""#, r#""value":"1","value":"10000""#, 1);
        assert!(json.contains(r#""value":"1","value""#), "{json}");
        let err = decode_header(&encode(&json)).unwrap_err();
        assert!(err.message.contains("duplicate field `value`"), "{err:?}");
        assert_eq!(err.field, "payment_signature_header.payload.authorization");
    }
}
