//! Virtqueues. Split ring: device side ([`SplitQueue`]) and driver side ([`SplitQueueDriver`]);
//! packed ring: [`PackedQueue`] and [`PackedQueueDriver`].
//!
//! Both sides work on ring areas in guest memory that they translate once, when they are given a
//! [`GuestMemory`] snapshot, and keep the snapshot so that the mapping outlives every pointer they
//! hand out. Every ring field is accessed with a naturally aligned atomic operation; the ordering
//! of each access follows `virtqueue-layouts.md` §3 (device) and §1.6 (driver), and each barrier is
//! commented with the rule it implements.
//!
//! Both sides treat the other as untrusted: anything read from the rings is validated, and a
//! violation marks the queue broken instead of panicking, hanging or touching memory outside a
//! mapping.
//!
//! # Limits
//!
//! The work and memory of one device-side pop are bounded whatever the driver writes: a chain
//! holds at most Q ring descriptors and at most one indirect table of at most
//! [`MAX_INDIRECT_DESCRIPTORS`] entries, and translates to at most [`MAX_CHAIN_SEGMENTS`]
//! segments; a pop stops taking chains once it walked [`MAX_POP_DESCRIPTORS`] descriptors (ring
//! and indirect) or collected [`MAX_POP_SEGMENTS`] segments, leaving the rest in the ring; the
//! segment list grows with `try_reserve`, so a failed allocation breaks the queue instead of
//! aborting the process. Ring areas must not overlap.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

use crate::error::QueueError;
use crate::memory::{Access, GuestMemory};

mod driver;
mod packed;
mod packed_driver;
mod split;
mod virtqueue;

pub use driver::SplitQueueDriver;
pub use packed::{
    PackedConfig, PackedDescriptor, PackedQueue, PackedState, RingPosition, RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED,
};
pub use packed_driver::PackedQueueDriver;
pub use split::{Chain, ChainBatch, ChainView, Segment, SplitQueue};
pub use virtqueue::Virtqueue;

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device write-only.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// `avail.flags`: the driver asks for no used-buffer notifications (ignored with EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used.flags`: the device asks for no available-buffer notifications (ignored with EVENT_IDX).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Largest queue size the spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Largest indirect table the device accepts, in descriptors. The spec sets no number; real
/// drivers stay far below it, and a bound keeps one chain's work finite.
pub const MAX_INDIRECT_DESCRIPTORS: u32 = MAX_QUEUE_SIZE as u32;
/// Most segments one chain may translate to (more breaks the queue): one per descriptor of the
/// longest chain (Q − 1 ring descriptors and a full indirect table, below 65536), plus pieces at
/// region boundaries. QEMU stops at 1024 per chain; we accept every chain QEMU's drivers build.
pub const MAX_CHAIN_SEGMENTS: usize = 65536;
/// A pop stops taking chains once it has walked this many descriptors (ring descriptors and
/// indirect table entries): it ends at most one chain past it, and the chains left stay in the
/// ring for the next call. Never reached by chains without indirect tables (those use at most
/// Q ≤ 32768 ring descriptors per pop); two full indirect tables reach it.
pub const MAX_POP_DESCRIPTORS: u32 = 2 * MAX_QUEUE_SIZE as u32;
/// A pop stops taking chains once it has collected this many segments (at most one chain, that
/// is [`MAX_CHAIN_SEGMENTS`], past it): with 24-byte segments, below 3 MiB per pop.
pub const MAX_POP_SEGMENTS: usize = 65536;

/// Refuse ring areas that wrap past the end of the address space or overlap: the device writes
/// the used areas, and a write landing in what it reads (or vice versa) is not a ring.
fn check_disjoint(areas: &[(&str, u64, u64)]) -> Result<(), QueueError> {
    let end = |name: &str, addr: u64, len: u64| {
        addr.checked_add(len).ok_or_else(|| {
            QueueError::InvalidConfig(format!(
                "{name} {addr:#x}+{len:#x} wraps past the end of the address space"
            ))
        })
    };
    for (i, &(name, addr, len)) in areas.iter().enumerate() {
        let this_end = end(name, addr, len)?;
        for &(other, other_addr, other_len) in &areas[..i] {
            let other_end = end(other, other_addr, other_len)?;
            if addr < other_end && other_addr < this_end {
                return Err(QueueError::InvalidConfig(format!(
                    "{name} {addr:#x}+{len:#x} overlaps {other} {other_addr:#x}+{other_len:#x}"
                )));
            }
        }
    }
    Ok(())
}

