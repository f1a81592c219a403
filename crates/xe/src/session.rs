//! One command: the POST /cli request, the greeting, and the frame loop.

use crate::conn::{Stream, connect, greeting_timeout, no_answer};
use crate::console::console;
use crate::die;
use crate::opts::Opts;
use crate::transfer::{http_get, http_put};
use corral_cli_proto::{
    Command, FRAME_HEAD, GREETING_LEN, Message, Response, blob_chunk_frame, blob_end_frame, decode,
    greeting_ok, payload_len,
};
use std::io::{Read, Write};

fn read_frame(s: &mut dyn Stream) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; FRAME_HEAD];
    s.read_exact(&mut head)?;
    let mut payload = vec![0u8; payload_len(head)];
    s.read_exact(&mut payload)?;
    Ok(payload)
}

/// Tells the server how a transfer went; the reason of a failure is the
/// user's to read.
fn answer_transfer(s: &mut dyn Stream, done: Result<(), String>) {
    send_response(s, done.is_ok());
    if let Err(e) = done {
        eprintln!("{e}");
    }
}

fn send_response(s: &mut dyn Stream, ok: bool) {
    let r = if ok { Response::Ok } else { Response::Failed };
    let _ = s.write_all(&r.frame());
}

pub(crate) fn run(o: &Opts, mut args: Vec<String>) -> ! {
    args.push(format!("username={}", o.user));
    args.push(format!("password={}", o.password));
    let body = args.join("\n");
    let mut s = connect(o);
    let _ = s.set_read_timeout(Some(greeting_timeout()));
    let head = format!(
        "POST /cli HTTP/1.0\r\nUser-agent: xe-cli/Unix/0.2\r\noriginator: cli\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    if let Err(e) = s
        .write_all(head.as_bytes())
        .and_then(|_| s.write_all(body.as_bytes()))
        .and_then(|_| s.flush())
    {
        // A TLS handshake reads, so a silent server times out here too.
        no_answer(o, &e);
        die("Failed to send the command to the server");
    }
    let mut hello = [0u8; GREETING_LEN];
    if let Err(e) = s.read_exact(&mut hello) {
        no_answer(o, &e);
        die("Failed to contact the management agent");
    }
    // Commands may run for long (a clean shutdown waits for the guest).
    let _ = s.set_read_timeout(None);
    if hello.starts_with(b"HTTP") {
        die("Server internal error");
    }
    if !greeting_ok(&hello) {
        die("Failed to contact the management agent: unexpected protocol greeting");
    }
    if s.write_all(&hello).and_then(|_| s.flush()).is_err() {
        die("Failed to contact the management agent");
    }
    let stdout = std::io::stdout();
    loop {
        let Ok(payload) = read_frame(&mut *s) else {
            die("Lost connection to the server")
        };
        let command = match decode(&payload) {
            Some(Message::Command(c)) => c,
            Some(_) => continue,
            // A command this client does not know: refuse it.
            None => {
                send_response(&mut *s, false);
                continue;
            }
        };
        match command {
            Command::Print(line) => {
                let _ = writeln!(stdout.lock(), "{line}");
            }
            Command::PrintStderr(text) => eprint!("{text}"),
            Command::Debug(_) => {}
            Command::Error { code, params } => {
                eprintln!("Error code: {code}");
                eprintln!("Error parameters: {}", params.join(", "));
            }
            Command::Exit(status) => {
                let _ = stdout.lock().flush();
                std::process::exit(status)
            }
            Command::Prompt => {
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
                let line = line.trim_end_matches('\n');
                let _ = s.write_all(&blob_chunk_frame(line.len()));
                let _ = s.write_all(line.as_bytes());
                let _ = s.write_all(&blob_end_frame());
            }
            // The server does not get to read files of the client's choosing.
            Command::Load(_) => send_response(&mut *s, false),
            Command::HttpConnect(url) => {
                let ok = console(o, &url_path(&url));
                if let Err(e) = &ok {
                    eprintln!("{e}");
                }
                send_response(&mut *s, ok.is_ok());
            }
            Command::HttpGet { filename, url } => {
                let ok = http_get(o, &filename, &url_path(&url));
                answer_transfer(&mut *s, ok);
            }
            Command::HttpPut { filename, url } => {
                let ok = http_put(o, &filename, &url_path(&url));
                answer_transfer(&mut *s, ok);
            }
        }
    }
}

/// The path and query of a transfer URL (a bare path, or a full URL).
pub(crate) fn url_path(url: &str) -> String {
    match url.split_once("://") {
        Some((_, rest)) => rest
            .find('/')
            .map(|i| rest[i..].to_owned())
            .unwrap_or_else(|| "/".into()),
        None => url.to_owned(),
    }
}
