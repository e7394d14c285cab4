//! Property tests: a driver side and a device side over the same memory, like two processes.
//!
//! One memfd is mapped twice, once into the driver's `GuestMemory` and once into the device's, as
//! three adjacent regions so that buffers (and indirect tables) can cross region boundaries. A
//! random interleaving of driver and device steps runs random chain shapes through the queue:
//! the driver fills readable buffers with random bytes, the device checks every segment and every
//! byte it reads, writes a pattern into the writable segments and reports a random used length,
//! and the driver checks every used length, every written byte, and that each head comes back
//! exactly once. Indexes start at random points, often just below 65535, to wrap the u16 indexes.
//!
//! Every scenario runs on a split or a packed ring (any size for packed, random start position
//! and wrap counter), and both sides randomly toggle notifications: whenever one side re-armed
//! them and found nothing pending, the other side's next publish must notify (no lost wakeup).

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use vvu_core::memory::{create_memfd, GuestMemory, MemoryRegion, RegionSpec};
use vvu_core::queue::{
    ChainBatch, PackedConfig, PackedQueue, PackedQueueDriver, PackedState, QueueConfig,
    RingPosition, Segment, SplitQueue, SplitQueueDriver,
};
use vvu_core::QueueError;

/// `(gpa, size)` of the regions, laid out back to back in the memfd; adjacent in guest-physical
/// space so that ranges can cross from one to the next.
const REGIONS: [(u64, u64); 3] = [(0, 0x10000), (0x10000, 0x10000), (0x20000, 0x20000)];
const BOUNDARIES: [u64; 2] = [0x10000, 0x20000];
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const DATA_START: u64 = 0x3000;
const DATA_END: u64 = 0x40000;

fn map_twice() -> (GuestMemory, GuestMemory) {
    let total = REGIONS.iter().map(|r| r.1).sum();
    let fd = create_memfd("queue-props", total).unwrap();
    let map = || {
        let mut offset = 0;
        let regions = REGIONS
            .iter()
            .map(|&(gpa, size)| {
                let region = MemoryRegion::map(
                    fd.try_clone().unwrap(),
                    RegionSpec {
                        guest_phys_addr: gpa,
                        size,
                        userspace_addr: 0x7f00_0000_0000 + gpa,
                        mmap_offset: offset,
                    },
                )
                .unwrap();
                offset += size;
                Arc::new(region)
            })
            .collect();
        GuestMemory::new(regions).unwrap()
    };
    (map(), map())
}

/// xorshift64*: drives the interleaving and the data from one proptest-chosen seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Hands out buffer space from the data area; reset when nothing is in flight.
struct Bump {
    pos: u64,
}
impl Bump {
    fn alloc(&mut self, len: u64, align: u64, cross: bool) -> Option<u64> {
        let mut at = self.pos.next_multiple_of(align);
        if cross && len >= 2 {
            // Straddle the next boundary ahead, if there is room before it.
            if let Some(&b) = BOUNDARIES.iter().find(|&&b| b > at + len / 2) {
                let start = (b - len / 2) / align * align;
                if start >= at {
                    at = start;
                }
            }
        }
        (at + len <= DATA_END).then(|| {
            self.pos = at + len;
            at
        })
    }
}

#[derive(Debug, Clone)]
struct ChainSpec {
    readable: Vec<(u32, bool)>,
    writable: Vec<(u32, bool)>,
    indirect: bool,
    table_cross: bool,
}

fn buffer() -> impl Strategy<Value = (u32, bool)> {
    (
        prop_oneof![4 => 1u32..64, 2 => 64u32..1024, 1 => 1024u32..5000],
        prop::bool::weighted(0.2),
    )
}

fn chain_spec() -> impl Strategy<Value = ChainSpec> {
    (
        prop::collection::vec(buffer(), 0..5),
        prop::collection::vec(buffer(), 0..5),
        any::<bool>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(mut readable, writable, indirect, table_cross)| {
            if readable.is_empty() && writable.is_empty() {
                readable.push((1, false));
            }
            ChainSpec {
                readable,
                writable,
                indirect,
                table_cross,
            }
        })
}

/// What the driver put into one chain in flight.
struct InFlight {
    readable: Vec<(u64, u32)>,
    writable: Vec<(u64, u32)>,
    data: Vec<u8>,
    /// Set by the device when it completes the chain: (pattern tag, used len).
    completion: Option<(u8, u32)>,
}

