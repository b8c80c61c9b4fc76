//! Parsing of the address forms the config accepts.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use ipnet::IpNet;

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const fn single(port: u16) -> Self {
        Self { lo: port, hi: port }
    }

    pub const fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(format!("`{p}` is not a port (1-65535)")),
                Ok(port) => Ok(port),
            }
        };
        match s.split_once('-') {
            None => Ok(Self::single(parse(s)?)),
            Some((lo, hi)) => {
                let (lo, hi) = (parse(lo)?, parse(hi)?);
                if lo > hi {
                    return Err(format!("port range `{s}` is reversed"));
                }
                Ok(Self { lo, hi })
            }
        }
    }
}

/// Where a resource lives: a host name resolved by the daemon, or literal addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `db.internal:5432`: every address the name resolves to is a resource address.
    Host { name: String, ports: PortRange },
    /// `10.0.0.5:5432`, `[fd00::5]:5432`, `10.0.0.0/24:5432-5440`.
    Net { net: IpNet, ports: PortRange },
}

impl Target {
    pub const fn ports(&self) -> PortRange {
        match self {
            Self::Host { ports, .. } | Self::Net { ports, .. } => *ports,
        }
    }

    /// Whether a workload that reached this resource at `reached` reached the one server it
    /// names, or picked a server itself: out of an address or port range, or at another
    /// loopback or host address of a local resource (which answers on all of them, where
    /// anyone may listen). A host name counts at the canonical loopback addresses
    /// (`localhost`) and at addresses not of this host; `host_addresses` (this host's own) is
    /// only asked for a host name.
    /// Where the gate connects for a workload that reached this resource at `reached`: the
    /// resource's own endpoint, not whatever local address the workload picked. A local
    /// resource answers at every loopback and host address (the gate routes them all to it),
    /// but other services may listen at those: `127.0.0.1:5432` is reached at `127.0.0.2`,
    /// `[::1]` or a host address and still connects to `127.0.0.1:5432`; a host name at a
    /// non-canonical local address connects to the canonical loopback of the same family;
    /// an address range only within the range. `Err` says why the reached address is none
    /// of the resource's.
    pub fn endpoint(
        &self,
        reached: SocketAddr,
        host_addresses: impl FnOnce() -> Vec<IpAddr>,
    ) -> Result<SocketAddr, String> {
        let ports = self.ports();
        if !(ports.lo..=ports.hi).contains(&reached.port()) {
            return Err(format!("{reached} is outside the resource's ports {ports}"));
        }
        let ip = reached.ip().to_canonical();
        match self {
            Self::Net { net, .. } if net.prefix_len() == net.max_prefix_len() => {
                Ok(SocketAddr::new(net.addr(), reached.port()))
            }
            Self::Net { net, .. } if net.contains(&ip) => Ok(SocketAddr::new(ip, reached.port())),
            Self::Net { net, .. } => Err(format!(
                "{reached} is a local address outside the resource's {net}"
            )),
            Self::Host { .. } => {
                let canonical = if ip.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    IpAddr::V6(Ipv6Addr::LOCALHOST)
                };
                let local =
                    ip.is_loopback() || ip.is_unspecified() || host_addresses().contains(&ip);
                Ok(SocketAddr::new(
                    if local { canonical } else { ip },
                    reached.port(),
                ))
            }
        }
    }

    pub fn names_one_server(
        &self,
        reached: IpAddr,
        host_addresses: impl FnOnce() -> Vec<IpAddr>,
    ) -> bool {
        let ports = self.ports();
        if ports.lo != ports.hi {
            return false;
        }
        match self {
            Self::Net { net, .. } => {
                net.prefix_len() == net.max_prefix_len() && reached == net.addr()
            }
            Self::Host { .. } => {
                let ip = reached.to_canonical();
                ip == Ipv4Addr::LOCALHOST
                    || ip == Ipv6Addr::LOCALHOST
                    || (!ip.is_loopback() && !host_addresses().contains(&ip))
            }
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host { name, ports } => write!(f, "{name}:{ports}"),
            Self::Net { net, ports } => match net {
                IpNet::V4(n) if n.prefix_len() == 32 => write!(f, "{}:{ports}", n.addr()),
                IpNet::V6(n) if n.prefix_len() == 128 => write!(f, "[{}]:{ports}", n.addr()),
                IpNet::V4(_) => write!(f, "{net}:{ports}"),
                IpNet::V6(_) => write!(f, "[{net}]:{ports}"),
            },
        }
    }
}

