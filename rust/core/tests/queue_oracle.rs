//! Differential test against rust-vmm `virtio-queue` 0.18 (with `vm-memory` 0.18) as an oracle.
//!
//! One memfd is mapped three times: by our driver, by our device (`MemoryRegion::map`) and by the
//! oracle (`MmapRegion::from_file` with a `FileOffset`), as adjacent regions so that buffers cross
//! region boundaries. Our driver writes random chains; both device implementations pop them and
//! must agree on the number of chains, each head, and every segment's guest address, length,
//! direction and contents (the oracle's descriptors are split at region ends with vm-memory's
//! `get_slices`).
//!
//! Hostile images: a valid prefix written by our driver followed by one malformed chain (or a
//! malformed avail index). Both must pop the valid prefix identically and reject the bad chain.
//! The oracle reports rejection by ending a chain early (its iterator returns `None` after a
//! descriptor that still has NEXT set, or before the first descriptor), by failing `iter()`, or by
//! failing to translate a buffer. Where the oracle is more lenient and we deliberately reject,
//! the case says so and asserts exactly that.

mod common;

use std::fs::File;
use std::sync::Arc;

use proptest::prelude::*;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};
use vvu_core::error::ChainFault;
use vvu_core::memory::{create_memfd, GuestMemory, MemoryRegion, RegionSpec};
use vvu_core::queue::{
    ChainBatch, Descriptor, QueueConfig, SplitQueue, SplitQueueDriver, VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use vvu_core::QueueError;

/// The last region holds the large indirect table of the length-overflow case.
const REGIONS: [(u64, u64); 4] = [
    (0, 0x10000),
    (0x10000, 0x10000),
    (0x20000, 0x20000),
    (0x40000, 0xc0000),
];
const MEM_END: u64 = 0x100000;
/// Chains longer than this are compared without their contents.
const COPY_LIMIT: usize = 1 << 20;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000; // virtio-queue refuses an avail ring at address 0
const USED: u64 = 0x2000;
const DATA_START: u64 = 0x3000;
/// Scratch space for hand-written indirect tables of hostile cases.
const SCRATCH: u64 = 0x3f000;

struct Memories {
    driver: GuestMemory,
    device: GuestMemory,
    oracle: GuestMemoryMmap<()>,
}

fn memories() -> Memories {
    common::bound_resources();
    let total = REGIONS.iter().map(|r| r.1).sum();
    let fd = create_memfd("queue-oracle", total).unwrap();
    let ours = || {
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
    };
    let mut offset = 0;
    let oracle_regions = REGIONS
        .iter()
        .map(|&(gpa, size)| {
            let file = File::from(fd.try_clone().unwrap());
            let mapping =
                MmapRegion::<()>::from_file(FileOffset::new(file, offset), size as usize).unwrap();
            offset += size;
            GuestRegionMmap::new(mapping, GuestAddress(gpa)).unwrap()
        })
        .collect();
    Memories {
        driver: ours(),
        device: ours(),
        oracle: GuestMemoryMmap::from_regions(oracle_regions).unwrap(),
    }
}

fn config(size: u16) -> QueueConfig {
    QueueConfig {
        size,
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
        event_idx: false,
        indirect: true,
    }
}

fn oracle_queue(size: u16, start: u16) -> Queue {
    let mut q = Queue::new(size).unwrap();
    q.set_size(size);
    q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_next_avail(start);
    q.set_ready(true);
    q
}

/// A chain as seen by one implementation: head and `(gpa, len, writable, bytes)` pieces.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    head: u16,
    pieces: Vec<(u64, u32, bool, Vec<u8>)>,
}

