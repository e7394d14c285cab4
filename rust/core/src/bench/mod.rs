//! The native half of `vvu bench blk`: a virtio-blk load generator on the driver side of
//! vhost-user rings, like fio for a socket.
//!
//! The Python front-end does the vhost-user handshake and lays out the rings; each ring is then
//! handed over here with its kick and call eventfds, and one thread per queue keeps `iodepth`
//! requests in flight without the GIL: requests complete in any order, each one's latency goes
//! into a [`Histogram`], its status byte is checked, and with `verify` every block written
//! carries [`pattern`]s that reads check. A back-end that dies (its socket hangs up) or stops
//! answering (no completion for `timeout`) fails the requests in flight and ends the run with a
//! fault instead of a hang.

pub mod histogram;
pub mod pattern;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub use histogram::Histogram;
pub use pattern::Found;

use crate::error::QueueError;
use crate::memory::GuestMemory;
use crate::notify::EventFd;
use crate::queue::{PackedQueueDriver, SplitQueueDriver};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const S_OK: u8 = 0;
const SECTOR: u64 = 512;
/// How long a wait for a completion sleeps before looking at the clock and the stop flag.
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// Mismatches reported in detail (all are counted).
const MAX_MISMATCHES: usize = 16;

/// What the driver side of a ring must do for the load generator; both ring layouts do it.
pub trait DriverRing: Send {
    fn add_chain(
        &mut self,
        readable: &[(u64, u32)],
        writable: &[(u64, u32)],
    ) -> Result<u16, QueueError>;
    fn publish(&mut self) -> Result<bool, QueueError>;
    fn reap_used(&mut self) -> Result<Option<(u16, u32)>, QueueError>;
    fn enable_call_notifications(&mut self) -> Result<bool, QueueError>;
    fn disable_call_notifications(&mut self) -> Result<(), QueueError>;
    fn memory(&self) -> &GuestMemory;
}

macro_rules! driver_ring {
    ($ty:ty) => {
        impl DriverRing for $ty {
            fn add_chain(
                &mut self,
                readable: &[(u64, u32)],
                writable: &[(u64, u32)],
            ) -> Result<u16, QueueError> {
                <$ty>::add_chain(self, readable, writable)
            }
            fn publish(&mut self) -> Result<bool, QueueError> {
                <$ty>::publish(self)
            }
            fn reap_used(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
                <$ty>::reap_used(self)
            }
            fn enable_call_notifications(&mut self) -> Result<bool, QueueError> {
                <$ty>::enable_call_notifications(self)
            }
            fn disable_call_notifications(&mut self) -> Result<(), QueueError> {
                <$ty>::disable_call_notifications(self)
            }
            fn memory(&self) -> &GuestMemory {
                <$ty>::memory(self)
            }
        }
    };
}

driver_ring!(SplitQueueDriver);
driver_ring!(PackedQueueDriver);

/// fio's `--rw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Read,
    Write,
    RandRead,
    RandWrite,
    RandRw,
}

impl Pattern {
    pub const NAMES: [&'static str; 5] = ["read", "write", "randread", "randwrite", "randrw"];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "read" => Self::Read,
            "write" => Self::Write,
            "randread" => Self::RandRead,
            "randwrite" => Self::RandWrite,
            "randrw" => Self::RandRw,
            _ => return None,
        })
    }

    fn random(self) -> bool {
        matches!(self, Self::RandRead | Self::RandWrite | Self::RandRw)
    }

    /// Reads only: `verify` writes the region first so that there is something to check.
    fn read_only(self) -> bool {
        matches!(self, Self::Read | Self::RandRead)
    }
}

/// The workload, the same for every queue.
#[derive(Debug, Clone)]
pub struct Load {
    pub pattern: Pattern,
    /// Bytes per request: a multiple of 512.
    pub block_size: u32,
    /// Requests in flight per queue.
    pub iodepth: u16,
    pub runtime: Duration,
    /// Percentage of reads in `randrw`.
    pub rwmix_read: u8,
    pub verify: bool,
    pub seed: u64,
    /// A request in flight with no completion at all for this long fails the run.
    pub timeout: Duration,
}

