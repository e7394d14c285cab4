//! Native datapath workers for Python: `NativeHandler` (what a worker does with each chain) and
//! `QueueWorker` (a Rust thread running one queue without the GIL).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::raw::c_int;
use std::sync::Mutex;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use vvu_core::iotlb::perm_from_access;
use vvu_core::worker::aio::{io_uring_available, AioMode};
use vvu_core::worker::blk::{probe, BlkHandler, BlkOptions, BlkStatsHandle, VIRTIO_BLK_ID_BYTES};
use vvu_core::worker::nbd::{
    self, NbdExport, NbdHandler, NbdOptions, NbdUri, NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
};
use vvu_core::worker::{ChainHandler, DiscardHandler, QueueWorker, WorkerOptions, WorkerStats};
use vvu_core::QueueError;

use crate::errors::to_pyerr;
use crate::memory::{dup_fd, PyGuestMemory};
use crate::notify::PyEventFd;
use crate::queue::{take_queue, wrap_queue};

fn used_up() -> PyErr {
    to_pyerr(QueueError::InvalidConfig(
        "this native handler already runs in a worker".into(),
    ))
}

/// The virtio-blk GET_ID answer for `serial` (zero-padded; at most 20 bytes).
fn blk_id(serial: Option<Vec<u8>>) -> PyResult<[u8; VIRTIO_BLK_ID_BYTES]> {
    let serial = serial.unwrap_or_default();
    if serial.len() > VIRTIO_BLK_ID_BYTES {
        return Err(PyValueError::new_err(format!(
            "serial is {} bytes; virtio-blk ids hold at most {VIRTIO_BLK_ID_BYTES}",
            serial.len()
        )));
    }
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
    id[..serial.len()].copy_from_slice(&serial);
    Ok(id)
}

/// What a native worker does with each descriptor chain; built by a back-end, used once.
#[pyclass(module = "vvu._core", frozen)]
pub struct NativeHandler {
    handler: Mutex<Option<Box<dyn ChainHandler>>>,
    kind: &'static str,
    /// The blk handler's counters, readable after the handler moved into a worker.
    blk_stats: Option<BlkStatsHandle>,
}

impl NativeHandler {
    /// Wrap a handler built by another binding module (`kind` names it in `repr`).
    pub(crate) fn from_handler(handler: Box<dyn ChainHandler>, kind: &'static str) -> Self {
        Self {
            handler: Mutex::new(Some(handler)),
            kind,
            blk_stats: None,
        }
    }

    fn take(&self) -> PyResult<Box<dyn ChainHandler>> {
        self.handler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(used_up)
    }
}

#[pymethods]
impl NativeHandler {
    /// virtio-blk over `capacity` 512-byte sectors of the file `fd` (duplicated; the caller
    /// keeps its own). Reads and writes go straight between the file and guest memory.
    ///
    /// `aio` is `sync` (blocking calls on the worker thread), `io_uring` or `threads` (up to
    /// `queue_depth` requests in flight per queue). Direct I/O is used when `fd` was opened with
    /// O_DIRECT.
    #[staticmethod]
    #[pyo3(signature = (fd, capacity, *, read_only = false, serial = None, writethrough = false, discard = true, write_zeroes = true, aio = "sync", queue_depth = 128, latency_histogram = false))]
    #[allow(clippy::too_many_arguments)]
    fn blk(
        fd: c_int,
        capacity: u64,
        read_only: bool,
        serial: Option<Vec<u8>>,
        writethrough: bool,
        discard: bool,
        write_zeroes: bool,
        aio: &str,
        queue_depth: usize,
        latency_histogram: bool,
    ) -> PyResult<Self> {
        let aio = AioMode::parse(aio).ok_or_else(|| {
            PyValueError::new_err(format!(
                "aio must be io_uring, threads or sync, not {aio:?}"
            ))
        })?;
        let id = blk_id(serial)?;
        let options = BlkOptions {
            read_only,
            serial: id,
            writethrough,
            discard,
            write_zeroes,
            aio,
            queue_depth,
            latency_histogram,
            ..BlkOptions::default()
        };
        let file = File::from(dup_fd(fd)?);
        let handler = BlkHandler::new(file, capacity, options).map_err(to_pyerr)?;
        let blk_stats = Some(handler.stats_handle());
        Ok(Self {
            handler: Mutex::new(Some(Box::new(handler))),
            kind: "blk",
            blk_stats,
        })
    }

