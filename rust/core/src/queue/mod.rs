//! Virtqueues (split ring): device side and driver side.
