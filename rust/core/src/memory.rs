//! Guest memory: regions mapped `MAP_SHARED` from the front-end's fds, and address translation.
//!
//! A [`MemoryRegion`] owns one mapping and its fd; it is unmapped when the last `Arc` to it drops.
//! A [`GuestMemory`] is an immutable, cheaply cloned snapshot of a set of regions. Queues and
//! workers keep the snapshot they were attached to, and Python buffers keep their region, so a
//! mapping can never disappear under a user. Changing the set of regions builds a new snapshot
//! ([`GuestMemory::with_region`], [`GuestMemory::without_region`]); [`GuestMemoryMap`] is the
//! mutable holder whose removal waits for, or loudly refuses, a region that is still in use.
//!
//! Every address that comes from a peer is checked: a translation never yields a pointer outside a
//! mapping, and a range that crosses a region end yields only its contiguous part (the caller walks
//! on, like libvhost-user's `vu_gpa_to_va`).

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::MemoryError;
use crate::sigbus;

type Result<T> = std::result::Result<T, MemoryError>;

/// Where a region sits, in the words of vhost-user's memory region descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Guest-physical address of the first byte.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// The front-end's virtual address of the first byte (what SET_VRING_ADDR uses).
    pub userspace_addr: u64,
    /// Offset of the first byte inside the fd.
    pub mmap_offset: u64,
}

impl RegionSpec {
    fn gpa_end(&self) -> u64 {
        self.guest_phys_addr + self.size
    }
    fn uva_end(&self) -> u64 {
        self.userspace_addr + self.size
    }
}

impl fmt::Display for RegionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[gpa {:#x}..{:#x}, uva {:#x}, offset {:#x}]",
            self.guest_phys_addr,
            self.guest_phys_addr.wrapping_add(self.size),
            self.userspace_addr,
            self.mmap_offset
        )
    }
}

/// What a device may do with a range of memory (an IOTLB permission; plain regions allow both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub read: bool,
    pub write: bool,
}

impl Access {
    pub const READ: Self = Self {
        read: true,
        write: false,
    };
    pub const WRITE: Self = Self {
        read: false,
        write: true,
    };
    pub const READ_WRITE: Self = Self {
        read: true,
        write: true,
    };

    /// Whether every access in `need` is allowed.
    #[inline]
    pub fn allows(self, need: Access) -> bool {
        (self.read || !need.read) && (self.write || !need.write)
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match (self.read, self.write) {
            (true, true) => "read-write",
            (true, false) => "read",
            (false, true) => "write",
            (false, false) => "no access",
        };
        f.write_str(text)
    }
}

/// Who owns the mapping behind a region.
enum Backing {
    /// This region's own mmap; unmapped on drop.
    Mapped {
        /// Start of the whole mapping (page aligned), as returned by mmap.
        map_base: NonNull<u8>,
        map_len: usize,
        fd: OwnedFd,
        /// The mapping's entry in the SIGBUS registry (dropped before the munmap).
        registration: Option<crate::sigbus::Registration>,
    },
    /// A window into another region's mapping (an IOTLB entry), which it keeps alive.
    View(Arc<MemoryRegion>),
}

/// One `MAP_SHARED` mapping of a front-end fd, unmapped on drop; or a window into one with its
/// own address and permission ([`MemoryRegion::view`], used for IOTLB entries).
pub struct MemoryRegion {
    spec: RegionSpec,
    /// First byte of the region (the mapping's base plus the sub-page part of `mmap_offset`).
    host_base: NonNull<u8>,
    access: Access,
    backing: Backing,
}

// SAFETY: the mapping is plain shared memory owned by this value; all access goes through raw
// pointers with explicit volatile/atomic operations, so sharing the handle across threads is sound.
unsafe impl Send for MemoryRegion {}
// SAFETY: see `Send`; `&MemoryRegion` only hands out bounds-checked raw access.
unsafe impl Sync for MemoryRegion {}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

