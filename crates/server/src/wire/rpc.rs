//! `get_all_records` encoded straight from the tables, and streamed to the
//! socket in chunks as it is encoded: a reply of 10,000 VMs (~70 MiB) is
//! never whole in memory, and the database's read lock is held only while
//! one chunk is encoded (so writers are not held up by a slow client).
//! Each record is as it was when its chunk was encoded.

use crate::context::Server;
use corral_db::State;
use corral_model::schema::ClassId;
use corral_model::{jsonrpc, xmlrpc};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Bytes encoded before a chunk goes to the socket.
const CHUNK: usize = 256 * 1024;

/// The records of one class, encoded a piece at a time.
struct AllRecords {
    class: ClassId,
    json: bool,
    /// The references as they were when the call started.
    refs: Vec<String>,
    next: usize,
    first: bool,
}

impl AllRecords {
    fn new(st: &State, class: ClassId, json: bool) -> AllRecords {
        AllRecords {
            class,
            json,
            refs: st.refs(class).cloned().collect(),
            next: 0,
            first: true,
        }
    }

    fn open(&self, out: &mut String) {
        out.push_str(if self.json { "{" } else { "<value><struct>" });
    }

    fn close(&self, out: &mut String) {
        out.push_str(if self.json { "}" } else { "</struct></value>" });
    }

    fn done(&self) -> bool {
        self.next >= self.refs.len()
    }

    /// Encodes records until `out` holds at least `limit` bytes or none
    /// are left. Records destroyed since the call started are left out.
    fn fill(&mut self, st: &State, out: &mut String, limit: usize) {
        while out.len() < limit && !self.done() {
            // Each reference is encoded once, so it can be taken.
            let r = std::mem::take(&mut self.refs[self.next]);
            self.next += 1;
            if st.exists(self.class, &r) {
                self.record(st, &r, out);
            }
        }
    }

    fn record(&mut self, st: &State, r: &str, out: &mut String) {
        let json = self.json;
        if json {
            if !self.first {
                out.push(',');
            }
            jsonrpc::write_str(r, out);
            out.push_str(":{");
        } else {
            out.push_str("<member><name>");
            xmlrpc::escape_into(r, out);
            out.push_str("</name><value><struct>");
        }
        self.first = false;
        let mut first_field = true;
        st.visit_record(self.class, r, |name, v| {
            if json {
                if !first_field {
                    out.push(',');
                }
                jsonrpc::write_str(name, out);
                out.push(':');
                jsonrpc::write_value(v, out);
            } else {
                out.push_str("<member><name>");
                out.push_str(name);
                out.push_str("</name>");
                xmlrpc::write_value(v, out);
                out.push_str("</member>");
            }
            first_field = false;
        });
        out.push_str(if json {
            "}"
        } else {
            "</struct></value></member>"
        });
    }
}

/// How the reply is framed on the wire.
pub(crate) enum Envelope<'a> {
    XmlRpc,
    JsonRpc { id: &'a serde_json::Value, v2: bool },
}

impl Server {
    /// Encodes `<class>.get_all_records` whole: the XML-RPC `<value>` or the
    /// JSON-RPC result.
    pub fn write_all_records(&self, c: ClassId, json: bool, out: &mut String) {
        let st = self.db.read();
        let mut enc = AllRecords::new(&st, c, json);
        enc.open(out);
        enc.fill(&st, out, usize::MAX);
        enc.close(out);
    }
}

/// Writes a 200 reply to `<class>.get_all_records`, encoding and sending
/// it chunk by chunk: HTTP/1.1 chunked transfer coding, or for an HTTP/1.0
/// client a body that ends when the connection closes. Returns whether the
/// connection may carry another request.
pub(crate) async fn stream_all_records<S: AsyncWrite + Unpin>(
    server: &Server,
    stream: &mut S,
    class: ClassId,
    envelope: Envelope<'_>,
    keep_alive: bool,
    http10: bool,
) -> std::io::Result<bool> {
    let (ctype, head, tail) = match &envelope {
        Envelope::XmlRpc => {
            let (h, t) = xmlrpc::success_envelope();
            ("text/xml", h, t.to_owned())
        }
        Envelope::JsonRpc { id, v2 } => {
            let (h, t) = jsonrpc::success_envelope(id, *v2);
            ("application/json", h, t)
        }
    };
    let json = matches!(envelope, Envelope::JsonRpc { .. });
    let chunked = !http10;
    let keep_alive = keep_alive && chunked;
    let framing = if chunked {
        "Transfer-Encoding: chunked\r\n"
    } else {
        ""
    };
    let response_head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n{framing}Access-Control-Allow-Origin: *\r\nAccess-Control-Allow-Headers: X-Requested-With\r\nConnection: {}\r\n\r\n",
        if keep_alive { "keep-alive" } else { "close" }
    );
    stream.write_all(response_head.as_bytes()).await?;
    let mut buf = String::with_capacity(CHUNK + 64 * 1024);
    let mut enc = {
        let st = server.db.read();
        AllRecords::new(&st, class, json)
    };
    buf.push_str(head);
    enc.open(&mut buf);
    loop {
        {
            let st = server.db.read();
            enc.fill(&st, &mut buf, CHUNK);
        }
        if enc.done() {
            enc.close(&mut buf);
            buf.push_str(&tail);
        }
        write_piece(stream, buf.as_bytes(), chunked).await?;
        buf.clear();
        if enc.done() {
            break;
        }
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").await?;
    }
    stream.flush().await?;
    Ok(keep_alive)
}

