//! The shared inflight region of vhost-user INFLIGHT_SHMFD (GET_INFLIGHT_FD / SET_INFLIGHT_FD).
//!
//! The back-end allocates the region (a memfd), the front-end keeps it across back-end crashes
//! and hands it back on reconnect. It is one queue region per queue, placed one after another at
//! a stride the back-end chooses; each queue region follows the spec's layout exactly
//! (`vhost-user-protocol.md` §12): `QueueRegionSplit` with 16-byte `DescStateSplit` entries, or
//! `QueueRegionPacked` with 32-byte `DescStatePacked` entries.
//!
//! After a reconnect everything in a region was written by somebody else (a previous incarnation
//! of the back-end, or whoever holds the fd): [`SplitInflight::recover`] validates it and treats
//! anything inconsistent as "nothing in flight", with the reason, instead of trusting it.
//!
//! Every field is accessed with a naturally aligned atomic operation: a SIGKILL can stop the
//! back-end between any two stores, and the recovery relies on the program order of the stores
//! the spec prescribes (fetch: counter, then inflight; complete: next/last_batch_head, then
//! used->idx, then inflight = 0, then used_idx).

use std::os::fd::OwnedFd;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use crate::error::MemoryError;
use crate::memory::{create_memfd, MemoryRegion, RegionSpec};
use crate::queue::MAX_QUEUE_SIZE;

/// The region version this code writes and understands.
pub const INFLIGHT_VERSION: u16 = 1;
/// Size of a split queue region's header (features, version, desc_num, last_batch_head,
/// used_idx).
pub const SPLIT_HEADER: usize = 16;
/// Size of one `DescStateSplit`.
pub const SPLIT_DESC: usize = 16;
/// Size of a packed queue region's header (C alignment pads its 29 bytes to 32).
pub const PACKED_HEADER: usize = 32;
/// Size of one `DescStatePacked`.
pub const PACKED_DESC: usize = 32;
/// Queue regions start on this boundary (libvhost-user and DPDK use 64 too).
pub const QUEUE_REGION_ALIGN: usize = 64;
/// Most queues a region may describe (vring indices in kick/call messages are 8 bits).
pub const MAX_INFLIGHT_QUEUES: u16 = 256;

/// Which ring layout the region tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingLayout {
    Split,
    Packed,
}

impl RingLayout {
    /// Bytes of one queue region for `queue_size` descriptors, padded to the region alignment.
    pub fn queue_region_size(self, queue_size: u16) -> usize {
        let raw = match self {
            RingLayout::Split => SPLIT_HEADER + SPLIT_DESC * usize::from(queue_size),
            RingLayout::Packed => PACKED_HEADER + PACKED_DESC * usize::from(queue_size),
        };
        raw.next_multiple_of(QUEUE_REGION_ALIGN)
    }
}

fn invalid(what: String) -> MemoryError {
    MemoryError::InvalidRegion(format!("inflight region: {what}"))
}

/// A mapped inflight region: `num_queues` queue regions of `queue_size` descriptors.
#[derive(Debug)]
pub struct InflightRegion {
    mapping: MemoryRegion,
    layout: RingLayout,
    num_queues: u16,
    queue_size: u16,
    stride: usize,
}

