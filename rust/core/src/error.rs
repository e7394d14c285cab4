//! One error type for the whole core. The Python bindings map each variant family to exactly one
//! exception class of `vvu.errors` in a single place.

use std::io;

/// Errors from guest-memory mapping, translation and access.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MemoryError {
    #[error("address range {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { addr: u64, len: u64 },
    #[error("address {addr:#x} is not aligned to {align} bytes")]
    Misaligned { addr: u64, align: u64 },
    #[error("invalid region: {0}")]
    InvalidRegion(String),
    #[error("region {new} overlaps region {existing}")]
    Overlap { new: String, existing: String },
    #[error("no region starts at guest address {0:#x}")]
    NoSuchRegion(u64),
    #[error("region at guest address {gpa:#x} is still in use ({users} other holders: buffers, queues or workers)")]
    RegionBusy { gpa: u64, users: usize },
    #[error("mapping region failed: {0}")]
    Map(String),
    #[error("address range {addr:#x}+{len:#x} needs {need} access but allows only {allowed}")]
    AccessDenied {
        addr: u64,
        len: u64,
        need: crate::memory::Access,
        allowed: crate::memory::Access,
    },
    #[error("IOTLB: {0}")]
    Iotlb(String),
    #[error("guest memory {0} faulted (SIGBUS: the front-end shrank or truncated its file); its content is gone")]
    Poisoned(String),
    #[error("write {addr:#x}+{len:#x} is not fully covered by the dirty log (it covers guest addresses below {covers:#x})")]
    LogOutOfRange { addr: u64, len: u64, covers: u64 },
}

/// Errors from a virtqueue. Errors caused by the peer mark the queue broken.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum QueueError {
    #[error("invalid queue configuration: {0}")]
    InvalidConfig(String),
    #[error("queue is not ready (configure and attach memory first)")]
    NotReady,
    #[error("queue is broken: {0}")]
    Broken(String),
    #[error("avail index {avail_idx} is {pending} entries ahead of {next_avail}, more than the queue size {size}")]
    AvailIndexJump {
        avail_idx: u16,
        next_avail: u16,
        pending: u16,
        size: u16,
    },
    #[error("descriptor chain at head {head}: {reason}")]
    BadChain { head: u16, reason: ChainFault },
    #[error("ring memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("the ring is full")]
    Full,
    #[error("descriptor {0} was not handed out by this queue")]
    UnknownHead(u16),
    #[error(
        "used idx {used_idx} is more than the {in_flight} chains in flight ahead of {last_used}"
    )]
    UsedIndexJump {
        used_idx: u16,
        last_used: u16,
        in_flight: u16,
    },
    /// Under an IOTLB, a ring area has no translation yet: ask the front-end (a MISS) and retry.
    #[error("IOTLB miss at iova {iova:#x} ({access} access)")]
    IotlbMiss {
        iova: u64,
        access: crate::memory::Access,
    },
    #[error("used ring entry (id {id}, len {len}): {reason}")]
    BadUsedEntry {
        id: u32,
        len: u32,
        reason: &'static str,
    },
}

/// Why the device side refused a descriptor chain (the `reason` of [`QueueError::BadChain`]).
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum ChainFault {
    #[error("head index is not below the queue size")]
    HeadOutOfRange,
    #[error("descriptor {index} links to {next}, outside its table of {limit} entries")]
    NextOutOfRange { index: u16, next: u16, limit: u32 },
    #[error("more than {limit} descriptors in a chain (a loop?)")]
    TooLong { limit: u32 },
    #[error(
        "the chains of one batch use more ring descriptors than the queue has (descriptors reused)"
    )]
    DescriptorsReused,
    #[error("indirect descriptor but VIRTIO_F_INDIRECT_DESC is not negotiated")]
    IndirectNotNegotiated,
    #[error("indirect table length {len} is zero, not a multiple of 16 or too large")]
    IndirectLength { len: u32 },
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("descriptor has both INDIRECT and NEXT")]
    IndirectWithNext,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("total chain length does not fit in 32 bits")]
    LengthOverflow,
    #[error("the chain translates to more than {limit} segments")]
    TooManySegments { limit: u32 },
    #[error("no memory for the chain's segments")]
    OutOfMemory,
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    BufferOutOfRange { addr: u64, len: u32 },
    #[error("indirect table {addr:#x}+{len:#x} is outside guest memory")]
    IndirectTableOutOfRange { addr: u64, len: u32 },
    #[error("packed ring: descriptor {index} continues the chain but is not available in the expected wrap")]
    NotAvailable { index: u16 },
    #[error("packed ring: indirect descriptor inside a NEXT-linked list")]
    IndirectInList,
    #[error("packed ring: buffer id {id} is not below the queue size {size}")]
    BufferIdOutOfRange { id: u16, size: u16 },
    #[error("packed ring: buffer id {id} is already in flight")]
    BufferIdInFlight { id: u16 },
    #[error("buffer {addr:#x}+{len:#x} needs {need} access, which its IOTLB entry does not allow")]
    AccessDenied {
        addr: u64,
        len: u32,
        need: crate::memory::Access,
    },
    /// Not a fault of the chain: the IOTLB has no translation for `iova` yet. The queue does not
    /// break; the chain stays in the ring until the translation arrives.
    #[error("IOTLB miss at iova {iova:#x} ({access} access)")]
    IotlbMiss {
        iova: u64,
        access: crate::memory::Access,
    },
    #[error("packed ring: the chain kept in the inflight region does not end where it should")]
    ResubmitMismatch,
}

/// Every error the core can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
