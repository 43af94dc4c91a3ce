//! Fuzzes the MQTT packet decoder of the bridge's client: whatever a
//! broker (or something posing as one) sends, decoding returns packets or
//! an error, never panics, and never allocates past the packet it was
//! given. The first byte picks the protocol version (odd: MQTT 5).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = konsul_edge::mqtt::client::fuzz_decode(data);
});
