//! Packed virtqueue (VIRTIO_F_RING_PACKED): configuration, ring areas, and the device side
//! ([`PackedQueue`]). The driver side is [`super::PackedQueueDriver`].
//!
//! [`PackedQueue`] has the shape of [`super::SplitQueue`]: chains are popped into the same
//! [`ChainBatch`] (a chain's `head()` is its *buffer id*), completed with `push_used(id, len)`
//! and published with `publish_used()`, which decides on the call. Only `pop_batch`,
//! `push_used` and `publish_used` touch the ring, so per-chain hooks (in-flight tracking, dirty
//! logging) have the same three places to go as in the split ring.
//!
//! Dirty logging differs from the split ring in one way: a chain's writable buffers are
//! recorded when it is popped, not found again by a re-walk when it completes, because its ring
//! slots may hold used descriptors by then (every used descriptor goes to the next used slot,
//! which may be a slot of any chain still in flight).
//!
//! Orderings follow `virtqueue-layouts.md` §2 and §3 (packed column); each is commented.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, Ordering};

use super::split::{add_buffer, Spent, Table, Translator, Walk};
use super::{
    check_disjoint, need_event, ready, ring_area, Chain, ChainBatch, Descriptor, QueueConfig,
    Segment, MAX_INDIRECT_DESCRIPTORS, MAX_QUEUE_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
};
use crate::dirty_log::QueueLog;
use crate::error::{ChainFault, QueueError};
use crate::inflight::{PackedDesc, PackedInflight, PackedRecovery, PackedResubmit};
use crate::memory::{Access, GuestMemory};

/// Packed descriptor flag: the driver's wrap counter when it made the descriptor available.
pub const VIRTQ_DESC_F_AVAIL: u16 = 1 << 7;
/// Packed descriptor flag: the device's wrap counter when it marked the descriptor used.
pub const VIRTQ_DESC_F_USED: u16 = 1 << 15;
/// Event suppression `flags`: notify on every event.
pub const RING_EVENT_FLAGS_ENABLE: u16 = 0;
/// Event suppression `flags`: do not notify.
pub const RING_EVENT_FLAGS_DISABLE: u16 = 1;
/// Event suppression `flags`: notify when the descriptor at `off_wrap` is reached (EVENT_IDX).
pub const RING_EVENT_FLAGS_DESC: u16 = 2;

/// Where a packed virtqueue lives and which ring features apply. vhost-user's SET_VRING_ADDR
/// carries the three areas under the split names: desc → descriptor ring, avail → driver event
/// suppression, used → device event suppression (§2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedConfig {
    /// Number of descriptors Q: 1..=32768, not necessarily a power of two.
    pub size: u16,
    /// Guest-physical address of the descriptor ring (16-byte aligned, 16·Q bytes).
    pub desc_ring: u64,
    /// Guest-physical address of the driver event suppression structure (4-byte aligned).
    pub driver_event: u64,
    /// Guest-physical address of the device event suppression structure (4-byte aligned).
    pub device_event: u64,
    /// VIRTIO_F_EVENT_IDX negotiated (enables the DESC event mode).
    pub event_idx: bool,
    /// VIRTIO_F_INDIRECT_DESC negotiated.
    pub indirect: bool,
}

impl PackedConfig {
    /// The packed areas of a vring configured with the split ring's field names (as vhost-user
    /// and the engine's `Vring` carry them).
    pub fn from_split_names(config: &QueueConfig) -> Self {
        Self {
            size: config.size,
            desc_ring: config.desc_table,
            driver_event: config.avail_ring,
            device_event: config.used_ring,
            event_idx: config.event_idx,
            indirect: config.indirect,
        }
    }

    /// Check size and alignment.
    pub fn validate(&self) -> Result<(), QueueError> {
        let bad = |what: String| Err(QueueError::InvalidConfig(what));
        if self.size == 0 || self.size > MAX_QUEUE_SIZE {
            return bad(format!("queue size {} is not in 1..=32768", self.size));
        }
        for (name, addr, align) in [
            ("descriptor ring", self.desc_ring, 16),
            ("driver event suppression area", self.driver_event, 4),
            ("device event suppression area", self.device_event, 4),
        ] {
            if addr % align != 0 {
                return bad(format!(
                    "{name} address {addr:#x} is not {align}-byte aligned"
                ));
            }
        }
        check_disjoint(&[
            ("descriptor ring", self.desc_ring, self.desc_ring_len()),
            ("driver event suppression area", self.driver_event, 4),
            ("device event suppression area", self.device_event, 4),
        ])
    }

    /// Bytes of the descriptor ring.
    pub fn desc_ring_len(&self) -> u64 {
        16 * u64::from(self.size)
    }
}

/// One packed-ring descriptor (`struct pvirtq_desc`), in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackedDescriptor {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

impl PackedDescriptor {
    pub fn new(addr: u64, len: u32, id: u16, flags: u16) -> Self {
        Self {
            addr,
            len,
            id,
            flags,
        }
    }

    /// The 16 little-endian bytes of the descriptor as it sits in guest memory.
    pub fn to_le_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..14].copy_from_slice(&self.id.to_le_bytes());
        out[14..].copy_from_slice(&self.flags.to_le_bytes());
        out
    }

    /// Decode 16 little-endian bytes.
    pub fn from_le_bytes(raw: [u8; 16]) -> Self {
        Self::from_split_layout(Descriptor::from_le_bytes(raw))
    }

    /// The packed descriptor whose bytes were decoded with the split layout: both share addr
    /// and len; the split `flags`/`next` words sit where the packed `id`/`flags` are. This lets
    /// both rings use one (atomic, alignment-aware) descriptor reader.
    #[inline]
    fn from_split_layout(raw: Descriptor) -> Self {
        Self {
            addr: raw.addr,
            len: raw.len,
            id: raw.flags,
            flags: raw.next,
        }
    }
}

/// A slot of the descriptor ring together with the wrap counter that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingPosition {
    /// Slot, below the queue size.
    pub index: u16,
    /// Wrap counter (starts at `true`).
    pub wrap: bool,
}

impl RingPosition {
    /// Where both sides start: slot 0, wrap counter 1.
    pub const START: Self = Self {
        index: 0,
        wrap: true,
    };

    /// `n` slots further on in a ring of `size` (`index < size`, `n <= size`).
    #[inline]
    pub fn advance(self, n: u16, size: u16) -> Self {
        let next = u32::from(self.index) + u32::from(n);
        if next >= u32::from(size) {
            Self {
                // Below size: index < size and n <= size.
                index: (next - u32::from(size)) as u16,
                wrap: !self.wrap,
            }
        } else {
            Self {
                index: next as u16,
                wrap: self.wrap,
            }
        }
    }

    /// `n` slots back (`index < size`, `n <= size`).
    #[inline]
    pub fn retreat(self, n: u16, size: u16) -> Self {
        if self.index >= n {
            Self {
                index: self.index - n,
                wrap: self.wrap,
            }
        } else {
            Self {
                // index < n <= size: the sum is below size.
                index: self.index + (size - n),
                wrap: !self.wrap,
            }
        }
    }

    /// The 16-bit form used by event suppression and vhost-user: offset in bits 0–14, wrap
    /// counter in bit 15.
    #[inline]
    pub fn encode(self) -> u16 {
        (self.index & 0x7fff) | (u16::from(self.wrap) << 15)
    }

    #[inline]
    pub fn decode(value: u16) -> Self {
        Self {
            index: value & 0x7fff,
            wrap: value & 0x8000 != 0,
        }
    }
}

/// What vhost-user GET/SET_VRING_BASE carries for a packed ring (§2.3): the next available
/// position in bits 0–15 and the next used position in bits 16–31, each as
/// [`RingPosition::encode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedState {
    pub next_avail: RingPosition,
    pub next_used: RingPosition,
}

impl PackedState {
    /// A fresh ring: both sides at slot 0 with wrap counter 1.
    pub const START: Self = Self {
        next_avail: RingPosition::START,
        next_used: RingPosition::START,
    };

    pub fn to_vring_base(self) -> u32 {
        u32::from(self.next_avail.encode()) | (u32::from(self.next_used.encode()) << 16)
    }

    pub fn from_vring_base(base: u32) -> Self {
        Self {
            next_avail: RingPosition::decode(base as u16),
            next_used: RingPosition::decode((base >> 16) as u16),
        }
    }
}

/// Does `flags` mark a descriptor available in wrap `wrap`? (§2.3: AVAIL = wrap, USED ≠ wrap.)
#[inline]
pub(crate) fn is_available(flags: u16, wrap: bool) -> bool {
    (flags & VIRTQ_DESC_F_AVAIL != 0) == wrap && (flags & VIRTQ_DESC_F_USED != 0) != wrap
}

/// Does `flags` mark a descriptor used in wrap `wrap`? (§2.3: AVAIL = USED = wrap.)
#[inline]
pub(crate) fn is_used(flags: u16, wrap: bool) -> bool {
    (flags & VIRTQ_DESC_F_AVAIL != 0) == wrap && (flags & VIRTQ_DESC_F_USED != 0) == wrap
}

/// AVAIL and USED both set to `wrap`.
#[inline]
pub(crate) fn used_bits(wrap: bool) -> u16 {
    if wrap {
        VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
    } else {
        0
    }
}

/// The §2.5 decision for an event suppression structure `(off_wrap, flags)` after moving a
/// position from `old` to `new` (ring offsets, `old` possibly "negative" in u16 arithmetic when
/// the move wrapped) where `wrap` is the wrap counter that belongs to `new`.
#[inline]
pub(crate) fn event_says_notify(
    off_wrap: u16,
    flags: u16,
    event_idx: bool,
    new: u16,
    old: u16,
    wrap: bool,
    size: u16,
) -> bool {
    match flags & 0x3 {
        RING_EVENT_FLAGS_DISABLE => false,
        RING_EVENT_FLAGS_DESC if event_idx => {
            let event = RingPosition::decode(off_wrap);
            let off = if event.wrap == wrap {
                event.index
            } else {
                event.index.wrapping_sub(size)
            };
            need_event(off, new, old)
        }
        // ENABLE, DESC without EVENT_IDX and the reserved value: notify (spurious notifications
        // are always tolerated, lost ones are not).
        _ => true,
    }
}

/// Host pointers to the three areas of one packed queue, valid while `mem` (kept here) lives.
///
/// Invariant: `desc` covers `16·Q` bytes and is 8-byte aligned; `driver_event` and
/// `device_event` cover 4 bytes each and are 2-byte aligned.
pub(crate) struct PackedRings {
    mem: GuestMemory,
    size: u16,
    desc: NonNull<u8>,
    driver_event: NonNull<u8>,
    device_event: NonNull<u8>,
}

// SAFETY: the pointers point into mappings kept alive by `mem` (whose regions are Send + Sync),
// and every access through them is atomic.
unsafe impl Send for PackedRings {}
// SAFETY: see `Send`; shared access only performs atomic loads and stores.
unsafe impl Sync for PackedRings {}

impl std::fmt::Debug for PackedRings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedRings")
            .field("size", &self.size)
            .field("desc", &self.desc)
            .field("driver_event", &self.driver_event)
            .field("device_event", &self.device_event)
            .finish()
    }
}

impl PackedRings {
    /// Translate the areas of `config` in `mem`; each must lie within one region.
    pub(crate) fn new(mem: GuestMemory, config: &PackedConfig) -> Result<Self, QueueError> {
        config.validate()?;
        // The device reads and writes the descriptor ring (used descriptors go there), reads the
        // driver's event area and writes its own (only IOTLB windows can refuse an access).
        let area = |gpa, len, align, name, need| ring_area(&mem, gpa, len, align, name, need);
        let desc = area(
            config.desc_ring,
            config.desc_ring_len(),
            8,
            "descriptor ring",
            Access::READ_WRITE,
        )?;
        let driver_event = area(
            config.driver_event,
            4,
            2,
            "driver event suppression area",
            Access::READ,
        )?;
        let device_event = area(
            config.device_event,
            4,
            2,
            "device event suppression area",
            Access::WRITE,
        )?;
        Ok(Self {
            mem,
            size: config.size,
            desc,
            driver_event,
            device_event,
        })
    }

