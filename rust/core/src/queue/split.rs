//! Device side of a split virtqueue: pop descriptor chains, push used entries, decide on
//! notifications.
//!
//! The hot path ([`SplitQueue::pop_batch`], [`SplitQueue::push_used`],
//! [`SplitQueue::publish_used`]) does not allocate once a reused [`ChainBatch`] has grown to its
//! working size: ring pointers are translated once at [`SplitQueue::attach`], descriptors are
//! read straight from the cached table pointer, and buffer translation keeps a last-region cache.
//! Runs of plain chains (direct descriptors whose buffers lie in the cached region: what a
//! virtio-net driver posts) take a short walk with the same checks (`pop_plain_run`); every
//! other chain, and every fault, goes through the general walk (`pop_chain`), which decides.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{fence, Ordering};

use super::{
    need_event, ready, Descriptor, QueueConfig, Rings, MAX_CHAIN_SEGMENTS,
    MAX_INDIRECT_DESCRIPTORS, MAX_POP_DESCRIPTORS, MAX_POP_SEGMENTS, VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};
use crate::dirty_log::QueueLog;
use crate::error::{ChainFault, QueueError};
use crate::inflight::{Recovery, SplitInflight};
use crate::memory::{copy_from_guest, copy_to_guest, Access, GuestMemory, MemoryRegion};

/// One contiguous piece of a descriptor's buffer, translated to a host address.
///
/// `host` is valid for `len` bytes for as long as the [`GuestMemory`] snapshot the queue was
/// attached to when it popped the chain is alive: that is, until the queue is re-attached or
/// detached *and* every other holder of that snapshot has dropped it. Guest memory is shared with
/// another process, so its contents can change at any time; access it with raw-pointer copies
/// (or hand it to the kernel as an iovec), never through Rust references held across accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Host address of the first byte.
    pub host: *mut u8,
    /// Length in bytes (never 0).
    pub len: u32,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
}

// SAFETY: a segment is an address and a length; dereferencing it is unsafe anyway and governed by
// the lifetime rule documented on the type, not by the thread it happens on.
unsafe impl Send for Segment {}
// SAFETY: see `Send`.
unsafe impl Sync for Segment {}

impl Segment {
    /// The segment as an iovec, for `readv`/`writev`/`sendmsg`.
    #[inline]
    pub fn as_iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.host.cast(),
            iov_len: self.len as usize,
        }
    }

    /// Copy bytes out of the segment, starting `offset` bytes in; returns how many were copied
    /// (`min(dst.len(), len - offset)`).
    ///
    /// # Safety
    /// The snapshot the segment came from must still be alive (see the type docs).
    pub unsafe fn read_to(&self, offset: usize, dst: &mut [u8]) -> usize {
        let n = (self.len as usize).saturating_sub(offset).min(dst.len());
        if n > 0 {
            // SAFETY: `offset + n <= len`, inside the live mapping per the contract; `dst` is our
            // own memory and cannot overlap guest memory.
            unsafe { copy_from_guest(self.host.add(offset), &mut dst[..n]) };
        }
        n
    }

    /// Copy bytes into the segment, starting `offset` bytes in; returns how many were copied.
    ///
    /// # Safety
    /// As for [`Segment::read_to`]; the segment should be a device-writable one.
    pub unsafe fn write_from(&self, offset: usize, src: &[u8]) -> usize {
        let n = (self.len as usize).saturating_sub(offset).min(src.len());
        if n > 0 {
            // SAFETY: as in `read_to`.
            unsafe { copy_to_guest(&src[..n], self.host.add(offset)) };
        }
        n
    }
}

/// One popped descriptor chain. Its segments live in the [`ChainBatch`] it was popped into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub(super) head: u16,
    pub(super) descriptors: u16,
    pub(super) segments: Range<usize>,
    /// First writable segment (readable ones are `segments.start..mid`).
    pub(super) mid: usize,
    pub(super) readable_len: u32,
    pub(super) writable_len: u32,
}

impl Chain {
    /// Head descriptor index: what [`SplitQueue::push_used`] wants back.
    pub fn head(&self) -> u16 {
        self.head
    }
    /// Number of buffer descriptors (direct ones plus indirect table entries; the descriptor
    /// pointing at an indirect table is not counted).
    pub fn descriptors(&self) -> u16 {
        self.descriptors
    }
    /// Total bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }
    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }
    /// The device-readable segments, in chain order.
    pub fn readable<'b>(&self, batch: &'b ChainBatch) -> &'b [Segment] {
        batch
            .segments
            .get(self.segments.start..self.mid)
            .unwrap_or(&[])
    }
    /// The device-writable segments, in chain order.
    pub fn writable<'b>(&self, batch: &'b ChainBatch) -> &'b [Segment] {
        batch
            .segments
            .get(self.mid..self.segments.end)
            .unwrap_or(&[])
    }
}

/// A chain together with its segments.
#[derive(Debug, Clone, Copy)]
pub struct ChainView<'a> {
    chain: &'a Chain,
    batch: &'a ChainBatch,
}

impl<'a> ChainView<'a> {
    pub fn chain(&self) -> &'a Chain {
        self.chain
    }
    pub fn head(&self) -> u16 {
        self.chain.head
    }
    pub fn descriptors(&self) -> u16 {
        self.chain.descriptors
    }
    pub fn readable_len(&self) -> u32 {
        self.chain.readable_len
    }
    pub fn writable_len(&self) -> u32 {
        self.chain.writable_len
    }
    pub fn readable(&self) -> &'a [Segment] {
        self.chain.readable(self.batch)
    }
    pub fn writable(&self) -> &'a [Segment] {
        self.chain.writable(self.batch)
    }
}

/// A reusable container for popped chains: one `Vec<Chain>` and one flat `Vec<Segment>`.
/// [`ChainBatch::clear`] keeps both capacities, so a batch reused across pops stops allocating.
#[derive(Debug, Default)]
pub struct ChainBatch {
    pub(super) chains: Vec<Chain>,
    pub(super) segments: Vec<Segment>,
}

impl ChainBatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with_capacity(chains: usize, segments: usize) -> Self {
        Self {
            chains: Vec::with_capacity(chains),
            segments: Vec::with_capacity(segments),
        }
    }
    /// Forget all chains, keeping the allocations.
    pub fn clear(&mut self) {
        self.chains.clear();
        self.segments.clear();
    }
    pub fn len(&self) -> usize {
        self.chains.len()
    }
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }
    pub fn chains(&self) -> &[Chain] {
        &self.chains
    }
    /// All segments of all chains, in pop order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }
    pub fn get(&self, index: usize) -> Option<ChainView<'_>> {
        self.chains
            .get(index)
            .map(|chain| ChainView { chain, batch: self })
    }
    pub fn iter(&self) -> impl ExactSizeIterator<Item = ChainView<'_>> + '_ {
        self.chains
            .iter()
            .map(|chain| ChainView { chain, batch: self })
    }
}

/// Running totals while walking one chain.
pub(super) struct Walk {
    /// First writable segment, once a writable descriptor was seen.
    pub(super) mid: Option<usize>,
    pub(super) total: u32,
    pub(super) readable: u32,
    pub(super) writable: u32,
    pub(super) descriptors: u16,
    /// Segment count at which the chain has too many ([`MAX_CHAIN_SEGMENTS`] past its first).
    pub(super) segment_limit: usize,
}

impl Walk {
    /// A walk whose first segment will go to index `start` of the segment list.
    #[inline(always)]
    pub(super) fn new(start: usize) -> Self {
        Self {
            mid: None,
            total: 0,
            readable: 0,
            writable: 0,
            descriptors: 0,
            segment_limit: start.saturating_add(MAX_CHAIN_SEGMENTS),
        }
    }
}

/// Append `segment`, unless the chain already has `limit` segments or no memory is left for it.
#[inline(always)]
fn push_segment(
    segments: &mut Vec<Segment>,
    limit: usize,
    segment: Segment,
) -> Result<(), ChainFault> {
    if segments.len() >= limit {
        return Err(ChainFault::TooManySegments {
            limit: MAX_CHAIN_SEGMENTS as u32,
        });
    }
    if segments.len() == segments.capacity() {
        grow(segments)?;
    }
    segments.push(segment);
    Ok(())
}

/// Make room for one more segment (amortised doubling, as `push` would), failing instead of
/// aborting the process when the allocator says no.
#[cold]
#[inline(never)]
fn grow(segments: &mut Vec<Segment>) -> Result<(), ChainFault> {
    segments.try_reserve(1).map_err(|_| ChainFault::OutOfMemory)
}

/// The work one pop has done so far, against [`MAX_POP_DESCRIPTORS`] and [`MAX_POP_SEGMENTS`].
pub(super) struct Spent {
    /// Descriptors walked (ring descriptors and indirect table entries).
    pub(super) walked: u32,
    /// Length of the segment list when the pop started.
    pub(super) segments_at_start: usize,
}

impl Spent {
    #[inline(always)]
    pub(super) fn new(segments_at_start: usize) -> Self {
        Self {
            walked: 0,
            segments_at_start,
        }
    }

    /// Whether the pop must stop taking chains. Checked after each chain, so a pop ends at most
    /// one chain (below 65536 descriptors) past either budget: `walked` stays below 2^17.
    #[inline(always)]
    pub(super) fn exhausted(&self, segments: &[Segment]) -> bool {
        self.walked >= MAX_POP_DESCRIPTORS
            || segments.len() - self.segments_at_start >= MAX_POP_SEGMENTS
    }
}

/// Buffer translation with a last-region-hit cache.
pub(super) struct Translator<'m> {
    pub(super) regions: &'m [std::sync::Arc<MemoryRegion>],
    pub(super) cache: &'m mut usize,
    /// The addresses are IOVAs (an IOTLB view): an unmapped one is a miss, not a bad chain.
    pub(super) iova: bool,
}

impl Translator<'_> {
    /// Append the segments of `[addr, addr + len)`; `len > 0`. Each piece's region must allow
    /// the device's access (`writable`: the device writes). Fails once `segments` would grow
    /// past `limit`.
    ///
    /// Always inlined (into `add_buffer`, so into the chain walks): out of line it cost a call
    /// with its register saves and a `Result` through memory per buffer, 2 % of a 64-byte
    /// frame's instructions (`benches/net_instructions.py`).
    #[inline(always)]
    fn push(
        &mut self,
        addr: u64,
        len: u32,
        writable: bool,
        segments: &mut Vec<Segment>,
        limit: usize,
    ) -> Result<(), ChainFault> {
        let fault = ChainFault::BufferOutOfRange { addr, len };
        addr.checked_add(u64::from(len)).ok_or(fault)?;
        let need = if writable {
            Access::WRITE
        } else {
            Access::READ
        };
        let (mut gpa, mut left) = (addr, u64::from(len));
        let unmapped = |gpa: u64| {
            if self.iova {
                ChainFault::IotlbMiss {
                    iova: gpa,
                    access: need,
                }
            } else {
                fault
            }
        };
        while left > 0 {
            let region = match self.regions.get(*self.cache) {
                Some(r) if gpa >= r.guest_phys_addr() && gpa - r.guest_phys_addr() < r.size() => r,
                _ => {
                    let index = self
                        .regions
                        .partition_point(|r| r.guest_phys_addr() <= gpa)
                        .checked_sub(1)
                        .ok_or_else(|| unmapped(gpa))?;
                    let r = self.regions.get(index).ok_or_else(|| unmapped(gpa))?;
                    if gpa - r.guest_phys_addr() >= r.size() {
                        return Err(unmapped(gpa));
                    }
                    *self.cache = index;
                    r
                }
            };
            // Only IOTLB windows restrict access; plain regions skip the load.
            if self.iova && !region.access().allows(need) {
                return Err(ChainFault::AccessDenied { addr, len, need });
            }
            let offset = gpa - region.guest_phys_addr();
            let n = left.min(region.size() - offset);
            // SAFETY: offset < region size, so the pointer stays inside the region's mapping,
            // and `n` bytes from it are mapped too.
            let host = unsafe { region.host_addr().add(offset as usize) };
            // n <= len, which is a u32.
            push_segment(
                segments,
                limit,
                Segment {
                    host,
                    len: n as u32,
                    gpa,
                },
            )?;
            gpa += n;
            left -= n;
        }
        Ok(())
    }
}

