//! Driver side of a split virtqueue: make buffers available, reap used ones.
//!
//! Used by our front-end and by tests to drive [`super::SplitQueue`]. The device is untrusted
//! from here too: every used entry is checked against the chains actually in flight, and the
//! driver keeps its own copy of the chain links instead of reading them back from guest memory.

use std::sync::atomic::{fence, Ordering};

use super::{
    need_event, Descriptor, QueueConfig, Rings, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};
use crate::error::QueueError;
use crate::memory::GuestMemory;

/// Bookkeeping for a chain head in flight.
#[derive(Debug, Clone, Copy, Default)]
struct HeadState {
    in_flight: bool,
    /// Ring descriptors the chain occupies.
    descriptors: u16,
    /// Total bytes of its device-writable buffers: the most a used `len` may claim.
    writable: u32,
}

/// Driver side of a split virtqueue over memory it owns.
#[derive(Debug)]
pub struct SplitQueueDriver {
    config: QueueConfig,
    rings: Rings,
    /// Free descriptor indexes (a stack).
    free: Vec<u16>,
    /// Our own copy of each descriptor's `next` link.
    next: Vec<u16>,
    heads: Vec<HeadState>,
    /// Shadow of avail.idx including chains not yet published.
    avail_idx: u16,
    /// Chains added since the last publish.
    added: u16,
    last_used: u16,
    in_flight: u16,
    broken: Option<String>,
}

impl SplitQueueDriver {
    /// Take over the ring areas of `config` in `mem` and zero them.
    pub fn new(mem: GuestMemory, config: QueueConfig) -> Result<Self, QueueError> {
        Self::with_start_index(mem, config, 0)
    }