/// The spec's `virtq_need_event` (Linux `vring_need_event`): after moving an index from `old` to
/// `new`, notify iff `event` lies in `[old, new)`, all modulo 2^16.
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Where a split virtqueue lives and which ring features apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Number of descriptors Q: a power of two, 1..=32768.
    pub size: u16,
    /// Guest-physical address of the descriptor table (16-byte aligned, 16·Q bytes).
    pub desc_table: u64,
    /// Guest-physical address of the available ring (2-byte aligned).
    pub avail_ring: u64,
    /// Guest-physical address of the used ring (4-byte aligned).
    pub used_ring: u64,
    /// VIRTIO_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// VIRTIO_F_INDIRECT_DESC negotiated.
    pub indirect: bool,
}

impl QueueConfig {
    /// Check size and alignment.
    pub fn validate(&self) -> Result<(), QueueError> {
        let bad = |what: String| Err(QueueError::InvalidConfig(what));
        if self.size == 0 || !self.size.is_power_of_two() || self.size > MAX_QUEUE_SIZE {
            return bad(format!(
                "queue size {} is not a power of two in 1..=32768",
                self.size
            ));
        }
        for (name, addr, align) in [
            ("descriptor table", self.desc_table, 16),
            ("available ring", self.avail_ring, 2),
            ("used ring", self.used_ring, 4),
        ] {
            if addr % align != 0 {
                return bad(format!(
                    "{name} address {addr:#x} is not {align}-byte aligned"
                ));
            }
        }
        check_disjoint(&[
            ("descriptor table", self.desc_table, self.desc_table_len()),
            ("available ring", self.avail_ring, self.avail_ring_len()),
            ("used ring", self.used_ring, self.used_ring_len()),
        ])
    }

    /// Bytes of the descriptor table.
    pub fn desc_table_len(&self) -> u64 {
        16 * u64::from(self.size)
    }

    /// Bytes of the available ring that must be mapped: the trailing `used_event` only with
    /// EVENT_IDX (some front-ends register the ring without it).
    pub fn avail_ring_len(&self) -> u64 {
        4 + 2 * u64::from(self.size) + if self.event_idx { 2 } else { 0 }
    }

    /// Bytes of the used ring that must be mapped: the trailing `avail_event` only with EVENT_IDX.
    pub fn used_ring_len(&self) -> u64 {
        4 + 8 * u64::from(self.size) + if self.event_idx { 2 } else { 0 }
    }
}

