//! Subnet arithmetic with AWS's rules.
//!
//! AWS reserves five addresses in every subnet: the network address, the VPC router (+1), DNS
//! (+2), one for future use (+3) and the broadcast address (last). Subnets are /16 to /28.
//! A /28 prefix assigned to an ENI must be aligned on a 16-address boundary and every one of its
//! addresses must be free, so a subnet whose free addresses are scattered can run out of prefixes
//! (EC2's `InsufficientCidrBlocks`) while it still has free addresses.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Addresses AWS reserves in every subnet.
pub const AWS_RESERVED_PER_SUBNET: u32 = 5;
/// Addresses in one IPv4 prefix (/28).
pub const PREFIX_SIZE: u32 = 16;
/// Smallest subnet prefix length AWS accepts (largest subnet).
pub const MIN_SUBNET_PREFIX_LEN: u8 = 16;
/// Largest subnet prefix length AWS accepts (smallest subnet).
pub const MAX_SUBNET_PREFIX_LEN: u8 = 28;

/// An IPv4 CIDR block in canonical form (no host bits set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    base: u32,
    len: u8,
}

/// Why a CIDR string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not `a.b.c.d/n`.
    #[error("`{0}` is not an IPv4 CIDR (expected a.b.c.d/n)")]
    Syntax(String),
    /// Prefix length over 32.
    #[error("`{0}`: prefix length must be 0..=32")]
    PrefixLength(String),
    /// Host bits set, e.g. `10.0.0.5/24`.
    #[error("`{input}` has host bits set; did you mean `{canonical}`?")]
    HostBits {
        /// What was given.
        input: String,
        /// The network it lies in.
        canonical: String,
    },
}

impl Ipv4Cidr {
    /// Builds a CIDR, rejecting host bits.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Self, CidrError> {
        if len > 32 {
            return Err(CidrError::PrefixLength(format!("{addr}/{len}")));
        }
        let base = u32::from(addr);
        let c = Self {
            base: base & mask(len),
            len,
        };
        if c.base != base {
            return Err(CidrError::HostBits {
                input: format!("{addr}/{len}"),
                canonical: c.to_string(),
            });
        }
        Ok(c)
    }

    /// The CIDR of `len` bits that contains `addr` (host bits cleared).
    pub fn containing(addr: u32, len: u8) -> Self {
        let len = len.min(32);
        Self {
            base: addr & mask(len),
            len,
        }
    }

    /// Network address as an integer.
    pub fn base(&self) -> u32 {
        self.base
    }

    /// Network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base)
    }

    /// Prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Number of addresses in the block.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    /// Last address as an integer.
    pub fn last(&self) -> u32 {
        (u64::from(self.base) + self.size() - 1) as u32
    }

    /// True when `addr` lies in the block.
    pub fn contains(&self, addr: u32) -> bool {
        addr & mask(self.len) == self.base
    }

    /// True when `other` lies entirely inside this block.
    pub fn contains_cidr(&self, other: &Ipv4Cidr) -> bool {
        other.len >= self.len && self.contains(other.base)
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(s.to_owned()))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| CidrError::Syntax(s.to_owned()))?;
        let len: u8 = l.parse().map_err(|_| CidrError::Syntax(s.to_owned()))?;
        Self::new(addr, len)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Usable addresses of a subnet of prefix length `len` under AWS's rules (`2^(32-n) - 5`).
/// Returns `None` outside /16../28.
pub fn aws_usable_ips(len: u8) -> Option<u32> {
    (MIN_SUBNET_PREFIX_LEN..=MAX_SUBNET_PREFIX_LEN)
        .contains(&len)
        .then(|| (1u32 << (32 - u32::from(len))) - AWS_RESERVED_PER_SUBNET)
}

/// Aligned /28 blocks of an empty subnet of prefix length `len` that contain no reserved
/// address (`2^(28-n) - 2`; the first and last block hold reserved addresses).
pub fn aws_prefix_blocks(len: u8) -> Option<u32> {
    aws_usable_ips(len).map(|_| (1u32 << (28 - u32::from(len))).saturating_sub(2))
}

