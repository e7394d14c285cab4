//! Hostile rings: every malformed input gives its specific error, breaks the queue for good, and
//! nothing panics, hangs or yields memory outside a mapping.
//!
//! The explicit cases write raw descriptors and ring entries (no driver helper in between). The
//! property tests fill the rings with random bytes (and structured random descriptors) and check
//! that popping returns `Ok` or `Err` and that every returned segment lies inside the mapping.

mod common;

use std::sync::atomic::Ordering::{Acquire, Release};
use std::sync::Arc;

use proptest::prelude::*;
use vvu_core::error::ChainFault;
use vvu_core::memory::{create_memfd, GuestMemory, MemoryRegion, RegionSpec};
use vvu_core::queue::{
    ChainBatch, Descriptor, QueueConfig, Segment, SplitQueue, SplitQueueDriver,
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use vvu_core::QueueError;

/// Two adjacent regions and one after a gap.
const REGIONS: [(u64, u64); 3] = [(0, 0x10000), (0x10000, 0x10000), (0x40000, 0x10000)];
const GAP: u64 = 0x30000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUF: u64 = 0x8000;
const TABLE: u64 = 0x6000;

const NEXT: u16 = VIRTQ_DESC_F_NEXT;
const WRITE: u16 = VIRTQ_DESC_F_WRITE;
const INDIRECT: u16 = VIRTQ_DESC_F_INDIRECT;

fn memory() -> GuestMemory {
    layout_memory("queue-hostile", 0x7f00_0000_0000, &REGIONS)
}

/// Guest memory with one region per `(gpa, size)` of `layout`, all in one memfd back to back.
fn layout_memory(name: &str, uva_base: u64, layout: &[(u64, u64)]) -> GuestMemory {
    common::bound_resources();
    let total = layout.iter().map(|r| r.1).sum();
    let fd = create_memfd(name, total).unwrap();
    let mut offset = 0;
    let regions = layout
        .iter()
        .map(|&(gpa, size)| {
            let spec = RegionSpec {
                guest_phys_addr: gpa,
                size,
                userspace_addr: uva_base + gpa,
                mmap_offset: offset,
            };
            offset += size;
            Arc::new(MemoryRegion::map(fd.try_clone().unwrap(), spec).unwrap())
        })
        .collect();
    GuestMemory::new(regions).unwrap()
}

fn config(size: u16) -> QueueConfig {
    QueueConfig {
        size,
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
        event_idx: true,
        indirect: true,
    }
}

/// Raw access to a ring image plus a device queue attached to it.
struct Image {
    mem: GuestMemory,
    dev: SplitQueue,
    size: u16,
    avail_idx: u16,
}

impl Image {
    fn new(size: u16) -> Self {
        Self::with_config(config(size))
    }

    fn with_config(config: QueueConfig) -> Self {
        let mem = memory();
        let mut dev = SplitQueue::new(config).unwrap();
        dev.attach(mem.clone()).unwrap();
        Self {
            mem,
            dev,
            size: config.size,
            avail_idx: 0,
        }
    }

    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) -> &Self {
        let d = Descriptor::new(addr, len, flags, next);
        self.mem
            .write(DESC + 16 * u64::from(index), &d.to_le_bytes())
            .unwrap();
        self
    }

    fn table(&self, table: u64, entries: &[(u64, u32, u16, u16)]) -> &Self {
        for (i, &(addr, len, flags, next)) in entries.iter().enumerate() {
            let d = Descriptor::new(addr, len, flags, next);
            self.mem
                .write(table + 16 * i as u64, &d.to_le_bytes())
                .unwrap();
        }
        self
    }

    /// Make `heads` available and publish.
    fn avail(&mut self, heads: &[u16]) -> &mut Self {
        for &h in heads {
            let slot = u64::from(self.avail_idx % self.size);
            self.mem
                .store_u16(AVAIL + 4 + 2 * slot, h, Release)
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem
            .store_u16(AVAIL + 2, self.avail_idx, Release)
            .unwrap();
        self
    }

    fn pop(&mut self, max: usize) -> (ChainBatch, Result<usize, QueueError>) {
        let mut batch = ChainBatch::new();
        let result = self.dev.pop_batch(&mut batch, max);
        (batch, result)
    }

    /// Pop, expect `want`, and check the queue is broken for good with that reason.
    fn expect_broken(&mut self, want: QueueError) {
        let (batch, result) = self.pop(64);
        assert_eq!(result, Err(want.clone()));
        assert!(batch.is_empty(), "the bad chain is not added");
        self.assert_stays_broken(&want);
    }

    fn assert_stays_broken(&mut self, want: &QueueError) {
        assert!(self.dev.is_broken());
        let reason = want.to_string();
        assert_eq!(self.dev.broken_reason(), Some(reason.as_str()));
        let broken = Err(QueueError::Broken(reason));
        assert_eq!(self.pop(64).1, broken.clone().map(|()| 0));
        assert_eq!(self.dev.pending(), broken.clone().map(|()| 0));
        assert_eq!(self.dev.push_used(0, 0), broken.clone());
        assert_eq!(self.dev.publish_used(), broken.clone().map(|()| false));
        assert_eq!(
            self.dev.enable_notifications(),
            broken.clone().map(|()| false)
        );
        assert_eq!(self.dev.disable_notifications(), broken);
    }
}

fn bad(head: u16, reason: ChainFault) -> QueueError {
    QueueError::BadChain { head, reason }
}

#[test]
fn chain_of_exactly_q_descriptors_is_fine_one_more_is_a_loop() {
    let mut img = Image::new(4);
    for i in 0..4 {
        img.desc(i, BUF, 8, if i < 3 { NEXT } else { 0 }, i + 1);
    }
    img.avail(&[0]);
    let (batch, result) = img.pop(8);
    assert_eq!(result, Ok(1));
    assert_eq!(batch.get(0).unwrap().descriptors(), 4);

    // 0 -> 1 -> 2 -> 3 -> 1: longer than Q.
    let mut img = Image::new(4);
    for i in 0..4 {
        img.desc(i, BUF, 8, NEXT, if i < 3 { i + 1 } else { 1 });
    }
    img.avail(&[0]);
    img.expect_broken(bad(0, ChainFault::TooLong { limit: 4 }));
}

#[test]
fn self_loop() {
    let mut img = Image::new(256);
    img.desc(7, BUF, 8, NEXT, 7);
    img.avail(&[7]);
    img.expect_broken(bad(7, ChainFault::TooLong { limit: 256 }));
}

#[test]
fn head_and_next_out_of_range() {
    let mut img = Image::new(8);
    img.avail(&[8]);
    img.expect_broken(bad(8, ChainFault::HeadOutOfRange));

    let mut img = Image::new(8);
    img.avail(&[u16::MAX]);
    img.expect_broken(bad(u16::MAX, ChainFault::HeadOutOfRange));

    let mut img = Image::new(8);
    img.desc(2, BUF, 8, NEXT, 8);
    img.avail(&[2]);
    img.expect_broken(bad(
        2,
        ChainFault::NextOutOfRange {
            index: 2,
            next: 8,
            limit: 8,
        },
    ));
}

#[test]
fn indirect_table_walks() {
    // A table of exactly len/16 entries is fine.
    let mut img = Image::new(8);
    img.desc(0, TABLE, 48, INDIRECT, 0).table(
        TABLE,
        &[(BUF, 1, NEXT, 1), (BUF, 2, NEXT, 2), (BUF, 3, WRITE, 0)],
    );
    img.avail(&[0]);
    let (batch, result) = img.pop(8);
    assert_eq!(result, Ok(1));
    assert_eq!(batch.get(0).unwrap().descriptors(), 3);
    assert_eq!(batch.get(0).unwrap().writable_len(), 3);

    // Longer than len/16: a loop inside the table.
    let mut img = Image::new(8);
    img.desc(0, TABLE, 48, INDIRECT, 0).table(
        TABLE,
        &[(BUF, 1, NEXT, 1), (BUF, 2, NEXT, 2), (BUF, 3, NEXT, 0)],
    );
    img.avail(&[0]);
    img.expect_broken(bad(0, ChainFault::TooLong { limit: 3 }));

    // next past the table.
    let mut img = Image::new(8);
    img.desc(0, TABLE, 32, INDIRECT, 0)
        .table(TABLE, &[(BUF, 1, NEXT, 2)]);
    img.avail(&[0]);
    img.expect_broken(bad(
        0,
        ChainFault::NextOutOfRange {
            index: 0,
            next: 2,
            limit: 2,
        },
    ));
}

#[test]
fn indirect_length_must_be_a_nonzero_multiple_of_16_within_bounds() {
    for len in [0u32, 8, 17, 40, 16 * 32769, u32::MAX] {
        let mut img = Image::new(8);
        img.desc(0, TABLE, len, INDIRECT, 0);
        img.avail(&[0]);
        img.expect_broken(bad(0, ChainFault::IndirectLength { len }));
    }
}

#[test]
fn nested_indirect_and_indirect_with_next() {
    let mut img = Image::new(8);
    img.desc(0, TABLE, 32, INDIRECT, 0)
        .table(TABLE, &[(BUF, 1, NEXT, 1), (TABLE, 16, INDIRECT, 0)]);
    img.avail(&[0]);
    img.expect_broken(bad(0, ChainFault::NestedIndirect));

    let mut img = Image::new(8);
    img.desc(0, TABLE, 16, INDIRECT | NEXT, 1)
        .desc(1, BUF, 8, 0, 0)
        .table(TABLE, &[(BUF, 1, 0, 0)]);
    img.avail(&[0]);
    img.expect_broken(bad(0, ChainFault::IndirectWithNext));
}

#[test]
fn direct_descriptors_then_one_indirect_is_accepted() {
    let mut img = Image::new(8);
    img.desc(3, BUF, 10, NEXT, 5)
        .desc(5, TABLE, 32, INDIRECT | WRITE, 0)
        .table(
            TABLE,
            &[(BUF + 0x100, 20, NEXT, 1), (BUF + 0x200, 30, WRITE, 0)],
        );
    img.avail(&[3]);
    let (batch, result) = img.pop(8);
    assert_eq!(result, Ok(1));
    let c = batch.get(0).unwrap();
    assert_eq!((c.readable_len(), c.writable_len()), (30, 30));
    assert_eq!(c.readable().len(), 2);
    assert_eq!(c.descriptors(), 3);
}

#[test]
fn indirect_without_the_feature() {
    let mut img = Image::with_config(QueueConfig {
        indirect: false,
        ..config(8)
    });
    img.desc(0, TABLE, 16, INDIRECT, 0)
        .table(TABLE, &[(BUF, 1, 0, 0)]);
    img.avail(&[0]);
    img.expect_broken(bad(0, ChainFault::IndirectNotNegotiated));
}

#[test]
fn readable_after_writable() {
    let mut img = Image::new(8);
    img.desc(0, BUF, 8, WRITE | NEXT, 1).desc(1, BUF, 8, 0, 0);
    img.avail(&[0]);
    img.expect_broken(bad(0, ChainFault::ReadableAfterWritable));

    // Across the step from direct descriptors into the indirect table.
    let mut img = Image::new(8);
    img.desc(0, BUF, 8, WRITE | NEXT, 1)
        .desc(1, TABLE, 16, INDIRECT, 0)
        .table(TABLE, &[(BUF, 8, 0, 0)]);
    img.avail(&[0]);
    img.expect_broken(bad(0, ChainFault::ReadableAfterWritable));
}

#[test]
fn total_length_overflowing_u32() {
    let mut img = Image::new(8);
    img.desc(0, BUF, 16, NEXT, 1)
        .desc(1, BUF, u32::MAX - 8, WRITE, 0);
    img.avail(&[0]);
    img.expect_broken(bad(0, ChainFault::LengthOverflow));
}

#[test]
fn buffers_outside_guest_memory() {
    let cases = [
        (GAP, 8u32),        // in the hole between regions
        (0x1f_ff00, 8),     // beyond the last region
        (0x1fff8, 16),      // runs from region 2 into the hole
        (0x4fff8, 16),      // runs off the end of memory
        (u64::MAX - 4, 16), // wraps the address space
        (u64::MAX, 1),      // last byte of the address space
    ];
    for (addr, len) in cases {
        let mut img = Image::new(8);
        img.desc(0, BUF, 8, NEXT, 1).desc(1, addr, len, WRITE, 0);
        img.avail(&[0]);
        img.expect_broken(bad(0, ChainFault::BufferOutOfRange { addr, len }));
    }
    // A zero-length buffer is not translated, wherever it points.
    let mut img = Image::new(8);
    img.desc(0, GAP, 0, 0, 0);
    img.avail(&[0]);
    let (batch, result) = img.pop(8);
    assert_eq!(result, Ok(1));
    assert!(batch.segments().is_empty());
}

#[test]
fn indirect_table_outside_guest_memory() {
    for addr in [GAP, 0x1fff0, u64::MAX - 15] {
        let mut img = Image::new(8);
        img.desc(0, addr, 32, INDIRECT, 0);
        img.avail(&[0]);
        img.expect_broken(bad(
            0,
            ChainFault::IndirectTableOutOfRange { addr, len: 32 },
        ));
    }
}

#[test]
fn indirect_table_crossing_a_region_boundary_is_read_piecewise() {
    let mut img = Image::new(8);
    let table = 0x10000 - 24; // entry 1 straddles the boundary
    img.desc(0, table, 48, INDIRECT, 0).table(
        table,
        &[(BUF, 1, NEXT, 1), (BUF, 2, NEXT, 2), (BUF, 3, WRITE, 0)],
    );
    img.avail(&[0]);
    let (batch, result) = img.pop(8);
    assert_eq!(result, Ok(1));
    let c = batch.get(0).unwrap();
    let lens: Vec<u32> = c
        .readable()
        .iter()
        .chain(c.writable())
        .map(|s| s.len)
        .collect();
    assert_eq!(lens, [1, 2, 3]);
}

#[test]
fn avail_index_jump() {
    let mut img = Image::new(8);
    img.mem.store_u16(AVAIL + 2, 9, Release).unwrap();
    let want = QueueError::AvailIndexJump {
        avail_idx: 9,
        next_avail: 0,
        pending: 9,
        size: 8,
    };
    assert_eq!(img.dev.pending(), Err(want.clone()));
    img.assert_stays_broken(&want);

    // Going backwards is a jump of almost 65536.
    let mut img = Image::new(8);
    img.dev.set_next_avail(100);
    img.mem.store_u16(AVAIL + 2, 99, Release).unwrap();
    img.expect_broken(QueueError::AvailIndexJump {
        avail_idx: 99,
        next_avail: 100,
        pending: 65535,
        size: 8,
    });

    // Exactly Q ahead is fine.
    let mut img = Image::new(4);
    img.desc(0, BUF, 1, 0, 0);
    img.avail(&[0, 0, 0, 0]);
    assert_eq!(img.dev.pending(), Ok(4));
}

#[test]
fn descriptors_reused_within_a_batch() {
    let mut img = Image::new(4);
    for i in 0..3 {
        img.desc(i, BUF, 8, if i < 2 { NEXT } else { 0 }, i + 1);
    }
    img.avail(&[0, 0]);
    let (batch, result) = img.pop(8);
    assert_eq!(result, Err(bad(0, ChainFault::DescriptorsReused)));
    assert_eq!(batch.len(), 1, "the first copy was fine");
}

#[test]
fn good_chains_before_a_bad_one_stay_valid() {
    let mut img = Image::new(8);
    img.desc(0, BUF, 8, NEXT, 1)
        .desc(1, 0xfff8, 16, WRITE, 0) // crosses into region 2: two segments
        .desc(2, BUF + 0x100, 4, 0, 0)
        .desc(3, BUF, 8, NEXT, 4)
        .desc(4, GAP, 8, WRITE, 0); // bad: its first descriptor was already translated
    img.dev.set_next_avail(65534);
    img.avail_idx = 65534;
    img.avail(&[0, 2, 3, 2]);
    let (batch, result) = img.pop(8);
    assert_eq!(
        result,
        Err(bad(3, ChainFault::BufferOutOfRange { addr: GAP, len: 8 }))
    );
    assert_eq!(batch.len(), 2);
    assert_eq!(
        batch.segments().len(),
        4,
        "the bad chain's segments were dropped"
    );
    let heads: Vec<u16> = batch.iter().map(|c| c.head()).collect();
    assert_eq!(heads, [0, 2]);
    let c = batch.get(0).unwrap();
    assert_eq!(c.writable().len(), 2);
    assert_eq!((c.writable()[1].gpa, c.writable()[1].len), (0x10000, 8));
    assert_eq!(img.dev.next_avail(), 0, "consumed the two good chains only");
    assert!(img.dev.is_broken());
}

// ---------------------------------------------------------------------------------------------
// Bounded work per pop (docs/architecture.md, "Limits"): one pop walks at most 65536 descriptors
// (ring and indirect) and collects at most 65536 segments before it stops taking chains, so it
// ends at most one chain past either; a chain has at most 65536 segments.

/// Descriptors (ring and indirect) one pop walks before it stops taking chains.
const POP_DESCRIPTORS: usize = 65536;
/// Segments one pop collects before it stops taking chains; also the most one chain may have.
const POP_SEGMENTS: usize = 65536;
/// The largest indirect table, in entries.
const TABLE_ENTRIES: u32 = 32768;

/// Rings and tables in one 1 MiB region at 0, then `pieces` adjacent 4 KiB regions from
/// `PIECES` on (a buffer across all of them translates to `pieces` segments).
const PIECES: u64 = 0x10_0000;

fn big_memory(pieces: u64) -> GuestMemory {
    let layout: Vec<(u64, u64)> = std::iter::once((0, 0x10_0000))
        .chain((0..pieces).map(|i| (PIECES + 0x1000 * i, 0x1000)))
        .collect();
    layout_memory("queue-hostile-big", 0x7e00_0000_0000, &layout)
}

impl Image {
    fn with_memory(config: QueueConfig, mem: GuestMemory) -> Self {
        let mut dev = SplitQueue::new(config).unwrap();
        dev.attach(mem.clone()).unwrap();
        Self {
            mem,
            dev,
            size: config.size,
            avail_idx: 0,
        }
    }

    /// An indirect table at `table` of `entries` linked entries, each `(addr, len)` readable.
    fn linked_table(&self, table: u64, entries: u32, addr: u64, len: u32) -> &Self {
        let mut raw = Vec::with_capacity(16 * entries as usize);
        for i in 0..entries {
            let last = i + 1 == entries;
            let d = Descriptor::new(addr, len, if last { 0 } else { NEXT }, (i + 1) as u16);
            raw.extend_from_slice(&d.to_le_bytes());
        }
        self.mem.write(table, &raw).unwrap();
        self
    }

    /// Pop until the ring is empty; every pop must take at least one chain and stay within the
    /// per-pop bounds. Returns the number of chains each pop took.
    fn drain_bounded(&mut self, chains: usize) -> Vec<usize> {
        let mut takes = Vec::new();
        let mut total = 0;
        while total < chains {
            let (batch, result) = self.pop(64);
            let n = result.unwrap();
            assert!(n >= 1, "a pop always makes progress");
            let descriptors: usize = batch.iter().map(|c| usize::from(c.descriptors())).sum();
            let last = batch.get(n - 1).unwrap();
            let before_last =
                batch.segments().len() - last.readable().len() - last.writable().len();
            assert!(
                descriptors - usize::from(last.descriptors()) < POP_DESCRIPTORS,
                "the pop took a chain after its descriptor budget was spent"
            );
            assert!(
                before_last < POP_SEGMENTS,
                "the pop took a chain after its segment budget was spent"
            );
            total += n;
            takes.push(n);
        }
        assert_eq!(total, chains);
        assert!(!self.dev.is_broken());
        takes
    }
}

#[test]
fn indirect_entries_are_charged_to_the_pop_budget() {
    // Every head points at the same largest table: before the budget counted indirect entries,
    // one pop took all of them (on a 32768-entry ring that was a 6 GiB allocation).
    let mut img = Image::with_memory(config(8), big_memory(0));
    let table = 0x8_0000;
    img.linked_table(table, TABLE_ENTRIES, BUF, 1);
    for head in 0..8 {
        img.desc(head, table, 16 * TABLE_ENTRIES, INDIRECT, 0);
    }
    img.avail(&[0, 1, 2, 3, 4, 5, 6, 7]);
    // 32769 descriptors per chain: the second chain spends the budget.
    assert_eq!(img.drain_bounded(8), vec![2, 2, 2, 2]);
}

#[test]
fn segments_are_charged_to_the_pop_budget() {
    // Few descriptors, many segments: each of the 1024 table entries spans 64 regions, so every
    // chain has exactly the per-chain maximum of 65536 segments and one pop takes one chain.
    let mut img = Image::with_memory(config(8), big_memory(64));
    let table = 0x8_0000;
    img.linked_table(table, 1024, PIECES, 64 * 0x1000);
    for head in 0..4 {
        img.desc(head, table, 16 * 1024, INDIRECT, 0);
    }
    img.avail(&[0, 1, 2, 3]);
    assert_eq!(img.drain_bounded(4), vec![1, 1, 1, 1]);
}

#[test]
fn a_chain_with_too_many_segments_is_refused() {
    // 1025 entries of 64 segments each: one past the per-chain maximum.
    let mut img = Image::with_memory(config(8), big_memory(64));
    let table = 0x8_0000;
    img.linked_table(table, 1025, PIECES, 64 * 0x1000);
    img.desc(0, table, 16 * 1025, INDIRECT, 0);
    img.avail(&[0]);
    img.expect_broken(bad(
        0,
        ChainFault::TooManySegments {
            limit: POP_SEGMENTS as u32,
        },
    ));
}

#[test]
fn the_limits_are_the_documented_ones() {
    use vvu_core::queue::{
        MAX_CHAIN_SEGMENTS, MAX_INDIRECT_DESCRIPTORS, MAX_POP_DESCRIPTORS, MAX_POP_SEGMENTS,
    };
    assert_eq!(MAX_POP_DESCRIPTORS as usize, POP_DESCRIPTORS);
    assert_eq!(MAX_POP_SEGMENTS, POP_SEGMENTS);
    assert_eq!(MAX_CHAIN_SEGMENTS, POP_SEGMENTS);
    assert_eq!(MAX_INDIRECT_DESCRIPTORS, TABLE_ENTRIES);
}

#[test]
fn overlapping_ring_areas_are_refused() {
    // Q = 256 with EVENT_IDX: descriptor table 4096 bytes, available ring 518, used ring 2054.
    let ok = QueueConfig {
        desc_table: 0x1000,
        avail_ring: 0x2000,
        used_ring: 0x2208,
        ..config(256)
    };
    assert!(SplitQueue::new(ok).is_ok(), "adjacent areas are fine");
    let no_event_idx = QueueConfig {
        used_ring: 0x2204,
        event_idx: false,
        ..ok
    };
    assert!(SplitQueue::new(no_event_idx).is_ok(), "no used_event word");
    for (what, bad) in [
        (
            "avail inside desc",
            QueueConfig {
                avail_ring: 0x1ffe,
                ..ok
            },
        ),
        (
            "used inside desc",
            QueueConfig {
                used_ring: 0x1800,
                ..ok
            },
        ),
        (
            "desc inside used",
            QueueConfig {
                desc_table: 0x2400,
                ..ok
            },
        ),
        (
            "used ring over used_event",
            QueueConfig {
                used_ring: 0x2204,
                ..ok
            },
        ),
        (
            "all at one address",
            QueueConfig {
                desc_table: 0x4000,
                avail_ring: 0x4000,
                used_ring: 0x4000,
                ..ok
            },
        ),
        (
            "wrapping past 2^64",
            QueueConfig {
                used_ring: u64::MAX - 3,
                ..ok
            },
        ),
    ] {
        assert!(
            matches!(SplitQueue::new(bad), Err(QueueError::InvalidConfig(_))),
            "{what}: {bad:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Random rings.

/// Every segment lies inside one region of `mem`, with a host pointer matching its gpa.
fn assert_inside(mem: &GuestMemory, segments: &[Segment]) {
    for s in segments {
        assert!(s.len > 0);
        let region = mem
            .regions()
            .iter()
            .find(|r| {
                let base = r.host_addr() as usize;
                let host = s.host as usize;
                host >= base && host + s.len as usize <= base + r.size() as usize
            })
            .unwrap_or_else(|| panic!("segment {s:?} outside every mapping"));
        assert_eq!(
            s.gpa,
            region.guest_phys_addr() + (s.host as usize - region.host_addr() as usize) as u64
        );
    }
}

#[derive(Debug, Clone)]
struct RandomRing {
    size_log2: u32,
    event_idx: bool,
    indirect: bool,
    next_avail: u16,
    /// Raw bytes for the descriptor table, the avail ring, the used ring and the table area.
    desc: Vec<u8>,
    avail: Vec<u8>,
    used: Vec<u8>,
    tables: Vec<u8>,
    /// Structured descriptors (addr, len, flags, next): 256 for the ring, 32 for the table area.
    structured: Vec<(u64, u32, u16, u16)>,
    avail_ahead: u16,
    maxes: Vec<usize>,
}

/// xorshift64: structured random descriptors from one seed (a proptest strategy per field of
/// 288 descriptors is too slow in debug builds).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Pick an arm with the given weights.
    fn pick(&mut self, weights: &[u64]) -> usize {
        let mut x = self.next() % weights.iter().sum::<u64>();
        for (i, &w) in weights.iter().enumerate() {
            if x < w {
                return i;
            }
            x -= w;
        }
        0
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// `(addr, len, flags, next)` biased towards mapped buffers, boundaries and table-sized lengths.
fn interesting_descriptor(rng: &mut Rng) -> (u64, u32, u16, u16) {
    let addr = match rng.pick(&[4, 2, 2, 1, 1, 1, 1]) {
        0 => rng.range(BUF, BUF + 0x1000),
        1 => rng.range(TABLE, TABLE + 0x200),
        2 => rng.range(0xff00, 0x10100),
        3 => rng.range(0x1ff00, 0x20100),
        4 => rng.range(0x4ff00, 0x50100),
        5 => rng.next(),
        _ => u64::MAX - rng.next() % 0x100,
    };
    let len = match rng.pick(&[4, 2, 1, 1]) {
        0 => rng.range(0, 0x200) as u32,
        1 => 16 * rng.range(1, 40) as u32,
        2 => rng.next() as u32,
        _ => u32::MAX - (rng.next() % 0x100) as u32,
    };
    let flags = match rng.pick(&[6, 2, 1]) {
        0 => rng.range(0, 4) as u16,
        1 => rng.range(4, 8) as u16,
        _ => rng.next() as u16,
    };
    (addr, len, flags, rng.next() as u16)
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn random_ring() -> impl Strategy<Value = RandomRing> {
    // Random bytes from a seed: a proptest value tree per byte is slow and shrinks nowhere useful.
    let bytes = |n: usize| any::<u64>().prop_map(move |seed| random_bytes(seed, n));
    (
        (0u32..=8, any::<bool>(), any::<bool>(), any::<u16>()),
        (
            bytes(16 * 256),
            bytes(6 + 2 * 256),
            bytes(6 + 8 * 256),
            bytes(0x200),
        ),
        any::<u64>().prop_map(|seed| {
            let mut rng = Rng(seed | 1);
            (0..256 + 32)
                .map(|_| interesting_descriptor(&mut rng))
                .collect::<Vec<_>>()
        }),
        any::<u16>(),
        prop::collection::vec(1usize..40, 1..6),
    )
        .prop_map(
            |(
                (size_log2, event_idx, indirect, next_avail),
                (desc, avail, used, tables),
                structured,
                avail_ahead,
                maxes,
            )| {
                RandomRing {
                    size_log2,
                    event_idx,
                    indirect,
                    next_avail,
                    desc,
                    avail,
                    used,
                    tables,
                    structured,
                    avail_ahead,
                    maxes,
                }
            },
        )
}

fn run_random(r: &RandomRing, structured: bool) {
    let size = 1u16 << r.size_log2;
    let q = usize::from(size);
    let cfg = QueueConfig {
        event_idx: r.event_idx,
        indirect: r.indirect,
        ..config(size)
    };
    let mem = memory();
    mem.write(DESC, &r.desc[..16 * q]).unwrap();
    mem.write(AVAIL, &r.avail[..6 + 2 * q]).unwrap();
    mem.write(USED, &r.used[..6 + 8 * q]).unwrap();
    mem.write(TABLE, &r.tables).unwrap();
    if structured {
        // Every ring descriptor and 32 indirect-table entries from the structured list, with
        // `next` mostly inside the table, heads mostly in range and the avail index mostly at
        // most Q ahead, so that chains get walked rather than refused at the first check.
        for (i, &(addr, len, flags, next)) in r.structured.iter().enumerate() {
            let (at, limit) = if i < q {
                (DESC + 16 * i as u64, size)
            } else if i >= 256 {
                (TABLE + 16 * (i - 256) as u64, 32)
            } else {
                continue;
            };
            let next = if next % 8 == 0 { next } else { next % limit };
            let d = Descriptor::new(addr, len, flags, next);
            mem.write(at, &d.to_le_bytes()).unwrap();
        }
        for k in 0..size {
            let raw =
                u16::from_le_bytes([r.avail[2 * usize::from(k)], r.avail[2 * usize::from(k) + 1]]);
            let head = if raw % 16 == 0 { raw } else { raw % size };
            mem.store_u16(AVAIL + 4 + 2 * u64::from(k), head, Release)
                .unwrap();
        }
        let ahead = if r.avail_ahead % 8 == 0 {
            r.avail_ahead
        } else {
            r.avail_ahead % (size + 1)
        };
        mem.store_u16(AVAIL + 2, r.next_avail.wrapping_add(ahead), Release)
            .unwrap();
    }
    let mut next_avail = r.next_avail;
    if !structured && r.avail_ahead % 2 == 0 {
        // Random rings, but a device position at most Q behind the random avail idx, so that the
        // random descriptors get walked rather than refused by the index check.
        let idx = u16::from_le_bytes([r.avail[2], r.avail[3]]);
        next_avail = idx.wrapping_sub((r.avail_ahead / 2) % (size + 1));
    }
    let mut dev = SplitQueue::new(cfg).unwrap();
    dev.attach(mem.clone()).unwrap();
    dev.set_next_avail(next_avail);
    let mut batch = ChainBatch::new();
    for &max in &r.maxes {
        batch.clear();
        let result = dev.pop_batch(&mut batch, max);
        assert!(batch.len() <= max);
        assert_inside(&mem, batch.segments());
        for c in batch.iter() {
            assert!(c.head() < size);
            let r_len: u64 = c.readable().iter().map(|s| u64::from(s.len)).sum();
            let w_len: u64 = c.writable().iter().map(|s| u64::from(s.len)).sum();
            assert_eq!(
                (r_len, w_len),
                (u64::from(c.readable_len()), u64::from(c.writable_len()))
            );
        }
        match result {
            Ok(n) => {
                assert_eq!(n, batch.len());
                for c in batch.iter() {
                    dev.push_used(c.head(), c.writable_len()).unwrap();
                }
                let _ = dev.publish_used().unwrap();
                let _ = dev.enable_notifications().unwrap();
            }
            Err(e) => {
                assert!(
                    !matches!(e, QueueError::Broken(_)),
                    "first error is specific"
                );
                assert!(dev.is_broken());
                assert!(matches!(
                    dev.pop_batch(&mut batch, 1),
                    Err(QueueError::Broken(_))
                ));
                break;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(2048), ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_and_segments_stay_mapped(r in random_ring()) {
        run_random(&r, false);
    }

    #[test]
    fn structured_random_chains_never_panic_and_segments_stay_mapped(r in random_ring()) {
        run_random(&r, true);
    }

    /// The driver side against a random used ring: `Ok` or `Err`, never a panic, and never a
    /// head that was not in flight.
    #[test]
    fn driver_survives_random_used_rings(
        size_log2 in 0u32..=6,
        chains in 0usize..64,
        used in prop::collection::vec(any::<u8>(), 6 + 8 * 64),
        idx_ahead in prop_oneof![0u16..=64, any::<u16>()],
        small_ids in any::<bool>(),
    ) {
        let size = 1u16 << size_log2;
        let q = usize::from(size);
        let mem = memory();
        let mut drv = SplitQueueDriver::new(mem.clone(), config(size)).unwrap();
        let mut in_flight = std::collections::HashMap::new();
        for i in 0..chains {
            let w = (BUF + 64 * i as u64, 16 + i as u32);
            let head = match drv.add_chain(&[(BUF, 8)], &[w]) {
                Err(QueueError::Full) => match drv.add_indirect(TABLE, &[(BUF, 8)], &[w]) {
                    Err(QueueError::Full) => break,
                    other => other.unwrap(),
                },
                other => other.unwrap(),
            };
            in_flight.insert(head, w.1);
        }
        let _ = drv.publish().unwrap();
        let mut raw = used[..4 + 8 * q].to_vec();
        if small_ids {
            for k in 0..q {
                raw[4 + 8 * k + 1] = 0;
                raw[4 + 8 * k + 2] = 0;
                raw[4 + 8 * k + 3] = 0;
                raw[4 + 8 * k] %= size as u8 | 1;
            }
        }
        mem.write(USED + 4, &raw[4..]).unwrap();
        mem.store_u16(USED + 2, idx_ahead, Release).unwrap();
        let before = mem.load_u16(USED + 2, Acquire).unwrap();
        prop_assert_eq!(before, idx_ahead);
        loop {
            match drv.reap_used() {
                Ok(Some((head, len))) => {
                    let writable = in_flight.remove(&head).expect("reaped a head in flight");
                    prop_assert!(len <= writable);
                }
                Ok(None) => break,
                Err(e) => {
                    prop_assert!(drv.is_broken());
                    prop_assert!(!matches!(e, QueueError::Broken(_)));
                    prop_assert!(matches!(drv.reap_used(), Err(QueueError::Broken(_))));
                    break;
                }
            }
        }
        prop_assert_eq!(drv.in_flight(), in_flight.len());
    }
}
