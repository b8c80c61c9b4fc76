//! The proxy's port belongs to the gate. `bind4`/`bind6` refuse a workload's explicit bind to
//! it, but the kernel also hands out ports on its own (autobind on `listen()` or `connect()` of
//! an unbound socket), which no hook sees: a workload looping on that could take the port in
//! the moment between an agent's death and its restart, fail the restart and receive other
//! workloads' redirected connections. A port in `net.ipv4.ip_local_reserved_ports` (which
//! covers IPv6 too) is never handed out that way, and the reservation outlives the agent.

use std::{collections::BTreeSet, ops::RangeInclusive};

use anyhow::Context as _;
use tracing::{info, warn};

const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
const EPHEMERAL: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Adds `ports` to the reserved ports of this network namespace. Fails when a port inside the
/// ephemeral range cannot be reserved; a port outside it is never autobound anyway.
pub fn reserve(ports: &BTreeSet<u16>) -> anyhow::Result<()> {
    let current = std::fs::read_to_string(RESERVED).unwrap_or_default();
    let reserved = parse_list(&current);
    let missing: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|p| !reserved.iter().any(|r| r.contains(p)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut list = current.trim().to_owned();
    for port in &missing {
        if !list.is_empty() {
            list.push(',');
        }
        list.push_str(&port.to_string());
    }
    match std::fs::write(RESERVED, &list) {
        Ok(()) => {
            info!(ports = ?missing, "proxy ports reserved: the kernel never hands them to a workload");
            Ok(())
        }
        Err(e) => {
            let range = ephemeral_range();
            let exposed: Vec<u16> = missing
                .iter()
                .copied()
                .filter(|p| range.as_ref().is_none_or(|r| r.contains(p)))
                .collect();
            if exposed.is_empty() {
                warn!(error = %e, ports = ?missing, "cannot reserve the proxy ports; they lie outside the ephemeral range, so nothing autobinds them");
                return Ok(());
            }
            let range = range.map_or_else(
                || "unknown".to_owned(),
                |r| format!("{}-{}", r.start(), r.end()),
            );
            Err(e).with_context(|| {
                format!(
                    "cannot reserve proxy port(s) {exposed:?} in {RESERVED}; they lie in the ephemeral range {range}, where a workload could be handed them across a restart. Let jitgated write that sysctl, reserve them yourself (sysctl net.ipv4.ip_local_reserved_ports), or pick a proxy_listen port outside {range}"
                )
            })
        }
    }
}

/// Parses a `ip_local_reserved_ports` list: `8080,9000-9010`.
fn parse_list(text: &str) -> Vec<RangeInclusive<u16>> {
    text.trim()
        .split(',')
        .filter_map(|item| {
            let item = item.trim();
            match item.split_once('-') {
                Some((a, b)) => Some(a.parse().ok()?..=b.parse().ok()?),
                None => {
                    let p = item.parse().ok()?;
                    Some(p..=p)
                }
            }
        })
        .collect()
}

fn ephemeral_range() -> Option<RangeInclusive<u16>> {
    let text = std::fs::read_to_string(EPHEMERAL).ok()?;
    let mut parts = text.split_whitespace();
    Some(parts.next()?.parse().ok()?..=parts.next()?.parse().ok()?)
}

/// Who holds TCP port `port` in this network namespace, for the error when the proxy cannot
/// bind: "pid 4242 (python3, cgroup /jitgate.slice/...)".
pub fn holders(port: u16) -> Vec<String> {
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        inodes.extend(socket_inodes(&text, port));
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for proc_dir in procs.flatten() {
        let Some(pid) = proc_dir
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
                    .is_some_and(|inode| inodes.contains(&inode))
            })
        });
        if holds {
            let comm = std::fs::read_to_string(proc_dir.path().join("comm")).unwrap_or_default();
            let cgroup = super::cgroup::cgroup_of_pid(pid).unwrap_or_default();
            out.push(format!("pid {pid} ({}, cgroup /{cgroup})", comm.trim()));
        }
    }
    out
}

/// Inodes of the sockets bound to local port `port` in a `/proc/net/tcp{,6}` table.
fn socket_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let local_port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            let inode: u64 = fields.get(9)?.parse().ok()?;
            (local_port == port && inode != 0).then_some(inode)
        })
        .collect()
}

/// Says who holds the port when the proxy listener cannot bind it.
pub fn explain_bind_failure(port: u16, error: &std::io::Error) -> Option<String> {
    if error.kind() != std::io::ErrorKind::AddrInUse {
        return None;
    }
    let holders = holders(port);
    if holders.is_empty() {
        return None;
    }
    Some(format!(
        "port {port} is held by {}; stop it, or pick another proxy_listen port",
        holders.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_lists_parse_with_ranges() {
        let list = parse_list("8080,9000-9010, 15432\n");
        assert!(list.iter().any(|r| r.contains(&8080)));
        assert!(list.iter().any(|r| r.contains(&9005)));
        assert!(list.iter().any(|r| r.contains(&15432)));
        assert!(!list.iter().any(|r| r.contains(&9011)));
        assert!(parse_list("\n").is_empty());
    }

    #[test]
    fn sockets_on_a_port_are_found_in_the_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:3C8C 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 51234 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 777 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(socket_inodes(table, 0x3C8C), vec![51234]);
        assert_eq!(socket_inodes(table, 8080), vec![777]);
        assert!(socket_inodes(table, 9).is_empty());
    }
}