/// One ring handed over by the front-end, and where its requests live.
pub struct QueueSetup {
    pub ring: Box<dyn DriverRing>,
    pub kick: EventFd,
    pub call: EventFd,
    /// Guest addresses of `iodepth` request headers (16 bytes each), status bytes (1 each) and
    /// data buffers (`block_size` each).
    pub headers: u64,
    pub statuses: u64,
    pub data: u64,
    /// This queue's part of the disk, in sectors (queues never share blocks).
    pub first_sector: u64,
    pub sectors: u64,
}

/// Completed requests of one direction.
#[derive(Debug, Clone, Default)]
pub struct DirStats {
    pub ios: u64,
    pub bytes: u64,
    /// Requests the device completed with a status other than OK, or that never completed
    /// because the run failed.
    pub errors: u64,
    pub latency: Histogram,
}

impl DirStats {
    fn merge(&mut self, other: &DirStats) {
        self.ios += other.ios;
        self.bytes += other.bytes;
        self.errors += other.errors;
        self.latency.merge(&other.latency);
    }
}

/// A block that failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub sector: u64,
    pub expected_generation: u64,
    pub found: Found,
}

/// The outcome of a run, all queues together.
#[derive(Debug, Default)]
pub struct Report {
    pub read: DirStats,
    pub write: DirStats,
    /// Wall time of the timed phase (the slowest queue's, from start to its last completion).
    pub elapsed: Duration,
    /// Reads whose data matched what was written (timed phase and final read-back).
    pub verified: u64,
    pub verify_errors: u64,
    pub mismatches: Vec<Mismatch>,
    /// Writes of the untimed fill before a verified read workload.
    pub prefill_ios: u64,
    /// Why queues stopped early (back-end gone, stuck, broken ring), one entry per queue.
    pub faults: Vec<String>,
    /// Stopped by [`Bench::stop`] before the runtime was over.
    pub interrupted: bool,
}

struct Shared {
    stop: AtomicBool,
    interrupted: AtomicBool,
}

/// A running benchmark: one thread per queue.
pub struct Bench {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<QueueReport>>,
    done: mpsc::Receiver<()>,
    finished: usize,
}

impl Bench {
    /// Start one thread per queue. `backend` is the vhost-user socket: when the back-end hangs
    /// up, the requests in flight fail and the run ends.
    pub fn start(
        queues: Vec<QueueSetup>,
        load: Load,
        backend: Option<OwnedFd>,
    ) -> Result<Self, QueueError> {
        validate(&queues, &load)?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            interrupted: AtomicBool::new(false),
        });
        let backend = backend.map(Arc::new);
        let barrier = Arc::new(Barrier::new(queues.len()));
        let run_id = pattern::splitmix64(&mut (load.seed ^ 0x5EED));
        let (tx, done) = mpsc::channel();
        let mut threads = Vec::new();
        for (index, setup) in queues.into_iter().enumerate() {
            let worker = Worker::new(setup, &load, index, run_id);
            let (mine, backend, barrier, tx) =
                (shared.clone(), backend.clone(), barrier.clone(), tx.clone());
            let spawned = thread::Builder::new()
                .name(format!("vvu-bench-q{index}"))
                .spawn(move || {
                    let fd = backend.as_ref().map_or(-1, |fd| fd.as_raw_fd());
                    let report = worker.run(&mine, &barrier, fd);
                    let _ = tx.send(());
                    report
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(err) => {
                    // The threads already started wait at the barrier for this one: they cannot
                    // be released, so this is fatal for the process (it only happens when the
                    // system is out of threads).
                    shared.stop.store(true, Ordering::SeqCst);
                    return Err(QueueError::InvalidConfig(format!(
                        "cannot start a thread: {err}"
                    )));
                }
            }
        }
        Ok(Self {
            shared,
            threads,
            done,
            finished: 0,
        })
    }

    /// Stop early (Ctrl-C): no new requests, the ones in flight complete, no read-back.
    pub fn stop(&self) {
        self.shared.interrupted.store(true, Ordering::SeqCst);
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    /// Wait up to `timeout` for every queue to finish; true when they all have.
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.finished < self.threads.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done.recv_timeout(left) {
                Ok(()) => self.finished += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        true
    }

    /// Join every queue's thread and merge their results.
    pub fn finish(self) -> Report {
        let mut report = Report {
            interrupted: self.shared.interrupted.load(Ordering::SeqCst),
            ..Report::default()
        };
        for (index, handle) in self.threads.into_iter().enumerate() {
            match handle.join() {
                Ok(q) => {
                    report.read.merge(&q.read);
                    report.write.merge(&q.write);
                    report.elapsed = report.elapsed.max(q.elapsed);
                    report.verified += q.verified;
                    report.verify_errors += q.verify_errors;
                    report.prefill_ios += q.prefill_ios;
                    let room = MAX_MISMATCHES.saturating_sub(report.mismatches.len());
                    report
                        .mismatches
                        .extend(q.mismatches.into_iter().take(room));
                    if let Some(fault) = q.fault {
                        report.faults.push(format!("queue {index}: {fault}"));
                    }
                }
                Err(_) => report
                    .faults
                    .push(format!("queue {index}: the thread panicked")),
            }
        }
        report
    }
}

