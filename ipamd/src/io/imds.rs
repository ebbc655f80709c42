//! Instance metadata behind a narrow trait in our own nouns ([`Imds`]): the aws-config IMDSv2
//! client ([`AwsImds`], which honours `AWS_EC2_METADATA_SERVICE_ENDPOINT`) and an in-memory
//! one ([`FakeImds`]). Paths are those of spec/ipamd.md 5.7.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::types::{Ipv4Net, Ipv6Net};

/// An instance-metadata failure.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ImdsError {
    /// A path that must exist answered 404.
    #[error("instance metadata {path}: not found")]
    Missing {
        /// The path.
        path: String,
    },
    /// The request failed.
    #[error("instance metadata {path}: {message}")]
    Request {
        /// The path.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The answer could not be parsed.
    #[error("instance metadata {path}: cannot parse {value:?}")]
    Parse {
        /// The path.
        path: String,
        /// The value.
        value: String,
    },
    /// A number past what the daemon can use.
    #[error("instance metadata {path}: {value} is above {max}")]
    OutOfRange {
        /// The path.
        path: String,
        /// The value.
        value: u32,
        /// The largest value taken.
        max: u32,
    },
}

/// The largest `device-number` and `network-card` taken: the route table of an ENI is
/// `device + 1` on card 0 and `10000 + device + 100 × card` on the others, so a device
/// number above 99 would share a table with another card's ENI, or reach the kernel's own
/// tables (253-255), and a huge one would overflow. EC2 instances have far fewer.
pub const MAX_DEVICE_NUMBER: u32 = 99;

fn at_most(path: &str, value: u32, max: u32) -> ImdsResult<u32> {
    if value > max {
        return Err(ImdsError::OutOfRange {
            path: path.to_owned(),
            value,
            max,
        });
    }
    Ok(value)
}

/// Result of a metadata read.
pub type ImdsResult<T> = Result<T, ImdsError>;

/// Who this instance is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `instance-id`.
    pub instance_id: String,
    /// `instance-type`.
    pub instance_type: String,
    /// Region (from the identity document).
    pub region: String,
    /// `placement/availability-zone`.
    pub availability_zone: String,
    /// `mac` (lower case).
    pub primary_mac: String,
    /// `local-ipv4`.
    pub local_ipv4: Ipv4Addr,
}

/// One attached interface under `network/interfaces/macs/<mac>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsEni {
    /// MAC (lower case).
    pub mac: String,
    /// `interface-id`.
    pub interface_id: String,
    /// `device-number` (0 for the primary MAC, whatever IMDS says).
    pub device_number: u32,
    /// `network-card` (absent: 0).
    pub network_card: u32,
    /// `subnet-id`.
    pub subnet_id: String,
    /// `subnet-ipv4-cidr-block`.
    pub subnet_cidr: Ipv4Net,
    /// `vpc-id`.
    pub vpc_id: String,
    /// `vpc-ipv4-cidr-blocks`.
    pub vpc_cidrs: Vec<Ipv4Net>,
    /// `security-group-ids`.
    pub security_groups: Vec<String>,
    /// `local-ipv4s`, primary first (empty: potentially EFA-only).
    pub local_ipv4s: Vec<Ipv4Addr>,
    /// `ipv4-prefix` (absent: none).
    pub ipv4_prefixes: Vec<Ipv4Net>,
}

impl ImdsEni {
    /// The primary private IP.
    pub fn primary_ip(&self) -> Option<Ipv4Addr> {
        self.local_ipv4s.first().copied()
    }

    /// The secondary private IPs.
    pub fn secondary_ips(&self) -> &[Ipv4Addr] {
        self.local_ipv4s.get(1..).unwrap_or(&[])
    }
}