/// One split-ring descriptor (`struct virtq_desc`), in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Descriptor {
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Self {
            addr,
            len,
            flags,
            next,
        }
    }

    /// The 16 little-endian bytes of the descriptor as it sits in guest memory.
    pub fn to_le_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..14].copy_from_slice(&self.flags.to_le_bytes());
        out[14..].copy_from_slice(&self.next.to_le_bytes());
        out
    }

    /// Decode 16 little-endian bytes.
    pub fn from_le_bytes(raw: [u8; 16]) -> Self {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
        Self {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }

    /// Decode from the two little-endian u64 halves (as loaded from memory).
    #[inline]
    fn from_le_words(lo: u64, hi: u64) -> Self {
        let hi = u64::from_le(hi);
        Self {
            addr: u64::from_le(lo),
            len: hi as u32,
            flags: (hi >> 32) as u16,
            next: (hi >> 48) as u16,
        }
    }

    /// Read a descriptor at `ptr`: two relaxed atomic u64 loads when 8-byte aligned, a volatile
    /// byte copy otherwise (indirect tables need no alignment).
    ///
    /// # Safety
    /// `ptr..ptr + 16` must lie inside a live mapping.
    #[inline]
    unsafe fn read_at(ptr: *const u8) -> Self {
        if (ptr as usize) % 8 == 0 {
            // SAFETY: in bounds per the contract and 8-byte aligned (checked).
            unsafe { Self::read_aligned(ptr) }
        } else {
            // SAFETY: in bounds per the contract; `[u8; 16]` has alignment 1.
            Self::from_le_bytes(unsafe { std::ptr::read_volatile(ptr.cast::<[u8; 16]>()) })
        }
    }

    /// Read a descriptor at an 8-byte aligned `ptr` (a ring's table): two relaxed atomic u64
    /// loads, without `read_at`'s alignment test.
    ///
    /// # Safety
    /// `ptr..ptr + 16` must lie inside a live mapping, and `ptr` must be 8-byte aligned.
    #[inline(always)]
    unsafe fn read_aligned(ptr: *const u8) -> Self {
        // SAFETY: in bounds and aligned per the contract; atomics make concurrent writes by the
        // other side well defined.
        let (lo, hi) = unsafe {
            (
                AtomicU64::from_ptr(ptr as *mut u64).load(Ordering::Relaxed),
                AtomicU64::from_ptr(ptr.add(8) as *mut u64).load(Ordering::Relaxed),
            )
        };
        Self::from_le_words(lo, hi)
    }
}

/// `Broken(reason)`, out of line: the string clone kept every caller's hot path saving
/// registers it only needed on this path.
#[cold]
#[inline(never)]
fn broken_error(reason: &str) -> QueueError {
    QueueError::Broken(reason.to_owned())
}

/// The attached rings of a queue (either format), or why there are none.
#[inline]
pub(crate) fn ready<'a, R>(
    broken: &Option<String>,
    rings: &'a Option<R>,
) -> Result<&'a R, QueueError> {
    if let Some(reason) = broken {
        return Err(broken_error(reason));
    }
    // A match, not `ok_or(QueueError::NotReady)`: the eagerly built error was dropped on every
    // success (a call to its drop glue per pushed used entry, 1 % of the net per-frame path).
    match rings {
        Some(rings) => Ok(rings),
        None => Err(QueueError::NotReady),
    }
}

/// Translate one ring area (`len` bytes at `gpa`, needing `need` access, which only IOTLB windows
/// can refuse) to a host pointer aligned to `align`. Under an IOTLB an untranslated area is a miss
/// (the ring waits for the translation), otherwise a bad address.
pub(crate) fn ring_area(
    mem: &GuestMemory,
    gpa: u64,
    len: u64,
    align: usize,
    name: &str,
    need: Access,
) -> Result<NonNull<u8>, QueueError> {
    let ptr = match mem.slice_exact_for(gpa, len, need) {
        Ok(slice) => slice.as_ptr(),
        Err(err) => {
            return Err(match mem.first_unmapped(gpa, len) {
                Some(iova) if mem.is_iova() => QueueError::IotlbMiss { iova, access: need },
                _ => err.into(),
            })
        }
    };
    if (ptr as usize) % align != 0 {
        return Err(QueueError::InvalidConfig(format!(
            "{name} at {gpa:#x} maps to a host address that is not {align}-byte aligned"
        )));
    }
    // A successful translation never yields null.
    NonNull::new(ptr).ok_or_else(|| QueueError::InvalidConfig(format!("{name}: null")))
}

/// Host pointers to the three ring areas of one queue, valid while `mem` (kept here) lives.
///
/// Invariant: `desc` covers `16·Q` bytes and is 8-byte aligned; `avail` covers `4 + 2·Q` bytes
/// and `used` `4 + 8·Q` bytes, 2- and 4-byte aligned; `used_event` / `avail_event` are `Some`
/// only when the trailing word was mapped (EVENT_IDX), and are then 2-byte aligned.
pub(crate) struct Rings {
    mem: GuestMemory,
    mask: u16,
    size: u16,
    desc: NonNull<u8>,
    avail: NonNull<u8>,
    used: NonNull<u8>,
    used_event: Option<NonNull<u8>>,
    avail_event: Option<NonNull<u8>>,
}

