//! The serial console: a bounded log and the live stream.

use crate::SERIAL_REPLAY;
use crate::qemu::SERIAL_LOG_MAX;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};

/// Moves serial output to console subscribers and their keystrokes to the
/// guest; also keeps QEMU's serial log bounded.
pub(crate) async fn serial_pump(
    dir: PathBuf,
    out: broadcast::Sender<Vec<u8>>,
    mut input: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let Ok(sock) = tokio::net::UnixStream::connect(dir.join("serial.sock")).await else {
        return;
    };
    let (mut rd, mut wr) = sock.into_split();
    tokio::spawn(async move {
        while let Some(data) = input.recv().await {
            if wr.write_all(&data).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 16 * 1024];
    let mut since_check = 0usize;
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let _ = out.send(buf[..n].to_vec());
        since_check += n;
        if since_check > 256 * 1024 {
            since_check = 0;
            rotate_serial_log(&dir);
        }
    }
}

/// Keeps the last [`SERIAL_REPLAY`] bytes in `serial.log.0` and empties
/// `serial.log` once it is large (QEMU appends with O_APPEND, so a truncated
/// file simply continues from its new end).
pub(crate) fn rotate_serial_log(dir: &Path) {
    let log = dir.join("serial.log");
    if std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) < SERIAL_LOG_MAX {
        return;
    }
    let tail = tail_of(&log, SERIAL_REPLAY);
    if std::fs::write(dir.join("serial.log.0"), &tail).is_ok() {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .and_then(|f| f.set_len(0));
    }
}

pub(crate) fn tail_of(path: &Path, n: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(n as u64);
    let mut v = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_ok() {
        let _ = f.read_to_end(&mut v);
    }
    v
}
