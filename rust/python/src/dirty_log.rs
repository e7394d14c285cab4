//! The dirty-page log for Python: the engine maps it at SET_LOG_BASE and hands it to its queues.

use std::os::raw::c_int;
use std::sync::Arc;

use pyo3::prelude::*;
use vvu_core::dirty_log::DirtyLog;

use crate::errors::to_pyerr;
use crate::memory::dup_fd;

/// A mapped dirty-page bitmap (one bit per 4 KiB guest page), shared with the front-end.
#[pyclass(name = "DirtyLog", module = "vvu._core", frozen)]
pub struct PyDirtyLog {
    pub log: Arc<DirtyLog>,
}

#[pymethods]
impl PyDirtyLog {
    /// Map `mmap_size` bytes of `fd` from `mmap_offset` on (the fd is duplicated, the caller
    /// keeps its own). With `trace`, every page marked is also remembered (`marked_pages`).
    #[new]
    #[pyo3(signature = (fd, mmap_size, mmap_offset = 0, *, trace = false))]
    fn new(fd: c_int, mmap_size: u64, mmap_offset: u64, trace: bool) -> PyResult<Self> {
        let log = DirtyLog::map(dup_fd(fd)?, mmap_size, mmap_offset).map_err(to_pyerr)?;
        let log = if trace { log.traced() } else { log };
        Ok(Self { log: Arc::new(log) })
    }

    /// With `trace`: every page marked since the log was mapped, whether or not the front-end
    /// cleared it since (empty without `trace`).
    fn marked_pages(&self) -> Vec<u64> {
        self.log.marked_pages()
    }

    /// Bytes of bitmap.
    #[getter]
    fn size(&self) -> u64 {
        self.log.size()
    }

    /// Guest-physical bytes the bitmap has bits for.
    #[getter]
    fn covers(&self) -> u64 {
        self.log.covers()
    }

    /// A SIGBUS hit the bitmap (the front-end shrank its file): `mark` fails now.
    #[getter]
    fn poisoned(&self) -> bool {
        self.log.check_poison().is_err()
    }

    /// Writes that could not be (fully) logged so far.
    #[getter]
    fn faults(&self) -> u64 {
        self.log.faults()
    }

    /// Log a write of `length` bytes at `gpa`; GuestMemoryError if part of it has no bit.
    fn mark(&self, gpa: u64, length: u64) -> PyResult<()> {
        self.log.mark(gpa, length).map_err(to_pyerr)
    }

    fn is_dirty(&self, gpa: u64) -> bool {
        self.log.is_dirty(gpa)
    }

    /// Guest addresses of the dirty pages, in order.
    fn dirty_pages(&self) -> Vec<u64> {
        self.log.dirty_pages()
    }

    /// Clear the bitmap and return the pages that were dirty (what a front-end's log sync does).
    fn take_dirty_pages(&self) -> Vec<u64> {
        self.log.take_dirty_pages()
    }

    fn __repr__(&self) -> String {
        format!(
            "DirtyLog(size={:#x}, covers={:#x}, faults={})",
            self.log.size(),
            self.log.covers(),
            self.log.faults()
        )
    }
}
