//! Hostile packed rings: every malformed input gives its specific error, breaks the queue for
//! good, and nothing panics, hangs or yields memory outside a mapping.
//!
//! The explicit cases write raw descriptors (no driver helper in between). The property tests
//! fill the ring with random bytes (and structured random descriptors, mostly marked available
//! in the expected wrap) and check that popping returns `Ok` or `Err` and that every returned
//! segment lies inside the mapping; and they hand the driver side random used descriptors.

mod common;

use std::sync::atomic::Ordering::Release;
use std::sync::Arc;

use proptest::prelude::*;
use vvu_core::error::ChainFault;
use vvu_core::memory::{create_memfd, GuestMemory, MemoryRegion, RegionSpec};
use vvu_core::queue::{
    ChainBatch, PackedConfig, PackedDescriptor, PackedQueue, PackedQueueDriver, PackedState,
    RingPosition, Segment, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE,
};
use vvu_core::QueueError;

/// Two adjacent regions and one after a gap.
const REGIONS: [(u64, u64); 3] = [(0, 0x10000), (0x10000, 0x10000), (0x40000, 0x10000)];
const GAP: u64 = 0x30000;
const DESC: u64 = 0x0;
const DRIVER_EVENT: u64 = 0x3000;
const DEVICE_EVENT: u64 = 0x3010;
const BUF: u64 = 0x8000;
const TABLE: u64 = 0x6000;

const NEXT: u16 = VIRTQ_DESC_F_NEXT;
const WRITE: u16 = VIRTQ_DESC_F_WRITE;
const INDIRECT: u16 = VIRTQ_DESC_F_INDIRECT;
/// Available in wrap 1.
const AVAIL: u16 = VIRTQ_DESC_F_AVAIL;
/// Available in wrap 0.
const AVAIL0: u16 = VIRTQ_DESC_F_USED;

fn memory() -> GuestMemory {
    common::bound_resources();
    let total = REGIONS.iter().map(|r| r.1).sum();
    let fd = create_memfd("queue-packed-hostile", total).unwrap();
    let mut offset = 0;
    let regions = REGIONS
        .iter()
        .map(|&(gpa, size)| {
            let spec = RegionSpec {
                guest_phys_addr: gpa,
                size,
                userspace_addr: 0x7f00_0000_0000 + gpa,
                mmap_offset: offset,
            };
            offset += size;
            Arc::new(MemoryRegion::map(fd.try_clone().unwrap(), spec).unwrap())
        })
        .collect();
    GuestMemory::new(regions).unwrap()
}

fn config(size: u16) -> PackedConfig {
    PackedConfig {
        size,
        desc_ring: DESC,
        driver_event: DRIVER_EVENT,
        device_event: DEVICE_EVENT,
        event_idx: true,
        indirect: true,
    }
}

/// Raw access to a ring image plus a device queue attached to it.
struct Image {
    mem: GuestMemory,
    dev: PackedQueue,
}

impl Image {
    fn new(size: u16) -> Self {
        Self::with_config(config(size))
    }

    fn with_config(config: PackedConfig) -> Self {
        let mem = memory();
        let mut dev = PackedQueue::new(config).unwrap();
        dev.attach(mem.clone()).unwrap();
        Self { mem, dev }
    }

    /// Write the whole descriptor at `slot`, flags last with Release (as a driver publishes).
    fn desc(&self, slot: u16, addr: u64, len: u32, id: u16, flags: u16) -> &Self {
        let at = DESC + 16 * u64::from(slot);
        let d = PackedDescriptor::new(addr, len, id, 0);
        self.mem.write(at, &d.to_le_bytes()[..14]).unwrap();
        self.mem.store_u16(at + 14, flags, Release).unwrap();
        self
    }

