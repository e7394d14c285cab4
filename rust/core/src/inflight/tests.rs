use super::*;

/// A second, independent mapping of the same fd: what the next incarnation of the back-end
/// maps after SET_INFLIGHT_FD.
fn remap(region: &InflightRegion) -> Arc<InflightRegion> {
    Arc::new(
        InflightRegion::map(
            region.fd().try_clone().unwrap(),
            region.mmap_size(),
            0,
            region.layout(),
            region.num_queues(),
            region.queue_size(),
        )
        .unwrap(),
    )
}

fn split(queues: u16, size: u16) -> Arc<InflightRegion> {
    Arc::new(InflightRegion::allocate(RingLayout::Split, queues, size).unwrap())
}

/// Raw access to a queue region's bytes, as a hostile peer would write them.
fn poke(region: &Arc<InflightRegion>, queue: u16) -> Fields {
    Fields {
        region: Arc::clone(region),
        base: usize::from(queue) * region.stride,
    }
}

#[test]
fn sizes_follow_the_spec_layout() {
    assert_eq!(RingLayout::Split.queue_region_size(128), 16 + 16 * 128 + 48);
    assert_eq!(RingLayout::Split.queue_region_size(256) % 64, 0);
    assert_eq!(
        RingLayout::Packed.queue_region_size(128),
        32 + 32 * 128 + 32
    );
    let region = split(2, 256);
    assert_eq!(
        region.mmap_size(),
        2 * RingLayout::Split.queue_region_size(256) as u64
    );
    assert_eq!(region.num_queues(), 2);
}

#[test]
fn bad_geometry_and_short_or_misaligned_regions_are_refused() {
    assert!(InflightRegion::allocate(RingLayout::Split, 0, 128).is_err());
    assert!(InflightRegion::allocate(RingLayout::Split, 257, 128).is_err());
    assert!(InflightRegion::allocate(RingLayout::Split, 1, 0).is_err());
    let region = split(2, 128);
    let fd = || region.fd().try_clone().unwrap();
    let size = region.mmap_size();
    // mmap_size too small for the geometry the front-end claims.
    assert!(InflightRegion::map(fd(), size - 1, 0, RingLayout::Split, 2, 128).is_err());
    assert!(InflightRegion::map(fd(), size, 0, RingLayout::Split, 3, 128).is_err());
    // File shorter than offset + size.
    assert!(InflightRegion::map(fd(), size, 64, RingLayout::Split, 2, 128).is_err());
    // Offset that would misalign the atomics.
    assert!(InflightRegion::map(fd(), 64, 8, RingLayout::Split, 1, 1).is_err());
    // Not a regular file.
    let mut pipe = [0; 2];
    // SAFETY: a valid out-array of two ints.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: fresh fds owned by nobody else.
    let (r, _w) = unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1]))
    };
    assert!(InflightRegion::map(r, 4096, 0, RingLayout::Split, 1, 128).is_err());
}

#[test]
fn views_are_bounded_by_the_region() {
    let region = split(2, 128);
    assert!(region.split_queue(1, 128).is_ok());
    assert!(region.split_queue(2, 128).is_err());
    assert!(region.split_queue(0, 256).is_err());
    assert!(region.packed_queue(0, 128).is_err());
}

#[test]
fn fresh_region_is_initialised_with_nothing_in_flight() {
    let region = split(1, 8);
    let mut q = region.split_queue(0, 8).unwrap();
    assert_eq!(q.recover(5), Recovery::default());
    let f = poke(&region, 0);
    assert_eq!(f.u16(S_VERSION).load(Ordering::Relaxed), 1);
    assert_eq!(f.u16(S_DESC_NUM).load(Ordering::Relaxed), 8);
    assert_eq!(f.u16(S_USED_IDX).load(Ordering::Relaxed), 5);
}

#[test]
fn completed_heads_are_not_resubmitted_and_the_rest_come_back_in_fetch_order() {
    let region = split(2, 8);
    let mut q = region.split_queue(1, 8).unwrap();
    q.recover(0);
    for head in [5, 2, 7, 0] {
        q.mark_fetched(head);
    }
    // Complete 2 and 0 in one batch: used->idx 0 -> 2.
    q.record_used(2);
    q.record_used(0);
    q.complete_batch(&[2, 0], 2);
    // Crash; the next incarnation maps the same fd.
    let again = remap(&region);
    let mut q2 = again.split_queue(1, 8).unwrap();
    let rec = q2.recover(2);
    assert_eq!(rec.resubmit, vec![5, 7]);
    assert_eq!(rec.discarded, None);
    // The other queue's region is untouched (still version 0).
    assert_eq!(poke(&again, 0).u16(S_VERSION).load(Ordering::Relaxed), 0);
    // Counters continue after the highest one seen, so fetch order survives a second crash.
    q2.mark_fetched(3);
    let rec = remap(&region).split_queue(1, 8).unwrap().recover(2);
    assert_eq!(rec.resubmit, vec![5, 7, 3]);
}

