//! The VM benchmark: the toolstack's overhead on `VM.start` and
//! `VM.clean_shutdown` against the same QEMU command line run by hand in the
//! same run; corrald's CPU and memory with N running VMs against the same
//! corrald with none; and how long a restarted corrald takes to re-attach to
//! N running VMs against a restart with none. Guests are the test guest of
//! scripts/build-test-guest.sh under TCG, as in the tests.

use super::*;
use corral_model::args::{Args, vm};
use corral_model::refs::{Ref, classes};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

pub(crate) const READY: &str = "corral-guest: ready";
const HTTP_HEAD_END: &str = "\r\n\r\n";
/// The kernel's last words before ACPI power-off (printed even when quiet).
const POWER_DOWN: &str = "reboot: Power down";
pub(crate) const TEMPLATE: &str = "Linux direct kernel boot";
const MEMORY: i64 = 128 << 20;
/// Window over which CPU use is averaged.
const CPU_WINDOW: Duration = Duration::from_secs(30);
const RESTARTS: usize = 3;

pub(crate) struct Guest {
    pub(crate) kernel: String,
    pub(crate) initrd: String,
}

pub(crate) fn guest() -> BenchResult<Guest> {
    let dir = match std::env::var_os("CORRAL_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/corral/guest"),
    };
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.img"));
    if !kernel.is_file() || !initrd.is_file() {
        return Err(format!(
            "no test guest in {}: run scripts/build-test-guest.sh first",
            dir.display()
        ));
    }
    Ok(Guest {
        kernel: kernel.to_string_lossy().into_owned(),
        initrd: initrd.to_string_lossy().into_owned(),
    })
}

/// On drop, kills every QEMU whose command line mentions one of these
/// directories, so a failed run leaves no guests behind.
pub(crate) struct QemuReaper(pub(crate) Vec<String>);

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for pid in qemus_under(&self.0) {
            // SAFETY: kill(2) on a process whose command line names our
            // benchmark's run directories.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn qemus_under(dirs: &[String]) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("qemu-system") && dirs.iter().any(|d| c.contains(d.as_str()))
                })
                .unwrap_or(false)
        })
        .collect()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which may itself hold spaces.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let field = |i: usize| {
        rest.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / tick
}

/// A process's exit, observed through a pidfd (QEMU daemonizes, so it is
/// nobody's child we could wait for).
fn wait_exit(pid: i32, limit: Duration) -> BenchResult<()> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Ok(()); // already gone
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) };
        if n == 1 {
            return Ok(());
        }
        let interrupted =
            n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
        if !interrupted || left.is_zero() {
            return Err(format!("QEMU {pid} did not exit"));
        }
    }
}

/// Reads from `r` until `pattern` shows up in what was read.
pub(crate) fn read_until(r: &mut impl Read, pattern: &str, limit: Duration) -> BenchResult<()> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    while Instant::now() < deadline {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(pattern.len()).any(|w| w == pattern.as_bytes()) {
                    return Ok(());
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("never saw {pattern:?}"))
}

/// Notes when `pattern` appears on a console, from another thread, so the
/// guest's own (variable) shutdown time can be taken out of a measurement.
fn when_seen(
    mut r: impl Read + Send + 'static,
    pattern: &'static str,
) -> std::thread::JoinHandle<Option<Instant>> {
    std::thread::spawn(move || {
        read_until(&mut r, pattern, Duration::from_secs(120))
            .ok()
            .map(|()| Instant::now())
    })
}

fn s_int(v: i64) -> Value {
    // XenAPI sends int64 as strings over XML-RPC.
    Value::String(v.to_string())
}

pub(crate) struct Api<'a> {
    pub(crate) c: &'a mut Client,
    pub(crate) s: Value,
}

