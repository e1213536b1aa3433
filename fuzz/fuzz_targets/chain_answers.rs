//! What a node answers, decoded: a signed transaction's bytes as recorded
//! in an intent, an `aggregate3` return, channel state reads. Garbage from
//! a faulty or hostile RPC is an error, never a panic.
#![no_main]

use alloy::primitives::{Address, Bytes};
use libfuzzer_sys::fuzz_target;
use x402_chain::{SignedTx, batch, channel};

fuzz_target!(|data: &[u8]| {
    let _ = SignedTx::from_raw(Bytes::copy_from_slice(data), Address::ZERO);
    if let Ok(rows) = batch::decode_aggregate3(data) {
        let _ = batch::decode_balances(&rows);
    }
    let delay = data.first().map_or(0, |b| u64::from(*b) * 60);
    let _ = channel::decode_state(data, delay);
    let delays = vec![delay; data.len() % 5];
    let _ = channel::decode_states(data, &delays);
});
