//! `vvu._core`: PyO3 bindings for vvu-core. This crate only translates types and errors; all
//! behaviour lives in vvu-core.

use pyo3::prelude::*;

mod errors;
mod memory;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<memory::PyGuestMemory>()?;
    m.add_class::<memory::GuestBuffer>()?;
    m.add_class::<memory::RegionInfo>()?;
    m.add_function(wrap_pyfunction!(memory::memfd, m)?)?;
    Ok(())
}
