//! Splitting one kernel call across idle cores.
//!
//! A forward pass makes ~30 kernel calls of 0.1–1 ms each with short stretches of other
//! work in between. A thread pool that puts idle threads to sleep pays a wake-up (tens of
//! microseconds on a VM) on nearly every call; these helpers instead spin for a short
//! while after each part, so the next call of the same pass finds them awake, and park
//! once no part came for [`SPIN`].

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper stays awake after a part, waiting for the next.
const SPIN: Duration = Duration::from_micros(300);

const IDLE: u8 = 0;
const POSTED: u8 = 1;
const RUNNING: u8 = 2;
const DONE: u8 = 3;

/// A part for a helper to run: the caller's closure with its lifetime erased (the caller
/// waits for [`DONE`] before the closure goes out of scope) and the part's index.
type Job = (&'static (dyn Fn(usize) + Sync), usize);

struct Helper {
    /// Held by the caller that posted to this helper, from posting until done.
    claimed: AtomicBool,
    state: AtomicU8,
    job: Mutex<Option<Job>>,
    thread: OnceLock<Thread>,
}

impl Helper {
    fn run(&self) {
        loop {
            let mut since = Instant::now();
            let mut spins = 0u32;
            while self.state.load(Ordering::Acquire) != POSTED {
                spins = spins.wrapping_add(1);
                if !spins.is_multiple_of(64) {
                    std::hint::spin_loop();
                } else if since.elapsed() > SPIN {
                    // A poster unparks after setting POSTED, so no wake-up is lost.
                    std::thread::park_timeout(Duration::from_millis(100));
                    since = Instant::now();
                }
            }
            // The poster may have taken the part back (it finished its own first and found
            // this one not started); then there is nothing to run.
            if self
                .state
                .compare_exchange(POSTED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            let job = self.job.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((part, index)) = job {
                // A panicking part must still report done, or its caller would wait
                // forever; the caller's own part will surface the same bug.
                let _ = catch_unwind(AssertUnwindSafe(|| part(index)));
            }
            self.state.store(DONE, Ordering::Release);
        }
    }
}

/// Cores this process may run on.
pub fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// One helper per core besides the caller's, started on first use.
fn helpers() -> &'static [Helper] {
    static HELPERS: OnceLock<Box<[Helper]>> = OnceLock::new();
    static STARTED: Once = Once::new();
    let pool = HELPERS.get_or_init(|| {
        (0..cores().saturating_sub(1))
            .map(|_| Helper {
                claimed: AtomicBool::new(false),
                state: AtomicU8::new(IDLE),
                job: Mutex::new(None),
                thread: OnceLock::new(),
            })
            .collect()
    });
    STARTED.call_once(|| {
        for (n, helper) in pool.iter().enumerate() {
            let spawned = std::thread::Builder::new()
                .name(format!("semcache-kernel-{n}"))
                .spawn(move || helper.run());
            // A helper that could not start is never posted to (its parts run inline).
            if let Ok(handle) = spawned {
                let _ = helper.thread.set(handle.thread().clone());
            }
        }
    });
    pool
}

/// Runs `part(0)`…`part(parts - 1)`, the caller taking part 0 and free helper threads
/// the others; parts that no free helper takes run on the caller.
pub fn run(parts: usize, part: &(dyn Fn(usize) + Sync)) {
    if parts <= 1 {
        (0..parts).for_each(part);
        return;
    }
    // SAFETY: only the lifetime is erased; every helper given this job reports DONE
    // (also when the part panics) before this function returns.
    let erased: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(part) };
    let mut posted: Vec<&Helper> = Vec::with_capacity(parts - 1);
    let mut inline = Vec::new();
    for index in 1..parts {
        let free = helpers().iter().find(|h| {
            h.thread.get().is_some()
                && h.claimed
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
        });
        match free {
            Some(helper) => {
                *helper.job.lock().unwrap_or_else(|p| p.into_inner()) = Some((erased, index));
                helper.state.store(POSTED, Ordering::Release);
                if let Some(thread) = helper.thread.get() {
                    thread.unpark();
                }
                posted.push(helper);
            }
            None => inline.push(index),
        }
    }
    part(0);
    inline.into_iter().for_each(part);
    for helper in posted {
        // A part its helper has not started (the helper was descheduled, say, because
        // another worker now uses its core) is taken back and run here rather than
        // waited for.
        if helper
            .state
            .compare_exchange(POSTED, IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let job = helper.job.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((_, index)) = job {
                part(index);
            }
        } else {
            let mut spins = 0u32;
            while helper.state.load(Ordering::Acquire) != DONE {
                spins = spins.wrapping_add(1);
                if spins < 10_000 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            helper.state.store(IDLE, Ordering::Relaxed);
        }
        helper.claimed.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_part_runs_once() {
        for parts in [1, 2, 3, 7] {
            let counts: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..200 {
                run(parts, &|i| {
                    counts[i].fetch_add(1, Ordering::SeqCst);
                });
            }
            assert!(
                counts.iter().all(|c| c.load(Ordering::SeqCst) == 200),
                "{parts} parts"
            );
        }
    }

    #[test]
    fn concurrent_callers_share_the_helpers() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..500 {
                        run(3, &|_| {
                            total.fetch_add(1, Ordering::SeqCst);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::SeqCst), 4 * 500 * 3);
    }
}