    pub(crate) fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Byte offset of slot `index` (kept inside the ring even for a bad index).
    #[inline]
    fn slot(&self, index: u16) -> usize {
        let index = if index < self.size {
            index
        } else {
            index % self.size
        };
        16 * usize::from(index)
    }

    #[inline]
    fn u16_at(&self, base: NonNull<u8>, offset: usize) -> &AtomicU16 {
        // SAFETY: callers pass offsets inside the area per the struct invariant, with 2-byte
        // alignment; the mapping lives as long as `self.mem`, which outlives the borrow of self.
        unsafe { AtomicU16::from_ptr(base.as_ptr().add(offset).cast()) }
    }

    /// `flags` of slot `index`.
    #[inline]
    pub(crate) fn desc_flags(&self, index: u16, order: Ordering) -> u16 {
        u16::from_le(self.u16_at(self.desc, self.slot(index) + 14).load(order))
    }

    #[inline]
    pub(crate) fn set_desc_flags(&self, index: u16, flags: u16, order: Ordering) {
        self.u16_at(self.desc, self.slot(index) + 14)
            .store(flags.to_le(), order)
    }

    /// The whole descriptor at slot `index`, with relaxed loads.
    #[inline]
    pub(crate) fn descriptor(&self, index: u16) -> PackedDescriptor {
        // SAFETY: slot + 16 <= 16·Q, inside the ring, which is 8-byte aligned.
        let raw = unsafe { Descriptor::read_at(self.desc.as_ptr().add(self.slot(index))) };
        PackedDescriptor::from_split_layout(raw)
    }

    /// Write addr, len and id of slot `index` (not its flags), with relaxed stores.
    #[inline]
    pub(crate) fn set_descriptor_body(&self, index: u16, addr: u64, len: u32, id: u16) {
        let offset = self.slot(index);
        // SAFETY: offset + 16 <= 16·Q inside the 8-byte aligned ring: the u64 at +0, the u32 at
        // +8 and the u16 at +12 are inside and naturally aligned.
        unsafe {
            let ptr = self.desc.as_ptr().add(offset);
            AtomicU64::from_ptr(ptr.cast()).store(addr.to_le(), Ordering::Relaxed);
            AtomicU32::from_ptr(ptr.add(8).cast()).store(len.to_le(), Ordering::Relaxed);
        }
        self.u16_at(self.desc, offset + 12)
            .store(id.to_le(), Ordering::Relaxed);
    }

    /// Write id and len of a used descriptor at slot `index` (not its flags), relaxed.
    #[inline]
    pub(crate) fn set_used_body(&self, index: u16, id: u16, len: u32) {
        let offset = self.slot(index);
        // SAFETY: the u32 at +8 is inside the 8-byte aligned ring and 4-byte aligned.
        unsafe {
            AtomicU32::from_ptr(self.desc.as_ptr().add(offset + 8).cast())
                .store(len.to_le(), Ordering::Relaxed);
        }
        self.u16_at(self.desc, offset + 12)
            .store(id.to_le(), Ordering::Relaxed);
    }

    fn event(&self, base: NonNull<u8>, order: Ordering) -> (u16, u16) {
        (
            u16::from_le(self.u16_at(base, 0).load(order)),
            u16::from_le(self.u16_at(base, 2).load(order)),
        )
    }

    fn set_event(&self, base: NonNull<u8>, off_wrap: u16, flags: u16, order: Ordering) {
        self.u16_at(base, 0).store(off_wrap.to_le(), order);
        self.u16_at(base, 2).store(flags.to_le(), order);
    }

    /// Driver event suppression `(off_wrap, flags)`: read by the device.
    #[inline]
    pub(crate) fn driver_event(&self, order: Ordering) -> (u16, u16) {
        self.event(self.driver_event, order)
    }
    #[inline]
    pub(crate) fn set_driver_event(&self, off_wrap: u16, flags: u16, order: Ordering) {
        self.set_event(self.driver_event, off_wrap, flags, order)
    }
    /// Device event suppression `(off_wrap, flags)`: read by the driver.
    #[inline]
    pub(crate) fn device_event(&self, order: Ordering) -> (u16, u16) {
        self.event(self.device_event, order)
    }
    #[inline]
    pub(crate) fn set_device_event(&self, off_wrap: u16, flags: u16, order: Ordering) {
        self.set_event(self.device_event, off_wrap, flags, order)
    }
}

/// Device side of a packed virtqueue. See the module docs.
pub struct PackedQueue {
    config: PackedConfig,
    rings: Option<PackedRings>,
    next_avail: RingPosition,
    next_used: RingPosition,
    /// Ring descriptors taken by each buffer id in flight (0: the id is not in flight), so that
    /// used descriptors can be written in any order and skip the right number of slots.
    id_descriptors: Vec<u16>,
    /// Ring descriptors popped and not yet pushed used.
    outstanding: u32,
    /// The first used descriptor pushed since the last publish: its slot and the flags held back
    /// until `publish_used` so the driver sees the whole batch at once.
    batch_head: Option<(u16, u16)>,
    /// Ring slots covered by the used descriptors pushed since the last publish.
    added: u16,
    /// Whether a notification decision was made since attach (the first one always notifies).
    signalled_valid: bool,
    region_cache: usize,
    broken: Option<String>,
    /// The IOTLB miss that ended the last `pop_batch` early, until taken.
    miss: Option<(u64, Access)>,
    /// INFLIGHT_SHMFD tracking: the queue's part of the shared inflight region.
    inflight: Option<PackedInflight>,
    /// Region entry of each buffer id in flight (meaningful while `inflight` is set).
    inflight_slot: Vec<u16>,
    /// (region entry, ring descriptors) of the chains pushed since the last publish: completed
    /// in the region right before the batch is published.
    inflight_pushed: Vec<(u16, u16)>,
    /// Region entries of the batch being published (scratch for the commit).
    inflight_commit: Vec<u16>,
    /// Chains in flight when the previous back-end died: handed out before the ring's.
    resubmit: VecDeque<PackedResubmit>,
    /// Dirty logging (live migration): `None` costs one branch per pop/push/publish.
    log: Option<PackedLog>,
}

/// What a logging packed queue keeps: the log, and the writable buffers of each chain in flight.
#[derive(Debug)]
struct PackedLog {
    queue_log: QueueLog,
    /// Writable `(gpa, len)` pieces of each buffer id in flight, recorded at pop.
    writable: Vec<Vec<(u64, u32)>>,
    /// Whether `writable[id]` holds the chain in flight under `id` (not for chains popped
    /// before the log was set: their completions are log faults).
    recorded: Vec<bool>,
}

impl PackedLog {
    /// Remember the writable part of the chain just popped under `id` (< the queue size).
    #[cold]
    #[inline(never)]
    fn record(&mut self, id: u16, writable: &[Segment]) {
        let (Some(pieces), Some(recorded)) = (
            self.writable.get_mut(usize::from(id)),
            self.recorded.get_mut(usize::from(id)),
        ) else {
            return;
        };
        pieces.clear();
        // Up to MAX_CHAIN_SEGMENTS pieces: no abort when there is no memory for them; the
        // chain's completion is then a log fault (its record stays unset).
        if pieces.try_reserve(writable.len()).is_err() {
            *recorded = false;
            return;
        }
        pieces.extend(writable.iter().map(|segment| (segment.gpa, segment.len)));
        *recorded = true;
    }

    /// Log every writable buffer of the chain completing under `id`: all of it, not just the
    /// used length (which may underestimate what was written: see split's `log_chain_writes`).
    #[cold]
    #[inline(never)]
    fn log_completion(&mut self, id: u16) {
        let log = &self.queue_log.log;
        let id = usize::from(id);
        match (self.recorded.get_mut(id), self.writable.get(id)) {
            (Some(recorded), Some(pieces)) if *recorded => {
                *recorded = false;
                for &(gpa, len) in pieces {
                    // A fault is counted by the log and reported by its owner.
                    let _ = log.mark(gpa, u64::from(len));
                }
            }
            _ => log.record_fault(),
        }
    }

    /// Log a used descriptor written at `slot` (< the queue size) of the descriptor ring at
    /// guest address `desc_ring`: its 16 bytes, by guest address. Call it after its flags.
    #[cold]
    #[inline(never)]
    fn log_used_slot(&self, desc_ring: u64, slot: u16) {
        // The ring was mapped whole, so the address does not overflow; a fault is counted.
        let _ = self
            .queue_log
            .log
            .mark(desc_ring.wrapping_add(16 * u64::from(slot)), 16);
    }
}

impl std::fmt::Debug for PackedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQueue")
            .field("config", &self.config)
            .field("attached", &self.rings.is_some())
            .field("next_avail", &self.next_avail)
            .field("next_used", &self.next_used)
            .field("broken", &self.broken)
            .finish()
    }
}

impl PackedQueue {
    /// A detached queue at [`PackedState::START`]; fails with `InvalidConfig` for a bad size or
    /// misaligned area.
    pub fn new(config: PackedConfig) -> Result<Self, QueueError> {
        config.validate()?;
        Ok(Self {
            config,
            rings: None,
            next_avail: RingPosition::START,
            next_used: RingPosition::START,
            id_descriptors: vec![0; usize::from(config.size)],
            outstanding: 0,
            batch_head: None,
            added: 0,
            signalled_valid: false,
            region_cache: 0,
            miss: None,
            broken: None,
            inflight: None,
            inflight_slot: Vec::new(),
            inflight_pushed: Vec::new(),
            inflight_commit: Vec::new(),
            resubmit: VecDeque::new(),
            log: None,
        })
    }

    pub fn config(&self) -> &PackedConfig {
        &self.config
    }

    pub fn size(&self) -> u16 {
        self.config.size
    }

    /// Translate the ring areas in `mem` and keep the snapshot (it keeps the mapping alive).
    ///
    /// Replaces an earlier attachment (SET_MEM_TABLE while running). The positions and the
    /// chains in flight are kept; used descriptors pushed but not yet published are dropped (as
    /// in [`super::SplitQueue::attach`]), so call [`PackedQueue::publish_used`] first. The next
    /// completion always notifies. On failure the queue is left detached.
    pub fn attach(&mut self, mem: GuestMemory) -> Result<(), QueueError> {
        self.rings = None;
        let rings = PackedRings::new(mem, &self.config)?;
        self.drop_unpublished();
        self.signalled_valid = false;
        self.region_cache = 0;
        self.rings = Some(rings);
        Ok(())
    }

    /// Drop the rings, the memory snapshot and the inflight view (set it again after the next
    /// attach: it recovers from the region then).
    pub fn detach(&mut self) {
        self.rings = None;
        self.drop_unpublished();
        self.inflight = None;
        self.resubmit.clear();
        self.signalled_valid = false;
    }

    /// Track this queue in an inflight region (INFLIGHT_SHMFD) from now on, after recovering
    /// what the region says: call after `attach` and `set_state` (SET_VRING_BASE), before the
    /// first pop.
    ///
    /// With a region that held state, both positions come from it: the used position is the
    /// region's (after committing or rolling back a half-done completion, judged by the ring's
    /// flags), the chains still in flight are handed out again first, in fetch order, from the
    /// descriptors stored in the region (their ring slots may hold used descriptors by now),
    /// and the next available position is the used one plus the ring slots they occupy. A
    /// fresh region, or one whose content made no sense (reported in
    /// [`PackedRecovery::discarded`]), starts empty at the queue's current positions.
    pub fn set_inflight(&mut self, inflight: PackedInflight) -> Result<PackedRecovery, QueueError> {
        let result = self.set_inflight_unchecked(inflight);
        self.checked(result)
    }