/// Pop everything available from the oracle. `Err` = the oracle rejected the avail index
/// (nothing popped); `Ok((chains, rejected))`: the chains it accepted, and whether it stopped at
/// a chain it could not walk or translate.
fn oracle_pop(q: &mut Queue, mem: &GuestMemoryMmap<()>) -> Result<(Vec<Seen>, bool), ()> {
    let mut out = Vec::new();
    let mut iter = q.iter(mem).map_err(|_| ())?;
    for mut chain in iter.by_ref() {
        let head = chain.head_index();
        let mut pieces = Vec::new();
        let mut last_has_next = true; // no descriptor at all = rejected
        let mut bad_memory = false;
        let mut copied = 0usize;
        for desc in chain.by_ref() {
            last_has_next = desc.has_next();
            let mut gpa = desc.addr().0;
            for slice in mem.get_slices(desc.addr(), desc.len() as usize) {
                let Ok(slice) = slice else {
                    bad_memory = true;
                    break;
                };
                copied += slice.len();
                let mut bytes = vec![0u8; if copied <= COPY_LIMIT { slice.len() } else { 0 }];
                slice.copy_to(&mut bytes[..]);
                pieces.push((gpa, slice.len() as u32, desc.is_write_only(), bytes));
                gpa += slice.len() as u64;
            }
        }
        if last_has_next || bad_memory {
            return Ok((out, true));
        }
        out.push(Seen { head, pieces });
    }
    Ok((out, false))
}

/// Pop everything available from our device, in batches of `max`.
fn our_pop(dev: &mut SplitQueue, max: usize) -> (Vec<Seen>, Option<QueueError>) {
    let mut out = Vec::new();
    let mut batch = ChainBatch::new();
    loop {
        batch.clear();
        let result = dev.pop_batch(&mut batch, max);
        for c in batch.iter() {
            let mut pieces = Vec::new();
            let mut copied = 0usize;
            for (segs, writable) in [(c.readable(), false), (c.writable(), true)] {
                for s in segs {
                    copied += s.len as usize;
                    let mut bytes = vec![
                        0u8;
                        if copied <= COPY_LIMIT {
                            s.len as usize
                        } else {
                            0
                        }
                    ];
                    // SAFETY: `dev` and its snapshot are alive.
                    unsafe { s.read_to(0, &mut bytes) };
                    pieces.push((s.gpa, s.len, writable, bytes));
                }
            }
            out.push(Seen {
                head: c.head(),
                pieces,
            });
        }
        match result {
            Ok(0) => return (out, None),
            Ok(_) => {}
            Err(e) => return (out, Some(e)),
        }
    }
}

fn complete_all(dev: &mut SplitQueue, drv: &mut SplitQueueDriver, heads: &[u16]) {
    for &h in heads {
        dev.push_used(h, 0).unwrap();
    }
    dev.publish_used().unwrap();
    while drv.reap_used().unwrap().is_some() {}
    assert_eq!(drv.in_flight(), 0);
}

#[derive(Debug, Clone)]
struct ChainShape {
    readable: Vec<u32>,
    writable: Vec<u32>,
    indirect: bool,
}

fn shape() -> impl Strategy<Value = ChainShape> {
    let len = prop_oneof![1 => Just(0u32), 6 => 1u32..200, 2 => 200u32..6000];
    (
        prop::collection::vec(len.clone(), 0..4),
        prop::collection::vec(len, 0..4),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(mut readable, writable, indirect)| {
            if readable.is_empty() && writable.is_empty() {
                readable.push(8);
            }
            ChainShape {
                readable,
                writable,
                indirect,
            }
        })
}

/// Lay buffers out from `pos`, sometimes straddling a region boundary; fill readable ones.
fn place(
    mem: &GuestMemory,
    pos: &mut u64,
    lens: &[u32],
    salt: u64,
    cross: bool,
) -> Vec<(u64, u32)> {
    lens.iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut at = *pos;
            if cross && i == 0 {
                if let Some(&b) = [0x10000u64, 0x20000].iter().find(|&&b| b > at + 8) {
                    at = b - u64::from(len / 2).min(b - at);
                }
            }
            let bytes: Vec<u8> = (0..len)
                .map(|k| (salt as u8).wrapping_add(k as u8).wrapping_mul(7))
                .collect();
            mem.write(at, &bytes).unwrap();
            *pos = at + u64::from(len) + 1;
            (at, len)
        })
        .collect()
}