impl InflightRegion {
    fn check_geometry(num_queues: u16, queue_size: u16) -> Result<(), MemoryError> {
        if num_queues == 0 || num_queues > MAX_INFLIGHT_QUEUES {
            return Err(invalid(format!(
                "{num_queues} queues (1..={MAX_INFLIGHT_QUEUES} allowed)"
            )));
        }
        if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
            return Err(invalid(format!(
                "queue size {queue_size} (1..={MAX_QUEUE_SIZE} allowed)"
            )));
        }
        Ok(())
    }

    /// Bytes the whole region needs.
    pub fn required_size(layout: RingLayout, num_queues: u16, queue_size: u16) -> u64 {
        layout.queue_region_size(queue_size) as u64 * u64::from(num_queues)
    }

    /// GET_INFLIGHT_FD: a fresh, zeroed region in a new memfd (version 0 = uninitialised; each
    /// queue region is initialised when its ring first starts).
    pub fn allocate(
        layout: RingLayout,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, MemoryError> {
        Self::check_geometry(num_queues, queue_size)?;
        let size = Self::required_size(layout, num_queues, queue_size);
        let fd = create_memfd("vvu-inflight", size)
            .map_err(|err| MemoryError::Map(format!("inflight memfd: {err}")))?;
        Self::map(fd, size, 0, layout, num_queues, queue_size)
    }

    /// SET_INFLIGHT_FD: map a region handed back by the front-end. The file must hold
    /// `mmap_offset + mmap_size` bytes and `mmap_size` must cover every queue region.
    pub fn map(
        fd: OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        layout: RingLayout,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, MemoryError> {
        Self::check_geometry(num_queues, queue_size)?;
        let needed = Self::required_size(layout, num_queues, queue_size);
        if mmap_size < needed {
            return Err(invalid(format!(
                "{mmap_size} bytes, {num_queues} queues of {queue_size} need {needed}"
            )));
        }
        // Fields are accessed atomically: keep them naturally aligned.
        if mmap_offset % QUEUE_REGION_ALIGN as u64 != 0 {
            return Err(invalid(format!(
                "mmap offset {mmap_offset:#x} is not {QUEUE_REGION_ALIGN}-byte aligned"
            )));
        }
        let spec = RegionSpec {
            guest_phys_addr: 0,
            size: mmap_size,
            userspace_addr: 0,
            mmap_offset,
        };
        let mapping = MemoryRegion::map(fd, spec)?;
        Ok(Self {
            mapping,
            layout,
            num_queues,
            queue_size,
            stride: layout.queue_region_size(queue_size),
        })
    }

    pub fn layout(&self) -> RingLayout {
        self.layout
    }
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }
    /// Bytes mapped (the `mmap_size` of the GET_INFLIGHT_FD reply).
    pub fn mmap_size(&self) -> u64 {
        self.mapping.size()
    }
    /// The fd the region lives in (GET_INFLIGHT_FD sends a duplicate).
    pub fn fd(&self) -> &OwnedFd {
        self.mapping.fd()
    }

    /// `Err(Poisoned)` if a SIGBUS hit the region (the front-end shrank its file).
    pub fn check_poison(&self) -> Result<(), MemoryError> {
        self.mapping.check_poison()
    }

    fn queue_base(&self, index: u16, ring_size: u16) -> Result<usize, MemoryError> {
        if index >= self.num_queues {
            return Err(invalid(format!(
                "queue {index} beyond the region's {} queues",
                self.num_queues
            )));
        }
        if ring_size == 0 || ring_size > self.queue_size {
            return Err(invalid(format!(
                "ring of {ring_size} descriptors, the region tracks at most {}",
                self.queue_size
            )));
        }
        Ok(usize::from(index) * self.stride)
    }

    /// A view of queue `index`'s split region, for a ring of `ring_size` descriptors.
    pub fn split_queue(
        self: &Arc<Self>,
        index: u16,
        ring_size: u16,
    ) -> Result<SplitInflight, MemoryError> {
        if self.layout != RingLayout::Split {
            return Err(invalid("the region was laid out for packed rings".into()));
        }
        let base = self.queue_base(index, ring_size)?;
        Ok(SplitInflight {
            fields: Fields {
                region: Arc::clone(self),
                base,
            },
            size: ring_size,
            counter: 0,
        })
    }

    /// A view of queue `index`'s packed region, for a ring of `ring_size` descriptors.
    pub fn packed_queue(
        self: &Arc<Self>,
        index: u16,
        ring_size: u16,
    ) -> Result<PackedInflight, MemoryError> {
        if self.layout != RingLayout::Packed {
            return Err(invalid("the region was laid out for split rings".into()));
        }
        let base = self.queue_base(index, ring_size)?;
        Ok(PackedInflight {
            fields: Fields {
                region: Arc::clone(self),
                base,
            },
            size: ring_size,
            counter: 0,
        })
    }
}

/// Atomic access to the fields of one queue region. Every offset used is below the queue
/// region's size (checked by the constructors through `queue_base`) and naturally aligned (the
/// mapping and every queue region start 64-byte aligned; fields sit at their C offsets).
#[derive(Debug, Clone)]
struct Fields {
    region: Arc<InflightRegion>,
    base: usize,
}

