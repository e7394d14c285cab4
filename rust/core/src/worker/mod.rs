//! Datapath workers: run one virtqueue in a native thread.
//!
//! A [`QueueWorker`] owns an attached [`Virtqueue`] (split or packed ring), its kick eventfd and a [`ChainHandler`]
//! that does the device work for one descriptor chain. The thread loops:
//!
//! 1. pop a batch of chains (at most [`WorkerOptions::batch_size`]), hand each to the handler,
//!    call [`ChainHandler::flush_batch`], push the used entries, publish the batch once and
//!    signal the call eventfd if the ring's suppression rules ask for it;
//! 2. when the ring is empty: optionally busy-poll the ring for a budget, then re-enable kicks
//!    ([`Virtqueue::enable_notifications`]; if work slipped in meanwhile, back to 1) and sleep on
//!    a [`Poller`] over the kick and stop eventfds. After a kick, kicks are disabled again while
//!    the ring is being drained (a hint to the driver that saves it the notifications).
//!
//! With a busy-poll budget and a [`PollGroup`] ([`WorkerOptions::group`] or
//! [`ChainHandler::poll_group`]), the worker gets no thread of its own: the group's one thread
//! steps it (one batch, [`Progress`]) in turn with its other queues, spins while any has work
//! and sleeps on all their eventfds at once when they were idle for the budget. Everything below
//! holds for a queue in a group as for one on its own thread.
//!
//! The ring is processed once at start without waiting for a kick: after a reconnect the driver
//! may already have made buffers available.
//!
//! # Stopping
//!
//! [`QueueWorker::stop`] only takes effect between batches, after the in-flight chains of an
//! asynchronous handler were reaped: every chain the worker popped has been handled, pushed and
//! published before the thread exits, so [`Virtqueue::vring_base`] of the
//! returned queue is exactly what vhost-user GET_VRING_BASE must report.
//!
//! # Asynchronous handlers
//!
//! A handler may keep chains in flight across batches and complete them later, in any order
//! (an io_uring or thread-pool block engine, a network block client): [`ChainHandler::submit`]
//! returns [`Submitted::Pending`], [`ChainHandler::flush_batch`] is where queued work is issued
//! at the latest (a block engine issues the first requests of a batch while it prepares the
//! others: [`aio`], "When operations are issued"), and [`ChainHandler::reap`] hands back
//! finished chains by head (split) or buffer id (packed), which the worker pushes to the used
//! ring and publishes.
//! The contract:
//!
//! - at most [`ChainHandler::max_in_flight`] chains are pending: when that many are, the worker
//!   pops nothing more and sleeps on [`ChainHandler::completion_fd`] (back-pressure: requests
//!   wait in the ring, where the driver put them);
//! - a pending chain's segments stay valid until it is reaped: the worker switches memory
//!   snapshots ([`QueueWorker::set_memory`]) and stops only after reaping every pending chain
//!   (a drain), so the I/O never targets memory the front-end has unmapped or an IOTLB entry
//!   it has invalidated;
//! - [`QueueWorker::stop`] therefore waits for the in-flight requests: a handler must complete
//!   every request it accepted in bounded time (a network engine fails them after a timeout
//!   instead of waiting forever);
//! - the queue marks a chain in flight in the INFLIGHT_SHMFD region when it is popped and clears
//!   it when its used entry is published, whatever the completion order, so a back-end killed
//!   with requests pending has exactly those resubmitted after a reconnect.
//!
//! A handler that panics in `submit` or `reap` faults the worker as `handle` does. On any fault
//! the worker still waits for the handler to give back what it holds (without publishing it:
//! the queue may be broken), so no I/O outlives the worker's hold on guest memory.
//!
//! # Faults
//!
//! The peer is untrusted. A ring that breaks the rules ([`QueueError`]) or a handler that panics
//! turns the worker into a *faulted* worker: it stops processing, records a [`WorkerFault`],
//! signals the optional error eventfd (vhost-user SET_VRING_ERR) and then only waits for
//! [`QueueWorker::stop`], which reports the fault. The worker never logs, never panics across
//! its thread boundary and never aborts the process.
//!
//! # Memory changes and IOTLB misses
//!
//! [`QueueWorker::set_memory`] hands the worker a new snapshot (an IOTLB view after an IOTLB
//! update or invalidation) without restarting it: the worker re-attaches its queue between
//! batches and acknowledges the generation ([`QueueWorker::wait_memory`]), after which it no
//! longer touches memory through the old snapshot. Under an IOTLB a chain (or, at re-attach, a
//! ring) can hit an address without a translation: the worker then leaves that chain in the ring,
//! records the miss for [`QueueWorker::take_miss`], signals [`QueueWorker::miss_fd`] and waits for
//! the next snapshot (or a stop) before it retries.
//!
//! # Call eventfd changes
//!
//! vhost-user SET_VRING_CALL may replace or remove the call eventfd at any time.
//! [`QueueWorker::set_call`] swaps it under a lock and then signals the new one once, so a
//! completion that was published around the swap (and signalled to the old fd, or to none) is
//! never lost; the price is at most one spurious call, which drivers must tolerate.

use std::any::Any;
use std::io;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::QueueError;
use crate::memory::{Access, GuestMemory};
use crate::notify::{EventFd, Poller};
use crate::queue::{ChainBatch, ChainView, Virtqueue};

pub mod aio;
pub mod blk;
mod group;
pub mod nbd;
pub mod net;
mod parked;

pub use group::PollGroup;

#[cfg(test)]
mod tests;

/// Default number of chains popped, handled and published together.
pub const DEFAULT_BATCH_SIZE: usize = 64;

