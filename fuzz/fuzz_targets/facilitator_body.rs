//! A `/verify` or `/settle` body, as the facilitator reads it: the
//! requirements and each `batch-settlement` payload type. Decoded or
//! refused with a field named, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use x402_wire::{
    ClaimPayloadJson, FacilitatorRequest, PayloadType, RefundPayloadJson, Requirements, SettlePayloadJson, from_slice,
    from_value,
};

fuzz_target!(|data: &[u8]| {
    let Ok(body) = from_slice::<FacilitatorRequest<serde_json::Value, serde_json::Value>>(data) else { return };
    let _ = from_value::<Requirements>(body.payment_requirements.clone());
    let payload = body.payment_payload.get("payload").cloned().unwrap_or_default();
    if let Ok(kind) = from_value::<PayloadType>(payload.clone()) {
        let _ = kind.kind.len();
    }
    let _ = from_value::<ClaimPayloadJson>(payload.clone());
    let _ = from_value::<SettlePayloadJson>(payload.clone());
    let _ = from_value::<RefundPayloadJson>(payload);
});