impl Fields {
    #[inline]
    fn ptr(&self, offset: usize, width: usize) -> *mut u8 {
        assert!(
            self.base + offset + width <= self.region.mapping.size() as usize,
            "inflight field outside the mapping"
        );
        // SAFETY: in bounds per the assert above.
        unsafe { self.region.mapping.host_addr().add(self.base + offset) }
    }
    #[inline]
    fn u8(&self, offset: usize) -> &AtomicU8 {
        // SAFETY: in bounds (see `ptr`); the mapping lives as long as `self.region`; any byte is a
        // valid AtomicU8.
        unsafe { &*self.ptr(offset, 1).cast::<AtomicU8>() }
    }
    #[inline]
    fn u16(&self, offset: usize) -> &AtomicU16 {
        debug_assert_eq!(offset % 2, 0);
        // SAFETY: in bounds and 2-byte aligned (type docs); the mapping outlives the reference.
        unsafe { &*self.ptr(offset, 2).cast::<AtomicU16>() }
    }
    #[inline]
    fn u32(&self, offset: usize) -> &AtomicU32 {
        debug_assert_eq!(offset % 4, 0);
        // SAFETY: in bounds and 4-byte aligned (type docs); the mapping outlives the reference.
        unsafe { &*self.ptr(offset, 4).cast::<AtomicU32>() }
    }
    #[inline]
    fn u64(&self, offset: usize) -> &AtomicU64 {
        debug_assert_eq!(offset % 8, 0);
        // SAFETY: in bounds and 8-byte aligned (type docs); the mapping outlives the reference.
        unsafe { &*self.ptr(offset, 8).cast::<AtomicU64>() }
    }
    /// Zero `len` bytes from the queue region's start.
    fn zero(&self, len: usize) {
        let ptr = self.ptr(0, len);
        // SAFETY: in bounds per `ptr`; plain bytes in a mapping we hold, which the front-end
        // shares (volatile stores).
        unsafe { crate::memory::zero_guest(ptr, len) };
    }
}

/// What [`SplitInflight::recover`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Heads to hand out again, in the order they were first fetched.
    pub resubmit: Vec<u16>,
    /// The region held state that was used (false for a fresh or discarded region).
    pub restored: bool,
    /// Why the region's previous content was discarded (then `resubmit` is empty).
    pub discarded: Option<String>,
}

// QueueRegionSplit field offsets.
const S_VERSION: usize = 8;
const S_DESC_NUM: usize = 10;
const S_LAST_BATCH_HEAD: usize = 12;
const S_USED_IDX: usize = 14;
// DescStateSplit field offsets.
const SD_INFLIGHT: usize = 0;
const SD_NEXT: usize = 6;
const SD_COUNTER: usize = 8;

/// One split queue's inflight region, as the device side of the ring uses it.
#[derive(Debug, Clone)]
pub struct SplitInflight {
    fields: Fields,
    size: u16,
    /// The next fetch counter.
    counter: u64,
}

impl SplitInflight {
    /// `Err(Poisoned)` if a SIGBUS hit the region behind this view.
    pub fn check_poison(&self) -> Result<(), MemoryError> {
        self.fields.region.check_poison()
    }

    #[inline]
    fn desc(head: u16) -> usize {
        SPLIT_HEADER + SPLIT_DESC * usize::from(head)
    }

    /// Ring size the view tracks (`desc_num`).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Start from an empty region: version 1, nothing in flight, `used_idx` = the ring's.
    fn reset(&mut self, ring_used_idx: u16) {
        self.fields
            .zero(SPLIT_HEADER + SPLIT_DESC * usize::from(self.size));
        let f = &self.fields;
        f.u16(S_DESC_NUM).store(self.size, Ordering::Relaxed);
        f.u16(S_USED_IDX).store(ring_used_idx, Ordering::Relaxed);
        f.u16(S_VERSION).store(INFLIGHT_VERSION, Ordering::Release);
        self.counter = 0;
    }

