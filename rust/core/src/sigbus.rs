//! Mappings that cannot SIGBUS us.
//!
//! Touching a `MAP_SHARED` mapping past the end of its file raises SIGBUS, and a front-end can
//! shrink its file (`ftruncate`) at any time after handing it to us. Seals stop that where the
//! file allows them (see `docs/architecture.md`, "Memory a peer cannot pull away"); for what seals
//! cannot cover (files on tmpfs or hugetlbfs, memfds sealed against further seals, hugetlb pool
//! exhaustion) this module turns the fault into an error of the one mapping it hit:
//!
//! - every mapping of a peer's fd is [`register`]ed in a lock-free table of address ranges;
//! - the SIGBUS handler looks the faulting address up in that table. Inside a registered range it
//!   marks the mapping *poisoned*, maps anonymous zero pages over the **whole** mapping
//!   (`MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS`) and returns: the faulting instruction runs again
//!   and completes on a zero page. No `longjmp`, so no Rust frame is ever skipped;
//! - accessors check the poison flag after they copied ([`faults`] is the fast path: one relaxed
//!   load that stays 0 until the first fault in the process) and fail with
//!   [`MemoryError::Poisoned`], so the queue breaks and its session is torn down while every other
//!   session carries on. Each handled fault also increments the counter behind [`fault_fd`], an
//!   eventfd a control plane can watch to learn about the fault at once;
//! - a fault anywhere else (or a SIGBUS sent with `kill`) goes to the handler that was installed
//!   before ours (Python's `faulthandler`, for example) or to the default action (core dump).
//!
//! The handler uses only atomics and async-signal-safe system calls (`mmap`, `write`,
//! `sigaction`, `raise`): no allocation, no lock. A slot is never released while a handler is
//! using it (a per-slot count of handlers inside), so the handler can never map zero pages over an
//! address range that has meanwhile been unmapped and reused.
//!
//! Installation: the Python module calls [`init`] at import (handler and eventfd); then
//! [`ensure_installed`] runs on every mapping (it is one `sigaction` query when the
//! handler is already in place). If another handler replaced ours since (for instance
//! `faulthandler.enable()` after the first mapping), ours is put back in front of it and chains
//! to it. Until that next mapping, a fault in guest memory reaches the other handler first.

use std::cell::UnsafeCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::error::MemoryError;

const CHUNK: usize = 256;
const CHUNKS: usize = 64;
/// Most mappings registered at once (vfio-user allows 8192 DMA windows per client).
pub const MAX_MAPPINGS: usize = CHUNK * CHUNKS;

/// The slot holds a live mapping (new handlers may enter).
const ACTIVE: u32 = 1 << 31;
/// The slot is being filled in by `register`.
const CLAIMED: u32 = 1 << 30;
/// Handlers currently inside the slot.
const INSIDE: u32 = CLAIMED - 1;

struct Slot {
    state: AtomicU32,
    start: AtomicUsize,
    len: AtomicUsize,
    poisoned: AtomicBool,
}

impl Slot {
    const fn new() -> Self {
        Self {
            state: AtomicU32::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
        }
    }

    /// Enter the slot if it holds a live mapping (handler side).
    fn enter(&self) -> bool {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            if state & ACTIVE == 0 || state & INSIDE == INSIDE {
                return false;
            }
            match self.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => state = now,
            }
        }
    }

    fn leave(&self) {
        self.state.fetch_sub(1, Ordering::Release);
    }
}

/// Lazily allocated chunks of slots; a chunk, once published, lives until the process exits.
static TABLE: [AtomicPtr<[Slot; CHUNK]>; CHUNKS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; CHUNKS];
/// Faults handled inside registered mappings, since the process started.
static FAULTS: AtomicU64 = AtomicU64::new(0);
/// The eventfd the handler signals (-1 until [`fault_fd`] is first called).
static FAULT_EVENTFD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// The SIGBUS disposition that was in place before ours (what unrelated faults are handed to).
struct Previous(UnsafeCell<libc::sigaction>);
// SAFETY: written only under `INSTALL` while our handler is not the installed one (so no handler
// of ours reads it at that moment); read by the handler otherwise.
unsafe impl Sync for Previous {}
// SAFETY: an all-zero sigaction is SIG_DFL with no flags: a valid value.
static PREVIOUS: Previous = Previous(UnsafeCell::new(unsafe { std::mem::zeroed() }));
static INSTALL: Mutex<()> = Mutex::new(());