/// The IPv6 keys of one interface (read in IPv6 mode only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImdsEniV6 {
    /// `ipv6s`.
    pub ipv6s: Vec<Ipv6Addr>,
    /// `ipv6-prefix` (the /80s).
    pub ipv6_prefixes: Vec<Ipv6Net>,
    /// `subnet-ipv6-cidr-blocks`.
    pub subnet_ipv6_cidrs: Vec<Ipv6Net>,
    /// `vpc-ipv6-cidr-blocks`.
    pub vpc_ipv6_cidrs: Vec<Ipv6Net>,
}

/// The instance metadata ipamd reads.
#[async_trait::async_trait]
pub trait Imds: Send + Sync {
    /// Instance id, type, region, zone, primary MAC and IP.
    async fn identity(&self) -> ImdsResult<Identity>;
    /// MACs of the attached interfaces.
    async fn macs(&self) -> ImdsResult<Vec<String>>;
    /// One interface; `primary` forces device number 0.
    async fn eni(&self, mac: &str, primary: bool) -> ImdsResult<ImdsEni>;
    /// One interface's IPv6 keys.
    async fn eni_v6(&self, mac: &str) -> ImdsResult<ImdsEniV6>;
    /// The top-level `ipv6` (the primary interface's first IPv6 address), if any.
    async fn node_ipv6(&self) -> ImdsResult<Option<Ipv6Addr>>;

    /// Every attached interface, primary first, then by device number.
    async fn enis(&self, primary_mac: &str) -> ImdsResult<Vec<ImdsEni>> {
        let mut out = Vec::new();
        for mac in self.macs().await? {
            out.push(self.eni(&mac, mac == primary_mac).await?);
        }
        out.sort_by_key(|e| (e.mac != primary_mac, e.network_card, e.device_number));
        Ok(out)
    }
}

/// Where the aws-config client looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsSettings {
    /// Endpoint override; `None` leaves it to `AWS_EC2_METADATA_SERVICE_ENDPOINT` or the
    /// link-local default.
    pub endpoint: Option<String>,
    /// Per-request timeout (`HTTP_TIMEOUT`).
    pub http_timeout: Duration,
}

/// The aws-config IMDSv2 client (10 attempts, as the reference).
#[derive(Debug, Clone)]
pub struct AwsImds {
    client: aws_config::imds::Client,
}

impl AwsImds {
    /// Builds the client.
    pub fn new(s: &ImdsSettings) -> ImdsResult<AwsImds> {
        let mut b = aws_config::imds::Client::builder()
            .max_attempts(10)
            .connect_timeout(s.http_timeout)
            .read_timeout(s.http_timeout);
        if let Some(url) = &s.endpoint {
            b = b.endpoint(url.as_str()).map_err(|e| ImdsError::Request {
                path: url.clone(),
                message: format!("bad endpoint: {e}"),
            })?;
        }
        Ok(AwsImds { client: b.build() })
    }

    /// `GET /latest/<path>`: `None` on 404.
    async fn get_opt(&self, path: &str) -> ImdsResult<Option<String>> {
        use aws_config::imds::client::error::ImdsError as E;
        let full = format!("/latest/{path}");
        match self.client.get(&full).await {
            Ok(v) => Ok(Some(String::from(v).trim().to_owned())),
            Err(E::ErrorResponse(r)) if r.response().status().as_u16() == 404 => Ok(None),
            Err(e) => Err(ImdsError::Request {
                path: path.to_owned(),
                message: DisplayChain(&e).to_string(),
            }),
        }
    }

    async fn get(&self, path: &str) -> ImdsResult<String> {
        self.get_opt(path).await?.ok_or_else(|| ImdsError::Missing {
            path: path.to_owned(),
        })
    }
}

struct DisplayChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(s) = cur {
            write!(f, ": {s}")?;
            cur = s.source();
        }
        Ok(())
    }
}

fn parse<T: std::str::FromStr>(path: &str, v: &str) -> ImdsResult<T> {
    v.trim().parse().map_err(|_| ImdsError::Parse {
        path: path.to_owned(),
        value: v.to_owned(),
    })
}

