//! How busy this process is: CPU time used per wall-clock second, from getrusage,
//! less the time its pacers spun waiting for an instant with nothing else to do
//! (`pacing::spun_seconds`), which is idle time on a busy core. Used to tell a
//! saturated generator from a slow target; it must not sample anything but this
//! process.

use std::sync::OnceLock;
use std::time::Instant;

/// How many cores this process may use (its affinity and cgroup quota), asked once:
/// std reads /proc and cgroup files for it, which would be a few file reads per worker
/// report on the path that merges every second's snapshot.
pub fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

pub struct CpuSampler {
    last_cpu: f64,
    last_at: Instant,
}

fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we hand it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime) + tv(ru.ru_stime) - crate::engine::pacing::spun_seconds()).max(0.0)
}

impl Default for CpuSampler {
    fn default() -> Self {
        CpuSampler {
            last_cpu: process_cpu_seconds(),
            last_at: Instant::now(),
        }
    }
}

impl CpuSampler {
    /// CPU used since the last sample, as a fraction of the cores `workers` threads can
    /// use (at most this process's cores; 0..1, may exceed 1 briefly when other threads
    /// of the process are busy too).
    pub fn sample(&mut self, workers: usize) -> f64 {
        let (cpu, now) = (process_cpu_seconds(), Instant::now());
        let wall = now.duration_since(self.last_at).as_secs_f64();
        let used = (cpu - self.last_cpu).max(0.0);
        self.last_cpu = cpu;
        self.last_at = now;
        if wall <= 0.0 {
            return 0.0;
        }
        used / wall / workers.min(cores()).max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_is_at_least_one_and_stable() {
        assert!(cores() >= 1);
        assert_eq!(cores(), cores());
    }

    #[test]
    fn a_sample_is_never_negative() {
        let mut sampler = CpuSampler::default();
        // Spun time is taken off the process's CPU time; however the two move between
        // samples, the share reported stays in range.
        let _ = std::hint::black_box((0..100_000u64).sum::<u64>());
        let share = sampler.sample(1);
        assert!(share >= 0.0 && share.is_finite(), "{share}");
    }
}
