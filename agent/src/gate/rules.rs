//! Compiles resources, the allowlist and resolvers into the kernel's destination trie.
//!
//! The trie answers a longest-prefix lookup with one value, so each prefix's value carries
//! every rule of every prefix that contains it, resources first (see
//! [`jitgate_common::DestRules`]). Compilation is pure, so it is unit-tested here; the loader
//! only copies its output into the map.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use jitgate_common::{DestRules, MAX_PORT_RULES, PortRule, action};

use crate::config::{NetPorts, PortRange};

/// Where one resource lives right now: literal networks, or what its name resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceAddrs {
    /// Index in the config's resource list (what the kernel reports).
    pub index: u32,
    pub nets: Vec<IpNet>,
    pub ports: PortRange,
}

/// A trie key: prefix length over the 128-bit (IPv4-mapped) address, and the address words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrieKey {
    pub prefix_len: u32,
    pub addr: [u32; 4],
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error(
        "destination {prefix} has {count} overlapping port rules; the kernel holds at most {MAX_PORT_RULES} per address: merge port ranges or split resources across addresses"
    )]
    TooManyRules { prefix: String, count: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    net: Ipv6Net,
    ports: PortRange,
    action: u8,
    resource: u32,
}

/// Resources first: an allowlist entry or resolver that overlaps a resource never wins.
const fn priority(action: u8) -> u8 {
    match action {
        action::RESOURCE => 0,
        action::DENY => 1,
        action::RESOLVER => 2,
        _ => 3,
    }
}

/// The IPv6 form (IPv4-mapped for IPv4) every kernel lookup uses.
pub fn to_v6_net(net: IpNet) -> Ipv6Net {
    match net {
        IpNet::V6(n) => n.trunc(),
        IpNet::V4(n) => Ipv6Net::new(n.network().to_ipv6_mapped(), 96 + n.prefix_len())
            .expect("an IPv4 prefix plus 96 is at most 128")
            .trunc(),
    }
}

/// Address words in network byte order, as [`jitgate_common::DestAddr`] wants them.
pub fn words(addr: Ipv6Addr) -> [u32; 4] {
    let o = addr.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The inverse of [`words`], folding IPv4-mapped addresses back to IPv4.
pub fn from_words(words: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// The IPv6 form of any address, IPv4 mapped.
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => words(a.to_ipv6_mapped()),
        IpAddr::V6(a) => words(a),
    }
}

/// Every way to name this host: a resource on any of these (or a network containing one) is
/// reachable through all of them when its server listens on a wildcard address, so all of
/// them must lead to the gate.
fn local_nets(local_addrs: &[IpAddr]) -> Vec<IpNet> {
    let mut nets = vec![
        IpNet::V4(Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("valid")),
        IpNet::V4(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 32).expect("valid")),
        IpNet::V6(Ipv6Net::new(Ipv6Addr::LOCALHOST, 128).expect("valid")),
        IpNet::V6(Ipv6Net::new(Ipv6Addr::UNSPECIFIED, 128).expect("valid")),
    ];
    nets.extend(local_addrs.iter().map(|a| IpNet::from(*a)));
    nets
}

fn is_local(net: &IpNet, local: &[IpNet]) -> bool {
    local.iter().any(|l| net.contains(l) || l.contains(net))
}

