//! Device-side split-virtqueue throughput: chains popped + used per second, vvu's [`SplitQueue`]
//! against rust-vmm `virtio-queue` 0.18 (with `vm-memory` 0.18), in the same run.
//!
//! Run: `cargo bench -p vvu-core --bench queue`. Criterion reports `thrpt` in chains/s
//! (`Throughput::Elements`); the group name is the workload, the function name the
//! implementation, e.g. `split_1desc_batch32/vvu` and `split_1desc_batch32/virtio-queue`;
//! `vvu-inflight` is vvu's queue also keeping an INFLIGHT_SHMFD region current (per chain: a
//! counter and a flag at pop, a link at push, a flag cleared after publish); `vvu-dirty-log` is
//! vvu with a dirty log attached (live migration): every published chain's writable buffers and
//! every used-ring write are logged, the chain walked again to find them.
//!
//! # Setup (identical for both implementations)
//!
//! One memfd of 2 MiB is mapped three times, as a single region at guest-physical address 0:
//! by a "driver" view ([`GuestMemory`], used only to build the image and refill the ring), by
//! vvu's device ([`GuestMemory`], attached to the [`SplitQueue`]) and by the oracle
//! (`GuestMemoryMmap` over the same fd). One region is the best case for vm-memory's region
//! lookup, so this is the conservative setting for the comparison. The ring (Q = 256, EVENT_IDX
//! and INDIRECT_DESC on for both) sits at the same addresses for both devices; the descriptor
//! table, indirect tables and buffer layout are written once per workload and never change. Before
//! each implementation runs, the ring indexes are reset to 0 and a fresh device is created.
//!
//! Workloads (each descriptor has its own buffer; buffer contents are never touched):
//! - `1desc`: one device-writable 256-byte buffer per chain; 256 distinct chains.
//! - `4desc`: readable 16 + writable 256 + writable 256 + writable 1 (a virtio-blk read);
//!   64 distinct chains fill the 256-entry table.
//! - `indirect16`: one ring descriptor (INDIRECT) pointing at its own 16-entry table with
//!   readable 16 + 14 × writable 256 + writable 1; 256 distinct chains.
//!
//! # One iteration = one batch
//!
//! Criterion's iteration is one batch of `batch` chains (1 or 32), so `Throughput::Elements` is
//! `batch`. Per batch:
//! - vvu: `pop_batch(&mut batch, n)` (which reads each descriptor, validates the chain and
//!   translates every buffer to a host address, recording `Segment {host, len, gpa}` in the
//!   reused `ChainBatch`), then `push_used(head, writable_len)` per chain, then one
//!   `publish_used()` (used.idx Release store, fence, used_event read).
//! - virtio-queue: per chain `pop_descriptor_chain(&mem)`, iterate the chain's descriptors and
//!   translate each buffer with `mem.get_slice(addr, len)` (falling back to `get_slices`, which
//!   splits at region ends like vvu does, only if that fails: measured 5–15 % faster than always
//!   calling `get_slices`, so the stronger oracle), recording `(host, len, gpa, writable)` into a
//!   reused `Vec` and summing the writable length,
//!   then `add_used(head, writable_len)` (which also stores used.idx, with Release, every call);
//!   after the batch one `needs_notification()` (fence, used_event read).
//!
//! Both sides' outputs go through `black_box`. vvu does strictly more validation per chain
//! (readable-before-writable order, per-batch descriptor budget, INDIRECT|NEXT, nested-indirect
//! and indirect-length checks, which virtio-queue does partly or not at all).
//!
//! # Refill (the driver side), kept out of the measured time
//!
//! The measured loop is [`run_rounds`], via `iter_custom`: a round first makes `n` chains
//! available (`n` = at most the number of distinct chains, and what is left of the iterations),
//! untimed, with [`Driver::publish`]: `n` relaxed u16 stores into `avail.ring` and one Release
//! store of `avail.idx`, through the driver view; then the clock runs while the device processes
//! the `n` chains batch by batch; then it stops. Both implementations go through the very same
//! function with the same round lengths, so the refill cost and the timer reads (two per round,
//! one round per 64 or 256 chains) are identical; the refill leaves the avail ring hot in cache
//! for both alike. Nobody reaps the used ring: the device does not read it.
//!
//! # Packed ring (`packed_*` groups, vvu only)
//!
//! The same workloads and batches on a 256-entry packed ring ([`PackedQueue`], EVENT_IDX and
//! INDIRECT_DESC on), in the same run as the split groups so the two can be compared. rust-vmm
//! virtio-queue 0.18 has no packed queue, so there is no oracle row. The chains are laid out in
//! ring order (the 4desc chains take four consecutive slots); the untimed refill rewrites each
//! chain's descriptors (the device overwrote them with used descriptors) with the current wrap
//! counter, the first descriptor's flags last with Release, as a driver publishes. The timed part
//! is the same `pop_batch` / `push_used` per chain / one `publish_used` as for the split ring
//! (here: flags Acquire load per chain, used descriptors written in place, the batch's first
//! flags stored last with Release, SeqCst fence, driver event suppression read). `vvu-inflight`
//! keeps a packed INFLIGHT_SHMFD region current (per ring descriptor: a copy at pop; per chain: a
//! free-list link and the used position before the publish, the flag cleared after it).
//! `vvu-dirty-log` logs as during a live migration: each chain's writable segments are copied at
//! pop and marked at push, each used descriptor's slot is marked, and the device event area
//! writes are logged (none here: nothing enables or disables notifications).

