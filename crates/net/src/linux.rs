//! The host network through the kernel: links over rtnetlink, taps with
//! the TUNSETIFF ioctl (the kernel does not make taps over netlink).

use crate::filter::{self, PortPolicy};
use crate::{
    BondSpec, HostNetwork, Ipv4Cidr, Ipv6Cidr, Link, LinkRates, NetError, NetFut, NicFacts, TAP_MAC,
};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::LinkLayerType;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkBond, LinkBridge, LinkUnspec, LinkVlan};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

/// Runs nft (its fixed arguments; a script on stdin), its output or why not.
async fn nft(args: &[&str], stdin: Option<String>) -> Result<String, NetError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| NetError::Io("nft".into(), e))?;
    if let Some(mut w) = child.stdin.take() {
        if let Some(text) = stdin {
            w.write_all(text.as_bytes())
                .await
                .map_err(|e| NetError::Io("nft".into(), e))?;
        }
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| NetError::Io("nft".into(), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Filter(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// The LACP settings XenAPI's bond `properties` give.
fn lacp(
    b: rtnetlink::LinkMessageBuilder<LinkBond>,
    spec: &BondSpec,
) -> rtnetlink::LinkMessageBuilder<LinkBond> {
    use rtnetlink::packet_route::link::{BondLacpRate, BondXmitHashPolicy};
    b.ad_lacp_rate(if spec.lacp_fast {
        BondLacpRate::Fast
    } else {
        BondLacpRate::Slow
    })
    .xmit_hash_policy(if spec.hash_src_mac {
        BondXmitHashPolicy::Layer2
    } else {
        BondXmitHashPolicy::Layer34
    })
}

/// A kernel without the driver for `what` answers "not supported" (or
/// "unknown device type"): say which driver is missing.
fn unsupported(e: rtnetlink::Error, what: &str) -> NetError {
    match &e {
        rtnetlink::Error::NetlinkError(m)
            if [-libc::EOPNOTSUPP, -libc::ENOENT, -libc::EINVAL].contains(&m.raw_code()) =>
        {
            NetError::Unsupported(format!("this kernel has no {what} devices ({e})"))
        }
        _ => nl(e),
    }
}

pub struct LinuxNetwork {
    /// Opened on first use, inside the runtime its worker task needs.
    handle: std::sync::OnceLock<Handle>,
    /// The last traffic counters read per device: (when, rx bytes, tx bytes).
    counters: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64, u64)>>,
    /// The taps with rules in Corral's nft table (corrald is its only
    /// writer), read from the kernel on first use.
    filtered: std::sync::Mutex<Option<BTreeSet<String>>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn nl(e: rtnetlink::Error) -> NetError {
    NetError::Netlink(e.to_string())
}

/// Whether a netlink error says that the device does not exist.
fn is_no_device(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV)
}

impl Default for LinuxNetwork {
    fn default() -> Self {
        LinuxNetwork::new()
    }
}

impl LinuxNetwork {
    pub fn new() -> LinuxNetwork {
        LinuxNetwork {
            handle: std::sync::OnceLock::new(),
            filtered: std::sync::Mutex::new(None),
            counters: std::sync::Mutex::new(Default::default()),
        }
    }

    /// The netlink connection, opened the first time (its worker then runs
    /// on the current Tokio runtime for as long as this value lives).
    fn conn(&self) -> Result<&Handle, NetError> {
        if let Some(h) = self.handle.get() {
            return Ok(h);
        }
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| NetError::Io("netlink socket".into(), e))?;
        if self.handle.set(handle).is_ok() {
            tokio::spawn(conn);
        }
        self.handle
            .get()
            .ok_or_else(|| NetError::Netlink("no netlink connection".into()))
    }

    /// The taps that have rules now.
    async fn filtered(&self) -> Result<BTreeSet<String>, NetError> {
        if let Some(f) = lock(&self.filtered).as_ref() {
            return Ok(f.clone());
        }
        let found: BTreeSet<String> =
            match nft(&["list", "table", "bridge", filter::TABLE], None).await {
                Ok(listing) => filter::chains_in(&listing).into_iter().collect(),
                // No table (or no nft at all): no rules.
                Err(_) => BTreeSet::new(),
            };
        Ok(lock(&self.filtered).get_or_insert(found).clone())
    }

    async fn get(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        let mut s = self
            .conn()?
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if is_no_device(&e) => Ok(None),
            Err(e) => Err(nl(e)),
        }
    }

    /// The device's addresses of one family, with the messages that
    /// delete them: IPv4 ones, or global IPv6 ones (link-local addresses
    /// are the kernel's).
    async fn addresses(
        &self,
        index: u32,
        v6: bool,
    ) -> Result<Vec<(AddressMessage, (IpAddr, u8))>, NetError> {
        let msgs: Vec<AddressMessage> = self
            .conn()?
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl)?;
        let family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let mut out = Vec::new();
        for m in msgs {
            if m.header.family != family || m.header.index != index {
                continue;
            }
            let addr = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(v))
                | AddressAttribute::Address(IpAddr::V4(v))
                    if !v6 =>
                {
                    Some(IpAddr::V4(*v))
                }
                AddressAttribute::Address(IpAddr::V6(v))
                    if v6 && (v.segments()[0] & 0xffc0) != 0xfe80 =>
                {
                    Some(IpAddr::V6(*v))
                }
                _ => None,
            });
            if let Some(a) = addr {
                let prefix = m.header.prefix_len;
                out.push((m, (a, prefix)));
            }
        }
        Ok(out)
    }

    /// Makes the device's addresses of one family exactly `want`.
    async fn set_addresses(
        &self,
        device: &str,
        v6: bool,
        want: Vec<(IpAddr, u8)>,
    ) -> Result<(), NetError> {
        let index = self.index(device).await?;
        let now = self.addresses(index, v6).await?;
        for (msg, have) in &now {
            if !want.contains(have) {
                self.conn()?
                    .address()
                    .del(msg.clone())
                    .execute()
                    .await
                    .map_err(nl)?;
            }
        }
        for (addr, prefix) in &want {
            if !now.iter().any(|(_, have)| have == &(*addr, *prefix)) {
                self.conn()?
                    .address()
                    .add(index, *addr, *prefix)
                    .execute()
                    .await
                    .map_err(nl)?;
            }
        }
        Ok(())
    }

    async fn index(&self, name: &str) -> Result<u32, NetError> {
        self.get(name)
            .await?
            .map(|m| m.header.index)
            .ok_or_else(|| NetError::NoDevice(name.to_owned()))
    }
}