impl MemoryRegion {
    /// Map `size` bytes of `fd` starting at `mmap_offset`, read-write and shared.
    ///
    /// The fd must be a regular file (memfd, hugetlbfs or tmpfs/ext4 file) at least
    /// `mmap_offset + size` bytes long: touching a mapping past the end of its file raises SIGBUS,
    /// so a front-end that lies about the size is refused here instead of crashing us later.
    pub fn map(fd: OwnedFd, spec: RegionSpec) -> Result<Self> {
        if spec.size == 0 {
            return Err(MemoryError::InvalidRegion(format!("{spec}: size is zero")));
        }
        let bad = |what: &str| MemoryError::InvalidRegion(format!("{spec}: {what} overflows"));
        spec.guest_phys_addr
            .checked_add(spec.size)
            .ok_or_else(|| bad("guest address + size"))?;
        spec.userspace_addr
            .checked_add(spec.size)
            .ok_or_else(|| bad("userspace address + size"))?;
        let file_end = spec
            .mmap_offset
            .checked_add(spec.size)
            .ok_or_else(|| bad("mmap offset + size"))?;
        if file_end > isize::MAX as u64 {
            return Err(bad("mapping length"));
        }

        // A memfd that allows sealing gets F_SEAL_SHRINK before its size is checked, so the
        // check holds for as long as we map it (docs/architecture.md, "Memory a peer cannot pull
        // away"). Other fds rely on the SIGBUS handler (crate::sigbus).
        seal_shrink(&fd);
        // SAFETY: `stat` is plain data and fstat only writes into it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is owned and open; `st` is a valid out-pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(MemoryError::Map(format!(
                "fstat: {}",
                std::io::Error::last_os_error()
            )));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(MemoryError::InvalidRegion(format!(
                "{spec}: fd is not a regular file (memfd, hugetlbfs or file expected)"
            )));
        }
        if (st.st_size as u64) < file_end {
            return Err(MemoryError::InvalidRegion(format!(
                "{spec}: file is {} bytes, region needs {file_end}",
                st.st_size
            )));
        }

        let aligned_offset = spec.mmap_offset & !(page_size() - 1);
        let (map_offset, delta) = (aligned_offset, spec.mmap_offset - aligned_offset);
        let (map_base, map_len, delta) = match Self::mmap(&fd, map_offset, delta + spec.size) {
            Ok(base) => (base, (delta + spec.size) as usize, delta),
            // hugetlbfs wants offsets aligned to the huge page: map from the start of the file.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) && map_offset != 0 => {
                let base = Self::mmap(&fd, 0, file_end)
                    .map_err(|e| MemoryError::Map(format!("{spec}: mmap: {e}")))?;
                (base, file_end as usize, spec.mmap_offset)
            }
            Err(err) => return Err(MemoryError::Map(format!("{spec}: mmap: {err}"))),
        };
        // The handler replaces the whole mapping, in units of the file's page size.
        let registration = crate::sigbus::register(
            map_base.as_ptr() as usize,
            sigbus::mapping_len(&fd, map_len),
        );
        let registration = match registration {
            Ok(registration) => registration,
            Err(err) => {
                // SAFETY: exactly what mmap returned; nothing refers to it yet.
                unsafe { libc::munmap(map_base.as_ptr().cast(), map_len) };
                return Err(err);
            }
        };
        // SAFETY: `delta + size == map_len`, so the offset stays inside the mapping.
        let host_base = unsafe { NonNull::new_unchecked(map_base.as_ptr().add(delta as usize)) };
        Ok(Self {
            spec,
            host_base,
            access: Access::READ_WRITE,
            backing: Backing::Mapped {
                map_base,
                map_len,
                fd,
                registration: Some(registration),
            },
        })
    }

    /// A window of `size` bytes of `parent` starting `offset` bytes in, addressed at `addr`
    /// (an IOVA) and limited to `access`. Shares the parent's mapping and keeps it alive.
    pub fn view(
        parent: &Arc<MemoryRegion>,
        offset: u64,
        size: u64,
        addr: u64,
        access: Access,
    ) -> Result<Self> {
        let fits = offset
            .checked_add(size)
            .is_some_and(|end| end <= parent.size());
        if size == 0 || !fits || addr.checked_add(size).is_none() {
            return Err(MemoryError::InvalidRegion(format!(
                "window {offset:#x}+{size:#x} at {addr:#x} does not fit in {}",
                parent.spec
            )));
        }
        let spec = RegionSpec {
            guest_phys_addr: addr,
            size,
            userspace_addr: parent.spec.userspace_addr + offset,
            mmap_offset: parent.spec.mmap_offset + offset,
        };
        // SAFETY: offset + size <= parent size, so the pointer stays inside the parent's mapping.
        let host_base =
            unsafe { NonNull::new_unchecked(parent.host_base.as_ptr().add(offset as usize)) };
        Ok(Self {
            spec,
            host_base,
            access,
            backing: Backing::View(Arc::clone(parent)),
        })
    }

    fn mmap(fd: &OwnedFd, offset: u64, len: u64) -> std::io::Result<NonNull<u8>> {
        // SAFETY: a fresh shared mapping chosen by the kernel; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("mmap returned null"))
    }

    pub fn spec(&self) -> &RegionSpec {
        &self.spec
    }
    pub fn guest_phys_addr(&self) -> u64 {
        self.spec.guest_phys_addr
    }
    pub fn size(&self) -> u64 {
        self.spec.size
    }
    pub fn userspace_addr(&self) -> u64 {
        self.spec.userspace_addr
    }
    /// Host address of the region's first byte in this process.
    pub fn host_addr(&self) -> *mut u8 {
        self.host_base.as_ptr()
    }
    /// The fd the region was mapped from (for handing it on, e.g. to a VVU device).
    pub fn fd(&self) -> &OwnedFd {
        match &self.backing {
            Backing::Mapped { fd, .. } => fd,
            Backing::View(parent) => parent.fd(),
        }
    }
    /// What a device may do here (read-write except for IOTLB windows).
    #[inline]
    pub fn access(&self) -> Access {
        self.access
    }
    /// Whether a SIGBUS hit the mapping behind this region (the front-end shrank its file): its
    /// bytes are zero pages now, not the front-end's memory, and every access must fail.
    #[inline]
    pub fn is_poisoned(&self) -> bool {
        match &self.backing {
            Backing::Mapped { registration, .. } => {
                registration.as_ref().is_some_and(|r| r.poisoned())
            }
            Backing::View(parent) => parent.is_poisoned(),
        }
    }

    /// `Err(Poisoned)` if [`MemoryRegion::is_poisoned`]: call after an access.
    #[inline]
    pub fn check_poison(&self) -> Result<()> {
        if sigbus::faults() != 0 && self.is_poisoned() {
            return Err(MemoryError::Poisoned(self.spec.to_string()));
        }
        Ok(())
    }

    /// The mapped region a window belongs to (itself for a mapped region).
    pub fn backing_region(self: &Arc<Self>) -> Arc<MemoryRegion> {
        match &self.backing {
            Backing::Mapped { .. } => Arc::clone(self),
            Backing::View(parent) => parent.backing_region(),
        }
    }

    fn contains_gpa(&self, gpa: u64) -> bool {
        gpa >= self.spec.guest_phys_addr && gpa < self.spec.gpa_end()
    }

    /// Host pointer for `offset` inside the region and how many bytes are contiguous from there
    /// (at most `len`).
    fn at(&self, offset: u64, len: u64) -> (NonNull<u8>, u64) {
        debug_assert!(offset < self.spec.size);
        let avail = self.spec.size - offset;
        // SAFETY: offset < size, so the pointer stays inside the mapping.
        let ptr = unsafe { NonNull::new_unchecked(self.host_base.as_ptr().add(offset as usize)) };
        (ptr, len.min(avail))
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        if let Backing::Mapped {
            map_base,
            map_len,
            ref mut registration,
            ..
        } = self.backing
        {
            // Unregister first: the SIGBUS handler must never remap a range after it is unmapped.
            drop(registration.take());
            // SAFETY: `map_base`/`map_len` are exactly what mmap returned; no reference into the
            // mapping can outlive `self` because every user (windows included) holds an
            // `Arc<MemoryRegion>`.
            unsafe {
                libc::munmap(map_base.as_ptr().cast(), map_len);
            }
        }
    }
}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemoryRegion{} at {:p}", self.spec, self.host_base)
    }
}

