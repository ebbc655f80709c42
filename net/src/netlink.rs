//! rtnetlink verbs in our own nouns: links, veth pairs, addresses, routes, rules, neighbours.
//!
//! A [`Netlink`] is one netlink socket bound to one namespace: it is created by a thread inside
//! that namespace (see [`Netlink::open`]) and then used from anywhere, so no thread has to stay
//! in the namespace while requests are made (ARCHITECTURE.md style rule 7).

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use rtnetlink::packet_route::link::{
    InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{IpVersion, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVlan};

use crate::error::{NetError, Result};
use crate::netns::Netns;
use crate::types::{Family, IpCidr, MacAddr, Scope};

/// `RT_TABLE_COMPAT`: what goes in the 8-bit header field when the table id needs 32 bits.
const RT_TABLE_COMPAT: u8 = 252;

/// A network interface as seen by netlink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Interface index (unique within its namespace).
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address, for links that have one.
    pub mac: Option<MacAddr>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Link kind (`veth`, `bridge`, ...) when the kernel reports one.
    pub kind: Option<String>,
}

/// One end of a veth pair to create; see [`Netlink::create_veth`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VethEnd {
    /// Interface name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
    /// MAC address to set explicitly (else the kernel picks a random one).
    pub mac: Option<MacAddr>,
    /// Bring it up as part of creation.
    pub up: bool,
}

/// An interface address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address {
    /// Interface index.
    pub index: u32,
    /// Address and prefix length.
    pub cidr: IpCidr,
    /// Address scope.
    pub scope: Scope,
}

/// A unicast route.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    /// Destination prefix (`0.0.0.0/0` for a default route).
    pub dst: IpCidr,
    /// Next hop, if any.
    pub gateway: Option<IpAddr>,
    /// Output interface index, if any.
    pub oif: Option<u32>,
    /// Routing table id (254 = main).
    pub table: u32,
    /// Route scope.
    pub scope: Scope,
    /// Preferred source address (`src`), if any.
    pub pref_src: Option<IpAddr>,
}

impl Route {
    /// `dst dev <oif> scope link` in `table`.
    pub fn link_scope(dst: IpCidr, oif: u32, table: u32) -> Route {
        Route {
            dst,
            gateway: None,
            oif: Some(oif),
            table,
            scope: Scope::Link,
            pref_src: None,
        }
    }

    /// `default via <gateway> dev <oif>` in `table`.
    pub fn default_via(gateway: IpAddr, oif: u32, table: u32) -> Route {
        let any = match gateway {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        };
        Route {
            dst: IpCidr {
                addr: any,
                prefix_len: 0,
            },
            gateway: Some(gateway),
            oif: Some(oif),
            table,
            scope: Scope::Universe,
            pref_src: None,
        }
    }
}

/// A policy-routing rule (`ip rule`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Address family.
    pub family: Family,
    /// Priority (preference).
    pub priority: u32,
    /// `from` selector.
    pub from: Option<IpCidr>,
    /// `to` selector.
    pub to: Option<IpCidr>,
    /// `fwmark` value.
    pub fwmark: Option<u32>,
    /// `fwmark` mask.
    pub fwmask: Option<u32>,
    /// `iif` selector.
    pub iif: Option<String>,
    /// Table looked up.
    pub table: u32,
}

impl Rule {
    /// A rule of `family` at `priority` that looks up `table`, with no selector yet.
    pub fn new(family: Family, priority: u32, table: u32) -> Rule {
        Rule {
            family,
            priority,
            from: None,
            to: None,
            fwmark: None,
            fwmask: None,
            iif: None,
            table,
        }
    }

    /// Adds a `from` selector.
    pub fn from(mut self, cidr: IpCidr) -> Rule {
        self.from = Some(cidr);
        self
    }

    /// Adds a `to` selector.
    pub fn to(mut self, cidr: IpCidr) -> Rule {
        self.to = Some(cidr);
        self
    }

    /// Adds a `fwmark mark/mask` selector.
    pub fn fwmark(mut self, mark: u32, mask: u32) -> Rule {
        self.fwmark = Some(mark);
        self.fwmask = Some(mask);
        self
    }

    /// Adds an `iif` selector.
    pub fn iif(mut self, name: impl Into<String>) -> Rule {
        self.iif = Some(name.into());
        self
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.priority)?;
        match &self.from {
            Some(c) => write!(f, " from {c}")?,
            None => write!(f, " from all")?,
        }
        if let Some(c) = &self.to {
            write!(f, " to {c}")?;
        }
        if let Some(m) = self.fwmark {
            write!(f, " fwmark {m:#x}/{:#x}", self.fwmask.unwrap_or(u32::MAX))?;
        }
        if let Some(i) = &self.iif {
            write!(f, " iif {i}")?;
        }
        write!(f, " lookup {}", self.table)
    }
}