    /// Read the region without changing it: the heads of a half-completed last batch, the heads
    /// still in flight (in counter order) and the highest counter.
    fn scan(&self, ring_used_idx: u16) -> Result<(Vec<u16>, Vec<u16>, u64), String> {
        let f = &self.fields;
        let version = f.u16(S_VERSION).load(Ordering::Acquire);
        if version != INFLIGHT_VERSION {
            return Err(format!("version {version}, expected {INFLIGHT_VERSION}"));
        }
        let desc_num = f.u16(S_DESC_NUM).load(Ordering::Relaxed);
        if desc_num != self.size {
            return Err(format!(
                "desc_num {desc_num} but the ring has {} descriptors",
                self.size
            ));
        }
        let mut inflight = Vec::with_capacity(usize::from(self.size));
        for head in 0..self.size {
            match f.u8(Self::desc(head) + SD_INFLIGHT).load(Ordering::Relaxed) {
                0 => inflight.push(false),
                1 => inflight.push(true),
                other => return Err(format!("descriptor {head}: inflight flag {other}")),
            }
        }
        // Completed but not cleared: the last batch reached used->idx before the crash.
        let used_idx = f.u16(S_USED_IDX).load(Ordering::Relaxed);
        let unfinished = ring_used_idx.wrapping_sub(used_idx);
        if unfinished > self.size {
            return Err(format!(
                "used_idx {used_idx} is {unfinished} behind the ring's used idx {ring_used_idx}"
            ));
        }
        let mut last_batch = Vec::with_capacity(usize::from(unfinished));
        let mut head = f.u16(S_LAST_BATCH_HEAD).load(Ordering::Relaxed);
        for _ in 0..unfinished {
            let flag = inflight
                .get_mut(usize::from(head))
                .ok_or_else(|| format!("last batch links to descriptor {head}"))?;
            *flag = false;
            last_batch.push(head);
            head = f.u16(Self::desc(head) + SD_NEXT).load(Ordering::Relaxed);
        }
        let mut pending: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| inflight[usize::from(h)])
            .map(|h| (f.u64(Self::desc(h) + SD_COUNTER).load(Ordering::Relaxed), h))
            .collect();
        pending.sort_unstable();
        let next_counter = pending
            .last()
            .map_or(0, |&(counter, _)| counter.saturating_add(1));
        Ok((
            last_batch,
            pending.into_iter().map(|(_, h)| h).collect(),
            next_counter,
        ))
    }

    /// Reconnect: finish a half-completed last batch against the ring's `used->idx`, and return
    /// what is still in flight in fetch order. A fresh (version 0) region is initialised; a region
    /// that does not make sense is reset and reported in [`Recovery::discarded`].
    pub fn recover(&mut self, ring_used_idx: u16) -> Recovery {
        if self.fields.u16(S_VERSION).load(Ordering::Acquire) == 0 {
            self.reset(ring_used_idx);
            return Recovery::default();
        }
        match self.scan(ring_used_idx) {
            Ok((last_batch, resubmit, next_counter)) => {
                let f = &self.fields;
                for head in last_batch {
                    f.u8(Self::desc(head) + SD_INFLIGHT)
                        .store(0, Ordering::Relaxed);
                }
                f.u16(S_USED_IDX).store(ring_used_idx, Ordering::Release);
                self.counter = next_counter;
                Recovery {
                    resubmit,
                    restored: true,
                    discarded: None,
                }
            }
            Err(reason) => {
                self.reset(ring_used_idx);
                Recovery {
                    resubmit: Vec::new(),
                    restored: false,
                    discarded: Some(reason),
                }
            }
        }
    }

    /// A head was fetched from the avail ring: counter first, then the flag (spec order).
    /// `head` must be below the ring size (the queue checked it).
    #[inline]
    pub fn mark_fetched(&mut self, head: u16) {
        debug_assert!(head < self.size);
        let f = &self.fields;
        let desc = Self::desc(head);
        f.u64(desc + SD_COUNTER)
            .store(self.counter, Ordering::Relaxed);
        f.u8(desc + SD_INFLIGHT).store(1, Ordering::Release);
        self.counter = self.counter.wrapping_add(1);
    }

    /// A head goes into the used ring in the current batch: link it into the batch list.
    /// The used->idx store that publishes the batch (a Release store) orders these before it.
    #[inline]
    pub fn record_used(&self, head: u16) {
        debug_assert!(head < self.size);
        let f = &self.fields;
        let last = f.u16(S_LAST_BATCH_HEAD).load(Ordering::Relaxed);
        f.u16(Self::desc(head) + SD_NEXT)
            .store(last, Ordering::Relaxed);
        f.u16(S_LAST_BATCH_HEAD).store(head, Ordering::Relaxed);
    }

    /// The batch `heads` is published (used->idx = `used_idx`): clear their flags, then record
    /// `used_idx`. Call only after the used->idx store is ordered (a full fence after it).
    #[inline]
    pub fn complete_batch(&self, heads: &[u16], used_idx: u16) {
        let f = &self.fields;
        for &head in heads {
            f.u8(Self::desc(head) + SD_INFLIGHT)
                .store(0, Ordering::Relaxed);
        }
        f.u16(S_USED_IDX).store(used_idx, Ordering::Release);
    }

    /// Whether `head` is marked in flight (tests, diagnostics).
    pub fn is_inflight(&self, head: u16) -> bool {
        head < self.size
            && self
                .fields
                .u8(Self::desc(head) + SD_INFLIGHT)
                .load(Ordering::Acquire)
                != 0
    }
}