#[test]
fn half_completed_last_batch_is_finished_from_the_ring_used_idx() {
    let region = split(1, 8);
    let mut q = region.split_queue(0, 8).unwrap();
    q.recover(10);
    for head in [1, 4, 6] {
        q.mark_fetched(head);
    }
    q.record_used(4);
    q.record_used(1);
    // used->idx reached 12 in guest memory, then SIGKILL before the flags were cleared.
    let rec = remap(&region).split_queue(0, 8).unwrap().recover(12);
    assert_eq!(rec.resubmit, vec![6]);
    assert_eq!(poke(&region, 0).u16(S_USED_IDX).load(Ordering::Relaxed), 12);
    // Killed again before anything else happened: the same answer.
    let rec = remap(&region).split_queue(0, 8).unwrap().recover(12);
    assert_eq!(rec.resubmit, vec![6], "recovery is idempotent");
}

#[test]
fn batch_not_yet_published_is_resubmitted() {
    let region = split(1, 8);
    let mut q = region.split_queue(0, 8).unwrap();
    q.recover(0);
    q.mark_fetched(3);
    q.mark_fetched(1);
    q.record_used(3);
    // used->idx still 0 in the ring: 3 was never reported, so it is owed again.
    let rec = remap(&region).split_queue(0, 8).unwrap().recover(0);
    assert_eq!(rec.resubmit, vec![3, 1]);
}

#[test]
fn hostile_regions_are_discarded_with_a_reason_and_reset() {
    type Corrupt = fn(&Fields);
    let cases: [(Corrupt, &str); 5] = [
        (
            |f| f.u16(S_VERSION).store(7, Ordering::Relaxed),
            "version 7",
        ),
        (
            |f| f.u16(S_DESC_NUM).store(16, Ordering::Relaxed),
            "desc_num 16",
        ),
        (
            |f| f.u8(SPLIT_HEADER + 16 * 3).store(2, Ordering::Relaxed),
            "inflight flag 2",
        ),
        (
            |f| f.u16(S_USED_IDX).store(100, Ordering::Relaxed),
            "behind",
        ),
        (
            |f| {
                f.u16(S_USED_IDX).store(4, Ordering::Relaxed);
                f.u16(S_LAST_BATCH_HEAD).store(0xffff, Ordering::Relaxed);
            },
            "links to descriptor 65535",
        ),
    ];
    for (corrupt, reason) in cases {
        let region = split(1, 8);
        let mut q = region.split_queue(0, 8).unwrap();
        q.recover(5);
        q.mark_fetched(3);
        corrupt(&poke(&region, 0));
        let rec = remap(&region).split_queue(0, 8).unwrap().recover(5);
        assert!(rec.resubmit.is_empty(), "{reason}");
        let got = rec.discarded.unwrap_or_default();
        assert!(got.contains(reason), "{got:?} lacks {reason:?}");
        let f = poke(&region, 0);
        assert_eq!(f.u16(S_VERSION).load(Ordering::Relaxed), 1);
        assert_eq!(f.u16(S_DESC_NUM).load(Ordering::Relaxed), 8);
        assert!(!q.is_inflight(3), "reset clears every flag");
    }
}

#[test]
fn a_looping_last_batch_list_terminates() {
    // next links 2 -> 2: walking the last batch only visits `used->idx - used_idx` entries.
    let region = split(1, 8);
    let mut q = region.split_queue(0, 8).unwrap();
    q.recover(0);
    q.mark_fetched(2);
    q.mark_fetched(5);
    let f = poke(&region, 0);
    f.u16(S_LAST_BATCH_HEAD).store(2, Ordering::Relaxed);
    f.u16(SPLIT_HEADER + 16 * 2 + SD_NEXT)
        .store(2, Ordering::Relaxed);
    let rec = remap(&region).split_queue(0, 8).unwrap().recover(8);
    assert_eq!(rec.resubmit, vec![5]);
}

fn packed(size: u16) -> Arc<InflightRegion> {
    Arc::new(InflightRegion::allocate(RingLayout::Packed, 1, size).unwrap())
}

fn d(id: u16, addr: u64) -> PackedDesc {
    PackedDesc {
        addr,
        len: 512,
        id,
        flags: 0,
    }
}

