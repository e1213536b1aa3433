//! `batch-settlement` payloads as gateways pass them through: the raw
//! `PAYMENT-SIGNATURE` header, base64 of the x402 JSON `PaymentPayload`
//! whose `payload` is a `voucher`, `deposit` or `refund`.

use alloy::primitives::{U256, aliases::U40};
use serde::Deserialize;
use x402_channel::ChannelConfig;

use super::{ChannelExtra, DepositPayload, VoucherPayload};
use crate::{
    reason::InvalidField,
    verify::{AcceptedJson, Uint, parse_address, parse_b256, parse_hex, parse_uint},
};

const FIELD: &str = "payment_signature_header";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HeaderJson {
    x402_version: u64,
    accepted: AcceptedJson,
    payload: PayloadJson,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", rename_all_fields = "camelCase")]
enum PayloadJson {
    Voucher { channel_config: ConfigJson, voucher: VoucherJson },
    Deposit { channel_config: ConfigJson, voucher: VoucherJson, deposit: DepositJson },
    Refund { channel_config: ConfigJson, voucher: VoucherJson, amount: Option<Uint> },
}

/// A channel config as the reference packages write it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConfigJson {
    payer: String,
    payer_authorizer: String,
    receiver: String,
    receiver_authorizer: String,
    token: String,
    withdraw_delay: Uint,
    salt: String,
}

