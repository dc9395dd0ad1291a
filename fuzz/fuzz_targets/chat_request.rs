//! Any bytes as a `/v1/chat/completions` body: parsing and the limits must return a
//! request or an error, never panic.
#![no_main]

use cascade::limits::Limits;
use cascade::openai::{parse_request, Endpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = parse_request(Endpoint::Chat, data) {
        let _ = Limits::default().check(&request);
    }
});