/// The range of /28 prefixes still obtainable in a subnet, given how many individual addresses
/// (ENI primaries, secondary IPs, load balancers, endpoints) and prefixes are already in use.
/// Where the individual addresses sit decides it: packed together they spoil few blocks (best
/// case), scattered one per block they spoil as many as they can (worst case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixCapacity {
    /// Prefixes obtainable when individual addresses are packed.
    pub best: u32,
    /// Prefixes obtainable when individual addresses are scattered.
    pub worst: u32,
}

/// See [`PrefixCapacity`]. `None` for a prefix length outside /16../28.
pub fn prefix_capacity(len: u8, singles: u32, prefixes_used: u32) -> Option<PrefixCapacity> {
    let blocks = aws_prefix_blocks(len)?;
    let avail = blocks.saturating_sub(prefixes_used);
    // The first block has 12 non-reserved addresses and the last 15; singles packed there spoil
    // nothing else. A /28 subnet is one block with 11 non-reserved addresses.
    let edge_slack = if len == MAX_SUBNET_PREFIX_LEN {
        11
    } else {
        12 + 15
    };
    let spill = singles.saturating_sub(edge_slack);
    let best = avail.saturating_sub(spill.div_ceil(PREFIX_SIZE));
    let worst = avail.saturating_sub(singles);
    Some(PrefixCapacity { best, worst })
}

/// Which free address [`SubnetAllocator::allocate_ip`] hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The lowest free address.
    Lowest,
    /// The first free address at or after this offset into the subnet, wrapping around.
    From(u32),
}

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// No free address (EC2: `InsufficientFreeAddressesInSubnet`).
    #[error("no free address left in subnet {0}")]
    NoFreeAddress(Ipv4Cidr),
    /// Free addresses remain but no aligned /28 is wholly free (EC2: `InsufficientCidrBlocks`).
    #[error("no aligned free /28 left in subnet {0}")]
    NoFreeBlock(Ipv4Cidr),
    /// The address is outside the subnet, reserved or already in use.
    #[error("address {0} is not free in subnet {1}")]
    Unavailable(Ipv4Addr, Ipv4Cidr),
}

/// Tracks which addresses of one subnet are in use, with AWS's reserved addresses pre-marked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetAllocator {
    cidr: Ipv4Cidr,
    used: Vec<u64>,
    free: u32,
}

impl SubnetAllocator {
    /// A subnet with only the five reserved addresses in use. `cidr` must be /16../28 (other
    /// lengths are accepted for tests; /29 and smaller have no usable address).
    pub fn new(cidr: Ipv4Cidr) -> Self {
        let size = cidr.size() as usize;
        let mut a = Self {
            cidr,
            used: vec![0; size.div_ceil(64)],
            free: size as u32,
        };
        // Bits past the end of a small subnet are marked used so searches never return them.
        for off in size..a.used.len() * 64 {
            a.used[off / 64] |= 1 << (off % 64);
        }
        let reserved = [0, 1, 2, 3, size.saturating_sub(1)];
        for off in reserved.into_iter().filter(|o| *o < size) {
            a.set(off, true);
        }
        a
    }

    /// The subnet.
    pub fn cidr(&self) -> Ipv4Cidr {
        self.cidr
    }

    /// Free addresses.
    pub fn free_addresses(&self) -> u32 {
        self.free
    }

    /// True when `addr` is in the subnet and free.
    pub fn is_free(&self, addr: u32) -> bool {
        self.cidr.contains(addr) && !self.get((addr - self.cidr.base) as usize)
    }

    fn get(&self, off: usize) -> bool {
        self.used[off / 64] & (1 << (off % 64)) != 0
    }

    fn set(&mut self, off: usize, used: bool) {
        let was = self.get(off);
        if was == used {
            return;
        }
        if used {
            self.used[off / 64] |= 1 << (off % 64);
            self.free -= 1;
        } else {
            self.used[off / 64] &= !(1 << (off % 64));
            self.free += 1;
        }
    }

    /// Takes one free address.
    pub fn allocate_ip(&mut self, placement: Placement) -> Result<u32, AllocError> {
        if self.free == 0 {
            return Err(AllocError::NoFreeAddress(self.cidr));
        }
        let size = self.cidr.size() as usize;
        let start = match placement {
            Placement::Lowest => 0,
            Placement::From(o) => o as usize % size,
        };
        let off = self
            .first_free_from(start)
            .or_else(|| self.first_free_from(0))
            .ok_or(AllocError::NoFreeAddress(self.cidr))?;
        self.set(off, true);
        Ok(self.cidr.base + off as u32)
    }

