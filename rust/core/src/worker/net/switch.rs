//! In-process switching between virtio-net ports: frames move from one front-end's transmit
//! ring to another's (or, for a loopback, the same one's) receive ring without a socket, a
//! syscall or the GIL in between.
//!
//! A [`Switch`] is an object that ports attach to ([`Switch::attach`]); a device with N queue
//! pairs attaches once and gets N [`NetPort`]s that share one switch port (one MAC-learning
//! identity). Nothing ties a switch to one device or one socket: any number of devices served
//! by one process (the companion sockets of `vvu serve net` today, a multi-device daemon later)
//! attach to the same switch by holding it.
//!
//! # Modes
//!
//! - [`SwitchMode::Learning`]: an L2 learning switch. A frame's unicast source MAC is learnt on
//!   the port that sent it (the last port wins: a guest that moved, or a RARP announcement,
//!   re-points it); a unicast destination that was learnt goes to that port only (dropped
//!   silently if that is the sending port, as a switch filters); broadcast, multicast and
//!   unknown destinations are flooded to every other port.
//! - [`SwitchMode::Hub`]: every frame goes to every other port (the two-port *peer link*).
//! - [`SwitchMode::Loopback`]: every frame comes back to the port that sent it.
//!
//! # Concurrency: who touches which ring
//!
//! Every queue runs on its own worker thread ([`super::super::QueueWorker`]) and owns its ring:
//! only the RX worker of a port pops, fills and publishes that port's receive buffers. A TX worker
//! therefore never writes into another port's ring; it copies each frame out of its own chains
//! into a frame buffer and hands the buffers, one burst at a time, to the destination's
//! [`FrameQueue`] (one per queue pair of the port): a bounded multi-producer queue under a
//! mutex that is taken **once per burst per destination**, not per frame. The receiving RX
//! worker swaps the whole queue out under that mutex (once per burst again) and copies the frames
//! into its buffers. A frame is thus copied twice (guest → buffer → guest), which at 64..1514
//! bytes costs far less than the per-frame synchronisation a shared ring would need: writing
//! straight into another port's ring would mean locking that ring against its own worker on
//! every pop, keeping the other guest's memory snapshot alive across its reconnects, and
//! reimplementing the stop/give-back rules (GET_VRING_BASE) for a second writer.
//!
//! Frame buffers circulate: the receiver returns spent buffers to its queue's free list, and a
//! producer takes some back into its own pool each time it pushes, so the steady state allocates
//! nothing.
//!
//! # Bounds and drops
//!
//! Each frame queue holds at most `max_bytes` bytes of frames and [`MAX_QUEUE_FRAMES`] frames. A
//! frame for a full queue is dropped and counted in that port's `rx_overflow` (a guest that never
//! refills its receive ring fills its own queue and nobody else's); a frame that reached none of
//! its destinations because all were full also counts in the sender's `tx_dropped`. Memory is
//! bounded: queues by their limits, free lists and pools by [`MAX_SPARE_BUFFERS`] buffers of at most
//! [`MAX_SPARE_CAPACITY`] bytes each.
//!
//! # Wake-ups
//!
//! A receiver that finds its queue empty marks it *sleeping* (under the mutex) and then sleeps
//! on the queue's eventfd; a producer that pushes into a sleeping queue clears the mark and
//! signals the eventfd once. A busy receiver is never signalled, so a stream of bursts into a
//! busy port costs no syscall at all.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use super::{bump, NetCounters, NetPort, PORT_HDR_LEN};
use crate::notify::EventFd;

/// Most frames one frame queue holds.
pub const MAX_QUEUE_FRAMES: usize = 4096;
/// Most spare buffers kept in a free list or a producer's pool.
pub const MAX_SPARE_BUFFERS: usize = 512;
/// Spare buffers larger than this are freed instead of kept (a jumbo frame's buffer is not worth
/// pinning).
pub const MAX_SPARE_CAPACITY: usize = 16 * 1024;
/// Capacity of a fresh frame buffer: a standard frame fits, so buffers are reusable.
const FRESH_CAPACITY: usize = 2048;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

