//! Driver side of a packed virtqueue: make buffers available, reap used ones.
//!
//! Mirrors [`super::SplitQueueDriver`]; used by our front-end and by tests to drive
//! [`super::PackedQueue`]. The device is untrusted from here too: every used descriptor must name
//! a buffer id in flight and may not claim more bytes than its writable buffers hold, and the
//! driver keeps its own record of how many slots each buffer took.

use std::sync::atomic::{fence, Ordering};

use super::packed::{
    event_says_notify, is_used, used_bits, PackedConfig, PackedDescriptor, PackedRings,
    RingPosition, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED,
};
use super::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::error::QueueError;
use crate::memory::GuestMemory;

/// Bookkeeping for a buffer id in flight.
#[derive(Debug, Clone, Copy, Default)]
struct IdState {
    in_flight: bool,
    /// Ring slots the buffer occupies.
    slots: u16,
    /// Total bytes of its device-writable buffers: the most a used `len` may claim.
    writable: u32,
}

/// AVAIL = wrap, USED = !wrap: "available" in wrap `wrap` (§2.3).
#[inline]
fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        VIRTQ_DESC_F_AVAIL
    } else {
        VIRTQ_DESC_F_USED
    }
}

/// Driver side of a packed virtqueue over memory it owns.
#[derive(Debug)]
pub struct PackedQueueDriver {
    config: PackedConfig,
    rings: PackedRings,
    /// Free buffer ids (a stack).
    free_ids: Vec<u16>,
    ids: Vec<IdState>,
    /// Free ring slots.
    free_slots: u16,
    next_avail: RingPosition,
    next_used: RingPosition,
    /// The first descriptor made available since the last publish: its slot and the flags held
    /// back until `publish`, so the device sees the whole batch at once (§2.6 step 4).
    batch_head: Option<(u16, u16)>,
    /// Slots made available since the last publish.
    added: u16,
    in_flight: u16,
    broken: Option<String>,
}

impl PackedQueueDriver {
    /// Take over the areas of `config` in `mem` and zero them.
    pub fn new(mem: GuestMemory, config: PackedConfig) -> Result<Self, QueueError> {
        Self::with_start(mem, config, RingPosition::START)
    }

    /// Like [`PackedQueueDriver::new`], but start both positions at `start` (as after a
    /// migration; tests use it to exercise wrap counter 0). The device must then be given
    /// `PackedState { next_avail: start, next_used: start }`.
    pub fn with_start(
        mem: GuestMemory,
        config: PackedConfig,
        start: RingPosition,
    ) -> Result<Self, QueueError> {
        let rings = PackedRings::new(mem, &config)?;
        if start.index >= config.size {
            return Err(QueueError::InvalidConfig(format!(
                "start offset {} is not below the queue size {}",
                start.index, config.size
            )));
        }
        let zero = |gpa: u64, len: u64| rings.memory().write(gpa, &vec![0u8; len as usize]);
        zero(config.desc_ring, config.desc_ring_len())?;
        zero(config.driver_event, 4)?;
        zero(config.device_event, 4)?;
        // Make every slot look used in the lap it was last used in (the state the ring is in
        // when a driver reaches `start`): slots before `start` in this lap, the others in the
        // previous one. For the usual start (slot 0, wrap 1) that is all zeroes; for wrap 0 it
        // keeps zeroed slots from passing the driver's "used" test before the device wrote them.
        for index in 0..config.size {
            let lap = if index < start.index {
                start.wrap
            } else {
                !start.wrap
            };
            rings.set_desc_flags(index, used_bits(lap), Ordering::Relaxed);
        }
        // Publish the initialised rings before anything that hands them to a device.
        fence(Ordering::SeqCst);
        Ok(Self {
            config,
            rings,
            free_ids: (0..config.size).rev().collect(),
            ids: vec![IdState::default(); usize::from(config.size)],
            free_slots: config.size,
            next_avail: start,
            next_used: start,
            batch_head: None,
            added: 0,
            in_flight: 0,
            broken: None,
        })
    }

    pub fn config(&self) -> &PackedConfig {
        &self.config
    }

    /// The memory the rings live in.
    pub fn memory(&self) -> &GuestMemory {
        self.rings.memory()
    }

    /// Ring slots not used by any buffer in flight.
    pub fn free_descriptors(&self) -> usize {
        usize::from(self.free_slots)
    }

    /// Buffers made available (published or not) and not yet reaped.
    pub fn in_flight(&self) -> usize {
        usize::from(self.in_flight)
    }

    /// Where the next buffer will be made available.
    pub fn next_avail(&self) -> RingPosition {
        self.next_avail
    }

