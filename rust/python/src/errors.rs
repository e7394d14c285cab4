//! The one place where core errors become Python exceptions.
//!
//! The exception classes are defined in Python (`vvu.errors`) so users can catch them by name;
//! this module only picks the class for each error family.

use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError};
use pyo3::PyErr;
use vvu_core::iotlb::perm_from_access;
use vvu_core::{Error, QueueError};

/// The classes of `vvu.errors`, imported lazily on first use.
pub mod exc {
    pyo3::import_exception!(vvu.errors, VvuError);
    pyo3::import_exception!(vvu.errors, GuestMemoryError);
    pyo3::import_exception!(vvu.errors, QueueError);
    pyo3::import_exception!(vvu.errors, IotlbMiss);
}

/// Convert any core error into the matching `vvu.errors` exception.
pub fn to_pyerr(err: impl Into<Error>) -> PyErr {
    match err.into() {
        Error::Memory(e) => exc::GuestMemoryError::new_err(e.to_string()),
        Error::Queue(e @ QueueError::IotlbMiss { iova, access }) => {
            exc::IotlbMiss::new_err((e.to_string(), iova, perm_from_access(access)))
        }
        Error::Queue(e) => exc::QueueError::new_err(e.to_string()),
        Error::Io(e) if e.kind() == std::io::ErrorKind::Interrupted => {
            PyKeyboardInterrupt::new_err(())
        }
        Error::Io(e) => PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string())),
    }
}