/// A bounds-checked window of guest memory that is contiguous in this process.
///
/// Valid for as long as the [`GuestMemory`] (or region) it came from is borrowed.
#[derive(Clone, Copy)]
pub struct GuestSlice<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _memory: std::marker::PhantomData<&'a MemoryRegion>,
}

impl<'a> GuestSlice<'a> {
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copy `dst.len()` bytes out, starting at `offset`.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check(offset, dst.len())?;
        // SAFETY: range checked against the slice, which lies in a live mapping.
        unsafe { copy_from_guest(self.ptr.as_ptr().add(offset), dst) };
        Ok(())
    }

    /// Copy `src` in, starting at `offset`.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check(offset, src.len())?;
        // SAFETY: as in `read_at`.
        unsafe { copy_to_guest(src, self.ptr.as_ptr().add(offset)) };
        Ok(())
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(MemoryError::OutOfRange {
                addr: offset as u64,
                len: len as u64,
            }),
        }
    }
}

/// An immutable snapshot of guest memory: a set of non-overlapping regions.
///
/// Cloning is one reference-count increment. Holding a snapshot keeps all of its regions mapped.
#[derive(Clone, Default)]
pub struct GuestMemory {
    /// Sorted by guest-physical address.
    regions: Arc<[Arc<MemoryRegion>]>,
    /// Addresses are IOVAs translated by an IOTLB ([`GuestMemory::new_iova`]): an unmapped
    /// address is a miss to be resolved by the front-end, not necessarily a bad one.
    iova: bool,
}

impl fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.regions.iter()).finish()
    }
}

fn overlaps(a_start: u64, a_end: u64, b_start: u64, b_end: u64) -> bool {
    a_start < b_end && b_start < a_end
}

