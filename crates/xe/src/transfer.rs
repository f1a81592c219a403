//! HttpPut and HttpGet: file uploads and downloads the server asks for, with progress.

use crate::conn::{connect, read_head};
use crate::opts::Opts;
use std::io::{Read, Write};

/// A progress bar on stderr when it is a terminal.
pub(crate) struct Progress {
    total: u64,
    shown: u64,
    tty: bool,
}

impl Progress {
    fn new(total: u64) -> Progress {
        use std::io::IsTerminal;
        Progress {
            total,
            shown: u64::MAX,
            tty: std::io::stderr().is_terminal(),
        }
    }
    fn update(&mut self, done: u64) {
        if !self.tty || self.total == 0 {
            return;
        }
        let pct = done * 100 / self.total;
        if pct != self.shown {
            self.shown = pct;
            let bars = (pct / 2) as usize;
            eprint!("\r[{}{}] {pct:3}%", "#".repeat(bars), " ".repeat(50 - bars));
            if done >= self.total {
                eprintln!();
            }
        }
    }
}

pub(crate) fn http_put(o: &Opts, filename: &str, path: &str) -> Result<(), String> {
    let mut f =
        std::fs::File::open(filename).map_err(|e| format!("Cannot open {filename}: {e}"))?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    let mut conn = connect(o);
    let head = format!("PUT {path} HTTP/1.0\r\nHost: xe\r\nContent-Length: {size}\r\n\r\n");
    conn.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    let mut bar = Progress::new(size);
    while sent < size {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        conn.write_all(&buf[..n])
            .map_err(|e| format!("Upload failed: {e}"))?;
        sent += n as u64;
        bar.update(sent);
    }
    conn.flush().map_err(|e| e.to_string())?;
    let (status, _) = read_head(&mut *conn)?;
    if status != 200 {
        return Err(format!("The server refused the upload (HTTP {status})"));
    }
    Ok(())
}

pub(crate) fn http_get(o: &Opts, filename: &str, path: &str) -> Result<(), String> {
    let mut conn = connect(o);
    let head = format!("GET {path} HTTP/1.0\r\nHost: xe\r\n\r\n");
    conn.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    conn.flush().map_err(|e| e.to_string())?;
    let (status, len) = read_head(&mut *conn)?;
    if status != 200 {
        return Err(format!("The server refused the download (HTTP {status})"));
    }
    let len = len.ok_or("download without Content-Length")?;
    let mut f =
        std::fs::File::create(filename).map_err(|e| format!("Cannot create {filename}: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    let mut bar = Progress::new(len);
    while got < len {
        let want = buf.len().min((len - got) as usize);
        let n = conn.read(&mut buf[..want]).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("Download ended after {got} of {len} bytes"));
        }
        f.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        got += n as u64;
        bar.update(got);
    }
    f.sync_all().map_err(|e| e.to_string())?;
    Ok(())
}
