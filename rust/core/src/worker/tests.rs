//! Worker tests: the driver side runs in the test thread, the worker in its own.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;
use crate::queue::test_util::shared_memory;
use crate::queue::{QueueConfig, SplitQueue, SplitQueueDriver, VIRTQ_DESC_F_NEXT};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Request buffers: 4 readable bytes at `IN + 8·slot`, 4 writable at `OUT + 8·slot`.
const IN: u64 = 0x10000;
const OUT: u64 = 0x18000;
/// Generous bound for "this should happen": catches a hang, not a slow machine.
const PATIENCE: Duration = Duration::from_secs(20);

fn config(size: u16, event_idx: bool) -> QueueConfig {
    QueueConfig {
        size,
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
        event_idx,
        indirect: true,
    }
}

fn pair(size: u16, event_idx: bool) -> (SplitQueueDriver, SplitQueue) {
    pair_at(size, event_idx, 0)
}

/// Driver and attached device queue with both indexes starting at `start`.
fn pair_at(size: u16, event_idx: bool, start: u16) -> (SplitQueueDriver, SplitQueue) {
    let (drv_mem, dev_mem) = shared_memory(&[(0, 0x20000), (0x20000, 0x20000)]);
    let drv = SplitQueueDriver::with_start_index(drv_mem, config(size, event_idx), start).unwrap();
    let mut dev = SplitQueue::new(config(size, event_idx)).unwrap();
    dev.attach(dev_mem).unwrap();
    dev.set_next_avail(start);
    (drv, dev)
}

/// Reads a le32 `x` from the readable part and writes `2·x + 1` to the writable part.
struct Doubler {
    delay: Duration,
}

impl ChainHandler for Doubler {
    fn handle(&mut self, _memory: &GuestMemory, chain: ChainView<'_>) -> u32 {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let mut raw = [0u8; 4];
        let (Some(r), Some(w)) = (chain.readable().first(), chain.writable().first()) else {
            return 0;
        };
        // SAFETY: the segments are alive for the call.
        unsafe { r.read_to(0, &mut raw) };
        let y = u32::from_le_bytes(raw).wrapping_mul(2).wrapping_add(1);
        // SAFETY: as above.
        unsafe { w.write_from(0, &y.to_le_bytes()) as u32 }
    }
}

fn doubler() -> Box<dyn ChainHandler> {
    Box::new(Doubler {
        delay: Duration::ZERO,
    })
}

/// The test-side driver: submits requests and waits for completions through the call eventfd.
struct Driver {
    drv: SplitQueueDriver,
    kick: EventFd,
    next: u32,
}

impl Driver {
    fn new(drv: SplitQueueDriver, kick: EventFd) -> Self {
        Self { drv, kick, next: 0 }
    }

    /// Add a request with value `next` (not published). Returns the value.
    fn add(&mut self) -> u32 {
        let x = self.next;
        self.next += 1;
        let slot = u64::from(x % 1024);
        self.drv
            .memory()
            .store_u32(IN + 8 * slot, x, Ordering::Relaxed)
            .unwrap();
        self.drv
            .memory()
            .store_u32(OUT + 8 * slot, 0xdead_beef, Ordering::Relaxed)
            .unwrap();
        self.drv
            .add_chain(&[(IN + 8 * slot, 4)], &[(OUT + 8 * slot, 4)])
            .unwrap();
        x
    }

    /// Publish and kick if the device asks for it.
    fn publish(&mut self) -> bool {
        let kick = self.drv.publish().unwrap();
        if kick {
            self.kick.signal().unwrap();
        }
        kick
    }

    fn submit(&mut self) -> u32 {
        let x = self.add();
        self.publish();
        x
    }

    /// Reap one completion and check its result.
    fn reap(&mut self) -> Option<u32> {
        let (head, len) = self.drv.reap_used().unwrap()?;
        assert_eq!(len, 4);
        let _ = head;
        Some(len)
    }

    /// Wait for one completion, sleeping on `call` only (the way a real driver does): reap,
    /// re-enable calls, re-check, then sleep. Panics if the call never comes (a lost wakeup).
    fn wait_completion(&mut self, call: &EventFd) {
        loop {
            if self.reap().is_some() {
                return;
            }
            if self.drv.enable_call_notifications().unwrap() {
                continue;
            }
            assert!(
                call.wait(Some(PATIENCE)).unwrap(),
                "no call within {PATIENCE:?}: completion lost (used idx {}, last used {})",
                self.drv
                    .memory()
                    .load_u16(USED + 2, Ordering::Acquire)
                    .unwrap(),
                self.drv.last_used()
            );
        }
    }

    fn result(&self, x: u32) -> u32 {
        self.drv
            .memory()
            .load_u32(OUT + 8 * u64::from(x % 1024), Ordering::Acquire)
            .unwrap()
    }
}

/// Poll `cond` until it holds or PATIENCE runs out.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

struct Rig {
    driver: Driver,
    worker: QueueWorker,
    call: EventFd,
}

fn spawn_rig(
    size: u16,
    event_idx: bool,
    handler: Box<dyn ChainHandler>,
    options: WorkerOptions,
) -> Rig {
    let (drv, dev) = pair(size, event_idx);
    spawn_with(drv, dev, handler, options)
}

fn spawn_with(
    drv: SplitQueueDriver,
    dev: SplitQueue,
    handler: Box<dyn ChainHandler>,
    options: WorkerOptions,
) -> Rig {
    let kick = EventFd::new().unwrap();
    let call = EventFd::new().unwrap();
    let worker = QueueWorker::spawn(
        "vvu-test-worker",
        dev,
        kick.try_clone().unwrap(),
        Some(call.try_clone().unwrap()),
        handler,
        options,
    )
    .unwrap();
    Rig {
        driver: Driver::new(drv, kick),
        worker,
        call,
    }
}

#[test]
fn processes_what_is_already_available_without_a_kick() {
    let (drv, dev) = pair(16, false);
    let mut driver = Driver::new(drv, EventFd::new().unwrap());
    let values: Vec<u32> = (0..5).map(|_| driver.add()).collect();
    driver.drv.publish().unwrap(); // no kick on purpose
    let call = EventFd::new().unwrap();
    let worker = QueueWorker::spawn(
        "vvu-start",
        dev,
        EventFd::new().unwrap(),
        Some(call.try_clone().unwrap()),
        doubler(),
        WorkerOptions::default(),
    )
    .unwrap();
    assert_eq!(worker.name(), "vvu-start");
    for _ in 0..5 {
        driver.wait_completion(&call);
    }
    for x in values {
        assert_eq!(driver.result(x), 2 * x + 1);
    }
    let stopped = worker.stop().unwrap();
    assert_eq!(stopped.fault, None);
    assert_eq!(stopped.stats.kicks, 0);
    assert_eq!(stopped.stats.chains, 5);
    assert_eq!(stopped.queue.next_avail(), 5);
}