fn link_of(m: &LinkMessage, names: &std::collections::HashMap<u32, String>) -> Link {
    let mut l = Link {
        name: String::new(),
        index: m.header.index,
        kind: String::new(),
        mac: String::new(),
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        controller: None,
        ether: m.header.link_layer_type == LinkLayerType::Ether,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Mtu(x) => l.mtu = *x,
            LinkAttribute::Address(b) => {
                l.mac = b
                    .iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            }
            LinkAttribute::Controller(i) => l.controller = names.get(i).cloned(),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = match k {
                            InfoKind::Other(s) => s.clone(),
                            k => k.to_string(),
                        };
                    }
                }
            }
            _ => {}
        }
    }
    l
}

impl HostNetwork for LinuxNetwork {
    fn ensure_bridge(&self, name: &str, mtu: u32) -> NetFut<'_, ()> {
        let name = name.to_owned();
        Box::pin(async move {
            match self.get(&name).await? {
                Some(m) => {
                    let set = LinkUnspec::new_with_index(m.header.index)
                        .mtu(mtu)
                        .up()
                        .build();
                    self.conn()?.link().set(set).execute().await.map_err(nl)
                }
                None => {
                    let add = LinkBridge::new(&name).mtu(mtu).build();
                    match self.conn()?.link().add(add).execute().await {
                        Ok(()) => Ok(()),
                        // Made meanwhile by a concurrent start: fine.
                        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => {
                            Ok(())
                        }
                        Err(e) => Err(nl(e)),
                    }
                }
            }
        })
    }

    fn remove_link(&self, name: &str) -> NetFut<'_, ()> {
        let name = name.to_owned();
        Box::pin(async move {
            let Some(m) = self.get(&name).await? else {
                return Ok(());
            };
            match self.conn()?.link().del(m.header.index).execute().await {
                Ok(()) => Ok(()),
                Err(e) if is_no_device(&e) => Ok(()),
                Err(e) => Err(nl(e)),
            }
        })
    }

    fn open_tap(&self, name: &str, bridge: &str, mtu: u32) -> NetFut<'_, OwnedFd> {
        let (name, bridge) = (name.to_owned(), bridge.to_owned());
        Box::pin(async move {
            let controller = self.index(&bridge).await?;
            let fd = tun_open(&name)?;
            let index = self.index(&name).await?;
            let set = LinkUnspec::new_with_index(index)
                .address(TAP_MAC.to_vec())
                .mtu(mtu)
                .controller(controller)
                .up()
                .build();
            self.conn()?.link().set(set).execute().await.map_err(nl)?;
            Ok(fd)
        })
    }

    fn set_controller(&self, device: &str, bridge: Option<&str>) -> NetFut<'_, ()> {
        let (device, bridge) = (device.to_owned(), bridge.map(str::to_owned));
        Box::pin(async move {
            let index = self.index(&device).await?;
            let msg = match &bridge {
                Some(b) => {
                    let controller = self.index(b).await?;
                    LinkUnspec::new_with_index(index)
                        .controller(controller)
                        .up()
                        .build()
                }
                None => LinkUnspec::new_with_index(index).nocontroller().build(),
            };
            self.conn()?.link().set(msg).execute().await.map_err(nl)
        })
    }

    fn set_ipv4(&self, device: &str, addresses: Vec<Ipv4Cidr>) -> NetFut<'_, ()> {
        let device = device.to_owned();
        let want = addresses
            .into_iter()
            .map(|(a, p)| (IpAddr::V4(a), p))
            .collect();
        Box::pin(async move { self.set_addresses(&device, false, want).await })
    }

    fn set_ipv6(&self, device: &str, addresses: Vec<Ipv6Cidr>) -> NetFut<'_, ()> {
        let device = device.to_owned();
        let want = addresses
            .into_iter()
            .map(|(a, p)| (IpAddr::V6(a), p))
            .collect();
        Box::pin(async move { self.set_addresses(&device, true, want).await })
    }

    fn ipv4(&self, device: &str) -> NetFut<'_, Vec<Ipv4Cidr>> {
        let device = device.to_owned();
        Box::pin(async move {
            let index = self.index(&device).await?;
            Ok(self
                .addresses(index, false)
                .await?
                .into_iter()
                .filter_map(|(_, (a, p))| match a {
                    IpAddr::V4(v) => Some((v, p)),
                    IpAddr::V6(_) => None,
                })
                .collect())
        })
    }

    fn nic_facts(&self, device: &str) -> NicFacts {
        let dir = std::path::Path::new("/sys/class/net").join(device);
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let pci = std::fs::read_link(dir.join("device"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        NicFacts {
            carrier: read("carrier") == "1",
            speed: read("speed")
                .parse::<i64>()
                .ok()
                .filter(|s| *s > 0)
                .unwrap_or(0),
            full_duplex: read("duplex") == "full",
            vendor_id: read("device/vendor").trim_start_matches("0x").to_owned(),
            device_id: read("device/device").trim_start_matches("0x").to_owned(),
            pci_bus_path: pci,
        }
    }

    fn ensure_vlan(&self, name: &str, base: &str, tag: u16, mtu: u32) -> NetFut<'_, ()> {
        let (name, base) = (name.to_owned(), base.to_owned());
        Box::pin(async move {
            if self.get(&name).await?.is_none() {
                let base_index = self.index(&base).await?;
                let add = LinkVlan::new(&name, base_index, tag).mtu(mtu).build();
                match self.conn()?.link().add(add).execute().await {
                    Ok(()) => {}
                    Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => {}
                    Err(e) => return Err(unsupported(e, "802.1Q VLAN")),
                }
            }
            let index = self.index(&name).await?;
            let set = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
            self.conn()?.link().set(set).execute().await.map_err(nl)
        })
    }

    fn ensure_bond(&self, name: &str, members: Vec<String>, spec: BondSpec) -> NetFut<'_, ()> {
        let name = name.to_owned();
        Box::pin(async move {
            let mode = match spec.mode {
                crate::BondMode::BalanceSlb => rtnetlink::packet_route::link::BondMode::BalanceAlb,
                crate::BondMode::ActiveBackup => {
                    rtnetlink::packet_route::link::BondMode::ActiveBackup
                }
                crate::BondMode::Lacp => rtnetlink::packet_route::link::BondMode::Ieee8023Ad,
            };
            if let Some(m) = self.get(&name).await? {
                // The mode can change only while the bond is down.
                let down = LinkUnspec::new_with_index(m.header.index).down().build();
                self.conn()?.link().set(down).execute().await.map_err(nl)?;
                let mut b = LinkBond::new(&name).mode(mode).miimon(100);
                if spec.mode == crate::BondMode::Lacp {
                    b = lacp(b, &spec);
                }
                let mut msg = b.build();
                msg.header.index = m.header.index;
                self.conn()?.link().set(msg).execute().await.map_err(nl)?;
            } else {
                let mut b = LinkBond::new(&name).mode(mode).miimon(100);
                if spec.mode == crate::BondMode::Lacp {
                    b = lacp(b, &spec);
                }
                let add = b.mtu(spec.mtu).address(spec.mac.to_vec()).build();
                match self.conn()?.link().add(add).execute().await {
                    Ok(()) => {}
                    Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => {}
                    Err(e) => return Err(unsupported(e, "bonding")),
                }
            }
            let bond = self.index(&name).await?;
            for member in &members {
                let index = self.index(member).await?;
                // A member is enslaved while down, then comes up in the bond.
                let down = LinkUnspec::new_with_index(index)
                    .down()
                    .nocontroller()
                    .build();
                self.conn()?.link().set(down).execute().await.map_err(nl)?;
                let join = LinkUnspec::new_with_index(index)
                    .controller(bond)
                    .up()
                    .build();
                self.conn()?.link().set(join).execute().await.map_err(nl)?;
            }
            let up = LinkUnspec::new_with_index(bond).mtu(spec.mtu).up().build();
            self.conn()?.link().set(up).execute().await.map_err(nl)
        })
    }

    fn link_rates(&self, device: &str) -> Option<LinkRates> {
        let dir = std::path::Path::new("/sys/class/net")
            .join(device)
            .join("statistics");
        let read = |f: &str| -> Option<u64> {
            std::fs::read_to_string(dir.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let (rx, tx) = (read("rx_bytes"), read("tx_bytes"));
        let mut c = lock(&self.counters);
        let (Some(rx), Some(tx)) = (rx, tx) else {
            c.remove(device);
            return None;
        };
        let now = std::time::Instant::now();
        let before = c.insert(device.to_owned(), (now, rx, tx));
        let (then, rx0, tx0) = before?;
        let secs = now.duration_since(then).as_secs_f64();
        // A counter that went back is a new device of the same name.
        if secs <= 0.0 || rx < rx0 || tx < tx0 {
            return None;
        }
        Some(LinkRates {
            rx_kib_s: (rx - rx0) as f64 / 1024.0 / secs,
            tx_kib_s: (tx - tx0) as f64 / 1024.0 / secs,
        })
    }

    fn set_port_policy(&self, tap: &str, policy: Option<PortPolicy>) -> NetFut<'_, ()> {
        let tap = tap.to_owned();
        Box::pin(async move {
            if !filter::nameable(&tap) {
                return Err(NetError::Filter(format!("{tap:?} cannot name a chain")));
            }
            let filtered = self.filtered().await?;
            match policy {
                Some(p) if !p.is_open() => {
                    nft(&["-f", "-"], Some(filter::script(&tap, &p))).await?;
                    lock(&self.filtered)
                        .get_or_insert_with(Default::default)
                        .insert(tap);
                }
                // Most ports have no rules: clearing those costs no nft run.
                _ if !filtered.contains(&tap) => {}
                _ => {
                    nft(&["-f", "-"], Some(filter::clear_script(&tap))).await?;
                    if let Some(f) = lock(&self.filtered).as_mut() {
                        f.remove(&tap);
                    }
                }
            }
            Ok(())
        })
    }

    fn port_policies(&self) -> NetFut<'_, Vec<String>> {
        Box::pin(async move { Ok(self.filtered().await?.into_iter().collect()) })
    }

    fn links(&self) -> NetFut<'_, Vec<Link>> {
        Box::pin(async move {
            let msgs: Vec<LinkMessage> = self
                .conn()?
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(nl)?;
            let mut names = std::collections::HashMap::new();
            for m in &msgs {
                for a in &m.attributes {
                    if let LinkAttribute::IfName(n) = a {
                        names.insert(m.header.index, n.clone());
                    }
                }
            }
            Ok(msgs.iter().map(|m| link_of(m, &names)).collect())
        })
    }
}

/// Opens `/dev/net/tun` as the tap `name` (made if missing; a tap made this
/// way lives while a descriptor is open on it). With `IFF_VNET_HDR`, so
/// that QEMU's virtio-net can pass offloads through.
fn tun_open(name: &str) -> Result<OwnedFd, NetError> {
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    // _IOW('T', 202, int)
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(NetError::NoDevice(name.to_owned()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| NetError::Io("/dev/net/tun".into(), e))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays
    // out (name, flags, padding to its 40 bytes); the fd is open.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(NetError::Io(
            format!("TUNSETIFF {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(OwnedFd::from(file))
}
