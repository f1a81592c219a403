//! The networking benchmark, in a network namespace of its own (the
//! benchmark re-runs itself there): `VM.start` of one VM with four VIFs
//! against the same VM with none; `VIF.plug` into a running guest against
//! the raw QMP sequence (tap, `getfd`, `netdev_add`, `device_add`) on the
//! same guest's QEMU command line run by hand; and 1,000 internal networks
//! created and destroyed (time, corrald's RSS, `network.get_all_records`)
//! against a one-field write through the same path.

use super::vm::{Api, ByHand, READY, guest, median, qemu_daemon, qemu_of, read_until};
use super::*;
use corral_model::args::{vif, vm};
use corral_model::refs::{Ref, classes};
use corral_net::HostNetwork;

const NETNS_ENV: &str = "CORRAL_BENCH_NETNS";
const NETWORKS: usize = 1000;

fn sh(cmd: &str, args: &[&str]) -> BenchResult<()> {
    let st = Command::new(cmd)
        .args(args)
        .status()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{cmd} {args:?} failed"))
    }
}

/// Runs the benchmark again inside a fresh network namespace, which goes
/// afterwards with everything made in it.
fn in_own_netns() -> BenchResult<()> {
    let ns = format!("corral-bench-{}", std::process::id());
    sh("ip", &["netns", "add", &ns])?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let st = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        .args(std::env::args().skip(1))
        .env(NETNS_ENV, &ns)
        .status();
    let _ = sh("ip", &["netns", "del", &ns]);
    match st {
        Ok(s) if s.success() => Ok(()),
        Ok(_) => Err("the benchmark failed in its namespace".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A directory removed when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn network_record(name: &str) -> Value {
    Value::Struct(vec![
        ("name_label".into(), Value::String(name.into())),
        ("name_description".into(), Value::String(String::new())),
        ("MTU".into(), Value::String("1500".into())),
        ("other_config".into(), Value::Struct(vec![])),
    ])
}

fn vif_record(vm: &str, network: &str, device: u32) -> Value {
    Value::Struct(vec![
        ("device".into(), Value::String(device.to_string())),
        ("network".into(), Value::String(network.into())),
        ("VM".into(), Value::String(vm.into())),
        ("MAC".into(), Value::String(String::new())),
        ("MTU".into(), Value::String("1500".into())),
        ("other_config".into(), Value::Struct(vec![])),
        ("qos_algorithm_type".into(), Value::String(String::new())),
        ("qos_algorithm_params".into(), Value::Struct(vec![])),
    ])
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub(crate) fn net_bench(o: &Options) -> BenchResult<()> {
    if std::env::var_os(NETNS_ENV).is_none() {
        return in_own_netns();
    }
    sh("ip", &["link", "set", "lo", "up"])?;
    let g = guest()?;
    let state = std::env::temp_dir().join(format!("corral-bench-net-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    // Dropped after the daemon (declared before it): the state goes too.
    let _cleanup = RemoveOnDrop(state.clone());
    let (d, run_root, hand_dir, _reaper) = qemu_daemon(o, &g, &state)?;
    let mut c = Client::connect(d.port)?;
    let s = c.login()?;
    let mut api = Api { c: &mut c, s };
    let (sr, tpl) = api.sr_and_template()?;
    let net = as_str(&api.call("network.create", &[network_record("bench")])?)?;
    report_header("Networking (corral-bench net)");

    // 1. VM.start with four VIFs against the same VM with none, alternating.
    let vm = api.make_vm(&tpl, &sr, &g, "starter")?;
    let (mut none, mut four) = (vec![], vec![]);
    for round in 0..=o.rounds {
        for with in [false, true] {
            let mut vifs = vec![];
            if with {
                for dev in 0..4 {
                    vifs.push(as_str(
                        &api.call("VIF.create", &[vif_record(&vm, &net, dev)])?,
                    )?);
                }
            }
            let t = Instant::now();
            api.start(&vm)?;
            let took = ms(t);
            api.on_vm::<vm::HardShutdown>(&vm)?;
            for v in vifs {
                api.call("VIF.destroy", &[Value::String(v)])?;
            }
            // Round 0 warms up (page cache, the first bridge).
            if round > 0 {
                if with {
                    four.push(took)
                } else {
                    none.push(took)
                }
            }
        }
    }
    let (m0, m4) = (median(&none), median(&four));
    println!(
        "| VM.start, no VIFs (baseline, same VM) | median {m0:.1} ms ({} rounds) | — |",
        none.len()
    );
    println!("| VM.start, 4 VIFs | median {m4:.1} ms | — |");
    println!(
        "| network set-up per VIF | {:.1} ms | ≤ 10 ms |",
        (m4 - m0) / 4.0
    );

    // 2. VIF.plug into a running guest, then the raw QMP sequence on the
    // same QEMU command line run by hand.
    let plugs = (o.rounds * 4).max(8);
    let vm = api.make_vm(&tpl, &sr, &g, "plugger")?;
    api.start(&vm)?;
    let _console = api.console_wait(d.port, &vm, READY)?;
    let vif = as_str(&api.call("VIF.create", &[vif_record(&vm, &net, 1)])?)?;
    let mut api_plug = vec![];
    for _ in 0..plugs {
        let t = Instant::now();
        api.invoke(vif::Plug {
            self_: Ref::<classes::VIF>::new(&vif),
        })?;
        api_plug.push(ms(t));
        api.invoke(vif::Unplug {
            self_: Ref::<classes::VIF>::new(&vif),
        })?;
    }
    let uuid = as_str(&api.call_on("VM.get_uuid", &vm)?)?;
    let (_, argv) = qemu_of(&run_root, &uuid)?;
    api.on_vm::<vm::HardShutdown>(&vm)?;
    let hand = ByHand::replaying(&argv, &run_root.join(&uuid), &hand_dir);
    let (_, mut serial) = hand.start()?;
    read_until(&mut serial, READY, Duration::from_secs(300))?;
    let raw_plug = raw_plugs(&hand_dir, plugs)?;
    println!(
        "| VIF.plug into a running guest | {} ({plugs} plugs) | — |",
        ms_stats(api_plug.clone())
    );
    println!(
        "| raw QMP: tap + getfd + netdev_add + device_add (baseline, same QEMU command line) | {} | — |",
        ms_stats(raw_plug.clone())
    );
    println!(
        "| VIF.plug / raw, medians | {:.2} | — |",
        median(&api_plug) / median(&raw_plug)
    );

    // 3. 1,000 internal networks, against as many one-field writes.
    let rss0 = rss_mib(d.pid());
    let t = Instant::now();
    for _ in 0..NETWORKS {
        api.call(
            "network.set_name_description",
            &[Value::String(net.clone()), Value::String("x".into())],
        )?;
    }
    let write = ms(t) / NETWORKS as f64;
    let t = Instant::now();
    let mut made = Vec::with_capacity(NETWORKS);
    for i in 0..NETWORKS {
        made.push(as_str(
            &api.call("network.create", &[network_record(&format!("n{i}"))])?,
        )?);
    }
    let create = ms(t);
    let rss1 = rss_mib(d.pid());
    let mut gar = vec![];
    for _ in 0..o.rounds.max(3) {
        let t = Instant::now();
        api.call("network.get_all_records", &[])?;
        gar.push(ms(t));
    }
    let t = Instant::now();
    for n in made {
        api.call("network.destroy", &[Value::String(n)])?;
    }
    let destroy = ms(t);
    println!("| network.set_name_description (baseline) | {write:.2} ms each | — |");
    println!(
        "| {NETWORKS} network.create | {create:.0} ms ({:.2} ms each, {:.1}× the baseline write) | — |",
        create / NETWORKS as f64,
        create / NETWORKS as f64 / write
    );
    println!(
        "| {NETWORKS} network.destroy | {destroy:.0} ms ({:.2} ms each) | — |",
        destroy / NETWORKS as f64
    );
    println!("| corrald RSS with {NETWORKS} more networks | {rss0:.1} → {rss1:.1} MiB | — |");
    println!(
        "| network.get_all_records with {} networks | median {:.1} ms | — |",
        NETWORKS + 1,
        median(&gar)
    );
    Ok(())
}

/// The raw hot-plug, timed from opening the tap to `device_add`'s
/// reply; each NIC is unplugged again (`device_del`, the guest's
/// `DEVICE_DELETED`, `netdev_del`) outside the timing.
fn raw_plugs(dir: &Path, n: usize) -> BenchResult<Vec<f64>> {
    use std::os::fd::AsFd;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let net = corral_net::linux::LinuxNetwork::new();
        net.ensure_bridge("benchbr0", 1500)
            .await
            .map_err(|e| e.to_string())?;
        let (qmp, mut events) = corral_agent::qmp::Qmp::connect(&dir.join("qmp.sock"))
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            let tap = net
                .open_tap(&format!("bnch{i}"), "benchbr0", 1500)
                .await
                .map_err(|e| e.to_string())?;
            qmp.execute_with_fd("getfd", serde_json::json!({"fdname": "tapfd"}), tap.as_fd())
                .await
                .map_err(|e| e.to_string())?;
            qmp.execute(
                "netdev_add",
                serde_json::json!({"type": "tap", "id": "raw1", "fd": "tapfd"}),
            )
            .await
            .map_err(|e| e.to_string())?;
            qmp.execute(
                "device_add",
                serde_json::json!({"driver": "virtio-net-pci", "id": "rawnic1", "netdev": "raw1",
                                   "mac": "02:00:00:be:0c:01"}),
            )
            .await
            .map_err(|e| e.to_string())?;
            out.push(ms(t));
            drop(tap);
            qmp.execute("device_del", serde_json::json!({"id": "rawnic1"}))
                .await
                .map_err(|e| e.to_string())?;
            let deleted = async {
                while let Some(ev) = events.recv().await {
                    if ev.name == "DEVICE_DELETED"
                        && ev.data.get("device").and_then(|d| d.as_str()) == Some("rawnic1")
                    {
                        return true;
                    }
                }
                false
            };
            match tokio::time::timeout(Duration::from_secs(30), deleted).await {
                Ok(true) => {}
                _ => return Err("the guest never released the raw NIC".to_string()),
            }
            qmp.execute("netdev_del", serde_json::json!({"id": "raw1"}))
                .await
                .map_err(|e| e.to_string())?;
        }
        let _ = qmp.execute("quit", serde_json::Value::Null).await;
        Ok(out)
    })
}
