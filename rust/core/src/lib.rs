//! vvu-core: the pure-Rust half of vvu.
//!
//! Everything here is plain Rust so it can be unit-tested, property-tested and benchmarked without
//! Python. The PyO3 bindings live in the `vvu-python` crate and only translate types and errors.
//!
//! - [`memory`]: guest memory regions mapped from fds, address translation, bounds-checked access.
//! - [`dirty_log`]: the dirty-page bitmap of live migration (SET_LOG_BASE).
//! - [`queue`]: split and packed virtqueues, device side (pop chains, push used) and driver side.
//! - [`inflight`]: the INFLIGHT_SHMFD region (crash-safe restart).
//! - [`notify`]: eventfds, an epoll poller and busy-polling.
//! - [`sigbus`]: the SIGBUS handler that turns a front-end shrinking its memory into an error.
//! - [`iotlb`]: the device IOTLB (VIRTIO_F_ACCESS_PLATFORM) and its IOVA-keyed memory view.
//! - [`bench`]: the driver-side load generator of `vvu bench blk`.

pub mod bench;
pub mod dirty_log;
pub mod error;
pub mod inflight;
pub mod iotlb;
pub mod memory;
pub mod notify;
pub mod queue;
pub mod sigbus;
pub mod worker;

pub use error::{Error, MemoryError, QueueError, Result};
