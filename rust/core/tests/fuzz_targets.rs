//! Fuzz targets that complete the hostile-ring property tests (queue_hostile.rs and
//! queue_packed_hostile.rs fuzz the split and packed descriptor walks, indirect tables
//! included): inflight recovery from a region the front-end filled with garbage, IOTLB
//! translation against a model, the virtio-blk request parser and the virtio-net transmit
//! header path, each fed hostile input and checked against an oracle.
//!
//! proptest on stable Rust (docs/reliability.md says why not cargo-fuzz): CI runs the default
//! cases; `VVU_FUZZ_CASES=N` runs N per target on demand. A failing case is shrunk and its seed
//! is written to `fuzz_targets.proptest-regressions` beside this file: commit it, it is
//! replayed first on every later run.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use proptest::prelude::*;
use vvu_core::inflight::{InflightRegion, RingLayout};
use vvu_core::iotlb::Iotlb;
use vvu_core::memory::{create_memfd, GuestMemory, MemoryRegion, RegionSpec};
use vvu_core::queue::{ChainBatch, QueueConfig, SplitQueue, SplitQueueDriver};
use vvu_core::worker::blk::{
    BlkHandler, BlkOptions, SECTOR_SIZE, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vvu_core::worker::net::{NetFeatures, NetPort, MAX_FRAME_LEN};
use vvu_core::worker::ChainHandler;

const UVA: u64 = 0x7f00_0000_0000;
/// Two adjacent 64 KiB regions: request buffers cross from one into the other.
const REGION: u64 = 0x10000;
const READABLE: u64 = 0xF800;
const WRITABLE: u64 = 0x12000;
const MAX_BUFFER: usize = 0x1800;

/// One memfd mapped twice (the driver's view and the device's), as two regions.
fn memory_pair() -> (GuestMemory, GuestMemory) {
    common::bound_resources();
    let fd = create_memfd("fuzz-targets", 2 * REGION).unwrap();
    let map = || {
        let regions = (0..2u64)
            .map(|i| {
                let spec = RegionSpec {
                    guest_phys_addr: i * REGION,
                    size: REGION,
                    userspace_addr: UVA + i * REGION,
                    mmap_offset: i * REGION,
                };
                Arc::new(MemoryRegion::map(fd.try_clone().unwrap(), spec).unwrap())
            })
            .collect();
        GuestMemory::new(regions).unwrap()
    };
    (map(), map())
}

/// Cut `len` bytes at `base` into non-empty pieces at the given cut points.
fn pieces(base: u64, len: usize, cuts: &[usize]) -> Vec<(u64, u32)> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
    points.extend([0, len]);
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| (base + w[0] as u64, (w[1] - w[0]) as u32))
        .collect()
}

/// A driver and a device queue over `memory_pair`, one chain at a time.
struct OneChain {
    driver: SplitQueueDriver,
    device: SplitQueue,
    device_memory: GuestMemory,
}

impl OneChain {
    fn new() -> Self {
        let (drv_mem, dev_mem) = memory_pair();
        let config = QueueConfig {
            size: 16,
            desc_table: 0x0,
            avail_ring: 0x1000,
            used_ring: 0x2000,
            event_idx: false,
            indirect: true,
        };
        let driver = SplitQueueDriver::new(drv_mem, config).unwrap();
        let mut device = SplitQueue::new(config).unwrap();
        device.attach(dev_mem.clone()).unwrap();
        Self {
            driver,
            device,
            device_memory: dev_mem,
        }
    }

