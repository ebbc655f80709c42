//! Small value types shared by the modules.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network (`10.0.1.16/28`); the address is kept as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    len: u8,
}

impl Ipv4Net {
    /// `addr/len`; `None` if `len > 32`.
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Self> {
        (len <= 32).then_some(Self { addr, len })
    }

    /// A /32 of one address.
    pub fn host(addr: Ipv4Addr) -> Self {
        Self { addr, len: 32 }
    }

    /// The address as given.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        }
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// Addresses in the network (2^(32-len)).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// Every address, from the network address up.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u64::from(u32::from(self.network()));
        (base..base + self.size()).map(|a| Ipv4Addr::from(a as u32))
    }

    /// The network normalised (`10.0.1.17/28` → `10.0.1.16/28`).
    pub fn trunc(&self) -> Self {
        Self {
            addr: self.network(),
            len: self.len,
        }
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Why a CIDR did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CidrParseError(String);

impl FromStr for Ipv4Net {
    type Err = CidrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| CidrParseError("missing /length".into()))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| CidrParseError(format!("bad address {a:?}")))?;
        let len: u8 = l
            .parse()
            .map_err(|_| CidrParseError(format!("bad length {l:?}")))?;
        Self::new(addr, len).ok_or_else(|| CidrParseError(format!("length {len} above 32")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_iterates() {
        let n: Ipv4Net = "10.0.1.17/28".parse().unwrap();
        assert_eq!(n.network(), Ipv4Addr::new(10, 0, 1, 16));
        assert_eq!(n.size(), 16);
        assert!(n.contains(Ipv4Addr::new(10, 0, 1, 31)));
        assert!(!n.contains(Ipv4Addr::new(10, 0, 1, 32)));
        assert_eq!(n.hosts().count(), 16);
        assert_eq!(n.trunc().to_string(), "10.0.1.16/28");
        assert!("10.0.0.0/33".parse::<Ipv4Net>().is_err());
        assert!("10.0.0.0".parse::<Ipv4Net>().is_err());
        let h = Ipv4Net::host(Ipv4Addr::new(1, 2, 3, 4));
        assert_eq!(
            h.hosts().collect::<Vec<_>>(),
            vec![Ipv4Addr::new(1, 2, 3, 4)]
        );
    }
}