fn round_trips(event_idx: bool) {
    let mut rig = spawn_rig(128, event_idx, doubler(), WorkerOptions::default());
    for _ in 0..300 {
        let x = rig.driver.submit();
        rig.driver.wait_completion(&rig.call);
        assert_eq!(rig.driver.result(x), 2 * x + 1);
    }
    // Some in bulk too.
    let xs: Vec<u32> = (0..40).map(|_| rig.driver.add()).collect();
    rig.driver.publish();
    for _ in 0..40 {
        rig.driver.wait_completion(&rig.call);
    }
    for x in xs {
        assert_eq!(rig.driver.result(x), 2 * x + 1);
    }
    // On a loaded machine the worker may have found every request before it went to sleep (no
    // kick needed); once it idles with kicks enabled, a request must kick and wake it.
    let mut total = 340u16;
    eventually("a request that kicked the sleeping worker", || {
        let x = rig.driver.submit();
        rig.driver.wait_completion(&rig.call);
        assert_eq!(rig.driver.result(x), 2 * x + 1);
        total += 1;
        rig.worker.stats().kicks >= 1
    });
    let running = rig.worker.stats();
    assert_eq!(running.chains, u64::from(total));
    assert!(running.kicks >= 1 && running.wakeups >= 1, "{running:?}");
    assert!(running.notifications >= 1, "{running:?}");
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(stopped.fault, None);
    assert_eq!(stopped.queue.next_avail(), total);
    assert_eq!(stopped.queue.next_used(), total);
    assert_eq!(stopped.stats.chains, u64::from(total));
    assert!(stopped.stats.batches >= 1 && stopped.stats.batches <= u64::from(total));
    assert_eq!(stopped.stats.call_errors, 0);
}

#[test]
fn round_trips_with_kicks_and_calls_without_event_idx() {
    round_trips(false);
}

#[test]
fn round_trips_with_kicks_and_calls_with_event_idx() {
    round_trips(true);
}

fn calls_follow_driver_suppression(event_idx: bool) {
    let mut rig = spawn_rig(32, event_idx, doubler(), WorkerOptions::default());
    rig.driver.submit();
    rig.driver.wait_completion(&rig.call);
    // The worker signals right after publishing; the driver may have reaped in between.
    eventually("the first call", || rig.worker.stats().notifications == 1);
    rig.call.consume().unwrap();
    // The driver stops asking for calls (without EVENT_IDX: NO_INTERRUPT; with it, used_event
    // simply stays behind) and polls the used ring instead.
    rig.driver.drv.disable_call_notifications().unwrap();
    let before = rig.worker.stats().notifications;
    let mut reaped = 0;
    for _ in 0..10 {
        rig.driver.submit();
    }
    eventually("10 completions", || {
        while rig.driver.reap().is_some() {
            reaped += 1;
        }
        reaped == 10
    });
    assert_eq!(rig.call.consume().unwrap(), 0, "suppressed calls were sent");
    assert_eq!(rig.worker.stats().notifications, before);
    // Re-enabled: the next completion calls again.
    assert!(!rig.driver.drv.enable_call_notifications().unwrap());
    rig.driver.submit();
    assert!(rig.call.wait(Some(PATIENCE)).unwrap());
    rig.driver.wait_completion(&rig.call);
    rig.worker.stop().unwrap();
}

#[test]
fn calls_follow_driver_suppression_without_event_idx() {
    calls_follow_driver_suppression(false);
}

#[test]
fn calls_follow_driver_suppression_with_event_idx() {
    calls_follow_driver_suppression(true);
}

#[test]
fn indexes_wrap_around_65535() {
    let (drv, dev) = pair_at(8, true, 65530);
    let mut rig = spawn_with(drv, dev, doubler(), WorkerOptions::default());
    for _ in 0..20 {
        let x = rig.driver.submit();
        rig.driver.wait_completion(&rig.call);
        assert_eq!(rig.driver.result(x), 2 * x + 1);
    }
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(stopped.queue.next_avail(), 65530u16.wrapping_add(20));
    assert_eq!(stopped.queue.next_avail(), 14);
}

#[test]
fn stop_drains_popped_chains_and_a_new_worker_continues() {
    // Each request takes two descriptors.
    let (drv, dev) = pair(128, false);
    let mut driver = Driver::new(drv, EventFd::new().unwrap());
    let xs: Vec<u32> = (0..40).map(|_| driver.add()).collect();
    driver.drv.publish().unwrap();
    let slow = Box::new(Doubler {
        delay: Duration::from_millis(2),
    });
    let options = WorkerOptions {
        batch_size: 4,
        ..WorkerOptions::default()
    };
    let worker = QueueWorker::spawn(
        "vvu-drain",
        dev,
        EventFd::new().unwrap(),
        None,
        slow,
        options,
    )
    .unwrap();
    // Stop once the worker is busy with the backlog: a batch or more completed.
    eventually("a first batch completed", || {
        let memory = driver.drv.memory();
        memory.load_u16(USED + 2, Ordering::Acquire).unwrap() >= 4
    });
    let stopped = worker.stop().unwrap();
    let q = stopped.queue;
    let n = q.next_avail();
    // Stopped between batches: everything popped was completed and published.
    assert_eq!(n % 4, 0, "stopped inside a batch: next_avail {n}");
    assert!(n <= 40);
    assert_eq!(q.next_used(), n);
    assert_eq!(
        driver
            .drv
            .memory()
            .load_u16(USED + 2, Ordering::Acquire)
            .unwrap(),
        n,
        "used.idx published"
    );
    assert_eq!(stopped.stats.chains, u64::from(n));
    let mut reaped = 0;
    while driver.reap().is_some() {
        reaped += 1;
    }
    assert_eq!(reaped, n);

    // A new worker on the returned queue (as after SET_VRING_BASE) picks up the rest on its own.
    let call = EventFd::new().unwrap();
    let worker = QueueWorker::spawn(
        "vvu-drain-2",
        q,
        EventFd::new().unwrap(),
        Some(call.try_clone().unwrap()),
        stopped.handler,
        WorkerOptions::default(),
    )
    .unwrap();
    for _ in n..40 {
        driver.wait_completion(&call);
    }
    for x in xs {
        assert_eq!(driver.result(x), 2 * x + 1);
    }
    assert_eq!(worker.stop().unwrap().queue.next_avail(), 40);
}

/// Tiny deterministic PRNG for the stress loop.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn spin_for(iterations: u64) {
    for _ in 0..iterations {
        std::hint::spin_loop();
    }
}

/// What the swapper thread does with one new call fd.
struct Swap {
    fd: EventFd,
    /// Spin this long before installing it.
    delay: u64,
    /// Remove the call fd for a while first.
    remove_first: bool,
}

fn call_swap_stress(event_idx: bool) {
    let mut rig = spawn_rig(32, event_idx, doubler(), WorkerOptions::default());
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ u64::from(event_idx));
    let worker = &rig.worker;
    let (tx, rx) = std::sync::mpsc::channel::<Swap>();
    std::thread::scope(|scope| {
        // SET_VRING_CALL arriving on another thread at any moment.
        scope.spawn(move || {
            for swap in rx {
                spin_for(swap.delay);
                if swap.remove_first {
                    worker.set_call(None).unwrap();
                    spin_for(swap.delay);
                }
                worker.set_call(Some(swap.fd)).unwrap();
            }
        });
        for i in 0..2000u32 {
            // The driver moves to a new fd and sleeps on it at once, while the swap is still in
            // flight: a completion signalled to the old fd (or to none) must still wake it.
            let call = EventFd::new().unwrap();
            tx.send(Swap {
                fd: call.try_clone().unwrap(),
                delay: rng.next() % 20_000,
                remove_first: i % 4 == 3,
            })
            .unwrap();
            let x = rig.driver.submit();
            rig.driver.wait_completion(&call);
            assert_eq!(rig.driver.result(x), 2 * x + 1);
        }
        drop(tx);
    });
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(stopped.fault, None);
    assert_eq!(stopped.stats.chains, 2000);
}

