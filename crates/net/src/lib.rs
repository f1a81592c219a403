//! Corral's host networking (the part of XenServer's networkd and
//! interface-reconfigure that Linux bridges need): [`HostNetwork`] is the
//! seam; [`linux::LinuxNetwork`] drives the kernel through netlink and
//! `/dev/net/tun`, [`sim::SimNetwork`] keeps the same state in memory for
//! in-process tests. It knows nothing of the pool database: the server
//! decides which bridges and taps exist, this crate makes them so.

pub mod filter;
pub mod linux;
pub mod mac;
pub mod names;
pub mod sim;

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("no network device {0}")]
    NoDevice(String),
    #[error("nft: {0}")]
    Filter(String),
    /// The kernel lacks a driver (802.1Q, bonding).
    #[error("{0}")]
    Unsupported(String),
}

pub type NetFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, NetError>> + Send + 'a>>;

/// A network device as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    /// `bridge`, `veth`, `tun`, … (empty for a plain NIC).
    pub kind: String,
    pub mac: String,
    pub mtu: u32,
    pub up: bool,
    /// The bridge (or bond) it is enslaved to.
    pub controller: Option<String>,
    /// An Ethernet device (not loopback, not a tunnel).
    pub ether: bool,
}

impl Link {
    /// Whether a PIF should stand for this device: an Ethernet device that
    /// is not a bridge, tap, VLAN, bond or anything else Corral or the
    /// kernel made on top of NICs. A veth end counts, as a NIC does.
    pub fn is_nic(&self) -> bool {
        self.ether
            && matches!(self.kind.as_str(), "" | "veth")
            && !names::made_by_corral(&self.name)
    }
}

/// What sysfs says about a NIC (XenAPI's PIF_metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicFacts {
    pub carrier: bool,
    /// Mbit/s; 0 when the driver does not say.
    pub speed: i64,
    pub full_duplex: bool,
    pub vendor_id: String,
    pub device_id: String,
    pub pci_bus_path: String,
}

/// XenAPI's bond modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BondMode {
    /// Source-MAC load balancing without switch support: Linux's
    /// `balance-alb` is the bonding driver's equivalent.
    BalanceSlb,
    ActiveBackup,
    /// 802.3ad.
    Lacp,
}

/// A bond device's settings (XenAPI's mode and `properties`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BondSpec {
    pub mode: BondMode,
    /// `lacp-time=fast`.
    pub lacp_fast: bool,
    /// `hashing_algorithm=src_mac` (else `tcpudp_ports`).
    pub hash_src_mac: bool,
    /// The bond's own MAC (the primary member's when the API got none).
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// A device's traffic since the previous sample, in KiB/s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkRates {
    pub rx_kib_s: f64,
    pub tx_kib_s: f64,
}

/// An IPv4 address with its prefix length.
pub type Ipv4Cidr = (std::net::Ipv4Addr, u8);
/// An IPv6 address with its prefix length.
pub type Ipv6Cidr = (std::net::Ipv6Addr, u8);

/// What corrald does to a host's network devices.
pub trait HostNetwork: Send + Sync {
    /// The bridge `name` exists, is up and has this MTU; made if missing,
    /// left alone (beyond MTU and up) if there.
    fn ensure_bridge(&self, name: &str, mtu: u32) -> NetFut<'_, ()>;
    /// Removes the device if it exists.
    fn remove_link(&self, name: &str) -> NetFut<'_, ()>;
    /// A tap device `name` on `bridge` (which must exist), up, with the
    /// bridge's MTU and the MAC `fe:ff:ff:ff:ff:ff` (so that a guest's tap
    /// never becomes the bridge's address). The tap lives as long as the
    /// returned descriptor: handed to QEMU, it goes when the VM does.
    fn open_tap(&self, name: &str, bridge: &str, mtu: u32) -> NetFut<'_, OwnedFd>;
    /// The devices the host has now.
    fn links(&self) -> NetFut<'_, Vec<Link>>;
    /// Enslaves `device` to `bridge` (which must exist) and sets it up,
    /// or with `None` frees it from any.
    fn set_controller(&self, device: &str, bridge: Option<&str>) -> NetFut<'_, ()>;
    /// Makes `device`'s IPv4 addresses exactly these.
    fn set_ipv4(&self, device: &str, addresses: Vec<Ipv4Cidr>) -> NetFut<'_, ()>;
    /// Makes `device`'s global IPv6 addresses exactly these (link-local
    /// ones, which the kernel manages, stay).
    fn set_ipv6(&self, device: &str, addresses: Vec<Ipv6Cidr>) -> NetFut<'_, ()>;
    /// `device`'s IPv4 addresses.
    fn ipv4(&self, device: &str) -> NetFut<'_, Vec<Ipv4Cidr>>;
    /// Carrier, speed, duplex and PCI identity of a NIC.
    fn nic_facts(&self, device: &str) -> NicFacts;
    /// The 802.1Q device `name` for `tag` on `base`, up with this MTU;
    /// made if missing.
    fn ensure_vlan(&self, name: &str, base: &str, tag: u16, mtu: u32) -> NetFut<'_, ()>;
    /// The bond device `name` with these members and settings, up; made
    /// if missing (members are taken from any bridge they were on).
    fn ensure_bond(&self, name: &str, members: Vec<String>, spec: BondSpec) -> NetFut<'_, ()>;
    /// The device's receive and transmit rates since this was last asked
    /// for it (`None` the first time, or without such a device).
    fn link_rates(&self, device: &str) -> Option<LinkRates>;
    /// Gives the tap `tap` (which need not exist yet) this filter, or with
    /// `None` (or an open policy) removes any it has.
    fn set_port_policy(&self, tap: &str, policy: Option<filter::PortPolicy>) -> NetFut<'_, ()>;
    /// The taps that have a filter.
    fn port_policies(&self) -> NetFut<'_, Vec<String>>;
}

/// What a tap gets as its own address (XenServer's backend devices do too).
pub const TAP_MAC: [u8; 6] = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff];