/// The region that translated the last buffer, as the plain walk sees it: a chain whose
/// buffers all lie inside it is walked without the general translation. Taken per batch, and
/// again after each chain the general walk took (which may have moved the cache).
#[derive(Clone, Copy)]
struct Window {
    start: u64,
    /// Region size; 0 for no window (nothing lies inside then).
    len: u64,
    host: *mut u8,
}

impl Window {
    #[inline(always)]
    fn of(translator: &Translator<'_>) -> Self {
        match translator.regions.get(*translator.cache) {
            // An IOTLB window that refuses either access is left to the general walk (which
            // reports `AccessDenied`). A region's end never overflows (`MemoryRegion` refuses
            // that when made); the `checked_add` keeps the window's arithmetic sound anyway.
            Some(r)
                if (!translator.iova || r.access().allows(Access::READ_WRITE))
                    && r.guest_phys_addr().checked_add(r.size()).is_some() =>
            {
                Window {
                    start: r.guest_phys_addr(),
                    len: r.size(),
                    host: r.host_addr(),
                }
            }
            _ => Window {
                start: 0,
                len: 0,
                host: std::ptr::null_mut(),
            },
        }
    }

    /// Append the segment of `[addr, addr + len)`, `len > 0`, if it lies inside the window and
    /// the list has room for it without growing; `false` otherwise.
    #[inline(always)]
    fn push(&self, addr: u64, len: u32, segments: &mut Vec<Segment>) -> bool {
        let offset = addr.wrapping_sub(self.start);
        if offset >= self.len
            || self.len - offset < u64::from(len)
            || segments.len() == segments.capacity()
        {
            return false;
        }
        // SAFETY: offset < len, inside the region's mapping (and so are the `len` bytes from
        // there, checked above).
        let host = unsafe { self.host.add(offset as usize) };
        segments.push(Segment {
            host,
            len,
            gpa: addr,
        });
        true
    }
}

/// Walk the chain at `head` (below Q) if it is plain:
/// direct descriptors only, each non-empty buffer entirely inside `window`. Returns the chain
/// and the ring descriptors it occupies; for anything else (an indirect descriptor, a buffer
/// elsewhere, a full segment list, and every fault) `None`, after which the caller truncates
/// `segments` and walks the chain again with [`pop_chain`], which decides (and reports the
/// fault).
///
/// Every chain accepted here is one `pop_chain` accepts with the same result, checked the same
/// way: next below Q, at most Q descriptors (a loop ends there), readable before writable, the
/// total length within `u32`, every buffer mapped (one segment each: it lies in one region)
/// with the access it needs. It skips only what cannot happen to such a chain: more than
/// [`MAX_CHAIN_SEGMENTS`] segments (it has fewer than Q), an `addr + len` overflow (the buffer
/// ends inside the window), and growing the segment list (it bails out instead).
#[inline(never)]
fn pop_plain(
    rings: &Rings,
    window: &Window,
    head: u16,
    segments: &mut Vec<Segment>,
) -> Option<(Chain, u32)> {
    let size = rings.size;
    // Read again (and checked again, whatever it says now).
    let mut desc = rings.descriptor(head);
    let start = segments.len();
    // `usize::MAX` until a writable descriptor was seen.
    let mut mid = usize::MAX;
    let mut total: u32 = 0;
    let mut writable_len: u32 = 0;
    let mut seen: u32 = 1;
    loop {
        if desc.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return None;
        }
        let writable = desc.flags & VIRTQ_DESC_F_WRITE != 0;
        if writable {
            if mid == usize::MAX {
                mid = segments.len();
            }
            // Cannot overflow: at most the total, checked below.
            writable_len = writable_len.wrapping_add(desc.len);
        } else if mid != usize::MAX {
            return None;
        }
        total = total.checked_add(desc.len)?;
        if desc.len > 0 && !window.push(desc.addr, desc.len, segments) {
            return None;
        }
        if desc.flags & VIRTQ_DESC_F_NEXT == 0 {
            break;
        }
        if desc.next >= size || seen >= u32::from(size) {
            return None;
        }
        desc = rings.descriptor(desc.next);
        seen += 1;
    }
    let end = segments.len();
    let chain = Chain {
        head,
        // At most Q <= 32768 descriptors.
        descriptors: seen as u16,
        segments: start..end,
        mid: if mid == usize::MAX { end } else { mid },
        readable_len: total - writable_len,
        writable_len,
    };
    Some((chain, seen))
}

/// What a run of plain chains reads: the rings, the window, and which avail entries to take.
#[derive(Clone, Copy)]
struct PlainRun<'a> {
    rings: &'a Rings,
    window: Window,
    /// The first avail entry to take.
    from: u16,
    /// How many avail entries, from `from` on, the run may take (at most Q).
    count: u16,
}

/// Pop the run's avail entries while their chains are plain and fit `ring_budget`, adding each
/// to `batch` and `walked` and calling `fetched` with its head (before anything else is done
/// with it: inflight tracking); returns how many were taken (`run.count` when all were). A
/// plain chain is one of direct descriptors whose non-empty buffers each lie inside
/// `run.window` (see [`pop_plain`]); a single descriptor (no NEXT, no INDIRECT) is handled right
/// here. The caller has made sure that no plain chain can exhaust the pop's budgets
/// (`pop_batch_unchecked`); the first chain that is not plain is left for it, to walk in full.
///
/// Out of line, small, and generic over `fetched` (nothing to test per chain without an
/// inflight region): its loop keeps the ring, window and batch state in registers.
#[inline(never)]
fn pop_plain_run(
    run: PlainRun<'_>,
    batch: &mut ChainBatch,
    ring_budget: &mut u32,
    walked: &mut u32,
    mut fetched: impl FnMut(u16),
) -> usize {
    let rings = run.rings;
    let size = rings.size;
    let at_start = *ring_budget;
    let mut budget = at_start;
    let mut idx = run.from;
    let end = run.from.wrapping_add(run.count);
    while idx != end {
        // Ordered after pop_batch's Acquire load of avail.idx; the driver does not change
        // published entries.
        let head = rings.avail_entry(idx, Ordering::Relaxed);
        if head >= size || budget == 0 {
            break;
        }
        let desc = rings.descriptor(head);
        let segments = &mut batch.segments;
        let start = segments.len();
        let (chain, seen) = if desc.flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT) == 0 {
            // One buffer: what `pop_plain` (and `pop_chain`) make of it, without the loop.
            if desc.len > 0 && !run.window.push(desc.addr, desc.len, segments) {
                break;
            }
            let end = segments.len();
            let writable = desc.flags & VIRTQ_DESC_F_WRITE != 0;
            let chain = Chain {
                head,
                descriptors: 1,
                segments: start..end,
                mid: if writable { start } else { end },
                readable_len: if writable { 0 } else { desc.len },
                writable_len: if writable { desc.len } else { 0 },
            };
            (chain, 1)
        } else {
            match pop_plain(rings, &run.window, head, segments) {
                Some((chain, seen)) if seen <= budget => (chain, seen),
                _ => {
                    segments.truncate(start);
                    break;
                }
            }
        };
        budget -= seen;
        // Spec order: the head is in flight before anything is done with it.
        fetched(head);
        if let Some(first) = batch.segments.get(start) {
            prefetch_buffer(first.host, chain.mid == start);
        }
        batch.chains.push(chain);
        idx = idx.wrapping_add(1);
    }
    // A plain chain walks exactly the ring descriptors it occupies.
    *walked += at_start - budget;
    *ring_budget = budget;
    usize::from(idx.wrapping_sub(run.from))
}

/// Where an indirect table can be read.
pub(super) enum Table<'m> {
    /// Contiguous in this process.
    Host(*const u8),
    /// Mapped, but crossing a region boundary: read entry by entry through the snapshot.
    Pieces(&'m GuestMemory, u64),
}

impl<'m> Table<'m> {
    /// Locate the table `[addr, addr + len)`, which must be entirely mapped.
    pub(super) fn map(mem: &'m GuestMemory, addr: u64, len: u32) -> Result<Self, ChainFault> {
        // Under an IOTLB an unmapped table is a miss (the chain waits for the translation).
        let out_of_range = || match mem.first_unmapped(addr, u64::from(len)) {
            Some(iova) if mem.is_iova() => ChainFault::IotlbMiss {
                iova,
                access: Access::READ,
            },
            _ => ChainFault::IndirectTableOutOfRange { addr, len },
        };
        let table = match mem.slice(addr, u64::from(len)) {
            Ok(slice) if slice.len() == len as usize => Table::Host(slice.as_ptr()),
            Ok(_) => {
                // Crossing a region boundary: make sure all of it is mapped, then read per entry.
                mem.for_each_piece(addr, u64::from(len), |_, _| {})
                    .map_err(|_| out_of_range())?;
                Table::Pieces(mem, addr)
            }
            Err(_) => return Err(out_of_range()),
        };
        // Only IOTLB windows can refuse reading; the whole table is mapped (checked above).
        if mem.is_iova() {
            let end = addr + u64::from(len);
            let mut at = addr;
            while let Some(region) = mem.find_region(at).filter(|_| at < end) {
                if !region.access().read {
                    return Err(ChainFault::AccessDenied {
                        addr,
                        len,
                        need: Access::READ,
                    });
                }
                at = region.guest_phys_addr() + region.size();
            }
        }
        Ok(table)
    }

    #[inline]
    pub(super) fn read(&self, index: u32) -> Result<Descriptor, ChainFault> {
        let offset = 16 * index as usize;
        match *self {
            // SAFETY: the whole table (len/16 entries, index below that) was translated into one
            // contiguous host range when the Table was made.
            Table::Host(ptr) => Ok(unsafe { Descriptor::read_at(ptr.add(offset)) }),
            Table::Pieces(mem, gpa) => {
                let mut raw = [0u8; 16];
                let at = gpa + offset as u64;
                mem.read(at, &mut raw)
                    .map_err(|_| ChainFault::IndirectTableOutOfRange { addr: at, len: 16 })?;
                Ok(Descriptor::from_le_bytes(raw))
            }
        }
    }
}

/// Device side of a split virtqueue. See the module docs.
pub struct SplitQueue {
    config: QueueConfig,
    rings: Option<Rings>,
    next_avail: u16,
    next_used: u16,
    /// Entries pushed since the last `publish_used`.
    num_added: u16,
    /// Used idx at the last notification decision, when `signalled_valid`.
    signalled_used: u16,
    signalled_valid: bool,
    /// Index of the region that translated the last buffer.
    region_cache: usize,
    broken: Option<String>,
    /// Dirty logging (live migration): `None` costs one branch per push/publish.
    log: Option<QueueLog>,
    /// Reused to find a chain's buffers again when logging its writes.
    log_scratch: Vec<Segment>,
    /// INFLIGHT_SHMFD tracking: the queue's part of the shared inflight region.
    inflight: Option<SplitInflight>,
    /// Heads pushed since the last `publish_used`, cleared in the region once published.
    inflight_batch: Vec<u16>,
    /// Heads in flight when the previous back-end died: handed out before new avail entries.
    resubmit: VecDeque<u16>,
    /// The IOTLB miss that ended the last `pop_batch` early, until taken.
    miss: Option<(u64, Access)>,
}