fn validate(queues: &[QueueSetup], load: &Load) -> Result<(), QueueError> {
    let bad = |what: String| Err(QueueError::InvalidConfig(what));
    if queues.is_empty() {
        return bad("no queues".into());
    }
    if load.block_size == 0 || u64::from(load.block_size) % SECTOR != 0 {
        return bad(format!(
            "block size {} is not a multiple of 512",
            load.block_size
        ));
    }
    if load.iodepth == 0 {
        return bad("iodepth must be at least 1".into());
    }
    if load.rwmix_read > 100 {
        return bad(format!("rwmix_read {} is over 100", load.rwmix_read));
    }
    let spb = u64::from(load.block_size) / SECTOR;
    for (index, q) in queues.iter().enumerate() {
        if q.sectors < spb {
            return bad(format!(
                "queue {index} has {} sectors, less than one {}-byte block",
                q.sectors, load.block_size
            ));
        }
        let memory = q.ring.memory();
        let depth = u64::from(load.iodepth);
        for (gpa, len, what) in [
            (q.headers, 16 * depth, "headers"),
            (q.statuses, depth, "status bytes"),
            (q.data, u64::from(load.block_size) * depth, "data buffers"),
        ] {
            memory
                .slice_exact(gpa, len)
                .map_err(|err| QueueError::InvalidConfig(format!("queue {index} {what}: {err}")))?;
        }
    }
    Ok(())
}

#[derive(Default)]
struct QueueReport {
    read: DirStats,
    write: DirStats,
    elapsed: Duration,
    verified: u64,
    verify_errors: u64,
    mismatches: Vec<Mismatch>,
    prefill_ios: u64,
    fault: Option<String>,
}

#[derive(Clone, Copy)]
struct Slot {
    start: Instant,
    block: u64,
    write: bool,
    generation: u64,
    busy: bool,
}

enum Phase {
    /// Sequential writes of every block (before a verified read workload).
    Prefill { next: u64 },
    /// The timed workload.
    Main,
    /// Read back every block written, sequentially.
    Check { next: u64 },
}

enum Next {
    Op {
        block: u64,
        write: bool,
    },
    /// Nothing can be submitted until something completes (the block is busy).
    Later,
    Done,
}

struct Worker {
    q: QueueSetup,
    memory: GuestMemory,
    load: Load,
    run_id: u64,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Head (or buffer id) -> slot.
    head_slot: Vec<u16>,
    in_flight: usize,
    rng: u64,
    blocks: u64,
    sectors_per_block: u64,
    seq_next: u64,
    next_generation: u64,
    /// With verify: the generation each block holds (0: unknown), and blocks in flight.
    expected: Vec<u64>,
    busy: Vec<bool>,
    buf: Vec<u8>,
    scratch: [u8; pattern::SECTOR],
    report: QueueReport,
}

