//! A front-end that shrinks its file under our mappings: every access path ends in an error of
//! that mapping, never in SIGBUS for the process (`vvu_core::sigbus`).
//!
//! Each test body runs in a child process (this test binary, re-executed for one test): before
//! the handler existed the SIGBUS killed the process that touched the memory, and it must not take
//! the other tests down with it when it regresses. The parent asserts the child's exit status.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vvu_core::dirty_log::DirtyLog;
use vvu_core::inflight::{InflightRegion, RingLayout};
use vvu_core::memory::{create_memfd, GuestMemory, MemoryRegion, RegionSpec};
use vvu_core::queue::{ChainBatch, PackedConfig, PackedQueue, QueueConfig, SplitQueue};
use vvu_core::{MemoryError, QueueError};

const CHILD: &str = "VVU_SIGBUS_TEST_CHILD";
const PAGE: u64 = 0x1000;

/// Run `body` in a child process; returns its exit status (`None`: killed by a signal, which the
/// status carries).
fn in_child(name: &str, body: impl FnOnce()) -> std::process::ExitStatus {
    if std::env::var(CHILD).as_deref() == Ok(name) {
        body();
        std::process::exit(0);
    }
    let exe = std::env::current_exe().unwrap();
    Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .status()
        .unwrap()
}

fn assert_child_ok(name: &str, body: impl FnOnce()) {
    let status = in_child(name, body);
    assert!(
        status.success(),
        "{name}: the child died ({status}); a SIGBUS in guest memory must become an error"
    );
}

/// A memfd the way a careless front-end makes it: no sealing allowed, so nothing stops a shrink.
fn shrinkable_memfd(size: u64) -> OwnedFd {
    // SAFETY: a valid NUL-terminated name; the fd is fresh and ours.
    let fd = unsafe {
        let raw = libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC);
        assert!(raw >= 0);
        OwnedFd::from_raw_fd(raw)
    };
    shrink(&fd, size);
    fd
}

fn shrink(fd: &OwnedFd, size: u64) {
    // SAFETY: plain syscall on an open fd.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
}

fn region(fd: &OwnedFd, gpa: u64, size: u64) -> Arc<MemoryRegion> {
    let spec = RegionSpec {
        guest_phys_addr: gpa,
        size,
        userspace_addr: 0x7000_0000 + gpa,
        mmap_offset: 0,
    };
    Arc::new(MemoryRegion::map(fd.try_clone().unwrap(), spec).unwrap())
}

fn is_poisoned<T: std::fmt::Debug>(result: Result<T, MemoryError>) -> bool {
    matches!(result, Err(MemoryError::Poisoned(_)))
}

#[test]
fn guest_memory_read_and_write_of_a_shrunk_file_fail_and_the_rest_works() {
    assert_child_ok(
        "guest_memory_read_and_write_of_a_shrunk_file_fail_and_the_rest_works",
        || {
            let hostile = shrinkable_memfd(4 * PAGE);
            let good = create_memfd("good", PAGE).unwrap();
            let mem = GuestMemory::new(vec![
                region(&hostile, 0, 4 * PAGE),
                region(&good, 0x10_000, PAGE),
            ])
            .unwrap();
            mem.write(0x10, b"before").unwrap();
            shrink(&hostile, 0);
            let mut out = [0xaau8; 6];
            assert!(is_poisoned(mem.read(0x10, &mut out)));
            assert_eq!(out, [0; 6], "the access completed on zero pages");
            assert!(is_poisoned(mem.write(2 * PAGE, b"x")));
            assert!(is_poisoned(mem.load_u16(0, Ordering::Acquire)));
            assert!(mem.is_poisoned());
            // Another snapshot that does not hold the hostile region is untouched.
            let other = GuestMemory::new(vec![region(&good, 0, PAGE)]).unwrap();
            other.write(0, b"fine").unwrap();
            let mut back = [0u8; 4];
            other.read(0, &mut back).unwrap();
            assert_eq!(&back, b"fine");
        },
    );
}

fn split_queue(mem: GuestMemory) -> SplitQueue {
    let mut queue = SplitQueue::new(QueueConfig {
        size: 16,
        desc_table: 0,
        avail_ring: 0x1000,
        used_ring: 0x2000,
        event_idx: true,
        indirect: true,
    })
    .unwrap();
    queue.attach(mem).unwrap();
    queue
}

#[test]
fn split_queue_pop_on_a_shrunk_file_breaks_the_queue() {
    assert_child_ok("split_queue_pop_on_a_shrunk_file_breaks_the_queue", || {
        let fd = shrinkable_memfd(16 * PAGE);
        let mem = GuestMemory::new(vec![region(&fd, 0, 16 * PAGE)]).unwrap();
        // One chain: descriptor 0 (0x4000, 16 bytes), avail.ring[0] = 0, avail.idx = 1.
        let desc = vvu_core::queue::Descriptor::new(0x4000, 16, 0, 0);
        mem.write(0, &desc.to_le_bytes()).unwrap();
        mem.store_u16(0x1004, 0, Ordering::Relaxed).unwrap();
        mem.store_u16(0x1002, 1, Ordering::Release).unwrap();
        let mut queue = split_queue(mem);
        shrink(&fd, 0);
        let err = queue.pop_batch(&mut ChainBatch::new(), 8).unwrap_err();
        assert!(
            matches!(err, QueueError::Memory(MemoryError::Poisoned(_))),
            "{err}"
        );
        assert!(queue.is_broken());
    });
}