fn run_differential(size_log2: u32, start: u16, rounds: &[(Vec<ChainShape>, usize, bool)]) {
    let size = 1u16 << size_log2;
    let m = memories();
    let mut drv =
        SplitQueueDriver::with_start_index(m.driver.clone(), config(size), start).unwrap();
    let mut dev = SplitQueue::new(config(size)).unwrap();
    dev.attach(m.device.clone()).unwrap();
    dev.set_next_avail(start);
    let mut oracle = oracle_queue(size, start);
    for (round, (shapes, max, cross)) in rounds.iter().enumerate() {
        let mut pos = DATA_START;
        let mut expected = 0usize;
        for (i, s) in shapes.iter().enumerate() {
            let salt = (round * 64 + i) as u64;
            let r = place(&m.driver, &mut pos, &s.readable, salt, *cross);
            let w = place(&m.driver, &mut pos, &s.writable, salt + 1, false);
            if pos > 0x3e000 {
                break;
            }
            // A direct chain longer than the queue can never fit: send it indirect.
            let indirect = s.indirect || r.len() + w.len() > usize::from(size);
            let result = if indirect {
                let table = pos;
                pos += 16 * (r.len() + w.len()) as u64 + 3;
                drv.add_indirect(table, &r, &w)
            } else {
                drv.add_chain(&r, &w)
            };
            match result {
                Ok(_) => expected += 1,
                Err(QueueError::Full) => continue,
                Err(e) => panic!("{e}"),
            }
        }
        drv.publish().unwrap();
        let (theirs, rejected) = oracle_pop(&mut oracle, &m.oracle).expect("oracle accepts");
        assert!(!rejected, "oracle rejected a valid chain");
        let (ours, err) = our_pop(&mut dev, *max);
        assert_eq!(err, None);
        assert_eq!(ours.len(), expected, "chain count");
        assert_eq!(ours, theirs);
        let heads: Vec<u16> = ours.iter().map(|s| s.head).collect();
        complete_all(&mut dev, &mut drv, &heads);
    }
    assert_eq!(dev.next_avail(), oracle.next_avail());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn valid_chains_agree_with_virtio_queue(
        size_log2 in 0u32..=7,
        start in prop_oneof![Just(0u16), 65520u16..=65535, any::<u16>()],
        rounds in prop::collection::vec(
            (prop::collection::vec(shape(), 1..24), 1usize..9, any::<bool>()),
            1..5,
        ),
    ) {
        run_differential(size_log2, start, &rounds);
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile images.

/// How to corrupt the chain after the valid prefix.
#[derive(Debug, Clone, Copy)]
enum Hostile {
    HeadOutOfRange,
    NextOutOfRange,
    SelfLoop,
    TwoLoop,
    IndirectLenZero,
    IndirectLenNotMultiple,
    NestedIndirect,
    IndirectLoop,
    IndirectNextOutOfRange,
    IndirectTableOutOfRange,
    LengthOverflow,
    BufferOutOfRange,
    BufferCrossingMemoryEnd,
    AvailIndexJump,
    // Cases where virtio-queue 0.18 is more lenient than we are, deliberately:
    /// INDIRECT|NEXT: the oracle follows the table and ignores NEXT; the spec forbids it.
    IndirectWithNext,
    /// Readable after writable: the oracle accepts any order; the spec lets a device reject it.
    ReadableAfterWritable,
    /// Two heads of one batch share descriptors and together use more than Q: the oracle walks
    /// both; we bound the work of one batch to Q ring descriptors.
    DescriptorsReused,
}

const STRICT: [Hostile; 14] = [
    Hostile::HeadOutOfRange,
    Hostile::NextOutOfRange,
    Hostile::SelfLoop,
    Hostile::TwoLoop,
    Hostile::IndirectLenZero,
    Hostile::IndirectLenNotMultiple,
    Hostile::NestedIndirect,
    Hostile::IndirectLoop,
    Hostile::IndirectNextOutOfRange,
    Hostile::IndirectTableOutOfRange,
    Hostile::LengthOverflow,
    Hostile::BufferOutOfRange,
    Hostile::BufferCrossingMemoryEnd,
    Hostile::AvailIndexJump,
];
const LENIENT: [Hostile; 3] = [
    Hostile::IndirectWithNext,
    Hostile::ReadableAfterWritable,
    Hostile::DescriptorsReused,
];

fn put_desc(mem: &GuestMemory, table: u64, index: u16, d: Descriptor) {
    mem.write(table + 16 * u64::from(index), &d.to_le_bytes())
        .unwrap();
}

/// Write the hostile chain using ring descriptors `first..` (free: the prefix used `0..first`),
/// make it available at `avail_idx`; returns the new avail idx and the expected error.
fn write_hostile(
    mem: &GuestMemory,
    size: u16,
    first: u16,
    avail_idx: u16,
    kind: Hostile,
) -> (u16, QueueError) {
    let d = first;
    let buf = 0x3e000;
    let mut head = d;
    let mut entries = 1u16;
    let bad = |reason| QueueError::BadChain { head: d, reason };
    use std::sync::atomic::Ordering::Release;
    let err = match kind {
        Hostile::HeadOutOfRange => {
            head = size + 3;
            QueueError::BadChain {
                head,
                reason: ChainFault::HeadOutOfRange,
            }
        }
        Hostile::NextOutOfRange => {
            put_desc(
                mem,
                DESC,
                d,
                Descriptor::new(buf, 8, VIRTQ_DESC_F_NEXT, size),
            );
            bad(ChainFault::NextOutOfRange {
                index: d,
                next: size,
                limit: u32::from(size),
            })
        }
        Hostile::SelfLoop => {
            put_desc(mem, DESC, d, Descriptor::new(buf, 8, VIRTQ_DESC_F_NEXT, d));
            bad(ChainFault::TooLong {
                limit: u32::from(size),
            })
        }
        Hostile::TwoLoop => {
            let e = if d + 1 < size { d + 1 } else { d };
            put_desc(mem, DESC, d, Descriptor::new(buf, 8, VIRTQ_DESC_F_NEXT, e));
            put_desc(mem, DESC, e, Descriptor::new(buf, 8, VIRTQ_DESC_F_NEXT, d));
            bad(ChainFault::TooLong {
                limit: u32::from(size),
            })
        }
        Hostile::IndirectLenZero | Hostile::IndirectLenNotMultiple => {
            let len = if matches!(kind, Hostile::IndirectLenZero) {
                0
            } else {
                40
            };
            put_desc(
                mem,
                DESC,
                d,
                Descriptor::new(SCRATCH, len, VIRTQ_DESC_F_INDIRECT, 0),
            );
            bad(ChainFault::IndirectLength { len })
        }
        Hostile::NestedIndirect => {
            put_desc(
                mem,
                DESC,
                d,
                Descriptor::new(SCRATCH, 32, VIRTQ_DESC_F_INDIRECT, 0),
            );
            put_desc(
                mem,
                SCRATCH,
                0,
                Descriptor::new(buf, 8, VIRTQ_DESC_F_NEXT, 1),
            );
            put_desc(
                mem,
                SCRATCH,
                1,
                Descriptor::new(SCRATCH, 16, VIRTQ_DESC_F_INDIRECT, 0),
            );
            bad(ChainFault::NestedIndirect)
        }
        Hostile::IndirectLoop => {
            put_desc(
                mem,
                DESC,
                d,
                Descriptor::new(SCRATCH, 32, VIRTQ_DESC_F_INDIRECT, 0),
            );
            put_desc(
                mem,
                SCRATCH,
                0,
                Descriptor::new(buf, 8, VIRTQ_DESC_F_NEXT, 1),
            );
            put_desc(
                mem,
                SCRATCH,
                1,
                Descriptor::new(buf, 8, VIRTQ_DESC_F_NEXT, 0),
            );
            bad(ChainFault::TooLong { limit: 2 })
        }
        Hostile::IndirectNextOutOfRange => {
            put_desc(
                mem,
                DESC,
                d,
                Descriptor::new(SCRATCH, 32, VIRTQ_DESC_F_INDIRECT, 0),
            );
            put_desc(
                mem,
                SCRATCH,
                0,
                Descriptor::new(buf, 8, VIRTQ_DESC_F_NEXT, 2),
            );
            bad(ChainFault::NextOutOfRange {
                index: 0,
                next: 2,
                limit: 2,
            })
        }
        Hostile::IndirectTableOutOfRange => {
            // Entry 0 is mapped and links to entry 1, which is not (the oracle reads lazily and
            // would accept a table whose first entry ends the chain).
            let addr = MEM_END - 16;
            put_desc(
                mem,
                DESC,
                d,
                Descriptor::new(addr, 32, VIRTQ_DESC_F_INDIRECT, 0),
            );
            put_desc(mem, addr, 0, Descriptor::new(buf, 8, VIRTQ_DESC_F_NEXT, 1));
            bad(ChainFault::IndirectTableOutOfRange { addr, len: 32 })
        }
        Hostile::LengthOverflow => {
            // 32768 mapped buffers of 128 KiB through a 512 KiB indirect table: the last one
            // takes the total to 2^32.
            let (table, n) = (0x40000u64, 32768u32);
            put_desc(
                mem,
                DESC,
                d,
                Descriptor::new(table, 16 * n, VIRTQ_DESC_F_INDIRECT, 0),
            );
            let mut raw = Vec::with_capacity(16 * n as usize);
            for i in 0..n {
                let (flags, next) = if i + 1 < n {
                    (VIRTQ_DESC_F_NEXT, (i + 1) as u16)
                } else {
                    (0, 0)
                };
                raw.extend_from_slice(
                    &Descriptor::new(0xc0000, 0x20000, flags, next).to_le_bytes(),
                );
            }
            mem.write(table, &raw).unwrap();
            bad(ChainFault::LengthOverflow)
        }
        Hostile::BufferOutOfRange => {
            put_desc(mem, DESC, d, Descriptor::new(0x20_0000, 8, 0, 0));
            bad(ChainFault::BufferOutOfRange {
                addr: 0x20_0000,
                len: 8,
            })
        }
        Hostile::BufferCrossingMemoryEnd => {
            put_desc(mem, DESC, d, Descriptor::new(MEM_END - 4, 8, 0, 0));
            bad(ChainFault::BufferOutOfRange {
                addr: MEM_END - 4,
                len: 8,
            })
        }
        Hostile::AvailIndexJump => {
            let idx = avail_idx.wrapping_add(size + 1);
            mem.store_u16(AVAIL + 2, idx, Release).unwrap();
            return (
                idx,
                QueueError::AvailIndexJump {
                    avail_idx: idx,
                    next_avail: 0, // filled in by the caller
                    pending: 0,
                    size,
                },
            );
        }
        Hostile::IndirectWithNext => {
            put_desc(
                mem,
                DESC,
                d,
                Descriptor::new(SCRATCH, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, d),
            );
            put_desc(mem, SCRATCH, 0, Descriptor::new(buf, 8, 0, 0));
            bad(ChainFault::IndirectWithNext)
        }
        Hostile::ReadableAfterWritable => {
            put_desc(
                mem,
                DESC,
                d,
                Descriptor::new(SCRATCH, 32, VIRTQ_DESC_F_INDIRECT, 0),
            );
            put_desc(
                mem,
                SCRATCH,
                0,
                Descriptor::new(buf, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
            );
            put_desc(mem, SCRATCH, 1, Descriptor::new(buf + 8, 8, 0, 0));
            bad(ChainFault::ReadableAfterWritable)
        }
        Hostile::DescriptorsReused => {
            // A valid chain through every free descriptor (more than half of the ring), made
            // available four times: with batches of 3, two copies share a batch and together use
            // more than Q ring descriptors.
            for i in d..size {
                let (flags, next) = if i + 1 < size {
                    (VIRTQ_DESC_F_NEXT, i + 1)
                } else {
                    (0, 0)
                };
                put_desc(mem, DESC, i, Descriptor::new(buf, 8, flags, next));
            }
            assert!(2 * (size - d) > size);
            entries = 4;
            bad(ChainFault::DescriptorsReused)
        }
    };
    for k in 0..entries {
        let slot = avail_idx.wrapping_add(k) % size;
        mem.store_u16(AVAIL + 4 + 2 * u64::from(slot), head, Release)
            .unwrap();
    }
    let idx = avail_idx.wrapping_add(entries);
    mem.store_u16(AVAIL + 2, idx, Release).unwrap();
    (idx, err)
}

/// A valid prefix of `prefix` one-descriptor chains, then the hostile chain; both devices pop.
fn run_hostile(kind: Hostile, size: u16, prefix: u16, start: u16) {
    let m = memories();
    let mut drv =
        SplitQueueDriver::with_start_index(m.driver.clone(), config(size), start).unwrap();
    let mut dev = SplitQueue::new(config(size)).unwrap();
    dev.attach(m.device.clone()).unwrap();
    dev.set_next_avail(start);
    let mut oracle = oracle_queue(size, start);
    for i in 0..prefix {
        let gpa = DATA_START + 0x100 * u64::from(i);
        m.driver.write(gpa, &[i as u8; 16]).unwrap();
        drv.add_chain(&[(gpa, 16)], &[(gpa + 0x80, 16)]).unwrap();
    }
    drv.publish().unwrap();
    // The driver hands out descriptors 0, 1, 2, ... from a fresh free list.
    let first = 2 * prefix;
    let (_, mut want) = write_hostile(&m.driver, size, first, drv.avail_idx(), kind);
    if let QueueError::AvailIndexJump {
        avail_idx,
        ref mut next_avail,
        ref mut pending,
        ..
    } = want
    {
        *next_avail = start;
        *pending = avail_idx.wrapping_sub(start);
    }

    let (ours, err) = our_pop(&mut dev, 3);
    assert_eq!(err.as_ref(), Some(&want), "{kind:?}");
    assert!(dev.is_broken());
    assert!(matches!(
        dev.pop_batch(&mut ChainBatch::new(), 1),
        Err(QueueError::Broken(_))
    ));

    let oracle_result = oracle_pop(&mut oracle, &m.oracle);
    if matches!(kind, Hostile::AvailIndexJump) {
        assert!(oracle_result.is_err(), "oracle rejects the avail index too");
        assert!(ours.is_empty());
        return;
    }
    let (theirs, oracle_rejected) = oracle_result.expect("oracle accepts the avail index");
    let lenient = LENIENT
        .iter()
        .any(|k| std::mem::discriminant(k) == std::mem::discriminant(&kind));
    if lenient {
        assert!(
            !oracle_rejected,
            "{kind:?}: the oracle is documented as lenient"
        );
        assert!(ours.len() < theirs.len());
        assert_eq!(ours[..], theirs[..ours.len()]);
    } else {
        assert!(oracle_rejected, "{kind:?}: the oracle rejects too");
        assert_eq!(ours, theirs, "{kind:?}: same valid prefix");
    }
    if matches!(kind, Hostile::DescriptorsReused) {
        // Copies of the shared chain that did not exceed a batch's budget were accepted.
        assert!(ours.len() >= usize::from(prefix), "{kind:?}");
    } else {
        assert_eq!(ours.len(), usize::from(prefix), "{kind:?}");
    }
}

#[test]
fn hostile_images_are_rejected_by_both() {
    for kind in STRICT.into_iter().chain(LENIENT) {
        for (size, prefix, start) in [(16u16, 0u16, 0u16), (16, 3, 65534), (64, 5, 65535)] {
            if matches!(kind, Hostile::TwoLoop) && size < 2 {
                continue;
            }
            run_hostile(kind, size, prefix, start);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Packed ring. virtio-queue 0.18 has no packed queue (device or driver) to pop against, only
// the packed descriptor structure (its event structure has no public constructor): the oracle
// checks our descriptor byte layout. The packed ring's behaviour needs a real peer instead.

proptest! {
    #[test]
    fn packed_descriptor_layout_matches_virtio_queue(
        addr in any::<u64>(),
        len in any::<u32>(),
        id in any::<u16>(),
        flags in any::<u16>(),
    ) {
        use vm_memory::ByteValued;
        use vvu_core::queue::PackedDescriptor;
        let theirs = virtio_queue::desc::packed::Descriptor::new(addr, len, id, flags);
        let ours = PackedDescriptor::new(addr, len, id, flags);
        prop_assert_eq!(&ours.to_le_bytes()[..], theirs.as_slice());
        let raw: [u8; 16] = theirs.as_slice().try_into().unwrap();
        prop_assert_eq!(PackedDescriptor::from_le_bytes(raw), ours);
        prop_assert_eq!(
            (theirs.addr().0, theirs.len(), theirs.id(), theirs.flags()),
            (addr, len, id, flags)
        );
    }
}