    fn set_inflight_unchecked(
        &mut self,
        mut inflight: PackedInflight,
    ) -> Result<PackedRecovery, QueueError> {
        let rings = ready(&self.broken, &self.rings)?;
        let size = self.config.size;
        if inflight.size() != size {
            return Err(QueueError::InvalidConfig(format!(
                "inflight view tracks {} descriptors, the ring has {size}",
                inflight.size()
            )));
        }
        let recovery = inflight.recover(|index| {
            if index < size {
                rings.desc_flags(index, Ordering::Acquire)
            } else {
                0
            }
        });
        self.drop_unpublished();
        self.id_descriptors.fill(0);
        self.outstanding = 0;
        if recovery.restored {
            // The region checked that the chains in flight span at most `size` slots.
            let in_flight: usize = recovery.resubmit.iter().map(|c| c.descriptors.len()).sum();
            self.next_used = RingPosition {
                index: recovery.used_idx,
                wrap: recovery.used_wrap_counter,
            };
            self.next_avail = self.next_used.advance(in_flight as u16, size);
        } else {
            inflight.start_at(self.next_used.index, self.next_used.wrap);
        }
        self.resubmit = recovery.resubmit.iter().cloned().collect();
        self.inflight_slot = vec![0; usize::from(size)];
        self.inflight_pushed = Vec::with_capacity(usize::from(size));
        self.inflight_commit = Vec::with_capacity(usize::from(size));
        self.signalled_valid = false;
        self.inflight = Some(inflight);
        Ok(recovery)
    }

    /// Start (`Some`) or stop (`None`) logging this queue's writes to guest memory: the
    /// device-writable buffers of every completed chain (recorded when popped), the used
    /// descriptors in the descriptor ring (by guest address: they are guest memory like the
    /// buffers), and, when the log has a used-ring address (VHOST_VRING_F_LOG; QEMU gives the
    /// device event suppression area's address for a packed ring), the device event
    /// suppression area. Survives (re-)attach; a new log keeps what was recorded.
    ///
    /// Set it before popping (the engine does it on a fresh queue): a chain popped before has
    /// no record, and its completion is counted as a log fault.
    pub fn set_log(&mut self, log: Option<QueueLog>) {
        match (log, self.log.as_mut()) {
            (None, _) => self.log = None,
            (Some(queue_log), Some(current)) => current.queue_log = queue_log,
            (Some(queue_log), None) => {
                let size = usize::from(self.config.size);
                self.log = Some(PackedLog {
                    queue_log,
                    writable: vec![Vec::new(); size],
                    recorded: vec![false; size],
                });
            }
        }
    }

    pub fn log(&self) -> Option<&QueueLog> {
        self.log.as_ref().map(|log| &log.queue_log)
    }

    /// Chains waiting to be handed out again after a reconnect.
    pub fn resubmit_pending(&self) -> usize {
        self.resubmit.len()
    }

    /// Forget a batch pushed but not published: the driver never saw it, so its slots are
    /// written again by the next pushes.
    fn drop_unpublished(&mut self) {
        if self.batch_head.is_some() {
            self.next_used = self.next_used.retreat(self.added, self.config.size);
        }
        self.batch_head = None;
        self.added = 0;
        // Never completed in the region either: those chains stay in flight there.
        self.inflight_pushed.clear();
    }

    pub fn is_attached(&self) -> bool {
        self.rings.is_some()
    }

    /// The snapshot the queue is attached to.
    pub fn memory(&self) -> Option<&GuestMemory> {
        self.rings.as_ref().map(PackedRings::memory)
    }

    /// Where the next chain will be taken from.
    pub fn next_avail(&self) -> RingPosition {
        self.next_avail
    }

    /// Where the next used descriptor will be written.
    pub fn next_used(&self) -> RingPosition {
        self.next_used
    }

    /// Both positions (vhost-user GET_VRING_BASE, see [`PackedState::to_vring_base`]).
    pub fn state(&self) -> PackedState {
        PackedState {
            next_avail: self.next_avail,
            next_used: self.next_used,
        }
    }

    /// Set both positions (vhost-user SET_VRING_BASE). Forgets the chains in flight and the
    /// inflight view (set it again afterwards): the driver's ring is the truth after a
    /// reconnect. Offsets must be below the queue size.
    pub fn set_state(&mut self, state: PackedState) -> Result<(), QueueError> {
        for (name, pos) in [("avail", state.next_avail), ("used", state.next_used)] {
            if pos.index >= self.config.size {
                return Err(QueueError::InvalidConfig(format!(
                    "packed ring {name} offset {} is not below the queue size {}",
                    pos.index, self.config.size
                )));
            }
        }
        self.next_avail = state.next_avail;
        self.next_used = state.next_used;
        self.id_descriptors.fill(0);
        self.outstanding = 0;
        self.batch_head = None;
        self.added = 0;
        self.signalled_valid = false;
        self.inflight = None;
        self.inflight_pushed.clear();
        self.resubmit.clear();
        Ok(())
    }

