//! `corral-bench`: measures a real corrald from outside, over its wire
//! protocols, as issue benchmarks ask. It starts its own corrald (the
//! `corrald` binary next to this one unless `--corrald` says otherwise) in a
//! temporary state directory, loads it, and prints a Markdown report for
//! docs/benchmarks.md. Every number comes with a baseline measured in the same
//! run, because the build machines are noisy.
//!
//! Usage: corral-bench api|storage [--vms N] [--clients N] [--seconds S] [--corrald PATH]

use corral_model::Value;
use corral_model::xmlrpc::{self, Response};
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
        Some("api") => Options::parse(&args[1..]).and_then(|o| api_bench(&o)),
        Some("storage") => Options::parse(&args[1..]).and_then(|o| storage_bench(&o)),
        _ => Err(
            "usage: corral-bench api|storage [--vms N] [--clients N] [--seconds S] [--corrald PATH]"
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
    corrald: PathBuf,
}

impl Options {
    fn parse(args: &[String]) -> BenchResult<Options> {
        let mut o = Options {
            vms: 10_000,
            clients: 8,
            seconds: 5.0,
            corrald: std::env::current_exe()
                .map_err(|e| e.to_string())?
                .with_file_name("corrald"),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
            match a.as_str() {
                "--vms" => o.vms = val()?.parse().map_err(|e| format!("--vms: {e}"))?,
                "--clients" => o.clients = val()?.parse().map_err(|e| format!("--clients: {e}"))?,
                "--seconds" => o.seconds = val()?.parse().map_err(|e| format!("--seconds: {e}"))?,
                "--corrald" => o.corrald = PathBuf::from(val()?),
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
        std::fs::create_dir_all(state).map_err(|e| e.to_string())?;
        let cfg = state.join("bench.conf");
        std::fs::write(
            &cfg,
            "failed-login-delay-ms = 0\nlogin-failures-per-minute = 100000\nmax-sessions-per-user = 1000\n",
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
            }
        }
        let len = len.ok_or("response without Content-Length")?;
        let mut out = vec![0u8; len];
        self.reader
            .read_exact(&mut out)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn call(&mut self, method: &str, params: &[Value]) -> BenchResult<Value> {
        let raw = self.call_raw(&xmlrpc::call(method, params))?;
        match xmlrpc::parse_response(&raw).map_err(|e| e.to_string())? {
            Response::Success(v) | Response::Bare(v) => Ok(v),
            Response::Failure(e) => Err(format!("{method}: {}", e.join(" "))),
        }
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

/// Runs `clients` threads, each making calls built by `make` on its own
/// keep-alive connection for `seconds`; returns calls per second.
fn throughput(
    port: u16,
    clients: usize,
    seconds: f64,
    make: Arc<dyn Fn(usize, u64, &Value) -> String + Send + Sync>,
) -> BenchResult<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(clients + 1));
    let mut handles = Vec::new();
    for id in 0..clients {
        let (stop, count, start, make) = (stop.clone(), count.clone(), start.clone(), make.clone());
        handles.push(std::thread::spawn(move || -> BenchResult<()> {
            let mut c = Client::connect(port)?;
            let session = c.login()?;
            let mut i = 0u64;
            start.wait();
            while !stop.load(Ordering::Relaxed) {
                let body = make(id, i, &session);
                let raw = c.call_raw(&body)?;
                if raw.windows(7).any(|w| w == b"Failure") && i == 0 && id == 0 {
                    // Only the unknown-method floor is expected to fail.
                    if !body.contains("bench.nothing") {
                        return Err(String::from_utf8_lossy(&raw).into_owned());
                    }
                }
                i += 1;
            }
            count.fetch_add(i, Ordering::Relaxed);
            Ok(())
        }));
    }
    start.wait();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().map_err(|_| "client thread panicked")??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

fn api_bench(o: &Options) -> BenchResult<()> {
    let state = std::env::temp_dir().join(format!("corral-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut d = Daemon::start(&o.corrald, &state)?;
    d.wait_ready(None, Instant::now())?;
    let port = d.port;

    // Load: clone the BIOS template o.vms times from `clients` connections.
    let mut c = Client::connect(port)?;
    let s = c.login()?;
    let template = match c.call(
        "VM.get_by_name_label",
        &[s.clone(), Value::String("Other install media".into())],
    )? {
        Value::Array(v) if !v.is_empty() => as_str(&v[0])?,
        other => return Err(format!("template not found: {other:?}")),
    };
    let t0 = Instant::now();
    let per = o.vms.div_ceil(o.clients);
    let mut handles = Vec::new();
    for id in 0..o.clients {
        let template = template.clone();
        let n = per.min(o.vms.saturating_sub(id * per));
        handles.push(std::thread::spawn(move || -> BenchResult<Vec<String>> {
            let mut c = Client::connect(port)?;
            let s = c.login()?;
            let mut refs = Vec::with_capacity(n);
            for i in 0..n {
                let r = c.call(
                    "VM.clone",
                    &[
                        s.clone(),
                        Value::String(template.clone()),
                        Value::String(format!("bench-{id}-{i}")),
                    ],
                )?;
                refs.push(as_str(&r)?);
            }
            Ok(refs)
        }));
    }
    let mut vms = Vec::with_capacity(o.vms);
    for h in handles {
        vms.extend(h.join().map_err(|_| "loader panicked")??);
    }
    let load_secs = t0.elapsed().as_secs_f64();
    let rss_loaded = rss_mib(d.pid());
    let vms = Arc::new(vms);

    // VM.get_record at random VMs versus two baselines on the same stack:
    // pool.get_all (session check, one ref) and an unknown method (no handler).
    let get_record = {
        let vms = vms.clone();
        throughput(
            port,
            o.clients,
            o.seconds,
            Arc::new(move |id, i, s| {
                let k = (id as u64 * 7919 + i * 104_729) as usize % vms.len();
                xmlrpc::call("VM.get_record", &[s.clone(), Value::String(vms[k].clone())])
            }),
        )?
    };
    let rss_get_record = rss_mib(d.pid());
    let trivial = throughput(
        port,
        o.clients,
        o.seconds,
        Arc::new(|_, _, s| xmlrpc::call("pool.get_all", std::slice::from_ref(s))),
    )?;
    let floor = throughput(
        port,
        o.clients,
        o.seconds,
        Arc::new(|_, _, _| xmlrpc::call("bench.nothing", &[])),
    )?;

    // VM.get_all_records: time to the last byte, then also parsed.
    let mut all_ms = Vec::new();
    let mut all_parsed_ms = Vec::new();
    let mut body_len = 0;
    let all_body = xmlrpc::call("VM.get_all_records", std::slice::from_ref(&s));
    for _ in 0..11 {
        let t = Instant::now();
        let raw = c.call_raw(&all_body)?;
        all_ms.push(t.elapsed().as_secs_f64() * 1e3);
        body_len = raw.len();
        match xmlrpc::parse_response(&raw).map_err(|e| e.to_string())? {
            Response::Success(Value::Struct(m)) if m.len() >= o.vms => {}
            _ => return Err("VM.get_all_records returned too few records".into()),
        }
        all_parsed_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    all_ms.sort_by(f64::total_cmp);
    all_parsed_ms.sort_by(f64::total_cmp);

    // event.from wake-up: a waiter blocks in event.from; a writer edits a VM;
    // latency is from the writer's acknowledgement to the waiter's return.
    let wakeups = event_wakeups(port, &vms, 300)?;
    let write_ms = wakeups.1;
    let mut wake = wakeups.0;
    wake.sort_by(f64::total_cmp);

    let rss = rss_mib(d.pid());
    let peak = proc_status_mib(d.pid(), "VmHWM:");

    // Restart: SIGTERM, start again, time until a new client reads a VM.
    let probe_vm = vms[vms.len() / 2].clone();
    let mut restarts = Vec::new();
    for signal in [libc::SIGTERM, libc::SIGTERM, libc::SIGTERM, libc::SIGKILL] {
        drop(c);
        d.stop(signal);
        let t = Instant::now();
        d.spawn()?;
        restarts.push((
            signal,
            d.wait_ready(Some(&probe_vm), t)?.as_secs_f64() * 1e3,
        ));
        c = Client::connect(port)?;
        c.login()?;
    }
    let rss_after_restart = rss_mib(d.pid());
    drop(d);
    let _ = std::fs::remove_dir_all(&state);

    let host = std::fs::read_to_string("/proc/cpuinfo")
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
    println!(
        "### API benchmark ({} VMs, {} clients, {} s per phase)",
        o.vms, o.clients, o.seconds
    );
    println!();
    println!("Machine: {cpus} CPUs, {host}; date: {}", date_utc());
    println!();
    println!("| measurement | result | target |");
    println!("|---|---|---|");
    println!(
        "| load: VM.clone × {} over {} connections | {:.0} writes/s ({:.1} s) | — |",
        o.vms,
        o.clients,
        o.vms as f64 / load_secs,
        load_secs
    );
    println!("| VM.get_record, XML-RPC keep-alive | {get_record:.0} calls/s | ≥ 10,000 |");
    println!("| baseline: pool.get_all (trivial handler) | {trivial:.0} calls/s | — |");
    println!("| baseline: unknown method (no handler) | {floor:.0} calls/s | — |");
    println!(
        "| get_record / trivial handler | {:.2} | — |",
        get_record / trivial
    );
    println!(
        "| VM.get_all_records ({:.1} MiB), to last byte | median {:.1} ms, max {:.1} ms | ≤ 150 ms |",
        body_len as f64 / 1048576.0,
        percentile(&all_ms, 0.5),
        percentile(&all_ms, 1.0)
    );
    println!(
        "| VM.get_all_records, parsed by the client | median {:.1} ms | — |",
        percentile(&all_parsed_ms, 0.5)
    );
    println!(
        "| event.from wake-up after a write ack ({} writes) | p50 {:.2} ms, p99 {:.2} ms | p99 ≤ 5 ms |",
        wake.len(),
        percentile(&wake, 0.5),
        percentile(&wake, 0.99)
    );
    println!("| baseline: the write itself (fsync'd) | median {write_ms:.2} ms | — |");
    println!(
        "| corrald RSS with {} VMs loaded | {rss_loaded:.0} MiB | ≤ 200 MiB |",
        o.vms
    );
    println!("| corrald RSS after the get_record phase | {rss_get_record:.0} MiB | — |");
    println!("| corrald RSS at the end | {rss:.0} MiB | — |");
    println!("| corrald peak RSS (VmHWM) over the whole run | {peak:.0} MiB | — |");
    println!("| corrald RSS after restarts | {rss_after_restart:.0} MiB | — |");
    for (sig, ms) in &restarts {
        let how = if *sig == libc::SIGKILL {
            "kill -9"
        } else {
            "SIGTERM"
        };
        println!("| restart after {how}, until a VM is readable | {ms:.0} ms | ≤ 1000 ms |");
    }
    Ok(())
}

/// Returns (wake-up latencies in ms, median write latency in ms).
fn event_wakeups(port: u16, vms: &[String], n: usize) -> BenchResult<(Vec<f64>, f64)> {
    let mut waiter = Client::connect(port)?;
    let ws = waiter.login()?;
    let mut writer = Client::connect(port)?;
    let wrs = writer.login()?;
    let token = match waiter.call(
        "event.from",
        &[
            ws.clone(),
            Value::Array(vec![Value::String("VM".into())]),
            Value::String(String::new()),
            Value::Float(0.0),
        ],
    )? {
        Value::Struct(m) => m
            .iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| as_str(v))
            .ok_or("event.from without token")??,
        _ => return Err("event.from returned no struct".into()),
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::spawn(move || -> BenchResult<Vec<Instant>> {
        let mut token = token;
        let mut seen = Vec::new();
        for _ in 0..n {
            let body = xmlrpc::call(
                "event.from",
                &[
                    ws.clone(),
                    Value::Array(vec![Value::String("VM".into())]),
                    Value::String(token.clone()),
                    Value::Float(30.0),
                ],
            );
            let _ = ready_tx.send(());
            let raw = waiter.call_raw(&body)?;
            seen.push(Instant::now());
            match xmlrpc::parse_response(&raw).map_err(|e| e.to_string())? {
                Response::Success(Value::Struct(m)) => {
                    token = m
                        .iter()
                        .find(|(k, _)| k == "token")
                        .map(|(_, v)| as_str(v))
                        .ok_or("no token")??;
                }
                _ => return Err("event.from failed".into()),
            }
        }
        Ok(seen)
    });
    let mut acks = Vec::new();
    let mut writes = Vec::new();
    for i in 0..n {
        ready_rx.recv().map_err(|_| "waiter stopped")?;
        // Let the waiter's request reach the server and block there.
        std::thread::sleep(Duration::from_millis(3));
        let t = Instant::now();
        writer.call(
            "VM.set_name_description",
            &[
                wrs.clone(),
                Value::String(vms[i % vms.len()].clone()),
                Value::String(format!("event {i}")),
            ],
        )?;
        let ack = Instant::now();
        writes.push((ack - t).as_secs_f64() * 1e3);
        acks.push(ack);
    }
    let seen = handle.join().map_err(|_| "waiter panicked")??;
    let lat = seen
        .iter()
        .zip(&acks)
        .map(|(s, a)| s.saturating_duration_since(*a).as_secs_f64() * 1e3)
        .collect();
    writes.sort_by(f64::total_cmp);
    Ok((lat, percentile(&writes, 0.5)))
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

/// A deterministic, incompressible-enough byte stream (xorshift).
fn fill_pseudo_random(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn time_cmd(cmd: &str, args: &[&str]) -> BenchResult<f64> {
    let t = Instant::now();
    let st = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("{cmd} failed"));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn storage_bench(o: &Options) -> BenchResult<()> {
    let state = std::env::temp_dir().join(format!("corral-bench-storage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let d = Daemon::start(&o.corrald, &state)?;
    d.wait_ready(None, Instant::now())?;
    let mut c = Client::connect(d.port)?;
    let s = c.login()?;
    let sid = as_str(&s)?;
    let pools = c.call("pool.get_all", std::slice::from_ref(&s))?;
    let pool = match &pools {
        Value::Array(a) if !a.is_empty() => a[0].clone(),
        _ => return Err("no pool".into()),
    };
    let sr = c.call("pool.get_default_SR", &[s.clone(), pool])?;
    let vdi_record = |size: i64, name: &str| {
        Value::Struct(vec![
            ("name_label".into(), Value::String(name.into())),
            ("name_description".into(), Value::String(String::new())),
            ("SR".into(), sr.clone()),
            ("virtual_size".into(), Value::Int(size)),
            ("type".into(), Value::String("user".into())),
            ("sharable".into(), Value::Bool(false)),
            ("read_only".into(), Value::Bool(false)),
            ("other_config".into(), Value::Struct(vec![])),
        ])
    };
    let mut lines = Vec::new();
    let n = 30;
    for (label, size) in [("1 GiB", 1i64 << 30), ("100 GiB", 100i64 << 30)] {
        let (mut create, mut clone, mut snap, mut destroy) = (vec![], vec![], vec![], vec![]);
        for i in 0..n {
            let t = Instant::now();
            let v = c.call(
                "VDI.create",
                &[s.clone(), vdi_record(size, &format!("b{i}"))],
            )?;
            create.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let cl = c.call("VDI.clone", &[s.clone(), v.clone(), Value::Struct(vec![])])?;
            clone.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let sn = c.call(
                "VDI.snapshot",
                &[s.clone(), v.clone(), Value::Struct(vec![])],
            )?;
            snap.push(t.elapsed().as_secs_f64() * 1e3);
            for x in [sn, cl, v] {
                let t = Instant::now();
                c.call("VDI.destroy", &[s.clone(), x])?;
                destroy.push(t.elapsed().as_secs_f64() * 1e3);
            }
            // Let the background coalescing finish between rounds.
            while c.call("SR.get_VDIs", &[s.clone(), sr.clone()])? != Value::Array(vec![]) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        lines.push(format!(
            "| VDI.create {label} ({n}×) | {} | — |",
            ms_stats(create)
        ));
        lines.push(format!(
            "| VDI.clone {label} | {} | < 100 ms |",
            ms_stats(clone)
        ));
        lines.push(format!(
            "| VDI.snapshot {label} | {} | < 100 ms |",
            ms_stats(snap)
        ));
        lines.push(format!(
            "| VDI.destroy {label} (incl. base copies) | {} | — |",
            ms_stats(destroy)
        ));
    }

    // Import/export of a 2 GiB raw disk over loopback, against dd and cat
    // of the same file in the same run.
    let size: u64 = 2 << 30;
    let src = state.join("src.raw");
    {
        let mut f = std::fs::File::create(&src).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4 << 20];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut written = 0;
        while written < size {
            fill_pseudo_random(&mut buf, &mut seed);
            f.write_all(&buf).map_err(|e| e.to_string())?;
            written += buf.len() as u64;
        }
        f.sync_all().map_err(|e| e.to_string())?;
    }
    let src_s = src.to_string_lossy().into_owned();
    let copy = state.join("local-sr").join("dd-copy.bin");
    drop_caches();
    let dd = time_cmd(
        "dd",
        &[
            &format!("if={src_s}"),
            &format!("of={}", copy.display()),
            "bs=2M",
            "conv=fsync",
        ],
    )?;
    let _ = std::fs::remove_file(&copy);
    let v = c.call(
        "VDI.create",
        &[s.clone(), vdi_record(size as i64, "import")],
    )?;
    let v_ref = as_str(&v)?;
    drop_caches();
    let t = Instant::now();
    {
        let mut conn = TcpStream::connect(("127.0.0.1", d.port)).map_err(|e| e.to_string())?;
        let head = format!(
            "PUT /import_raw_vdi?session_id={sid}&vdi={v_ref}&format=raw HTTP/1.1\r\nHost: b\r\nContent-Length: {size}\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
        let mut f = std::fs::File::open(&src).map_err(|e| e.to_string())?;
        std::io::copy(&mut f, &mut conn).map_err(|e| e.to_string())?;
        let mut r = BufReader::new(conn);
        let mut status = String::new();
        r.read_line(&mut status).map_err(|e| e.to_string())?;
        if !status.contains(" 200 ") {
            return Err(format!("import failed: {status}"));
        }
    }
    let import = t.elapsed().as_secs_f64();
    drop_caches();
    let cat = time_cmd("sh", &["-c", &format!("cat {src_s} > /dev/null")])?;
    drop_caches();
    let t = Instant::now();
    let mut exported = 0u64;
    {
        let mut conn = TcpStream::connect(("127.0.0.1", d.port)).map_err(|e| e.to_string())?;
        let head = format!(
            "GET /export_raw_vdi?session_id={sid}&vdi={v_ref}&format=raw HTTP/1.1\r\nHost: b\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
        let mut r = BufReader::with_capacity(1 << 20, conn);
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line).map_err(|e| e.to_string())?;
            if line.trim().is_empty() {
                break;
            }
        }
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            exported += n as u64;
        }
    }
    let export = t.elapsed().as_secs_f64();
    if exported != size {
        return Err(format!("exported {exported} of {size} bytes"));
    }
    c.call("VDI.destroy", &[s.clone(), v])?;
    let _ = std::fs::remove_file(&src);
    let mib = size as f64 / 1048576.0;
    lines.push(format!(
        "| import 2 GiB raw (PUT /import_raw_vdi) | {:.0} MiB/s | — |",
        mib / import
    ));
    lines.push(format!(
        "| baseline: dd of the same file (conv=fsync) | {:.0} MiB/s | — |",
        mib / dd
    ));
    lines.push(format!("| import / dd | {:.2} | ≥ 0.7 |", dd / import));
    lines.push(format!(
        "| export 2 GiB raw (GET /export_raw_vdi) | {:.0} MiB/s | — |",
        mib / export
    ));
    lines.push(format!(
        "| baseline: cat of the same file | {:.0} MiB/s | — |",
        mib / cat
    ));
    lines.push(format!("| export / cat | {:.2} | ≥ 0.7 |", cat / export));

    // SR.scan of an SR holding 2,000 VDIs (made out of band, then adopted).
    let dir = state.join("scan-sr");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let host = match c.call("host.get_all", std::slice::from_ref(&s))? {
        Value::Array(a) if !a.is_empty() => a[0].clone(),
        _ => return Err("no host".into()),
    };
    let scan_sr = c.call(
        "SR.create",
        &[
            s.clone(),
            host,
            Value::Struct(vec![(
                "location".into(),
                Value::String(dir.to_string_lossy().into_owned()),
            )]),
            Value::Int(0),
            Value::String("scan".into()),
            Value::String(String::new()),
            Value::String("file".into()),
            Value::String("user".into()),
            Value::Bool(false),
            Value::Struct(vec![]),
        ],
    )?;
    let count = 2000;
    let template = dir.join("template.qcow2");
    let st = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            &template.to_string_lossy(),
            "1G",
        ])
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err("qemu-img create failed".into());
    }
    for i in 0..count - 1 {
        std::fs::copy(&template, dir.join(format!("img-{i:05}.qcow2")))
            .map_err(|e| e.to_string())?;
    }
    let t = Instant::now();
    c.call("SR.scan", &[s.clone(), scan_sr.clone()])?;
    let cold = t.elapsed().as_secs_f64();
    let found = match c.call("SR.get_VDIs", &[s.clone(), scan_sr.clone()])? {
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if found != count {
        return Err(format!("scan found {found} of {count} VDIs"));
    }
    let mut warm = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        c.call("SR.scan", &[s.clone(), scan_sr.clone()])?;
        warm.push(t.elapsed().as_secs_f64() * 1e3);
    }
    warm.sort_by(f64::total_cmp);
    lines.push(format!("| SR.scan, {count} VDIs, first scan (adopts every image; one qemu-img info each) | {cold:.1} s | — |"));
    lines.push(format!(
        "| SR.scan, {count} VDIs, rescan | median {:.0} ms | ≤ 2 s |",
        percentile(&warm, 0.5)
    ));
    drop(d);
    let _ = std::fs::remove_dir_all(&state);

    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("### Storage benchmark (file SR on the state directory's filesystem)");
    println!();
    println!("Machine: {cpus} CPUs; date: {}", date_utc());
    println!();
    println!("| measurement | result | target |");
    println!("|---|---|---|");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
