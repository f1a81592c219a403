//! HTTP request heads and their framing, as corrald's connection loop reads
//! them: the head's end, the parse, Content-Length / Transfer-Encoding.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    use corral_model::http::{MAX_HEAD, find_head_end, parse_head};
    let Some(end) = find_head_end(data) else {
        return;
    };
    if end > MAX_HEAD {
        return;
    }
    if let Some(req) = parse_head(&data[..end]) {
        let len = req.content_length();
        if let Ok(Some(n)) = len {
            assert!(
                req.header("transfer-encoding").is_none(),
                "framing must be unambiguous"
            );
            let _ = data.get(end..end.saturating_add(n));
        }
        let _ = req.keep_alive();
    }
});