// SAFETY: the pointers point into mappings kept alive by `mem` (whose regions are Send + Sync),
// and every access through them is atomic or goes through `&mut self` of the owner.
unsafe impl Send for Rings {}
// SAFETY: see `Send`; shared access only performs atomic loads and stores.
unsafe impl Sync for Rings {}

impl Rings {
    /// Translate the ring areas of `config` in `mem`; each must lie within one region.
    pub(crate) fn new(mem: GuestMemory, config: &QueueConfig) -> Result<Self, QueueError> {
        config.validate()?;
        // The device reads the descriptor table and the available ring and writes the used ring
        // (only IOTLB windows can refuse an access).
        let area = |gpa, len, align, name, need| ring_area(&mem, gpa, len, align, name, need);
        let desc = area(
            config.desc_table,
            config.desc_table_len(),
            8,
            "descriptor table",
            Access::READ,
        )?;
        let avail = area(
            config.avail_ring,
            config.avail_ring_len(),
            2,
            "available ring",
            Access::READ,
        )?;
        let used = area(
            config.used_ring,
            config.used_ring_len(),
            4,
            "used ring",
            Access::WRITE,
        )?;
        let q = usize::from(config.size);
        let (used_event, avail_event) = if config.event_idx {
            // SAFETY: with EVENT_IDX the areas were translated including the trailing word, so
            // both offsets are inside them; alignment follows from the area alignment.
            unsafe { (Some(avail.add(4 + 2 * q)), Some(used.add(4 + 8 * q))) }
        } else {
            (None, None)
        };
        Ok(Self {
            mem,
            mask: config.size - 1,
            size: config.size,
            desc,
            avail,
            used,
            used_event,
            avail_event,
        })
    }

    pub(crate) fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    #[inline]
    fn u16_at(&self, base: NonNull<u8>, offset: usize) -> &AtomicU16 {
        // SAFETY: callers pass offsets inside the area per the struct invariant, with 2-byte
        // alignment; the mapping lives as long as `self.mem`, which outlives the borrow of self.
        unsafe { AtomicU16::from_ptr(base.as_ptr().add(offset).cast()) }
    }

    #[inline]
    fn u32_at(&self, base: NonNull<u8>, offset: usize) -> &AtomicU32 {
        // SAFETY: as in `u16_at`, with 4-byte alignment (used ring elements).
        unsafe { AtomicU32::from_ptr(base.as_ptr().add(offset).cast()) }
    }