fn parse_lines<T: std::str::FromStr>(path: &str, v: Option<String>) -> ImdsResult<Vec<T>> {
    v.unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| parse(path, l))
        .collect()
}

/// The most interfaces one instance has: far above any instance type (each interface costs
/// about ten metadata reads, so a longer list is refused rather than read).
pub const MAX_INTERFACES: usize = 256;

/// The `macs/` listing: one MAC (`02:ab:..`, six hexadecimal pairs) per line, each with an
/// optional trailing `/`; duplicates dropped. A line that is no MAC is refused (it would be
/// put into the paths of the following reads).
fn parse_macs(path: &str, v: &str) -> ImdsResult<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for l in v.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mac = l.trim_end_matches('/').to_ascii_lowercase();
        let ok = mac.len() == 17
            && mac.split(':').count() == 6
            && mac
                .split(':')
                .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return Err(ImdsError::Parse {
                path: path.to_owned(),
                value: l.chars().take(64).collect(),
            });
        }
        if !out.contains(&mac) {
            if out.len() == MAX_INTERFACES {
                return Err(ImdsError::OutOfRange {
                    path: path.to_owned(),
                    value: u32::try_from(v.lines().count()).unwrap_or(u32::MAX),
                    max: MAX_INTERFACES as u32,
                });
            }
            out.push(mac);
        }
    }
    Ok(out)
}

/// The region field of the identity document.
fn region_of(doc: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(doc).ok()?;
    v.get("region")?.as_str().map(str::to_owned)
}

#[async_trait::async_trait]
impl Imds for AwsImds {
    async fn identity(&self) -> ImdsResult<Identity> {
        const DOC: &str = "dynamic/instance-identity/document";
        let doc = self.get(DOC).await?;
        let region = region_of(&doc).ok_or_else(|| ImdsError::Parse {
            path: DOC.into(),
            value: doc.clone(),
        })?;
        let ip = "meta-data/local-ipv4";
        Ok(Identity {
            instance_id: self.get("meta-data/instance-id").await?,
            instance_type: self.get("meta-data/instance-type").await?,
            region,
            availability_zone: self.get("meta-data/placement/availability-zone").await?,
            primary_mac: self.get("meta-data/mac").await?.to_ascii_lowercase(),
            local_ipv4: parse(ip, &self.get(ip).await?)?,
        })
    }

    async fn macs(&self) -> ImdsResult<Vec<String>> {
        const P: &str = "meta-data/network/interfaces/macs/";
        let v = self.get(P).await?;
        parse_macs(P, &v)
    }

    async fn eni(&self, mac: &str, primary: bool) -> ImdsResult<ImdsEni> {
        let base = format!("meta-data/network/interfaces/macs/{mac}");
        let p = |f: &str| format!("{base}/{f}");
        let device_number = if primary {
            0
        } else {
            let path = p("device-number");
            at_most(
                &path,
                parse(&path, &self.get(&path).await?)?,
                MAX_DEVICE_NUMBER,
            )?
        };
        let network_card = match self.get_opt(&p("network-card")).await? {
            Some(v) => {
                let path = p("network-card");
                at_most(&path, parse(&path, &v)?, MAX_DEVICE_NUMBER)?
            }
            None => 0,
        };
        let cidr = p("subnet-ipv4-cidr-block");
        Ok(ImdsEni {
            mac: mac.to_owned(),
            interface_id: self.get(&p("interface-id")).await?,
            device_number,
            network_card,
            subnet_id: self.get(&p("subnet-id")).await?,
            subnet_cidr: parse(&cidr, &self.get(&cidr).await?)?,
            vpc_id: self.get(&p("vpc-id")).await?,
            vpc_cidrs: parse_lines(
                &p("vpc-ipv4-cidr-blocks"),
                self.get_opt(&p("vpc-ipv4-cidr-blocks")).await?,
            )?,
            security_groups: parse_lines(
                &p("security-group-ids"),
                self.get_opt(&p("security-group-ids")).await?,
            )?,
            local_ipv4s: parse_lines(&p("local-ipv4s"), self.get_opt(&p("local-ipv4s")).await?)?,
            ipv4_prefixes: parse_lines(&p("ipv4-prefix"), self.get_opt(&p("ipv4-prefix")).await?)?,
        })
    }

