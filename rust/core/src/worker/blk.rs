//! The virtio-blk data path (virtio 1.2 §5.2.6) over a file or block device.
//!
//! [`BlkHandler`] is a [`ChainHandler`]: each chain is one request
//!
//! ```text
//! readable:  le32 type | le32 reserved | le64 sector | data (OUT, DISCARD, WRITE_ZEROES)
//! writable:  data (IN, GET_ID) | u8 status
//! ```
//!
//! The header may be split across segments; the status byte is the last byte of the last
//! writable segment. Reads and writes go straight between the file and guest memory with
//! `preadv`/`pwritev` on the chain's segments (no bounce buffer), at most [`IOV_MAX`] iovecs per
//! call, retried until complete.
//!
//! Nothing read from the guest is trusted: the header and discard segments are copied out once
//! and then validated, every access is checked against the capacity with overflow-checked
//! arithmetic, and a request that has no room for a status byte or a header is completed with a
//! used length of 0 (and counted as malformed) instead of breaking the queue.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::raw::c_int;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::aio::{Aio, AioMode, Op};
use super::{ChainHandler, Submitted};
use crate::memory::GuestMemory;
use crate::queue::{ChainView, Segment};

/// Bytes per virtio-blk sector (fixed by the spec, independent of `blk_size`).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the request header (`type`, `reserved`, `sector`).
pub const HEADER_SIZE: u32 = 16;
/// Length of the device ID string returned by GET_ID.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Bytes of one discard / write-zeroes segment.
pub const DWZ_SEGMENT_SIZE: u32 = 16;
/// Most discard / write-zeroes segments a handler accepts per request (the limit the options may
/// advertise; Linux itself never sends more than 256).
pub const MAX_DWZ_SEGMENTS: u32 = 4096;
/// Most iovecs one `preadv`/`pwritev` takes on Linux (`UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;
/// Default [`BlkOptions::queue_depth`].
pub const DEFAULT_QUEUE_DEPTH: usize = 128;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_GET_LIFETIME: u32 = 10;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const VIRTIO_BLK_T_SECURE_ERASE: u32 = 14;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// `flags` bit of a write-zeroes segment: the device may deallocate the range.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// How a [`BlkHandler`] behaves; the engine must advertise matching features and config space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkOptions {
    /// VIRTIO_BLK_F_RO: writes, discards and write-zeroes fail with IOERR and touch nothing.
    pub read_only: bool,
    /// The GET_ID string: NUL-padded ASCII, no terminator when all 20 bytes are used.
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
    /// `fdatasync` after every write, discard and write-zeroes before completing it. Needed when
    /// VIRTIO_BLK_F_FLUSH was offered but not negotiated (or `writeback` is 0).
    pub writethrough: bool,
    /// VIRTIO_BLK_F_DISCARD offered; otherwise DISCARD is UNSUPP.
    pub discard: bool,
    /// VIRTIO_BLK_F_WRITE_ZEROES offered; otherwise WRITE_ZEROES is UNSUPP.
    pub write_zeroes: bool,
    /// Config space `max_discard_sectors`: larger segments fail with IOERR.
    pub max_discard_sectors: u32,
    /// Config space `max_discard_seg` (1..=[`MAX_DWZ_SEGMENTS`]).
    pub max_discard_seg: u32,
    /// Config space `max_write_zeroes_sectors`.
    pub max_write_zeroes_sectors: u32,
    /// Config space `max_write_zeroes_seg` (1..=[`MAX_DWZ_SEGMENTS`]).
    pub max_write_zeroes_seg: u32,
    /// How reads, writes and flushes are done (`--aio`); see [`super::aio`].
    pub aio: AioMode,
    /// Most requests in flight per queue with an asynchronous engine (clamped to 1..=4096).
    pub queue_depth: usize,
    /// Time every request into [`BlkStats::latency_us`]: two clock reads per request (off by
    /// default; benches/RESULTS.md, "Daemon", has its cost).
    pub latency_histogram: bool,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            serial: [0; VIRTIO_BLK_ID_BYTES],
            writethrough: false,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: u32::MAX,
            max_discard_seg: 32,
            max_write_zeroes_sectors: u32::MAX,
            max_write_zeroes_seg: 32,
            aio: AioMode::Sync,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            latency_histogram: false,
        }
    }
}

impl BlkOptions {
    /// A GET_ID string from `id`: its first 20 bytes, NUL-padded.
    pub fn serial_from(id: &str) -> [u8; VIRTIO_BLK_ID_BYTES] {
        let mut out = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = id.len().min(VIRTIO_BLK_ID_BYTES);
        out[..n].copy_from_slice(&id.as_bytes()[..n]);
        out
    }
}

/// Counters of a [`BlkHandler`] (a snapshot, see [`BlkStatsHandle`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests completed, whatever their status.
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub get_ids: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    /// Bytes read from the file into guest memory (including zero fill past its end).
    pub bytes_read: u64,
    /// Bytes written from guest memory to the file.
    pub bytes_written: u64,
    /// Requests completed with VIRTIO_BLK_S_IOERR.
    pub io_errors: u64,
    /// Requests completed with VIRTIO_BLK_S_UNSUPP.
    pub unsupported: u64,
    /// Requests that could not be answered (no status byte or a short header): used len 0.
    pub malformed: u64,
    /// Direct-I/O requests whose guest buffers were not aligned: done through a bounce buffer.
    pub bounced: u64,
    /// Direct-I/O requests whose offset or length was not aligned: IOERR.
    pub unaligned: u64,
    /// Requests handed to the asynchronous engine.
    pub async_requests: u64,
    /// Requests parsed and not answered yet (on the worker thread or in the engine).
    pub in_flight: u64,
    /// Service time of completed requests: bucket `i` counts those that took less than
    /// `2^i` microseconds (the last one: everything slower), see [`LATENCY_BUCKETS`].
    pub latency_us: [u64; LATENCY_BUCKETS],
    /// Sum of the service times counted in `latency_us`, in nanoseconds.
    pub latency_ns_sum: u64,
}

/// Buckets of [`BlkStats::latency_us`]: below 1 µs, 2 µs, 4 µs, ... 2^22 µs (4.2 s), and above.
pub const LATENCY_BUCKETS: usize = 24;

#[derive(Debug, Default)]
struct BlkCounters {
    requests: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    get_ids: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    io_errors: AtomicU64,
    unsupported: AtomicU64,
    malformed: AtomicU64,
    bounced: AtomicU64,
    unaligned: AtomicU64,
    async_requests: AtomicU64,
    in_flight: AtomicU64,
    latency_us: [AtomicU64; LATENCY_BUCKETS],
    latency_ns_sum: AtomicU64,
}

/// The latency bucket of a request that took `nanos`: the bit length of its microseconds.
fn latency_bucket(nanos: u64) -> usize {
    let micros = nanos / 1000;
    ((u64::BITS - micros.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A handle to a [`BlkHandler`]'s counters that stays valid after the handler moved into a
/// worker thread.
#[derive(Debug, Clone)]
pub struct BlkStatsHandle(Arc<BlkCounters>);

impl BlkStatsHandle {
    pub fn snapshot(&self) -> BlkStats {
        let c = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlkStats {
            requests: get(&c.requests),
            reads: get(&c.reads),
            writes: get(&c.writes),
            flushes: get(&c.flushes),
            get_ids: get(&c.get_ids),
            discards: get(&c.discards),
            write_zeroes: get(&c.write_zeroes),
            bytes_read: get(&c.bytes_read),
            bytes_written: get(&c.bytes_written),
            io_errors: get(&c.io_errors),
            unsupported: get(&c.unsupported),
            malformed: get(&c.malformed),
            bounced: get(&c.bounced),
            unaligned: get(&c.unaligned),
            async_requests: get(&c.async_requests),
            in_flight: get(&c.in_flight),
            latency_us: std::array::from_fn(|i| get(&c.latency_us[i])),
            latency_ns_sum: get(&c.latency_ns_sum),
        }
    }
}

/// One read, write or flush: on the worker thread for one call, or in flight in the
/// asynchronous engine until reaped.
///
/// Holds host pointers into guest memory: for a synchronous request only during one
/// [`BlkHandler::handle`] call, for an asynchronous one until its completion was reaped (the
/// worker keeps the snapshot mapped until then; see the worker's "Asynchronous handlers"). Moving
/// it between threads while it holds stale pointers is harmless: they are never dereferenced
/// outside those windows.
struct Slot {
    head: u16,
    kind: SlotKind,
    direction: Direction,
    /// The status byte and the room for data before it (for the used len).
    status: *mut u8,
    data_room: u64,
    /// When the request was parsed (only with the latency histogram).
    started: Option<Instant>,
    offset: u64,
    len: u64,
    /// The guest's buffers.
    iovecs: Vec<libc::iovec>,
    /// Direct I/O on unaligned guest buffers goes through this instead.
    bounce: Option<Bounce>,
    bounce_iov: libc::iovec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    Rw,
    Flush,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            head: 0,
            kind: SlotKind::Rw,
            direction: Direction::Read,
            status: std::ptr::null_mut(),
            data_room: 0,
            started: None,
            offset: 0,
            len: 0,
            iovecs: Vec::new(),
            bounce: None,
            bounce_iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
        }
    }
}

// SAFETY: see the type docs; the pointers are plain data outside the windows they are used in.
unsafe impl Send for Slot {}
// SAFETY: the bounce buffer is owned memory, used by one thread at a time.
unsafe impl Send for Bounce {}

/// When an asynchronous engine does a read or write on the worker thread instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inline {
    /// Memory-backed files (tmpfs, memfd, hugetlbfs): there is no device to wait for, and shmem
    /// has no non-blocking reads (`RWF_NOWAIT`), so io_uring would hand every request to a
    /// kernel worker thread — twice the latency and CPU of doing it here.
    Always,
    /// Buffered I/O on other files: a read is tried with `RWF_NOWAIT` first (served from the
    /// page cache without sleeping) and goes to the engine only when it would block.
    TryNowait,
    /// Direct I/O (every request waits for the device), or `RWF_NOWAIT` turned out unsupported.
    Never,
}

/// The [`Inline`] policy for `file`.
fn inline_policy(file: &File, direct: bool) -> Inline {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `st`.
    let memory_backed = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } == 0
        && matches!(
            st.f_type as i64,
            TMPFS_MAGIC | RAMFS_MAGIC | HUGETLBFS_MAGIC
        );
    if memory_backed {
        Inline::Always
    } else if direct {
        Inline::Never
    } else {
        Inline::TryNowait
    }
}

