//! The dirty-page log of vhost-user live migration (SET_LOG_BASE, VHOST_F_LOG_ALL).
//!
//! The front-end shares a bitmap with one bit per 4 KiB page of guest-physical memory: bit
//! `page % 8` of byte `page / 8`, `page = gpa / 4096`. While it migrates, every write the
//! back-end makes to guest memory must set the bits of the pages it touched, *after* the write:
//! the front-end clears bits atomically and copies the pages they name, so a bit set before the
//! data landed could be cleared and copied too early. Other writers (the front-end's own vCPU
//! tracking, other back-ends) share the bitmap, hence the atomic OR.
//!
//! The bitmap's size comes from the front-end: a write whose page has no bit is not done to the
//! bitmap (never a write outside the mapping); it is counted in [`DirtyLog::faults`] and reported
//! as an error, and the caller decides what to do (the queues carry on: the front-end sized the
//! log, not the guest).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::error::MemoryError;
use crate::memory::{MemoryRegion, RegionSpec};

/// Bytes of guest memory per log bit (VHOST_LOG_PAGE).
pub const LOG_PAGE_SIZE: u64 = 0x1000;

/// A mapped dirty-page bitmap. Shared between the queues of a session through an `Arc`.
#[derive(Debug)]
pub struct DirtyLog {
    /// The bitmap: `mmap_size` bytes of the front-end's fd from `mmap_offset` on.
    bitmap: MemoryRegion,
    /// Writes (or parts of writes) that could not be logged.
    faults: AtomicU64,
    /// With [`DirtyLog::traced`]: every bit ever set, in a private copy the front-end never
    /// clears (diagnostics: which pages the back-end logged during a migration).
    trace: Option<Box<[AtomicU8]>>,
}

impl DirtyLog {
    /// Map `mmap_size` bytes of `fd` starting at `mmap_offset` (SET_LOG_BASE). The fd must be a
    /// regular file at least that long, as for guest memory regions.
    pub fn map(fd: OwnedFd, mmap_size: u64, mmap_offset: u64) -> Result<Self, MemoryError> {
        let spec = RegionSpec {
            guest_phys_addr: 0,
            size: mmap_size,
            userspace_addr: 0,
            mmap_offset,
        };
        Ok(Self {
            bitmap: MemoryRegion::map(fd, spec)?,
            faults: AtomicU64::new(0),
            trace: None,
        })
    }

    /// Also keep a private record of every page marked ([`DirtyLog::marked_pages`]): one more
    /// byte per byte of bitmap and one more atomic OR per marked byte. Without memory for it,
    /// the log is returned untraced.
    pub fn traced(mut self) -> Self {
        let size = usize::try_from(self.size()).unwrap_or(usize::MAX);
        let mut trace = Vec::new();
        if trace.try_reserve_exact(size).is_ok() {
            trace.resize_with(size, || AtomicU8::new(0));
            self.trace = Some(trace.into_boxed_slice());
        }
        self
    }

    /// Every page marked since the log was mapped, whatever the front-end cleared since, in
    /// order; empty unless [`DirtyLog::traced`].
    pub fn marked_pages(&self) -> Vec<u64> {
        let Some(trace) = self.trace.as_deref() else {
            return Vec::new();
        };
        let mut pages = Vec::new();
        for (index, byte) in trace.iter().enumerate() {
            let bits = byte.load(Ordering::Relaxed);
            for bit in 0..8u64 {
                if bits & (1 << bit) != 0 {
                    pages.push((index as u64 * 8 + bit) * LOG_PAGE_SIZE);
                }
            }
        }
        pages
    }

    /// `Err(Poisoned)` if a SIGBUS hit the bitmap (the front-end shrank its file).
    pub fn check_poison(&self) -> Result<(), MemoryError> {
        self.bitmap.check_poison()
    }

    /// Size of the bitmap in bytes.
    pub fn size(&self) -> u64 {
        self.bitmap.size()
    }

    /// Guest-physical bytes the bitmap has bits for: `[0, covers())`.
    pub fn covers(&self) -> u64 {
        self.size().saturating_mul(8 * LOG_PAGE_SIZE)
    }