/// Splits `host:ports` or `[v6]:ports` into its two halves.
fn split_host_ports(s: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, tail) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{s}`: missing `]` after an IPv6 address"))?;
        let ports = tail
            .strip_prefix(':')
            .ok_or_else(|| format!("`{s}`: expected `:PORT` after `]`"))?;
        return Ok((host, ports));
    }
    let (host, ports) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}`: expected HOST:PORT"))?;
    if host.contains(':') {
        return Err(format!(
            "`{s}`: write IPv6 addresses in brackets, as `[fd00::5]:5432`"
        ));
    }
    Ok((host, ports))
}

fn parse_net(host: &str) -> Option<IpNet> {
    if host.contains('/') {
        return IpNet::from_str(host).ok().map(|n| n.trunc());
    }
    IpAddr::from_str(host).ok().map(IpNet::from)
}

fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
        })
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (host, ports) = split_host_ports(s.trim())?;
        let ports = PortRange::from_str(ports).map_err(|e| format!("`{s}`: {e}"))?;
        if let Some(net) = parse_net(host) {
            return Ok(Self::Net { net, ports });
        }
        if host.contains('/') {
            return Err(format!("`{s}`: `{host}` is not a valid CIDR block"));
        }
        if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(format!("`{s}`: `{host}` is not a valid IPv4 address"));
        }
        if !is_host_name(host) {
            return Err(format!(
                "`{s}`: `{host}` is neither an IP address nor a host name"
            ));
        }
        Ok(Self::Host {
            name: host.to_ascii_lowercase(),
            ports,
        })
    }
}

/// An allowlist entry: literal network plus ports (no host names: the allowlist must not
/// move when DNS does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetPorts {
    pub net: IpNet,
    pub ports: PortRange,
}

impl FromStr for NetPorts {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match Target::from_str(s)? {
            Target::Net { net, ports } => Ok(Self { net, ports }),
            Target::Host { .. } => Err(format!(
                "`{s}`: allowlist entries take an address or CIDR block, not a host name"
            )),
        }
    }
}

impl fmt::Display for NetPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Target::Net {
            net: self.net,
            ports: self.ports,
        }
        .fmt(f)
    }
}

/// A DNS resolver: `10.0.0.2`, `10.0.0.2:5353`, `[fd00::53]:53`.
pub fn parse_resolver(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(ip) = IpAddr::from_str(s) {
        return Ok(SocketAddr::new(ip, 53));
    }
    SocketAddr::from_str(s).map_err(|_| format!("`{s}` is not an IP address or IP:PORT"))
}

/// The name servers in `/etc/resolv.conf`, port 53: the default resolver list.
pub fn system_resolvers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|ns| {
            // Drop a zone suffix (`fe80::1%eth0`): the gate matches addresses only.
            let ns = ns.split('%').next().unwrap_or(ns);
            IpAddr::from_str(ns).ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A listen address for the proxy.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    SocketAddr::from_str(s.trim()).map_err(|_| format!("`{s}` is not IP:PORT"))
}

