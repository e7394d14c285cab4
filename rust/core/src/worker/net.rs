//! The virtio-net data path (virtio 1.2 §5.1.6): one queue pair and a *port*.
//!
//! A [`NetPort`] is where frames leave and enter the device. Two families:
//!
//! - **switch ports**, frames moved ring to ring inside the process ([`switch`]): a port of a
//!   learning [`switch::Switch`] ([`switch::Switch::attach`]), a **peer link** (a two-port hub,
//!   [`NetPort::pair`]: what one port transmits, the other receives) and a **loopback**
//!   ([`NetPort::loopback`]: frames come back). No socket, no syscall per frame, no GIL: the TX
//!   worker copies a burst of frames out of its chains into the destination's bounded frame
//!   queue, the destination's RX worker copies them into its receive buffers.
//! - **fd ports**, on which one read or write carries exactly one packet, a 12-byte
//!   `virtio_net_hdr_mrg_rxbuf` followed by the Ethernet frame: **TAP** (`/dev/net/tun` with
//!   `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and `TUNSETVNETHDRSZ` 12, [`NetPort::tap`]) and a kernel
//!   `SOCK_SEQPACKET` socketpair ([`NetPort::socket_pair`], the former peer link, kept as a
//!   baseline).
//! - a **generator** ([`NetPort::generator`], [`generate`]): a frame source for benchmarks and
//!   tests whose RX worker makes a valid IPv4/UDP frame whenever the guest has a buffer for
//!   one, and whose TX side checks, counts and discards.
//!
//! Per queue pair, two handlers run in [`super::QueueWorker`]s (on a switch port without busy
//! polling, both in one sleeping [`PollGroup`] thread per queue pair, so that a frame forwarded
//! by the TX step is delivered by the next RX step without waking a second thread; on an fd
//! port, a thread each, since the kernel feeds RX):
//!
//! - [`NetTxHandler`] (transmitq, driver → device) is a plain [`ChainHandler`]: each chain is one
//!   packet, validated, then written to an fd port with one non-blocking `writev`/`sendmsg`, or
//!   copied into a frame buffer that the whole burst is forwarded with
//!   ([`ChainHandler::flush_batch`]) on a switch port. The batch is published once, with one call
//!   signal at most (EVENT_IDX decides).
//! - [`NetRxHandler`] (receiveq, device → driver) runs its own [`DeviceLoop`], because its work
//!   arrives from the port, not from the ring: it sleeps on the port fd (a switch port's queue
//!   eventfd), the kick and the stop eventfd, stages one packet at a time, pops receive chains
//!   in batches (about one per packet waiting; what a packet does not use waits, held, for the
//!   next) and publishes once per burst of up to 64 packets. On a switch port, a frame whose
//!   header goes to the guest as it is (no checksum or GSO request) and that fits the next
//!   receive buffer is not staged: it is copied straight from the burst taken out of the queue.
//!
//! With [`NetPort::set_busy_poll`], the queues do not get threads of their own: every
//! busy-polling queue of the process (both queues of every queue pair of every port) runs in the
//! process's [`PollGroup`], one thread that steps each queue in turn (the RX loop is cut into
//! [`LoopSteps`] for it), as a DPDK lcore polls its ports. After its queues were idle for the
//! budget, the group asks each for notifications and sleeps on all their eventfds at once. One
//! spinning thread per queue would instead time-share the back-end's core with the others, and a
//! frame forwarded by one would wait for the next time slice of the one that delivers it.
//!
//! # Buffering and drops
//!
//! A packet that arrives while the receive ring has no (or too few) buffers stays staged, and the
//! ones behind it stay queued in the port (the switch queue, the socket buffer or the TAP queue):
//! the RX worker stops taking from the port until the driver adds buffers and kicks. A switch
//! queue holds at most `buffer` bytes (plus one burst its worker took out), after which frames
//! for it are dropped and counted in its `rx_overflow` (see [`switch`]); a socketpair is bounded by
//! the kernel (the socket send buffer, [`DEFAULT_PORT_BUFFER`]) and a TAP by its `txqueuelen`,
//! and once full the transmitting side drops and counts (`tx_dropped` of the sending port; the
//! TAP interface's own drop counter). A staged packet survives a worker restart (it is parked in
//! the port, and a switch port's taken burst goes back to the front of its queue), so stopping
//! and starting a ring never loses one.
//!
//! # Validation
//!
//! The guest is untrusted. TX: the chain must be device-readable only, hold the whole header
//! (10 bytes, 12 with VIRTIO_NET_F_MRG_RXBUF or VIRTIO_F_VERSION_1) and a frame of
//! [`ETH_HLEN`]..=[`MAX_FRAME_LEN`] bytes; the header is copied out once and checked with
//! [`offload::validate`] (on a switch port against the copied frame, which the guest can no
//! longer change): only the offloads it negotiated (CSUM, HOST_TSO4/6, HOST_UFO, HOST_USO),
//! `csum_start` and `csum_offset` inside the frame, a GSO frame really TCP (UDP for UFO/USO)
//! over IPv4/IPv6 with segments of at most
//! [`NetPort::max_frame`] bytes (the advertised MTU plus 18, else [`MAX_FRAME_LEN`]), a frame
//! without GSO not longer than that; a violating chain is completed unsent and counted in
//! `tx_errors`. The checked header goes with the frame to the port (`num_buffers` 0). RX: a chain
//! with a device-readable part or too short for the header is completed with length 0
//! (`rx_bad_chains`); without MRG_RXBUF a packet larger than the one chain is dropped
//! (`rx_dropped`) and the chain kept for the next one. The header written to the guest carries
//! only what it negotiated (GUEST_CSUM, GUEST_TSO4/6, GUEST_UFO, GUEST_USO4/6): otherwise the
//! checksum is completed or the packet cut into TCP segments, UDP datagrams or IP fragments
//! here ([`offload::complete_csum`], [`offload::segment_gso`]; a
//! header that does not fit its frame drops the packet, `rx_errors`), and `num_buffers` is set.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

pub mod generate;
pub mod offload;
pub mod switch;

use generate::Generator;
use offload::{Offloads, RxAction, VnetHdr};
use switch::{Attachment, Forwarder, FrameQueue, Switch};

use super::{
    run_steps, ChainHandler, DeviceLoop, LoopContext, LoopSteps, PollGroup, Progress, WorkerFault,
};
use crate::memory::GuestMemory;
use crate::notify::Poller;
use crate::queue::{Chain, ChainBatch, ChainView, Segment};

/// Bytes of the header on the port: `virtio_net_hdr_mrg_rxbuf`.
pub const PORT_HDR_LEN: usize = 12;
/// Bytes of the legacy `virtio_net_hdr` (neither MRG_RXBUF nor VERSION_1).
pub const HDR_LEN_LEGACY: usize = 10;
/// Bytes of `virtio_net_hdr_mrg_rxbuf` (MRG_RXBUF or VERSION_1).
pub const HDR_LEN: usize = 12;
/// Bytes of an Ethernet header: the shortest frame accepted.
pub const ETH_HLEN: usize = 14;
/// Longest frame (without the virtio-net header) accepted from the guest or a port.
pub const MAX_FRAME_LEN: usize = 65535;
/// Longest packet on a port: header and frame.
pub const MAX_PACKET_LEN: usize = PORT_HDR_LEN + MAX_FRAME_LEN;
/// `gso_type` of a packet without segmentation offload.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// Socket send buffer asked for on peer and loopback links (the kernel caps it at
/// `net.core.wmem_max` and doubles it).
pub const DEFAULT_PORT_BUFFER: usize = 1 << 20;
/// Most iovecs one `writev`/`sendmsg` takes on Linux (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
/// Most packets the RX loop delivers before it publishes and checks for a stop request.
const RX_BATCH: usize = 64;
/// Most frames an RX worker takes out of its switch queue at once.
const RX_TAKE: usize = 256;
/// Most receive chains the RX loop pops at once.
const RX_POP: usize = 64;

/// `_IOW('T', 208, unsigned int)`: which offloads a TAP may hand to its reader.
const TUNSETOFFLOAD: libc::Ioctl = 0x4004_54d0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
/// Accepted and ignored since Linux 4.14 (the kernel no longer makes UFO packets).
const TUN_F_UFO: libc::c_uint = 0x10;
/// Linux 6.2: UDP segmentation, only both together.
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

const TOKEN_KICK: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_PORT: u64 = 2;

/// The negotiated features that shape the data path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetFeatures {
    /// VIRTIO_NET_F_MRG_RXBUF: a received packet may span several chains.
    pub mrg_rxbuf: bool,
    /// VIRTIO_F_VERSION_1: the header always has `num_buffers`.
    pub version_1: bool,
    /// What the guest may ask for on transmit: CSUM, HOST_TSO4/6, HOST_UFO, HOST_USO.
    pub host: Offloads,
    /// What the guest takes on receive: GUEST_CSUM, GUEST_TSO4/6, GUEST_UFO, GUEST_USO4/6.
    pub guest: Offloads,
}