    /// Where the next used descriptor is expected.
    pub fn next_used(&self) -> RingPosition {
        self.next_used
    }

    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    pub fn broken_reason(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    fn check(&self) -> Result<(), QueueError> {
        match &self.broken {
            Some(reason) => Err(QueueError::Broken(reason.clone())),
            None => Ok(()),
        }
    }

    fn fail(&mut self, err: QueueError) -> QueueError {
        self.broken = Some(err.to_string());
        err
    }

    /// Total writable bytes, refusing chains longer than 4 GiB.
    fn sums(readable: &[(u64, u32)], writable: &[(u64, u32)]) -> Result<u32, QueueError> {
        let too_long = || QueueError::InvalidConfig("chain longer than 4 GiB".into());
        let mut total: u32 = 0;
        let mut writable_total: u32 = 0;
        for &(_, len) in readable {
            total = total.checked_add(len).ok_or_else(too_long)?;
        }
        for &(_, len) in writable {
            total = total.checked_add(len).ok_or_else(too_long)?;
            writable_total += len;
        }
        Ok(writable_total)
    }

    /// Make the buffer available (readable buffers first, then writable ones) as a list of
    /// ring descriptors, without publishing it; returns its buffer id. `Full` when there are
    /// not enough free slots.
    pub fn add_chain(
        &mut self,
        readable: &[(u64, u32)],
        writable: &[(u64, u32)],
    ) -> Result<u16, QueueError> {
        self.check()?;
        let n = readable.len() + writable.len();
        if n == 0 {
            return Err(QueueError::InvalidConfig(
                "a chain needs at least one buffer".into(),
            ));
        }
        let writable_total = Self::sums(readable, writable)?;
        if n > usize::from(self.free_slots) || self.free_ids.is_empty() {
            return Err(QueueError::Full);
        }
        let id = self.free_ids.pop().ok_or(QueueError::Full)?;
        let buffers = readable
            .iter()
            .map(|&b| (b, 0))
            .chain(writable.iter().map(|&b| (b, VIRTQ_DESC_F_WRITE)));
        let mut pos = self.next_avail;
        for (k, ((addr, len), write)) in buffers.enumerate() {
            let next = if k + 1 < n { VIRTQ_DESC_F_NEXT } else { 0 };
            // §2.6 step 1 (the id goes in every descriptor; the device reads the last one's).
            self.rings.set_descriptor_body(pos.index, addr, len, id);
            self.make_available(pos, write | next | avail_bits(pos.wrap));
            pos = pos.advance(1, self.config.size);
        }
        // n <= free_slots <= Q.
        self.record(id, n as u16, writable_total, pos);
        Ok(id)
    }

    /// Make a buffer available through an indirect table at `table_gpa` (16·n bytes of caller
    /// memory, any alignment); it takes a single ring slot.
    pub fn add_indirect(
        &mut self,
        table_gpa: u64,
        readable: &[(u64, u32)],
        writable: &[(u64, u32)],
    ) -> Result<u16, QueueError> {
        self.check()?;
        if !self.config.indirect {
            return Err(QueueError::InvalidConfig(
                "indirect descriptors are not negotiated".into(),
            ));
        }
        let n = readable.len() + writable.len();
        let table_len = u32::try_from(n * 16)
            .ok()
            .filter(|_| n > 0)
            .ok_or_else(|| QueueError::InvalidConfig(format!("indirect table of {n} entries")))?;
        let writable_total = Self::sums(readable, writable)?;
        if self.free_slots == 0 || self.free_ids.is_empty() {
            return Err(QueueError::Full);
        }
        let mem = self.rings.memory();
        // Check the whole table first so that a failure leaves nothing half written.
        mem.for_each_piece(table_gpa, u64::from(table_len), |_, _| {})?;
        let buffers = readable
            .iter()
            .map(|&b| (b, 0))
            .chain(writable.iter().map(|&b| (b, VIRTQ_DESC_F_WRITE)));
        for (k, ((addr, len), write)) in buffers.enumerate() {
            // §2.4: only WRITE is valid in a table entry.
            let entry = PackedDescriptor::new(addr, len, 0, write);
            mem.write(table_gpa + 16 * k as u64, &entry.to_le_bytes())?;
        }
        let id = self.free_ids.pop().ok_or(QueueError::Full)?;
        let pos = self.next_avail;
        self.rings
            .set_descriptor_body(pos.index, table_gpa, table_len, id);
        self.make_available(pos, VIRTQ_DESC_F_INDIRECT | avail_bits(pos.wrap));
        let after = pos.advance(1, self.config.size);
        self.record(id, 1, writable_total, after);
        Ok(id)
    }

    /// Store the flags of a descriptor whose body is written, or hold them back if it is the
    /// first of the batch.
    fn make_available(&mut self, pos: RingPosition, flags: u16) {
        if self.batch_head.is_none() {
            self.batch_head = Some((pos.index, flags));
        } else {
            // §2.6 step 2; Release so the body is visible with the flags even to a device that
            // peeks ahead (it must not, but it costs nothing on the platforms we run on).
            self.rings
                .set_desc_flags(pos.index, flags, Ordering::Release);
        }
    }

    fn record(&mut self, id: u16, slots: u16, writable: u32, next_avail: RingPosition) {
        self.ids[usize::from(id)] = IdState {
            in_flight: true,
            slots,
            writable,
        };
        self.free_slots -= slots;
        self.added += slots;
        self.in_flight += 1;
        self.next_avail = next_avail;
    }

    /// Publish the buffers added since the last call and decide whether to kick the device.
    pub fn publish(&mut self) -> Result<bool, QueueError> {
        self.check()?;
        let Some((index, flags)) = self.batch_head.take() else {
            return Ok(false);
        };
        // §2.6 steps 3–4: write barrier, then the first descriptor's flags — a Release store.
        self.rings.set_desc_flags(index, flags, Ordering::Release);
        // §2.6 step 5: full barrier before reading the device event suppression structure.
        fence(Ordering::SeqCst);
        let (off_wrap, event_flags) = self.rings.device_event(Ordering::Relaxed);
        let new = self.next_avail.index;
        let old = new.wrapping_sub(self.added);
        self.added = 0;
        // §2.6 step 6 with the §2.5 check.
        Ok(event_says_notify(
            off_wrap,
            event_flags,
            self.config.event_idx,
            new,
            old,
            self.next_avail.wrap,
            self.config.size,
        ))
    }

    /// Reap the next used descriptor, if any: `(buffer id, len)`. Checks that the id is a
    /// buffer in flight and that `len` does not exceed its writable bytes; a violation breaks
    /// the queue.
    pub fn reap_used(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
        self.check()?;
        if self.in_flight == 0 {
            // The next slot was never made available: whatever it holds is not ours to reap.
            return Ok(None);
        }
        let at = self.next_used;
        // §2.6 "driver consume": flags with Acquire (read barrier), then id and len.
        let flags = self.rings.desc_flags(at.index, Ordering::Acquire);
        if !is_used(flags, at.wrap) {
            return Ok(None);
        }
        let desc = self.rings.descriptor(at.index);
        let id = desc.id;
        // §2.4: len counts written bytes only when WRITE is set.
        let len = if flags & VIRTQ_DESC_F_WRITE != 0 {
            desc.len
        } else {
            0
        };
        let state = self
            .ids
            .get(usize::from(id))
            .copied()
            .filter(|s| s.in_flight);
        let Some(state) = state else {
            return Err(self.fail(QueueError::BadUsedEntry {
                id: u32::from(id),
                len,
                reason: "not a buffer id in flight",
            }));
        };
        if len > state.writable {
            return Err(self.fail(QueueError::BadUsedEntry {
                id: u32::from(id),
                len,
                reason: "len exceeds the buffer's writable bytes",
            }));
        }
        self.ids[usize::from(id)].in_flight = false;
        self.free_ids.push(id);
        self.free_slots += state.slots;
        self.in_flight -= 1;
        self.next_used = at.advance(state.slots, self.config.size);
        Ok(Some((id, len)))
    }

    /// Ask the device for used-buffer notifications again. Returns `true` if used descriptors
    /// arrived meanwhile (reap them instead of waiting).
    pub fn enable_call_notifications(&mut self) -> Result<bool, QueueError> {
        self.check()?;
        if self.config.event_idx {
            self.rings.set_driver_event(
                self.next_used.encode(),
                RING_EVENT_FLAGS_DESC,
                Ordering::Relaxed,
            );
        } else {
            self.rings
                .set_driver_event(0, RING_EVENT_FLAGS_ENABLE, Ordering::Relaxed);
        }
        // §2.6 step 5 of "consume": full barrier, then re-test.
        fence(Ordering::SeqCst);
        let flags = self
            .rings
            .desc_flags(self.next_used.index, Ordering::Acquire);
        Ok(self.in_flight > 0 && is_used(flags, self.next_used.wrap))
    }

    /// Ask the device not to notify (a hint).
    pub fn disable_call_notifications(&mut self) -> Result<(), QueueError> {
        self.check()?;
        self.rings
            .set_driver_event(0, RING_EVENT_FLAGS_DISABLE, Ordering::Relaxed);
        Ok(())
    }
}