#[test]
fn call_fd_swapped_while_running_never_loses_a_completion() {
    call_swap_stress(false);
}

#[test]
fn call_fd_swapped_while_running_never_loses_a_completion_event_idx() {
    call_swap_stress(true);
}

#[test]
fn avail_index_jump_faults_the_worker_and_signals_err() {
    let err = EventFd::new().unwrap();
    let options = WorkerOptions {
        err: Some(err.try_clone().unwrap()),
        ..WorkerOptions::default()
    };
    let mut rig = spawn_rig(8, false, doubler(), options);
    rig.driver.submit();
    rig.driver.wait_completion(&rig.call);
    assert_eq!(rig.worker.fault(), None);
    // A hostile driver claims 100 new chains in a ring of 8.
    rig.driver
        .drv
        .memory()
        .store_u16(AVAIL + 2, 101, Ordering::Release)
        .unwrap();
    rig.driver.kick.signal().unwrap();
    assert!(
        err.wait(Some(PATIENCE)).unwrap(),
        "err eventfd not signalled"
    );
    let fault = rig.worker.fault().unwrap();
    assert!(
        matches!(
            fault,
            WorkerFault::Queue(QueueError::AvailIndexJump {
                avail_idx: 101,
                next_avail: 1,
                ..
            })
        ),
        "{fault:?}"
    );
    // More kicks are ignored; a new err fd learns about the fault at once.
    rig.driver.kick.signal().unwrap();
    let err2 = EventFd::new().unwrap();
    rig.worker.set_err(Some(err2.try_clone().unwrap())).unwrap();
    assert_eq!(err2.consume().unwrap(), 1);
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(stopped.fault, Some(fault));
    assert!(stopped.queue.is_broken());
    assert_eq!(stopped.stats.chains, 1);
}

#[test]
fn descriptor_loop_faults_the_worker() {
    let err = EventFd::new().unwrap();
    let (drv, dev) = pair(8, false);
    let mem = drv.memory().clone();
    // Descriptor 3 links to itself; make it available by hand.
    let looped = crate::queue::Descriptor::new(IN, 4, VIRTQ_DESC_F_NEXT, 3);
    mem.write(DESC + 16 * 3, &looped.to_le_bytes()).unwrap();
    mem.store_u16(AVAIL + 4, 3, Ordering::Relaxed).unwrap();
    mem.store_u16(AVAIL + 2, 1, Ordering::Release).unwrap();
    let worker = QueueWorker::spawn(
        "vvu-loop",
        dev,
        EventFd::new().unwrap(),
        None,
        doubler(),
        WorkerOptions {
            err: Some(err.try_clone().unwrap()),
            ..WorkerOptions::default()
        },
    )
    .unwrap();
    assert!(err.wait(Some(PATIENCE)).unwrap());
    let stopped = worker.stop().unwrap();
    assert!(
        matches!(
            stopped.fault,
            Some(WorkerFault::Queue(QueueError::BadChain { head: 3, .. }))
        ),
        "{:?}",
        stopped.fault
    );
    assert_eq!(stopped.stats.chains, 0);
    drop(drv);
}

#[test]
fn broken_queue_at_spawn_is_reported_as_a_fault() {
    let (drv, mut dev) = pair(8, false);
    drv.memory()
        .store_u16(AVAIL + 2, 50, Ordering::Release)
        .unwrap();
    assert!(dev.pending().is_err());
    let err = EventFd::new().unwrap();
    let worker = QueueWorker::spawn(
        "vvu-broken",
        dev,
        EventFd::new().unwrap(),
        None,
        doubler(),
        WorkerOptions {
            err: Some(err.try_clone().unwrap()),
            ..WorkerOptions::default()
        },
    )
    .unwrap();
    assert!(err.wait(Some(PATIENCE)).unwrap());
    assert!(matches!(
        worker.stop().unwrap().fault,
        Some(WorkerFault::Queue(QueueError::Broken(_)))
    ));
}

/// Doubles, but panics on the `panic_at`-th chain (counting from 1).
struct Panicky {
    seen: u32,
    panic_at: u32,
    inner: Doubler,
}

impl ChainHandler for Panicky {
    fn handle(&mut self, memory: &GuestMemory, chain: ChainView<'_>) -> u32 {
        self.seen += 1;
        if self.seen == self.panic_at {
            panic!("handler exploded on chain {}", self.seen);
        }
        self.inner.handle(memory, chain)
    }
}

#[test]
fn a_panicking_handler_is_reported_not_crashed() {
    let err = EventFd::new().unwrap();
    let handler = Box::new(Panicky {
        seen: 0,
        panic_at: 3,
        inner: Doubler {
            delay: Duration::ZERO,
        },
    });
    let options = WorkerOptions {
        err: Some(err.try_clone().unwrap()),
        batch_size: 1,
        ..WorkerOptions::default()
    };
    let mut rig = spawn_rig(8, false, handler, options);
    for _ in 0..2 {
        let x = rig.driver.submit();
        rig.driver.wait_completion(&rig.call);
        assert_eq!(rig.driver.result(x), 2 * x + 1);
    }
    rig.driver.submit();
    assert!(err.wait(Some(PATIENCE)).unwrap());
    let fault = rig.worker.fault();
    assert_eq!(
        fault,
        Some(WorkerFault::HandlerPanicked(
            "handler exploded on chain 3".into()
        ))
    );
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(stopped.fault, fault);
    assert_eq!(stopped.stats.chains, 2);
    // The queue itself is fine and consistent: the panicked chain was popped but not completed.
    assert!(!stopped.queue.is_broken());
    assert_eq!(stopped.queue.next_avail(), 3);
    assert_eq!(stopped.queue.next_used(), 2);
    assert_eq!(rig.driver.reap(), None);
}

/// Completes chains with a bogus huge length and panics in `flush_batch` on request.
struct BadLengths {
    flush_panics: bool,
}

impl ChainHandler for BadLengths {
    fn handle(&mut self, _memory: &GuestMemory, _chain: ChainView<'_>) -> u32 {
        u32::MAX
    }
    fn flush_batch(&mut self) {
        if self.flush_panics {
            panic!("flush failed");
        }
    }
}