/// A buffer worth keeping as a spare.
fn keepable(buf: &Vec<u8>) -> bool {
    buf.capacity() > 0 && buf.capacity() <= MAX_SPARE_CAPACITY
}

/// Keep `buf` as a spare in `spares` if it is worth keeping and there is room.
fn recycle(spares: &mut Vec<Vec<u8>>, buf: Vec<u8>) {
    if spares.len() < MAX_SPARE_BUFFERS && keepable(&buf) {
        spares.push(buf);
    }
}

#[derive(Default)]
struct QueueState {
    /// Each a packet as on a port: [`PORT_HDR_LEN`] bytes of header room, then the frame.
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    free: Vec<Vec<u8>>,
    /// The receiver found the queue empty and may be asleep on `wake`.
    sleeping: bool,
}

/// The frames waiting for one receive queue; see the module docs.
pub struct FrameQueue {
    state: Mutex<QueueState>,
    /// Set while frames are queued: the receiver's busy-poll reads it without the lock.
    nonempty: AtomicBool,
    wake: EventFd,
    max_bytes: usize,
    overflow: AtomicU64,
}

impl std::fmt::Debug for FrameQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameQueue")
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl FrameQueue {
    fn new(max_bytes: usize) -> io::Result<Self> {
        Ok(Self {
            state: Mutex::new(QueueState::default()),
            nonempty: AtomicBool::new(false),
            wake: EventFd::new()?,
            max_bytes,
            overflow: AtomicU64::new(0),
        })
    }

    /// Readable after frames arrived for a receiver that found the queue empty.
    pub(super) fn wake(&self) -> &EventFd {
        &self.wake
    }

    /// Frames dropped because the queue was full.
    pub(super) fn overflow(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }

    /// Frames are queued (a hint, read without the lock).
    pub(super) fn has_frames(&self) -> bool {
        self.nonempty.load(Ordering::Acquire)
    }

    /// Queue the frames of `out` in order while they fit; returns how many were taken (a
    /// prefix) and their bytes. The rest are dropped (counted) into `pool`, which is topped up
    /// from the free list. Bulk moves (one `extend` per burst, not a push per frame): this is
    /// on every frame's path.
    fn push_burst(&self, out: &mut Vec<Vec<u8>>, pool: &mut Vec<Vec<u8>>) -> (usize, usize) {
        let (taken, taken_bytes, wake) = {
            let mut st = lock(&self.state);
            let room = MAX_QUEUE_FRAMES
                .saturating_sub(st.frames.len())
                .min(out.len());
            let mut bytes = st.bytes;
            let mut taken = 0;
            while taken < room {
                let len = out[taken].len();
                if bytes + len > self.max_bytes {
                    break;
                }
                bytes += len;
                taken += 1;
            }
            let taken_bytes = bytes - st.bytes;
            st.bytes = bytes;
            if taken == out.len() && st.frames.is_empty() {
                // The whole burst into an empty queue (a receiver that keeps up): the burst's
                // vector becomes the queue and the queue's empty one the next burst's, instead
                // of moving frame by frame. Both conversions keep the allocation; the vectors
                // circulate between producer, queue and receiver, each bounded as before.
                let spare = std::mem::replace(&mut st.frames, VecDeque::from(std::mem::take(out)));
                *out = Vec::from(spare);
            } else {
                st.frames.extend(out.drain(..taken));
            }
            let want = (MAX_SPARE_BUFFERS / 2)
                .saturating_sub(pool.len())
                .min(st.free.len());
            if want == st.free.len() {
                // All of it (the steady state): one bulk copy.
                pool.append(&mut st.free);
            } else {
                let from = st.free.len() - want;
                pool.extend(st.free.drain(from..));
            }
            if taken > 0 {
                self.nonempty.store(true, Ordering::Release);
            }
            let wake = taken > 0 && st.sleeping;
            if wake {
                st.sleeping = false;
            }
            (taken, taken_bytes, wake)
        };
        // What is left in `out` did not fit.
        if !out.is_empty() {
            bump(&self.overflow, out.len() as u64);
            for buf in out.drain(..) {
                recycle(pool, buf);
            }
        }
        if wake {
            // A failed signal leaves the receiver to its next wake-up; nothing else to do.
            let _ = self.wake.signal();
        }
        (taken, taken_bytes)
    }

    /// Move up to `max` queued frames to `inbox` and take the `spent` buffers back for
    /// producers. Finding nothing marks the queue sleeping: the next push signals the eventfd.
    pub(super) fn take(&self, inbox: &mut VecDeque<Vec<u8>>, max: usize, spent: &mut Vec<Vec<u8>>) {
        let mut st = lock(&self.state);
        let n = st.frames.len().min(max);
        if inbox.is_empty() && n == st.frames.len() {
            // The whole queue (the usual case: a receiver keeping up): swap the two deques
            // instead of moving frame by frame. Both stay bounded by MAX_QUEUE_FRAMES.
            std::mem::swap(inbox, &mut st.frames);
            st.bytes = 0;
        } else {
            let mut moved = 0;
            for buf in st.frames.drain(..n) {
                moved += buf.len();
                inbox.push_back(buf);
            }
            st.bytes -= moved;
        }
        self.nonempty
            .store(!st.frames.is_empty(), Ordering::Release);
        st.sleeping = n == 0;
        if spent.len() <= MAX_SPARE_BUFFERS.saturating_sub(st.free.len())
            && spent.iter().all(keepable)
        {
            if st.free.is_empty() {
                // The usual case (producers took the whole free list with their last burst):
                // the list changes hands instead of being copied.
                std::mem::swap(&mut st.free, spent);
            } else {
                st.free.append(spent);
            }
        } else {
            for buf in spent.drain(..) {
                recycle(&mut st.free, buf);
            }
        }
    }

    /// The receiver is awake again without having slept on the eventfd (a poll group woke
    /// for another of its queues): pushes need not signal until it marks the queue sleeping
    /// again ([`FrameQueue::take`] finding nothing, which it does before every sleep).
    pub(super) fn awake(&self) {
        lock(&self.state).sleeping = false;
    }

    /// Put frames taken with [`FrameQueue::take`] and not delivered back in front of the
    /// queue (a stopping receiver), in order.
    pub(super) fn put_back(&self, inbox: &mut VecDeque<Vec<u8>>) {
        if inbox.is_empty() {
            return;
        }
        let mut st = lock(&self.state);
        while let Some(buf) = inbox.pop_back() {
            st.bytes += buf.len();
            st.frames.push_front(buf);
        }
        self.nonempty.store(true, Ordering::Release);
    }

    /// Take the first queued frame.
    pub(super) fn pop(&self) -> Option<Vec<u8>> {
        let mut st = lock(&self.state);
        let buf = st.frames.pop_front()?;
        st.bytes -= buf.len();
        self.nonempty
            .store(!st.frames.is_empty(), Ordering::Release);
        Some(buf)
    }

    /// Discard every queued frame; returns how many.
    pub(super) fn clear(&self) -> u64 {
        let mut st = lock(&self.state);
        let n = st.frames.len() as u64;
        let frames = std::mem::take(&mut st.frames);
        st.bytes = 0;
        self.nonempty.store(false, Ordering::Release);
        for buf in frames {
            recycle(&mut st.free, buf);
        }
        n
    }
}