impl GuestMemory {
    /// A snapshot of `regions`; they must not overlap in guest-physical or userspace addresses.
    pub fn new(regions: Vec<Arc<MemoryRegion>>) -> Result<Self> {
        let mut regions = regions;
        regions.sort_by_key(|r| r.guest_phys_addr());
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                let (sa, sb) = (a.spec(), b.spec());
                if overlaps(
                    sa.guest_phys_addr,
                    sa.gpa_end(),
                    sb.guest_phys_addr,
                    sb.gpa_end(),
                ) || overlaps(
                    sa.userspace_addr,
                    sa.uva_end(),
                    sb.userspace_addr,
                    sb.uva_end(),
                ) {
                    return Err(MemoryError::Overlap {
                        new: sb.to_string(),
                        existing: sa.to_string(),
                    });
                }
            }
        }
        Ok(Self {
            regions: regions.into(),
            iova: false,
        })
    }

    /// A snapshot keyed by IOVA (IOTLB windows): the regions must not overlap in IOVA, but may
    /// alias the same memory (an IOMMU can map one page at several IOVAs).
    pub fn new_iova(regions: Vec<Arc<MemoryRegion>>) -> Result<Self> {
        let mut regions = regions;
        regions.sort_by_key(|r| r.guest_phys_addr());
        for pair in regions.windows(2) {
            let (a, b) = (pair[0].spec(), pair[1].spec());
            if a.gpa_end() > b.guest_phys_addr {
                return Err(MemoryError::Overlap {
                    new: b.to_string(),
                    existing: a.to_string(),
                });
            }
        }
        Ok(Self {
            regions: regions.into(),
            iova: true,
        })
    }

    /// Whether addresses are IOVAs (see [`GuestMemory::new_iova`]).
    #[inline]
    pub fn is_iova(&self) -> bool {
        self.iova
    }

    /// A new snapshot with `region` added.
    pub fn with_region(&self, region: Arc<MemoryRegion>) -> Result<Self> {
        let mut regions = self.regions.to_vec();
        regions.push(region);
        if self.iova {
            Self::new_iova(regions)
        } else {
            Self::new(regions)
        }
    }

    /// A new snapshot without the region that starts at `guest_phys_addr`, and that region.
    pub fn without_region(&self, guest_phys_addr: u64) -> Result<(Self, Arc<MemoryRegion>)> {
        let index = self
            .regions
            .iter()
            .position(|r| r.guest_phys_addr() == guest_phys_addr)
            .ok_or(MemoryError::NoSuchRegion(guest_phys_addr))?;
        let mut regions = self.regions.to_vec();
        let removed = regions.remove(index);
        Ok((
            Self {
                regions: regions.into(),
                iova: self.iova,
            },
            removed,
        ))
    }

    pub fn regions(&self) -> &[Arc<MemoryRegion>] {
        &self.regions
    }

    /// The region containing guest-physical address `gpa`.
    pub fn find_region(&self, gpa: u64) -> Option<&Arc<MemoryRegion>> {
        // Regions are few (≤ 8 for SET_MEM_TABLE, a few hundred with memory slots): binary search.
        let index = self.regions.partition_point(|r| r.guest_phys_addr() <= gpa);
        let region = self.regions.get(index.checked_sub(1)?)?;
        region.contains_gpa(gpa).then_some(region)
    }

    /// The region containing front-end virtual address `uva`.
    pub fn find_region_by_uva(&self, uva: u64) -> Option<&Arc<MemoryRegion>> {
        self.regions
            .iter()
            .find(|r| uva >= r.userspace_addr() && uva < r.spec.uva_end())
    }

    /// Translate a front-end virtual address (as in SET_VRING_ADDR) to a guest-physical one.
    pub fn uva_to_gpa(&self, uva: u64) -> Result<u64> {
        self.regions
            .iter()
            .find(|r| uva >= r.userspace_addr() && uva < r.spec.uva_end())
            .map(|r| r.guest_phys_addr() + (uva - r.userspace_addr()))
            .ok_or(MemoryError::OutOfRange { addr: uva, len: 1 })
    }

    /// The contiguous host window starting at `gpa`, at most `len` bytes long (shorter where the
    /// range crosses a region end). `len == 0` yields an empty slice if `gpa` is mapped.
    pub fn slice(&self, gpa: u64, len: u64) -> Result<GuestSlice<'_>> {
        let region = self
            .find_region(gpa)
            .ok_or(MemoryError::OutOfRange { addr: gpa, len })?;
        let (ptr, contiguous) = region.at(gpa - region.guest_phys_addr(), len);
        Ok(GuestSlice {
            ptr,
            len: contiguous as usize,
            _memory: std::marker::PhantomData,
        })
    }

    /// The first address of `[gpa, gpa + len)` that no region maps, if any (an IOTLB miss).
    pub fn first_unmapped(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.saturating_add(len);
        let mut at = gpa;
        while at < end {
            match self.find_region(at) {
                Some(region) => at = region.spec.gpa_end(),
                None => return Some(at),
            }
        }
        None
    }

    /// Like [`GuestMemory::slice_exact`], and the region must allow `need`.
    pub fn slice_exact_for(&self, gpa: u64, len: u64, need: Access) -> Result<GuestSlice<'_>> {
        let slice = self.slice_exact(gpa, len)?;
        // slice_exact succeeded, so the region exists.
        if let Some(region) = self.find_region(gpa) {
            if !region.access.allows(need) {
                return Err(MemoryError::AccessDenied {
                    addr: gpa,
                    len,
                    need,
                    allowed: region.access,
                });
            }
        }
        Ok(slice)
    }

    /// The host window for exactly `[gpa, gpa + len)`; an error unless it is all in one region.
    pub fn slice_exact(&self, gpa: u64, len: u64) -> Result<GuestSlice<'_>> {
        let slice = self.slice(gpa, len)?;
        if (slice.len() as u64) < len {
            return Err(MemoryError::OutOfRange { addr: gpa, len });
        }
        Ok(slice)
    }

    /// Call `f` for each contiguous piece of `[gpa, gpa + len)`, in order, with the piece and its
    /// offset from `gpa`. Fails without calling `f` at all if any part is unmapped.
    pub fn for_each_piece<'m>(
        &'m self,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(usize, GuestSlice<'m>),
    ) -> Result<()> {
        gpa.checked_add(len)
            .ok_or(MemoryError::OutOfRange { addr: gpa, len })?;
        // Validate first so that a failing copy never leaves a partial write behind.
        let mut pieces: [Option<GuestSlice<'m>>; 4] = [None; 4];
        let mut extra: Vec<GuestSlice<'m>> = Vec::new();
        let (mut done, mut count) = (0u64, 0usize);
        while done < len {
            let piece = self.slice(gpa + done, len - done)?;
            if count < pieces.len() {
                pieces[count] = Some(piece);
            } else {
                extra.push(piece);
            }
            count += 1;
            done += piece.len() as u64;
        }
        let mut offset = 0usize;
        for piece in pieces.iter().flatten().copied().chain(extra) {
            f(offset, piece);
            offset += piece.len();
        }
        Ok(())
    }

    /// Copy guest memory at `gpa` into `dst`, across region boundaries.
    ///
    /// Fails with `Poisoned` if the front-end pulled the memory away during the copy (a SIGBUS
    /// caught by [`crate::sigbus`]); `dst` then holds zeros where the memory was.
    pub fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<()> {
        let len = dst.len();
        self.for_each_piece(gpa, len as u64, |offset, piece| {
            // Cannot fail: the piece was sized from the same range.
            let _ = piece.read_at(0, &mut dst[offset..offset + piece.len()]);
        })?;
        self.check_poison_in(gpa, len as u64)
    }

    /// Copy `src` into guest memory at `gpa`, across region boundaries. Nothing is written unless
    /// the whole range is mapped.
    pub fn write(&self, gpa: u64, src: &[u8]) -> Result<()> {
        self.for_each_piece(gpa, src.len() as u64, |offset, piece| {
            let _ = piece.write_at(0, &src[offset..offset + piece.len()]);
        })?;
        self.check_poison_in(gpa, src.len() as u64)
    }

    /// Like [`GuestMemory::check_poison`], for the regions that `[gpa, gpa + len)` touches only:
    /// a poisoned region does not fail accesses to the others (vfio-user DMA windows).
    #[inline]
    pub fn check_poison_in(&self, gpa: u64, len: u64) -> Result<()> {
        if sigbus::faults() == 0 {
            return Ok(());
        }
        self.poison_slow_in(gpa, len)
    }

    #[cold]
    fn poison_slow_in(&self, gpa: u64, len: u64) -> Result<()> {
        std::sync::atomic::fence(Ordering::SeqCst);
        let end = gpa.saturating_add(len.max(1));
        let hit = self
            .regions
            .iter()
            .find(|r| overlaps(gpa, end, r.guest_phys_addr(), r.spec.gpa_end()) && r.is_poisoned());
        match hit {
            Some(region) => Err(MemoryError::Poisoned(region.spec.to_string())),
            None => Ok(()),
        }
    }

    /// `Err(Poisoned)` if a SIGBUS hit any region of this snapshot (see [`crate::sigbus`]). One
    /// relaxed load of a process-wide counter while no fault ever happened; call it after
    /// accessing guest memory, before trusting what was read.
    #[inline]
    pub fn check_poison(&self) -> Result<()> {
        if sigbus::faults() == 0 {
            return Ok(());
        }
        self.poison_slow()
    }

    #[cold]
    fn poison_slow(&self) -> Result<()> {
        // Order the flag loads after the accesses that came before (the handler ran on this
        // thread, or on another one that mapped the zero pages we may have read).
        std::sync::atomic::fence(Ordering::SeqCst);
        match self.regions.iter().find(|r| r.is_poisoned()) {
            Some(region) => Err(MemoryError::Poisoned(region.spec.to_string())),
            None => Ok(()),
        }
    }

    /// Whether a SIGBUS hit any region of this snapshot.
    pub fn is_poisoned(&self) -> bool {
        self.check_poison().is_err()
    }

    fn atomic_ptr(&self, gpa: u64, size: u64) -> Result<*mut u8> {
        let ptr = self.slice_exact(gpa, size)?.as_ptr();
        // Both must be aligned: the guest address for the spec's rules, the host address for the
        // atomic access itself (a region mapped at an odd mmap_offset shifts one against the other).
        if gpa % size != 0 || (ptr as usize) % size as usize != 0 {
            return Err(MemoryError::Misaligned {
                addr: gpa,
                align: size,
            });
        }
        Ok(ptr)
    }

    /// Naturally aligned atomic little-endian load of a u16 (ring indexes and flags).
    pub fn load_u16(&self, gpa: u64, order: Ordering) -> Result<u16> {
        let ptr = self.atomic_ptr(gpa, 2)?;
        // SAFETY: in bounds of a live mapping and 2-byte aligned (checked above).
        let value = u16::from_le(unsafe { AtomicU16::from_ptr(ptr.cast()) }.load(order));
        self.check_poison_in(gpa, 2)?;
        Ok(value)
    }
    pub fn load_u32(&self, gpa: u64, order: Ordering) -> Result<u32> {
        let ptr = self.atomic_ptr(gpa, 4)?;
        // SAFETY: in bounds and 4-byte aligned.
        let value = u32::from_le(unsafe { AtomicU32::from_ptr(ptr.cast()) }.load(order));
        self.check_poison_in(gpa, 4)?;
        Ok(value)
    }
    pub fn load_u64(&self, gpa: u64, order: Ordering) -> Result<u64> {
        let ptr = self.atomic_ptr(gpa, 8)?;
        // SAFETY: in bounds and 8-byte aligned.
        let value = u64::from_le(unsafe { AtomicU64::from_ptr(ptr.cast()) }.load(order));
        self.check_poison_in(gpa, 8)?;
        Ok(value)
    }
    pub fn store_u16(&self, gpa: u64, value: u16, order: Ordering) -> Result<()> {
        let ptr = self.atomic_ptr(gpa, 2)?;
        // SAFETY: in bounds and 2-byte aligned.
        unsafe { AtomicU16::from_ptr(ptr.cast()) }.store(value.to_le(), order);
        self.check_poison_in(gpa, 2)
    }
    pub fn store_u32(&self, gpa: u64, value: u32, order: Ordering) -> Result<()> {
        let ptr = self.atomic_ptr(gpa, 4)?;
        // SAFETY: in bounds and 4-byte aligned.
        unsafe { AtomicU32::from_ptr(ptr.cast()) }.store(value.to_le(), order);
        self.check_poison_in(gpa, 4)
    }
    pub fn store_u64(&self, gpa: u64, value: u64, order: Ordering) -> Result<()> {
        let ptr = self.atomic_ptr(gpa, 8)?;
        // SAFETY: in bounds and 8-byte aligned.
        unsafe { AtomicU64::from_ptr(ptr.cast()) }.store(value.to_le(), order);
        self.check_poison_in(gpa, 8)
    }
}

