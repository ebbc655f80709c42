//! Traffic checks between namespaces without external tools: a UDP echo listener that records
//! the peer address it sees, and a prober that waits (bounded) for the echo.
//!
//! Sockets are created on a thread inside the namespace ([`Netns::run`]) and then used from the
//! test's own thread: a socket belongs to the namespace it was created in for its whole life.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vpc_cni_net::Netns;

use crate::error::{FabricError, Result};

/// How often a probe is resent while waiting, and the listener's poll period.
const TICK: Duration = Duration::from_millis(100);

fn io(what: String) -> impl FnOnce(std::io::Error) -> FabricError {
    move |source| FabricError::Process { what, source }
}

/// Binds a UDP socket to `addr` inside `ns`.
pub fn udp_socket_in(ns: &Netns, addr: SocketAddrV4) -> Result<UdpSocket> {
    udp_socket_in_any(ns, addr.into())
}

/// Binds a UDP socket to `addr` (IPv4 or IPv6) inside `ns`.
pub fn udp_socket_in_any(ns: &Netns, addr: SocketAddr) -> Result<UdpSocket> {
    ns.run(move || UdpSocket::bind(addr))
        .map_err(FabricError::net(format!(
            "enter {} to bind {addr}",
            ns.path().display()
        )))?
        .map_err(io(format!("bind udp {addr}")))
}

/// One datagram the listener received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Source address and port as the listener saw them.
    pub peer: SocketAddr,
    /// Payload.
    pub payload: Vec<u8>,
}

type Seen = Arc<(Mutex<Vec<Datagram>>, Condvar)>;

/// A UDP listener in a namespace: records every datagram with its peer address and echoes
/// `echo <payload> from <peer>` back. Stops when dropped.
#[derive(Debug)]
pub struct UdpListener {
    addr: SocketAddr,
    seen: Seen,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpListener {
    /// Listens on `addr` (port 0 picks one) inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddrV4) -> Result<UdpListener> {
        Self::start_any(ns, addr.into())
    }

