//! HTTP/1.x request heads, as corrald reads them: one parser (httparse)
//! and one framing rule, kept pure so they can be fuzzed.

/// The most a request head may take, checked as its bytes arrive.
pub const MAX_HEAD: usize = 16 * 1024;

pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub http10: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The body's length: `Ok(None)` without framing, `Err` when the
    /// framing is ambiguous (several Content-Length headers, one that is
    /// not plain digits, or Transfer-Encoding together with one).
    pub fn content_length(&self) -> Result<Option<usize>, ()> {
        let mut lengths = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.trim());
        let first = lengths.next();
        if lengths.next().is_some() {
            return Err(());
        }
        let chunked = self.header("transfer-encoding").is_some();
        match first {
            None => Ok(None),
            Some(_) if chunked => Err(()),
            Some(v) if !v.is_empty() && v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit()) => {
                v.parse().map(Some).map_err(|_| ())
            }
            Some(_) => Err(()),
        }
    }

    pub fn keep_alive(&self) -> bool {
        match self.header("connection") {
            Some(v) if v.eq_ignore_ascii_case("close") => false,
            Some(v) if v.eq_ignore_ascii_case("keep-alive") => true,
            _ => !self.http10,
        }
    }
}

pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

pub fn parse_head(head: &[u8]) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Request::new(&mut headers);
    match r.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let target = r.path?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target.to_owned(), String::new()),
    };
    Some(Request {
        method: r.method?.to_owned(),
        path,
        query,
        headers: r
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        http10: r.version == Some(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(extra: &str) -> Request {
        parse_head(format!("POST / HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes()).unwrap()
    }

    #[test]
    fn framing_is_unambiguous_or_refused() {
        assert_eq!(
            head("Content-Length: 12\r\n").content_length(),
            Ok(Some(12))
        );
        assert_eq!(head("").content_length(), Ok(None));
        assert_eq!(
            head("Transfer-Encoding: chunked\r\n").content_length(),
            Ok(None)
        );
        for bad in [
            "Content-Length: 12\r\nContent-Length: 12\r\n",
            "Content-Length: 12\r\nContent-Length: 13\r\n",
            "Content-Length: +12\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: 0x10\r\n",
            "Content-Length: 1 2\r\n",
            "Content-Length: \r\n",
            "Content-Length: 99999999999999999999999\r\n",
            "Content-Length: 12\r\nTransfer-Encoding: chunked\r\n",
        ] {
            assert_eq!(head(bad).content_length(), Err(()), "{bad:?}");
        }
    }
}