/// Feature bit VIRTIO_NET_F_CSUM.
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// Feature bit VIRTIO_NET_F_GUEST_CSUM.
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
/// Feature bit VIRTIO_NET_F_GUEST_TSO4.
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
/// Feature bit VIRTIO_NET_F_GUEST_TSO6.
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
/// Feature bit VIRTIO_NET_F_HOST_TSO4.
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
/// Feature bit VIRTIO_NET_F_HOST_TSO6.
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
/// Feature bit VIRTIO_NET_F_GUEST_UFO.
pub const VIRTIO_NET_F_GUEST_UFO: u32 = 10;
/// Feature bit VIRTIO_NET_F_HOST_UFO.
pub const VIRTIO_NET_F_HOST_UFO: u32 = 14;
/// Feature bit VIRTIO_NET_F_GUEST_USO4.
pub const VIRTIO_NET_F_GUEST_USO4: u32 = 54;
/// Feature bit VIRTIO_NET_F_GUEST_USO6.
pub const VIRTIO_NET_F_GUEST_USO6: u32 = 55;
/// Feature bit VIRTIO_NET_F_HOST_USO.
pub const VIRTIO_NET_F_HOST_USO: u32 = 56;
/// Feature bit VIRTIO_NET_F_MRG_RXBUF.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// Feature bit VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u32 = 32;

impl NetFeatures {
    /// From the negotiated feature bits.
    pub fn from_bits(acked: u64) -> Self {
        let has = |bit: u32| acked & (1 << bit) != 0;
        Self {
            mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
            version_1: has(VIRTIO_F_VERSION_1),
            host: Offloads::new(
                has(VIRTIO_NET_F_CSUM),
                has(VIRTIO_NET_F_HOST_TSO4),
                has(VIRTIO_NET_F_HOST_TSO6),
            )
            .with_udp(
                has(VIRTIO_NET_F_HOST_UFO),
                has(VIRTIO_NET_F_HOST_USO),
                has(VIRTIO_NET_F_HOST_USO),
            ),
            guest: Offloads::new(
                has(VIRTIO_NET_F_GUEST_CSUM),
                has(VIRTIO_NET_F_GUEST_TSO4),
                has(VIRTIO_NET_F_GUEST_TSO6),
            )
            .with_udp(
                has(VIRTIO_NET_F_GUEST_UFO),
                has(VIRTIO_NET_F_GUEST_USO4),
                has(VIRTIO_NET_F_GUEST_USO6),
            ),
        }
    }

    /// Bytes of the virtio-net header the guest uses on both queues.
    pub fn header_len(&self) -> usize {
        if self.mrg_rxbuf || self.version_1 {
            HDR_LEN
        } else {
            HDR_LEN_LEGACY
        }
    }
}

/// Counters of one port (both of its handlers), see [`NetPort::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest transmitted that were handed to the port.
    pub tx_packets: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: u64,
    /// Frames the port could not take (its queue was full): the receiver is not draining it.
    pub tx_dropped: u64,
    /// TX chains refused (shape, length or header) or failed writes.
    pub tx_errors: u64,
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames the guest's buffers could not hold, and frames discarded by [`NetPort::drain`].
    pub rx_dropped: u64,
    /// Packets from the port that were too short, too long or unreadable.
    pub rx_errors: u64,
    /// RX chains unusable for a packet (device-readable part, or shorter than the header),
    /// completed with length 0.
    pub rx_bad_chains: u64,
    /// Times the RX worker had a packet and had to wait for the driver to add buffers.
    pub rx_starved: u64,
    /// Switch ports: frames for this port dropped because its queue was full (its guest does
    /// not take them fast enough).
    pub rx_overflow: u64,
}

#[derive(Debug, Default)]
struct NetCounters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    tx_errors: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    rx_errors: AtomicU64,
    rx_bad_chains: AtomicU64,
    rx_starved: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl NetCounters {
    fn snapshot(&self) -> NetStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStats {
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            tx_errors: get(&self.tx_errors),
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            rx_errors: get(&self.rx_errors),
            rx_bad_chains: get(&self.rx_bad_chains),
            rx_starved: get(&self.rx_starved),
            rx_overflow: 0,
        }
    }
}

/// Which kind of fd a port has (how packets are read and written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// A TAP device.
    Tap,
    /// One end of a peer link.
    Peer,
    /// Both ends of a loopback link.
    Loopback,
    /// A port of a learning [`Switch`].
    Switch,
    /// A frame source ([`NetPort::generator`]).
    Generator,
}

impl PortKind {
    fn is_socket(self) -> bool {
        !matches!(self, PortKind::Tap)
    }

    /// Lower-case name: "tap", "peer", "loopback".
    pub fn as_str(self) -> &'static str {
        match self {
            PortKind::Tap => "tap",
            PortKind::Peer => "peer",
            PortKind::Loopback => "loopback",
            PortKind::Switch => "switch",
            PortKind::Generator => "generator",
        }
    }
}

/// One received packet waiting for guest buffers; parked in the port between workers.
struct Stage {
    /// `MAX_PACKET_LEN + 1` bytes: a read that fills it completely was too long.
    buf: Vec<u8>,
    /// Bytes of the staged packet (header included); 0 when nothing is staged.
    len: usize,
}

impl Stage {
    fn new() -> Box<Self> {
        Box::new(Self {
            buf: vec![0; MAX_PACKET_LEN + 1],
            len: 0,
        })
    }

    /// For switch ports, whose packets arrive as buffers swapped in.
    fn empty() -> Box<Self> {
        Box::new(Self {
            buf: Vec::new(),
            len: 0,
        })
    }
}

/// A port's attachment to a [`Switch`]: its queue pair's frame queue.
struct SwitchLink {
    switch: Switch,
    attachment: Arc<Attachment>,
    pair: usize,
    inbox: Arc<FrameQueue>,
}

enum Link {
    /// A TAP fd (`tx` is `None`) or a socket.
    Fd {
        /// Where packets for the guest are read.
        rx: OwnedFd,
        /// Where the guest's packets are written; `None`: `rx`.
        tx: Option<OwnedFd>,
    },
    Switch(SwitchLink),
    /// A frame source: RX is generated, TX is discarded.
    Generator(Generator),
}

struct PortInner {
    link: Link,
    kind: PortKind,
    name: Option<String>,
    counters: NetCounters,
    /// The packet the last RX worker staged but could not deliver.
    parked: Mutex<Option<Box<Stage>>>,
    /// fd ports: segments the last RX worker cut and did not deliver.
    parked_segments: Mutex<VecDeque<Vec<u8>>>,
    /// Busy-poll budget of the port's workers, in nanoseconds (0: off).
    busy_poll_ns: AtomicU64,
    /// Longest frame the guest may transmit (see [`NetPort::set_max_frame`]).
    max_frame: AtomicUsize,
    /// The port takes USO packets from the guest (see [`NetPort::takes_uso`]).
    takes_uso: AtomicBool,
    /// Switch ports without busy polling: the thread both queues of the pair share (created on
    /// first use; `None` if it could not be).
    group: OnceLock<Option<PollGroup>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_full(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::WouldBlock || err.raw_os_error() == Some(libc::ENOBUFS)
}

fn not_fd() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "a switch port has no fd")
}

impl PortInner {
    fn fds(&self) -> io::Result<(RawFd, RawFd)> {
        match &self.link {
            Link::Fd { rx, tx } => Ok((rx.as_raw_fd(), tx.as_ref().unwrap_or(rx).as_raw_fd())),
            Link::Switch(_) | Link::Generator(_) => Err(not_fd()),
        }
    }

    fn switch(&self) -> Option<&SwitchLink> {
        match &self.link {
            Link::Switch(link) => Some(link),
            Link::Fd { .. } | Link::Generator(_) => None,
        }
    }

    fn generator(&self) -> Option<&Generator> {
        match &self.link {
            Link::Generator(generator) => Some(generator),
            Link::Fd { .. } | Link::Switch(_) => None,
        }
    }

    /// What the RX worker sleeps on for packets: the fd, or the switch queue's eventfd.
    fn rx_wait_fd(&self) -> BorrowedFd<'_> {
        match &self.link {
            Link::Fd { rx, .. } => rx.as_fd(),
            Link::Switch(link) => link.inbox.wake().as_fd(),
            Link::Generator(generator) => generator.idle().as_fd(),
        }
    }

    fn busy_poll(&self) -> Option<Duration> {
        match self.busy_poll_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// Without busy polling, both queues of a switch port's pair run in one [`PollGroup`] of
    /// their own (no spin budget: it sleeps on both queues' eventfds as soon as they are idle).
    /// On a loopback the TX step's frames are then delivered by the next RX step of the same
    /// thread, without waking a second one; other ports' pairs keep threads of their own. Fd
    /// ports keep a thread per queue (their RX is fed by the kernel, not by the TX queue).
    fn sleep_group(&self) -> Option<PollGroup> {
        self.switch()?;
        self.group
            .get_or_init(|| PollGroup::new("vvu-net-pair").ok())
            .clone()
    }

    /// Read one packet into `buf`. `Ok(None)`: nothing queued; `Ok(Some(0))`: the link is
    /// closed. For sockets the length is the real one even if `buf` was too short (MSG_TRUNC).
    fn read_packet(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let (fd, _) = self.fds()?;
        loop {
            let n = if self.kind.is_socket() {
                // SAFETY: `buf` is valid for writes of its length for the whole call.
                unsafe {
                    libc::recv(
                        fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    )
                }
            } else {
                // SAFETY: as above.
                unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }
            };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(err),
            }
        }
    }

    /// Write one packet gathered from `iov`; returns the bytes written.
    ///
    /// # Safety
    /// Every iovec must describe memory readable for its length for the whole call.
    unsafe fn write_packet(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let (_, fd) = self.fds()?;
        loop {
            let n = if self.kind.is_socket() {
                // SAFETY: zeroed msghdr is valid; it points at `iov`, which outlives the call.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = iov.as_ptr().cast_mut();
                msg.msg_iovlen = iov.len() as _;
                // SAFETY: the iovecs are readable per the contract; sendmsg only reads them.
                unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) }
            } else {
                // SAFETY: as above; at most IOV_MAX iovecs (callers ensure it).
                unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as c_int) }
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// A packet sink and source for one queue pair; cheap to clone (clones share the fds, the
/// counters and the parked packet). See the module docs.
#[derive(Clone)]
pub struct NetPort {
    inner: Arc<PortInner>,
}