    /// Hand back `chains`, the most recently popped chains (in pop order) that were not
    /// pushed: `next_avail` moves back over their slots and they will be popped again.
    /// `UnknownHead` if one of them is not in flight (nothing is changed then).
    pub fn give_back(&mut self, chains: &[Chain]) -> Result<(), QueueError> {
        if self.inflight.is_some() {
            // The region recorded them as fetched; popping them again would record them twice.
            return Err(QueueError::InvalidConfig(
                "chains cannot be given back while the queue is tracked in an inflight region"
                    .into(),
            ));
        }
        let mut seen = Vec::with_capacity(chains.len());
        for chain in chains {
            let id = chain.head;
            let in_flight = self
                .id_descriptors
                .get(usize::from(id))
                .is_some_and(|&n| n != 0);
            if !in_flight || seen.contains(&id) {
                return Err(QueueError::UnknownHead(id));
            }
            seen.push(id);
        }
        for chain in chains.iter().rev() {
            let slots = std::mem::take(&mut self.id_descriptors[usize::from(chain.head)]);
            self.outstanding -= u32::from(slots);
            self.next_avail = self.next_avail.retreat(slots, self.config.size);
        }
        Ok(())
    }

    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    pub fn broken_reason(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    fn fail(&mut self, err: QueueError) -> QueueError {
        self.broken = Some(err.to_string());
        err
    }

    /// After touching guest memory: a SIGBUS caught meanwhile in this queue's memory, inflight
    /// region or dirty log ([`crate::sigbus`]) breaks the queue with `Memory(Poisoned)`. While
    /// no fault ever happened in the process this is one relaxed load.
    #[inline(always)]
    fn checked<T>(&mut self, result: Result<T, QueueError>) -> Result<T, QueueError> {
        if crate::sigbus::faults() != 0 {
            if let Some(err) = self.poison_error() {
                return Err(err);
            }
        }
        result
    }

    #[cold]
    #[inline(never)]
    fn poison_error(&mut self) -> Option<QueueError> {
        let err = self.poisoned()?;
        Some(self.fail(err.into()))
    }

    fn poisoned(&self) -> Option<crate::error::MemoryError> {
        let rings = self.rings.as_ref();
        rings
            .and_then(|r| r.memory().check_poison().err())
            .or_else(|| self.inflight.as_ref().and_then(|i| i.check_poison().err()))
            .or_else(|| {
                self.log
                    .as_ref()
                    .and_then(|l| l.queue_log.log.check_poison().err())
            })
    }

    /// Number of complete chains the driver has made available that we have not popped yet,
    /// chains waiting to be resubmitted included (walks at most Q descriptor flags; chains are
    /// validated only when popped).
    pub fn pending(&mut self) -> Result<u16, QueueError> {
        let result = self.pending_unchecked();
        self.checked(result)
    }

    #[inline]
    fn pending_unchecked(&mut self) -> Result<u16, QueueError> {
        let rings = ready(&self.broken, &self.rings)?;
        let size = self.config.size;
        let mut pos = self.next_avail;
        let mut chains = 0u16;
        for _ in 0..size {
            // Acquire: as in pop_batch, for whoever acts on the answer.
            let flags = rings.desc_flags(pos.index, Ordering::Acquire);
            if !is_available(flags, pos.wrap) {
                break;
            }
            if flags & VIRTQ_DESC_F_NEXT == 0 || flags & VIRTQ_DESC_F_INDIRECT != 0 {
                chains += 1;
            }
            pos = pos.advance(1, size);
        }
        // At most Q chains are in flight.
        Ok(chains.saturating_add(self.resubmit.len() as u16))
    }

    /// The IOTLB miss (iova, access) that ended the last [`PackedQueue::pop_batch`] early, if
    /// any. The chain that missed was left in the ring; pop again once translated.
    pub fn take_miss(&mut self) -> Option<(u64, Access)> {
        self.miss.take()
    }

    /// Pop up to `max` available chains into `batch` (appending), returning how many were added.
    /// Each chain's `head()` is its buffer id. As in the split ring, a call stops taking chains
    /// once it walked [`super::MAX_POP_DESCRIPTORS`] descriptors or collected
    /// [`super::MAX_POP_SEGMENTS`] segments; the rest stays in the ring for the next call.
    ///
    /// A malformed chain marks the queue broken and returns the error; chains popped earlier in
    /// the same call stay in the batch (and are in flight), the bad one is not added. Slots
    /// made available again while popped or pushed but not yet published are such a fault
    /// (`DescriptorsReused`).
    pub fn pop_batch(&mut self, batch: &mut ChainBatch, max: usize) -> Result<usize, QueueError> {
        let result = self.pop_batch_unchecked(batch, max);
        self.checked(result)
    }

    #[inline]
    fn pop_batch_unchecked(
        &mut self,
        batch: &mut ChainBatch,
        max: usize,
    ) -> Result<usize, QueueError> {
        self.miss = None;
        let rings = ready(&self.broken, &self.rings)?;
        let size = self.config.size;
        let mut translator = Translator {
            regions: rings.memory().regions(),
            cache: &mut self.region_cache,
            iova: rings.memory().is_iova(),
        };
        // The work of one call, as in the split ring: chains are taken until
        // MAX_POP_DESCRIPTORS descriptors were walked or MAX_POP_SEGMENTS segments collected.
        let mut spent = Spent::new(batch.segments.len());
        let mut count = 0;
        // Chains a previous back-end left in flight first, rebuilt from the region's copies of
        // their descriptors; they already occupy their slots between next_used and next_avail.
        while count < max {
            let Some(stored) = self.resubmit.front() else {
                break;
            };
            let mark = batch.segments.len();
            let read = |n: u16, _: RingPosition| {
                stored
                    .descriptors
                    .get(usize::from(n))
                    .map(|d| PackedDescriptor::new(d.addr, d.len, d.id, d.flags))
                    .ok_or(ChainFault::ResubmitMismatch)
            };
            let popped = pop_chain(
                rings.memory(),
                &self.config,
                &mut translator,
                self.next_used,
                read,
                &mut batch.segments,
            )
            .and_then(|(chain, slots, walked)| {
                if usize::from(slots) != stored.descriptors.len() {
                    return Err(ChainFault::ResubmitMismatch);
                }
                check_in_flight(
                    &self.id_descriptors,
                    self.outstanding + u32::from(self.added),
                    size,
                    chain.head,
                    slots,
                )?;
                Ok((chain, slots, walked))
            });
            match popped {
                Ok((chain, slots, walked)) => {
                    if let Some(log) = self.log.as_mut() {
                        log.record(chain.head, &batch.segments[chain.mid..chain.segments.end]);
                    }
                    self.id_descriptors[usize::from(chain.head)] = slots;
                    self.outstanding += u32::from(slots);
                    self.inflight_slot[usize::from(chain.head)] = stored.slot;
                    batch.chains.push(chain);
                    self.resubmit.pop_front();
                    count += 1;
                    spent.walked += walked;
                    if spent.exhausted(&batch.segments) {
                        return Ok(count);
                    }
                }
                Err(ChainFault::IotlbMiss { iova, access }) => {
                    // The chain stays first in line; it is retried once translated.
                    batch.segments.truncate(mark);
                    self.miss = Some((iova, access));
                    return Ok(count);
                }
                Err(reason) => {
                    batch.segments.truncate(mark);
                    let head = stored.slot;
                    self.resubmit.clear();
                    return Err(self.fail(QueueError::BadChain { head, reason }));
                }
            }
        }
        while count < max {
            let head = self.next_avail;
            // §3 "discover work": Acquire load of the first descriptor's flags; the driver wrote
            // the rest of the chain (and the buffers, and indirect tables) before it.
            let flags = rings.desc_flags(head.index, Ordering::Acquire);
            if !is_available(flags, head.wrap) {
                break;
            }
            let mark = batch.segments.len();
            let read = |n: u16, pos: RingPosition| {
                let mut desc = rings.descriptor(pos.index);
                if n == 0 {
                    desc.flags = flags;
                } else if !is_available(desc.flags, pos.wrap) {
                    // §2.4: AVAIL/USED must be right in every descriptor of the list; its flags
                    // were stored before the first's, so the Acquire on the first covers them.
                    return Err(ChainFault::NotAvailable { index: pos.index });
                }
                Ok(desc)
            };
            let popped = pop_chain(
                rings.memory(),
                &self.config,
                &mut translator,
                head,
                read,
                &mut batch.segments,
            )
            .and_then(|(chain, slots, walked)| {
                check_in_flight(
                    &self.id_descriptors,
                    self.outstanding + u32::from(self.added),
                    size,
                    chain.head,
                    slots,
                )?;
                Ok((chain, slots, walked))
            });
            let (chain, slots, walked) = match popped {
                Ok(popped) => popped,
                Err(ChainFault::IotlbMiss { iova, access }) => {
                    // Not consumed: the chain stays in the ring until the translation arrives.
                    batch.segments.truncate(mark);
                    self.miss = Some((iova, access));
                    return Ok(count);
                }
                Err(reason) => {
                    batch.segments.truncate(mark);
                    return Err(self.fail(QueueError::BadChain {
                        head: head.index,
                        reason,
                    }));
                }
            };
            if let Some(inflight) = self.inflight.as_mut() {
                // Spec order: the chain is in flight in the region before anything is done with
                // it. The driver does not touch available descriptors, so reading them again
                // gives what was just walked.
                let mut slot = None;
                for n in 0..slots {
                    let desc = rings.descriptor(head.advance(n, size).index);
                    let stored = PackedDesc {
                        addr: desc.addr,
                        len: desc.len,
                        id: desc.id,
                        flags: if n == 0 { flags } else { desc.flags },
                    };
                    match inflight.fetch(stored, n == 0, n + 1 == slots) {
                        Ok(last) => slot = last.or(slot),
                        Err(reason) => {
                            batch.segments.truncate(mark);
                            let err = QueueError::Broken(format!("inflight region: {reason}"));
                            return Err(self.fail(err));
                        }
                    }
                }
                // `fetch` returns the entry with the chain's last descriptor.
                self.inflight_slot[usize::from(chain.head)] = slot.unwrap_or(u16::MAX);
            }
            if let Some(log) = self.log.as_mut() {
                log.record(chain.head, &batch.segments[chain.mid..chain.segments.end]);
            }
            self.id_descriptors[usize::from(chain.head)] = slots;
            self.outstanding += u32::from(slots);
            self.next_avail = head.advance(slots, size);
            batch.chains.push(chain);
            count += 1;
            spent.walked += walked;
            if spent.exhausted(&batch.segments) {
                // The rest stays in the ring for the next call.
                break;
            }
        }
        Ok(count)
    }

    /// Write the used descriptor of buffer `id` at the next used slot without publishing it;
    /// `len` is the number of bytes written into its writable buffers. Buffers may complete in
    /// any order. Call [`PackedQueue::publish_used`] after one or many pushes.
    #[inline]
    pub fn push_used(&mut self, id: u16, len: u32) -> Result<(), QueueError> {
        let rings = ready(&self.broken, &self.rings)?;
        let slots = self
            .id_descriptors
            .get(usize::from(id))
            .copied()
            .filter(|&n| n != 0)
            .ok_or(QueueError::UnknownHead(id))?;
        if u32::from(self.added) + u32::from(slots) > u32::from(self.config.size) {
            // The unpublished batch would cover more than the ring (pop keeps the pushed and the
            // popped slots within it, so only a caller's mix-up gets here): publish first.
            return Err(QueueError::Full);
        }
        let at = self.next_used;
        // §2.4: id and len, then flags with AVAIL = USED = the used wrap counter; WRITE says
        // that len counts written bytes.
        let flags = used_bits(at.wrap) | if len > 0 { VIRTQ_DESC_F_WRITE } else { 0 };
        if let Some(log) = self.log.as_mut() {
            // The handler wrote the data before pushing, and the driver cannot see the buffer
            // back before this batch's first flags flip in publish_used.
            log.log_completion(id);
        }
        rings.set_used_body(at.index, id, len);
        if self.batch_head.is_none() {
            // Held back: publish_used stores it last, so the driver sees the batch at once.
            self.batch_head = Some((at.index, flags));
        } else {
            // §3 "publish result": Release, so id/len (and the data) are visible before flags.
            // The driver cannot look at this slot before the held-back first one anyway.
            rings.set_desc_flags(at.index, flags, Ordering::Release);
            if let Some(log) = self.log.as_ref() {
                log.log_used_slot(self.config.desc_ring, at.index);
            }
        }
        if self.inflight.is_some() {
            // Completed in the region by publish_used, right before the batch becomes visible.
            self.inflight_pushed
                .push((self.inflight_slot[usize::from(id)], slots));
        }
        self.id_descriptors[usize::from(id)] = 0;
        self.outstanding -= u32::from(slots);
        self.added += slots;
        self.next_used = at.advance(slots, self.config.size);
        Ok(())
    }

    /// Publish every used descriptor pushed since the last call and decide whether the driver
    /// must be notified ("call"). Returns `false` without touching memory if nothing was pushed.
    pub fn publish_used(&mut self) -> Result<bool, QueueError> {
        let result = self.publish_used_unchecked();
        self.checked(result)
    }

    #[inline]
    fn publish_used_unchecked(&mut self) -> Result<bool, QueueError> {
        let rings = ready(&self.broken, &self.rings)?;
        let Some((index, flags)) = self.batch_head.take() else {
            return Ok(false);
        };
        if let Some(inflight) = self.inflight.as_ref() {
            // Spec order: the region's used position moves before the ring's; a crash in
            // between is rolled back or committed by looking at this batch's first flags.
            self.inflight_commit.clear();
            for &(slot, slots) in &self.inflight_pushed {
                inflight.complete(slot, slots);
                self.inflight_commit.push(slot);
            }
            self.inflight_pushed.clear();
        }
        // §2.4 / §3 "publish result": the first used descriptor of the batch last, with Release,
        // so everything written before (data, the other used descriptors) is visible with it.
        rings.set_desc_flags(index, flags, Ordering::Release);
        // §3 "decide on call": full fence so the flags store cannot pass the load of the driver
        // event suppression structure (lost wakeup otherwise).
        fence(Ordering::SeqCst);
        if let Some(inflight) = self.inflight.as_ref() {
            // The batch is out: its chains stop being in flight.
            inflight.commit(&self.inflight_commit);
        }
        if let Some(log) = self.log.as_ref() {
            // The batch's first used descriptor is complete with its flags (the others were
            // logged as they were pushed).
            log.log_used_slot(self.config.desc_ring, index);
        }
        let (off_wrap, event_flags) = rings.driver_event(Ordering::Relaxed);
        let new = self.next_used.index;
        let old = new.wrapping_sub(self.added);
        self.added = 0;
        let notify = event_says_notify(
            off_wrap,
            event_flags,
            self.config.event_idx,
            new,
            old,
            self.next_used.wrap,
            self.config.size,
        );
        let notify = notify || !self.signalled_valid;
        self.signalled_valid = true;
        Ok(notify)
    }

    /// Ask the driver for kicks again before going to sleep. Returns `true` if a chain became
    /// available meanwhile: the caller must then process it instead of sleeping.
    pub fn enable_notifications(&mut self) -> Result<bool, QueueError> {
        let result = self.enable_notifications_unchecked();
        self.checked(result)
    }

    #[inline]
    fn enable_notifications_unchecked(&mut self) -> Result<bool, QueueError> {
        let rings = ready(&self.broken, &self.rings)?;
        if self.config.event_idx {
            // Kick when the next descriptor is made available.
            rings.set_device_event(
                self.next_avail.encode(),
                RING_EVENT_FLAGS_DESC,
                Ordering::Relaxed,
            );
        } else {
            rings.set_device_event(0, RING_EVENT_FLAGS_ENABLE, Ordering::Relaxed);
        }
        if let Some(log) = self.log.as_ref() {
            log.queue_log.used_ring_write(0, 4);
        }
        // §3 "go to sleep": full fence between the store above and the re-check, so that either
        // the driver sees our request and kicks, or we see its new descriptor.
        fence(Ordering::SeqCst);
        let flags = rings.desc_flags(self.next_avail.index, Ordering::Acquire);
        Ok(is_available(flags, self.next_avail.wrap) || !self.resubmit.is_empty())
    }

    /// Ask the driver not to kick while we are busy. A hint only: no fence needed (§3).
    pub fn disable_notifications(&mut self) -> Result<(), QueueError> {
        let rings = ready(&self.broken, &self.rings)?;
        rings.set_device_event(0, RING_EVENT_FLAGS_DISABLE, Ordering::Relaxed);
        if let Some(log) = self.log.as_ref() {
            log.queue_log.used_ring_write(0, 4);
        }
        Ok(())
    }
}

/// Can a chain with buffer id `id` taking `slots` ring slots go in flight, with `outstanding`
/// slots not yet seen used by the driver (popped, or pushed but not published)?
#[inline]
fn check_in_flight(
    id_descriptors: &[u16],
    outstanding: u32,
    size: u16,
    id: u16,
    slots: u16,
) -> Result<(), ChainFault> {
    if id >= size {
        return Err(ChainFault::BufferIdOutOfRange { id, size });
    }
    if id_descriptors[usize::from(id)] != 0 {
        return Err(ChainFault::BufferIdInFlight { id });
    }
    // A driver only reuses slots it has seen used: more slots in flight than the ring has
    // means it made in-flight descriptors available again. Pushed but unpublished ones count:
    // the driver has not seen them used, and with them the unpublished batch (`added`) stays
    // within the ring.
    if outstanding + u32::from(slots) > u32::from(size) {
        return Err(ChainFault::DescriptorsReused);
    }
    Ok(())
}

/// Walk the chain starting at `head`, appending its segments; `read(n, position)` gives its
/// `n`-th descriptor (the ring's, checked available, or a copy kept in the inflight region).
/// Returns the chain (its `head` is the buffer id), the number of ring slots it occupies and
/// the number of descriptors it walked (ring slots and indirect table entries).
#[inline]
fn pop_chain(
    mem: &GuestMemory,
    config: &PackedConfig,
    translator: &mut Translator<'_>,
    head: RingPosition,
    mut read: impl FnMut(u16, RingPosition) -> Result<PackedDescriptor, ChainFault>,
    segments: &mut Vec<Segment>,
) -> Result<(Chain, u16, u32), ChainFault> {
    let size = config.size;
    let start = segments.len();
    let mut walk = Walk::new(start);
    let mut pos = head;
    let mut slots: u16 = 0;
    let mut table_pointer = 0;
    let id = loop {
        let desc = read(slots, pos)?;
        slots += 1;
        let flags = desc.flags;
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if !config.indirect {
                return Err(ChainFault::IndirectNotNegotiated);
            }
            if flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err(ChainFault::IndirectWithNext);
            }
            if slots > 1 {
                return Err(ChainFault::IndirectInList);
            }
            // WRITE on the descriptor pointing at the table is reserved and ignored (§2.4).
            walk = walk_indirect(mem, translator, desc.addr, desc.len, walk, segments)?;
            // The slot pointing at the table is read but is no buffer.
            table_pointer = 1;
            break desc.id;
        }
        let buffer = Descriptor::new(desc.addr, desc.len, flags & VIRTQ_DESC_F_WRITE, 0);
        add_buffer(translator, &buffer, &mut walk, segments)?;
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            // §2.4: the buffer id is in the last descriptor of the list.
            break desc.id;
        }
        if slots >= size {
            return Err(ChainFault::TooLong {
                limit: u32::from(size),
            });
        }
        pos = pos.advance(1, size);
    };
    let end = segments.len();
    let chain = Chain {
        head: id,
        descriptors: walk.descriptors,
        segments: start..end,
        mid: walk.mid.unwrap_or(end),
        readable_len: walk.readable,
        writable_len: walk.writable,
    };
    Ok((chain, slots, u32::from(walk.descriptors) + table_pointer))
}