/// How a [`Switch`] forwards; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchMode {
    /// MAC learning; flood broadcast, multicast and unknown destinations.
    Learning,
    /// Every frame to every other port.
    Hub,
    /// Every frame back to its sender.
    Loopback,
}

type Mac = [u8; 6];

/// One attached port: a frame queue per queue pair.
struct PortEntry {
    inboxes: Vec<Arc<FrameQueue>>,
}

struct SwitchCore {
    name: String,
    mode: SwitchMode,
    /// Indexed by port id; a detached port leaves `None` (ids are reused).
    ports: RwLock<Vec<Option<PortEntry>>>,
    macs: RwLock<HashMap<Mac, usize>>,
}

/// An N-port switch that [`NetPort`]s attach to. Cheap to clone (clones are the same switch).
#[derive(Clone)]
pub struct Switch {
    core: Arc<SwitchCore>,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch")
            .field("name", &self.core.name)
            .field("mode", &self.core.mode)
            .field("ports", &self.port_ids())
            .finish()
    }
}

/// Where one frame of a burst goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dest {
    Port(usize),
    Flood,
    /// Filtered (a learnt destination on the sending port).
    Nowhere,
}

/// A port's membership; detaches (and forgets the port's MACs) when the last [`NetPort`] of
/// the attachment is dropped.
pub(super) struct Attachment {
    core: Arc<SwitchCore>,
    id: usize,
}