    /// Like [`SplitQueueDriver::new`], but start both `avail.idx` and `used.idx` at `start` (as
    /// after a migration; tests use it to wrap the 16-bit indexes). The device must then be told
    /// `set_next_avail(start)`; it reads `used.idx` itself when attached.
    pub fn with_start_index(
        mem: GuestMemory,
        config: QueueConfig,
        start: u16,
    ) -> Result<Self, QueueError> {
        let rings = Rings::new(mem, &config)?;
        let zero = |gpa: u64, len: u64| rings.memory().write(gpa, &vec![0u8; len as usize]);
        zero(config.desc_table, config.desc_table_len())?;
        zero(config.avail_ring, config.avail_ring_len())?;
        zero(config.used_ring, config.used_ring_len())?;
        rings.set_avail_idx(start, Ordering::Relaxed);
        rings.set_used_idx(start, Ordering::Relaxed);
        // Publish the initialised rings before anything that hands them to a device.
        fence(Ordering::SeqCst);
        let size = usize::from(config.size);
        Ok(Self {
            config,
            rings,
            free: (0..config.size).rev().collect(),
            next: vec![0; size],
            heads: vec![HeadState::default(); size],
            avail_idx: start,
            added: 0,
            last_used: start,
            in_flight: 0,
            broken: None,
        })
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// The memory the rings live in.
    pub fn memory(&self) -> &GuestMemory {
        self.rings.memory()
    }

    /// Descriptors not used by any chain in flight.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains made available (published or not) and not yet reaped.
    pub fn in_flight(&self) -> usize {
        usize::from(self.in_flight)
    }

    /// The avail idx the next chain will get.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The used idx of the next entry to reap.
    pub fn last_used(&self) -> u16 {
        self.last_used
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

    fn sums(readable: &[(u64, u32)], writable: &[(u64, u32)]) -> Result<u32, QueueError> {
        let too_long = || QueueError::InvalidConfig("chain longer than 4 GiB".into());
        let mut total: u32 = 0;
        for &(_, len) in readable {
            total = total.checked_add(len).ok_or_else(too_long)?;
        }
        let mut writable_total: u32 = 0;
        for &(_, len) in writable {
            total = total.checked_add(len).ok_or_else(too_long)?;
            writable_total += len;
        }
        Ok(writable_total)
    }

    /// Make the chain available (readable buffers first, then writable ones) without publishing
    /// it; returns its head. `Full` when there are not enough free descriptors.
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
        if n > self.free.len() {
            return Err(QueueError::Full);
        }
        let buffers = readable
            .iter()
            .map(|&b| (b, 0))
            .chain(writable.iter().map(|&b| (b, VIRTQ_DESC_F_WRITE)));
        // Checked above: there are at least n free descriptors.
        let head = self.free.pop().ok_or(QueueError::Full)?;
        let mut index = head;
        for (k, ((addr, len), write)) in buffers.enumerate() {
            let (flags, next) = if k + 1 < n {
                let next = self.free.pop().ok_or(QueueError::Full)?;
                (write | VIRTQ_DESC_F_NEXT, next)
            } else {
                (write, 0)
            };
            self.rings
                .set_descriptor(index, &Descriptor::new(addr, len, flags, next));
            self.next[usize::from(index)] = next;
            index = next;
        }
        self.heads[usize::from(head)] = HeadState {
            in_flight: true,
            descriptors: n as u16,
            writable: writable_total,
        };
        self.make_available(head);
        Ok(head)
    }

    /// Make a chain available through an indirect table at `table_gpa` (16·n bytes of caller
    /// memory, any alignment); it takes a single ring descriptor.
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
        if self.free.is_empty() {
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
            let (flags, next) = if k + 1 < n {
                (write | VIRTQ_DESC_F_NEXT, (k + 1) as u16)
            } else {
                (write, 0)
            };
            let entry = Descriptor::new(addr, len, flags, next);
            mem.write(table_gpa + 16 * k as u64, &entry.to_le_bytes())?;
        }
        let head = self.free.pop().ok_or(QueueError::Full)?;
        self.rings.set_descriptor(
            head,
            &Descriptor::new(table_gpa, table_len, VIRTQ_DESC_F_INDIRECT, 0),
        );
        self.next[usize::from(head)] = 0;
        self.heads[usize::from(head)] = HeadState {
            in_flight: true,
            descriptors: 1,
            writable: writable_total,
        };
        self.make_available(head);
        Ok(head)
    }

    fn make_available(&mut self, head: u16) {
        // §1.6 step 2: the ring entry; published by the Release store of avail.idx.
        self.rings
            .set_avail_entry(self.avail_idx, head, Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.added += 1;
        self.in_flight += 1;
    }

    /// Publish the chains added since the last call and decide whether to kick the device.
    pub fn publish(&mut self) -> Result<bool, QueueError> {
        self.check()?;
        if self.added == 0 {
            return Ok(false);
        }
        let new = self.avail_idx;
        let old = new.wrapping_sub(self.added);
        self.added = 0;
        // §1.6 steps 3–4: write barrier, then avail.idx — a Release store, so the descriptors and
        // ring entries written before are visible to a device that Acquire-loads the index.
        self.rings.set_avail_idx(new, Ordering::Release);
        // §1.6 step 5: full barrier so the avail.idx store is not reordered after the read of
        // avail_event / used.flags below (lost wakeup otherwise).
        fence(Ordering::SeqCst);
        // §1.6 step 6 / §1.5 "available-buffer notifications".
        Ok(if self.config.event_idx {
            need_event(self.rings.avail_event(Ordering::Relaxed), new, old)
        } else {
            self.rings.used_flags(Ordering::Relaxed) & VIRTQ_USED_F_NO_NOTIFY == 0
        })
    }

    /// Reap the next used entry, if any: `(head, len)`. Checks that the head is a chain in flight
    /// and that `len` does not exceed its writable bytes; a violation breaks the queue.
    pub fn reap_used(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
        self.check()?;
        // §1.6 "driver consume": read used.idx, read barrier (Acquire), then the entry and the
        // buffers.
        let used_idx = self.rings.used_idx(Ordering::Acquire);
        if used_idx == self.last_used {
            return Ok(None);
        }
        if used_idx.wrapping_sub(self.last_used) > self.in_flight {
            let err = QueueError::UsedIndexJump {
                used_idx,
                last_used: self.last_used,
                in_flight: self.in_flight,
            };
            return Err(self.fail(err));
        }
        let (id, len) = self.rings.used_entry(self.last_used, Ordering::Relaxed);
        let state = usize::try_from(id)
            .ok()
            .and_then(|i| self.heads.get(i))
            .copied()
            .filter(|s| s.in_flight);
        let Some(state) = state else {
            return Err(self.fail(QueueError::BadUsedEntry {
                id,
                len,
                reason: "not the head of a chain in flight",
            }));
        };
        if len > state.writable {
            return Err(self.fail(QueueError::BadUsedEntry {
                id,
                len,
                reason: "len exceeds the chain's writable bytes",
            }));
        }
        // id < Q <= 32768 here.
        let head = id as u16;
        let mut index = head;
        for _ in 0..state.descriptors {
            self.free.push(index);
            index = self.next[usize::from(index)];
        }
        self.heads[usize::from(head)].in_flight = false;
        self.in_flight -= 1;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some((head, len)))
    }

