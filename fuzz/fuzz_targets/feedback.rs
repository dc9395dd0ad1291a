//! Any bytes as a `/v1/feedback` body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cascade::accounts::parse_feedback(data);
});