impl Attachment {
    pub(super) fn id(&self) -> usize {
        self.id
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let mut ports = self.core.ports.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = ports.get_mut(self.id) {
            *slot = None;
        }
        drop(ports);
        self.core
            .macs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, port| *port != self.id);
    }
}

/// A TX worker's scratch for forwarding bursts (kept between bursts: no allocation in the steady
/// state).
#[derive(Default)]
pub(super) struct Forwarder {
    /// Spare frame buffers.
    pool: Vec<Vec<u8>>,
    dests: Vec<Dest>,
    /// Per frame of the burst: destinations tried, destinations that took it.
    tried: Vec<u32>,
    took: Vec<u32>,
    /// Per frame of the burst: its length (without the header).
    lens: Vec<usize>,
    out: Vec<Vec<u8>>,
    out_index: Vec<usize>,
    /// The last source MAC learnt (skips the table for a stream from one MAC).
    last_learnt: Option<Mac>,
}

impl Forwarder {
    /// A buffer of `len` bytes (contents unspecified: a recycled buffer keeps the bytes of an
    /// earlier frame, which the caller overwrites or drops the buffer) for a frame.
    #[inline]
    pub(super) fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buf = self
            .pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(FRESH_CAPACITY.max(len)));
        // Zero only the bytes never written before: a memset per frame of what the copy
        // overwrites next was 2 % of the per-frame path.
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    /// Return a buffer that was not sent.
    pub(super) fn recycle(&mut self, buf: Vec<u8>) {
        recycle(&mut self.pool, buf);
    }
}

fn mac_at(packet: &[u8], offset: usize) -> Mac {
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&packet[PORT_HDR_LEN + offset..PORT_HDR_LEN + offset + 6]);
    mac
}

fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