    async fn eni_v6(&self, mac: &str) -> ImdsResult<ImdsEniV6> {
        let base = format!("meta-data/network/interfaces/macs/{mac}");
        let p = |f: &str| format!("{base}/{f}");
        let lines = |f: &'static str| {
            let path = p(f);
            async move {
                let v = self.get_opt(&path).await?;
                Ok::<_, ImdsError>((path, v))
            }
        };
        let (ps, v) = lines("ipv6s").await?;
        let ipv6s = parse_lines(&ps, v)?;
        let (pp, v) = lines("ipv6-prefix").await?;
        let ipv6_prefixes = parse_lines(&pp, v)?;
        let (psub, v) = lines("subnet-ipv6-cidr-blocks").await?;
        let subnet_ipv6_cidrs = parse_lines(&psub, v)?;
        let (pvpc, v) = lines("vpc-ipv6-cidr-blocks").await?;
        let vpc_ipv6_cidrs = parse_lines(&pvpc, v)?;
        Ok(ImdsEniV6 {
            ipv6s,
            ipv6_prefixes,
            subnet_ipv6_cidrs,
            vpc_ipv6_cidrs,
        })
    }

    async fn node_ipv6(&self) -> ImdsResult<Option<Ipv6Addr>> {
        const P: &str = "meta-data/ipv6";
        self.get_opt(P).await?.map(|v| parse(P, &v)).transpose()
    }
}

/// An in-memory instance: tests set what it shows.
#[derive(Debug, Clone)]
pub struct FakeImds {
    inner: Arc<Mutex<(Identity, BTreeMap<String, ImdsEni>)>>,
    v6: Arc<Mutex<BTreeMap<String, ImdsEniV6>>>,
}