fn chunk(index: usize) -> Option<&'static [Slot; CHUNK]> {
    let ptr = TABLE[index].load(Ordering::Acquire);
    // SAFETY: a non-null chunk pointer was published with Release after the chunk was fully
    // initialised, and chunks are never freed.
    (!ptr.is_null()).then(|| unsafe { &*ptr })
}

fn chunk_or_create(index: usize) -> &'static [Slot; CHUNK] {
    if let Some(chunk) = chunk(index) {
        return chunk;
    }
    let fresh = Box::into_raw(Box::new([const { Slot::new() }; CHUNK]));
    match TABLE[index].compare_exchange(
        std::ptr::null_mut(),
        fresh,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        // SAFETY: we just published `fresh`, which is never freed.
        Ok(_) => unsafe { &*fresh },
        Err(existing) => {
            // SAFETY: `fresh` was never published; we still own it.
            drop(unsafe { Box::from_raw(fresh) });
            // SAFETY: published by another thread, never freed.
            unsafe { &*existing }
        }
    }
}

/// A registered mapping. Dropping it unregisters the range (call before `munmap`).
pub struct Registration {
    slot: &'static Slot,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Registration({:#x}+{:#x}{})",
            self.slot.start.load(Ordering::Relaxed),
            self.slot.len.load(Ordering::Relaxed),
            if self.poisoned() { ", poisoned" } else { "" }
        )
    }
}

impl Registration {
    /// Whether a SIGBUS hit this mapping (its content is now zero pages, not the peer's memory).
    #[inline]
    pub fn poisoned(&self) -> bool {
        // Fast path: no fault in the whole process so far.
        FAULTS.load(Ordering::Acquire) != 0 && self.slot.poisoned.load(Ordering::Acquire)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // No new handler enters once ACTIVE is gone; wait for those inside to leave, so the range
        // is never remapped by a handler after our caller unmaps it.
        self.slot.state.fetch_and(!ACTIVE, Ordering::AcqRel);
        while self.slot.state.load(Ordering::Acquire) & INSIDE != 0 {
            std::hint::spin_loop();
        }
        self.slot.state.store(0, Ordering::Release);
    }
}

/// Register the mapping `[start, start + len)`: a SIGBUS inside it poisons it instead of killing
/// the process. `len` must cover whole pages of the mapping's page size (huge pages included),
/// since the handler replaces exactly this range.
pub fn register(start: usize, len: usize) -> Result<Registration, MemoryError> {
    ensure_installed()?;
    for index in 0..CHUNKS {
        let chunk = chunk_or_create(index);
        for slot in chunk.iter() {
            if slot
                .state
                .compare_exchange(0, CLAIMED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.start.store(start, Ordering::Relaxed);
                slot.len.store(len, Ordering::Relaxed);
                slot.poisoned.store(false, Ordering::Relaxed);
                // Release: a handler that sees ACTIVE sees the range too.
                slot.state.store(ACTIVE, Ordering::Release);
                return Ok(Registration { slot });
            }
        }
    }
    Err(MemoryError::Map(format!(
        "more than {MAX_MAPPINGS} mappings at once"
    )))
}

/// How many faults inside registered mappings were handled since the process started.
#[inline]
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

/// Install the handler and create the fault eventfd now (the Python module does it at import,
/// so the process-wide eventfd exists before anyone counts its fds).
pub fn init() -> std::io::Result<()> {
    ensure_installed().map_err(std::io::Error::other)?;
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    fault_eventfd().map(|_| ())
}