/// Builds the trie contents.
pub fn compile(
    resources: &[ResourceAddrs],
    allow: &[NetPorts],
    resolvers: &[SocketAddr],
    local_addrs: &[IpAddr],
    own: &[SocketAddr],
) -> Result<BTreeMap<TrieKey, DestRules>, RulesError> {
    let local = local_nets(local_addrs);
    let mut entries = BTreeSet::new();
    for r in resources {
        let mut nets = r.nets.clone();
        if nets.iter().any(|n| is_local(n, &local)) {
            nets.extend(local.iter().copied());
        }
        for net in nets {
            entries.insert(Entry {
                net: to_v6_net(net),
                ports: r.ports,
                action: action::RESOURCE,
                resource: r.index,
            });
        }
    }
    for a in allow {
        entries.insert(Entry {
            net: to_v6_net(a.net),
            ports: a.ports,
            action: action::ALLOW,
            resource: 0,
        });
    }
    // The agent's own listeners. One on a local address (or all of them) is reached at every
    // local address, as a local resource is.
    for l in own {
        let nets = if is_local(&IpNet::from(l.ip()), &local) {
            local.clone()
        } else {
            vec![IpNet::from(l.ip())]
        };
        for net in nets {
            entries.insert(Entry {
                net: to_v6_net(net),
                ports: PortRange::single(l.port()),
                action: action::DENY,
                resource: 0,
            });
        }
    }
    for s in resolvers {
        entries.insert(Entry {
            net: to_v6_net(IpNet::from(s.ip())),
            ports: PortRange::single(s.port()),
            action: action::RESOLVER,
            resource: 0,
        });
    }

    let prefixes: BTreeSet<Ipv6Net> = entries.iter().map(|e| e.net).collect();
    let mut out = BTreeMap::new();
    for prefix in prefixes {
        let mut applicable: Vec<&Entry> =
            entries.iter().filter(|e| e.net.contains(&prefix)).collect();
        applicable.sort_by_key(|e| {
            (
                priority(e.action),
                std::cmp::Reverse(e.net.prefix_len()),
                e.ports,
            )
        });
        applicable.dedup_by_key(|e| (e.ports, e.action, e.resource));
        if applicable.len() > MAX_PORT_RULES {
            return Err(RulesError::TooManyRules {
                prefix: prefix.to_string(),
                count: applicable.len(),
            });
        }
        let mut value = DestRules {
            len: applicable.len() as u32,
            ..DestRules::default()
        };
        for (slot, e) in value.rules.iter_mut().zip(&applicable) {
            *slot = PortRule {
                port_lo: e.ports.lo,
                port_hi: e.ports.hi,
                action: e.action,
                _pad: [0; 3],
                resource: e.resource,
            };
        }
        out.insert(
            TrieKey {
                prefix_len: u32::from(prefix.prefix_len()),
                addr: words(prefix.network()),
            },
            value,
        );
    }
    Ok(out)
}