    /// Ask the device for used-buffer notifications again. Returns `true` if used entries
    /// arrived meanwhile (reap them instead of waiting).
    pub fn enable_call_notifications(&mut self) -> Result<bool, QueueError> {
        self.check()?;
        if self.config.event_idx {
            self.rings.set_used_event(self.last_used, Ordering::Relaxed);
        } else {
            self.rings.set_avail_flags(0, Ordering::Relaxed);
        }
        // §1.6 "re-enabling interrupts": full barrier, then re-read used.idx.
        fence(Ordering::SeqCst);
        Ok(self.rings.used_idx(Ordering::Acquire) != self.last_used)
    }

    /// Ask the device not to notify (a hint). With EVENT_IDX `used_event` simply stays behind.
    pub fn disable_call_notifications(&mut self) -> Result<(), QueueError> {
        self.check()?;
        if !self.config.event_idx {
            self.rings
                .set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::test_util::shared_memory;

    fn config(size: u16) -> QueueConfig {
        QueueConfig {
            size,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            event_idx: false,
            indirect: true,
        }
    }

    fn driver(size: u16) -> SplitQueueDriver {
        let (mem, _) = shared_memory(&[(0, 0x10000)]);
        SplitQueueDriver::new(mem, config(size)).unwrap()
    }

    fn complete(drv: &SplitQueueDriver, id: u32, len: u32) {
        let mem = drv.memory();
        let idx = mem.load_u16(0x3002, Ordering::Acquire).unwrap();
        let slot = 0x3004 + 8 * u64::from(idx % drv.config.size);
        mem.store_u32(slot, id, Ordering::Relaxed).unwrap();
        mem.store_u32(slot + 4, len, Ordering::Relaxed).unwrap();
        mem.store_u16(0x3002, idx.wrapping_add(1), Ordering::Release)
            .unwrap();
    }

    #[test]
    fn new_zeroes_the_rings() {
        let (mem, _) = shared_memory(&[(0, 0x10000)]);
        mem.write(0x1000, &[0xff; 0x3000]).unwrap();
        let drv = SplitQueueDriver::new(mem.clone(), config(8)).unwrap();
        let mut back = [1u8; 16 * 8];
        mem.read(0x1000, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        assert_eq!(mem.load_u16(0x2002, Ordering::Acquire).unwrap(), 0);
        assert_eq!(mem.load_u16(0x3002, Ordering::Acquire).unwrap(), 0);
        assert_eq!(drv.free_descriptors(), 8);
    }

    #[test]
    fn writes_descriptors_and_ring_entries() {
        let mut drv = driver(8);
        let head = drv
            .add_chain(&[(0x8000, 10)], &[(0x9000, 20), (0xa000, 30)])
            .unwrap();
        assert_eq!(drv.free_descriptors(), 5);
        assert_eq!(drv.in_flight(), 1);
        let mem = drv.memory().clone();
        assert_eq!(
            mem.load_u16(0x2002, Ordering::Acquire).unwrap(),
            0,
            "not published yet"
        );
        assert!(drv.publish().unwrap());
        assert_eq!(mem.load_u16(0x2002, Ordering::Acquire).unwrap(), 1);
        assert_eq!(mem.load_u16(0x2004, Ordering::Acquire).unwrap(), head);
        let mut index = head;
        let mut seen = Vec::new();
        loop {
            let mut raw = [0u8; 16];
            mem.read(0x1000 + 16 * u64::from(index), &mut raw).unwrap();
            let d = Descriptor::from_le_bytes(raw);
            seen.push((d.addr, d.len, d.flags & VIRTQ_DESC_F_WRITE != 0));
            if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                break;
            }
            index = d.next;
        }
        assert_eq!(
            seen,
            [(0x8000, 10, false), (0x9000, 20, true), (0xa000, 30, true)]
        );
        assert!(!drv.publish().unwrap(), "nothing new to publish");
    }

    #[test]
    fn full_when_out_of_descriptors_and_freed_on_reap() {
        let mut drv = driver(4);
        let a = drv.add_chain(&[(0x8000, 1), (0x8001, 1)], &[]).unwrap();
        let b = drv.add_chain(&[(0x8000, 1)], &[(0x9000, 4)]).unwrap();
        assert_eq!(drv.add_chain(&[(0x8000, 1)], &[]), Err(QueueError::Full));
        assert_eq!(
            drv.add_indirect(0x4000, &[(0x8000, 1)], &[]),
            Err(QueueError::Full)
        );
        assert!(!drv.is_broken(), "Full is not a fault");
        drv.publish().unwrap();
        complete(&drv, u32::from(b), 4);
        assert_eq!(drv.reap_used().unwrap(), Some((b, 4)));
        assert_eq!(drv.free_descriptors(), 2);
        complete(&drv, u32::from(a), 0);
        assert_eq!(drv.reap_used().unwrap(), Some((a, 0)));
        assert_eq!(drv.free_descriptors(), 4);
        assert_eq!(drv.in_flight(), 0);
        assert!(drv.add_chain(&[], &[]).is_err());
    }

    #[test]
    fn indirect_table_is_written_in_caller_memory() {
        let mut drv = driver(4);
        // Unaligned table address: allowed for indirect tables.
        let head = drv
            .add_indirect(0x4003, &[(0x8000, 5)], &[(0x9000, 7)])
            .unwrap();
        assert_eq!(drv.free_descriptors(), 3);
        let mem = drv.memory();
        let mut raw = [0u8; 16];
        mem.read(0x1000 + 16 * u64::from(head), &mut raw).unwrap();
        assert_eq!(
            Descriptor::from_le_bytes(raw),
            Descriptor::new(0x4003, 32, VIRTQ_DESC_F_INDIRECT, 0)
        );
        mem.read(0x4003 + 16, &mut raw).unwrap();
        assert_eq!(
            Descriptor::from_le_bytes(raw),
            Descriptor::new(0x9000, 7, VIRTQ_DESC_F_WRITE, 0)
        );
        assert!(drv.add_indirect(0xfff0, &[(0x8000, 1)], &[(0, 1)]).is_err());
        assert_eq!(drv.free_descriptors(), 3, "failed add takes nothing");
    }

    #[test]
    fn hostile_used_entries_break_the_driver() {
        // Unknown id.
        let mut drv = driver(4);
        drv.add_chain(&[(0x8000, 1)], &[(0x9000, 8)]).unwrap();
        drv.publish().unwrap();
        complete(&drv, 3, 0);
        assert!(matches!(
            drv.reap_used(),
            Err(QueueError::BadUsedEntry { id: 3, .. })
        ));
        assert!(drv.is_broken());
        assert!(matches!(drv.reap_used(), Err(QueueError::Broken(_))));
        assert!(matches!(drv.publish(), Err(QueueError::Broken(_))));

        // Id far out of range.
        let mut drv = driver(4);
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.publish().unwrap();
        complete(&drv, 0x1_0000, 0);
        assert!(matches!(
            drv.reap_used(),
            Err(QueueError::BadUsedEntry { id: 0x1_0000, .. })
        ));

        // Length larger than the writable part.
        let mut drv = driver(4);
        let head = drv.add_chain(&[(0x8000, 1)], &[(0x9000, 8)]).unwrap();
        drv.publish().unwrap();
        complete(&drv, u32::from(head), 9);
        assert!(matches!(
            drv.reap_used(),
            Err(QueueError::BadUsedEntry { len: 9, .. })
        ));

        // The same head twice.
        let mut drv = driver(4);
        let head = drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.publish().unwrap();
        complete(&drv, u32::from(head), 0);
        complete(&drv, u32::from(head), 0);
        assert!(drv.reap_used().unwrap().is_some());
        assert!(matches!(
            drv.reap_used(),
            Err(QueueError::BadUsedEntry { .. })
        ));

        // used.idx jumping past what is in flight.
        let mut drv = driver(4);
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.publish().unwrap();
        drv.memory()
            .store_u16(0x3002, 2, Ordering::Release)
            .unwrap();
        assert!(matches!(
            drv.reap_used(),
            Err(QueueError::UsedIndexJump {
                used_idx: 2,
                last_used: 0,
                in_flight: 1
            })
        ));
    }

    #[test]
    fn call_notification_flags_and_used_event() {
        let (mem, _) = shared_memory(&[(0, 0x10000)]);
        let mut drv = SplitQueueDriver::new(mem.clone(), config(8)).unwrap();
        drv.disable_call_notifications().unwrap();
        assert_eq!(
            mem.load_u16(0x2000, Ordering::Acquire).unwrap(),
            VIRTQ_AVAIL_F_NO_INTERRUPT
        );
        assert!(!drv.enable_call_notifications().unwrap());
        assert_eq!(mem.load_u16(0x2000, Ordering::Acquire).unwrap(), 0);

        let cfg = QueueConfig {
            event_idx: true,
            ..config(8)
        };
        let mut drv = SplitQueueDriver::with_start_index(mem.clone(), cfg, 7).unwrap();
        let head = drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.publish().unwrap();
        complete(&drv, u32::from(head), 0);
        assert!(
            drv.enable_call_notifications().unwrap(),
            "a used entry is already there"
        );
        assert_eq!(mem.load_u16(0x2000 + 4 + 16, Ordering::Acquire).unwrap(), 7);
        drv.reap_used().unwrap().unwrap();
        assert!(!drv.enable_call_notifications().unwrap());
        assert_eq!(mem.load_u16(0x2000 + 4 + 16, Ordering::Acquire).unwrap(), 8);
    }

    #[test]
    fn publish_kick_decision_with_event_idx() {
        let (mem, _) = shared_memory(&[(0, 0x10000)]);
        let cfg = QueueConfig {
            event_idx: true,
            ..config(8)
        };
        let mut drv = SplitQueueDriver::new(mem.clone(), cfg).unwrap();
        // avail_event = 2: publishing 0 -> 2 does not cross it, 2 -> 4 does.
        mem.store_u16(0x3004 + 64, 2, Ordering::Release).unwrap();
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        assert!(!drv.publish().unwrap());
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        drv.add_chain(&[(0x8000, 1)], &[]).unwrap();
        assert!(drv.publish().unwrap());
    }
}
