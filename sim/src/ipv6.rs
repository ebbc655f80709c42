//! IPv6 blocks (the VPC's /56, a subnet's /64, an ENI's /80 prefixes).

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// An IPv6 CIDR block with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv6Block {
    /// Network address as an integer.
    pub base: u128,
    /// Prefix length.
    pub len: u8,
}

impl Ipv6Block {
    /// A block, `None` when host bits are set or `len > 128`.
    pub fn new(base: u128, len: u8) -> Option<Self> {
        (len <= 128 && base & !mask(len) == 0).then_some(Self { base, len })
    }

    /// True when `addr` lies in the block.
    pub fn contains(&self, addr: u128) -> bool {
        addr & mask(self.len) == self.base
    }

    /// True when `other` lies entirely inside this block.
    pub fn contains_block(&self, other: &Ipv6Block) -> bool {
        other.len >= self.len && self.contains(other.base)
    }

    /// True when the two blocks share any address.
    pub fn overlaps(&self, other: &Ipv6Block) -> bool {
        self.contains_block(other) || other.contains_block(self)
    }
}

fn mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl fmt::Display for Ipv6Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv6Addr::from(self.base), self.len)
    }
}

impl FromStr for Ipv6Block {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (a, l) = s.split_once('/').ok_or(())?;
        let addr: Ipv6Addr = a.parse().map_err(|_| ())?;
        let len: u8 = l.parse().map_err(|_| ())?;
        Self::new(u128::from(addr), len).ok_or(())
    }
}

impl Serialize for Ipv6Block {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_contains_and_rejects_host_bits() {
        let b: Ipv6Block = "2600:1f14:abcd:1200::/56".parse().expect("block");
        let s: Ipv6Block = "2600:1f14:abcd:1201::/64".parse().expect("block");
        assert!(b.contains_block(&s) && b.overlaps(&s) && !s.contains_block(&b));
        assert!("2600:1f14:abcd:1201::1/64".parse::<Ipv6Block>().is_err());
        assert_eq!(s.to_string(), "2600:1f14:abcd:1201::/64");
    }
}