/// The mutable set of regions a back-end or front-end works with: hands out snapshots, and adds
/// and removes regions at run time (memory hotplug).
#[derive(Default)]
pub struct GuestMemoryMap {
    current: Mutex<GuestMemory>,
}

impl GuestMemoryMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> GuestMemory {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GuestMemory> {
        // A poisoned lock only means another thread panicked while swapping an Arc; the snapshot
        // itself is always consistent.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Map `fd` as a new region and add it.
    pub fn add_region(&self, fd: OwnedFd, spec: RegionSpec) -> Result<Arc<MemoryRegion>> {
        let region = Arc::new(MemoryRegion::map(fd, spec)?);
        let mut current = self.lock();
        *current = current.with_region(region.clone())?;
        Ok(region)
    }

    /// Replace every region at once (vhost-user SET_MEM_TABLE). Old regions stay mapped for as long
    /// as someone still holds the old snapshot.
    pub fn replace(&self, memory: GuestMemory) -> GuestMemory {
        std::mem::replace(&mut *self.lock(), memory)
    }

    /// Remove the region that starts at `guest_phys_addr` and unmap it.
    ///
    /// New translations stop seeing the region at once. If something still holds it (a Python
    /// buffer, a queue or worker attached to an older snapshot), wait up to `timeout` for it to be
    /// released; if it is still held then, put the region back and fail with `RegionBusy`.
    pub fn remove_region(&self, guest_phys_addr: u64, timeout: Duration) -> Result<()> {
        let region = {
            let mut current = self.lock();
            let (next, region) = current.without_region(guest_phys_addr)?;
            *current = next;
            region
        };
        let deadline = Instant::now() + timeout;
        loop {
            // Our own `region` is the last holder: dropping it unmaps.
            let users = Arc::strong_count(&region) - 1;
            if users == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let mut current = self.lock();
                // Put it back unless another thread added an overlapping region meanwhile; it
                // stays mapped either way until its last holder lets go.
                if let Ok(restored) = current.with_region(region) {
                    *current = restored;
                }
                return Err(MemoryError::RegionBusy {
                    gpa: guest_phys_addr,
                    users,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Create an anonymous memfd of `size` bytes (for front-ends and tests that own guest memory, and
/// the inflight region), sealed with `F_SEAL_SHRINK | F_SEAL_GROW`: whoever we hand it to can
/// write it but never change its size, so no mapping of it (ours or theirs) can fault.
pub fn create_memfd(name: &str, size: u64) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `cname` is a valid NUL-terminated string.
    let raw =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh fd that nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain syscalls on the fd we own.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) != 0
            || libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// Add `F_SEAL_SHRINK` to a peer's fd when it allows sealing (a memfd created with
/// `MFD_ALLOW_SEALING` and without `F_SEAL_SEAL`); returns whether the fd is now shrink-sealed.
/// The seal only forbids making the file smaller: writes, growing and hole punching (virtio-mem,
/// balloon) still work, so it cannot break a front-end that keeps its memory while we map it.
pub fn seal_shrink(fd: &OwnedFd) -> bool {
    // SAFETY: plain fcntl on an fd we own; failures (EINVAL: not a memfd, EPERM: sealing not
    // allowed) leave the fd untouched.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK);
        let seals = libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS);
        seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
    }
}

/// Copy guest memory at `src` into `dst` with volatile accesses on the guest side: the guest (or
/// the front-end) may write the bytes while we copy, which would be a data race for a plain
/// `memcpy` by Rust's rules. Aligned volatile accesses on the guest side, as wide as alignment
/// and length allow: 16 bytes (SSE2, x86-64) for the bulk, 8, 4, 2 and 1 at the ends; copies of
/// [`AVX_MIN`] bytes or more take 32-byte ones for the bulk where the CPU has AVX ([`avx`]).
///
/// # Safety
/// `src..src + dst.len()` must lie inside a live mapping; `dst` cannot overlap it (it is ours).
#[inline]
pub unsafe fn copy_from_guest(src: *const u8, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if dst.len() >= AVX_MIN && std::is_x86_feature_detected!("avx") {
        // SAFETY: the contract is this function's; AVX is there (checked just above).
        unsafe { avx::copy_from_guest(src, dst.as_mut_ptr(), dst.len()) };
        return;
    }
    // SAFETY: the contract is this function's.
    unsafe { copy_from_guest_narrow(src, dst.as_mut_ptr(), dst.len()) };
}

/// [`copy_from_guest`] in accesses of at most [`WIDE`] bytes.
///
/// # Safety
/// `src..src + len` must lie inside a live mapping, `out..out + len` inside memory of ours that
/// does not overlap it.
#[inline(always)]
unsafe fn copy_from_guest_narrow(src: *const u8, out: *mut u8, len: usize) {
    // SAFETY: `step` only touches `[i, i + size_of::<T>())` with `i + size <= len`, inside both
    // ranges (contract), aligned on the guest side (its callers check), unaligned on ours.
    unsafe fn step<T: Copy>(src: *const u8, out: *mut u8, i: usize) {
        // SAFETY: see above.
        unsafe {
            let v = src.add(i).cast::<T>().read_volatile();
            out.add(i).cast::<T>().write_unaligned(v);
        }
    }
    // SAFETY: per the contract; `guest_walk` keeps every access aligned and inside `len`.
    unsafe {
        guest_walk(src as usize, len, |i, width| match width {
            16 => step::<Wide>(src, out, i),
            8 => step::<u64>(src, out, i),
            4 => step::<u32>(src, out, i),
            2 => step::<u16>(src, out, i),
            _ => step::<u8>(src, out, i),
        });
    }
}

/// Copies at least this long go through [`avx`] where the CPU has AVX: a 1514-byte frame in
/// 32-byte accesses, four per round, takes about half the time of 16-byte ones one by one
/// (`benches/RESULTS.md`, "Instructions per frame, vvu vs DPDK"); below it the narrow walk is
/// as cheap (from 64 bytes on, a 64-byte frame cost 91 more instructions).
#[cfg(target_arch = "x86_64")]
const AVX_MIN: usize = 128;

/// Guest copies in 32-byte AVX accesses, still volatile and aligned on the guest side: the
/// narrow walk up to the guest's next 32-byte boundary, then rounds of four 32-byte accesses
/// (independent, so the CPU overlaps them), then single ones, then the narrow walk for the
/// tail. Our side is accessed unaligned.
#[cfg(target_arch = "x86_64")]
mod avx {
    use core::arch::x86_64::__m256i;

    const W: usize = std::mem::size_of::<__m256i>();

    /// Bytes from `addr` to its next `W`-aligned address, at most `len`.
    #[inline(always)]
    fn head(addr: usize, len: usize) -> usize {
        (addr.wrapping_neg() & (W - 1)).min(len)
    }

    /// The bulk of both directions: from `$i`, rounds of four `W`-byte accesses, then single
    /// ones while a whole one fits in `$len`; `$load!(offset)` and `$store!(offset, value)` are
    /// the caller's (volatile on the guest side). A macro, not a function or closure: those
    /// would be functions of their own, compiled without AVX.
    macro_rules! wide_rounds {
        ($i:ident, $len:expr, $load:ident, $store:ident) => {
            while $i + 4 * W <= $len {
                let (a, b, c, d) = (
                    $load!($i),
                    $load!($i + W),
                    $load!($i + 2 * W),
                    $load!($i + 3 * W),
                );
                $store!($i, a);
                $store!($i + W, b);
                $store!($i + 2 * W, c);
                $store!($i + 3 * W, d);
                $i += 4 * W;
            }
            while $i + W <= $len {
                $store!($i, $load!($i));
                $i += W;
            }
        };
    }

    /// # Safety
    /// As [`super::copy_from_guest`] with `out..out + len` for `dst`; the CPU must have AVX.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn copy_from_guest(src: *const u8, out: *mut u8, len: usize) {
        // SAFETY (whole body): every access below is inside `[0, len)` of both ranges (the
        // loop conditions), aligned to its width on the guest side (`i` starts at the guest's
        // boundary and moves by `W`), and the narrow copies keep their own contract.
        unsafe {
            let mut i = head(src as usize, len);
            super::copy_from_guest_narrow(src, out, i);
            macro_rules! load {
                ($i:expr) => {
                    src.add($i).cast::<__m256i>().read_volatile()
                };
            }
            macro_rules! store {
                ($i:expr, $v:expr) => {
                    out.add($i).cast::<__m256i>().write_unaligned($v)
                };
            }
            wide_rounds!(i, len, load, store);
            super::copy_from_guest_narrow(src.add(i), out.add(i), len - i);
        }
    }

    /// # Safety
    /// As [`super::copy_to_guest`] with `from..from + len` for `src`; the CPU must have AVX.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn copy_to_guest(from: *const u8, dst: *mut u8, len: usize) {
        // SAFETY (whole body): as in `copy_from_guest`, with the guest on the store side.
        unsafe {
            let mut i = head(dst as usize, len);
            super::copy_to_guest_narrow(from, dst, i);
            macro_rules! load {
                ($i:expr) => {
                    from.add($i).cast::<__m256i>().read_unaligned()
                };
            }
            macro_rules! store {
                ($i:expr, $v:expr) => {
                    dst.add($i).cast::<__m256i>().write_volatile($v)
                };
            }
            wide_rounds!(i, len, load, store);
            super::copy_to_guest_narrow(from.add(i), dst.add(i), len - i);
        }
    }
}

/// Walk `len` bytes from guest address `addr` in naturally aligned accesses, as wide as
/// alignment and what is left allow (16 bytes at most): `f(offset, width)` for each. A 76-byte
/// packet at an 8-aligned buffer is 8 + 4·16 + 4 bytes: 6 accesses, not 13 (8-byte words) or 76.
#[inline(always)]
fn guest_walk(addr: usize, len: usize, mut f: impl FnMut(usize, usize)) {
    let mut i = 0;
    // Up to alignment: each access at most doubles it.
    while i < len {
        let at = addr.wrapping_add(i);
        let width = [1usize, 2, 4, 8]
            .into_iter()
            .find(|w| at & (2 * w - 1) != 0)
            .unwrap_or(WIDE);
        if width >= WIDE || i + width > len {
            break;
        }
        f(i, width);
        i += width;
    }
    while i + WIDE <= len {
        f(i, WIDE);
        i += WIDE;
    }
    // The tail: aligned, shrinking.
    for width in [8usize, 4, 2, 1] {
        if width < WIDE && i + width <= len {
            f(i, width);
            i += width;
        }
    }
}
/// The unit of the bulk of a guest copy: one SSE2 register on x86-64 (a 64-byte frame is 4
/// loads, a 1500-byte one 94, half of what 8-byte words took), else a word.
#[cfg(target_arch = "x86_64")]
type Wide = core::arch::x86_64::__m128i;
#[cfg(not(target_arch = "x86_64"))]
type Wide = u64;
/// Bytes of [`Wide`].
const WIDE: usize = std::mem::size_of::<Wide>();

/// Copy `src` into guest memory at `dst` with volatile stores on the guest side (see
/// [`copy_from_guest`]).
///
/// # Safety
/// `dst..dst + src.len()` must lie inside a live, writable mapping; `src` cannot overlap it.
#[inline]
pub unsafe fn copy_to_guest(src: &[u8], dst: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    if src.len() >= AVX_MIN && std::is_x86_feature_detected!("avx") {
        // SAFETY: the contract is this function's; AVX is there (checked just above).
        unsafe { avx::copy_to_guest(src.as_ptr(), dst, src.len()) };
        return;
    }
    // SAFETY: the contract is this function's.
    unsafe { copy_to_guest_narrow(src.as_ptr(), dst, src.len()) };
}

/// [`copy_to_guest`] in accesses of at most [`WIDE`] bytes.
///
/// # Safety
/// `dst..dst + len` must lie inside a live, writable mapping, `from..from + len` inside memory
/// of ours that does not overlap it.
#[inline(always)]
unsafe fn copy_to_guest_narrow(from: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: as `step` in `copy_from_guest_narrow`, with the roles swapped.
    unsafe fn step<T: Copy>(from: *const u8, dst: *mut u8, i: usize) {
        // SAFETY: see above.
        unsafe {
            let v = from.add(i).cast::<T>().read_unaligned();
            dst.add(i).cast::<T>().write_volatile(v);
        }
    }
    // SAFETY: per the contract; `guest_walk` keeps every access aligned and inside the length.
    unsafe {
        guest_walk(dst as usize, len, |i, width| match width {
            16 => step::<Wide>(from, dst, i),
            8 => step::<u64>(from, dst, i),
            4 => step::<u32>(from, dst, i),
            2 => step::<u16>(from, dst, i),
            _ => step::<u8>(from, dst, i),
        });
    }
}

/// Zero `len` bytes of guest memory at `dst` with volatile stores (see [`copy_from_guest`]).
///
/// # Safety
/// `dst..dst + len` must lie inside a live, writable mapping.
pub unsafe fn zero_guest(dst: *mut u8, len: usize) {
    let zeros = [0u8; 256];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len());
        // SAFETY: `done + n <= len`, inside the range of the contract.
        unsafe { copy_to_guest(&zeros[..n], dst.add(done)) };
        done += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_copies_are_exact_at_every_alignment_and_length() {
        // The wide-access walk: bulk in 16-byte units, aligned 8/4/2/1 pieces at both ends; from
        // AVX_MIN bytes on (x86-64 with AVX), 32-byte units in rounds of four and single ones,
        // the narrow walk before the guest's 32-byte boundary and after the last full unit.
        let guest: Vec<u8> = (0..500u32).map(|i| (i * 7 + 3) as u8).collect();
        for offset in 0..65 {
            for len in (0..100).chain([127, 128, 129, 159, 160, 161, 191, 255, 256, 257, 300, 435])
            {
                let mut out = vec![0u8; len];
                // SAFETY: offset + len <= 499 < 500, inside `guest`; `out` is separate.
                unsafe { copy_from_guest(guest.as_ptr().add(offset), &mut out) };
                assert_eq!(
                    out,
                    guest[offset..offset + len],
                    "from, at {offset}, {len} bytes"
                );
                let mut target = vec![0xeeu8; 500];
                let src: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
                // SAFETY: as above, into `target`.
                unsafe { copy_to_guest(&src, target.as_mut_ptr().add(offset)) };
                assert_eq!(
                    target[offset..offset + len],
                    src[..],
                    "to, at {offset}, {len}"
                );
                assert!(target[..offset].iter().all(|&b| b == 0xee), "wrote before");
                assert!(
                    target[offset + len..].iter().all(|&b| b == 0xee),
                    "wrote after"
                );
            }
        }
    }

