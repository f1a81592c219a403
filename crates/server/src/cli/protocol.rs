//! The thin-CLI protocol spoken with xe.

use corral_cli_proto::{Command, FRAME_HEAD, Message, Response, decode, payload_len};
use tokio::io::{AsyncRead, AsyncReadExt};

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
        /// The command's session, which waits for the task ...
        session: String,
        /// ... and which the transfer ends (not one the caller passed in).
        own_session: bool,
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

/// The frame that carries one output item to the client.
pub(crate) fn encode_one(o: &Out) -> Vec<u8> {
    match o {
        Out::Print(s) => Command::Print(s.clone()),
        Out::Stderr(s) => Command::PrintStderr(s.clone()),
        Out::Error(code, params) => Command::Error {
            code: code.clone(),
            params: params.clone(),
        },
        Out::Transfer {
            put, filename, url, ..
        } => {
            let (filename, url) = (filename.clone(), url.clone());
            if *put {
                Command::HttpPut { filename, url }
            } else {
                Command::HttpGet { filename, url }
            }
        }
        Out::Connect { url, .. } => Command::HttpConnect(url.clone()),
    }
    .frame()
}

/// The frame that ends a command with its exit status.
pub(crate) fn exit_frame(status: i32) -> Vec<u8> {
    Command::Exit(status).frame()
}

/// Reads the client's Response frame, skipping `Wait` heartbeats; true for
/// OK. A frame that is not a Response, or a closed stream, is a failure.
pub(crate) async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> bool {
    loop {
        let mut head = [0u8; FRAME_HEAD];
        if stream.read_exact(&mut head).await.is_err() {
            return false;
        }
        // A Response is 8 bytes; anything much longer is not one.
        let n = payload_len(head).min(64);
        let mut body = vec![0u8; n];
        if stream.read_exact(&mut body).await.is_err() {
            return false;
        }
        match decode(&body) {
            Some(Message::Response(Response::Wait)) => continue,
            Some(Message::Response(r)) => return r == Response::Ok,
            _ => return false,
        }
    }
}

pub(crate) fn fail_text(t: String) -> Run {
    Run {
        out: vec![Out::Stderr(format!("{t}\n"))],
        exit: 1,
    }
}
