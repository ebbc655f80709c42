//! ADD results in each version's JSON, the error JSON, and `prevResult` parsing.
//!
//! The result layout is the reference's (spec cni.md 1.5, compatibility contract 6.3): for
//! each address i, a host entry `{name: hostVeth_i}` then a container entry
//! `{name, sandbox: CNI_NETNS, mac: "<route table id>"}`; last, a dummy entry
//! `{name: "dummy"+hash, mac: "0", sandbox: "<device number>"}` (branch-ENI pods: `mac` =
//! VLAN id, no sandbox). `ips[i].interface` points at the container entry. DEL without ipamd
//! relies on this encoding.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vpc_cni_net::names::route_table_id;
use vpc_cni_net::IpCidr;

use crate::error::CniError;
use crate::version::CniVersion;

/// The largest 802.1Q VLAN id (a branch-ENI dummy's `mac`).
pub const MAX_VLAN_ID: u32 = 4094;

/// One wired pod interface, as ADD reports it and DEL/CHECK read it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAttachment {
    /// Host veth name (absent when a prevResult lacks the host entry).
    pub host_veth: Option<String>,
    /// Container interface name.
    pub container_ifname: String,
    /// The sandbox (netns path) of the container entry.
    pub sandbox: String,
    /// The pod's address (IPv4, or IPv6 in an IPv6 cluster).
    pub ip: IpAddr,
    /// The host route table of the ENI owning the address.
    pub route_table: u32,
}

/// The dummy entry's meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DummyInfo {
    /// A normal pod: the device number of address 0.
    Normal {
        /// ENI device number.
        device_number: i32,
    },
    /// A branch-ENI pod: its VLAN id.
    Branch {
        /// VLAN id.
        vlan_id: u32,
    },
}

/// An entry of `interfaces`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Interface name.
    #[serde(default)]
    pub name: String,
    /// MAC (the reference stores the route table id or VLAN id here).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// Netns path (or, for the dummy, the device number).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

/// An entry of `ips`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `"4"` or `"6"`: only in 0.3.x/0.4.0 results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// `addr/len`.
    pub address: String,
    /// Gateway, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// A version-independent ADD result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddResult {
    /// `interfaces`, in the reference's order.
    pub interfaces: Vec<Interface>,
    /// `ips`.
    pub ips: Vec<IpConfig>,
}

impl AddResult {
    /// Builds the reference's result for the wired `attachments` (index order) and the dummy.
    pub fn build(attachments: &[PodAttachment], dummy_name: &str, dummy: DummyInfo) -> AddResult {
        let mut interfaces = Vec::with_capacity(attachments.len() * 2 + 1);
        let mut ips = Vec::with_capacity(attachments.len());
        for a in attachments {
            interfaces.push(Interface {
                name: a.host_veth.clone().unwrap_or_default(),
                ..Interface::default()
            });
            interfaces.push(Interface {
                name: a.container_ifname.clone(),
                mac: a.route_table.to_string(),
                sandbox: a.sandbox.clone(),
            });
            ips.push(IpConfig {
                version: None,
                interface: Some(interfaces.len() - 1),
                address: IpCidr::host(a.ip).to_string(),
                gateway: None,
            });
        }
        interfaces.push(match dummy {
            DummyInfo::Normal { device_number } => Interface {
                name: dummy_name.to_string(),
                mac: "0".into(),
                sandbox: device_number.to_string(),
            },
            DummyInfo::Branch { vlan_id } => Interface {
                name: dummy_name.to_string(),
                mac: vlan_id.to_string(),
                sandbox: String::new(),
            },
        });
        AddResult { interfaces, ips }
    }

