//! The one decision every connect and datagram goes through.

use aya_ebpf::btf_maps::{LpmTrie, lpm_trie::Key};
use jitgate_common::{
    DestAddr, DestRules, GateConfig, MAX_DEST_PREFIXES, MAX_PORT_RULES, action, egress,
    is_v4_mapped, v4_mapped,
};

pub(crate) enum Verdict {
    /// Let the operation proceed untouched.
    Pass,
    /// Fail it with `EPERM`.
    Refuse,
    /// TCP to a resource: rewrite to the proxy and record the original destination.
    Redirect { resource: u32 },
    /// TCP to the proxy listener itself: only legitimate when a nested instance of these
    /// programs already redirected the socket.
    AlreadyRedirected,
}

type DestTrie = LpmTrie<DestAddr, DestRules, { MAX_DEST_PREFIXES as usize }>;

const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// Connecting to `0.0.0.0` or `::` reaches the local host; look those up as loopback so the
/// unspecified address is never a way around a local resource.
#[inline(always)]
fn normalize(dst: [u32; 4]) -> [u32; 4] {
    if is_v4_mapped(&dst) {
        if dst[3] == 0 {
            return v4_mapped(LOOPBACK4);
        }
    } else if dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && dst[3] == 0 {
        return LOOPBACK6;
    }
    dst
}

#[inline(always)]
fn is_loopback(dst: &[u32; 4]) -> bool {
    if is_v4_mapped(dst) {
        dst[3].to_ne_bytes()[0] == 127
    } else {
        *dst == LOOPBACK6
    }
}

#[inline(always)]
pub(crate) fn decide(
    trie: &DestTrie,
    cfg: &GateConfig,
    dst: [u32; 4],
    port: u16,
    is_stream: bool,
) -> Verdict {
    let dst = normalize(dst);
    if is_stream && port == cfg.proxy_port && is_loopback(&dst) {
        return Verdict::AlreadyRedirected;
    }
    if let Some(rules) = trie.get(&Key::new(128, DestAddr { addr: dst })) {
        let len = rules.len as usize;
        let mut i = 0;
        while i < MAX_PORT_RULES {
            if i >= len {
                break;
            }
            let rule = &rules.rules[i];
            i += 1;
            if port < rule.port_lo || port > rule.port_hi {
                continue;
            }
            match rule.action {
                action::RESOURCE => {
                    return if is_stream {
                        Verdict::Redirect {
                            resource: rule.resource,
                        }
                    } else {
                        Verdict::Refuse
                    };
                }
                action::RESOLVER => return Verdict::Pass,
                action::DENY => return Verdict::Refuse,
                // The allowlist is for TCP; a datagram keeps looking (a resolver may follow).
                action::ALLOW if is_stream => return Verdict::Pass,
                _ => {}
            }
        }
    }
    if cfg.egress == egress::ALLOW {
        Verdict::Pass
    } else {
        Verdict::Refuse
    }
}
