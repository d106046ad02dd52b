//! Waiting for an instant with microsecond precision on a worker's tokio runtime: the
//! open model's next arrival event and the run's agreed start instant.
//!
//! tokio's timer has 1 ms granularity and rounds every sleep up, so an iteration woken
//! by it starts up to a millisecond (and on a busy worker much more) after its intended
//! instant. A [`Pacer`] instead sleeps on a Linux timerfd (an hrtimer, no timer slack)
//! armed a little before the instant, registered with the runtime's own epoll so the
//! worker's I/O keeps being served while it waits, and covers the last few microseconds
//! by yielding to the runtime until the clock reaches the instant. Where no timerfd is
//! available it falls back to tokio's timer for the coarse part and yields for the
//! last couple of milliseconds. A wait never returns before its instant; how late it
//! returns is for the caller to measure, never to hide. This module must not know what
//! it waits for.
//!
//! Yielding until an instant keeps the core busy while nothing else is to be done.
//! That time is counted ([`spun_seconds`]) so that the generator's CPU figure, which
//! tells a saturated generator from a slow target, reports it as the idle time it is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A wait for an arrival event this short is covered by yielding rather than sleeping.
/// Going to sleep and being woken costs a worker on a VM about this much CPU and
/// wake-up latency (a context switch from and to the idle task, paravirtual halts): at
/// 50k events/s a sleep per 100 µs burned ~14 % of the core in `finish_task_switch`
/// alone and started events 100–150 µs late (p50), where yielding starts them 1 µs
/// late. The cost is a busy core while a dense schedule runs (events under this far
/// apart, over ~20k/s on one worker), which is reported as idle (see
/// [`spun_seconds`]).
const EVENT_NO_SLEEP: Duration = Duration::from_micros(50);

/// A longer wait for an arrival event sleeps until this much before its instant and
/// yields for the rest: about a sleeping thread's wake-up latency on an idle machine.
/// Short, so that sparse events cost little spin (1 % of a core at 1000 events/s).
const EVENT_SPIN: Duration = Duration::from_micros(10);

/// Arrival events that would need a sleep of their own (more than [`EVENT_NO_SLEEP`]
/// away) closer together than this share a wake-up: the worker sleeps at most once
/// per this interval and then hands out every event that has come due. A wake-up
/// costs a few syscalls and a context switch; at tens of thousands of events a second
/// one per event would eat the CPU the iterations need, while this bounds the added
/// lag of such schedules to about this much. Sparser events (up to 10k/s per worker)
/// each get their own precise wake-up.
/// Measured on a 2-vCPU VM (6 s runs, one worker, schedule lag p99 / generator CPU):
/// at 5k/s, no coalescing 0.25 ms / 0.43; at 20k/s, none 0.67 ms / 0.94, 100 µs
/// 0.55 ms / 0.58, 250 µs 4.4 ms / 0.51; at 50k/s, none 1.5 ms / 1.0, 100 µs 4.0 ms /
/// 0.84, 250 µs 6.7 ms / 0.72. Single runs on this VM vary by several ms at p99.
const EVENT_MIN_GAP: Duration = Duration::from_micros(100);

/// The spin before a one-off instant (the run's start). Short as well: every worker of
/// every node on a machine wakes for the same instant, and threads that spin while
/// others wait for a core make the waiting ones start late (on a 2-core box with 3
/// nodes of 2 workers, a 150 µs spin gave start skews of up to 1.5 ms, and a 500 µs
/// spin that gave the core away between clock reads with `sched_yield`, 2.7–3.5 ms).
const INSTANT_SPIN: Duration = Duration::from_micros(10);

/// The spin before a one-off instant when sleeping on tokio's timer, which wakes up to
/// 1 ms late.
const COARSE_INSTANT_SPIN: Duration = Duration::from_micros(2_000);

/// A runtime tick that gave the pacer back within this long ran nothing but the
/// runtime's own I/O poll (an `epoll_wait` that returned at once): it counts as idle.
/// Longer ticks ran other tasks and count as work.
const IDLE_TICK: Duration = Duration::from_micros(4);

/// Nanoseconds this process's pacers have spent yielding with nothing else to run.
static SPUN_NS: AtomicU64 = AtomicU64::new(0);

/// CPU seconds this process has spent spinning for instants with nothing else to do:
/// idle time on a busy core, to be taken off the process's CPU time when telling
/// how loaded the generator is.
pub fn spun_seconds() -> f64 {
    SPUN_NS.load(Ordering::Relaxed) as f64 / 1e9
}

