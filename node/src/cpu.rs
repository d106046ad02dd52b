//! How busy this process is: CPU time used per wall-clock second, from getrusage.
//! Used to tell a saturated generator from a slow target; it must not sample anything
//! but this process.

use std::time::Instant;

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
    tv(ru.ru_utime) + tv(ru.ru_stime)
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
    /// CPU used since the last sample, as a fraction of `cores` (0..1, may exceed 1
    /// briefly when other threads of the process are busy too).
    pub fn sample(&mut self, cores: usize) -> f64 {
        let (cpu, now) = (process_cpu_seconds(), Instant::now());
        let wall = now.duration_since(self.last_at).as_secs_f64();
        let used = cpu - self.last_cpu;
        self.last_cpu = cpu;
        self.last_at = now;
        if wall <= 0.0 {
            return 0.0;
        }
        used / wall / cores.max(1) as f64
    }
}