    /// Listens on `addr`, IPv4 or IPv6 (port 0 picks one), inside `ns`.
    pub fn start_any(ns: &Netns, addr: SocketAddr) -> Result<UdpListener> {
        let sock = udp_socket_in_any(ns, addr)?;
        sock.set_read_timeout(Some(TICK))
            .map_err(io("set listener timeout".into()))?;
        let addr = sock.local_addr().map_err(io("listener address".into()))?;
        let seen: Seen = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("udp-listener".into())
            .spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop2.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let payload = buf[..n].to_vec();
                    let mut reply = b"echo ".to_vec();
                    reply.extend_from_slice(&payload);
                    reply.extend_from_slice(format!(" from {peer}").as_bytes());
                    let _ = sock.send_to(&reply, peer);
                    let (lock, cv) = &*seen2;
                    if let Ok(mut v) = lock.lock() {
                        v.push(Datagram { peer, payload });
                    }
                    cv.notify_all();
                }
            })
            .map_err(io("spawn listener thread".into()))?;
        Ok(UdpListener {
            addr,
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens, for a listener started on IPv4 ([`UdpListener::start`]); `0.0.0.0:0`
    /// for an IPv6 one (see [`UdpListener::socket_addr`]).
    pub fn addr(&self) -> SocketAddrV4 {
        match self.addr {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        }
    }

    /// Where it listens, either family.
    pub fn socket_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Datagram> {
        self.seen.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits until a datagram with exactly `payload` has arrived; returns its peer address.
    pub fn wait_for(&self, payload: &[u8], timeout: Duration) -> Result<SocketAddr> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.seen;
        let mut v = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(d) = v.iter().find(|d| d.payload == payload) {
                return Ok(d.peer);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FabricError::Timeout {
                    what: format!(
                        "datagram {:?} at {}",
                        String::from_utf8_lossy(payload),
                        self.addr
                    ),
                    waited_ms: timeout.as_millis(),
                });
            }
            v = cv
                .wait_timeout(v, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for UdpListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The listener answered; this is the source address it saw.
    Echoed {
        /// Peer address as seen by the listener.
        seen_as: SocketAddr,
    },
    /// The network said no (ICMP unreachable, or no route at all).
    Unreachable(String),
    /// Nothing came back before the deadline.
    TimedOut,
}

impl ProbeOutcome {
    /// The source the listener saw, or an error saying what happened instead.
    pub fn seen_as(&self, what: &str) -> Result<SocketAddr> {
        match self {
            Self::Echoed { seen_as } => Ok(*seen_as),
            other => Err(FabricError::Timeout {
                what: format!("{what}: expected an echo, got {other:?}"),
                waited_ms: 0,
            }),
        }
    }
}

static NONCE: AtomicU64 = AtomicU64::new(0);

/// A payload unique in this process.
pub fn nonce(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        NONCE.fetch_add(1, Ordering::Relaxed)
    )
}

fn unreachable_kind(k: ErrorKind) -> bool {
    matches!(
        k,
        ErrorKind::ConnectionRefused
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            // ICMPv6 "administratively prohibited" (the fabric's refusal in IPv6).
            | ErrorKind::PermissionDenied
    )
}

/// Sends datagrams from `ns` (bound to `src`, or any local address) to `dst` until the echo
/// comes back, the network reports it unreachable, or `timeout` passes (resending every 100 ms,
/// so a first packet lost to neighbour resolution does not matter).
pub fn udp_probe(
    ns: &Netns,
    src: Option<Ipv4Addr>,
    dst: SocketAddrV4,
    timeout: Duration,
) -> Result<ProbeOutcome> {
    udp_probe_any(ns, src.map(IpAddr::V4), dst.into(), timeout)
}

/// [`udp_probe`] for either family: `src` (if given) and `dst` of the same family.
pub fn udp_probe_any(
    ns: &Netns,
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<ProbeOutcome> {
    let any = if dst.is_ipv6() {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let sock = udp_socket_in_any(ns, SocketAddr::new(src.unwrap_or(any), 0))?;
    if let Err(e) = sock.connect(dst) {
        if unreachable_kind(e.kind()) {
            return Ok(ProbeOutcome::Unreachable(e.to_string()));
        }
        return Err(io(format!("connect to {dst}"))(e));
    }
    sock.set_read_timeout(Some(TICK))
        .map_err(io("set probe timeout".into()))?;
    let payload = nonce("probe");
    let expect = format!("echo {payload} from ");
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Err(e) = sock.send(payload.as_bytes()) {
            if unreachable_kind(e.kind()) {
                return Ok(ProbeOutcome::Unreachable(e.to_string()));
            }
            return Err(io(format!("send to {dst}"))(e));
        }
        match sock.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                if let Some(peer) = text.strip_prefix(&expect) {
                    if let Ok(seen_as) = peer.parse() {
                        return Ok(ProbeOutcome::Echoed { seen_as });
                    }
                }
            }
            Err(e) if unreachable_kind(e.kind()) => {
                return Ok(ProbeOutcome::Unreachable(e.to_string()))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(io(format!("receive from {dst}"))(e)),
        }
    }
    Ok(ProbeOutcome::TimedOut)
}

/// Sends one datagram with `payload` from `ns` (bound to `src`) to `dst`, without waiting.
pub fn udp_send(ns: &Netns, src: Ipv4Addr, dst: SocketAddrV4, payload: &[u8]) -> Result<()> {
    udp_send_any(ns, IpAddr::V4(src), dst.into(), payload)
}

/// [`udp_send`] for either family.
pub fn udp_send_any(ns: &Netns, src: IpAddr, dst: SocketAddr, payload: &[u8]) -> Result<()> {
    let sock = udp_socket_in_any(ns, SocketAddr::new(src, 0))?;
    sock.send_to(payload, dst)
        .map(|_| ())
        .map_err(io(format!("send from {src} to {dst}")))
}