    #[inline]
    pub(crate) fn avail_flags(&self, order: Ordering) -> u16 {
        u16::from_le(self.u16_at(self.avail, 0).load(order))
    }
    #[inline]
    pub(crate) fn set_avail_flags(&self, value: u16, order: Ordering) {
        self.u16_at(self.avail, 0).store(value.to_le(), order)
    }
    #[inline]
    pub(crate) fn avail_idx(&self, order: Ordering) -> u16 {
        u16::from_le(self.u16_at(self.avail, 2).load(order))
    }
    #[inline]
    pub(crate) fn set_avail_idx(&self, value: u16, order: Ordering) {
        self.u16_at(self.avail, 2).store(value.to_le(), order)
    }
    /// `avail.ring[idx % Q]`.
    #[inline]
    pub(crate) fn avail_entry(&self, idx: u16, order: Ordering) -> u16 {
        let slot = usize::from(idx & self.mask);
        u16::from_le(self.u16_at(self.avail, 4 + 2 * slot).load(order))
    }
    #[inline]
    pub(crate) fn set_avail_entry(&self, idx: u16, head: u16, order: Ordering) {
        let slot = usize::from(idx & self.mask);
        self.u16_at(self.avail, 4 + 2 * slot)
            .store(head.to_le(), order)
    }
    /// `used_event` (0 when EVENT_IDX is off: never read then).
    #[inline]
    pub(crate) fn used_event(&self, order: Ordering) -> u16 {
        self.used_event
            .map_or(0, |p| u16::from_le(self.u16_at(p, 0).load(order)))
    }
    #[inline]
    pub(crate) fn set_used_event(&self, value: u16, order: Ordering) {
        if let Some(p) = self.used_event {
            self.u16_at(p, 0).store(value.to_le(), order)
        }
    }
    #[inline]
    pub(crate) fn used_flags(&self, order: Ordering) -> u16 {
        u16::from_le(self.u16_at(self.used, 0).load(order))
    }
    #[inline]
    pub(crate) fn set_used_flags(&self, value: u16, order: Ordering) {
        self.u16_at(self.used, 0).store(value.to_le(), order)
    }
    #[inline]
    pub(crate) fn used_idx(&self, order: Ordering) -> u16 {
        u16::from_le(self.u16_at(self.used, 2).load(order))
    }
    #[inline]
    pub(crate) fn set_used_idx(&self, value: u16, order: Ordering) {
        self.u16_at(self.used, 2).store(value.to_le(), order)
    }
    /// `used.ring[idx % Q]` as `(id, len)`.
    #[inline]
    pub(crate) fn used_entry(&self, idx: u16, order: Ordering) -> (u32, u32) {
        let offset = 4 + 8 * usize::from(idx & self.mask);
        (
            u32::from_le(self.u32_at(self.used, offset).load(order)),
            u32::from_le(self.u32_at(self.used, offset + 4).load(order)),
        )
    }
    #[inline]
    pub(crate) fn set_used_entry(&self, idx: u16, id: u32, len: u32, order: Ordering) {
        let offset = 4 + 8 * usize::from(idx & self.mask);
        self.u32_at(self.used, offset).store(id.to_le(), order);
        self.u32_at(self.used, offset + 4).store(len.to_le(), order);
    }
    /// `avail_event` (0 when EVENT_IDX is off: never read then).
    #[inline]
    pub(crate) fn avail_event(&self, order: Ordering) -> u16 {
        self.avail_event
            .map_or(0, |p| u16::from_le(self.u16_at(p, 0).load(order)))
    }
    #[inline]
    pub(crate) fn set_avail_event(&self, value: u16, order: Ordering) {
        if let Some(p) = self.avail_event {
            self.u16_at(p, 0).store(value.to_le(), order)
        }
    }

    /// Descriptor `index` of the ring's table; `index` must be below Q (masked for safety).
    #[inline]
    pub(crate) fn descriptor(&self, index: u16) -> Descriptor {
        let offset = 16 * usize::from(index & self.mask);
        // SAFETY: offset + 16 <= 16·Q, inside the table, which is 8-byte aligned (struct
        // invariant), as is every 16-byte entry of it.
        unsafe { Descriptor::read_aligned(self.desc.as_ptr().add(offset)) }
    }

