//! HttpConnect: a console proxied to the raw terminal until Ctrl-].

use crate::conn::{connect, read_head};
use crate::opts::Opts;
use std::io::{Read, Write};
use std::time::Duration;

/// The terminal in raw mode (no echo, no line editing, Ctrl-C passed to the
/// guest) while a console is attached; restored on drop.
pub(crate) struct RawTerminal(Option<String>);

impl RawTerminal {
    fn enter() -> RawTerminal {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return RawTerminal(None);
        }
        let saved = std::process::Command::new("stty")
            .arg("-g")
            .stdin(std::process::Stdio::inherit())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        if saved.is_some() {
            let _ = std::process::Command::new("stty")
                .args(["raw", "-echo"])
                .status();
        }
        RawTerminal(saved)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = std::process::Command::new("stty").arg(saved).status();
        }
    }
}

/// Ctrl-], which leaves the console (as in XenServer's xe and telnet).
pub(crate) const ESCAPE: u8 = 0x1d;

/// `xe console`: CONNECT to the console at `path`, then copy the keyboard
/// to it and it to the screen until Ctrl-] or until the console closes (the
/// VM stopped). Keyboard end-of-file does not end it, so piped input still
/// sees the console's answers.
pub(crate) fn console(o: &Opts, path: &str) -> Result<(), String> {
    let mut conn = connect(o);
    let head = format!("CONNECT {path} HTTP/1.0\r\n\r\n");
    conn.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    conn.flush().map_err(|e| e.to_string())?;
    let (status, _) = read_head(&mut *conn)?;
    if status != 200 {
        return Err(format!(
            "The server refused the console connection (HTTP {status})"
        ));
    }
    conn.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let (keys_tx, keys) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin().lock();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || keys_tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let _raw = RawTerminal::enter();
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; 16384];
    loop {
        while let Ok(k) = keys.try_recv() {
            let (send, quit) = match k.iter().position(|b| *b == ESCAPE) {
                Some(i) => (&k[..i], true),
                None => (&k[..], false),
            };
            conn.write_all(send)
                .and_then(|_| conn.flush())
                .map_err(|e| format!("Console connection lost: {e}"))?;
            if quit {
                return Ok(());
            }
        }
        match conn.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                stdout.write_all(&buf[..n]).map_err(|e| e.to_string())?;
                stdout.flush().map_err(|e| e.to_string())?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(format!("Console connection lost: {e}")),
        }
    }
}