/// Direct I/O alignment (bytes, powers of two).
#[derive(Debug, Clone, Copy)]
struct DioAlign {
    memory: u32,
    offset: u32,
}

/// One validated discard / write-zeroes range, in bytes.
#[derive(Debug, Clone, Copy)]
struct Range {
    offset: u64,
    len: u64,
    unmap: bool,
}

/// How the handler zeroes ranges; tests force the fallbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroMode {
    /// fallocate first, writing zeros when the file system cannot.
    Fallocate,
    /// Always write zeros (the last-resort path).
    #[cfg_attr(not(test), allow(dead_code))]
    WriteOnly,
}

/// Outcome of one request: the status byte and how many data bytes were written into the
/// writable part, from its start.
struct Done {
    status: u8,
    written: u64,
}

impl Done {
    fn status(status: u8) -> Self {
        Self { status, written: 0 }
    }
}

/// The virtio-blk device data path; see the module docs.
pub struct BlkHandler {
    file: File,
    capacity: u64,
    capacity_bytes: u64,
    options: BlkOptions,
    counters: Arc<BlkCounters>,
    /// The slot of a request done on the worker thread.
    sync_slot: Slot,
    ranges: Vec<Range>,
    is_block_device: bool,
    /// Set when the fd was opened with O_DIRECT.
    direct: Option<DioAlign>,
    /// The asynchronous engine (`None`: `--aio sync`).
    aio: Option<Aio>,
    /// In-flight slots of the engine (indexed by the engine tag), and the free ones.
    slots: Vec<Slot>,
    free: Vec<usize>,
    aio_done: Vec<(u64, i64)>,
    /// Which requests an asynchronous engine leaves to the worker thread.
    inline: Inline,
    /// Lazily allocated zeros for the write-zeros fallback.
    zeros: Option<Bounce>,
    zero_mode: ZeroMode,
}

