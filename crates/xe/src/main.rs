//! xe: a thin client speaking XenServer's thin-CLI protocol to corrald.
//!
//! Everything but the connection options is sent to the server, which parses
//! and runs the command. With no server named, xe uses the local unix socket
//! (`$CORRAL_XAPI_SOCKET`, default `/var/lib/corral/xapi.sock`), where the
//! caller is root. Otherwise it connects with TLS to port 443 (or plain HTTP
//! to port 80 with `--nossl`). Like XenServer's xe it does not verify the
//! server certificate.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

const GREETING: &[u8] = b"XenSource thin CLI protocol";
const DEFAULT_SOCKET: &str = "/var/lib/corral/xapi.sock";
/// How long xe waits for a TCP connection, and for the server's greeting.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const GREETING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// [`GREETING_TIMEOUT`], or `$CORRAL_XE_TIMEOUT` seconds.
fn greeting_timeout() -> std::time::Duration {
    std::env::var("CORRAL_XE_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .map(std::time::Duration::from_secs_f64)
        .unwrap_or(GREETING_TIMEOUT)
}

struct Opts {
    server: Option<String>,
    port: Option<u16>,
    user: String,
    password: String,
    nossl: bool,
    rest: Vec<String>,
}

fn die(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(1)
}

fn parse() -> Opts {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Ok(extra) = std::env::var("XE_EXTRA_ARGS") {
        let mut cur = String::new();
        let mut chars = extra.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&',') => cur.push(chars.next().unwrap_or(',')),
                ',' => args.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        if !cur.is_empty() {
            args.push(cur);
        }
    }
    let mut o = Opts {
        server: None,
        port: None,
        user: String::new(),
        password: String::new(),
        nossl: false,
        rest: vec![],
    };
    let (mut user, mut pwd) = (None, None);
    let mut i = 0;
    let set = |k: &str,
               v: String,
               o: &mut Opts,
               user: &mut Option<String>,
               pwd: &mut Option<String>|
     -> bool {
        match k {
            "server" => o.server = Some(v),
            "port" => o.port = Some(v.parse().unwrap_or_else(|_| die(&format!("Bad port: {v}")))),
            "username" => *user = Some(v),
            "password" => *pwd = Some(v),
            "passwordfile" => {
                let text = std::fs::read_to_string(&v)
                    .unwrap_or_else(|e| die(&format!("Cannot read {v}: {e}")));
                let mut lines = text.lines();
                *user = lines.next().map(str::to_owned);
                *pwd = lines.next().map(str::to_owned);
            }
            "nossl" => o.nossl = v.is_empty() || v == "true",
            _ => return false,
        }
        true
    };
    while i < args.len() {
        let a = args[i].clone();
        let next = |i: &mut usize| -> String {
            *i += 1;
            args.get(*i)
                .cloned()
                .unwrap_or_else(|| die(&format!("Option {a} needs a value")))
        };
        match a.as_str() {
            "-s" | "-h" => {
                let v = next(&mut i);
                set("server", v, &mut o, &mut user, &mut pwd);
            }
            "-p" => {
                let v = next(&mut i);
                set("port", v, &mut o, &mut user, &mut pwd);
            }
            "-u" => {
                let v = next(&mut i);
                set("username", v, &mut o, &mut user, &mut pwd);
            }
            "-pw" => {
                let v = next(&mut i);
                set("password", v, &mut o, &mut user, &mut pwd);
            }
            "-pwf" => {
                let v = next(&mut i);
                set("passwordfile", v, &mut o, &mut user, &mut pwd);
            }
            "--nossl" => o.nossl = true,
            "-version" => {
                println!("ThinCLI protocol: 0.2");
                std::process::exit(0)
            }
            _ => {
                let handled = a
                    .split_once('=')
                    .is_some_and(|(k, v)| set(k, v.to_owned(), &mut o, &mut user, &mut pwd));
                if !handled {
                    o.rest.push(a);
                }
            }
        }
        i += 1;
    }
    if let Some(home) = std::env::var_os("HOME") {
        if let Ok(f) = std::fs::File::open(std::path::Path::new(&home).join(".xe")) {
            for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
                if let Some((k, v)) = line.trim().split_once('=') {
                    let k = k.trim();
                    let already = match k {
                        "server" => o.server.is_some(),
                        "port" => o.port.is_some(),
                        "username" => user.is_some(),
                        "password" | "passwordfile" => pwd.is_some(),
                        _ => true,
                    };
                    if !already {
                        set(k, v.trim().to_owned(), &mut o, &mut user, &mut pwd);
                    }
                }
            }
        }
    }
    o.user = user.unwrap_or_else(|| "root".into());
    o.password = pwd.unwrap_or_default();
    o
}