/// Where a stopped loop stands.
enum Stop {
    /// Everything submitted completed.
    Drained,
    Fault(String),
}

impl Worker {
    fn new(q: QueueSetup, load: &Load, index: usize, run_id: u64) -> Self {
        let memory = q.ring.memory().clone();
        let sectors_per_block = u64::from(load.block_size) / SECTOR;
        let blocks = q.sectors / sectors_per_block;
        let depth = usize::from(load.iodepth);
        let now = Instant::now();
        let tracked = if load.verify { blocks as usize } else { 0 };
        let mut rng = load.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut buf = vec![0u8; load.block_size as usize];
        // Writes without verify carry this fixed noise (set once per buffer).
        for word in buf.chunks_exact_mut(8) {
            word.copy_from_slice(&pattern::splitmix64(&mut rng).to_le_bytes());
        }
        let worker = Self {
            memory,
            load: load.clone(),
            run_id,
            slots: vec![
                Slot {
                    start: now,
                    block: 0,
                    write: false,
                    generation: 0,
                    busy: false,
                };
                depth
            ],
            free: (0..load.iodepth).rev().collect(),
            head_slot: vec![0; usize::from(u16::MAX) + 1],
            in_flight: 0,
            rng,
            blocks,
            sectors_per_block,
            seq_next: 0,
            next_generation: 1,
            expected: vec![0; tracked],
            busy: vec![false; tracked],
            buf,
            scratch: [0; pattern::SECTOR],
            report: QueueReport::default(),
            q,
        };
        if !load.verify {
            for slot in 0..depth {
                let gpa = worker.data_gpa(slot);
                // Checked by `validate`; a failure leaves zeros, which is as good.
                let _ = worker.memory.write(gpa, &worker.buf);
            }
        }
        worker
    }

    fn data_gpa(&self, slot: usize) -> u64 {
        self.q.data + slot as u64 * u64::from(self.load.block_size)
    }

    fn run(mut self, shared: &Shared, barrier: &Barrier, backend: i32) -> QueueReport {
        let mut stats = (DirStats::default(), DirStats::default());
        let mut fault = None;
        if self.load.verify && self.load.pattern.read_only() {
            let mut fill = (DirStats::default(), DirStats::default());
            if let Stop::Fault(f) = self.drive(
                &mut Phase::Prefill { next: 0 },
                &mut fill,
                None,
                shared,
                backend,
            ) {
                fault = Some(format!("while writing the blocks to verify: {f}"));
            }
            self.report.prefill_ios = fill.1.ios;
        }
        barrier.wait();
        let start = Instant::now();
        if fault.is_none() {
            let deadline = start + self.load.runtime;
            if let Stop::Fault(f) = self.drive(
                &mut Phase::Main,
                &mut stats,
                Some(deadline),
                shared,
                backend,
            ) {
                fault = Some(f);
            }
        }
        self.report.elapsed = start.elapsed();
        if fault.is_none() && self.load.verify && !shared.stop.load(Ordering::SeqCst) {
            let mut check = (DirStats::default(), DirStats::default());
            if let Stop::Fault(f) = self.drive(
                &mut Phase::Check { next: 0 },
                &mut check,
                None,
                shared,
                backend,
            ) {
                fault = Some(format!("while reading back: {f}"));
            }
            stats.0.errors += check.0.errors;
        }
        if fault.is_some() {
            // The others stop too: the run has failed.
            shared.stop.store(true, Ordering::SeqCst);
        }
        self.report.read = stats.0;
        self.report.write = stats.1;
        self.report.fault = fault;
        self.report
    }

    fn random_block(&mut self) -> u64 {
        pattern::splitmix64(&mut self.rng) % self.blocks
    }

