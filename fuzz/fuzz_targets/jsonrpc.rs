//! JSON-RPC v1/v2 calls, then the parameters' coercion to set and map types
//! (linear time is a property the corpus runs keep an eye on).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(call) = corral_model::jsonrpc::parse_call(data) {
        corral_fuzz_support::coerce_all(call.params);
    }
});