use std::fs::File;
use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};
use vvu_core::dirty_log::{DirtyLog, QueueLog};
use vvu_core::inflight::{InflightRegion, RingLayout};
use vvu_core::memory::{create_memfd, GuestMemory, MemoryRegion, RegionSpec};
use vvu_core::queue::{
    ChainBatch, Descriptor, PackedConfig, PackedDescriptor, PackedQueue, QueueConfig, RingPosition,
    SplitQueue, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
};

const Q: u16 = 256;
const MEM_SIZE: u64 = 2 << 20;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000; // virtio-queue refuses an avail ring at address 0
const USED: u64 = 0x2000;
/// `used_event` at the end of the avail ring (EVENT_IDX).
const USED_EVENT: u64 = AVAIL + 4 + 2 * Q as u64;
const TABLES: u64 = 0x4000; // 256 indirect tables of 16 entries: 64 KiB
const BUFFERS: u64 = 0x20000;
const BUF_STRIDE: u64 = 256;

#[derive(Clone, Copy)]
enum Workload {
    OneDesc,
    FourDesc,
    Indirect16,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::OneDesc => "1desc",
            Workload::FourDesc => "4desc",
            Workload::Indirect16 => "indirect16",
        }
    }
}

/// Readable 16-byte header, `n - 2` writable 256-byte buffers, writable 1-byte status, as
/// `(len, flags)`.
fn blk_shape(n: usize) -> Vec<(u32, u16)> {
    let mut v = vec![(16, 0)];
    v.extend(std::iter::repeat_n((256, VIRTQ_DESC_F_WRITE), n - 2));
    v.push((1, VIRTQ_DESC_F_WRITE));
    v
}

/// The untimed driver side of a benchmark: makes pre-built chains available again.
trait Refill {
    /// Number of distinct pre-built chains.
    fn chains(&self) -> usize;
    /// Make the first `n` of them available (the device consumed everything before).
    fn publish(&mut self, n: usize);
}

/// The three views of the one memfd.
struct Memories {
    driver: GuestMemory,
    device: GuestMemory,
    oracle: GuestMemoryMmap<()>,
}