/// Does the device work for descriptor chains; runs on the worker thread.
pub trait ChainHandler: Send + 'static {
    /// Handle one chain and return the number of bytes written into its device-writable part
    /// (the used `len`). The worker clamps the value to the chain's writable length, so a handler
    /// mistake can never overstate it, but the handler should return an exact (or smaller) count.
    ///
    /// The chain's segments point into `memory`, which stays mapped for the whole call. Guest
    /// memory is shared with an untrusted peer: copy values out once before validating them.
    fn handle(&mut self, memory: &GuestMemory, chain: ChainView<'_>) -> u32;

    /// Handle every chain of `batch`, in order, setting `lens[i]` (0 on entry, one per chain)
    /// to chain `i`'s used `len`, clamped by the worker as for [`ChainHandler::handle`]. Called
    /// instead of `handle` for a synchronous handler ([`ChainHandler::max_in_flight`] 0); the
    /// default calls [`ChainHandler::handle`] per chain. A handler with a hot per-chain path
    /// overrides it to run that path in one loop rather than one call per chain.
    fn handle_batch(&mut self, memory: &GuestMemory, batch: &ChainBatch, lens: &mut [u32]) {
        for (chain, len) in batch.iter().zip(lens) {
            *len = self.handle(memory, chain);
        }
    }

    /// Called once after every chain of a batch was handled, before the batch is published to
    /// the driver: the place to finish work that was batched up in [`ChainHandler::handle`].
    fn flush_batch(&mut self) {}

    /// Start the device work for one chain: complete it now ([`Submitted::Done`], the default,
    /// which calls [`ChainHandler::handle`]) or accept it for later ([`Submitted::Pending`]) —
    /// the asynchronous path; see "Asynchronous handlers" in the module docs for the contract.
    fn submit(&mut self, memory: &GuestMemory, chain: ChainView<'_>) -> Submitted {
        Submitted::Done(self.handle(memory, chain))
    }

    /// Most chains this handler keeps pending at once; the worker stops popping at this bound
    /// (back-pressure: the rest waits in the ring). 0, the default, for a synchronous handler
    /// that never returns [`Submitted::Pending`].
    fn max_in_flight(&self) -> usize {
        0
    }

    /// A level-triggered fd that is readable while completions wait to be reaped (an io_uring
    /// fd, an eventfd the handler consumes in [`ChainHandler::reap`]). Asked once, at spawn.
    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Whether completions wait to be reaped, without blocking; the default polls
    /// [`ChainHandler::completion_fd`]. An engine that can tell from memory (an io_uring's
    /// completion queue) overrides it and saves the worker a syscall per loop.
    fn completions_ready(&mut self) -> bool {
        match self.completion_fd() {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
            }
            None => true,
        }
    }

    /// Move finished pending chains into `done` as `(head, used len)`, each pending head
    /// exactly once. With `wait`, block until at least one finished (the worker only asks
    /// while chains are pending). Used lens are clamped as for [`ChainHandler::handle`].
    fn reap(&mut self, done: &mut Vec<(u16, u32)>, wait: bool) {
        let _ = (done, wait);
    }

    /// A handler whose device decides when chains are taken (virtio-net RX fills buffers when a
    /// frame arrives, not when the driver adds them) returns its own loop here; the worker then
    /// runs that loop instead of its batch loop, and [`ChainHandler::handle`] is never called.
    fn device_loop(&mut self) -> Option<&mut dyn DeviceLoop> {
        None
    }

    /// A busy-poll budget the handler asks for when [`WorkerOptions::busy_poll`] sets none.
    fn busy_poll(&self) -> Option<Duration> {
        None
    }

    /// The [`PollGroup`] the handler asks to run in when [`WorkerOptions::group`] names none
    /// (only while a busy-poll budget is set).
    fn poll_group(&self) -> Option<PollGroup> {
        None
    }

    /// The [`PollGroup`] the handler asks to run in *without* a busy-poll budget: queues that
    /// hand work to each other (a virtio-net queue pair on a loopback or switch port) then share
    /// one thread that sleeps on all their eventfds, so that work one produces is taken by the
    /// next step of the same thread instead of a second thread wake-up. `None`: a thread of its
    /// own.
    fn sleep_group(&self) -> Option<PollGroup> {
        None
    }
}

/// Takes every chain and completes it with used length 0, touching nothing else: a started but
/// disabled transmit queue, whose packets the back-end "must process and discard"
/// (vhost-user.rst, "Ring states").
#[derive(Debug, Default)]
pub struct DiscardHandler;

impl ChainHandler for DiscardHandler {
    fn handle(&mut self, _memory: &GuestMemory, _chain: ChainView<'_>) -> u32 {
        0
    }
}

/// What [`ChainHandler::submit`] did with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// Completed: the used len, as [`ChainHandler::handle`] returns it.
    Done(u32),
    /// Accepted: it completes later through [`ChainHandler::reap`].
    Pending,
}

/// The main loop of a device-driven queue, run on the worker thread in place of the batch loop
/// (see [`ChainHandler::device_loop`]).
pub trait DeviceLoop {
    /// Process the queue until [`LoopContext::stop_requested`]; then return `Ok(())` with every
    /// chain the loop popped either pushed and published, or given back to the ring with
    /// [`Virtqueue::give_back`] (so `vring_base` is what GET_VRING_BASE must report).
    /// Sleep on [`LoopContext::stop_fd`] together with the kick and the device's own fds; the
    /// stop fd stays readable once a stop was requested. An `Err` faults the worker.
    fn run(&mut self, ctx: &mut LoopContext<'_>) -> Result<(), WorkerFault>;

    /// The same loop cut into non-blocking steps, so that a [`PollGroup`] can run it beside
    /// other queues on one thread. `None` (the default): the queue always gets its own thread.
    fn steps(&mut self) -> Option<&mut dyn LoopSteps> {
        None
    }
}

/// What one non-blocking step of a queue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Work was done and more is waiting (a batch budget ran out).
    More,
    /// Work was done; the queue looks idle now.
    Worked,
    /// Nothing to do.
    Idle,
}