impl std::fmt::Debug for NetPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("NetPort");
        d.field("kind", &self.inner.kind)
            .field("name", &self.inner.name);
        match &self.inner.link {
            Link::Fd { .. } => d.field("fds", &self.inner.fds().ok()),
            Link::Switch(link) => d
                .field("switch", &link.switch.name())
                .field("port", &link.attachment_id())
                .field("pair", &link.pair),
            Link::Generator(generator) => d.field("generator", generator),
        };
        d.finish()
    }
}

fn cvt(r: c_int) -> io::Result<c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A non-blocking, close-on-exec `SOCK_SEQPACKET` socketpair with `buffer` bytes of send buffer
/// asked for on both ends.
fn seqpacket_pair(buffer: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` is valid for writes of two ints.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair just created both fds; nobody else owns them.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let size = c_int::try_from(buffer).unwrap_or(c_int::MAX);
    for fd in [&a, &b] {
        // SAFETY: `size` is a valid c_int for the duration of the call.
        cvt(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const c_int).cast(),
                std::mem::size_of::<c_int>() as libc::socklen_t,
            )
        })?;
    }
    Ok((a, b))
}

impl SwitchLink {
    fn attachment_id(&self) -> usize {
        self.attachment.id()
    }
}

impl NetPort {
    fn with_link(link: Link, kind: PortKind, name: Option<String>) -> Self {
        Self {
            inner: Arc::new(PortInner {
                link,
                kind,
                name,
                counters: NetCounters::default(),
                parked: Mutex::new(None),
                parked_segments: Mutex::new(VecDeque::new()),
                busy_poll_ns: AtomicU64::new(0),
                max_frame: AtomicUsize::new(MAX_FRAME_LEN),
                takes_uso: AtomicBool::new(true),
                group: OnceLock::new(),
            }),
        }
    }

    fn new(rx: OwnedFd, tx: Option<OwnedFd>, kind: PortKind, name: Option<String>) -> Self {
        Self::with_link(Link::Fd { rx, tx }, kind, name)
    }

    /// Queue pair `pair` of a switch port (see [`Switch::attach`]).
    fn switched(
        switch: Switch,
        attachment: Arc<Attachment>,
        pair: usize,
        inbox: Arc<FrameQueue>,
    ) -> Self {
        let kind = match switch.mode() {
            switch::SwitchMode::Learning => PortKind::Switch,
            switch::SwitchMode::Hub => PortKind::Peer,
            switch::SwitchMode::Loopback => PortKind::Loopback,
        };
        let link = SwitchLink {
            switch,
            attachment,
            pair,
            inbox,
        };
        Self::with_link(Link::Switch(link), kind, None)
    }

    /// Two linked ports: what one transmits, the other receives, in process (a two-port
    /// [`switch::SwitchMode::Hub`]). Each receive side queues up to `buffer` bytes of frames
    /// (see [`DEFAULT_PORT_BUFFER`]) before frames for it are dropped.
    pub fn pair(buffer: usize) -> io::Result<(Self, Self)> {
        let hub = Switch::new("peer link", switch::SwitchMode::Hub);
        let mut a = hub.attach(1, buffer)?;
        let mut b = hub.attach(1, buffer)?;
        match (a.pop(), b.pop()) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(io::Error::other("attach returned no port")),
        }
    }

    /// A port that hands every transmitted frame back to its own receive side, in process.
    pub fn loopback(buffer: usize) -> io::Result<Self> {
        let lo = Switch::new("loopback", switch::SwitchMode::Loopback);
        lo.attach(1, buffer)?
            .pop()
            .ok_or_else(|| io::Error::other("attach returned no port"))
    }

    /// A frame source for benchmarks and tests ([`generate`]): the receive side delivers
    /// IPv4/UDP frames of `sizes` bytes in turn, to `dst` from `src`, as fast as the guest posts
    /// buffers; transmitted frames are checked, counted and discarded.
    pub fn generator(sizes: &[usize], dst: [u8; 6], src: [u8; 6]) -> io::Result<Self> {
        let generator = Generator::new(sizes, dst, src)?;
        Ok(Self::with_link(
            Link::Generator(generator),
            PortKind::Generator,
            None,
        ))
    }

    /// Two ports linked through a `SOCK_SEQPACKET` socketpair (one `writev`/`recv` per frame):
    /// the kernel-socket path that peer links took before the in-process switch, kept as a
    /// baseline for benchmarks and for sharing a link across processes.
    pub fn socket_pair(buffer: usize) -> io::Result<(Self, Self)> {
        let (a, b) = seqpacket_pair(buffer)?;
        Ok((
            Self::new(a, None, PortKind::Peer, None),
            Self::new(b, None, PortKind::Peer, None),
        ))
    }

    /// The switch this port is attached to, and its port id there.
    pub fn switch(&self) -> Option<(&Switch, usize)> {
        self.inner
            .switch()
            .map(|link| (&link.switch, link.attachment_id()))
    }

    /// Busy-poll for this long (on both workers of the queue pair) after running out of work,
    /// before sleeping on eventfds: lower latency and fewer wake-ups for one core per busy
    /// worker while traffic flows. Takes effect for workers started afterwards.
    pub fn set_busy_poll(&self, budget: Option<Duration>) {
        let ns = budget.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.inner.busy_poll_ns.store(ns, Ordering::Relaxed);
    }

    /// See [`NetPort::set_busy_poll`].
    pub fn busy_poll(&self) -> Option<Duration> {
        self.inner.busy_poll()
    }

    /// Refuse (and count in `tx_errors`) transmitted frames longer than `len` bytes (clamped to
    /// [`ETH_HLEN`]..=[`MAX_FRAME_LEN`]): the MTU the device advertised plus the Ethernet and a
    /// VLAN header, which the guest must not exceed (§5.1.6.2). Default: [`MAX_FRAME_LEN`].
    pub fn set_max_frame(&self, len: usize) {
        let len = len.clamp(ETH_HLEN, MAX_FRAME_LEN);
        self.inner.max_frame.store(len, Ordering::Relaxed);
    }

    /// See [`NetPort::set_max_frame`].
    pub fn max_frame(&self) -> usize {
        self.inner.max_frame.load(Ordering::Relaxed)
    }

    /// Create (or attach to) the TAP interface `name` (at most 15 bytes; `%d` lets the kernel
    /// pick a number). With `multi_queue`, the interface is opened with IFF_MULTI_QUEUE and every
    /// call adds one queue (one per queue pair). Needs CAP_NET_ADMIN unless the interface was
    /// made persistent for this user. The interface is left down; bring it up to pass traffic.
    pub fn tap(name: &str, multi_queue: bool) -> io::Result<Self> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if name.len() >= libc::IFNAMSIZ || name.contains('\0') || name.is_empty() {
            return Err(invalid(format!(
                "TAP name {name:?} must be 1..{} bytes without NUL",
                libc::IFNAMSIZ
            )));
        }
        // SAFETY: the path is a NUL-terminated literal.
        let raw = cvt(unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: open just returned this fd; nobody else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = src as libc::c_char;
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `ifr` is.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) })?;
        let hdr_len = PORT_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) })?;
        let actual: Vec<u8> = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let actual = String::from_utf8_lossy(&actual).into_owned();
        // The kernel takes USO from us if it knows TUN_F_USO4/6 (both came with Linux 6.2);
        // the offloads it hands to us are set again for each guest (`rx_handler`).
        let uso = set_tap_offload(&fd, TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6).is_ok();
        set_tap_offload(&fd, 0)?;
        let port = Self::new(fd, None, PortKind::Tap, Some(actual));
        port.inner.takes_uso.store(uso, Ordering::Relaxed);
        Ok(port)
    }

    /// Whether the port takes UDP segmentation (USO) packets from the guest, i.e. whether
    /// VIRTIO_NET_F_HOST_USO may be offered: always, except on a TAP of a kernel older than
    /// 6.2 (the other offloads, UFO included, every port takes).
    pub fn takes_uso(&self) -> bool {
        self.inner.takes_uso.load(Ordering::Relaxed)
    }

    pub fn kind(&self) -> PortKind {
        self.inner.kind
    }

    /// The TAP interface name (as the kernel chose it); `None` for links.
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }

    /// The fd that becomes readable when packets for the guest arrive (to register elsewhere;
    /// never read it while a worker runs): the TAP or socket fd, or a switch port's eventfd.
    pub fn rx_fd(&self) -> BorrowedFd<'_> {
        self.inner.rx_wait_fd()
    }

    /// Current counters.
    pub fn stats(&self) -> NetStats {
        let mut stats = self.inner.counters.snapshot();
        if let Some(link) = self.inner.switch() {
            stats.rx_overflow = link.inbox.overflow();
        }
        stats
    }

    /// The handler for this port's transmit queue.
    pub fn tx_handler(&self, mut features: NetFeatures) -> NetTxHandler {
        if !self.takes_uso() {
            features.host.uso4 = false;
            features.host.uso6 = false;
        }
        NetTxHandler {
            port: Arc::clone(&self.inner),
            hdr_len: features.header_len(),
            switched: self.inner.switch().is_some(),
            features,
            iovecs: Iovecs(Vec::new()),
            bounce: Vec::new(),
            forwarder: Forwarder::default(),
            burst: Vec::new(),
            port_hdr: [0; PORT_HDR_LEN],
            sent: (0, 0),
        }
    }

    /// The handler for this port's receive queue. On a TAP, this also tells the kernel which
    /// offloads the guest takes (`TUNSETOFFLOAD`: partial checksums, TSO4, TSO6), so that it
    /// segments and checksums the rest itself.
    pub fn rx_handler(&self, features: NetFeatures) -> NetRxHandler {
        if let Link::Fd { rx, .. } = &self.inner.link {
            if self.inner.kind == PortKind::Tap {
                let g = features.guest;
                let mut flags: libc::c_uint = 0;
                for (on, bit) in [
                    (g.csum, TUN_F_CSUM),
                    (g.tso4, TUN_F_TSO4),
                    (g.tso6, TUN_F_TSO6),
                    (g.ufo, TUN_F_UFO),
                    (g.uso4 && g.uso6, TUN_F_USO4 | TUN_F_USO6),
                ] {
                    if on {
                        flags |= bit;
                    }
                }
                // A kernel before 6.2 refuses the USO bits (EINVAL): without them it segments
                // UDP itself. Any other failure leaves the kernel's defaults (no offload to
                // us), which the RX path copes with anyway.
                if set_tap_offload(rx, flags).is_err() {
                    let _ = set_tap_offload(rx, flags & !(TUN_F_USO4 | TUN_F_USO6));
                }
            }
        }
        NetRxHandler {
            port: Arc::clone(&self.inner),
            features,
            stage: None,
            held: ChainBatch::new(),
            held_start: 0,
            unpublished: 0,
            port_open: true,
            lens: Vec::new(),
            delivered: (0, 0),
            events: Vec::with_capacity(crate::notify::MAX_EVENTS),
            poller: None,
            registered: false,
            armed: false,
            last: Outcome::More,
            unfit_drops: 0,
            unfit_at: None,
            inbox: VecDeque::new(),
            spent: Vec::new(),
        }
    }

    /// Transmit `frame` as if the guest had (a zeroed header is added): e.g. a RARP
    /// announcement. `Ok(false)` if the port's queue is full (counted as `tx_dropped`).
    pub fn send_frame(&self, frame: &[u8]) -> io::Result<bool> {
        if !(ETH_HLEN..=MAX_FRAME_LEN).contains(&frame.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a frame is {ETH_HLEN}..={MAX_FRAME_LEN} bytes, not {}",
                    frame.len()
                ),
            ));
        }
        if let Some(link) = self.inner.switch() {
            let mut fwd = Forwarder::default();
            let mut packet = fwd.buffer(PORT_HDR_LEN + frame.len());
            packet[..PORT_HDR_LEN].fill(0);
            packet[PORT_HDR_LEN..].copy_from_slice(frame);
            let mut burst = vec![packet];
            let counters = &self.inner.counters;
            let dropped = counters.tx_dropped.load(Ordering::Relaxed);
            link.switch.forward(
                link.attachment_id(),
                link.pair,
                &mut burst,
                &mut fwd,
                counters,
            );
            return Ok(counters.tx_dropped.load(Ordering::Relaxed) == dropped);
        }
        let counters = &self.inner.counters;
        if self.inner.generator().is_some() {
            bump(&counters.tx_packets, 1);
            bump(&counters.tx_bytes, frame.len() as u64);
            return Ok(true);
        }
        let header = [0u8; PORT_HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: header.as_ptr().cast_mut().cast(),
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point at live local memory.
        match unsafe { self.inner.write_packet(&iov) } {
            Ok(_) => {
                bump(&counters.tx_packets, 1);
                bump(&counters.tx_bytes, frame.len() as u64);
                Ok(true)
            }
            Err(e) if is_full(&e) => {
                bump(&counters.tx_dropped, 1);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Take the next frame waiting for this port's guest (without its header), as the RX worker
    /// would deliver it; `None` if nothing is waiting. Only while no RX worker runs.
    pub fn recv_frame(&self) -> io::Result<Option<Vec<u8>>> {
        let mut parked = lock(&self.inner.parked);
        if let Some(stage) = parked.as_mut() {
            if stage.len > 0 {
                let frame = stage.buf[PORT_HDR_LEN..stage.len].to_vec();
                stage.len = 0;
                return Ok(Some(frame));
            }
        }
        if let Some(segment) = lock(&self.inner.parked_segments).pop_front() {
            return Ok(Some(segment[PORT_HDR_LEN..].to_vec()));
        }
        if let Some(link) = self.inner.switch() {
            return Ok(link
                .inbox
                .pop()
                .map(|packet| packet[PORT_HDR_LEN..].to_vec()));
        }
        let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
        if let Some(generator) = self.inner.generator() {
            let n = generator.fill(&mut buf);
            buf.truncate(n);
            return Ok(Some(buf.split_off(PORT_HDR_LEN)));
        }
        loop {
            match self.inner.read_packet(&mut buf)? {
                None | Some(0) => return Ok(None),
                Some(n) if (PORT_HDR_LEN + ETH_HLEN..=MAX_PACKET_LEN).contains(&n) => {
                    buf.truncate(n);
                    return Ok(Some(buf.split_off(PORT_HDR_LEN)));
                }
                Some(_) => bump(&self.inner.counters.rx_errors, 1),
            }
        }
    }

    /// Discard every frame waiting for this port's guest (counted as `rx_dropped`); returns how
    /// many. For a session end: frames for a guest that went away. Only while no RX worker runs.
    pub fn drain(&self) -> io::Result<u64> {
        let mut dropped = 0;
        if let Some(stage) = lock(&self.inner.parked).as_mut() {
            if stage.len > 0 {
                stage.len = 0;
                dropped += 1;
            }
        }
        let mut segments = lock(&self.inner.parked_segments);
        dropped += segments.len() as u64;
        segments.clear();
        drop(segments);
        if let Some(link) = self.inner.switch() {
            dropped += link.inbox.clear();
        } else if self.inner.generator().is_some() {
            // Nothing waits: frames are made when buffers come.
        } else {
            let mut buf = [0u8; 1];
            while let Some(n) = self.inner.read_packet(&mut buf)? {
                if n == 0 {
                    break;
                }
                dropped += 1;
            }
        }
        bump(&self.inner.counters.rx_dropped, dropped);
        Ok(dropped)
    }
}

/// TUNSETOFFLOAD: which offloads the TAP behind `fd` may hand to its reader.
fn set_tap_offload(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) }).map(drop)
}

/// Copy bytes out of `segments`, starting `skip` bytes in, into `dst`; returns how many.
///
/// # Safety
/// The memory snapshot the segments came from must be alive.
unsafe fn gather(segments: &[Segment], mut skip: usize, dst: &mut [u8]) -> usize {
    let mut done = 0;
    for seg in segments {
        if done == dst.len() {
            break;
        }
        let len = seg.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        // SAFETY: alive per the contract; read_to bounds the copy by the segment and `dst`.
        done += unsafe { seg.read_to(skip, &mut dst[done..]) };
        skip = 0;
    }
    done
}

/// Copy `src` into `segments` from their start; returns how many bytes fitted.
///
/// # Safety
/// As for [`gather`]; the segments must be device-writable ones.
unsafe fn scatter(segments: &[Segment], src: &[u8]) -> usize {
    let mut done = 0;
    for seg in segments {
        if done == src.len() {
            break;
        }
        // SAFETY: alive per the contract; write_from bounds the copy by the segment.
        done += unsafe { seg.write_from(0, &src[done..]) };
    }
    done
}

/// Reusable iovec storage for [`NetTxHandler`].
///
/// Holds host pointers into guest memory only during one [`NetTxHandler::handle`] call (it is
/// cleared before the call returns), so moving it between threads is harmless.
struct Iovecs(Vec<libc::iovec>);

// SAFETY: see the type docs; the pointers are never dereferenced outside the call that set them.
unsafe impl Send for Iovecs {}

/// The transmitq handler: one chain, one packet to the port. See the module docs.
pub struct NetTxHandler {
    port: Arc<PortInner>,
    features: NetFeatures,
    /// Fixed for the handler's life, read once here rather than per chain:
    /// `features.header_len()`, and whether the port is a switch port.
    hdr_len: usize,
    switched: bool,
    iovecs: Iovecs,
    /// Linearised packet for chains with more segments than one `writev` takes.
    bounce: Vec<u8>,
    /// Switch ports: scratch for forwarding, and the packets of the current burst.
    forwarder: Forwarder,
    burst: Vec<Vec<u8>>,
    /// fd ports: the checked header of the packet being written.
    port_hdr: [u8; PORT_HDR_LEN],
    /// fd ports: packets and bytes written in this batch (counted in `flush_batch`).
    sent: (u64, u64),
}

impl std::fmt::Debug for NetTxHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetTxHandler")
            .field("kind", &self.port.kind)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

impl NetTxHandler {
    // Inlined into `handle_batch`'s loop: a call per chain costs its prologue and epilogue.
    #[inline(always)]
    fn transmit(&mut self, chain: &ChainView<'_>) {
        let counters = &self.port.counters;
        let hdr_len = self.hdr_len;
        let total = chain.readable_len() as usize;
        // §5.1.6.2: transmit buffers are device-readable only and start with the header.
        if chain.writable_len() != 0
            || total < hdr_len + ETH_HLEN
            || total - hdr_len > MAX_FRAME_LEN
        {
            bump(&counters.tx_errors, 1);
            return;
        }
        let max_frame = self.port.max_frame.load(Ordering::Relaxed);
        let frame_len = total - hdr_len;
        if self.switched {
            // Copied out now (the chain is completed with the batch), checked on the copy (the
            // guest cannot change it afterwards), forwarded in flush_batch. One copy of header
            // and frame: the guest's header lands at the end of the packet's header room
            // (PORT_HDR_LEN >= hdr_len) and is read from there.
            let start = PORT_HDR_LEN - hdr_len;
            let mut packet = self.forwarder.buffer(PORT_HDR_LEN + frame_len);
            // SAFETY: the chain's segments are alive for the whole `handle` call.
            let got = unsafe { gather(chain.readable(), 0, &mut packet[start..]) };
            let parts = packet.split_first_chunk_mut::<PORT_HDR_LEN>();
            match parts {
                Some((head, frame)) if got == total => {
                    let checked =
                        offload::validate_raw(&head[start..], frame, max_frame, self.features.host);
                    let Ok(carried) = checked else {
                        bump(&counters.tx_errors, 1);
                        self.forwarder.recycle(packet);
                        return;
                    };
                    // The carried header (none: zeros), then zeros to the end of the room.
                    *head = [0; PORT_HDR_LEN];
                    if let Some(carried) = carried {
                        carried.write(head);
                    }
                    self.burst.push(packet);
                }
                _ => {
                    bump(&counters.tx_errors, 1);
                    self.forwarder.recycle(packet);
                }
            }
            return;
        }
        let mut header = [0u8; HDR_LEN];
        // SAFETY: the chain's segments are alive for the whole `handle` call.
        let copied = unsafe { gather(chain.readable(), 0, &mut header[..hdr_len]) };
        if copied != hdr_len {
            bump(&counters.tx_errors, 1);
            return;
        }
        // An fd port: the kernel (TAP) checks the header again on the bytes it reads; the
        // headers are looked at here only to refuse what was not negotiated. A plain header
        // needs none of them (offload::check_plain), so they are copied out only for the rest.
        let checked = match offload::check_plain(&header[..hdr_len], frame_len, max_frame) {
            Some(verdict) => verdict.map(|()| None),
            None => {
                let asked = VnetHdr::parse(&header[..hdr_len]);
                let mut head = [0u8; offload::MAX_HEADERS];
                let head_len = frame_len.min(offload::MAX_HEADERS);
                // SAFETY: as above.
                unsafe { gather(chain.readable(), hdr_len, &mut head[..head_len]) };
                offload::validate_head(
                    &asked,
                    &head[..head_len],
                    frame_len,
                    max_frame,
                    self.features.host,
                )
                .map(Some)
            }
        };
        match checked {
            Ok(carried) => {
                self.port_hdr = [0; PORT_HDR_LEN];
                if let Some(carried) = carried {
                    carried.write(&mut self.port_hdr);
                }
            }
            Err(_) => {
                bump(&counters.tx_errors, 1);
                return;
            }
        }
        if self.port.generator().is_some() {
            // A frame source's sink: checked, counted, discarded.
            self.sent.0 += 1;
            self.sent.1 += frame_len as u64;
            return;
        }
        let iov = &mut self.iovecs.0;
        iov.clear();
        iov.push(libc::iovec {
            iov_base: self.port_hdr.as_mut_ptr().cast(),
            iov_len: PORT_HDR_LEN,
        });
        let mut skip = hdr_len;
        for seg in chain.readable() {
            let len = seg.len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            iov.push(libc::iovec {
                // SAFETY: skip < len, so the pointer stays inside the segment.
                iov_base: unsafe { seg.host.add(skip) }.cast(),
                iov_len: len - skip,
            });
            skip = 0;
        }
        if iov.len() > IOV_MAX {
            // More pieces than one call takes, and a packet cannot be split: linearise it.
            self.bounce.clear();
            self.bounce.resize(PORT_HDR_LEN + frame_len, 0);
            self.bounce[..PORT_HDR_LEN].copy_from_slice(&self.port_hdr);
            // SAFETY: as above.
            unsafe { gather(chain.readable(), hdr_len, &mut self.bounce[PORT_HDR_LEN..]) };
            iov.clear();
            iov.push(libc::iovec {
                iov_base: self.bounce.as_mut_ptr().cast(),
                iov_len: self.bounce.len(),
            });
        }
        // SAFETY: the iovecs point into the live chain, the static header or `bounce`; the
        // guest may change the frame bytes meanwhile, which only changes what is sent.
        let result = unsafe { self.port.write_packet(iov) };
        iov.clear();
        match result {
            Ok(n) if n == PORT_HDR_LEN + frame_len => {
                // Counted once per batch (flush_batch): a locked add per frame costs a barrier.
                self.sent.0 += 1;
                self.sent.1 += frame_len as u64;
            }
            Ok(_) => bump(&counters.tx_errors, 1),
            Err(e) if is_full(&e) => bump(&counters.tx_dropped, 1),
            Err(_) => bump(&counters.tx_errors, 1),
        }
    }
}

impl ChainHandler for NetTxHandler {
    fn handle(&mut self, _memory: &GuestMemory, chain: ChainView<'_>) -> u32 {
        self.transmit(&chain);
        0 // nothing is written into a transmit buffer
    }

    fn handle_batch(&mut self, _memory: &GuestMemory, batch: &ChainBatch, _lens: &mut [u32]) {
        // One loop over the batch (no call through the trait object per chain); every used
        // len stays 0, as `handle` returns.
        for chain in batch.iter() {
            self.transmit(&chain);
        }
    }

    fn flush_batch(&mut self) {
        let (packets, bytes) = std::mem::take(&mut self.sent);
        if packets > 0 {
            bump(&self.port.counters.tx_packets, packets);
            bump(&self.port.counters.tx_bytes, bytes);
        }
        if let Some(link) = self.port.switch() {
            link.switch.forward(
                link.attachment_id(),
                link.pair,
                &mut self.burst,
                &mut self.forwarder,
                &self.port.counters,
            );
        }
    }

    fn busy_poll(&self) -> Option<Duration> {
        self.port.busy_poll()
    }

    fn poll_group(&self) -> Option<PollGroup> {
        PollGroup::process()
    }

    fn sleep_group(&self) -> Option<PollGroup> {
        self.port.sleep_group()
    }
}

/// What one pass of the RX loop ended with.
#[derive(Clone, Copy)]
enum Outcome {
    /// The batch budget ran out; more may be waiting.
    More,
    /// The port has nothing queued.
    PortEmpty,
    /// The port was closed (the other end of a link went away, or reading it failed).
    PortClosed,
    /// A packet is staged and the ring has too few buffers for it.
    NeedBuffers,
    /// A generator's every frame size was dropped in a row (the held receive buffer is too
    /// small for all of them): wait for the guest to post more buffers instead of spinning.
    Unfit,
}

/// What became of the staged packet.
enum Placed {
    Delivered,
    Dropped,
    NeedBuffers,
}

/// The receiveq handler: runs its own [`DeviceLoop`]. See the module docs.
///
/// Chains popped for the staged packet are *held*: `held.chains()[held_start..]` is always
/// exactly the most recently popped chains that were not pushed yet, in ring order, so a stop
/// can hand them back with [`Virtqueue::give_back`](crate::queue::Virtqueue::give_back). A completed packet pushes a prefix of them.
pub struct NetRxHandler {
    port: Arc<PortInner>,
    features: NetFeatures,
    stage: Option<Box<Stage>>,
    held: ChainBatch,
    held_start: usize,
    /// Used entries pushed and not yet published.
    unpublished: usize,
    port_open: bool,
    /// Scratch: bytes per chain of the packet being delivered.
    lens: Vec<u32>,
    /// Frames and bytes delivered since the counters were last bumped (once per burst).
    delivered: (u64, u64),
    events: Vec<u64>,
    /// The loop's poller (kick, stop, and the port while it waits for packets), from `begin`.
    poller: Option<Poller>,
    /// The port fd is in the poller.
    registered: bool,
    /// Kicks were asked for before a sleep.
    armed: bool,
    /// How the last step ended.
    last: Outcome,
    /// A generator's frames dropped in a row (no frame delivered since).
    unfit_drops: usize,
    /// A generator found no fitting buffer: the ring's pending count then. Nothing is generated
    /// again until the guest posts buffers (the count changes).
    unfit_at: Option<u16>,
    /// Frames not staged yet: taken out of a switch port's queue, or segments of a GSO packet
    /// the guest does not take whole.
    inbox: VecDeque<Vec<u8>>,
    /// Switch ports: buffers of delivered frames, to go back to the queue's free list.
    spent: Vec<Vec<u8>>,
}

impl std::fmt::Debug for NetRxHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetRxHandler")
            .field("kind", &self.port.kind)
            .field("features", &self.features)
            .field("held", &(self.held.len() - self.held_start))
            .finish_non_exhaustive()
    }
}

/// §5.1.6.3: a receive buffer is device-writable only and holds at least the `hdr_len`-byte
/// header; another chain is completed with length 0 (`rx_bad_chains`).
fn usable(chain: &Chain, hdr_len: usize) -> bool {
    chain.readable_len() == 0 && chain.writable_len() as usize >= hdr_len
}

fn internal(what: &str, err: io::Error) -> WorkerFault {
    WorkerFault::Internal(format!("{what}: {err}"))
}

impl NetRxHandler {
    fn held_count(&self) -> usize {
        self.held.len() - self.held_start
    }

    /// Add the frames delivered since the last call to the port's counters (before publishing:
    /// the counters never lag behind what the driver sees).
    fn count_delivered(&mut self) {
        let (frames, bytes) = std::mem::take(&mut self.delivered);
        if frames > 0 {
            bump(&self.port.counters.rx_packets, frames);
            bump(&self.port.counters.rx_bytes, bytes);
        }
    }

    /// The usable held chains a packet of `need` bytes would go into, from the first: as many as
    /// it takes to hold `need` bytes (only the first without MRG_RXBUF). Their count and room.
    fn usable_room(&self, need: u64) -> (usize, u64) {
        let hdr_len = self.features.header_len();
        let mut count = 0;
        let mut bytes = 0u64;
        for chain in &self.held.chains()[self.held_start..] {
            if usable(chain, hdr_len) {
                count += 1;
                bytes += u64::from(chain.writable_len());
                if bytes >= need || !self.features.mrg_rxbuf {
                    break;
                }
            }
        }
        (count, bytes)
    }

    /// Push the first `n` held chains: unusable ones (length 0) first, then the usable ones with
    /// `lens` in order, so that the buffers of one packet are consecutive in the used ring.
    fn push_held(
        &mut self,
        ctx: &mut LoopContext<'_>,
        n: usize,
        lens: &[u32],
    ) -> Result<(), WorkerFault> {
        if self.unpublished + n > usize::from(ctx.queue.size()) {
            // More unpublished entries than the ring holds would overwrite each other.
            self.count_delivered();
            ctx.publish(self.unpublished as u64)?;
            self.unpublished = 0;
        }
        let hdr_len = self.features.header_len();
        let chains = &self.held.chains()[self.held_start..self.held_start + n];
        let mut bad = 0;
        for chain in chains.iter().filter(|c| !usable(c, hdr_len)) {
            ctx.queue.push_used(chain.head(), 0)?;
            bad += 1;
        }
        let good = chains.iter().filter(|c| usable(c, hdr_len));
        for (chain, &len) in good.zip(lens) {
            ctx.queue.push_used(chain.head(), len)?;
        }
        if bad > 0 {
            // A locked add is a full barrier that waits for the frame's stores: only when due.
            bump(&self.port.counters.rx_bad_chains, bad);
        }
        self.unpublished += n;
        self.held_start += n;
        if self.held_start == self.held.len() {
            self.held.clear();
            self.held_start = 0;
        }
        Ok(())
    }

    /// Pop more chains: about one per packet waiting (the staged one and those taken from the
    /// port), at most [`RX_POP`]; a chain left over waits, held, for the next packet. `false` if
    /// the ring had none.
    fn pop_more(&mut self, ctx: &mut LoopContext<'_>) -> Result<bool, WorkerFault> {
        self.pop_for(ctx, self.inbox.len() + 1)
    }

    /// [`Self::pop_more`] for `waiting` packets.
    fn pop_for(&mut self, ctx: &mut LoopContext<'_>, waiting: usize) -> Result<bool, WorkerFault> {
        let want = waiting.min(RX_POP);
        if ctx.queue.pop_batch(&mut self.held, want)? == 0 {
            return Ok(false);
        }
        // Unusable chains with nothing usable before them are completed at once (a rewind
        // never needs them back).
        let hdr_len = self.features.header_len();
        let lead = self.held.chains()[self.held_start..]
            .iter()
            .take_while(|chain| !usable(chain, hdr_len))
            .count();
        if lead > 0 {
            self.push_held(ctx, lead, &[])?;
        }
        Ok(true)
    }

    /// Put the staged packet into held chains, popping more as needed.
    fn place(&mut self, ctx: &mut LoopContext<'_>) -> Result<Placed, WorkerFault> {
        let hdr_len = self.features.header_len();
        let stage_len = self.stage.as_ref().map_or(0, |s| s.len);
        let frame_len = stage_len - PORT_HDR_LEN;
        let need = (hdr_len + frame_len) as u64;
        let ring = usize::from(ctx.queue.size());
        loop {
            if self.first_fits(need) {
                self.deliver_one(ctx, need)?;
                return Ok(Placed::Delivered);
            }
            let (count, room) = self.usable_room(need);
            if count > 0 && room >= need {
                self.deliver_staged(ctx, need)?;
                return Ok(Placed::Delivered);
            }
            // Without MRG_RXBUF a packet takes exactly one chain; with it, never more chains
            // than the ring holds (all of them held and still too small: it can never fit).
            if (count > 0 && !self.features.mrg_rxbuf) || self.held_count() >= ring {
                return Ok(Placed::Dropped);
            }
            if !self.pop_more(ctx)? {
                return Ok(Placed::NeedBuffers);
            }
        }
    }

    /// The first held chain is usable and holds `need` bytes: the packet goes there whole (what
    /// [`Self::usable_room`] and [`Self::deliver_staged`] would decide too, for one chain).
    fn first_fits(&self, need: u64) -> bool {
        match self.held.chains().get(self.held_start) {
            Some(chain) => {
                usable(chain, self.features.header_len()) && u64::from(chain.writable_len()) >= need
            }
            None => false,
        }
    }

    /// [`Self::deliver_staged`] into the first held chain alone (see [`Self::first_fits`]): the
    /// common case (a 2 KiB or larger receive buffer per frame) without the per-chain lists.
    fn deliver_one(&mut self, ctx: &mut LoopContext<'_>, need: u64) -> Result<(), WorkerFault> {
        let hdr_len = self.features.header_len();
        let Some(stage) = self.stage.as_mut() else {
            return Ok(());
        };
        let i = self.held_start;
        let Some(chain) = self.held.chains().get(i) else {
            return Ok(());
        };
        let start = PORT_HDR_LEN - hdr_len;
        stage.buf.copy_within(..offload::VNET_HDR_FIELDS, start);
        if hdr_len == HDR_LEN {
            // §5.1.6.4: num_buffers, one chain.
            stage.buf[start + 10..start + 12].copy_from_slice(&1u16.to_le_bytes());
        }
        // SAFETY: the chain was popped from the attached queue, whose snapshot is alive; its
        // writable length (checked by `first_fits`) holds all `need` bytes.
        unsafe { scatter(chain.writable(&self.held), &stage.buf[start..stage.len]) };
        let head = chain.head();
        let frame_len = stage.len - PORT_HDR_LEN;
        stage.len = 0;
        if self.unpublished + 1 > usize::from(ctx.queue.size()) {
            // As in `push_held`: never more unpublished entries than the ring holds.
            self.count_delivered();
            ctx.publish(self.unpublished as u64)?;
            self.unpublished = 0;
        }
        ctx.queue.push_used(head, need as u32)?;
        self.unpublished += 1;
        self.held_start += 1;
        if self.held_start == self.held.len() {
            self.held.clear();
            self.held_start = 0;
        }
        self.delivered.0 += 1;
        self.delivered.1 += frame_len as u64;
        Ok(())
    }

    /// Switch ports, nothing staged: deliver up to `budget` frames straight from the inbox, each
    /// into one held chain (popping more as they run out), while the front frame's header goes
    /// to the guest as it is (no flags, no GSO: what [`Self::prepare`] leaves unchanged) and the
    /// first held chain is usable and holds it whole: what staging it and [`Self::place`] would
    /// do, without the staging. Stops at the first frame that needs more (it is then staged and
    /// placed as usual). Returns how many were delivered.
    ///
    /// The bookkeeping (held chains, unpublished entries, counters, spent buffers) is done once
    /// per run of frames, not per frame: a run ends where the held chains, the budget or the
    /// ring's room for unpublished entries does.
    fn deliver_direct(
        &mut self,
        ctx: &mut LoopContext<'_>,
        budget: usize,
    ) -> Result<usize, WorkerFault> {
        let hdr_len = self.features.header_len();
        let start = PORT_HDR_LEN - hdr_len;
        let ring = usize::from(ctx.queue.size());
        let mut done = 0;
        while done < budget && !self.inbox.is_empty() {
            if self.held_start == self.held.len() {
                // Nothing held: pop about one chain per frame waiting (the slow path would
                // count the first staged and the rest in the inbox: the same number).
                if !self.pop_for(ctx, self.inbox.len())? {
                    break;
                }
                continue;
            }
            if self.unpublished >= ring {
                // As in `push_held`: never more unpublished entries than the ring holds (and
                // room for at least one frame in the run below).
                self.count_delivered();
                ctx.publish(self.unpublished as u64)?;
                self.unpublished = 0;
            }
            let chains = &self.held.chains()[self.held_start..];
            // The inbox's first contiguous part (all of it unless its storage wrapped).
            let (frames, _) = self.inbox.as_mut_slices();
            let max = (chains.len().min(frames.len()))
                .min(budget - done)
                .min(ring - self.unpublished);
            let (mut n, mut bytes, mut fault) = (0, 0, None);
            for (packet, chain) in frames[..max].iter_mut().zip(&chains[..max]) {
                let len = packet.len();
                if len < PORT_HDR_LEN + ETH_HLEN || !offload::is_plain(packet) {
                    break;
                }
                let need = len - start;
                // Usable (§5.1.6.3: writable only, and `need` is more than the header) and
                // large enough.
                if chain.readable_len() != 0 || (chain.writable_len() as usize) < need {
                    break;
                }
                // The guest header in place in front of the frame: the fields as the port
                // header has them, and num_buffers 1 (§5.1.6.4).
                if hdr_len == HDR_LEN {
                    packet[offload::VNET_HDR_FIELDS..PORT_HDR_LEN]
                        .copy_from_slice(&1u16.to_le_bytes());
                } else {
                    packet.copy_within(..offload::VNET_HDR_FIELDS, start);
                }
                // SAFETY: the chain was popped from the attached queue, whose snapshot is
                // alive; its writable length (checked above) holds all `need` bytes.
                unsafe {
                    match chain.writable(&self.held) {
                        [seg] => seg.write_from(0, &packet[start..]),
                        segments => scatter(segments, &packet[start..]),
                    }
                };
                if let Err(err) = ctx.queue.push_used(chain.head(), need as u32) {
                    // Neither the frame nor the chain is consumed.
                    fault = Some(err);
                    break;
                }
                n += 1;
                bytes += (len - PORT_HDR_LEN) as u64;
            }
            self.spend(n);
            self.unpublished += n;
            self.held_start += n;
            if self.held_start == self.held.len() {
                self.held.clear();
                self.held_start = 0;
            }
            self.delivered.0 += n as u64;
            self.delivered.1 += bytes;
            done += n;
            if let Some(err) = fault {
                return Err(err.into());
            }
            if n < max {
                break;
            }
            // A run that took all of the inbox's first part goes on with the rest.
        }
        if done > 0 {
            self.unfit_drops = 0;
        }
        Ok(done)
    }

    /// The first `n` frames of the inbox were delivered: their buffers go to `spent`.
    fn spend(&mut self, n: usize) {
        if n == self.inbox.len() && self.spent.is_empty() {
            // The whole inbox (the usual case): the deque becomes the list, and the list's
            // storage the next inbox, instead of moving buffer by buffer.
            let mut inbox = VecDeque::from(std::mem::take(&mut self.spent));
            std::mem::swap(&mut inbox, &mut self.inbox);
            self.spent = Vec::from(inbox);
        } else {
            self.spent.extend(self.inbox.drain(..n));
        }
    }

    /// Write header and frame into the first usable held chains (room is known to suffice) and
    /// push them.
    fn deliver_staged(&mut self, ctx: &mut LoopContext<'_>, need: u64) -> Result<(), WorkerFault> {
        let hdr_len = self.features.header_len();
        let Some(stage) = self.stage.as_mut() else {
            return Ok(());
        };
        // Which chains take how much, in order, and how many held chains that spans.
        let mut lens = std::mem::take(&mut self.lens);
        lens.clear();
        let mut remaining = need;
        let mut span = 0;
        for chain in &self.held.chains()[self.held_start..] {
            span += 1;
            if !usable(chain, hdr_len) {
                continue;
            }
            let take = remaining.min(u64::from(chain.writable_len()));
            lens.push(take as u32);
            remaining -= take;
            if remaining == 0 {
                break;
            }
        }
        // The guest header in front of the frame: the fields `prepare` left in the port header,
        // and num_buffers (§5.1.6.4: the number of chains, 1 without MRG_RXBUF).
        let start = PORT_HDR_LEN - hdr_len;
        stage.buf.copy_within(..offload::VNET_HDR_FIELDS, start);
        if hdr_len == HDR_LEN {
            let num_buffers = if self.features.mrg_rxbuf {
                lens.len() as u16
            } else {
                1
            };
            stage.buf[start + 10..start + 12].copy_from_slice(&num_buffers.to_le_bytes());
        }
        let mut data = &stage.buf[start..stage.len];
        let good = self.held.chains()[self.held_start..]
            .iter()
            .filter(|chain| usable(chain, hdr_len));
        for (chain, &len) in good.zip(&lens) {
            let (head, rest) = data.split_at(len as usize);
            // SAFETY: the chain was popped from the attached queue, whose snapshot is alive.
            unsafe { scatter(chain.writable(&self.held), head) };
            data = rest;
        }
        let frame_len = stage.len - PORT_HDR_LEN;
        stage.len = 0;
        let pushed = self.push_held(ctx, span, &lens);
        self.lens = lens;
        pushed?;
        self.delivered.0 += 1;
        self.delivered.1 += frame_len as u64;
        Ok(())
    }

    /// At a stop: publish what was pushed, hand back what was popped and not pushed (the driver
    /// still owns those buffers and GET_VRING_BASE must not count them).
    fn hand_back(&mut self, ctx: &mut LoopContext<'_>) -> Result<(), WorkerFault> {
        if self.unpublished > 0 {
            ctx.publish(self.unpublished as u64)?;
            self.unpublished = 0;
        }
        let given = ctx.queue.give_back(&self.held.chains()[self.held_start..]);
        self.held.clear();
        self.held_start = 0;
        Ok(given?)
    }

    /// Stage the next packet from the port, if any, ready for the guest (see [`Self::prepare`]).
    fn read_stage(&mut self) -> Option<Outcome> {
        loop {
            if let Some(outcome) = self.read_raw() {
                return Some(outcome);
            }
            if self.prepare() {
                return None;
            }
        }
    }

    /// Stage the next packet from the port as it is.
    fn read_raw(&mut self) -> Option<Outcome> {
        if let Some(link) = self.port.switch() {
            if self.inbox.is_empty() {
                if !link.inbox.has_frames() {
                    // Nothing (a hint; `prepare_sleep` looks under the lock before sleeping).
                    return Some(Outcome::PortEmpty);
                }
                link.inbox.take(&mut self.inbox, RX_TAKE, &mut self.spent);
            }
            let Some(packet) = self.inbox.pop_front() else {
                return Some(Outcome::PortEmpty);
            };
            let stage = self.stage.get_or_insert_with(Stage::empty);
            stage.len = packet.len();
            let old = std::mem::replace(&mut stage.buf, packet);
            if old.capacity() > 0 {
                self.spent.push(old);
            }
            return None;
        }
        let stage = self.stage.get_or_insert_with(Stage::new);
        if let Some(generator) = self.port.generator() {
            stage.len = generator.fill(&mut stage.buf);
            return None;
        }
        if let Some(segment) = self.inbox.pop_front() {
            stage.buf[..segment.len()].copy_from_slice(&segment);
            stage.len = segment.len();
            return None;
        }
        let counters = &self.port.counters;
        loop {
            match self.port.read_packet(&mut stage.buf) {
                Ok(None) => return Some(Outcome::PortEmpty),
                Ok(Some(0)) | Err(_) => {
                    // 0: the other end is gone (only our own code writes to links, never an
                    // empty packet). An error: nothing more will come from this fd.
                    self.port_open = false;
                    return Some(Outcome::PortClosed);
                }
                Ok(Some(n)) if (PORT_HDR_LEN + ETH_HLEN..=MAX_PACKET_LEN).contains(&n) => {
                    stage.len = n;
                    return None;
                }
                Ok(Some(_)) => bump(&counters.rx_errors, 1),
            }
        }
    }

    /// Give the staged packet the offloads the receiving guest negotiated: pass its header on
    /// (rewritten in place), or complete its checksum, or cut it into segments (which go to the
    /// front of the inbox). `true`: ready to deliver; `false`: replaced by segments or dropped
    /// (a header that does not fit its frame, counted in `rx_errors`).
    fn prepare(&mut self) -> bool {
        let Some(stage) = self.stage.as_mut() else {
            return false;
        };
        let hdr = VnetHdr::parse(&stage.buf[..PORT_HDR_LEN]);
        let frame = &mut stage.buf[PORT_HDR_LEN..stage.len];
        let ok = match offload::rx_action(&hdr, frame, self.features.guest) {
            RxAction::Pass(out) => {
                out.write(&mut stage.buf);
                return true;
            }
            RxAction::Checksum => {
                let done = offload::complete_csum(
                    frame,
                    usize::from(hdr.csum_start),
                    usize::from(hdr.csum_offset),
                );
                if done {
                    VnetHdr::default().write(&mut stage.buf);
                    return true;
                }
                false
            }
            RxAction::Segment => {
                let mut segments = Vec::new();
                let spent = &mut self.spent;
                let cut = offload::segment_gso(
                    frame,
                    &hdr,
                    PORT_HDR_LEN,
                    |len| {
                        let mut buf = spent.pop().unwrap_or_default();
                        buf.clear();
                        buf.resize(PORT_HDR_LEN + len, 0);
                        buf
                    },
                    |seg| segments.push(seg),
                );
                for seg in segments.into_iter().rev() {
                    self.inbox.push_front(seg);
                }
                cut
            }
        };
        stage.len = 0;
        if !ok {
            bump(&self.port.counters.rx_errors, 1);
        }
        false
    }

    /// Deliver up to [`RX_BATCH`] packets, then publish; returns how many were delivered or
    /// dropped.
    fn deliver(&mut self, ctx: &mut LoopContext<'_>) -> Result<(Outcome, usize), WorkerFault> {
        if let Some(pending) = self.unfit_at {
            if ctx.queue.pending()? == pending {
                return Ok((Outcome::Unfit, 0));
            }
            self.unfit_at = None;
        }
        let mut packets = 0;
        let outcome = loop {
            if packets == RX_BATCH {
                break Outcome::More;
            }
            if self.stage.as_ref().is_none_or(|s| s.len == 0) {
                if !self.port_open {
                    break Outcome::PortClosed;
                }
                if let Some(link) = self.port.switch() {
                    if self.inbox.is_empty() {
                        if !link.inbox.has_frames() {
                            // Nothing (a hint; `prepare_sleep` looks under the lock before
                            // sleeping).
                            break Outcome::PortEmpty;
                        }
                        link.inbox.take(&mut self.inbox, RX_TAKE, &mut self.spent);
                    }
                    packets += self.deliver_direct(ctx, RX_BATCH - packets)?;
                    if packets == RX_BATCH {
                        break Outcome::More;
                    }
                    if self.inbox.is_empty() {
                        continue;
                    }
                }
                if let Some(outcome) = self.read_stage() {
                    break outcome;
                }
            }
            match self.place(ctx)? {
                Placed::Delivered => {
                    packets += 1;
                    self.unfit_drops = 0;
                }
                Placed::Dropped => {
                    if let Some(stage) = self.stage.as_mut() {
                        stage.len = 0;
                    }
                    bump(&self.port.counters.rx_dropped, 1);
                    packets += 1;
                    if let Some(generator) = self.port.generator() {
                        self.unfit_drops += 1;
                        if self.unfit_drops >= generator.size_count() {
                            self.unfit_drops = 0;
                            self.unfit_at = Some(ctx.queue.pending()?);
                            break Outcome::Unfit;
                        }
                    }
                }
                Placed::NeedBuffers => break Outcome::NeedBuffers,
            }
        };
        self.count_delivered();
        if self.unpublished > 0 {
            ctx.publish(self.unpublished as u64)?;
            self.unpublished = 0;
        }
        Ok((outcome, packets))
    }
}

impl LoopSteps for NetRxHandler {
    fn begin(&mut self, ctx: &mut LoopContext<'_>) -> Result<(), WorkerFault> {
        let poller = Poller::new().map_err(|e| internal("creating the poller", e))?;
        poller
            .register(ctx.kick.as_fd(), TOKEN_KICK)
            .map_err(|e| internal("watching the kick", e))?;
        poller
            .register(ctx.stop_fd(), TOKEN_STOP)
            .map_err(|e| internal("watching the stop fd", e))?;
        self.poller = Some(poller);
        self.registered = false;
        self.armed = false;
        self.last = Outcome::More;
        self.unfit_drops = 0;
        self.unfit_at = None;
        self.stage = lock(&self.port.parked).take();
        self.inbox.append(&mut lock(&self.port.parked_segments));
        self.held.clear();
        self.held_start = 0;
        self.unpublished = 0;
        self.port_open = true;
        // Kicks are only wanted while a packet waits for buffers.
        ctx.queue.disable_notifications()?;
        Ok(())
    }

    fn step(&mut self, ctx: &mut LoopContext<'_>) -> Result<Progress, WorkerFault> {
        let (outcome, packets) = self.deliver(ctx)?;
        self.last = outcome;
        Ok(match outcome {
            Outcome::More => Progress::More,
            _ if packets > 0 => Progress::Worked,
            _ => Progress::Idle,
        })
    }

    fn prepare_sleep(&mut self, ctx: &mut LoopContext<'_>) -> Result<bool, WorkerFault> {
        let port = Arc::clone(&self.port);
        let Some(poller) = self.poller.as_ref() else {
            return Err(WorkerFault::Internal("RX loop not begun".into()));
        };
        let port_fd = port.rx_wait_fd();
        match self.last {
            Outcome::More => return Ok(true),
            Outcome::PortEmpty => {
                if let Some(link) = port.switch() {
                    // Marks the queue sleeping (the next push rings the doorbell), unless
                    // frames arrived since the step looked.
                    link.inbox.take(&mut self.inbox, RX_TAKE, &mut self.spent);
                    if !self.inbox.is_empty() {
                        return Ok(true);
                    }
                }
                if !self.registered {
                    poller
                        .register(port_fd, TOKEN_PORT)
                        .map_err(|e| internal("watching the port", e))?;
                    self.registered = true;
                }
            }
            Outcome::PortClosed => {
                if self.registered {
                    poller
                        .unregister(port_fd)
                        .map_err(|e| internal("unwatching the port", e))?;
                    self.registered = false;
                }
            }
            Outcome::NeedBuffers => {
                // §3 "go to sleep": ask for kicks, then look once more.
                if ctx.queue.enable_notifications()? {
                    ctx.queue.disable_notifications()?;
                    return Ok(true);
                }
                self.armed = true;
                if self.registered {
                    // The port stays readable while the packet waits: stop watching it.
                    poller
                        .unregister(port_fd)
                        .map_err(|e| internal("unwatching the port", e))?;
                    self.registered = false;
                }
                bump(&port.counters.rx_starved, 1);
            }
            Outcome::Unfit => {
                // Buffers are pending, but none fits: sleep until the guest posts more.
                ctx.queue.enable_notifications()?;
                self.armed = true;
                if self.registered {
                    poller
                        .unregister(port_fd)
                        .map_err(|e| internal("unwatching the port", e))?;
                    self.registered = false;
                }
            }
        }
        Ok(false)
    }

    fn wait_fd(&self) -> BorrowedFd<'_> {
        match &self.poller {
            Some(poller) => poller.as_fd(),
            // Not begun: the port's fd is as good as any (never waited on).
            None => self.port.rx_wait_fd(),
        }
    }

    fn sleep(
        &mut self,
        ctx: &mut LoopContext<'_>,
        timeout: Option<Duration>,
    ) -> Result<(), WorkerFault> {
        let Some(poller) = self.poller.as_ref() else {
            return Err(WorkerFault::Internal("RX loop not begun".into()));
        };
        let ready = poller
            .wait(timeout, &mut self.events)
            .map_err(|e| internal("waiting for the port or a kick", e))?;
        if ready > 0 {
            ctx.count_wakeup();
        }
        if self.events.contains(&TOKEN_KICK) {
            let kicks = ctx
                .kick
                .consume()
                .map_err(|e| internal("reading the kick", e))?;
            ctx.count_kicks(kicks);
        }
        if let Some(link) = self.port.switch() {
            if self.events.contains(&TOKEN_PORT) {
                // The queue's doorbell; the queue itself is the real signal.
                link.inbox
                    .wake()
                    .consume()
                    .map_err(|e| internal("reading the switch doorbell", e))?;
            }
        }
        self.disarm(ctx)
    }

    fn disarm(&mut self, ctx: &mut LoopContext<'_>) -> Result<(), WorkerFault> {
        if let Some(link) = self.port.switch() {
            // Awake now: a frame pushed before the next `prepare_sleep` is found by a step, so
            // it need not ring the doorbell (in a poll group that would only cost a write and a
            // wasted wake-up cycle of the group).
            link.inbox.awake();
        }
        if std::mem::take(&mut self.armed) {
            ctx.queue.disable_notifications()?;
        }
        Ok(())
    }

    fn end(&mut self, ctx: &mut LoopContext<'_>, clean: bool) -> Result<(), WorkerFault> {
        let result = if clean { self.hand_back(ctx) } else { Ok(()) };
        // The staged packet waits in the port for the next worker, the frames behind it in the
        // switch queue.
        if let Some(stage) = self.stage.take() {
            *lock(&self.port.parked) = Some(stage);
        }
        if let Some(link) = self.port.switch() {
            link.inbox.put_back(&mut self.inbox);
        } else {
            lock(&self.port.parked_segments).append(&mut self.inbox);
        }
        result
    }
}

impl DeviceLoop for NetRxHandler {
    fn run(&mut self, ctx: &mut LoopContext<'_>) -> Result<(), WorkerFault> {
        run_steps(self, ctx)
    }

    fn steps(&mut self) -> Option<&mut dyn LoopSteps> {
        Some(self)
    }
}

impl ChainHandler for NetRxHandler {
    fn handle(&mut self, _memory: &GuestMemory, _chain: ChainView<'_>) -> u32 {
        0 // never called: the device loop takes the chains itself
    }

    fn device_loop(&mut self) -> Option<&mut dyn DeviceLoop> {
        Some(self)
    }

    fn busy_poll(&self) -> Option<Duration> {
        self.port.busy_poll()
    }

    fn poll_group(&self) -> Option<PollGroup> {
        PollGroup::process()
    }

    fn sleep_group(&self) -> Option<PollGroup> {
        self.port.sleep_group()
    }
}