fn memories() -> Memories {
    let fd = create_memfd("queue-bench", MEM_SIZE).unwrap();
    let ours = || {
        let spec = RegionSpec {
            guest_phys_addr: 0,
            size: MEM_SIZE,
            userspace_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
        };
        let region = MemoryRegion::map(fd.try_clone().unwrap(), spec).unwrap();
        GuestMemory::new(vec![Arc::new(region)]).unwrap()
    };
    let file = File::from(fd.try_clone().unwrap());
    let mapping = MmapRegion::<()>::from_file(FileOffset::new(file, 0), MEM_SIZE as usize).unwrap();
    let region = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
    Memories {
        driver: ours(),
        device: ours(),
        oracle: GuestMemoryMmap::from_regions(vec![region]).unwrap(),
    }
}

/// The driver: writes the descriptor image once, then re-publishes its chains.
struct Driver {
    mem: GuestMemory,
    /// Heads of the distinct pre-built chains.
    heads: Vec<u16>,
    avail_idx: u16,
}

impl Driver {
    fn new(mem: GuestMemory, workload: Workload) -> Self {
        let mut buffer = BUFFERS;
        // Write `shape` as a linked list at entries `first..` of `table`, one buffer each.
        let mut put_chain = |table: u64, first: u16, shape: &[(u32, u16)]| {
            for (k, &(len, flags)) in shape.iter().enumerate() {
                let index = first + k as u16;
                let (flags, next) = if k + 1 < shape.len() {
                    (flags | VIRTQ_DESC_F_NEXT, index + 1)
                } else {
                    (flags, 0)
                };
                let d = Descriptor::new(buffer, len, flags, next);
                mem.write(table + 16 * u64::from(index), &d.to_le_bytes())
                    .unwrap();
                buffer += BUF_STRIDE;
            }
        };
        const W: u16 = VIRTQ_DESC_F_WRITE;
        let blk = blk_shape;
        let mut heads = Vec::new();
        match workload {
            Workload::OneDesc => {
                for i in 0..Q {
                    put_chain(DESC, i, &[(256, W)]);
                    heads.push(i);
                }
            }
            Workload::FourDesc => {
                for head in (0..Q).step_by(4) {
                    put_chain(DESC, head, &blk(4));
                    heads.push(head);
                }
            }
            Workload::Indirect16 => {
                let table_len = 16 * 16;
                for i in 0..Q {
                    let table = TABLES + u64::from(i) * u64::from(table_len);
                    put_chain(table, 0, &blk(16));
                    let d = Descriptor::new(table, table_len, VIRTQ_DESC_F_INDIRECT, 0);
                    mem.write(DESC + 16 * u64::from(i), &d.to_le_bytes())
                        .unwrap();
                    heads.push(i);
                }
            }
        }
        assert!(buffer <= MEM_SIZE);
        let mut driver = Self {
            mem,
            heads,
            avail_idx: 0,
        };
        driver.reset();
        driver
    }

    /// Zero the ring indexes and flags (before a fresh device starts on the ring).
    fn reset(&mut self) {
        self.avail_idx = 0;
        for gpa in [AVAIL, AVAIL + 2, USED, USED + 2, USED_EVENT] {
            self.mem.store_u16(gpa, 0, Ordering::Release).unwrap();
        }
    }
}

impl Refill for Driver {
    fn chains(&self) -> usize {
        self.heads.len()
    }

    /// Make the first `n` pre-built chains available again: `n` ring entries, one avail.idx
    /// store. The device has consumed everything published before, so every head is free.
    fn publish(&mut self, n: usize) {
        debug_assert!(n <= self.heads.len());
        for (k, &head) in self.heads[..n].iter().enumerate() {
            let slot = u64::from(self.avail_idx.wrapping_add(k as u16) % Q);
            self.mem
                .store_u16(AVAIL + 4 + 2 * slot, head, Ordering::Relaxed)
                .unwrap();
        }
        self.avail_idx = self.avail_idx.wrapping_add(n as u16);
        self.mem
            .store_u16(AVAIL + 2, self.avail_idx, Ordering::Release)
            .unwrap();
    }
}

/// One device implementation: process up to `max` available chains as one batch.
trait Device {
    /// Pop up to `max` chains, translate their buffers, push a used entry for each, publish
    /// once and decide on a notification. Returns how many chains were processed.
    fn process(&mut self, max: usize) -> usize;
}

