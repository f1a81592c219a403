//! XenServer's thin-CLI protocol (`POST /cli`), shared by `xe` and corrald.
//!
//! After the request the server sends a greeting (27 ASCII bytes and two
//! int32le version numbers), the client echoes it, and both exchange
//! frames: `int32le payload length`, then the payload, a message tag and
//! its body. Every integer is int32 little-endian; a string is its length
//! and its bytes. This crate only encodes and decodes; the I/O stays with
//! each side (blocking in `xe`, async in corrald).

pub const GREETING: &[u8] = b"XenSource thin CLI protocol";
/// The protocol version the server announces (0.2: `Response Wait`
/// heartbeats during transfers).
pub const VERSION: (i32, i32) = (0, 2);
/// The greeting and its two version numbers.
pub const GREETING_LEN: usize = GREETING.len() + 8;
/// Bytes in a frame's length prefix.
pub const FRAME_HEAD: usize = 4;

const MSG_COMMAND: i32 = 9;
const MSG_RESPONSE: i32 = 10;
const MSG_BLOB: i32 = 11;

const CMD_PRINT: i32 = 0;
const CMD_LOAD: i32 = 1;
const CMD_PROMPT: i32 = 3;
const CMD_EXIT: i32 = 4;
const CMD_HTTP_GET: i32 = 12;
const CMD_HTTP_PUT: i32 = 13;
const CMD_ERROR: i32 = 14;
const CMD_DEBUG: i32 = 15;
const CMD_PRINT_STDERR: i32 = 16;
const CMD_HTTP_CONNECT: i32 = 17;

const RESPONSE_OK: i32 = 5;
const RESPONSE_FAILED: i32 = 6;
const RESPONSE_WAIT: i32 = 18;

const BLOB_CHUNK: i32 = 7;
const BLOB_END: i32 = 8;

/// The greeting the server sends first, with its version.
pub fn greeting() -> Vec<u8> {
    let mut g = GREETING.to_vec();
    g.extend_from_slice(&VERSION.0.to_le_bytes());
    g.extend_from_slice(&VERSION.1.to_le_bytes());
    g
}

/// Whether `hello` is a greeting this side understands: the right prefix
/// and major version 0.
pub fn greeting_ok(hello: &[u8]) -> bool {
    hello.len() >= GREETING_LEN
        && hello.starts_with(GREETING)
        && read_i32(&hello[GREETING.len()..]) == Some(VERSION.0)
}

/// What the server asks the client to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Print a line on stdout.
    Print(String),
    /// Send a file's contents (a Response, then Blob frames).
    Load(String),
    /// Read one line from stdin and send it as a Blob.
    Prompt,
    /// Exit with this status.
    Exit(i32),
    /// Download `url` into `filename` (`""`: stdout), then answer.
    HttpGet { filename: String, url: String },
    /// Upload `filename` to `url`, then answer.
    HttpPut { filename: String, url: String },
    /// A XenAPI error: code and parameters, printed on stderr.
    Error { code: String, params: Vec<String> },
    /// Debug output, not shown.
    Debug(String),
    /// Write verbatim to stderr.
    PrintStderr(String),
    /// CONNECT to a console `url` and proxy the terminal, then answer.
    HttpConnect(String),
}

/// The client's answer to a command that needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    Ok,
    Failed,
    /// A heartbeat while a transfer is still running.
    Wait,
}

/// One decoded frame payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Command(Command),
    Response(Response),
    /// A data chunk of this many bytes follows the frame, raw.
    BlobChunk(usize),
    BlobEnd,
}

impl Command {
    /// The whole frame: length prefix and payload.
    pub fn frame(&self) -> Vec<u8> {
        let mut b = Body::new(MSG_COMMAND);
        match self {
            Command::Print(s) => b.int(CMD_PRINT).str(s),
            Command::Load(s) => b.int(CMD_LOAD).str(s),
            Command::Prompt => b.int(CMD_PROMPT),
            Command::Exit(n) => b.int(CMD_EXIT).int(*n),
            Command::HttpGet { filename, url } => b.int(CMD_HTTP_GET).str(filename).str(url),
            Command::HttpPut { filename, url } => b.int(CMD_HTTP_PUT).str(filename).str(url),
            Command::Error { code, params } => {
                b.int(CMD_ERROR).str(code).int(params.len() as i32);
                for p in params {
                    b.str(p);
                }
                &mut b
            }
            Command::Debug(s) => b.int(CMD_DEBUG).str(s),
            Command::PrintStderr(s) => b.int(CMD_PRINT_STDERR).str(s),
            Command::HttpConnect(url) => b.int(CMD_HTTP_CONNECT).str(url),
        };
        b.frame()
    }
}

impl Response {
    pub fn frame(self) -> Vec<u8> {
        let code = match self {
            Response::Ok => RESPONSE_OK,
            Response::Failed => RESPONSE_FAILED,
            Response::Wait => RESPONSE_WAIT,
        };
        Body::new(MSG_RESPONSE).int(code).frame()
    }
}

/// A Blob Chunk frame announcing `len` raw bytes (sent right after it).
pub fn blob_chunk_frame(len: usize) -> Vec<u8> {
    Body::new(MSG_BLOB).int(BLOB_CHUNK).int(len as i32).frame()
}

pub fn blob_end_frame() -> Vec<u8> {
    Body::new(MSG_BLOB).int(BLOB_END).frame()
}

