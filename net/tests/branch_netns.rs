//! The branch link's real implementations in namespaces each test creates (root only; skips
//! otherwise): the 802.1Q VLAN link, which either is created (a kernel with 8021q) or fails
//! with the error that names the missing support, and the hot-plug rename.

use std::process::Command;

use vpc_cni_net::branch::{BranchLink, HotplugBranchLink, VlanBranchLink};
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::{MacAddr, NetError, Netlink};

fn ip(ns: &TestNetns, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "ip"])
        .args(args)
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_vlan_branch_link_is_made_on_the_trunk_or_the_error_names_8021q() {
    if skip_netns_test("vlan_branch_link") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    ip(
        &host,
        &[
            "link", "add", "trunk0", "type", "veth", "peer", "name", "trunk0p",
        ],
    );
    let nl = Netlink::open(&host).expect("netlink");
    let trunk = nl.require_link("trunk0").await.expect("trunk");
    let mac: MacAddr = "0a:00:00:00:00:07".parse().expect("mac");
    let vlan = VlanBranchLink::new(&nl);
    match vlan.create(trunk.index, 7, mac, "vlan.eth.7").await {
        Ok(index) => {
            let l = nl.require_link("vlan.eth.7").await.expect("vlan link");
            assert_eq!(l.index, index);
            assert_eq!(l.mac, Some(mac));
            assert_eq!(l.kind.as_deref(), Some("vlan"));
            assert!(vlan.delete("vlan.eth.7").await.expect("delete"));
            assert!(!vlan.delete("vlan.eth.7").await.expect("delete again"));
        }
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("8021q") && text.contains("vlan.eth.7"),
                "{text}"
            );
            match &e {
                NetError::NoVlanSupport { source, .. } => {
                    assert_eq!(source.errno(), Some(nix::libc::EOPNOTSUPP), "{source:?}")
                }
                other => panic!("not the missing-8021q error: {other:?}"),
            }
            assert!(nl.link_by_name("vlan.eth.7").await.expect("get").is_none());
        }
    }
}

#[tokio::test]
async fn a_hotplug_branch_link_is_found_by_mac_renamed_down_and_deleted_by_name() {
    if skip_netns_test("hotplug_branch_link") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let mac: MacAddr = "0a:00:00:00:00:09".parse().expect("mac");
    ip(
        &host,
        &[
            "link",
            "add",
            "br9",
            "address",
            "0a:00:00:00:00:09",
            "type",
            "veth",
            "peer",
            "name",
            "br9p",
        ],
    );
    ip(&host, &["link", "set", "br9", "up"]);
    // A stale link already holding the name goes first.
    ip(
        &host,
        &[
            "link",
            "add",
            "vlan.eth.9",
            "type",
            "veth",
            "peer",
            "name",
            "stale9p",
        ],
    );
    let nl = Netlink::open(&host).expect("netlink");
    let before = nl.require_link("br9").await.expect("br9");
    let hp = HotplugBranchLink::new(&nl);
    let index = hp.create(0, 9, mac, "vlan.eth.9").await.expect("create");
    assert_eq!(index, before.index);
    let l = nl.require_link("vlan.eth.9").await.expect("renamed");
    assert_eq!((l.index, l.mac, l.up), (before.index, Some(mac), false));
    assert!(nl.link_by_name("br9").await.expect("get").is_none());
    assert!(nl.link_by_name("stale9p").await.expect("get").is_none());
    // Taken again (a re-ADD): the same link, no error.
    assert_eq!(
        hp.create(0, 9, mac, "vlan.eth.9").await.expect("again"),
        index
    );
    let e = hp
        .create(
            0,
            10,
            "0a:00:00:00:00:10".parse().expect("mac"),
            "vlan.eth.10",
        )
        .await
        .expect_err("no such MAC");
    assert!(e.to_string().contains("0a:00:00:00:00:10"), "{e}");
    assert!(hp.delete("vlan.eth.9").await.expect("delete"));
    assert!(!hp.delete("vlan.eth.9").await.expect("absent tolerated"));
}
