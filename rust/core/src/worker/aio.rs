//! Asynchronous file I/O engines for asynchronous [`ChainHandler`](super::ChainHandler)s.
//!
//! An [`Aio`] takes vectored reads, writes and `fdatasync`s tagged with a `u64`, issues them
//! in batches and hands back `(tag, result)` pairs in completion order ([`Aio::reap`]), the
//! result being what the syscall returns (bytes moved, or `-errno`). Its [`Aio::fd`] is readable
//! while completions wait, which is what
//! [`ChainHandler::completion_fd`](super::ChainHandler::completion_fd) needs.
//!
//! **When operations are issued.** After each [`Aio::push`], the caller calls
//! [`Aio::submit_if_due`], which issues what is queued as soon as that is at least as many
//! operations as the engine already has in flight, but at least 1 and at most 8, while fewer than
//! 16 are in flight; [`Aio::submit`] (once per worker batch) issues the rest. An idle engine
//! therefore issues the first request of a batch at once, then groups of 1, 2, 4, 8 while it
//! prepares the others, and the rest at the end: the device starts on the first request instead
//! of waiting until the whole batch is prepared (one `io_uring_enter` for 32 direct writes holds
//! them all in a block plug for ~100 µs on this machine's disk, with the device idle), and a
//! batch of 32 costs 6 submissions instead of 32. An engine that already has 16 or more in
//! flight (a saturated device) issues once per batch, as before. Measured in
//! `benches/RESULTS.md` ("Early submission").
//!
//! Two engines:
//!
//! - [`AioMode::IoUring`]: one io_uring per queue (the `io-uring` crate). Reads and writes are
//!   `IORING_OP_READV`/`WRITEV` straight on the guest's iovecs, a flush is `IORING_OP_FSYNC` with
//!   `IORING_FSYNC_DATASYNC`. The ring fd itself is the completion fd.
//! - [`AioMode::Threads`]: a small pool of threads doing `preadv`/`pwritev2`/`fdatasync`,
//!   completing through a shared list and an eventfd; for kernels where io_uring is missing or
//!   forbidden (seccomp, `kernel.io_uring_disabled`).
//!
//! The caller bounds the number of operations in flight (at most the depth given to
//! [`Aio::new`]); the engine never queues more than that.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring};

use super::lock;
use crate::notify::EventFd;

/// How a block back-end does its I/O (`--aio`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioMode {
    /// io_uring, many requests in flight per queue.
    IoUring,
    /// A thread pool running the blocking calls, many requests in flight per queue.
    Threads,
    /// Blocking calls on the worker thread: one request at a time per queue.
    Sync,
}

impl AioMode {
    /// Parse `io_uring`, `threads` or `sync`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "io_uring" => Some(Self::IoUring),
            "threads" => Some(Self::Threads),
            "sync" => Some(Self::Sync),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::IoUring => "io_uring",
            Self::Threads => "threads",
            Self::Sync => "sync",
        }
    }
}

/// Whether this process may set up an io_uring (the kernel has it and nothing forbids it).
pub fn io_uring_available() -> io::Result<()> {
    IoUring::new(2).map(drop)
}

/// One operation. The iovec array and the buffers it describes must stay valid until the
/// operation's completion was reaped (the caller's contract on [`Aio::push`]).
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Readv {
        fd: RawFd,
        iov: *const libc::iovec,
        count: u32,
        offset: u64,
    },
    /// With `dsync`, the write is durable when it completes (`RWF_DSYNC`: a FUA write on a
    /// device that has FUA, a write plus a cache flush otherwise).
    Writev {
        fd: RawFd,
        iov: *const libc::iovec,
        count: u32,
        offset: u64,
        dsync: bool,
    },
    Fdatasync {
        fd: RawFd,
    },
}

// SAFETY: the pointers are plain data handed to the kernel (or a pool thread); their validity is
// the contract of `Aio::push`, independent of the thread.
unsafe impl Send for Op {}