impl std::fmt::Debug for SplitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitQueue")
            .field("config", &self.config)
            .field("attached", &self.rings.is_some())
            .field("next_avail", &self.next_avail)
            .field("next_used", &self.next_used)
            .field("broken", &self.broken)
            .finish()
    }
}

impl SplitQueue {
    /// A detached queue; fails with `InvalidConfig` for a bad size or misaligned ring address.
    pub fn new(config: QueueConfig) -> Result<Self, QueueError> {
        config.validate()?;
        Ok(Self {
            config,
            rings: None,
            next_avail: 0,
            next_used: 0,
            num_added: 0,
            signalled_used: 0,
            signalled_valid: false,
            region_cache: 0,
            broken: None,
            log: None,
            log_scratch: Vec::new(),
            inflight: None,
            inflight_batch: Vec::new(),
            resubmit: VecDeque::new(),
            miss: None,
        })
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    pub fn size(&self) -> u16 {
        self.config.size
    }

    /// Translate the ring areas in `mem` and keep the snapshot (it keeps the mapping alive).
    ///
    /// Replaces an earlier attachment (vhost-user SET_MEM_TABLE while running). `next_used` is
    /// re-read from `used.idx` in guest memory, so entries pushed but not yet published are
    /// dropped: call [`SplitQueue::publish_used`] first. The notification state is reset so that
    /// the next completion always notifies. On failure the queue is left detached.
    pub fn attach(&mut self, mem: GuestMemory) -> Result<(), QueueError> {
        self.rings = None;
        let rings = Rings::new(mem, &self.config)?;
        // §6: after (re)connecting, next_used comes from used.idx in guest memory (written by
        // us, or by the back-end that ran the queue before us).
        self.next_used = rings.used_idx(Ordering::Acquire);
        self.num_added = 0;
        self.inflight_batch.clear();
        self.signalled_valid = false;
        self.region_cache = 0;
        self.rings = Some(rings);
        Ok(())
    }

    /// Drop the rings, the memory snapshot and the inflight view (set it again after the next
    /// attach: it recovers from the region then).
    pub fn detach(&mut self) {
        self.rings = None;
        self.num_added = 0;
        self.inflight = None;
        self.inflight_batch.clear();
        self.resubmit.clear();
        self.signalled_valid = false;
    }

    /// Track this queue in an inflight region (INFLIGHT_SHMFD) from now on, after recovering
    /// what the region says: call after `attach` and after setting the next avail index
    /// (SET_VRING_BASE), before the first pop.
    ///
    /// With a region that held state, the chains still in flight are handed out again first, in
    /// the order they were fetched, and the next avail index becomes `used.idx` plus their number
    /// (each avail entry taken is either in the used ring or still in flight). A fresh region, or
    /// one whose content made no sense (reported in [`Recovery::discarded`]), starts empty and
    /// leaves the next avail index alone.
    pub fn set_inflight(&mut self, inflight: SplitInflight) -> Result<Recovery, QueueError> {
        let result = self.set_inflight_unchecked(inflight);
        self.checked(result)
    }

    fn set_inflight_unchecked(
        &mut self,
        mut inflight: SplitInflight,
    ) -> Result<Recovery, QueueError> {
        let rings = ready(&self.broken, &self.rings)?;
        if inflight.size() != self.config.size {
            return Err(QueueError::InvalidConfig(format!(
                "inflight view tracks {} descriptors, the ring has {}",
                inflight.size(),
                self.config.size
            )));
        }
        let used_idx = rings.used_idx(Ordering::Acquire);
        let recovery = inflight.recover(used_idx);
        if recovery.restored {
            // At most Q heads are in flight, so the count fits the 16-bit index arithmetic.
            self.next_avail = used_idx.wrapping_add(recovery.resubmit.len() as u16);
        }
        self.resubmit = recovery.resubmit.iter().copied().collect();
        self.inflight_batch = Vec::with_capacity(usize::from(self.config.size));
        self.inflight = Some(inflight);
        Ok(recovery)
    }

    /// Chains waiting to be handed out again after a reconnect.
    pub fn resubmit_pending(&self) -> usize {
        self.resubmit.len()
    }

    pub fn is_attached(&self) -> bool {
        self.rings.is_some()
    }

    /// The snapshot the queue is attached to.
    pub fn memory(&self) -> Option<&GuestMemory> {
        self.rings.as_ref().map(Rings::memory)
    }

    /// Where the next chain will be taken from (vhost-user GET_VRING_BASE).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Set where the next chain will be taken from (vhost-user SET_VRING_BASE).
    pub fn set_next_avail(&mut self, next_avail: u16) {
        self.next_avail = next_avail;
    }

    /// Where the next used entry will be written.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Start (`Some`) or stop (`None`) logging this queue's writes to guest memory: the
    /// device-writable buffers of every published chain (all of them: see `log_chain_writes`),
    /// and, when the log
    /// has a used-ring address, every write to the used ring. Survives (re-)attach.
    pub fn set_log(&mut self, log: Option<QueueLog>) {
        self.log = log;
    }

    pub fn log(&self) -> Option<&QueueLog> {
        self.log.as_ref()
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
            .or_else(|| self.log.as_ref().and_then(|l| l.log.check_poison().err()))
    }

    /// Number of chains the driver has made available and we have not popped yet.
    /// More than Q means a corrupt ring: the queue breaks with `AvailIndexJump`.
    pub fn pending(&mut self) -> Result<u16, QueueError> {
        let result = self.pending_unchecked();
        self.checked(result)
    }

    #[inline]
    fn pending_unchecked(&mut self) -> Result<u16, QueueError> {
        let rings = ready(&self.broken, &self.rings)?;
        let avail_idx = rings.avail_idx(Ordering::Acquire);
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending > self.config.size {
            let err = self.jump(avail_idx, pending);
            return Err(self.fail(err));
        }
        // Resubmissions are at most Q, the ring's other entries at most Q - resubmissions.
        Ok(pending.saturating_add(self.resubmit.len() as u16))
    }

    fn jump(&self, avail_idx: u16, pending: u16) -> QueueError {
        QueueError::AvailIndexJump {
            avail_idx,
            next_avail: self.next_avail,
            pending,
            size: self.config.size,
        }
    }

    /// The IOTLB miss (iova, access) that ended the last [`SplitQueue::pop_batch`] early, if
    /// any. The chain that missed was left in the ring (`next_avail` points at it); pop again
    /// once the front-end has sent the translation.
    pub fn take_miss(&mut self) -> Option<(u64, Access)> {
        self.miss.take()
    }

    /// Pop up to `max` available chains into `batch` (appending), returning how many were added.
    /// Fewer than `max` may come back while more are available: a call stops taking chains once
    /// it walked [`MAX_POP_DESCRIPTORS`] descriptors or collected [`MAX_POP_SEGMENTS`] segments
    /// (module `queue` docs: "Limits"); the rest stays in the ring for the next call.
    ///
    /// A malformed chain or ring marks the queue broken and returns the error; chains popped
    /// earlier in the same call stay in the batch (and were consumed from the ring), the bad one
    /// is not added. So does a chain of more than [`MAX_CHAIN_SEGMENTS`] segments, or one whose
    /// segments find no memory (`ChainFault::OutOfMemory`: the process does not abort). Under
    /// an IOTLB, a chain with an untranslated address ends the batch without being consumed and
    /// without breaking the queue; [`SplitQueue::take_miss`] reports it.
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
        if max == 0 {
            return Ok(0);
        }
        let size = self.config.size;
        // §3 "discover work": Acquire load of avail.idx, so the ring entries, descriptors,
        // indirect tables and buffer contents the driver wrote before publishing it are visible
        // to the reads below.
        let avail_idx = rings.avail_idx(Ordering::Acquire);
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending > size {
            let err = self.jump(avail_idx, pending);
            return Err(self.fail(err));
        }
        let regions = rings.memory().regions();
        let mut translator = Translator {
            regions,
            cache: &mut self.region_cache,
            iova: rings.memory().is_iova(),
        };
        // All chains of one batch are available at the same time, so their ring descriptors are
        // distinct: more than Q in total means the driver reused descriptors.
        let mut ring_budget = u32::from(size);
        // The work of one call: chains are taken until MAX_POP_DESCRIPTORS descriptors were
        // walked or MAX_POP_SEGMENTS segments collected (see `Spent`).
        let mut spent = Spent::new(batch.segments.len());
        // Chains the previous back-end left in flight come first; they are in flight already
        // (marked in the region), and their avail entries were consumed back then.
        let mut resubmitted = 0;
        while resubmitted < max {
            let Some(&head) = self.resubmit.front() else {
                break;
            };
            let mark = batch.segments.len();
            match pop_chain_general(
                rings,
                &self.config,
                &mut translator,
                head,
                &mut batch.segments,
                &mut ring_budget,
            ) {
                Ok((chain, cost)) => {
                    batch.chains.push(chain);
                    spent.walked += cost.walked;
                }
                Err(ChainFault::IotlbMiss { iova, access }) => {
                    // The head stays first in line; it is retried once translated.
                    batch.segments.truncate(mark);
                    self.miss = Some((iova, access));
                    return Ok(resubmitted);
                }
                Err(reason) => {
                    batch.segments.truncate(mark);
                    self.resubmit.clear();
                    return Err(self.fail(QueueError::BadChain { head, reason }));
                }
            }
            self.resubmit.pop_front();
            resubmitted += 1;
            if spent.exhausted(&batch.segments) {
                return Ok(resubmitted);
            }
        }
        let mut count = usize::from(pending).min(max - resubmitted);
        // Plain chains (see `pop_plain_run`) take the short walk. Each occupies as many ring
        // descriptors as it walks and yields at most that many segments, so while `walked` and
        // the segment count plus what is left of the ring budget stay below the pop's limits,
        // no plain chain can exhaust it and the check after each is skipped. Once that no
        // longer holds (large indirect chains) it never holds again in this call (a general
        // chain adds at least as much to `walked` as it takes from the budget): every chain
        // takes the general walk then.
        let fits = |spent: &Spent, segments: usize, ring_budget: u32| {
            spent.walked + ring_budget < MAX_POP_DESCRIPTORS
                && segments - spent.segments_at_start + (ring_budget as usize) < MAX_POP_SEGMENTS
        };
        let mut plain = true;
        // The cached region, taken when a run starts after the general walk (which may have
        // moved the cache) or at the first run.
        let mut window = None;
        let next_avail = self.next_avail;
        let mut i = 0;
        while i < count {
            // (A chain through an indirect table is never plain: not even entering the run for
            // it saves a call per chain in batches of them.)
            if plain && !heads_indirect(rings, next_avail.wrapping_add(i as u16)) {
                if window.is_none() {
                    plain = fits(&spent, batch.segments.len(), ring_budget);
                    window = Some(Window::of(&translator));
                }
                if let (true, Some(window)) = (plain, window) {
                    let run = PlainRun {
                        rings,
                        window,
                        from: next_avail.wrapping_add(i as u16),
                        // count <= pending <= Q.
                        count: (count - i) as u16,
                    };
                    let walked = &mut spent.walked;
                    i += match self.inflight.as_mut() {
                        Some(inflight) => {
                            pop_plain_run(run, batch, &mut ring_budget, walked, |head| {
                                inflight.mark_fetched(head)
                            })
                        }
                        None => pop_plain_run(run, batch, &mut ring_budget, walked, |_| {}),
                    };
                    if i == count {
                        break;
                    }
                }
            }
            // Ordered after the Acquire above; the driver does not change published entries.
            let head = rings.avail_entry(next_avail.wrapping_add(i as u16), Ordering::Relaxed);
            let mark = batch.segments.len();
            // The general walk decides (and reports any fault).
            match pop_chain_general(
                rings,
                &self.config,
                &mut translator,
                head,
                &mut batch.segments,
                &mut ring_budget,
            ) {
                Ok((chain, cost)) => {
                    // Spec order: the head is in flight before anything is done with it.
                    if let Some(inflight) = self.inflight.as_mut() {
                        inflight.mark_fetched(head);
                    }
                    if let Some(first) = batch.segments.get(mark) {
                        prefetch_buffer(first.host, chain.mid == mark);
                    }
                    batch.chains.push(chain);
                    spent.walked += cost.walked;
                    if spent.exhausted(&batch.segments) {
                        // The rest stays in the ring for the next call.
                        count = i + 1;
                        break;
                    }
                    window = None;
                }
                Err(ChainFault::IotlbMiss { iova, access }) => {
                    // Not consumed: the chain stays in the ring until the translation arrives.
                    batch.segments.truncate(mark);
                    self.next_avail = next_avail.wrapping_add(i as u16);
                    self.miss = Some((iova, access));
                    return Ok(resubmitted + i);
                }
                Err(reason) => {
                    batch.segments.truncate(mark);
                    self.next_avail = next_avail.wrapping_add(i as u16);
                    return Err(self.fail(QueueError::BadChain { head, reason }));
                }
            }
            i += 1;
        }
        self.next_avail = next_avail.wrapping_add(count as u16);
        Ok(resubmitted + count)
    }

