//! Doorbell round-trip latency between two threads.
//!
//! Each iteration is one ping-pong: the bench thread rings doorbell A and waits on doorbell B; an
//! echo thread waits on A and rings B. Cases:
//!
//! - `eventfd_wait`: two [`EventFd`]s, blocking `EventFd::wait` (poll + read) on both sides.
//! - `eventfd_poller`: the same through a [`Poller`] per side (epoll_wait + consume), busy-poll off.
//! - `eventfd_poller_busy`: as `eventfd_poller` with a busy-poll budget on both sides. Both
//!   threads spin, so on a 2-core machine this occupies every core.
//! - `eventfd_kick_sleeper`: one side sleeps, one spins, as a polling front-end (testpmd) and an
//!   event-driven back-end do: the bench thread works [`FRONT_END_WORK`] (a spin standing for
//!   the front-end's own work on a burst, during which the echo thread goes back to sleep), kicks
//!   the echo thread's eventfd and spins on a shared counter; the echo thread sleeps in a
//!   [`Poller`] (epoll_wait), consumes the kick and bumps the counter (no system call). One
//!   iteration minus [`FRONT_END_WORK`] is what one wake-up of a sleeping back-end costs a
//!   burst's round trip: the floor under any event-driven back-end's loop on this machine.
//! - `pipe_baseline`: two blocking pipes, 1-byte write / blocking read, measured in the same run
//!   so the eventfd numbers can be read as a ratio to it.
//!
//! The two threads are pinned to two different CPUs (the first two this process may use), as a
//! front-end and a back-end would normally run: otherwise the scheduler sometimes puts both on
//! one CPU, where a wake-up is much cheaper, and the results flip between two modes from run to
//! run. With fewer than two CPUs the threads are left unpinned.
//!
//! Run: `cargo bench -p vvu-core --bench eventfd`.

use std::fs::File;
use std::hint::black_box;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use vvu_core::notify::{EventFd, Poller};

const BUSY_POLL_BUDGET: Duration = Duration::from_micros(200);
/// `eventfd_kick_sleeper`: the near side's work between a reply and its next kick.
const FRONT_END_WORK: Duration = Duration::from_micros(5);

/// One side's doorbell: how to ring the peer and how to wait for it.
trait Doorbell: Send + 'static {
    fn ring(&mut self);
    fn wait(&mut self);
}

/// Rings with `EventFd::signal`, waits with `EventFd::wait(None)`.
struct EfdWait {
    tx: Arc<EventFd>,
    rx: Arc<EventFd>,
}

impl Doorbell for EfdWait {
    fn ring(&mut self) {
        self.tx.signal().unwrap();
    }
    fn wait(&mut self) {
        assert!(self.rx.wait(None).unwrap());
    }
}

/// Waits through a `Poller` (optionally busy-polling), then consumes.
struct EfdPoller {
    tx: Arc<EventFd>,
    rx: Arc<EventFd>,
    poller: Poller,
    events: Vec<u64>,
}

impl EfdPoller {
    fn new(tx: Arc<EventFd>, rx: Arc<EventFd>, busy_poll: Option<Duration>) -> Self {
        let poller = Poller::new().unwrap();
        poller.register(rx.as_fd(), 0).unwrap();
        poller.set_busy_poll(busy_poll);
        Self {
            tx,
            rx,
            poller,
            events: Vec::with_capacity(1),
        }
    }
}

impl Doorbell for EfdPoller {
    fn ring(&mut self) {
        self.tx.signal().unwrap();
    }
    fn wait(&mut self) {
        loop {
            self.poller.wait(None, &mut self.events).unwrap();
            if self.rx.consume().unwrap() > 0 {
                return;
            }
        }
    }
}

/// `eventfd_kick_sleeper`'s two sides: the near one (`sleeper: None`) works, kicks and spins on
/// `replies`; the far one sleeps on its poller, consumes the kick and bumps `replies`.
struct KickSpin {
    kick: Arc<EventFd>,
    replies: Arc<AtomicU64>,
    seen: u64,
    sleeper: Option<(Poller, Vec<u64>)>,
}

impl KickSpin {
    fn pair() -> (Self, Self) {
        let kick = Arc::new(EventFd::new().unwrap());
        let replies = Arc::new(AtomicU64::new(0));
        let poller = Poller::new().unwrap();
        poller.register(kick.as_fd(), 0).unwrap();
        let near = Self {
            kick: Arc::clone(&kick),
            replies: Arc::clone(&replies),
            seen: 0,
            sleeper: None,
        };
        let far = Self {
            kick,
            replies,
            seen: 0,
            sleeper: Some((poller, Vec::with_capacity(1))),
        };
        (near, far)
    }
}