#[test]
fn packed_queue_pop_on_a_shrunk_file_breaks_the_queue() {
    assert_child_ok("packed_queue_pop_on_a_shrunk_file_breaks_the_queue", || {
        let fd = shrinkable_memfd(16 * PAGE);
        let mem = GuestMemory::new(vec![region(&fd, 0, 16 * PAGE)]).unwrap();
        let mut queue = PackedQueue::new(PackedConfig {
            size: 16,
            desc_ring: 0,
            driver_event: 0x1000,
            device_event: 0x2000,
            event_idx: true,
            indirect: true,
        })
        .unwrap();
        queue.attach(mem).unwrap();
        shrink(&fd, 0);
        let err = queue.pop_batch(&mut ChainBatch::new(), 8).unwrap_err();
        assert!(
            matches!(err, QueueError::Memory(MemoryError::Poisoned(_))),
            "{err}"
        );
        assert!(queue.is_broken());
    });
}

#[test]
fn set_inflight_on_a_shrunk_region_fails() {
    assert_child_ok("set_inflight_on_a_shrunk_region_fails", || {
        let ring = shrinkable_memfd(16 * PAGE);
        let mem = GuestMemory::new(vec![region(&ring, 0, 16 * PAGE)]).unwrap();
        let mut queue = split_queue(mem);
        let size = InflightRegion::required_size(RingLayout::Split, 1, 16);
        let fd = shrinkable_memfd(size);
        let inflight = Arc::new(
            InflightRegion::map(fd.try_clone().unwrap(), size, 0, RingLayout::Split, 1, 16)
                .unwrap(),
        );
        let view = inflight.split_queue(0, 16).unwrap();
        shrink(&fd, 0);
        let err = queue.set_inflight(view).unwrap_err();
        assert!(
            matches!(err, QueueError::Memory(MemoryError::Poisoned(_))),
            "{err}"
        );
        assert!(is_poisoned(inflight.check_poison()));
    });
}

#[test]
fn dirty_log_mark_on_a_shrunk_log_fails() {
    assert_child_ok("dirty_log_mark_on_a_shrunk_log_fails", || {
        let fd = shrinkable_memfd(PAGE);
        let log = DirtyLog::map(fd.try_clone().unwrap(), PAGE, 0).unwrap();
        log.mark(0, 0x10_000).unwrap();
        shrink(&fd, 0);
        assert!(is_poisoned(log.mark(0, 0x10_000)));
    });
}

#[test]
fn a_fault_outside_guest_memory_still_kills_the_process() {
    // The handler must not swallow faults it does not own: an unregistered mapping of a shrunk
    // file still ends the process with SIGBUS (the default action it chains to).
    let status = in_child(
        "a_fault_outside_guest_memory_still_kills_the_process",
        || {
            let guest = shrinkable_memfd(PAGE);
            let _mem = GuestMemory::new(vec![region(&guest, 0, PAGE)]).unwrap(); // installs it
            let fd = shrinkable_memfd(PAGE);
            // SAFETY: a fresh shared mapping of our own fd.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    PAGE as usize,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            shrink(&fd, 0);
            // SAFETY: deliberately touching the truncated page: this must raise SIGBUS.
            let byte = unsafe { std::ptr::read_volatile(ptr.cast::<u8>()) };
            println!("read {byte} from a truncated page without a signal");
        },
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status}");
}

#[test]
fn memfds_we_create_are_sealed_and_peer_memfds_get_a_shrink_seal() {
    let ours = create_memfd("ours", PAGE).unwrap();
    // SAFETY: plain fcntl/ftruncate on our fds.
    unsafe {
        let seals = libc::fcntl(ours.as_raw_fd(), libc::F_GET_SEALS);
        assert_eq!(
            seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW),
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
        );
        assert_ne!(libc::ftruncate(ours.as_raw_fd(), 0), 0);

        let raw = libc::memfd_create(
            c"peer".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        );
        let peer = OwnedFd::from_raw_fd(raw);
        shrink(&peer, 2 * PAGE);
        let _region = region(&peer, 0, PAGE);
        assert_ne!(
            libc::fcntl(peer.as_raw_fd(), libc::F_GET_SEALS) & libc::F_SEAL_SHRINK,
            0,
            "mapping a sealable memfd seals it against shrinking"
        );
        assert_ne!(libc::ftruncate(peer.as_raw_fd(), PAGE as libc::off_t), 0);
        // Growing stays allowed: it cannot make a mapping fault.
        assert_eq!(
            libc::ftruncate(peer.as_raw_fd(), 4 * PAGE as libc::off_t),
            0
        );
    }
}
