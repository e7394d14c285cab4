//! Virtqueues for Python: the device side (`SplitQueue`, `PackedQueue`, `DescriptorChain`) and
//! the driver side (`SplitQueueDriver`, `PackedQueueDriver`).

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use vvu_core::bench::DriverRing;
use vvu_core::dirty_log::QueueLog;
use vvu_core::memory::GuestMemory;
use vvu_core::queue::{
    ChainBatch, PackedConfig, PackedQueue, PackedQueueDriver, QueueConfig, RingPosition,
    SplitQueue, SplitQueueDriver, Virtqueue,
};
use vvu_core::QueueError;

use crate::dirty_log::PyDirtyLog;
use crate::errors::to_pyerr;
use crate::inflight::PyInflightRegion;
use crate::memory::{guest_view, PyGuestMemory};

fn config(
    size: u32,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    event_idx: bool,
    indirect: bool,
) -> PyResult<QueueConfig> {
    let size = u16::try_from(size)
        .map_err(|_| PyValueError::new_err(format!("queue size {size} is larger than 32768")))?;
    Ok(QueueConfig {
        size,
        desc_table,
        avail_ring,
        used_ring,
        event_idx,
        indirect,
    })
}

/// One descriptor chain popped from a device-side queue. Its buffers are zero-copy memoryviews
/// into guest memory: `readable` ones are read-only, `writable` ones writable.
#[pyclass(module = "vvu._core", frozen)]
pub struct DescriptorChain {
    #[pyo3(get)]
    head: u16,
    #[pyo3(get)]
    readable_len: u32,
    #[pyo3(get)]
    writable_len: u32,
    readable: Vec<(u64, u32)>,
    writable: Vec<(u64, u32)>,
    memory: GuestMemory,
}

impl DescriptorChain {
    fn views<'py>(
        &self,
        py: Python<'py>,
        segments: &[(u64, u32)],
        readonly: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let views = segments
            .iter()
            .map(|&(gpa, len)| guest_view(py, &self.memory, gpa, u64::from(len), readonly))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, views)
    }
}

#[pymethods]
impl DescriptorChain {
    /// The device-readable buffers (read-only memoryviews), in chain order.
    #[getter]
    fn readable<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.views(py, &self.readable, true)
    }

    /// The device-writable buffers (writable memoryviews), in chain order.
    #[getter]
    fn writable<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.views(py, &self.writable, false)
    }

    /// All device-readable bytes, concatenated (a copy).
    fn read<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        PyBytes::new_with(py, self.readable_len as usize, |buf| {
            let mut offset = 0usize;
            for &(gpa, len) in &self.readable {
                let end = offset + len as usize;
                self.memory
                    .read(gpa, &mut buf[offset..end])
                    .map_err(to_pyerr)?;
                offset = end;
            }
            Ok(())
        })
    }

    /// Copy `data` into the device-writable buffers from byte `offset` on; returns how many
    /// bytes fitted.
    #[pyo3(signature = (data, offset = 0))]
    fn write(&self, py: Python<'_>, data: PyBuffer<u8>, offset: usize) -> PyResult<usize> {
        let data = data.to_vec(py)?;
        let (mut skip, mut done) = (offset, 0usize);
        for &(gpa, len) in &self.writable {
            let len = len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(data.len() - done);
            self.memory
                .write(gpa + skip as u64, &data[done..done + n])
                .map_err(to_pyerr)?;
            done += n;
            skip = 0;
            if done == data.len() {
                break;
            }
        }
        Ok(done)
    }

    fn __repr__(&self) -> String {
        format!(
            "DescriptorChain(head={}, readable={} bytes in {}, writable={} bytes in {})",
            self.head,
            self.readable_len,
            self.readable.len(),
            self.writable_len,
            self.writable.len()
        )
    }
}

/// The writable buffers of every chain of a batch, flattened in order: what a handler that fills
/// a whole batch with one `readv` needs, in one call instead of one `writable` list per chain
/// (measured: about half the cost per buffer).
#[pyfunction]
pub fn writable_views<'py>(
    py: Python<'py>,
    chains: Vec<PyRef<'py, DescriptorChain>>,
) -> PyResult<Bound<'py, PyList>> {
    let mut views = Vec::with_capacity(chains.len());
    for chain in &chains {
        for &(gpa, len) in &chain.writable {
            views.push(guest_view(py, &chain.memory, gpa, u64::from(len), false)?);
        }
    }
    PyList::new(py, views)
}

