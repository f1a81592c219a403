//! `corral-bench`: measures a real corrald from outside, over its wire
//! protocols, as issue benchmarks ask. It starts its own corrald (the
//! `corrald` binary next to this one unless `--corrald` says otherwise) in a
//! temporary state directory, loads it, and prints a Markdown report for
//! docs/benchmarks.md. Every number comes with a baseline measured in the same
//! run, because the build machines are noisy.
//!
//! Usage: corral-bench api|storage|vm|net|commit|security [--vms N] [--clients N] [--seconds S]
//! [--rounds N] [--corrald PATH] [--baseline-corrald PATH]

mod api;
mod commit;
mod net;
mod security;
mod storage;
mod vm;

use corral_model::xmlrpc::Response;
use corral_model::{Value, xmlrpc};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

type BenchResult<T> = Result<T, String>;

const PASSWORD: &str = "bench-password";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("api") => Options::parse(&args[1..], 10_000).and_then(|o| api::api_bench(&o)),
        Some("storage") => Options::parse(&args[1..], 0).and_then(|o| storage::storage_bench(&o)),
        Some("vm") => Options::parse(&args[1..], 20).and_then(|o| vm::vm_bench(&o)),
        Some("net") => Options::parse(&args[1..], 0).and_then(|o| net::net_bench(&o)),
        Some("commit") => Options::parse(&args[1..], 0).and_then(|o| commit::commit_bench(&o)),
        Some("security") => {
            Options::parse(&args[1..], 1000).and_then(|o| security::security_bench(&o))
        }
        _ => Err(
            "usage: corral-bench api|storage|vm|net|commit|security [--vms N] [--clients N] [--seconds S] \
             [--rounds N] [--corrald PATH] [--baseline-corrald PATH]"
                .into(),
        ),
    };
    if let Err(e) = result {
        eprintln!("corral-bench: {e}");
        std::process::exit(1);
    }
}

struct Options {
    vms: usize,
    clients: usize,
    seconds: f64,
    rounds: usize,
    corrald: PathBuf,
    /// `security`: the corrald to compare with.
    baseline: Option<PathBuf>,
}