/// The payload length a frame head announces (negative lengths read as 0).
pub fn payload_len(head: [u8; FRAME_HEAD]) -> usize {
    i32::from_le_bytes(head).max(0) as usize
}

/// Decodes one frame payload (without its length prefix); `None` for a tag
/// this side does not know or a truncated body.
pub fn decode(payload: &[u8]) -> Option<Message> {
    let mut r = Reader { b: payload, pos: 0 };
    match r.int()? {
        MSG_COMMAND => {
            let c = match r.int()? {
                CMD_PRINT => Command::Print(r.str()?),
                CMD_LOAD => Command::Load(r.str()?),
                CMD_PROMPT => Command::Prompt,
                CMD_EXIT => Command::Exit(r.int()?),
                CMD_HTTP_GET => Command::HttpGet {
                    filename: r.str()?,
                    url: r.str()?,
                },
                CMD_HTTP_PUT => Command::HttpPut {
                    filename: r.str()?,
                    url: r.str()?,
                },
                CMD_ERROR => {
                    let code = r.str()?;
                    let n = r.int()?.max(0);
                    let params = (0..n).map(|_| r.str()).collect::<Option<Vec<_>>>()?;
                    Command::Error { code, params }
                }
                CMD_DEBUG => Command::Debug(r.str()?),
                CMD_PRINT_STDERR => Command::PrintStderr(r.str()?),
                CMD_HTTP_CONNECT => Command::HttpConnect(r.str()?),
                _ => return None,
            };
            Some(Message::Command(c))
        }
        MSG_RESPONSE => Some(Message::Response(match r.int()? {
            RESPONSE_OK => Response::Ok,
            RESPONSE_FAILED => Response::Failed,
            RESPONSE_WAIT => Response::Wait,
            _ => return None,
        })),
        MSG_BLOB => match r.int()? {
            BLOB_CHUNK => Some(Message::BlobChunk(r.int()?.max(0) as usize)),
            BLOB_END => Some(Message::BlobEnd),
            _ => None,
        },
        _ => None,
    }
}

fn read_i32(b: &[u8]) -> Option<i32> {
    Some(i32::from_le_bytes(b.get(..4)?.try_into().ok()?))
}

struct Body(Vec<u8>);

impl Body {
    fn new(message: i32) -> Body {
        Body(message.to_le_bytes().to_vec())
    }
    fn int(&mut self, v: i32) -> &mut Body {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Body {
        self.int(s.len() as i32);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn frame(&self) -> Vec<u8> {
        let mut f = (self.0.len() as i32).to_le_bytes().to_vec();
        f.extend_from_slice(&self.0);
        f
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn int(&mut self) -> Option<i32> {
        let v = read_i32(self.b.get(self.pos..)?)?;
        self.pos += 4;
        Some(v)
    }
    fn str(&mut self) -> Option<String> {
        let n = usize::try_from(self.int()?).ok()?;
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(String::from_utf8_lossy(s).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of XenServer's protocol description, byte for byte.
    #[test]
    fn print_ok_is_the_documented_frame() {
        let f = Command::Print("ok".into()).frame();
        let expected: &[u8] = &[
            0x0e, 0, 0, 0, 0x09, 0, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, b'o', b'k',
        ];
        assert_eq!(f, expected);
    }

    #[test]
    fn every_message_round_trips() {
        let commands = [
            Command::Print("line".into()),
            Command::Load("/etc/x".into()),
            Command::Prompt,
            Command::Exit(3),
            Command::HttpGet {
                filename: "f".into(),
                url: "/export?x=1".into(),
            },
            Command::HttpPut {
                filename: "".into(),
                url: "u".into(),
            },
            Command::Error {
                code: "VM_BAD_POWER_STATE".into(),
                params: vec!["a".into(), "".into(), "ü".into()],
            },
            Command::Debug("d".into()),
            Command::PrintStderr("e\n".into()),
            Command::HttpConnect("/console?uuid=1".into()),
        ];
        for c in commands {
            let f = c.frame();
            let n = payload_len(f[..4].try_into().expect("head"));
            assert_eq!(n, f.len() - 4);
            assert_eq!(decode(&f[4..]), Some(Message::Command(c)));
        }
        for r in [Response::Ok, Response::Failed, Response::Wait] {
            assert_eq!(decode(&r.frame()[4..]), Some(Message::Response(r)));
        }
        assert_eq!(
            decode(&blob_chunk_frame(9)[4..]),
            Some(Message::BlobChunk(9))
        );
        assert_eq!(decode(&blob_end_frame()[4..]), Some(Message::BlobEnd));
    }

    #[test]
    fn truncated_or_unknown_payloads_decode_to_none() {
        let f = Command::Error {
            code: "X".into(),
            params: vec!["p".into()],
        }
        .frame();
        for cut in 4..f.len() {
            assert_eq!(decode(&f[4..cut]), None, "cut at {cut}");
        }
        assert_eq!(decode(&[9, 0, 0, 0, 99, 0, 0, 0]), None);
        assert_eq!(decode(&[1, 0, 0, 0]), None);
        // a string longer than the payload
        assert_eq!(decode(&[9, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0]), None);
    }

    #[test]
    fn greeting_carries_version_zero_two() {
        let g = greeting();
        assert_eq!(g.len(), GREETING_LEN);
        assert!(greeting_ok(&g));
        let mut other = g.clone();
        other[GREETING.len()] = 1;
        assert!(!greeting_ok(&other));
        assert!(!greeting_ok(b"HTTP/1.1 500 Internal Server Error\r\n"));
    }
}
