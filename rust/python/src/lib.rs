//! `vvu._core`: PyO3 bindings for vvu-core. This crate only translates types and errors; all
//! behaviour lives in vvu-core.

use pyo3::prelude::*;

mod bench;
mod dirty_log;
mod errors;
mod inflight;
mod memory;
mod net;
mod notify;
mod queue;
mod worker;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The SIGBUS handler for guest memory (docs/architecture.md, "Memory a peer cannot pull
    // away"): installed now, after any faulthandler set up at start-up, and re-checked at
    // every mapping.
    vvu_core::sigbus::init().map_err(|e| pyo3::exceptions::PyOSError::new_err(e.to_string()))?;
    m.add_class::<dirty_log::PyDirtyLog>()?;
    m.add_class::<memory::PyGuestMemory>()?;
    m.add_class::<inflight::PyInflightRegion>()?;
    m.add_class::<memory::GuestBuffer>()?;
    m.add_class::<memory::RegionInfo>()?;
    m.add_class::<memory::PyIotlb>()?;
    m.add_class::<queue::PySplitQueue>()?;
    m.add_class::<queue::PySplitQueueDriver>()?;
    m.add_class::<queue::PyPackedQueue>()?;
    m.add_class::<queue::PyPackedQueueDriver>()?;
    m.add_class::<queue::DescriptorChain>()?;
    m.add_class::<notify::PyEventFd>()?;
    m.add_class::<notify::PyPoller>()?;
    m.add_class::<notify::PyEventForwarder>()?;
    m.add_class::<worker::NativeHandler>()?;
    m.add_class::<worker::PyQueueWorker>()?;
    m.add_class::<net::PyNetPort>()?;
    m.add_class::<net::PySwitch>()?;
    m.add_function(wrap_pyfunction!(memory::memfd, m)?)?;
    m.add_function(wrap_pyfunction!(queue::writable_views, m)?)?;
    m.add_function(wrap_pyfunction!(bench::blk_bench, m)?)?;
    m.add_function(wrap_pyfunction!(worker::blk_probe, m)?)?;
    m.add_function(wrap_pyfunction!(worker::io_uring_unavailable, m)?)?;
    m.add_function(wrap_pyfunction!(memory::memory_fault_fd, m)?)?;
    m.add_function(wrap_pyfunction!(memory::memory_faults, m)?)?;
    m.add_function(wrap_pyfunction!(worker::nbd_probe, m)?)?;
    Ok(())
}
