//! virtio-blk through a real worker thread, using only the public API: a driver in the test
//! thread keeps many random requests in flight against a memfd image, checks every completion
//! against a shadow copy of the image, and stops and restarts the worker midway the way a
//! vhost-user back-end does around GET_VRING_BASE / SET_VRING_BASE.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use vvu_core::memory::{create_memfd, GuestMemory, MemoryRegion, RegionSpec};
use vvu_core::notify::EventFd;
use vvu_core::queue::{QueueConfig, SplitQueue, SplitQueueDriver};
use vvu_core::worker::blk::{
    BlkHandler, BlkOptions, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vvu_core::worker::{ChainHandler, QueueWorker, StoppedQueue, WorkerOptions};

const REGION: u64 = 0x10_0000;
const CAPACITY: u64 = 256;
const SLOTS: usize = 24;
const MAX_SECTORS: u64 = 8;
const PATIENCE: Duration = Duration::from_secs(20);

/// Two regions of one memfd, mapped twice: the driver's view and the device's.
fn guest_memory() -> (GuestMemory, GuestMemory) {
    let fd = create_memfd("worker-blk-guest", 2 * REGION).unwrap();
    let map = || {
        let regions = (0..2u64)
            .map(|i| {
                let spec = RegionSpec {
                    guest_phys_addr: i * REGION,
                    size: REGION,
                    userspace_addr: 0x7f00_0000_0000 + i * REGION,
                    mmap_offset: i * REGION,
                };
                Arc::new(MemoryRegion::map(fd.try_clone().unwrap(), spec).unwrap())
            })
            .collect();
        GuestMemory::new(regions).unwrap()
    };
    (map(), map())
}

fn config(event_idx: bool) -> QueueConfig {
    QueueConfig {
        size: 128,
        desc_table: 0x1000,
        avail_ring: 0x2000,
        used_ring: 0x3000,
        event_idx,
        indirect: true,
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Guest addresses of slot `i`: header, status byte, data (which crosses the region boundary
/// for the slots around it).
fn header_gpa(i: usize) -> u64 {
    0x8000 + 32 * i as u64
}
fn status_gpa(i: usize) -> u64 {
    0x9000 + i as u64
}
fn data_gpa(i: usize) -> u64 {
    // Slots are 0x2000 apart (data is at most 4 KiB); slot 12 straddles the boundary.
    REGION - 0x800 - 12 * 0x2000 + i as u64 * 0x2000
}

enum Expect {
    /// A read: the data it must return.
    Read(Vec<u8>),
    Status,
}

struct Request {
    slot: usize,
    len: usize,
    expect: Expect,
    status: u8,
    used: u32,
}

struct Driver {
    drv: SplitQueueDriver,
    kick: EventFd,
    call: EventFd,
    rng: XorShift,
    shadow: Vec<u8>,
    in_flight: HashMap<u16, Request>,
    free_slots: Vec<usize>,
    completed: u64,
}

impl Driver {
    fn mem(&self) -> &GuestMemory {
        self.drv.memory()
    }

    /// Queue one random request (not published).
    fn add_random(&mut self) {
        let slot = self.free_slots.pop().unwrap();
        let sector = self.rng.below(CAPACITY - MAX_SECTORS + 1);
        let count = 1 + self.rng.below(MAX_SECTORS);
        let len = (count * 512) as usize;
        let offset = (sector * 512) as usize;
        let op = self.rng.below(100);
        let (kind, expect, status, used) = match op {
            0..=39 => (
                VIRTIO_BLK_T_IN,
                Expect::Read(self.shadow[offset..offset + len].to_vec()),
                VIRTIO_BLK_S_OK,
                len as u32 + 1,
            ),
            40..=84 => {
                let seed = self.rng.next() as u8;
                let data: Vec<u8> = (0..len).map(|k| (k as u8).wrapping_add(seed) | 1).collect();
                self.mem().write(data_gpa(slot), &data).unwrap();
                self.shadow[offset..offset + len].copy_from_slice(&data);
                (VIRTIO_BLK_T_OUT, Expect::Status, VIRTIO_BLK_S_OK, 1)
            }
            85..=89 => (VIRTIO_BLK_T_FLUSH, Expect::Status, VIRTIO_BLK_S_OK, 1),
            90..=94 => {
                self.shadow[offset..offset + len].fill(0);
                (VIRTIO_BLK_T_DISCARD, Expect::Status, VIRTIO_BLK_S_OK, 1)
            }
            95..=97 => {
                self.shadow[offset..offset + len].fill(0);
                (
                    VIRTIO_BLK_T_WRITE_ZEROES,
                    Expect::Status,
                    VIRTIO_BLK_S_OK,
                    1,
                )
            }
            // Out of range: must fail and change nothing.
            _ => (VIRTIO_BLK_T_OUT, Expect::Status, VIRTIO_BLK_S_IOERR, 1),
        };
        let sector = if op >= 98 { CAPACITY } else { sector };
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem().write(header_gpa(slot), &header).unwrap();
        self.mem().write(status_gpa(slot), &[0xff]).unwrap();
        // Data in two segments, split at a random point.
        let split = 1 + self.rng.below(len as u64 - 1) as u32;
        let data = [
            (data_gpa(slot), split),
            (data_gpa(slot) + u64::from(split), len as u32 - split),
        ];
        let head_split = 1 + self.rng.below(15) as u32;
        let mut readable = vec![
            (header_gpa(slot), head_split),
            (header_gpa(slot) + u64::from(head_split), 16 - head_split),
        ];
        let mut writable = Vec::new();
        match kind {
            VIRTIO_BLK_T_IN => writable.extend_from_slice(&data),
            VIRTIO_BLK_T_OUT => readable.extend_from_slice(&data),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let mut segment = [0u8; 16];
                segment[..8].copy_from_slice(&sector.to_le_bytes());
                segment[8..12].copy_from_slice(&(count as u32).to_le_bytes());
                self.mem().write(data_gpa(slot), &segment).unwrap();
                readable.push((data_gpa(slot), 16));
            }
            _ => {}
        }
        writable.push((status_gpa(slot), 1));
        let head = if self.rng.below(4) == 0 {
            self.drv
                .add_indirect(0x4000 + 0x80 * slot as u64, &readable, &writable)
                .unwrap()
        } else {
            self.drv.add_chain(&readable, &writable).unwrap()
        };
        let request = Request {
            slot,
            len,
            expect,
            status,
            used,
        };
        assert!(self.in_flight.insert(head, request).is_none());
    }

    fn publish(&mut self) {
        if self.drv.publish().unwrap() {
            self.kick.signal().unwrap();
        }
    }

    /// Reap everything that is there and check it. Returns how many were reaped.
    fn reap(&mut self) -> usize {
        let mut n = 0;
        while let Some((head, used)) = self.drv.reap_used().unwrap() {
            let request = self.in_flight.remove(&head).expect("unknown head");
            let mut status = [0u8];
            self.mem()
                .read(status_gpa(request.slot), &mut status)
                .unwrap();
            assert_eq!(status[0], request.status, "status of head {head}");
            assert_eq!(used, request.used, "used len of head {head}");
            if let Expect::Read(expected) = &request.expect {
                let mut got = vec![0u8; request.len];
                self.mem().read(data_gpa(request.slot), &mut got).unwrap();
                assert!(&got == expected, "read returned stale or wrong data");
            }
            self.free_slots.push(request.slot);
            self.completed += 1;
            n += 1;
        }
        n
    }

    /// Wait (on the call eventfd only) until at least one completion was reaped.
    fn wait(&mut self) {
        loop {
            if self.reap() > 0 {
                return;
            }
            if self.drv.enable_call_notifications().unwrap() {
                continue;
            }
            if !self.call.wait(Some(PATIENCE)).unwrap() {
                let m = self.mem();
                let load = |gpa| {
                    m.load_u16(gpa, std::sync::atomic::Ordering::Acquire)
                        .unwrap()
                };
                panic!(
                    "completion lost: avail idx {} avail_event {} used idx {} used_event {} \
                     last used {} in flight {}",
                    load(0x2002),
                    load(0x3004 + 8 * 128),
                    load(0x3002),
                    load(0x2004 + 2 * 128),
                    self.drv.last_used(),
                    self.in_flight.len()
                );
            }
        }
    }
}

fn spawn(queue: SplitQueue, driver: &Driver, handler: Box<dyn ChainHandler>) -> QueueWorker {
    QueueWorker::spawn(
        "vvu-blk",
        queue,
        driver.kick.try_clone().unwrap(),
        Some(driver.call.try_clone().unwrap()),
        handler,
        WorkerOptions {
            batch_size: 8,
            ..WorkerOptions::default()
        },
    )
    .unwrap()
}

fn random_workload(event_idx: bool, seed: u64) {
    let (drv_mem, dev_mem) = guest_memory();
    let image = File::from(create_memfd("worker-blk-image", CAPACITY * 512).unwrap());
    let handler =
        BlkHandler::new(image.try_clone().unwrap(), CAPACITY, BlkOptions::default()).unwrap();
    let blk_stats = handler.stats_handle();
    let mut queue = SplitQueue::new(config(event_idx)).unwrap();
    queue.attach(dev_mem).unwrap();
    let mut driver = Driver {
        drv: SplitQueueDriver::new(drv_mem, config(event_idx)).unwrap(),
        kick: EventFd::new().unwrap(),
        call: EventFd::new().unwrap(),
        rng: XorShift(seed),
        shadow: vec![0; (CAPACITY * 512) as usize],
        in_flight: HashMap::new(),
        free_slots: (0..SLOTS).collect(),
        completed: 0,
    };
    let mut worker = spawn(queue, &driver, Box::new(handler));
    let total = 3000u64;
    let mut submitted = 0u64;
    let mut restarts = 0;
    let mut base = 0u16;
    while submitted < total || !driver.in_flight.is_empty() {
        // Submit a random burst while slots are free.
        let burst = 1 + driver.rng.below(6);
        for _ in 0..burst {
            if driver.free_slots.is_empty() || submitted >= total {
                break;
            }
            driver.add_random();
            submitted += 1;
        }
        driver.publish();
        driver.wait();
        // Twice: stop with requests in flight and continue on a fresh queue object, as a
        // reconnecting back-end does (GET_VRING_BASE, then SET_VRING_BASE on the new queue).
        if restarts < 2 && driver.completed >= 1000 * (restarts + 1) {
            restarts += 1;
            if !driver.free_slots.is_empty() {
                driver.add_random();
                submitted += 1;
                driver.publish();
            }
            let StoppedQueue {
                queue,
                handler,
                fault,
                stats,
            } = worker.stop().unwrap();
            assert_eq!(fault, None);
            assert_eq!(queue.next_used(), queue.next_avail(), "popped = completed");
            assert_eq!(
                stats.chains,
                u64::from(queue.next_avail().wrapping_sub(base)),
                "every chain popped since the spawn was completed"
            );
            base = queue.next_avail();
            let mut fresh = SplitQueue::new(config(event_idx)).unwrap();
            fresh.attach(queue.memory().unwrap().clone()).unwrap();
            fresh.set_next_avail(base);
            drop(queue);
            worker = spawn(fresh, &driver, handler);
        }
    }
    assert_eq!(restarts, 2);
    assert_eq!(driver.completed, submitted);
    let stopped = worker.stop().unwrap();
    assert_eq!(stopped.fault, None);
    assert!(driver.in_flight.is_empty());
    let mut on_disk = vec![0u8; (CAPACITY * 512) as usize];
    image.read_exact_at(&mut on_disk, 0).unwrap();
    assert!(
        on_disk == driver.shadow,
        "image differs from the shadow copy"
    );
    let s = blk_stats.snapshot();
    assert_eq!(s.requests, submitted);
    assert_eq!(s.malformed, 0);
}

#[test]
fn random_blk_workload_without_event_idx() {
    random_workload(false, 0x1234_5678_9abc_def1);
}

#[test]
fn random_blk_workload_with_event_idx() {
    random_workload(true, 0x0fed_cba9_8765_4321);
}
