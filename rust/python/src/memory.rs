//! Guest memory for Python: `GuestMemory` (a mutable set of regions) and zero-copy buffers.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::raw::c_int;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyOSError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use vvu_core::iotlb::{perm_from_access, Iotlb};
use vvu_core::memory::{create_memfd, GuestMemory, GuestMemoryMap, MemoryRegion, RegionSpec};
use vvu_core::MemoryError;

use crate::errors::to_pyerr;

/// Duplicate a caller's fd (close-on-exec) so the region owns its own copy.
pub fn dup_fd(fd: c_int) -> PyResult<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd`; an invalid fd yields -1 and errno.
    let raw = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if raw < 0 {
        return Err(PyOSError::new_err(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Create an anonymous memfd of `size` bytes and return its fd (the caller owns it).
#[pyfunction]
#[pyo3(signature = (size, name = "vvu-guest"))]
pub fn memfd(size: u64, name: &str) -> PyResult<c_int> {
    use std::os::fd::IntoRawFd;
    Ok(create_memfd(name, size).map_err(to_pyerr)?.into_raw_fd())
}

/// A new fd (the caller owns it) for the process-wide eventfd that the SIGBUS handler signals
/// each time it catches a fault in guest memory (a front-end shrank a file under our mappings);
/// readable until its counter is read. See `vvu_core::sigbus`.
#[pyfunction]
pub fn memory_fault_fd() -> PyResult<c_int> {
    use std::os::fd::IntoRawFd;
    Ok(vvu_core::sigbus::fault_fd()
        .map_err(to_pyerr)?
        .into_raw_fd())
}

/// How many SIGBUS faults in guest memory were caught since the process started.
#[pyfunction]
pub fn memory_faults() -> u64 {
    vvu_core::sigbus::faults()
}

/// Where one region sits.
#[pyclass(module = "vvu._core", frozen, get_all)]
#[derive(Clone)]
pub struct RegionInfo {
    guest_phys_addr: u64,
    size: u64,
    userspace_addr: u64,
    mmap_offset: u64,
}

#[pymethods]
impl RegionInfo {
    fn __repr__(&self) -> String {
        format!(
            "RegionInfo(guest_phys_addr={:#x}, size={:#x}, userspace_addr={:#x}, mmap_offset={:#x})",
            self.guest_phys_addr, self.size, self.userspace_addr, self.mmap_offset
        )
    }
}

impl From<&RegionSpec> for RegionInfo {
    fn from(s: &RegionSpec) -> Self {
        Self {
            guest_phys_addr: s.guest_phys_addr,
            size: s.size,
            userspace_addr: s.userspace_addr,
            mmap_offset: s.mmap_offset,
        }
    }
}

/// A window of guest memory exported through the buffer protocol. It holds its region, so the
/// mapping stays alive for as long as any memoryview of it exists.
#[pyclass(module = "vvu._core", frozen)]
pub struct GuestBuffer {
    _region: Arc<MemoryRegion>,
    ptr: usize,
    len: usize,
    readonly: bool,
}

#[pymethods]
impl GuestBuffer {
    /// # Safety
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        if this.readonly && (flags & ffi::PyBUF_WRITABLE) != 0 {
            return Err(PyBufferError::new_err(
                "this guest buffer is device-readable only; it cannot be written",
            ));
        }
        // SAFETY: `ptr..ptr+len` lies inside `_region`'s mapping, which lives as long as `slf`;
        // FillInfo stores a new reference to `slf` in `view.obj`, keeping it alive until release.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                this.ptr as *mut std::ffi::c_void,
                this.len as ffi::Py_ssize_t,
                c_int::from(this.readonly),
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.len
    }
}

/// A memoryview of `[gpa, gpa+len)`, which must be contiguous in one region of `memory`.
pub fn guest_view<'py>(
    py: Python<'py>,
    memory: &GuestMemory,
    gpa: u64,
    len: u64,
    readonly: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let region = memory
        .find_region(gpa)
        .ok_or(MemoryError::OutOfRange { addr: gpa, len })
        .map_err(to_pyerr)?
        .clone();
    let slice = memory.slice_exact(gpa, len).map_err(to_pyerr)?;
    let buffer = Bound::new(
        py,
        GuestBuffer {
            _region: region,
            ptr: slice.as_ptr() as usize,
            len: slice.len(),
            readonly,
        },
    )?;
    // SAFETY: `buffer` is a live object implementing the buffer protocol; the call returns a new
    // reference or NULL with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyMemoryView_FromObject(buffer.as_ptr())) }
}

/// Guest memory: a set of regions mapped MAP_SHARED from fds, addressable by guest-physical
/// address. Regions can be added and removed at run time.
#[pyclass(name = "GuestMemory", module = "vvu._core", frozen)]
pub struct PyGuestMemory {
    map: GuestMemoryMap,
}

impl PyGuestMemory {
    pub fn snapshot(&self) -> GuestMemory {
        self.map.snapshot()
    }

    fn wrap(memory: GuestMemory) -> Self {
        let map = GuestMemoryMap::new();
        map.replace(memory);
        Self { map }
    }
}

#[pymethods]
impl PyGuestMemory {
    #[new]
    fn new() -> Self {
        Self {
            map: GuestMemoryMap::new(),
        }
    }

    /// Map `size` bytes of `fd` from `mmap_offset` at guest-physical `guest_phys_addr`. The fd is
    /// duplicated; the caller keeps its own. `userspace_addr` defaults to `guest_phys_addr`.
    #[pyo3(signature = (fd, guest_phys_addr, size, userspace_addr = None, mmap_offset = 0))]
    fn add_region(
        &self,
        fd: c_int,
        guest_phys_addr: u64,
        size: u64,
        userspace_addr: Option<u64>,
        mmap_offset: u64,
    ) -> PyResult<RegionInfo> {
        let spec = RegionSpec {
            guest_phys_addr,
            size,
            userspace_addr: userspace_addr.unwrap_or(guest_phys_addr),
            mmap_offset,
        };
        let region = self.map.add_region(dup_fd(fd)?, spec).map_err(to_pyerr)?;
        Ok(region.spec().into())
    }

    /// Remove and unmap the region starting at `guest_phys_addr`. If a buffer, queue or worker
    /// still uses it, wait up to `timeout` seconds, then raise `GuestMemoryError`.
    #[pyo3(signature = (guest_phys_addr, timeout = 0.0))]
    fn remove_region(&self, py: Python<'_>, guest_phys_addr: u64, timeout: f64) -> PyResult<()> {
        let timeout = Duration::try_from_secs_f64(timeout).map_err(|_| {
            PyValueError::new_err("timeout must be a non-negative number of seconds")
        })?;
        // Release the GIL: the holder we wait for may be a Python thread dropping a memoryview.
        py.detach(|| self.map.remove_region(guest_phys_addr, timeout))
            .map_err(to_pyerr)
    }

    /// The regions, sorted by guest-physical address.
    #[getter]
    fn regions(&self) -> Vec<RegionInfo> {
        self.snapshot()
            .regions()
            .iter()
            .map(|r| r.spec().into())
            .collect()
    }

    /// Copy `length` bytes from guest-physical `gpa` (may span regions).
    fn read<'py>(&self, py: Python<'py>, gpa: u64, length: usize) -> PyResult<Bound<'py, PyBytes>> {
        let memory = self.snapshot();
        PyBytes::new_with(py, length, |buf| memory.read(gpa, buf).map_err(to_pyerr))
    }

    /// Copy a bytes-like object into guest memory at `gpa` (may span regions; all or nothing).
    fn write(&self, py: Python<'_>, gpa: u64, data: PyBuffer<u8>) -> PyResult<()> {
        let bytes = data.to_vec(py)?;
        self.snapshot().write(gpa, &bytes).map_err(to_pyerr)
    }

    /// A zero-copy writable memoryview of `[gpa, gpa+length)`, which must lie in one region. The
    /// view keeps the region mapped: removing the region while it lives fails.
    fn view<'py>(&self, py: Python<'py>, gpa: u64, length: u64) -> PyResult<Bound<'py, PyAny>> {
        guest_view(py, &self.snapshot(), gpa, length, false)
    }

    /// Translate a front-end virtual address (as in SET_VRING_ADDR) to guest-physical.
    fn uva_to_gpa(&self, uva: u64) -> PyResult<u64> {
        self.snapshot().uva_to_gpa(uva).map_err(to_pyerr)
    }

    fn load_u16(&self, gpa: u64) -> PyResult<u16> {
        self.snapshot()
            .load_u16(gpa, Ordering::Acquire)
            .map_err(to_pyerr)
    }
    fn load_u32(&self, gpa: u64) -> PyResult<u32> {
        self.snapshot()
            .load_u32(gpa, Ordering::Acquire)
            .map_err(to_pyerr)
    }
    fn load_u64(&self, gpa: u64) -> PyResult<u64> {
        self.snapshot()
            .load_u64(gpa, Ordering::Acquire)
            .map_err(to_pyerr)
    }
    fn store_u16(&self, gpa: u64, value: u16) -> PyResult<()> {
        self.snapshot()
            .store_u16(gpa, value, Ordering::Release)
            .map_err(to_pyerr)
    }
    fn store_u32(&self, gpa: u64, value: u32) -> PyResult<()> {
        self.snapshot()
            .store_u32(gpa, value, Ordering::Release)
            .map_err(to_pyerr)
    }
    fn store_u64(&self, gpa: u64, value: u64) -> PyResult<()> {
        self.snapshot()
            .store_u64(gpa, value, Ordering::Release)
            .map_err(to_pyerr)
    }

    /// A SIGBUS hit one of the regions (the front-end shrank its file): every access fails now.
    #[getter]
    fn poisoned(&self) -> bool {
        self.snapshot().is_poisoned()
    }

    /// Addresses are IOVAs: a view made by `Iotlb.view`.
    #[getter]
    fn is_iova(&self) -> bool {
        self.snapshot().is_iova()
    }

    fn __repr__(&self) -> String {
        let regions = self.regions();
        let total: u64 = regions.iter().map(|r| r.size).sum();
        let kind = if self.is_iova() { "IOVA " } else { "" };
        format!(
            "GuestMemory({kind}{} regions, {total:#x} bytes)",
            regions.len()
        )
    }
}

/// The device IOTLB of VIRTIO_F_ACCESS_PLATFORM: IOVA ranges translated to front-end userspace
/// addresses with a permission (1 RO, 2 WO, 3 RW, as in vhost-user IOTLB messages).
#[pyclass(name = "Iotlb", module = "vvu._core")]
#[derive(Default)]
pub struct PyIotlb {
    iotlb: Iotlb,
}

#[pymethods]
impl PyIotlb {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Add a translation; `[uaddr, uaddr + size)` must lie in one region of `memory`. Replaces
    /// the entries it overlaps.
    fn update(
        &mut self,
        iova: u64,
        size: u64,
        uaddr: u64,
        perm: u8,
        memory: &PyGuestMemory,
    ) -> PyResult<()> {
        self.iotlb
            .update(iova, size, uaddr, perm, &memory.snapshot())
            .map_err(to_pyerr)
    }

    /// Drop the translations of `[iova, iova + size)`; whether any existed.
    fn invalidate(&mut self, iova: u64, size: u64) -> PyResult<bool> {
        self.iotlb.invalidate(iova, size).map_err(to_pyerr)
    }

    /// `(iova, size, uaddr, perm)` of every entry, by IOVA.
    #[getter]
    fn entries(&self) -> Vec<(u64, u64, u64, u8)> {
        self.iotlb
            .entries()
            .map(|e| (e.iova, e.size, e.uaddr, perm_from_access(e.access)))
            .collect()
    }

    /// Guest memory addressed by IOVA, as the queues see it under this IOTLB: windows into
    /// `memory`'s regions (shared mappings) with each entry's permission.
    fn view(&self, memory: &PyGuestMemory) -> PyResult<PyGuestMemory> {
        let view = self.iotlb.snapshot(&memory.snapshot()).map_err(to_pyerr)?;
        Ok(PyGuestMemory::wrap(view))
    }

    fn __len__(&self) -> usize {
        self.iotlb.len()
    }

    fn __repr__(&self) -> String {
        format!("Iotlb({} entries)", self.iotlb.len())
    }
}
