//! Small value types shared by the modules.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

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

/// An IPv6 network (`2600:1f14:0:1:8a3f::/80`); the address is kept as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv6Net {
    addr: Ipv6Addr,
    len: u8,
}

impl Ipv6Net {
    /// `addr/len`; `None` if `len > 128`.
    pub fn new(addr: Ipv6Addr, len: u8) -> Option<Self> {
        (len <= 128).then_some(Self { addr, len })
    }

    /// A /128 of one address.
    pub fn host(addr: Ipv6Addr) -> Self {
        Self { addr, len: 128 }
    }

    /// The address as given.
    pub fn addr(&self) -> Ipv6Addr {
        self.addr
    }

    /// Prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    fn mask(&self) -> u128 {
        if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.len))
        }
    }

    /// The network address.
    pub fn network(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) & self.mask())
    }

    /// Addresses in the network, saturating at `u64::MAX` (a /80 holds 2^48).
    pub fn size(&self) -> u64 {
        let bits = 128 - u32::from(self.len);
        if bits >= 64 {
            u64::MAX
        } else {
            1u64 << bits
        }
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & self.mask() == u128::from(self.network())
    }

    /// Every address, from the network address up (lazily: a /80 is never walked whole).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv6Addr> {
        let base = u128::from(self.network());
        let last = base | !self.mask();
        (base..=last).map(Ipv6Addr::from)
    }

    /// The network normalised (`2600::1/80` → `2600::/80`).
    pub fn trunc(&self) -> Self {
        Self {
            addr: self.network(),
            len: self.len,
        }
    }
}

impl fmt::Display for Ipv6Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv6Net {
    type Err = CidrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| CidrParseError("missing /length".into()))?;
        let addr: Ipv6Addr = a
            .parse()
            .map_err(|_| CidrParseError(format!("bad address {a:?}")))?;
        let len: u8 = l
            .parse()
            .map_err(|_| CidrParseError(format!("bad length {l:?}")))?;
        Self::new(addr, len).ok_or_else(|| CidrParseError(format!("length {len} above 128")))
    }
}

/// RFC 3339 (UTC, seconds) of a time since the Unix epoch.
pub fn rfc3339(t: Duration) -> String {
    let secs = t.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses RFC 3339 (`2024-01-02T03:04:05Z`, optional fraction, `Z` or `±hh:mm`) to time
/// since the Unix epoch. `None` when unparsable or before 1970.
pub fn parse_rfc3339(s: &str) -> Option<Duration> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(f) = rest.strip_prefix('.') {
        let n = f.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        let digits = &f[..n.min(9)];
        nanos = digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32);
        rest = &f[n..];
    }
    let offset: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || rb[3] != b':' {
                return None;
            }
            let sign = match rb[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    // Days from civil (Howard Hinnant).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset;
    u64::try_from(secs).ok().map(|s| Duration::new(s, nanos))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ipv6_networks() {
        let n: Ipv6Net = "2600:1f14:0:1:8a3f:1::5/80".parse().expect("parses");
        assert_eq!(n.trunc().to_string(), "2600:1f14:0:1:8a3f::/80");
        assert_eq!(n.size(), 1 << 48);
        assert!(n.contains("2600:1f14:0:1:8a3f:ffff:ffff:ffff".parse().expect("addr")));
        assert!(!n.contains("2600:1f14:0:1:8a40::".parse().expect("addr")));
        let first: Vec<_> = n.hosts().take(2).map(|a| a.to_string()).collect();
        assert_eq!(first, ["2600:1f14:0:1:8a3f::", "2600:1f14:0:1:8a3f::1"]);
        assert_eq!("::/0".parse::<Ipv6Net>().expect("parses").size(), u64::MAX);
        assert!("2600::/129".parse::<Ipv6Net>().is_err());
        assert!("10.0.0.0/8".parse::<Ipv6Net>().is_err());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(Duration::from_secs(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
    }

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