    /// virtio-blk over the NBD export at `uri` (see `nbd_probe`), `capacity` 512-byte sectors
    /// of it, with the transmission `flags` and block size limits `nbd_probe` reported. Each handler has its own connection; up to `queue_depth` requests in flight. A
    /// connection with requests and no reply for `timeout` seconds is dropped; requests fail
    /// with IOERR while the server is away and the handler reconnects with a bounded backoff.
    #[staticmethod]
    #[pyo3(signature = (uri, capacity, *, flags, min_block = 1, max_payload = 33554432, read_only = false, serial = None, writethrough = false, queue_depth = 128, timeout = 30.0))]
    #[allow(clippy::too_many_arguments)]
    fn nbd(
        py: Python<'_>,
        uri: &str,
        capacity: u64,
        flags: u16,
        min_block: u32,
        max_payload: u32,
        read_only: bool,
        serial: Option<Vec<u8>>,
        writethrough: bool,
        queue_depth: usize,
        timeout: f64,
    ) -> PyResult<Self> {
        let parsed = NbdUri::parse(uri).map_err(PyValueError::new_err)?;
        let timeout = Duration::try_from_secs_f64(timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| PyValueError::new_err("timeout must be a positive number"))?;
        let id = blk_id(serial)?;
        let options = NbdOptions {
            read_only,
            serial: id,
            writethrough,
            queue_depth,
            timeout,
        };
        if min_block == 0 || max_payload < min_block {
            return Err(PyValueError::new_err(
                "min_block must be positive and at most max_payload",
            ));
        }
        // What nbd_probe found: the handler does not need the server to be up now (a queue
        // may start while it is away; requests then fail with IOERR until it is back).
        let export = NbdExport {
            size: capacity.saturating_mul(512),
            flags,
            min_block,
            preferred_block: min_block,
            max_payload,
        };
        let handler = py
            .detach(|| NbdHandler::new(parsed, export, options))
            .map_err(to_pyerr)?;
        Ok(Self {
            handler: Mutex::new(Some(Box::new(handler))),
            kind: "nbd",
            blk_stats: None,
        })
    }

    /// The blk handler's counters (requests by type, bytes, errors, malformed, in flight,
    /// latency_ns_sum), read without stopping it; None for other handlers.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(handle) = &self.blk_stats else {
            return Ok(None);
        };
        let s = handle.snapshot();
        let dict = PyDict::new(py);
        for (name, value) in [
            ("requests", s.requests),
            ("reads", s.reads),
            ("writes", s.writes),
            ("flushes", s.flushes),
            ("get_ids", s.get_ids),
            ("discards", s.discards),
            ("write_zeroes", s.write_zeroes),
            ("bytes_read", s.bytes_read),
            ("bytes_written", s.bytes_written),
            ("io_errors", s.io_errors),
            ("unsupported", s.unsupported),
            ("malformed", s.malformed),
            ("in_flight", s.in_flight),
            ("latency_ns_sum", s.latency_ns_sum),
            ("bounced", s.bounced),
            ("unaligned", s.unaligned),
            ("async_requests", s.async_requests),
        ] {
            dict.set_item(name, value)?;
        }
        Ok(Some(dict))
    }

    /// The blk handler's latency histogram: element `i` counts requests served in less than
    /// `2**i` microseconds, the last one every slower request; None for other handlers.
    #[getter]
    fn latency_histogram(&self) -> Option<Vec<u64>> {
        self.blk_stats
            .as_ref()
            .map(|handle| handle.snapshot().latency_us.to_vec())
    }

    /// Completes every chain with used length 0 and does nothing else: a started but disabled
    /// transmit queue ("process and discard any TX packets", vhost-user.rst).
    #[staticmethod]
    fn discard() -> Self {
        Self::from_handler(Box::new(DiscardHandler), "discard")
    }

    fn __repr__(&self) -> String {
        let state = if self
            .handler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            "ready"
        } else {
            "in use"
        };
        format!("NativeHandler({}, {state})", self.kind)
    }
}

/// One queue processed by a native thread. `stop()` drains in-flight requests and gives the
/// queue back (its `vring_base` is what GET_VRING_BASE reports).
#[pyclass(name = "QueueWorker", module = "vvu._core", frozen)]
pub struct PyQueueWorker {
    worker: Mutex<Option<QueueWorker>>,
    /// The counters at `stop()`, so that they stay readable afterwards.
    final_stats: Mutex<Option<WorkerStats>>,
}

impl PyQueueWorker {
    fn with<T>(&self, f: impl FnOnce(&QueueWorker) -> PyResult<T>) -> PyResult<T> {
        let guard = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        let worker = guard
            .as_ref()
            .ok_or_else(|| to_pyerr(QueueError::InvalidConfig("the worker was stopped".into())))?;
        f(worker)
    }
}