    /// Post one chain, pop it on the device side, let `handler` handle it, complete it.
    fn run(
        &mut self,
        readable: &[(u64, u32)],
        writable: &[(u64, u32)],
        handler: &mut dyn ChainHandler,
    ) -> u32 {
        self.driver.add_chain(readable, writable).unwrap();
        self.driver.publish().unwrap();
        let mut batch = ChainBatch::new();
        assert_eq!(self.device.pop_batch(&mut batch, 1), Ok(1));
        let view = batch.get(0).unwrap();
        let head = view.head();
        let used = handler.handle(&self.device_memory, view);
        handler.flush_batch(); // as the worker does after each batch (net TX forwards then)
        self.device.push_used(head, used).unwrap();
        self.device.publish_used().unwrap();
        let (reaped, len) = self.driver.reap_used().unwrap().unwrap();
        assert_eq!((reaped, len), (head, used));
        used
    }

    fn memory(&self) -> &GuestMemory {
        self.driver.memory()
    }
}

// --- inflight recovery ---------------------------------------------------------------------------

/// `len` bytes of noise from `seed` (cheap to make in bulk; the seed is the input proptest
/// shrinks and records). `sparse`: mostly zeros with small values, so that fields look like
/// indexes and flags more often than uniform bytes would.
fn noise(seed: u64, sparse: bool, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match (sparse, x % 8) {
                (false, _) => x as u8,
                (true, 0) => (x >> 8) as u8 % 4,
                (true, _) => 0,
            }
        })
        .collect()
}

/// A queue region of random bytes, made plausible (version, desc_num) often enough to get past
/// the first checks.
fn hostile_region(
    layout: RingLayout,
    queue_size: u16,
    bytes: &[u8],
    plausible: bool,
) -> Arc<InflightRegion> {
    common::bound_resources();
    let region = Arc::new(InflightRegion::allocate(layout, 1, queue_size).unwrap());
    let file = File::from(region.fd().try_clone().unwrap());
    let len = layout.queue_region_size(queue_size).min(bytes.len());
    file.write_all_at(&bytes[..len], 0).unwrap();
    if plausible {
        // features (u64), version (u16) = 1, desc_num (u16) = queue size: both layouts.
        file.write_all_at(&1u16.to_le_bytes(), 8).unwrap();
        file.write_all_at(&queue_size.to_le_bytes(), 10).unwrap();
    }
    assert!(file.as_raw_fd() >= 0);
    region
}

fn check_split_recovery(queue_size: u16, bytes: &[u8], plausible: bool, used_idx: u16) {
    let region = hostile_region(RingLayout::Split, queue_size, bytes, plausible);
    let mut queue = region.split_queue(0, queue_size).unwrap();
    let recovery = queue.recover(used_idx);
    if recovery.discarded.is_some() {
        assert!(recovery.resubmit.is_empty() && !recovery.restored);
    }
    let mut seen = vec![false; usize::from(queue_size)];
    for &head in &recovery.resubmit {
        assert!(head < queue_size, "head {head} of a ring of {queue_size}");
        assert!(!seen[usize::from(head)], "head {head} resubmitted twice");
        seen[usize::from(head)] = true;
        assert!(queue.is_inflight(head));
    }
    // Recovering again from what the first recovery left gives the same answer.
    let again = region.split_queue(0, queue_size).unwrap().recover(used_idx);
    assert_eq!(again.resubmit, recovery.resubmit);
    assert_eq!(
        again.discarded, None,
        "the first recovery left a sound region"
    );
}

fn check_packed_recovery(queue_size: u16, bytes: &[u8], plausible: bool, flags: &[u16]) {
    let region = hostile_region(RingLayout::Packed, queue_size, bytes, plausible);
    let mut queue = region.packed_queue(0, queue_size).unwrap();
    let recovery = queue.recover(|i| flags[usize::from(i) % flags.len()]);
    if recovery.discarded.is_some() {
        assert!(recovery.resubmit.is_empty() && !recovery.restored);
    }
    let mut slots = std::collections::HashSet::new();
    let mut descriptors = 0usize;
    for chain in &recovery.resubmit {
        assert!(chain.slot < queue_size);
        assert!(
            slots.insert(chain.slot),
            "slot {} resubmitted twice",
            chain.slot
        );
        assert!(!chain.descriptors.is_empty());
        descriptors += chain.descriptors.len();
    }
    assert!(
        descriptors <= usize::from(queue_size),
        "{descriptors} descriptors"
    );
    assert!(recovery.used_idx < queue_size || !recovery.restored);
}

