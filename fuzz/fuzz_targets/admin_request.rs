//! See `x402_engine::fuzzing::admin_request` for what it feeds and what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| x402_engine::fuzzing::admin_request(data));