/// Which rules [`Netlink::delete_rules`] removes: every set field must match, unset fields
/// match anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleFilter {
    /// Address family.
    pub family: Family,
    /// Priority.
    pub priority: Option<u32>,
    /// Exact `from` selector.
    pub from: Option<IpCidr>,
    /// Exact `to` selector.
    pub to: Option<IpCidr>,
    /// Table.
    pub table: Option<u32>,
    /// Exact `iif`.
    pub iif: Option<String>,
}

impl RuleFilter {
    /// A filter matching every rule of `family`.
    pub fn any(family: Family) -> RuleFilter {
        RuleFilter {
            family,
            priority: None,
            from: None,
            to: None,
            table: None,
            iif: None,
        }
    }

    /// True when the kernel can select exactly these rules by itself (see
    /// [`Netlink::delete_rules`]): every prefix selector is longer than `/0`, a table is not
    /// 0 (which the kernel reads as "any"), and the interface name is not empty.
    pub fn kernel_selectable(&self) -> bool {
        self.from.is_none_or(|c| c.prefix_len > 0)
            && self.to.is_none_or(|c| c.prefix_len > 0)
            && self.table != Some(0)
            && self.iif.as_ref().is_none_or(|i| !i.is_empty())
    }

    /// True when `rule` is selected.
    pub fn matches(&self, rule: &Rule) -> bool {
        rule.family == self.family
            && self.priority.is_none_or(|p| p == rule.priority)
            && self.from.is_none_or(|c| Some(c) == rule.from)
            && self.to.is_none_or(|c| Some(c) == rule.to)
            && self.table.is_none_or(|t| t == rule.table)
            && self
                .iif
                .as_ref()
                .is_none_or(|i| Some(i) == rule.iif.as_ref())
    }
}

/// A neighbour (ARP/NDP) entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    /// Interface index.
    pub index: u32,
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Its link-layer address, if resolved.
    pub mac: Option<MacAddr>,
    /// True for a `permanent` (static) entry.
    pub permanent: bool,
}

/// A netlink route socket bound to one network namespace.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    /// Dump requests (whole-table reads) made through this socket and the sockets opened
    /// with [`Netlink::open_sharing_counter`] from it.
    dumps: Arc<AtomicUsize>,
}

/// A link notification seen by a [`LinkWatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkEvent {
    /// `RTM_NEWLINK` (created or changed) when true, `RTM_DELLINK` when false.
    pub new: bool,
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
}

/// The link notifications (`RTNLGRP_LINK`) of one namespace from the moment the watch is
/// opened: what a test uses to see which links ever appeared in a namespace, e.g. that a
/// pod's interface was never created on the host side and moved.
pub struct LinkWatch {
    nl: Netlink,
    events: Box<dyn futures_util::Stream<Item = Notification> + Send + Unpin>,
}

type Notification = (
    rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
);

impl std::fmt::Debug for LinkWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkWatch").finish_non_exhaustive()
    }
}

impl LinkWatch {
    /// Subscribes to the link notifications of `ns`. Must be called within a tokio runtime.
    pub fn open(ns: &Netns) -> Result<LinkWatch> {
        let rt = tokio::runtime::Handle::try_current().map_err(|e| NetError::Thread {
            what: format!("LinkWatch::open needs a tokio runtime: {e}"),
        })?;
        let rt2 = rt.clone();
        let (conn, handle, events) = ns
            .run(move || {
                let _rt = rt2.enter();
                rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])
            })?
            .map_err(|source| NetError::Netns {
                op: "open a netlink link watch in",
                path: ns.path().to_path_buf(),
                source,
            })?;
        rt.spawn(conn);
        Ok(LinkWatch {
            nl: Netlink {
                handle,
                dumps: Arc::default(),
            },
            events: Box::new(events),
        })
    }

    /// Every notification received so far. A request answered on the same socket first makes
    /// sure that everything the kernel sent before this call has been read.
    pub async fn events(&mut self) -> Result<Vec<LinkEvent>> {
        self.nl.link_by_index(1).await?;
        let mut out = Vec::new();
        use futures_util::{FutureExt, StreamExt};
        use rtnetlink::packet_core::NetlinkPayload;
        while let Some(Some((msg, _))) = self.events.next().now_or_never() {
            let (new, m) = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => (true, m),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => (false, m),
                _ => continue,
            };
            let l = link_from_message(&m);
            out.push(LinkEvent {
                new,
                index: l.index,
                name: l.name,
            });
        }
        Ok(out)
    }
}

