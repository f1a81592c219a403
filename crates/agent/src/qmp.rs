//! A small QMP client: one JSON object per line over a unix socket, replies
//! matched to commands by `id`, events fanned out on a channel. QEMU's QMP
//! socket takes one client at a time, so each VM has exactly one of these
//! (owned by the agent), and a restarted corrald simply connects again.
//!
//! The guest agent speaks the same framing without a greeting; [`ga_call`]
//! opens a short connection per query and resynchronises with
//! `guest-sync-delimited`, discarding stale bytes up to the 0xFF sentinel.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP timed out waiting for {0}")]
    Timeout(String),
    /// QEMU answered with an error object.
    #[error("{class}: {desc}")]
    Command { class: String, desc: String },
    #[error("QMP protocol: {0}")]
    Protocol(String),
}

/// An asynchronous QMP event (`{"event": …, "data": …}`).
#[derive(Clone, Debug)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;

pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities. Events go to
    /// the returned receiver, which yields `None` once QEMU closes the socket.
    pub async fn connect(
        path: &Path,
    ) -> Result<(Arc<Qmp>, mpsc::UnboundedReceiver<QmpEvent>), QmpError> {
        let stream = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout("connect".into()))??;
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut greeting = String::new();
        tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut greeting))
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))??;
        if !greeting.contains("\"QMP\"") {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting:?}"
            )));
        }
        let pending: Pending = Arc::default();
        let (etx, erx) = mpsc::unbounded_channel();
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let qmp = Arc::new(Qmp {
            writer: tokio::sync::Mutex::new(wr),
            pending: Arc::clone(&pending),
            next_id: AtomicU64::new(1),
            closed: Arc::clone(&closed),
        });
        tokio::spawn(async move {
            let mut line = String::new();
            loop {
                line.clear();
                match rd.read_line(&mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(name) = msg.get("event").and_then(Value::as_str) {
                    let _ = etx.send(QmpEvent {
                        name: name.to_owned(),
                        data: msg.get("data").cloned().unwrap_or(Value::Null),
                    });
                    continue;
                }
                let Some(id) = msg.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let reply = reply_of(&msg);
                let tx = pending.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(tx) = tx {
                    let _ = tx.send(reply);
                }
            }
            closed.store(true, Ordering::SeqCst);
            if let Ok(mut p) = pending.lock() {
                for (_, tx) in p.drain() {
                    let _ = tx.send(Err(QmpError::Closed));
                }
            }
        });
        qmp.execute("qmp_capabilities", Value::Null).await?;
        Ok((qmp, erx))
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Runs one command and waits for its reply.
    pub async fn execute(&self, cmd: &str, args: Value) -> Result<Value, QmpError> {
        self.execute_inner(cmd, args, None).await
    }

    /// Runs one command with a descriptor passed alongside (SCM_RIGHTS), as
    /// `getfd` wants it.
    pub async fn execute_with_fd(
        &self,
        cmd: &str,
        args: Value,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        self.execute_inner(cmd, args, Some(fd)).await
    }

    async fn execute_inner(
        &self,
        cmd: &str,
        args: Value,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        if self.is_closed() {
            return Err(QmpError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"execute": cmd, "id": id});
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut w = self.writer.lock().await;
            match fd {
                None => w.write_all(line.as_bytes()).await?,
                Some(fd) => send_with_fd(w.as_ref(), line.as_bytes(), fd).await?,
            }
        }
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(&id);
                }
                Err(QmpError::Timeout(cmd.to_owned()))
            }
        }
    }
}

/// Writes `data` with `fd` attached (one sendmsg; the line is short).
async fn send_with_fd(
    stream: &UnixStream,
    data: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let raw = fd.as_raw_fd();
            // SAFETY: the control buffer is sized by CMSG_SPACE for one fd
            // and aligned for cmsghdr; iov points at `data`, which outlives
            // the call; the socket fd is open while `stream` lives.
            unsafe {
                let space = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
                let mut control = vec![0u64; space.div_ceil(8)];
                let mut iov = libc::iovec {
                    iov_base: data.as_ptr() as *mut libc::c_void,
                    iov_len: data.len(),
                };
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), raw);
                let n = libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
        });
        match sent {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(n) => {
                return Err(std::io::Error::other(format!(
                    "short QMP write with a descriptor ({n} of {} bytes)",
                    data.len()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// One guest-agent command over a fresh connection to its socket. Fails fast
/// (within `timeout`) when no agent runs in the guest.
pub async fn ga_call(
    path: &Path,
    cmd: &str,
    args: Value,
    timeout: Duration,
) -> Result<Value, QmpError> {
    tokio::time::timeout(timeout, ga_call_inner(path, cmd, args))
        .await
        .map_err(|_| QmpError::Timeout(cmd.to_owned()))?
}

async fn ga_call_inner(path: &Path, cmd: &str, args: Value) -> Result<Value, QmpError> {
    let mut s = UnixStream::connect(path).await?;
    let token: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 & 0x7fff_ffff)
        .unwrap_or(1);
    s.write_all(
        format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{token}}}}}\n")
            .as_bytes(),
    )
    .await?;
    let (rd, mut wr) = s.split();
    let mut rd = BufReader::new(rd);
    // Skip everything up to the sentinel, then read lines until our token.
    loop {
        let b = rd.read_u8().await?;
        if b == 0xff {
            break;
        }
    }
    let mut line = String::new();
    loop {
        line.clear();
        if rd.read_line(&mut line).await? == 0 {
            return Err(QmpError::Closed);
        }
        let v: Value =
            serde_json::from_str(line.trim_start_matches('\u{ff}')).unwrap_or(Value::Null);
        if v.get("return").and_then(Value::as_u64) == Some(token) {
            break;
        }
    }
    let mut msg = json!({"execute": cmd});
    if !args.is_null() {
        msg["arguments"] = args;
    }
    wr.write_all(format!("{msg}\n").as_bytes()).await?;
    line.clear();
    if rd.read_line(&mut line).await? == 0 {
        return Err(QmpError::Closed);
    }
    let v: Value = serde_json::from_str(&line).map_err(|e| QmpError::Protocol(e.to_string()))?;
    reply_of(&v)
}

/// A command's reply: its `return` value, or its `error` object as an error.
fn reply_of(msg: &Value) -> Result<Value, QmpError> {
    if let Some(r) = msg.get("return") {
        return Ok(r.clone());
    }
    let e = msg.get("error").cloned().unwrap_or(Value::Null);
    let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    Err(QmpError::Command {
        class: text("class"),
        desc: text("desc"),
    })
}
