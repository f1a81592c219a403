//! Streaming access to a VDI's data: `qemu-nbd` serves the image (through
//! its whole backing chain) on a private unix socket and this minimal NBD
//! client reads or writes it in order. Memory stays bounded by one chunk
//! whatever the disk size, and all-zero chunks are sent as WRITE_ZEROES so
//! imported disks stay sparse.

use crate::{Image, StorageError};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NBD_MAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const OPT_EXPORT_NAME: u32 = 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_WRITE_ZEROES: u16 = 6;

/// The chunk size of transfers.
pub const CHUNK: usize = 2 << 20;
/// Writes an import keeps outstanding.
const WRITES_IN_FLIGHT: usize = 2;
/// Connections a streaming export reads over (qemu-nbd `--shared`).
const READ_CONNECTIONS: usize = 4;

/// A `qemu-nbd` serving one image, and a connection to it.
pub struct NbdImage {
    server: QemuNbd,
    stream: UnixStream,
    size: u64,
    handle: u64,
    /// Writes sent whose replies are not read yet.
    queued: usize,
}

/// One qemu-nbd process and its socket, stopped and removed when dropped.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn io(e: std::io::Error) -> StorageError {
    StorageError::Tool(format!("NBD: {e}"))
}

impl NbdImage {
    /// Serves `image` (a file or an `nfs://` URL) in its format; `writable`
    /// opens it for writing. `run_dir` holds the socket.
    pub fn open(image: &Image, writable: bool, run_dir: &Path) -> Result<NbdImage, StorageError> {
        // unix socket paths are limited to 108 bytes; state dirs can be deep.
        let short = format!(
            "nbd-{}.sock",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let dir = if run_dir.join(&short).as_os_str().len() < 100 {
            run_dir.to_owned()
        } else {
            std::env::temp_dir().join("corral-nbd")
        };
        std::fs::create_dir_all(&dir)?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        let socket = dir.join(short);
        // Reads bypass the page cache with io_uring where the filesystem and
        // kernel allow (~1.3× the streaming rate of buffered reads here),
        // falling back to Linux AIO, then to buffered I/O. Writes and NFS
        // (libnfs) stay buffered.
        let caches: &[&[&str]] = if writable || image.path.starts_with("nfs://") {
            &[&["--cache=writeback"]]
        } else {
            &[
                &["--cache=none", "--aio=io_uring"],
                &["--cache=none", "--aio=native"],
                &["--cache=writeback"],
            ]
        };
        let mut last_err = None;
        let mut served = None;
        for cache in caches {
            match serve(image, writable, &socket, cache) {
                Ok(s) => {
                    served = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let Some((server, stream)) = served else {
            return Err(
                last_err.unwrap_or_else(|| StorageError::Tool("qemu-nbd: no cache mode".into()))
            );
        };
        let mut img = NbdImage {
            server,
            stream,
            size: 0,
            handle: 0,
            queued: 0,
        };
        img.handshake()?;
        Ok(img)
    }

    fn handshake(&mut self) -> Result<(), StorageError> {
        self.size = handshake(&mut self.stream)?;
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<(), StorageError> {
        self.handle += 1;
        send_request(&mut self.stream, self.handle, cmd, offset, len, data)
    }

    /// Reads a simple reply's header: (error, handle).
    fn reply_header(&mut self) -> Result<(u32, u64), StorageError> {
        reply_header(&mut self.stream)
    }

    /// Keeps up to `window` sequential reads in flight, by handle.
    fn issue_reads(
        &mut self,
        in_flight: &mut std::collections::HashMap<u64, (u64, usize)>,
        next_offset: &mut u64,
        window: usize,
    ) -> Result<(), StorageError> {
        while in_flight.len() < window && *next_offset < self.size {
            let n = ((self.size - *next_offset) as usize).min(CHUNK);
            self.request(CMD_READ, *next_offset, n as u32, None)?;
            in_flight.insert(self.handle, (*next_offset, n));
            *next_offset += n as u64;
        }
        Ok(())
    }

    /// The next read reply: its (offset, length), data still on the wire.
    fn next_read(
        &mut self,
        in_flight: &mut std::collections::HashMap<u64, (u64, usize)>,
    ) -> Result<(u64, usize), StorageError> {
        let (err, handle) = self.reply_header()?;
        let (off, n) = in_flight
            .remove(&handle)
            .ok_or_else(|| StorageError::Tool("NBD: reply to an unknown request".into()))?;
        if err != 0 {
            return Err(StorageError::Tool(format!(
                "NBD: read error {err} at {off}"
            )));
        }
        Ok((off, n))
    }

    fn reply(&mut self) -> Result<(), StorageError> {
        let (err, _) = self.reply_header()?;
        if err != 0 {
            return Err(if err == 28 {
                StorageError::Full("NBD write: no space left on device".into())
            } else {
                StorageError::Tool(format!("NBD: server error {err}"))
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        self.request(CMD_READ, offset, buf.len() as u32, None)?;
        self.reply()?;
        self.stream.read_exact(buf).map_err(io)
    }

    /// Reads the whole image in order, keeping `window` requests in flight
    /// (replies may come back in any order), and hands each chunk to `sink`
    /// until it returns false.
    pub fn read_all(
        &mut self,
        window: usize,
        mut sink: impl FnMut(Vec<u8>) -> bool,
    ) -> Result<(), StorageError> {
        use std::collections::{BTreeMap, HashMap};
        let size = self.size;
        let mut next_offset = 0u64;
        let mut emit_offset = 0u64;
        let mut in_flight: HashMap<u64, (u64, usize)> = HashMap::new();
        let mut ready: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        while emit_offset < size {
            self.issue_reads(&mut in_flight, &mut next_offset, window)?;
            let (off, n) = self.next_read(&mut in_flight)?;
            let mut buf = vec![0u8; n];
            self.stream.read_exact(&mut buf).map_err(io)?;
            ready.insert(off, buf);
            while let Some(buf) = ready.remove(&emit_offset) {
                emit_offset += buf.len() as u64;
                if !sink(buf) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Sends the whole image to the socket `out` (which may be non-blocking)
    /// with splice(2): data moves from qemu-nbd's sockets through a pipe into
    /// `out` without being copied into this process. Chunks are read over
    /// [`READ_CONNECTIONS`] connections in turn, each with its next request
    /// already queued, so several reads are in flight while replies on each
    /// connection still come back in order (no reordering copies).
    pub fn splice_all(&mut self, out: i32) -> Result<(), StorageError> {
        use std::os::fd::AsRawFd;
        let mut pipe = [0i32; 2];
        // SAFETY: pipe2 fills the two-element array we own.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        let _closer = PipeFds(pipe);
        // SAFETY: F_SETPIPE_SZ on our own pipe; failure only means smaller moves.
        unsafe { libc::fcntl(pipe[1], libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        let size = self.size;
        let chunks = size.div_ceil(CHUNK as u64);
        let mut extra = Vec::new();
        for _ in 1..READ_CONNECTIONS.min(chunks.max(1) as usize) {
            let mut c = UnixStream::connect(&self.server.socket).map_err(io)?;
            handshake(&mut c)?;
            extra.push(c);
        }
        let mut conns: Vec<&mut UnixStream> = std::iter::once(&mut self.stream)
            .chain(extra.iter_mut())
            .collect();
        let k = conns.len() as u64;
        let chunk_at = |c: u64| {
            let off = c * CHUNK as u64;
            (off, ((size - off) as usize).min(CHUNK))
        };
        let read = |s: &mut UnixStream, c: u64| {
            let (off, n) = chunk_at(c);
            send_request(s, c, CMD_READ, off, n as u32, None)
        };
        for c in 0..chunks.min(k) {
            read(conns[c as usize], c)?;
        }
        for c in 0..chunks {
            let conn = &mut *conns[(c % k) as usize];
            let (err, handle) = reply_header(conn)?;
            let (off, n) = chunk_at(c);
            if handle != c {
                return Err(StorageError::Tool(
                    "NBD: reply to an unknown request".into(),
                ));
            }
            if err != 0 {
                return Err(StorageError::Tool(format!(
                    "NBD: read error {err} at {off}"
                )));
            }
            // Queued before this reply's data is drained, so qemu-nbd works
            // on it meanwhile; it cannot overtake the reply being read.
            if c + k < chunks {
                read(conn, c + k)?;
            }
            splice_exact(conn.as_raw_fd(), pipe, out, n)?;
        }
        for mut c in extra {
            let _ = send_request(&mut c, 0, CMD_DISC, 0, 0, None);
        }
        Ok(())
    }

    /// Writes `data` at `offset`; all-zero data becomes WRITE_ZEROES.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        if data.iter().all(|&b| b == 0) {
            self.request(CMD_WRITE_ZEROES, offset, data.len() as u32, None)?;
        } else {
            self.request(CMD_WRITE, offset, data.len() as u32, Some(data))?;
        }
        self.reply()
    }

    /// Like [`write_at`](Self::write_at), but keeps up to
    /// [`WRITES_IN_FLIGHT`] writes outstanding so qemu-nbd works on one while
    /// the next arrives; errors surface on a later call or at [`close`](Self::close).
    pub fn write_queued(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        if self.queued >= WRITES_IN_FLIGHT {
            self.queued -= 1;
            self.reply()?;
        }
        if data.iter().all(|&b| b == 0) {
            self.request(CMD_WRITE_ZEROES, offset, data.len() as u32, None)?;
        } else {
            self.request(CMD_WRITE, offset, data.len() as u32, Some(data))?;
        }
        self.queued += 1;
        Ok(())
    }

    /// Flushes and disconnects; qemu-nbd then exits.
    pub fn close(mut self) -> Result<(), StorageError> {
        while self.queued > 0 {
            self.queued -= 1;
            self.reply()?;
        }
        self.request(CMD_FLUSH, 0, 0, None)?;
        self.reply()?;
        let _ = self.request(CMD_DISC, 0, 0, None);
        let _ = self.server.child.wait();
        Ok(())
    }
}

/// Starts qemu-nbd on `socket` with the given cache options and connects
/// to it; fails (with qemu-nbd's message) if it exits first.
fn serve(
    image: &Image,
    writable: bool,
    socket: &Path,
    cache: &[&str],
) -> Result<(QemuNbd, UnixStream), StorageError> {
    let bin = std::env::var("CORRAL_QEMU_NBD").unwrap_or_else(|_| "qemu-nbd".into());
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket")
        .arg(socket)
        .arg("--format")
        .arg(image.format.qemu_name())
        .args(cache);
    if writable {
        cmd.arg("--discard=unmap").arg("--detect-zeroes=unmap");
    } else {
        cmd.arg("--read-only")
            .arg(format!("--shared={READ_CONNECTIONS}"));
    }
    cmd.arg("--")
        .arg(&image.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| StorageError::Tool(format!("cannot run {bin}: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => {
                let server = QemuNbd {
                    child,
                    socket: socket.to_owned(),
                };
                return Ok((server, s));
            }
            Err(_) if Instant::now() < deadline => {
                if let Ok(Some(_)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    let _ = std::fs::remove_file(socket);
                    return Err(StorageError::Tool(format!("qemu-nbd: {}", err.trim())));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io(e));
            }
        }
    }
}

/// The newstyle handshake on a fresh connection; returns the export size.
fn handshake(s: &mut UnixStream) -> Result<u64, StorageError> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).map_err(io)?;
    if &hello[..8] != NBD_MAGIC || &hello[8..16] != IHAVEOPT {
        return Err(StorageError::Tool("NBD: not a newstyle server".into()));
    }
    let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
    let no_zeroes = server_flags & 2 != 0;
    let client_flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&client_flags.to_be_bytes());
    m.extend_from_slice(IHAVEOPT);
    m.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes()); // the default export
    s.write_all(&m).map_err(io)?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).map_err(io)?;
    let size = u64::from_be_bytes([
        reply[0], reply[1], reply[2], reply[3], reply[4], reply[5], reply[6], reply[7],
    ]);
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z).map_err(io)?;
    }
    Ok(size)
}

fn send_request(
    s: &mut UnixStream,
    handle: u64,
    cmd: u16,
    offset: u64,
    len: u32,
    data: Option<&[u8]>,
) -> Result<(), StorageError> {
    let mut h = Vec::with_capacity(28);
    h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&cmd.to_be_bytes());
    h.extend_from_slice(&handle.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    s.write_all(&h).map_err(io)?;
    if let Some(d) = data {
        s.write_all(d).map_err(io)?;
    }
    Ok(())
}

/// Reads a simple reply's header: (error, handle).
fn reply_header(s: &mut UnixStream) -> Result<(u32, u64), StorageError> {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).map_err(io)?;
    if u32::from_be_bytes([r[0], r[1], r[2], r[3]]) != REPLY_MAGIC {
        return Err(StorageError::Tool("NBD: bad reply".into()));
    }
    let err = u32::from_be_bytes([r[4], r[5], r[6], r[7]]);
    let handle = u64::from_be_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
    Ok((err, handle))
}

struct PipeFds([i32; 2]);

impl Drop for PipeFds {
    fn drop(&mut self) {
        // SAFETY: closing the pipe we created.
        unsafe {
            libc::close(self.0[0]);
            libc::close(self.0[1]);
        }
    }
}

/// Waits until `fd` can take more data (it may be non-blocking).
pub(crate) fn wait_writable(fd: i32) -> Result<(), StorageError> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own; 60 s for a stalled client.
    let r = unsafe { libc::poll(&mut p, 1, 60_000) };
    if r <= 0 {
        return Err(StorageError::Tool("the client stopped reading".into()));
    }
    if p.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        return Err(StorageError::Tool("the client went away".into()));
    }
    Ok(())
}

/// Writes all of `data` to a possibly non-blocking `fd`.
pub fn write_all_fd(fd: i32, mut data: &[u8]) -> Result<(), StorageError> {
    while !data.is_empty() {
        // SAFETY: writing from a live slice to an fd the caller owns.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                wait_writable(fd)?;
                continue;
            }
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io(e));
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// Moves exactly `n` bytes from `src` to `out` through `pipe`.
fn splice_exact(src: i32, pipe: [i32; 2], out: i32, n: usize) -> Result<(), StorageError> {
    let mut left = n;
    while left > 0 {
        // SAFETY: splice between fds we own (src, pipe) and the caller's out.
        let got = unsafe {
            libc::splice(
                src,
                std::ptr::null_mut(),
                pipe[1],
                std::ptr::null_mut(),
                left,
                libc::SPLICE_F_MOVE,
            )
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io(e));
        }
        if got == 0 {
            return Err(StorageError::Tool(
                "NBD: qemu-nbd closed the connection".into(),
            ));
        }
        let mut in_pipe = got as usize;
        while in_pipe > 0 {
            let put = unsafe {
                libc::splice(
                    pipe[0],
                    std::ptr::null_mut(),
                    out,
                    std::ptr::null_mut(),
                    in_pipe,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            if put < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => wait_writable(out)?,
                    std::io::ErrorKind::Interrupted => {}
                    _ => return Err(io(e)),
                }
                continue;
            }
            in_pipe -= put as usize;
        }
        left -= got as usize;
    }
    Ok(())
}