#[pymethods]
impl PyQueueWorker {
    /// Start a thread named `name` running `queue` (a SplitQueue or PackedQueue, attached, handed
    /// over) with `handler`.
    #[new]
    #[pyo3(signature = (name, queue, handler, *, kick, call = None, err = None, batch_size = 64, busy_poll = 0.0, poll_interval = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &str,
        queue: &Bound<'_, PyAny>,
        handler: &NativeHandler,
        kick: &PyEventFd,
        call: Option<&PyEventFd>,
        err: Option<&PyEventFd>,
        batch_size: usize,
        busy_poll: f64,
        poll_interval: Option<f64>,
    ) -> PyResult<Self> {
        let seconds = |value: f64, name: &str| {
            Duration::try_from_secs_f64(value)
                .map_err(|_| PyValueError::new_err(format!("{name} must be a non-negative number")))
        };
        let busy_poll = seconds(busy_poll, "busy_poll")?;
        let poll_interval = poll_interval
            .map(|v| seconds(v, "poll_interval"))
            .transpose()?;
        let kick = kick.clone_inner()?;
        let call = call.map(PyEventFd::clone_inner).transpose()?;
        let err = err.map(PyEventFd::clone_inner).transpose()?;
        let handler = handler.take()?;
        let queue = take_queue(queue)?;
        let options = WorkerOptions {
            batch_size,
            busy_poll: (!busy_poll.is_zero()).then_some(busy_poll),
            err,
            poll_interval,
            group: None,
        };
        let worker =
            QueueWorker::spawn(name, queue, kick, call, handler, options).map_err(to_pyerr)?;
        Ok(Self {
            worker: Mutex::new(Some(worker)),
            final_stats: Mutex::new(None),
        })
    }

    /// Replace (None: remove) the call eventfd while running; the new one is signalled once.
    fn set_call(&self, call: Option<&PyEventFd>) -> PyResult<()> {
        let call = call.map(PyEventFd::clone_inner).transpose()?;
        self.with(|worker| worker.set_call(call).map_err(to_pyerr))
    }

    /// Replace (None: remove) the err eventfd.
    fn set_err(&self, err: Option<&PyEventFd>) -> PyResult<()> {
        let err = err.map(PyEventFd::clone_inner).transpose()?;
        self.with(|worker| worker.set_err(err).map_err(to_pyerr))
    }

    /// Counters: chains, batches, notifications, kicks, wakeups, call_errors, iotlb_misses;
    /// after `stop()`, the final ones.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stopped = *self.final_stats.lock().unwrap_or_else(|e| e.into_inner());
        let stats = match stopped {
            Some(stats) => stats,
            None => self.with(|worker| Ok(worker.stats()))?,
        };
        let dict = PyDict::new(py);
        dict.set_item("chains", stats.chains)?;
        dict.set_item("batches", stats.batches)?;
        dict.set_item("notifications", stats.notifications)?;
        dict.set_item("kicks", stats.kicks)?;
        dict.set_item("wakeups", stats.wakeups)?;
        dict.set_item("call_errors", stats.call_errors)?;
        dict.set_item("iotlb_misses", stats.iotlb_misses)?;
        dict.set_item("in_flight", stats.in_flight)?;
        dict.set_item("full", stats.full)?;
        Ok(dict)
    }

    /// Switch the running worker to `memory` (an `Iotlb.view`) between batches; a chain waiting
    /// for a translation is retried. Returns the generation for `wait_memory`.
    fn set_memory(&self, memory: &PyGuestMemory) -> PyResult<u64> {
        let snapshot = memory.snapshot();
        self.with(|worker| worker.set_memory(snapshot).map_err(to_pyerr))
    }

    /// Wait (without the GIL) until the worker no longer uses memory older than `generation`;
    /// False on timeout.
    fn wait_memory(&self, py: Python<'_>, generation: u64, timeout: f64) -> PyResult<bool> {
        let timeout = Duration::try_from_secs_f64(timeout)
            .map_err(|_| PyValueError::new_err("timeout must be a non-negative number"))?;
        // Not under the handle's lock: the thread that re-takes the GIL after the wait must
        // not hold a lock the event loop may block on with the GIL held (take_miss).
        let waiter = self.with(|worker| Ok(worker.memory_waiter()))?;
        Ok(py.detach(|| waiter.wait(generation, timeout)))
    }

    /// The IOTLB miss `(iova, perm)` the worker waits on, or None; consumes `miss_fd`.
    fn take_miss(&self) -> PyResult<Option<(u64, u8)>> {
        self.with(|worker| {
            Ok(worker
                .take_miss()
                .map(|(iova, access)| (iova, perm_from_access(access))))
        })
    }

    /// An fd that becomes readable when the worker reports an IOTLB miss (valid while running).
    #[getter]
    fn miss_fd(&self) -> PyResult<c_int> {
        self.with(|worker| Ok(worker.miss_fd().as_raw_fd()))
    }

    /// Why the worker stopped processing on its own (a broken ring, a failed handler), or None.
    #[getter]
    fn fault(&self) -> PyResult<Option<String>> {
        self.with(|worker| Ok(worker.fault().map(|f| f.to_string())))
    }

    /// Stop after the current batch (every popped chain is completed and published), join the
    /// thread and return the queue. Releases the GIL while waiting.
    fn stop(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| to_pyerr(QueueError::InvalidConfig("the worker was stopped".into())))?;
        let stopped = py.detach(|| worker.stop()).map_err(to_pyerr)?;
        *self.final_stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stopped.stats);
        wrap_queue(py, stopped.queue)
    }

    #[getter]
    fn running(&self) -> bool {
        self.worker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

/// What a blk back-end needs to know about the file or block device `fd`: size (bytes;
/// BLKGETSIZE64 for a device), block_device, logical_block_size, physical_block_size, min_io,
/// opt_io (bytes, 0 unknown), direct (opened with O_DIRECT), dio_memory_align,
/// dio_offset_align.
#[pyfunction]
pub fn blk_probe(py: Python<'_>, fd: c_int) -> PyResult<Bound<'_, PyDict>> {
    // A duplicate: the caller keeps its fd.
    let file = File::from(dup_fd(fd)?);
    let g = probe(&file).map_err(to_pyerr)?;
    let dict = PyDict::new(py);
    dict.set_item("size", g.size)?;
    dict.set_item("block_device", g.block_device)?;
    dict.set_item("logical_block_size", g.logical_block_size)?;
    dict.set_item("physical_block_size", g.physical_block_size)?;
    dict.set_item("min_io", g.min_io)?;
    dict.set_item("opt_io", g.opt_io)?;
    dict.set_item("direct", g.direct)?;
    dict.set_item("dio_memory_align", g.dio_memory_align)?;
    dict.set_item("dio_offset_align", g.dio_offset_align)?;
    Ok(dict)
}

/// Connect to the NBD export at `uri` (`nbd+unix:///EXPORT?socket=PATH`,
/// `nbd://HOST[:PORT]/EXPORT`), negotiate it (NBD_OPT_GO) and disconnect: its size, block size
/// constraints and what the server offers. ValueError for a bad URI, OSError if the server
/// cannot be reached or refuses the export.
#[pyfunction]
#[pyo3(signature = (uri, timeout = 5.0))]
pub fn nbd_probe<'py>(py: Python<'py>, uri: &str, timeout: f64) -> PyResult<Bound<'py, PyDict>> {
    let parsed = NbdUri::parse(uri).map_err(PyValueError::new_err)?;
    let timeout = Duration::try_from_secs_f64(timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| PyValueError::new_err("timeout must be a positive number"))?;
    let (fd, e) = py
        .detach(|| nbd::connect(&parsed, timeout))
        .map_err(to_pyerr)?;
    drop(fd);
    let dict = PyDict::new(py);
    dict.set_item("size", e.size)?;
    dict.set_item("read_only", e.has(NBD_FLAG_READ_ONLY))?;
    dict.set_item("flush", e.has(NBD_FLAG_SEND_FLUSH))?;
    dict.set_item("fua", e.has(NBD_FLAG_SEND_FUA))?;
    dict.set_item("trim", e.has(NBD_FLAG_SEND_TRIM))?;
    dict.set_item("write_zeroes", e.has(NBD_FLAG_SEND_WRITE_ZEROES))?;
    dict.set_item("multi_conn", e.has(NBD_FLAG_CAN_MULTI_CONN))?;
    dict.set_item("flags", e.flags)?;
    dict.set_item("min_block", e.min_block)?;
    dict.set_item("preferred_block", e.preferred_block)?;
    dict.set_item("max_payload", e.max_payload)?;
    Ok(dict)
}

/// None if this process can set up an io_uring, else why not (the kernel's error).
#[pyfunction]
pub fn io_uring_unavailable() -> Option<String> {
    io_uring_available().err().map(|e| e.to_string())
}