/// An asynchronous engine; see the module docs.
pub struct Aio {
    engine: Engine,
    /// Pushed and not issued yet.
    queued: usize,
    /// Issued and not reaped yet.
    issued: usize,
}

/// [`Aio::submit_if_due`] never holds back more than this many operations: once that many are
/// prepared, keeping them longer only delays them (a block plug dispatches a group only after
/// all of it was prepared, ~3.5 µs per direct write here). Measured against 4, 1 (one
/// submission per request, as qemu-storage-daemon and fio do) and no limit: `benches/RESULTS.md`,
/// "Early submission".
const ISSUE_GROUP_MAX: usize = 8;

/// [`Aio::submit_if_due`] issues early only while fewer operations than this are in flight:
/// beyond, the device has work for longer than the rest of a batch takes to prepare, and early
/// submissions would only add syscalls and, as completions spread out, wake-ups (measured on
/// two queues at QD 32, where the disk is saturated: `benches/RESULTS.md`, "Early submission").
const ISSUE_EARLY_BELOW: usize = 16;

enum Engine {
    Uring(Box<IoUring>),
    Threads(Pool),
}

impl std::fmt::Debug for Aio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aio").field("mode", &self.mode()).finish()
    }
}

impl Aio {
    /// An engine for at most `depth` operations in flight. `Sync` is refused (`InvalidInput`);
    /// `IoUring` fails with the kernel's error where io_uring is not allowed.
    pub fn new(mode: AioMode, depth: usize) -> io::Result<Self> {
        let depth = depth.clamp(1, 4096);
        let engine = match mode {
            AioMode::IoUring => {
                // The SQ is never overfilled: at most `depth` operations are pushed between
                // submits and at most `depth` are in flight, so the CQ (twice the SQ) never
                // overflows either.
                let ring = IoUring::new(depth.next_power_of_two() as u32)?;
                Engine::Uring(Box::new(ring))
            }
            AioMode::Threads => Engine::Threads(Pool::new(depth.min(8))?),
            AioMode::Sync => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the sync mode has no asynchronous engine",
                ))
            }
        };
        Ok(Self {
            engine,
            queued: 0,
            issued: 0,
        })
    }

    pub fn mode(&self) -> AioMode {
        match self.engine {
            Engine::Uring(_) => AioMode::IoUring,
            Engine::Threads(_) => AioMode::Threads,
        }
    }

    /// Queue `op` tagged `tag`; it is issued by [`Aio::submit_if_due`] or [`Aio::submit`]. An
    /// error means `op` was not queued.
    ///
    /// # Safety
    /// The iovecs and the memory they describe must stay valid (for writing, for a read) until
    /// the completion tagged `tag` was returned by [`Aio::reap`], and at most `depth`
    /// operations may be in flight.
    pub unsafe fn push(&mut self, op: Op, tag: u64) -> io::Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.queue(op, tag) }?;
        self.queued += 1;
        Ok(())
    }

    /// Issue what is queued if it is at least as much as is in flight (at least one operation,
    /// at most [`ISSUE_GROUP_MAX`]) and fewer than [`ISSUE_EARLY_BELOW`] are in flight; see the
    /// module docs. An error is [`Aio::submit`]'s.
    pub fn submit_if_due(&mut self) -> io::Result<()> {
        if self.issued < ISSUE_EARLY_BELOW && self.queued >= self.issued.clamp(1, ISSUE_GROUP_MAX) {
            self.submit()
        } else {
            Ok(())
        }
    }

    /// Put `op` in the engine's queue without issuing it.
    ///
    /// # Safety
    /// As for [`Aio::push`].
    unsafe fn queue(&mut self, op: Op, tag: u64) -> io::Result<()> {
        match &mut self.engine {
            Engine::Uring(ring) => {
                let entry = match op {
                    Op::Readv {
                        fd,
                        iov,
                        count,
                        offset,
                    } => opcode::Readv::new(types::Fd(fd), iov, count)
                        .offset(offset)
                        .build(),
                    Op::Writev {
                        fd,
                        iov,
                        count,
                        offset,
                        dsync,
                    } => opcode::Writev::new(types::Fd(fd), iov, count)
                        .offset(offset)
                        .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                        .build(),
                    Op::Fdatasync { fd } => opcode::Fsync::new(types::Fd(fd))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                };
                let entry = entry.user_data(tag);
                // SAFETY: the entry's buffers are valid until reaped (the caller's contract).
                if unsafe { ring.submission().push(&entry) }.is_err() {
                    // Only a full SQ: submit what is queued and retry once.
                    ring.submit()?;
                    // SAFETY: as above.
                    unsafe { ring.submission().push(&entry) }
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                }
                Ok(())
            }
            Engine::Threads(pool) => {
                pool.push(op, tag);
                Ok(())
            }
        }
    }

    /// Issue everything queued and not issued yet (a no-op if nothing is).
    pub fn submit(&mut self) -> io::Result<()> {
        if self.queued == 0 {
            return Ok(());
        }
        // Counted as issued even when the kernel is short of resources (EBUSY below): those
        // entries go with the next submission or wait, and the count only steers when to issue.
        self.issued += std::mem::take(&mut self.queued);
        match &mut self.engine {
            Engine::Uring(ring) => loop {
                match ring.submit() {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // The kernel is out of resources for now: the SQEs stay queued for the next
                    // submit (or the wait in reap).
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                    Err(e) => return Err(e),
                }
            },
            Engine::Threads(pool) => {
                pool.wake();
                Ok(())
            }
        }
    }

    /// Append finished operations as `(tag, result)`; with `wait`, block until there is at
    /// least one (the caller must have one in flight).
    pub fn reap(&mut self, out: &mut Vec<(u64, i64)>, wait: bool) -> io::Result<()> {
        let before = out.len();
        let result = self.reap_engine(out, wait);
        self.issued = self.issued.saturating_sub(out.len() - before);
        result
    }

    fn reap_engine(&mut self, out: &mut Vec<(u64, i64)>, wait: bool) -> io::Result<()> {
        match &mut self.engine {
            Engine::Uring(ring) => {
                let before = out.len();
                loop {
                    out.extend(
                        ring.completion()
                            .map(|cqe| (cqe.user_data(), i64::from(cqe.result()))),
                    );
                    if !wait || out.len() > before {
                        return Ok(());
                    }
                    match ring.submit_and_wait(1) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Engine::Threads(pool) => pool.reap(out, wait),
        }
    }

    /// Whether completions wait to be reaped (no syscall for io_uring: its completion queue
    /// is shared memory).
    pub fn ready(&mut self) -> bool {
        match &mut self.engine {
            Engine::Uring(ring) => !ring.completion().is_empty(),
            Engine::Threads(pool) => !lock(&pool.shared.done).is_empty(),
        }
    }

    /// Readable while completions wait to be reaped (level-triggered).
    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.engine {
            Engine::Uring(ring) => {
                // SAFETY: the ring's fd lives as long as the ring, which outlives the borrow.
                unsafe { BorrowedFd::borrow_raw(ring.as_raw_fd()) }
            }
            Engine::Threads(pool) => pool.shared.ready.as_fd(),
        }
    }
}

