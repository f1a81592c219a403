//! Streaming access to a VDI's data: `qemu-nbd` serves the image (through
//! its whole backing chain) on a private unix socket and this minimal NBD
//! client reads or writes it in order. Memory stays bounded by one chunk
//! whatever the disk size, and all-zero chunks are sent as WRITE_ZEROES so
//! imported disks stay sparse.

use crate::StorageError;
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

/// A `qemu-nbd` serving one image, and a connection to it.
pub struct NbdImage {
    child: Child,
    socket: PathBuf,
    stream: UnixStream,
    size: u64,
    handle: u64,
}

fn io(e: std::io::Error) -> StorageError {
    StorageError::Tool(format!("NBD: {e}"))
}

impl NbdImage {
    /// Serves `path` (a file or an `nfs://` URL) in `format`; `writable`
    /// opens it for writing. `run_dir` holds the socket.
    pub fn open(
        path: &str,
        format: &str,
        writable: bool,
        run_dir: &Path,
    ) -> Result<NbdImage, StorageError> {
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
        let bin = std::env::var("CORRAL_QEMU_NBD").unwrap_or_else(|_| "qemu-nbd".into());
        let mut cmd = Command::new(&bin);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--format")
            .arg(format)
            .arg("--cache=writeback");
        if writable {
            cmd.arg("--discard=unmap").arg("--detect-zeroes=unmap");
        } else {
            cmd.arg("--read-only");
        }
        cmd.arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| StorageError::Tool(format!("cannot run {bin}: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    if let Ok(Some(_)) = child.try_wait() {
                        let mut err = String::new();
                        if let Some(mut e) = child.stderr.take() {
                            let _ = e.read_to_string(&mut err);
                        }
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
        };
        let mut img = NbdImage {
            child,
            socket,
            stream,
            size: 0,
            handle: 0,
        };
        img.handshake()?;
        Ok(img)
    }

    fn handshake(&mut self) -> Result<(), StorageError> {
        let s = &mut self.stream;
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
        self.size = u64::from_be_bytes([
            reply[0], reply[1], reply[2], reply[3], reply[4], reply[5], reply[6], reply[7],
        ]);
        if !no_zeroes {
            let mut z = [0u8; 124];
            s.read_exact(&mut z).map_err(io)?;
        }
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
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&self.handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        self.stream.write_all(&h).map_err(io)?;
        if let Some(d) = data {
            self.stream.write_all(d).map_err(io)?;
        }
        Ok(())
    }

    /// Reads a simple reply's header: (error, handle).
    fn reply_header(&mut self) -> Result<(u32, u64), StorageError> {
        let mut r = [0u8; 16];
        self.stream.read_exact(&mut r).map_err(io)?;
        if u32::from_be_bytes([r[0], r[1], r[2], r[3]]) != REPLY_MAGIC {
            return Err(StorageError::Tool("NBD: bad reply".into()));
        }
        let err = u32::from_be_bytes([r[4], r[5], r[6], r[7]]);
        let handle = u64::from_be_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
        Ok((err, handle))
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
    /// with splice(2): data moves from qemu-nbd's socket through a pipe into
    /// `out` without being copied into this process. Requests are issued one
    /// ahead; a reply that arrives out of order is copied and sent in turn.
    pub fn splice_all(&mut self, out: i32) -> Result<(), StorageError> {
        use std::collections::{BTreeMap, HashMap};
        use std::os::fd::AsRawFd;
        let mut pipe = [0i32; 2];
        // SAFETY: pipe2 fills the two-element array we own.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        let _closer = PipeFds(pipe);
        // SAFETY: F_SETPIPE_SZ on our own pipe; failure only means smaller moves.
        unsafe { libc::fcntl(pipe[1], libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        let src = self.stream.as_raw_fd();
        let size = self.size;
        let mut next_offset = 0u64;
        let mut emit_offset = 0u64;
        let mut in_flight: HashMap<u64, (u64, usize)> = HashMap::new();
        let mut stash: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        while emit_offset < size {
            self.issue_reads(&mut in_flight, &mut next_offset, 2)?;
            let (off, n) = self.next_read(&mut in_flight)?;
            if off == emit_offset {
                splice_exact(src, pipe, out, n)?;
                emit_offset += n as u64;
            } else {
                let mut buf = vec![0u8; n];
                self.stream.read_exact(&mut buf).map_err(io)?;
                stash.insert(off, buf);
            }
            while let Some(buf) = stash.remove(&emit_offset) {
                write_all_fd(out, &buf)?;
                emit_offset += buf.len() as u64;
            }
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

    /// Flushes and disconnects; qemu-nbd then exits.
    pub fn close(mut self) -> Result<(), StorageError> {
        self.request(CMD_FLUSH, 0, 0, None)?;
        self.reply()?;
        let _ = self.request(CMD_DISC, 0, 0, None);
        let _ = self.child.wait();
        Ok(())
    }
}

impl Drop for NbdImage {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
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
fn wait_writable(fd: i32) -> Result<(), StorageError> {
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