/// What both device-side queue classes hold: the queue (absent while a worker runs it) and a
/// reused batch.
struct QueueCore {
    queue: Option<Virtqueue>,
    batch: ChainBatch,
}

impl QueueCore {
    fn new(queue: Virtqueue) -> Self {
        Self {
            queue: Some(queue),
            batch: ChainBatch::new(),
        }
    }

    fn handed_over() -> PyErr {
        to_pyerr(QueueError::InvalidConfig(
            "the queue was handed to a worker".into(),
        ))
    }

    fn queue(&mut self) -> PyResult<&mut Virtqueue> {
        self.queue.as_mut().ok_or_else(Self::handed_over)
    }

    fn take(&mut self) -> PyResult<Virtqueue> {
        self.queue.take().ok_or_else(Self::handed_over)
    }

    fn attach(&mut self, memory: &PyGuestMemory) -> PyResult<()> {
        let snapshot = memory.snapshot();
        self.queue()?.attach(snapshot).map_err(to_pyerr)
    }

    fn pop(&mut self, max_chains: usize) -> PyResult<Vec<DescriptorChain>> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        let queue = self.queue()?;
        let result = queue.pop_batch(&mut batch, max_chains);
        let memory = queue.memory().cloned().unwrap_or_default();
        let chains = batch
            .iter()
            .map(|chain| DescriptorChain {
                head: chain.head(),
                readable_len: chain.readable_len(),
                writable_len: chain.writable_len(),
                readable: chain.readable().iter().map(|s| (s.gpa, s.len)).collect(),
                writable: chain.writable().iter().map(|s| (s.gpa, s.len)).collect(),
                memory: memory.clone(),
            })
            .collect();
        self.batch = batch;
        result.map_err(to_pyerr)?;
        Ok(chains)
    }
}

/// The Python class of a queue a worker hands back.
pub fn wrap_queue(py: Python<'_>, queue: Virtqueue) -> PyResult<Py<PyAny>> {
    Ok(if queue.is_packed() {
        Py::new(py, PyPackedQueue::wrap(queue))?.into_any()
    } else {
        Py::new(py, PySplitQueue::wrap(queue))?.into_any()
    })
}

/// The queue inside a `SplitQueue` or `PackedQueue` object, handed over to a worker.
pub fn take_queue(queue: &Bound<'_, PyAny>) -> PyResult<Virtqueue> {
    if let Ok(split) = queue.cast::<PySplitQueue>() {
        return split.borrow_mut().core.take();
    }
    if let Ok(packed) = queue.cast::<PyPackedQueue>() {
        return packed.borrow_mut().core.take();
    }
    Err(pyo3::exceptions::PyTypeError::new_err(
        "expected a SplitQueue or a PackedQueue",
    ))
}