    /// Write `used.ring[next_used % Q] = {head, len}` without publishing it; `len` is the number
    /// of bytes written into the chain's writable buffers. Call [`SplitQueue::publish_used`]
    /// after one or many pushes.
    #[inline]
    pub fn push_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        let size = self.config.size;
        match &self.rings {
            // The common case, inline; everything else (not ready, a bad head, a full ring,
            // inflight tracking) out of line, so that this path saves no registers.
            Some(rings)
                if self.broken.is_none()
                    && head < size
                    && self.num_added < size
                    && self.inflight.is_none() =>
            {
                // Plain stores: the Release store of used.idx in publish_used orders them (§1.4:
                // len is set before used.idx).
                rings.set_used_entry(self.next_used, u32::from(head), len, Ordering::Relaxed);
                self.next_used = self.next_used.wrapping_add(1);
                self.num_added += 1;
                Ok(())
            }
            _ => self.push_used_general(head, len),
        }
    }

    /// `push_used` with every check and inflight tracking.
    #[inline(never)]
    fn push_used_general(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        let rings = ready(&self.broken, &self.rings)?;
        if head >= self.config.size {
            return Err(QueueError::UnknownHead(head));
        }
        if self.num_added >= self.config.size {
            // More unpublished entries than the ring holds would overwrite each other.
            return Err(QueueError::Full);
        }
        // Plain stores: the Release store of used.idx in publish_used orders them (§1.4: len is
        // set before used.idx).
        rings.set_used_entry(self.next_used, u32::from(head), len, Ordering::Relaxed);
        if let Some(inflight) = self.inflight.as_ref() {
            // Linked into the batch list before used.idx moves (ordered by its Release store).
            inflight.record_used(head);
            self.inflight_batch.push(head);
        }
        self.next_used = self.next_used.wrapping_add(1);
        self.num_added += 1;
        Ok(())
    }

    /// Publish every entry pushed since the last call and decide whether the driver must be
    /// notified ("call"). Returns `false` without touching memory if nothing was pushed.
    pub fn publish_used(&mut self) -> Result<bool, QueueError> {
        let result = self.publish_used_unchecked();
        self.checked(result)
    }

    #[inline]
    fn publish_used_unchecked(&mut self) -> Result<bool, QueueError> {
        let rings = ready(&self.broken, &self.rings)?;
        if self.num_added == 0 {
            return Ok(false);
        }
        let new = self.next_used;
        // §3 "publish result" / §1.4: the buffer data and the used elements written before must
        // be visible before the new used.idx — Release store (write barrier before the idx store).
        if let Some(log) = &self.log {
            // While the chains are still ours: once used.idx moves, the driver may reuse them.
            let (config, cache, scratch) =
                (&self.config, &mut self.region_cache, &mut self.log_scratch);
            log_pushed(rings, config, log, cache, scratch, new, self.num_added);
        }
        rings.set_used_idx(new, Ordering::Release);
        if let Some(log) = &self.log {
            log.used_ring_write(2, 2);
        }
        // §3 "decide on call": full fence so the used.idx store above cannot be reordered after
        // the load of used_event / avail.flags below (otherwise a lost wakeup: the driver re-arms
        // after our read and before seeing our store, and nobody notifies).
        fence(Ordering::SeqCst);
        if let Some(inflight) = self.inflight.as_ref() {
            // Spec order: only once used.idx is out, the batch stops being in flight.
            inflight.complete_batch(&self.inflight_batch, new);
            self.inflight_batch.clear();
        }
        let notify = if self.config.event_idx {
            // §1.5 with EVENT_IDX: notify iff used_event lies in [old, new).
            let event = rings.used_event(Ordering::Relaxed);
            need_event(event, new, self.signalled_used)
        } else {
            // §1.5 without EVENT_IDX: must notify when avail.flags is 0.
            rings.avail_flags(Ordering::Relaxed) & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
        };
        // The first decision after attach always notifies (§1.5: signalled_used_valid).
        let notify = notify || !self.signalled_valid;
        self.signalled_used = new;
        self.signalled_valid = true;
        self.num_added = 0;
        Ok(notify)
    }

    /// Ask the driver for kicks again before going to sleep. Returns `true` if chains became
    /// available meanwhile: the caller must then process them instead of sleeping.
    pub fn enable_notifications(&mut self) -> Result<bool, QueueError> {
        let result = self.enable_notifications_unchecked();
        self.checked(result)
    }

    #[inline]
    fn enable_notifications_unchecked(&mut self) -> Result<bool, QueueError> {
        let rings = ready(&self.broken, &self.rings)?;
        if self.config.event_idx {
            rings.set_avail_event(self.next_avail, Ordering::Relaxed);
            if let Some(log) = &self.log {
                log.used_ring_write(4 + 8 * u64::from(self.config.size), 2);
            }
        } else {
            rings.set_used_flags(0, Ordering::Relaxed);
            if let Some(log) = &self.log {
                log.used_ring_write(0, 2);
            }
        }
        // §3 "go to sleep": full fence between the store above and the re-read of avail.idx, so
        // that either the driver sees our request and kicks, or we see its new avail.idx.
        fence(Ordering::SeqCst);
        let avail_idx = rings.avail_idx(Ordering::Acquire);
        Ok(avail_idx != self.next_avail || !self.resubmit.is_empty())
    }

    /// Ask the driver not to kick while we are busy. A hint only: no fence needed (§3). With
    /// EVENT_IDX nothing is written: `avail_event` simply stays behind.
    pub fn disable_notifications(&mut self) -> Result<(), QueueError> {
        let rings = ready(&self.broken, &self.rings)?;
        if !self.config.event_idx {
            rings.set_used_flags(VIRTQ_USED_F_NO_NOTIFY, Ordering::Relaxed);
            if let Some(log) = &self.log {
                log.used_ring_write(0, 2);
            }
        }
        Ok(())
    }
}

/// Log the `added` entries pushed before `next_used`: each chain's writable buffers and its used
/// element. Out of line: the log-less hot path only tests whether a log is attached.
#[cold]
#[inline(never)]
fn log_pushed(
    rings: &Rings,
    config: &QueueConfig,
    log: &QueueLog,
    cache: &mut usize,
    scratch: &mut Vec<Segment>,
    next_used: u16,
    added: u16,
) {
    for idx in (0..added).map(|i| next_used.wrapping_sub(added).wrapping_add(i)) {
        // The id push_used wrote (a driver has no business writing the used ring; if it does,
        // it only spoils its own migration: the walk is bounded like a pop).
        let (id, _) = rings.used_entry(idx, Ordering::Relaxed);
        match u16::try_from(id) {
            Ok(head) => log_chain_writes(rings, config, log, cache, scratch, head),
            Err(_) => log.log.record_fault(),
        }
        log.used_ring_write(4 + 8 * u64::from(idx & (config.size - 1)), 8);
    }
}

/// Log what may have been written into the chain at `head`: all of its device-writable buffers.
///
/// Not just the first used-length bytes: the used length may underestimate what was written
/// (virtio allows it, and the blk handler leaves out the status byte after a short or failed
/// read), and an unlogged write is lost data on the destination while a spurious bit only costs
/// a page copy. The chain is walked again (the device owns it until its used entry is
/// published, so it is what was popped), with the same bounds as the pop; a chain that no longer
/// walks is counted as a log fault.
#[inline]
fn log_chain_writes(
    rings: &Rings,
    config: &QueueConfig,
    log: &QueueLog,
    cache: &mut usize,
    scratch: &mut Vec<Segment>,
    head: u16,
) {
    scratch.clear();
    // (The engine never logs under an IOMMU: segment addresses would be IOVAs, not GPAs.)
    let mut translator = Translator {
        regions: rings.memory().regions(),
        cache,
        iova: rings.memory().is_iova(),
    };
    let Ok((chain, _)) = pop_chain(rings, config, &mut translator, head, scratch) else {
        log.log.record_fault();
        return;
    };
    for segment in scratch.get(chain.mid..chain.segments.end).unwrap_or(&[]) {
        // A fault is counted by the log and reported by its owner.
        let _ = log.log.mark(segment.gpa, u64::from(segment.len));
    }
}

/// What walking one chain cost.
#[derive(Clone, Copy)]
struct Cost {
    /// Ring descriptors the chain occupies.
    ring: u32,
    /// Descriptors read: the ring's and the indirect table's entries.
    walked: u32,
}

/// Walk the chain at `head`, appending its segments; also returns what it cost.
///
/// Always inlined into `pop_batch`'s loops: out of line, the call and the `(Chain, Cost)`
/// returned through memory were 2 % of a 64-byte frame's instructions.
#[inline(always)]
fn pop_chain(
    rings: &Rings,
    config: &QueueConfig,
    translator: &mut Translator<'_>,
    head: u16,
    segments: &mut Vec<Segment>,
) -> Result<(Chain, Cost), ChainFault> {
    let size = config.size;
    if head >= size {
        return Err(ChainFault::HeadOutOfRange);
    }
    let start = segments.len();
    let mut walk = Walk::new(start);
    let mut index = head;
    let mut seen: u32 = 0;
    // The descriptor pointing at an indirect table is read but is no buffer.
    let mut table_pointer = 0;
    loop {
        let desc = rings.descriptor(index);
        seen += 1;
        if desc.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if !config.indirect {
                return Err(ChainFault::IndirectNotNegotiated);
            }
            if desc.flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err(ChainFault::IndirectWithNext);
            }
            // The WRITE flag of the descriptor pointing at the table is ignored (§1.2).
            walk = walk_indirect(rings.memory(), translator, &desc, walk, segments)?;
            table_pointer = 1;
            break;
        }
        add_buffer(translator, &desc, &mut walk, segments)?;
        if desc.flags & VIRTQ_DESC_F_NEXT == 0 {
            break;
        }
        if desc.next >= size {
            return Err(ChainFault::NextOutOfRange {
                index,
                next: desc.next,
                limit: u32::from(size),
            });
        }
        if seen >= u32::from(size) {
            return Err(ChainFault::TooLong {
                limit: u32::from(size),
            });
        }
        index = desc.next;
    }
    let end = segments.len();
    let chain = Chain {
        head,
        descriptors: walk.descriptors,
        segments: start..end,
        mid: walk.mid.unwrap_or(end),
        readable_len: walk.readable,
        writable_len: walk.writable,
    };
    let cost = Cost {
        ring: seen,
        walked: u32::from(walk.descriptors) + table_pointer,
    };
    Ok((chain, cost))
}

