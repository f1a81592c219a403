//! The storage benchmark: VDI latencies, import/export, SR.scan.

use super::*;

/// Rounds of dd / import / cat / export, alternating.
const TRANSFER_ROUNDS: usize = 3;

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

pub(crate) fn storage_bench(o: &Options) -> BenchResult<()> {
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
    let v = c.call(
        "VDI.create",
        &[s.clone(), vdi_record(size as i64, "import")],
    )?;
    let v_ref = as_str(&v)?;
    let port = d.port;
    let import_once = || -> BenchResult<f64> {
        let t = Instant::now();
        let mut conn = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
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
        Ok(t.elapsed().as_secs_f64())
    };
    let export_once = || -> BenchResult<f64> {
        let t = Instant::now();
        let mut exported = 0u64;
        let mut conn = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
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
        if exported != size {
            return Err(format!("exported {exported} of {size} bytes"));
        }
        Ok(t.elapsed().as_secs_f64())
    };
    // Alternating rounds, each step from a cold page cache; medians, because
    // even `cat` of the same file varies by half from one run to the next.
    let (mut dds, mut imports, mut cats, mut exports) = (vec![], vec![], vec![], vec![]);
    for _ in 0..TRANSFER_ROUNDS {
        drop_caches();
        dds.push(time_cmd(
            "dd",
            &[
                &format!("if={src_s}"),
                &format!("of={}", copy.display()),
                "bs=2M",
                "conv=fsync",
            ],
        )?);
        let _ = std::fs::remove_file(&copy);
        drop_caches();
        imports.push(import_once()?);
        drop_caches();
        cats.push(time_cmd(
            "sh",
            &["-c", &format!("cat {src_s} > /dev/null")],
        )?);
        drop_caches();
        exports.push(export_once()?);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile(v, 0.5)
    };
    let (dd, import, cat, export) = (
        med(&mut dds),
        med(&mut imports),
        med(&mut cats),
        med(&mut exports),
    );
    c.call("VDI.destroy", &[s.clone(), v])?;
    let _ = std::fs::remove_file(&src);
    let mib = size as f64 / 1048576.0;
    lines.push(format!(
        "| import 2 GiB raw (PUT /import_raw_vdi), median of {TRANSFER_ROUNDS} | {:.0} MiB/s | — |",
        mib / import
    ));
    lines.push(format!(
        "| baseline: dd of the same file (conv=fsync) | {:.0} MiB/s | — |",
        mib / dd
    ));
    lines.push(format!("| import / dd | {:.2} | ≥ 0.7 |", dd / import));
    lines.push(format!(
        "| export 2 GiB raw (GET /export_raw_vdi), median of {TRANSFER_ROUNDS} | {:.0} MiB/s | — |",
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

    report_header("Storage benchmark (file SR on the state directory's filesystem)");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
