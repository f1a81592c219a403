//! `cargo fuzz run xmlrpc --sanitizer none -- crates/model/fuzz-seeds`
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = corral_model::xmlrpc::parse_call(data);
    let _ = corral_model::xmlrpc::parse_response(data);
    let _ = corral_model::jsonrpc::parse_call(data);
});