/// Whether the chain at avail entry `idx` starts with an indirect descriptor (a peek: whatever
/// it says, the walk that follows reads and checks everything again).
#[inline(always)]
fn heads_indirect(rings: &Rings, idx: u16) -> bool {
    let head = rings.avail_entry(idx, Ordering::Relaxed);
    head < rings.size && rings.descriptor(head).flags & VIRTQ_DESC_F_INDIRECT != 0
}

/// [`pop_chain`] plus the batch's ring budget (more ring descriptors than Q in one batch means
/// the driver reused some): the general walk of the chains the plain run leaves. Inlined (the
/// plain run is out of line already): out of line, the call and the result through memory cost
/// a batch of indirect chains 2 % of its instructions.
#[inline(always)]
fn pop_chain_general(
    rings: &Rings,
    config: &QueueConfig,
    translator: &mut Translator<'_>,
    head: u16,
    segments: &mut Vec<Segment>,
    ring_budget: &mut u32,
) -> Result<(Chain, Cost), ChainFault> {
    let (chain, cost) = pop_chain(rings, config, translator, head, segments)?;
    *ring_budget = ring_budget
        .checked_sub(cost.ring)
        .ok_or(ChainFault::DescriptorsReused)?;
    Ok((chain, cost))
}

/// Start loading the first cache line of a chain's first buffer while the rest of the batch is
/// popped: the driver (another CPU) wrote it last (a transmitted frame's header, a receive
/// buffer's line next to the one it wrote), so the handler's first access would miss, and a
/// batch's misses then overlap instead of coming one after the other (DPDK's vhost library
/// prefetches its descriptors' buffers the same way). A device-writable buffer is fetched for
/// writing. A prefetch is a hint: it never faults, even on an address no longer mapped.
#[inline(always)]
fn prefetch_buffer(host: *mut u8, writable: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0, _MM_HINT_T0};
        let at = host.cast_const().cast::<i8>();
        if writable {
            // SAFETY: a prefetch reads nothing the program sees and cannot fault (SSE, part
            // of x86_64's baseline).
            unsafe { _mm_prefetch::<_MM_HINT_ET0>(at) };
        } else {
            // SAFETY: as above.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(at) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (host, writable);
}

/// Walk an indirect table (one level) described by `desc`, continuing `walk`.
///
/// `walk` goes in and out by value: were it borrowed, `pop_chain` would have to keep its own
/// `Walk` in memory for the whole direct walk instead of in registers.
#[inline(never)]
fn walk_indirect(
    mem: &GuestMemory,
    translator: &mut Translator<'_>,
    desc: &Descriptor,
    mut walk: Walk,
    segments: &mut Vec<Segment>,
) -> Result<Walk, ChainFault> {
    let (addr, len) = (desc.addr, desc.len);
    let entries = len / 16;
    if len == 0 || len % 16 != 0 || entries > MAX_INDIRECT_DESCRIPTORS {
        return Err(ChainFault::IndirectLength { len });
    }
    let table = Table::map(mem, addr, len)?;
    let mut index: u32 = 0;
    let mut seen: u32 = 0;
    loop {
        let entry = table.read(index)?;
        seen += 1;
        if entry.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Err(ChainFault::NestedIndirect);
        }
        add_buffer(translator, &entry, &mut walk, segments)?;
        if entry.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(walk);
        }
        if u32::from(entry.next) >= entries {
            return Err(ChainFault::NextOutOfRange {
                index: index as u16,
                next: entry.next,
                limit: entries,
            });
        }
        if seen >= entries {
            return Err(ChainFault::TooLong { limit: entries });
        }
        index = u32::from(entry.next);
    }
}