impl Api<'_> {
    pub(crate) fn call(&mut self, method: &str, args: &[Value]) -> BenchResult<Value> {
        let mut p = Vec::with_capacity(args.len() + 1);
        p.push(self.s.clone());
        p.extend_from_slice(args);
        self.c.call(method, &p)
    }

    pub(crate) fn call_on(&mut self, method: &str, vm: &str) -> BenchResult<Value> {
        self.call(method, &[Value::String(vm.into())])
    }

    /// A declared message through its typed arguments, over HTTP.
    pub(crate) fn invoke<A: Args>(&mut self, a: A) -> BenchResult<Value> {
        self.call(A::WIRE, &a.into_params())
    }

    pub(crate) fn on_vm<A: Args + From<Ref<classes::VM>>>(
        &mut self,
        vm: &str,
    ) -> BenchResult<Value> {
        self.invoke(A::from(Ref::new(vm)))
    }

    pub(crate) fn make_vm(
        &mut self,
        tpl: &Value,
        sr: &Value,
        g: &Guest,
        name: &str,
    ) -> BenchResult<String> {
        let vm = as_str(&self.invoke(vm::Clone {
            vm: Ref::new(as_str(tpl)?),
            new_name: name.into(),
        })?)?;
        let v = || Value::String(vm.clone());
        self.call("VM.set_is_a_template", &[v(), Value::Bool(false)])?;
        self.call("VM.set_PV_kernel", &[v(), Value::String(g.kernel.clone())])?;
        self.call("VM.set_PV_ramdisk", &[v(), Value::String(g.initrd.clone())])?;
        self.call(
            "VM.set_PV_args",
            &[v(), Value::String("console=ttyS0 quiet".into())],
        )?;
        let m = s_int(MEMORY);
        self.call(
            "VM.set_memory_limits",
            &[v(), m.clone(), m.clone(), m.clone(), m],
        )?;
        let vdi = self.call(
            "VDI.create",
            &[Value::Struct(vec![
                ("name_label".into(), Value::String(format!("{name} disk"))),
                ("SR".into(), sr.clone()),
                ("virtual_size".into(), s_int(64 << 20)),
                ("type".into(), Value::String("user".into())),
                ("sharable".into(), Value::Bool(false)),
                ("read_only".into(), Value::Bool(false)),
                ("other_config".into(), Value::Struct(vec![])),
            ])],
        )?;
        self.call(
            "VBD.create",
            &[Value::Struct(vec![
                ("VM".into(), v()),
                ("VDI".into(), vdi),
                ("userdevice".into(), Value::String("0".into())),
                ("bootable".into(), Value::Bool(true)),
                ("mode".into(), Value::String("RW".into())),
                ("type".into(), Value::String("Disk".into())),
                ("empty".into(), Value::Bool(false)),
                ("other_config".into(), Value::Struct(vec![])),
                ("qos_algorithm_type".into(), Value::String(String::new())),
                ("qos_algorithm_params".into(), Value::Struct(vec![])),
            ])],
        )?;
        Ok(vm)
    }

    pub(crate) fn start(&mut self, vm: &str) -> BenchResult<()> {
        self.invoke(vm::Start {
            vm: Ref::new(vm),
            start_paused: false,
            force: false,
        })
        .map(|_| ())
    }

    /// The pool's default SR and the direct-kernel-boot template.
    pub(crate) fn sr_and_template(&mut self) -> BenchResult<(Value, Value)> {
        let pool = match self.call("pool.get_all", &[])? {
            Value::Array(a) if !a.is_empty() => a[0].clone(),
            _ => return Err("no pool".into()),
        };
        let sr = self.call("pool.get_default_SR", &[pool])?;
        let tpl = match self.call("VM.get_by_name_label", &[Value::String(TEMPLATE.into())])? {
            Value::Array(a) if !a.is_empty() => a[0].clone(),
            _ => return Err(format!("no template {TEMPLATE:?}")),
        };
        Ok((sr, tpl))
    }

    /// Waits on the VM's serial console (HTTP CONNECT to its location, which
    /// first replays recent output) until the guest printed `pattern`.
    /// Returns the console connection, still open.
    pub(crate) fn console_wait(
        &mut self,
        port: u16,
        vm: &str,
        pattern: &str,
    ) -> BenchResult<TcpStream> {
        let Value::Array(cons) = self.call_on("VM.get_consoles", vm)? else {
            return Err("VM.get_consoles: not an array".into());
        };
        let mut location = None;
        for con in cons {
            if as_str(&self.call("console.get_protocol", &[con.clone()])?)? == "vt100" {
                location = Some(as_str(&self.call("console.get_location", &[con])?)?);
            }
        }
        let location = location.ok_or("the VM has no vt100 console")?;
        let path = &location[location.find("/console").ok_or("odd console location")?..];
        let mut sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        let sid = as_str(&self.s)?;
        write!(sock, "CONNECT {path}&session_id={sid} HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        read_until(&mut sock, HTTP_HEAD_END, Duration::from_secs(10))?;
        read_until(&mut sock, pattern, Duration::from_secs(300))?;
        Ok(sock)
    }
}

