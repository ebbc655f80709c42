//! Naming and numbering helpers from the reference plugin (spec cni.md 2.1, 2.2): host veth
//! names, the dummy result interface, container interface names, route table ids, gateways.
//!
//! These are part of the compatibility contract: Calico and ipamd's checkpoint pruning match
//! host veths by the hash suffix, and rule/table numbers must be the reference's.

use std::net::Ipv4Addr;

use sha1::{Digest, Sha1};

use crate::types::MAIN_TABLE;

/// The default host veth prefix (`AWS_VPC_K8S_CNI_VETHPREFIX`).
pub const DEFAULT_VETH_PREFIX: &str = "eni";
/// The host veth prefix of branch-ENI pods in `strict` mode.
pub const STRICT_BRANCH_VETH_PREFIX: &str = "vlan";
/// The longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;
/// The first link-local gateway; interface `i` uses `169.254.1.(i+1)`.
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// `BaseNumber` of the route table ids of network cards > 0.
pub const NETWORK_CARD_TABLE_BASE: u32 = 10000;

/// The first 11 hex characters of SHA-1 of `"<namespace>.<name>"` (index 0) or of
/// `"<namespace>.<name>.<index>"` (index > 0): the suffix shared by the host veth and the dummy
/// result interface.
pub fn pod_hash(namespace: &str, name: &str, index: u32) -> String {
    let key = if index == 0 {
        format!("{namespace}.{name}")
    } else {
        format!("{namespace}.{name}.{index}")
    };
    let digest = Sha1::digest(key.as_bytes());
    let mut hex = String::with_capacity(40);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex.truncate(11);
    hex
}

/// The host-side veth name of a pod's interface `index`: `prefix` + [`pod_hash`].
///
/// With the reference's 4-character maximum prefix the name fits IFNAMSIZ.
pub fn host_veth_name(prefix: &str, namespace: &str, name: &str, index: u32) -> String {
    format!("{prefix}{}", pod_hash(namespace, name, index))
}

/// The name of the "dummy" interface the plugin puts in its result (never created):
/// `dummy` + the index-0 hash.
pub fn dummy_interface_name(namespace: &str, name: &str) -> String {
    format!("dummy{}", pod_hash(namespace, name, 0))
}

/// The container-side interface name: `CNI_IFNAME` for index 0, `mNicIf<i>` for i > 0.
pub fn container_ifname(cni_ifname: &str, index: u32) -> String {
    if index == 0 {
        cni_ifname.to_string()
    } else {
        format!("mNicIf{index}")
    }
}

/// The pod's link-local IPv4 gateway for interface `index`: `169.254.1.(index+1)`.
///
/// Returns `None` past index 253, where the scheme runs out of addresses.
pub fn pod_gateway_v4(index: u32) -> Option<Ipv4Addr> {
    let last = u8::try_from(index.checked_add(1)?).ok()?;
    (last < 255).then(|| Ipv4Addr::new(169, 254, 1, last))
}

/// The IPv6 gateway of pod interface `index`: `fe80::(index+1)` (`fe80::1` for eth0), the
/// same bound on the index as [`pod_gateway_v4`].
pub fn pod_gateway_v6(index: u32) -> Option<std::net::Ipv6Addr> {
    let last = u16::try_from(index.checked_add(1)?).ok()?;
    (last < 255).then(|| std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, last))
}

/// The route table inside the pod's namespace for interface `index`: main for 0, `index`
/// otherwise.
pub fn pod_table(index: u32) -> u32 {
    if index == 0 {
        MAIN_TABLE
    } else {
        index
    }
}

/// `CalculateRouteTableId`: the host route table of an ENI.
///
/// Network card 0: device 0 (the primary ENI) → main (254), device d → d+1.
/// Network card k > 0: `10000 + d + 100*k`.
pub fn route_table_id(network_card: u32, device_number: u32) -> u32 {
    if network_card == 0 {
        if device_number == 0 {
            MAIN_TABLE
        } else {
            device_number + 1
        }
    } else {
        NETWORK_CARD_TABLE_BASE + device_number + 100 * network_card
    }
}

