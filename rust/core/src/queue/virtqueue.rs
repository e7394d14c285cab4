//! [`Virtqueue`]: the device side of either ring format, for code that runs both alike (the
//! workers, the Python bindings).

use super::{Chain, ChainBatch, PackedQueue, PackedState, SplitQueue};
use crate::error::QueueError;
use crate::memory::GuestMemory;

/// A split or a packed device-side queue. Every method forwards to the ring's own.
#[derive(Debug)]
pub enum Virtqueue {
    Split(SplitQueue),
    Packed(PackedQueue),
}

impl From<SplitQueue> for Virtqueue {
    fn from(queue: SplitQueue) -> Self {
        Virtqueue::Split(queue)
    }
}

impl From<PackedQueue> for Virtqueue {
    fn from(queue: PackedQueue) -> Self {
        Virtqueue::Packed(queue)
    }
}

macro_rules! forward {
    ($self:expr, $q:ident => $body:expr) => {
        match $self {
            Virtqueue::Split($q) => $body,
            Virtqueue::Packed($q) => $body,
        }
    };
}

impl Virtqueue {
    pub fn is_packed(&self) -> bool {
        matches!(self, Virtqueue::Packed(_))
    }

    pub fn size(&self) -> u16 {
        forward!(self, q => q.size())
    }

    pub fn attach(&mut self, mem: GuestMemory) -> Result<(), QueueError> {
        forward!(self, q => q.attach(mem))
    }

    pub fn detach(&mut self) {
        forward!(self, q => q.detach())
    }

    pub fn is_attached(&self) -> bool {
        forward!(self, q => q.is_attached())
    }

    pub fn memory(&self) -> Option<&GuestMemory> {
        forward!(self, q => q.memory())
    }

    /// The IOTLB miss that ended the last `pop_batch` early (see [`SplitQueue::take_miss`]).
    pub fn take_miss(&mut self) -> Option<(u64, crate::memory::Access)> {
        forward!(self, q => q.take_miss())
    }

    #[inline]
    pub fn pop_batch(&mut self, batch: &mut ChainBatch, max: usize) -> Result<usize, QueueError> {
        forward!(self, q => q.pop_batch(batch, max))
    }

    /// `head` is the chain's [`Chain::head`]: the head descriptor (split) or buffer id (packed).
    #[inline]
    pub fn push_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        forward!(self, q => q.push_used(head, len))
    }

    #[inline]
    pub fn publish_used(&mut self) -> Result<bool, QueueError> {
        forward!(self, q => q.publish_used())
    }

    pub fn enable_notifications(&mut self) -> Result<bool, QueueError> {
        forward!(self, q => q.enable_notifications())
    }

    pub fn disable_notifications(&mut self) -> Result<(), QueueError> {
        forward!(self, q => q.disable_notifications())
    }

    pub fn pending(&mut self) -> Result<u16, QueueError> {
        forward!(self, q => q.pending())
    }

    /// Start or stop dirty logging (see [`SplitQueue::set_log`], [`PackedQueue::set_log`]).
    pub fn set_log(&mut self, log: Option<crate::dirty_log::QueueLog>) {
        forward!(self, q => q.set_log(log))
    }

    pub fn is_broken(&self) -> bool {
        forward!(self, q => q.is_broken())
    }

    pub fn broken_reason(&self) -> Option<&str> {
        forward!(self, q => q.broken_reason())
    }

    /// The next available position in its 16-bit vhost-user form: the split ring's avail index,
    /// or the packed ring's offset (bits 0–14) and wrap counter (bit 15).
    pub fn next_avail(&self) -> u16 {
        match self {
            Virtqueue::Split(q) => q.next_avail(),
            Virtqueue::Packed(q) => q.next_avail().encode(),
        }
    }

    /// The next used position, in the same form as [`Virtqueue::next_avail`].
    pub fn next_used(&self) -> u16 {
        match self {
            Virtqueue::Split(q) => q.next_used(),
            Virtqueue::Packed(q) => q.next_used().encode(),
        }
    }

    /// What vhost-user GET_VRING_BASE reports: the split ring's next avail index, or the packed
    /// ring's [`PackedState::to_vring_base`].
    pub fn vring_base(&self) -> u32 {
        match self {
            Virtqueue::Split(q) => u32::from(q.next_avail()),
            Virtqueue::Packed(q) => q.state().to_vring_base(),
        }
    }

    /// Apply vhost-user SET_VRING_BASE (see [`Virtqueue::vring_base`]). For a split ring only
    /// the low 16 bits count.
    pub fn set_vring_base(&mut self, base: u32) -> Result<(), QueueError> {
        match self {
            Virtqueue::Split(q) => {
                q.set_next_avail(base as u16);
                Ok(())
            }
            Virtqueue::Packed(q) => q.set_state(PackedState::from_vring_base(base)),
        }
    }

    /// Hand back `chains`, the most recently popped chains (in pop order) that were not pushed:
    /// the driver still owns them and they will be popped again.
    pub fn give_back(&mut self, chains: &[Chain]) -> Result<(), QueueError> {
        match self {
            Virtqueue::Split(q) => {
                // At most Q chains were popped and not pushed.
                let n = chains.len() as u16;
                q.set_next_avail(q.next_avail().wrapping_sub(n));
                Ok(())
            }
            Virtqueue::Packed(q) => q.give_back(chains),
        }
    }

    pub fn as_split(&self) -> Option<&SplitQueue> {
        match self {
            Virtqueue::Split(q) => Some(q),
            Virtqueue::Packed(_) => None,
        }
    }

    pub fn as_packed(&self) -> Option<&PackedQueue> {
        match self {
            Virtqueue::Packed(q) => Some(q),
            Virtqueue::Split(_) => None,
        }
    }
}
