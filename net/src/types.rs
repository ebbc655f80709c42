//! Small value types in our own nouns: MAC addresses, IP prefixes, address families, scopes.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use crate::error::NetError;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The six bytes.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// True for a locally administered (bit 1 of the first octet) unicast (bit 0 clear) address.
    pub fn is_local_unicast(&self) -> bool {
        self.0[0] & 0b10 != 0 && self.0[0] & 0b1 == 0
    }

    /// A random locally administered unicast address, as the reference plugin generates for
    /// the host end of a pod's veth.
    pub fn random_local() -> Result<MacAddr, NetError> {
        use std::io::Read;
        let mut b = [0u8; 6];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(|e| NetError::Invalid {
                what: format!("random MAC: reading /dev/urandom: {e}"),
            })?;
        Ok(MacAddr::from_random_bytes(b))
    }

    /// Turns six random bytes into a locally administered unicast address.
    pub fn from_random_bytes(mut b: [u8; 6]) -> MacAddr {
        b[0] = (b[0] | 0b10) & !0b1;
        MacAddr(b)
    }

    pub(crate) fn from_slice(b: &[u8]) -> Option<MacAddr> {
        <[u8; 6]>::try_from(b).ok().map(MacAddr)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = NetError;

    /// Parses `aa:bb:cc:dd:ee:ff` (case-insensitive; `-` also accepted as separator).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::invalid(format!("MAC address {s:?}"));
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

/// An IP address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Maximum prefix length (32 or 128).
    pub fn max_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// An IP address with a prefix length, e.g. `10.0.1.5/32` or `10.0.0.0/16`.
///
/// The address is kept as given (host bits are not cleared), so it can carry an interface
/// address like `10.0.1.20/24` as well as a network.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpCidr {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length (0..=32 for IPv4, 0..=128 for IPv6).
    pub prefix_len: u8,
}

impl IpCidr {
    /// A prefix; fails when `prefix_len` is too long for the family.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<IpCidr, NetError> {
        if prefix_len > Family::of(&addr).max_prefix() {
            return Err(NetError::invalid(format!(
                "prefix length {addr}/{prefix_len}"
            )));
        }
        Ok(IpCidr { addr, prefix_len })
    }

    /// A host prefix (/32 or /128).
    pub fn host(addr: IpAddr) -> IpCidr {
        IpCidr {
            addr,
            prefix_len: Family::of(&addr).max_prefix(),
        }
    }

    /// An IPv4 host prefix (/32).
    pub fn host_v4(addr: Ipv4Addr) -> IpCidr {
        IpCidr::host(IpAddr::V4(addr))
    }

    /// The family of the address.
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = if self.prefix_len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix_len))
                };
                IpAddr::V4(Ipv4Addr::from(bits & mask))
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = if self.prefix_len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix_len))
                };
                IpAddr::V6((bits & mask).into())
            }
        }
    }

    /// The same prefix with host bits cleared (`10.0.1.20/24` → `10.0.1.0/24`).
    pub fn trunc(&self) -> IpCidr {
        IpCidr {
            addr: self.network(),
            prefix_len: self.prefix_len,
        }
    }

    /// True when `ip` is inside this prefix.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        Family::of(ip) == self.family()
            && IpCidr {
                addr: *ip,
                prefix_len: self.prefix_len,
            }
            .network()
                == self.network()
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl fmt::Debug for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for IpCidr {
    type Err = NetError;

    /// Parses `addr/len`, or a bare address as a host prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::invalid(format!("IP prefix {s:?}"));
        match s.split_once('/') {
            Some((a, l)) => {
                let addr: IpAddr = a.parse().map_err(|_| bad())?;
                let len: u8 = l.parse().map_err(|_| bad())?;
                IpCidr::new(addr, len)
            }
            None => Ok(IpCidr::host(s.parse().map_err(|_| bad())?)),
        }
    }
}

/// Scope of an address or route (the kernel's `rt_scope`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Scope {
    /// Global (`scope global`, 0).
    #[default]
    Universe,
    /// Site (200).
    Site,
    /// Link (`scope link`, 253).
    Link,
    /// Host (`scope host`, 254).
    Host,
    /// Any other value.
    Other(u8),
}

/// The main routing table's id.
pub const MAIN_TABLE: u32 = 254;
/// The local routing table's id.
pub const LOCAL_TABLE: u32 = 255;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_through_text() {
        let m: MacAddr = "02:AB:cd:00:11:ff".parse().expect("parse");
        assert_eq!(m.0, [0x02, 0xab, 0xcd, 0x00, 0x11, 0xff]);
        assert_eq!(m.to_string(), "02:ab:cd:00:11:ff");
        assert!("02:ab:cd:00:11".parse::<MacAddr>().is_err());
        assert!("02:ab:cd:00:11:ff:00".parse::<MacAddr>().is_err());
        assert!("02:ab:cd:00:11:fg".parse::<MacAddr>().is_err());
    }

    #[test]
    fn random_macs_are_local_unicast() {
        for b in [[0xffu8; 6], [0u8; 6], [1, 2, 3, 4, 5, 6]] {
            let m = MacAddr::from_random_bytes(b);
            assert!(m.is_local_unicast(), "{m}");
            assert_eq!(&m.0[1..], &b[1..]);
        }
        assert!(MacAddr::random_local().expect("urandom").is_local_unicast());
    }

    #[test]
    fn cidr_parses_truncates_and_contains() {
        let c: IpCidr = "10.0.1.20/24".parse().expect("parse");
        assert_eq!(c.trunc().to_string(), "10.0.1.0/24");
        assert!(c.contains(&"10.0.1.255".parse().expect("ip")));
        assert!(!c.contains(&"10.0.2.1".parse().expect("ip")));
        assert_eq!("10.0.0.5".parse::<IpCidr>().expect("host").prefix_len, 32);
        assert!("10.0.0.5/33".parse::<IpCidr>().is_err());
        let all: IpCidr = "0.0.0.0/0".parse().expect("all");
        assert!(all.contains(&"192.0.2.1".parse().expect("ip")));
        let v6: IpCidr = "fd00::ac:00/118".parse().expect("v6");
        assert_eq!(v6.trunc().to_string(), "fd00::ac:0/118");
        let v6b: IpCidr = "fd00::ac:3ff/118".parse().expect("v6");
        assert_eq!(v6b.trunc(), v6.trunc());
    }
}
