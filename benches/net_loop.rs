//! The virtio-net per-frame path of a loopback port, as `testpmd --forward-mode=io --tx-first`
//! drives it (`benches/net_testpmd.py`'s `loop` case) but with a Rust driver and no DPDK: frames
//! per second through vvu's TX worker, the in-process switch and the RX worker, and back.
//!
//! Run: `cargo bench -p vvu-core --bench net_loop`. Criterion's iteration is one burst of
//! [`BURST`] frames that makes a whole round trip, so `thrpt` is in frames/s. Groups:
//! `loop_64B` and `loop_1500B` (frame length without the 12-byte virtio-net header); functions
//! `poll` (both queues in the process's busy-polling [`vvu_core::worker::PollGroup`], as
//! `vvu serve net --loopback --poll-us 50`) and `event` (no busy polling: the pair's own group
//! thread sleeps on its eventfds whenever it runs dry, as `vvu serve net --loopback`).
//!
//! # Setup
//!
//! One memfd (16 MiB) mapped twice: the driver's view and the device's. A 256-entry transmit
//! and receive ring (split, EVENT_IDX and INDIRECT_DESC negotiated, as testpmd's
//! `net_virtio_user` does not use EVENT_IDX: off here), VERSION_1 features (12-byte header, no
//! MRG_RXBUF, no offloads). The driver posts 256 receive buffers of 2048 bytes once and re-posts
//! each one as soon as it reaped it; [`BURST`] transmit buffers hold header and frame in one
//! descriptor each and are written once (testpmd's `io` mode does not rewrite them either).
//!
//! # One iteration
//!
//! The driver (the bench thread) adds the burst's [`BURST`] transmit chains and publishes them
//! (kicking only if the device asks: a polling device does not), then reaps the receive ring
//! until all [`BURST`] frames came back, re-posting each buffer (one publish, and a kick only
//! if asked, per reaped group), and reaps the transmit completions.
//!
//! - `poll` and `event`: the device's workers and the driver run on different threads, as the
//!   front-end and back-end processes do (the workers are spawned from a thread pinned to CPU 0,
//!   the driver then moves to CPU 1, when two CPUs are usable). Wall time per round trip: what
//!   testpmd sees, and as noisy as the machine is busy.
//! - `inline`: both queues are stepped on the bench thread ([`InlineWorker`]: the TX batch, then
//!   the RX step), and the time reported is the thread's **CPU time in those two steps only**
//!   (`CLOCK_THREAD_CPUTIME_ID` read around them, minus the median cost of two such reads): the
//!   device's own cost per frame, with no hand-off, no spinning and no driver work in it, and
//!   robust against a loaded machine (time preempted or stolen is not counted; wall time around
//!   the same steps varied 3× with the load). On a busy machine even this moves by ±10 %
//!   between runs (caches shared with other work): compare builds by instructions instead.
//!
//! # Instructions per frame
//!
//! With `NET_LOOP_BURSTS=N` the binary runs N inline bursts of `NET_LOOP_LEN`-byte frames
//! (default 64) and exits; under callgrind, counting only inside the two steps, the count is
//! exact and load-free (the first burst, which sets up, is in it: use N ≥ 1000):
//!
//!     NET_LOOP_BURSTS=1000 NET_LOOP_LEN=64 valgrind --tool=callgrind \
//!         --callgrind-out-file=/dev/null --toggle-collect='*InlineWorker*step*' \
//!         target/release/deps/net_loop-HASH
//!
//! `Collected` / (N × 32) is the instructions per frame. With `NET_LOOP_GEN=1` the port is a
//! frame generator ([`NetPort::generator`]) instead of a loopback: the TX handler takes the
//! fd-port path (header checked, frame discarded) and RX delivers generated frames.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use vvu_core::memory::{create_memfd, GuestMemory, MemoryRegion, RegionSpec};
use vvu_core::notify::EventFd;
use vvu_core::queue::{QueueConfig, SplitQueue, SplitQueueDriver};
use vvu_core::worker::net::offload::Offloads;
use vvu_core::worker::net::{NetFeatures, NetPort, DEFAULT_PORT_BUFFER};
use vvu_core::worker::{InlineWorker, QueueWorker, WorkerOptions};