/// Looks `addr:port` up the way the kernel does (longest prefix, then first matching port
/// rule). Used by tests and by `jitgate status` to explain a decision.
pub fn lookup(trie: &BTreeMap<TrieKey, DestRules>, addr: IpAddr, port: u16) -> Option<PortRule> {
    let key = to_v6_net(IpNet::from(addr));
    let best = trie
        .iter()
        .filter(|(k, _)| {
            let net = Ipv6Net::new(
                match from_words(k.addr) {
                    IpAddr::V4(a) => a.to_ipv6_mapped(),
                    IpAddr::V6(a) => a,
                },
                k.prefix_len as u8,
            )
            .expect("valid prefix");
            net.contains(&key.network())
        })
        .max_by_key(|(k, _)| k.prefix_len)?;
    best.1.rules[..best.1.len as usize]
        .iter()
        .find(|r| r.port_lo <= port && port <= r.port_hi)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(index: u32, net: &str, ports: &str) -> ResourceAddrs {
        ResourceAddrs {
            index,
            nets: vec![net.parse().unwrap()],
            ports: ports.parse().unwrap(),
        }
    }

    #[test]
    fn the_agents_own_listeners_are_refused_at_every_local_address() {
        let console: SocketAddr = "0.0.0.0:8443".parse().unwrap();
        let local: IpAddr = "10.1.2.3".parse().unwrap();
        // A resource on another port of the same host stays a resource.
        let trie = compile(
            &[res(1, "127.0.0.1/32", "5432")],
            &[],
            &[],
            &[local],
            &[console],
        )
        .unwrap();
        for addr in ["127.0.0.1", "127.0.0.2", "::1", "0.0.0.0", "10.1.2.3"] {
            let rule = lookup(&trie, addr.parse().unwrap(), 8443)
                .unwrap_or_else(|| panic!("{addr} not covered"));
            assert_eq!(rule.action, action::DENY, "{addr}");
        }
        assert_eq!(
            lookup(&trie, "127.0.0.1".parse().unwrap(), 5432)
                .unwrap()
                .action,
            action::RESOURCE
        );
        // Elsewhere, the same port is nobody's business.
        assert!(lookup(&trie, "10.9.9.9".parse().unwrap(), 8443).is_none());
        // Configured as a resource, the console goes through the gate as one.
        let trie = compile(&[res(2, "127.0.0.1/32", "8443")], &[], &[], &[], &[console]).unwrap();
        assert_eq!(
            lookup(&trie, "127.0.0.1".parse().unwrap(), 8443)
                .unwrap()
                .action,
            action::RESOURCE
        );
    }

    #[test]
    fn words_round_trip() {
        let a: IpAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(from_words(addr_words(a)), a);
        let b: IpAddr = "fd00::5".parse().unwrap();
        assert_eq!(from_words(addr_words(b)), b);
        assert_eq!(
            addr_words(a),
            jitgate_common::v4_mapped(u32::from_ne_bytes([10, 0, 0, 5]))
        );
    }

    #[test]
    fn resource_beats_overlapping_allow() {
        let allow: Vec<NetPorts> = vec!["10.0.0.0/8:1-65535".parse().unwrap()];
        let trie = compile(&[res(3, "10.0.0.5/32", "5432")], &allow, &[], &[], &[]).unwrap();
        let hit = lookup(&trie, "10.0.0.5".parse().unwrap(), 5432).unwrap();
        assert_eq!((hit.action, hit.resource), (action::RESOURCE, 3));
        let other_port = lookup(&trie, "10.0.0.5".parse().unwrap(), 80).unwrap();
        assert_eq!(other_port.action, action::ALLOW);
        let other_host = lookup(&trie, "10.1.2.3".parse().unwrap(), 5432).unwrap();
        assert_eq!(other_host.action, action::ALLOW);
        assert!(lookup(&trie, "192.168.1.1".parse().unwrap(), 5432).is_none());
    }

    #[test]
    fn specific_allow_inside_resource_net_keeps_resource() {
        let allow: Vec<NetPorts> = vec!["10.0.0.7/32:5432".parse().unwrap()];
        let trie = compile(&[res(0, "10.0.0.0/24", "5432-5440")], &allow, &[], &[], &[]).unwrap();
        let hit = lookup(&trie, "10.0.0.7".parse().unwrap(), 5432).unwrap();
        assert_eq!(hit.action, action::RESOURCE);
        let hit = lookup(&trie, "10.0.0.9".parse().unwrap(), 5440).unwrap();
        assert_eq!(hit.action, action::RESOURCE);
    }

    #[test]
    fn local_resource_covers_every_local_name() {
        let trie = compile(
            &[res(1, "127.0.0.1/32", "5432")],
            &[],
            &[],
            &["192.0.2.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            &[],
        )
        .unwrap();
        for addr in [
            "127.0.0.1",
            "127.0.0.2",
            "0.0.0.0",
            "::1",
            "::",
            "192.0.2.2",
            "fd00::2",
        ] {
            let hit = lookup(&trie, addr.parse().unwrap(), 5432)
                .unwrap_or_else(|| panic!("{addr} is not gated"));
            assert_eq!((hit.action, hit.resource), (action::RESOURCE, 1), "{addr}");
        }
        assert!(lookup(&trie, "192.0.2.3".parse().unwrap(), 5432).is_none());
    }

    #[test]
    fn resolvers_and_v6() {
        let trie = compile(
            &[res(0, "fd00::5/128", "443")],
            &[],
            &["10.255.255.53:53".parse().unwrap()],
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(
            lookup(&trie, "10.255.255.53".parse().unwrap(), 53)
                .unwrap()
                .action,
            action::RESOLVER
        );
        assert!(lookup(&trie, "10.255.255.53".parse().unwrap(), 54).is_none());
        assert_eq!(
            lookup(&trie, "fd00::5".parse().unwrap(), 443)
                .unwrap()
                .action,
            action::RESOURCE
        );
    }

    #[test]
    fn too_many_rules_is_an_error_not_a_truncation() {
        let resources: Vec<_> = (0..=MAX_PORT_RULES as u32)
            .map(|i| res(i, "10.0.0.5/32", &(1000 + i).to_string()))
            .collect();
        assert!(matches!(
            compile(&resources, &[], &[], &[], &[]),
            Err(RulesError::TooManyRules { .. })
        ));
    }
}