// --- IOTLB ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum TlbOp {
    Update {
        iova: u64,
        size: u64,
        uaddr: u64,
        perm: u8,
    },
    Invalidate {
        iova: u64,
        size: u64,
    },
}

fn tlb_op() -> impl Strategy<Value = TlbOp> {
    // A small IOVA space (64 pages) so that entries overlap often; uaddr inside, across or
    // outside the two regions; sizes from 0 to past the space, sometimes unaligned.
    let addr = prop_oneof![
        (0u64..64).prop_map(|p| p * 0x1000),
        0u64..0x40000,
        Just(u64::MAX - 0xFFF),
    ];
    let size = prop_oneof![
        (0u64..8).prop_map(|p| p * 0x1000),
        1u64..0x9000,
        Just(u64::MAX),
    ];
    let uaddr = prop_oneof![
        (0u64..32).prop_map(|p| UVA + p * 0x1000),
        (0u64..0x30000).prop_map(|o| UVA + o),
        any::<u64>(),
    ];
    prop_oneof![
        4 => (addr.clone(), size.clone(), uaddr, 0u8..5)
            .prop_map(|(iova, size, uaddr, perm)| TlbOp::Update { iova, size, uaddr, perm }),
        1 => (addr, size).prop_map(|(iova, size)| TlbOp::Invalidate { iova, size }),
    ]
}

/// The model: byte-exact, per page-sized probe points, as a map from IOVA to (uaddr, perm).
#[derive(Default)]
struct TlbModel {
    /// Disjoint [iova, end) → (uaddr, perm).
    entries: BTreeMap<u64, (u64, u64, u8)>,
}

impl TlbModel {
    fn cut(&mut self, start: u64, end: u64) {
        let overlapping: Vec<(u64, (u64, u64, u8))> = self
            .entries
            .iter()
            .filter(|(&iova, &(e, _, _))| iova < end && e > start)
            .map(|(&k, &v)| (k, v))
            .collect();
        for (iova, (e, uaddr, perm)) in overlapping {
            self.entries.remove(&iova);
            if iova < start {
                self.entries.insert(iova, (start, uaddr, perm));
            }
            if e > end {
                self.entries.insert(end, (e, uaddr + (end - iova), perm));
            }
        }
    }

    fn lookup(&self, iova: u64) -> Option<(u64, u8)> {
        let (&start, &(end, uaddr, perm)) = self.entries.range(..=iova).next_back()?;
        // Lazily: past the entry's end, `iova - start` may be anything and the sum overflow.
        (iova < end).then(|| (uaddr + (iova - start), perm))
    }
}

