//! Any text as `cascade.toml`: reading and validating must return a configuration or an
//! error naming a key, never panic.
#![no_main]

use cascade::config::{Config, RawConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(raw) = RawConfig::parse_toml(text) {
        // No environment: secrets and URLs named by `*_env` keys read as unset.
        let _ = Config::validate(raw, None, &|_| None);
    }
});