#[test]
fn used_len_is_clamped_and_a_panicking_flush_publishes_nothing() {
    let mut rig = spawn_rig(
        8,
        false,
        Box::new(BadLengths {
            flush_panics: false,
        }),
        WorkerOptions::default(),
    );
    rig.driver.submit();
    loop {
        if let Some((_, len)) = rig.driver.drv.reap_used().unwrap() {
            assert_eq!(len, 4, "clamped to the writable length");
            break;
        }
        if !rig.driver.drv.enable_call_notifications().unwrap() {
            assert!(rig.call.wait(Some(PATIENCE)).unwrap());
        }
    }
    rig.worker.stop().unwrap();

    let mut rig = spawn_rig(
        8,
        false,
        Box::new(BadLengths { flush_panics: true }),
        WorkerOptions::default(),
    );
    rig.driver.submit();
    eventually("the fault", || rig.worker.fault().is_some());
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(
        stopped.fault,
        Some(WorkerFault::HandlerPanicked("flush failed".into()))
    );
    assert_eq!(stopped.queue.next_used(), 0);
    assert_eq!(stopped.stats.chains, 0);
    assert_eq!(rig.driver.drv.reap_used().unwrap(), None);
}

#[test]
fn busy_polling_finds_work_without_kicks() {
    let options = WorkerOptions {
        busy_poll: Some(Duration::from_millis(300)),
        ..WorkerOptions::default()
    };
    let mut rig = spawn_rig(16, false, doubler(), options);
    let mut kicked = 0;
    for _ in 0..200 {
        let x = rig.driver.add();
        if rig.driver.publish() {
            kicked += 1;
        }
        rig.driver.wait_completion(&rig.call);
        assert_eq!(rig.driver.result(x), 2 * x + 1);
    }
    // While the worker spins, kicks stay disabled: most requests go without one.
    assert!(kicked < 100, "{kicked} of 200 requests needed a kick");
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(stopped.stats.chains, 200);
}

#[test]
fn polling_mode_finds_work_that_is_never_kicked() {
    let options = WorkerOptions {
        poll_interval: Some(Duration::from_millis(1)),
        ..WorkerOptions::default()
    };
    let mut rig = spawn_rig(16, false, doubler(), options);
    for _ in 0..20 {
        let x = rig.driver.add();
        rig.driver.drv.publish().unwrap(); // published, never kicked (vhost-user NOFD kick)
        rig.driver.wait_completion(&rig.call);
        assert_eq!(rig.driver.result(x), 2 * x + 1);
    }
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(stopped.stats.chains, 20);
    assert_eq!(stopped.stats.kicks, 0);
}

#[test]
fn stop_is_prompt_while_sleeping_and_while_busy_polling() {
    for busy_poll in [None, Some(Duration::from_secs(3600))] {
        let options = WorkerOptions {
            busy_poll,
            ..WorkerOptions::default()
        };
        let mut rig = spawn_rig(8, false, doubler(), options);
        // One request served: the worker is in its loop, back to sleeping or polling.
        let x = rig.driver.submit();
        rig.driver.wait_completion(&rig.call);
        assert_eq!(rig.driver.result(x), 2 * x + 1);
        let start = Instant::now();
        rig.worker.stop().unwrap();
        assert!(start.elapsed() < PATIENCE);
    }
}

