//! A poll group: one thread that busy-polls many queues.
//!
//! With a busy-poll budget, a [`QueueWorker`](super::QueueWorker) per queue means one spinning
//! thread per queue. On fewer cores than spinning threads (a back-end pinned to one core, the
//! usual DPDK budget) they take turns by time slice, and a frame that one worker forwards waits
//! for the next slice of the worker that delivers it: polling then runs slower than sleeping on
//! eventfds. A [`PollGroup`] runs all its queues on one thread instead, as a DPDK lcore polls
//! all its ports: it steps every queue in turn (each step one non-blocking batch), and after
//! its queues were idle for the largest budget among them it asks each queue for its
//! notifications (§3 "go to sleep") and sleeps on one epoll that holds every queue's poller, so
//! an idle group costs no CPU.
//!
//! The life cycle of a queue in a group is that of a worker thread: [`QueueWorker::spawn`]
//! hands the queue to the group ([`WorkerOptions::group`](super::WorkerOptions::group) or
//! [`ChainHandler::poll_group`](super::ChainHandler::poll_group)), [`QueueWorker::stop`] takes
//! it back after its last batch, and a queue that faults stops being stepped (the others go
//! on) and waits for its stop. A memory switch is applied between batches as on a thread.
//! Queues whose handler runs a [`DeviceLoop`](super::DeviceLoop) join only if the loop can be
//! cut into [`LoopSteps`](super::LoopSteps).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{
    lock, panic_message, ChainHandler, Context, LoopContext, LoopSteps, Parts, Pass, Progress,
    WorkerFault, CLOCK_EVERY,
};
use crate::notify::{EventFd, Poller};

/// Token of the group's own doorbell in its poller (queues get 0, 1, 2...).
const TOKEN_GROUP: u64 = u64::MAX;

/// A queue handed to the group, waiting to be admitted by its thread.
struct Joining {
    context: Context,
    done: SyncSender<Parts>,
}

struct GroupShared {
    joining: Mutex<Vec<Joining>>,
    /// `joining` is not empty (read without the lock on every round).
    has_joining: AtomicBool,
    /// Every [`PollGroup`] handle is gone: the thread ends once it has no queue left.
    closed: AtomicBool,
    /// Signalled when a queue joins (the thread may be asleep).
    doorbell: EventFd,
}

/// One thread polling many queues; see the module docs. Cheap to clone (clones are the same
/// group). The thread starts with the first queue and stays (asleep when idle).
#[derive(Clone)]
pub struct PollGroup {
    inner: Arc<Handle>,
}

struct Handle {
    shared: Arc<GroupShared>,
    started: AtomicBool,
    name: String,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        // A thread that cannot be woken ends at its next wake-up.
        let _ = self.shared.doorbell.signal();
    }
}

impl std::fmt::Debug for PollGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollGroup")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl PollGroup {
    /// A new group whose thread (started on first use) is called `name`.
    pub fn new(name: &str) -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Handle {
                shared: Arc::new(GroupShared {
                    joining: Mutex::new(Vec::new()),
                    has_joining: AtomicBool::new(false),
                    closed: AtomicBool::new(false),
                    doorbell: EventFd::new()?,
                }),
                started: AtomicBool::new(false),
                name: name.to_owned(),
            }),
        })
    }

    /// The process's shared group (thread `vvu-poll`): every busy-polling virtio-net queue of
    /// the process runs in it unless told otherwise. `None` if it could not be created (no
    /// eventfd), in which case queues keep threads of their own.
    pub fn process() -> Option<Self> {
        static GROUP: OnceLock<Option<PollGroup>> = OnceLock::new();
        GROUP
            .get_or_init(|| PollGroup::new("vvu-poll").ok())
            .clone()
    }

    /// Hand a queue's context to the group; the receiver gets its parts when it stops.
    pub(super) fn join(&self, context: Context) -> io::Result<Receiver<Parts>> {
        let (done, parts) = sync_channel(1);
        let inner = &self.inner;
        if !inner.started.swap(true, Ordering::AcqRel) {
            let spawned = Poller::new().and_then(|poller| {
                poller.register(inner.shared.doorbell.as_fd(), TOKEN_GROUP)?;
                let shared = Arc::clone(&inner.shared);
                std::thread::Builder::new()
                    .name(inner.name.clone())
                    .spawn(move || GroupThread::new(shared, poller).run())
            });
            if let Err(err) = spawned {
                inner.started.store(false, Ordering::Release);
                return Err(err);
            }
        }
        {
            let mut joining = lock(&inner.shared.joining);
            joining.push(Joining { context, done });
            inner.shared.has_joining.store(true, Ordering::Release);
        }
        inner.shared.doorbell.signal()?;
        Ok(parts)
    }
}