impl Switch {
    /// A new switch with no port. `name` is for humans (and for a registry of switches by name).
    pub fn new(name: &str, mode: SwitchMode) -> Self {
        Self {
            core: Arc::new(SwitchCore {
                name: name.to_owned(),
                mode,
                ports: RwLock::new(Vec::new()),
                macs: RwLock::new(HashMap::new()),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.core.name
    }

    pub fn mode(&self) -> SwitchMode {
        self.core.mode
    }

    /// Attach a port with `queue_pairs` queue pairs; returns one [`NetPort`] per queue pair (all
    /// the same switch port). Each receive queue holds up to `buffer` bytes of frames. The port
    /// stays attached while any of them (or a clone) is alive.
    pub fn attach(&self, queue_pairs: usize, buffer: usize) -> io::Result<Vec<NetPort>> {
        if queue_pairs == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a switch port needs at least one queue pair",
            ));
        }
        let inboxes = (0..queue_pairs)
            .map(|_| FrameQueue::new(buffer).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        let mut ports = self.core.ports.write().unwrap_or_else(|e| e.into_inner());
        let id = match ports.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                ports.push(None);
                ports.len() - 1
            }
        };
        ports[id] = Some(PortEntry {
            inboxes: inboxes.clone(),
        });
        drop(ports);
        let attachment = Arc::new(Attachment {
            core: Arc::clone(&self.core),
            id,
        });
        Ok(inboxes
            .into_iter()
            .enumerate()
            .map(|(pair, inbox)| {
                NetPort::switched(self.clone(), Arc::clone(&attachment), pair, inbox)
            })
            .collect())
    }

    /// Ids of the attached ports.
    pub fn port_ids(&self) -> Vec<usize> {
        read(&self.core.ports)
            .iter()
            .enumerate()
            .filter_map(|(id, p)| p.as_ref().map(|_| id))
            .collect()
    }

    /// The port a MAC was learnt on.
    pub fn lookup(&self, mac: &[u8; 6]) -> Option<usize> {
        read(&self.core.macs).get(mac).copied()
    }

    /// The learning table: (MAC, port id), sorted by MAC.
    pub fn mac_table(&self) -> Vec<([u8; 6], usize)> {
        let mut table: Vec<_> = read(&self.core.macs)
            .iter()
            .map(|(m, p)| (*m, *p))
            .collect();
        table.sort_unstable();
        table
    }

    /// Learn the unicast source MACs of a burst from port `from`.
    fn learn(&self, from: usize, frames: &[Vec<u8>], fwd: &mut Forwarder) {
        let mut stale: Option<Vec<Mac>> = None;
        {
            let macs = read(&self.core.macs);
            for packet in frames {
                let src = mac_at(packet, 6);
                if is_multicast(&src) || fwd.last_learnt == Some(src) {
                    continue;
                }
                if macs.get(&src) != Some(&from) {
                    stale.get_or_insert_with(Vec::new).push(src);
                } else {
                    fwd.last_learnt = Some(src);
                }
            }
        }
        if let Some(stale) = stale {
            let mut macs = self.core.macs.write().unwrap_or_else(|e| e.into_inner());
            for src in stale {
                macs.insert(src, from);
                fwd.last_learnt = Some(src);
            }
        }
    }

    /// Forward a whole burst to port `to` (a loopback's own port), as [`Switch::forward`] does
    /// for one destination: a prefix as long as the queue takes, the rest dropped and counted.
    fn forward_to(
        &self,
        to: usize,
        pair: usize,
        frames: &mut Vec<Vec<u8>>,
        fwd: &mut Forwarder,
        counters: &NetCounters,
    ) {
        let total = frames.len();
        // (packets sent, their bytes with the header room of each)
        let (sent, packet_bytes) = {
            let ports = read(&self.core.ports);
            match ports.get(to) {
                Some(Some(entry)) => {
                    let inbox = &entry.inboxes[pair % entry.inboxes.len()];
                    inbox.push_burst(frames, &mut fwd.pool)
                }
                // Detached meanwhile: delivered to nobody, which is no drop (as a flood that
                // reaches no port).
                _ => (total, frames.iter().map(Vec::len).sum()),
            }
        };
        for packet in frames.drain(..) {
            recycle(&mut fwd.pool, packet);
        }
        // Every packet is PORT_HDR_LEN bytes of header room and a frame (`transmit`).
        let bytes = packet_bytes.saturating_sub(sent * PORT_HDR_LEN);
        if sent > 0 {
            bump(&counters.tx_packets, sent as u64);
            bump(&counters.tx_bytes, bytes as u64);
        }
        if sent < total {
            bump(&counters.tx_dropped, (total - sent) as u64);
        }
    }

    /// Forward a burst of packets (each [`PORT_HDR_LEN`] bytes of header room and a frame of at
    /// least 14 bytes) that port `from`'s queue pair `pair` transmitted. The buffers end up in
    /// destination queues or back in `fwd`'s pool; `frames` is left empty. Counts the sender's
    /// `tx_packets`/`tx_bytes`/`tx_dropped` in `counters`.
    pub(super) fn forward(
        &self,
        from: usize,
        pair: usize,
        frames: &mut Vec<Vec<u8>>,
        fwd: &mut Forwarder,
        counters: &NetCounters,
    ) {
        if frames.is_empty() {
            return;
        }
        let mode = self.core.mode;
        if mode == SwitchMode::Loopback {
            // One destination for the whole burst: no per-frame routing, no bookkeeping.
            self.forward_to(from, pair, frames, fwd, counters);
            return;
        }
        if mode == SwitchMode::Learning {
            self.learn(from, frames, fwd);
        }
        fwd.dests.clear();
        match mode {
            SwitchMode::Loopback => fwd.dests.resize(frames.len(), Dest::Port(from)),
            SwitchMode::Hub => fwd.dests.resize(frames.len(), Dest::Flood),
            SwitchMode::Learning => {
                let macs = read(&self.core.macs);
                for packet in frames.iter() {
                    let dst = mac_at(packet, 0);
                    let dest = if is_multicast(&dst) {
                        Dest::Flood
                    } else {
                        match macs.get(&dst) {
                            Some(&port) if port == from => Dest::Nowhere,
                            Some(&port) => Dest::Port(port),
                            None => Dest::Flood,
                        }
                    };
                    fwd.dests.push(dest);
                }
            }
        }
        fwd.tried.clear();
        fwd.tried.resize(frames.len(), 0);
        fwd.took.clear();
        fwd.took.resize(frames.len(), 0);
        fwd.lens.clear();
        fwd.lens
            .extend(frames.iter().map(|p| p.len().saturating_sub(PORT_HDR_LEN)));
        {
            let ports = read(&self.core.ports);
            // The last port a flood reaches gets the frame itself, the others a copy (a peer
            // link, a two-port hub, then never copies).
            let last_flood = ports
                .iter()
                .enumerate()
                .rev()
                .find(|(id, entry)| entry.is_some() && *id != from)
                .map(|(id, _)| id);
            for (id, entry) in ports.iter().enumerate() {
                let Some(entry) = entry else { continue };
                fwd.out.clear();
                fwd.out_index.clear();
                for (i, packet) in frames.iter_mut().enumerate() {
                    let to_this = match fwd.dests[i] {
                        Dest::Port(port) => port == id,
                        Dest::Flood => id != from,
                        Dest::Nowhere => false,
                    };
                    if !to_this {
                        continue;
                    }
                    let buf = if matches!(fwd.dests[i], Dest::Port(_)) || last_flood == Some(id) {
                        std::mem::take(packet)
                    } else {
                        let mut copy = fwd.buffer(0);
                        copy.extend_from_slice(packet);
                        copy
                    };
                    fwd.out.push(buf);
                    fwd.out_index.push(i);
                    fwd.tried[i] += 1;
                }
                if fwd.out.is_empty() {
                    continue;
                }
                let inbox = &entry.inboxes[pair % entry.inboxes.len()];
                let mut out = std::mem::take(&mut fwd.out);
                let (taken, _) = inbox.push_burst(&mut out, &mut fwd.pool);
                fwd.out = out;
                for &i in &fwd.out_index[..taken] {
                    fwd.took[i] += 1;
                }
            }
        }
        let (mut packets, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        for (i, packet) in frames.drain(..).enumerate() {
            if fwd.tried[i] > 0 && fwd.took[i] == 0 {
                dropped += 1;
            } else {
                packets += 1;
                bytes += fwd.lens[i] as u64;
            }
            recycle(&mut fwd.pool, packet);
        }
        if packets > 0 {
            bump(&counters.tx_packets, packets);
            bump(&counters.tx_bytes, bytes);
        }
        if dropped > 0 {
            bump(&counters.tx_dropped, dropped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(seq: u8, len: usize) -> Vec<u8> {
        vec![seq; len]
    }

    fn seqs(frames: &VecDeque<Vec<u8>>) -> Vec<u8> {
        frames.iter().map(|f| f[0]).collect()
    }

    /// The bulk moves of `push_burst` and `take` keep the queue's bounds, order, byte count and
    /// drop count exactly as a frame-by-frame walk does.
    #[test]
    fn frame_queue_bulk_moves_keep_order_bounds_and_counts() {
        // Room for 3 packets of 100 bytes; a burst of 5: a prefix of 3 is taken, 2 dropped.
        let q = FrameQueue::new(350).unwrap();
        let mut out: Vec<_> = (0..5).map(|i| packet(i, 100)).collect();
        let mut pool = Vec::new();
        assert_eq!(q.push_burst(&mut out, &mut pool), (3, 300));
        assert!(out.is_empty());
        assert_eq!(q.overflow(), 2);
        assert_eq!(pool.len(), 2, "the dropped buffers are kept as spares");
        assert!(q.has_frames());
        // A packet that does not fit stops the burst even if a later, smaller one would.
        let mut out = vec![packet(5, 60), packet(6, 10)];
        assert_eq!(q.push_burst(&mut out, &mut pool), (0, 0));
        assert_eq!(q.overflow(), 4);

        // Whole queue into an empty inbox (the swap); spent buffers go to the free list, a
        // jumbo one is not kept.
        let mut inbox = VecDeque::new();
        let mut spent = vec![
            Vec::with_capacity(64),
            Vec::with_capacity(MAX_SPARE_CAPACITY + 1),
        ];
        q.take(&mut inbox, 256, &mut spent);
        assert_eq!(seqs(&inbox), [0, 1, 2]);
        assert!(spent.is_empty());
        assert!(!q.has_frames());
        assert_eq!(lock(&q.state).bytes, 0);
        assert_eq!(lock(&q.state).free.len(), 1);
        // Producers take the free list back into their pool.
        let mut out = vec![packet(7, 100)];
        let mut pool = Vec::new();
        assert_eq!(q.push_burst(&mut out, &mut pool), (1, 100));
        assert_eq!(pool.len(), 1);

        // More queued than one take moves, and an inbox that is not empty: the frame-by-frame
        // path, in order, with the bytes left accounted for.
        let q = FrameQueue::new(1 << 20).unwrap();
        let mut out: Vec<_> = (0..10).map(|i| packet(i, 100)).collect();
        assert_eq!(q.push_burst(&mut out, &mut pool), (10, 1000));
        let mut inbox = VecDeque::new();
        q.take(&mut inbox, 4, &mut Vec::new());
        assert_eq!(seqs(&inbox), [0, 1, 2, 3]);
        assert_eq!(lock(&q.state).bytes, 600);
        assert!(q.has_frames());
        q.take(&mut inbox, 256, &mut Vec::new());
        assert_eq!(seqs(&inbox), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(lock(&q.state).bytes, 0);
        assert!(!q.has_frames());
        // Finding nothing marks the queue sleeping; the next push clears the mark and rings.
        assert_eq!(q.wake().consume().unwrap(), 0);
        q.take(&mut VecDeque::new(), 256, &mut Vec::new());
        assert!(lock(&q.state).sleeping);
        let mut out = vec![packet(10, 100)];
        q.push_burst(&mut out, &mut pool);
        assert!(!lock(&q.state).sleeping);
        assert_eq!(q.wake().consume().unwrap(), 1);
    }

    /// A whole burst into an empty queue is handed over as the queue, a burst into a queue that
    /// holds frames is appended behind them; the free list goes to a producer's pool whole
    /// when it fits and in part when it does not.
    #[test]
    fn frame_queue_hands_whole_bursts_over_and_appends_to_a_busy_queue() {
        let q = FrameQueue::new(1 << 20).unwrap();
        let mut pool = Vec::new();
        let mut out: Vec<_> = (0..3).map(|i| packet(i, 100)).collect();
        assert_eq!(q.push_burst(&mut out, &mut pool), (3, 300));
        assert!(out.is_empty());
        let mut out: Vec<_> = (3..5).map(|i| packet(i, 50)).collect();
        assert_eq!(q.push_burst(&mut out, &mut pool), (2, 100));
        assert!(out.is_empty());
        assert_eq!(lock(&q.state).bytes, 400);
        let mut inbox = VecDeque::new();
        let mut spent: Vec<_> = (0..300).map(|_| Vec::with_capacity(64)).collect();
        q.take(&mut inbox, 256, &mut spent);
        assert_eq!(seqs(&inbox), [0, 1, 2, 3, 4]);
        assert_eq!(lock(&q.state).free.len(), 300);
        // Half of MAX_SPARE_BUFFERS at most into the pool: part of the free list.
        q.push_burst(&mut vec![packet(5, 10)], &mut pool);
        assert_eq!((pool.len(), lock(&q.state).free.len()), (256, 44));
        // Room for all that is left: the whole free list.
        pool.truncate(200);
        q.push_burst(&mut vec![packet(6, 10)], &mut pool);
        assert_eq!((pool.len(), lock(&q.state).free.len()), (244, 0));
        let mut inbox = VecDeque::new();
        q.take(&mut inbox, 256, &mut Vec::new());
        assert_eq!(seqs(&inbox), [5, 6]);
    }
}