/// QEMU's pid and argv (argv[0] included) for a VM corrald runs.
pub(crate) fn qemu_of(run_root: &Path, uuid: &str) -> BenchResult<(i32, Vec<String>)> {
    let pid: i32 = std::fs::read_to_string(run_root.join(uuid).join("qemu.pid"))
        .map_err(|e| format!("{uuid}: qemu.pid: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("qemu.pid: {e}"))?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(|e| e.to_string())?;
    let argv = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Ok((pid, argv))
}

/// The by-hand baseline: corrald's exact QEMU command line with its run
/// directory swapped for `dir`, started and stopped without corrald.
pub(crate) struct ByHand {
    pub(crate) argv: Vec<String>,
    pub(crate) dir: PathBuf,
}

impl ByHand {
    /// A VM's QEMU command line (`argv`, run from `vm_dir`) moved to `dir`.
    pub(crate) fn replaying(argv: &[String], vm_dir: &Path, dir: &Path) -> ByHand {
        let (from, to) = (vm_dir.to_string_lossy(), dir.to_string_lossy());
        ByHand {
            argv: argv.iter().map(|a| a.replace(&*from, &to)).collect(),
            dir: dir.to_owned(),
        }
    }

    /// Runs QEMU (which daemonizes once initialised, as under corrald) and
    /// connects to its serial port; returns the time to QEMU running.
    pub(crate) fn start(&self) -> BenchResult<(f64, UnixStream)> {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        let t = Instant::now();
        let st = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if !st.success() {
            return Err("QEMU by hand failed to start".into());
        }
        let serial =
            UnixStream::connect(self.dir.join("serial.sock")).map_err(|e| e.to_string())?;
        serial
            .set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        Ok((ms, serial))
    }

    /// What an operator does to shut the guest down cleanly: ACPI power
    /// button over QMP, wait for the guest's SHUTDOWN, quit, QEMU gone.
    /// Returns the time taken and when it was over.
    fn clean_shutdown(&self) -> BenchResult<(f64, Instant)> {
        let pid: i32 = std::fs::read_to_string(self.dir.join("qemu.pid"))
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|e| format!("qemu.pid: {e}"))?;
        let t = Instant::now();
        let mut qmp = UnixStream::connect(self.dir.join("qmp.sock")).map_err(|e| e.to_string())?;
        qmp.set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        read_until(&mut qmp, "\"QMP\"", Duration::from_secs(10))?;
        qmp.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .map_err(|e| e.to_string())?;
        read_until(&mut qmp, "\"return\"", Duration::from_secs(10))?;
        qmp.write_all(b"{\"execute\":\"system_powerdown\"}\n")
            .map_err(|e| e.to_string())?;
        read_until(&mut qmp, "\"SHUTDOWN\"", Duration::from_secs(120))?;
        qmp.write_all(b"{\"execute\":\"quit\"}\n")
            .map_err(|e| e.to_string())?;
        wait_exit(pid, Duration::from_secs(30))?;
        let done = Instant::now();
        Ok((ms_between(t, done), done))
    }
}

fn ms_between(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1e3
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// A corrald on QEMU (TCG) that may boot the test guest (its kernel's
/// directory is a boot directory), ready: with its VMs' run directory and
/// a by-hand directory, whose QEMUs the returned reaper kills.
pub(crate) fn qemu_daemon(
    o: &Options,
    g: &Guest,
    state: &Path,
) -> BenchResult<(Daemon, PathBuf, PathBuf, QemuReaper)> {
    let boot_dir = Path::new(&g.kernel)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let d = Daemon::start_with(
        &o.corrald,
        state,
        &format!("accel = tcg\nhost-driver = qemu\nboot-dirs = {boot_dir}\n"),
    )?;
    d.wait_ready(None, Instant::now())?;
    let run_root = std::fs::canonicalize(state.join("vms")).map_err(|e| e.to_string())?;
    let hand_dir = state.join("by-hand");
    let reaper = QemuReaper(vec![
        run_root.to_string_lossy().into_owned(),
        hand_dir.to_string_lossy().into_owned(),
    ]);
    Ok((d, run_root, hand_dir, reaper))
}

pub(crate) fn vm_bench(o: &Options) -> BenchResult<()> {
    let g = guest()?;
    let n = o.vms.max(1);
    let state = std::env::temp_dir().join(format!("corral-bench-vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let (mut d, run_root, hand_dir, _reaper) = qemu_daemon(o, &g, &state)?;

    let mut c = Client::connect(d.port)?;
    let s = c.login()?;
    let mut api = Api { c: &mut c, s };
    let (sr, tpl) = api.sr_and_template()?;
    let mut vms = Vec::with_capacity(n);
    let mut uuids = Vec::with_capacity(n);
    for i in 0..n {
        let vm = api.make_vm(&tpl, &sr, &g, &format!("bench{i}"))?;
        uuids.push(as_str(&api.call_on("VM.get_uuid", &vm)?)?);
        vms.push(vm);
    }

    // Phase 1: one VM started and cleanly shut down through the API, then
    // its exact QEMU command line by hand; alternating, after a warm-up.
    let (mut api_start, mut api_stop, mut hand_start, mut hand_stop) =
        (vec![], vec![], vec![], vec![]);
    // From the guest's power-off to the shutdown being complete.
    let (mut api_tail, mut hand_tail) = (vec![], vec![]);
    for round in 0..=o.rounds {
        let t = Instant::now();
        api.start(&vms[0])?;
        let a_start = t.elapsed().as_secs_f64() * 1e3;
        let (_, argv) = qemu_of(&run_root, &uuids[0])?;
        let con = api.console_wait(d.port, &vms[0], READY)?;
        std::thread::sleep(Duration::from_millis(500));
        let off = when_seen(con, POWER_DOWN);
        let t = Instant::now();
        api.on_vm::<vm::CleanShutdown>(&vms[0])?;
        let done = Instant::now();
        let off = off
            .join()
            .ok()
            .flatten()
            .ok_or("the guest never powered off")?;
        let (a_stop, a_tail) = (ms_between(t, done), ms_between(off, done));

        let hand = ByHand::replaying(&argv, &run_root.join(&uuids[0]), &hand_dir);
        let (h_start, mut serial) = hand.start()?;
        read_until(&mut serial, READY, Duration::from_secs(120))?;
        std::thread::sleep(Duration::from_millis(500));
        let off = when_seen(serial, POWER_DOWN);
        let (h_stop, done) = hand.clean_shutdown()?;
        let off = off
            .join()
            .ok()
            .flatten()
            .ok_or("the guest never powered off")?;
        let h_tail = ms_between(off, done);
        if round > 0 {
            api_start.push(a_start);
            api_stop.push(a_stop);
            api_tail.push(a_tail);
            hand_start.push(h_start);
            hand_stop.push(h_stop);
            hand_tail.push(h_tail);
        }
    }

    // Phase 2: corrald's CPU and memory, idle with no VM running, then with
    // n running (started one after another, each timed).
    let cpu_of = |pid: i32| {
        let (c0, w0) = (cpu_seconds(pid), Instant::now());
        std::thread::sleep(CPU_WINDOW);
        100.0 * (cpu_seconds(pid) - c0) / w0.elapsed().as_secs_f64()
    };
    let dpid = d.pid() as i32;
    let idle_cpu = cpu_of(dpid);
    let idle_rss = rss_mib(d.pid());
    let mut starts = Vec::with_capacity(n);
    // One at a time, each booted before the next: 20 TCG guests booting at
    // once on two cores take minutes.
    for vm in &vms {
        let t = Instant::now();
        api.start(vm)?;
        starts.push(t.elapsed().as_secs_f64() * 1e3);
        api.console_wait(d.port, vm, READY)?;
    }
    std::thread::sleep(Duration::from_secs(5));
    let qemu_pids: Vec<i32> = uuids
        .iter()
        .map(|u| qemu_of(&run_root, u).map(|(p, _)| p))
        .collect::<BenchResult<_>>()?;
    let qemu_cpu0: f64 = qemu_pids.iter().map(|p| cpu_seconds(*p)).sum();
    let w0 = Instant::now();
    let busy_cpu = cpu_of(dpid);
    let qemu_cpu = 100.0 * (qemu_pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - qemu_cpu0)
        / w0.elapsed().as_secs_f64();
    let busy_rss = rss_mib(d.pid());
    let qemu_rss = qemu_pids.iter().map(|p| rss_mib(*p as u32)).sum::<f64>() / n as f64;

    // Phase 3: restarts with n running VMs (kill -9, and one SIGTERM), then
    // the same restarts with none running as the baseline.
    let last = vms[n - 1].clone();
    let restart = |d: &mut Daemon, signal: i32| -> BenchResult<f64> {
        d.stop(signal);
        let t = Instant::now();
        d.spawn()?;
        Ok(d.wait_ready(Some(&last), t)?.as_secs_f64() * 1e3)
    };
    let mut with_vms = Vec::new();
    for _ in 0..RESTARTS {
        with_vms.push(restart(&mut d, libc::SIGKILL)?);
    }
    let with_vms_term = restart(&mut d, libc::SIGTERM)?;
    drop(api);
    let mut c = Client::connect(d.port)?;
    let s = c.login()?;
    let mut api = Api { c: &mut c, s };
    for (vm, (uuid, pid)) in vms.iter().zip(uuids.iter().zip(&qemu_pids)) {
        let ps = as_str(&api.call_on("VM.get_power_state", vm)?)?;
        let (now, _) = qemu_of(&run_root, uuid)?;
        if ps != "Running" || now != *pid {
            return Err(format!(
                "{uuid} after the restarts: {ps}, QEMU {now} (was {pid})"
            ));
        }
    }
    // Still controllable: a pause/unpause round trip on the last one.
    api.on_vm::<vm::Pause>(&last)?;
    api.on_vm::<vm::Unpause>(&last)?;
    for vm in &vms {
        api.on_vm::<vm::HardShutdown>(vm)?;
    }
    drop(api);
    let mut without = Vec::new();
    for _ in 0..RESTARTS {
        without.push(restart(&mut d, libc::SIGKILL)?);
    }
    let leftover = qemus_under(&[run_root.to_string_lossy().into_owned()]);
    drop(d);
    let _ = std::fs::remove_dir_all(&state);
    if !leftover.is_empty() {
        return Err(format!("QEMUs left after hard_shutdown: {leftover:?}"));
    }

    let (a_start, h_start) = (median(&api_start), median(&hand_start));
    let (a_stop, h_stop) = (median(&api_stop), median(&hand_stop));
    let (a_tail, h_tail) = (median(&api_tail), median(&hand_tail));
    let (r_with, r_without) = (median(&with_vms), median(&without));
    report_header(&format!("VM benchmark ({n} VMs, {} rounds, TCG)", o.rounds));
    println!(
        "| VM.start through the API (median of {}) | {a_start:.1} ms | — |",
        o.rounds
    );
    println!("| baseline: the same QEMU command line by hand | {h_start:.1} ms | — |");
    println!(
        "| VM.start overhead | {:.1} ms (ratio {:.2}) | ≤ 100 ms |",
        a_start - h_start,
        a_start / h_start
    );
    println!("| VM.clean_shutdown through the API | {a_stop:.1} ms | — |");
    println!(
        "| baseline: system_powerdown, SHUTDOWN event, quit, exit by hand | {h_stop:.1} ms | — |"
    );
    println!(
        "| VM.clean_shutdown, from the guest's power-off to the call returning | {a_tail:.1} ms | — |"
    );
    println!("| baseline: by hand, from the guest's power-off to QEMU gone | {h_tail:.1} ms | — |");
    println!(
        "| VM.clean_shutdown overhead | {:.1} ms (ratio {:.2}) | ≤ 100 ms |",
        a_tail - h_tail,
        a_tail / h_tail
    );
    let mut sorted = starts.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "| VM.start of {n} VMs, each after the previous one booted | p50 {:.1} ms, max {:.1} ms | — |",
        percentile(&sorted, 0.5),
        percentile(&sorted, 1.0)
    );
    println!(
        "| corrald CPU, {n} VMs running ({} s) | {busy_cpu:.2} % of a core | — |",
        CPU_WINDOW.as_secs()
    );
    println!("| baseline: corrald CPU, no VM running | {idle_cpu:.2} % of a core | — |");
    println!("| for scale: the {n} QEMUs' CPU (idle TCG guests) | {qemu_cpu:.0} % of a core | — |");
    println!("| corrald RSS, {n} VMs running | {busy_rss:.0} MiB | — |");
    println!("| baseline: corrald RSS, no VM running | {idle_rss:.0} MiB | — |");
    println!("| for scale: RSS of one QEMU (mean) | {qemu_rss:.0} MiB | — |");
    println!(
        "| restart after kill -9 with {n} VMs running, until a VM is readable (median of {RESTARTS}) | {r_with:.0} ms | ≤ 1000 ms |"
    );
    println!("| restart after SIGTERM with {n} VMs running | {with_vms_term:.0} ms | — |");
    println!("| baseline: restart after kill -9, no VM running | {r_without:.0} ms | — |");
    println!(
        "| of which re-attaching to {n} VMs (difference) | {:.0} ms | — |",
        r_with - r_without
    );
    Ok(())
}
