//! The thin-CLI protocol spoken with xe.

use tokio::io::{AsyncRead, AsyncReadExt};

pub const GREETING: &[u8] = b"XenSource thin CLI protocol";

/// What a command produced, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Print(String),
    Stderr(String),
    Error(String, Vec<String>),
    /// Ask the client to upload (`put`) or download a file to/from `url`
    /// (XenServer's HttpPut/HttpGet), then report how `task` ended.
    Transfer {
        put: bool,
        filename: String,
        url: String,
        task: String,
        session: String,
    },
    /// Ask the client to CONNECT to a console `url` and proxy the user's
    /// terminal to it (XenServer's HttpConnect); it answers when it is done.
    Connect {
        url: String,
        session: String,
    },
}

pub struct Run {
    pub out: Vec<Out>,
    pub exit: i32,
}

pub(crate) fn frame_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as i32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

pub(crate) fn command_frame(tag: i32, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(body.len() + 8);
    payload.extend_from_slice(&9i32.to_le_bytes());
    payload.extend_from_slice(&tag.to_le_bytes());
    payload.extend_from_slice(body);
    let mut f = (payload.len() as i32).to_le_bytes().to_vec();
    f.extend_from_slice(&payload);
    f
}

pub(crate) fn encode_one(o: &Out) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut body = Vec::new();
        match o {
            Out::Print(s) => {
                frame_string(&mut body, s);
                out.extend(command_frame(0, &body));
            }
            Out::Stderr(s) => {
                frame_string(&mut body, s);
                out.extend(command_frame(16, &body));
            }
            Out::Error(code, params) => {
                frame_string(&mut body, code);
                body.extend_from_slice(&(params.len() as i32).to_le_bytes());
                for p in params {
                    frame_string(&mut body, p);
                }
                out.extend(command_frame(14, &body));
            }
            Out::Transfer {
                put, filename, url, ..
            } => {
                frame_string(&mut body, filename);
                frame_string(&mut body, url);
                out.extend(command_frame(if *put { 13 } else { 12 }, &body));
            }
            Out::Connect { url, .. } => {
                frame_string(&mut body, url);
                out.extend(command_frame(17, &body));
            }
        }
    }
    out
}

/// Reads the client's Response frame ([len][10][5 = OK | 6 = failed | 18 =
/// wait]), skipping heartbeats; true for OK.
pub(crate) async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> bool {
    loop {
        let mut head = [0u8; 4];
        if stream.read_exact(&mut head).await.is_err() {
            return false;
        }
        let n = i32::from_le_bytes(head).clamp(0, 64) as usize;
        let mut body = vec![0u8; n];
        if stream.read_exact(&mut body).await.is_err() || body.len() < 8 {
            return false;
        }
        match i32::from_le_bytes([body[4], body[5], body[6], body[7]]) {
            18 => continue,
            code => return code == 5,
        }
    }
}

pub(crate) fn fail_text(t: String) -> Run {
    Run {
        out: vec![Out::Stderr(format!("{t}\n"))],
        exit: 1,
    }
}