/// The legacy multi-card formula recognised during migration: `d + 1 + k*max_enis_per_card`.
pub fn legacy_route_table_id(network_card: u32, device_number: u32, max_enis_per_card: u32) -> u32 {
    device_number + 1 + network_card * max_enis_per_card
}

/// The host route table of a branch-ENI (VLAN) pod: `vlan_id + 100`.
pub fn vlan_route_table_id(vlan_id: u16) -> u32 {
    u32::from(vlan_id) + 100
}

/// The table the host-side pod rules use: the given table when greater than 1, main otherwise
/// (table 1 is legacy state and means main).
pub fn effective_host_table(route_table: u32) -> u32 {
    if route_table > 1 {
        route_table
    } else {
        MAIN_TABLE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_is_eni_plus_first_11_hex_of_sha1_of_namespace_dot_name() {
        // `printf default.web-0 | sha1sum` = 0d7763386da219ddff1faed1cc6576fb9d57d419
        let name = host_veth_name(DEFAULT_VETH_PREFIX, "default", "web-0", 0);
        assert_eq!(name, "eni0d7763386da");
        assert_eq!(name.len(), 14);
        assert!(name.len() <= MAX_IFNAME_LEN);
        assert_eq!(
            host_veth_name(STRICT_BRANCH_VETH_PREFIX, "default", "web-0", 0).len(),
            MAX_IFNAME_LEN
        );
    }

    #[test]
    fn sha1_is_the_real_sha1() {
        // FIPS 180 test vector: SHA-1("abc").
        let d = Sha1::digest(b"abc");
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "a9993e364706816aba3e25717850c26c9cd0d89d");
    }

    #[test]
    fn later_interfaces_hash_name_dot_index() {
        // `printf default.web-0.2 | sha1sum` = 68e8eca5cc45cef3178742ca0a51ac8c22ebc0ce
        assert_eq!(
            host_veth_name("eni", "default", "web-0", 2),
            "eni68e8eca5cc4"
        );
        assert_ne!(
            host_veth_name("eni", "default", "web-0", 2),
            host_veth_name("eni", "default", "web-0", 0)
        );
    }

    #[test]
    fn dummy_name_is_dummy_plus_index_0_hash() {
        let n = dummy_interface_name("kube-system", "coredns-abc");
        assert_eq!(
            n,
            format!("dummy{}", pod_hash("kube-system", "coredns-abc", 0))
        );
        assert_eq!(n.len(), 16);
    }

    #[test]
    fn container_ifnames() {
        assert_eq!(container_ifname("eth0", 0), "eth0");
        assert_eq!(container_ifname("eth0", 1), "mNicIf1");
    }

    #[test]
    fn gateways_are_169_254_1_index_plus_1() {
        assert_eq!(pod_gateway_v4(0), Some(Ipv4Addr::new(169, 254, 1, 1)));
        assert_eq!(pod_gateway_v4(3), Some(Ipv4Addr::new(169, 254, 1, 4)));
        assert_eq!(pod_gateway_v4(253), Some(Ipv4Addr::new(169, 254, 1, 254)));
        assert_eq!(pod_gateway_v4(254), None);
        assert_eq!(pod_table(0), 254);
        assert_eq!(pod_table(2), 2);
    }

    #[test]
    fn route_table_ids_follow_calculate_route_table_id() {
        assert_eq!(route_table_id(0, 0), 254);
        assert_eq!(route_table_id(0, 1), 2);
        assert_eq!(route_table_id(0, 7), 8);
        assert_eq!(route_table_id(1, 0), 10100);
        assert_eq!(route_table_id(2, 3), 10203);
        assert_eq!(legacy_route_table_id(1, 0, 15), 16);
        assert_eq!(vlan_route_table_id(5), 105);
        assert_eq!(effective_host_table(1), 254);
        assert_eq!(effective_host_table(0), 254);
        assert_eq!(effective_host_table(3), 3);
    }
}
