//! Fuzzes the sync decoder: any bytes a hub or an edge receives, with or
//! without snappy framing, decode to a message or an error and every update
//! in it validates or is refused, without panicking or allocating beyond
//! the limits (snappy's declared length is checked before decompressing).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    konsul_edge::sync::testing::decode_untrusted(data);
});