    fn next_op(&mut self, phase: &mut Phase) -> Next {
        let verify = self.load.verify;
        match phase {
            Phase::Prefill { next } => {
                if *next >= self.blocks {
                    return Next::Done;
                }
                if self.busy[*next as usize] {
                    return Next::Later;
                }
                *next += 1;
                Next::Op {
                    block: *next - 1,
                    write: true,
                }
            }
            Phase::Check { next } => {
                while *next < self.blocks && self.expected[*next as usize] == 0 {
                    *next += 1;
                }
                if *next >= self.blocks {
                    return Next::Done;
                }
                *next += 1;
                Next::Op {
                    block: *next - 1,
                    write: false,
                }
            }
            Phase::Main => {
                let pattern = self.load.pattern;
                let write = match pattern {
                    Pattern::Read | Pattern::RandRead => false,
                    Pattern::Write | Pattern::RandWrite => true,
                    Pattern::RandRw => {
                        pattern::splitmix64(&mut self.rng) % 100 >= u64::from(self.load.rwmix_read)
                    }
                };
                // With verify, two requests never touch one block at once: their order
                // would be the device's choice.
                for _ in 0..16 {
                    let block = if pattern.random() {
                        self.random_block()
                    } else {
                        let block = self.seq_next;
                        self.seq_next = (self.seq_next + 1) % self.blocks;
                        block
                    };
                    if !verify || !self.busy[block as usize] {
                        return Next::Op { block, write };
                    }
                }
                Next::Later
            }
        }
    }

    fn submit(&mut self, block: u64, write: bool) -> Result<(), QueueError> {
        let Some(slot) = self.free.pop() else {
            return Err(QueueError::Full);
        };
        let index = usize::from(slot);
        let sector = self.q.first_sector + block * self.sectors_per_block;
        let bs = self.load.block_size;
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&(if write { T_OUT } else { T_IN }).to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let (hdr, status, data) = (
            self.q.headers + 16 * u64::from(slot),
            self.q.statuses + u64::from(slot),
            self.data_gpa(index),
        );
        let mut generation = 0;
        let result = (|| {
            self.memory.write(hdr, &header)?;
            self.memory.write(status, &[0xff])?;
            if write && self.load.verify {
                generation = self.next_generation;
                self.next_generation += 1;
                pattern::fill(&mut self.buf, sector, generation, self.run_id);
                self.memory.write(data, &self.buf)?;
            }
            Ok::<_, QueueError>(())
        })();
        if let Err(err) = result {
            self.free.push(slot);
            return Err(err);
        }
        let head = if write {
            self.q
                .ring
                .add_chain(&[(hdr, 16), (data, bs)], &[(status, 1)])
        } else {
            self.q
                .ring
                .add_chain(&[(hdr, 16)], &[(data, bs), (status, 1)])
        };
        let head = match head {
            Ok(head) => head,
            Err(err) => {
                self.free.push(slot);
                return Err(err);
            }
        };
        self.head_slot[usize::from(head)] = slot;
        self.slots[index] = Slot {
            start: Instant::now(),
            block,
            write,
            generation,
            busy: true,
        };
        if self.load.verify {
            self.busy[block as usize] = true;
        }
        self.in_flight += 1;
        Ok(())
    }

    fn complete(&mut self, head: u16, stats: &mut (DirStats, DirStats)) {
        let now = Instant::now();
        let index = usize::from(self.head_slot[usize::from(head)]);
        let Some(slot) = self.slots.get(index).copied().filter(|s| s.busy) else {
            return; // the driver only hands back heads in flight: cannot happen
        };
        self.slots[index].busy = false;
        let mut status = [0xffu8];
        let _ = self
            .memory
            .read(self.q.statuses + index as u64, &mut status);
        let dir = if slot.write {
            &mut stats.1
        } else {
            &mut stats.0
        };
        let block = slot.block as usize;
        if status[0] != S_OK {
            dir.errors += 1;
            if self.load.verify && slot.write {
                self.expected[block] = 0; // what is there now is anybody's guess
            }
        } else {
            dir.ios += 1;
            dir.bytes += u64::from(self.load.block_size);
            dir.latency
                .record(u64::try_from((now - slot.start).as_nanos()).unwrap_or(u64::MAX));
            if self.load.verify {
                if slot.write {
                    self.expected[block] = slot.generation;
                } else if self.expected[block] != 0 {
                    self.verify(index, slot.block);
                }
            }
        }
        if self.load.verify {
            self.busy[block] = false;
        }
        self.free.push(index as u16);
        self.in_flight -= 1;
    }