impl std::fmt::Debug for BlkHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkHandler")
            .field("fd", &self.file.as_raw_fd())
            .field("capacity", &self.capacity)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Size of a file or block device in whole 512-byte sectors (via `lseek(SEEK_END)`, which works
/// for both; it moves the file offset, which the handler never uses).
pub fn capacity_of(file: &File) -> io::Result<u64> {
    // SAFETY: lseek on an open fd has no memory-safety preconditions.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64 / SECTOR_SIZE)
}

impl BlkHandler {
    /// A handler for `capacity` sectors of `file` (a regular file or a block device, opened
    /// read-write unless `options.read_only`). Fails with `InvalidInput` if the capacity in bytes
    /// does not fit in `off_t` or a segment limit is outside `1..=MAX_DWZ_SEGMENTS`.
    pub fn new(file: File, capacity: u64, options: BlkOptions) -> io::Result<Self> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        let capacity_bytes = capacity
            .checked_mul(SECTOR_SIZE)
            .filter(|&b| b <= i64::MAX as u64)
            .ok_or_else(|| invalid(format!("capacity of {capacity} sectors is too large")))?;
        for (name, value) in [
            ("max_discard_seg", options.max_discard_seg),
            ("max_write_zeroes_seg", options.max_write_zeroes_seg),
        ] {
            if !(1..=MAX_DWZ_SEGMENTS).contains(&value) {
                return Err(invalid(format!(
                    "{name} {value} is outside 1..={MAX_DWZ_SEGMENTS}"
                )));
            }
        }
        let geometry = probe(&file)?;
        let direct = geometry.direct.then(|| DioAlign {
            memory: geometry.dio_memory_align.max(1),
            offset: geometry.dio_offset_align.max(1),
        });
        let inline = inline_policy(&file, geometry.direct);
        // A memory-backed file never waits for a device: no engine at all, the worker thread
        // does every request (an idle engine would only cost its fds).
        let (aio, slots, free) = if inline == Inline::Always {
            (None, Vec::new(), Vec::new())
        } else {
            Self::engine(&options)?
        };
        Ok(Self {
            file,
            capacity,
            capacity_bytes,
            options,
            counters: Arc::default(),
            sync_slot: Slot::default(),
            ranges: Vec::new(),
            is_block_device: geometry.block_device,
            direct,
            aio,
            slots,
            free,
            aio_done: Vec::new(),
            inline,
            zeros: None,
            zero_mode: ZeroMode::Fallocate,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn options(&self) -> &BlkOptions {
        &self.options
    }

    /// A handle to the counters, readable while the handler runs in a worker.
    pub fn stats_handle(&self) -> BlkStatsHandle {
        BlkStatsHandle(Arc::clone(&self.counters))
    }

    /// The backing file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The engine `options` ask for, with its slots (none for `sync`).
    #[allow(clippy::type_complexity)]
    fn engine(options: &BlkOptions) -> io::Result<(Option<Aio>, Vec<Slot>, Vec<usize>)> {
        let depth = options.queue_depth.clamp(1, 4096);
        Ok(match options.aio {
            AioMode::Sync => (None, Vec::new(), Vec::new()),
            mode => (
                Some(Aio::new(mode, depth)?),
                (0..depth).map(|_| Slot::default()).collect(),
                (0..depth).rev().collect(),
            ),
        })
    }

    /// Send every read and write to the engine (tests: whatever file system the temp dir is).
    #[cfg(test)]
    fn force_async(&mut self) {
        if self.inline == Inline::Always {
            (self.aio, self.slots, self.free) = Self::engine(&self.options).unwrap();
        }
        self.inline = Inline::Never;
    }

    #[cfg(test)]
    fn force_write_zeros(&mut self) {
        self.zero_mode = ZeroMode::WriteOnly;
    }

    /// Byte offset of `[sector·512, sector·512 + len)` if it lies inside the capacity.
    fn byte_range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (end <= self.capacity_bytes).then_some(offset)
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// VIRTIO_BLK_T_IN / VIRTIO_BLK_T_OUT: check the request and describe it in `slot` (the
    /// guest iovecs, and a bounce buffer where direct I/O cannot use them in place). `Err` is the
    /// answer for a request that fails before any I/O.
    fn prepare_rw(
        &self,
        chain: &ChainView<'_>,
        sector: u64,
        direction: Direction,
        slot: &mut Slot,
    ) -> Result<(), Done> {
        let ioerr = || Done::status(VIRTIO_BLK_S_IOERR);
        let (segments, skip, len) = match direction {
            Direction::Read => {
                bump(&self.counters.reads, 1);
                // The writable part holds at least the status byte (checked by the caller).
                // Lenient: the spec wants multiples of 512, a partial last sector is read.
                (chain.writable(), 0, u64::from(chain.writable_len() - 1))
            }
            Direction::Write => {
                bump(&self.counters.writes, 1);
                if self.options.read_only {
                    return Err(ioerr());
                }
                let len = u64::from(chain.readable_len() - HEADER_SIZE);
                // A partial sector write is a driver error (§5.2.6: data in multiples of 512).
                if len % SECTOR_SIZE != 0 {
                    return Err(ioerr());
                }
                (chain.readable(), u64::from(HEADER_SIZE), len)
            }
        };
        let offset = self.byte_range(sector, len).ok_or_else(ioerr)?;
        slot.direction = direction;
        slot.offset = offset;
        slot.len = len;
        slot.bounce = None;
        fill_iovecs(&mut slot.iovecs, segments, skip, len);
        if let Some(dio) = self.direct {
            // O_DIRECT wants the file offset and length aligned; the guest was told the block
            // size (`dio.offset` at least), so only a driver that ignores it gets here.
            let off_align = u64::from(dio.offset);
            if offset % off_align != 0 || len % off_align != 0 {
                bump(&self.counters.unaligned, 1);
                return Err(ioerr());
            }
            let mem_align = dio.memory as usize;
            let aligned = slot
                .iovecs
                .iter()
                .all(|v| (v.iov_base as usize) % mem_align == 0 && v.iov_len % mem_align == 0);
            if !aligned && len > 0 {
                bump(&self.counters.bounced, 1);
                let bounce = Bounce::new(len as usize, mem_align.max(4096)).ok_or_else(ioerr)?;
                if direction == Direction::Write {
                    let mut at = 0usize;
                    for v in &slot.iovecs {
                        // SAFETY: the guest iovecs are alive for the call; the bounce buffer
                        // holds `len`, the sum of their lengths.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                v.iov_base.cast::<u8>(),
                                bounce.ptr.add(at),
                                v.iov_len,
                            )
                        };
                        at += v.iov_len;
                    }
                }
                slot.bounce_iov = libc::iovec {
                    iov_base: bounce.ptr.cast(),
                    iov_len: len as usize,
                };
                slot.bounce = Some(bounce);
            }
        }
        Ok(())
    }

    /// The iovecs the I/O of `slot` uses: its bounce buffer or the guest's.
    fn io_iovecs(slot: &mut Slot) -> &mut [libc::iovec] {
        if slot.bounce.is_some() {
            std::slice::from_mut(&mut slot.bounce_iov)
        } else {
            &mut slot.iovecs
        }
    }

    /// Finish a read or write of which the asynchronous engine moved `result` bytes (or failed
    /// with `-errno`): a short transfer is completed synchronously, a bounce buffer copied back.
    fn finish_rw(&self, slot: &mut Slot, result: i64) -> Done {
        let fd = self.fd();
        let eof_zero = !self.is_block_device;
        let outcome = match u64::try_from(result) {
            Err(_) => Err(Partial { done: 0 }),
            Ok(n) if n >= slot.len => Ok(slot.len),
            Ok(n) => {
                // Short (end of file, a signal, a partial direct transfer): the rest blocking.
                let (offset, direction) = (slot.offset + n, slot.direction);
                let iovecs = Self::io_iovecs(slot);
                let first = advance(iovecs, n);
                // SAFETY: the iovecs describe the guest's buffers (alive until the chain is
                // completed) or our bounce buffer.
                match unsafe { transfer(fd, &mut iovecs[first..], offset, direction, eof_zero) } {
                    Ok(m) => Ok(n + m),
                    Err(e) => Err(Partial { done: n + e.done }),
                }
            }
        };
        self.conclude(slot, outcome, result >= 0 && (result as u64) < slot.len)
    }

    /// The answer to a read or write that moved what `outcome` says; `resumed` if part of it
    /// went through blocking calls (which do not carry `RWF_DSYNC`).
    fn conclude(&self, slot: &mut Slot, outcome: Result<u64, Partial>, resumed: bool) -> Done {
        let moved = match &outcome {
            Ok(n) => *n,
            Err(e) => e.done,
        };
        if slot.direction == Direction::Read {
            if let Some(bounce) = slot.bounce.take() {
                let mut left = moved as usize;
                let mut at = 0usize;
                for v in &slot.iovecs {
                    let n = left.min(v.iov_len);
                    // SAFETY: the guest iovecs are alive until the chain is completed; the
                    // bounce buffer holds `len >= moved` bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(bounce.ptr.add(at), v.iov_base.cast(), n)
                    };
                    at += n;
                    left -= n;
                }
            }
            bump(&self.counters.bytes_read, moved);
            return Done {
                status: if outcome.is_ok() {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                },
                written: moved,
            };
        }
        slot.bounce = None;
        bump(&self.counters.bytes_written, moved);
        let status = match outcome {
            // Asynchronous writes in writethrough mode carry RWF_DSYNC; blocking ones sync.
            Ok(_) if self.aio.is_some() && !resumed => VIRTIO_BLK_S_OK,
            Ok(_) => self.synced_status(),
            Err(_) => VIRTIO_BLK_S_IOERR,
        };
        Done::status(status)
    }

    /// A read or write on the worker thread (`--aio sync`, or what the engine cannot take).
    fn rw_sync(&mut self, chain: &ChainView<'_>, sector: u64, direction: Direction) -> Done {
        let mut slot = std::mem::take(&mut self.sync_slot);
        let done = match self.prepare_rw(chain, sector, direction, &mut slot) {
            Err(done) => done,
            Ok(()) => {
                let fd = self.fd();
                let eof_zero = !self.is_block_device;
                let offset = slot.offset;
                let iovecs = Self::io_iovecs(&mut slot);
                // SAFETY: the iovecs were built from the chain's segments, which stay valid while
                // the memory snapshot passed to `handle` is alive — for the whole call (or they
                // describe the bounce buffer). pwritev only reads them.
                let result = unsafe { transfer(fd, iovecs, offset, direction, eof_zero) };
                self.conclude(&mut slot, result, true)
            }
        };
        slot.iovecs.clear();
        slot.bounce = None;
        self.sync_slot = slot;
        done
    }

    /// OK, after an `fdatasync` in writethrough mode.
    fn synced_status(&self) -> u8 {
        if self.options.writethrough && self.sync().is_err() {
            VIRTIO_BLK_S_IOERR
        } else {
            VIRTIO_BLK_S_OK
        }
    }

    fn flush(&mut self) -> Done {
        bump(&self.counters.flushes, 1);
        Done::status(match self.sync() {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(_) => VIRTIO_BLK_S_IOERR,
        })
    }

    fn get_id(&mut self, chain: &ChainView<'_>) -> Done {
        bump(&self.counters.get_ids, 1);
        let room = (chain.writable_len() - 1) as usize;
        let id = &self.options.serial[..room.min(VIRTIO_BLK_ID_BYTES)];
        let mut done = 0usize;
        for seg in chain.writable() {
            if done == id.len() {
                break;
            }
            // SAFETY: the segment is alive for the call (see `read`); write_from stays inside it.
            done += unsafe { seg.write_from(0, &id[done..]) };
        }
        Done {
            status: VIRTIO_BLK_S_OK,
            written: done as u64,
        }
    }

    /// VIRTIO_BLK_T_DISCARD and VIRTIO_BLK_T_WRITE_ZEROES.
    fn discard_or_write_zeroes(&mut self, chain: &ChainView<'_>, discard: bool) -> Done {
        let o = &self.options;
        let (enabled, max_sectors, max_seg) = if discard {
            bump(&self.counters.discards, 1);
            (o.discard, o.max_discard_sectors, o.max_discard_seg)
        } else {
            bump(&self.counters.write_zeroes, 1);
            (
                o.write_zeroes,
                o.max_write_zeroes_sectors,
                o.max_write_zeroes_seg,
            )
        };
        if !enabled {
            return Done::status(VIRTIO_BLK_S_UNSUPP);
        }
        if self.options.read_only {
            return Done::status(VIRTIO_BLK_S_IOERR);
        }
        let data = chain.readable_len() - HEADER_SIZE;
        if data == 0 || data % DWZ_SEGMENT_SIZE != 0 || data / DWZ_SEGMENT_SIZE > max_seg {
            return Done::status(VIRTIO_BLK_S_IOERR);
        }
        // Copy every segment out of guest memory exactly once, then validate the copies: the
        // guest cannot change a range between its check and its use.
        self.ranges.clear();
        let mut unsupported = false;
        let mut bad = false;
        for k in 0..data / DWZ_SEGMENT_SIZE {
            let mut raw = [0u8; DWZ_SEGMENT_SIZE as usize];
            let at = u64::from(HEADER_SIZE + k * DWZ_SEGMENT_SIZE);
            gather(chain.readable(), at, &mut raw);
            let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = raw;
            let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
            let num_sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);
            // §5.2.6.2: unknown flags, and UNMAP on a discard, are UNSUPP.
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
                || (discard && flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0)
            {
                unsupported = true;
                continue;
            }
            let len = u64::from(num_sectors) * SECTOR_SIZE;
            match self.byte_range(sector, len) {
                Some(offset) if num_sectors <= max_sectors => self.ranges.push(Range {
                    offset,
                    len,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }),
                _ => bad = true,
            }
        }
        if unsupported {
            return Done::status(VIRTIO_BLK_S_UNSUPP);
        }
        if bad {
            return Done::status(VIRTIO_BLK_S_IOERR);
        }
        let ranges = std::mem::take(&mut self.ranges);
        let mut result = Ok(());
        for r in ranges.iter().filter(|r| r.len > 0) {
            result = if discard {
                self.punch_hole(r.offset, r.len)
            } else {
                self.zero_range(r.offset, r.len, r.unmap)
            };
            if result.is_err() {
                break;
            }
        }
        self.ranges = ranges;
        Done::status(match result {
            Ok(()) => self.synced_status(),
            Err(_) => VIRTIO_BLK_S_IOERR,
        })
    }

    /// Discard: deallocate if the file system can; a discard is only a hint otherwise.
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_block_device {
            return match block_range_ioctl(self.fd(), BLKDISCARD, offset, len) {
                // A device without discard: the hint is dropped.
                Err(e) if fallocate_unsupported(&e) => Ok(()),
                other => other,
            };
        }
        match fallocate(self.fd(), PUNCH_HOLE, offset, len) {
            Err(e) if fallocate_unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Write zeroes: ZERO_RANGE, else PUNCH_HOLE (both read back as zeros), else writing zeros.
    /// With `unmap` the order of the first two is swapped, deallocating when possible.
    fn zero_range(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.is_block_device && self.zero_mode == ZeroMode::Fallocate {
            // The kernel picks the device's write-zeroes (which may unmap), else writes zeros.
            match block_range_ioctl(self.fd(), BLKZEROOUT, offset, len) {
                Err(e) if fallocate_unsupported(&e) => {}
                other => return other,
            }
            return self.write_zeros(offset, len);
        }
        if self.zero_mode == ZeroMode::Fallocate {
            let modes = if unmap {
                [PUNCH_HOLE, ZERO_RANGE]
            } else {
                [ZERO_RANGE, PUNCH_HOLE]
            };
            for mode in modes {
                match fallocate(self.fd(), mode, offset, len) {
                    Err(e) if fallocate_unsupported(&e) => continue,
                    other => return other,
                }
            }
        }
        self.write_zeros(offset, len)
    }

    fn write_zeros(&mut self, mut offset: u64, mut len: u64) -> io::Result<()> {
        const CHUNK: usize = 256 * 1024;
        if self.zeros.is_none() {
            // Page-aligned, so O_DIRECT takes it too.
            self.zeros = Some(Bounce::new(CHUNK, 4096).ok_or(io::ErrorKind::OutOfMemory)?);
        }
        let zeros = self
            .zeros
            .as_ref()
            .map_or(std::ptr::null(), |z| z.ptr.cast_const());
        while len > 0 {
            let n = len.min(CHUNK as u64) as usize;
            let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
            // SAFETY: writes `n <= CHUNK` bytes from our own zeroed buffer of CHUNK bytes.
            let r = unsafe { libc::pwrite(self.fd(), zeros.cast(), n, off) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            offset += r as u64;
            len -= r as u64;
        }
        Ok(())
    }
}

/// A well-formed request's header, status byte and room for data.
struct Request {
    kind: u32,
    sector: u64,
    status: *mut u8,
    data_room: u64,
    /// When it was parsed (only with the latency histogram).
    started: Option<Instant>,
}

/// Where and how a request is answered.
struct Answer {
    status: *mut u8,
    data_room: u64,
    started: Option<Instant>,
}

impl Request {
    fn answer(&self) -> Answer {
        Answer {
            status: self.status,
            data_room: self.data_room,
            started: self.started,
        }
    }
}

impl BlkHandler {
    /// Read the header of `chain`; `None` (counted as malformed) without a status byte or a
    /// whole header.
    fn parse(&self, chain: &ChainView<'_>) -> Option<Request> {
        // The status byte is the last byte of the last writable segment; without it, or without
        // a whole header, there is no way to answer: complete with nothing written.
        let (Some(status_seg), true) =
            (chain.writable().last(), chain.readable_len() >= HEADER_SIZE)
        else {
            bump(&self.counters.malformed, 1);
            return None;
        };
        // The in-flight gauge: two relaxed atomics per request; the latency histogram (when
        // asked for) two clock reads more.
        bump(&self.counters.in_flight, 1);
        let started = self.options.latency_histogram.then(Instant::now);
        let mut header = [0u8; HEADER_SIZE as usize];
        gather(chain.readable(), 0, &mut header);
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        Some(Request {
            started,
            kind: u32::from_le_bytes([t0, t1, t2, t3]),
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            // SAFETY: segments are never empty, so the last byte is inside the segment.
            status: unsafe { status_seg.host.add(status_seg.len as usize - 1) },
            data_room: u64::from(chain.writable_len() - 1),
        })
    }

    /// Do a request on the worker thread.
    fn dispatch(&mut self, chain: &ChainView<'_>, request: &Request) -> Done {
        let sector = request.sector;
        match request.kind {
            VIRTIO_BLK_T_IN => self.rw_sync(chain, sector, Direction::Read),
            VIRTIO_BLK_T_OUT => self.rw_sync(chain, sector, Direction::Write),
            VIRTIO_BLK_T_FLUSH => self.flush(),
            VIRTIO_BLK_T_GET_ID => self.get_id(chain),
            VIRTIO_BLK_T_DISCARD => self.discard_or_write_zeroes(chain, true),
            VIRTIO_BLK_T_WRITE_ZEROES => self.discard_or_write_zeroes(chain, false),
            _ => Done::status(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// Write the status byte, count the request and return the used len.
    fn answer(&self, request: Answer, done: Done) -> u32 {
        let Answer {
            status,
            data_room,
            started,
        } = request;
        // SAFETY: the status byte lies in a segment of a chain that is being handled or is in
        // flight (its snapshot stays mapped until it is completed). A raw write: guest memory is
        // shared.
        unsafe { status.write_volatile(done.status) };
        let c = &self.counters;
        if let Some(started) = started {
            let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            bump(&c.latency_us[latency_bucket(nanos)], 1);
            bump(&c.latency_ns_sum, nanos);
        }
        c.in_flight.fetch_sub(1, Ordering::Relaxed);
        bump(&c.requests, 1);
        match done.status {
            VIRTIO_BLK_S_IOERR => bump(&c.io_errors, 1),
            VIRTIO_BLK_S_UNSUPP => bump(&c.unsupported, 1),
            _ => {}
        }
        // Used len counts bytes written from the start of the writable part (§1.4): the data,
        // plus the status byte when it directly follows the data (always, for a well-formed
        // request); otherwise the status is left out (an underestimate is allowed).
        let written = done.written.min(data_room);
        let used = if written == data_room {
            written + 1
        } else {
            written
        };
        // used <= writable_len, a u32.
        used as u32
    }

    /// Hand a read, write or flush to the engine. `Err` with the answer if it failed before
    /// any I/O, `Ok(false)` if it must be done on the worker thread instead.
    fn start_async(&mut self, chain: &ChainView<'_>, request: &Request) -> Result<bool, Done> {
        let direction = match request.kind {
            VIRTIO_BLK_T_IN => Some(Direction::Read),
            VIRTIO_BLK_T_OUT => Some(Direction::Write),
            VIRTIO_BLK_T_FLUSH => None,
            _ => return Ok(false),
        };
        if self.inline == Inline::Always && direction.is_some() {
            return Ok(false);
        }
        let Some(index) = self.free.pop() else {
            // The worker never has more in flight than max_in_flight; be safe anyway.
            return Ok(false);
        };
        let mut slot = std::mem::take(&mut self.slots[index]);
        slot.head = chain.head();
        slot.status = request.status;
        slot.data_room = request.data_room;
        slot.started = request.started;
        let fd = self.fd();
        let op = match direction {
            None => {
                bump(&self.counters.flushes, 1);
                slot.kind = SlotKind::Flush;
                Op::Fdatasync { fd }
            }
            Some(direction) => {
                slot.kind = SlotKind::Rw;
                if let Err(done) = self.prepare_rw(chain, request.sector, direction, &mut slot) {
                    slot.iovecs.clear();
                    self.slots[index] = slot;
                    self.free.push(index);
                    return Err(done);
                }
                let (iov, count) = {
                    let iovecs = Self::io_iovecs(&mut slot);
                    (iovecs.as_ptr(), iovecs.len())
                };
                if direction == Direction::Read
                    && self.inline == Inline::TryNowait
                    && count <= IOV_MAX
                {
                    // SAFETY: the iovecs describe the chain's buffers (alive for this call) or
                    // the slot's bounce buffer.
                    let n = unsafe {
                        libc::preadv2(
                            fd,
                            iov,
                            count as c_int,
                            slot.offset as libc::off_t,
                            libc::RWF_NOWAIT,
                        )
                    };
                    if n >= 0 && n as u64 == slot.len {
                        let len = slot.len;
                        let done = self.conclude(&mut slot, Ok(len), true);
                        slot.iovecs.clear();
                        self.slots[index] = slot;
                        self.free.push(index);
                        return Err(done);
                    }
                    if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP)
                    {
                        self.inline = Inline::Never;
                    }
                    // Would block, or short (the engine reads it all again): asynchronously.
                }
                if count > IOV_MAX || slot.len == 0 {
                    // Too many iovecs for one call (or nothing to move): blocking, in pieces.
                    let offset = slot.offset;
                    let eof_zero = !self.is_block_device;
                    let iovecs = Self::io_iovecs(&mut slot);
                    // SAFETY: as in `rw_sync`.
                    let result = unsafe { transfer(fd, iovecs, offset, direction, eof_zero) };
                    let done = self.conclude(&mut slot, result, true);
                    slot.iovecs.clear();
                    self.slots[index] = slot;
                    self.free.push(index);
                    return Err(done);
                }
                match direction {
                    Direction::Read => Op::Readv {
                        fd,
                        iov,
                        count: count as u32,
                        offset: slot.offset,
                    },
                    Direction::Write => Op::Writev {
                        fd,
                        iov,
                        count: count as u32,
                        offset: slot.offset,
                        dsync: self.options.writethrough,
                    },
                }
            }
        };
        self.slots[index] = slot;
        // The iovec array's address where the slot now lives: a bounce iovec is inside the
        // slot itself, which just moved.
        let iov = Self::io_iovecs(&mut self.slots[index]).as_ptr();
        let op = match op {
            Op::Readv {
                fd, count, offset, ..
            } => Op::Readv {
                fd,
                iov,
                count,
                offset,
            },
            Op::Writev {
                fd,
                count,
                offset,
                dsync,
                ..
            } => Op::Writev {
                fd,
                iov,
                count,
                offset,
                dsync,
            },
            flush => flush,
        };
        let aio = self.aio.as_mut().expect("start_async needs an engine");
        // SAFETY: the iovecs live in `self.slots[index]` (a heap vector, or the slot's own
        // bounce iovec; `slots` is never resized) until the completion is reaped, and describe
        // guest buffers of a chain in flight (kept mapped by the worker until it is completed)
        // or the slot's bounce buffer. At most `slots.len()` operations are in flight.
        if unsafe { aio.push(op, index as u64) }.is_err() {
            let mut slot = std::mem::take(&mut self.slots[index]);
            slot.iovecs.clear();
            slot.bounce = None;
            self.slots[index] = slot;
            self.free.push(index);
            return Err(Done::status(VIRTIO_BLK_S_IOERR));
        }
        bump(&self.counters.async_requests, 1);
        // The device starts on the first requests of a batch while the rest are prepared (see
        // `aio`, "When operations are issued").
        if let Err(e) = aio.submit_if_due() {
            // A request pushed but never issued would hang the queue: fault it instead.
            panic!("submitting to the {} engine: {e}", aio.mode().name());
        }
        Ok(true)
    }

    /// The answer to the engine's completion of slot `index`: `(head, used len)`.
    fn complete_slot(&mut self, index: usize, result: i64) -> (u16, u32) {
        let mut slot = std::mem::take(&mut self.slots[index]);
        let done = match slot.kind {
            SlotKind::Flush => Done::status(if result < 0 {
                VIRTIO_BLK_S_IOERR
            } else {
                VIRTIO_BLK_S_OK
            }),
            SlotKind::Rw => self.finish_rw(&mut slot, result),
        };
        let used = self.answer(
            Answer {
                status: slot.status,
                data_room: slot.data_room,
                started: slot.started.take(),
            },
            done,
        );
        let head = slot.head;
        slot.iovecs.clear();
        slot.bounce = None;
        self.slots[index] = slot;
        self.free.push(index);
        (head, used)
    }
}

impl ChainHandler for BlkHandler {
    fn handle(&mut self, _memory: &GuestMemory, chain: ChainView<'_>) -> u32 {
        let Some(request) = self.parse(&chain) else {
            return 0;
        };
        let done = self.dispatch(&chain, &request);
        self.answer(request.answer(), done)
    }

    fn submit(&mut self, memory: &GuestMemory, chain: ChainView<'_>) -> Submitted {
        if self.aio.is_none() {
            return Submitted::Done(self.handle(memory, chain));
        }
        let Some(request) = self.parse(&chain) else {
            return Submitted::Done(0);
        };
        let done = match self.start_async(&chain, &request) {
            Ok(true) => return Submitted::Pending,
            Ok(false) => self.dispatch(&chain, &request),
            Err(done) => done,
        };
        Submitted::Done(self.answer(request.answer(), done))
    }

    fn flush_batch(&mut self) {
        if let Some(aio) = self.aio.as_mut() {
            if let Err(e) = aio.submit() {
                // Requests pushed but never issued would hang the queue: fault it instead.
                panic!("submitting to the {} engine: {e}", aio.mode().name());
            }
        }
    }

    fn max_in_flight(&self) -> usize {
        self.slots.len()
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        self.aio.as_ref().map(Aio::fd)
    }

    fn completions_ready(&mut self) -> bool {
        self.aio.as_mut().is_some_and(Aio::ready)
    }

    fn reap(&mut self, done: &mut Vec<(u16, u32)>, wait: bool) {
        let Some(aio) = self.aio.as_mut() else {
            return;
        };
        let mut finished = std::mem::take(&mut self.aio_done);
        finished.clear();
        if let Err(e) = aio.reap(&mut finished, wait) {
            // The engine cannot report completions any more: fault the queue, never hang it.
            panic!("reaping the {} engine: {e}", aio.mode().name());
        }
        for &(tag, result) in &finished {
            done.push(self.complete_slot(tag as usize, result));
        }
        self.aio_done = finished;
    }
}

/// Copy `dst.len()` bytes of the segment stream starting at byte `offset` (fewer if the stream
/// is shorter; callers check the length first).
pub(crate) fn gather(segments: &[Segment], mut offset: u64, dst: &mut [u8]) {
    let mut done = 0;
    for seg in segments {
        let len = u64::from(seg.len);
        if offset >= len {
            offset -= len;
            continue;
        }
        // SAFETY: the segments belong to the chain being handled; their snapshot is alive for
        // the call. read_to stays inside the segment.
        done += unsafe { seg.read_to(offset as usize, &mut dst[done..]) };
        offset = 0;
        if done == dst.len() {
            break;
        }
    }
}

/// Fill `iovecs` with `len` bytes of the segment stream starting at byte `skip`.
fn fill_iovecs(iovecs: &mut Vec<libc::iovec>, segments: &[Segment], mut skip: u64, mut len: u64) {
    iovecs.clear();
    for seg in segments {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(len);
        iovecs.push(libc::iovec {
            // SAFETY: skip < seg.len, so the pointer stays inside the segment.
            iov_base: unsafe { seg.host.add(skip as usize) }.cast(),
            iov_len: n as usize,
        });
        len -= n;
        skip = 0;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

/// A transfer that failed after `done` bytes.
struct Partial {
    done: u64,
}

/// Move all bytes described by `iovecs` between them and the file at `offset`, at most
/// [`IOV_MAX`] iovecs per syscall, retrying short transfers and `EINTR`. A read that reaches the
/// end of the file fills the rest with zeros (a file shorter than the capacity reads like a
/// sparse one) if `eof_zero`, and fails otherwise. Returns the bytes moved. `iovecs` is consumed (advanced) in the process.
///
/// # Safety
/// Every iovec must describe memory that is valid for reads (and, for `Read`, writes) for the
/// whole call. It may be shared with another process.
unsafe fn transfer(
    fd: RawFd,
    iovecs: &mut [libc::iovec],
    mut offset: u64,
    direction: Direction,
    eof_zero: bool,
) -> Result<u64, Partial> {
    let mut done = 0u64;
    let mut first = 0usize;
    while first < iovecs.len() {
        let chunk = &iovecs[first..iovecs.len().min(first + IOV_MAX)];
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Err(Partial { done });
        };
        // chunk.len() <= IOV_MAX, which fits in c_int.
        let count = chunk.len() as c_int;
        let n = match direction {
            // SAFETY: the iovecs are valid per the contract; the kernel checks them again.
            Direction::Read => unsafe { libc::preadv(fd, chunk.as_ptr(), count, off) },
            // SAFETY: as above; pwritev only reads the buffers.
            Direction::Write => unsafe { libc::pwritev(fd, chunk.as_ptr(), count, off) },
        };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Partial { done });
        }
        if n == 0 {
            if direction == Direction::Write || !eof_zero {
                // A write that moves nothing, or a block device that ends before the capacity
                // (it shrank under us): an error, never silent zeros.
                return Err(Partial { done });
            }
            // End of a regular file: the rest reads as zeros (a short image reads sparse).
            for iov in &iovecs[first..] {
                // SAFETY: valid for writes per the contract.
                unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
                done += iov.iov_len as u64;
            }
            return Ok(done);
        }
        let mut n = n as usize;
        done += n as u64;
        offset += n as u64;
        while n > 0 {
            let iov = &mut iovecs[first];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: n < iov_len, so the pointer stays inside the buffer.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(done)
}

/// Drop the first `n` bytes of `iovecs` (trimming the one `n` ends in); returns the index of
/// the first iovec left.
fn advance(iovecs: &mut [libc::iovec], mut n: u64) -> usize {
    let mut first = 0;
    while n > 0 && first < iovecs.len() {
        let iov = &mut iovecs[first];
        if n >= iov.iov_len as u64 {
            n -= iov.iov_len as u64;
            first += 1;
        } else {
            // SAFETY: n < iov_len, so the pointer stays inside the buffer.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n as usize) }.cast();
            iov.iov_len -= n as usize;
            n = 0;
        }
    }
    first
}

/// A zeroed, aligned buffer for direct I/O on guest buffers that are not aligned.
struct Bounce {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Bounce {
    fn new(len: usize, align: usize) -> Option<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Self { ptr, layout })
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKIOMIN: libc::c_ulong = 0x1278;
const BLKIOOPT: libc::c_ulong = 0x1279;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// What the back-end needs to know about its file or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkGeometry {
    /// Bytes (BLKGETSIZE64 for a block device, the file size otherwise).
    pub size: u64,
    /// A block device (discard is BLKDISCARD, write-zeroes BLKZEROOUT, reads past its end fail).
    pub block_device: bool,
    /// Logical block size: the smallest unit the device addresses (512 for a file).
    pub logical_block_size: u32,
    /// Physical block size: the unit the device writes without read-modify-write.
    pub physical_block_size: u32,
    /// Minimum and optimal I/O sizes in bytes (BLKIOMIN/BLKIOOPT; 0 unknown).
    pub min_io: u32,
    pub opt_io: u32,
    /// The fd was opened with O_DIRECT.
    pub direct: bool,
    /// Direct I/O alignment of buffers in memory and of file offsets and lengths (statx
    /// DIOALIGN for a file, the logical block size for a device; 0 without O_DIRECT).
    pub dio_memory_align: u32,
    pub dio_offset_align: u32,
}

fn ioctl_value<T: Default>(fd: RawFd, request: libc::c_ulong) -> io::Result<T> {
    let mut value = T::default();
    // SAFETY: the block ioctls used here write one value of type T through the pointer.
    let r = unsafe { libc::ioctl(fd, request as _, &mut value as *mut T) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Look at `file`: size, block device or not, block sizes, direct I/O alignment.
pub fn probe(file: &File) -> io::Result<BlkGeometry> {
    use std::os::unix::fs::FileTypeExt;
    let fd = file.as_raw_fd();
    let meta = file.metadata()?;
    // SAFETY: F_GETFL has no memory-safety preconditions.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let direct = flags & libc::O_DIRECT != 0;
    if meta.file_type().is_block_device() {
        let size: u64 = ioctl_value(fd, BLKGETSIZE64)?;
        let logical: c_int = ioctl_value(fd, BLKSSZGET)?;
        let physical: libc::c_uint = ioctl_value(fd, BLKPBSZGET)?;
        let min_io: libc::c_uint = ioctl_value(fd, BLKIOMIN).unwrap_or(0);
        let opt_io: libc::c_uint = ioctl_value(fd, BLKIOOPT).unwrap_or(0);
        let logical = u32::try_from(logical).unwrap_or(512).max(512);
        return Ok(BlkGeometry {
            size,
            block_device: true,
            logical_block_size: logical,
            physical_block_size: physical.max(logical),
            min_io,
            opt_io,
            direct,
            dio_memory_align: if direct { logical } else { 0 },
            dio_offset_align: if direct { logical } else { 0 },
        });
    }
    let (mut memory, mut offset) = (0, 0);
    if direct {
        // SAFETY: an all-zero statx is a valid value to be overwritten.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: statx writes into `stx`; the path is an empty C string with AT_EMPTY_PATH.
        let r = unsafe {
            libc::statx(
                fd,
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut stx,
            )
        };
        if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
            (memory, offset) = (stx.stx_dio_mem_align, stx.stx_dio_offset_align);
        } else {
            // An old kernel or a file system that does not say: the page size is always safe.
            (memory, offset) = (4096, 4096);
        }
    }
    let blksize = u32::try_from(std::os::unix::fs::MetadataExt::blksize(&meta)).unwrap_or(4096);
    Ok(BlkGeometry {
        size: meta.len(),
        block_device: false,
        logical_block_size: 512u32.max(offset),
        physical_block_size: blksize
            .clamp(512u32.max(offset), 1 << 20)
            .next_power_of_two(),
        min_io: 0,
        opt_io: 0,
        direct,
        dio_memory_align: memory,
        dio_offset_align: offset,
    })
}

/// BLKDISCARD / BLKZEROOUT on `[offset, offset + len)` of a block device.
fn block_range_ioctl(fd: RawFd, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    loop {
        // SAFETY: both ioctls read two u64 through the pointer.
        if unsafe { libc::ioctl(fd, request as _, range.as_ptr()) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

const PUNCH_HOLE: c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

fn fallocate(fd: RawFd, mode: c_int, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    let len = libc::off_t::try_from(len).map_err(io::Error::other)?;
    loop {
        // SAFETY: fallocate on an open fd has no memory-safety preconditions.
        if unsafe { libc::fallocate(fd, mode, off, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Errors that mean "this file system (or device) cannot do that mode": try the next way.
fn fallocate_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn latency_buckets_are_bit_lengths_of_microseconds() {
        use super::{latency_bucket, LATENCY_BUCKETS};
        assert_eq!(latency_bucket(999), 0); // below 1 us
        assert_eq!(latency_bucket(1_000), 1); // [1, 2) us
        assert_eq!(latency_bucket(3_999), 2); // [2, 4) us
        assert_eq!(latency_bucket(4_000), 3);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::memory::create_memfd;
    use crate::queue::test_util::shared_memory;
    use crate::queue::{ChainBatch, QueueConfig, SplitQueue, SplitQueueDriver};

    const HDR: u64 = 0x10000;
    const STATUS: u64 = 0x10100;
    /// Indirect tables live here (up to 0x8000 bytes).
    const TABLE: u64 = 0x8000;
    /// The two guest-memory regions meet here.
    const BOUNDARY: u64 = 0x40000;
    const CAPACITY: u64 = 64;

    fn memfd_file(size: u64) -> File {
        File::from(create_memfd("blk-image", size).unwrap())
    }

    /// A regular file on the host file system (ext4 or tmpfs under the temp dir), unlinked.
    fn tmp_file(size: u64) -> File {
        let path = std::env::temp_dir().join(format!(
            "vvu-blk-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(size).unwrap();
        file
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[4..8].copy_from_slice(&0xffff_ffffu32.to_le_bytes()); // reserved: ignored
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn dwz(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    }

    struct Rig {
        drv: SplitQueueDriver,
        dev: SplitQueue,
        handler: BlkHandler,
        batch: ChainBatch,
        stats: BlkStatsHandle,
        /// A second handle to the image, to check what reached it.
        image: File,
    }

    fn rig_with(file: File, capacity: u64, options: BlkOptions) -> Rig {
        let (drv_mem, dev_mem) = shared_memory(&[(0, BOUNDARY), (BOUNDARY, BOUNDARY)]);
        let config = QueueConfig {
            size: 256,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            event_idx: false,
            indirect: true,
        };
        let drv = SplitQueueDriver::new(drv_mem, config).unwrap();
        let mut dev = SplitQueue::new(config).unwrap();
        dev.attach(dev_mem).unwrap();
        // Reopened: its own open file, without O_DIRECT even if `file` has it.
        let image = File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
        let mut handler = BlkHandler::new(file, capacity, options).unwrap();
        handler.force_async();
        let stats = handler.stats_handle();
        Rig {
            drv,
            dev,
            handler,
            batch: ChainBatch::new(),
            stats,
            image,
        }
    }

    fn rig() -> Rig {
        rig_with(memfd_file(CAPACITY * 512), CAPACITY, BlkOptions::default())
    }

    impl Rig {
        fn put(&self, gpa: u64, bytes: &[u8]) {
            self.drv.memory().write(gpa, bytes).unwrap();
        }

        fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
            let mut out = vec![0; len];
            self.drv.memory().read(gpa, &mut out).unwrap();
            out
        }

        fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
            let mut out = vec![0; len];
            self.image.read_exact_at(&mut out, offset).unwrap();
            out
        }

        /// Make the chain available, let the handler run it, check the used entry; returns
        /// the used length.
        fn run(&mut self, head: u16) -> u32 {
            self.drv.publish().unwrap();
            self.batch.clear();
            assert_eq!(self.dev.pop_batch(&mut self.batch, 8).unwrap(), 1);
            let chain = self.batch.get(0).unwrap();
            assert_eq!(chain.head(), head);
            let memory = self.dev.memory().unwrap();
            let len = if self.handler.max_in_flight() > 0 {
                // The asynchronous path, as the worker drives it.
                match self.handler.submit(memory, chain) {
                    Submitted::Done(len) => len,
                    Submitted::Pending => {
                        self.handler.flush_batch();
                        let mut done = Vec::new();
                        self.handler.reap(&mut done, true);
                        assert_eq!(done.len(), 1);
                        assert_eq!(done[0].0, head);
                        done[0].1
                    }
                }
            } else {
                self.handler.handle(memory, chain)
            };
            self.dev.push_used(head, len).unwrap();
            self.dev.publish_used().unwrap();
            // The driver side checks that len does not exceed the writable bytes.
            assert_eq!(self.drv.reap_used().unwrap(), Some((head, len)));
            len
        }

        fn chain(&mut self, readable: &[(u64, u32)], writable: &[(u64, u32)]) -> u32 {
            let head = self.drv.add_chain(readable, writable).unwrap();
            self.run(head)
        }

        fn indirect(&mut self, readable: &[(u64, u32)], writable: &[(u64, u32)]) -> u32 {
            let head = self.drv.add_indirect(TABLE, readable, writable).unwrap();
            self.run(head)
        }

        /// A request with the header at HDR and the status byte at STATUS; returns
        /// `(status, used len)`.
        fn request(
            &mut self,
            kind: u32,
            sector: u64,
            data_out: &[(u64, u32)],
            data_in: &[(u64, u32)],
        ) -> (u8, u32) {
            self.put(HDR, &header(kind, sector));
            self.put(STATUS, &[0xff]);
            let mut readable = vec![(HDR, 16)];
            readable.extend_from_slice(data_out);
            let mut writable = data_in.to_vec();
            writable.push((STATUS, 1));
            let used = self.chain(&readable, &writable);
            (self.get(STATUS, 1)[0], used)
        }

        fn write_sectors(&mut self, sector: u64, data: &[u8]) -> u8 {
            self.put(0x20000, data);
            self.request(
                VIRTIO_BLK_T_OUT,
                sector,
                &[(0x20000, data.len() as u32)],
                &[],
            )
            .0
        }

        fn read_sectors(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
            self.put(0x30000, &vec![0xee; len]);
            let (status, used) =
                self.request(VIRTIO_BLK_T_IN, sector, &[], &[(0x30000, len as u32)]);
            if status == VIRTIO_BLK_S_OK {
                assert_eq!(used as usize, len + 1);
            }
            (status, self.get(0x30000, len))
        }

        /// A discard or write-zeroes request with the given segments.
        fn dwz(&mut self, kind: u32, segments: &[[u8; 16]]) -> (u8, u32) {
            let bytes: Vec<u8> = segments.concat();
            self.put(0x28000, &bytes);
            self.request(kind, 0, &[(0x28000, bytes.len() as u32)], &[])
        }
    }

    #[test]
    fn latency_histogram_times_each_request_when_asked() {
        let options = BlkOptions {
            latency_histogram: true,
            ..BlkOptions::default()
        };
        let mut rig = rig_with(memfd_file(CAPACITY * 512), CAPACITY, options);
        for sector in 0..3 {
            assert_eq!(rig.read_sectors(sector, 512).0, VIRTIO_BLK_S_OK);
        }
        let stats = rig.stats.snapshot();
        // Every completed request is in exactly one bucket, and took some time.
        assert_eq!(stats.latency_us.iter().sum::<u64>(), 3);
        assert!(stats.latency_ns_sum > 0);
        assert_eq!(stats.in_flight, 0);
    }

    #[test]
    fn read_write_round_trip_with_split_header_and_segments_crossing_regions() {
        let mut rig = rig();
        let data = pattern(3 * 512, 7);
        // Header split 5 + 11 bytes; data in three segments, the first crossing the boundary
        // between the two memory regions (so it becomes two host segments).
        let h = header(VIRTIO_BLK_T_OUT, 5);
        rig.put(0x11000, &h[..5]);
        rig.put(0x11800, &h[5..]);
        rig.put(BOUNDARY - 0x100, &data[..512]);
        rig.put(0x20000, &data[512..612]);
        rig.put(0x21000, &data[612..]);
        rig.put(STATUS, &[0xff]);
        let used = rig.chain(
            &[
                (0x11000, 5),
                (0x11800, 11),
                (BOUNDARY - 0x100, 512),
                (0x20000, 100),
                (0x21000, 924),
            ],
            &[(STATUS, 1)],
        );
        assert_eq!((rig.get(STATUS, 1)[0], used), (VIRTIO_BLK_S_OK, 1));
        assert_eq!(rig.image_bytes(5 * 512, data.len()), data);
        assert_eq!(rig.image_bytes(4 * 512, 512), vec![0; 512]);

        // Read it back into a different layout: the status byte shares the last data segment.
        rig.put(HDR, &header(VIRTIO_BLK_T_IN, 5));
        rig.put(0x50000, &[0xaa; 0x1000]);
        rig.put(BOUNDARY - 0x80, &[0xaa; 0x100]);
        let used = rig.chain(
            &[(HDR, 16)],
            &[(0x50000, 700), (BOUNDARY - 0x80, 0x100), (0x52000, 581)],
        );
        assert_eq!(used, 1537);
        let mut back = rig.get(0x50000, 700);
        back.extend(rig.get(BOUNDARY - 0x80, 0x100));
        back.extend(rig.get(0x52000, 580));
        assert_eq!(back, data);
        assert_eq!(rig.get(0x52000 + 580, 1)[0], VIRTIO_BLK_S_OK);
        let stats = rig.stats.snapshot();
        assert_eq!((stats.reads, stats.writes, stats.requests), (1, 1, 2));
        assert_eq!((stats.bytes_read, stats.bytes_written), (1536, 1536));
        // None is left in flight; no request was timed (the histogram was not asked for).
        assert_eq!(stats.in_flight, 0);
        assert_eq!(
            (stats.latency_us.iter().sum::<u64>(), stats.latency_ns_sum),
            (0, 0)
        );
    }

    #[test]
    fn more_segments_than_iov_max() {
        let mut rig = rig();
        let n = 1536usize; // 2 bytes each: 3072 bytes = 6 sectors, > IOV_MAX iovecs
        let data = pattern(2 * n, 3);
        let out: Vec<(u64, u32)> = (0..n).map(|i| (0x60000 + 4 * i as u64, 2)).collect();
        for (i, &(gpa, _)) in out.iter().enumerate() {
            rig.put(gpa, &data[2 * i..2 * i + 2]);
        }
        rig.put(HDR, &header(VIRTIO_BLK_T_OUT, 10));
        let mut readable = vec![(HDR, 16)];
        readable.extend(&out);
        assert_eq!(rig.indirect(&readable, &[(STATUS, 1)]), 1);
        assert_eq!(rig.get(STATUS, 1)[0], VIRTIO_BLK_S_OK);
        assert_eq!(rig.image_bytes(10 * 512, data.len()), data);

        let inn: Vec<(u64, u32)> = (0..n).map(|i| (0x70000 + 4 * i as u64, 2)).collect();
        rig.put(HDR, &header(VIRTIO_BLK_T_IN, 10));
        let mut writable = inn.clone();
        writable.push((STATUS, 1));
        assert_eq!(rig.indirect(&[(HDR, 16)], &writable), 2 * n as u32 + 1);
        let back: Vec<u8> = inn.iter().flat_map(|&(gpa, _)| rig.get(gpa, 2)).collect();
        assert_eq!(back, data);
    }

    #[test]
    fn reads_past_the_end_of_a_short_file_are_zeros() {
        // The file holds 1000 bytes; the device claims 8 sectors.
        let file = memfd_file(1000);
        file.write_all_at(&pattern(1000, 9), 0).unwrap();
        let mut rig = rig_with(file, 8, BlkOptions::default());
        rig.put(HDR, &header(VIRTIO_BLK_T_IN, 0));
        rig.put(0x50000, &[0xaa; 700]);
        rig.put(0x52000, &[0xaa; 1349]);
        // EOF falls inside the second segment: a short preadv, then end of file.
        let used = rig.chain(&[(HDR, 16)], &[(0x50000, 700), (0x52000, 1349)]);
        assert_eq!(used, 2049);
        let mut back = rig.get(0x50000, 700);
        back.extend(rig.get(0x52000, 1348));
        assert_eq!(&back[..1000], &pattern(1000, 9)[..]);
        assert!(back[1000..].iter().all(|&b| b == 0));
        assert_eq!(rig.get(0x52000 + 1348, 1)[0], VIRTIO_BLK_S_OK);
    }

    #[test]
    fn partial_sector_reads_are_allowed_partial_sector_writes_are_not() {
        let mut rig = rig();
        assert_eq!(rig.write_sectors(0, &pattern(512, 1)), VIRTIO_BLK_S_OK);
        let (status, data) = rig.read_sectors(0, 100);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert_eq!(data, pattern(512, 1)[..100]);
        assert_eq!(rig.write_sectors(1, &pattern(100, 2)), VIRTIO_BLK_S_IOERR);
        assert_eq!(rig.image_bytes(512, 100), vec![0; 100]);
    }

    #[test]
    fn flush_and_get_id() {
        let options = BlkOptions {
            serial: BlkOptions::serial_from("vvu-serial-0123456789-too-long"),
            ..BlkOptions::default()
        };
        assert_eq!(&options.serial, b"vvu-serial-012345678");
        let mut rig = rig_with(memfd_file(CAPACITY * 512), CAPACITY, options);
        assert_eq!(
            rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], &[]),
            (VIRTIO_BLK_S_OK, 1)
        );
        rig.put(0x20000, &[0xaa; 32]);
        assert_eq!(
            rig.request(VIRTIO_BLK_T_GET_ID, 0, &[], &[(0x20000, 20)]),
            (VIRTIO_BLK_S_OK, 21)
        );
        assert_eq!(rig.get(0x20000, 20), b"vvu-serial-012345678");
        // A short buffer gets what fits.
        rig.put(0x20000, &[0xaa; 32]);
        assert_eq!(
            rig.request(VIRTIO_BLK_T_GET_ID, 0, &[], &[(0x20000, 8)]),
            (VIRTIO_BLK_S_OK, 9)
        );
        assert_eq!(rig.get(0x20000, 9), b"vvu-seri\xaa");
        // A long one gets 20 bytes; the status is not contiguous so it is not counted.
        assert_eq!(
            rig.request(VIRTIO_BLK_T_GET_ID, 0, &[], &[(0x20000, 32)]),
            (VIRTIO_BLK_S_OK, 20)
        );
        // A short serial is NUL-padded.
        let short = BlkOptions::serial_from("abc");
        assert_eq!(&short[..4], b"abc\0");
        let s = rig.stats.snapshot();
        assert_eq!((s.flushes, s.get_ids), (1, 3));
    }

    /// Fill sectors 0..16 with a pattern; returns it.
    fn fill(rig: &mut Rig) -> Vec<u8> {
        let data = pattern(16 * 512, 5);
        assert_eq!(rig.write_sectors(0, &data), VIRTIO_BLK_S_OK);
        data
    }

    /// Sectors 0..16 read back equal `data` with the listed sector ranges zeroed.
    fn expect_zeroed(rig: &mut Rig, mut data: Vec<u8>, zeroed: &[(usize, usize)]) {
        for &(start, count) in zeroed {
            data[start * 512..(start + count) * 512].fill(0);
        }
        let (status, back) = rig.read_sectors(0, 16 * 512);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(
            back == data,
            "unexpected contents after discard/write-zeroes"
        );
    }

    #[test]
    fn discard_reads_back_zeros() {
        let mut rig = rig();
        let data = fill(&mut rig);
        let segs = [dwz(2, 4, 0), dwz(9, 1, 0), dwz(12, 0, 0)];
        assert_eq!(rig.dwz(VIRTIO_BLK_T_DISCARD, &segs), (VIRTIO_BLK_S_OK, 1));
        expect_zeroed(&mut rig, data, &[(2, 4), (9, 1)]);
        assert_eq!(rig.stats.snapshot().discards, 1);
    }

    fn write_zeroes_reads_back_zeros(mut rig: Rig) {
        let data = fill(&mut rig);
        let segs = [
            dwz(1, 2, 0),
            dwz(8, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            dwz(15, 1, 0),
        ];
        assert_eq!(
            rig.dwz(VIRTIO_BLK_T_WRITE_ZEROES, &segs),
            (VIRTIO_BLK_S_OK, 1)
        );
        expect_zeroed(&mut rig, data, &[(1, 2), (8, 3), (15, 1)]);
        assert_eq!(rig.stats.snapshot().write_zeroes, 1);
    }

    #[test]
    fn write_zeroes_on_a_memfd_falls_back_to_punching_holes() {
        // shmem has PUNCH_HOLE but no ZERO_RANGE.
        write_zeroes_reads_back_zeros(rig());
    }

    #[test]
    fn write_zeroes_on_a_regular_file() {
        write_zeroes_reads_back_zeros(rig_with(
            tmp_file(CAPACITY * 512),
            CAPACITY,
            BlkOptions::default(),
        ));
    }

    #[test]
    fn write_zeroes_by_writing_zeros() {
        let mut rig = rig();
        rig.handler.force_write_zeros();
        write_zeroes_reads_back_zeros(rig);
    }

    #[test]
    fn writethrough_syncs_and_still_succeeds() {
        let options = BlkOptions {
            writethrough: true,
            ..BlkOptions::default()
        };
        let mut rig = rig_with(tmp_file(CAPACITY * 512), CAPACITY, options);
        let data = fill(&mut rig);
        assert_eq!(
            rig.dwz(VIRTIO_BLK_T_WRITE_ZEROES, &[dwz(0, 1, 0)]).0,
            VIRTIO_BLK_S_OK
        );
        expect_zeroed(&mut rig, data, &[(0, 1)]);
    }

    #[test]
    fn discard_and_write_zeroes_validation() {
        let mut rig = rig();
        let data = fill(&mut rig);
        let d = VIRTIO_BLK_T_DISCARD;
        let wz = VIRTIO_BLK_T_WRITE_ZEROES;
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        // §5.2.6.2: UNMAP on a discard and unknown flags are UNSUPP, even next to good segments.
        assert_eq!(
            rig.dwz(d, &[dwz(0, 1, 0), dwz(1, 1, unmap)]).0,
            VIRTIO_BLK_S_UNSUPP
        );
        assert_eq!(rig.dwz(wz, &[dwz(0, 1, 2)]).0, VIRTIO_BLK_S_UNSUPP);
        assert_eq!(rig.dwz(d, &[dwz(0, 1, 1 << 31)]).0, VIRTIO_BLK_S_UNSUPP);
        // Out of range, overflowing, too many segments: IOERR, and nothing is done (the good
        // first segment included).
        let cap = CAPACITY;
        assert_eq!(
            rig.dwz(wz, &[dwz(0, 1, 0), dwz(cap - 1, 2, 0)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            rig.dwz(wz, &[dwz(u64::MAX / 512, 1, 0)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            rig.dwz(d, &[dwz(u64::MAX, u32::MAX, 0)]).0,
            VIRTIO_BLK_S_IOERR
        );
        let too_many: Vec<[u8; 16]> = (0..33).map(|i| dwz(i % 16, 0, 0)).collect();
        assert_eq!(rig.dwz(d, &too_many).0, VIRTIO_BLK_S_IOERR);
        // No segment, or a partial one.
        assert_eq!(rig.request(d, 0, &[], &[]).0, VIRTIO_BLK_S_IOERR);
        rig.put(0x28000, &dwz(0, 1, 0));
        assert_eq!(
            rig.request(wz, 0, &[(0x28000, 15)], &[]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            rig.request(wz, 0, &[(0x28000, 17)], &[]).0,
            VIRTIO_BLK_S_IOERR
        );
        expect_zeroed(&mut rig, data, &[]);
        let s = rig.stats.snapshot();
        assert_eq!((s.unsupported, s.io_errors), (3, 7));

        // Per-segment sector limits and disabled features.
        let options = BlkOptions {
            discard: false,
            max_write_zeroes_sectors: 4,
            ..BlkOptions::default()
        };
        let mut rig = rig_with(memfd_file(CAPACITY * 512), CAPACITY, options);
        assert_eq!(rig.dwz(d, &[dwz(0, 1, 0)]).0, VIRTIO_BLK_S_UNSUPP);
        assert_eq!(rig.dwz(wz, &[dwz(0, 5, 0)]).0, VIRTIO_BLK_S_IOERR);
        assert_eq!(rig.dwz(wz, &[dwz(0, 4, 0)]).0, VIRTIO_BLK_S_OK);
        let options = BlkOptions {
            write_zeroes: false,
            ..BlkOptions::default()
        };
        let mut rig = rig_with(memfd_file(CAPACITY * 512), CAPACITY, options);
        assert_eq!(rig.dwz(wz, &[dwz(0, 1, 0)]).0, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn out_of_range_requests_are_ioerr_and_touch_nothing() {
        let mut rig = rig();
        let data = fill(&mut rig);
        // Straddling the end, starting at the end, overflowing sector·512 or sector·512 + len.
        assert_eq!(
            rig.write_sectors(CAPACITY - 1, &pattern(1024, 4)),
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            rig.write_sectors(CAPACITY, &pattern(512, 4)),
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            rig.write_sectors(u64::MAX / 256, &pattern(512, 4)),
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            rig.write_sectors(u64::MAX / 512, &pattern(512, 4)),
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(rig.image_bytes((CAPACITY - 1) * 512, 512), vec![0; 512]);
        expect_zeroed(&mut rig, data, &[]);
        for sector in [CAPACITY - 1, CAPACITY, u64::MAX / 512, u64::MAX] {
            rig.put(0x30000, &[0xee; 1024]);
            let (status, used) = rig.request(VIRTIO_BLK_T_IN, sector, &[], &[(0x30000, 1024)]);
            assert_eq!(status, VIRTIO_BLK_S_IOERR, "sector {sector}");
            // Nothing was written before the status byte, so none of it counts.
            assert_eq!(used, 0);
            assert_eq!(rig.get(0x30000, 1024), vec![0xee; 1024], "buffer untouched");
        }
        // The last sector itself is fine.
        assert_eq!(rig.read_sectors(CAPACITY - 1, 512).0, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn read_only_device_refuses_writes() {
        let options = BlkOptions {
            read_only: true,
            ..BlkOptions::default()
        };
        let file = memfd_file(CAPACITY * 512);
        file.write_all_at(&pattern(512, 8), 0).unwrap();
        let mut rig = rig_with(file, CAPACITY, options);
        assert_eq!(rig.write_sectors(0, &pattern(512, 1)), VIRTIO_BLK_S_IOERR);
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            assert_eq!(rig.dwz(kind, &[dwz(0, 1, 0)]).0, VIRTIO_BLK_S_IOERR);
        }
        assert_eq!(rig.image_bytes(0, 512), pattern(512, 8));
        assert_eq!(rig.read_sectors(0, 512), (VIRTIO_BLK_S_OK, pattern(512, 8)));
        assert_eq!(
            rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], &[]).0,
            VIRTIO_BLK_S_OK
        );
        assert_eq!(rig.stats.snapshot().io_errors, 3);
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let mut rig = rig();
        for kind in [
            2,
            3,
            5,
            VIRTIO_BLK_T_GET_LIFETIME,
            VIRTIO_BLK_T_SECURE_ERASE,
            16,
            0x8000_0000,
            u32::MAX,
        ] {
            rig.put(0x20000, &[0xaa; 16]);
            assert_eq!(
                rig.request(kind, 0, &[], &[(0x20000, 16)]),
                (VIRTIO_BLK_S_UNSUPP, 0),
                "type {kind:#x}"
            );
            assert_eq!(rig.get(0x20000, 16), vec![0xaa; 16]);
            assert_eq!(
                rig.request(kind, 0, &[], &[]),
                (VIRTIO_BLK_S_UNSUPP, 1),
                "type {kind:#x}"
            );
        }
        assert_eq!(rig.stats.snapshot().unsupported, 16);
    }

    #[test]
    fn malformed_requests_complete_with_nothing_written() {
        let mut rig = rig();
        rig.put(HDR, &header(VIRTIO_BLK_T_IN, 0));
        rig.put(STATUS, &[0xff]);
        // No writable part: no status byte.
        assert_eq!(rig.chain(&[(HDR, 16)], &[]), 0);
        // Header one byte short.
        assert_eq!(rig.chain(&[(HDR, 15)], &[(STATUS, 1)]), 0);
        assert_eq!(rig.get(STATUS, 1)[0], 0xff, "status not written");
        // No readable part at all.
        assert_eq!(rig.chain(&[], &[(0x20000, 512), (STATUS, 1)]), 0);
        // Zero-length descriptors do not count as a status byte or a header.
        assert_eq!(rig.chain(&[(HDR, 16)], &[(STATUS, 0)]), 0);
        let s = rig.stats.snapshot();
        assert_eq!((s.malformed, s.requests), (4, 0));
    }

    #[test]
    fn new_validates_capacity_and_limits() {
        let err = |r: io::Result<BlkHandler>| r.unwrap_err().kind();
        let f = || memfd_file(4096);
        assert_eq!(
            err(BlkHandler::new(f(), u64::MAX, BlkOptions::default())),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            err(BlkHandler::new(f(), 1 << 55, BlkOptions::default())),
            io::ErrorKind::InvalidInput
        );
        for (d, w) in [(0, 1), (1, 0), (MAX_DWZ_SEGMENTS + 1, 1)] {
            let options = BlkOptions {
                max_discard_seg: d,
                max_write_zeroes_seg: w,
                ..BlkOptions::default()
            };
            assert_eq!(
                err(BlkHandler::new(f(), 8, options)),
                io::ErrorKind::InvalidInput
            );
        }
        let h = BlkHandler::new(f(), (1 << 54) - 1, BlkOptions::default()).unwrap();
        assert_eq!(h.capacity(), (1 << 54) - 1);
        assert_eq!(capacity_of(&memfd_file(4096 + 100)).unwrap(), 8);
        fn is_send<T: Send>() {}
        is_send::<BlkHandler>();
    }

    // --- asynchronous engines, direct I/O -------------------------------------------------

    fn aio_modes() -> Vec<AioMode> {
        let mut modes = vec![AioMode::Threads];
        if crate::worker::aio::io_uring_available().is_ok() {
            modes.push(AioMode::IoUring);
        }
        modes
    }

    fn aio_options(aio: AioMode) -> BlkOptions {
        BlkOptions {
            aio,
            queue_depth: 8,
            ..BlkOptions::default()
        }
    }

    #[test]
    fn async_engines_read_write_flush_and_zero_fill_a_short_file() {
        for aio in aio_modes() {
            for writethrough in [false, true] {
                let options = BlkOptions {
                    writethrough,
                    ..aio_options(aio)
                };
                // 1000 bytes of a file that claims 8 sectors: reads past its end are zeros.
                let file = tmp_file(1000);
                file.write_all_at(&pattern(1000, 9), 0).unwrap();
                let mut rig = rig_with(file, 8, options);
                assert_eq!(rig.handler.max_in_flight(), 8);
                let (status, back) = rig.read_sectors(0, 4096);
                assert_eq!(status, VIRTIO_BLK_S_OK, "{aio:?}");
                assert_eq!(&back[..1000], &pattern(1000, 9)[..]);
                assert!(back[1000..].iter().all(|&b| b == 0));
                let data = pattern(2048, 4);
                assert_eq!(rig.write_sectors(2, &data), VIRTIO_BLK_S_OK);
                assert_eq!(rig.image_bytes(1024, 2048), data);
                assert_eq!(rig.read_sectors(2, 2048), (VIRTIO_BLK_S_OK, data));
                assert_eq!(
                    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], &[]),
                    (VIRTIO_BLK_S_OK, 1)
                );
                // Past the end: IOERR without I/O.
                assert_eq!(rig.write_sectors(8, &pattern(512, 1)), VIRTIO_BLK_S_IOERR);
                let s = rig.stats.snapshot();
                assert_eq!(s.async_requests, 4, "{aio:?}");
                assert_eq!((s.flushes, s.io_errors), (1, 1));
            }
        }
    }

    #[test]
    fn async_engine_completes_many_requests_out_of_order() {
        for aio in aio_modes() {
            let mut rig = rig_with(tmp_file(CAPACITY * 512), CAPACITY, aio_options(aio));
            // 8 writes of one sector each, all submitted before any is reaped.
            let memory = rig.dev.memory().unwrap().clone();
            let mut heads = Vec::new();
            for i in 0..8u64 {
                let hdr = 0x20000 + 0x100 * i;
                let data = 0x30000 + 0x200 * i;
                let status = 0x28000 + i;
                rig.put(hdr, &header(VIRTIO_BLK_T_OUT, i));
                rig.put(data, &pattern(512, i as u8));
                heads.push(
                    rig.drv
                        .add_chain(&[(hdr, 16), (data, 512)], &[(status, 1)])
                        .unwrap(),
                );
            }
            rig.drv.publish().unwrap();
            rig.batch.clear();
            assert_eq!(rig.dev.pop_batch(&mut rig.batch, 16).unwrap(), 8);
            for chain in rig.batch.iter() {
                assert_eq!(rig.handler.submit(&memory, chain), Submitted::Pending);
            }
            // The engine is full: a ninth request would be done on the worker thread.
            assert!(rig.handler.free.is_empty());
            rig.handler.flush_batch();
            let mut done = Vec::new();
            while done.len() < 8 {
                rig.handler.reap(&mut done, true);
            }
            let mut got: Vec<u16> = done.iter().map(|&(h, _)| h).collect();
            got.sort_unstable();
            assert_eq!(got, heads);
            assert!(done.iter().all(|&(_, len)| len == 1));
            for i in 0..8u64 {
                assert_eq!(rig.get(0x28000 + i, 1)[0], VIRTIO_BLK_S_OK);
                assert_eq!(rig.image_bytes(512 * i, 512), pattern(512, i as u8));
            }
            assert_eq!(rig.handler.free.len(), 8);
        }
    }

    /// An unlinked file on the temp dir opened with O_DIRECT, or None where the file system
    /// refuses it.
    fn direct_file(size: u64) -> Option<File> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!(
            "vvu-blk-direct-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        let _ = std::fs::remove_file(&path);
        let file = file.ok()?;
        file.set_len(size).unwrap();
        Some(file)
    }

    #[test]
    fn direct_io_bounces_unaligned_buffers_and_refuses_unaligned_offsets() {
        let Some(probe_file) = direct_file(4096) else {
            eprintln!("no O_DIRECT on the temp dir; skipped");
            return;
        };
        let g = probe(&probe_file).unwrap();
        assert!(g.direct && !g.block_device);
        assert!(g.dio_offset_align >= 1 && g.dio_memory_align >= 1);
        let align = u64::from(g.dio_offset_align);
        for aio in [AioMode::Sync].into_iter().chain(aio_modes()) {
            let mut rig = rig_with(direct_file(64 * 4096).unwrap(), 64 * 8, aio_options(aio));
            let data = pattern(4096, 7);
            // Guest buffer at an odd address: bounced, written, read back (bounced again).
            let odd = 0x30001;
            rig.put(HDR, &header(VIRTIO_BLK_T_OUT, 8));
            rig.put(odd, &data);
            assert_eq!(rig.chain(&[(HDR, 16), (odd, 4096)], &[(STATUS, 1)]), 1);
            assert_eq!(rig.get(STATUS, 1)[0], VIRTIO_BLK_S_OK, "{aio:?}");
            assert_eq!(rig.image_bytes(8 * 512, 4096), data);
            rig.put(HDR, &header(VIRTIO_BLK_T_IN, 8));
            rig.put(0x38003, &[0xaa; 4096]);
            assert_eq!(
                rig.chain(&[(HDR, 16)], &[(0x38003, 4096), (STATUS, 1)]),
                4097
            );
            assert_eq!(rig.get(0x38003, 4096), data);
            assert_eq!(rig.stats.snapshot().bounced, 2);
            // Aligned buffers go straight through.
            let (status, back) = rig.read_sectors(8, 4096);
            assert_eq!((status, back), (VIRTIO_BLK_S_OK, data.clone()));
            assert_eq!(
                rig.stats.snapshot().bounced,
                2,
                "{aio:?}: aligned buffers bounced"
            );
            if align > 512 {
                // An offset the file system cannot do directly: IOERR, counted, nothing moved.
                assert_eq!(rig.write_sectors(1, &pattern(512, 1)), VIRTIO_BLK_S_IOERR);
                assert_eq!(rig.stats.snapshot().unaligned, 1);
            }
            // Write-zeroes works on an O_DIRECT fd too (fallocate or aligned zeros).
            assert_eq!(
                rig.dwz(VIRTIO_BLK_T_WRITE_ZEROES, &[dwz(8, 8, 0)]),
                (VIRTIO_BLK_S_OK, 1)
            );
            assert_eq!(rig.read_sectors(8, 4096).1, vec![0; 4096]);
        }
    }

    #[test]
    fn engine_errors_become_ioerr() {
        for aio in aio_modes() {
            // A read-only fd: every write fails in the engine (EBADF), reads still work.
            let file = tmp_file(CAPACITY * 512);
            let path = format!("/proc/self/fd/{}", file.as_raw_fd());
            let ro = File::open(path).unwrap();
            let mut rig = rig_with(ro, CAPACITY, aio_options(aio));
            assert_eq!(rig.write_sectors(0, &pattern(512, 1)), VIRTIO_BLK_S_IOERR);
            assert_eq!(rig.read_sectors(0, 512).0, VIRTIO_BLK_S_OK);
            let s = rig.stats.snapshot();
            assert_eq!((s.io_errors, s.bytes_written), (1, 0), "{aio:?}");
        }
    }
}

#[cfg(test)]
mod inline_tests {
    use super::*;

    #[test]
    fn memory_backed_files_run_inline_others_try_nowait_direct_never() {
        let memfd = File::from(crate::memory::create_memfd("inline", 4096).unwrap());
        assert_eq!(inline_policy(&memfd, false), Inline::Always);
        let regular = File::open("/proc/self/exe").unwrap();
        // /proc/self/exe lives on the root file system, which is not memory-backed here
        // (overlay or ext4); a tmpfs root would make this Always, which is right too.
        assert_ne!(inline_policy(&regular, true), Inline::TryNowait);
        let options = BlkOptions {
            aio: AioMode::Threads,
            ..BlkOptions::default()
        };
        let handler = BlkHandler::new(memfd, 8, options).unwrap();
        assert_eq!(handler.inline, Inline::Always);
        assert_eq!(
            handler.max_in_flight(),
            0,
            "no engine for a memory-backed file"
        );
    }
}
