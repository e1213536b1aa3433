//! `batch-settlement` payloads as gateways pass them through: the raw
//! `PAYMENT-SIGNATURE` header, base64 of the x402 JSON `PaymentPayload`
//! whose `payload` is a `voucher`, `deposit` or `refund` (the types are
//! `x402_wire`'s).

use x402_wire::ChannelPayloadJson;

use super::{ChannelExtra, VoucherPayload};
use crate::{reason::InvalidField, verify::decode_payment_payload};

/// Decodes a `batch-settlement` `PAYMENT-SIGNATURE` header; `extra` is what
/// the gateway's requirements say (`extra.receiverAuthorizer`,
/// `extra.withdrawDelay`), not what the client claims it accepted.
pub(crate) fn decode(header: &str, extra: ChannelExtra) -> Result<VoucherPayload, InvalidField> {
    const FIELD: &str = "payment_signature_header";
    payload(&crate::verify::header_bytes(header)?, extra, FIELD)
}

/// [`decode`] of a `PaymentPayload` already parsed as JSON (the body of an
/// x402 facilitator request), its fields named under `paymentPayload`.
pub(crate) fn decode_value(
    payload_json: &serde_json::Value,
    extra: ChannelExtra,
) -> Result<VoucherPayload, InvalidField> {
    let json = serde_json::to_vec(payload_json).expect("a JSON value serializes");
    payload(&json, extra, "paymentPayload")
}

fn payload(json: &[u8], extra: ChannelExtra, field: &str) -> Result<VoucherPayload, InvalidField> {
    let parsed = decode_payment_payload::<ChannelPayloadJson>(json, field)?;
    if parsed.accepted.scheme != "batch-settlement" {
        return Err(InvalidField::new(format!("{field}.accepted.scheme"), "is not \"batch-settlement\""));
    }
    parsed
        .payload
        .into_voucher(parsed.accepted.network, extra)
        .map_err(|e| InvalidField::new(e.under(&format!("{field}.payload")), e.message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{Address, B256, U256, aliases::U40};
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
        assert_eq!(err.field, "payment_signature_header.payload.type");
        assert!(err.message.contains("unknown variant `claim`"), "{}", err.message);
        let err = decode(
            &header(&serde_json::json!({"type": "deposit", "channelConfig": config(), "voucher": voucher()})),
            EXTRA,
        )
        .unwrap_err();
        assert_eq!((&*err.field, &*err.message), ("payment_signature_header.payload", "missing field `deposit`"));
        let mut v = voucher();
        v["signature"] = "11".into();
        let err =
            decode(&header(&serde_json::json!({"type": "voucher", "channelConfig": config(), "voucher": v})), EXTRA)
                .unwrap_err();
        assert_eq!(
            (&*err.field, &*err.message),
            ("payment_signature_header.payload.voucher.signature", "is not 0x-hex")
        );
        assert!(decode("not base64!", EXTRA).is_err());
    }
}
