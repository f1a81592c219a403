//! The hardening benchmark (issue 11): login rate and `VM.get_record` rate
//! of this corrald and of a baseline corrald (`--baseline-corrald`, e.g. a
//! build of the commit before the hardening), measured in the same run on
//! the same machine, each against its own trivial-handler rate.

use super::*;

struct Rates {
    get_record: f64,
    trivial: f64,
    login: f64,
}

fn measure(binary: &Path, o: &Options, tag: &str) -> BenchResult<Rates> {
    let state = std::env::temp_dir().join(format!("corral-bench-sec-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let d = Daemon::start(binary, &state)?;
    d.wait_ready(None, Instant::now())?;
    let port = d.port;
    let mut c = Client::connect(port)?;
    let s = c.login()?;
    let template = bios_template(&mut c, &s)?;
    let mut vms = Vec::with_capacity(o.vms);
    for i in 0..o.vms {
        let r = c.call(
            "VM.clone",
            &[
                s.clone(),
                Value::String(template.clone()),
                Value::String(format!("b-{i}")),
            ],
        )?;
        vms.push(as_str(&r)?);
    }
    let vms = Arc::new(vms);
    let get_record = {
        let vms = vms.clone();
        api::throughput(
            port,
            o.clients,
            o.seconds,
            Arc::new(move |id, i, s| {
                let k = (id as u64 * 7919 + i * 104_729) as usize % vms.len();
                xmlrpc::call("VM.get_record", &[s.clone(), Value::String(vms[k].clone())])
            }),
        )?
    };
    let trivial = api::throughput(
        port,
        o.clients,
        o.seconds,
        Arc::new(|_, _, s| xmlrpc::call("pool.get_all", std::slice::from_ref(s))),
    )?;
    let login = api::throughput(
        port,
        o.clients,
        o.seconds,
        Arc::new(|_, _, _| {
            xmlrpc::call(
                "session.login_with_password",
                &[Value::String("root".into()), Value::String(PASSWORD.into())],
            )
        }),
    )?;
    drop(d);
    let _ = std::fs::remove_dir_all(&state);
    Ok(Rates {
        get_record,
        trivial,
        login,
    })
}

pub(crate) fn security_bench(o: &Options) -> BenchResult<()> {
    let baseline = o
        .baseline
        .clone()
        .ok_or("security needs --baseline-corrald PATH (a corrald from before the hardening)")?;
    // Interleaved rounds, so drift of the machine hits both alike.
    let mut before = Vec::new();
    let mut after = Vec::new();
    for r in 0..o.rounds {
        before.push(measure(&baseline, o, &format!("b{r}"))?);
        after.push(measure(&o.corrald, o, &format!("a{r}"))?);
    }
    let median = |v: &[Rates], f: fn(&Rates) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    println!(
        "### Hardening benchmark ({} VMs, {} clients, {} s per phase, median of {} interleaved rounds)\n",
        o.vms, o.clients, o.seconds, o.rounds
    );
    println!("Machine: {}; date: {}\n", machine(), date_utc());
    println!("| measurement | before | after | after / before |");
    println!("|---|---|---|---|");
    for (name, f) in [
        (
            "VM.get_record, calls/s",
            (|r: &Rates| r.get_record) as fn(&Rates) -> f64,
        ),
        ("baseline: pool.get_all, calls/s", |r: &Rates| r.trivial),
        ("get_record / pool.get_all", |r: &Rates| {
            r.get_record / r.trivial
        }),
        ("session.login_with_password, logins/s", |r: &Rates| r.login),
    ] {
        let (b, a) = (median(&before, f), median(&after, f));
        println!("| {name} | {b:.2} | {a:.2} | {:.2} |", a / b);
    }
    Ok(())
}