/// The methods both device-side queue classes share, forwarded to `QueueCore`.
macro_rules! device_queue_methods {
    ($class:ident, { $($extra:tt)* }) => {
        impl $class {
            pub fn wrap(queue: Virtqueue) -> Self {
                Self {
                    core: QueueCore::new(queue),
                }
            }
        }

        #[pymethods]
        impl $class {
            /// Translate the rings in the current snapshot of `memory` and start using it
            /// (again). The queue keeps that snapshot mapped until it is re-attached or detached.
            fn attach(&mut self, memory: &PyGuestMemory) -> PyResult<()> {
                self.core.attach(memory)
            }

            fn detach(&mut self) -> PyResult<()> {
                self.core.queue()?.detach();
                Ok(())
            }

            /// Pop up to `max_chains` available chains. Fewer may come back while more are
            /// available: a pop stops once it walked 65536 descriptors or collected 65536
            /// segments (docs/architecture.md, "Limits"); pop again for the rest.
            #[pyo3(signature = (max_chains = 64))]
            fn pop(&mut self, max_chains: usize) -> PyResult<Vec<DescriptorChain>> {
                self.core.pop(max_chains)
            }

            /// Return chain `head` with `length` bytes written into its writable part (not yet
            /// visible).
            fn push_used(&mut self, head: u16, length: u32) -> PyResult<()> {
                self.core.queue()?.push_used(head, length).map_err(to_pyerr)
            }

            /// `push_used` for a whole batch: chain `chains[i]` with `lengths[i]` bytes written.
            /// Stops at the first failure (the chains before it stay pushed).
            fn push_used_many(
                &mut self,
                chains: Vec<PyRef<'_, DescriptorChain>>,
                lengths: Vec<u32>,
            ) -> PyResult<()> {
                if chains.len() != lengths.len() {
                    return Err(PyValueError::new_err(format!(
                        "{} used lengths for {} chains",
                        lengths.len(),
                        chains.len()
                    )));
                }
                let queue = self.core.queue()?;
                for (chain, length) in chains.iter().zip(lengths) {
                    queue.push_used(chain.head, length).map_err(to_pyerr)?;
                }
                Ok(())
            }

            /// Publish the used entries pushed so far; True when the driver wants a
            /// notification.
            fn publish_used(&mut self) -> PyResult<bool> {
                self.core.queue()?.publish_used().map_err(to_pyerr)
            }

            /// Ask the driver for kicks again; True if work arrived meanwhile (process it, don't
            /// sleep).
            fn enable_notifications(&mut self) -> PyResult<bool> {
                self.core.queue()?.enable_notifications().map_err(to_pyerr)
            }

            fn disable_notifications(&mut self) -> PyResult<()> {
                self.core.queue()?.disable_notifications().map_err(to_pyerr)
            }

            /// Chains available and not yet popped.
            fn pending(&mut self) -> PyResult<u16> {
                self.core.queue()?.pending().map_err(to_pyerr)
            }

            /// What vhost-user GET_VRING_BASE reports and SET_VRING_BASE sets.
            #[getter]
            fn get_vring_base(&mut self) -> PyResult<u32> {
                Ok(self.core.queue()?.vring_base())
            }

            #[setter]
            fn set_vring_base(&mut self, value: u32) -> PyResult<()> {
                self.core.queue()?.set_vring_base(value).map_err(to_pyerr)
            }

            #[getter]
            fn next_used(&mut self) -> PyResult<u16> {
                Ok(self.core.queue()?.next_used())
            }

            #[getter]
            fn size(&mut self) -> PyResult<u16> {
                Ok(self.core.queue()?.size())
            }

            /// Why the queue is broken, or None.
            #[getter]
            fn broken_reason(&mut self) -> PyResult<Option<String>> {
                Ok(self.core.queue()?.broken_reason().map(str::to_owned))
            }

            /// Track the queue in queue `index` of an inflight region (INFLIGHT_SHMFD), after
            /// attach and setting vring_base. Returns how many chains left in flight by a
            /// previous back-end will be handed out first, and why the region's content was
            /// discarded (None if it was fresh or sound). The positions are recomputed from the
            /// region when it held state.
            fn set_inflight(
                &mut self,
                region: &PyInflightRegion,
                index: u16,
            ) -> PyResult<(usize, Option<String>)> {
                let region = region.region();
                let (resubmit, discarded) = match self.core.queue()? {
                    Virtqueue::Split(queue) => {
                        let view = region.split_queue(index, queue.size()).map_err(to_pyerr)?;
                        let recovery = queue.set_inflight(view).map_err(to_pyerr)?;
                        (recovery.resubmit.len(), recovery.discarded)
                    }
                    Virtqueue::Packed(queue) => {
                        let view = region.packed_queue(index, queue.size()).map_err(to_pyerr)?;
                        let recovery = queue.set_inflight(view).map_err(to_pyerr)?;
                        (recovery.resubmit.len(), recovery.discarded)
                    }
                };
                Ok((resubmit, discarded))
            }

            /// Log this queue's writes to guest memory into `log` (None: stop logging). Writes to
            /// the used ring (split) or the device event suppression area (packed) are logged
            /// at `used_ring_log` (SET_VRING_ADDR's log address) when it is given; the packed
            /// ring's used descriptors by their guest address in the descriptor ring. Set it
            /// before popping: a packed chain popped before cannot be logged when it completes.
            #[pyo3(signature = (log, used_ring_log = None))]
            fn set_log(
                &mut self,
                log: Option<&PyDirtyLog>,
                used_ring_log: Option<u64>,
            ) -> PyResult<()> {
                self.core.queue()?.set_log(log.map(|log| QueueLog {
                    log: log.log.clone(),
                    used_ring: used_ring_log,
                }));
                Ok(())
            }

            $($extra)*
        }
    };
}

/// The device side of a split virtqueue: pop chains the driver made available, return them used.
#[pyclass(name = "SplitQueue", module = "vvu._core")]
pub struct PySplitQueue {
    core: QueueCore,
}