    fn verify(&mut self, slot: usize, block: u64) {
        let sector = self.q.first_sector + block * self.sectors_per_block;
        let expected = self.expected[block as usize];
        let gpa = self.data_gpa(slot);
        if self.memory.read(gpa, &mut self.buf).is_err() {
            self.report.verify_errors += 1;
            return;
        }
        match pattern::check(&self.buf, sector, expected, self.run_id, &mut self.scratch) {
            Ok(()) => self.report.verified += 1,
            Err((sector, found)) => {
                self.report.verify_errors += 1;
                if self.report.mismatches.len() < MAX_MISMATCHES {
                    self.report.mismatches.push(Mismatch {
                        sector,
                        expected_generation: expected,
                        found,
                    });
                }
            }
        }
    }

    /// Count every request still in flight as failed (the run ends without them).
    fn fail_in_flight(&mut self, stats: &mut (DirStats, DirStats)) {
        for slot in self.slots.iter_mut().filter(|s| s.busy) {
            slot.busy = false;
            if slot.write {
                stats.1.errors += 1;
            } else {
                stats.0.errors += 1;
            }
        }
        self.in_flight = 0;
    }

    /// Keep `iodepth` requests of `phase` in flight until it is done, the deadline passes or the
    /// run is stopped, then wait for the ones in flight.
    fn drive(
        &mut self,
        phase: &mut Phase,
        stats: &mut (DirStats, DirStats),
        deadline: Option<Instant>,
        shared: &Shared,
        backend: i32,
    ) -> Stop {
        match self.drive_inner(phase, stats, deadline, shared, backend) {
            Ok(()) => Stop::Drained,
            Err(fault) => {
                self.fail_in_flight(stats);
                Stop::Fault(fault)
            }
        }
    }

    fn drive_inner(
        &mut self,
        phase: &mut Phase,
        stats: &mut (DirStats, DirStats),
        deadline: Option<Instant>,
        shared: &Shared,
        backend: i32,
    ) -> Result<(), String> {
        let ring_err = |err: QueueError| format!("ring: {err}");
        let mut stopping = false;
        let mut last_progress = Instant::now();
        loop {
            if !stopping
                && (shared.stop.load(Ordering::Relaxed)
                    || deadline.is_some_and(|d| Instant::now() >= d))
            {
                stopping = true;
            }
            if !stopping {
                let mut added = 0;
                while !self.free.is_empty() {
                    match self.next_op(phase) {
                        Next::Op { block, write } => {
                            self.submit(block, write).map_err(ring_err)?;
                            added += 1;
                        }
                        Next::Later => break,
                        Next::Done => {
                            stopping = true;
                            break;
                        }
                    }
                }
                if added > 0 && self.q.ring.publish().map_err(ring_err)? {
                    self.q.kick.signal().map_err(|err| format!("kick: {err}"))?;
                }
            }
            if self.in_flight == 0 {
                if stopping {
                    return Ok(());
                }
                continue; // nothing was submittable and nothing is in flight: try again
            }
            self.q.ring.disable_call_notifications().map_err(ring_err)?;
            let mut reaped = 0;
            while let Some((head, _len)) = self.q.ring.reap_used().map_err(ring_err)? {
                self.complete(head, stats);
                reaped += 1;
            }
            if reaped > 0 {
                last_progress = Instant::now();
                continue;
            }
            if self.q.ring.enable_call_notifications().map_err(ring_err)? {
                continue;
            }
            let mut slice = WAIT_SLICE;
            if let (false, Some(d)) = (stopping, deadline) {
                slice = slice.min(d.saturating_duration_since(Instant::now()));
            }
            match wait(&self.q.call, backend, slice) {
                Ok(Woken::Hangup) => {
                    return Err(format!(
                        "the back-end closed the connection ({} requests in flight)",
                        self.in_flight
                    ))
                }
                Ok(_) => {}
                Err(err) => return Err(format!("waiting for a call: {err}")),
            }
            let quiet = last_progress.elapsed();
            if quiet >= self.load.timeout {
                return Err(format!(
                    "no completion for {:.1} s ({} requests in flight)",
                    quiet.as_secs_f64(),
                    self.in_flight
                ));
            }
        }
    }
}

