//! VLANs and bonds on one host whose network is the simulator: the build
//! machines' kernel has neither 802.1Q devices nor the bonding driver, so
//! the records, the checks and the devices Corral asks for are proven
//! here; tests/python/test_network.py drives the real kernel where it
//! has them (and says that it skipped otherwise).

use corral_agent::sim::SimAgent;
use corral_model::{ApiError, Value, field};
use corral_net::HostNetwork;
use corral_net::sim::SimNetwork;
use corral_server::context::Server;
mod common;
use common::caller;
use std::path::PathBuf;
use std::sync::Arc;

struct Host {
    dir: PathBuf,
    server: Arc<Server>,
    net: Arc<SimNetwork>,
    session: String,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Host {
    /// A host with three NICs, scanned.
    async fn new() -> Host {
        let dir = std::env::temp_dir().join(format!("corral-vlan-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("test directory");
        let net = Arc::new(SimNetwork::new());
        for (i, nic) in ["eth0", "eth1", "eth2"].iter().enumerate() {
            net.add_nic(nic, &format!("02:00:00:00:00:0{i}"));
        }
        let agent = Arc::new(SimAgent::new(dir.join("sim-vms")));
        let (_, server) = common::sim_master(dir.clone(), agent, net.clone());
        let session = common::login_root(&server).await;
        let host = server.host_ref.clone();
        let h = Host {
            dir,
            server,
            net,
            session,
        };
        h.call("PIF.scan", vec![Value::str(&host)])
            .await
            .expect("scan");
        h
    }

    async fn call(&self, method: &str, args: Vec<Value>) -> Result<Value, ApiError> {
        let mut params = vec![Value::str(&self.session)];
        params.extend(args);
        self.server.call(method, params, &caller()).await
    }

    async fn ok(&self, method: &str, args: Vec<Value>) -> String {
        self.call(method, args)
            .await
            .unwrap_or_else(|e| panic!("{method}: {e:?}"))
            .db_string()
    }

    /// The error code and parameters of a call that must fail.
    async fn refused(&self, method: &str, args: Vec<Value>) -> Vec<String> {
        match self.call(method, args).await {
            Ok(v) => panic!("{method} succeeded: {v:?}"),
            Err(e) => std::iter::once(e.code.clone())
                .chain(e.params.clone())
                .collect(),
        }
    }

    fn pif(&self, device: &str) -> String {
        let st = self.server.db.read();
        st.refs(corral_model::class::PIF)
            .find(|p| {
                st.get_str(field::pif::DEVICE, p).as_deref() == Some(device)
                    && st.get(field::pif::VLAN, p).and_then(|v| v.as_int()) == Some(-1)
            })
            .cloned()
            .unwrap_or_else(|| panic!("no PIF {device}"))
    }

    fn get(&self, f: corral_model::FieldId, r: &str) -> Value {
        self.server.db.read().get(f, r).unwrap_or(Value::Nil)
    }

    async fn network(&self, name: &str) -> String {
        let rec = Value::Struct(vec![
            ("name_label".into(), Value::str(name)),
            ("name_description".into(), Value::str("")),
            ("MTU".into(), Value::Int(1500)),
            ("other_config".into(), Value::Struct(vec![])),
        ]);
        self.ok("network.create", vec![rec]).await
    }

    /// The device's bridge (or bond) in the simulated kernel.
    async fn controller(&self, device: &str) -> Option<Option<String>> {
        let links = self.net.links().await.expect("links");
        links
            .into_iter()
            .find(|l| l.name == device)
            .map(|l| l.controller)
    }

    fn count(&self, c: corral_model::ClassId) -> usize {
        self.server.db.read().refs(c).count()
    }
}

#[tokio::test]
async fn vlans_have_xapis_checks_records_and_devices() {
    let h = Host::new().await;
    let eth0 = h.pif("eth0");
    let v5 = h.network("vlan5").await;
    let (pifs, vlans) = (
        h.count(corral_model::class::PIF),
        h.count(corral_model::class::VLAN),
    );
    for bad in [-1, 4095, 5000] {
        assert_eq!(
            h.refused(
                "VLAN.create",
                vec![Value::str(&eth0), Value::Int(bad), Value::str(&v5)]
            )
            .await,
            ["VLAN_TAG_INVALID", &bad.to_string()]
        );
    }
    assert_eq!(
        h.count(corral_model::class::PIF),
        pifs,
        "a refused VLAN leaves no PIF"
    );
    let vlan = h
        .ok(
            "VLAN.create",
            vec![Value::str(&eth0), Value::Int(5), Value::str(&v5)],
        )
        .await;
    let untagged = h.get(field::vlan::UNTAGGED_PIF, &vlan).db_string();
    assert_eq!(h.get(field::vlan::TAGGED_PIF, &vlan).db_string(), eth0);
    assert_eq!(h.get(field::vlan::TAG, &vlan).as_int(), Some(5));
    assert_eq!(h.get(field::pif::VLAN, &untagged).as_int(), Some(5));
    assert_eq!(h.get(field::pif::DEVICE, &untagged).db_string(), "eth0");
    assert_eq!(
        h.get(field::pif::PHYSICAL, &untagged).as_bool(),
        Some(false)
    );
    assert_eq!(h.get(field::pif::NETWORK, &untagged).db_string(), v5);
    assert_eq!(
        h.get(field::pif::CURRENTLY_ATTACHED, &untagged).as_bool(),
        Some(true)
    );
    assert_eq!(
        h.get(field::pif::VLAN_MASTER_OF, &untagged).db_string(),
        vlan
    );
    assert_eq!(
        h.get(field::pif::MAC, &untagged).db_string(),
        "fe:ff:ff:ff:ff:ff"
    );
    let bridge = h.get(field::network::BRIDGE, &v5).db_string();
    assert_eq!(h.controller("eth0.5").await, Some(Some(bridge.clone())));
    assert_eq!(h.count(corral_model::class::VLAN), vlans + 1);
    // The same network again, the same tag on another network, a VLAN on
    // a VLAN: each refused as XAPI refuses it.
    assert_eq!(
        h.refused(
            "VLAN.create",
            vec![Value::str(&eth0), Value::Int(6), Value::str(&v5)]
        )
        .await,
        ["NETWORK_ALREADY_CONNECTED", &v5, &untagged]
    );
    let other = h.network("other").await;
    assert_eq!(
        h.refused(
            "VLAN.create",
            vec![Value::str(&eth0), Value::Int(5), Value::str(&other)]
        )
        .await,
        ["PIF_VLAN_EXISTS", "eth0"]
    );
    assert_eq!(
        h.refused(
            "VLAN.create",
            vec![Value::str(&untagged), Value::Int(7), Value::str(&other)]
        )
        .await,
        ["PIF_IS_VLAN", &untagged]
    );
    // A network with a VLAN PIF cannot go; the VLAN can, with its device.
    assert_eq!(
        h.refused("network.destroy", vec![Value::str(&v5)]).await[0],
        "NETWORK_CONTAINS_PIF"
    );
    h.ok("PIF.destroy", vec![Value::str(&untagged)]).await;
    assert_eq!(h.count(corral_model::class::VLAN), vlans);
    assert_eq!(h.count(corral_model::class::PIF), pifs);
    assert_eq!(h.controller("eth0.5").await, None, "the VLAN device went");
    // pool.create_VLAN_from_PIF: one PIF per host on the PIF's network.
    let made = h
        .call(
            "pool.create_VLAN_from_PIF",
            vec![Value::str(h.pif("eth1")), Value::str(&other), Value::Int(7)],
        )
        .await
        .expect("pool VLAN");
    let made = made.as_array().expect("PIF refs").to_vec();
    assert_eq!(made.len(), 1);
    let p = made[0].db_string();
    assert_eq!(h.get(field::pif::VLAN, &p).as_int(), Some(7));
    let vlan7 = h.get(field::pif::VLAN_MASTER_OF, &p).db_string();
    h.ok("VLAN.destroy", vec![Value::str(&vlan7)]).await;
    assert_eq!(h.controller("eth1.7").await, None);
    assert_eq!(h.count(corral_model::class::VLAN), vlans);
}

#[tokio::test]
async fn bonds_move_the_ip_configuration_and_free_their_members_again() {
    let h = Host::new().await;
    let (eth1, eth2) = (h.pif("eth1"), h.pif("eth2"));
    for p in [&eth1, &eth2] {
        h.ok("PIF.plug", vec![Value::str(p)]).await;
    }
    h.ok(
        "PIF.reconfigure_ip",
        ["Static", "198.18.20.1", "255.255.255.0", "", ""]
            .iter()
            .fold(vec![Value::str(&eth1)], |mut v, a| {
                v.push(Value::str(*a));
                v
            }),
    )
    .await;
    let bnet = h.network("bond").await;
    let set = |m: &[&String]| Value::Array(m.iter().map(|p| Value::str(p.as_str())).collect());
    let create = |members: Value, mac: &str| {
        vec![
            Value::str(&bnet),
            members,
            Value::str(mac),
            Value::str("active-backup"),
            Value::Struct(vec![]),
        ]
    };
    assert_eq!(
        h.refused("Bond.create", create(set(&[&eth1]), "")).await,
        ["PIF_BOND_NEEDS_MORE_MEMBERS"]
    );
    assert_eq!(
        h.refused("Bond.create", create(set(&[&eth1, &eth2]), "02:00:zz"))
            .await,
        ["MAC_INVALID", "02:00:zz"]
    );
    // A PIF of another host cannot join.
    let b = common::add_host_b(&h.server.db);
    let b_pif = "OpaqueRef:b-eth1".to_string();
    let b_net = h.get(field::pif::NETWORK, &eth1).db_string();
    h.server
        .db
        .write(|t| {
            t.create(
                corral_model::class::PIF,
                &b_pif,
                vec![
                    (field::pif::DEVICE.index, Value::str("eth1")),
                    (field::pif::HOST.index, Value::str(&b)),
                    (field::pif::NETWORK.index, Value::str(&b_net)),
                    (field::pif::MAC.index, Value::str("02:00:00:00:0b:01")),
                    (field::pif::VLAN.index, Value::Int(-1)),
                ],
            )
        })
        .expect("B's PIF");
    assert_eq!(
        h.refused("Bond.create", create(set(&[&eth1, &b_pif]), ""))
            .await,
        ["PIF_CANNOT_BOND_CROSS_HOST"]
    );
    assert_eq!(h.count(corral_model::class::BOND), 0, "nothing made");
    let bond = h.ok("Bond.create", create(set(&[&eth1, &eth2]), "")).await;
    let master = h.get(field::bond::MASTER, &bond).db_string();
    assert_eq!(h.get(field::pif::DEVICE, &master).db_string(), "bond0");
    assert_eq!(
        h.get(field::pif::MAC, &master).db_string(),
        "02:00:00:00:00:01"
    );
    assert_eq!(h.get(field::bond::PRIMARY_SLAVE, &bond).db_string(), eth1);
    assert_eq!(h.get(field::bond::MODE, &bond).db_string(), "active-backup");
    // The primary member's address is the master's now.
    assert_eq!(h.get(field::pif::IP, &master).db_string(), "198.18.20.1");
    assert_eq!(
        h.get(field::pif::IP_CONFIGURATION_MODE, &eth1).db_string(),
        "None"
    );
    for m in [&eth1, &eth2] {
        assert_eq!(h.get(field::pif::BOND_SLAVE_OF, m).db_string(), bond);
        assert_eq!(
            h.get(field::pif::CURRENTLY_ATTACHED, m).as_bool(),
            Some(false)
        );
        assert_eq!(
            h.controller(&h.get(field::pif::DEVICE, m).db_string())
                .await,
            Some(Some("bond0".into()))
        );
    }
    let bridge = h.get(field::network::BRIDGE, &bnet).db_string();
    assert_eq!(h.controller("bond0").await, Some(Some(bridge)));
    assert_eq!(
        h.refused("PIF.plug", vec![Value::str(&eth1)]).await,
        ["CANNOT_PLUG_BOND_SLAVE", &eth1]
    );
    let again = h.network("again").await;
    assert_eq!(
        h.refused(
            "Bond.create",
            vec![
                Value::str(&again),
                set(&[&eth1, &eth2]),
                Value::str(""),
                Value::str("lacp"),
                Value::Struct(vec![])
            ]
        )
        .await,
        ["PIF_ALREADY_BONDED", &eth1]
    );
    assert_eq!(
        h.refused(
            "VLAN.create",
            vec![Value::str(&eth2), Value::Int(9), Value::str(&again)]
        )
        .await,
        ["CANNOT_ADD_VLAN_TO_BOND_SLAVE", &eth2]
    );
    h.ok("Bond.set_mode", vec![Value::str(&bond), Value::str("lacp")])
        .await;
    assert_eq!(h.get(field::bond::MODE, &bond).db_string(), "lacp");
    // Gone: the device, the records; eth1 has its address back, and the
    // members are on their own bridges again.
    h.ok("Bond.destroy", vec![Value::str(&bond)]).await;
    assert_eq!(h.controller("bond0").await, None);
    assert_eq!(h.count(corral_model::class::BOND), 0);
    assert_eq!(h.get(field::pif::IP, &eth1).db_string(), "198.18.20.1");
    assert_eq!(
        h.get(field::pif::BOND_SLAVE_OF, &eth1).db_string(),
        "OpaqueRef:NULL"
    );
    assert_eq!(h.controller("eth1").await, Some(Some("xenbr1".into())));
    assert_eq!(h.controller("eth2").await, Some(Some("xenbr2".into())));
    assert!(!h.server.db.read().exists(corral_model::class::PIF, &master));
}