/// An eventfd (non-blocking, close-on-exec) whose counter the handler increments on every fault
/// it handles; the same fd for the whole process (this returns a duplicate each time).
pub fn fault_fd() -> std::io::Result<OwnedFd> {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let fd = fault_eventfd()?;
    // SAFETY: `fd` is our open eventfd, never closed.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fcntl returned a fresh fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// The process-wide fault eventfd, created on first use (call under `INSTALL`).
fn fault_eventfd() -> std::io::Result<libc::c_int> {
    let mut fd = FAULT_EVENTFD.load(Ordering::Acquire);
    if fd < 0 {
        // SAFETY: plain syscall, no pointers.
        fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        FAULT_EVENTFD.store(fd, Ordering::Release);
    }
    Ok(fd)
}

fn our_handler() -> usize {
    on_sigbus as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize
}

/// Install the SIGBUS handler unless it is already the current one (see the module docs).
pub fn ensure_installed() -> Result<(), MemoryError> {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // Allocate the first chunk outside any signal context.
        chunk_or_create(0);
    });
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: all-zero is a valid sigaction; sigaction only writes into it.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: querying the disposition; `current` is a valid out-pointer.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current) } != 0 {
        return Err(MemoryError::Map(format!(
            "sigaction(SIGBUS): {}",
            std::io::Error::last_os_error()
        )));
    }
    if current.sa_sigaction == our_handler() {
        return Ok(());
    }
    // SAFETY: our handler is not installed, so no handler of ours reads PREVIOUS now; INSTALL
    // serialises writers.
    unsafe { *PREVIOUS.0.get() = current };
    // SAFETY: all-zero is a valid sigaction, filled in below.
    let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
    ours.sa_sigaction = our_handler();
    // SA_ONSTACK: run on an alternate stack where one is set up (faulthandler does).
    ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
    // SAFETY: `ours` is a valid sigaction; the old one is already saved.
    unsafe {
        libc::sigemptyset(&mut ours.sa_mask);
        if libc::sigaction(libc::SIGBUS, &ours, std::ptr::null_mut()) != 0 {
            return Err(MemoryError::Map(format!(
                "sigaction(SIGBUS): {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// The slot whose range holds `addr`, entered (the caller must `leave` it).
fn find(addr: usize) -> Option<&'static Slot> {
    for index in 0..CHUNKS {
        let chunk = chunk(index)?;
        for slot in chunk.iter() {
            if slot.state.load(Ordering::Relaxed) & ACTIVE == 0 || !slot.enter() {
                continue;
            }
            let (start, len) = (
                slot.start.load(Ordering::Relaxed),
                slot.len.load(Ordering::Relaxed),
            );
            if addr >= start && addr - start < len {
                return Some(slot);
            }
            slot.leave();
        }
    }
    None
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; errno is this thread's.
    unsafe {
        let errno = *libc::__errno_location();
        // si_code > 0: raised by the kernel for a memory access, with the faulting address.
        if (*info).si_code > 0 && handle((*info).si_addr() as usize) {
            *libc::__errno_location() = errno;
            return;
        }
        *libc::__errno_location() = errno;
        chain(sig, info, ctx);
    }
}

/// Poison the registered mapping that holds `addr` and back it with zero pages.
fn handle(addr: usize) -> bool {
    let Some(slot) = find(addr) else {
        return false;
    };
    let (start, len) = (
        slot.start.load(Ordering::Relaxed),
        slot.len.load(Ordering::Relaxed),
    );
    // Poison first: whoever reads the zero pages afterwards sees the flag after its copy.
    slot.poisoned.store(true, Ordering::SeqCst);
    FAULTS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: `[start, start + len)` is a live mapping of ours (the slot is entered, so it cannot
    // be unmapped meanwhile); replacing it with private zero pages keeps every pointer into it
    // valid. mmap is a plain system call, safe in a signal handler.
    let mapped = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    slot.leave();
    if mapped == libc::MAP_FAILED {
        return false;
    }
    let fd = FAULT_EVENTFD.load(Ordering::Acquire);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is 8 readable bytes. A full counter
        // (EAGAIN) only means the watcher is already due to wake.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
    true
}

/// Hand a fault we do not own to the disposition that was there before us.
///
/// # Safety
/// Only from the signal handler, with its arguments.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: see `Previous`.
    let previous = unsafe { &*PREVIOUS.0.get() };
    let action = previous.sa_sigaction;
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        if action == libc::SIG_IGN && (*info).si_code <= 0 {
            return; // a SIGBUS sent by kill(2) that the process chose to ignore
        }
        // Default action: restore it and let the fault happen again (or re-raise a sent signal,
        // delivered when we return since SIGBUS is blocked in here).
        // SAFETY: all-zero is SIG_DFL; sigaction and raise are async-signal-safe.
        unsafe {
            let mut default: libc::sigaction = std::mem::zeroed();
            libc::sigemptyset(&mut default.sa_mask);
            libc::sigaction(sig, &default, std::ptr::null_mut());
            if (*info).si_code <= 0 {
                libc::raise(sig);
            }
        }
        return;
    }
    if previous.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so this is its signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(action) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain sa_handler.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(action) };
        f(sig);
    }
}

/// Round `len` up to the page size of the file behind `fd` (huge pages on hugetlbfs): the unit
/// in which its mapping can be replaced.
pub fn mapping_len(fd: &OwnedFd, len: usize) -> usize {
    // SAFETY: `statfs` is plain data; fstatfs only writes into it.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open; `fs` is a valid out-pointer.
    let mut unit = if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } == 0
        && fs.f_type == libc::HUGETLBFS_MAGIC as libc::__fsword_t
    {
        fs.f_bsize as usize
    } else {
        0
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    if !unit.is_power_of_two() || unit < page {
        unit = page;
    }
    len.div_ceil(unit).saturating_mul(unit)
}
