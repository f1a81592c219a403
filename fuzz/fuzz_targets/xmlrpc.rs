//! `scripts/fuzz.sh` runs this (and the other targets) for a bounded time,
//! growing `fuzz/corpus/xmlrpc`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(call) = corral_model::xmlrpc::parse_call(data) {
        corral_fuzz_support::coerce_all(call.params);
    }
    let _ = corral_model::xmlrpc::parse_response(data);
});