// QueueRegionPacked field offsets.
const P_VERSION: usize = 8;
const P_DESC_NUM: usize = 10;
const P_FREE_HEAD: usize = 12;
const P_OLD_FREE_HEAD: usize = 14;
const P_USED_IDX: usize = 16;
const P_OLD_USED_IDX: usize = 18;
const P_USED_WRAP: usize = 20;
const P_OLD_USED_WRAP: usize = 21;
// DescStatePacked field offsets.
const PD_INFLIGHT: usize = 0;
const PD_NEXT: usize = 2;
const PD_LAST: usize = 4;
const PD_NUM: usize = 6;
const PD_COUNTER: usize = 8;
const PD_ID: usize = 16;
const PD_FLAGS: usize = 18;
const PD_LEN: usize = 20;
const PD_ADDR: usize = 24;

/// Packed descriptor flag bits the recovery looks at (virtio 1.2 §2.8).
const VIRTQ_DESC_F_AVAIL: u16 = 1 << 7;
const VIRTQ_DESC_F_USED: u16 = 1 << 15;

/// One packed descriptor as the inflight region stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedDesc {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

/// A chain to resubmit after a reconnect: its head entry and its descriptors, in fetch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedResubmit {
    /// Index of the chain's head entry in the region (what [`PackedInflight::complete`] wants).
    pub slot: u16,
    pub descriptors: Vec<PackedDesc>,
}

/// What [`PackedInflight::recover`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackedRecovery {
    pub resubmit: Vec<PackedResubmit>,
    /// Used index and wrap counter the ring resumes from (after any roll-back); meaningful
    /// only when `restored`.
    pub used_idx: u16,
    pub used_wrap_counter: bool,
    /// The region held state that was used (false for a fresh or discarded region: then the
    /// ring keeps the position SET_VRING_BASE gave it).
    pub restored: bool,
    pub discarded: Option<String>,
}

/// One packed queue's inflight region. [`crate::queue::PackedQueue::set_inflight`] uses it so:
/// - at ring start (after attach and SET_VRING_BASE): [`PackedInflight::recover`] with a reader
///   of the ring descriptors' flags; when `restored`, resume the used position from it and hand
///   out `resubmit` (built from the stored descriptors) before anything new;
/// - per descriptor taken from the ring, in ring order: [`PackedInflight::fetch`]; keep the slot
///   it returns with the last descriptor of each chain;
/// - per completed chain: [`PackedInflight::complete`] (slot, ring descriptors it occupied)
///   before the batch's used descriptors are published (the store of the first one's flags,
///   the one recovery looks at); once their flags are visible,
///   [`PackedInflight::commit`] with the batch's slots. No `fetch` between `complete` and
///   `commit`.
#[derive(Debug, Clone)]
pub struct PackedInflight {
    fields: Fields,
    size: u16,
    counter: u64,
}

impl PackedInflight {
    /// `Err(Poisoned)` if a SIGBUS hit the region behind this view.
    pub fn check_poison(&self) -> Result<(), MemoryError> {
        self.fields.region.check_poison()
    }