struct Vvu {
    queue: SplitQueue,
    batch: ChainBatch,
}

impl Vvu {
    /// With `log`, every write is logged as during a live migration (used ring included).
    fn new(mem: GuestMemory, log: Option<Arc<DirtyLog>>) -> Self {
        let mut queue = SplitQueue::new(QueueConfig {
            size: Q,
            desc_table: DESC,
            avail_ring: AVAIL,
            used_ring: USED,
            event_idx: true,
            indirect: true,
        })
        .unwrap();
        queue.attach(mem).unwrap();
        queue.set_log(log.map(|log| QueueLog {
            log,
            used_ring: Some(USED),
        }));
        Self {
            queue,
            batch: ChainBatch::with_capacity(64, 64 * 16),
        }
    }

    /// The same device keeping an INFLIGHT_SHMFD region current (one memfd, this queue only).
    fn with_inflight(mem: GuestMemory) -> Self {
        let mut vvu = Self::new(mem, None);
        let region = Arc::new(InflightRegion::allocate(RingLayout::Split, 1, Q).unwrap());
        let view = region.split_queue(0, Q).unwrap();
        vvu.queue.set_inflight(view).unwrap();
        vvu
    }
}

impl Device for Vvu {
    #[inline(never)]
    fn process(&mut self, max: usize) -> usize {
        self.batch.clear();
        let n = self.queue.pop_batch(&mut self.batch, max).unwrap();
        for chain in self.batch.chains() {
            self.queue
                .push_used(chain.head(), chain.writable_len())
                .unwrap();
        }
        black_box(self.queue.publish_used().unwrap());
        black_box(&self.batch);
        n
    }
}

/// A translated piece of a buffer, as the oracle device records it (vvu's `Segment` plus the
/// direction, which vvu keeps per chain instead). `host` is only read through `black_box`.
struct Piece {
    #[allow(dead_code)] // read only through black_box
    host: *mut u8,
    len: u32,
    gpa: u64,
    writable: bool,
}

struct VirtioQueue {
    queue: Queue,
    mem: GuestMemoryMmap<()>,
    pieces: Vec<Piece>,
}

impl VirtioQueue {
    fn new(mem: GuestMemoryMmap<()>) -> Self {
        let mut queue = Queue::new(Q).unwrap();
        queue.set_size(Q);
        queue
            .try_set_desc_table_address(GuestAddress(DESC))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(AVAIL))
            .unwrap();
        queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        queue.set_event_idx(true);
        queue.set_ready(true);
        Self {
            queue,
            mem,
            pieces: Vec::with_capacity(64 * 16),
        }
    }
}

impl Device for VirtioQueue {
    #[inline(never)]
    fn process(&mut self, max: usize) -> usize {
        self.pieces.clear();
        let mut n = 0;
        while n < max {
            let Some(mut chain) = self.queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain.by_ref() {
                let writable = desc.is_write_only();
                let (addr, len) = (desc.addr(), desc.len() as usize);
                match self.mem.get_slice(addr, len) {
                    // The common case: the buffer lies in one region.
                    Ok(slice) => self.pieces.push(Piece {
                        host: slice.ptr_guard_mut().as_ptr(),
                        len: slice.len() as u32,
                        gpa: addr.0,
                        writable,
                    }),
                    // Crossing a region end (never in this bench): walk it piece by piece.
                    Err(_) => {
                        let mut gpa = addr.0;
                        for slice in self.mem.get_slices(addr, len) {
                            let slice = slice.expect("buffer outside guest memory");
                            self.pieces.push(Piece {
                                host: slice.ptr_guard_mut().as_ptr(),
                                len: slice.len() as u32,
                                gpa,
                                writable,
                            });
                            gpa += slice.len() as u64;
                        }
                    }
                }
                if writable {
                    written += desc.len();
                }
            }
            self.queue.add_used(&self.mem, head, written).unwrap();
            n += 1;
        }
        black_box(self.queue.needs_notification(&self.mem).unwrap());
        black_box(&self.pieces);
        n
    }
}

