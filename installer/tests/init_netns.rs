//! The init step in a test network namespace standing in for a node: the primary interface
//! is a veth end carrying (the test kernel has no dummy links) the "primary ENI" MAC, and the sysctls land in that namespace only.
//! Skips cleanly when not root.

use std::path::Path;
use std::process::Command;

use vpc_cni_installer::node::{self, SysctlOptions};
use vpc_cni_installer::InstallerError;
use vpc_cni_net::sysctl;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::MacAddr;

const MAC: &str = "02:aa:bb:cc:dd:01";

fn node_ns() -> TestNetns {
    let ns = TestNetns::new("init").expect("netns");
    let out = Command::new("ip")
        .args([
            "-n",
            ns.name(),
            "link",
            "add",
            "prim0",
            "address",
            MAC,
            "type",
            "veth",
            "peer",
            "name",
            "prim0p",
        ])
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ns
}

fn root_ns() -> vpc_cni_net::netns::Netns {
    vpc_cni_net::netns::Netns::current().expect("the test process's netns")
}

#[test]
fn init_sets_loose_rp_filter_and_early_demux_on_the_interface_with_the_primary_mac() {
    if skip_netns_test("init_sets_loose_rp_filter...") {
        return;
    }
    let ns = node_ns();
    let root_demux_before = sysctl::read(&root_ns(), "net/ipv4/tcp_early_demux").ok();
    let opts = SysctlOptions {
        disable_tcp_early_demux: true,
        ..SysctlOptions::default()
    };
    let mac: MacAddr = MAC.parse().expect("mac");
    let (primary, written) =
        node::set_node_sysctls(&ns, Path::new("/proc/sys"), mac, opts).expect("init");
    assert_eq!(primary, "prim0");
    assert_eq!(
        sysctl::read(&ns, "net/ipv4/conf/prim0/rp_filter").expect("read"),
        "2"
    );
    if written.iter().any(|(k, _)| k == "net/ipv4/tcp_early_demux") {
        assert_eq!(
            sysctl::read(&ns, "net/ipv4/tcp_early_demux").expect("read"),
            "0"
        );
    }
    assert_eq!(
        sysctl::read(&root_ns(), "net/ipv4/tcp_early_demux").ok(),
        root_demux_before,
        "the test process's own namespace is untouched"
    );
}

#[test]
fn init_with_ipv6_enables_forwarding_and_accept_ra() {
    if skip_netns_test("init_with_ipv6...") {
        return;
    }
    let ns = node_ns();
    if sysctl::read(&ns, "net/ipv6/conf/all/forwarding").is_err() {
        eprintln!("skipping: IPv6 is disabled in this kernel");
        return;
    }
    let opts = SysctlOptions {
        enable_ipv6: true,
        ..SysctlOptions::default()
    };
    node::set_node_sysctls(&ns, Path::new("/proc/sys"), MAC.parse().expect("mac"), opts)
        .expect("init");
    assert_eq!(
        sysctl::read(&ns, "net/ipv6/conf/all/disable_ipv6").expect("read"),
        "0"
    );
    assert_eq!(
        sysctl::read(&ns, "net/ipv6/conf/all/forwarding").expect("read"),
        "1"
    );
    assert_eq!(
        sysctl::read(&ns, "net/ipv6/conf/prim0/accept_ra").expect("read"),
        "2"
    );
}

#[test]
fn init_fails_when_no_interface_has_the_mac() {
    if skip_netns_test("init_fails_when_no_interface...") {
        return;
    }
    let ns = node_ns();
    sysctl::write(&ns, "net/ipv4/conf/prim0/rp_filter", "1").expect("write");
    let err = node::set_node_sysctls(
        &ns,
        Path::new("/proc/sys"),
        "02:00:00:00:00:99".parse().expect("mac"),
        SysctlOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, InstallerError::NoPrimaryInterface(_)),
        "{err}"
    );
    assert_eq!(
        sysctl::read(&ns, "net/ipv4/conf/prim0/rp_filter").expect("read"),
        "1",
        "nothing written"
    );
}

#[test]
fn the_init_binary_copies_plugins_and_sets_sysctls_in_the_given_namespace() {
    if skip_netns_test("the_init_binary...") {
        return;
    }
    let ns = node_ns();
    let src = tempfile::tempdir().expect("tmp");
    let dst = tempfile::tempdir().expect("tmp");
    std::fs::write(src.path().join("portmap"), b"plugin").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_vpc-cni-install"))
        .arg("init")
        .arg("--src-dir")
        .arg(src.path())
        .arg("--bin-dir")
        .arg(dst.path())
        .args(["--primary-mac", MAC, "--netns"])
        .arg(format!("/var/run/netns/{}", ns.name()))
        .env("DISABLE_TCP_EARLY_DEMUX", "false")
        .output()
        .expect("run init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dst.path().join("portmap")).expect("copied"),
        b"plugin"
    );
    assert_eq!(
        sysctl::read(&ns, "net/ipv4/conf/prim0/rp_filter").expect("read"),
        "2"
    );
}