impl FakeImds {
    /// An instance with `identity` and interfaces `enis`.
    pub fn new(identity: Identity, enis: Vec<ImdsEni>) -> FakeImds {
        FakeImds {
            inner: Arc::new(Mutex::new((
                identity,
                enis.into_iter().map(|e| (e.mac.clone(), e)).collect(),
            ))),
            v6: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// Sets the IPv6 keys of the interface `mac`.
    pub fn set_v6(&self, mac: &str, v6: ImdsEniV6) {
        let mut g = match self.v6.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.insert(mac.to_owned(), v6);
    }

    fn v6_of(&self, mac: &str) -> ImdsEniV6 {
        let g = match self.v6.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.get(mac).cloned().unwrap_or_default()
    }

    /// Runs `f` on the interfaces (add, remove, change addresses).
    pub fn with_enis<R>(&self, f: impl FnOnce(&mut BTreeMap<String, ImdsEni>) -> R) -> R {
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g.1)
    }

    fn snapshot(&self) -> (Identity, BTreeMap<String, ImdsEni>) {
        match self.inner.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

#[async_trait::async_trait]
impl Imds for FakeImds {
    async fn identity(&self) -> ImdsResult<Identity> {
        Ok(self.snapshot().0)
    }

    async fn macs(&self) -> ImdsResult<Vec<String>> {
        Ok(self.snapshot().1.keys().cloned().collect())
    }

    async fn eni(&self, mac: &str, primary: bool) -> ImdsResult<ImdsEni> {
        let mut e = self
            .snapshot()
            .1
            .get(mac)
            .cloned()
            .ok_or_else(|| ImdsError::Missing {
                path: format!("meta-data/network/interfaces/macs/{mac}/"),
            })?;
        if primary {
            e.device_number = 0;
        }
        Ok(e)
    }

    async fn eni_v6(&self, mac: &str) -> ImdsResult<ImdsEniV6> {
        Ok(self.v6_of(mac))
    }

    async fn node_ipv6(&self) -> ImdsResult<Option<Ipv6Addr>> {
        let mac = self.snapshot().0.primary_mac;
        Ok(self.v6_of(&mac).ipv6s.first().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eni(mac: &str, dev: u32, ips: &[&str]) -> ImdsEni {
        ImdsEni {
            mac: mac.into(),
            interface_id: format!("eni-{dev}"),
            device_number: dev,
            network_card: 0,
            subnet_id: "subnet-1".into(),
            subnet_cidr: "10.0.0.0/20".parse().unwrap(),
            vpc_id: "vpc-1".into(),
            vpc_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
            security_groups: vec!["sg-1".into()],
            local_ipv4s: ips.iter().map(|s| s.parse().unwrap()).collect(),
            ipv4_prefixes: vec![],
        }
    }

    #[tokio::test]
    async fn enis_come_primary_first_then_by_device_and_primary_is_device_zero() {
        let id = Identity {
            instance_id: "i-1".into(),
            instance_type: "m5.large".into(),
            region: "us-west-2".into(),
            availability_zone: "us-west-2a".into(),
            primary_mac: "02:00:00:00:00:0b".into(),
            local_ipv4: "10.0.0.10".parse().unwrap(),
        };
        let f = FakeImds::new(
            id,
            vec![
                eni("02:00:00:00:00:0a", 2, &["10.0.0.20"]),
                eni("02:00:00:00:00:0b", 5, &["10.0.0.10", "10.0.0.11"]),
                eni("02:00:00:00:00:0c", 1, &["10.0.0.30"]),
            ],
        );
        let enis = f.enis("02:00:00:00:00:0b").await.unwrap();
        let order: Vec<(&str, u32)> = enis
            .iter()
            .map(|e| (e.interface_id.as_str(), e.device_number))
            .collect();
        assert_eq!(order, [("eni-5", 0), ("eni-1", 1), ("eni-2", 2)]);
        assert_eq!(
            enis[0].secondary_ips(),
            ["10.0.0.11".parse::<Ipv4Addr>().unwrap()]
        );
        assert!(f.eni("02:00:00:00:00:ff", false).await.is_err());
    }

    /// Found by `every_imds_key_mangled_is_parsed_or_named` (the MAC list's lines repeated
    /// 4,000 times): each listed MAC was read, about ten requests each, with no bound; and
    /// a line that is no MAC went into the following paths.
    #[test]
    fn the_mac_list_is_macs_deduplicated_and_bounded() {
        let p = "meta-data/network/interfaces/macs/";
        assert_eq!(
            parse_macs(
                p,
                "02:00:00:00:00:0A/\n02:00:00:00:00:0b/\n02:00:00:00:00:0a/\n"
            ),
            Ok(vec![
                "02:00:00:00:00:0a".to_owned(),
                "02:00:00:00:00:0b".to_owned()
            ])
        );
        let many: String = (0..4000u32)
            .map(|i| format!("02:00:00:00:{:02x}:{:02x}/\n", i >> 8, i & 255))
            .collect();
        assert!(matches!(
            parse_macs(p, &many),
            Err(ImdsError::OutOfRange { max: 256, .. })
        ));
        for bad in [
            "../../latest/api/token",
            "02:00:00:00:00",
            "zz:00:00:00:00:00",
            "02:00:00:00:00:0a/x",
        ] {
            let e = parse_macs(p, bad).unwrap_err();
            assert!(e.to_string().contains(p), "{e}");
        }
    }

    #[test]
    fn region_comes_from_the_identity_document() {
        assert_eq!(
            region_of(r#"{"region": "eu-west-1", "instanceId": "i-1"}"#).as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(region_of("not json"), None);
    }
}
