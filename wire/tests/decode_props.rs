//! Properties of decoding outside input, over generated inputs: whatever
//! arrives, a decoder answers a value or an error that names where it is
//! wrong (never a panic), and what x402d writes it reads back unchanged.

use alloy::primitives::{Address, B256, U256};
use proptest::prelude::*;
use x402_wire::{
    Accepted, Authorization, ChannelPayloadJson, ExactEvmPayload, ExactPayload, FacilitatorRequest, PaymentPayload,
    Requirements, from_slice,
};

fn requirements() -> impl Strategy<Value = Requirements> {
    (any::<[u8; 20]>(), any::<[u8; 20]>(), any::<[u8; 32]>(), any::<u64>(), "[a-zA-Z ]{0,12}", "[0-9]{0,3}").prop_map(
        |(asset, pay_to, amount, timeout, name, version)| Requirements {
            scheme: "exact".into(),
            network: "eip155:8453".into(),
            amount: U256::from_be_bytes(amount),
            asset: Address::from(asset),
            pay_to: Address::from(pay_to),
            max_timeout_seconds: timeout,
            eip712_name: name,
            eip712_version: version,
        },
    )
}

fn payment() -> impl Strategy<Value = ExactPayload> {
    (
        any::<[u8; 20]>(),
        any::<[u8; 20]>(),
        any::<[u8; 32]>(),
        any::<u64>(),
        any::<u64>(),
        any::<[u8; 32]>(),
        any::<Vec<u8>>(),
    )
        .prop_map(|(from, to, value, after, before, nonce, signature)| ExactPayload {
            network: "eip155:8453".into(),
            authorization: Authorization {
                from: Address::from(from),
                to: Address::from(to),
                value: U256::from_be_bytes(value),
                valid_after: U256::from(after),
                valid_before: U256::from(before),
                nonce: B256::from(nonce),
            },
            signature,
        })
}

/// Every path into `json`'s objects and arrays, as `FieldError` writes them.
fn paths(json: &serde_json::Value, at: &str, out: &mut Vec<String>) {
    out.push(at.to_owned());
    match json {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                paths(v, &if at.is_empty() { k.clone() } else { format!("{at}.{k}") }, out);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                paths(v, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// A JSON scalar or a small structure, to put where a field was.
fn junk() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
        ".{0,80}".prop_map(serde_json::Value::from),
        "0x[0-9a-fA-F]{0,70}".prop_map(serde_json::Value::from),
        "[0-9]{0,90}".prop_map(serde_json::Value::from),
        Just(serde_json::json!([])),
        Just(serde_json::json!({})),
    ]
}

/// `json` with the value at the `pick`-th path (of those with a parent)
/// replaced by `with`.
fn replace_one(json: &mut serde_json::Value, pick: usize, with: serde_json::Value) {
    fn visit(v: &mut serde_json::Value, n: &mut usize, with: &mut Option<serde_json::Value>) {
        let children: Vec<&mut serde_json::Value> = match v {
            serde_json::Value::Object(map) => map.values_mut().collect(),
            serde_json::Value::Array(items) => items.iter_mut().collect(),
            _ => return,
        };
        for child in children {
            if with.is_none() {
                return;
            }
            if *n == 0 {
                *child = with.take().unwrap();
                return;
            }
            *n -= 1;
            visit(child, n, with);
        }
    }
    let mut n = pick;
    visit(json, &mut n, &mut Some(with));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn what_is_written_is_read_back(r in requirements(), p in payment()) {
        let body = FacilitatorRequest::exact(&r, &p);
        let bytes = serde_json::to_vec(&body).unwrap();
        let read: FacilitatorRequest<PaymentPayload<ExactEvmPayload>> = from_slice(&bytes).unwrap();
        prop_assert_eq!(read, body);
    }

    #[test]
    fn arbitrary_bytes_are_answered_never_a_panic(bytes in any::<Vec<u8>>()) {
        let _ = from_slice::<PaymentPayload<ExactEvmPayload, Accepted>>(&bytes);
        let _ = from_slice::<PaymentPayload<ChannelPayloadJson, Accepted>>(&bytes);
        let _ = from_slice::<FacilitatorRequest<serde_json::Value, serde_json::Value>>(&bytes);
        if let Err(e) = from_slice::<Requirements>(&bytes) {
            prop_assert!(!e.message.is_empty());
        }
    }

    /// One field of a valid payload replaced by anything: it decodes, or
    /// the error names a place that is in the document (the field itself
    /// or one of its parents), so a client is told what to fix.
    #[test]
    fn a_bad_field_is_named(r in requirements(), p in payment(), pick in 0usize..64, with in junk()) {
        let mut json = serde_json::to_value(PaymentPayload::exact(&r, &p)).unwrap();
        let mut before = Vec::new();
        paths(&json, "", &mut before);
        replace_one(&mut json, pick % (before.len() - 1), with);
        let mut known = Vec::new();
        paths(&json, "", &mut known);
        let bytes = serde_json::to_vec(&json).unwrap();
        if let Err(e) = from_slice::<PaymentPayload<ExactEvmPayload>>(&bytes) {
            prop_assert!(!e.message.is_empty());
            prop_assert!(known.contains(&e.path), "{} names no place in {}", e, json);
        }
    }
}
