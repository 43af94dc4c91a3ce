//! Fuzzes the config loader on one document: whatever a file holds, it is
//! accepted as a valid config or refused with an error whose message holds
//! no raw control character, never a panic, a hang or a memory blow-up
//! (the loader's nesting and size guards run before the YAML parser).
#![no_main]

use konsul_edge::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_yaml(text, "fuzz.yaml") {
        Ok(c) => {
            assert!(c.storage.max_size.0 >= 1 << 20);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                !msg.chars().any(|c| c.is_control() && c != '\n' && c != '\t'),
                "raw control character in {msg:?}"
            );
        }
    }
});