/// A [`DeviceLoop`] in steps (see [`DeviceLoop::steps`]). The caller (the queue's own thread,
/// [`run_steps`], or a [`PollGroup`]) checks [`LoopContext::stop_requested`] before each step
/// and then calls [`LoopSteps::end`] instead.
pub trait LoopSteps {
    /// Set up (before the first step): the loop's poller, state parked by an earlier worker.
    fn begin(&mut self, ctx: &mut LoopContext<'_>) -> Result<(), WorkerFault>;
    /// One pass that never blocks.
    fn step(&mut self, ctx: &mut LoopContext<'_>) -> Result<Progress, WorkerFault>;
    /// About to sleep after an idle step: ask for the notifications the loop needs (§3 "go to
    /// sleep"). `true`: work slipped in meanwhile, step again instead of sleeping.
    fn prepare_sleep(&mut self, ctx: &mut LoopContext<'_>) -> Result<bool, WorkerFault>;
    /// Readable while the loop has events to consume (its poller's fd), after `begin`.
    fn wait_fd(&self) -> BorrowedFd<'_>;
    /// Wait for events up to `timeout` (`Some(0)`: just consume what is there), consume them
    /// and withdraw what `prepare_sleep` asked for.
    fn sleep(
        &mut self,
        ctx: &mut LoopContext<'_>,
        timeout: Option<Duration>,
    ) -> Result<(), WorkerFault>;
    /// Withdraw what `prepare_sleep` asked for without waiting or consuming (a [`PollGroup`]
    /// woke up for another queue).
    fn disarm(&mut self, ctx: &mut LoopContext<'_>) -> Result<(), WorkerFault>;
    /// Stop (after a stop request, `clean`, or a fault): what [`DeviceLoop::run`] must leave.
    fn end(&mut self, ctx: &mut LoopContext<'_>, clean: bool) -> Result<(), WorkerFault>;
}

/// [`DeviceLoop::run`] for a loop in steps, on its own thread: step while there is work, spin
/// for [`LoopContext::busy_poll`] when idle, then sleep.
pub fn run_steps(steps: &mut dyn LoopSteps, ctx: &mut LoopContext<'_>) -> Result<(), WorkerFault> {
    steps.begin(ctx)?;
    let result = step_until_stopped(steps, ctx);
    let ended = steps.end(ctx, result.is_ok());
    result.and(ended)
}

/// Idle busy-poll rounds between two clock reads: a clock read (about 25–50 ns through the
/// vDSO here) costs more than a look at an idle ring, and was a tenth of a polling back-end's
/// profile when read every round. The budget may thus run over by this many idle rounds.
pub(crate) const CLOCK_EVERY: u32 = 16;

/// Busy-poll helper: whether `deadline` passed, reading the clock only every [`CLOCK_EVERY`]
/// calls (`rounds` counts them).
#[inline]
pub(crate) fn past(deadline: Instant, rounds: &mut u32) -> bool {
    *rounds = rounds.wrapping_add(1);
    *rounds % CLOCK_EVERY == 0 && Instant::now() >= deadline
}

fn step_until_stopped(
    steps: &mut dyn LoopSteps,
    ctx: &mut LoopContext<'_>,
) -> Result<(), WorkerFault> {
    loop {
        if ctx.stop_requested() {
            return Ok(());
        }
        if steps.step(ctx)? == Progress::More {
            continue;
        }
        if let Some(deadline) = ctx.busy_poll.and_then(|b| Instant::now().checked_add(b)) {
            let mut found = false;
            let mut rounds = 0u32;
            while !ctx.stop_requested() && !past(deadline, &mut rounds) {
                if steps.step(ctx)? != Progress::Idle {
                    found = true;
                    break;
                }
                std::hint::spin_loop();
            }
            if found || ctx.stop_requested() {
                continue;
            }
        }
        if steps.prepare_sleep(ctx)? {
            continue;
        }
        let timeout = ctx.poll_interval;
        steps.sleep(ctx, timeout)?;
    }
}

/// What a [`DeviceLoop`] gets from its worker: the queue, its memory and doorbells, the counters.
pub struct LoopContext<'a> {
    /// The attached queue (notifications as the loop leaves them).
    pub queue: &'a mut Virtqueue,
    /// The snapshot the queue is attached to.
    pub memory: &'a GuestMemory,
    /// The kick eventfd: the loop consumes it (and reports what it read with
    /// [`LoopContext::count_kicks`]).
    pub kick: &'a EventFd,
    /// Polling mode (a front-end that sends no kicks): wake at least this often to look at the
    /// ring. `None`: kicks arrive, sleep until one does.
    pub poll_interval: Option<Duration>,
    /// Spin this long on an idle queue before sleeping ([`run_steps`]; in a [`PollGroup`] the
    /// group spins).
    pub busy_poll: Option<Duration>,
    shared: &'a Shared,
}

impl LoopContext<'_> {
    /// The worker was asked to stop: return from [`DeviceLoop::run`].
    pub fn stop_requested(&self) -> bool {
        self.shared.stop_requested()
    }

    /// Readable once a stop was requested (never consumed): register it with the loop's poller.
    pub fn stop_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.shared.stop.as_fd()
    }

    /// Publish the used entries pushed since the last call, signal the call eventfd if the
    /// ring asks for it, and count `chains` completed chains as one batch.
    pub fn publish(&mut self, chains: u64) -> Result<(), QueueError> {
        let notify = self.queue.publish_used()?;
        if chains > 0 {
            Counters::add(&self.shared.counters.chains, chains);
            Counters::add(&self.shared.counters.batches, 1);
        }
        if notify {
            self.shared.signal_call();
        }
        Ok(())
    }

    /// Count kicks read from the kick eventfd.
    pub fn count_kicks(&self, kicks: u64) {
        Counters::add(&self.shared.counters.kicks, kicks);
    }

    /// Count one wake-up from sleeping.
    pub fn count_wakeup(&self) {
        Counters::add(&self.shared.counters.wakeups, 1);
    }
}

/// Tuning for [`QueueWorker::spawn`].
#[derive(Debug)]
pub struct WorkerOptions {
    /// Most chains popped and published together (clamped to `1..=queue size`).
    pub batch_size: usize,
    /// Keep polling the ring for this long after it ran empty before re-enabling kicks and
    /// sleeping. Costs a core while spinning; `None` sleeps at once.
    pub busy_poll: Option<Duration>,
    /// Signalled once when the worker faults (vhost-user SET_VRING_ERR). Can be replaced later
    /// with [`QueueWorker::set_err`].
    pub err: Option<EventFd>,
    /// Look at the ring at least this often even without kicks: polling mode, for a front-end
    /// that sends no kick fd (vhost-user SET_VRING_KICK with NOFD). `None` sleeps until a kick.
    pub poll_interval: Option<Duration>,
    /// With a busy-poll budget: run in this [`PollGroup`] (one thread for all its queues)
    /// instead of a thread of its own. `None`: [`ChainHandler::poll_group`] decides.
    pub group: Option<PollGroup>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            batch_size: DEFAULT_BATCH_SIZE,
            busy_poll: None,
            err: None,
            poll_interval: None,
            group: None,
        }
    }
}

/// Why a worker stopped processing its queue on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerFault {
    /// The ring broke the virtio rules (or the queue was already broken when the worker started).
    #[error("virtqueue: {0}")]
    Queue(#[from] QueueError),
    /// [`ChainHandler::handle`] or [`ChainHandler::flush_batch`] panicked.
    #[error("chain handler panicked: {0}")]
    HandlerPanicked(String),
    /// The worker itself failed: waiting on its eventfds, or an internal panic.
    #[error("worker failed: {0}")]
    Internal(String),
}

/// Counters of a worker, readable while it runs ([`QueueWorker::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Chains handled and published.
    pub chains: u64,
    /// Non-empty batches published.
    pub batches: u64,
    /// Calls signalled on the call eventfd (not counting the ones [`QueueWorker::set_call`]
    /// sends itself).
    pub notifications: u64,
    /// Kicks consumed from the kick eventfd (the eventfd counter, i.e. driver signals).
    pub kicks: u64,
    /// Times the worker woke up from sleeping on its eventfds.
    pub wakeups: u64,
    /// Times a call was due but signalling the call eventfd failed (a bad fd from the peer).
    pub call_errors: u64,
    /// IOTLB misses reported (a chain or ring without a translation).
    pub iotlb_misses: u64,
    /// Chains an asynchronous handler holds right now (accepted, not yet reaped).
    pub in_flight: u64,
    /// Times the worker stopped popping because [`ChainHandler::max_in_flight`] chains were
    /// pending (back-pressure).
    pub full: u64,
}

