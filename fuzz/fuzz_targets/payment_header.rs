//! A `PAYMENT-SIGNATURE` header's JSON, `exact` or `batch-settlement`:
//! decoded or refused with a field named, never a panic; what decodes
//! reads back the same after writing it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use x402_wire::{Accepted, ChannelExtra, ChannelPayloadJson, ExactEvmPayload, PaymentPayload, from_slice};

fuzz_target!(|data: &[u8]| {
    match from_slice::<PaymentPayload<ExactEvmPayload, Accepted>>(data) {
        Ok(payload) => {
            let again = serde_json::to_vec(&payload).expect("decoded payloads serialize");
            let read: PaymentPayload<ExactEvmPayload, Accepted> =
                from_slice(&again).expect("what is written reads back");
            assert_eq!(read, payload);
        }
        Err(e) => assert!(!e.message.is_empty()),
    }
    if let Ok(payload) = from_slice::<PaymentPayload<ChannelPayloadJson, Accepted>>(data) {
        let extra = ChannelExtra { receiver_authorizer: alloy::primitives::Address::ZERO, withdraw_delay: 900 };
        let _ = payload.payload.into_voucher(payload.accepted.network, extra);
    }
});
