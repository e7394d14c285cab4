//! The INFLIGHT_SHMFD region for Python: allocated for GET_INFLIGHT_FD, mapped for
//! SET_INFLIGHT_FD, handed to `SplitQueue.set_inflight` or `PackedQueue.set_inflight`.

use std::os::fd::AsRawFd;
use std::os::raw::c_int;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use vvu_core::inflight::{InflightRegion, RingLayout};

use crate::errors::to_pyerr;
use crate::memory::dup_fd;

fn layout(packed: bool) -> RingLayout {
    if packed {
        RingLayout::Packed
    } else {
        RingLayout::Split
    }
}

fn u16_arg(name: &str, value: u32) -> PyResult<u16> {
    u16::try_from(value).map_err(|_| PyValueError::new_err(format!("{name} {value} is too large")))
}

/// A shared inflight region: one queue region per queue, laid out as vhost-user specifies.
#[pyclass(name = "InflightRegion", module = "vvu._core", frozen)]
pub struct PyInflightRegion {
    region: Arc<InflightRegion>,
}

impl PyInflightRegion {
    pub(crate) fn region(&self) -> &Arc<InflightRegion> {
        &self.region
    }
}

#[pymethods]
impl PyInflightRegion {
    /// A fresh, zeroed region in a new memfd (GET_INFLIGHT_FD).
    #[staticmethod]
    #[pyo3(signature = (num_queues, queue_size, *, packed = false))]
    fn allocate(num_queues: u32, queue_size: u32, packed: bool) -> PyResult<Self> {
        let region = InflightRegion::allocate(
            layout(packed),
            u16_arg("num_queues", num_queues)?,
            u16_arg("queue_size", queue_size)?,
        )
        .map_err(to_pyerr)?;
        Ok(Self {
            region: Arc::new(region),
        })
    }

    /// Map a region the front-end handed back (SET_INFLIGHT_FD); `fd` is duplicated.
    #[staticmethod]
    #[pyo3(signature = (fd, mmap_size, mmap_offset, num_queues, queue_size, *, packed = false))]
    fn map(
        fd: c_int,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u32,
        queue_size: u32,
        packed: bool,
    ) -> PyResult<Self> {
        let region = InflightRegion::map(
            dup_fd(fd)?,
            mmap_size,
            mmap_offset,
            layout(packed),
            u16_arg("num_queues", num_queues)?,
            u16_arg("queue_size", queue_size)?,
        )
        .map_err(to_pyerr)?;
        Ok(Self {
            region: Arc::new(region),
        })
    }

    /// Bytes of the region (the reply's mmap_size; its mmap_offset is 0).
    #[getter]
    fn mmap_size(&self) -> u64 {
        self.region.mmap_size()
    }

    /// A SIGBUS hit the region (the front-end shrank its file): its queues break.
    #[getter]
    fn poisoned(&self) -> bool {
        self.region.check_poison().is_err()
    }

    #[getter]
    fn num_queues(&self) -> u16 {
        self.region.num_queues()
    }

    #[getter]
    fn queue_size(&self) -> u16 {
        self.region.queue_size()
    }

    #[getter]
    fn packed(&self) -> bool {
        self.region.layout() == RingLayout::Packed
    }

    /// The region's fd, still owned by the region (send a copy of it, never close it).
    fn fileno(&self) -> c_int {
        self.region.fd().as_raw_fd()
    }

    fn __repr__(&self) -> String {
        format!(
            "InflightRegion({} queues of {}, {} bytes, {})",
            self.region.num_queues(),
            self.region.queue_size(),
            self.region.mmap_size(),
            if self.packed() { "packed" } else { "split" }
        )
    }
}
