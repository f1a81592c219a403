//! The group-commit benchmark: fsync'd writes (`VM.set_name_description`,
//! one commit each) from one client and from eight at once, on this
//! corrald and on a baseline corrald (`--baseline-corrald`, e.g. the build
//! before group commit), all in the same run on the same machine.

use super::*;

struct Rates {
    one: f64,
    eight: f64,
}

fn measure(binary: &Path, o: &Options, tag: &str) -> BenchResult<Rates> {
    let state =
        std::env::temp_dir().join(format!("corral-bench-commit-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let d = Daemon::start(binary, &state)?;
    d.wait_ready(None, Instant::now())?;
    let mut c = Client::connect(d.port)?;
    let s = c.login()?;
    let template = bios_template(&mut c, &s)?;
    // One VM per client, so writers never touch the same record.
    let mut vms = Vec::new();
    for i in 0..8 {
        let r = c.call(
            "VM.clone",
            &[
                s.clone(),
                Value::String(template.clone()),
                Value::String(format!("w{i}")),
            ],
        )?;
        vms.push(as_str(&r)?);
    }
    let vms = Arc::new(vms);
    let rate = |clients: usize| {
        let vms = vms.clone();
        api::throughput(
            d.port,
            clients,
            o.seconds,
            Arc::new(move |id, i, s| {
                xmlrpc::call(
                    "VM.set_name_description",
                    &[
                        s.clone(),
                        Value::String(vms[id % vms.len()].clone()),
                        Value::String(format!("write {i}")),
                    ],
                )
            }),
        )
    };
    let one = rate(1)?;
    let eight = rate(8)?;
    drop(d);
    let _ = std::fs::remove_dir_all(&state);
    Ok(Rates { one, eight })
}

pub(crate) fn commit_bench(o: &Options) -> BenchResult<()> {
    let mut runs = vec![("this build", o.corrald.clone())];
    if let Some(b) = &o.baseline {
        runs.push(("baseline", b.clone()));
    }
    report_header("Group commit (corral-bench commit)");
    for (name, bin) in runs {
        let r = measure(&bin, o, name)?;
        println!(
            "| {name}: fsync'd writes, 1 client | {:.0} writes/s | — |",
            r.one
        );
        println!(
            "| {name}: fsync'd writes, 8 clients | {:.0} writes/s | — |",
            r.eight
        );
        println!(
            "| {name}: 8 clients / 1 client | {:.2} | ≥ 3 |",
            r.eight / r.one
        );
    }
    Ok(())
}