fn check_iotlb(ops: &[TlbOp], probes: &[u64]) {
    let (memory, _) = memory_pair();
    let mut tlb = Iotlb::new();
    let mut model = TlbModel::default();
    for op in ops {
        match *op {
            TlbOp::Update {
                iova,
                size,
                uaddr,
                perm,
            } => {
                let valid = (1..=3).contains(&perm)
                    && size > 0
                    && iova.checked_add(size).is_some()
                    && uaddr.checked_add(size).is_some_and(|end| {
                        (0..2).any(|r| {
                            let base = UVA + r * REGION;
                            uaddr >= base && end <= base + REGION
                        })
                    });
                let result = tlb.update(iova, size, uaddr, perm, &memory);
                assert_eq!(result.is_ok(), valid, "{op:?}: {result:?}");
                if valid {
                    model.cut(iova, iova + size);
                    model.entries.insert(iova, (iova + size, uaddr, perm));
                }
            }
            TlbOp::Invalidate { iova, size } => {
                let result = tlb.invalidate(iova, size);
                assert_eq!(result.is_ok(), size > 0, "{op:?}");
                if size > 0 {
                    model.cut(iova, iova.saturating_add(size));
                }
            }
        }
    }
    // Entries agree with the model, exactly.
    let got: Vec<(u64, u64, u64, u8)> = tlb
        .entries()
        .map(|e| {
            let perm = u8::from(e.access.read) | (u8::from(e.access.write) << 1);
            (e.iova, e.iova + e.size, e.uaddr, perm)
        })
        .collect();
    let want: Vec<(u64, u64, u64, u8)> = model
        .entries
        .iter()
        .map(|(&iova, &(end, uaddr, perm))| (iova, end, uaddr, perm))
        .collect();
    assert_eq!(got, want);
    // Translation through the snapshot: the same guest byte as through the memory table, or a
    // miss where the model has nothing.
    let view = tlb.snapshot(&memory).unwrap();
    for &iova in probes {
        match (model.lookup(iova), view.slice(iova, 1)) {
            (Some((uaddr, _)), Ok(slice)) => {
                let gpa = memory.uva_to_gpa(uaddr).unwrap();
                let direct = memory.slice(gpa, 1).unwrap();
                assert_eq!(slice.as_ptr(), direct.as_ptr(), "iova {iova:#x}");
            }
            (None, Err(_)) => {}
            (want, got) => panic!("iova {iova:#x}: model {want:?}, snapshot {:?}", got.is_ok()),
        }
    }
}

// --- virtio-blk requests -------------------------------------------------------------------------

const CAPACITY: u64 = 64; // sectors

#[derive(Debug, Clone)]
struct BlkRequest {
    kind: u32,
    sector: u64,
    /// Readable bytes after the 16-byte header (OUT data, discard segments, junk).
    payload: Vec<u8>,
    /// Readable length kept: all, or a cut through the header.
    header_cut: Option<usize>,
    readable_cuts: Vec<usize>,
    writable_len: usize,
    writable_cuts: Vec<usize>,
}

fn blk_request() -> impl Strategy<Value = BlkRequest> {
    let kind = prop_oneof![
        Just(VIRTIO_BLK_T_IN),
        Just(VIRTIO_BLK_T_OUT),
        Just(VIRTIO_BLK_T_FLUSH),
        Just(VIRTIO_BLK_T_GET_ID),
        Just(VIRTIO_BLK_T_DISCARD),
        Just(VIRTIO_BLK_T_WRITE_ZEROES),
        any::<u32>(),
    ];
    let sector = prop_oneof![
        0..CAPACITY + 2,
        Just(CAPACITY - 1),
        Just(u64::MAX),
        any::<u64>(),
    ];
    let sectors_or_bytes = prop_oneof![
        (0usize..5).prop_map(|s| s * SECTOR_SIZE as usize),
        0usize..MAX_BUFFER - 16,
    ];
    (
        kind,
        sector,
        (sectors_or_bytes, any::<u64>(), any::<bool>())
            .prop_map(|(n, seed, sparse)| noise(seed, sparse, n)),
        proptest::option::weighted(0.1, 0usize..16),
        proptest::collection::vec(any::<usize>(), 0..4),
        prop_oneof![
            (0usize..5).prop_map(|s| s * SECTOR_SIZE as usize + 1),
            0usize..MAX_BUFFER,
        ],
        proptest::collection::vec(any::<usize>(), 0..4),
    )
        .prop_map(
            |(kind, sector, payload, header_cut, readable_cuts, writable_len, writable_cuts)| {
                BlkRequest {
                    kind,
                    sector,
                    payload,
                    header_cut,
                    readable_cuts,
                    writable_len,
                    writable_cuts,
                }
            },
        )
}

