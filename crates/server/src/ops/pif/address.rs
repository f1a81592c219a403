//! A PIF's host addresses: `PIF.reconfigure_ip` and `reconfigure_ipv6`,
//! and the addresses its record asks its bridge to have.

use crate::context::Server;
use crate::core::call::{ApiResult, void};
use crate::core::driver_errors;
use crate::core::records::db;
use crate::ops::pif::{flag, pif_parts};
use corral_model::enums::{IpConfigurationMode, Ipv6ConfigurationMode};
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value};
use corral_net::{Ipv4Cidr, Ipv6Cidr};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The addresses the PIF's record asks its bridge to have.
pub(crate) fn configured_ipv4(st: &corral_db::State, pif: &str) -> Result<Vec<Ipv4Cidr>, ApiError> {
    let mode = st
        .get_str(field::pif::IP_CONFIGURATION_MODE, pif)
        .unwrap_or_default();
    if mode != "Static" {
        return Ok(vec![]);
    }
    let ip = st.get_str(field::pif::IP, pif).unwrap_or_default();
    let netmask = st.get_str(field::pif::NETMASK, pif).unwrap_or_default();
    Ok(vec![(parse_ip("IP", &ip)?, prefix_of(&netmask)?)])
}

fn parse_ip(name: &str, s: &str) -> Result<Ipv4Addr, ApiError> {
    s.trim()
        .parse()
        .map_err(|_| errors::invalid_ip_address_specified(name))
}

/// A dotted netmask's prefix length (`255.255.255.0` → 24); a prefix
/// length is accepted too.
pub(crate) fn prefix_of(netmask: &str) -> Result<u8, ApiError> {
    if let Ok(n) = netmask.trim().parse::<u8>() {
        if n <= 32 {
            return Ok(n);
        }
    }
    let m = u32::from(parse_ip("netmask", netmask)?);
    let ones = m.leading_ones();
    if m.checked_shl(ones).unwrap_or(0) != 0 {
        return Err(errors::invalid_ip_address_specified("netmask"));
    }
    Ok(ones as u8)
}

/// `PIF.reconfigure_ip`: XAPI's checks, the record, and (if the PIF is
/// plugged) the addresses on its bridge at once. DHCP is recorded; Corral
/// runs no DHCP client on the host yet, so the bridge then has no address.
pub(crate) async fn pif_reconfigure_ip(
    s: &Server,
    pif: &str,
    mode: IpConfigurationMode,
    ip: &str,
    netmask: &str,
    gateway: &str,
    dns: &str,
) -> ApiResult {
    let (managed, management, attached) = {
        let st = s.db.read();
        if !st.exists(class::PIF, pif) {
            return Err(ApiError::handle_invalid("PIF", pif));
        }
        (
            st.get(field::pif::MANAGED, pif)
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
            flag(&st, field::pif::MANAGEMENT, pif),
            flag(&st, field::pif::CURRENTLY_ATTACHED, pif),
        )
    };
    if !managed {
        return Err(errors::pif_unmanaged(pif));
    }
    if mode == IpConfigurationMode::None && management {
        return Err(errors::pif_is_management_interface(pif));
    }
    if mode == IpConfigurationMode::Static {
        parse_ip("IP", ip)?;
        prefix_of(netmask)?;
    }
    for (name, v) in [("IP", ip), ("netmask", netmask), ("gateway", gateway)] {
        if !v.is_empty() && name != "netmask" {
            parse_ip(name, v)?;
        }
    }
    // Only IPv4 name servers are kept (as XAPI does).
    let dns: Vec<&str> = dns
        .split(',')
        .map(str::trim)
        .filter(|d| d.parse::<Ipv4Addr>().is_ok())
        .collect();
    let (ip, netmask, gateway) = match mode {
        IpConfigurationMode::Static => (ip, netmask, gateway),
        _ => ("", "", ""),
    };
    let addresses = match mode {
        IpConfigurationMode::Static => vec![(parse_ip("IP", ip)?, prefix_of(netmask)?)],
        _ => vec![],
    };
    if attached {
        let (h, _, bridge, _) = pif_parts(s, pif)?;
        h.net
            .set_ipv4(&bridge, addresses)
            .await
            .map_err(|e| driver_errors::network(&bridge, e))?;
    }
    db(s.db.write(|t| {
        t.set(
            field::pif::IP_CONFIGURATION_MODE,
            pif,
            Value::str(mode.as_str()),
        )?;
        t.set(field::pif::IP, pif, Value::str(ip))?;
        t.set(field::pif::NETMASK, pif, Value::str(netmask))?;
        t.set(field::pif::GATEWAY, pif, Value::str(gateway))?;
        t.set(field::pif::DNS, pif, Value::String(dns.join(",")))
    }))?;
    void()
}

