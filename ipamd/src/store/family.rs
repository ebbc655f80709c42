//! Address families: a datastore holds the addresses of one family ([`V4`] or [`V6`]). The
//! family says what an address and a CIDR are, how a CIDR's addresses are walked, and which
//! field of a checkpoint entry carries the address (the reference's `ipv4` or `ipv6`).

use std::fmt::{Debug, Display};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

use crate::store::checkpoint::{Allocation, IpamMetadata};
use crate::store::datastore::IpamKey;
use crate::types::{Ipv4Net, Ipv6Net};

/// One address family of the datastore.
pub trait Family: Debug + Clone + Copy + PartialEq + Eq + Default + Send + Sync + 'static {
    /// An address.
    type Addr: Copy + Ord + Hash + Debug + Display + FromStr + Send + Sync + 'static;
    /// A CIDR (a secondary address, or a prefix).
    type Net: Copy + Ord + Hash + Debug + Display + Send + Sync + 'static;
    /// `IPv4` or `IPv6`, for messages.
    const NAME: &'static str;
    /// True for IPv6.
    const IS_V6: bool;
    /// Addresses in one prefix of this family's prefix mode (16 in a /28, 2^48 in a /80).
    const PREFIX_ADDRESSES: u64;

    /// The CIDR with its host bits cleared.
    fn trunc(net: Self::Net) -> Self::Net;
    /// Whether `addr` is in `net`.
    fn contains(net: &Self::Net, addr: Self::Addr) -> bool;
    /// Addresses in `net` (saturating).
    fn size(net: &Self::Net) -> u64;
    /// `net`'s addresses from its base, lazily.
    fn hosts(net: &Self::Net) -> impl Iterator<Item = Self::Addr>;
    /// The address field of a checkpoint entry for this family (empty when the entry is of
    /// the other family).
    fn entry_address(a: &Allocation) -> &str;
    /// The checkpoint entry of `ip` held by `key` since `at`.
    fn allocation(ip: Self::Addr, key: &IpamKey, md: &IpamMetadata, at: Duration) -> Allocation {
        let mut a = Allocation {
            network_name: key.network_name.clone(),
            container_id: key.container_id.clone(),
            if_name: key.if_name.clone(),
            ipv4: String::new(),
            ipv6: String::new(),
            allocation_timestamp: at.as_nanos() as i64,
            metadata: md.clone(),
        };
        Self::set_address(&mut a, ip);
        a
    }
    /// Puts `ip` in this family's field of `a`.
    fn set_address(a: &mut Allocation, ip: Self::Addr);
    /// The address as a `std` address of either family.
    fn ip(a: Self::Addr) -> IpAddr;
    /// A CIDR's address (as given) and prefix length.
    fn net_parts(n: &Self::Net) -> (IpAddr, u8);
}

/// IPv4: /32 secondary addresses and /28 prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct V4;

/// IPv6: /80 prefixes (the reference's IPv6 mode), addresses handed out as /128s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct V6;

impl Family for V4 {
    type Addr = Ipv4Addr;
    type Net = Ipv4Net;
    const NAME: &'static str = "IPv4";
    const IS_V6: bool = false;
    const PREFIX_ADDRESSES: u64 = 16;

    fn trunc(net: Ipv4Net) -> Ipv4Net {
        net.trunc()
    }
    fn contains(net: &Ipv4Net, addr: Ipv4Addr) -> bool {
        net.contains(addr)
    }
    fn size(net: &Ipv4Net) -> u64 {
        net.size()
    }
    fn hosts(net: &Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
        net.hosts()
    }
    fn entry_address(a: &Allocation) -> &str {
        &a.ipv4
    }
    fn set_address(a: &mut Allocation, ip: Ipv4Addr) {
        a.ipv4 = ip.to_string();
    }
    fn ip(a: Ipv4Addr) -> IpAddr {
        IpAddr::V4(a)
    }
    fn net_parts(n: &Ipv4Net) -> (IpAddr, u8) {
        (IpAddr::V4(n.addr()), n.prefix_len())
    }
}

impl Family for V6 {
    type Addr = Ipv6Addr;
    type Net = Ipv6Net;
    const NAME: &'static str = "IPv6";
    const IS_V6: bool = true;
    const PREFIX_ADDRESSES: u64 = 1 << 48;

    fn trunc(net: Ipv6Net) -> Ipv6Net {
        net.trunc()
    }
    fn contains(net: &Ipv6Net, addr: Ipv6Addr) -> bool {
        net.contains(addr)
    }
    fn size(net: &Ipv6Net) -> u64 {
        net.size()
    }
    fn hosts(net: &Ipv6Net) -> impl Iterator<Item = Ipv6Addr> {
        net.hosts()
    }
    fn entry_address(a: &Allocation) -> &str {
        &a.ipv6
    }
    fn set_address(a: &mut Allocation, ip: Ipv6Addr) {
        a.ipv6 = ip.to_string();
    }
    fn ip(a: Ipv6Addr) -> IpAddr {
        IpAddr::V6(a)
    }
    fn net_parts(n: &Ipv6Net) -> (IpAddr, u8) {
        (IpAddr::V6(n.addr()), n.prefix_len())
    }
}