    /// The result JSON for `version` (libcni's conversion rules).
    pub fn render(&self, version: CniVersion) -> Value {
        if version.is_legacy_result() {
            let mut out = json!({"cniVersion": version.as_str(), "dns": {}});
            if let Some(ip) = self.ips.first() {
                let mut entry = json!({ "ip": ip.address });
                if let Some(gw) = &ip.gateway {
                    entry["gateway"] = json!(gw);
                }
                let key = if ip.address.contains(':') {
                    "ip6"
                } else {
                    "ip4"
                };
                out[key] = entry;
            }
            return out;
        }
        let ips: Vec<IpConfig> = self
            .ips
            .iter()
            .map(|ip| IpConfig {
                version: version.ips_have_version().then(|| {
                    if ip.address.contains(':') {
                        "6".to_string()
                    } else {
                        "4".to_string()
                    }
                }),
                ..ip.clone()
            })
            .collect();
        json!({
            "cniVersion": version.as_str(),
            "interfaces": self.interfaces,
            "ips": ips,
            "dns": {},
        })
    }
}

/// The error JSON every version defines (`cniVersion`, `code`, `msg`, `details`).
pub fn error_json(version: CniVersion, err: &CniError) -> Value {
    let mut v = json!({
        "cniVersion": version.as_str(),
        "code": err.code(),
        "msg": err.to_string(),
    });
    let details = err.details();
    if !details.is_empty() {
        v["details"] = json!(details);
    }
    v
}

/// A `prevResult` as sent back on DEL and CHECK (0.3.0 and later layouts).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct PrevResult {
    /// `interfaces`.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// `ips`.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
}

impl PrevResult {
    /// Parses a raw `prevResult`.
    pub fn parse(v: &Value) -> Result<PrevResult, CniError> {
        serde_path_to_error::deserialize(v)
            .map_err(|e| CniError::decode_at("prevResult", "prevResult", e))
    }

    /// The dummy entry (the last interface named `dummy…`), if present.
    pub fn dummy(&self) -> Option<DummyInfo> {
        let d = self
            .interfaces
            .iter()
            .rev()
            .find(|i| i.name.starts_with("dummy"))?;
        // Only an 802.1Q id (1..=4094) is a VLAN; anything else in `mac` ("0", a real MAC
        // written by a chained plugin, a number past u32) is a normal pod's dummy.
        let vlan: u32 = d.mac.parse().unwrap_or(0);
        if (1..=MAX_VLAN_ID).contains(&vlan) {
            Some(DummyInfo::Branch { vlan_id: vlan })
        } else {
            Some(DummyInfo::Normal {
                device_number: d.sandbox.parse().unwrap_or(0),
            })
        }
    }