const MEMORY: u64 = 16 << 20;
const Q: u16 = 256;
const RX_RINGS: (u64, u64, u64) = (0x1000, 0x3000, 0x4000);
const TX_RINGS: (u64, u64, u64) = (0x6000, 0x8000, 0x9000);
const TX_AREA: u64 = 0x10_0000;
const RX_AREA: u64 = 0x40_0000;
const SLOT: u64 = 0x800;
/// Frames per burst (testpmd's `--burst=32`).
const BURST: usize = 32;
const HDR: usize = 12;
const FEATURES: NetFeatures = NetFeatures {
    mrg_rxbuf: false,
    version_1: true,
    host: Offloads::NONE,
    guest: Offloads::NONE,
};

fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain old data; the calls only read/write the set we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn config((desc, avail, used): (u64, u64, u64)) -> QueueConfig {
    QueueConfig {
        size: Q,
        desc_table: desc,
        avail_ring: avail,
        used_ring: used,
        event_idx: false,
        indirect: true,
    }
}

/// CPU time of the calling thread (time it was preempted is not in it).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writes for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// What two back-to-back [`thread_cpu`] reads measure (a system call each): the median of many,
/// subtracted from every measured window.
fn clock_cost() -> Duration {
    let mut samples: Vec<Duration> = (0..10_000)
        .map(|_| {
            let t0 = thread_cpu();
            thread_cpu() - t0
        })
        .collect();
    samples.sort_unstable();
    samples[samples.len() / 2]
}

enum Device {
    Threads(Vec<QueueWorker>),
    Inline(Box<(InlineWorker, InlineWorker)>),
}

struct Rig {
    tx: SplitQueueDriver,
    rx: SplitQueueDriver,
    tx_kick: EventFd,
    rx_kick: EventFd,
    /// Receive head → buffer address.
    rx_buffers: Vec<u64>,
    frame_len: usize,
    device: Device,
    /// See [`clock_cost`] (inline only).
    clock_cost: Duration,
    _port: NetPort,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Poll,
    Event,
    Inline,
}

impl Rig {
    fn new(frame_len: usize, mode: Mode) -> Self {
        let fd = create_memfd("bench-net-loop", MEMORY).unwrap();
        let map = || {
            let spec = RegionSpec {
                guest_phys_addr: 0,
                size: MEMORY,
                userspace_addr: 0x7f00_0000_0000,
                mmap_offset: 0,
            };
            let region = Arc::new(MemoryRegion::map(fd.try_clone().unwrap(), spec).unwrap());
            GuestMemory::new(vec![region]).unwrap()
        };
        let (mem, dev_mem) = (map(), map());
        let port = if std::env::var("NET_LOOP_GEN").is_ok() {
            NetPort::generator(&[frame_len], [0xff; 6], [2, 0, 0, 0, 0, 1]).unwrap()
        } else {
            NetPort::loopback(DEFAULT_PORT_BUFFER).unwrap()
        };
        if mode == Mode::Poll {
            port.set_busy_poll(Some(Duration::from_micros(50)));
        }
        let tx = SplitQueueDriver::new(mem.clone(), config(TX_RINGS)).unwrap();
        let mut rx = SplitQueueDriver::new(mem.clone(), config(RX_RINGS)).unwrap();
        // The frames: a zeroed header, broadcast destination, a pattern.
        for i in 0..BURST as u64 {
            let mut packet = vec![0u8; HDR + frame_len];
            packet[HDR..HDR + 6].fill(0xff);
            packet[HDR + 6..HDR + 12].copy_from_slice(&[2, 0, 0, 0, 0, i as u8]);
            packet[HDR + 12..HDR + 14].copy_from_slice(&[0x88, 0xb5]);
            mem.write(TX_AREA + i * SLOT, &packet).unwrap();
        }
        let mut rx_buffers = vec![0; usize::from(Q)];
        for i in 0..u64::from(Q) {
            let gpa = RX_AREA + i * SLOT;
            let head = rx.add_chain(&[], &[(gpa, SLOT as u32)]).unwrap();
            rx_buffers[usize::from(head)] = gpa;
        }
        rx.publish().unwrap();
        let tx_kick = EventFd::new().unwrap();
        let rx_kick = EventFd::new().unwrap();
        let device_queue = |rings| {
            let mut queue = SplitQueue::new(config(rings)).unwrap();
            queue.attach(dev_mem.clone()).unwrap();
            queue
        };
        let device = if mode == Mode::Inline {
            Device::Inline(Box::new((
                InlineWorker::new(
                    device_queue(TX_RINGS),
                    tx_kick.try_clone().unwrap(),
                    Box::new(port.tx_handler(FEATURES)),
                )
                .unwrap(),
                InlineWorker::new(
                    device_queue(RX_RINGS),
                    rx_kick.try_clone().unwrap(),
                    Box::new(port.rx_handler(FEATURES)),
                )
                .unwrap(),
            )))
        } else {
            let multi = cpus() >= 2;
            if multi {
                pin(0);
            }
            let workers = vec![
                QueueWorker::spawn(
                    "bench-net-rx",
                    device_queue(RX_RINGS),
                    rx_kick.try_clone().unwrap(),
                    None,
                    Box::new(port.rx_handler(FEATURES)),
                    WorkerOptions::default(),
                )
                .unwrap(),
                QueueWorker::spawn(
                    "bench-net-tx",
                    device_queue(TX_RINGS),
                    tx_kick.try_clone().unwrap(),
                    None,
                    Box::new(port.tx_handler(FEATURES)),
                    WorkerOptions::default(),
                )
                .unwrap(),
            ];
            if multi {
                pin(1);
            }
            rx_kick.signal().unwrap();
            Device::Threads(workers)
        };
        Self {
            tx,
            rx,
            tx_kick,
            rx_kick,
            rx_buffers,
            frame_len,
            clock_cost: if mode == Mode::Inline {
                clock_cost()
            } else {
                Duration::ZERO
            },
            device,
            _port: port,
        }
    }