/// A queue of the group.
struct Member {
    context: Context,
    done: SyncSender<Parts>,
    token: u64,
    faulted: bool,
}

impl Member {
    fn loop_context(context: &mut Context) -> (LoopContext<'_>, &mut Box<dyn ChainHandler>) {
        (
            LoopContext {
                queue: &mut context.queue,
                memory: &context.memory,
                kick: &context.kick,
                poll_interval: context.poll_interval,
                busy_poll: context.busy_poll,
                shared: &context.shared,
            },
            &mut context.handler,
        )
    }

    /// Run `f` on the queue's loop steps (a device loop), or `None` for a batch queue.
    fn with_steps<R>(
        &mut self,
        f: impl FnOnce(&mut dyn LoopSteps, &mut LoopContext<'_>) -> R,
    ) -> Option<R> {
        let (mut ctx, handler) = Self::loop_context(&mut self.context);
        let steps = handler.device_loop()?.steps()?;
        Some(f(steps, &mut ctx))
    }

    fn begin(&mut self) -> Result<(), WorkerFault> {
        match self.with_steps(|steps, ctx| steps.begin(ctx)) {
            Some(result) => result,
            // Kicks are not needed while the first pass drains whatever is already there.
            None => Ok(self.context.queue.disable_notifications()?),
        }
    }

    /// The fd the group sleeps on for this queue.
    fn wait_fd(&mut self) -> BorrowedFd<'_> {
        let raw = match self.with_steps(|steps, _| steps.wait_fd().as_raw_fd()) {
            Some(fd) => fd,
            None => self.context.poller.as_raw_fd(),
        };
        // SAFETY: the poller fd lives as long as the context (the loop's poller from `begin`
        // until the member is dropped), which outlives the borrow of `self`.
        unsafe { BorrowedFd::borrow_raw(raw) }
    }

    /// `Ok(None)`: the queue stopped.
    fn step(&mut self) -> Result<Option<Progress>, WorkerFault> {
        if self.context.shared.stop_requested() {
            if let Some(result) = self.with_steps(|steps, ctx| steps.end(ctx, true)) {
                result?;
                return Ok(None);
            }
        }
        match self.with_steps(|steps, ctx| steps.step(ctx)) {
            Some(progress) => progress.map(Some),
            None => match self.context.pass()? {
                Pass::Stopped => Ok(None),
                Pass::Progress(progress) => Ok(Some(progress)),
            },
        }
    }

    fn prepare_sleep(&mut self) -> Result<bool, WorkerFault> {
        match self.with_steps(|steps, ctx| steps.prepare_sleep(ctx)) {
            Some(result) => result,
            None => self.context.prepare_sleep(),
        }
    }

    /// After the group slept: consume what woke this queue (`ready`), withdraw what
    /// `prepare_sleep` asked for.
    fn wake(&mut self, ready: bool) -> Result<(), WorkerFault> {
        if ready {
            match self.with_steps(|steps, ctx| steps.sleep(ctx, Some(Duration::ZERO))) {
                Some(result) => result,
                None => self.context.wake_in_group(),
            }
        } else {
            match self.with_steps(|steps, ctx| steps.disarm(ctx)) {
                Some(result) => result,
                None => self.context.disarm(),
            }
        }
    }

    /// As [`Context::thread_main`] after a fault: give up what is held, record the fault.
    fn fail(&mut self, fault: WorkerFault) {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            self.with_steps(|steps, ctx| steps.end(ctx, false))
        }));
        self.context.abandon_in_flight();
        self.context.shared.set_fault(fault);
        self.context.shared.set_applied(u64::MAX);
        self.faulted = true;
    }
}

/// Run `f`, turning a panic into a fault.
fn guarded<R>(f: impl FnOnce() -> Result<R, WorkerFault>) -> Result<R, WorkerFault> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => Err(WorkerFault::Internal(format!(
            "panic: {}",
            panic_message(payload.as_ref())
        ))),
    }
}

struct GroupThread {
    shared: Arc<GroupShared>,
    poller: Poller,
    members: Vec<Member>,
    next_token: u64,
    events: Vec<u64>,
}

impl GroupThread {
    fn new(shared: Arc<GroupShared>, poller: Poller) -> Self {
        Self {
            shared,
            poller,
            members: Vec::new(),
            next_token: 0,
            events: Vec::with_capacity(crate::notify::MAX_EVENTS),
        }
    }