struct PoolShared {
    jobs: Mutex<PoolJobs>,
    job_ready: Condvar,
    done: Mutex<Vec<(u64, i64)>>,
    /// Signalled when `done` becomes non-empty; consumed by `reap`.
    ready: EventFd,
    done_changed: Condvar,
}

struct PoolJobs {
    queue: VecDeque<(Op, u64)>,
    shutdown: bool,
}

/// The thread-pool engine.
struct Pool {
    shared: Arc<PoolShared>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(threads: usize) -> io::Result<Self> {
        let shared = Arc::new(PoolShared {
            jobs: Mutex::new(PoolJobs {
                queue: VecDeque::new(),
                shutdown: false,
            }),
            job_ready: Condvar::new(),
            done: Mutex::new(Vec::new()),
            ready: EventFd::new()?,
            done_changed: Condvar::new(),
        });
        let mut pool = Self {
            shared,
            threads: Vec::new(),
        };
        for i in 0..threads {
            let shared = Arc::clone(&pool.shared);
            let thread = std::thread::Builder::new()
                .name(format!("vvu-aio-{i}"))
                .spawn(move || pool_thread(&shared))?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    fn push(&mut self, op: Op, tag: u64) {
        lock(&self.shared.jobs).queue.push_back((op, tag));
    }

    fn wake(&self) {
        self.shared.job_ready.notify_all();
    }

    fn reap(&mut self, out: &mut Vec<(u64, i64)>, wait: bool) -> io::Result<()> {
        // Consume the doorbell first: a completion added after it re-arms it.
        let _ = self.shared.ready.consume();
        let mut done = lock(&self.shared.done);
        while wait && done.is_empty() {
            done = self
                .shared
                .done_changed
                .wait(done)
                .unwrap_or_else(|e| e.into_inner());
        }
        out.append(&mut done);
        Ok(())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        lock(&self.shared.jobs).shutdown = true;
        self.shared.job_ready.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn pool_thread(shared: &PoolShared) {
    loop {
        let (op, tag) = {
            let mut jobs = lock(&shared.jobs);
            loop {
                if let Some(job) = jobs.queue.pop_front() {
                    break job;
                }
                if jobs.shutdown {
                    return;
                }
                jobs = shared
                    .job_ready
                    .wait(jobs)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        let result = run_blocking(op);
        let mut done = lock(&shared.done);
        done.push((tag, result));
        drop(done);
        shared.done_changed.notify_all();
        // A failing doorbell only delays the worker until its next wake-up.
        let _ = shared.ready.signal();
    }
}

/// One operation as a blocking syscall; the result as io_uring would report it.
fn run_blocking(op: Op) -> i64 {
    let r = match op {
        Op::Readv {
            fd,
            iov,
            count,
            offset,
        } => {
            // SAFETY: the iovecs are valid until reaped (contract of `Aio::push`).
            unsafe { libc::preadv(fd, iov, count as libc::c_int, offset as libc::off_t) as i64 }
        }
        Op::Writev {
            fd,
            iov,
            count,
            offset,
            dsync,
        } => {
            let flags = if dsync { libc::RWF_DSYNC } else { 0 };
            // SAFETY: as above; pwritev2 only reads the buffers.
            unsafe {
                libc::pwritev2(fd, iov, count as libc::c_int, offset as libc::off_t, flags) as i64
            }
        }
        // SAFETY: fdatasync on an fd has no memory-safety preconditions.
        Op::Fdatasync { fd } => i64::from(unsafe { libc::fdatasync(fd) }),
    };
    if r < 0 {
        -i64::from(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file(len: u64) -> std::fs::File {
        let f = tempfile();
        f.set_len(len).unwrap();
        f
    }

    fn tempfile() -> std::fs::File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "vvu-aio-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn round_trip(mode: AioMode) {
        let f = file(1 << 20);
        let mut aio = Aio::new(mode, 16).unwrap();
        assert_eq!(aio.mode(), mode);
        let bufs: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i; 4096]).collect();
        let iovs: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            })
            .collect();
        for (i, iov) in iovs.iter().enumerate() {
            let op = Op::Writev {
                fd: f.as_raw_fd(),
                iov,
                count: 1,
                offset: 4096 * i as u64,
                dsync: i % 2 == 0,
            };
            // SAFETY: the buffers outlive the reaps below.
            unsafe { aio.push(op, i as u64) }.unwrap();
        }
        aio.submit().unwrap();
        let mut out = Vec::new();
        while out.len() < 16 {
            aio.reap(&mut out, true).unwrap();
        }
        let mut tags: Vec<u64> = out.iter().map(|&(t, _)| t).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..16).collect::<Vec<_>>());
        assert!(out.iter().all(|&(_, r)| r == 4096));
        let mut back = [0u8; 4096];
        f.read_exact_at(&mut back, 4096 * 7).unwrap();
        assert!(back.iter().all(|&b| b == 7));
        // A flush, and an error: a read from a bad fd.
        // SAFETY: no buffers.
        unsafe { aio.push(Op::Fdatasync { fd: f.as_raw_fd() }, 100) }.unwrap();
        let iov = iovs[0];
        // SAFETY: the buffer outlives the reap.
        unsafe {
            aio.push(
                Op::Readv {
                    fd: -1,
                    iov: &iov,
                    count: 1,
                    offset: 0,
                },
                101,
            )
        }
        .unwrap();
        aio.submit().unwrap();
        out.clear();
        while out.len() < 2 {
            aio.reap(&mut out, true).unwrap();
        }
        out.sort_unstable();
        assert_eq!(out, vec![(100, 0), (101, -i64::from(libc::EBADF))]);
    }

    #[test]
    fn io_uring_round_trip() {
        if io_uring_available().is_err() {
            eprintln!("io_uring not available here; skipped");
            return;
        }
        round_trip(AioMode::IoUring);
    }

    #[test]
    fn threads_round_trip() {
        round_trip(AioMode::Threads);
    }

    /// An idle engine issues the first operation at once; later ones wait until as many are
    /// queued as are in flight, at most 8 (groups of 1, 1, 2, 4, 8), and from 16 in flight on
    /// only `submit` issues.
    fn issues_early(mode: AioMode) {
        let f = file(1 << 20);
        let mut aio = Aio::new(mode, 32).unwrap();
        let buf = vec![7u8; 4096];
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut _,
            iov_len: buf.len(),
        };
        let push = |aio: &mut Aio, i: u64| {
            let op = Op::Writev {
                fd: f.as_raw_fd(),
                iov: &iov,
                count: 1,
                offset: 4096 * i,
                dsync: false,
            };
            // SAFETY: `buf` and `iov` outlive every reap below; at most 25 in flight.
            unsafe { aio.push(op, i) }.unwrap();
            aio.submit_if_due().unwrap();
            (aio.queued, aio.issued)
        };
        assert_eq!(
            push(&mut aio, 0),
            (0, 1),
            "{mode:?}: the first one goes at once"
        );
        // Issued without `submit` or a waiting `reap`: its completion shows up by itself.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !aio.ready() {
            assert!(
                std::time::Instant::now() < deadline,
                "{mode:?}: never issued"
            );
            std::thread::yield_now();
        }
        // Not reaped, so still counted in flight: then 1, 2, 4 and 8 (not 16, the group limit)
        // go early; with 16 in flight nothing does any more.
        let mut expected = vec![(0, 2), (1, 2), (0, 4)];
        for issued in [4, 8] {
            expected.extend((1..issued).map(|queued| (queued, issued)));
            expected.push((0, issued * 2));
        }
        expected.extend((1..=9).map(|queued| (queued, 16)));
        for (i, want) in (1..).zip(expected) {
            assert_eq!(push(&mut aio, i), want, "{mode:?}: push {i}");
        }
        aio.submit().unwrap();
        assert_eq!((aio.queued, aio.issued), (0, 25), "{mode:?}");
        let mut out = Vec::new();
        while out.len() < 25 {
            aio.reap(&mut out, true).unwrap();
        }
        assert_eq!((aio.queued, aio.issued), (0, 0), "{mode:?}");
        assert!(out.iter().all(|&(_, r)| r == 4096), "{mode:?}: {out:?}");
    }

    #[test]
    fn io_uring_issues_early() {
        if io_uring_available().is_err() {
            eprintln!("io_uring not available here; skipped");
            return;
        }
        issues_early(AioMode::IoUring);
    }

    #[test]
    fn threads_issue_early() {
        issues_early(AioMode::Threads);
    }

    #[test]
    fn sync_has_no_engine() {
        assert!(Aio::new(AioMode::Sync, 4).is_err());
        assert_eq!(AioMode::parse("io_uring"), Some(AioMode::IoUring));
        assert_eq!(AioMode::parse("bogus"), None);
    }
}
