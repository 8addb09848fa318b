#![no_main]
//! See `aoai_gateway_fuzz::check_multipart_model`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    aoai_gateway_fuzz::check_multipart_model(data);
});