device_queue_methods!(PySplitQueue, {
    /// A queue of `size` descriptors whose three parts are at the given guest-physical addresses.
    #[new]
    #[pyo3(signature = (size, desc_table, avail_ring, used_ring, *, event_idx = false, indirect = true))]
    fn new(
        size: u32,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
        event_idx: bool,
        indirect: bool,
    ) -> PyResult<Self> {
        let config = config(size, desc_table, avail_ring, used_ring, event_idx, indirect)?;
        let queue = SplitQueue::new(config).map_err(to_pyerr)?;
        Ok(Self::wrap(queue.into()))
    }

    /// The next avail index the device will process (vhost-user GET/SET_VRING_BASE).
    #[getter]
    fn get_next_avail(&mut self) -> PyResult<u16> {
        Ok(self.core.queue()?.next_avail())
    }

    #[setter]
    fn set_next_avail(&mut self, value: u16) -> PyResult<()> {
        self.core
            .queue()?
            .set_vring_base(u32::from(value))
            .map_err(to_pyerr)
    }
});

/// The device side of a packed virtqueue (VIRTIO_F_RING_PACKED): the same methods as
/// `SplitQueue`; a chain's `head` is its buffer id.
#[pyclass(name = "PackedQueue", module = "vvu._core")]
pub struct PyPackedQueue {
    core: QueueCore,
}

device_queue_methods!(PyPackedQueue, {
    /// A queue of `size` descriptors (any size up to 32768) whose descriptor ring and event
    /// suppression areas are at the given guest-physical addresses.
    #[new]
    #[pyo3(signature = (size, desc_ring, driver_event, device_event, *, event_idx = false, indirect = true))]
    fn new(
        size: u32,
        desc_ring: u64,
        driver_event: u64,
        device_event: u64,
        event_idx: bool,
        indirect: bool,
    ) -> PyResult<Self> {
        let config = config(
            size,
            desc_ring,
            driver_event,
            device_event,
            event_idx,
            indirect,
        )?;
        let queue = PackedQueue::new(PackedConfig::from_split_names(&config)).map_err(to_pyerr)?;
        Ok(Self::wrap(queue.into()))
    }

    /// The next available position: offset in bits 0-14, wrap counter in bit 15.
    #[getter]
    fn next_avail(&mut self) -> PyResult<u16> {
        Ok(self.core.queue()?.next_avail())
    }
});

fn driver_handed_over() -> PyErr {
    to_pyerr(QueueError::InvalidConfig(
        "the driver was handed to a native loop".into(),
    ))
}

/// The driver inside a `SplitQueueDriver` or `PackedQueueDriver` object, handed over to a native
/// loop (`vvu bench`); the Python object refuses every use afterwards.
pub fn take_driver(driver: &Bound<'_, PyAny>) -> PyResult<Box<dyn DriverRing>> {
    if let Ok(split) = driver.cast::<PySplitQueueDriver>() {
        let taken = split.borrow_mut().driver.take();
        return Ok(Box::new(taken.ok_or_else(driver_handed_over)?));
    }
    if let Ok(packed) = driver.cast::<PyPackedQueueDriver>() {
        let taken = packed.borrow_mut().driver.take();
        return Ok(Box::new(taken.ok_or_else(driver_handed_over)?));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(
        "expected a SplitQueueDriver or a PackedQueueDriver",
    ))
}