/// Gives the runtime one tick (its I/O poll and whatever tasks are ready) and counts
/// the tick as idle when it came back at once.
async fn spin_tick() {
    let before = Instant::now();
    tokio::task::yield_now().await;
    let took = before.elapsed();
    if took <= IDLE_TICK {
        SPUN_NS.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Waits for instants on the current (single-threaded) tokio runtime. One per task that
/// waits; a wait may be cancelled (dropped) at any point and the pacer reused.
pub struct Pacer {
    /// A wait this short does not sleep at all: it is covered by yielding.
    no_sleep: Duration,
    /// The last part of a longer wait on the precise timer, covered by yielding.
    spin: Duration,
    /// The same on tokio's timer (the fallback).
    coarse_spin: Duration,
    /// The least time between two sleeps' ends: see [`EVENT_MIN_GAP`].
    min_gap: Duration,
    /// When the last sleep ended.
    last_wake: Option<Instant>,
    #[cfg(target_os = "linux")]
    timer: Option<timerfd::TimerFd>,
}

impl Pacer {
    fn make(no_sleep: Duration, spin: Duration, coarse_spin: Duration, min_gap: Duration) -> Pacer {
        Pacer {
            no_sleep,
            spin,
            coarse_spin,
            min_gap,
            last_wake: None,
            #[cfg(target_os = "linux")]
            timer: match timerfd::TimerFd::new() {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::debug!("no timerfd ({e}); waits use tokio's 1 ms timer");
                    None
                }
            },
        }
    }

    /// For a stream of arrival events: precise for sparse events, one wake-up per
    /// [`EVENT_MIN_GAP`] for denser ones, and no sleep at all for events under
    /// [`EVENT_NO_SLEEP`] apart. On tokio's timer (no timerfd) waits longer than that
    /// start up to about a millisecond late. Must be made inside a tokio runtime with
    /// I/O enabled.
    pub fn for_events() -> Pacer {
        Pacer::make(EVENT_NO_SLEEP, EVENT_SPIN, Duration::ZERO, EVENT_MIN_GAP)
    }

    /// For a one-off instant (the run's start, a scenario's start): as precise as
    /// the machine allows. Must be made inside a tokio runtime with I/O enabled.
    pub fn for_instant() -> Pacer {
        Pacer::make(
            INSTANT_SPIN,
            INSTANT_SPIN,
            COARSE_INSTANT_SPIN,
            Duration::ZERO,
        )
    }

    /// The same pacer on tokio's timer only (the fallback where there is no timerfd).
    pub fn without_timerfd(self) -> Pacer {
        Pacer {
            #[cfg(target_os = "linux")]
            timer: None,
            ..self
        }
    }

    /// Whether waits sleep on a precise timer rather than tokio's.
    pub fn precise(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            self.timer.is_some()
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }

    /// Returns once `Instant::now() >= deadline`, as soon after it as the runtime lets
    /// this task run (later when coalescing dense events, see [`Pacer::for_events`]).
    /// Returns at once, without yielding, when the deadline has passed. Other tasks of
    /// the runtime run while it waits.
    pub async fn until(&mut self, deadline: Instant) {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        // Never before the deadline; a wait that needs a sleep not before the least gap
        // after the last wake-up. A wait short enough not to sleep never waits for it.
        let short = deadline - now <= self.no_sleep;
        let wake_at = match self.last_wake {
            Some(last) if !short => deadline.max(last + self.min_gap),
            _ => deadline,
        };
        // How much of the wait is yielded: all of a short one; none of a coalesced one
        // (it is late anyway); the last few µs of any other.
        let (spin, coarse_spin) = if short {
            (self.no_sleep, self.no_sleep)
        } else if wake_at > deadline {
            (Duration::ZERO, Duration::ZERO)
        } else {
            (self.spin, self.coarse_spin)
        };
        loop {
            let now = Instant::now();
            if now >= wake_at {
                return;
            }
            // Asked each time round: a timerfd that fails is dropped for tokio's timer.
            let tail = if self.precise() { spin } else { coarse_spin };
            if wake_at - now > tail {
                self.sleep_until(wake_at - tail).await;
                self.last_wake = Some(Instant::now());
            } else {
                spin_tick().await;
            }
        }
    }

    /// Sleeps until about `at` on the timerfd, or on tokio's timer where there is none.
    /// May return early; the caller checks the clock.
    async fn sleep_until(&mut self, at: Instant) {
        #[cfg(target_os = "linux")]
        if let Some(timer) = self.timer.as_mut() {
            if timer.sleep_until(at).await.is_err() {
                // A timerfd that fails once is not trusted again.
                self.timer = None;
            }
            return;
        }
        tokio::time::sleep_until(at.into()).await;
    }
}

/// One wait for a one-off instant on a pacer of its own.
pub async fn wait_until(deadline: Instant) {
    Pacer::for_instant().until(deadline).await
}

#[cfg(target_os = "linux")]
mod timerfd {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Instant;

    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    /// A CLOCK_MONOTONIC timerfd in the runtime's epoll. std's `Instant` reads the same
    /// clock on Linux; `base` pairs one reading of each so that an `Instant` converts to
    /// the timerfd's absolute time without drift.
    pub(super) struct TimerFd {
        fd: AsyncFd<OwnedFd>,
        base: Instant,
        base_ns: u128,
    }

    fn monotonic_ns() -> io::Result<u128> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128)
    }

    impl TimerFd {
        pub(super) fn new() -> io::Result<TimerFd> {
            // SAFETY: plain syscall; the result is checked before use.
            let raw = unsafe {
                libc::timerfd_create(
                    libc::CLOCK_MONOTONIC,
                    libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
            let base = Instant::now();
            let base_ns = monotonic_ns()?;
            // SAFETY: `owned` is an open descriptor that the AsyncFd owns, and so keeps
            // open and unchanged, until it is dropped.
            let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
            Ok(TimerFd { fd, base, base_ns })
        }

        fn arm(&self, at: Instant) -> io::Result<()> {
            // An instant before `base` (or one that rounds to zero, which would disarm
            // the timer) fires at once.
            let ns = (self.base_ns + at.saturating_duration_since(self.base).as_nanos()).max(1);
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: (ns / 1_000_000_000) as libc::time_t,
                    tv_nsec: (ns % 1_000_000_000) as libc::c_long,
                },
            };
            // SAFETY: the descriptor is open for the life of `self`; `spec` is valid.
            let rc = unsafe {
                libc::timerfd_settime(
                    self.fd.get_ref().as_raw_fd(),
                    libc::TFD_TIMER_ABSTIME,
                    &spec,
                    std::ptr::null_mut(),
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }

        /// Sleeps until about `at` (never much later unless the thread is starved).
        /// May return early on a stale wake-up left by a cancelled wait: the caller
        /// checks the clock.
        pub(super) async fn sleep_until(&mut self, at: Instant) -> io::Result<()> {
            self.arm(at)?;
            loop {
                let mut guard = self.fd.readable().await?;
                let mut expirations = [0u8; 8];
                // SAFETY: reads at most 8 bytes into a buffer of 8 bytes.
                let n = unsafe {
                    libc::read(
                        guard.get_inner().as_raw_fd(),
                        expirations.as_mut_ptr().cast(),
                        expirations.len(),
                    )
                };
                if n == 8 {
                    // The expiry is consumed and the timer is one-shot: nothing can
                    // make it readable again before the next `arm`, so the readiness
                    // tokio still holds is stale. Clearing it now saves the next wait
                    // a read that would only say "would block".
                    guard.clear_ready();
                    return Ok(());
                }
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::WouldBlock {
                    return Err(err);
                }
                // Readiness left over from an expiry already consumed: wait again, but
                // not past the instant if the kernel's answer was stale.
                guard.clear_ready();
                if Instant::now() >= at {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Deadlines on both sides of the spin windows, none of them a whole millisecond.
    fn deadlines(from: Instant) -> Vec<Instant> {
        [0u64, 7, 45, 61, 150, 999, 1_337, 2_500, 4_321]
            .iter()
            .map(|us| from + Duration::from_micros(*us))
            .collect()
    }

    fn never_early_in_runtime(make: fn() -> Pacer) {
        runtime().block_on(async move {
            let mut pacer = make();
            let mut late = Vec::new();
            for at in deadlines(Instant::now() + Duration::from_micros(300)) {
                pacer.until(at).await;
                let now = Instant::now();
                assert!(now >= at, "returned {:?} early", at - now);
                late.push(now - at);
            }
            // Generous: a loaded 2-core box may starve the thread, but not for seconds.
            assert!(late.iter().all(|l| *l < Duration::from_secs(2)), "{late:?}");
        });
    }

    #[test]
    fn precise_wait_never_returns_early() {
        // The timerfd registers with the runtime it is made in.
        let pacer = runtime().block_on(async { Pacer::for_events() });
        #[cfg(target_os = "linux")]
        assert!(pacer.precise(), "a Linux box has timerfd");
        drop(pacer);
        never_early_in_runtime(Pacer::for_events);
        never_early_in_runtime(Pacer::for_instant);
    }

    #[test]
    fn coarse_wait_never_returns_early() {
        never_early_in_runtime(|| Pacer::for_events().without_timerfd());
        never_early_in_runtime(|| Pacer::for_instant().without_timerfd());
    }

    #[test]
    fn dense_events_share_a_wake_up() {
        runtime().block_on(async {
            let mut pacer = Pacer::for_events();
            let first = Instant::now() + Duration::from_micros(500);
            pacer.until(first).await;
            let woke = pacer.last_wake.expect("the first wait slept");
            // Due 80 µs after the first (too far to spin for, closer than the least
            // gap): it waits for the least gap after the wake-up (late, and its lag
            // will say so) rather than for a wake-up of its own, unless this thread was
            // held up for so long that it is within the spin window already.
            let second = first + Duration::from_micros(80);
            let needs_sleep = second.saturating_duration_since(Instant::now()) > EVENT_NO_SLEEP;
            pacer.until(second).await;
            let now = Instant::now();
            assert!(now >= second);
            if needs_sleep {
                assert!(now >= woke + EVENT_MIN_GAP, "{:?}", now - woke);
            }
            // A due event never waits for the gap.
            let due = Instant::now() - Duration::from_micros(1);
            assert!(futures::FutureExt::now_or_never(pacer.until(due)).is_some());
        });
    }

    #[test]
    fn close_events_are_spun_for_and_the_spin_counts_as_idle() {
        runtime().block_on(async {
            let mut pacer = Pacer::for_events();
            // Sleep once so that coalescing would apply to a wait that needed a sleep.
            pacer
                .until(Instant::now() + Duration::from_micros(300))
                .await;
            let woke = pacer.last_wake.expect("the first wait slept");
            let spun_before = SPUN_NS.load(Ordering::Relaxed);
            // Within the spin window: no sleep, so no wait for the least gap either.
            let close = Instant::now() + EVENT_NO_SLEEP / 2;
            pacer.until(close).await;
            let now = Instant::now();
            assert!(now >= close);
            assert_eq!(pacer.last_wake, Some(woke), "a spun wait does not sleep");
            // Other tests' pacers add to the counter too; it only grows.
            assert!(SPUN_NS.load(Ordering::Relaxed) >= spun_before);
        });
    }

    #[test]
    fn idle_ticks_are_counted_as_spun_time() {
        runtime().block_on(async {
            let before = spun_seconds();
            // An empty runtime gives a yield back at once: a thousand ticks cannot all
            // take longer than IDLE_TICK short of the thread being starved throughout.
            for _ in 0..1_000 {
                spin_tick().await;
            }
            assert!(spun_seconds() > before);
        });
    }

    #[test]
    fn past_deadline_returns_at_once() {
        runtime().block_on(async {
            let mut pacer = Pacer::for_events();
            let past = Instant::now() - Duration::from_millis(5);
            // Ready on its first poll: no yield, no timer.
            let ready = futures::FutureExt::now_or_never(pacer.until(past));
            assert!(ready.is_some());
        });
    }

    #[test]
    fn a_cancelled_wait_leaves_the_pacer_usable() {
        runtime().block_on(async {
            let mut pacer = Pacer::for_events();
            let far = Instant::now() + Duration::from_secs(30);
            // Arm for far away, then give up after a short while.
            let gave_up = tokio::time::timeout(Duration::from_millis(3), pacer.until(far)).await;
            assert!(gave_up.is_err());
            let near = Instant::now() + Duration::from_micros(700);
            let started = Instant::now();
            pacer.until(near).await;
            assert!(Instant::now() >= near);
            // The re-armed timer, not the stale 30 s one, ended the wait.
            assert!(started.elapsed() < Duration::from_secs(10));
        });
    }

    #[test]
    fn other_tasks_run_while_waiting() {
        runtime().block_on(async {
            let local = tokio::task::LocalSet::new();
            local
                .run_until(async {
                    let ticks = std::rc::Rc::new(std::cell::Cell::new(0u32));
                    let t2 = ticks.clone();
                    let busy = tokio::task::spawn_local(async move {
                        for _ in 0..100 {
                            t2.set(t2.get() + 1);
                            tokio::task::yield_now().await;
                        }
                    });
                    let mut pacer = Pacer::for_events();
                    pacer
                        .until(Instant::now() + Duration::from_millis(20))
                        .await;
                    // The waiter gave the runtime back at least once.
                    assert!(ticks.get() > 0);
                    busy.await.expect("task");
                    assert_eq!(ticks.get(), 100);
                })
                .await;
        });
    }
}