    /// Write descriptor `index` (driver side only), as two relaxed atomic u64 stores.
    pub(crate) fn set_descriptor(&self, index: u16, desc: &Descriptor) {
        let offset = 16 * usize::from(index & self.mask);
        let raw = desc.to_le_bytes();
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&raw[..8]);
        hi.copy_from_slice(&raw[8..]);
        // SAFETY: offset + 16 <= 16·Q, inside the table, which is 8-byte aligned.
        unsafe {
            let ptr = self.desc.as_ptr().add(offset);
            AtomicU64::from_ptr(ptr.cast()).store(u64::from_ne_bytes(lo), Ordering::Relaxed);
            AtomicU64::from_ptr(ptr.add(8).cast()).store(u64::from_ne_bytes(hi), Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rings")
            .field("size", &self.size)
            .field("desc", &self.desc)
            .field("avail", &self.avail)
            .field("used", &self.used)
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::Arc;

    use crate::memory::{create_memfd, GuestMemory, MemoryRegion, RegionSpec};

    /// One memfd mapped twice (driver view, device view) as the given `(gpa, size)` regions laid
    /// out back to back in the file.
    pub(crate) fn shared_memory(regions: &[(u64, u64)]) -> (GuestMemory, GuestMemory) {
        let total: u64 = regions.iter().map(|r| r.1).sum();
        let fd = create_memfd("queue-test", total).unwrap();
        let map = |fd: &std::os::fd::OwnedFd| {
            let mut offset = 0;
            let mut out = Vec::new();
            for &(gpa, size) in regions {
                out.push(Arc::new(
                    MemoryRegion::map(
                        fd.try_clone().unwrap(),
                        RegionSpec {
                            guest_phys_addr: gpa,
                            size,
                            userspace_addr: 0x7000_0000_0000 + gpa,
                            mmap_offset: offset,
                        },
                    )
                    .unwrap(),
                ));
                offset += size;
            }
            GuestMemory::new(out).unwrap()
        };
        (map(&fd), map(&fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_the_spec_examples() {
        assert!(need_event(11, 13, 10));
        assert!(!need_event(13, 13, 10));
        assert!(need_event(10, 13, 10));
        assert!(!need_event(9, 13, 10));
        // Wrap-around: old 65534, new 2 covers 65534, 65535, 0, 1.
        assert!(need_event(65535, 2, 65534));
        assert!(need_event(1, 2, 65534));
        assert!(!need_event(2, 2, 65534));
        assert!(!need_event(0, 5, 5), "nothing added, never notify");
    }

    #[test]
    fn config_validation() {
        let ok = QueueConfig {
            size: 256,
            desc_table: 0x1000,
            avail_ring: 0x2002,
            used_ring: 0x3004,
            event_idx: false,
            indirect: false,
        };
        assert!(ok.validate().is_ok());
        for size in [0u16, 3, 100, 65535] {
            assert!(matches!(
                QueueConfig { size, ..ok }.validate(),
                Err(QueueError::InvalidConfig(_))
            ));
        }
        let big = QueueConfig {
            size: 32768,
            avail_ring: 0x8_1000,
            used_ring: 0xA_0000,
            ..ok
        };
        assert!(big.validate().is_ok());
        assert!(
            matches!(
                QueueConfig { size: 32768, ..ok }.validate(),
                Err(QueueError::InvalidConfig(_))
            ),
            "a 512 KiB table at 0x1000 runs over the available ring"
        );
        assert!(QueueConfig { size: 1, ..ok }.validate().is_ok());
        for bad in [
            QueueConfig {
                desc_table: 0x1008,
                ..ok
            },
            QueueConfig {
                avail_ring: 0x2001,
                ..ok
            },
            QueueConfig {
                used_ring: 0x3002,
                ..ok
            },
        ] {
            assert!(matches!(bad.validate(), Err(QueueError::InvalidConfig(_))));
        }
        assert_eq!(ok.avail_ring_len(), 4 + 512);
        assert_eq!(
            QueueConfig {
                event_idx: true,
                ..ok
            }
            .used_ring_len(),
            6 + 8 * 256
        );
    }

    #[test]
    fn descriptor_round_trips_through_bytes_and_words() {
        let d = Descriptor::new(0x1122_3344_5566_7788, 0x99aa_bbcc, 0x0007, 0xfedc);
        let raw = d.to_le_bytes();
        assert_eq!(Descriptor::from_le_bytes(raw), d);
        let lo = u64::from_ne_bytes(raw[..8].try_into().unwrap());
        let hi = u64::from_ne_bytes(raw[8..].try_into().unwrap());
        assert_eq!(Descriptor::from_le_words(lo, hi), d);
        // An 8-byte aligned buffer, read at offsets 8 (atomic path) and 3 (byte path).
        let mut words = [0u64; 4];
        // SAFETY: plain bytes of our own array.
        let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), 32) };
        bytes[8..24].copy_from_slice(&raw);
        // SAFETY: 16 bytes inside `words`.
        assert_eq!(unsafe { Descriptor::read_at(bytes.as_ptr().add(8)) }, d);
        bytes[3..19].copy_from_slice(&raw);
        // SAFETY: 16 bytes inside `words`.
        assert_eq!(unsafe { Descriptor::read_at(bytes.as_ptr().add(3)) }, d);
    }
}
