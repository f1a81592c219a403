//! The host network in memory: the same rules as the kernel's (a tap needs
//! its bridge, names are unique), for in-process tests and the `sim` agent.

use crate::filter::PortPolicy;
use crate::{HostNetwork, Ipv4Cidr, Link, NetError, NetFut, NicFacts};
use std::os::fd::OwnedFd;
use std::sync::Mutex;

#[derive(Default)]
pub struct SimNetwork {
    links: Mutex<Vec<Link>>,
    addresses: Mutex<Vec<(String, Ipv4Cidr)>>,
    addresses6: Mutex<Vec<(String, crate::Ipv6Cidr)>>,
    policies: Mutex<std::collections::BTreeMap<String, PortPolicy>>,
}

impl SimNetwork {
    pub fn new() -> SimNetwork {
        SimNetwork::default()
    }

    /// A NIC the host starts with (tests add `eth0`, …).
    pub fn add_nic(&self, name: &str, mac: &str) {
        self.add_link(name, "", mac, 1500, None);
    }

    /// A device the simulated kernel now has (up, Ethernet).
    fn add_link(
        &self,
        name: impl Into<String>,
        kind: impl Into<String>,
        mac: impl Into<String>,
        mtu: u32,
        controller: Option<String>,
    ) {
        self.add(Link {
            name: name.into(),
            index: 0,
            kind: kind.into(),
            mac: mac.into(),
            mtu,
            up: true,
            controller,
            ether: true,
        });
    }

    fn add(&self, mut link: Link) {
        if let Ok(mut l) = self.links.lock() {
            link.index = l.iter().map(|x| x.index).max().unwrap_or(0) + 1;
            l.push(link);
        }
    }

    fn find(&self, name: &str) -> Option<Link> {
        self.links
            .lock()
            .ok()
            .and_then(|l| l.iter().find(|x| x.name == name).cloned())
    }
}