    fn first_free_from(&self, start: usize) -> Option<usize> {
        let mut w = start / 64;
        let mut word = self.used.get(w)? | ((1u64 << (start % 64)) - 1);
        loop {
            if word != u64::MAX {
                return Some(w * 64 + (!word).trailing_zeros() as usize);
            }
            w += 1;
            word = *self.used.get(w)?;
        }
    }

    /// Takes a specific free address.
    pub fn allocate_specific(&mut self, addr: u32) -> Result<(), AllocError> {
        if !self.is_free(addr) {
            return Err(AllocError::Unavailable(Ipv4Addr::from(addr), self.cidr));
        }
        self.set((addr - self.cidr.base) as usize, true);
        Ok(())
    }

    /// Takes an aligned, wholly free /28 and returns its base address. Blocks are searched from
    /// `placement`'s offset (rounded down to a block), wrapping around.
    pub fn allocate_prefix(&mut self, placement: Placement) -> Result<u32, AllocError> {
        let blocks = (self.cidr.size() / u64::from(PREFIX_SIZE)) as usize;
        if blocks == 0 || self.free < PREFIX_SIZE {
            return Err(self.exhausted());
        }
        let start = match placement {
            Placement::Lowest => 0,
            Placement::From(o) => (o as usize / PREFIX_SIZE as usize) % blocks,
        };
        let found = (start..blocks)
            .chain(0..start)
            .find(|&b| self.block_free(b));
        let b = found.ok_or_else(|| self.exhausted())?;
        for off in b * 16..b * 16 + 16 {
            self.set(off, true);
        }
        Ok(self.cidr.base + (b as u32) * PREFIX_SIZE)
    }

    /// Takes a specific aligned /28 whose addresses are all free.
    pub fn allocate_specific_prefix(&mut self, base: u32) -> Result<(), AllocError> {
        let ok = self.cidr.contains(base)
            && (base - self.cidr.base).is_multiple_of(PREFIX_SIZE)
            && self.block_free(((base - self.cidr.base) / PREFIX_SIZE) as usize);
        if !ok {
            return Err(AllocError::Unavailable(Ipv4Addr::from(base), self.cidr));
        }
        let off = (base - self.cidr.base) as usize;
        for o in off..off + 16 {
            self.set(o, true);
        }
        Ok(())
    }

    fn exhausted(&self) -> AllocError {
        if self.free == 0 {
            AllocError::NoFreeAddress(self.cidr)
        } else {
            AllocError::NoFreeBlock(self.cidr)
        }
    }

    fn block_free(&self, b: usize) -> bool {
        let word = self.used[b / 4];
        (word >> ((b % 4) * 16)) & 0xffff == 0
    }

    /// Aligned /28 blocks that are wholly free.
    pub fn free_blocks(&self) -> u32 {
        let blocks = (self.cidr.size() / u64::from(PREFIX_SIZE)) as usize;
        (0..blocks).filter(|&b| self.block_free(b)).count() as u32
    }

    /// Returns one address to the subnet. Reserved addresses cannot be released.
    pub fn release_ip(&mut self, addr: u32) {
        if !self.cidr.contains(addr) {
            return;
        }
        let off = (addr - self.cidr.base) as usize;
        let size = self.cidr.size() as usize;
        if off < 4 || off + 1 == size {
            return;
        }
        self.set(off, false);
    }