    /// How many writes could not be (fully) logged so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Count a write that could not be logged at all (e.g. its buffers could not be found again).
    pub fn record_fault(&self) {
        self.faults.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    fn byte(&self, index: u64) -> &AtomicU8 {
        debug_assert!(index < self.size());
        // SAFETY: callers pass `index < size()`, so the byte lies inside the live mapping owned
        // by `self.bitmap`; AtomicU8 has no alignment requirement and the bitmap is shared
        // memory that everyone accesses atomically.
        unsafe { AtomicU8::from_ptr(self.bitmap.host_addr().add(index as usize)) }
    }

    /// Set the bit of every page that `[gpa, gpa + len)` touches. Call it after the write.
    ///
    /// Pages beyond the bitmap are skipped (the others are still marked), counted as one fault
    /// and reported as `LogOutOfRange`.
    pub fn mark(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        let last_byte = gpa.saturating_add(len - 1);
        let first = gpa / LOG_PAGE_SIZE;
        let last = last_byte / LOG_PAGE_SIZE;
        // Pages with a bit: [0, size * 8); `size` is at most isize::MAX (it is mapped).
        let pages = self.size() * 8;
        let end = last.min(pages.saturating_sub(1));
        let mut page = first;
        while page <= end && page < pages {
            let bit = page % 8;
            let count = (8 - bit).min(end - page + 1);
            let mask = (((1u16 << count) - 1) << bit) as u8;
            // Release: the data write this records is visible before its bit (module docs).
            self.byte(page / 8).fetch_or(mask, Ordering::Release);
            if let Some(trace) = self.trace.as_deref() {
                // `page / 8 < size()`, the trace's length.
                if let Some(byte) = trace.get((page / 8) as usize) {
                    byte.fetch_or(mask, Ordering::Relaxed);
                }
            }
            page += count;
        }
        // A front-end that shrank the log's file: the bits went to zero pages (crate::sigbus).
        self.check_poison()?;
        if last >= pages || gpa.checked_add(len).is_none() {
            self.record_fault();
            return Err(MemoryError::LogOutOfRange {
                addr: gpa,
                len,
                covers: self.covers(),
            });
        }
        Ok(())
    }

    /// Whether the bit of the page holding `gpa` is set (`false` beyond the bitmap).
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE_SIZE;
        page / 8 < self.size()
            && self.byte(page / 8).load(Ordering::Acquire) & (1 << (page % 8)) != 0
    }

    /// The guest addresses of all dirty pages, in order (for tests and diagnostics).
    pub fn dirty_pages(&self) -> Vec<u64> {
        self.collect(|byte| byte.load(Ordering::Acquire))
    }

    /// The front-end's side of a log sync: clear the bitmap and return the pages that were dirty,
    /// each byte atomically (a bit set meanwhile is either returned now or left for next time).
    pub fn take_dirty_pages(&self) -> Vec<u64> {
        self.collect(|byte| byte.swap(0, Ordering::AcqRel))
    }

    fn collect(&self, mut read: impl FnMut(&AtomicU8) -> u8) -> Vec<u64> {
        let mut pages = Vec::new();
        for index in 0..self.size() {
            let bits = read(self.byte(index));
            for bit in 0..8 {
                if bits & (1 << bit) != 0 {
                    pages.push((index * 8 + bit) * LOG_PAGE_SIZE);
                }
            }
        }
        pages
    }
}

/// What a queue logs into while dirty logging is on (VHOST_F_LOG_ALL acked and a log set).
#[derive(Debug, Clone)]
pub struct QueueLog {
    pub log: std::sync::Arc<DirtyLog>,
    /// Where writes to the used ring are logged: SET_VRING_ADDR's `log_guest_addr` when the ring
    /// has VHOST_VRING_F_LOG, else `None` (used-ring writes are not logged). It may lie outside
    /// guest memory; only its bits must be inside the log. For a packed ring it stands for the
    /// device event suppression area (QEMU's `used_phys`); its used descriptors are logged by
    /// guest address in the descriptor ring instead.
    pub used_ring: Option<u64>,
}