impl Options {
    fn parse(args: &[String], default_vms: usize) -> BenchResult<Options> {
        let mut o = Options {
            vms: default_vms,
            clients: 8,
            seconds: 5.0,
            rounds: 5,
            corrald: std::env::current_exe()
                .map_err(|e| e.to_string())?
                .with_file_name("corrald"),
            baseline: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
            match a.as_str() {
                "--vms" => o.vms = val()?.parse().map_err(|e| format!("--vms: {e}"))?,
                "--clients" => o.clients = val()?.parse().map_err(|e| format!("--clients: {e}"))?,
                "--seconds" => o.seconds = val()?.parse().map_err(|e| format!("--seconds: {e}"))?,
                "--rounds" => o.rounds = val()?.parse().map_err(|e| format!("--rounds: {e}"))?,
                "--corrald" => o.corrald = PathBuf::from(val()?),
                "--baseline-corrald" => o.baseline = Some(PathBuf::from(val()?)),
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(o)
    }
}

/// A corrald started for the benchmark, killed when dropped.
struct Daemon {
    child: Option<Child>,
    binary: PathBuf,
    state: PathBuf,
    port: u16,
}

impl Daemon {
    fn start(binary: &Path, state: &Path) -> BenchResult<Daemon> {
        Daemon::start_with(binary, state, "")
    }

    /// Starts corrald with `extra` appended to the benchmark's config file.
    fn start_with(binary: &Path, state: &Path, extra: &str) -> BenchResult<Daemon> {
        std::fs::create_dir_all(state).map_err(|e| e.to_string())?;
        let cfg = state.join("bench.conf");
        std::fs::write(
            &cfg,
            format!(
                "failed-login-delay-ms = 0\nlogin-failures-per-minute = 100000\n\
                 max-sessions-per-user = 1000\n{extra}"
            ),
        )
        .map_err(|e| e.to_string())?;
        let port = free_port()?;
        let mut d = Daemon {
            child: None,
            binary: binary.to_owned(),
            state: state.to_owned(),
            port,
        };
        d.spawn()?;
        Ok(d)
    }

    fn spawn(&mut self) -> BenchResult<()> {
        let child = Command::new(&self.binary)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--no-tls")
            .arg("--config")
            .arg(self.state.join("bench.conf"))
            .env("CORRAL_ROOT_PASSWORD", PASSWORD)
            .env("CORRAL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn stop(&mut self, signal: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, signal) };
            let _ = c.wait();
        }
    }

    /// Waits until a fresh client can log in and read `vm`; returns how long.
    fn wait_ready(&self, vm: Option<&str>, since: Instant) -> BenchResult<Duration> {
        let deadline = since + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = Client::connect(self.port) {
                if let Ok(s) = c.login() {
                    let ok = match vm {
                        Some(vm) => c
                            .call("VM.get_record", &[s.clone(), Value::String(vm.into())])
                            .is_ok(),
                        None => true,
                    };
                    if ok {
                        return Ok(since.elapsed());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err("corrald did not become ready".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(libc::SIGKILL);
    }
}

fn free_port() -> BenchResult<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// A keep-alive XML-RPC client on one TCP connection.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(port: u16) -> BenchResult<Client> {
        let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let writer = s.try_clone().map_err(|e| e.to_string())?;
        Ok(Client {
            reader: BufReader::with_capacity(1 << 16, s),
            writer,
        })
    }

    fn login(&mut self) -> BenchResult<Value> {
        self.call(
            "session.login_with_password",
            &[Value::String("root".into()), Value::String(PASSWORD.into())],
        )
    }

    /// Sends one call and returns the raw response body.
    fn call_raw(&mut self, body: &str) -> BenchResult<Vec<u8>> {
        let head = format!(
            "POST / HTTP/1.1\r\nHost: bench\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.writer
            .write_all(head.as_bytes())
            .and_then(|_| self.writer.write_all(body.as_bytes()))
            .map_err(|e| e.to_string())?;
        let mut len = None;
        let mut chunked = false;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                }
                if k.eq_ignore_ascii_case("transfer-encoding")
                    && v.trim().eq_ignore_ascii_case("chunked")
                {
                    chunked = true;
                }
            }
        }
        if chunked {
            return self.read_chunked();
        }
        let len = len.ok_or("response without Content-Length")?;
        let mut out = vec![0u8; len];
        self.reader
            .read_exact(&mut out)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    /// A body in HTTP/1.1 chunked transfer coding (large replies).
    fn read_chunked(&mut self) -> BenchResult<Vec<u8>> {
        let mut out = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            self.reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            let size = usize::from_str_radix(line.trim_end(), 16).map_err(|e| e.to_string())?;
            let start = out.len();
            out.resize(start + size + 2, 0);
            self.reader
                .read_exact(&mut out[start..])
                .map_err(|e| e.to_string())?;
            out.truncate(start + size);
            if size == 0 {
                return Ok(out);
            }
        }
    }

    fn call(&mut self, method: &str, params: &[Value]) -> BenchResult<Value> {
        let raw = self.call_raw(&xmlrpc::call(method, params))?;
        match xmlrpc::parse_response(&raw).map_err(|e| e.to_string())? {
            Response::Success(v) | Response::Bare(v) => Ok(v),
            Response::Failure(e) => Err(format!("{method}: {}", e.join(" "))),
        }
    }
}

/// The "Other install media" template, which the load phases clone.
fn bios_template(c: &mut Client, session: &Value) -> BenchResult<String> {
    match c.call(
        "VM.get_by_name_label",
        &[session.clone(), Value::String("Other install media".into())],
    )? {
        Value::Array(v) if !v.is_empty() => as_str(&v[0]),
        other => Err(format!("template not found: {other:?}")),
    }
}

fn as_str(v: &Value) -> BenchResult<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("expected a string, got {other:?}")),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_mib(pid: u32) -> f64 {
    proc_status_mib(pid, "VmRSS:")
}

/// A memory line of /proc/<pid>/status (VmRSS, VmHWM = peak RSS) in MiB.
fn proc_status_mib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The start of a report: title, machine and date, the table's head.
fn report_header(title: &str) {
    println!("### {title}");
    println!();
    println!("Machine: {}; date: {}", machine(), date_utc());
    println!();
    println!("| measurement | result | target |");
    println!("|---|---|---|");
}

/// "N CPUs, model name" of this machine, for the report.
fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_owned()))
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpus} CPUs, {model}")
}

fn date_utc() -> String {
    corral_model::date::now()
}

fn ms_stats(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "p50 {:.1} ms, p99 {:.1} ms",
        percentile(&v, 0.5),
        percentile(&v, 0.99)
    )
}