trait Stream: Read + Write {
    /// Bounds blocking reads (the console proxy polls the keyboard between).
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
}

impl Stream for TcpStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, d)
    }
}

impl Stream for UnixStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, d)
    }
}

impl Stream for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(d)
    }
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn connect(o: &Opts) -> Box<dyn Stream> {
    // A named server is always contacted, with the credentials given;
    // the local socket is only for commands that name none.
    let Some(server) = o.server.as_deref() else {
        let path = std::env::var("CORRAL_XAPI_SOCKET").unwrap_or_else(|_| DEFAULT_SOCKET.into());
        let s = UnixStream::connect(&path).unwrap_or_else(|e| {
            die(&format!(
                "Unable to contact the local toolstack at {path}: {e}"
            ))
        });
        return Box::new(s);
    };
    let port = o.port.unwrap_or(if o.nossl { 80 } else { 443 });
    let host = server.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .unwrap_or_else(|e| die(&format!("Unable to contact server {server}:{port}: {e}")))
        .collect();
    let tcp = addrs
        .iter()
        .find_map(|a| TcpStream::connect_timeout(a, CONNECT_TIMEOUT).ok())
        .unwrap_or_else(|| die(&format!("Unable to contact server {server}:{port}")));
    if o.nossl {
        return Box::new(tcp);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| die(&format!("TLS setup failed: {e}")))
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| die("Bad server name"));
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name)
        .unwrap_or_else(|e| die(&format!("TLS setup failed: {e}")));
    Box::new(rustls::StreamOwned::new(conn, tcp))
}

/// Stops with a message naming the port when `e` is the greeting timeout.
fn no_answer(o: &Opts, e: &std::io::Error) {
    if matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) {
        let server = o.server.as_deref().unwrap_or("the local toolstack");
        let port = o.port.unwrap_or(if o.nossl { 80 } else { 443 });
        die(&format!(
            "No answer from {server} port {port} within {} s: {}",
            greeting_timeout().as_secs_f64(),
            if o.nossl {
                "is it an HTTPS port? (drop --nossl)"
            } else {
                "is it a plain HTTP port? (use --nossl)"
            }
        ));
    }
}

fn read_i32(s: &mut dyn Stream) -> std::io::Result<i32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(i32::from_le_bytes(b))
}

fn take_i32(b: &[u8], pos: &mut usize) -> i32 {
    let v = b
        .get(*pos..*pos + 4)
        .map(|x| i32::from_le_bytes([x[0], x[1], x[2], x[3]]))
        .unwrap_or(0);
    *pos += 4;
    v
}

fn take_str(b: &[u8], pos: &mut usize) -> String {
    let n = take_i32(b, pos).max(0) as usize;
    let s = String::from_utf8_lossy(b.get(*pos..*pos + n).unwrap_or_default()).into_owned();
    *pos += n;
    s
}

fn send_response(s: &mut dyn Stream, ok: bool) {
    let mut f = 8i32.to_le_bytes().to_vec();
    f.extend_from_slice(&10i32.to_le_bytes());
    f.extend_from_slice(&(if ok { 5i32 } else { 6i32 }).to_le_bytes());
    let _ = s.write_all(&f);
}

fn main() {
    let o = parse();
    if o.rest.is_empty() || o.rest[0] == "--help" || o.rest[0] == "-help" {
        let mut args = o.rest.clone();
        args.retain(|a| a != "--help" && a != "-help");
        args.insert(0, "help".into());
        run(&o, args)
    }
    run(&o, o.rest.clone())
}