fn pattern(tag: u8, offset: usize) -> u8 {
    tag.wrapping_add((offset as u8).wrapping_mul(31))
}

/// Check that `segments` are exactly `buffers` split at region ends, with correct host pointers.
fn check_segments(mem: &GuestMemory, segments: &[Segment], buffers: &[(u64, u32)]) {
    let mut segs = segments.iter();
    for &(gpa, len) in buffers {
        let (mut at, mut left) = (gpa, u64::from(len));
        while left > 0 {
            let seg = segs.next().expect("fewer segments than buffer bytes");
            assert_eq!(seg.gpa, at, "segment starts where the buffer continues");
            assert!(seg.len > 0 && u64::from(seg.len) <= left);
            let region = mem.find_region(at).expect("segment inside guest memory");
            let offset = at - region.guest_phys_addr();
            assert!(offset + u64::from(seg.len) <= region.size());
            assert_eq!(seg.host, region.host_addr().wrapping_add(offset as usize));
            if u64::from(seg.len) < left {
                assert_eq!(
                    offset + u64::from(seg.len),
                    region.size(),
                    "a buffer is only split at a region end"
                );
            }
            at += u64::from(seg.len);
            left -= u64::from(seg.len);
        }
    }
    assert!(segs.next().is_none(), "more segments than buffers");
}

/// The driver side of either ring format.
enum Driver {
    Split(SplitQueueDriver),
    Packed(PackedQueueDriver),
}

/// The device side of either ring format.
enum Device {
    Split(SplitQueue),
    Packed(PackedQueue),
}

macro_rules! both {
    ($value:expr, $q:ident => $body:expr) => {
        match $value {
            Driver::Split($q) => $body,
            Driver::Packed($q) => $body,
        }
    };
}

macro_rules! both_dev {
    ($value:expr, $q:ident => $body:expr) => {
        match $value {
            Device::Split($q) => $body,
            Device::Packed($q) => $body,
        }
    };
}

impl Driver {
    fn add(
        &mut self,
        table: Option<u64>,
        r: &[(u64, u32)],
        w: &[(u64, u32)],
    ) -> Result<u16, QueueError> {
        match table {
            Some(t) => both!(self, q => q.add_indirect(t, r, w)),
            None => both!(self, q => q.add_chain(r, w)),
        }
    }
    fn publish(&mut self) -> Result<bool, QueueError> {
        both!(self, q => q.publish())
    }
    fn reap_used(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
        both!(self, q => q.reap_used())
    }
    fn enable_call_notifications(&mut self) -> Result<bool, QueueError> {
        both!(self, q => q.enable_call_notifications())
    }
    fn disable_call_notifications(&mut self) -> Result<(), QueueError> {
        both!(self, q => q.disable_call_notifications())
    }
    fn in_flight(&self) -> usize {
        both!(self, q => q.in_flight())
    }
    fn free_descriptors(&self) -> usize {
        both!(self, q => q.free_descriptors())
    }
    fn is_broken(&self) -> bool {
        both!(self, q => q.is_broken())
    }
}

impl Device {
    fn pop_batch(&mut self, batch: &mut ChainBatch, max: usize) -> Result<usize, QueueError> {
        both_dev!(self, q => q.pop_batch(batch, max))
    }
    fn push_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        both_dev!(self, q => q.push_used(head, len))
    }
    fn publish_used(&mut self) -> Result<bool, QueueError> {
        both_dev!(self, q => q.publish_used())
    }
    fn enable_notifications(&mut self) -> Result<bool, QueueError> {
        both_dev!(self, q => q.enable_notifications())
    }
    fn disable_notifications(&mut self) -> Result<(), QueueError> {
        both_dev!(self, q => q.disable_notifications())
    }
    fn is_broken(&self) -> bool {
        both_dev!(self, q => q.is_broken())
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    /// Packed ring instead of split.
    packed: bool,
    /// Split: Q = 2^size_log2; packed: Q = size_log2 * 37 % 256 + 1 (sizes that are not powers
    /// of two; at most 256 so that the ring ends where the split layout's avail ring starts).
    size_log2: u32,
    event_idx: bool,
    indirect: bool,
    start: u16,
    chains: Vec<ChainSpec>,
    seed: u64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<bool>(),
        0u32..=8,
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0u16), 65500u16..=65535, any::<u16>()],
        prop::collection::vec(chain_spec(), 1..48),
        any::<u64>(),
    )
        .prop_map(
            |(packed, size_log2, event_idx, indirect, start, chains, seed)| Scenario {
                packed,
                size_log2,
                event_idx,
                indirect,
                start,
                chains,
                seed: seed | 1,
            },
        )
}