    /// The pod attachments encoded in this result, as the reference's
    /// `teardownPodNetworkWithPrevResult` reads them: the table comes from the container
    /// entry's `mac` when it parses, otherwise from the dummy's device number (card 0).
    /// IPv4 and IPv6 addresses both count (an IPv6 cluster's pods have a /128).
    pub fn attachments(&self) -> Vec<PodAttachment> {
        let fallback_table = match self.dummy() {
            Some(DummyInfo::Normal { device_number }) => {
                route_table_id(0, u32::try_from(device_number).unwrap_or(0))
            }
            Some(DummyInfo::Branch { vlan_id }) => vlan_id.saturating_add(100),
            None => vpc_cni_net::MAIN_TABLE,
        };
        let mut out = Vec::new();
        for ip in &self.ips {
            let Some(idx) = ip.interface else { continue };
            let Some(cont) = self.interfaces.get(idx) else {
                continue;
            };
            let Ok(cidr) = ip.address.parse::<IpCidr>() else {
                continue;
            };
            let host_veth = idx
                .checked_sub(1)
                .and_then(|h| self.interfaces.get(h))
                .filter(|h| h.sandbox.is_empty() && !h.name.starts_with("dummy"))
                .map(|h| h.name.clone());
            out.push(PodAttachment {
                host_veth,
                container_ifname: cont.name.clone(),
                sandbox: cont.sandbox.clone(),
                ip: cidr.addr,
                route_table: cont.mac.parse().unwrap_or(fallback_table),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn att(i: u8, table: u32) -> PodAttachment {
        PodAttachment {
            host_veth: Some(format!("eni{i:011}")),
            container_ifname: if i == 0 {
                "eth0".into()
            } else {
                format!("mNicIf{i}")
            },
            sandbox: "/var/run/netns/p1".into(),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 10 + i)),
            route_table: table,
        }
    }

    #[test]
    fn the_result_has_host_container_then_dummy_with_table_and_device_number() {
        let r = AddResult::build(
            &[att(0, 3)],
            "dummy0d7763386da",
            DummyInfo::Normal { device_number: 2 },
        );
        let v = r.render(CniVersion::V1_0_0);
        assert_eq!(
            v,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "eni00000000000"},
                    {"name": "eth0", "mac": "3", "sandbox": "/var/run/netns/p1"},
                    {"name": "dummy0d7763386da", "mac": "0", "sandbox": "2"}
                ],
                "ips": [{"interface": 1, "address": "10.0.1.10/32"}],
                "dns": {}
            })
        );
    }

    #[test]
    fn version_0_4_0_and_0_3_1_ips_carry_version_and_1_1_0_does_not() {
        let r = AddResult::build(
            &[att(0, 254)],
            "dummyx",
            DummyInfo::Normal { device_number: 0 },
        );
        for v in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let j = r.render(v);
            assert_eq!(j["ips"][0]["version"], "4", "{v}");
            assert_eq!(j["cniVersion"], v.as_str());
        }
        let j = r.render(CniVersion::V1_1_0);
        assert!(j["ips"][0].get("version").is_none());
        assert_eq!(j["cniVersion"], "1.1.0");
        assert_eq!(j["interfaces"][1]["mac"], "254");
    }

    #[test]
    fn legacy_versions_use_ip4() {
        let r = AddResult::build(
            &[att(0, 254)],
            "dummyx",
            DummyInfo::Normal { device_number: 0 },
        );
        let j = r.render(CniVersion::V0_2_0);
        assert_eq!(
            j,
            json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.0.1.10/32"}, "dns": {}})
        );
    }

    #[test]
    fn an_ipv6_pod_reports_a_128_with_version_6_and_round_trips() {
        let mut a = att(0, 254);
        a.ip = "2001:db8:1:2:3::7".parse().expect("ip");
        let r = AddResult::build(
            std::slice::from_ref(&a),
            "dummyx",
            DummyInfo::Normal { device_number: 0 },
        );
        let j = r.render(CniVersion::V0_4_0);
        assert_eq!(j["ips"][0]["address"], "2001:db8:1:2:3::7/128");
        assert_eq!(j["ips"][0]["version"], "6");
        assert_eq!(j["ips"][0]["interface"], 1);
        assert!(j["ips"][0].get("gateway").is_none());
        for v in [CniVersion::V0_4_0, CniVersion::V1_0_0, CniVersion::V1_1_0] {
            let p = PrevResult::parse(&r.render(v)).expect("parse");
            assert_eq!(p.attachments(), vec![a.clone()], "{v}");
        }
        let j = r.render(CniVersion::V0_2_0);
        assert_eq!(j["ip6"]["ip"], "2001:db8:1:2:3::7/128");
        assert!(j.get("ip4").is_none());
    }

    #[test]
    fn branch_pods_put_the_vlan_in_the_dummy_mac_without_sandbox() {
        let r = AddResult::build(&[att(0, 105)], "dummyx", DummyInfo::Branch { vlan_id: 5 });
        let j = r.render(CniVersion::V0_4_0);
        assert_eq!(j["interfaces"][2], json!({"name": "dummyx", "mac": "5"}));
        let p = PrevResult::parse(&j).expect("parse");
        assert_eq!(p.dummy(), Some(DummyInfo::Branch { vlan_id: 5 }));
    }

    #[test]
    fn a_branch_result_carries_the_gateway_and_round_trips_as_a_branch() {
        let mut r = AddResult::build(&[att(0, 0)], "dummyx", DummyInfo::Branch { vlan_id: 4094 });
        r.ips[0].gateway = Some("10.0.1.1".into());
        for v in [CniVersion::V0_4_0, CniVersion::V1_0_0, CniVersion::V1_1_0] {
            let j = r.render(v);
            assert_eq!(j["interfaces"][1]["mac"], "0", "{v}");
            assert_eq!(
                j["interfaces"][2],
                json!({"name": "dummyx", "mac": "4094"}),
                "{v}"
            );
            assert_eq!(j["ips"][0]["gateway"], "10.0.1.1", "{v}");
            let p = PrevResult::parse(&j).expect("parse");
            assert_eq!(p.dummy(), Some(DummyInfo::Branch { vlan_id: 4094 }), "{v}");
            assert_eq!(p.attachments()[0].ip, att(0, 0).ip);
        }
        // A VLAN id past 802.1Q's range is no branch.
        let j = AddResult::build(&[att(0, 0)], "dummyx", DummyInfo::Branch { vlan_id: 4095 })
            .render(CniVersion::V1_0_0);
        assert!(matches!(
            PrevResult::parse(&j).expect("parse").dummy(),
            Some(DummyInfo::Normal { .. })
        ));
    }

    #[test]
    fn prev_result_round_trips_for_every_version_with_check() {
        let atts = vec![att(0, 3), att(1, 10101)];
        let r = AddResult::build(&atts, "dummyx", DummyInfo::Normal { device_number: 2 });
        assert_eq!(r.ips[1].interface, Some(3));
        for v in [CniVersion::V0_4_0, CniVersion::V1_0_0, CniVersion::V1_1_0] {
            let p = PrevResult::parse(&r.render(v)).expect("parse");
            assert_eq!(p.attachments(), atts, "{v}");
            assert_eq!(p.dummy(), Some(DummyInfo::Normal { device_number: 2 }));
        }
    }

    #[test]
    fn an_old_prev_result_without_a_table_in_mac_uses_the_dummy_device_number() {
        let p = PrevResult::parse(&json!({
            "cniVersion": "0.4.0",
            "interfaces": [
                {"name": "enia"},
                {"name": "eth0", "sandbox": "/proc/1/ns/net"},
                {"name": "dummya", "mac": "0", "sandbox": "3"}
            ],
            "ips": [{"version": "4", "interface": 1, "address": "10.0.0.9/32"}]
        }))
        .expect("parse");
        let a = p.attachments();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].route_table, 4, "device 3 -> table 4");
        assert_eq!(a[0].host_veth.as_deref(), Some("enia"));
        let p = PrevResult::parse(&json!({
            "interfaces": [{"name": "eth0", "sandbox": "/x"}],
            "ips": [{"interface": 0, "address": "10.0.0.9/32"}, {"address": "10.0.0.8/32"}]
        }))
        .expect("parse");
        let a = p.attachments();
        assert_eq!(a.len(), 1, "an ip without interface is skipped");
        assert_eq!(a[0].route_table, 254);
        assert_eq!(a[0].host_veth, None);
    }

    #[test]
    fn chained_plugins_results_are_tolerated() {
        // portmap/bandwidth pass the result through; tuning may set a real mac on eth0.
        let p = PrevResult::parse(&json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "enib"},
                {"name": "eth0", "mac": "3", "sandbox": "/x", "mtu": 1500},
                {"name": "dummyb", "mac": "0", "sandbox": "2"},
                {"name": "v6if0", "sandbox": "/x"}
            ],
            "ips": [{"interface": 1, "address": "10.0.0.9/32", "gateway": "10.0.0.1"}],
            "routes": [],
            "dns": {}
        }))
        .expect("parse");
        assert_eq!(p.attachments()[0].route_table, 3);
        assert!(PrevResult::parse(&json!({"interfaces": 3})).is_err());
    }

    #[test]
    fn error_json_has_code_msg_and_details() {
        let e = CniError::Ipamd {
            op: "AddNetwork",
            source: tonic::Status::unavailable("down"),
        };
        let j = error_json(CniVersion::V0_4_0, &e);
        assert_eq!(j["code"], 101);
        assert_eq!(j["cniVersion"], "0.4.0");
        assert_eq!(j["msg"], "ipamd AddNetwork failed");
        assert!(j["details"].as_str().expect("details").contains("down"));
    }
}