/// Walk a packed indirect table: `len / 16` entries read in order. Only WRITE is valid in an
/// entry; the other flags (NEXT, INDIRECT) and the id are reserved and ignored (§2.4), so a
/// table never leads to another table.
#[inline(never)]
fn walk_indirect(
    mem: &GuestMemory,
    translator: &mut Translator<'_>,
    addr: u64,
    len: u32,
    mut walk: Walk,
    segments: &mut Vec<Segment>,
) -> Result<Walk, ChainFault> {
    let entries = len / 16;
    if len == 0 || len % 16 != 0 || entries > MAX_INDIRECT_DESCRIPTORS {
        return Err(ChainFault::IndirectLength { len });
    }
    let table = Table::map(mem, addr, len)?;
    for index in 0..entries {
        let entry = PackedDescriptor::from_split_layout(table.read(index)?);
        let buffer = Descriptor::new(entry.addr, entry.len, entry.flags & VIRTQ_DESC_F_WRITE, 0);
        add_buffer(translator, &buffer, &mut walk, segments)?;
    }
    Ok(walk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::test_util::shared_memory;
    use crate::queue::PackedQueueDriver;

    const DESC: u64 = 0x1000;
    const DRIVER_EVENT: u64 = 0x2000;
    const DEVICE_EVENT: u64 = 0x3000;

    fn config(size: u16, event_idx: bool) -> PackedConfig {
        PackedConfig {
            size,
            desc_ring: DESC,
            driver_event: DRIVER_EVENT,
            device_event: DEVICE_EVENT,
            event_idx,
            indirect: true,
        }
    }

    fn pair_at(
        size: u16,
        event_idx: bool,
        start: RingPosition,
    ) -> (PackedQueueDriver, PackedQueue) {
        pair_with(config(size, event_idx), start)
    }

    fn pair_with(config: PackedConfig, start: RingPosition) -> (PackedQueueDriver, PackedQueue) {
        let (drv_mem, dev_mem) = shared_memory(&[(0, 0x10000), (0x10000, 0x10000)]);
        let driver = PackedQueueDriver::with_start(drv_mem, config, start).unwrap();
        let mut device = PackedQueue::new(config).unwrap();
        device
            .set_state(PackedState {
                next_avail: start,
                next_used: start,
            })
            .unwrap();
        device.attach(dev_mem).unwrap();
        (driver, device)
    }

    fn pair(size: u16, event_idx: bool) -> (PackedQueueDriver, PackedQueue) {
        pair_at(size, event_idx, RingPosition::START)
    }

    fn read_segment(seg: &Segment) -> Vec<u8> {
        let mut out = vec![0; seg.len as usize];
        // SAFETY: the queue that produced `seg` is alive in the test.
        unsafe { seg.read_to(0, &mut out) };
        out
    }

    #[test]
    fn config_validation_allows_any_size_up_to_32768() {
        for size in [1u16, 3, 100, 255, 32768] {
            // The event areas right after the ring (they must not overlap it).
            let end = DESC + 16 * u64::from(size);
            let cfg = PackedConfig {
                driver_event: end,
                device_event: end + 4,
                ..config(size, false)
            };
            assert!(cfg.validate().is_ok(), "size {size}");
        }
        for size in [0u16, 32769, 65535] {
            assert!(config(size, false).validate().is_err(), "size {size}");
        }
        for bad in [
            PackedConfig {
                desc_ring: 0x1008,
                ..config(8, false)
            },
            PackedConfig {
                driver_event: 0x2002,
                ..config(8, false)
            },
            PackedConfig {
                device_event: 0x3002,
                ..config(8, false)
            },
        ] {
            assert!(matches!(bad.validate(), Err(QueueError::InvalidConfig(_))));
        }
        let split = QueueConfig {
            size: 8,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            event_idx: true,
            indirect: false,
        };
        assert_eq!(
            PackedConfig::from_split_names(&split),
            PackedConfig {
                size: 8,
                desc_ring: 0x1000,
                driver_event: 0x2000,
                device_event: 0x3000,
                event_idx: true,
                indirect: false,
            }
        );
    }

    #[test]
    fn vring_base_encoding_matches_the_vhost_user_layout() {
        assert_eq!(PackedState::START.to_vring_base(), 0x8000_8000);
        let state = PackedState {
            next_avail: RingPosition {
                index: 5,
                wrap: false,
            },
            next_used: RingPosition {
                index: 0x7ffe,
                wrap: true,
            },
        };
        assert_eq!(state.to_vring_base(), 0xfffe_0005);
        assert_eq!(PackedState::from_vring_base(0xfffe_0005), state);
        let mut q = PackedQueue::new(config(8, false)).unwrap();
        assert_eq!(q.state(), PackedState::START);
        assert!(matches!(
            q.set_state(PackedState::from_vring_base(0x8000_8008)),
            Err(QueueError::InvalidConfig(_))
        ));
        q.set_state(PackedState::from_vring_base(0x0003_8007))
            .unwrap();
        assert_eq!(q.state().to_vring_base(), 0x0003_8007);
    }

    #[test]
    fn ring_position_advances_and_wraps_for_any_size() {
        let p = RingPosition {
            index: 3,
            wrap: true,
        };
        assert_eq!(
            p.advance(1, 5),
            RingPosition {
                index: 4,
                wrap: true
            }
        );
        assert_eq!(
            p.advance(2, 5),
            RingPosition {
                index: 0,
                wrap: false
            }
        );
        assert_eq!(
            p.advance(5, 5),
            RingPosition {
                index: 3,
                wrap: false
            }
        );
        assert_eq!(RingPosition::decode(p.encode()), p);
    }

    #[test]
    fn give_back_rewinds_over_the_chains_slots() {
        let (mut drv, mut dev) = pair(4, false);
        let a = drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        let b = drv.add_chain(&[(0x8000, 1), (0x8100, 1)], &[]).unwrap();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(dev.pop_batch(&mut batch, 8).unwrap(), 2);
        assert_eq!(
            dev.next_avail(),
            RingPosition {
                index: 3,
                wrap: true
            }
        );
        let chains = batch.chains().to_vec();
        assert_eq!(
            dev.give_back(&[chains[1].clone(), chains[1].clone()]),
            Err(QueueError::UnknownHead(b))
        );
        dev.give_back(&chains[1..]).unwrap();
        assert_eq!(
            dev.next_avail(),
            RingPosition {
                index: 1,
                wrap: true
            }
        );
        assert_eq!(dev.give_back(&chains[1..]), Err(QueueError::UnknownHead(b)));
        dev.give_back(&chains[..1]).unwrap();
        assert_eq!(dev.next_avail(), RingPosition::START);
        batch.clear();
        assert_eq!(dev.pop_batch(&mut batch, 8).unwrap(), 2, "popped again");
        assert_eq!(batch.iter().map(|c| c.head()).collect::<Vec<_>>(), [a, b]);
        let p = RingPosition {
            index: 1,
            wrap: true,
        };
        assert_eq!(
            p.retreat(2, 5),
            RingPosition {
                index: 4,
                wrap: false
            }
        );
        assert_eq!(p.retreat(2, 5).advance(2, 5), p);
        assert_eq!(
            p.retreat(5, 5),
            RingPosition {
                index: 1,
                wrap: false
            }
        );
    }

    #[test]
    fn detached_queue_is_not_ready() {
        let mut q = PackedQueue::new(config(8, false)).unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(q.pop_batch(&mut batch, 4), Err(QueueError::NotReady));
        assert_eq!(q.push_used(0, 0), Err(QueueError::NotReady));
        assert_eq!(q.publish_used(), Err(QueueError::NotReady));
        assert_eq!(q.enable_notifications(), Err(QueueError::NotReady));
        assert_eq!(q.pending(), Err(QueueError::NotReady));
    }

    #[test]
    fn chain_round_trip_with_data_and_used_len() {
        let (mut drv, mut dev) = pair(8, false);
        drv.memory().write(0x8000, b"hello").unwrap();
        let id = drv
            .add_chain(&[(0x8000, 5)], &[(0x9000, 16), (0x9100, 16)])
            .unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(dev.pending().unwrap(), 0, "not published yet");
        assert_eq!(dev.pop_batch(&mut batch, 4).unwrap(), 0);
        drv.publish().unwrap();
        assert_eq!(dev.pending().unwrap(), 1);
        assert_eq!(dev.pop_batch(&mut batch, 4).unwrap(), 1);
        let c = batch.get(0).unwrap();
        assert_eq!(c.head(), id);
        assert_eq!(c.descriptors(), 3);
        assert_eq!((c.readable_len(), c.writable_len()), (5, 32));
        assert_eq!(read_segment(&c.readable()[0]), b"hello");
        // SAFETY: the device's snapshot is alive.
        unsafe { c.writable()[1].write_from(0, b"world") };
        assert_eq!(
            dev.next_avail(),
            RingPosition {
                index: 3,
                wrap: true
            }
        );
        dev.push_used(id, 21).unwrap();
        assert_eq!(drv.reap_used().unwrap(), None, "held back until publish");
        assert!(dev.publish_used().unwrap());
        assert_eq!(drv.reap_used().unwrap(), Some((id, 21)));
        let mut got = [0u8; 5];
        drv.memory().read(0x9100, &mut got).unwrap();
        assert_eq!(&got, b"world");
        assert_eq!(drv.free_descriptors(), 8);
        assert_eq!(
            dev.next_used(),
            RingPosition {
                index: 3,
                wrap: true
            }
        );
    }

    #[test]
    fn out_of_order_completion_of_multi_slot_chains() {
        let (mut drv, mut dev) = pair(7, false);
        let a = drv.add_chain(&[(0x8000, 1), (0x8100, 1)], &[]).unwrap();
        let b = drv.add_chain(&[(0x8200, 1)], &[(0x8300, 4)]).unwrap();
        let c = drv
            .add_indirect(0x4000, &[(0x8400, 1)], &[(0x8500, 8)])
            .unwrap();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(dev.pop_batch(&mut batch, 8).unwrap(), 3);
        assert_eq!(
            batch.iter().map(|c| c.head()).collect::<Vec<_>>(),
            [a, b, c]
        );
        // Complete c, a, b: slots are taken in completion order, each skipping its own count.
        dev.push_used(c, 8).unwrap();
        dev.push_used(a, 0).unwrap();
        assert_eq!(dev.push_used(a, 0), Err(QueueError::UnknownHead(a)));
        dev.push_used(b, 4).unwrap();
        dev.publish_used().unwrap();
        assert_eq!(drv.reap_used().unwrap(), Some((c, 8)));
        assert_eq!(drv.reap_used().unwrap(), Some((a, 0)));
        assert_eq!(drv.reap_used().unwrap(), Some((b, 4)));
        assert_eq!(drv.reap_used().unwrap(), None);
        assert_eq!(
            dev.next_used(),
            RingPosition {
                index: 5,
                wrap: true
            }
        );
        assert_eq!(drv.next_used(), dev.next_used());
    }

    #[test]
    fn wraps_many_times_with_a_size_that_is_not_a_power_of_two() {
        for start in [
            RingPosition::START,
            RingPosition {
                index: 3,
                wrap: false,
            },
        ] {
            let (mut drv, mut dev) = pair_at(5, true, start);
            let mut batch = ChainBatch::new();
            for round in 0..40u64 {
                let shape = (round % 3) as usize + 1;
                let readable: Vec<(u64, u32)> =
                    (0..shape).map(|i| (0x8000 + 0x100 * i as u64, 4)).collect();
                let id = drv.add_chain(&readable, &[(0x9000, 2)]).unwrap();
                drv.publish().unwrap();
                batch.clear();
                assert_eq!(dev.pop_batch(&mut batch, 4).unwrap(), 1, "round {round}");
                assert_eq!(batch.get(0).unwrap().head(), id);
                assert_eq!(batch.get(0).unwrap().descriptors() as usize, shape + 1);
                dev.push_used(id, 2).unwrap();
                dev.publish_used().unwrap();
                assert_eq!(drv.reap_used().unwrap(), Some((id, 2)));
                assert_eq!(drv.next_avail(), dev.next_avail());
                assert_eq!(drv.next_used(), dev.next_used());
            }
        }
    }

    #[test]
    fn indirect_table_entries_only_honour_write() {
        let (mut drv, mut dev) = pair(8, false);
        let id = drv
            .add_indirect(0x4000, &[(0x8000, 16)], &[(0x9000, 32)])
            .unwrap();
        // Set NEXT and INDIRECT (reserved in a table entry) and a junk id on the entries, and
        // WRITE (reserved) on the ring descriptor: all must be ignored.
        for (k, (addr, len, write)) in [(0x8000u64, 16u32, 0u16), (0x9000, 32, VIRTQ_DESC_F_WRITE)]
            .into_iter()
            .enumerate()
        {
            let entry = PackedDescriptor::new(
                addr,
                len,
                0xdead,
                write | VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT,
            );
            drv.memory()
                .write(0x4000 + 16 * k as u64, &entry.to_le_bytes())
                .unwrap();
        }
        let ring = drv.memory().load_u16(DESC + 14, Ordering::Relaxed).unwrap();
        assert_eq!(ring, 0, "first flags held back until publish");
        drv.publish().unwrap();
        let ring = drv.memory().load_u16(DESC + 14, Ordering::Relaxed).unwrap();
        drv.memory()
            .store_u16(DESC + 14, ring | VIRTQ_DESC_F_WRITE, Ordering::Release)
            .unwrap();
        let mut batch = ChainBatch::new();
        dev.pop_batch(&mut batch, 4).unwrap();
        let c = batch.get(0).unwrap();
        assert_eq!(c.head(), id);
        assert_eq!(c.descriptors(), 2);
        assert_eq!((c.readable_len(), c.writable_len()), (16, 32));
        assert_eq!(c.writable()[0].gpa, 0x9000);
        assert_eq!(dev.next_avail().index, 1, "one ring slot");
    }

    #[test]
    fn indirect_needs_the_feature() {
        let (drv_mem, dev_mem) = shared_memory(&[(0, 0x10000)]);
        let cfg = PackedConfig {
            indirect: false,
            ..config(8, false)
        };
        let mut drv = PackedQueueDriver::new(drv_mem.clone(), cfg).unwrap();
        assert!(drv.add_indirect(0x4000, &[(0x8000, 1)], &[]).is_err());
        drv_mem
            .write(
                0x4000,
                &PackedDescriptor::new(0x8000, 1, 0, 0).to_le_bytes(),
            )
            .unwrap();
        let ring = PackedDescriptor::new(0x4000, 16, 0, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_AVAIL);
        drv_mem.write(DESC, &ring.to_le_bytes()).unwrap();
        let mut dev = PackedQueue::new(cfg).unwrap();
        dev.attach(dev_mem).unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(
            dev.pop_batch(&mut batch, 4),
            Err(QueueError::BadChain {
                head: 0,
                reason: ChainFault::IndirectNotNegotiated
            })
        );
        assert!(dev.is_broken());
    }

    #[test]
    fn batch_is_published_at_once_and_respects_max() {
        let (mut drv, mut dev) = pair(16, false);
        let ids: Vec<u16> = (0..10u64)
            .map(|i| drv.add_chain(&[(0x8000 + 0x100 * i, 16)], &[]).unwrap())
            .collect();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(dev.pop_batch(&mut batch, 4).unwrap(), 4);
        assert_eq!(dev.pop_batch(&mut batch, 100).unwrap(), 6);
        assert_eq!(dev.pop_batch(&mut batch, 0).unwrap(), 0);
        assert_eq!(batch.iter().map(|c| c.head()).collect::<Vec<_>>(), ids);
        for c in batch.iter() {
            dev.push_used(c.head(), 0).unwrap();
        }
        // Every used descriptor but the first is already marked; the driver polls the first.
        assert_eq!(drv.reap_used().unwrap(), None);
        let second = drv
            .memory()
            .load_u16(DESC + 16 + 14, Ordering::Acquire)
            .unwrap();
        assert_eq!(second, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
        dev.publish_used().unwrap();
        let mut reaped = Vec::new();
        while let Some((id, _)) = drv.reap_used().unwrap() {
            reaped.push(id);
        }
        assert_eq!(reaped, ids);
    }

    #[test]
    fn call_suppression_without_event_idx() {
        let (mut drv, mut dev) = pair(4, false);
        let mut batch = ChainBatch::new();
        let mut round = |drv: &mut PackedQueueDriver, dev: &mut PackedQueue| {
            batch.clear();
            drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
            drv.publish().unwrap();
            dev.pop_batch(&mut batch, 8).unwrap();
            dev.push_used(batch.get(0).unwrap().head(), 0).unwrap();
            let notify = dev.publish_used().unwrap();
            drv.reap_used().unwrap().unwrap();
            notify
        };
        drv.disable_call_notifications().unwrap();
        assert!(round(&mut drv, &mut dev), "first completion after attach");
        assert!(!round(&mut drv, &mut dev), "DISABLE");
        assert!(!drv.enable_call_notifications().unwrap());
        assert!(round(&mut drv, &mut dev), "ENABLE");
        assert!(!dev.publish_used().unwrap(), "nothing pushed: no notify");
        // DESC without EVENT_IDX is not valid: treated as ENABLE.
        drv.memory()
            .store_u16(DRIVER_EVENT + 2, RING_EVENT_FLAGS_DESC, Ordering::Release)
            .unwrap();
        drv.memory()
            .store_u16(DRIVER_EVENT, 0x7fff, Ordering::Release)
            .unwrap();
        assert!(round(&mut drv, &mut dev));
    }

    #[test]
    fn call_suppression_with_event_idx_uses_offset_and_wrap() {
        let (mut drv, mut dev) = pair(4, true);
        let mut batch = ChainBatch::new();
        let mut complete = |drv: &mut PackedQueueDriver, dev: &mut PackedQueue, n: usize| {
            batch.clear();
            for i in 0..n {
                drv.add_chain(&[(0x8000 + 0x100 * i as u64, 1)], &[])
                    .unwrap();
            }
            drv.publish().unwrap();
            dev.pop_batch(&mut batch, 8).unwrap();
            for c in batch.iter() {
                dev.push_used(c.head(), 0).unwrap();
            }
            let notify = dev.publish_used().unwrap();
            while drv.reap_used().unwrap().is_some() {}
            notify
        };
        let set_event = |drv: &PackedQueueDriver, pos: RingPosition| {
            drv.memory()
                .store_u16(DRIVER_EVENT, pos.encode(), Ordering::Relaxed)
                .unwrap();
            drv.memory()
                .store_u16(DRIVER_EVENT + 2, RING_EVENT_FLAGS_DESC, Ordering::Release)
                .unwrap();
        };
        let at = |index, wrap| RingPosition { index, wrap };
        set_event(&drv, at(3, true));
        assert!(
            complete(&mut drv, &mut dev, 1),
            "first decision always notifies"
        );
        // used 1 -> 3 (slots 1, 2): event at 3 is not in [1, 3).
        assert!(!complete(&mut drv, &mut dev, 2));
        // used 3 -> 1 of the next lap (slots 3, 0): event (3, wrap 1) is.
        assert!(complete(&mut drv, &mut dev, 2));
        assert_eq!(dev.next_used(), at(1, false));
        // Event (0, wrap 0) was passed in the last batch; 1 -> 2 does not reach it again.
        set_event(&drv, at(0, false));
        assert!(!complete(&mut drv, &mut dev, 1));
        // Event (2, wrap 0) lies in [2, 3).
        set_event(&drv, at(2, false));
        assert!(complete(&mut drv, &mut dev, 1));
        // Event in the previous lap's wrap (3, wrap 1) is behind: no notify for 3 -> 0.
        set_event(&drv, at(3, true));
        assert!(!complete(&mut drv, &mut dev, 1));
        // The driver's own re-arm: DESC at its next_used.
        assert!(!drv.enable_call_notifications().unwrap());
        assert!(complete(&mut drv, &mut dev, 1));
    }

    #[test]
    fn kick_suppression_both_modes() {
        for event_idx in [false, true] {
            let (mut drv, mut dev) = pair(4, event_idx);
            let mut batch = ChainBatch::new();
            drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
            assert!(drv.publish().unwrap(), "device event starts as ENABLE");
            dev.disable_notifications().unwrap();
            drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
            assert!(!drv.publish().unwrap(), "DISABLE: no kick");
            assert!(dev.enable_notifications().unwrap(), "work pending");
            assert_eq!(dev.pop_batch(&mut batch, 8).unwrap(), 2);
            assert!(!dev.enable_notifications().unwrap());
            drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
            assert!(drv.publish().unwrap(), "re-enabled: kick");
            if event_idx {
                let (off_wrap, flags) = dev.rings.as_ref().unwrap().device_event(Ordering::Relaxed);
                assert_eq!((off_wrap, flags), (0x8002, RING_EVENT_FLAGS_DESC));
                // DESC at slot 2 was just made available; slot 3 does not reach it again.
                drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
                assert!(!drv.publish().unwrap(), "past the event");
            }
        }
    }

    #[test]
    fn reattach_drops_the_unpublished_batch_and_keeps_in_flight_chains() {
        let (mut drv, mut dev) = pair(4, false);
        let a = drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        let b = drv.add_chain(&[(0x8100, 1)], &[]).unwrap();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        dev.pop_batch(&mut batch, 8).unwrap();
        dev.push_used(a, 0).unwrap();
        dev.publish_used().unwrap();
        assert_eq!(drv.reap_used().unwrap(), Some((a, 0)));
        dev.push_used(b, 0).unwrap();
        let mem = dev.memory().unwrap().clone();
        dev.attach(mem).unwrap();
        assert_eq!(
            dev.next_used(),
            RingPosition {
                index: 1,
                wrap: true
            }
        );
        assert_eq!(
            dev.push_used(b, 0),
            Err(QueueError::UnknownHead(b)),
            "dropped"
        );
        assert!(!dev.publish_used().unwrap());
        dev.detach();
        assert_eq!(dev.pending(), Err(QueueError::NotReady));
    }

    #[test]
    fn broken_queue_stays_broken() {
        let (mut drv, mut dev) = pair(4, false);
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.publish().unwrap();
        // Point the buffer outside guest memory.
        drv.memory()
            .store_u64(DESC, 0x10_0000_0000, Ordering::Relaxed)
            .unwrap();
        let mut batch = ChainBatch::new();
        assert!(matches!(
            dev.pop_batch(&mut batch, 8),
            Err(QueueError::BadChain {
                head: 0,
                reason: ChainFault::BufferOutOfRange { .. }
            })
        ));
        let reason = dev.broken_reason().unwrap().to_owned();
        assert_eq!(
            dev.pop_batch(&mut batch, 8),
            Err(QueueError::Broken(reason.clone()))
        );
        assert_eq!(dev.push_used(0, 0), Err(QueueError::Broken(reason.clone())));
        assert_eq!(dev.publish_used(), Err(QueueError::Broken(reason.clone())));
        assert_eq!(dev.enable_notifications(), Err(QueueError::Broken(reason)));
    }

    fn memfd_log(size: u64) -> std::sync::Arc<crate::dirty_log::DirtyLog> {
        let fd = crate::memory::create_memfd("log", size).unwrap();
        std::sync::Arc::new(crate::dirty_log::DirtyLog::map(fd, size, 0).unwrap())
    }

    fn log_at(log: &std::sync::Arc<crate::dirty_log::DirtyLog>, used: Option<u64>) -> QueueLog {
        QueueLog {
            log: log.clone(),
            used_ring: used,
        }
    }

    /// Pop `count` published chains, write `data` at the start of each one's writable part
    /// and return their ids (pushed and published by the caller).
    fn pop_and_write(dev: &mut PackedQueue, count: usize, data: &[u8]) -> Vec<u16> {
        let mut batch = ChainBatch::new();
        assert_eq!(dev.pop_batch(&mut batch, count).unwrap(), count);
        (0..count)
            .map(|i| {
                let c = batch.get(i).unwrap();
                // SAFETY: the device queue is alive.
                unsafe { c.writable()[0].write_from(0, data) };
                c.head()
            })
            .collect()
    }

    fn complete_one(dev: &mut PackedQueue, data: &[u8], used_len: u32) {
        let id = pop_and_write(dev, 1, data)[0];
        dev.push_used(id, used_len).unwrap();
        dev.publish_used().unwrap();
    }

    #[test]
    fn logging_marks_writable_buffers_used_descriptors_and_the_device_event_area() {
        let (mut drv, mut dev) = pair(8, false);
        let log = memfd_log(16); // 128 pages: guest addresses below 0x80000
        drv.add_chain(&[(0x8000, 16)], &[(0x9000, 64)]).unwrap();
        drv.publish().unwrap();
        complete_one(&mut dev, b"before", 6);
        dev.disable_notifications().unwrap();
        assert!(log.dirty_pages().is_empty(), "no log set yet");

        // The device event area is logged 2 bytes below a page boundary: its 4 bytes straddle it.
        dev.set_log(Some(log_at(&log, Some(0x7_0000 - 2))));
        // Writable: one buffer across the region boundary at 0x10000, one byte on page 0x12000.
        drv.add_chain(&[(0xA000, 16)], &[(0xF800, 0x1000), (0x12000, 1)])
            .unwrap();
        drv.publish().unwrap();
        // A used length that leaves the last byte out (as blk does after a failed read): the
        // whole writable part is still logged.
        complete_one(&mut dev, b"data", 4);
        assert_eq!(
            log.dirty_pages(),
            vec![DESC, 0xF000, 0x1_0000, 0x1_2000],
            "the used descriptor by its guest address, not the readable page 0xA000"
        );
        assert!(!dev.enable_notifications().unwrap());
        assert_eq!(
            log.dirty_pages(),
            vec![DESC, 0xF000, 0x1_0000, 0x1_2000, 0x6_F000, 0x7_0000],
            "the event area at the log address, not at its real address {DEVICE_EVENT:#x}"
        );
        assert_eq!(log.faults(), 0);

        dev.set_log(None);
        assert!(dev.log().is_none());
        drv.add_chain(&[], &[(0x1_4000, 64)]).unwrap();
        drv.publish().unwrap();
        complete_one(&mut dev, b"after", 5);
        dev.disable_notifications().unwrap();
        assert_eq!(
            log.dirty_pages().len(),
            6,
            "nothing logged after set_log(None)"
        );
    }

    #[test]
    fn event_area_unlogged_without_a_used_ring_log_address_and_indirect_buffers_logged() {
        let (mut drv, mut dev) = pair(8, false);
        let log = memfd_log(16);
        dev.set_log(Some(log_at(&log, None)));
        // The table's readable entry and the table itself (0x5000) are only read.
        drv.add_indirect(0x5000, &[(0x6000, 8)], &[(0x2_0000 - 1, 1)])
            .unwrap();
        drv.publish().unwrap();
        complete_one(&mut dev, b"x", 1);
        dev.disable_notifications().unwrap();
        assert!(!dev.enable_notifications().unwrap());
        assert_eq!(log.dirty_pages(), vec![DESC, 0x1_F000]);
        assert_eq!(log.faults(), 0);
    }

    #[test]
    fn each_used_descriptor_marks_the_page_of_its_own_slot() {
        // 512 descriptors at 0x4000: slots 0..=255 on page 0x4000, 256..=511 on page 0x5000.
        let ring = PackedConfig {
            desc_ring: 0x4000,
            ..config(512, false)
        };
        let start = RingPosition {
            index: 510,
            wrap: true,
        };
        let (mut drv, mut dev) = pair_with(ring, start);
        let log = memfd_log(16);
        dev.set_log(Some(log_at(&log, None)));
        // Three descriptors in slots 510, 511 and 0: one used descriptor, in slot 510.
        let a = drv
            .add_chain(&[(0x8000, 1), (0x8100, 1)], &[(0x9000, 1)])
            .unwrap();
        drv.publish().unwrap();
        let ids = pop_and_write(&mut dev, 1, b"a");
        assert_eq!(ids, vec![a]);
        dev.push_used(a, 1).unwrap();
        dev.publish_used().unwrap();
        assert_eq!(log.dirty_pages(), vec![0x5000, 0x9000]);
        // The next chain is in slot 1 (page 0x4000), its used descriptor too.
        drv.add_chain(&[], &[(0xB000, 1)]).unwrap();
        drv.publish().unwrap();
        complete_one(&mut dev, b"b", 1);
        assert_eq!(log.dirty_pages(), vec![0x4000, 0x5000, 0x9000, 0xB000]);
        assert_eq!(log.faults(), 0);
    }

    #[test]
    fn buffers_are_those_popped_even_when_used_descriptors_overwrote_the_chain() {
        let (mut drv, mut dev) = pair(8, false);
        let log = memfd_log(16);
        dev.set_log(Some(log_at(&log, None)));
        // a: slots 0 and 1, its first buffer spans pages 0x9000 and 0xA000; b: slot 2.
        let a = drv
            .add_chain(&[], &[(0x9000, 0x2000), (0xC000, 1)])
            .unwrap();
        let b = drv.add_chain(&[], &[(0xE000, 1)]).unwrap();
        drv.publish().unwrap();
        assert_eq!(pop_and_write(&mut dev, 2, b"z"), vec![a, b]);
        // b completes first: its used descriptor goes to slot 0, over a's first descriptor.
        dev.push_used(b, 1).unwrap();
        dev.publish_used().unwrap();
        let overwritten = dev.rings.as_ref().unwrap().descriptor(0);
        assert_eq!((overwritten.id, overwritten.len), (b, 1));
        dev.push_used(a, 1).unwrap();
        dev.publish_used().unwrap();
        assert_eq!(
            log.dirty_pages(),
            vec![DESC, 0x9000, 0xA000, 0xC000, 0xE000],
            "all of a's buffers, as popped"
        );
        assert_eq!(log.faults(), 0);
        assert_eq!(drv.reap_used().unwrap(), Some((b, 1)));
        assert_eq!(drv.reap_used().unwrap(), Some((a, 1)));
    }

    #[test]
    fn unloggable_writes_are_log_faults_not_a_broken_queue() {
        let (mut drv, mut dev) = pair(8, false);
        let log = memfd_log(2); // 16 pages: guest addresses below 0x10000
                                // Popped before the log was set: its buffers are unknown when it completes.
        let early = drv.add_chain(&[], &[(0x9000, 8)]).unwrap();
        drv.publish().unwrap();
        assert_eq!(pop_and_write(&mut dev, 1, b"e"), vec![early]);
        dev.set_log(Some(log_at(&log, Some(0x1_0000))));
        dev.push_used(early, 8).unwrap();
        assert!(dev.publish_used().unwrap());
        assert_eq!(log.faults(), 1);
        assert_eq!(
            log.dirty_pages(),
            vec![DESC],
            "its used descriptor is still logged"
        );
        // A buffer with pages beyond the log: the pages inside are marked, the rest counted.
        drv.add_chain(&[], &[(0xF000, 0x2000)]).unwrap();
        drv.publish().unwrap();
        complete_one(&mut dev, b"f", 1);
        // The event area's log address has no bit either.
        dev.disable_notifications().unwrap();
        assert_eq!(log.faults(), 3);
        assert_eq!(log.dirty_pages(), vec![DESC, 0xF000]);
        assert!(!dev.is_broken());
        assert_eq!(drv.reap_used().unwrap(), Some((early, 8)));
    }

    #[test]
    fn resubmitted_chains_are_logged_too() {
        let region = packed_region(4);
        let (mut drv, mut dev) = pair(4, false);
        dev.set_inflight(region.packed_queue(0, 4).unwrap())
            .unwrap();
        let id = drv.add_chain(&[], &[(0x9000, 8)]).unwrap();
        drv.publish().unwrap();
        assert_eq!(pop_and_write(&mut dev, 1, b"r"), vec![id]);
        // The back-end dies with the chain in flight; the next one logs from the start.
        let memory = dev.memory().unwrap().clone();
        let (mut dev, recovery) = restart(&memory, &region, 4, PackedState::START);
        assert_eq!(ids(&recovery), vec![id]);
        let log = memfd_log(16);
        dev.set_log(Some(log_at(&log, None)));
        complete_one(&mut dev, b"R", 8);
        assert_eq!(log.dirty_pages(), vec![DESC, 0x9000]);
        assert_eq!(log.faults(), 0);
    }

    fn packed_region(size: u16) -> std::sync::Arc<crate::inflight::InflightRegion> {
        use crate::inflight::{InflightRegion, RingLayout};
        std::sync::Arc::new(InflightRegion::allocate(RingLayout::Packed, 1, size).unwrap())
    }

    /// A back-end started over the same guest memory and region, given `base` by the front-end.
    fn restart(
        memory: &GuestMemory,
        region: &std::sync::Arc<crate::inflight::InflightRegion>,
        size: u16,
        base: PackedState,
    ) -> (PackedQueue, PackedRecovery) {
        let mut dev = PackedQueue::new(config(size, false)).unwrap();
        dev.attach(memory.clone()).unwrap();
        dev.set_state(base).unwrap();
        let recovery = dev
            .set_inflight(region.packed_queue(0, size).unwrap())
            .unwrap();
        (dev, recovery)
    }

    fn ids(recovery: &PackedRecovery) -> Vec<u16> {
        recovery
            .resubmit
            .iter()
            .map(|c| c.descriptors.last().unwrap().id)
            .collect()
    }

    fn pop_ids(dev: &mut PackedQueue, batch: &mut ChainBatch, max: usize) -> Vec<u16> {
        batch.clear();
        dev.pop_batch(batch, max).unwrap();
        batch.iter().map(|c| c.head()).collect()
    }

    #[test]
    fn restarted_queue_resubmits_exactly_what_was_in_flight_then_new_chains() {
        let region = packed_region(7);
        let (mut drv, mut dev) = pair(7, false);
        let memory = dev.memory().unwrap().clone();
        let fresh = dev
            .set_inflight(region.packed_queue(0, 7).unwrap())
            .unwrap();
        assert!(!fresh.restored && fresh.resubmit.is_empty());
        let a = drv.add_chain(&[(0x8000, 1), (0x8100, 1)], &[]).unwrap();
        let b = drv.add_chain(&[(0x8200, 1)], &[(0x8300, 4)]).unwrap();
        let c = drv
            .add_indirect(0x4000, &[(0x8400, 1)], &[(0x8500, 8)])
            .unwrap();
        let d = drv.add_chain(&[(0x8600, 2)], &[]).unwrap();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(pop_ids(&mut dev, &mut batch, 8), [a, b, c, d]);
        // c completes first: its used descriptor overwrites a's first ring slot. Then the
        // back-end dies with a, b and d in flight.
        dev.push_used(c, 8).unwrap();
        dev.publish_used().unwrap();
        drop(dev);
        assert_eq!(drv.reap_used().unwrap(), Some((c, 8)));
        let late = drv.add_chain(&[(0x8700, 3)], &[]).unwrap();
        drv.publish().unwrap();

        // The front-end's base is stale (QEMU falls back to its own idea of the used
        // position); the region knows better.
        let (mut dev, recovery) = restart(&memory, &region, 7, PackedState::START);
        assert!(recovery.restored);
        assert_eq!(recovery.discarded, None);
        assert_eq!(ids(&recovery), [a, b, d]);
        assert_eq!(dev.resubmit_pending(), 3);
        assert_eq!(dev.pending().unwrap(), 4, "3 to resubmit and the late one");
        let after_c = RingPosition::START.advance(1, 7);
        assert_eq!(dev.next_used(), after_c);
        assert_eq!(
            dev.next_avail(),
            after_c.advance(5, 7),
            "a, b, d occupy 5 slots"
        );
        assert_eq!(pop_ids(&mut dev, &mut batch, 2), [a, b]);
        let first = batch.get(0).unwrap();
        let gpas: Vec<u64> = first.readable().iter().map(|s| s.gpa).collect();
        assert_eq!(
            gpas,
            [0x8000, 0x8100],
            "rebuilt from the region, not the ring"
        );
        assert_eq!(batch.get(1).unwrap().writable()[0].gpa, 0x8300);
        assert_eq!(
            pop_ids(&mut dev, &mut batch, 8),
            [d, late],
            "then the new chain"
        );
        assert_eq!(pop_ids(&mut dev, &mut batch, 8), [], "nothing twice");
        for (id, len) in [(b, 4), (late, 0), (a, 0), (d, 0)] {
            dev.push_used(id, len).unwrap();
        }
        dev.publish_used().unwrap();
        let reaped: Vec<(u16, u32)> = std::iter::from_fn(|| drv.reap_used().unwrap()).collect();
        assert_eq!(reaped, [(b, 4), (late, 0), (a, 0), (d, 0)]);
        assert_eq!(dev.next_used(), drv.next_used());

        // Everything completed: a further restart resubmits nothing and resumes where the ring is.
        let (dev, recovery) = restart(&memory, &region, 7, PackedState::START);
        assert!(recovery.restored && recovery.resubmit.is_empty());
        assert_eq!(dev.next_used(), drv.next_used());
        assert_eq!(dev.next_avail(), drv.next_avail());
    }

    /// Push `ids`, then do what `publish_used` does up to the first used descriptor's flags
    /// (`flags_written`), and die before the commit.
    fn die_while_publishing(mut dev: PackedQueue, ids: &[u16], flags_written: bool) {
        for &id in ids {
            dev.push_used(id, 0).unwrap();
        }
        let (index, flags) = dev.batch_head.unwrap();
        let inflight = dev.inflight.as_ref().unwrap();
        for &(slot, slots) in &dev.inflight_pushed {
            inflight.complete(slot, slots);
        }
        if flags_written {
            let rings = dev.rings.as_ref().unwrap();
            rings.set_desc_flags(index, flags, Ordering::Release);
        }
    }

    #[test]
    fn completion_not_yet_committed_is_judged_by_the_ring() {
        // (used flags written, driver reaped `a` and reused its slot in the next lap)
        for (flags_written, reused) in [(false, false), (true, false), (true, true)] {
            let region = packed_region(4);
            let (mut drv, mut dev) = pair(4, false);
            let memory = dev.memory().unwrap().clone();
            dev.set_inflight(region.packed_queue(0, 4).unwrap())
                .unwrap();
            let a = drv.add_chain(&[(0x8000, 1), (0x8100, 1)], &[]).unwrap();
            let b = drv.add_chain(&[(0x8200, 1)], &[]).unwrap();
            drv.publish().unwrap();
            let mut batch = ChainBatch::new();
            assert_eq!(pop_ids(&mut dev, &mut batch, 8), [a, b]);
            die_while_publishing(dev, &[a], flags_written);
            let mut expected = if flags_written { vec![b] } else { vec![a, b] };
            if reused {
                // While no back-end runs: slots 3 and 0, slot 0 available in wrap 0.
                assert_eq!(drv.reap_used().unwrap(), Some((a, 0)));
                let c = drv.add_chain(&[(0x8300, 1), (0x8400, 1)], &[]).unwrap();
                drv.publish().unwrap();
                expected.push(c);
            }

            let (mut dev, recovery) = restart(&memory, &region, 4, PackedState::START);
            let after_a = RingPosition::START.advance(2, 4);
            if flags_written {
                // The driver saw a completed: only b comes back.
                assert_eq!(ids(&recovery), [b]);
                assert_eq!(dev.next_used(), after_a);
            } else {
                // Rolled back: the driver never saw a, so both are handed out again.
                assert_eq!(ids(&recovery), [a, b]);
                assert_eq!(dev.next_used(), RingPosition::START);
            }
            assert_eq!(dev.next_avail(), RingPosition::START.advance(3, 4));
            assert_eq!(pop_ids(&mut dev, &mut batch, 8), expected);
            for &id in &expected {
                dev.push_used(id, 0).unwrap();
            }
            dev.publish_used().unwrap();
            let reaped: Vec<u16> = std::iter::from_fn(|| drv.reap_used().unwrap())
                .map(|(id, _)| id)
                .collect();
            if flags_written && !reused {
                assert_eq!(reaped[0], a);
                assert_eq!(reaped[1..], expected);
            } else {
                assert_eq!(reaped, expected);
            }
            assert_eq!(drv.in_flight(), 0);
        }
    }

    #[test]
    fn a_batch_of_a_whole_ring_is_committed_by_its_wrap_counter() {
        let region = packed_region(3);
        let (mut drv, mut dev) = pair(3, false);
        let memory = dev.memory().unwrap().clone();
        dev.set_inflight(region.packed_queue(0, 3).unwrap())
            .unwrap();
        let a = drv.add_chain(&[(0x8000, 1), (0x8100, 1)], &[]).unwrap();
        let b = drv.add_chain(&[(0x8200, 1)], &[]).unwrap();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(pop_ids(&mut dev, &mut batch, 8), [a, b]);
        // Used index back at 0, only the wrap counter differs from the committed state.
        die_while_publishing(dev, &[a, b], true);
        let (dev, recovery) = restart(&memory, &region, 3, PackedState::START);
        assert_eq!(ids(&recovery), [], "the driver sees both completed");
        let lap = RingPosition {
            index: 0,
            wrap: false,
        };
        assert_eq!((dev.next_used(), dev.next_avail()), (lap, lap));
        assert_eq!(drv.reap_used().unwrap(), Some((a, 0)));
        assert_eq!(drv.reap_used().unwrap(), Some((b, 0)));
    }

    #[test]
    fn fresh_region_starts_at_the_rings_position_and_tracks_from_there() {
        let start = RingPosition {
            index: 3,
            wrap: false,
        };
        let region = packed_region(5);
        let (mut drv, mut dev) = pair_at(5, false, start);
        let memory = dev.memory().unwrap().clone();
        let recovery = dev
            .set_inflight(region.packed_queue(0, 5).unwrap())
            .unwrap();
        assert!(!recovery.restored);
        assert_eq!((dev.next_avail(), dev.next_used()), (start, start));
        let a = drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        let b = drv
            .add_chain(&[(0x8100, 1), (0x8200, 1), (0x8300, 1)], &[])
            .unwrap();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(pop_ids(&mut dev, &mut batch, 8), [a, b]);
        dev.push_used(a, 0).unwrap();
        dev.publish_used().unwrap();
        drop(dev);
        let (mut dev, recovery) = restart(&memory, &region, 5, PackedState::START);
        assert_eq!(ids(&recovery), [b]);
        // Nothing new in the ring, but a resubmission is work: a worker must not sleep on it.
        assert_eq!(dev.pending().unwrap(), 1);
        assert!(dev.enable_notifications().unwrap());
        assert_eq!(dev.next_used(), start.advance(1, 5));
        assert_eq!(dev.next_avail(), start.advance(4, 5), "across the wrap");
        assert_eq!(pop_ids(&mut dev, &mut batch, 8), [b]);
        dev.push_used(b, 0).unwrap();
        dev.publish_used().unwrap();
        assert_eq!(drv.reap_used().unwrap(), Some((a, 0)));
        assert_eq!(drv.reap_used().unwrap(), Some((b, 0)));
    }

    #[test]
    fn hostile_region_leaves_nothing_in_flight_and_says_why() {
        use std::os::unix::fs::FileExt;
        let (mut drv, dev) = pair(8, false);
        let memory = dev.memory().unwrap().clone();
        drop(dev);
        let a = drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.publish().unwrap();

        // Two chains in flight with the same buffer id.
        let region = packed_region(8);
        let mut view = region.packed_queue(0, 8).unwrap();
        view.recover(|_| 0);
        let desc = PackedDesc {
            addr: 0x8000,
            len: 1,
            id: a,
            flags: VIRTQ_DESC_F_AVAIL,
        };
        view.fetch(desc, true, true).unwrap();
        view.fetch(desc, true, true).unwrap();
        let (mut dev, recovery) = restart(&memory, &region, 8, PackedState::START);
        assert!(!recovery.restored);
        assert!(recovery.discarded.unwrap().contains("buffer id"));
        assert_eq!(dev.resubmit_pending(), 0);
        let mut batch = ChainBatch::new();
        assert_eq!(
            pop_ids(&mut dev, &mut batch, 8),
            [a],
            "the ring as the base says"
        );

        // A committed free-list head far outside the ring (old_free_head sits at offset 14).
        let region = packed_region(8);
        drop(restart(&memory, &region, 8, PackedState::START));
        let file = std::fs::File::from(region.fd().try_clone().unwrap());
        file.write_at(&0xfff0u16.to_le_bytes(), 14).unwrap();
        let (dev, recovery) = restart(&memory, &region, 8, PackedState::START);
        assert!(!recovery.restored && recovery.resubmit.is_empty());
        assert!(recovery
            .discarded
            .unwrap()
            .contains("free-list index 65520"));
        assert_eq!(dev.next_used(), RingPosition::START);
    }

    #[test]
    fn inflight_view_must_match_and_chains_are_not_given_back_under_tracking() {
        let region = packed_region(16);
        let (mut drv, mut dev) = pair(8, false);
        assert!(matches!(
            dev.set_inflight(region.packed_queue(0, 16).unwrap()),
            Err(QueueError::InvalidConfig(_))
        ));
        let mut detached = PackedQueue::new(config(16, false)).unwrap();
        assert_eq!(
            detached
                .set_inflight(region.packed_queue(0, 16).unwrap())
                .map(|_| ()),
            Err(QueueError::NotReady)
        );
        let region = packed_region(8);
        dev.set_inflight(region.packed_queue(0, 8).unwrap())
            .unwrap();
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        dev.pop_batch(&mut batch, 8).unwrap();
        assert!(matches!(
            dev.give_back(batch.chains()),
            Err(QueueError::InvalidConfig(_))
        ));
    }

    #[test]
    fn queue_and_driver_are_send() {
        fn is_send<T: Send>() {}
        is_send::<PackedQueue>();
        is_send::<PackedQueueDriver>();
    }
}