fn run(o: &Opts, mut args: Vec<String>) -> ! {
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
    let mut hello = [0u8; 35];
    if let Err(e) = s.read_exact(&mut hello) {
        no_answer(o, &e);
        die("Failed to contact the management agent");
    }
    // Commands may run for long (a clean shutdown waits for the guest).
    let _ = s.set_read_timeout(None);
    if hello.starts_with(b"HTTP") {
        die("Server internal error");
    }
    if !hello.starts_with(GREETING)
        || i32::from_le_bytes([hello[27], hello[28], hello[29], hello[30]]) != 0
    {
        die("Failed to contact the management agent: unexpected protocol greeting");
    }
    if s.write_all(&hello).and_then(|_| s.flush()).is_err() {
        die("Failed to contact the management agent");
    }
    let stdout = std::io::stdout();
    loop {
        let Ok(len) = read_i32(&mut *s) else {
            die("Lost connection to the server")
        };
        let mut payload = vec![0u8; len.max(0) as usize];
        if s.read_exact(&mut payload).is_err() {
            die("Lost connection to the server");
        }
        let mut pos = 0;
        let msg = take_i32(&payload, &mut pos);
        if msg != 9 {
            continue;
        }
        let tag = take_i32(&payload, &mut pos);
        match tag {
            0 => {
                let mut out = stdout.lock();
                let _ = writeln!(out, "{}", take_str(&payload, &mut pos));
            }
            16 => eprint!("{}", take_str(&payload, &mut pos)),
            15 => {}
            14 => {
                let code = take_str(&payload, &mut pos);
                let n = take_i32(&payload, &mut pos).max(0);
                let params: Vec<String> = (0..n).map(|_| take_str(&payload, &mut pos)).collect();
                eprintln!("Error code: {code}");
                eprintln!("Error parameters: {}", params.join(", "));
            }
            4 => {
                let _ = stdout.lock().flush();
                std::process::exit(take_i32(&payload, &mut pos))
            }
            3 => {
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
                let line = line.trim_end_matches('\n');
                let mut f = (12 + line.len() as i32).to_le_bytes().to_vec();
                f.extend_from_slice(&11i32.to_le_bytes());
                f.extend_from_slice(&7i32.to_le_bytes());
                f.extend_from_slice(&(line.len() as i32).to_le_bytes());
                let _ = s.write_all(&f);
                let _ = s.write_all(line.as_bytes());
                let mut end = 8i32.to_le_bytes().to_vec();
                end.extend_from_slice(&11i32.to_le_bytes());
                end.extend_from_slice(&8i32.to_le_bytes());
                let _ = s.write_all(&end);
            }
            17 => {
                let url = take_str(&payload, &mut pos);
                let ok = console(o, &url_path(&url));
                if let Err(e) = &ok {
                    eprintln!("{e}");
                }
                send_response(&mut *s, ok.is_ok());
            }
            12 | 13 => {
                let filename = take_str(&payload, &mut pos);
                let url = take_str(&payload, &mut pos);
                let ok = if tag == 13 {
                    http_put(o, &filename, &url_path(&url))
                } else {
                    http_get(o, &filename, &url_path(&url))
                };
                send_response(&mut *s, ok.is_ok());
                if let Err(e) = ok {
                    eprintln!("{e}");
                }
            }
            _ => send_response(&mut *s, false),
        }
    }
}

/// The path and query of a transfer URL (a bare path, or a full URL).
fn url_path(url: &str) -> String {
    match url.split_once("://") {
        Some((_, rest)) => rest
            .find('/')
            .map(|i| rest[i..].to_owned())
            .unwrap_or_else(|| "/".into()),
        None => url.to_owned(),
    }
}

/// A progress bar on stderr when it is a terminal.
struct Progress {
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

fn read_head(conn: &mut dyn Stream) -> Result<(u32, Option<u64>), String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut b).map_err(|e| e.to_string())? == 0 {
            return Err("the server closed the connection".into());
        }
        head.push(b[0]);
        if head.len() > 65536 {
            return Err("response header too large".into());
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("bad HTTP response")?;
    let len = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    });
    Ok((status, len))
}

fn http_put(o: &Opts, filename: &str, path: &str) -> Result<(), String> {
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

fn http_get(o: &Opts, filename: &str, path: &str) -> Result<(), String> {
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

/// The terminal in raw mode (no echo, no line editing, Ctrl-C passed to the
/// guest) while a console is attached; restored on drop.
struct RawTerminal(Option<String>);

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
const ESCAPE: u8 = 0x1d;

/// `xe console`: CONNECT to the console at `path`, then copy the keyboard
/// to it and it to the screen until Ctrl-] or until the console closes (the
/// VM stopped). Keyboard end-of-file does not end it, so piped input still
/// sees the console's answers.
fn console(o: &Opts, path: &str) -> Result<(), String> {
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