    fn admit(&mut self) {
        let joining = {
            let mut joining = lock(&self.shared.joining);
            self.shared.has_joining.store(false, Ordering::Release);
            std::mem::take(&mut *joining)
        };
        for Joining { context, done } in joining {
            let token = self.next_token;
            self.next_token += 1;
            let mut member = Member {
                context,
                done,
                token,
                faulted: false,
            };
            match guarded(|| member.begin()) {
                Ok(()) => {
                    let fd = member.wait_fd();
                    if let Err(err) = self.poller.register(fd, token) {
                        member.fail(WorkerFault::Internal(format!(
                            "joining the poll group: {err}"
                        )));
                        self.watch_stop(&member);
                    }
                }
                Err(fault) => {
                    member.fail(fault);
                    self.watch_stop(&member);
                }
            }
            self.members.push(member);
        }
    }

    /// A faulted member only waits for its stop request.
    fn watch_stop(&self, member: &Member) {
        // Best effort: without it, the stop is still seen at the group's next wake-up.
        let _ = self
            .poller
            .register(member.context.shared.stop.as_fd(), member.token);
    }

    fn unwatch(&mut self, i: usize) {
        let member = &mut self.members[i];
        let _ = if member.faulted {
            self.poller.unregister(member.context.shared.stop.as_fd())
        } else {
            let fd = member.wait_fd();
            self.poller.unregister(fd)
        };
    }

    /// Step every member once; `true` if any did work.
    fn step_all(&mut self) -> bool {
        let mut worked = false;
        let mut i = 0;
        while i < self.members.len() {
            let member = &mut self.members[i];
            let outcome = if member.faulted {
                Ok((!member.context.shared.stop_requested()).then_some(Progress::Idle))
            } else {
                guarded(|| member.step())
            };
            match outcome {
                Ok(Some(progress)) => worked |= progress != Progress::Idle,
                Ok(None) => {
                    self.unwatch(i);
                    let member = self.members.swap_remove(i);
                    let parts = Parts {
                        queue: member.context.queue,
                        handler: member.context.handler,
                    };
                    // The worker handle waits for it; if it is gone, the parts are dropped.
                    let _ = member.done.send(parts);
                    continue;
                }
                Err(fault) => {
                    self.unwatch(i);
                    let member = &mut self.members[i];
                    member.fail(fault);
                    self.watch_stop(&self.members[i]);
                }
            }
            i += 1;
        }
        worked
    }

    /// Ask every member for notifications, then sleep unless work slipped in; consume what woke
    /// the members.
    fn sleep(&mut self) {
        let mut slipped = false;
        self.events.clear();
        for i in 0..self.members.len() {
            let member = &mut self.members[i];
            if member.faulted {
                continue;
            }
            match guarded(|| member.prepare_sleep()) {
                Ok(work) => slipped |= work,
                Err(fault) => {
                    self.unwatch(i);
                    self.members[i].fail(fault);
                    self.watch_stop(&self.members[i]);
                }
            }
        }
        if !slipped {
            let timeout = self
                .members
                .iter()
                .filter_map(|m| m.context.poll_interval)
                .min();
            // An error (none is expected from epoll here) just ends this sleep early.
            let _ = self.poller.wait(timeout, &mut self.events);
            if self.events.contains(&TOKEN_GROUP) {
                let _ = self.shared.doorbell.consume();
            }
        }
        for i in 0..self.members.len() {
            let member = &mut self.members[i];
            if member.faulted {
                continue;
            }
            let ready = self.events.contains(&member.token);
            if let Err(fault) = guarded(|| member.wake(ready)) {
                self.unwatch(i);
                self.members[i].fail(fault);
                self.watch_stop(&self.members[i]);
            }
        }
    }

    fn run(mut self) {
        let mut idle_since: Option<Instant> = None;
        // Idle rounds since the last clock read (see `CLOCK_EVERY`).
        let mut rounds = 0u32;
        loop {
            if self.shared.has_joining.load(Ordering::Acquire) {
                self.admit();
            }
            if self.members.is_empty() && self.shared.closed.load(Ordering::Acquire) {
                return;
            }
            if self.step_all() {
                idle_since = None;
                rounds = 0;
                continue;
            }
            let budget = self
                .members
                .iter()
                .filter_map(|m| m.context.busy_poll)
                .max()
                .unwrap_or_default();
            if !budget.is_zero() {
                rounds += 1;
                if rounds < CLOCK_EVERY {
                    std::hint::spin_loop();
                    continue;
                }
                rounds = 0;
                let now = Instant::now();
                let since = *idle_since.get_or_insert(now);
                if now.duration_since(since) < budget {
                    std::hint::spin_loop();
                    continue;
                }
            }
            self.sleep();
            idle_since = None;
        }
    }
}