#[test]
fn spawn_rejects_a_detached_queue_and_a_bad_name() {
    let detached = SplitQueue::new(config(8, false)).unwrap();
    let err = QueueWorker::spawn(
        "vvu",
        detached,
        EventFd::new().unwrap(),
        None,
        doubler(),
        WorkerOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let (_, dev) = pair(8, false);
    let err = QueueWorker::spawn(
        "bad\0name",
        dev,
        EventFd::new().unwrap(),
        None,
        doubler(),
        WorkerOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn dropping_a_worker_stops_its_thread() {
    let rig = spawn_rig(8, false, doubler(), WorkerOptions::default());
    let start = Instant::now();
    drop(rig.worker);
    assert!(start.elapsed() < PATIENCE);
}

#[test]
fn a_huge_batch_size_is_clamped_to_the_queue_size() {
    let options = WorkerOptions {
        batch_size: usize::MAX,
        ..WorkerOptions::default()
    };
    let mut rig = spawn_rig(8, false, doubler(), options);
    let x = rig.driver.submit();
    rig.driver.wait_completion(&rig.call);
    assert_eq!(rig.driver.result(x), 2 * x + 1);
    rig.worker.stop().unwrap();
}

#[test]
fn worker_and_options_types() {
    fn is_send<T: Send>() {}
    is_send::<QueueWorker>();
    is_send::<StoppedQueue>();
    let o = WorkerOptions::default();
    assert_eq!(o.batch_size, DEFAULT_BATCH_SIZE);
    assert!(o.busy_poll.is_none() && o.err.is_none());
}

/// The worker runs a packed ring like a split one: many round trips through kicks and calls
/// (a lost wakeup hangs `wait` and fails), odd queue size, wrap-arounds, and the state handed
/// back on stop is where both sides are.
#[test]
fn packed_ring_round_trips_with_kicks_and_calls() {
    use crate::queue::{PackedConfig, PackedQueue, PackedQueueDriver, PackedState};
    for event_idx in [false, true] {
        let (drv_mem, dev_mem) = shared_memory(&[(0, 0x20000), (0x20000, 0x20000)]);
        let config = PackedConfig::from_split_names(&config(37, event_idx));
        let mut drv = PackedQueueDriver::new(drv_mem.clone(), config).unwrap();
        let mut dev = PackedQueue::new(config).unwrap();
        dev.attach(dev_mem).unwrap();
        let kick = EventFd::new().unwrap();
        let call = EventFd::new().unwrap();
        let worker = QueueWorker::spawn(
            "vvu-packed",
            dev,
            kick.try_clone().unwrap(),
            Some(call.try_clone().unwrap()),
            doubler(),
            WorkerOptions::default(),
        )
        .unwrap();
        let mut completed = 0u32;
        for round in 0..200u32 {
            // 1 to 5 requests per round, each on its own slot of the buffer areas.
            let n = round % 5 + 1;
            for k in 0..n {
                let x = round * 8 + k;
                let slot = u64::from(x % 1024);
                drv_mem
                    .store_u32(IN + 8 * slot, x, Ordering::Relaxed)
                    .unwrap();
                drv.add_chain(&[(IN + 8 * slot, 4)], &[(OUT + 8 * slot, 4)])
                    .unwrap();
            }
            if drv.publish().unwrap() {
                kick.signal().unwrap();
            }
            let mut got = 0;
            while got < n {
                if let Some((_, len)) = drv.reap_used().unwrap() {
                    assert_eq!(len, 4);
                    got += 1;
                    continue;
                }
                if drv.enable_call_notifications().unwrap() {
                    continue;
                }
                assert!(
                    call.wait(Some(PATIENCE)).unwrap(),
                    "call lost in round {round}"
                );
            }
            for k in 0..n {
                let x = round * 8 + k;
                let y = drv_mem
                    .load_u32(OUT + 8 * u64::from(x % 1024), Ordering::Acquire)
                    .unwrap();
                assert_eq!(y, 2 * x + 1);
            }
            completed += n;
        }
        let stopped = worker.stop().unwrap();
        assert_eq!(stopped.fault, None);
        assert_eq!(stopped.stats.chains, u64::from(completed));
        let want = PackedState {
            next_avail: drv.next_avail(),
            next_used: drv.next_used(),
        };
        assert_eq!(stopped.queue.vring_base(), want.to_vring_base());
        // 2 slots per request, 600 requests on 37 slots: many laps.
        assert!(completed * 2 > 37 * 10);
    }
}

/// An IOTLB over the device view of `pair`, identity-mapped (iova == gpa) for `ranges`.
fn iotlb_view(
    iotlb: &mut crate::iotlb::Iotlb,
    dev_mem: &GuestMemory,
    ranges: &[(u64, u64, u8)],
) -> GuestMemory {
    for &(iova, size, perm) in ranges {
        let region = dev_mem.find_region(iova).unwrap();
        let uaddr = region.userspace_addr() + (iova - region.guest_phys_addr());
        iotlb.update(iova, size, uaddr, perm, dev_mem).unwrap();
    }
    iotlb.snapshot(dev_mem).unwrap()
}

fn wait_miss(worker: &QueueWorker) -> (u64, Access) {
    let fd = EventFd::from_fd(worker.miss_fd().try_clone_to_owned().unwrap()).unwrap();
    assert!(fd.wait(Some(PATIENCE)).unwrap(), "no IOTLB miss reported");
    worker.take_miss().expect("doorbell without a miss")
}

/// Rings translated, buffers not: the chain waits in the ring through misses for its readable
/// and then its writable buffer, completes once both are translated, and an invalidation that
/// the worker acknowledged makes the next chain miss again.
#[test]
fn iotlb_misses_pause_the_chain_until_the_translation_arrives() {
    let (drv_mem, dev_mem) = shared_memory(&[(0, 0x20000), (0x20000, 0x20000)]);
    let drv = SplitQueueDriver::new(drv_mem, config(8, true)).unwrap();
    let mut iotlb = crate::iotlb::Iotlb::new();
    let rings = iotlb_view(&mut iotlb, &dev_mem, &[(0x1000, 0x3000, 3)]);
    let mut dev = SplitQueue::new(config(8, true)).unwrap();
    dev.attach(rings).unwrap();
    let mut rig = spawn_with(drv, dev, doubler(), WorkerOptions::default());

    let x = rig.driver.submit();
    assert_eq!(wait_miss(&rig.worker), (IN, Access::READ));
    assert!(rig.driver.reap().is_none());
    let view = iotlb_view(&mut iotlb, &dev_mem, &[(IN, 0x1000, 1)]);
    rig.worker.set_memory(view).unwrap();
    assert_eq!(wait_miss(&rig.worker), (OUT, Access::WRITE));
    let view = iotlb_view(&mut iotlb, &dev_mem, &[(OUT, 0x1000, 3)]);
    let generation = rig.worker.set_memory(view).unwrap();
    assert!(rig.worker.wait_memory(generation, PATIENCE));
    rig.driver.wait_completion(&rig.call);
    assert_eq!(rig.driver.result(x), 2 * x + 1);

    iotlb.invalidate(IN, 0x1000).unwrap();
    let generation = rig
        .worker
        .set_memory(iotlb.snapshot(&dev_mem).unwrap())
        .unwrap();
    assert!(rig.worker.wait_memory(generation, PATIENCE));
    rig.driver.submit();
    // The second request reads from the second slot.
    assert_eq!(wait_miss(&rig.worker), (IN + 8, Access::READ));
    let stopped = rig.worker.stop().unwrap();
    assert!(stopped.fault.is_none(), "{:?}", stopped.fault);
    // The chain that missed was not consumed: GET_VRING_BASE hands it to whoever comes next.
    assert_eq!(stopped.queue.next_avail(), 1);
    assert_eq!(stopped.stats.chains, 1);
    assert_eq!(stopped.stats.iotlb_misses, 3);
}

/// A ring whose translation is invalidated is re-translated after the miss is answered.
#[test]
fn iotlb_ring_invalidation_detaches_until_the_ring_is_translated_again() {
    let (drv_mem, dev_mem) = shared_memory(&[(0, 0x20000), (0x20000, 0x20000)]);
    let drv = SplitQueueDriver::new(drv_mem, config(8, false)).unwrap();
    let mut iotlb = crate::iotlb::Iotlb::new();
    let all = [(0x1000, 0x3000, 3), (IN, 0x1000, 1), (OUT, 0x1000, 3)];
    let mut dev = SplitQueue::new(config(8, false)).unwrap();
    dev.attach(iotlb_view(&mut iotlb, &dev_mem, &all)).unwrap();
    let mut rig = spawn_with(drv, dev, doubler(), WorkerOptions::default());
    let x = rig.driver.submit();
    rig.driver.wait_completion(&rig.call);
    assert_eq!(rig.driver.result(x), 2 * x + 1);

    iotlb.invalidate(USED, 0x1000).unwrap();
    let generation = rig
        .worker
        .set_memory(iotlb.snapshot(&dev_mem).unwrap())
        .unwrap();
    assert!(rig.worker.wait_memory(generation, PATIENCE));
    assert_eq!(wait_miss(&rig.worker), (USED, Access::WRITE));
    let x = rig.driver.submit();
    rig.worker
        .set_memory(iotlb_view(&mut iotlb, &dev_mem, &[(USED, 0x1000, 3)]))
        .unwrap();
    rig.driver.wait_completion(&rig.call);
    assert_eq!(rig.driver.result(x), 2 * x + 1);
    let stopped = rig.worker.stop().unwrap();
    assert!(stopped.fault.is_none(), "{:?}", stopped.fault);
    assert_eq!(stopped.queue.next_avail(), 2);
}

/// A device-writable buffer in a read-only IOTLB range is refused: the queue breaks, nothing is
/// written through the read-only mapping.
#[test]
fn iotlb_write_into_a_read_only_range_faults_the_worker() {
    let (drv_mem, dev_mem) = shared_memory(&[(0, 0x20000), (0x20000, 0x20000)]);
    let drv = SplitQueueDriver::new(drv_mem, config(8, false)).unwrap();
    let mut iotlb = crate::iotlb::Iotlb::new();
    let ranges = [(0x1000, 0x3000, 3), (IN, 0x1000, 1), (OUT, 0x1000, 1)];
    let mut dev = SplitQueue::new(config(8, false)).unwrap();
    dev.attach(iotlb_view(&mut iotlb, &dev_mem, &ranges))
        .unwrap();
    let mut rig = spawn_with(drv, dev, doubler(), WorkerOptions::default());
    let x = rig.driver.submit();
    eventually("the fault", || rig.worker.fault().is_some());
    let fault = rig.worker.fault().unwrap().to_string();
    assert!(fault.contains("needs write access"), "{fault}");
    assert_eq!(rig.driver.result(x), 0xdead_beef);
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(stopped.stats.chains, 0);
}

/// A read-only ring cannot be the used ring; an unmapped one is a miss at attach.
#[test]
fn iotlb_ring_attach_checks_permission_and_reports_misses() {
    let (_, dev_mem) = shared_memory(&[(0, 0x20000)]);
    let mut iotlb = crate::iotlb::Iotlb::new();
    let mut dev = SplitQueue::new(config(8, false)).unwrap();
    let view = iotlb_view(&mut iotlb, &dev_mem, &[(0x1000, 0x2000, 3)]);
    assert_eq!(
        dev.attach(view),
        Err(QueueError::IotlbMiss {
            iova: USED,
            access: Access::WRITE
        })
    );
    let view = iotlb_view(&mut iotlb, &dev_mem, &[(USED, 0x1000, 1)]);
    let err = dev.attach(view).unwrap_err();
    assert!(err.to_string().contains("needs write access"), "{err}");
    let view = iotlb_view(&mut iotlb, &dev_mem, &[(USED, 0x1000, 2)]);
    dev.attach(view).unwrap();
}

/// An indirect table is read through the IOTLB too: a miss leaves the chain in the ring, a
/// write-only window is refused; chains popped before the miss in the same batch are kept.
#[test]
fn iotlb_indirect_tables_miss_and_need_read_access() {
    const TABLE: u64 = 0x6000;
    let (drv_mem, dev_mem) = shared_memory(&[(0, 0x20000), (0x20000, 0x20000)]);
    let mut drv = SplitQueueDriver::new(drv_mem, config(8, false)).unwrap();
    let mut iotlb = crate::iotlb::Iotlb::new();
    let ranges = [(0x1000, 0x3000, 3), (IN, 0x1000, 1), (OUT, 0x1000, 3)];
    let mut dev = SplitQueue::new(config(8, false)).unwrap();
    dev.attach(iotlb_view(&mut iotlb, &dev_mem, &ranges))
        .unwrap();
    drv.add_chain(&[(IN, 4)], &[(OUT, 4)]).unwrap();
    drv.add_indirect(TABLE, &[(IN, 4)], &[(OUT + 8, 4)])
        .unwrap();
    drv.publish().unwrap();
    let mut batch = ChainBatch::new();
    assert_eq!(dev.pop_batch(&mut batch, 8).unwrap(), 1);
    assert_eq!(dev.take_miss(), Some((TABLE, Access::READ)));
    assert_eq!(dev.next_avail(), 1);
    assert!(!dev.is_broken());

    dev.attach(iotlb_view(&mut iotlb, &dev_mem, &[(TABLE, 0x1000, 2)]))
        .unwrap();
    batch.clear();
    let err = dev.pop_batch(&mut batch, 8).unwrap_err();
    assert!(err.to_string().contains("needs read access"), "{err}");
    assert!(dev.is_broken());
}

// --- asynchronous handlers ---------------------------------------------------------------------

/// A chain an asynchronous [`Gate`] holds: its head and its two buffers.
#[derive(Clone, Copy)]
struct Held {
    head: u16,
    input: crate::queue::Segment,
    output: crate::queue::Segment,
}

#[derive(Default)]
struct GateState {
    /// Accepted, not released, in submit order.
    held: Vec<Held>,
    /// Released by the test, in release order, not reaped yet.
    released: Vec<Held>,
    submitted: usize,
}

/// An asynchronous [`Doubler`]: holds every chain until the test releases it (in any order),
/// and only then reads the input and writes the result — through segments popped batches ago,
/// which the worker must keep valid.
struct Gate {
    state: Arc<Mutex<GateState>>,
    fd: EventFd,
    max: usize,
}

/// The test's side of a [`Gate`].
struct GateCtl {
    state: Arc<Mutex<GateState>>,
    fd: EventFd,
}

fn gate(max: usize) -> (Box<dyn ChainHandler>, GateCtl) {
    let state = Arc::new(Mutex::new(GateState::default()));
    let fd = EventFd::new().unwrap();
    let ctl = GateCtl {
        state: Arc::clone(&state),
        fd: fd.try_clone().unwrap(),
    };
    (Box::new(Gate { state, fd, max }), ctl)
}

impl GateCtl {
    fn held(&self) -> Vec<u16> {
        lock(&self.state).held.iter().map(|h| h.head).collect()
    }

    fn submitted(&self) -> usize {
        lock(&self.state).submitted
    }

    /// Release `heads` (in this order) for completion.
    fn release(&self, heads: &[u16]) {
        let mut state = lock(&self.state);
        for &head in heads {
            let at = state.held.iter().position(|h| h.head == head).unwrap();
            let held = state.held.remove(at);
            state.released.push(held);
        }
        drop(state);
        self.fd.signal().unwrap();
    }

    fn release_all(&self) {
        let heads = self.held();
        self.release(&heads);
    }
}

impl ChainHandler for Gate {
    fn handle(&mut self, _memory: &GuestMemory, _chain: ChainView<'_>) -> u32 {
        panic!("an asynchronous handler gets submit, not handle");
    }

    fn submit(&mut self, _memory: &GuestMemory, chain: ChainView<'_>) -> Submitted {
        let mut state = lock(&self.state);
        state.submitted += 1;
        state.held.push(Held {
            head: chain.head(),
            input: chain.readable()[0],
            output: chain.writable()[0],
        });
        Submitted::Pending
    }

    fn max_in_flight(&self) -> usize {
        self.max
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }

    fn reap(&mut self, done: &mut Vec<(u16, u32)>, wait: bool) {
        loop {
            // Doorbell first, then the list: a release in between leaves the doorbell set.
            let _ = self.fd.consume();
            let released = std::mem::take(&mut lock(&self.state).released);
            for held in released {
                let mut raw = [0u8; 4];
                // SAFETY: the worker keeps the snapshot alive while the chain is pending.
                unsafe { held.input.read_to(0, &mut raw) };
                let y = u32::from_le_bytes(raw).wrapping_mul(2).wrapping_add(1);
                // SAFETY: as above.
                let n = unsafe { held.output.write_from(0, &y.to_le_bytes()) };
                done.push((held.head, n as u32));
            }
            if !wait || !done.is_empty() {
                return;
            }
            // Bounded: a test that failed with chains held must not hang the worker's drain.
            assert!(
                self.fd.wait(Some(PATIENCE)).unwrap(),
                "nothing released within {PATIENCE:?}"
            );
        }
    }
}

/// Reap `n` completions (waiting on the call fd); returns their heads in used-ring order.
fn reap_n(driver: &mut Driver, call: &EventFd, n: usize) -> Vec<u16> {
    let mut heads = Vec::new();
    while heads.len() < n {
        if let Some((head, len)) = driver.drv.reap_used().unwrap() {
            assert_eq!(len, 4);
            heads.push(head);
            continue;
        }
        if driver.drv.enable_call_notifications().unwrap() {
            continue;
        }
        assert!(call.wait(Some(PATIENCE)).unwrap(), "completion lost");
    }
    heads
}

#[test]
fn async_handler_completes_out_of_order_across_batches() {
    let (handler, ctl) = gate(64);
    // Two descriptors per request: 12 in flight need 24.
    let mut rig = spawn_rig(32, true, handler, WorkerOptions::default());
    let xs: Vec<u32> = (0..8).map(|_| rig.driver.add()).collect();
    rig.driver.publish();
    eventually("8 chains in flight", || rig.worker.stats().in_flight == 8);
    assert_eq!(
        rig.driver.drv.reap_used().unwrap(),
        None,
        "nothing done yet"
    );
    let heads = ctl.held();
    assert_eq!(heads.len(), 8);
    // More work arrives (another batch) while the first is in flight.
    let more: Vec<u32> = (0..4).map(|_| rig.driver.add()).collect();
    rig.driver.publish();
    eventually("12 chains in flight", || ctl.held().len() == 12);
    // Completed in reverse, in three goes: the used ring follows the completion order.
    let order: Vec<u16> = heads.iter().rev().copied().collect();
    ctl.release(&order[..3]);
    let mut got = reap_n(&mut rig.driver, &rig.call, 3);
    ctl.release(&order[3..]);
    got.extend(reap_n(&mut rig.driver, &rig.call, 5));
    assert_eq!(got, order);
    ctl.release_all();
    reap_n(&mut rig.driver, &rig.call, 4);
    for x in xs.into_iter().chain(more) {
        assert_eq!(rig.driver.result(x), 2 * x + 1);
    }
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(stopped.fault, None);
    assert_eq!((stopped.stats.chains, stopped.stats.in_flight), (12, 0));
}

#[test]
fn async_handler_gets_back_pressure_at_max_in_flight() {
    let (handler, ctl) = gate(3);
    let mut rig = spawn_rig(32, true, handler, WorkerOptions::default());
    let xs: Vec<u32> = (0..10).map(|_| rig.driver.add()).collect();
    rig.driver.publish();
    eventually("the worker to stop popping", || rig.worker.stats().full > 0);
    assert_eq!(ctl.submitted(), 3, "no more than max_in_flight taken");
    let mut done = 0;
    while done < 10 {
        eventually("a chain in flight", || !ctl.held().is_empty());
        assert!(ctl.held().len() <= 3);
        let first = ctl.held()[0];
        ctl.release(&[first]);
        reap_n(&mut rig.driver, &rig.call, 1);
        done += 1;
    }
    for x in xs {
        assert_eq!(rig.driver.result(x), 2 * x + 1);
    }
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(stopped.stats.chains, 10);
}

#[test]
fn stop_waits_for_in_flight_chains_and_publishes_them() {
    let (handler, ctl) = gate(64);
    let mut rig = spawn_rig(16, false, handler, WorkerOptions::default());
    let xs: Vec<u32> = (0..5).map(|_| rig.driver.add()).collect();
    rig.driver.publish();
    eventually("5 chains in flight", || ctl.held().len() == 5);
    let shared = Arc::clone(&rig.worker.shared);
    let worker = rig.worker;
    let stopper = std::thread::spawn(move || worker.stop().unwrap());
    eventually("the stop request", || shared.stop_requested());
    assert!(
        !stopper.is_finished(),
        "stop returned with chains in flight"
    );
    ctl.release_all();
    let stopped = stopper.join().unwrap();
    assert_eq!(stopped.fault, None);
    assert_eq!(stopped.stats.chains, 5);
    assert_eq!(stopped.queue.vring_base(), 5);
    reap_n(&mut rig.driver, &rig.call, 5);
    for x in xs {
        assert_eq!(rig.driver.result(x), 2 * x + 1);
    }
}

#[test]
fn memory_switch_waits_for_in_flight_chains() {
    let (handler, ctl) = gate(64);
    let mut rig = spawn_rig(16, false, handler, WorkerOptions::default());
    let x = rig.driver.submit();
    eventually("a chain in flight", || ctl.held().len() == 1);
    let memory = rig.driver.drv.memory().clone();
    let generation = rig.worker.set_memory(memory).unwrap();
    // The held chain points into the current snapshot: no switch before it completes.
    assert!(!rig
        .worker
        .wait_memory(generation, Duration::from_millis(50)));
    ctl.release_all();
    assert!(rig.worker.wait_memory(generation, PATIENCE));
    reap_n(&mut rig.driver, &rig.call, 1);
    assert_eq!(rig.driver.result(x), 2 * x + 1);
}

#[test]
fn inflight_region_lists_exactly_the_uncompleted_chains_after_a_crash() {
    use crate::inflight::{InflightRegion, RingLayout};
    let region = Arc::new(InflightRegion::allocate(RingLayout::Split, 1, 16).unwrap());
    let (drv, mut dev) = pair(16, false);
    let memory = dev.memory().unwrap().clone();
    dev.set_inflight(region.split_queue(0, 16).unwrap())
        .unwrap();
    let (handler, ctl) = gate(64);
    let mut rig = spawn_with(drv, dev, handler, WorkerOptions::default());
    (0..6).for_each(|_| {
        rig.driver.add();
    });
    rig.driver.publish();
    eventually("6 chains in flight", || ctl.held().len() == 6);
    let heads = ctl.held();
    ctl.release(&[heads[4], heads[1]]);
    reap_n(&mut rig.driver, &rig.call, 2);
    // "Crash": a new incarnation recovers from the region while the old one is frozen with
    // four chains in flight (completed out of order around them).
    let mut reborn = SplitQueue::new(config(16, false)).unwrap();
    reborn.attach(memory).unwrap();
    reborn.set_next_avail(2);
    let recovery = reborn
        .set_inflight(region.split_queue(0, 16).unwrap())
        .unwrap();
    assert_eq!(
        recovery.resubmit,
        vec![heads[0], heads[2], heads[3], heads[5]]
    );
    assert_eq!(reborn.next_avail(), 6);
    ctl.release_all();
}

#[test]
fn packed_ring_completes_out_of_order_through_an_async_handler() {
    use crate::queue::{PackedConfig, PackedQueue, PackedQueueDriver};
    let (drv_mem, dev_mem) = shared_memory(&[(0, 0x20000), (0x20000, 0x20000)]);
    let config = PackedConfig::from_split_names(&config(16, true));
    let mut drv = PackedQueueDriver::new(drv_mem.clone(), config).unwrap();
    let mut dev = PackedQueue::new(config).unwrap();
    dev.attach(dev_mem).unwrap();
    let kick = EventFd::new().unwrap();
    let call = EventFd::new().unwrap();
    let (handler, ctl) = gate(64);
    let worker = QueueWorker::spawn(
        "vvu-packed-async",
        dev,
        kick.try_clone().unwrap(),
        Some(call.try_clone().unwrap()),
        handler,
        WorkerOptions::default(),
    )
    .unwrap();
    for x in 0..6u32 {
        drv_mem
            .store_u32(IN + 8 * u64::from(x), x, Ordering::Relaxed)
            .unwrap();
        drv.add_chain(
            &[(IN + 8 * u64::from(x), 4)],
            &[(OUT + 8 * u64::from(x), 4)],
        )
        .unwrap();
    }
    if drv.publish().unwrap() {
        kick.signal().unwrap();
    }
    eventually("6 chains in flight", || ctl.held().len() == 6);
    let ids = ctl.held();
    let order = [ids[3], ids[0], ids[5], ids[1], ids[4], ids[2]];
    ctl.release(&order);
    let mut got = Vec::new();
    while got.len() < 6 {
        if let Some((id, len)) = drv.reap_used().unwrap() {
            assert_eq!(len, 4);
            got.push(id);
            continue;
        }
        if drv.enable_call_notifications().unwrap() {
            continue;
        }
        assert!(call.wait(Some(PATIENCE)).unwrap(), "completion lost");
    }
    assert_eq!(got, order);
    for x in 0..6u32 {
        let y = drv_mem
            .load_u32(OUT + 8 * u64::from(x), Ordering::Acquire)
            .unwrap();
        assert_eq!(y, 2 * x + 1);
    }
    assert_eq!(worker.stop().unwrap().fault, None);
}

// --- poll groups -----------------------------------------------------------------------------

/// A doubler that records which thread handled its chains.
struct ThreadRecorder {
    threads: Arc<Mutex<Vec<std::thread::ThreadId>>>,
    inner: Doubler,
}

impl ChainHandler for ThreadRecorder {
    fn handle(&mut self, memory: &GuestMemory, chain: ChainView<'_>) -> u32 {
        let me = std::thread::current().id();
        let mut threads = lock(&self.threads);
        if !threads.contains(&me) {
            threads.push(me);
        }
        drop(threads);
        self.inner.handle(memory, chain)
    }
}

fn grouped(group: &PollGroup, busy_poll: Duration) -> WorkerOptions {
    WorkerOptions {
        busy_poll: Some(busy_poll),
        group: Some(group.clone()),
        ..WorkerOptions::default()
    }
}

fn serve_a_few(rig: &mut Rig, n: usize) {
    for _ in 0..n {
        let x = rig.driver.submit();
        rig.driver.wait_completion(&rig.call);
        assert_eq!(rig.driver.result(x), 2 * x + 1);
    }
}

#[test]
fn a_poll_group_runs_all_its_queues_on_one_thread() {
    let group = PollGroup::new("vvu-test-group").unwrap();
    let threads = Arc::new(Mutex::new(Vec::new()));
    let recorder = || -> Box<dyn ChainHandler> {
        Box::new(ThreadRecorder {
            threads: Arc::clone(&threads),
            inner: Doubler {
                delay: Duration::ZERO,
            },
        })
    };
    let mut rigs: Vec<Rig> = (0..3)
        .map(|_| {
            spawn_rig(
                16,
                false,
                recorder(),
                grouped(&group, Duration::from_secs(3600)),
            )
        })
        .collect();
    for rig in &mut rigs {
        serve_a_few(rig, 20);
    }
    // Interleaved as well: every queue is stepped while the others have work.
    for _ in 0..10 {
        for rig in &mut rigs {
            serve_a_few(rig, 1);
        }
    }
    let seen = lock(&threads).clone();
    assert_eq!(seen.len(), 1, "handled on {} threads", seen.len());
    assert_ne!(seen[0], std::thread::current().id());
    let started = Instant::now();
    for rig in rigs {
        let stopped = rig.worker.stop().unwrap();
        assert_eq!(stopped.fault, None);
        assert_eq!(stopped.stats.chains, 30);
        assert_eq!(stopped.queue.next_used(), 30);
    }
    assert!(started.elapsed() < PATIENCE, "stop while spinning");
}

#[test]
fn an_idle_poll_group_sleeps_and_wakes_on_kicks() {
    // A short budget: the group sleeps between requests, and kicks (or a new queue) wake it.
    let group = PollGroup::new("vvu-test-group").unwrap();
    let mut a = spawn_rig(
        16,
        true,
        doubler(),
        grouped(&group, Duration::from_micros(50)),
    );
    for _ in 0..20 {
        serve_a_few(&mut a, 1);
        std::thread::sleep(Duration::from_millis(2)); // idle for longer than the budget
    }
    assert!(a.worker.stats().wakeups > 0, "the group never slept");
    let mut b = spawn_rig(
        16,
        false,
        doubler(),
        grouped(&group, Duration::from_micros(50)),
    );
    serve_a_few(&mut b, 5);
    serve_a_few(&mut a, 5);
    assert_eq!(a.worker.stop().unwrap().stats.chains, 25);
    assert_eq!(b.worker.stop().unwrap().stats.chains, 5);
}

#[test]
fn a_poll_group_reads_the_kick_that_woke_it_before_it_sleeps_again() {
    // The kick is read after the batch, not on wake-up: were it never read, the group's epoll
    // would find it ready again and again, and the group would spin through wake-ups.
    let group = PollGroup::new("vvu-test-group").unwrap();
    // A budget of 1 µs: in the group (a zero budget would give the queue a thread), asleep at once.
    let mut rig = spawn_rig(
        16,
        false,
        doubler(),
        grouped(&group, Duration::from_micros(1)),
    );
    let mut served = 0;
    eventually("a request that woke the sleeping group", || {
        serve_a_few(&mut rig, 1);
        served += 1;
        let stats = rig.worker.stats();
        stats.kicks >= 1 && stats.wakeups >= 1
    });
    let settled = || {
        let before = rig.worker.stats();
        std::thread::sleep(Duration::from_millis(20));
        let after = rig.worker.stats();
        (before.wakeups == after.wakeups).then_some(after)
    };
    let mut idle = None;
    eventually("the group asleep, no wake-up in 20 ms", || {
        idle = settled();
        idle.is_some()
    });
    let idle = idle.unwrap();
    assert!(idle.wakeups <= idle.kicks + 2, "{idle:?}");
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(stopped.fault, None);
    assert_eq!(stopped.stats.chains, served);
}

#[test]
fn a_fault_in_a_poll_group_stops_only_that_queue() {
    let group = PollGroup::new("vvu-test-group").unwrap();
    let err = EventFd::new().unwrap();
    let panicky = Box::new(Panicky {
        seen: 0,
        panic_at: 3,
        inner: Doubler {
            delay: Duration::ZERO,
        },
    });
    let options = WorkerOptions {
        err: Some(err.try_clone().unwrap()),
        batch_size: 1,
        ..grouped(&group, Duration::from_micros(100))
    };
    let mut bad = spawn_rig(8, false, panicky, options);
    let mut good = spawn_rig(
        8,
        false,
        doubler(),
        grouped(&group, Duration::from_micros(100)),
    );
    serve_a_few(&mut bad, 2);
    bad.driver.submit();
    assert!(err.wait(Some(PATIENCE)).unwrap());
    serve_a_few(&mut good, 10);
    let stopped = bad.worker.stop().unwrap();
    assert_eq!(
        stopped.fault,
        Some(WorkerFault::HandlerPanicked(
            "handler exploded on chain 3".into()
        ))
    );
    assert_eq!(stopped.queue.next_used(), 2);
    serve_a_few(&mut good, 10);
    let stopped = good.worker.stop().unwrap();
    assert_eq!((stopped.fault, stopped.stats.chains), (None, 20));
}

#[test]
fn a_worker_in_a_poll_group_resumes_where_the_last_one_stopped() {
    let group = PollGroup::new("vvu-test-group").unwrap();
    let mut rig = spawn_rig(
        16,
        true,
        doubler(),
        grouped(&group, Duration::from_micros(20)),
    );
    serve_a_few(&mut rig, 7);
    let stopped = rig.worker.stop().unwrap();
    assert_eq!(stopped.queue.next_used(), 7);
    // Work published while nobody runs the queue is found by the next worker.
    let x = rig.driver.submit();
    rig.worker = QueueWorker::spawn(
        "vvu-test-worker",
        stopped.queue,
        rig.driver.kick.try_clone().unwrap(),
        Some(rig.call.try_clone().unwrap()),
        doubler(),
        grouped(&group, Duration::from_micros(20)),
    )
    .unwrap();
    rig.driver.wait_completion(&rig.call);
    assert_eq!(rig.driver.result(x), 2 * x + 1);
    assert_eq!(rig.worker.stop().unwrap().queue.next_used(), 8);
}