impl QueueLog {
    /// Log a write of `len` bytes at `offset` into the used ring (if the ring is logged).
    /// Cold and out of line: the queues' hot paths only test whether a log is attached.
    #[cold]
    #[inline(never)]
    pub fn used_ring_write(&self, offset: u64, len: u64) {
        if let Some(base) = self.used_ring {
            // A fault is counted by the log and reported by its owner; the ring carries on.
            let _ = self.log.mark(base.wrapping_add(offset), len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_memfd;

    fn log_of(size: u64) -> (DirtyLog, MemoryRegion) {
        let fd = create_memfd("log-test", size).unwrap();
        let view_fd = fd.try_clone().unwrap();
        let log = DirtyLog::map(fd, size, 0).unwrap();
        let spec = RegionSpec {
            guest_phys_addr: 0,
            size,
            userspace_addr: 0,
            mmap_offset: 0,
        };
        (log, MemoryRegion::map(view_fd, spec).unwrap())
    }

    fn bytes(view: &MemoryRegion) -> Vec<u8> {
        let mut out = vec![0; view.size() as usize];
        // SAFETY: the mapping is alive and `size` bytes long.
        unsafe { std::ptr::copy_nonoverlapping(view.host_addr(), out.as_mut_ptr(), out.len()) };
        out
    }

    #[test]
    fn one_bit_per_page_in_the_shared_fd() {
        let (log, view) = log_of(8);
        log.mark(0, 1).unwrap();
        log.mark(9 * LOG_PAGE_SIZE + 100, 1).unwrap();
        let mut want = vec![0u8; 8];
        want[0] = 0b1;
        want[1] = 0b10;
        assert_eq!(bytes(&view), want);
        assert_eq!(log.dirty_pages(), vec![0, 9 * LOG_PAGE_SIZE]);
        assert!(log.is_dirty(9 * LOG_PAGE_SIZE + 4095));
        assert!(!log.is_dirty(10 * LOG_PAGE_SIZE));
    }

    #[test]
    fn a_write_marks_every_page_it_touches_and_no_other() {
        let (log, view) = log_of(8);
        // Last byte of page 3 up to the first byte of page 20: pages 3..=20.
        log.mark(4 * LOG_PAGE_SIZE - 1, 16 * LOG_PAGE_SIZE + 2)
            .unwrap();
        let want: Vec<u64> = (3..=20).map(|p| p * LOG_PAGE_SIZE).collect();
        assert_eq!(log.dirty_pages(), want);
        assert_eq!(&bytes(&view)[..3], &[0b1111_1000, 0xff, 0b0001_1111]);
        log.mark(5 * LOG_PAGE_SIZE, 0).unwrap();
        assert_eq!(log.dirty_pages(), want);
    }

    #[test]
    fn existing_bits_are_kept() {
        let (log, view) = log_of(1);
        // SAFETY: byte 0 of the live mapping.
        unsafe { *view.host_addr() = 0b1000_0001 };
        log.mark(LOG_PAGE_SIZE, 1).unwrap();
        assert_eq!(bytes(&view), vec![0b1000_0011]);
        assert_eq!(
            log.take_dirty_pages(),
            vec![0, LOG_PAGE_SIZE, 7 * LOG_PAGE_SIZE]
        );
        assert_eq!(bytes(&view), vec![0]);
        assert!(log.take_dirty_pages().is_empty());
    }

    #[test]
    fn writes_beyond_the_log_are_counted_not_done() {
        let (log, view) = log_of(2);
        assert_eq!(log.covers(), 16 * LOG_PAGE_SIZE);
        // Pages 14..=17: 14 and 15 have bits, 16 and 17 do not.
        let err = log.mark(14 * LOG_PAGE_SIZE, 4 * LOG_PAGE_SIZE).unwrap_err();
        assert!(matches!(err, MemoryError::LogOutOfRange { .. }), "{err}");
        assert_eq!(bytes(&view), vec![0, 0b1100_0000]);
        assert_eq!(log.faults(), 1);
        assert!(log.mark(u64::MAX - 10, 100).is_err());
        assert!(log.mark(1 << 40, 1).is_err());
        assert_eq!(log.faults(), 3);
        assert_eq!(bytes(&view), vec![0, 0b1100_0000]);
        assert!(!log.is_dirty(u64::MAX));
    }

    #[test]
    fn a_traced_log_remembers_every_page_marked_after_the_front_end_cleared_it() {
        let (log, _view) = log_of(2);
        assert!(log.marked_pages().is_empty());
        log.mark(LOG_PAGE_SIZE, 1).unwrap();
        assert!(log.marked_pages().is_empty(), "untraced: nothing kept");
        let fd = create_memfd("log-test", 2).unwrap();
        let log = DirtyLog::map(fd, 2, 0).unwrap().traced();
        log.mark(3 * LOG_PAGE_SIZE - 1, 2).unwrap(); // pages 2 and 3
        assert_eq!(log.take_dirty_pages().len(), 2);
        log.mark(9 * LOG_PAGE_SIZE, 1).unwrap();
        assert!(log.mark(15 * LOG_PAGE_SIZE, 2 * LOG_PAGE_SIZE).is_err()); // page 16 has no bit
        assert_eq!(
            log.dirty_pages(),
            vec![9 * LOG_PAGE_SIZE, 15 * LOG_PAGE_SIZE]
        );
        assert_eq!(
            log.marked_pages(),
            [2, 3, 9, 15].map(|p| p * LOG_PAGE_SIZE).to_vec(),
            "cleared by the front-end, still remembered"
        );
    }

    #[test]
    fn map_refuses_a_log_larger_than_its_file() {
        let fd = create_memfd("log-test", 4096).unwrap();
        assert!(DirtyLog::map(fd, 8192, 0).is_err());
        let fd = create_memfd("log-test", 4096).unwrap();
        assert!(DirtyLog::map(fd, 0, 0).is_err());
    }

    #[test]
    fn used_ring_writes_are_logged_at_the_log_address_only_when_set() {
        let (log, _view) = log_of(8);
        let log = std::sync::Arc::new(log);
        let unlogged = QueueLog {
            log: log.clone(),
            used_ring: None,
        };
        unlogged.used_ring_write(0, 8);
        assert!(log.dirty_pages().is_empty());
        let logged = QueueLog {
            log: log.clone(),
            used_ring: Some(0x3_0000 - 4),
        };
        logged.used_ring_write(2, 4); // straddles two pages
        assert_eq!(log.dirty_pages(), vec![0x2_f000, 0x3_0000]);
    }
}