fn family_of(f: Family) -> AddressFamily {
    match f {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn ip_version(f: Family) -> IpVersion {
    match f {
        Family::V4 => IpVersion::V4,
        Family::V6 => IpVersion::V6,
    }
}

fn route_scope(s: Scope) -> RouteScope {
    match s {
        Scope::Universe => RouteScope::Universe,
        Scope::Site => RouteScope::Site,
        Scope::Link => RouteScope::Link,
        Scope::Host => RouteScope::Host,
        Scope::Other(v) => RouteScope::Other(v),
    }
}

fn scope_of_route(s: RouteScope) -> Scope {
    match s {
        RouteScope::Universe => Scope::Universe,
        RouteScope::Site => Scope::Site,
        RouteScope::Link => Scope::Link,
        RouteScope::Host => Scope::Host,
        other => Scope::Other(u8::from(other)),
    }
}

fn address_scope(s: Scope) -> AddressScope {
    match s {
        Scope::Universe => AddressScope::Universe,
        Scope::Site => AddressScope::Site,
        Scope::Link => AddressScope::Link,
        Scope::Host => AddressScope::Host,
        Scope::Other(v) => AddressScope::Other(v),
    }
}

fn scope_of_address(s: AddressScope) -> Scope {
    match s {
        AddressScope::Universe => Scope::Universe,
        AddressScope::Site => Scope::Site,
        AddressScope::Link => Scope::Link,
        AddressScope::Host => Scope::Host,
        other => Scope::Other(u8::from(other)),
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn link_from_message(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        kind: None,
    };
    for attr in &m.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(a) => link.mac = MacAddr::from_slice(a),
            LinkAttribute::Mtu(v) => link.mtu = *v,
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// The `RTM_NEWLINK` message creating VLAN `name` (kind `vlan`, `IFLA_VLAN_ID` = `vlan_id`)
/// on parent `parent_index` (`IFLA_LINK`) with address `mac`, as the reference's
/// `buildVlanLink` asks netlink for.
pub(crate) fn vlan_link_message(
    name: &str,
    parent_index: u32,
    vlan_id: u16,
    mac: MacAddr,
) -> LinkMessage {
    LinkVlan::new(name, parent_index, vlan_id)
        .address(mac.octets().to_vec())
        .build()
}

fn rule_message(r: &Rule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = family_of(r.family);
    m.header.action = RuleAction::ToTable;
    m.header.table = u8::try_from(r.table).unwrap_or(RT_TABLE_COMPAT);
    m.attributes.push(RuleAttribute::Table(r.table));
    m.attributes.push(RuleAttribute::Priority(r.priority));
    if let Some(c) = r.from {
        m.header.src_len = c.prefix_len;
        m.attributes.push(RuleAttribute::Source(c.addr));
    }
    if let Some(c) = r.to {
        m.header.dst_len = c.prefix_len;
        m.attributes.push(RuleAttribute::Destination(c.addr));
    }
    if let Some(mark) = r.fwmark {
        m.attributes.push(RuleAttribute::FwMark(mark));
    }
    if let Some(mask) = r.fwmask {
        m.attributes.push(RuleAttribute::FwMask(mask));
    }
    if let Some(i) = &r.iif {
        m.attributes.push(RuleAttribute::Iifname(i.clone()));
    }
    m
}

/// Bound on the rules one [`Netlink::delete_rules`] call removes.
const MAX_RULE_DELETES: usize = 4096;

/// An `RTM_DELRULE` selecting what `f` selects: only the set fields are sent; the kernel's
/// rule lookup (`rule_find`) treats an absent table, priority, action, prefix or interface
/// as "any".
fn rule_filter_message(f: &RuleFilter) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = family_of(f.family);
    if let Some(t) = f.table {
        m.header.table = u8::try_from(t).unwrap_or(RT_TABLE_COMPAT);
        m.attributes.push(RuleAttribute::Table(t));
    }
    if let Some(p) = f.priority {
        m.attributes.push(RuleAttribute::Priority(p));
    }
    if let Some(c) = f.from {
        m.header.src_len = c.prefix_len;
        m.attributes.push(RuleAttribute::Source(c.addr));
    }
    if let Some(c) = f.to {
        m.header.dst_len = c.prefix_len;
        m.attributes.push(RuleAttribute::Destination(c.addr));
    }
    if let Some(i) = &f.iif {
        m.attributes.push(RuleAttribute::Iifname(i.clone()));
    }
    m
}

fn rule_from_message(m: &RuleMessage) -> Option<Rule> {
    let family = match m.header.family {
        AddressFamily::Inet => Family::V4,
        AddressFamily::Inet6 => Family::V6,
        _ => return None,
    };
    let mut r = Rule::new(family, 0, u32::from(m.header.table));
    for attr in &m.attributes {
        match attr {
            RuleAttribute::Priority(p) => r.priority = *p,
            RuleAttribute::Table(t) => r.table = *t,
            RuleAttribute::Source(a) => {
                r.from = Some(IpCidr {
                    addr: *a,
                    prefix_len: m.header.src_len,
                })
            }
            RuleAttribute::Destination(a) => {
                r.to = Some(IpCidr {
                    addr: *a,
                    prefix_len: m.header.dst_len,
                })
            }
            RuleAttribute::FwMark(v) => r.fwmark = Some(*v),
            RuleAttribute::FwMask(v) => r.fwmask = Some(*v),
            RuleAttribute::Iifname(i) => r.iif = Some(i.clone()),
            _ => {}
        }
    }
    Some(r)
}

fn route_message(r: &Route, for_delete: bool) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family_of(r.dst.family());
    m.header.destination_prefix_length = r.dst.prefix_len;
    m.header.table = u8::try_from(r.table).unwrap_or(RT_TABLE_COMPAT);
    m.header.kind = RouteType::Unicast;
    if for_delete {
        // Wildcards, as `ip route del` sends: match whatever protocol and scope the route has.
        m.header.protocol = RouteProtocol::Unspec;
        m.header.scope = RouteScope::NoWhere;
    } else {
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = route_scope(r.scope);
    }
    m.attributes.push(RouteAttribute::Table(r.table));
    if r.dst.prefix_len > 0 {
        m.attributes
            .push(RouteAttribute::Destination(r.dst.network().into()));
    }
    if let Some(gw) = r.gateway {
        m.attributes.push(RouteAttribute::Gateway(gw.into()));
    }
    if let Some(oif) = r.oif {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(src) = r.pref_src {
        m.attributes.push(RouteAttribute::PrefSource(src.into()));
    }
    m
}

fn route_from_message(m: &RouteMessage) -> Option<Route> {
    if m.header.kind != RouteType::Unicast {
        return None;
    }
    let any = match m.header.address_family {
        AddressFamily::Inet => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let mut r = Route {
        dst: IpCidr {
            addr: any,
            prefix_len: m.header.destination_prefix_length,
        },
        gateway: None,
        oif: None,
        table: u32::from(m.header.table),
        scope: scope_of_route(m.header.scope),
        pref_src: None,
    };
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Destination(a) => {
                if let Some(ip) = route_ip(a) {
                    r.dst.addr = ip;
                }
            }
            RouteAttribute::Gateway(a) => r.gateway = route_ip(a),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Table(t) => r.table = *t,
            RouteAttribute::PrefSource(a) => r.pref_src = route_ip(a),
            _ => {}
        }
    }
    Some(r)
}

fn address_from_message(m: &AddressMessage) -> Option<Address> {
    let mut addr = None;
    let mut local = None;
    for attr in &m.attributes {
        match attr {
            AddressAttribute::Address(a) => addr = Some(*a),
            AddressAttribute::Local(a) => local = Some(*a),
            _ => {}
        }
    }
    let ip = local.or(addr)?;
    Some(Address {
        index: m.header.index,
        cidr: IpCidr {
            addr: ip,
            prefix_len: m.header.prefix_len,
        },
        scope: scope_of_address(m.header.scope),
    })
}

/// True for an address the kernel or DHCP would treat as a global unicast address (not
/// loopback, link-local, multicast, broadcast or unspecified), like Go's `IsGlobalUnicast`.
pub fn is_global_unicast(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_loopback()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
                || a.is_unspecified())
        }
        IpAddr::V6(a) => {
            !(a.is_loopback()
                || a.is_multicast()
                || a.is_unspecified()
                || (a.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

impl Netlink {
    /// Opens a netlink socket inside `ns` (on a dedicated thread) and serves it on the current
    /// tokio runtime. The socket stays bound to `ns` for its whole life.
    ///
    /// Must be called from within a tokio runtime.
    pub fn open(ns: &Netns) -> Result<Netlink> {
        Netlink::open_with_counter(ns, Arc::default())
    }

    /// Like [`Netlink::open`], but dump requests made through the new socket are counted
    /// together with `other`'s (see [`Netlink::dump_requests`]).
    pub fn open_sharing_counter(ns: &Netns, other: &Netlink) -> Result<Netlink> {
        Netlink::open_with_counter(ns, other.dumps.clone())
    }

    /// How many dump requests (whole-table reads: links, addresses, routes, rules,
    /// neighbours) were made through this socket and those sharing its counter. The per-pod
    /// hot path makes none, so that its cost does not grow with what the node already has.
    pub fn dump_requests(&self) -> usize {
        self.dumps.load(Ordering::Relaxed)
    }

    fn counted_dump(&self) {
        self.dumps.fetch_add(1, Ordering::Relaxed);
    }

    fn open_with_counter(ns: &Netns, dumps: Arc<AtomicUsize>) -> Result<Netlink> {
        let rt = tokio::runtime::Handle::try_current().map_err(|e| NetError::Thread {
            what: format!("Netlink::open needs a tokio runtime: {e}"),
        })?;
        let rt2 = rt.clone();
        let (conn, handle, _) = ns
            .run(move || {
                let _rt = rt2.enter();
                rtnetlink::new_connection()
            })?
            .map_err(|source| NetError::Netns {
                op: "open netlink socket in",
                path: ns.path().to_path_buf(),
                source,
            })?;
        rt.spawn(conn);
        Ok(Netlink { handle, dumps })
    }

    /// Opens a netlink socket in the calling thread's current namespace.
    pub fn current() -> Result<Netlink> {
        Netlink::open(&Netns::current()?)
    }

    // ---- links ----

    /// All links.
    pub async fn links(&self) -> Result<Vec<Link>> {
        self.counted_dump();
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetError::netlink("list links", e))?;
        Ok(msgs.iter().map(link_from_message).collect())
    }

    /// The link called `name`, if it exists.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        let r: std::result::Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_collect()
            .await;
        match r {
            Ok(msgs) => Ok(msgs.first().map(link_from_message)),
            Err(e) => {
                let e = NetError::netlink(format!("get link {name}"), e);
                if e.is_not_found() {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The link with index `index`, if it exists.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let r: std::result::Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_collect()
            .await;
        match r {
            Ok(msgs) => Ok(msgs.first().map(link_from_message)),
            Err(e) => {
                let e = NetError::netlink(format!("get link {index}"), e);
                if e.is_not_found() {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The link whose hardware address is `mac`, if any.
    pub async fn link_by_mac(&self, mac: MacAddr) -> Result<Option<Link>> {
        Ok(self.links().await?.into_iter().find(|l| l.mac == Some(mac)))
    }

    /// Like [`Netlink::link_by_name`], but a missing link is an error.
    pub async fn require_link(&self, name: &str) -> Result<Link> {
        self.link_by_name(name)
            .await?
            .ok_or_else(|| NetError::LinkNotFound {
                what: format!("name {name}"),
            })
    }

    /// Creates a veth pair in one `RTM_NEWLINK`: `local` in this socket's namespace and `peer`
    /// directly in `peer_ns` (`IFLA_NET_NS_FD` in the peer's attributes: the peer is born
    /// there, never moved), each with its explicit MAC and MTU. `peer.up` is not applied (see
    /// [`Netlink::create_veth`]); `local.up` is. Reads nothing back.
    pub async fn add_veth(
        &self,
        local: &VethEnd,
        peer: &VethEnd,
        peer_ns: Option<&Netns>,
    ) -> Result<()> {
        use std::os::fd::{AsFd, AsRawFd};
        let mut p = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.name.clone())
            .mtu(peer.mtu);
        if let Some(mac) = peer.mac {
            p = p.address(mac.octets().to_vec());
        }
        if let Some(ns) = peer_ns {
            p = p.setns_by_fd(ns.as_fd().as_raw_fd());
        }
        let peer_msg = p.build();
        let mut b = LinkVeth::new(&local.name, &peer.name)
            .mtu(local.mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)));
        if let Some(mac) = local.mac {
            b = b.address(mac.octets().to_vec());
        }
        if local.up {
            b = b.up();
        }
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(|e| {
                NetError::netlink(format!("create veth {} <-> {}", local.name, peer.name), e)
            })
    }

    /// [`Netlink::add_veth`], then `peer.up` applied through a socket in the peer's namespace
    /// (the kernel refuses to open a veth end inside the request that creates the pair).
    /// Returns the local end as created.
    pub async fn create_veth(
        &self,
        local: &VethEnd,
        peer: &VethEnd,
        peer_ns: Option<&Netns>,
    ) -> Result<Link> {
        self.add_veth(local, peer, peer_ns).await?;
        if peer.up {
            let other;
            let nl = match peer_ns {
                Some(ns) => {
                    other = Netlink::open(ns)?;
                    &other
                }
                None => self,
            };
            let l = nl.require_link(&peer.name).await?;
            nl.set_up(l.index).await?;
        }
        self.require_link(&local.name).await
    }

    /// Creates an 802.1Q VLAN link `name` with id `vlan_id` on the parent link
    /// `parent_index`, with hardware address `mac` (one `RTM_NEWLINK`, see
    /// [`vlan_link_message`]). A kernel without 802.1Q support answers EOPNOTSUPP; see
    /// [`NetError::NoVlanSupport`].
    pub async fn add_vlan(
        &self,
        name: &str,
        parent_index: u32,
        vlan_id: u16,
        mac: MacAddr,
    ) -> Result<()> {
        let msg = vlan_link_message(name, parent_index, vlan_id, mac);
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NetError::netlink(
                    format!("create vlan {name} id {vlan_id} on link {parent_index}"),
                    e,
                );
                if e.errno() == Some(nix::libc::EOPNOTSUPP) {
                    Err(NetError::NoVlanSupport {
                        name: name.to_string(),
                        source: Box::new(e),
                    })
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Renames link `index` to `name` (the link must be down).
    pub async fn rename(&self, index: u32, name: &str) -> Result<()> {
        self.set_link(
            format!("rename link {index} to {name}"),
            LinkUnspec::new_with_index(index)
                .name(name.to_string())
                .build(),
        )
        .await
    }

    async fn set_link(&self, what: String, msg: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetError::netlink(what, e))
    }

    /// Sets a link administratively up.
    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.set_link(
            format!("set link {index} up"),
            LinkUnspec::new_with_index(index).up().build(),
        )
        .await
    }

    /// Sets a link administratively down.
    pub async fn set_down(&self, index: u32) -> Result<()> {
        self.set_link(
            format!("set link {index} down"),
            LinkUnspec::new_with_index(index).down().build(),
        )
        .await
    }

    /// Sets a link's MTU.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.set_link(
            format!("set link {index} mtu {mtu}"),
            LinkUnspec::new_with_index(index).mtu(mtu).build(),
        )
        .await
    }

    /// Sets a link's MAC address.
    pub async fn set_mac(&self, index: u32, mac: MacAddr) -> Result<()> {
        self.set_link(
            format!("set link {index} address {mac}"),
            LinkUnspec::new_with_index(index)
                .address(mac.octets().to_vec())
                .build(),
        )
        .await
    }

    /// Deletes a link (for a veth, both ends go). Returns `false` when it was already gone.
    pub async fn delete_link(&self, index: u32) -> Result<bool> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = NetError::netlink(format!("delete link {index}"), e);
                if e.is_not_found() {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Deletes the link called `name` if it exists. Returns whether one was deleted.
    ///
    /// One `RTM_DELLINK` that names the link (`IFLA_IFNAME`, index 0): no lookup first, and
    /// nothing that grows with the number of links in the namespace.
    pub async fn delete_link_by_name(&self, name: &str) -> Result<bool> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.handle.link().del_with_message(m).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = NetError::netlink(format!("delete link {name}"), e);
                if e.is_not_found() {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    // ---- addresses ----

    /// Adds `cidr` to link `index` with `scope`.
    pub async fn add_address(&self, index: u32, cidr: IpCidr, scope: Scope) -> Result<()> {
        let mut req = self.handle.address().add(index, cidr.addr, cidr.prefix_len);
        req.message_mut().header.scope = address_scope(scope);
        req.execute()
            .await
            .map_err(|e| NetError::netlink(format!("add address {cidr} to link {index}"), e))
    }

    /// Adds an address that skips duplicate address detection (`IFA_F_NODAD`): usable at
    /// once. For IPv6 addresses whose uniqueness is guaranteed elsewhere.
    pub async fn add_address_nodad(&self, index: u32, cidr: IpCidr, scope: Scope) -> Result<()> {
        let mut req = self.handle.address().add(index, cidr.addr, cidr.prefix_len);
        let m = req.message_mut();
        m.header.scope = address_scope(scope);
        m.header.flags |= AddressHeaderFlags::Nodad;
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        req.execute()
            .await
            .map_err(|e| NetError::netlink(format!("add address {cidr} to link {index}"), e))
    }

    /// Addresses of link `index` (all links when `None`).
    pub async fn addresses(&self, index: Option<u32>) -> Result<Vec<Address>> {
        self.counted_dump();
        let mut req = self.handle.address().get();
        if let Some(i) = index {
            req = req.set_link_index_filter(i);
        }
        let msgs: Vec<AddressMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetError::netlink("list addresses", e))?;
        Ok(msgs
            .iter()
            .filter_map(address_from_message)
            .filter(|a| index.is_none_or(|i| a.index == i))
            .collect())
    }

    /// The IPv6 addresses of link `index` that are still in duplicate address detection
    /// (`IFA_F_TENTATIVE`) or failed it (`IFA_F_DADFAILED`, reported as `true`).
    pub async fn unsettled_v6_addresses(&self, index: u32) -> Result<Vec<(IpCidr, bool)>> {
        self.counted_dump();
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetError::netlink("list addresses", e))?;
        let mut out = Vec::new();
        for m in &msgs {
            if m.header.index != index || m.header.family != AddressFamily::Inet6 {
                continue;
            }
            // The 32-bit IFA_FLAGS attribute supersedes the header's 8 bits when present.
            let mut tentative = m.header.flags.contains(AddressHeaderFlags::Tentative);
            let mut failed = m.header.flags.contains(AddressHeaderFlags::Dadfailed);
            for attr in &m.attributes {
                if let AddressAttribute::Flags(f) = attr {
                    tentative = f.contains(AddressFlags::Tentative);
                    failed = f.contains(AddressFlags::Dadfailed);
                }
            }
            if tentative || failed {
                if let Some(a) = address_from_message(m) {
                    out.push((a.cidr, failed));
                }
            }
        }
        Ok(out)
    }

    /// Removes `cidr` from link `index`. Returns `false` when it was not there.
    pub async fn delete_address(&self, index: u32, cidr: IpCidr) -> Result<bool> {
        let mut m = AddressMessage::default();
        m.header.family = family_of(cidr.family());
        m.header.prefix_len = cidr.prefix_len;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(cidr.addr));
        m.attributes.push(AddressAttribute::Address(cidr.addr));
        match self.handle.address().del(m).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = NetError::netlink(format!("delete address {cidr} from link {index}"), e);
                if e.is_not_found() {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Deletes every global-unicast address of `family` on link `index`, keeping link-local
    /// ones. Returns the removed addresses.
    pub async fn flush_global_addresses(&self, index: u32, family: Family) -> Result<Vec<IpCidr>> {
        let mut removed = Vec::new();
        for a in self.addresses(Some(index)).await? {
            if a.cidr.family() == family && is_global_unicast(&a.cidr.addr) {
                self.delete_address(index, a.cidr).await?;
                removed.push(a.cidr);
            }
        }
        Ok(removed)
    }

    // ---- routes ----

    async fn route_add_inner(&self, r: &Route, replace: bool) -> Result<()> {
        let mut req = self.handle.route().add(route_message(r, false));
        if replace {
            req = req.replace();
        }
        req.execute().await.map_err(|e| {
            NetError::netlink(
                format!(
                    "{} route {} table {}",
                    if replace { "replace" } else { "add" },
                    r.dst,
                    r.table
                ),
                e,
            )
        })
    }

    /// Adds or replaces a route (`ip route replace`).
    pub async fn route_replace(&self, r: &Route) -> Result<()> {
        self.route_add_inner(r, true).await
    }

    /// Adds a route; fails with EEXIST when the same route is there (`ip route add`).
    pub async fn route_add(&self, r: &Route) -> Result<()> {
        self.route_add_inner(r, false).await
    }

    /// Deletes a route: destination and table must match, and the gateway, output interface
    /// and preferred source when given. Returns `false` when no such route existed.
    pub async fn route_delete(&self, r: &Route) -> Result<bool> {
        match self
            .handle
            .route()
            .del(route_message(r, true))
            .execute()
            .await
        {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = NetError::netlink(format!("delete route {} table {}", r.dst, r.table), e);
                if e.is_not_found() {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Unicast routes of `family`, in `table` (every table when `None`).
    pub async fn routes(&self, family: Family, table: Option<u32>) -> Result<Vec<Route>> {
        self.counted_dump();
        let mut query = RouteMessage::default();
        query.header.address_family = family_of(family);
        query.header.table = RouteHeader::RT_TABLE_UNSPEC;
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetError::netlink("list routes", e))?;
        Ok(msgs
            .iter()
            .filter_map(route_from_message)
            .filter(|r| table.is_none_or(|t| t == r.table))
            .collect())
    }

    // ---- rules ----

    /// Adds a rule. Returns `false` (and changes nothing) when an identical rule exists: the
    /// reference tolerates EEXIST everywhere it adds rules.
    pub async fn rule_add(&self, r: &Rule) -> Result<bool> {
        let mut req = self.handle.rule().add();
        *req.message_mut() = rule_message(r);
        match req.execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = NetError::netlink(format!("add rule {r}"), e);
                if e.is_exists() {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Deletes one rule matching `r` exactly. Returns `false` when there was none (ENOENT).
    pub async fn rule_delete(&self, r: &Rule) -> Result<bool> {
        match self.handle.rule().del(rule_message(r)).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = NetError::netlink(format!("delete rule {r}"), e);
                if e.is_not_found() {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// All rules of `family`, in kernel order (ascending priority).
    pub async fn rules(&self, family: Family) -> Result<Vec<Rule>> {
        self.counted_dump();
        let msgs: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(ip_version(family))
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetError::netlink("list rules", e))?;
        Ok(msgs.iter().filter_map(rule_from_message).collect())
    }

    /// Deletes every rule selected by `filter`, repeating until none is left (the reference
    /// loops until ENOENT because old plugins left several copies). Returns how many went.
    ///
    /// Each round is one `RTM_DELRULE` carrying only the filter's fields, which the kernel
    /// treats as wildcards for the rest, so no rule list is dumped: the cost does not grow with
    /// the number of rules (pods) on the node. A filter with a `/0` selector (which the kernel
    /// would read as "any") falls back to dumping the rules and deleting the exact matches.
    pub async fn delete_rules(&self, filter: &RuleFilter) -> Result<usize> {
        if !filter.kernel_selectable() {
            return self.delete_rules_listed(filter).await;
        }
        let msg = rule_filter_message(filter);
        let mut deleted = 0;
        // Each request removes one rule or ends the loop; the bound only guards against a
        // rule that keeps reappearing.
        for _ in 0..MAX_RULE_DELETES {
            match self.handle.rule().del(msg.clone()).execute().await {
                Ok(()) => deleted += 1,
                Err(e) => {
                    let e = NetError::netlink(format!("delete rules {filter:?}"), e);
                    if e.is_not_found() {
                        return Ok(deleted);
                    }
                    return Err(e);
                }
            }
        }
        Ok(deleted)
    }

    /// [`Netlink::delete_rules`] by listing: dump, delete the exact matches, repeat.
    async fn delete_rules_listed(&self, filter: &RuleFilter) -> Result<usize> {
        let mut deleted = 0;
        for _ in 0..64 {
            let matching: Vec<Rule> = self
                .rules(filter.family)
                .await?
                .into_iter()
                .filter(|r| filter.matches(r))
                .collect();
            if matching.is_empty() {
                return Ok(deleted);
            }
            for r in &matching {
                if self.rule_delete(r).await? {
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }

    // ---- neighbours ----

    /// Adds (or replaces) a permanent neighbour entry `ip → mac` on link `index`.
    pub async fn neighbour_add_permanent(
        &self,
        index: u32,
        ip: IpAddr,
        mac: MacAddr,
    ) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac.octets())
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                NetError::netlink(format!("add neighbour {ip} lladdr {mac} dev {index}"), e)
            })
    }

    /// Neighbour entries of `family` on link `index` (all links when `None`).
    pub async fn neighbours(&self, family: Family, index: Option<u32>) -> Result<Vec<Neighbour>> {
        self.counted_dump();
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family_of(family))
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetError::netlink("list neighbours", e))?;
        let mut out = Vec::new();
        for m in &msgs {
            if index.is_some_and(|i| i != m.header.ifindex) {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            for attr in &m.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        ip = Some(IpAddr::V4(*a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        ip = Some(IpAddr::V6(*a))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) => mac = MacAddr::from_slice(l),
                    _ => {}
                }
            }
            if let Some(ip) = ip {
                out.push(Neighbour {
                    index: m.header.ifindex,
                    ip,
                    mac,
                    permanent: m.header.state == NeighbourState::Permanent,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> IpCidr {
        s.parse().expect("cidr")
    }

    #[test]
    fn a_rule_filter_with_host_prefixes_is_left_to_the_kernel_and_a_slash_zero_is_not() {
        let pod = RuleFilter {
            priority: Some(512),
            to: Some(cidr("10.0.0.5/32")),
            ..RuleFilter::any(Family::V4)
        };
        assert!(pod.kernel_selectable());
        let all = RuleFilter {
            from: Some(cidr("0.0.0.0/0")),
            ..RuleFilter::any(Family::V4)
        };
        assert!(!all.kernel_selectable());
        let table0 = RuleFilter {
            table: Some(0),
            ..RuleFilter::any(Family::V4)
        };
        assert!(!table0.kernel_selectable());
    }

    #[test]
    fn the_delete_request_of_a_filter_carries_only_its_set_fields() {
        let m = rule_filter_message(&RuleFilter {
            priority: Some(1536),
            from: Some(cidr("10.0.0.5/32")),
            table: Some(2),
            ..RuleFilter::any(Family::V4)
        });
        assert_eq!(m.header.family, AddressFamily::Inet);
        assert_eq!(m.header.action, RuleAction::Unspec);
        assert_eq!(
            (m.header.src_len, m.header.dst_len, m.header.table),
            (32, 0, 2)
        );
        assert_eq!(m.attributes.len(), 3, "{:?}", m.attributes);
        let any_table = rule_filter_message(&RuleFilter {
            priority: Some(512),
            to: Some(cidr("10.0.0.5/32")),
            ..RuleFilter::any(Family::V4)
        });
        assert_eq!(any_table.header.table, 0, "no table: any table");
        assert!(!any_table
            .attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::Table(_))));
    }
}
