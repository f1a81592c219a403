//! The foundation benchmark: API throughput, events, memory, restarts.

use super::*;

/// Runs `clients` threads, each making calls built by `make` on its own
/// keep-alive connection for `seconds`; returns calls per second.
pub(crate) fn throughput(
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

pub(crate) fn api_bench(o: &Options) -> BenchResult<()> {
    let state = std::env::temp_dir().join(format!("corral-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut d = Daemon::start(&o.corrald, &state)?;
    d.wait_ready(None, Instant::now())?;
    let port = d.port;

    // Load: clone the BIOS template o.vms times from `clients` connections.
    let mut c = Client::connect(port)?;
    let s = c.login()?;
    let template = bios_template(&mut c, &s)?;
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
    let peak_load = take_peak(d.pid());
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

    let peak_calls = take_peak(d.pid());

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
    let peak_all = take_peak(d.pid());

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

    report_header(&format!(
        "API benchmark ({} VMs, {} clients, {} s per phase)",
        o.vms, o.clients, o.seconds
    ));
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
    println!("| corrald peak RSS during the load (VM.clone) | {peak_load:.0} MiB | — |");
    println!("| corrald peak RSS during the throughput phases | {peak_calls:.0} MiB | — |");
    println!("| corrald peak RSS during VM.get_all_records | {peak_all:.0} MiB | ≤ 150 MiB |");
    println!("| corrald peak RSS (VmHWM) after those, to the end | {peak:.0} MiB | — |");
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

/// corrald's peak RSS since the last call (VmHWM, then reset through
/// `/proc/<pid>/clear_refs`), in MiB.
fn take_peak(pid: u32) -> f64 {
    let peak = proc_status_mib(pid, "VmHWM:");
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    peak
}
