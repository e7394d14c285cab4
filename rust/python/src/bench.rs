//! `blk_bench`: the native loop of `vvu bench blk` for Python. Takes the rings a front-end set
//! up, runs the load without the GIL (one thread per queue) and returns the results as a dict.

use std::os::raw::c_int;
use std::time::Duration;

use pyo3::exceptions::{PyKeyboardInterrupt, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use vvu_core::bench::{Bench, DirStats, Load, Pattern, QueueSetup};

use crate::errors::to_pyerr;
use crate::memory::dup_fd;
use crate::notify::PyEventFd;
use crate::queue::take_driver;

/// Percentiles reported for every direction.
const PERCENTILES: [(&str, f64); 5] = [
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
    ("p99.99", 99.99),
];

/// A queue as Python hands it over: driver, kick, call, headers, statuses, data, first sector,
/// sectors.
type QueueArg<'py> = (
    Bound<'py, PyAny>,
    PyRef<'py, PyEventFd>,
    PyRef<'py, PyEventFd>,
    u64,
    u64,
    u64,
    u64,
    u64,
);

fn seconds(value: f64, name: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| PyValueError::new_err(format!("{name} must be a non-negative number")))
}

fn dir_dict<'py>(py: Python<'py>, stats: &DirStats) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("ios", stats.ios)?;
    dict.set_item("bytes", stats.bytes)?;
    dict.set_item("errors", stats.errors)?;
    let lat = PyDict::new(py);
    let h = &stats.latency;
    lat.set_item("min", h.min())?;
    lat.set_item("max", h.max())?;
    lat.set_item("mean", h.mean())?;
    for (name, p) in PERCENTILES {
        lat.set_item(name, h.percentile(p))?;
    }
    dict.set_item("lat_ns", lat)?;
    Ok(dict)
}

/// Run a virtio-blk load on `queues` (each: driver, kick, call, then the guest addresses of the
/// request headers, status bytes and data buffers, then the queue's first sector and sector
/// count) and return the results. The drivers are handed over: their Python objects are unusable
/// afterwards. `backend_fd` is the vhost-user socket, watched for a hang-up. `on_start` is
/// called once every queue's thread runs. Releases the GIL; Ctrl-C stops the run (requests in
/// flight complete) and the results say `interrupted`.
#[pyfunction]
#[pyo3(signature = (queues, *, rw, block_size, iodepth, runtime, backend_fd = None, rwmix_read = 50, verify = false, seed = 0, timeout = 10.0, on_start = None))]
#[allow(clippy::too_many_arguments)]
pub fn blk_bench<'py>(
    py: Python<'py>,
    queues: Vec<QueueArg<'py>>,
    rw: &str,
    block_size: u32,
    iodepth: u16,
    runtime: f64,
    backend_fd: Option<c_int>,
    rwmix_read: u8,
    verify: bool,
    seed: u64,
    timeout: f64,
    on_start: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let pattern = Pattern::parse(rw).ok_or_else(|| {
        PyValueError::new_err(format!(
            "rw {rw:?} is not one of {}",
            Pattern::NAMES.join(", ")
        ))
    })?;
    let load = Load {
        pattern,
        block_size,
        iodepth,
        runtime: seconds(runtime, "runtime")?,
        rwmix_read,
        verify,
        seed,
        timeout: seconds(timeout, "timeout")?,
    };
    let backend = backend_fd.map(dup_fd).transpose()?;
    let mut setups = Vec::with_capacity(queues.len());
    for (driver, kick, call, headers, statuses, data, first_sector, sectors) in queues {
        setups.push(QueueSetup {
            ring: take_driver(&driver)?,
            kick: kick.clone_inner()?,
            call: call.clone_inner()?,
            headers,
            statuses,
            data,
            first_sector,
            sectors,
        });
    }
    let mut bench = Bench::start(setups, load, backend).map_err(to_pyerr)?;
    let mut raised = None;
    if let Some(callback) = on_start {
        // The threads run: from here on Ctrl-C stops them and the results still come back.
        if let Err(err) = callback.call0() {
            bench.stop();
            // A Ctrl-C that lands while the callback runs stops the run like one that lands
            // later: the results still come back, marked interrupted.
            if !err.is_instance_of::<PyKeyboardInterrupt>(py) {
                raised = Some(err);
            }
        }
    }
    while !py.detach(|| bench.wait_timeout(Duration::from_millis(100))) {
        if let Err(err) = py.check_signals() {
            bench.stop();
            if !err.is_instance_of::<PyKeyboardInterrupt>(py) && raised.is_none() {
                raised = Some(err);
            }
        }
    }
    let report = py.detach(|| bench.finish());
    if let Some(err) = raised {
        return Err(err);
    }
    let out = PyDict::new(py);
    out.set_item("elapsed", report.elapsed.as_secs_f64())?;
    out.set_item("read", dir_dict(py, &report.read)?)?;
    out.set_item("write", dir_dict(py, &report.write)?)?;
    out.set_item("verified", report.verified)?;
    out.set_item("verify_errors", report.verify_errors)?;
    let mismatches = PyList::empty(py);
    for m in &report.mismatches {
        let d = PyDict::new(py);
        d.set_item("sector", m.sector)?;
        d.set_item("expected_generation", m.expected_generation)?;
        d.set_item("found_sector", m.found.sector)?;
        d.set_item("found_generation", m.found.generation)?;
        d.set_item("found_run", m.found.run)?;
        mismatches.append(d)?;
    }
    out.set_item("mismatches", mismatches)?;
    out.set_item("prefill_ios", report.prefill_ios)?;
    out.set_item("faults", report.faults)?;
    out.set_item("interrupted", report.interrupted)?;
    Ok(out)
}