pub const LOCALHOST4: Ipv4Addr = Ipv4Addr::LOCALHOST;
pub const LOCALHOST6: Ipv6Addr = Ipv6Addr::LOCALHOST;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_server_means_one_host_and_one_port() {
        let one = |s: &str, at: &str| {
            s.parse::<Target>()
                .unwrap()
                .names_one_server(at.parse().unwrap(), || vec!["10.1.1.1".parse().unwrap()])
        };
        assert!(one("db.internal:5432", "10.0.0.5"));
        assert!(one("10.0.0.5:5432", "10.0.0.5"));
        assert!(one("[fd00::5]:5432", "fd00::5"));
        assert!(one("10.0.0.5/32:5432", "10.0.0.5"));
        assert!(!one("10.0.0.0/24:5432", "10.0.0.5"));
        assert!(!one("10.0.0.5:5432-5433", "10.0.0.5"));
        assert!(!one("db.internal:5432-5440", "10.0.0.5"));
        // A local resource at another of this host's addresses.
        assert!(one("127.0.0.1:5432", "127.0.0.1"));
        assert!(!one("127.0.0.1:5432", "127.0.0.2"));
        assert!(one("localhost:5432", "127.0.0.1"));
        assert!(one("localhost:5432", "::1"));
        assert!(!one("localhost:5432", "127.0.0.2"));
        assert!(!one("localhost:5432", "10.1.1.1"));
    }

    #[test]
    fn the_gate_connects_to_the_resources_endpoint() {
        let at = |s: &str, reached: &str| {
            s.parse::<Target>()
                .unwrap()
                .endpoint(reached.parse().unwrap(), || {
                    vec!["10.1.1.1".parse().unwrap()]
                })
                .map(|a| a.to_string())
        };
        // A local resource reached at another loopback or host address.
        for reached in [
            "127.0.0.1:5432",
            "127.0.0.2:5432",
            "[::1]:5432",
            "10.1.1.1:5432",
        ] {
            assert_eq!(
                at("127.0.0.1:5432", reached).as_deref(),
                Ok("127.0.0.1:5432")
            );
        }
        assert_eq!(
            at("[::1]:8080", "127.0.0.9:8080").as_deref(),
            Ok("[::1]:8080")
        );
        // A host name: the address reached, or the canonical loopback for other local ones.
        assert_eq!(
            at("db.internal:5432", "10.0.0.5:5432").as_deref(),
            Ok("10.0.0.5:5432")
        );
        assert_eq!(
            at("localhost:5432", "127.0.0.2:5432").as_deref(),
            Ok("127.0.0.1:5432")
        );
        assert_eq!(
            at("localhost:5432", "10.1.1.1:5432").as_deref(),
            Ok("127.0.0.1:5432")
        );
        assert_eq!(
            at("localhost:5432", "[::1]:5432").as_deref(),
            Ok("[::1]:5432")
        );
        // A range: inside it as reached; a local address outside it is none of its own.
        assert_eq!(
            at("10.0.0.0/24:5432-5440", "10.0.0.7:5433").as_deref(),
            Ok("10.0.0.7:5433")
        );
        assert!(at("127.0.0.0/30:5432", "10.1.1.1:5432").is_err());
        assert!(at("127.0.0.1:5432", "127.0.0.1:5433").is_err());
    }

    #[test]
    fn targets() {
        assert_eq!(
            "db.internal:5432".parse::<Target>().unwrap(),
            Target::Host {
                name: "db.internal".into(),
                ports: PortRange::single(5432)
            }
        );
        assert_eq!(
            "10.0.0.5:5432".parse::<Target>().unwrap().to_string(),
            "10.0.0.5:5432"
        );
        assert_eq!(
            "10.0.0.7/24:5432-5440"
                .parse::<Target>()
                .unwrap()
                .to_string(),
            "10.0.0.0/24:5432-5440"
        );
        assert_eq!(
            "[fd00::5]:443".parse::<Target>().unwrap().to_string(),
            "[fd00::5]:443"
        );
        assert_eq!(
            "[fd00::/64]:443".parse::<Target>().unwrap().to_string(),
            "[fd00::/64]:443"
        );
        for bad in [
            "db.internal",
            "10.0.0.5:0",
            "10.0.0.5:70000",
            "10.0.0.5:9-3",
            "fd00::5:443",
            "10.0.0.256:1",
            "10.0.0.0/33:1",
            "bad host:1",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn allowlist_refuses_names() {
        assert!("127.0.0.53/32:53".parse::<NetPorts>().is_ok());
        assert!("dns.google:53".parse::<NetPorts>().is_err());
    }

    #[test]
    fn resolvers() {
        assert_eq!(
            parse_resolver("10.0.0.2").unwrap(),
            "10.0.0.2:53".parse().unwrap()
        );
        assert_eq!(
            parse_resolver("[fd00::53]:5353").unwrap(),
            "[fd00::53]:5353".parse().unwrap()
        );
        let conf = "# c\nnameserver 10.255.255.53\nsearch x\nnameserver fe80::1%eth0\n";
        assert_eq!(
            system_resolvers(conf),
            vec![
                "10.255.255.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
