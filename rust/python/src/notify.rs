//! Doorbells for Python: `EventFd` and `Poller`. Every blocking wait releases the GIL and lets
//! Ctrl-C through as KeyboardInterrupt.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::raw::c_int;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use vvu_core::notify::{EventFd, EventForwarder, Poller};

use crate::errors::to_pyerr;
use crate::memory::dup_fd;

fn timeout_arg(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    timeout
        .map(|t| {
            Duration::try_from_secs_f64(t).map_err(|_| {
                PyValueError::new_err("timeout must be None or a non-negative number of seconds")
            })
        })
        .transpose()
}

/// Sleep with the GIL released; every wait slice checks for signals (Ctrl-C) with the GIL.
fn check_signals() -> PyResult<()> {
    Python::attach(|py| py.check_signals())
}

fn closed() -> PyErr {
    PyOSError::new_err((libc::EBADF, "the eventfd is closed"))
}

/// A non-blocking, close-on-exec eventfd: a doorbell (vhost-user kick, call and err fds).
#[pyclass(name = "EventFd", module = "vvu._core", frozen)]
pub struct PyEventFd {
    inner: std::sync::RwLock<Option<EventFd>>,
}

impl PyEventFd {
    fn with<T>(&self, f: impl FnOnce(&EventFd) -> PyResult<T>) -> PyResult<T> {
        let guard = self.inner.read().unwrap_or_else(|e| e.into_inner());
        f(guard.as_ref().ok_or_else(closed)?)
    }

    /// A second handle to the same eventfd, for a native worker.
    pub fn clone_inner(&self) -> PyResult<EventFd> {
        self.with(|efd| efd.try_clone().map_err(to_pyerr))
    }
}

#[pymethods]
impl PyEventFd {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(Self {
            inner: std::sync::RwLock::new(Some(EventFd::new().map_err(to_pyerr)?)),
        })
    }

    /// Wrap a duplicate of an existing eventfd (e.g. one received over SCM_RIGHTS); the caller
    /// keeps and closes `fd`.
    #[staticmethod]
    fn from_fd(fd: c_int) -> PyResult<Self> {
        let efd = EventFd::from_fd(dup_fd(fd)?).map_err(to_pyerr)?;
        Ok(Self {
            inner: std::sync::RwLock::new(Some(efd)),
        })
    }

    /// Ring the doorbell (add 1 to the counter).
    fn signal(&self) -> PyResult<()> {
        self.with(|efd| efd.signal().map_err(to_pyerr))
    }

    /// Read and reset the counter; 0 if it was not signalled.
    fn consume(&self) -> PyResult<u64> {
        self.with(|efd| efd.consume().map_err(to_pyerr))
    }

    /// Wait until signalled (consuming it) or `timeout` seconds pass (None: forever); True if
    /// it was signalled. Releases the GIL; Ctrl-C raises KeyboardInterrupt.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = timeout_arg(timeout)?;
        let efd = self.clone_inner()?;
        py.detach(|| efd.wait_interruptible(timeout, &mut check_signals))
    }

    fn fileno(&self) -> PyResult<c_int> {
        self.with(|efd| Ok(efd.as_raw_fd()))
    }

    /// Close the eventfd (idempotent).
    fn close(&self) {
        self.inner.write().unwrap_or_else(|e| e.into_inner()).take();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    fn __repr__(&self) -> String {
        match self.fileno() {
            Ok(fd) => format!("EventFd(fd={fd})"),
            Err(_) => "EventFd(closed)".into(),
        }
    }
}

/// Waits on many fds at once (epoll), each registered with a token; optionally busy-polls.
#[pyclass(name = "Poller", module = "vvu._core", frozen)]
pub struct PyPoller {
    poller: Poller,
}