#[test]
fn packed_fields_sit_at_the_spec_offsets() {
    let region = packed(4);
    let mut q = region.packed_queue(0, 4).unwrap();
    q.recover(|_| 0);
    assert_eq!(q.fetch(d(9, 0x1000), true, true).unwrap(), Some(0));
    let f = poke(&region, 0);
    let e = PACKED_HEADER;
    assert_eq!(f.u8(e).load(Ordering::Relaxed), 1, "inflight @0");
    assert_eq!(f.u16(e + 2).load(Ordering::Relaxed), 1, "next @2");
    assert_eq!(f.u16(e + 4).load(Ordering::Relaxed), 0, "last @4");
    assert_eq!(f.u16(e + 6).load(Ordering::Relaxed), 1, "num @6");
    assert_eq!(f.u16(e + 16).load(Ordering::Relaxed), 9, "id @16");
    assert_eq!(f.u32(e + 20).load(Ordering::Relaxed), 512, "len @20");
    assert_eq!(f.u64(e + 24).load(Ordering::Relaxed), 0x1000, "addr @24");
    assert_eq!(f.u16(12).load(Ordering::Relaxed), 1, "free_head @12");
    assert_eq!(f.u16(14).load(Ordering::Relaxed), 1, "old_free_head @14");
    assert_eq!(f.u8(20).load(Ordering::Relaxed), 1, "used_wrap_counter @20");
}

#[test]
fn packed_completed_chains_are_not_resubmitted() {
    let region = packed(8);
    let mut q = region.packed_queue(0, 8).unwrap();
    q.recover(|_| 0);
    // Chain A: two descriptors; chain B: one.
    assert_eq!(q.fetch(d(3, 0xa0), true, false).unwrap(), None);
    let a = q.fetch(d(3, 0xa1), false, true).unwrap().unwrap();
    let b = q.fetch(d(4, 0xb0), true, true).unwrap().unwrap();
    q.complete(a, 2);
    q.commit(&[a]);
    let mut again = remap(&region).packed_queue(0, 8).unwrap();
    let rec = again.recover(|_| 0);
    assert_eq!(rec.discarded, None);
    assert!(rec.restored);
    assert_eq!((rec.used_idx, rec.used_wrap_counter), (2, true));
    assert_eq!(
        rec.resubmit,
        vec![PackedResubmit {
            slot: b,
            descriptors: vec![d(4, 0xb0)]
        }]
    );
}

#[test]
fn packed_half_done_completion_commits_or_rolls_back_by_the_ring() {
    for ring_saw_it in [false, true] {
        let region = packed(8);
        let mut q = region.packed_queue(0, 8).unwrap();
        q.recover(|_| 0);
        let a = q.fetch(d(1, 0x10), true, true).unwrap().unwrap();
        let b = q.fetch(d(2, 0x20), true, true).unwrap().unwrap();
        q.complete(a, 1); // crash before commit
        let used_flags = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED; // wrap counter 1
                                                                 // Not written yet: still the driver's descriptor, available in wrap 1.
        let rec = remap(&region).packed_queue(0, 8).unwrap().recover(|i| {
            if ring_saw_it && i == 0 {
                used_flags
            } else {
                VIRTQ_DESC_F_AVAIL
            }
        });
        let slots: Vec<u16> = rec.resubmit.iter().map(|r| r.slot).collect();
        if ring_saw_it {
            assert_eq!((slots, rec.used_idx), (vec![b], 1));
        } else {
            assert_eq!((slots, rec.used_idx), (vec![a, b], 0));
        }
    }
}

#[test]
fn packed_hostile_free_list_and_chain_lengths_are_discarded() {
    let region = packed(4);
    let mut q = region.packed_queue(0, 4).unwrap();
    q.recover(|_| 0);
    q.fetch(d(1, 0x10), true, true).unwrap();
    let f = poke(&region, 0);
    // Free list 1 -> 2 -> 1.
    f.u16(PACKED_HEADER + PACKED_DESC * 2 + PD_NEXT)
        .store(1, Ordering::Relaxed);
    let rec = remap(&region).packed_queue(0, 4).unwrap().recover(|_| 0);
    assert!(!rec.restored);
    assert!(rec.discarded.unwrap().contains("loops"));
    assert!(rec.resubmit.is_empty());

    let mut q = region.packed_queue(0, 4).unwrap();
    q.fetch(d(1, 0x10), true, true).unwrap();
    f.u16(PACKED_HEADER + PD_NUM).store(900, Ordering::Relaxed);
    let rec = remap(&region).packed_queue(0, 4).unwrap().recover(|_| 0);
    assert!(rec.discarded.unwrap().contains("chain of 900"));
}