    fn table(&self, table: u64, entries: &[(u64, u32, u16)]) -> &Self {
        for (i, &(addr, len, flags)) in entries.iter().enumerate() {
            let d = PackedDescriptor::new(addr, len, 0, flags);
            self.mem
                .write(table + 16 * i as u64, &d.to_le_bytes())
                .unwrap();
        }
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
fn chain_of_exactly_q_descriptors_is_fine_a_longer_one_is_refused() {
    let mut img = Image::new(4);
    for slot in 0..3 {
        img.desc(slot, BUF, 1, 0, AVAIL | NEXT);
    }
    img.desc(3, BUF, 1, 2, AVAIL);
    let (batch, result) = img.pop(8);
    assert_eq!(result, Ok(1));
    assert_eq!(
        batch.get(0).unwrap().head(),
        2,
        "the id of the last descriptor"
    );
    assert_eq!(batch.get(0).unwrap().descriptors(), 4);
    assert_eq!(
        img.dev.next_avail(),
        RingPosition {
            index: 0,
            wrap: false
        }
    );

    // Every slot says NEXT: the walk stops after Q descriptors instead of going round forever.
    let mut img = Image::new(4);
    for slot in 0..4 {
        img.desc(slot, BUF, 1, 0, AVAIL | NEXT);
    }
    img.expect_broken(bad(0, ChainFault::TooLong { limit: 4 }));
}

#[test]
fn a_list_running_into_the_next_lap_needs_that_laps_wrap() {
    // Start at slot 3 of 4: the list continues at slot 0, which must say "available in wrap 0".
    let mut img = Image::new(4);
    let start = RingPosition {
        index: 3,
        wrap: true,
    };
    img.dev
        .set_state(PackedState {
            next_avail: start,
            next_used: start,
        })
        .unwrap();
    img.desc(3, BUF, 1, 0, AVAIL | NEXT)
        .desc(0, BUF, 1, 1, AVAIL0);
    assert_eq!(img.pop(8).1, Ok(1));
    assert_eq!(
        img.dev.next_avail(),
        RingPosition {
            index: 1,
            wrap: false
        }
    );

    // The same list with slot 0 still marked for wrap 1 (stale or forged): refused.
    let mut img = Image::new(4);
    img.dev
        .set_state(PackedState {
            next_avail: start,
            next_used: start,
        })
        .unwrap();
    img.desc(3, BUF, 1, 0, AVAIL | NEXT)
        .desc(0, BUF, 1, 1, AVAIL);
    img.expect_broken(bad(3, ChainFault::NotAvailable { index: 0 }));
}

#[test]
fn descriptors_not_available_in_the_expected_wrap_are_not_taken() {
    for flags in [0, AVAIL0, AVAIL | VIRTQ_DESC_F_USED, AVAIL0 | NEXT] {
        let mut img = Image::new(4);
        img.desc(0, BUF, 1, 0, flags);
        assert_eq!(img.pop(8).1, Ok(0), "flags {flags:#x}");
        assert_eq!(img.dev.pending(), Ok(0));
        assert!(!img.dev.enable_notifications().unwrap());
        assert!(!img.dev.is_broken());
    }
    // A chain whose second descriptor was never made available.
    let mut img = Image::new(4);
    img.desc(0, BUF, 1, 0, AVAIL | NEXT).desc(1, BUF, 1, 0, 0);
    img.expect_broken(bad(0, ChainFault::NotAvailable { index: 1 }));
}

#[test]
fn buffer_ids_out_of_range_or_already_in_flight() {
    let mut img = Image::new(4);
    img.desc(0, BUF, 1, 4, AVAIL);
    img.expect_broken(bad(0, ChainFault::BufferIdOutOfRange { id: 4, size: 4 }));

    let mut img = Image::new(4);
    img.desc(0, BUF, 1, 2, AVAIL).desc(1, BUF, 1, 2, AVAIL);
    let want = bad(1, ChainFault::BufferIdInFlight { id: 2 });
    let (batch, result) = img.pop(8);
    assert_eq!(result, Err(want.clone()));
    assert_eq!(batch.len(), 1, "the first use of the id was fine");
    img.assert_stays_broken(&want);

    // Once used, the id may come back.
    let mut img = Image::new(4);
    img.desc(0, BUF, 1, 2, AVAIL);
    assert_eq!(img.pop(8).1, Ok(1));
    img.dev.push_used(2, 0).unwrap();
    img.dev.publish_used().unwrap();
    img.desc(1, BUF, 1, 2, AVAIL);
    assert_eq!(img.pop(8).1, Ok(1));
    assert_eq!(img.dev.push_used(3, 0), Err(QueueError::UnknownHead(3)));
    assert_eq!(img.dev.push_used(40, 0), Err(QueueError::UnknownHead(40)));
    assert!(
        !img.dev.is_broken(),
        "caller mistakes do not break the queue"
    );
}

#[test]
fn slots_made_available_again_while_in_flight() {
    // A 3-slot chain is in flight; the driver then offers slots 3 and 0 (next lap) as a chain:
    // that reuses slot 0, which the device has not marked used.
    let mut img = Image::new(4);
    img.desc(0, BUF, 1, 0, AVAIL | NEXT)
        .desc(1, BUF, 1, 0, AVAIL | NEXT)
        .desc(2, BUF, 1, 0, AVAIL);
    assert_eq!(img.pop(8).1, Ok(1));
    img.desc(3, BUF, 1, 1, AVAIL | NEXT)
        .desc(0, BUF, 1, 1, AVAIL0);
    img.expect_broken(bad(3, ChainFault::DescriptorsReused));
}

#[test]
fn slots_of_an_unpublished_used_batch_made_available_again() {
    // The device pushed the chain used but has not published it: to the driver those slots are
    // still in flight. Offering them again (next lap) is a reuse, not a second batch past the
    // ring size (`added` beyond Q, after which moving back over the batch underflowed).
    let mut img = Image::new(4);
    img.desc(0, BUF, 1, 0, AVAIL | NEXT)
        .desc(1, BUF, 1, 0, AVAIL | NEXT)
        .desc(2, BUF, 1, 0, AVAIL | NEXT)
        .desc(3, BUF, 1, 3, AVAIL);
    assert_eq!(img.pop(8).1, Ok(1));
    img.dev.push_used(3, 0).unwrap();
    img.desc(0, BUF, 1, 0, AVAIL0 | NEXT)
        .desc(1, BUF, 1, 0, AVAIL0 | NEXT)
        .desc(2, BUF, 1, 0, AVAIL0 | NEXT)
        .desc(3, BUF, 1, 2, AVAIL0);
    img.expect_broken(bad(0, ChainFault::DescriptorsReused));
    let state = img.dev.state();
    assert!(
        state.next_avail.index < 4 && state.next_used.index < 4,
        "{state:?}"
    );
}

#[test]
fn indirect_entries_are_charged_to_the_pop_budget() {
    // Eight one-slot chains, each pointing at the same largest table (32768 entries): a pop
    // stops taking chains once it walked 65536 descriptors (docs/architecture.md, "Limits").
    common::bound_resources();
    let fd = create_memfd("queue-packed-hostile-big", 0x10_0000).unwrap();
    let spec = RegionSpec {
        guest_phys_addr: 0,
        size: 0x10_0000,
        userspace_addr: 0x7e00_0000_0000,
        mmap_offset: 0,
    };
    let mem = GuestMemory::new(vec![Arc::new(MemoryRegion::map(fd, spec).unwrap())]).unwrap();
    let mut img = Image {
        mem: mem.clone(),
        dev: PackedQueue::new(config(8)).unwrap(),
    };
    img.dev.attach(mem).unwrap();
    let (table, entries) = (0x8_0000u64, 32768u32);
    let raw: Vec<u8> = (0..entries)
        .flat_map(|_| PackedDescriptor::new(BUF, 1, 0, 0).to_le_bytes())
        .collect();
    img.mem.write(table, &raw).unwrap();
    for slot in 0..8 {
        img.desc(slot, table, 16 * entries, slot, AVAIL | INDIRECT);
    }
    let mut takes = Vec::new();
    while takes.iter().sum::<usize>() < 8 {
        let (batch, result) = img.pop(64);
        let n = result.unwrap();
        assert!(n >= 1, "a pop always makes progress");
        assert!(
            batch.segments().len() <= 2 * 32768,
            "{}",
            batch.segments().len()
        );
        takes.push(n);
    }
    assert_eq!(takes, vec![2, 2, 2, 2]);
}

#[test]
fn overlapping_ring_areas_are_refused() {
    // Q = 256: descriptor ring 4096 bytes, each event suppression area 4.
    let ok = PackedConfig {
        desc_ring: 0x1000,
        driver_event: 0x2000,
        device_event: 0x2004,
        ..config(256)
    };
    assert!(PackedQueue::new(ok).is_ok(), "adjacent areas are fine");
    for (what, bad) in [
        (
            "driver event in the ring",
            PackedConfig {
                driver_event: 0x1ffc,
                ..ok
            },
        ),
        (
            "device event in the ring",
            PackedConfig {
                device_event: 0x1000,
                ..ok
            },
        ),
        (
            "both events at one address",
            PackedConfig {
                device_event: 0x2000,
                ..ok
            },
        ),
        (
            "ring over the events",
            PackedConfig {
                desc_ring: 0x1010,
                ..ok
            },
        ),
        (
            "wrapping past 2^64",
            PackedConfig {
                device_event: u64::MAX - 3,
                ..ok
            },
        ),
        (
            "ring wrapping past 2^64",
            PackedConfig {
                desc_ring: u64::MAX - 0xf,
                ..ok
            },
        ),
    ] {
        assert!(
            matches!(PackedQueue::new(bad), Err(QueueError::InvalidConfig(_))),
            "{what}: {bad:?}"
        );
    }
}

#[test]
fn indirect_rules() {
    // The table is walked in order, len/16 entries.
    let mut img = Image::new(4);
    img.table(
        TABLE,
        &[
            (BUF, 8, 0),
            (BUF + 0x100, 16, WRITE),
            (BUF + 0x200, 4, WRITE),
        ],
    )
    .desc(0, TABLE, 48, 3, AVAIL | INDIRECT | WRITE);
    let (batch, result) = img.pop(8);
    assert_eq!(result, Ok(1));
    let c = batch.get(0).unwrap();
    assert_eq!((c.head(), c.descriptors()), (3, 3));
    assert_eq!((c.readable_len(), c.writable_len()), (8, 20));

    // INDIRECT together with NEXT.
    let mut img = Image::new(4);
    img.table(TABLE, &[(BUF, 8, 0)])
        .desc(0, TABLE, 16, 0, AVAIL | INDIRECT | NEXT)
        .desc(1, BUF, 1, 0, AVAIL);
    img.expect_broken(bad(0, ChainFault::IndirectWithNext));

    // INDIRECT inside a NEXT-linked list.
    let mut img = Image::new(4);
    img.table(TABLE, &[(BUF, 8, 0)])
        .desc(0, BUF, 1, 0, AVAIL | NEXT)
        .desc(1, TABLE, 16, 0, AVAIL | INDIRECT);
    img.expect_broken(bad(0, ChainFault::IndirectInList));

    for len in [0u32, 8, 17, 16 * 32769] {
        let mut img = Image::new(4);
        img.desc(0, TABLE, len, 0, AVAIL | INDIRECT);
        img.expect_broken(bad(0, ChainFault::IndirectLength { len }));
    }

    for (addr, len) in [(GAP - 16, 32), (u64::MAX - 15, 32), (0x4fff0, 32)] {
        let mut img = Image::new(4);
        img.desc(0, addr, len, 0, AVAIL | INDIRECT);
        img.expect_broken(bad(0, ChainFault::IndirectTableOutOfRange { addr, len }));
    }

    // A table entry marked INDIRECT (reserved in a table, §2.4) is a plain buffer: the device
    // never follows a second table.
    let mut img = Image::new(4);
    img.table(TABLE, &[(TABLE + 0x100, 32, INDIRECT | NEXT)])
        .table(TABLE + 0x100, &[(GAP, 1, 0), (GAP, 1, 0)])
        .desc(0, TABLE, 16, 0, AVAIL | INDIRECT);
    let (batch, result) = img.pop(8);
    assert_eq!(result, Ok(1));
    let c = batch.get(0).unwrap();
    assert_eq!((c.descriptors(), c.readable_len()), (1, 32));
    assert_eq!(c.readable()[0].gpa, TABLE + 0x100);

    // Without the feature.
    let mut img = Image::with_config(PackedConfig {
        indirect: false,
        ..config(4)
    });
    img.table(TABLE, &[(BUF, 8, 0)])
        .desc(0, TABLE, 16, 0, AVAIL | INDIRECT);
    img.expect_broken(bad(0, ChainFault::IndirectNotNegotiated));
}

#[test]
fn indirect_table_crossing_a_region_boundary_is_read_piecewise() {
    let mut img = Image::new(4);
    let table = 0x10000 - 24;
    img.table(table, &[(BUF, 8, 0), (BUF + 0x100, 16, WRITE)])
        .desc(0, table, 32, 1, AVAIL | INDIRECT);
    let (batch, result) = img.pop(8);
    assert_eq!(result, Ok(1));
    assert_eq!(batch.get(0).unwrap().writable()[0].gpa, BUF + 0x100);
}

#[test]
fn readable_after_writable_and_length_overflow() {
    let mut img = Image::new(4);
    img.desc(0, BUF, 1, 0, AVAIL | WRITE | NEXT)
        .desc(1, BUF, 1, 0, AVAIL);
    img.expect_broken(bad(0, ChainFault::ReadableAfterWritable));

    let mut img = Image::new(4);
    img.desc(0, BUF, 16, 0, AVAIL | NEXT)
        .desc(1, BUF, u32::MAX - 8, 0, AVAIL | WRITE);
    img.expect_broken(bad(0, ChainFault::LengthOverflow));
}

#[test]
fn buffers_outside_guest_memory() {
    for (addr, len) in [
        (GAP, 1u32),
        (0x1fff0, 0x20),
        (0x4fff0, 0x20),
        (u64::MAX, 2),
        (0x10_0000_0000, 1),
    ] {
        let mut img = Image::new(4);
        img.desc(0, addr, len, 0, AVAIL);
        img.expect_broken(bad(0, ChainFault::BufferOutOfRange { addr, len }));
    }
}

#[test]
fn good_chains_before_a_bad_one_stay_valid() {
    let mut img = Image::new(8);
    img.desc(0, BUF, 4, 5, AVAIL)
        .desc(1, BUF, 4, 6, AVAIL | NEXT)
        .desc(2, BUF + 0x10, 4, 6, AVAIL)
        .desc(3, GAP, 4, 7, AVAIL);
    let (batch, result) = img.pop(8);
    assert_eq!(
        result,
        Err(bad(3, ChainFault::BufferOutOfRange { addr: GAP, len: 4 }))
    );
    assert_eq!(batch.iter().map(|c| c.head()).collect::<Vec<_>>(), [5, 6]);
    assert_inside(&img.mem, batch.segments());
    assert_eq!(
        img.dev.next_avail(),
        RingPosition {
            index: 3,
            wrap: true
        },
        "stops at the bad chain"
    );
}

#[test]
fn bad_vring_base_is_refused() {
    let mut q = PackedQueue::new(config(100)).unwrap();
    for base in [0x8000_8064u32, 0x8064_8000, 0xffff_ffff] {
        assert!(matches!(
            q.set_state(PackedState::from_vring_base(base)),
            Err(QueueError::InvalidConfig(_))
        ));
    }
    assert_eq!(q.state(), PackedState::START, "unchanged");
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

/// xorshift64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
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

/// `(addr, len, id, flags)` biased towards mapped buffers, boundaries, small ids and flags that
/// mark the descriptor available in `wrap`.
fn interesting_descriptor(rng: &mut Rng, size: u16, wrap: bool) -> PackedDescriptor {
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
    let id = match rng.pick(&[6, 1]) {
        0 => (rng.next() % u64::from(size)) as u16,
        _ => rng.next() as u16,
    };
    let avail = if wrap { AVAIL } else { AVAIL0 };
    let flags = match rng.pick(&[8, 1, 1]) {
        0 => avail | (rng.next() as u16 & (NEXT | WRITE | INDIRECT)),
        1 => rng.next() as u16 & (AVAIL | AVAIL0 | NEXT | WRITE | INDIRECT),
        _ => rng.next() as u16,
    };
    PackedDescriptor::new(addr, len, id, flags)
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    (0..n).map(|_| (rng.next() >> 24) as u8).collect()
}

#[derive(Debug, Clone)]
struct RandomRing {
    size: u16,
    event_idx: bool,
    indirect: bool,
    start: u16,
    wrap: bool,
    /// Raw bytes for the descriptor ring, the event areas and the table area.
    seed: u64,
    maxes: Vec<usize>,
}

fn random_ring() -> impl Strategy<Value = RandomRing> {
    (
        prop_oneof![1u16..=8, 1u16..=256],
        any::<bool>(),
        any::<bool>(),
        any::<u16>(),
        any::<bool>(),
        any::<u64>(),
        prop::collection::vec(1usize..40, 1..6),
    )
        .prop_map(
            |(size, event_idx, indirect, start, wrap, seed, maxes)| RandomRing {
                size,
                event_idx,
                indirect,
                start: start % size,
                wrap,
                seed,
                maxes,
            },
        )
}

fn run_random(r: &RandomRing, structured: bool) {
    let size = r.size;
    let q = usize::from(size);
    let cfg = PackedConfig {
        event_idx: r.event_idx,
        indirect: r.indirect,
        ..config(size)
    };
    let mem = memory();
    let bytes = random_bytes(r.seed, 16 * q + 0x400);
    mem.write(DESC, &bytes[..16 * q]).unwrap();
    mem.write(DRIVER_EVENT, &bytes[16 * q..16 * q + 8]).unwrap();
    mem.write(DEVICE_EVENT, &bytes[16 * q + 8..16 * q + 16])
        .unwrap();
    mem.write(TABLE, &bytes[16 * q + 0x200..]).unwrap();
    if structured {
        // Ring slots from `start` on marked available in this lap, the ones before it in the
        // next lap, as a driver that filled the ring would; plus 32 structured table entries.
        let mut rng = Rng(r.seed.rotate_left(17) | 1);
        for slot in 0..size {
            let wrap = if slot >= r.start { r.wrap } else { !r.wrap };
            let d = interesting_descriptor(&mut rng, size, wrap);
            mem.write(DESC + 16 * u64::from(slot), &d.to_le_bytes())
                .unwrap();
        }
        for i in 0..32u64 {
            let d = interesting_descriptor(&mut rng, size, true);
            mem.write(TABLE + 16 * i, &d.to_le_bytes()).unwrap();
        }
    }
    let start = RingPosition {
        index: r.start,
        wrap: r.wrap,
    };
    let mut dev = PackedQueue::new(cfg).unwrap();
    dev.set_state(PackedState {
        next_avail: start,
        next_used: start,
    })
    .unwrap();
    dev.attach(mem.clone()).unwrap();
    let mut batch = ChainBatch::new();
    for &max in &r.maxes {
        batch.clear();
        let _ = dev.pending().unwrap();
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

    /// The driver side against random used descriptors: `Ok` or `Err`, never a panic, never an
    /// id that was not in flight, never more bytes than the buffer's writable part.
    #[test]
    fn driver_survives_random_used_descriptors(
        size in 1u16..=64,
        chains in 0usize..64,
        seed in any::<u64>(),
        small_ids in any::<bool>(),
        wrap in any::<bool>(),
    ) {
        let mem = memory();
        let start = RingPosition { index: 0, wrap };
        let mut drv = PackedQueueDriver::with_start(mem.clone(), config(size), start).unwrap();
        let mut in_flight = std::collections::HashMap::new();
        for i in 0..chains {
            let w = (BUF + 64 * i as u64, 16 + i as u32);
            let id = match drv.add_chain(&[(BUF, 8)], &[w]) {
                Err(QueueError::Full) => match drv.add_indirect(TABLE, &[(BUF, 8)], &[w]) {
                    Err(QueueError::Full) => break,
                    other => other.unwrap(),
                },
                other => other.unwrap(),
            };
            in_flight.insert(id, w.1);
        }
        let _ = drv.publish().unwrap();
        // The device side answers with random descriptors, often marked used in the right wrap.
        let mut rng = Rng(seed | 1);
        for slot in 0..size {
            let mut d = interesting_descriptor(&mut rng, size, wrap);
            if small_ids {
                d.id %= size;
            }
            if rng.next() % 3 != 0 {
                d.flags = (d.flags & WRITE) | if wrap { AVAIL | VIRTQ_DESC_F_USED } else { 0 };
            }
            mem.write(DESC + 16 * u64::from(slot), &d.to_le_bytes()).unwrap();
        }
        let mut reaped = 0;
        loop {
            match drv.reap_used() {
                Ok(Some((id, len))) => {
                    let writable = in_flight.remove(&id).expect("reaped an id in flight");
                    prop_assert!(len <= writable);
                    reaped += 1;
                    prop_assert!(reaped <= chains);
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