#[derive(Debug, Default)]
struct Counters {
    chains: AtomicU64,
    batches: AtomicU64,
    notifications: AtomicU64,
    kicks: AtomicU64,
    wakeups: AtomicU64,
    call_errors: AtomicU64,
    iotlb_misses: AtomicU64,
    in_flight: AtomicU64,
    full: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> WorkerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerStats {
            chains: get(&self.chains),
            batches: get(&self.batches),
            notifications: get(&self.notifications),
            kicks: get(&self.kicks),
            wakeups: get(&self.wakeups),
            call_errors: get(&self.call_errors),
            iotlb_misses: get(&self.iotlb_misses),
            in_flight: get(&self.in_flight),
            full: get(&self.full),
        }
    }
}

/// Lock a mutex, ignoring poisoning: every critical section here is a plain swap or read.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared between the [`QueueWorker`] handle and its thread.
#[derive(Debug)]
struct Shared {
    stop_requested: AtomicBool,
    stop: EventFd,
    call: Mutex<Option<EventFd>>,
    err: Mutex<Option<EventFd>>,
    fault: Mutex<Option<WorkerFault>>,
    counters: Counters,
    /// A snapshot for the worker to switch to between batches, with its generation.
    memory_update: Mutex<Option<(u64, GuestMemory)>>,
    update_pending: AtomicBool,
    /// Wakes a sleeping worker for a memory update (consumed by the worker).
    update: EventFd,
    /// The last generation the worker switched to (`u64::MAX` once it faulted: it no longer
    /// touches memory).
    applied: Mutex<u64>,
    applied_changed: Condvar,
    /// The IOTLB miss waiting for a translation, and its doorbell for the owner.
    miss: Mutex<Option<(u64, Access)>>,
    miss_fd: EventFd,
}

impl Shared {
    fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::Acquire)
    }

    /// Signal the current call eventfd, if any.
    fn signal_call(&self) {
        let call = lock(&self.call);
        if let Some(fd) = call.as_ref() {
            match fd.signal() {
                Ok(()) => Counters::add(&self.counters.notifications, 1),
                Err(_) => Counters::add(&self.counters.call_errors, 1),
            }
        }
    }

    fn set_applied(&self, generation: u64) {
        *lock(&self.applied) = generation;
        self.applied_changed.notify_all();
    }

    /// Record `fault` (the first one wins) and signal the error eventfd.
    fn set_fault(&self, fault: WorkerFault) {
        {
            let mut slot = lock(&self.fault);
            if slot.is_none() {
                *slot = Some(fault);
            }
        }
        // Not nested with the fault lock: `QueueWorker::set_err` takes err, then fault.
        if let Some(fd) = lock(&self.err).as_ref() {
            // Nothing more can be done about a bad error fd; the fault is recorded either way.
            let _ = fd.signal();
        }
    }
}

/// Text of a panic payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

const TOKEN_KICK: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_UPDATE: u64 = 2;
const TOKEN_COMPLETION: u64 = 3;

/// Everything the worker thread owns.
struct Context {
    queue: Virtqueue,
    handler: Box<dyn ChainHandler>,
    memory: GuestMemory,
    kick: EventFd,
    poller: Poller,
    batch: ChainBatch,
    /// Asynchronous handlers: `(head, used len)` of the chains completed in the current batch.
    completions: Vec<(u16, u32)>,
    /// Synchronous handlers: the used len of each chain of the current batch, in batch order.
    lens: Vec<u32>,
    events: Vec<u64>,
    batch_size: usize,
    busy_poll: Option<Duration>,
    poll_interval: Option<Duration>,
    shared: Arc<Shared>,
    /// An IOTLB miss was reported: nothing to do until the next snapshot.
    awaiting_translation: bool,
    /// [`ChainHandler::max_in_flight`] (0: synchronous handler).
    max_in_flight: usize,
    /// Writable length of each pending chain by head / buffer id (`None`: not pending).
    pending: Vec<Option<u32>>,
    in_flight: usize,
    /// Completions reaped from the handler, before clamping.
    reaped: Vec<(u16, u32)>,
    /// Kicks were re-enabled before a sleep ([`Context::prepare_sleep`]).
    armed: bool,
    /// In a [`PollGroup`]: the group woke for this queue and its kick (or update doorbell) is
    /// still unread; read in [`Context::prepare_sleep`], off the path from a kick to its batch.
    wake_unread: bool,
}

/// What [`Context::pass`] did.
enum Pass {
    Stopped,
    Progress(Progress),
}

/// What the thread hands back when it ends.
struct Parts {
    queue: Virtqueue,
    handler: Box<dyn ChainHandler>,
}