impl HostNetwork for SimNetwork {
    fn ensure_bridge(&self, name: &str, mtu: u32) -> NetFut<'_, ()> {
        let name = name.to_owned();
        Box::pin(async move {
            match self.find(&name) {
                Some(_) => {
                    if let Ok(mut l) = self.links.lock() {
                        for x in l.iter_mut().filter(|x| x.name == name) {
                            x.mtu = mtu;
                            x.up = true;
                        }
                    }
                }
                None => self.add_link(name, "bridge", "", mtu, None),
            }
            Ok(())
        })
    }

    fn remove_link(&self, name: &str) -> NetFut<'_, ()> {
        let name = name.to_owned();
        Box::pin(async move {
            if let Ok(mut l) = self.links.lock() {
                l.retain(|x| x.name != name);
                for x in l.iter_mut() {
                    if x.controller.as_deref() == Some(name.as_str()) {
                        x.controller = None;
                    }
                }
            }
            Ok(())
        })
    }

    fn open_tap(&self, name: &str, bridge: &str, mtu: u32) -> NetFut<'_, OwnedFd> {
        let (name, bridge) = (name.to_owned(), bridge.to_owned());
        Box::pin(async move {
            if self.find(&bridge).is_none() {
                return Err(NetError::NoDevice(bridge));
            }
            if self.find(&name).is_some() {
                return Err(NetError::Netlink(format!("{name} exists")));
            }
            self.add_link(
                name.clone(),
                "tun",
                crate::mac::format_mac(crate::TAP_MAC),
                mtu,
                Some(bridge),
            );
            // A descriptor that stands for the tap: /dev/null.
            std::fs::File::open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|e| NetError::Io(name, e))
        })
    }

    fn set_ipv6(&self, device: &str, addresses: Vec<crate::Ipv6Cidr>) -> NetFut<'_, ()> {
        let device = device.to_owned();
        Box::pin(async move {
            if self.find(&device).is_none() {
                return Err(NetError::NoDevice(device));
            }
            if let Ok(mut a) = self.addresses6.lock() {
                a.retain(|(d, _)| *d != device);
                a.extend(addresses.into_iter().map(|x| (device.clone(), x)));
            }
            Ok(())
        })
    }

    fn ensure_vlan(&self, name: &str, base: &str, _tag: u16, mtu: u32) -> NetFut<'_, ()> {
        let (name, base) = (name.to_owned(), base.to_owned());
        Box::pin(async move {
            if self.find(&base).is_none() {
                return Err(NetError::NoDevice(base));
            }
            if self.find(&name).is_none() {
                self.add_link(name, "vlan", "", mtu, None);
            }
            Ok(())
        })
    }

    fn ensure_bond(
        &self,
        name: &str,
        members: Vec<String>,
        spec: crate::BondSpec,
    ) -> NetFut<'_, ()> {
        let name = name.to_owned();
        Box::pin(async move {
            for m in &members {
                if self.find(m).is_none() {
                    return Err(NetError::NoDevice(m.clone()));
                }
            }
            if self.find(&name).is_none() {
                self.add_link(
                    name.clone(),
                    "bond",
                    crate::mac::format_mac(spec.mac),
                    spec.mtu,
                    None,
                );
            }
            if let Ok(mut l) = self.links.lock() {
                for x in l.iter_mut().filter(|x| members.contains(&x.name)) {
                    x.controller = Some(name.clone());
                    x.up = true;
                }
            }
            Ok(())
        })
    }

    fn link_rates(&self, _device: &str) -> Option<crate::LinkRates> {
        None
    }

    fn set_port_policy(&self, tap: &str, policy: Option<PortPolicy>) -> NetFut<'_, ()> {
        let tap = tap.to_owned();
        Box::pin(async move {
            if !crate::filter::nameable(&tap) {
                return Err(NetError::Filter(format!("{tap:?} cannot name a chain")));
            }
            if let Ok(mut p) = self.policies.lock() {
                match policy {
                    Some(pol) if !pol.is_open() => {
                        p.insert(tap, pol);
                    }
                    _ => {
                        p.remove(&tap);
                    }
                }
            }
            Ok(())
        })
    }

    fn port_policies(&self) -> NetFut<'_, Vec<String>> {
        Box::pin(async move {
            Ok(self
                .policies
                .lock()
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default())
        })
    }

    fn links(&self) -> NetFut<'_, Vec<Link>> {
        Box::pin(async move { Ok(self.links.lock().map(|l| l.clone()).unwrap_or_default()) })
    }

    fn set_controller(&self, device: &str, bridge: Option<&str>) -> NetFut<'_, ()> {
        let (device, bridge) = (device.to_owned(), bridge.map(str::to_owned));
        Box::pin(async move {
            if let Some(b) = &bridge {
                if self.find(b).is_none() {
                    return Err(NetError::NoDevice(b.clone()));
                }
            }
            let mut l = self
                .links
                .lock()
                .map_err(|_| NetError::Netlink("poisoned".into()))?;
            let link = l
                .iter_mut()
                .find(|x| x.name == device)
                .ok_or(NetError::NoDevice(device))?;
            link.up |= bridge.is_some();
            link.controller = bridge;
            Ok(())
        })
    }

    fn set_ipv4(&self, device: &str, addresses: Vec<Ipv4Cidr>) -> NetFut<'_, ()> {
        let device = device.to_owned();
        Box::pin(async move {
            if self.find(&device).is_none() {
                return Err(NetError::NoDevice(device));
            }
            if let Ok(mut a) = self.addresses.lock() {
                a.retain(|(d, _)| *d != device);
                a.extend(addresses.into_iter().map(|x| (device.clone(), x)));
            }
            Ok(())
        })
    }

    fn ipv4(&self, device: &str) -> NetFut<'_, Vec<Ipv4Cidr>> {
        let device = device.to_owned();
        Box::pin(async move {
            Ok(self
                .addresses
                .lock()
                .map(|a| {
                    a.iter()
                        .filter(|(d, _)| *d == device)
                        .map(|(_, x)| *x)
                        .collect()
                })
                .unwrap_or_default())
        })
    }

    fn nic_facts(&self, device: &str) -> NicFacts {
        NicFacts {
            carrier: self.find(device).is_some_and(|l| l.up),
            ..Default::default()
        }
    }
}