    /// Returns the /28 based at `base` to the subnet.
    pub fn release_prefix(&mut self, base: u32) {
        for a in base..base.saturating_add(PREFIX_SIZE) {
            self.release_ip(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().expect("test cidr")
    }

    #[test]
    fn parses_and_rejects_cidrs_with_reasons() {
        assert_eq!(cidr("10.0.0.0/23").to_string(), "10.0.0.0/23");
        assert_eq!(cidr("10.0.0.0/23").size(), 512);
        let e = "10.0.0.5/24".parse::<Ipv4Cidr>().unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/24"), "{e}");
        assert!(matches!(
            "10.0.0/24".parse::<Ipv4Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0.0/33".parse::<Ipv4Cidr>(),
            Err(CidrError::PrefixLength(_))
        ));
    }

    #[test]
    fn usable_addresses_follow_aws_not_the_workbook() {
        assert_eq!(aws_usable_ips(23), Some(507));
        assert_eq!(aws_usable_ips(16), Some(65531));
        assert_eq!(aws_usable_ips(28), Some(11));
        assert_eq!(aws_usable_ips(29), None);
        assert_eq!(aws_usable_ips(15), None);
        assert_eq!(aws_prefix_blocks(23), Some(30));
        assert_eq!(aws_prefix_blocks(28), Some(0));
    }

    #[test]
    fn fresh_allocator_has_usable_addresses_and_inner_blocks_free() {
        let a = SubnetAllocator::new(cidr("10.0.0.0/24"));
        assert_eq!(a.free_addresses(), 251);
        assert_eq!(a.free_blocks(), 14);
        assert!(!a.is_free(u32::from(Ipv4Addr::new(10, 0, 0, 3))));
        assert!(a.is_free(u32::from(Ipv4Addr::new(10, 0, 0, 4))));
        assert!(!a.is_free(u32::from(Ipv4Addr::new(10, 0, 0, 255))));
    }

    #[test]
    fn scattered_singles_exhaust_prefixes_while_addresses_remain() {
        let mut a = SubnetAllocator::new(cidr("10.0.0.0/24"));
        for b in 1..15u32 {
            a.allocate_specific(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + b * 16 + 7)
                .expect("free");
        }
        assert_eq!(a.free_blocks(), 0);
        assert!(a.free_addresses() > 200);
        assert!(matches!(
            a.allocate_prefix(Placement::Lowest),
            Err(AllocError::NoFreeBlock(_))
        ));
        assert!(a.allocate_ip(Placement::Lowest).is_ok());
    }

    #[test]
    fn exhaustion_reports_no_free_address() {
        let mut a = SubnetAllocator::new(cidr("10.0.0.0/28"));
        for _ in 0..11 {
            a.allocate_ip(Placement::Lowest).expect("usable");
        }
        assert!(matches!(
            a.allocate_ip(Placement::Lowest),
            Err(AllocError::NoFreeAddress(_))
        ));
    }

    #[test]
    fn prefix_capacity_range_brackets_reality() {
        // /24: 14 inner blocks, 27 free addresses in the two edge blocks.
        assert_eq!(
            prefix_capacity(24, 0, 0),
            Some(PrefixCapacity {
                best: 14,
                worst: 14
            })
        );
        assert_eq!(
            prefix_capacity(24, 27, 0),
            Some(PrefixCapacity { best: 14, worst: 0 })
        );
        assert_eq!(
            prefix_capacity(24, 28, 2),
            Some(PrefixCapacity { best: 11, worst: 0 })
        );
        assert_eq!(
            prefix_capacity(20, 3, 0),
            Some(PrefixCapacity {
                best: 254,
                worst: 251
            })
        );
    }

    proptest! {
        #[test]
        fn allocations_are_unique_aligned_and_counted(
            ops in proptest::collection::vec((0u8..4, 0u32..512), 1..300)
        ) {
            let mut a = SubnetAllocator::new(cidr("10.1.0.0/23"));
            let mut singles = std::collections::BTreeSet::new();
            let mut prefixes = std::collections::BTreeSet::new();
            for (op, x) in ops {
                match op {
                    0 => if let Ok(ip) = a.allocate_ip(Placement::From(x)) {
                        prop_assert!(singles.insert(ip));
                    },
                    1 => if let Ok(p) = a.allocate_prefix(Placement::From(x)) {
                        prop_assert_eq!(p % 16, 0);
                        prop_assert!(prefixes.insert(p));
                    },
                    2 => if let Some(&ip) = singles.iter().nth(x as usize % singles.len().max(1)) {
                        singles.remove(&ip);
                        a.release_ip(ip);
                    },
                    _ => if let Some(&p) = prefixes.iter().nth(x as usize % prefixes.len().max(1)) {
                        prefixes.remove(&p);
                        a.release_prefix(p);
                    },
                }
                for &p in &prefixes {
                    prop_assert!(!singles.iter().any(|s| *s >= p && *s < p + 16));
                }
                let used = singles.len() as u32 + 16 * prefixes.len() as u32;
                prop_assert_eq!(a.free_addresses(), 507 - used);
            }
        }
    }
}