async fn write_piece<S: AsyncWrite + Unpin>(
    stream: &mut S,
    data: &[u8],
    chunked: bool,
) -> std::io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    if chunked {
        stream
            .write_all(format!("{:x}\r\n", data.len()).as_bytes())
            .await?;
        stream.write_all(data).await?;
        stream.write_all(b"\r\n").await
    } else {
        stream.write_all(data).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::Config;
    use crate::daemon::{Options, build};
    use corral_model::{Value, class, field};

    fn dechunk(mut body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let line_end = body
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("size line");
            let size =
                usize::from_str_radix(std::str::from_utf8(&body[..line_end]).expect("hex"), 16)
                    .expect("size");
            body = &body[line_end + 2..];
            if size == 0 {
                assert_eq!(body, b"\r\n", "nothing after the last chunk");
                return out;
            }
            out.extend_from_slice(&body[..size]);
            assert_eq!(&body[size..size + 2], b"\r\n");
            body = &body[size + 2..];
        }
    }

    fn split_head(reply: &[u8]) -> (String, &[u8]) {
        let end = reply
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("head")
            + 4;
        (
            String::from_utf8_lossy(&reply[..end]).into_owned(),
            &reply[end..],
        )
    }

    /// A reply of many chunks, de-chunked, is byte for byte the reply
    /// encoded whole; HTTP/1.0 clients get it close-delimited.
    #[tokio::test]
    async fn streamed_reply_equals_the_whole_encoding() {
        let dir = std::env::temp_dir().join(format!("corral-rpc-{}", uuid::Uuid::new_v4()));
        let server = build(&Options {
            state_dir: dir.clone(),
            listen: None,
            tls_listen: None,
            root_password: Some("pw".into()),
            config: Config::default(),
        })
        .expect("server");
        server
            .db
            .write(|t| {
                for i in 0..1500 {
                    let r = format!("OpaqueRef:vm-{i}");
                    t.create(class::VM, &r, vec![])?;
                    t.set(
                        field::vm::NAME_LABEL,
                        &r,
                        Value::str(&format!("vm <{i}> & \"x\"")),
                    )?;
                }
                Ok(())
            })
            .expect("records");
        let whole_xml = xmlrpc::success_with(0, |o| server.write_all_records(class::VM, false, o));
        assert!(whole_xml.len() > 4 * CHUNK, "the test needs several chunks");
        let mut reply = Vec::new();
        let again = stream_all_records(
            &server,
            &mut reply,
            class::VM,
            Envelope::XmlRpc,
            true,
            false,
        )
        .await
        .expect("streams");
        assert!(again, "a chunked reply keeps the connection");
        let (head, body) = split_head(&reply);
        assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("content-length"),
            "{head}"
        );
        assert_eq!(dechunk(body), whole_xml.as_bytes());

        let id = serde_json::json!("req-1");
        for v2 in [false, true] {
            let whole =
                jsonrpc::success_with(&id, v2, 0, |o| server.write_all_records(class::VM, true, o));
            let mut reply = Vec::new();
            stream_all_records(
                &server,
                &mut reply,
                class::VM,
                Envelope::JsonRpc { id: &id, v2 },
                true,
                false,
            )
            .await
            .expect("streams");
            let (_, body) = split_head(&reply);
            assert_eq!(dechunk(body), whole.as_bytes(), "JSON v2={v2}");
        }

        let mut reply = Vec::new();
        let again =
            stream_all_records(&server, &mut reply, class::VM, Envelope::XmlRpc, true, true)
                .await
                .expect("streams");
        assert!(!again, "an HTTP/1.0 reply ends with the connection");
        let (head, body) = split_head(&reply);
        assert!(
            head.contains("Connection: close\r\n") && !head.contains("chunked"),
            "{head}"
        );
        assert_eq!(body, whole_xml.as_bytes());
        let _ = std::fs::remove_dir_all(dir);
    }
}