fn check_blk(image_seed: u8, requests: &[BlkRequest]) {
    let image = File::from(create_memfd("fuzz-blk-image", CAPACITY * SECTOR_SIZE).unwrap());
    let initial: Vec<u8> = (0..CAPACITY * SECTOR_SIZE)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(image_seed))
        .collect();
    image.write_all_at(&initial, 0).unwrap();
    let mut shadow = initial;
    let mut handler =
        BlkHandler::new(image.try_clone().unwrap(), CAPACITY, BlkOptions::default()).unwrap();
    let mut ring = OneChain::new();
    for r in requests {
        let mut readable = Vec::with_capacity(16 + r.payload.len());
        readable.extend_from_slice(&r.kind.to_le_bytes());
        readable.extend_from_slice(&[0; 4]);
        readable.extend_from_slice(&r.sector.to_le_bytes());
        readable.extend_from_slice(&r.payload);
        readable.truncate(r.header_cut.unwrap_or(usize::MAX));
        ring.memory().write(READABLE, &readable).unwrap();
        ring.memory()
            .write(WRITABLE, &vec![0xEE; r.writable_len])
            .unwrap();
        let rd = pieces(READABLE, readable.len(), &r.readable_cuts);
        let wr = pieces(WRITABLE, r.writable_len, &r.writable_cuts);
        if rd.is_empty() && wr.is_empty() {
            continue; // a chain needs a descriptor
        }
        let used = ring.run(&rd, &wr, &mut handler) as usize;
        assert!(
            used <= r.writable_len,
            "used {used} of {} writable",
            r.writable_len
        );
        let mut written = vec![0u8; r.writable_len];
        ring.memory().read(WRITABLE, &mut written).unwrap();
        if readable.len() < 16 || r.writable_len == 0 {
            assert_eq!(used, 0, "no header or no status byte: nothing to answer");
            continue;
        }
        let status = written[r.writable_len - 1];
        assert!(
            [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP].contains(&status),
            "status {status}"
        );
        let data_in = r.writable_len - 1;
        let start = r.sector.checked_mul(SECTOR_SIZE);
        match (r.kind, status) {
            (VIRTIO_BLK_T_IN, VIRTIO_BLK_S_OK) => {
                let start = start.unwrap() as usize;
                assert_eq!(used, data_in + 1);
                assert_eq!(written[..data_in], shadow[start..start + data_in]);
            }
            (VIRTIO_BLK_T_OUT, VIRTIO_BLK_S_OK) => {
                let start = start.unwrap() as usize;
                let data = &readable[16..];
                assert!(
                    start + data.len() <= shadow.len(),
                    "a write of {} bytes at sector {} succeeded past the end",
                    data.len(),
                    r.sector
                );
                shadow[start..start + data.len()].copy_from_slice(data);
            }
            (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES, _) => {
                // What was zeroed or deallocated is the handler's call: take the image as it is.
                image.read_exact_at(&mut shadow, 0).unwrap();
            }
            _ => {}
        }
        if r.kind == VIRTIO_BLK_T_OUT && status == VIRTIO_BLK_S_OK {
            let end = start.unwrap() + (readable.len() - 16) as u64;
            assert!(
                end <= CAPACITY * SECTOR_SIZE,
                "a write past the end succeeded"
            );
        }
        let mut now = vec![0u8; shadow.len()];
        image.read_exact_at(&mut now, 0).unwrap();
        assert!(
            now == shadow,
            "the image differs from what the requests did"
        );
        assert_eq!(image.metadata().unwrap().len(), CAPACITY * SECTOR_SIZE);
    }
}

// --- virtio-net transmit headers -----------------------------------------------------------------

#[derive(Debug, Clone)]
struct NetTx {
    header: Vec<u8>,
    frame_len: usize,
    cuts: Vec<usize>,
    writable: usize,
}

