//! Which resource an original destination belongs to, answered from the same compiled rules
//! the kernel holds (so the proxy and the kernel always agree).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use jitgate_common::{DestRules, action};

use crate::gate::rules::{self, TrieKey};

#[derive(Default)]
struct Snapshot {
    trie: BTreeMap<TrieKey, DestRules>,
    names: Vec<String>,
}

/// Shared, swapped whole whenever the rules change.
#[derive(Clone, Default)]
pub struct Routes {
    inner: Arc<RwLock<Arc<Snapshot>>>,
}

/// Connecting to the unspecified address reaches this host; the kernel looks it up as
/// loopback, and so do we (and we connect upstream there).
pub fn normalize(dst: SocketAddr) -> SocketAddr {
    match dst.ip() {
        IpAddr::V4(a) if a.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), dst.port())
        }
        IpAddr::V6(a) if a.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), dst.port())
        }
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => normalize(SocketAddr::new(v4.into(), dst.port())),
            None => dst,
        },
        IpAddr::V4(_) => dst,
    }
}

impl Routes {
    pub fn update(&self, trie: BTreeMap<TrieKey, DestRules>, names: Vec<String>) {
        *self.inner.write().expect("routes lock") = Arc::new(Snapshot { trie, names });
    }

    /// The resource `dst` (already normalized) belongs to.
    pub fn resource_for(&self, dst: SocketAddr) -> Option<String> {
        let snapshot = self.inner.read().expect("routes lock").clone();
        let exact = TrieKey {
            prefix_len: 128,
            addr: rules::addr_words(dst.ip()),
        };
        let rule = match snapshot.trie.get(&exact) {
            Some(value) => value.rules[..value.len as usize]
                .iter()
                .find(|r| r.port_lo <= dst.port() && dst.port() <= r.port_hi)
                .copied(),
            None => rules::lookup(&snapshot.trie, dst.ip(), dst.port()),
        }?;
        (rule.action == action::RESOURCE)
            .then(|| snapshot.names.get(rule.resource as usize).cloned())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::rules::{ResourceAddrs, compile};

    #[test]
    fn finds_resources_by_destination() {
        let resources = vec![
            ResourceAddrs {
                index: 0,
                nets: vec!["10.0.0.5/32".parse().unwrap()],
                ports: "5432".parse().unwrap(),
            },
            ResourceAddrs {
                index: 1,
                nets: vec!["10.1.0.0/16".parse().unwrap()],
                ports: "443".parse().unwrap(),
            },
        ];
        let allow = vec!["10.0.0.0/8:80".parse().unwrap()];
        let routes = Routes::default();
        routes.update(
            compile(&resources, &allow, &[], &[], &[]).unwrap(),
            vec!["db".into(), "web".into()],
        );
        assert_eq!(
            routes.resource_for("10.0.0.5:5432".parse().unwrap()),
            Some("db".into())
        );
        assert_eq!(
            routes.resource_for("10.1.2.3:443".parse().unwrap()),
            Some("web".into())
        );
        assert_eq!(routes.resource_for("10.0.0.5:80".parse().unwrap()), None);
        assert_eq!(routes.resource_for("10.0.0.6:5432".parse().unwrap()), None);
    }

    #[test]
    fn normalizes_like_the_kernel() {
        assert_eq!(
            normalize("0.0.0.0:5".parse().unwrap()),
            "127.0.0.1:5".parse().unwrap()
        );
        assert_eq!(
            normalize("[::]:5".parse().unwrap()),
            "[::1]:5".parse().unwrap()
        );
        assert_eq!(
            normalize("[::ffff:10.0.0.5]:5".parse().unwrap()),
            "10.0.0.5:5".parse().unwrap()
        );
        assert_eq!(
            normalize("[::ffff:0.0.0.0]:5".parse().unwrap()),
            "127.0.0.1:5".parse().unwrap()
        );
    }
}
