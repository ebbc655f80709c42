//! EC2 Query protocol output: XML responses and EC2's error envelope.

use std::fmt::Display;

use subnet_calc::limits::{Hypervisor, InstanceLimits};

use crate::api::{Reply, ReservationView};
use crate::error::ApiError;
use crate::ipv6::Ipv6Block;
use crate::model::{
    card_max_enis, subnet_ipv6_association_id, vpc_ipv6_association_id, Eni, Instance, SubnetView,
    Tags, TrunkAssociation, Vpc,
};

/// EC2's XML namespace.
pub const XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

/// Escapes text for XML content.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

struct W {
    s: String,
    epoch_ms: u64,
}

impl W {
    fn open(&mut self, t: &str) {
        self.s.push('<');
        self.s.push_str(t);
        self.s.push('>');
    }
    fn close(&mut self, t: &str) {
        self.s.push_str("</");
        self.s.push_str(t);
        self.s.push('>');
    }
    fn leaf(&mut self, t: &str, v: impl Display) {
        self.open(t);
        self.s.push_str(&escape(&v.to_string()));
        self.close(t);
    }
    fn time(&mut self, t: &str, sim_ms: u64) {
        self.leaf(t, iso8601(self.epoch_ms + sim_ms));
    }
    fn set<T>(&mut self, t: &str, items: &[T], mut f: impl FnMut(&mut Self, &T)) {
        self.open(t);
        for i in items {
            self.open("item");
            f(self, i);
            self.close("item");
        }
        self.close(t);
    }
    fn tags(&mut self, tags: &Tags) {
        let v: Vec<(&String, &String)> = tags.iter().collect();
        self.set("tagSet", &v, |w, (k, v)| {
            w.leaf("key", k);
            w.leaf("value", v);
        });
    }
    fn groups(&mut self, groups: &[String]) {
        self.set("groupSet", groups, |w, g| {
            w.leaf("groupId", g);
        });
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for Unix milliseconds.
pub fn iso8601(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// EC2's error envelope.
pub fn error(e: &ApiError, request_id: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>{}</Message></Error></Errors><RequestID>{}</RequestID></Response>",
        escape(&e.code),
        escape(&e.message),
        escape(request_id)
    )
}

/// The XML answer of `action` for `reply`; `epoch_ms` is the Unix time of simulator time 0.
pub fn render(action: &str, reply: &Reply, request_id: &str, epoch_ms: u64) -> String {
    let mut w = W {
        s: String::with_capacity(1024),
        epoch_ms,
    };
    w.s.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    w.s.push_str(&format!("<{action}Response xmlns=\"{XMLNS}\">"));
    w.leaf("requestId", request_id);
    match reply {
        Reply::Vpc(v) => {
            w.open("vpc");
            vpc(&mut w, v);
            w.close("vpc");
        }
        Reply::Vpcs { vpcs, next_token } => {
            w.set("vpcSet", vpcs, vpc);
            if let Some(t) = next_token {
                w.leaf("nextToken", t);
            }
        }
        Reply::VpcCidrAssociated {
            vpc_id,
            association_id,
            block,
        } => {
            w.open("ipv6CidrBlockAssociation");
            ipv6_association(&mut w, association_id, block, "associating");
            w.leaf("ipv6Pool", "Amazon");
            w.close("ipv6CidrBlockAssociation");
            w.leaf("vpcId", vpc_id);
        }
        Reply::SubnetCidrAssociated {
            subnet_id,
            association_id,
            block,
        } => {
            w.open("ipv6CidrBlockAssociation");
            ipv6_association(&mut w, association_id, block, "associating");
            w.close("ipv6CidrBlockAssociation");
            w.leaf("subnetId", subnet_id);
        }
        Reply::Subnet(s) => {
            w.open("subnet");
            subnet(&mut w, s);
            w.close("subnet");
        }
        Reply::SecurityGroup(g) => {
            w.leaf("return", true);
            w.leaf("groupId", &g.id);
            w.tags(&g.tags);
        }
        Reply::Reservation(r) => reservation(&mut w, r),
        Reply::StateChanges(c) => {
            w.set("instancesSet", c, |w, c| {
                w.leaf("instanceId", &c.instance_id);
                w.open("currentState");
                w.leaf("code", c.current.0);
                w.leaf("name", c.current.1);
                w.close("currentState");
                w.open("previousState");
                w.leaf("code", c.previous.0);
                w.leaf("name", c.previous.1);
                w.close("previousState");
            });
        }
        Reply::Reservations {
            reservations,
            next_token,
        } => {
            w.set("reservationSet", reservations, reservation);
            if let Some(t) = next_token {
                w.leaf("nextToken", t);
            }
        }
        Reply::InstanceTypes { types, next_token } => {
            w.set("instanceTypeSet", types, instance_type);
            if let Some(t) = next_token {
                w.leaf("nextToken", t);
            }
        }
        Reply::Subnets {
            subnets,
            next_token,
        } => {
            w.set("subnetSet", subnets, subnet);
            if let Some(t) = next_token {
                w.leaf("nextToken", t);
            }
        }
        Reply::NetworkInterfaces { enis, next_token } => {
            w.set("networkInterfaceSet", enis, eni);
            if let Some(t) = next_token {
                w.leaf("nextToken", t);
            }
        }
        Reply::NetworkInterface {
            eni: e,
            client_token,
        } => {
            w.open("networkInterface");
            eni(&mut w, e);
            w.close("networkInterface");
            if let Some(t) = client_token {
                w.leaf("clientToken", t);
            }
        }
        Reply::Attached {
            attachment_id,
            network_card_index,
        } => {
            w.leaf("attachmentId", attachment_id);
            w.leaf("networkCardIndex", network_card_index);
        }
        Reply::Done => w.leaf("return", true),
        Reply::AssignedPrivate {
            eni_id,
            addresses,
            prefixes,
        } => {
            w.leaf("networkInterfaceId", eni_id);
            w.set("assignedPrivateIpAddressesSet", addresses, |w, a| {
                w.leaf("privateIpAddress", a)
            });
            w.set("assignedIpv4PrefixSet", prefixes, |w, p| {
                w.leaf("ipv4Prefix", p)
            });
        }
        Reply::AssignedIpv6 {
            eni_id,
            addresses,
            prefixes,
        } => {
            w.leaf("networkInterfaceId", eni_id);
            text_set(&mut w, "assignedIpv6Addresses", addresses);
            text_set(&mut w, "assignedIpv6PrefixSet", prefixes);
        }
        Reply::UnassignedIpv6 {
            eni_id,
            addresses,
            prefixes,
        } => {
            w.leaf("networkInterfaceId", eni_id);
            text_set(&mut w, "unassignedIpv6Addresses", addresses);
            text_set(&mut w, "unassignedIpv6PrefixSet", prefixes);
        }
        Reply::TrunkAssociated {
            association,
            client_token,
        } => {
            w.open("interfaceAssociation");
            trunk_association(&mut w, association);
            w.close("interfaceAssociation");
            if let Some(t) = client_token {
                w.leaf("clientToken", t);
            }
        }
        Reply::TrunkDisassociated { client_token } => {
            w.leaf("return", true);
            if let Some(t) = client_token {
                w.leaf("clientToken", t);
            }
        }
        Reply::TrunkAssociations {
            associations,
            next_token,
        } => {
            w.set("interfaceAssociationSet", associations, trunk_association);
            if let Some(t) = next_token {
                w.leaf("nextToken", t);
            }
        }
    }
    w.s.push_str(&format!("</{action}Response>"));
    w.s
}

fn trunk_association(w: &mut W, a: &TrunkAssociation) {
    w.leaf("associationId", &a.id);
    w.leaf("branchInterfaceId", &a.branch_id);
    w.leaf("trunkInterfaceId", &a.trunk_id);
    w.leaf("interfaceProtocol", a.protocol.as_str());
    if let Some(v) = a.vlan_id {
        w.leaf("vlanId", v);
    }
    if let Some(k) = a.gre_key {
        w.leaf("greKey", k);
    }
    w.tags(&a.tags);
}

fn ipv6_association(w: &mut W, id: &str, block: &Ipv6Block, state: &str) {
    w.leaf("associationId", id);
    w.leaf("ipv6CidrBlock", block);
    w.open("ipv6CidrBlockState");
    w.leaf("state", state);
    w.close("ipv6CidrBlockState");
}

fn vpc(w: &mut W, v: &Vpc) {
    w.leaf("vpcId", &v.id);
    w.leaf("ownerId", &v.owner_id);
    w.leaf("state", "available");
    w.leaf("cidrBlock", v.cidr);
    w.set("cidrBlockAssociationSet", &[v.cidr], |w, c| {
        w.leaf("associationId", format!("vpc-cidr-assoc-{}", &v.id[4..]));
        w.leaf("cidrBlock", c);
        w.open("cidrBlockState");
        w.leaf("state", "associated");
        w.close("cidrBlockState");
    });
    let v6: Vec<_> = v.ipv6_cidr.iter().collect();
    w.set("ipv6CidrBlockAssociationSet", &v6, |w, c| {
        ipv6_association(w, &vpc_ipv6_association_id(&v.id), c, "associated");
        w.leaf("ipv6Pool", "Amazon");
    });
    w.leaf("dhcpOptionsId", "default");
    w.leaf("instanceTenancy", "default");
    w.leaf("isDefault", false);
    w.tags(&v.tags);
}

fn text_set<T: Display>(w: &mut W, tag: &str, items: &[T]) {
    w.open(tag);
    for i in items {
        w.leaf("item", i);
    }
    w.close(tag);
}

fn az_id(az: &str) -> String {
    // us-west-2a -> usw2-az1
    let region = region_of(az);
    let mut parts = region.split('-');
    let mut short = parts.next().unwrap_or("").to_owned();
    for p in parts {
        if p.chars().all(|c| c.is_ascii_digit()) {
            short.push_str(p);
        } else {
            short.extend(p.chars().next());
        }
    }
    let n = az.bytes().last().map_or(1, |b| b.saturating_sub(b'a') + 1);
    format!("{short}-az{n}")
}

fn subnet(w: &mut W, s: &SubnetView) {
    w.leaf("subnetId", &s.id);
    w.leaf(
        "subnetArn",
        format!(
            "arn:aws:ec2:{}:{}:subnet/{}",
            region_of(&s.availability_zone),
            s.owner_id,
            s.id
        ),
    );
    w.leaf("state", "available");
    w.leaf("vpcId", &s.vpc_id);
    w.leaf("ownerId", &s.owner_id);
    w.leaf("cidrBlock", s.cidr);
    let v6: Vec<_> = s.ipv6_cidr.iter().collect();
    w.set("ipv6CidrBlockAssociationSet", &v6, |w, c| {
        ipv6_association(w, &subnet_ipv6_association_id(&s.id), c, "associated");
    });
    w.leaf("availableIpAddressCount", s.available_ip_address_count);
    w.leaf("availabilityZone", &s.availability_zone);
    w.leaf("availabilityZoneId", az_id(&s.availability_zone));
    w.leaf("defaultForAz", false);
    w.leaf("mapPublicIpOnLaunch", false);
    w.leaf("assignIpv6AddressOnCreation", false);
    w.leaf("ipv6Native", false);
    w.tags(&s.tags);
}

fn region_of(az: &str) -> &str {
    match az.as_bytes().last() {
        Some(b) if b.is_ascii_lowercase() => &az[..az.len() - 1],
        _ => az,
    }
}

fn eni(w: &mut W, e: &Eni) {
    w.leaf("networkInterfaceId", &e.id);
    w.leaf("subnetId", &e.subnet_id);
    w.leaf("vpcId", &e.vpc_id);
    w.leaf("availabilityZone", &e.availability_zone);
    w.leaf("description", &e.description);
    w.leaf("ownerId", &e.owner_id);
    w.leaf("requesterManaged", false);
    w.leaf("status", e.status.as_str());
    w.leaf("macAddress", &e.mac);
    w.leaf("privateIpAddress", e.primary_ip);
    w.leaf("sourceDestCheck", e.source_dest_check);
    w.groups(&e.groups);
    if let Some(a) = &e.attachment {
        w.open("attachment");
        w.leaf("attachmentId", &a.id);
        w.leaf("instanceId", &a.instance_id);
        w.leaf("instanceOwnerId", &e.owner_id);
        w.leaf("deviceIndex", a.device_index);
        w.leaf("networkCardIndex", a.network_card_index);
        w.leaf("status", a.status.as_str());
        w.time("attachTime", a.attach_ms);
        w.leaf("deleteOnTermination", a.delete_on_termination);
        w.close("attachment");
    }
    w.tags(&e.tags);
    addresses(w, e);
    w.leaf("interfaceType", &e.interface_type);
}

fn addresses(w: &mut W, e: &Eni) {
    let ips: Vec<(std::net::Ipv4Addr, bool)> = std::iter::once((e.primary_ip, true))
        .chain(e.secondary_ips.iter().map(|a| (*a, false)))
        .collect();
    w.set("privateIpAddressesSet", &ips, |w, (a, p)| {
        w.leaf("privateIpAddress", a);
        w.leaf("primary", p);
    });
    w.set("ipv6AddressesSet", &e.ipv6_addresses, |w, a| {
        w.leaf("ipv6Address", a);
        w.leaf("isPrimaryIpv6", false);
    });
    w.set("ipv4PrefixSet", &e.ipv4_prefixes, |w, p| {
        w.leaf("ipv4Prefix", p)
    });
    w.set("ipv6PrefixSet", &e.ipv6_prefixes, |w, p| {
        w.leaf("ipv6Prefix", p)
    });
}

fn reservation(w: &mut W, r: &ReservationView) {
    w.leaf("reservationId", &r.reservation_id);
    w.leaf("ownerId", &r.owner_id);
    w.open("groupSet");
    w.close("groupSet");
    w.set("instancesSet", &r.instances, |w, (i, enis)| {
        instance(w, i, enis)
    });
}

fn instance(w: &mut W, i: &Instance, enis: &[Eni]) {
    let primary = enis.iter().find(|e| e.id == i.primary_eni);
    w.leaf("instanceId", &i.id);
    w.leaf("imageId", &i.image_id);
    w.open("instanceState");
    w.leaf("code", i.state.code_name().0);
    w.leaf("name", i.state.code_name().1);
    w.close("instanceState");
    w.leaf(
        "privateDnsName",
        primary
            .map(|e| {
                format!(
                    "ip-{}.{}.compute.internal",
                    e.primary_ip.to_string().replace('.', "-"),
                    region_of(&i.availability_zone)
                )
            })
            .unwrap_or_default(),
    );
    w.leaf("dnsName", "");
    w.leaf("amiLaunchIndex", 0);
    w.leaf("instanceType", &i.instance_type);
    w.time("launchTime", i.launch_ms);
    w.open("placement");
    w.leaf("availabilityZone", &i.availability_zone);
    w.leaf("groupName", "");
    w.leaf("tenancy", "default");
    w.close("placement");
    w.open("monitoring");
    w.leaf("state", "disabled");
    w.close("monitoring");
    w.leaf("subnetId", &i.subnet_id);
    w.leaf("vpcId", &i.vpc_id);
    if let Some(p) = primary {
        w.leaf("privateIpAddress", p.primary_ip);
        if let Some(a) = p.ipv6_addresses.first() {
            w.leaf("ipv6Address", a);
        }
    }
    w.leaf("sourceDestCheck", true);
    w.set("groupSet", &i.security_groups, |w, g| w.leaf("groupId", g));
    w.leaf("architecture", "x86_64");
    w.leaf("rootDeviceType", "ebs");
    w.leaf("rootDeviceName", "/dev/xvda");
    w.leaf("virtualizationType", "hvm");
    w.tags(&i.tags);
    w.leaf("hypervisor", "xen");
    w.set("networkInterfaceSet", enis, |w, e| {
        w.leaf("networkInterfaceId", &e.id);
        w.leaf("subnetId", &e.subnet_id);
        w.leaf("vpcId", &e.vpc_id);
        w.leaf("description", &e.description);
        w.leaf("ownerId", &e.owner_id);
        w.leaf("status", e.status.as_str());
        w.leaf("macAddress", &e.mac);
        w.leaf("privateIpAddress", e.primary_ip);
        w.leaf("sourceDestCheck", e.source_dest_check);
        w.groups(&e.groups);
        if let Some(a) = &e.attachment {
            w.open("attachment");
            w.leaf("attachmentId", &a.id);
            w.leaf("deviceIndex", a.device_index);
            w.leaf("networkCardIndex", a.network_card_index);
            w.leaf("status", a.status.as_str());
            w.time("attachTime", a.attach_ms);
            w.leaf("deleteOnTermination", a.delete_on_termination);
            w.close("attachment");
        }
        addresses(w, e);
        w.leaf("interfaceType", &e.interface_type);
    });
    w.leaf("ebsOptimized", false);
    w.leaf("enaSupport", true);
}

fn instance_type(w: &mut W, l: &InstanceLimits) {
    w.leaf("instanceType", &l.instance_type);
    w.leaf("currentGeneration", true);
    w.leaf("bareMetal", l.bare_metal);
    if l.hypervisor != Hypervisor::None {
        w.leaf("hypervisor", l.hypervisor);
    }
    w.open("vCpuInfo");
    w.leaf("defaultVCpus", l.vcpus);
    w.close("vCpuInfo");
    w.open("networkInfo");
    w.leaf("networkPerformance", "Up to 10 Gigabit");
    w.leaf("maximumNetworkInterfaces", l.max_enis_total);
    w.leaf("maximumNetworkCards", l.network_cards.max(1));
    w.leaf("defaultNetworkCardIndex", l.default_card);
    let cards: Vec<u32> = (0..l.network_cards.max(1)).collect();
    w.set("networkCards", &cards, |w, c| {
        w.leaf("networkCardIndex", c);
        w.leaf("networkPerformance", "Up to 10 Gigabit");
        w.leaf("maximumNetworkInterfaces", card_max_enis(l, *c));
    });
    w.leaf("ipv4AddressesPerInterface", l.ipv4_per_eni);
    w.leaf("ipv6AddressesPerInterface", l.ipv6_per_eni);
    w.leaf("ipv6Supported", l.ipv6_per_eni > 0);
    w.leaf(
        "enaSupport",
        if l.hypervisor == Hypervisor::Xen {
            "supported"
        } else {
            "required"
        },
    );
    w.leaf("efaSupported", false);
    w.leaf("encryptionInTransitSupported", false);
    w.close("networkInfo");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_formats_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_709_251_199_123), "2024-02-29T23:59:59.123Z");
    }

    #[test]
    fn error_envelope_escapes_and_is_well_formed() {
        let x = error(
            &ApiError::new("InvalidParameterValue", "a <b> & 'c'"),
            "req-1",
        );
        let doc = roxmltree::Document::parse(&x).expect("well-formed");
        let msg = doc
            .descendants()
            .find(|n| n.has_tag_name("Message"))
            .and_then(|n| n.text());
        assert_eq!(msg, Some("a <b> & 'c'"));
    }

    #[test]
    fn availability_zone_ids_look_like_aws() {
        assert_eq!(az_id("us-west-2a"), "usw2-az1");
        assert_eq!(region_of("us-west-2c"), "us-west-2");
    }
}