fn net_tx() -> impl Strategy<Value = NetTx> {
    let header = prop_oneof![
        3 => Just(vec![0u8; 12]),
        1 => proptest::collection::vec(any::<u8>(), 0..14),
        1 => (0usize..12).prop_map(|i| { let mut h = vec![0u8; 12]; h[i] = 1; h }),
    ];
    (
        header,
        prop_oneof![0usize..80, 0usize..MAX_BUFFER],
        proptest::collection::vec(any::<usize>(), 0..5),
        prop_oneof![4 => Just(0usize), 1 => 1usize..64],
    )
        .prop_map(|(header, frame_len, cuts, writable)| NetTx {
            header,
            frame_len,
            cuts,
            writable,
        })
}

fn check_net_tx(features: NetFeatures, packets: &[NetTx]) {
    let (a, b) = NetPort::pair(1 << 20).unwrap();
    let mut tx = a.tx_handler(features);
    let mut ring = OneChain::new();
    let hdr_len = features.header_len();
    for (n, p) in packets.iter().enumerate() {
        let mut bytes = p.header.clone();
        bytes.extend((0..p.frame_len).map(|i| (i as u8) ^ (n as u8)));
        ring.memory().write(READABLE, &bytes).unwrap();
        let rd = pieces(READABLE, bytes.len(), &p.cuts);
        let wr = pieces(WRITABLE, p.writable, &[]);
        if rd.is_empty() && wr.is_empty() {
            continue;
        }
        let before = a.stats();
        assert_eq!(
            ring.run(&rd, &wr, &mut tx),
            0,
            "nothing is written into a tx buffer"
        );
        let after = a.stats();
        let valid = p.writable == 0
            && bytes.len() >= hdr_len + 14
            && bytes.len() - hdr_len <= MAX_FRAME_LEN
            && bytes[0] == 0
            && bytes[1] == 0;
        let got = b.recv_frame().unwrap();
        if valid {
            assert_eq!(got.as_deref(), Some(&bytes[hdr_len..]), "packet {n}");
            assert_eq!(after.tx_packets, before.tx_packets + 1);
        } else {
            assert_eq!(got, None, "packet {n} must be refused");
            assert_eq!(after.tx_errors, before.tx_errors + 1);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(256), ..ProptestConfig::default() })]

    #[test]
    fn fuzz_split_inflight_recovery(
        queue_size in prop_oneof![1u16..9, Just(256u16), 1u16..1025],
        seed in any::<u64>(),
        sparse in any::<bool>(),
        plausible in any::<bool>(),
        used_idx in any::<u16>(),
    ) {
        check_split_recovery(queue_size, &noise(seed, sparse, 20000), plausible, used_idx);
    }

    #[test]
    fn fuzz_packed_inflight_recovery(
        queue_size in prop_oneof![1u16..9, Just(256u16), 1u16..1025],
        seed in any::<u64>(),
        sparse in any::<bool>(),
        plausible in any::<bool>(),
        flags in proptest::collection::vec(any::<u16>(), 1..16),
    ) {
        check_packed_recovery(queue_size, &noise(seed, sparse, 40000), plausible, &flags);
    }

    #[test]
    fn fuzz_iotlb_translation_matches_a_model(
        ops in proptest::collection::vec(tlb_op(), 1..40),
        probes in proptest::collection::vec(prop_oneof![0u64..0x48000, any::<u64>()], 1..64),
    ) {
        check_iotlb(&ops, &probes);
    }

    #[test]
    fn fuzz_blk_requests_against_a_shadow_image(
        seed in any::<u8>(),
        requests in proptest::collection::vec(blk_request(), 1..12),
    ) {
        check_blk(seed, &requests);
    }

    #[test]
    fn fuzz_net_tx_headers(
        mrg_rxbuf in any::<bool>(),
        version_1 in any::<bool>(),
        packets in proptest::collection::vec(net_tx(), 1..12),
    ) {
        check_net_tx(
            NetFeatures { mrg_rxbuf, version_1, ..NetFeatures::default() },
            &packets,
        );
    }
}