/// Process `iters` batches of `batch` chains; only the device's work is timed (see module docs).
fn run_rounds(dev: &mut dyn Device, drv: &mut dyn Refill, batch: usize, iters: u64) -> Duration {
    // A round is as many whole batches as there are distinct chains.
    let per_round = (drv.chains() / batch) as u64;
    let mut elapsed = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let batches = left.min(per_round);
        let chains = batches as usize * batch;
        drv.publish(chains);
        let start = Instant::now();
        let mut done = 0;
        for _ in 0..batches {
            done += dev.process(batch);
        }
        elapsed += start.elapsed();
        assert_eq!(done, chains, "the device must see every published chain");
        left -= batches;
    }
    elapsed
}

/// Before measuring: both devices must see the same chains as the same `(gpa, len, writable)`
/// pieces, so that they are measured doing the same work.
fn check_same_work(mems: &Memories, drv: &mut Driver) {
    let n = drv.heads.len().min(32);
    drv.reset();
    let mut vvu = Vvu::new(mems.device.clone(), None);
    drv.publish(n);
    assert_eq!(vvu.process(n), n);
    let ours: Vec<(u64, u32, bool)> = vvu
        .batch
        .iter()
        .flat_map(|c| {
            let r = c.readable().iter().map(|s| (s.gpa, s.len, false));
            r.chain(c.writable().iter().map(|s| (s.gpa, s.len, true)))
        })
        .collect();
    drv.reset();
    let mut oracle = VirtioQueue::new(mems.oracle.clone());
    drv.publish(n);
    assert_eq!(oracle.process(n), n);
    let theirs: Vec<(u64, u32, bool)> = oracle
        .pieces
        .iter()
        .map(|p| (p.gpa, p.len, p.writable))
        .collect();
    assert_eq!(ours, theirs);
}

/// A dirty log covering the benchmark memory.
fn bench_log() -> Arc<DirtyLog> {
    let log_size = MEM_SIZE / (8 * 4096);
    let fd = create_memfd("queue-bench-log", log_size).unwrap();
    Arc::new(DirtyLog::map(fd, log_size, 0).unwrap())
}

fn bench_split(c: &mut Criterion) {
    for workload in [Workload::OneDesc, Workload::FourDesc, Workload::Indirect16] {
        let mems = memories();
        let mut drv = Driver::new(mems.driver.clone(), workload);
        check_same_work(&mems, &mut drv);
        for batch in [1usize, 32] {
            let mut group = c.benchmark_group(format!("split_{}_batch{batch}", workload.name()));
            group.throughput(Throughput::Elements(batch as u64));
            {
                drv.reset();
                let mut dev = Vvu::new(mems.device.clone(), None);
                group.bench_function(BenchmarkId::from_parameter("vvu"), |b| {
                    b.iter_custom(|iters| run_rounds(&mut dev, &mut drv, batch, iters))
                });
            }
            {
                drv.reset();
                let mut dev = Vvu::new(mems.device.clone(), Some(bench_log()));
                group.bench_function(BenchmarkId::from_parameter("vvu-dirty-log"), |b| {
                    b.iter_custom(|iters| run_rounds(&mut dev, &mut drv, batch, iters))
                });
            }
            {
                drv.reset();
                let mut dev = Vvu::with_inflight(mems.device.clone());
                group.bench_function(BenchmarkId::from_parameter("vvu-inflight"), |b| {
                    b.iter_custom(|iters| run_rounds(&mut dev, &mut drv, batch, iters))
                });
            }
            {
                drv.reset();
                let mut dev = VirtioQueue::new(mems.oracle.clone());
                group.bench_function(BenchmarkId::from_parameter("virtio-queue"), |b| {
                    b.iter_custom(|iters| run_rounds(&mut dev, &mut drv, batch, iters))
                });
            }
            group.finish();
        }
    }
}