enum Woken {
    Call,
    Hangup,
    Timeout,
}

/// Wait for the call eventfd (consumed) or a hang-up of the back-end's socket `backend` (-1:
/// none), at most `timeout`.
fn wait(call: &EventFd, backend: i32, timeout: Duration) -> io::Result<Woken> {
    let mut fds = [
        libc::pollfd {
            fd: call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: backend,
            events: libc::POLLRDHUP,
            revents: 0,
        },
    ];
    let nfds = if backend >= 0 { 2 } else { 1 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a live array of `nfds` (≤ 2) pollfd entries; poll writes only `revents`.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), nfds, ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(Woken::Timeout)
        } else {
            Err(err)
        };
    }
    if nfds == 2 && fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
        return Ok(Woken::Hangup);
    }
    if fds[0].revents & libc::POLLIN != 0 {
        call.consume()?;
        return Ok(Woken::Call);
    }
    Ok(Woken::Timeout)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::queue::test_util::shared_memory;
    use crate::queue::{ChainBatch, QueueConfig, SplitQueue};

    const RING: QueueConfig = QueueConfig {
        size: 64,
        desc_table: 0x1000,
        avail_ring: 0x2000,
        used_ring: 0x3000,
        event_idx: false,
        indirect: false,
    };
    const DEPTH: u16 = 8;
    const BS: u32 = 4096;
    const DISK: usize = 256 << 10;

    /// How the fake device behaves.
    #[derive(Clone, Copy)]
    enum Device {
        /// Completes each batch in reverse order.
        Reversed,
        /// Pops requests and never completes them.
        Stuck,
    }

    /// A virtio-blk device over a 256 KiB disk in a thread; runs until `stop`.
    fn device(
        mem: GuestMemory,
        kick: EventFd,
        call: EventFd,
        stop: Arc<AtomicBool>,
        kind: Device,
    ) -> JoinHandle<()> {
        thread::spawn(move || {
            let mut queue = SplitQueue::new(RING).unwrap();
            queue.attach(mem.clone()).unwrap();
            let mut disk = vec![0u8; DISK];
            let mut batch = ChainBatch::new();
            while !stop.load(Ordering::SeqCst) {
                batch.clear();
                queue.pop_batch(&mut batch, 64).unwrap();
                if matches!(kind, Device::Stuck) || batch.iter().len() == 0 {
                    kick.wait(Some(Duration::from_millis(5))).unwrap();
                    continue;
                }
                let chains: Vec<_> = batch.iter().collect();
                for chain in chains.iter().rev() {
                    let (readable, writable) = (chain.readable(), chain.writable());
                    let mut header = [0u8; 16];
                    mem.read(readable[0].gpa, &mut header).unwrap();
                    let kind = u32::from_le_bytes(header[..4].try_into().unwrap());
                    let at = u64::from_le_bytes(header[8..].try_into().unwrap()) as usize * 512;
                    let status = writable[writable.len() - 1].gpa;
                    let written = if kind == T_OUT {
                        let data = &readable[1];
                        mem.read(data.gpa, &mut disk[at..at + data.len as usize])
                            .unwrap();
                        0
                    } else {
                        let data = &writable[0];
                        mem.write(data.gpa, &disk[at..at + data.len as usize])
                            .unwrap();
                        data.len
                    };
                    mem.write(status, &[S_OK]).unwrap();
                    queue.push_used(chain.head(), written + 1).unwrap();
                }
                if queue.publish_used().unwrap() {
                    call.signal().unwrap();
                }
            }
        })
    }

    fn load(pattern: Pattern, verify: bool, timeout: Duration) -> Load {
        Load {
            pattern,
            block_size: BS,
            iodepth: DEPTH,
            runtime: Duration::from_millis(300),
            rwmix_read: 50,
            verify,
            seed: 7,
            timeout,
        }
    }

    /// Run `load` against a fake device of `kind`; `hang_up` closes the back-end's end of the
    /// socket 100 ms in.
    fn run(load: Load, kind: Device, hang_up: bool) -> Report {
        let (driver_mem, device_mem) = shared_memory(&[(0, 0x20000)]);
        let ring = SplitQueueDriver::new(driver_mem, RING).unwrap();
        let (kick, call) = (EventFd::new().unwrap(), EventFd::new().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let dev = device(
            device_mem,
            kick.try_clone().unwrap(),
            call.try_clone().unwrap(),
            stop.clone(),
            kind,
        );
        let (ours, theirs) = UnixStream::pair().unwrap();
        let setup = QueueSetup {
            ring: Box::new(ring),
            kick,
            call,
            headers: 0x4000,
            statuses: 0x5000,
            data: 0x8000,
            first_sector: 0,
            sectors: (DISK / 512) as u64,
        };
        let mut bench = Bench::start(vec![setup], load, Some(OwnedFd::from(ours))).unwrap();
        if hang_up {
            assert!(!bench.wait_timeout(Duration::from_millis(100)));
            drop(theirs);
            assert!(
                bench.wait_timeout(Duration::from_secs(2)),
                "hang-up not seen"
            );
        } else {
            assert!(bench.wait_timeout(Duration::from_secs(10)));
            drop(theirs);
        }
        let report = bench.finish();
        stop.store(true, Ordering::SeqCst);
        dev.join().unwrap();
        report
    }

    #[test]
    fn out_of_order_completions_verified() {
        let report = run(
            load(Pattern::RandRw, true, Duration::from_secs(5)),
            Device::Reversed,
            false,
        );
        assert!(report.faults.is_empty(), "{:?}", report.faults);
        assert!(report.read.ios > 0 && report.write.ios > 0);
        assert_eq!(report.read.errors + report.write.errors, 0);
        assert_eq!(report.read.latency.count(), report.read.ios);
        assert_eq!(report.verify_errors, 0, "{:?}", report.mismatches);
        assert!(report.verified > 0);
        // A read-only pattern writes its range first, then checks every read.
        let report = run(
            load(Pattern::RandRead, true, Duration::from_secs(5)),
            Device::Reversed,
            false,
        );
        assert_eq!(report.prefill_ios, (DISK / BS as usize) as u64);
        assert_eq!(report.verified, report.read.ios + report.prefill_ios);
        assert_eq!(report.verify_errors, 0);
    }

    #[test]
    fn a_stuck_device_fails_the_run() {
        let start = Instant::now();
        let report = run(
            load(Pattern::RandRead, false, Duration::from_millis(200)),
            Device::Stuck,
            false,
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(report.faults.len(), 1);
        assert!(
            report.faults[0].contains("no completion"),
            "{:?}",
            report.faults
        );
        assert_eq!(report.read.errors, u64::from(DEPTH));
        assert_eq!(report.read.ios, 0);
    }

    #[test]
    fn a_hang_up_fails_the_run_at_once() {
        let report = run(
            load(Pattern::RandRead, false, Duration::from_secs(60)),
            Device::Stuck,
            true,
        );
        assert!(
            report.faults[0].contains("closed the connection"),
            "{:?}",
            report.faults
        );
        assert_eq!(report.read.errors, u64::from(DEPTH));
    }
}