/// What a run exercised, so fixed tests can check the generator reaches the interesting cases.
#[derive(Debug, Default)]
struct Stats {
    chains: usize,
    split_buffers: usize,
    indirect: usize,
    split_tables: usize,
    batches_over_one: usize,
    /// Publishes that had to notify because the other side had re-armed.
    armed_notifications: usize,
}

fn crosses(gpa: u64, len: u64) -> bool {
    BOUNDARIES.iter().any(|&b| gpa < b && gpa + len > b)
}

fn run(s: &Scenario) -> Stats {
    let mut stats = Stats::default();
    let size = if s.packed {
        (s.size_log2 * 37 % 256 + 1) as u16
    } else {
        1u16 << s.size_log2
    };
    let config = QueueConfig {
        size,
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
        event_idx: s.event_idx,
        indirect: s.indirect,
    };
    let (drv_mem, dev_mem) = map_twice();
    // Packed: the start becomes a slot and a wrap counter.
    let packed_start = RingPosition {
        index: s.start % size,
        wrap: s.start & 0x8000 == 0,
    };
    let (mut drv, mut dev) = if s.packed {
        let config = PackedConfig::from_split_names(&config);
        let drv = PackedQueueDriver::with_start(drv_mem.clone(), config, packed_start).unwrap();
        let mut dev = PackedQueue::new(config).unwrap();
        dev.set_state(PackedState {
            next_avail: packed_start,
            next_used: packed_start,
        })
        .unwrap();
        dev.attach(dev_mem.clone()).unwrap();
        (Driver::Packed(drv), Device::Packed(dev))
    } else {
        let drv = SplitQueueDriver::with_start_index(drv_mem.clone(), config, s.start).unwrap();
        let mut dev = SplitQueue::new(config).unwrap();
        dev.attach(dev_mem.clone()).unwrap();
        dev.set_next_avail(s.start);
        assert_eq!(dev.next_used(), s.start);
        (Driver::Split(drv), Device::Split(dev))
    };
    // Ring slots the chains took, to check where the packed positions end up.
    let mut slots_added: u64 = 0;
    // A side that re-armed notifications and found nothing pending: the other side's next
    // publish must notify.
    let (mut driver_armed, mut device_armed) = (false, false);
    let mut unpublished_chains = 0usize;

    let mut rng = Rng(s.seed);
    let mut bump = Bump { pos: DATA_START };
    let mut flight: HashMap<u16, InFlight> = HashMap::new();
    let mut batch = ChainBatch::new();
    let mut specs = s.chains.iter();
    let mut pending_spec: Option<&ChainSpec> = specs.next();
    let (mut added, mut reaped, mut unpublished_used) = (0usize, 0usize, 0usize);

    for step in 0.. {
        assert!(step < 200_000, "no progress");
        let all_added = pending_spec.is_none();
        if all_added && flight.is_empty() {
            break;
        }
        match rng.below(6) {
            // Driver: add a chain.
            0 | 1 => {
                let Some(spec) = pending_spec else { continue };
                if flight.is_empty() {
                    bump = Bump { pos: DATA_START };
                }
                // Without indirect a chain longer than Q can never fit: trim it.
                let use_indirect = s.indirect && spec.indirect;
                let mut readable = spec.readable.clone();
                let mut writable = spec.writable.clone();
                if !use_indirect {
                    let q = usize::from(size);
                    writable.truncate(q.saturating_sub(readable.len().min(q)));
                    readable.truncate(q);
                    if readable.is_empty() && writable.is_empty() {
                        readable.push((1, false));
                    }
                }
                // The table first, so that a crossing table is not starved of boundaries.
                let table = if use_indirect {
                    let n = (readable.len() + writable.len()) as u64;
                    let align = if rng.below(2) == 0 { 16 } else { 1 };
                    match bump.alloc(16 * n, align, spec.table_cross) {
                        Some(t) => Some(t),
                        None => continue,
                    }
                } else {
                    None
                };
                let mut alloc = |bufs: &[(u32, bool)]| -> Option<Vec<(u64, u32)>> {
                    bufs.iter()
                        .map(|&(len, cross)| Some((bump.alloc(u64::from(len), 1, cross)?, len)))
                        .collect()
                };
                let (Some(r), Some(w)) = (alloc(&readable), alloc(&writable)) else {
                    continue; // Out of buffer space: wait for completions.
                };
                let total_r: usize = r.iter().map(|b| b.1 as usize).sum();
                let data = rng.bytes(total_r);
                let mut off = 0;
                for &(gpa, len) in &r {
                    drv_mem.write(gpa, &data[off..off + len as usize]).unwrap();
                    off += len as usize;
                }
                let split_table =
                    table.is_some_and(|t| crosses(t, 16 * (r.len() + w.len()) as u64));
                let split_buffers = r
                    .iter()
                    .chain(&w)
                    .filter(|b| crosses(b.0, u64::from(b.1)))
                    .count();
                let chain_slots = if table.is_some() {
                    1
                } else {
                    (r.len() + w.len()) as u64
                };
                match drv.add(table, &r, &w) {
                    Ok(head) => {
                        slots_added += chain_slots;
                        unpublished_chains += 1;
                        stats.indirect += usize::from(table.is_some());
                        stats.split_tables += usize::from(split_table);
                        stats.split_buffers += split_buffers;
                        let previous = flight.insert(
                            head,
                            InFlight {
                                readable: r,
                                writable: w,
                                data,
                                completion: None,
                            },
                        );
                        assert!(previous.is_none(), "head {head} handed out twice");
                        added += 1;
                        pending_spec = specs.next();
                    }
                    Err(QueueError::Full) => {}
                    Err(e) => panic!("add failed: {e}"),
                }
            }
            // Driver: publish.
            2 => {
                let kick = drv.publish().unwrap();
                // Only a publish that made something available has to kick.
                if device_armed && unpublished_chains > 0 {
                    assert!(
                        kick,
                        "lost kick: the device re-armed and the driver did not kick"
                    );
                    stats.armed_notifications += 1;
                    device_armed = false;
                }
                unpublished_chains = 0;
            }
            // Either side toggles its notification requests.
            5 => match rng.below(4) {
                0 => {
                    driver_armed = !drv.enable_call_notifications().unwrap();
                }
                1 => {
                    drv.disable_call_notifications().unwrap();
                    driver_armed = false;
                }
                2 => {
                    device_armed = !dev.enable_notifications().unwrap();
                }
                _ => {
                    dev.disable_notifications().unwrap();
                    device_armed = false;
                }
            },
            // Device: pop a batch, check it, complete it.
            3 => {
                batch.clear();
                let max = 1 + rng.below(8) as usize;
                let n = dev.pop_batch(&mut batch, max).unwrap();
                assert_eq!(n, batch.len());
                stats.chains += n;
                stats.batches_over_one += usize::from(n > 1);
                for c in batch.iter() {
                    let f = flight
                        .get_mut(&c.head())
                        .expect("device popped a head the driver has in flight");
                    assert!(f.completion.is_none(), "head {} popped twice", c.head());
                    assert_eq!(
                        usize::from(c.descriptors()),
                        f.readable.len() + f.writable.len()
                    );
                    check_segments(&dev_mem, c.readable(), &f.readable);
                    check_segments(&dev_mem, c.writable(), &f.writable);
                    let r_len: u32 = f.readable.iter().map(|b| b.1).sum();
                    let w_len: u32 = f.writable.iter().map(|b| b.1).sum();
                    assert_eq!((c.readable_len(), c.writable_len()), (r_len, w_len));
                    // Every readable byte, through the device's host pointers.
                    let mut got = Vec::with_capacity(r_len as usize);
                    for seg in c.readable() {
                        let mut buf = vec![0u8; seg.len as usize];
                        // SAFETY: `dev` (and its snapshot) is alive.
                        assert_eq!(unsafe { seg.read_to(0, &mut buf) }, buf.len());
                        got.extend_from_slice(&buf);
                    }
                    assert_eq!(got, f.data, "readable bytes differ");
                    // Write a pattern into all writable bytes; report a random length.
                    let tag = rng.next() as u8;
                    let mut offset = 0usize;
                    for seg in c.writable() {
                        let bytes: Vec<u8> = (0..seg.len as usize)
                            .map(|i| pattern(tag, offset + i))
                            .collect();
                        // SAFETY: as above; a device-writable segment.
                        unsafe { seg.write_from(0, &bytes) };
                        offset += bytes.len();
                    }
                    let len = rng.below(u64::from(w_len) + 1) as u32;
                    f.completion = Some((tag, len));
                    dev.push_used(c.head(), len).unwrap();
                    unpublished_used += 1;
                }
                if rng.below(3) != 0 {
                    let call = dev.publish_used().unwrap();
                    check_call(&mut driver_armed, unpublished_used, call, &mut stats);
                    unpublished_used = 0;
                }
            }
            // Device publishes late; driver reaps everything visible.
            _ => {
                if unpublished_used > 0 && rng.below(2) == 0 {
                    let call = dev.publish_used().unwrap();
                    check_call(&mut driver_armed, unpublished_used, call, &mut stats);
                    unpublished_used = 0;
                }
                while let Some((head, len)) = drv.reap_used().unwrap() {
                    let f = flight
                        .remove(&head)
                        .expect("reaped a head that is not in flight");
                    let (tag, want) = f
                        .completion
                        .expect("reaped a head the device never completed");
                    assert_eq!(len, want, "used len");
                    let mut written = vec![0u8; len as usize];
                    let mut filled = 0usize;
                    for &(gpa, blen) in &f.writable {
                        if filled == written.len() {
                            break;
                        }
                        let n = (blen as usize).min(written.len() - filled);
                        drv_mem.read(gpa, &mut written[filled..filled + n]).unwrap();
                        filled += n;
                    }
                    for (i, &b) in written.iter().enumerate() {
                        assert_eq!(b, pattern(tag, i), "written byte {i} of head {head}");
                    }
                    reaped += 1;
                }
            }
        }
    }
    assert_eq!(added, reaped);
    assert_eq!(drv.in_flight(), 0);
    assert_eq!(drv.free_descriptors(), usize::from(size));
    match (&drv, &dev) {
        (Driver::Split(drv), Device::Split(dev)) => {
            assert_eq!(dev.next_avail(), drv.avail_idx());
            assert_eq!(dev.next_used(), drv.last_used());
            assert_eq!(
                drv.avail_idx(),
                s.start.wrapping_add(added as u16),
                "indexes advanced by the number of chains"
            );
        }
        (Driver::Packed(drv), Device::Packed(dev)) => {
            assert_eq!(dev.next_avail(), drv.next_avail());
            assert_eq!(dev.next_used(), drv.next_used());
            // Positions advanced by the slots taken, wrapping (and flipping) every Q.
            let laps = (u64::from(packed_start.index) + slots_added) / u64::from(size);
            let want = RingPosition {
                index: ((u64::from(packed_start.index) + slots_added) % u64::from(size)) as u16,
                wrap: packed_start.wrap ^ (laps % 2 == 1),
            };
            assert_eq!(
                drv.next_avail(),
                want,
                "positions advanced by the slots taken"
            );
        }
        _ => unreachable!("driver and device use the same format"),
    }
    assert!(!dev.is_broken() && !drv.is_broken());
    stats
}