/// The driver of the packed benchmarks: one lap of pre-built chains in ring order.
struct PackedDriver {
    mem: GuestMemory,
    /// Each chain's descriptors (flags without AVAIL/USED), in ring order; one lap in all.
    chains: Vec<Vec<PackedDescriptor>>,
    next: RingPosition,
}

impl PackedDriver {
    fn new(mem: GuestMemory, workload: Workload) -> Self {
        let mut buffer = BUFFERS;
        let mut list = |shape: &[(u32, u16)], id: u16| -> Vec<PackedDescriptor> {
            shape
                .iter()
                .enumerate()
                .map(|(k, &(len, flags))| {
                    let next = if k + 1 < shape.len() {
                        VIRTQ_DESC_F_NEXT
                    } else {
                        0
                    };
                    let d = PackedDescriptor::new(buffer, len, id, flags | next);
                    buffer += BUF_STRIDE;
                    d
                })
                .collect()
        };
        let chains: Vec<Vec<PackedDescriptor>> = match workload {
            Workload::OneDesc => (0..Q)
                .map(|id| list(&[(256, VIRTQ_DESC_F_WRITE)], id))
                .collect(),
            Workload::FourDesc => (0..Q / 4).map(|id| list(&blk_shape(4), id)).collect(),
            Workload::Indirect16 => (0..Q)
                .map(|id| {
                    let table = TABLES + u64::from(id) * 256;
                    for (k, entry) in list(&blk_shape(16), 0).iter().enumerate() {
                        // Only WRITE is valid inside a packed table.
                        let entry = PackedDescriptor {
                            flags: entry.flags & VIRTQ_DESC_F_WRITE,
                            ..*entry
                        };
                        mem.write(table + 16 * k as u64, &entry.to_le_bytes())
                            .unwrap();
                    }
                    vec![PackedDescriptor::new(table, 256, id, VIRTQ_DESC_F_INDIRECT)]
                })
                .collect(),
        };
        assert!(buffer <= MEM_SIZE);
        assert_eq!(chains.iter().map(Vec::len).sum::<usize>(), usize::from(Q));
        let mut driver = Self {
            mem,
            chains,
            next: RingPosition::START,
        };
        driver.reset();
        driver
    }

    /// Zero the ring and the event areas (before a fresh device starts on the ring).
    fn reset(&mut self) {
        self.next = RingPosition::START;
        self.mem.write(DESC, &[0; 16 * Q as usize]).unwrap();
        for gpa in [AVAIL, AVAIL + 2, USED, USED + 2] {
            self.mem.store_u16(gpa, 0, Ordering::Release).unwrap();
        }
    }
}

impl Refill for PackedDriver {
    fn chains(&self) -> usize {
        self.chains.len()
    }

    /// Write the first `n` chains at the next ring positions (wherever the last round stopped),
    /// each made available by storing its first descriptor's flags last (Release). The device
    /// completed every earlier chain, so the buffer ids are free.
    fn publish(&mut self, n: usize) {
        for chain in &self.chains[..n] {
            let avail = if self.next.wrap {
                VIRTQ_DESC_F_AVAIL
            } else {
                VIRTQ_DESC_F_USED
            };
            let first = self.next;
            for (k, d) in chain.iter().enumerate() {
                let at = DESC + 16 * u64::from(self.next.index);
                self.mem.write(at, &d.to_le_bytes()[..14]).unwrap();
                if k > 0 {
                    self.mem
                        .store_u16(at + 14, d.flags | avail, Ordering::Relaxed)
                        .unwrap();
                }
                self.next = self.next.advance(1, Q);
            }
            self.mem
                .store_u16(
                    DESC + 16 * u64::from(first.index) + 14,
                    chain[0].flags | avail,
                    Ordering::Release,
                )
                .unwrap();
        }
    }
}

struct VvuPacked {
    queue: PackedQueue,
    batch: ChainBatch,
}

