//! Fuzzes what every HTTP request meets before a handler: the strict
//! percent-decoding check of its target, query parsing and the access
//! classification (`route_access`). Whatever a client sends, these return
//! a value or refuse it, never panic; a target that passes the check
//! decodes, and a KV route's resource is exactly its decoded key.
#![no_main]

use konsul_edge::http::testing::classify;
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 6] = ["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH"];

fuzz_target!(|data: &[u8]| {
    let Some((m, rest)) = data.split_first() else {
        return;
    };
    let Ok(target) = std::str::from_utf8(rest) else {
        return;
    };
    let method = METHODS[(*m as usize) % METHODS.len()];
    if let Some((resource, _cap)) = classify(method, target) {
        if let Some(key) = resource.strip_prefix("kv ") {
            // U+FFFD in a key must come from the client (raw, or encoded
            // with either case of hex digits), never from decoding.
            let upper = target.to_ascii_uppercase();
            assert!(
                !key.contains('\u{fffd}')
                    || upper.contains("%EF%BF%BD")
                    || target.contains('\u{fffd}')
            );
        }
    }
});
