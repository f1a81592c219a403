//! What the host is: CPUs, memory, name and address.

pub(crate) fn cpuinfo() -> (usize, Vec<(String, String)>) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut count = 0;
    let mut first: Vec<(String, String)> = Vec::new();
    for block in text.split("\n\n").filter(|b| b.contains("processor")) {
        count += 1;
        if first.is_empty() {
            first = block
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect();
        }
    }
    (count.max(1), first)
}

pub(crate) fn meminfo_kib(key: &str) -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// The first non-loopback IPv4 address of this host (the management address).
pub fn primary_address() -> String {
    let mut out = None;
    // SAFETY: getifaddrs fills a linked list we only read and then free.
    unsafe {
        let mut ifa: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut ifa) == 0 {
            let mut p = ifa;
            while !p.is_null() {
                let a = (*p).ifa_addr;
                if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                    let sin = &*(a as *const libc::sockaddr_in);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    if !ip.is_loopback() {
                        out = Some(ip.to_string());
                        break;
                    }
                }
                p = (*p).ifa_next;
            }
            libc::freeifaddrs(ifa);
        }
    }
    out.unwrap_or_else(|| "127.0.0.1".into())
}