    #[inline]
    fn desc(slot: u16) -> usize {
        PACKED_HEADER + PACKED_DESC * usize::from(slot)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Version 1, every entry on the free list (entry i links to i + 1), used index 0 with the
    /// wrap counter set (a fresh ring's state).
    fn reset(&mut self) {
        self.fields
            .zero(PACKED_HEADER + PACKED_DESC * usize::from(self.size));
        let f = &self.fields;
        for slot in 0..self.size {
            f.u16(Self::desc(slot) + PD_NEXT)
                .store(slot.wrapping_add(1), Ordering::Relaxed);
        }
        f.u16(P_DESC_NUM).store(self.size, Ordering::Relaxed);
        f.u8(P_USED_WRAP).store(1, Ordering::Relaxed);
        f.u8(P_OLD_USED_WRAP).store(1, Ordering::Relaxed);
        f.u16(P_VERSION).store(INFLIGHT_VERSION, Ordering::Release);
        self.counter = 0;
    }

    fn slot_field(&self, offset: usize) -> Result<u16, String> {
        let slot = self.fields.u16(offset).load(Ordering::Relaxed);
        if slot > self.size {
            // `size` itself is the end of the free list (entry size - 1 links to it).
            return Err(format!("free-list index {slot} beyond {}", self.size));
        }
        Ok(slot)
    }

    /// Descriptor `d` of a chain was taken from the ring; `is_head`/`is_last` tell where in its
    /// chain it is. Returns the chain's slot once `is_last` (what `complete` wants), or an error
    /// when more descriptors are in flight than the ring holds (a broken ring).
    pub fn fetch(
        &mut self,
        d: PackedDesc,
        is_head: bool,
        is_last: bool,
    ) -> Result<Option<u16>, String> {
        let f = &self.fields;
        let old_free = f.u16(P_OLD_FREE_HEAD).load(Ordering::Relaxed);
        let free = f.u16(P_FREE_HEAD).load(Ordering::Relaxed);
        if old_free >= self.size || free >= self.size {
            return Err(format!(
                "no free inflight entry (free list at {free}, chain at {old_free})"
            ));
        }
        let head = Self::desc(old_free);
        if is_head {
            f.u16(head + PD_NUM).store(0, Ordering::Relaxed);
            f.u64(head + PD_COUNTER)
                .store(self.counter, Ordering::Relaxed);
            self.counter = self.counter.wrapping_add(1);
            f.u8(head + PD_INFLIGHT).store(1, Ordering::Release);
        }
        if is_last {
            f.u16(head + PD_LAST).store(free, Ordering::Relaxed);
        }
        let num = f.u16(head + PD_NUM).load(Ordering::Relaxed);
        f.u16(head + PD_NUM)
            .store(num.wrapping_add(1), Ordering::Relaxed);
        let entry = Self::desc(free);
        f.u64(entry + PD_ADDR).store(d.addr, Ordering::Relaxed);
        f.u32(entry + PD_LEN).store(d.len, Ordering::Relaxed);
        f.u16(entry + PD_FLAGS).store(d.flags, Ordering::Relaxed);
        f.u16(entry + PD_ID).store(d.id, Ordering::Relaxed);
        let next = f.u16(entry + PD_NEXT).load(Ordering::Relaxed);
        f.u16(P_FREE_HEAD).store(next, Ordering::Release);
        if is_last {
            f.u16(P_OLD_FREE_HEAD).store(next, Ordering::Release);
            Ok(Some(old_free))
        } else {
            Ok(None)
        }
    }

    /// A chain (head entry `slot`) goes back to the driver: return its entries to the free list
    /// and advance the used index by `ring_descriptors` (what the chain occupied in the ring).
    pub fn complete(&self, slot: u16, ring_descriptors: u16) {
        if slot >= self.size {
            return;
        }
        let f = &self.fields;
        let last = f.u16(Self::desc(slot) + PD_LAST).load(Ordering::Relaxed);
        let free = f.u16(P_FREE_HEAD).load(Ordering::Relaxed);
        if last < self.size {
            f.u16(Self::desc(last) + PD_NEXT)
                .store(free, Ordering::Relaxed);
        }
        f.u16(P_FREE_HEAD).store(slot, Ordering::Relaxed);
        let mut used = f.u16(P_USED_IDX).load(Ordering::Relaxed);
        let mut wrap = f.u8(P_USED_WRAP).load(Ordering::Relaxed);
        used = used.wrapping_add(ring_descriptors);
        if used >= self.size {
            used -= self.size;
            wrap ^= 1;
        }
        f.u16(P_USED_IDX).store(used, Ordering::Relaxed);
        f.u8(P_USED_WRAP).store(wrap, Ordering::Release);
    }

    /// After the used descriptors' flags were written: clear the completed heads' flags and
    /// copy free_head, used_idx and the wrap counter into their `old_*` fields.
    pub fn commit(&self, slots: &[u16]) {
        let f = &self.fields;
        fence(Ordering::SeqCst);
        for &slot in slots {
            if slot < self.size {
                f.u8(Self::desc(slot) + PD_INFLIGHT)
                    .store(0, Ordering::Relaxed);
            }
        }
        f.u16(P_OLD_FREE_HEAD).store(
            f.u16(P_FREE_HEAD).load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        f.u16(P_OLD_USED_IDX)
            .store(f.u16(P_USED_IDX).load(Ordering::Relaxed), Ordering::Relaxed);
        f.u8(P_OLD_USED_WRAP)
            .store(f.u8(P_USED_WRAP).load(Ordering::Relaxed), Ordering::Release);
    }

    /// Make a region that [`PackedInflight::recover`] did not restore start at the ring's
    /// used position (a ring started from a SET_VRING_BASE other than the start).
    pub fn start_at(&self, used_idx: u16, used_wrap_counter: bool) {
        if used_idx >= self.size {
            return;
        }
        let f = &self.fields;
        let wrap = u8::from(used_wrap_counter);
        f.u16(P_USED_IDX).store(used_idx, Ordering::Relaxed);
        f.u16(P_OLD_USED_IDX).store(used_idx, Ordering::Relaxed);
        f.u8(P_USED_WRAP).store(wrap, Ordering::Relaxed);
        f.u8(P_OLD_USED_WRAP).store(wrap, Ordering::Release);
    }

    /// Reconnect. `ring_flags(i)` reads the flags of ring descriptor `i` (guest memory). An
    /// in-progress completion is committed if the ring shows it happened, rolled back otherwise;
    /// then every entry on the free list is not in flight and the rest is resubmitted in counter
    /// order. A region that does not make sense is reset and reported.
    pub fn recover(&mut self, ring_flags: impl Fn(u16) -> u16) -> PackedRecovery {
        if self.fields.u16(P_VERSION).load(Ordering::Acquire) == 0 {
            self.reset();
            return PackedRecovery {
                used_wrap_counter: true,
                ..PackedRecovery::default()
            };
        }
        match self.scan_packed(&ring_flags) {
            Ok(recovery) => recovery,
            Err(reason) => {
                self.reset();
                PackedRecovery {
                    used_wrap_counter: true,
                    discarded: Some(reason),
                    ..PackedRecovery::default()
                }
            }
        }
    }

    fn scan_packed(&mut self, ring_flags: &impl Fn(u16) -> u16) -> Result<PackedRecovery, String> {
        let f = &self.fields;
        let version = f.u16(P_VERSION).load(Ordering::Acquire);
        if version != INFLIGHT_VERSION {
            return Err(format!("version {version}, expected {INFLIGHT_VERSION}"));
        }
        let desc_num = f.u16(P_DESC_NUM).load(Ordering::Relaxed);
        if desc_num != self.size {
            return Err(format!(
                "desc_num {desc_num} but the ring has {} descriptors",
                self.size
            ));
        }
        let used_idx = f.u16(P_USED_IDX).load(Ordering::Relaxed);
        let old_used_idx = f.u16(P_OLD_USED_IDX).load(Ordering::Relaxed);
        if used_idx >= self.size || old_used_idx >= self.size {
            return Err(format!(
                "used index {used_idx}/{old_used_idx} beyond the ring"
            ));
        }
        let wrap = f.u8(P_USED_WRAP).load(Ordering::Relaxed) != 0;
        let old_wrap = f.u8(P_OLD_USED_WRAP).load(Ordering::Relaxed) != 0;
        // A batch of exactly a ring's worth of slots moves only the wrap counter.
        if used_idx != old_used_idx || wrap != old_wrap {
            // Until the update reached the ring, the descriptor at old_used_idx is the one the
            // driver made available under old_wrap (AVAIL = wrap, USED != wrap). Anything else
            // means it was written used, and perhaps already reaped and made available again
            // in the next lap (AVAIL flipped): the spec's "no longer looks available".
            let flags = ring_flags(old_used_idx);
            let avail = flags & VIRTQ_DESC_F_AVAIL != 0;
            let used = flags & VIRTQ_DESC_F_USED != 0;
            if !(avail == old_wrap && used != old_wrap) {
                // The ring got the update: commit it.
                self.commit(&[]);
            }
        }
        // Roll back to the last committed state.
        let free_head = self.slot_field(P_OLD_FREE_HEAD)?;
        let used_idx = f.u16(P_OLD_USED_IDX).load(Ordering::Relaxed);
        let wrap = f.u8(P_OLD_USED_WRAP).load(Ordering::Relaxed);
        f.u16(P_FREE_HEAD).store(free_head, Ordering::Relaxed);
        f.u16(P_USED_IDX).store(used_idx, Ordering::Relaxed);
        f.u8(P_USED_WRAP).store(wrap, Ordering::Relaxed);
        // Everything on the free list is not in flight (bounded walk: a loop is garbage).
        let mut on_free_list = vec![false; usize::from(self.size)];
        let mut slot = free_head;
        let mut steps = 0u32;
        while slot < self.size {
            if on_free_list[usize::from(slot)] || steps > u32::from(self.size) {
                return Err(format!("the free list loops at entry {slot}"));
            }
            on_free_list[usize::from(slot)] = true;
            f.u8(Self::desc(slot) + PD_INFLIGHT)
                .store(0, Ordering::Relaxed);
            slot = f.u16(Self::desc(slot) + PD_NEXT).load(Ordering::Relaxed);
            steps += 1;
        }
        let mut pending: Vec<(u64, u16)> = Vec::new();
        for slot in 0..self.size {
            match f.u8(Self::desc(slot) + PD_INFLIGHT).load(Ordering::Relaxed) {
                0 => {}
                1 => pending.push((
                    f.u64(Self::desc(slot) + PD_COUNTER).load(Ordering::Relaxed),
                    slot,
                )),
                other => return Err(format!("entry {slot}: inflight flag {other}")),
            }
        }
        pending.sort_unstable();
        let mut resubmit = Vec::with_capacity(pending.len());
        // The chains in flight occupy distinct buffer ids and at most the whole ring.
        let mut id_seen = vec![false; usize::from(self.size)];
        let mut ring_descriptors = 0u32;
        for &(_, slot) in &pending {
            let descriptors = self.chain(slot)?;
            // `chain` returns at least one descriptor; the buffer id is in the last one.
            let id = descriptors.last().map_or(u16::MAX, |d| d.id);
            match id_seen.get_mut(usize::from(id)) {
                Some(seen) if !*seen => *seen = true,
                _ => {
                    return Err(format!(
                        "entry {slot}: buffer id {id} out of range or twice"
                    ))
                }
            }
            ring_descriptors += descriptors.len() as u32;
            if ring_descriptors > u32::from(self.size) {
                return Err(format!(
                    "more descriptors in flight than the {} of the ring",
                    self.size
                ));
            }
            resubmit.push(PackedResubmit { slot, descriptors });
        }
        self.counter = pending
            .last()
            .map_or(0, |&(counter, _)| counter.saturating_add(1));
        Ok(PackedRecovery {
            resubmit,
            used_idx,
            used_wrap_counter: wrap != 0,
            restored: true,
            discarded: None,
        })
    }

    /// The `num` descriptors of the chain whose head entry is `slot`, following `next`.
    fn chain(&self, slot: u16) -> Result<Vec<PackedDesc>, String> {
        let f = &self.fields;
        let num = f.u16(Self::desc(slot) + PD_NUM).load(Ordering::Relaxed);
        if num == 0 || num > self.size {
            return Err(format!("entry {slot}: chain of {num} descriptors"));
        }
        let mut out = Vec::with_capacity(usize::from(num));
        let mut entry = slot;
        for _ in 0..num {
            if entry >= self.size {
                return Err(format!("chain at entry {slot} links outside the ring"));
            }
            let d = Self::desc(entry);
            out.push(PackedDesc {
                addr: f.u64(d + PD_ADDR).load(Ordering::Relaxed),
                len: f.u32(d + PD_LEN).load(Ordering::Relaxed),
                id: f.u16(d + PD_ID).load(Ordering::Relaxed),
                flags: f.u16(d + PD_FLAGS).load(Ordering::Relaxed),
            });
            entry = f.u16(d + PD_NEXT).load(Ordering::Relaxed);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