    /// One burst there and back; returns the device's CPU time for it (inline only, else 0).
    fn burst(&mut self) -> Duration {
        let len = (HDR + self.frame_len) as u32;
        for i in 0..BURST as u64 {
            self.tx
                .add_chain(&[(TX_AREA + i * SLOT, len)], &[])
                .unwrap();
        }
        if self.tx.publish().unwrap() {
            self.tx_kick.signal().unwrap();
        }
        let mut spent = Duration::ZERO;
        let mut got = 0;
        let mut spins = 0u32;
        let deadline = Instant::now() + Duration::from_secs(10);
        while got < BURST {
            if let Device::Inline(pair) = &mut self.device {
                let (tx, rx) = &mut **pair;
                let t0 = thread_cpu();
                black_box(tx.step().unwrap());
                black_box(rx.step().unwrap());
                spent += (thread_cpu() - t0).saturating_sub(self.clock_cost);
            }
            let mut reaped = 0;
            while let Some((head, used)) = self.rx.reap_used().unwrap() {
                black_box(used);
                let gpa = self.rx_buffers[usize::from(head)];
                let again = self.rx.add_chain(&[], &[(gpa, SLOT as u32)]).unwrap();
                self.rx_buffers[usize::from(again)] = gpa;
                reaped += 1;
            }
            if reaped == 0 {
                // A clock read costs more than a look at the ring: only now and then.
                spins = spins.wrapping_add(1);
                assert!(
                    spins % 4096 != 0 || Instant::now() < deadline,
                    "frames did not come back"
                );
                std::hint::spin_loop();
                continue;
            }
            got += reaped;
            if self.rx.publish().unwrap() {
                self.rx_kick.signal().unwrap();
            }
        }
        while self.tx.in_flight() > 0 {
            // Published before the frames reached the receive ring.
            self.tx.reap_used().unwrap();
        }
        spent
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Device::Threads(workers) = &mut self.device {
            for worker in workers.drain(..) {
                let stopped = worker.stop().unwrap();
                assert_eq!(stopped.fault, None);
            }
        }
    }
}

fn net_loop(c: &mut Criterion) {
    for frame_len in [64usize, 1500] {
        let mut group = c.benchmark_group(format!("loop_{frame_len}B"));
        group.throughput(Throughput::Elements(BURST as u64));
        group.measurement_time(Duration::from_secs(4));
        let mut rig = Rig::new(frame_len, Mode::Inline);
        group.bench_function(BenchmarkId::from_parameter("inline"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| rig.burst()).sum())
        });
        drop(rig);
        for (name, mode) in [("poll", Mode::Poll), ("event", Mode::Event)] {
            let mut rig = Rig::new(frame_len, mode);
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| rig.burst())
            });
        }
        group.finish();
    }
}

criterion_group!(benches, net_loop);

/// With `NET_LOOP_BURSTS=N`: no criterion, just N inline bursts of `NET_LOOP_LEN`-byte frames
/// (default 64), for an instruction count under callgrind (module docs, "Instructions per
/// frame").
fn main() {
    if let Some(bursts) = std::env::var("NET_LOOP_BURSTS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        let frame_len = std::env::var("NET_LOOP_LEN")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(64);
        let mut rig = Rig::new(frame_len, Mode::Inline);
        for _ in 0..bursts {
            rig.burst();
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