/// The methods both driver-side queue classes share. A chain's head is its head descriptor
/// (split) or its buffer id (packed).
macro_rules! driver_queue_methods {
    ($class:ident, $driver:ty, { $($extra:tt)* }) => {
        impl $class {
            fn driver(&mut self) -> PyResult<&mut $driver> {
                self.driver.as_mut().ok_or_else(driver_handed_over)
            }

            fn driver_ref(&self) -> PyResult<&$driver> {
                self.driver.as_ref().ok_or_else(driver_handed_over)
            }
        }

        #[pymethods]
        impl $class {
            /// Make a chain of `readable` then `writable` (gpa, length) buffers available
            /// (unpublished); returns its head. Raises QueueError when out of descriptors.
            #[pyo3(signature = (readable, writable = Vec::new()))]
            fn add_chain(
                &mut self,
                readable: Vec<(u64, u32)>,
                writable: Vec<(u64, u32)>,
            ) -> PyResult<u16> {
                self.driver()?
                    .add_chain(&readable, &writable)
                    .map_err(to_pyerr)
            }

            /// Like add_chain, through an indirect table of 16·n bytes at `table` (one ring
            /// descriptor).
            #[pyo3(signature = (table, readable, writable = Vec::new()))]
            fn add_indirect(
                &mut self,
                table: u64,
                readable: Vec<(u64, u32)>,
                writable: Vec<(u64, u32)>,
            ) -> PyResult<u16> {
                self.driver()?
                    .add_indirect(table, &readable, &writable)
                    .map_err(to_pyerr)
            }

            /// Publish the chains added so far; True when the device wants a kick.
            fn publish(&mut self) -> PyResult<bool> {
                self.driver()?.publish().map_err(to_pyerr)
            }

            /// The next used (head, length), or None.
            fn reap_used(&mut self) -> PyResult<Option<(u16, u32)>> {
                self.driver()?.reap_used().map_err(to_pyerr)
            }

            /// Every used (head, length) available now.
            fn reap_all(&mut self) -> PyResult<Vec<(u16, u32)>> {
                let mut used = Vec::new();
                while let Some(entry) = self.driver()?.reap_used().map_err(to_pyerr)? {
                    used.push(entry);
                }
                Ok(used)
            }

            /// Ask the device for used-buffer notifications; True if entries arrived meanwhile.
            fn enable_call_notifications(&mut self) -> PyResult<bool> {
                self.driver()?.enable_call_notifications().map_err(to_pyerr)
            }

            fn disable_call_notifications(&mut self) -> PyResult<()> {
                self.driver()?.disable_call_notifications().map_err(to_pyerr)
            }

            #[getter]
            fn free_descriptors(&self) -> PyResult<usize> {
                Ok(self.driver_ref()?.free_descriptors())
            }

            #[getter]
            fn in_flight(&self) -> PyResult<usize> {
                Ok(self.driver_ref()?.in_flight())
            }

            #[getter]
            fn broken_reason(&self) -> PyResult<Option<String>> {
                Ok(self.driver_ref()?.broken_reason().map(str::to_owned))
            }

            $($extra)*
        }
    };
}

/// The driver side of a split virtqueue, laid out in guest memory this side owns.
#[pyclass(name = "SplitQueueDriver", module = "vvu._core")]
pub struct PySplitQueueDriver {
    /// None once handed to a native loop (`take_driver`).
    driver: Option<SplitQueueDriver>,
}

driver_queue_methods!(PySplitQueueDriver, SplitQueueDriver, {
    /// Zero the ring areas in `memory` and start with avail/used index `start_index`.
    #[new]
    #[pyo3(signature = (memory, size, desc_table, avail_ring, used_ring, *, event_idx = false, start_index = 0))]
    fn new(
        memory: &PyGuestMemory,
        size: u32,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
        event_idx: bool,
        start_index: u16,
    ) -> PyResult<Self> {
        let config = config(size, desc_table, avail_ring, used_ring, event_idx, true)?;
        let driver = SplitQueueDriver::with_start_index(memory.snapshot(), config, start_index)
            .map_err(to_pyerr)?;
        Ok(Self {
            driver: Some(driver),
        })
    }

    #[getter]
    fn avail_idx(&self) -> PyResult<u16> {
        Ok(self.driver_ref()?.avail_idx())
    }
});

/// The driver side of a packed virtqueue, laid out in guest memory this side owns. Same methods
/// as `SplitQueueDriver`; heads are buffer ids.
#[pyclass(name = "PackedQueueDriver", module = "vvu._core")]
pub struct PyPackedQueueDriver {
    /// None once handed to a native loop (`take_driver`).
    driver: Option<PackedQueueDriver>,
}

driver_queue_methods!(PyPackedQueueDriver, PackedQueueDriver, {
    /// Zero the ring areas in `memory` and start at slot 0 with wrap counter 1.
    #[new]
    #[pyo3(signature = (memory, size, desc_ring, driver_event, device_event, *, event_idx = false))]
    fn new(
        memory: &PyGuestMemory,
        size: u32,
        desc_ring: u64,
        driver_event: u64,
        device_event: u64,
        event_idx: bool,
    ) -> PyResult<Self> {
        let config = config(size, desc_ring, driver_event, device_event, event_idx, true)?;
        let driver = PackedQueueDriver::with_start(
            memory.snapshot(),
            PackedConfig::from_split_names(&config),
            RingPosition::START,
        )
        .map_err(to_pyerr)?;
        Ok(Self {
            driver: Some(driver),
        })
    }

    /// The vhost-user SET_VRING_BASE value for a device taking over the ring now.
    #[getter]
    fn vring_base(&self) -> PyResult<u32> {
        let driver = self.driver_ref()?;
        Ok(vvu_core::queue::PackedState {
            next_avail: driver.next_avail(),
            next_used: driver.next_used(),
        }
        .to_vring_base())
    }
});