    fn region(gpa: u64, size: u64, uva: u64) -> Arc<MemoryRegion> {
        let fd = create_memfd("test", size).unwrap();
        Arc::new(
            MemoryRegion::map(
                fd,
                RegionSpec {
                    guest_phys_addr: gpa,
                    size,
                    userspace_addr: uva,
                    mmap_offset: 0,
                },
            )
            .unwrap(),
        )
    }

    #[test]
    fn translation_stops_at_region_end_and_walks_on() {
        let mem = GuestMemory::new(vec![
            region(0, 0x1000, 0x10_0000),
            region(0x1000, 0x1000, 0x20_0000),
        ])
        .unwrap();
        let slice = mem.slice(0xff0, 0x20).unwrap();
        assert_eq!(slice.len(), 0x10);
        let data: Vec<u8> = (0..0x20).collect();
        mem.write(0xff0, &data).unwrap();
        let mut back = vec![0; 0x20];
        mem.read(0xff0, &mut back).unwrap();
        assert_eq!(back, data);
        assert!(mem.slice_exact(0xff0, 0x20).is_err());
    }

    #[test]
    fn out_of_range_is_an_error_and_writes_nothing() {
        let mem = GuestMemory::new(vec![region(0, 0x1000, 0)]).unwrap();
        assert!(matches!(
            mem.slice(0x1000, 1),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(mem.write(0xffe, &[1, 2, 3, 4]).is_err());
        let mut back = [9u8; 2];
        mem.read(0xffe, &mut back).unwrap();
        assert_eq!(
            back,
            [0, 0],
            "a failed write must not leave a partial write"
        );
        assert!(mem.read(u64::MAX, &mut [0u8; 2]).is_err());
        assert!(mem.load_u16(0x1000, Ordering::Acquire).is_err());
        assert!(matches!(
            mem.load_u32(2, Ordering::Acquire),
            Err(MemoryError::Misaligned { .. })
        ));
    }

    #[test]
    fn volatile_copies_are_exact_at_every_alignment_and_length() {
        let mem = GuestMemory::new(vec![region(0, 0x1000, 0)]).unwrap();
        let pattern: Vec<u8> = (0..64u8)
            .map(|b| b.wrapping_mul(37).wrapping_add(1))
            .collect();
        for start in 0..9u64 {
            for len in 0..40usize {
                mem.write(0, &[0u8; 128]).unwrap();
                mem.write(0x10 + start, &pattern[..len]).unwrap();
                let mut around = [0u8; 128];
                mem.read(0, &mut around).unwrap();
                let at = 0x10 + start as usize;
                assert_eq!(&around[at..at + len], &pattern[..len], "{start} {len}");
                assert!(around[..at].iter().all(|&b| b == 0), "no write before");
                assert!(around[at + len..].iter().all(|&b| b == 0), "no write after");
                let mut back = vec![0xeeu8; len];
                mem.read(0x10 + start, &mut back).unwrap();
                assert_eq!(back, &pattern[..len]);
            }
        }
        let slice = mem.slice(0x100, 0x300).unwrap();
        // SAFETY: 0x300 bytes inside the region, which `mem` keeps mapped.
        unsafe { zero_guest(slice.as_ptr().add(1), 0x2fe) };
        let mut back = [1u8; 0x300];
        mem.read(0x100, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }

    #[test]
    fn atomics_are_little_endian() {
        let mem = GuestMemory::new(vec![region(0x4000, 0x1000, 0)]).unwrap();
        mem.store_u32(0x4008, 0x1122_3344, Ordering::Release)
            .unwrap();
        let mut raw = [0u8; 4];
        mem.read(0x4008, &mut raw).unwrap();
        assert_eq!(raw, [0x44, 0x33, 0x22, 0x11]);
        assert_eq!(mem.load_u16(0x4008, Ordering::Acquire).unwrap(), 0x3344);
        mem.store_u64(0x4010, u64::MAX - 1, Ordering::Release)
            .unwrap();
        assert_eq!(
            mem.load_u64(0x4010, Ordering::Acquire).unwrap(),
            u64::MAX - 1
        );
    }

    #[test]
    fn atomics_refuse_a_host_address_that_is_not_aligned() {
        let fd = create_memfd("odd", 0x2000).unwrap();
        let spec = RegionSpec {
            guest_phys_addr: 0,
            size: 0x1000,
            userspace_addr: 0,
            mmap_offset: 1,
        };
        let mem = GuestMemory::new(vec![Arc::new(MemoryRegion::map(fd, spec).unwrap())]).unwrap();
        let err = mem.load_u16(0, Ordering::Acquire).unwrap_err();
        assert!(matches!(err, MemoryError::Misaligned { .. }));
        mem.write(0, &[1, 2]).unwrap(); // plain copies need no alignment
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let a = region(0, 0x2000, 0x10_0000);
        assert!(GuestMemory::new(vec![a.clone(), region(0x1000, 0x1000, 0x90_0000)]).is_err());
        assert!(GuestMemory::new(vec![a, region(0x4000, 0x1000, 0x10_1000)]).is_err());
    }

    #[test]
    fn uva_translates_to_gpa() {
        let mem = GuestMemory::new(vec![region(0x10000, 0x1000, 0x7f00_0000)]).unwrap();
        assert_eq!(mem.uva_to_gpa(0x7f00_0010).unwrap(), 0x10010);
        assert!(mem.uva_to_gpa(0x7f00_1000).is_err());
    }

    #[test]
    fn file_shorter_than_region_is_refused() {
        let fd = create_memfd("short", 0x1000).unwrap();
        let spec = RegionSpec {
            guest_phys_addr: 0,
            size: 0x2000,
            userspace_addr: 0,
            mmap_offset: 0,
        };
        assert!(matches!(
            MemoryRegion::map(fd, spec),
            Err(MemoryError::InvalidRegion(_))
        ));
    }

    #[test]
    fn mmap_offset_is_honoured_even_unaligned() {
        let fd = create_memfd("offset", 0x3000).unwrap();
        let dup = fd.try_clone().unwrap();
        let whole = GuestMemory::new(vec![Arc::new(
            MemoryRegion::map(
                dup,
                RegionSpec {
                    guest_phys_addr: 0,
                    size: 0x3000,
                    userspace_addr: 0,
                    mmap_offset: 0,
                },
            )
            .unwrap(),
        )])
        .unwrap();
        whole.write(0x1010, b"hello").unwrap();
        let part = GuestMemory::new(vec![Arc::new(
            MemoryRegion::map(
                fd,
                RegionSpec {
                    guest_phys_addr: 0x8000,
                    size: 0x100,
                    userspace_addr: 0,
                    mmap_offset: 0x1010,
                },
            )
            .unwrap(),
        )])
        .unwrap();
        let mut back = [0u8; 5];
        part.read(0x8000, &mut back).unwrap();
        assert_eq!(&back, b"hello");
    }

    #[test]
    fn removal_refuses_a_region_in_use_and_succeeds_once_released() {
        let map = GuestMemoryMap::new();
        let fd = create_memfd("hotplug", 0x1000).unwrap();
        map.add_region(
            fd,
            RegionSpec {
                guest_phys_addr: 0,
                size: 0x1000,
                userspace_addr: 0,
                mmap_offset: 0,
            },
        )
        .unwrap();
        let held = map.snapshot();
        let err = map.remove_region(0, Duration::from_millis(5)).unwrap_err();
        assert!(matches!(err, MemoryError::RegionBusy { gpa: 0, users: 1 }));
        assert_eq!(
            map.snapshot().regions().len(),
            1,
            "a refused removal leaves the region in place"
        );
        drop(held);
        map.remove_region(0, Duration::ZERO).unwrap();
        assert!(map.snapshot().regions().is_empty());
        assert!(matches!(
            map.remove_region(0, Duration::ZERO),
            Err(MemoryError::NoSuchRegion(0))
        ));
    }
}