impl Doorbell for KickSpin {
    fn ring(&mut self) {
        if self.sleeper.is_some() {
            self.replies.fetch_add(1, Ordering::Release);
            return;
        }
        let start = Instant::now();
        while start.elapsed() < FRONT_END_WORK {
            std::hint::spin_loop();
        }
        self.kick.signal().unwrap();
    }
    fn wait(&mut self) {
        match &mut self.sleeper {
            Some((poller, events)) => loop {
                poller.wait(None, events).unwrap();
                if self.kick.consume().unwrap() > 0 {
                    return;
                }
            },
            None => {
                while self.replies.load(Ordering::Acquire) == self.seen {
                    std::hint::spin_loop();
                }
                self.seen += 1;
            }
        }
    }
}

/// Blocking pipes: write one byte, read one byte.
struct Pipe {
    tx: File,
    rx: File,
}

impl Doorbell for Pipe {
    fn ring(&mut self) {
        self.tx.write_all(&[1]).unwrap();
    }
    fn wait(&mut self) {
        let mut byte = [0u8];
        self.rx.read_exact(&mut byte).unwrap();
    }
}

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 just created both fds; each is owned by exactly one File from here on.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (File::from(rd), File::from(wr))
}

/// The CPU set of the calling thread.
fn affinity() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; all-zero is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed; 0 = the calling thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    assert_eq!(
        r,
        0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    set
}

/// Restricts the calling thread to `set`.
fn set_affinity(set: &libc::cpu_set_t) {
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 = the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) };
    assert_eq!(
        r,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}

/// The first two CPUs of `allowed`, each as a one-CPU set, or `None` with fewer than two.
fn two_cpus(allowed: &libc::cpu_set_t) -> Option<(libc::cpu_set_t, libc::cpu_set_t)> {
    let mut cpus = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET only reads `allowed`, and the index is below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, allowed) })
        .map(|cpu| {
            // SAFETY: cpu_set_t is plain data; all-zero is an empty set.
            let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: CPU_SET writes into `one`; the index is below CPU_SETSIZE.
            unsafe { libc::CPU_SET(cpu, &mut one) };
            one
        });
    Some((cpus.next()?, cpus.next()?))
}

/// Runs the ping-pong: `near` is the bench thread's side, `far` the echo thread's. `stop` ends
/// the echo thread: set it, then ring once more so the echo thread wakes and sees it.
fn ping_pong<D: Doorbell>(c: &mut Criterion, name: &str, mut near: D, mut far: D) {
    let original = affinity();
    let pinning = two_cpus(&original);
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = Arc::clone(&stop);
        let far_cpu = pinning.map(|(_, far_cpu)| far_cpu);
        thread::spawn(move || {
            if let Some(cpu) = &far_cpu {
                set_affinity(cpu);
            }
            loop {
                far.wait();
                if stop.load(Ordering::Acquire) {
                    return;
                }
                far.ring();
            }
        })
    };
    if let Some((near_cpu, _)) = &pinning {
        set_affinity(near_cpu);
    }
    c.bench_function(name, |b| {
        b.iter(|| {
            near.ring();
            near.wait();
            black_box(&near);
        })
    });
    stop.store(true, Ordering::Release);
    near.ring();
    echo.join().unwrap();
    set_affinity(&original);
}

fn eventfd_pair() -> (Arc<EventFd>, Arc<EventFd>) {
    (
        Arc::new(EventFd::new().unwrap()),
        Arc::new(EventFd::new().unwrap()),
    )
}

fn bench_eventfd_wait(c: &mut Criterion) {
    let (a, b) = eventfd_pair();
    let near = EfdWait {
        tx: a.clone(),
        rx: b.clone(),
    };
    let far = EfdWait { tx: b, rx: a };
    ping_pong(c, "eventfd_wait", near, far);
}

fn bench_eventfd_poller(c: &mut Criterion) {
    let (a, b) = eventfd_pair();
    let near = EfdPoller::new(a.clone(), b.clone(), None);
    let far = EfdPoller::new(b, a, None);
    ping_pong(c, "eventfd_poller", near, far);
}

fn bench_eventfd_poller_busy(c: &mut Criterion) {
    let (a, b) = eventfd_pair();
    let near = EfdPoller::new(a.clone(), b.clone(), Some(BUSY_POLL_BUDGET));
    let far = EfdPoller::new(b, a, Some(BUSY_POLL_BUDGET));
    ping_pong(c, "eventfd_poller_busy", near, far);
}

fn bench_eventfd_kick_sleeper(c: &mut Criterion) {
    let (near, far) = KickSpin::pair();
    ping_pong(c, "eventfd_kick_sleeper", near, far);
}

fn bench_pipe(c: &mut Criterion) {
    let (a_rx, a_tx) = pipe();
    let (b_rx, b_tx) = pipe();
    let near = Pipe { tx: a_tx, rx: b_rx };
    let far = Pipe { tx: b_tx, rx: a_rx };
    ping_pong(c, "pipe_baseline", near, far);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_pipe, bench_eventfd_wait, bench_eventfd_poller, bench_eventfd_poller_busy,
        bench_eventfd_kick_sleeper
}
criterion_main!(benches);