impl ConfigJson {
    /// The config, its fields named `<path>.<field>` under `f` in errors.
    pub(crate) fn config(&self, f: Fields<'_>, path: &str) -> Result<ChannelConfig, InvalidField> {
        let at = |field: &str| format!("{path}.{field}");
        let withdraw_delay = f.uint64(&at("withdrawDelay"), &self.withdraw_delay)?;
        Ok(ChannelConfig {
            payer: f.address(&at("payer"), &self.payer)?,
            payerAuthorizer: f.address(&at("payerAuthorizer"), &self.payer_authorizer)?,
            receiver: f.address(&at("receiver"), &self.receiver)?,
            receiverAuthorizer: f.address(&at("receiverAuthorizer"), &self.receiver_authorizer)?,
            token: f.address(&at("token"), &self.token)?,
            withdrawDelay: U40::try_from(withdraw_delay)
                .map_err(|_| f.invalid(&at("withdrawDelay"), "does not fit a uint40"))?,
            salt: parse_b256(&self.salt).ok_or_else(|| f.invalid(&at("salt"), "is not 32 hex bytes"))?,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VoucherJson {
    channel_id: String,
    max_claimable_amount: Uint,
    signature: String,
}

#[derive(Deserialize)]
struct DepositJson {
    amount: Uint,
    authorization: DepositAuthorizationJson,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DepositAuthorizationJson {
    erc3009_authorization: Erc3009Json,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Erc3009Json {
    valid_after: Uint,
    valid_before: Uint,
    salt: String,
    signature: String,
}

/// Where a payload's fields are, for errors: `<prefix>.<path>`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fields<'a>(pub(crate) &'a str);

/// The fields of a decoded `PAYMENT-SIGNATURE` header.
const HEADER: Fields<'static> = Fields("payment_signature_header.payload");

impl Fields<'_> {
    pub(crate) fn invalid(self, path: &str, message: &str) -> InvalidField {
        InvalidField::new(format!("{}.{path}", self.0), message.to_owned())
    }

    pub(crate) fn address(self, path: &str, s: &str) -> Result<alloy::primitives::Address, InvalidField> {
        parse_address(s).ok_or_else(|| self.invalid(path, "is not a 20-byte hex address"))
    }

    pub(crate) fn uint128(self, path: &str, v: &Uint) -> Result<u128, InvalidField> {
        parse_uint(v).and_then(|v| u128::try_from(v).ok()).ok_or_else(|| self.invalid(path, "is not a uint128"))
    }

    fn uint64(self, path: &str, v: &Uint) -> Result<u64, InvalidField> {
        parse_uint(v).and_then(|v| u64::try_from(v).ok()).ok_or_else(|| self.invalid(path, "is not a uint64"))
    }

    /// A salt as the reference client writes it: 0x-hex (up to 32 bytes) or
    /// decimal.
    fn salt(self, path: &str, s: &str) -> Result<U256, InvalidField> {
        match parse_hex(s) {
            Some(bytes) if bytes.len() <= 32 => Ok(U256::from_be_slice(&bytes)),
            Some(_) => Err(self.invalid(path, "is longer than 32 bytes")),
            None => crate::verify::parse_decimal_u256(s).ok_or_else(|| self.invalid(path, "is not hex or decimal")),
        }
    }
}

/// Decodes a `batch-settlement` `PAYMENT-SIGNATURE` header; `extra` is what
/// the gateway's requirements say (`extra.receiverAuthorizer`,
/// `extra.withdrawDelay`), not what the client claims it accepted.
pub(crate) fn decode(header: &str, extra: ChannelExtra) -> Result<VoucherPayload, InvalidField> {
    let json = crate::verify::header_bytes(header)?;
    let parsed = serde_json::from_slice(&json).map_err(|e| not_a_payload(&e))?;
    payload(parsed, extra)
}

/// [`decode`] of a `PaymentPayload` already parsed as JSON (the body of an
/// x402 facilitator request).
pub(crate) fn decode_value(
    payload_json: serde_json::Value,
    extra: ChannelExtra,
) -> Result<VoucherPayload, InvalidField> {
    payload(serde_json::from_value(payload_json).map_err(|e| not_a_payload(&e))?, extra)
}

fn not_a_payload(e: &serde_json::Error) -> InvalidField {
    InvalidField::new(FIELD, format!("is not an x402 batch-settlement PaymentPayload: {e}"))
}

fn payload(parsed: HeaderJson, extra: ChannelExtra) -> Result<VoucherPayload, InvalidField> {
    if parsed.x402_version != 2 {
        return Err(InvalidField::new(
            format!("{FIELD}.x402Version"),
            format!("is {}, only 2 is supported", parsed.x402_version),
        ));
    }
    if parsed.accepted.scheme != "batch-settlement" {
        return Err(InvalidField::new(format!("{FIELD}.accepted.scheme"), "is not \"batch-settlement\""));
    }
    let (config, voucher, deposit, refund) = match parsed.payload {
        PayloadJson::Voucher { channel_config, voucher } => (channel_config, voucher, None, None),
        PayloadJson::Deposit { channel_config, voucher, deposit } => (channel_config, voucher, Some(deposit), None),
        PayloadJson::Refund { channel_config, voucher, amount } => {
            let amount = amount.as_ref().map(|a| HEADER.uint128("amount", a)).transpose()?;
            (channel_config, voucher, None, Some(amount))
        }
    };
    let config = config.config(HEADER, "channelConfig")?;
    let deposit = match deposit {
        Some(d) => {
            let a = d.authorization.erc3009_authorization;
            Some(DepositPayload {
                amount: HEADER.uint128("deposit.amount", &d.amount)?,
                valid_after: HEADER.uint64("deposit.authorization.erc3009Authorization.validAfter", &a.valid_after)?,
                valid_before: HEADER
                    .uint64("deposit.authorization.erc3009Authorization.validBefore", &a.valid_before)?,
                salt: HEADER.salt("deposit.authorization.erc3009Authorization.salt", &a.salt)?,
                signature: parse_hex(&a.signature)
                    .ok_or_else(|| {
                        HEADER.invalid("deposit.authorization.erc3009Authorization.signature", "is not 0x-hex")
                    })?
                    .into(),
            })
        }
        None => None,
    };
    Ok(VoucherPayload {
        network: parsed.accepted.network,
        config,
        channel_id: parse_b256(&voucher.channel_id)
            .ok_or_else(|| HEADER.invalid("voucher.channelId", "is not 32 hex bytes"))?,
        max_claimable: HEADER.uint128("voucher.maxClaimableAmount", &voucher.max_claimable_amount)?,
        signature: parse_hex(&voucher.signature)
            .ok_or_else(|| HEADER.invalid("voucher.signature", "is not 0x-hex"))?
            .into(),
        charge: None,
        extra,
        deposit,
        refund,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{Address, B256};
    use base64::{Engine as _, engine::general_purpose::STANDARD};

    fn header(payload: &serde_json::Value) -> String {
        let json = serde_json::json!({
            "x402Version": 2,
            "accepted": { "scheme": "batch-settlement", "network": "eip155:31337" },
            "payload": payload,
        });
        STANDARD.encode(json.to_string())
    }

    fn config() -> serde_json::Value {
        serde_json::json!({
            "payer": format!("{}", Address::repeat_byte(1)),
            "payerAuthorizer": format!("{}", Address::repeat_byte(1)),
            "receiver": format!("{}", Address::repeat_byte(2)),
            "receiverAuthorizer": format!("{}", Address::repeat_byte(3)),
            "token": format!("{}", Address::repeat_byte(4)),
            "withdrawDelay": 900,
            "salt": format!("{}", B256::ZERO),
        })
    }

    fn voucher() -> serde_json::Value {
        serde_json::json!({
            "channelId": format!("{}", B256::repeat_byte(9)),
            "maxClaimableAmount": "5000",
            "signature": format!("0x{}", "11".repeat(65)),
        })
    }

    const EXTRA: ChannelExtra = ChannelExtra { receiver_authorizer: Address::ZERO, withdraw_delay: 900 };

    #[test]
    fn voucher_deposit_and_refund_payloads_decode() {
        let v = decode(
            &header(&serde_json::json!({"type": "voucher", "channelConfig": config(), "voucher": voucher()})),
            EXTRA,
        )
        .unwrap();
        assert_eq!(
            (v.max_claimable, v.channel_id, v.config.withdrawDelay),
            (5000, B256::repeat_byte(9), U40::from(900))
        );
        assert_eq!((v.deposit, v.refund, v.network.as_str()), (None, None, "eip155:31337"));

        let deposit = serde_json::json!({
            "amount": "100000",
            "authorization": { "erc3009Authorization": {
                "validAfter": "0", "validBefore": "1700000000",
                "salt": "0x00000000000000000000000000000000000000000000000000000000000000ff",
                "signature": format!("0x{}", "22".repeat(65)),
            }},
        });
        let d = decode(
            &header(&serde_json::json!({"type": "deposit", "channelConfig": config(), "voucher": voucher(), "deposit": deposit})),
            EXTRA,
        )
        .unwrap()
        .deposit
        .unwrap();
        assert_eq!((d.amount, d.valid_before, d.salt), (100_000, 1_700_000_000, U256::from(255)));

        let r = decode(
            &header(&serde_json::json!({"type": "refund", "channelConfig": config(), "voucher": voucher()})),
            EXTRA,
        )
        .unwrap();
        assert_eq!(r.refund, Some(None));
        let r = decode(
            &header(
                &serde_json::json!({"type": "refund", "channelConfig": config(), "voucher": voucher(), "amount": "70"}),
            ),
            EXTRA,
        )
        .unwrap();
        assert_eq!(r.refund, Some(Some(70)));
    }

    #[test]
    fn malformed_payloads_name_the_field() {
        let mut bad = config();
        bad["withdrawDelay"] = serde_json::json!(1u64 << 41);
        let err =
            decode(&header(&serde_json::json!({"type": "voucher", "channelConfig": bad, "voucher": voucher()})), EXTRA)
                .unwrap_err();
        assert_eq!(err.field, "payment_signature_header.payload.channelConfig.withdrawDelay");
        let err = decode(&header(&serde_json::json!({"type": "claim", "claims": []})), EXTRA).unwrap_err();
        assert!(err.message.contains("batch-settlement PaymentPayload"), "{}", err.message);
        assert!(decode("not base64!", EXTRA).is_err());
    }
}