#[pymethods]
impl PyPoller {
    /// `busy_poll`: seconds to spin before sleeping in each wait (0: never spin; costs CPU).
    #[new]
    #[pyo3(signature = (busy_poll = 0.0))]
    fn new(busy_poll: f64) -> PyResult<Self> {
        let poller = Poller::new().map_err(to_pyerr)?;
        let budget = timeout_arg(Some(busy_poll))?.filter(|d| !d.is_zero());
        poller.set_busy_poll(budget);
        Ok(Self { poller })
    }

    /// Watch `fd` for readability, reporting it as `token`. The fd must stay open while
    /// registered (the poller does not own it).
    fn register(&self, fd: c_int, token: u64) -> PyResult<()> {
        if fd < 0 {
            return Err(PyValueError::new_err("fd must be non-negative"));
        }
        // SAFETY: the fd is only used for the duration of the epoll_ctl call; an invalid fd makes
        // epoll_ctl fail with EBADF, reported as OSError.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        self.poller.register(fd, token).map_err(to_pyerr)
    }

    fn unregister(&self, fd: c_int) -> PyResult<()> {
        if fd < 0 {
            return Err(PyValueError::new_err("fd must be non-negative"));
        }
        // SAFETY: as in `register`.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        self.poller.unregister(fd).map_err(to_pyerr)
    }

    /// Tokens of the fds that are readable, waiting up to `timeout` seconds (None: forever);
    /// [] on timeout. Consumes nothing. Releases the GIL; Ctrl-C raises KeyboardInterrupt.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<u64>> {
        let timeout = timeout_arg(timeout)?;
        let mut events = Vec::new();
        py.detach(|| {
            self.poller
                .wait_interruptible(timeout, &mut events, &mut check_signals)
        })?;
        Ok(events)
    }

    #[getter]
    fn busy_poll(&self) -> f64 {
        self.poller.busy_poll().map_or(0.0, |d| d.as_secs_f64())
    }
}

/// Forwards eventfd signals on a native thread: each route's source is consumed and its
/// destination signalled (or the signal dropped when the route has none). No Python per signal.
#[pyclass(name = "EventForwarder", module = "vvu._core", frozen)]
pub struct PyEventForwarder {
    inner: std::sync::Mutex<EventForwarder>,
}

impl PyEventForwarder {
    fn lock(&self) -> std::sync::MutexGuard<'_, EventForwarder> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl PyEventForwarder {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(Self {
            inner: std::sync::Mutex::new(EventForwarder::new().map_err(to_pyerr)?),
        })
    }

    /// Forward `src` to `dst` (None: consume and drop) as route `token` (< 2**64 - 1). The
    /// forwarder keeps its own duplicates of both eventfds.
    #[pyo3(signature = (src, dst, token))]
    fn add(&self, src: &PyEventFd, dst: Option<&PyEventFd>, token: u64) -> PyResult<()> {
        let src = src.clone_inner()?;
        let dst = dst.map(PyEventFd::clone_inner).transpose()?;
        self.lock().add(src, dst, token).map_err(to_pyerr)
    }

    /// Stop route `token` and close its duplicates; False if there was none.
    fn remove(&self, token: u64) -> bool {
        self.lock().remove(token)
    }

    /// Change route `token`'s destination (None: drop signals); False if there is no such route.
    fn set_dst(&self, token: u64, dst: Option<&PyEventFd>) -> PyResult<bool> {
        let dst = dst.map(PyEventFd::clone_inner).transpose()?;
        Ok(self.lock().set_dst(token, dst))
    }

    /// How many signals route `token` delivered (None: no such route).
    fn forwarded(&self, token: u64) -> Option<u64> {
        self.lock().forwarded(token)
    }

    /// The tokens of the current routes, sorted.
    fn tokens(&self) -> Vec<u64> {
        self.lock().tokens()
    }

    /// Stop the thread and drop every route (idempotent).
    fn close(&self) {
        // The thread never takes the GIL, so joining it while holding the GIL is safe.
        self.lock().stop();
    }

    #[getter]
    fn running(&self) -> bool {
        self.lock().running()
    }
}