/// The global IPv6 addresses the PIF's record asks its bridge to have.
pub(crate) fn configured_ipv6(st: &corral_db::State, pif: &str) -> Vec<Ipv6Cidr> {
    if st
        .get_str(field::pif::IPV6_CONFIGURATION_MODE, pif)
        .as_deref()
        != Some("Static")
    {
        return vec![];
    }
    st.get(field::pif::IPV6, pif)
        .and_then(|v| v.as_array().map(<[Value]>::to_vec))
        .unwrap_or_default()
        .iter()
        .filter_map(|v| parse_ipv6_cidr(v.as_str().unwrap_or("")))
        .collect()
}

/// `addr/prefix`.
fn parse_ipv6_cidr(s: &str) -> Option<Ipv6Cidr> {
    let (a, p) = s.split_once('/')?;
    let p: u8 = p.parse().ok().filter(|p| *p <= 128)?;
    Some((a.parse().ok()?, p))
}

/// `PIF.reconfigure_ipv6`: as `reconfigure_ip` for IPv6. A static
/// address is `addr/prefix`; DHCP and Autoconf are recorded (the kernel's
/// own autoconfiguration does the rest); the IPv6 name servers replace
/// the old ones and the IPv4 ones stay.
pub(crate) async fn pif_reconfigure_ipv6(
    s: &Server,
    pif: &str,
    mode: Ipv6ConfigurationMode,
    ipv6: &str,
    gateway: &str,
    dns: &str,
) -> ApiResult {
    let (attached, old_dns) = {
        let st = s.db.read();
        if !st.exists(class::PIF, pif) {
            return Err(ApiError::handle_invalid("PIF", pif));
        }
        if !st
            .get(field::pif::MANAGED, pif)
            .and_then(|v| v.as_bool())
            .unwrap_or(true)
        {
            return Err(errors::pif_unmanaged(pif));
        }
        let v6_management = flag(&st, field::pif::MANAGEMENT, pif)
            && st.get_str(field::pif::PRIMARY_ADDRESS_TYPE, pif).as_deref() == Some("IPv6");
        if mode == Ipv6ConfigurationMode::None && v6_management {
            return Err(errors::pif_is_management_interface(pif));
        }
        (
            flag(&st, field::pif::CURRENTLY_ATTACHED, pif),
            st.get_str(field::pif::DNS, pif).unwrap_or_default(),
        )
    };
    let address = match mode {
        Ipv6ConfigurationMode::Static => Some(
            parse_ipv6_cidr(ipv6).ok_or_else(|| errors::invalid_ip_address_specified("IPv6"))?,
        ),
        _ if !ipv6.is_empty() && parse_ipv6_cidr(ipv6).is_none() => {
            return Err(errors::invalid_ip_address_specified("IPv6"));
        }
        _ => None,
    };
    if !gateway.is_empty() && gateway.parse::<Ipv6Addr>().is_err() {
        return Err(errors::invalid_ip_address_specified("gateway"));
    }
    let mut servers: Vec<String> = old_dns
        .split(',')
        .map(str::trim)
        .filter(|d| d.parse::<Ipv4Addr>().is_ok())
        .map(str::to_owned)
        .collect();
    servers.extend(
        dns.split(',')
            .map(str::trim)
            .filter(|d| d.parse::<Ipv6Addr>().is_ok())
            .map(str::to_owned),
    );
    if attached {
        let (h, _, bridge, _) = pif_parts(s, pif)?;
        h.net
            .set_ipv6(&bridge, address.into_iter().collect())
            .await
            .map_err(|e| driver_errors::network(&bridge, e))?;
    }
    let (ipv6, gateway) = match address {
        Some(_) => (vec![Value::str(ipv6)], gateway),
        None => (vec![], ""),
    };
    db(s.db.write(|t| {
        t.set(
            field::pif::IPV6_CONFIGURATION_MODE,
            pif,
            Value::str(mode.as_str()),
        )?;
        t.set(field::pif::IPV6, pif, Value::Array(ipv6))?;
        t.set(field::pif::IPV6_GATEWAY, pif, Value::str(gateway))?;
        t.set(field::pif::DNS, pif, Value::String(servers.join(",")))
    }))?;
    void()
}

#[cfg(test)]
mod tests {
    use super::prefix_of;

    #[test]
    fn netmasks() {
        assert_eq!(prefix_of("255.255.255.0").ok(), Some(24));
        assert_eq!(prefix_of("255.255.254.0").ok(), Some(23));
        assert_eq!(prefix_of("255.255.255.255").ok(), Some(32));
        assert_eq!(prefix_of("0.0.0.0").ok(), Some(0));
        assert_eq!(prefix_of("16").ok(), Some(16));
        assert!(prefix_of("255.0.255.0").is_err());
        assert!(prefix_of("255.255.255").is_err());
        assert!(prefix_of("33").is_err());
    }
}