impl Context {
    fn thread_main(mut self) -> Parts {
        let outcome = catch_unwind(AssertUnwindSafe(|| self.run()));
        let fault = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(fault)) => Some(fault),
            Err(payload) => Some(WorkerFault::Internal(format!(
                "panic: {}",
                panic_message(payload.as_ref())
            ))),
        };
        if let Some(fault) = fault {
            self.abandon_in_flight();
            self.shared.set_fault(fault);
            // Nobody waits for a memory switch of a worker that no longer touches memory.
            self.shared.set_applied(u64::MAX);
            self.wait_for_stop();
        }
        Parts {
            queue: self.queue,
            handler: self.handler,
        }
    }

    /// The main loop; returns `Ok` when asked to stop, `Err` on a fault.
    fn run(&mut self) -> Result<(), WorkerFault> {
        let busy_poll = self.busy_poll;
        if let Some(device_loop) = self.handler.device_loop() {
            let mut ctx = LoopContext {
                queue: &mut self.queue,
                memory: &self.memory,
                kick: &self.kick,
                poll_interval: self.poll_interval,
                busy_poll,
                shared: &self.shared,
            };
            return device_loop.run(&mut ctx);
        }
        // Kicks are not needed while the first pass drains whatever is already there.
        self.queue.disable_notifications()?;
        loop {
            // Drain the ring, one batch at a time; stop and switch memory only between batches.
            loop {
                match self.pass()? {
                    Pass::Stopped => return Ok(()),
                    Pass::Progress(Progress::More) => continue,
                    Pass::Progress(_) => break,
                }
            }
            if !self.awaiting_translation && !self.is_full() && self.busy_poll()? {
                continue;
            }
            if self.prepare_sleep()? {
                continue;
            }
            self.sleep(self.poll_interval)?;
        }
    }

    /// One batch: stop and switch memory first if asked, reap completions, pop, handle, publish.
    fn pass(&mut self) -> Result<Pass, WorkerFault> {
        if self.shared.stop_requested() {
            self.drain()?;
            return Ok(Pass::Stopped);
        }
        if self.shared.update_pending.load(Ordering::Acquire) {
            // In-flight I/O targets the current snapshot: finish it before switching.
            self.drain()?;
            self.apply_memory_update()?;
        }
        if self.awaiting_translation {
            return Ok(Pass::Progress(Progress::Idle));
        }
        self.complete(false)?;
        if self.is_full() {
            return Ok(Pass::Progress(Progress::Idle));
        }
        let popped = self.process_batch()?;
        if let Some((iova, access)) = self.queue.take_miss() {
            self.report_miss(iova, access);
            return Ok(Pass::Progress(Progress::Idle));
        }
        // Fewer than a batch: the ring was empty when popped, or the pop spent its budget (queue
        // docs, "Limits"); the re-check before sleeping catches what is left and late arrivals.
        Ok(Pass::Progress(match popped {
            0 => Progress::Idle,
            n if n < self.batch_size => Progress::Worked,
            _ => Progress::More,
        }))
    }

    /// After an idle pass, before sleeping. `true`: do not sleep, there is work.
    fn prepare_sleep(&mut self) -> Result<bool, WorkerFault> {
        if std::mem::take(&mut self.wake_unread) {
            self.consume_wake()?;
        }
        if self.awaiting_translation {
            // The queue may be detached (a ring missed): only a new snapshot or a stop helps.
            return Ok(false);
        }
        if self.is_full() {
            // Back-pressure: nothing is popped until a completion frees a slot; the completion
            // fd wakes the worker (kicks stay disabled meanwhile).
            Counters::add(&self.shared.counters.full, 1);
            return Ok(self.completions_ready());
        }
        // §3 "go to sleep": re-enable kicks, then re-check the ring (the queue places the full
        // fence in between). New work means the driver may not kick: process it now.
        if self.queue.enable_notifications()? {
            self.queue.disable_notifications()?;
            return Ok(true);
        }
        if self.shared.stop_requested()
            || self.shared.update_pending.load(Ordering::Acquire)
            || self.completions_ready()
        {
            // Not sleeping after all: kicks off again now, while the queue is surely attached
            // (a memory update may detach it).
            self.queue.disable_notifications()?;
            return Ok(true);
        }
        self.armed = true;
        Ok(false)
    }

    /// Switch to the snapshot from [`QueueWorker::set_memory`], if one is pending. Called between
    /// batches, when every popped chain has been published, so re-attaching loses nothing.
    fn apply_memory_update(&mut self) -> Result<(), WorkerFault> {
        if !self.shared.update_pending.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let Some((generation, memory)) = lock(&self.shared.memory_update).take() else {
            return Ok(());
        };
        let attached = self.queue.attach(memory.clone());
        self.memory = memory;
        self.awaiting_translation = false;
        let result = match attached {
            Ok(()) => Ok(()),
            Err(QueueError::IotlbMiss { iova, access }) => {
                self.report_miss(iova, access);
                Ok(())
            }
            Err(err) => Err(err.into()),
        };
        // Either way the old snapshot is no longer used.
        self.shared.set_applied(generation);
        result
    }

    /// Hand an IOTLB miss to the owner and wait for a new snapshot.
    fn report_miss(&mut self, iova: u64, access: Access) {
        *lock(&self.shared.miss) = Some((iova, access));
        Counters::add(&self.shared.counters.iotlb_misses, 1);
        // A failing doorbell cannot be helped here; the miss stays readable with take_miss.
        let _ = self.shared.miss_fd.signal();
        self.awaiting_translation = true;
    }

    /// Spin on the ring for the busy-poll budget. `true` if work (or a stop request) arrived.
    fn busy_poll(&mut self) -> Result<bool, WorkerFault> {
        let Some(budget) = self.busy_poll else {
            return Ok(false);
        };
        let Some(deadline) = Instant::now().checked_add(budget) else {
            return Ok(false);
        };
        let mut rounds = 0u32;
        loop {
            if self.shared.stop_requested()
                || self.queue.pending()? > 0
                || (self.in_flight > 0 && self.completions_ready())
            {
                return Ok(true);
            }
            if past(deadline, &mut rounds) {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Block until a kick or a stop request (at most `timeout`), consume the kick and withdraw
    /// the kick request of [`Context::prepare_sleep`].
    fn sleep(&mut self, timeout: Option<Duration>) -> Result<(), WorkerFault> {
        let io = |what: &str, e: io::Error| WorkerFault::Internal(format!("{what}: {e}"));
        let ready = self
            .poller
            .wait(timeout, &mut self.events)
            .map_err(|e| io("waiting for a kick", e))?;
        if ready > 0 {
            Counters::add(&self.shared.counters.wakeups, 1);
        }
        if self.events.contains(&TOKEN_KICK) {
            let kicks = self.kick.consume().map_err(|e| io("reading the kick", e))?;
            Counters::add(&self.shared.counters.kicks, kicks);
        }
        if self.events.contains(&TOKEN_UPDATE) {
            // The pending flag, checked by the caller, is the real signal.
            self.shared
                .update
                .consume()
                .map_err(|e| io("reading the update doorbell", e))?;
        }
        // TOKEN_STOP is not consumed: the stop flag, checked by the caller, is the real signal.
        self.disarm()
    }

    /// A [`PollGroup`] slept and this queue's poller was among what woke it: withdraw the kick
    /// request. What woke it is read later, by [`Context::prepare_sleep`] before the group
    /// sleeps again ([`Context::consume_wake`]): an event-driven group wakes once per burst,
    /// and a system call here would delay every burst's batch by its cost, while before the
    /// next sleep it overlaps the driver's work on what was published.
    /// Until then the fds stay readable, which only matters to an epoll the group is not in.
    fn wake_in_group(&mut self) -> Result<(), WorkerFault> {
        Counters::add(&self.shared.counters.wakeups, 1);
        self.wake_unread = true;
        self.disarm()
    }

    /// Read what woke the group for this queue, as [`Context::sleep`] with a zero timeout does,
    /// but without asking the poller which of its fds is ready (one system call less): the kick
    /// directly, and only when there was none the update doorbell (whose flag, checked by the
    /// next pass, is the real signal; were it consumed too late, the group wakes once more and
    /// consumes it then). The stop fd is never consumed, the completion fd is reaped by the pass.
    fn consume_wake(&mut self) -> Result<(), WorkerFault> {
        let io = |what: &str, e: io::Error| WorkerFault::Internal(format!("{what}: {e}"));
        let kicks = self.kick.consume().map_err(|e| io("reading the kick", e))?;
        if kicks > 0 {
            Counters::add(&self.shared.counters.kicks, kicks);
        } else {
            self.shared
                .update
                .consume()
                .map_err(|e| io("reading the update doorbell", e))?;
        }
        Ok(())
    }

    /// Withdraw the kick request of [`Context::prepare_sleep`], if any.
    fn disarm(&mut self) -> Result<(), WorkerFault> {
        if std::mem::take(&mut self.armed) {
            self.queue.disable_notifications()?;
        }
        Ok(())
    }

    /// Pop, handle, push and publish one batch. Returns the number of chains popped.
    ///
    /// A batch is pushed and published only once every chain of it was handled and
    /// [`ChainHandler::flush_batch`] returned; after a handler panic none of it is, so the queue
    /// stays consistent (`next_used` equals the published `used.idx`) for whoever gets it back.
    fn process_batch(&mut self) -> Result<usize, WorkerFault> {
        self.batch.clear();
        self.completions.clear();
        let max = if self.max_in_flight > 0 {
            self.batch_size.min(self.max_in_flight - self.in_flight)
        } else {
            self.batch_size
        };
        // A failing pop breaks the queue; chains it popped before the bad one cannot be completed
        // any more (push_used refuses on a broken queue), so they are abandoned with it.
        let popped = self.queue.pop_batch(&mut self.batch, max)?;
        if popped == 0 {
            return Ok(0);
        }
        let handler = &mut self.handler;
        let memory = &self.memory;
        let batch = &self.batch;
        let completions = &mut self.completions;
        let lens = &mut self.lens;
        let pending = &mut self.pending;
        let in_flight = &mut self.in_flight;
        let asynchronous = self.max_in_flight > 0;
        let handled = catch_unwind(AssertUnwindSafe(|| {
            if asynchronous {
                for chain in batch.iter() {
                    match handler.submit(memory, chain) {
                        // Never claim more than the chain holds (§1.4: len must not overestimate).
                        Submitted::Done(len) => {
                            completions.push((chain.head(), len.min(chain.writable_len())))
                        }
                        Submitted::Pending => {
                            if let Some(slot) = pending.get_mut(usize::from(chain.head())) {
                                *slot = Some(chain.writable_len());
                                *in_flight += 1;
                            }
                        }
                    }
                }
            } else {
                lens.clear();
                lens.resize(batch.len(), 0);
                handler.handle_batch(memory, batch, lens);
            }
            handler.flush_batch();
        }));
        if let Err(payload) = handled {
            return Err(WorkerFault::HandlerPanicked(panic_message(
                payload.as_ref(),
            )));
        }
        let done = if asynchronous {
            for &(head, len) in &self.completions {
                self.queue.push_used(head, len)?;
            }
            self.completions.len()
        } else {
            for (chain, &len) in self.batch.iter().zip(&self.lens) {
                // Never claim more than the chain holds (§1.4: len must not overestimate).
                self.queue
                    .push_used(chain.head(), len.min(chain.writable_len()))?;
            }
            self.batch.len()
        } as u64;
        self.shared
            .counters
            .in_flight
            .store(self.in_flight as u64, Ordering::Relaxed);
        self.publish(done)?;
        Ok(popped)
    }

    /// Publish what was pushed, count `chains` completed chains, signal the call if due.
    fn publish(&mut self, chains: u64) -> Result<(), WorkerFault> {
        let notify = self.queue.publish_used()?;
        if chains > 0 {
            let counters = &self.shared.counters;
            Counters::add(&counters.chains, chains);
            Counters::add(&counters.batches, 1);
        }
        if notify {
            self.shared.signal_call();
        }
        Ok(())
    }

    /// An asynchronous handler holds as many chains as it may.
    fn is_full(&self) -> bool {
        self.max_in_flight > 0 && self.in_flight >= self.max_in_flight
    }

    /// Completions wait to be reaped (without blocking).
    fn completions_ready(&mut self) -> bool {
        self.in_flight > 0 && self.handler.completions_ready()
    }

    /// Reap finished chains of an asynchronous handler (with `wait`, at least one), push and
    /// publish them.
    fn complete(&mut self, wait: bool) -> Result<(), WorkerFault> {
        if self.in_flight == 0 {
            return Ok(());
        }
        self.reaped.clear();
        let handler = &mut self.handler;
        let reaped = &mut self.reaped;
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| handler.reap(reaped, wait))) {
            return Err(WorkerFault::HandlerPanicked(panic_message(
                payload.as_ref(),
            )));
        }
        let mut count = 0u64;
        for i in 0..self.reaped.len() {
            let (head, len) = self.reaped[i];
            let Some(writable) = self
                .pending
                .get_mut(usize::from(head))
                .and_then(Option::take)
            else {
                return Err(WorkerFault::HandlerPanicked(format!(
                    "the handler completed chain {head}, which it does not hold"
                )));
            };
            self.in_flight -= 1;
            self.queue.push_used(head, len.min(writable))?;
            count += 1;
        }
        self.shared
            .counters
            .in_flight
            .store(self.in_flight as u64, Ordering::Relaxed);
        self.publish(count)
    }

    /// After a fault: wait until the handler gave back every chain it holds, without
    /// completing them (the queue may be broken), so that no I/O still targets guest memory
    /// when the worker lets go of its snapshot. Best effort: a handler that panics again is
    /// left alone.
    fn abandon_in_flight(&mut self) {
        let handler = &mut self.handler;
        let reaped = &mut self.reaped;
        let pending = &mut self.pending;
        let in_flight = &mut self.in_flight;
        let _ = catch_unwind(AssertUnwindSafe(|| {
            while *in_flight > 0 {
                reaped.clear();
                handler.reap(reaped, true);
                for &(head, _) in reaped.iter() {
                    if let Some(slot) = pending.get_mut(usize::from(head)) {
                        if slot.take().is_some() {
                            *in_flight -= 1;
                        }
                    }
                }
            }
        }));
    }

    /// Wait for every in-flight chain and publish it (before a stop or a memory switch).
    fn drain(&mut self) -> Result<(), WorkerFault> {
        while self.in_flight > 0 {
            self.complete(true)?;
        }
        Ok(())
    }

    /// After a fault: do nothing until asked to stop.
    fn wait_for_stop(&self) {
        while !self.shared.stop_requested() {
            if self.shared.stop.wait(Some(Duration::from_secs(1))).is_err() {
                // The stop eventfd cannot fail in practice; poll the flag if it ever does.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Where a worker runs.
#[derive(Debug)]
enum Runner {
    /// A thread of its own while it runs ([`parked`]), which sends the parts when the worker
    /// stops (the mutex only makes the handle `Sync`).
    Parked(Mutex<std::sync::mpsc::Receiver<Parts>>),
    /// A [`PollGroup`]'s thread, which sends the parts when the worker stops (the mutex only
    /// makes the handle `Sync`).
    Group(Mutex<std::sync::mpsc::Receiver<Parts>>),
}

/// A running per-queue worker thread. Dropping it stops and joins the thread (discarding the
/// queue); call [`QueueWorker::stop`] to get the queue back.
#[derive(Debug)]
pub struct QueueWorker {
    shared: Arc<Shared>,
    thread: Option<Runner>,
    name: String,
    /// The handler runs its own loop, which does not take memory updates.
    device_loop: bool,
    last_generation: AtomicU64,
}

/// Waits for a worker's memory switch; see [`QueueWorker::memory_waiter`].
#[derive(Debug, Clone)]
pub struct MemoryWaiter {
    shared: Arc<Shared>,
}

impl MemoryWaiter {
    /// See [`QueueWorker::wait_memory`].
    pub fn wait(&self, generation: u64, timeout: Duration) -> bool {
        let applied = lock(&self.shared.applied);
        let (applied, _) = self
            .shared
            .applied_changed
            .wait_timeout_while(applied, timeout, |applied| *applied < generation)
            .unwrap_or_else(|e| e.into_inner());
        *applied >= generation
    }
}

/// What [`QueueWorker::stop`] hands back.
pub struct StoppedQueue {
    /// The queue, attached as it was; `vring_base()` is what GET_VRING_BASE reports.
    pub queue: Virtqueue,
    /// The handler (after a [`WorkerFault::HandlerPanicked`] it may be in an inconsistent state).
    pub handler: Box<dyn ChainHandler>,
    /// Final counters.
    pub stats: WorkerStats,
    /// Why the worker stopped processing on its own, if it did.
    pub fault: Option<WorkerFault>,
}

impl std::fmt::Debug for StoppedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoppedQueue")
            .field("queue", &self.queue)
            .field("stats", &self.stats)
            .field("fault", &self.fault)
            .finish_non_exhaustive()
    }
}

/// A queue stepped on the caller's thread, with no thread, group or wake-up of its own: what a
/// benchmark of a handler's per-chain cost drives (`benches/net_loop.rs`), so that the figure
/// holds no cross-thread hand-off. Not for devices (nothing ever sleeps or stops it).
#[doc(hidden)]
pub struct InlineWorker {
    context: Context,
}

impl InlineWorker {
    /// Set up `handler` on `queue` (attached) as [`QueueWorker::spawn`] would, minus the thread.
    pub fn new(
        queue: impl Into<Virtqueue>,
        kick: EventFd,
        handler: Box<dyn ChainHandler>,
    ) -> Result<Self, WorkerFault> {
        let (context, _, _) =
            Context::new(queue.into(), kick, None, handler, WorkerOptions::default())
                .map_err(|e| WorkerFault::Internal(format!("setting up: {e}")))?;
        let mut worker = Self { context };
        match worker.with_steps(|steps, ctx| steps.begin(ctx)) {
            Some(result) => result?,
            None => worker.context.queue.disable_notifications()?,
        }
        Ok(worker)
    }

    fn with_steps<R>(
        &mut self,
        f: impl FnOnce(&mut dyn LoopSteps, &mut LoopContext<'_>) -> R,
    ) -> Option<R> {
        let context = &mut self.context;
        let mut ctx = LoopContext {
            queue: &mut context.queue,
            memory: &context.memory,
            kick: &context.kick,
            poll_interval: context.poll_interval,
            busy_poll: context.busy_poll,
            shared: &context.shared,
        };
        let steps = context.handler.device_loop()?.steps()?;
        Some(f(steps, &mut ctx))
    }

    /// One non-blocking step: a batch, or one step of the handler's device loop. Never inlined:
    /// a profiler (callgrind's `--toggle-collect`) can count exactly what is inside.
    #[inline(never)]
    pub fn step(&mut self) -> Result<Progress, WorkerFault> {
        if let Some(progress) = self.with_steps(|steps, ctx| steps.step(ctx)) {
            return progress;
        }
        match self.context.pass()? {
            Pass::Stopped => Ok(Progress::Idle),
            Pass::Progress(progress) => Ok(progress),
        }
    }
}

impl Drop for InlineWorker {
    fn drop(&mut self) {
        let _ = self.with_steps(|steps, ctx| steps.end(ctx, true));
    }
}

impl Context {
    /// The context of a worker for `queue` (attached) and `handler`; with the group it joins
    /// (`None`: a thread of its own) and whether the handler runs a device loop.
    fn new(
        queue: Virtqueue,
        kick: EventFd,
        call: Option<EventFd>,
        mut handler: Box<dyn ChainHandler>,
        options: WorkerOptions,
    ) -> io::Result<(Self, Option<PollGroup>, bool)> {
        let invalid = |msg: &str| io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned());
        let memory = queue
            .memory()
            .cloned()
            .ok_or_else(|| invalid("the queue is not attached to guest memory"))?;
        let shared = Arc::new(Shared {
            stop_requested: AtomicBool::new(false),
            stop: EventFd::new()?,
            call: Mutex::new(call),
            err: Mutex::new(options.err),
            fault: Mutex::new(None),
            counters: Counters::default(),
            memory_update: Mutex::new(None),
            update_pending: AtomicBool::new(false),
            update: EventFd::new()?,
            applied: Mutex::new(0),
            applied_changed: Condvar::new(),
            miss: Mutex::new(None),
            miss_fd: EventFd::new()?,
        });
        let device_loop = handler.device_loop().is_some();
        let busy_poll = options.busy_poll.or_else(|| handler.busy_poll());
        let steppable = handler
            .device_loop()
            .is_none_or(|device| device.steps().is_some());
        let group = match busy_poll {
            _ if !steppable => None,
            Some(budget) if !budget.is_zero() => options.group.or_else(|| handler.poll_group()),
            _ => handler.sleep_group(),
        };
        let poller = Poller::new()?;
        poller.register(kick.as_fd(), TOKEN_KICK)?;
        poller.register(shared.stop.as_fd(), TOKEN_STOP)?;
        poller.register(shared.update.as_fd(), TOKEN_UPDATE)?;
        let max_in_flight = if device_loop {
            0
        } else {
            handler.max_in_flight()
        };
        if max_in_flight > 0 {
            let fd = handler.completion_fd().ok_or_else(|| {
                invalid("an asynchronous handler (max_in_flight > 0) needs a completion fd")
            })?;
            poller.register(fd, TOKEN_COMPLETION)?;
        }
        // One pop never returns more than Q chains; the clamp also keeps allocations sane.
        let batch_size = options.batch_size.clamp(1, usize::from(queue.size()));
        let queue_size = queue.size();
        let context = Context {
            queue,
            handler,
            memory,
            kick,
            poller,
            // Segments: a typical request has a few; the vector grows on demand and is reused.
            batch: ChainBatch::with_capacity(batch_size, batch_size * 4),
            completions: Vec::with_capacity(batch_size),
            lens: Vec::with_capacity(batch_size),
            events: Vec::with_capacity(crate::notify::MAX_EVENTS),
            batch_size,
            busy_poll: busy_poll.filter(|d| !d.is_zero()),
            poll_interval: options.poll_interval,
            shared: Arc::clone(&shared),
            awaiting_translation: false,
            max_in_flight,
            pending: vec![None; usize::from(queue_size)],
            in_flight: 0,
            reaped: Vec::with_capacity(max_in_flight),
            armed: false,
            wake_unread: false,
        };
        Ok((context, group, device_loop))
    }
}

impl QueueWorker {
    /// Start a thread named `name` that runs `queue` (a split or packed queue, which must be
    /// attached) with `handler`.
    ///
    /// `kick` is consumed by the worker; `call` (if any) is signalled when the driver must be
    /// notified. Fails with `InvalidInput` for a detached queue or a name containing NUL, and with
    /// the OS error if the eventfds, the poller or the thread cannot be created (the queue and
    /// handler are dropped then).
    pub fn spawn(
        name: &str,
        queue: impl Into<Virtqueue>,
        kick: EventFd,
        call: Option<EventFd>,
        handler: Box<dyn ChainHandler>,
        options: WorkerOptions,
    ) -> io::Result<Self> {
        let invalid = |msg: &str| io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned());
        if name.contains('\0') {
            return Err(invalid("worker thread name contains a NUL byte"));
        }
        let (context, group, device_loop) =
            Context::new(queue.into(), kick, call, handler, options)?;
        let shared = Arc::clone(&context.shared);
        let thread = match group {
            Some(group) => Runner::Group(Mutex::new(group.join(context)?)),
            None => Runner::Parked(Mutex::new(
                parked::WORKERS.run(name, move || context.thread_main())?,
            )),
        };
        Ok(Self {
            shared,
            thread: Some(thread),
            name: name.to_owned(),
            device_loop,
            last_generation: AtomicU64::new(0),
        })
    }

    /// Hand the worker a new snapshot (an IOTLB view after an update or invalidation); it
    /// re-attaches its queue to it between batches, and retries a chain that missed. Returns the
    /// generation to pass to [`QueueWorker::wait_memory`]. Fails with `Unsupported` for a
    /// handler with its own device loop.
    pub fn set_memory(&self, memory: GuestMemory) -> io::Result<u64> {
        if self.device_loop {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this worker runs a device loop, which cannot switch memory while running",
            ));
        }
        let mut slot = lock(&self.shared.memory_update);
        let generation = self.last_generation.fetch_add(1, Ordering::Relaxed) + 1;
        *slot = Some((generation, memory));
        self.shared.update_pending.store(true, Ordering::Release);
        drop(slot);
        self.shared.update.signal()?;
        Ok(generation)
    }

    /// Wait until the worker switched to generation `generation` (or a later one) of
    /// [`QueueWorker::set_memory`], or faulted: from then on it does not touch memory through
    /// older snapshots. `false` on timeout.
    pub fn wait_memory(&self, generation: u64, timeout: Duration) -> bool {
        self.memory_waiter().wait(generation, timeout)
    }

    /// [`QueueWorker::wait_memory`] detached from the handle, for waiting without holding it
    /// (e.g. without a lock the handle sits behind).
    pub fn memory_waiter(&self) -> MemoryWaiter {
        MemoryWaiter {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The IOTLB miss (iova, access) the worker waits on, if any; taking it also consumes the
    /// [`QueueWorker::miss_fd`] doorbell.
    pub fn take_miss(&self) -> Option<(u64, Access)> {
        // Doorbell first: a miss reported in between is then taken now and leaves a doorbell
        // that finds nothing, instead of being taken later without one. Non-blocking eventfd;
        // nothing to consume is fine.
        let _ = self.shared.miss_fd.consume();
        lock(&self.shared.miss).take()
    }

    /// Readable when the worker reported an IOTLB miss (see [`QueueWorker::take_miss`]).
    pub fn miss_fd(&self) -> BorrowedFd<'_> {
        self.shared.miss_fd.as_fd()
    }

    /// The thread name given to [`QueueWorker::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replace (or remove, with `None`) the call eventfd while running (vhost-user
    /// SET_VRING_CALL). A new fd is signalled once right after the swap, so a completion that
    /// raced with the swap is never lost; a spurious call is harmless. Returns the error of that
    /// signal, if any (the fd is installed regardless).
    pub fn set_call(&self, call: Option<EventFd>) -> io::Result<()> {
        let mut slot = lock(&self.shared.call);
        *slot = call;
        // Under the lock: the worker signals either the old fd before this point (and this signal
        // covers the driver listening on the new one) or the new fd after it.
        match slot.as_ref() {
            Some(fd) => fd.signal(),
            None => Ok(()),
        }
    }

    /// Replace (or remove) the error eventfd (vhost-user SET_VRING_ERR). If the worker has
    /// already faulted, the new fd is signalled at once.
    pub fn set_err(&self, err: Option<EventFd>) -> io::Result<()> {
        let mut slot = lock(&self.shared.err);
        *slot = err;
        // Lock order err → fault; `Shared::set_fault` never holds both.
        let faulted = lock(&self.shared.fault).is_some();
        match slot.as_ref() {
            Some(fd) if faulted => fd.signal(),
            _ => Ok(()),
        }
    }

    /// Current counters.
    pub fn stats(&self) -> WorkerStats {
        self.shared.counters.snapshot()
    }

    /// The fault that stopped processing, if any (the worker then waits for [`Self::stop`]).
    pub fn fault(&self) -> Option<WorkerFault> {
        lock(&self.shared.fault).clone()
    }

    /// Stop after the current batch, join the thread and return the queue, the handler, the
    /// final counters and the fault, if any. Every chain the worker popped has been completed and
    /// published when this returns.
    ///
    /// Fails only if the thread cannot be woken or died outside the fault handling (a bug); the
    /// queue is lost then.
    pub fn stop(mut self) -> io::Result<StoppedQueue> {
        let parts = self.stop_and_join()?;
        Ok(StoppedQueue {
            queue: parts.queue,
            handler: parts.handler,
            stats: self.shared.counters.snapshot(),
            fault: lock(&self.shared.fault).clone(),
        })
    }

    fn stop_and_join(&mut self) -> io::Result<Parts> {
        let thread = self
            .thread
            .take()
            .ok_or_else(|| io::Error::other("worker already stopped"))?;
        self.shared.stop_requested.store(true, Ordering::Release);
        // If this fails the thread may sleep forever; do not join it then.
        self.shared.stop.signal()?;
        match thread {
            Runner::Parked(done) => lock(&done)
                .recv()
                .map_err(|_| io::Error::other("the worker thread died")),
            Runner::Group(done) => lock(&done)
                .recv()
                .map_err(|_| io::Error::other("the poll group's thread died")),
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop_and_join();
        }
    }
}