impl VvuPacked {
    fn new(mem: GuestMemory) -> Self {
        let mut queue = PackedQueue::new(PackedConfig {
            size: Q,
            desc_ring: DESC,
            driver_event: AVAIL,
            device_event: USED,
            event_idx: true,
            indirect: true,
        })
        .unwrap();
        queue.attach(mem).unwrap();
        Self {
            queue,
            batch: ChainBatch::with_capacity(64, 64 * 16),
        }
    }

    /// The same device logging every write into `log` (device event area included).
    fn with_log(mem: GuestMemory, log: Arc<DirtyLog>) -> Self {
        let mut vvu = Self::new(mem);
        vvu.queue.set_log(Some(QueueLog {
            log,
            used_ring: Some(USED),
        }));
        vvu
    }

    /// The same device keeping a packed INFLIGHT_SHMFD region current.
    fn with_inflight(mem: GuestMemory) -> Self {
        let mut vvu = Self::new(mem);
        let region = Arc::new(InflightRegion::allocate(RingLayout::Packed, 1, Q).unwrap());
        let view = region.packed_queue(0, Q).unwrap();
        vvu.queue.set_inflight(view).unwrap();
        vvu
    }
}

impl Device for VvuPacked {
    #[inline(never)]
    fn process(&mut self, max: usize) -> usize {
        self.batch.clear();
        let n = self.queue.pop_batch(&mut self.batch, max).unwrap();
        for chain in self.batch.chains() {
            self.queue
                .push_used(chain.head(), chain.writable_len())
                .unwrap();
        }
        black_box(self.queue.publish_used().unwrap());
        black_box(&self.batch);
        n
    }
}

fn bench_packed(c: &mut Criterion) {
    for workload in [Workload::OneDesc, Workload::FourDesc, Workload::Indirect16] {
        let mems = memories();
        // The packed device must see the same buffers as the split one. The split image goes
        // first: the packed driver then rewrites the ring and the indirect tables its own way.
        let mut split_drv = Driver::new(mems.driver.clone(), workload);
        let n = split_drv.chains().min(32);
        let mut split = Vvu::new(mems.device.clone(), None);
        split_drv.publish(n);
        assert_eq!(split.process(n), n);
        let mut drv = PackedDriver::new(mems.driver.clone(), workload);
        let mut packed = VvuPacked::new(mems.device.clone());
        drv.publish(n);
        assert_eq!(packed.process(n), n);
        let pieces = |batch: &ChainBatch| -> Vec<(u64, u32, u32, u32)> {
            batch
                .iter()
                .map(|c| {
                    let first = c.readable().first().or(c.writable().first());
                    (
                        first.map_or(0, |s| s.gpa),
                        c.readable_len(),
                        c.writable_len(),
                        u32::from(c.descriptors()),
                    )
                })
                .collect()
        };
        assert_eq!(pieces(&split.batch), pieces(&packed.batch));
        for batch in [1usize, 32] {
            let mut group = c.benchmark_group(format!("packed_{}_batch{batch}", workload.name()));
            group.throughput(Throughput::Elements(batch as u64));
            drv.reset();
            let mut dev = VvuPacked::new(mems.device.clone());
            group.bench_function(BenchmarkId::from_parameter("vvu"), |b| {
                b.iter_custom(|iters| run_rounds(&mut dev, &mut drv, batch, iters))
            });
            drv.reset();
            let mut dev = VvuPacked::with_log(mems.device.clone(), bench_log());
            group.bench_function(BenchmarkId::from_parameter("vvu-dirty-log"), |b| {
                b.iter_custom(|iters| run_rounds(&mut dev, &mut drv, batch, iters))
            });
            drv.reset();
            let mut dev = VvuPacked::with_inflight(mems.device.clone());
            group.bench_function(BenchmarkId::from_parameter("vvu-inflight"), |b| {
                b.iter_custom(|iters| run_rounds(&mut dev, &mut drv, batch, iters))
            });
            group.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = bench_split, bench_packed
}
criterion_main!(benches);