/// After the driver re-armed call notifications and found nothing, a publish that adds used
/// entries must notify.
fn check_call(driver_armed: &mut bool, published: usize, call: bool, stats: &mut Stats) {
    if *driver_armed && published > 0 {
        assert!(
            call,
            "lost call: the driver re-armed and the device did not notify"
        );
        stats.armed_notifications += 1;
        *driver_armed = false;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn driver_and_device_agree_on_every_chain_and_byte(s in scenario()) {
        run(&s);
    }
}

/// The same run with a fixed, demanding shape, so that a failure is easy to reproduce.
#[test]
fn wraps_indexes_with_indirect_and_event_idx() {
    for packed in [false, true] {
        wraps_with(packed);
    }
}

fn wraps_with(packed: bool) {
    let spec = ChainSpec {
        readable: vec![(100, true), (7, false)],
        writable: vec![(3000, true), (1, false)],
        indirect: true,
        table_cross: true,
    };
    for (size_log2, indirect) in [(0, true), (2, false), (4, true), (8, true)] {
        for event_idx in [false, true] {
            let stats = run(&Scenario {
                packed,
                size_log2,
                event_idx,
                indirect,
                start: 65530,
                chains: vec![spec.clone(); 40],
                seed: 0x9e37_79b9_7f4a_7c15,
            });
            assert_eq!(stats.chains, 40);
            assert!(stats.split_buffers > 0, "{stats:?}");
            if indirect {
                assert_eq!(stats.indirect, 40);
                assert!(stats.split_tables > 0, "{stats:?}");
            }
            if size_log2 >= 4 {
                assert!(stats.batches_over_one > 0, "{stats:?}");
            }
            assert!(stats.armed_notifications > 0, "{stats:?}");
        }
    }
}