/// Account for one buffer descriptor and translate it.
///
/// Always inlined, so that the caller's `Walk` stays in registers: called out of line, its
/// fields are written with 4-byte stores and read back by the caller with wider loads, which
/// defeats store-to-load forwarding (the profile showed half of `pop_batch` stalled there).
#[inline(always)]
pub(super) fn add_buffer(
    translator: &mut Translator<'_>,
    desc: &Descriptor,
    walk: &mut Walk,
    segments: &mut Vec<Segment>,
) -> Result<(), ChainFault> {
    let writable = desc.flags & VIRTQ_DESC_F_WRITE != 0;
    if writable {
        if walk.mid.is_none() {
            walk.mid = Some(segments.len());
        }
    } else if walk.mid.is_some() {
        return Err(ChainFault::ReadableAfterWritable);
    }
    walk.total = walk
        .total
        .checked_add(desc.len)
        .ok_or(ChainFault::LengthOverflow)?;
    // Cannot overflow: each part is at most the total.
    if writable {
        walk.writable += desc.len;
    } else {
        walk.readable += desc.len;
    }
    // At most Q - 1 direct descriptors plus MAX_INDIRECT_DESCRIPTORS entries: fits in u16.
    walk.descriptors = walk.descriptors.wrapping_add(1);
    if desc.len > 0 {
        // A zero-length buffer is accepted and yields no segment (and is not translated).
        translator.push(desc.addr, desc.len, writable, segments, walk.segment_limit)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::test_util::shared_memory;
    use crate::queue::SplitQueueDriver;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn config(size: u16, event_idx: bool) -> QueueConfig {
        QueueConfig {
            size,
            desc_table: DESC,
            avail_ring: AVAIL,
            used_ring: USED,
            event_idx,
            indirect: true,
        }
    }

    /// Driver and device over one memfd: regions [0, 0x10000) and [0x10000, 0x20000).
    fn pair(size: u16, event_idx: bool) -> (SplitQueueDriver, SplitQueue) {
        let (drv_mem, dev_mem) = shared_memory(&[(0, 0x10000), (0x10000, 0x10000)]);
        let driver = SplitQueueDriver::new(drv_mem, config(size, event_idx)).unwrap();
        let mut device = SplitQueue::new(config(size, event_idx)).unwrap();
        device.attach(dev_mem).unwrap();
        (driver, device)
    }

    fn read_segment(seg: &Segment) -> Vec<u8> {
        let mut out = vec![0; seg.len as usize];
        // SAFETY: the queue that produced `seg` is alive in the test.
        unsafe { seg.read_to(0, &mut out) };
        out
    }

    #[test]
    fn new_validates_config() {
        assert!(matches!(
            SplitQueue::new(config(6, false)),
            Err(QueueError::InvalidConfig(_))
        ));
        assert!(matches!(
            SplitQueue::new(QueueConfig {
                used_ring: 0x3002,
                ..config(8, false)
            }),
            Err(QueueError::InvalidConfig(_))
        ));
    }

    #[test]
    fn detached_queue_is_not_ready() {
        let mut q = SplitQueue::new(config(8, false)).unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(q.pop_batch(&mut batch, 4), Err(QueueError::NotReady));
        assert_eq!(q.push_used(0, 0), Err(QueueError::NotReady));
        assert_eq!(q.publish_used(), Err(QueueError::NotReady));
        assert_eq!(q.enable_notifications(), Err(QueueError::NotReady));
    }

    #[test]
    fn attach_requires_rings_inside_one_region() {
        let (_, dev_mem) = shared_memory(&[(0, 0x10000), (0x10000, 0x10000)]);
        // Used ring of Q = 256 needs 4 + 2048 bytes; starting at 0xfc00 it crosses 0x10000.
        let mut q = SplitQueue::new(QueueConfig {
            used_ring: 0xfc00,
            ..config(256, false)
        })
        .unwrap();
        assert!(matches!(
            q.attach(dev_mem.clone()),
            Err(QueueError::Memory(_))
        ));
        assert!(!q.is_attached());
        let mut q = SplitQueue::new(QueueConfig {
            desc_table: 0x20000,
            ..config(8, false)
        })
        .unwrap();
        assert!(q.attach(dev_mem).is_err());
    }

    #[test]
    fn trailing_event_word_is_only_needed_with_event_idx() {
        let (_, dev_mem) = shared_memory(&[(0, 0x10000)]);
        // Used ring of Q = 8 is 4 + 64 = 68 bytes: place it so that it ends at the region end,
        // after the available ring (4 + 16 bytes, + 2 with EVENT_IDX).
        let cfg = QueueConfig {
            used_ring: 0x10000 - 68,
            avail_ring: 0x10000 - 68 - 24,
            ..config(8, false)
        };
        let mut q = SplitQueue::new(cfg).unwrap();
        q.attach(dev_mem.clone()).unwrap();
        let mut q = SplitQueue::new(QueueConfig {
            event_idx: true,
            ..cfg
        })
        .unwrap();
        assert!(q.attach(dev_mem).is_err());
    }

    #[test]
    fn pops_direct_chain_with_readable_and_writable_segments() {
        let (mut drv, mut dev) = pair(8, false);
        drv.memory().write(0x8000, b"hello").unwrap();
        let head = drv
            .add_chain(&[(0x8000, 5), (0x8100, 3)], &[(0x9000, 64)])
            .unwrap();
        assert!(drv.publish().unwrap(), "used.flags is 0: kick");
        assert_eq!(dev.pending().unwrap(), 1);
        let mut batch = ChainBatch::new();
        assert_eq!(dev.pop_batch(&mut batch, 16).unwrap(), 1);
        assert_eq!(dev.pending().unwrap(), 0);
        let c = batch.get(0).unwrap();
        assert_eq!(c.head(), head);
        assert_eq!(c.descriptors(), 3);
        assert_eq!((c.readable_len(), c.writable_len()), (8, 64));
        let r = c.readable();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].gpa, r[0].len), (0x8000, 5));
        assert_eq!((r[1].gpa, r[1].len), (0x8100, 3));
        assert_eq!(read_segment(&r[0]), b"hello");
        let w = c.writable();
        assert_eq!((w.len(), w[0].gpa, w[0].len), (1, 0x9000, 64));
        assert_eq!(w[0].as_iovec().iov_len, 64);
        // SAFETY: the device queue is alive.
        unsafe { w[0].write_from(0, b"world") };
        dev.push_used(c.head(), 5).unwrap();
        assert!(dev.publish_used().unwrap());
        assert_eq!(drv.reap_used().unwrap(), Some((head, 5)));
        let mut back = [0u8; 5];
        drv.memory().read(0x9000, &mut back).unwrap();
        assert_eq!(&back, b"world");
        assert_eq!(drv.reap_used().unwrap(), None);
        assert_eq!(drv.free_descriptors(), 8);
    }

    #[test]
    fn buffer_crossing_a_region_boundary_becomes_two_segments() {
        let (mut drv, mut dev) = pair(8, false);
        let data: Vec<u8> = (0..200u8).collect();
        drv.memory().write(0xff80, &data).unwrap();
        drv.add_chain(&[(0xff80, 200)], &[]).unwrap();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        dev.pop_batch(&mut batch, 1).unwrap();
        let c = batch.get(0).unwrap();
        let r = c.readable();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].gpa, r[0].len), (0xff80, 0x80));
        assert_eq!((r[1].gpa, r[1].len), (0x10000, 200 - 0x80));
        let mut got = read_segment(&r[0]);
        got.extend(read_segment(&r[1]));
        assert_eq!(got, data);
        assert!(c.writable().is_empty());
    }

    /// The frame copies of the net path (`read_to` / `write_from`, whose bulk takes 32-byte
    /// accesses from 128 bytes on where the CPU has AVX) over a chain whose buffers start at odd
    /// offsets, span several descriptors and cross a region boundary, in both directions, at
    /// every starting offset into the chain; and lengths that do not fit (a segment shorter than
    /// the copy, an offset past its end) copy only what is inside the segment.
    #[test]
    fn frame_copies_cross_descriptors_and_regions_exactly_and_stay_inside_segments() {
        let (mut drv, mut dev) = pair(8, false);
        let frame: Vec<u8> = (0..1514u32).map(|i| (i * 31 + 7) as u8).collect();
        // What the driver's memory in [WINDOW, WINDOW + 0x8000) should hold, kept alongside.
        const WINDOW: u64 = 0xa000;
        let mut model = vec![0xa5u8; 0x8000];
        drv.memory().write(WINDOW, &model).unwrap();
        // Readable: 0xfb03..0xfd00 (509 B), then 1005 B from 0xfe05 across 0x10000.
        let readable = [(0xfb03u64, 509u32), (0xfe05, 1005)];
        let mut at = 0;
        for &(gpa, len) in &readable {
            let part = &frame[at..at + len as usize];
            drv.memory().write(gpa, part).unwrap();
            let o = (gpa - WINDOW) as usize;
            model[o..o + part.len()].copy_from_slice(part);
            at += len as usize;
        }
        // Writable: 77 B at 0xf011, then 1600 B from 0xfc1d, which crosses 0x10000 too (and
        // overlaps the readable buffers: they are read first).
        let writable = [(0xf011u64, 77u32), (0xfc1d, 1600)];
        drv.add_chain(&readable, &writable).unwrap();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(dev.pop_batch(&mut batch, 1).unwrap(), 1);
        let c = batch.get(0).unwrap();
        assert_eq!(
            c.readable().len(),
            3,
            "the second buffer crosses the region boundary"
        );
        assert_eq!(c.writable().len(), 3);
        // Device → ours: the whole frame, segment by segment, from every start offset.
        for start in [0usize, 1, 13, 100, 508, 509, 700, 1513] {
            let mut got = Vec::new();
            let mut skip = start;
            for seg in c.readable() {
                let mut buf = vec![0u8; seg.len as usize];
                // SAFETY: the queue (and its memory) is alive.
                let n = unsafe { seg.read_to(skip.min(seg.len as usize), &mut buf) };
                skip = skip.saturating_sub(seg.len as usize);
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, frame[start..], "read from offset {start}");
        }
        // Ours → device: the frame into the writable segments.
        let mut at = 0;
        for seg in c.writable() {
            let n = (seg.len as usize).min(frame.len() - at);
            // SAFETY: as above.
            assert_eq!(unsafe { seg.write_from(0, &frame[at..at + n]) }, n);
            let o = (seg.gpa - WINDOW) as usize;
            model[o..o + n].copy_from_slice(&frame[at..at + n]);
            at += n;
        }
        assert_eq!(at, frame.len());
        let mut back = vec![0u8; model.len()];
        drv.memory().read(WINDOW, &mut back).unwrap();
        assert!(
            back == model,
            "the frame where it belongs, nothing else written"
        );
        // Lengths that do not fit: a copy longer than the segment stops at its end, an offset at
        // or past its end copies nothing; the bytes after the segment stay untouched.
        let seg = &c.writable()[0];
        let big = vec![0x3cu8; 4096];
        // SAFETY: as above.
        unsafe {
            assert_eq!(seg.write_from(0, &big), 77);
            assert_eq!(seg.write_from(77, &big), 0);
            assert_eq!(seg.write_from(usize::MAX, &big), 0);
            assert_eq!(seg.write_from(70, &big), 7);
        }
        model[0xf011 - WINDOW as usize..][..77].fill(0x3c);
        drv.memory().read(WINDOW, &mut back).unwrap();
        assert!(back == model, "wrote past the segment");
        let seg = &c.readable()[0];
        let mut out = vec![0u8; 4096];
        // SAFETY: as above.
        unsafe {
            assert_eq!(seg.read_to(0, &mut out), 509);
            assert_eq!(seg.read_to(509, &mut out), 0);
            assert_eq!(seg.read_to(usize::MAX, &mut out), 0);
        }
        // (The writable buffers overlap it: what it holds now is the model's.)
        assert_eq!(out[..509], model[0xfb03 - WINDOW as usize..][..509]);
        assert!(out[509..].iter().all(|&b| b == 0), "read past the segment");
    }

    #[test]
    fn indirect_chain_and_write_flag_on_the_table_descriptor_is_ignored() {
        let (mut drv, mut dev) = pair(8, false);
        let head = drv
            .add_indirect(0x4000, &[(0x8000, 16)], &[(0x9000, 32), (0x9100, 8)])
            .unwrap();
        // Set WRITE on the ring descriptor pointing at the table: must be ignored.
        let d = Descriptor::new(0x4000, 48, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0);
        drv.memory()
            .write(DESC + 16 * u64::from(head), &d.to_le_bytes())
            .unwrap();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        dev.pop_batch(&mut batch, 4).unwrap();
        let c = batch.get(0).unwrap();
        assert_eq!(c.head(), head);
        assert_eq!(c.descriptors(), 3);
        assert_eq!((c.readable().len(), c.writable().len()), (1, 2));
        assert_eq!((c.readable_len(), c.writable_len()), (16, 40));
        assert_eq!(drv.free_descriptors(), 7);
    }

    #[test]
    fn indirect_needs_the_feature() {
        let (drv_mem, dev_mem) = shared_memory(&[(0, 0x10000)]);
        let cfg = QueueConfig {
            indirect: false,
            ..config(8, false)
        };
        let mut drv = SplitQueueDriver::new(drv_mem.clone(), cfg).unwrap();
        assert!(drv.add_indirect(0x4000, &[(0x8000, 1)], &[]).is_err());
        // Write the indirect descriptor by hand.
        drv_mem
            .write(
                DESC,
                &Descriptor::new(0x4000, 16, VIRTQ_DESC_F_INDIRECT, 0).to_le_bytes(),
            )
            .unwrap();
        drv_mem
            .write(0x4000, &Descriptor::new(0x8000, 1, 0, 0).to_le_bytes())
            .unwrap();
        drv_mem.store_u16(AVAIL + 2, 1, Ordering::Release).unwrap();
        let mut dev = SplitQueue::new(cfg).unwrap();
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
    fn batch_respects_max_and_reuse_keeps_capacity() {
        let (mut drv, mut dev) = pair(16, false);
        let mut heads = Vec::new();
        for i in 0..10u64 {
            heads.push(drv.add_chain(&[(0x8000 + 0x100 * i, 16)], &[]).unwrap());
        }
        drv.publish().unwrap();
        let mut batch = ChainBatch::with_capacity(16, 16);
        assert_eq!(dev.pop_batch(&mut batch, 4).unwrap(), 4);
        assert_eq!(dev.pop_batch(&mut batch, 4).unwrap(), 4, "appends");
        assert_eq!(batch.len(), 8);
        let got: Vec<u16> = batch.iter().map(|c| c.head()).collect();
        assert_eq!(got, heads[..8]);
        let (cc, sc) = (batch.chains.capacity(), batch.segments.capacity());
        batch.clear();
        assert!(batch.is_empty());
        assert_eq!(
            (batch.chains.capacity(), batch.segments.capacity()),
            (cc, sc)
        );
        assert_eq!(dev.pop_batch(&mut batch, 100).unwrap(), 2);
        assert_eq!(dev.pop_batch(&mut batch, 100).unwrap(), 0);
        assert_eq!(dev.pop_batch(&mut batch, 0).unwrap(), 0);
        assert_eq!(dev.next_avail(), 10);
    }

    #[test]
    fn notifications_without_event_idx_follow_avail_flags() {
        let (mut drv, mut dev) = pair(8, false);
        let mut batch = ChainBatch::new();
        let mut round = |drv: &mut SplitQueueDriver, dev: &mut SplitQueue| {
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
        assert!(
            round(&mut drv, &mut dev),
            "first completion after attach always notifies"
        );
        assert!(!round(&mut drv, &mut dev), "NO_INTERRUPT set");
        assert!(!drv.enable_call_notifications().unwrap());
        assert!(round(&mut drv, &mut dev), "flags 0: must notify");
        assert!(round(&mut drv, &mut dev));
        assert!(!dev.publish_used().unwrap(), "nothing pushed: no notify");
    }

    #[test]
    fn notifications_with_event_idx_follow_used_event() {
        let (mut drv, mut dev) = pair(8, true);
        let mut batch = ChainBatch::new();
        // Three chains completed one publish at a time; used_event says "after 2nd entry".
        for i in 0..3u64 {
            drv.add_chain(&[(0x8000 + i * 0x100, 1)], &[]).unwrap();
        }
        drv.publish().unwrap();
        dev.pop_batch(&mut batch, 8).unwrap();
        // used_event = 1: notify when used idx moves past 1, i.e. reaches 2.
        drv.memory()
            .store_u16(AVAIL + 4 + 2 * 8, 1, Ordering::Release)
            .unwrap();
        let heads: Vec<u16> = batch.iter().map(|c| c.head()).collect();
        dev.push_used(heads[0], 0).unwrap();
        assert!(
            dev.publish_used().unwrap(),
            "first decision always notifies"
        );
        dev.push_used(heads[1], 0).unwrap();
        assert!(
            dev.publish_used().unwrap(),
            "idx 1 -> 2 crosses used_event 1"
        );
        dev.push_used(heads[2], 0).unwrap();
        assert!(!dev.publish_used().unwrap(), "idx 2 -> 3 does not");

        // Batched: old = 3, push 3 more (new = 6), used_event = 4 lies in [3, 6).
        for i in 0..3u64 {
            drv.add_chain(&[(0x8000 + i * 0x100, 1)], &[]).unwrap();
        }
        while drv.reap_used().unwrap().is_some() {}
        drv.publish().unwrap();
        batch.clear();
        dev.pop_batch(&mut batch, 8).unwrap();
        drv.memory()
            .store_u16(AVAIL + 4 + 2 * 8, 4, Ordering::Release)
            .unwrap();
        for c in batch.iter() {
            dev.push_used(c.head(), 0).unwrap();
        }
        assert!(dev.publish_used().unwrap());
        // used_event = 6 is not in [6, 6+1) until a new entry: push one and it is.
        drv.memory()
            .store_u16(AVAIL + 4 + 2 * 8, 7, Ordering::Release)
            .unwrap();
        while drv.reap_used().unwrap().is_some() {}
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.publish().unwrap();
        batch.clear();
        dev.pop_batch(&mut batch, 8).unwrap();
        dev.push_used(batch.get(0).unwrap().head(), 0).unwrap();
        assert!(!dev.publish_used().unwrap(), "6 -> 7 does not cross 7");
    }

    #[test]
    fn driver_enable_call_sets_used_event_and_device_honours_it() {
        let (mut drv, mut dev) = pair(8, true);
        let mut batch = ChainBatch::new();
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.add_chain(&[(0x8100, 1)], &[]).unwrap();
        drv.publish().unwrap();
        dev.pop_batch(&mut batch, 8).unwrap();
        dev.push_used(batch.get(0).unwrap().head(), 0).unwrap();
        assert!(dev.publish_used().unwrap());
        drv.reap_used().unwrap().unwrap();
        // The driver re-arms at last_used = 1; nothing new is there yet.
        assert!(!drv.enable_call_notifications().unwrap());
        dev.push_used(batch.get(1).unwrap().head(), 0).unwrap();
        assert!(dev.publish_used().unwrap(), "1 -> 2 crosses used_event 1");
    }

    #[test]
    fn kick_suppression_without_event_idx() {
        let (mut drv, mut dev) = pair(8, false);
        dev.disable_notifications().unwrap();
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        assert!(!drv.publish().unwrap(), "NO_NOTIFY: no kick");
        assert!(
            dev.enable_notifications().unwrap(),
            "work arrived while notifications were off"
        );
        let mut batch = ChainBatch::new();
        dev.pop_batch(&mut batch, 8).unwrap();
        assert!(!dev.enable_notifications().unwrap());
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        assert!(drv.publish().unwrap());
    }

    #[test]
    fn kick_suppression_with_event_idx() {
        let (mut drv, mut dev) = pair(8, true);
        let mut batch = ChainBatch::new();
        // avail_event starts at 0: the first chain (idx 0 -> 1) kicks.
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        assert!(drv.publish().unwrap());
        dev.pop_batch(&mut batch, 8).unwrap();
        dev.disable_notifications().unwrap();
        // avail_event stays at 0: 1 -> 2 does not cross it.
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        assert!(!drv.publish().unwrap());
        assert!(dev.enable_notifications().unwrap(), "work pending");
        dev.pop_batch(&mut batch, 8).unwrap();
        assert!(!dev.enable_notifications().unwrap());
        // avail_event = 2 now: 2 -> 3 crosses it.
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        assert!(drv.publish().unwrap());
        assert_eq!(
            drv.memory()
                .load_u16(USED + 4 + 8 * 8, Ordering::Acquire)
                .unwrap(),
            2
        );
    }

    #[test]
    fn avail_index_wraps_at_65535() {
        let (drv_mem, dev_mem) = shared_memory(&[(0, 0x10000)]);
        let cfg = config(4, true);
        let mut drv = SplitQueueDriver::with_start_index(drv_mem, cfg, 65533).unwrap();
        let mut dev = SplitQueue::new(cfg).unwrap();
        dev.attach(dev_mem).unwrap();
        dev.set_next_avail(65533);
        assert_eq!(dev.next_used(), 65533, "next_used read from used.idx");
        let mut batch = ChainBatch::new();
        let mut completed = 0u32;
        for round in 0..5u64 {
            batch.clear();
            let mut heads = Vec::new();
            for i in 0..3u64 {
                heads.push(
                    drv.add_chain(&[(0x8000 + 0x10 * (round * 3 + i), 4)], &[])
                        .unwrap(),
                );
            }
            drv.publish().unwrap();
            assert_eq!(dev.pending().unwrap(), 3);
            assert_eq!(dev.pop_batch(&mut batch, 8).unwrap(), 3);
            let got: Vec<u16> = batch.iter().map(|c| c.head()).collect();
            assert_eq!(got, heads);
            for &h in &heads {
                dev.push_used(h, 0).unwrap();
            }
            dev.publish_used().unwrap();
            let mut reaped = Vec::new();
            while let Some((h, _)) = drv.reap_used().unwrap() {
                reaped.push(h);
            }
            assert_eq!(reaped, heads);
            completed += 3;
        }
        assert_eq!(dev.next_avail(), 65533u16.wrapping_add(completed as u16));
        assert_eq!(dev.next_avail(), 12);
        assert_eq!(dev.next_used(), 12);
    }

    #[test]
    fn reattach_to_a_new_snapshot_reads_used_idx_and_resets_signalling() {
        let (drv_mem, dev_mem) = shared_memory(&[(0, 0x10000), (0x10000, 0x10000)]);
        let cfg = config(8, false);
        let mut drv = SplitQueueDriver::new(drv_mem.clone(), cfg).unwrap();
        let mut dev = SplitQueue::new(cfg).unwrap();
        dev.attach(dev_mem).unwrap();
        let mut batch = ChainBatch::new();
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.publish().unwrap();
        dev.pop_batch(&mut batch, 8).unwrap();
        dev.push_used(batch.get(0).unwrap().head(), 0).unwrap();
        assert!(dev.publish_used().unwrap());
        drv.reap_used().unwrap().unwrap();
        drv.disable_call_notifications().unwrap();

        // New snapshot (as after SET_MEM_TABLE): the driver's mapping of the same memfd, so the
        // host addresses differ from the old snapshot's.
        let new_mem = crate::memory::GuestMemory::new(drv_mem.regions().to_vec()).unwrap();
        let old = dev.memory().unwrap().clone();
        dev.attach(new_mem).unwrap();
        drop(old);
        assert_eq!(dev.next_used(), 1);
        assert_eq!(dev.next_avail(), 1, "next_avail is kept");
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.publish().unwrap();
        batch.clear();
        dev.pop_batch(&mut batch, 8).unwrap();
        let seg = batch.get(0).unwrap().readable()[0];
        assert_eq!(
            seg.host,
            drv_mem.slice(0x8000, 1).unwrap().as_ptr(),
            "segments come from the new snapshot"
        );
        dev.push_used(batch.get(0).unwrap().head(), 0).unwrap();
        assert!(
            dev.publish_used().unwrap(),
            "first completion after re-attach notifies despite NO_INTERRUPT"
        );
        assert_eq!(drv.reap_used().unwrap().map(|(_, l)| l), Some(0));

        dev.detach();
        assert!(!dev.is_attached());
        assert_eq!(dev.pending(), Err(QueueError::NotReady));
    }

    #[test]
    fn broken_queue_stays_broken() {
        let (drv, mut dev) = pair(8, false);
        drv.memory()
            .store_u16(AVAIL + 2, 9, Ordering::Release)
            .unwrap();
        let mut batch = ChainBatch::new();
        assert!(matches!(
            dev.pop_batch(&mut batch, 8),
            Err(QueueError::AvailIndexJump {
                avail_idx: 9,
                next_avail: 0,
                pending: 9,
                size: 8
            })
        ));
        assert!(dev.is_broken());
        let reason = dev.broken_reason().unwrap().to_owned();
        assert_eq!(
            dev.pop_batch(&mut batch, 8),
            Err(QueueError::Broken(reason.clone()))
        );
        assert_eq!(dev.push_used(0, 0), Err(QueueError::Broken(reason.clone())));
        assert_eq!(dev.publish_used(), Err(QueueError::Broken(reason.clone())));
        assert_eq!(dev.enable_notifications(), Err(QueueError::Broken(reason)));
    }

    #[test]
    fn push_used_checks_head_and_capacity() {
        let (_, mut dev) = pair(2, false);
        assert_eq!(dev.push_used(2, 0), Err(QueueError::UnknownHead(2)));
        dev.push_used(0, 0).unwrap();
        dev.push_used(1, 0).unwrap();
        assert_eq!(dev.push_used(0, 0), Err(QueueError::Full));
        assert!(!dev.is_broken(), "caller mistakes do not break the queue");
        dev.publish_used().unwrap();
        dev.push_used(0, 0).unwrap();
    }

    fn memfd_log(size: u64) -> std::sync::Arc<crate::dirty_log::DirtyLog> {
        let fd = crate::memory::create_memfd("log", size).unwrap();
        std::sync::Arc::new(crate::dirty_log::DirtyLog::map(fd, size, 0).unwrap())
    }

    /// Pop the one published chain, write `data` at the start of its writable part, push it
    /// with `used_len` and publish.
    fn complete_one(dev: &mut SplitQueue, data: &[u8], used_len: u32) {
        let mut batch = ChainBatch::new();
        assert_eq!(dev.pop_batch(&mut batch, 4).unwrap(), 1);
        let c = batch.get(0).unwrap();
        // SAFETY: the device queue is alive.
        unsafe { c.writable()[0].write_from(0, data) };
        dev.push_used(c.head(), used_len).unwrap();
        dev.publish_used().unwrap();
    }

    #[test]
    fn logging_marks_writable_buffers_and_used_ring_writes_at_the_log_address() {
        let (mut drv, mut dev) = pair(8, true);
        let log = memfd_log(16); // 128 pages: guest addresses below 0x80000
        drv.add_chain(&[(0x8000, 16)], &[(0x9000, 64)]).unwrap();
        drv.publish().unwrap();
        complete_one(&mut dev, b"before", 6);
        assert!(log.dirty_pages().is_empty(), "no log set yet");

        // The used ring is logged 8 bytes below a page boundary: used.idx (offset 2) falls on
        // the page before it, the element of slot 1 (offset 12) and avail_event (offset 68) on it.
        dev.set_log(Some(QueueLog {
            log: log.clone(),
            used_ring: Some(0x7_0000 - 8),
        }));
        // Writable: one buffer across the region boundary at 0x10000, one byte on page 0x12000.
        drv.add_chain(&[(0xA000, 16)], &[(0xF800, 0x1000), (0x12000, 1)])
            .unwrap();
        drv.publish().unwrap();
        // A used length that leaves the last byte out (as blk does after a failed read): the
        // whole writable part is still logged.
        complete_one(&mut dev, b"data", 4);
        assert!(!dev.enable_notifications().unwrap());
        assert_eq!(
            log.dirty_pages(),
            vec![0xF000, 0x1_0000, 0x1_2000, 0x6_F000, 0x7_0000],
            "readable page 0xA000 and the real used ring at {USED:#x} stay clean"
        );
        assert_eq!(log.faults(), 0);

        dev.set_log(None);
        drv.add_chain(&[], &[(0x1_4000, 64)]).unwrap();
        drv.publish().unwrap();
        complete_one(&mut dev, b"after", 5);
        assert_eq!(
            log.dirty_pages().len(),
            5,
            "nothing logged after set_log(None)"
        );
    }

    #[test]
    fn buffers_only_without_a_used_ring_log_address() {
        let (mut drv, mut dev) = pair(8, false);
        let log = memfd_log(16);
        dev.set_log(Some(QueueLog {
            log: log.clone(),
            used_ring: None,
        }));
        drv.add_chain(&[], &[(0x2_0000 - 1, 1)]).unwrap();
        drv.publish().unwrap();
        complete_one(&mut dev, b"x", 1);
        dev.disable_notifications().unwrap();
        assert_eq!(log.dirty_pages(), vec![0x1_F000]);
    }

    #[test]
    fn a_chain_changed_under_the_device_is_a_log_fault_not_a_broken_queue() {
        let (mut drv, mut dev) = pair(8, false);
        let log = memfd_log(16);
        dev.set_log(Some(QueueLog {
            log: log.clone(),
            used_ring: Some(USED),
        }));
        let head = drv.add_chain(&[], &[(0x9000, 64)]).unwrap();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(dev.pop_batch(&mut batch, 4).unwrap(), 1);
        // The driver rewrites the popped head: it now links outside the table.
        let bad = Descriptor::new(0x9000, 64, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 100);
        drv.memory()
            .write(DESC + 16 * u64::from(head), &bad.to_le_bytes())
            .unwrap();
        dev.push_used(head, 64).unwrap();
        assert!(dev.publish_used().unwrap());
        assert_eq!(log.faults(), 1);
        assert!(!log.is_dirty(0x9000));
        assert!(log.is_dirty(USED), "the used ring is still logged");
        assert!(!dev.is_broken());
    }

    fn inflight_view(region: &std::sync::Arc<crate::inflight::InflightRegion>) -> SplitInflight {
        region.split_queue(0, 8).unwrap()
    }

    #[test]
    fn restarted_queue_resubmits_exactly_what_was_in_flight_then_new_entries() {
        use crate::inflight::{InflightRegion, RingLayout};
        let region =
            std::sync::Arc::new(InflightRegion::allocate(RingLayout::Split, 1, 8).unwrap());
        let (mut drv, mut dev) = pair(8, false);
        let memory = dev.memory().unwrap().clone();
        assert_eq!(
            dev.set_inflight(inflight_view(&region)).unwrap().resubmit,
            vec![]
        );
        let heads: Vec<u16> = (0..4u64)
            .map(|i| drv.add_chain(&[(0x8000 + 0x100 * i, 16)], &[]).unwrap())
            .collect();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(dev.pop_batch(&mut batch, 8).unwrap(), 4);
        // Out of order: the third completes, then the back-end dies with three in flight.
        dev.push_used(heads[2], 0).unwrap();
        dev.publish_used().unwrap();
        drop(dev);
        assert_eq!(drv.reap_used().unwrap(), Some((heads[2], 0)));
        let late = drv.add_chain(&[(0x9000, 16)], &[]).unwrap();
        drv.publish().unwrap();

        // The front-end says base 1 (its used idx, QEMU's fallback); the region knows better.
        let mut dev = SplitQueue::new(config(8, false)).unwrap();
        dev.attach(memory).unwrap();
        dev.set_next_avail(1);
        let recovery = dev.set_inflight(inflight_view(&region)).unwrap();
        assert_eq!(recovery.resubmit, vec![heads[0], heads[1], heads[3]]);
        assert_eq!(dev.next_avail(), 4, "used.idx 1 + 3 in flight");
        assert_eq!(dev.pending().unwrap(), 4);
        batch.clear();
        assert_eq!(dev.pop_batch(&mut batch, 2).unwrap(), 2);
        let got: Vec<u16> = batch.iter().map(|c| c.head()).collect();
        assert_eq!(got, vec![heads[0], heads[1]]);
        batch.clear();
        assert_eq!(dev.pop_batch(&mut batch, 8).unwrap(), 2);
        let got: Vec<u16> = batch.iter().map(|c| c.head()).collect();
        assert_eq!(
            got,
            vec![heads[3], late],
            "resubmissions first, then the new entry"
        );
        assert_eq!(batch.get(0).unwrap().readable()[0].gpa, 0x8300);
        assert_eq!(dev.pop_batch(&mut batch, 8).unwrap(), 0, "nothing twice");
        for head in [heads[0], heads[1], heads[3], late] {
            dev.push_used(head, 0).unwrap();
        }
        dev.publish_used().unwrap();
        let mut reaped: Vec<u16> = std::iter::from_fn(|| drv.reap_used().unwrap())
            .map(|(h, _)| h)
            .collect();
        reaped.sort_unstable();
        let mut want = vec![heads[0], heads[1], heads[3], late];
        want.sort_unstable();
        assert_eq!(reaped, want);
        // Everything completed: a further restart resubmits nothing.
        let mut dev = SplitQueue::new(config(8, false)).unwrap();
        dev.attach(drv.memory().clone()).unwrap();
        let recovery = dev.set_inflight(inflight_view(&region)).unwrap();
        assert_eq!((recovery.resubmit, dev.next_avail()), (vec![], 5));
    }

    #[test]
    fn crash_between_used_idx_and_clearing_does_not_resubmit_the_batch() {
        use crate::inflight::{InflightRegion, RingLayout};
        let region =
            std::sync::Arc::new(InflightRegion::allocate(RingLayout::Split, 1, 8).unwrap());
        let (mut drv, mut dev) = pair(8, false);
        let memory = dev.memory().unwrap().clone();
        let mut view = inflight_view(&region);
        view.recover(0);
        let a = drv.add_chain(&[(0x8000, 16)], &[]).unwrap();
        let b = drv.add_chain(&[(0x8100, 16)], &[]).unwrap();
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        dev.set_inflight(view.clone()).unwrap();
        dev.pop_batch(&mut batch, 8).unwrap();
        // What publish_used does up to the crash: entry and link written, used.idx bumped, flags
        // not cleared yet.
        view.record_used(a);
        memory.store_u16(USED + 4, a, Ordering::Relaxed).unwrap();
        memory.store_u16(USED + 2, 1, Ordering::Release).unwrap();
        drop(dev);
        let mut dev = SplitQueue::new(config(8, false)).unwrap();
        dev.attach(memory).unwrap();
        let recovery = dev.set_inflight(inflight_view(&region)).unwrap();
        assert_eq!(recovery.resubmit, vec![b]);
        assert_eq!(dev.next_avail(), 2);
        assert_eq!(drv.reap_used().unwrap(), Some((a, 0)));
    }

    #[test]
    fn inflight_view_must_match_the_ring_size() {
        use crate::inflight::{InflightRegion, RingLayout};
        let region =
            std::sync::Arc::new(InflightRegion::allocate(RingLayout::Split, 1, 16).unwrap());
        let (_, mut dev) = pair(8, false);
        let view = region.split_queue(0, 4).unwrap();
        assert!(matches!(
            dev.set_inflight(view),
            Err(QueueError::InvalidConfig(_))
        ));
        let mut detached = SplitQueue::new(config(8, false)).unwrap();
        assert_eq!(
            detached.set_inflight(region.split_queue(0, 8).unwrap()),
            Err(QueueError::NotReady)
        );
    }

    /// Overwrite ring descriptor `index` through the driver's view of memory.
    fn set_desc(drv: &SplitQueueDriver, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = Descriptor::new(addr, len, flags, next);
        drv.memory()
            .write(DESC + 16 * u64::from(index), &desc.to_le_bytes())
            .unwrap();
    }

    /// A small deterministic generator for the shape tests (no external crate needed).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Random buffers in both regions of `pair`: empty ones, ones crossing the region boundary,
    /// ones in either region (so the region cache moves between chains and inside chains).
    fn random_buffers(rng: &mut Lcg, n: u64) -> Vec<(u64, u32)> {
        (0..n)
            .map(|_| {
                let len = [0, 1, 64, 1500, 0x800][rng.below(5) as usize];
                let addr = match rng.below(4) {
                    0 => 0x10000 - rng.below(0x400),
                    1 => 0x4000 + rng.below(0xb000),
                    _ => 0x10000 + rng.below(0xf000),
                };
                (addr, len)
            })
            .collect()
    }

    /// Whatever path a chain takes in `pop_batch` (the plain walk or the general one), the result
    /// is exactly what the general walk `pop_chain` makes of it: same chain fields, same
    /// segments. Random mixes of one-buffer and multi-buffer direct chains, empty buffers,
    /// buffers crossing regions and indirect chains, several per batch.
    #[test]
    fn plain_walk_matches_the_general_walk_for_random_chains() {
        let (mut drv, mut dev) = pair(64, false);
        let mut rng = Lcg(0x5eed);
        let mut batch = ChainBatch::new();
        let mut plain_seen = 0;
        for round in 0..300 {
            let chains = 1 + rng.below(8);
            for k in 0..chains {
                let (r, w) = match rng.below(4) {
                    0 => (1, 0),
                    1 => (0, 1),
                    2 => (rng.below(3), 1 + rng.below(3)),
                    _ => (1 + rng.below(3), rng.below(3)),
                };
                let (readable, writable) =
                    (random_buffers(&mut rng, r), random_buffers(&mut rng, w));
                if rng.below(6) == 0 {
                    let table = 0x3800 + 0x80 * k;
                    drv.add_indirect(table, &readable, &writable).unwrap();
                } else {
                    drv.add_chain(&readable, &writable).unwrap();
                }
            }
            drv.publish().unwrap();
            batch.clear();
            assert_eq!(
                dev.pop_batch(&mut batch, 64).unwrap() as u64,
                chains,
                "round {round}"
            );
            let rings = dev.rings.as_ref().unwrap();
            let mut cache = 0;
            let mut translator = Translator {
                regions: rings.memory().regions(),
                cache: &mut cache,
                iova: false,
            };
            for view in batch.iter() {
                let mut segments = Vec::new();
                let (want, _) = pop_chain(
                    rings,
                    &dev.config,
                    &mut translator,
                    view.head(),
                    &mut segments,
                )
                .unwrap();
                let got = view.chain();
                assert_eq!(
                    (
                        got.head,
                        got.descriptors,
                        got.readable_len,
                        got.writable_len
                    ),
                    (
                        want.head,
                        want.descriptors,
                        want.readable_len,
                        want.writable_len
                    ),
                    "round {round}"
                );
                assert_eq!(view.readable(), &segments[want.segments.start..want.mid]);
                assert_eq!(view.writable(), &segments[want.mid..want.segments.end]);
                if want.descriptors == 1 && segments.len() <= 1 {
                    plain_seen += 1;
                }
            }
            for view in batch.iter() {
                dev.push_used(view.head(), 0).unwrap();
            }
            dev.publish_used().unwrap();
            while drv.reap_used().unwrap().is_some() {}
        }
        assert!(
            plain_seen > 100,
            "the mix has one-buffer chains: {plain_seen}"
        );
    }

    /// A bad chain after plain ones: the plain ones are popped, the bad one is refused with the
    /// general walk's reason whatever made the plain walk give up on it.
    #[test]
    fn plain_chains_then_a_bad_one() {
        type Corrupt = fn(&SplitQueueDriver, u16);
        let cases: [(&str, Corrupt, ChainFault); 5] = [
            (
                "readable after writable",
                |drv, head| {
                    set_desc(
                        drv,
                        head,
                        0x9000,
                        8,
                        VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                        7,
                    );
                    set_desc(drv, 7, 0x9100, 8, 0, 0);
                },
                ChainFault::ReadableAfterWritable,
            ),
            (
                "total length past u32",
                |drv, head| {
                    set_desc(drv, head, 0x9000, 16, VIRTQ_DESC_F_NEXT, 7);
                    set_desc(drv, 7, 0x9100, u32::MAX - 8, VIRTQ_DESC_F_WRITE, 0);
                },
                ChainFault::LengthOverflow,
            ),
            (
                "a loop",
                |drv, head| set_desc(drv, head, 0x9000, 8, VIRTQ_DESC_F_NEXT, head),
                ChainFault::TooLong { limit: 8 },
            ),
            (
                "next past the table",
                |drv, head| set_desc(drv, head, 0x9000, 8, VIRTQ_DESC_F_NEXT, 8),
                ChainFault::NextOutOfRange {
                    index: 0,
                    next: 8,
                    limit: 8,
                },
            ),
            (
                "a buffer past the end of memory",
                |drv, head| set_desc(drv, head, 0x1ff00, 0x200, VIRTQ_DESC_F_WRITE, 0),
                ChainFault::BufferOutOfRange {
                    addr: 0x1ff00,
                    len: 0x200,
                },
            ),
        ];
        for (what, corrupt, reason) in cases {
            let (mut drv, mut dev) = pair(8, false);
            drv.add_chain(&[], &[(0x8000, 64)]).unwrap();
            drv.add_chain(&[(0x8100, 64)], &[]).unwrap();
            let bad = drv.add_chain(&[(0x8200, 64)], &[]).unwrap();
            corrupt(&drv, bad);
            drv.publish().unwrap();
            let mut batch = ChainBatch::new();
            let err = dev.pop_batch(&mut batch, 8).unwrap_err();
            let reason = match reason {
                ChainFault::NextOutOfRange { next, limit, .. } => ChainFault::NextOutOfRange {
                    index: bad,
                    next,
                    limit,
                },
                other => other,
            };
            assert_eq!(err, QueueError::BadChain { head: bad, reason }, "{what}");
            assert_eq!(batch.len(), 2, "{what}: the plain chains before it stay");
            assert_eq!(
                batch.segments().len(),
                2,
                "{what}: nothing of the bad chain stays"
            );
            assert!(dev.is_broken(), "{what}");
        }
    }

    /// Descriptors shared by two plain chains of one batch: the second is refused.
    #[test]
    fn plain_chains_sharing_descriptors_are_refused() {
        let (mut drv, mut dev) = pair(4, false);
        let a = drv.add_chain(&[(0x8000, 8), (0x8100, 8)], &[]).unwrap();
        let b = drv.add_chain(&[(0x8200, 8), (0x8300, 8)], &[]).unwrap();
        // Chain b is a's two descriptors again, then the ring holds 2 + 2 + 2 > 4.
        set_desc(&drv, b, 0x8200, 8, VIRTQ_DESC_F_NEXT, a);
        drv.publish().unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(
            dev.pop_batch(&mut batch, 4).unwrap_err(),
            QueueError::BadChain {
                head: b,
                reason: ChainFault::DescriptorsReused
            }
        );
        assert_eq!(batch.len(), 1);
    }

    #[test]
    fn queue_and_batch_are_send() {
        fn is_send<T: Send>() {}
        is_send::<SplitQueue>();
        is_send::<ChainBatch>();
        is_send::<SplitQueueDriver>();
    }
}
