//! The process's file descriptors: every VU holds a connection, so a run needs about as
//! many descriptors as it has VUs.
//!
//! Two things are done ahead of the load, never during it:
//! - the soft `RLIMIT_NOFILE` is raised to the hard one (the usual soft 1024 would cap a
//!   run at about a thousand VUs with "too many open files");
//! - the kernel's descriptor table is grown to the size a run needs. Linux grows it by
//!   doubling as descriptors are opened, and in a multi-threaded process every growth
//!   waits for an RCU grace period (`expand_files` → `synchronize_rcu`) inside the
//!   `socket()` call that crossed the boundary. On the 2-vCPU VMs this project is
//!   measured on a grace period takes 8–16 ms: a worker opening its 129th or 257th
//!   connection mid-run stalled for that long, and the open model's schedule lag with
//!   it. The table never shrinks, so growing it once beforehand removes those stalls.
//!
//! This module must not open connections or know about plans; callers say how many
//! descriptors they expect.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Descriptors reserved at process start, while the process has one thread and growing
/// the table costs no grace period: enough for most runs and every node's own sockets.
const AT_START: u64 = 4096;

/// Descriptors a process needs besides its VUs' connections: the runtime, the mesh,
/// the control endpoint, data files.
pub const OWN: u64 = 256;

/// The largest table reserved ahead (2 MiB of kernel memory, kept for the process's
/// life): beyond it the kernel grows the table as connections open, one grace period
/// per doubling, rather than a table of a billion slots for a huge hard limit.
const MAX_AHEAD: u64 = 1 << 18;

/// The largest table size reserved so far (a reservation never needs repeating).
static RESERVED: AtomicU64 = AtomicU64::new(0);

/// Raises the soft descriptor limit to the hard one and reserves a table for
/// [`AT_START`] descriptors. Call first thing in `main`, before any thread starts.
/// Failures are ignored: the run still works, only later and with stalls.
pub fn prepare() {
    raise_limit();
    reserve(AT_START);
}

/// The soft `RLIMIT_NOFILE`: the most descriptors this process may have open.
pub fn limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and has no other effect.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    rl.rlim_cur
}

fn raise_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass and nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

/// Grows the descriptor table so that `count` descriptors (capped at the limit and at
/// [`MAX_AHEAD`]) fit without the kernel growing it again. Returns the size now
/// reserved. Costs one RCU grace period when the process already has threads and the
/// table must grow.
pub fn reserve(count: u64) -> u64 {
    let want = count.min(limit()).min(MAX_AHEAD);
    let have = RESERVED.load(Ordering::Relaxed);
    if want <= have || want < 2 {
        return have;
    }
    let Ok(null) = std::fs::File::open("/dev/null") else {
        return have;
    };
    // The lowest free descriptor at or above want - 1: the table must reach it. It is
    // closed at once; the table keeps its size.
    let arg = libc::c_int::try_from(want - 1).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own; the copy is closed here
    // and never used.
    let fd = unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD_CLOEXEC, arg) };
    if fd < 0 {
        return have;
    }
    // SAFETY: fd was just returned to us by fcntl and nothing else refers to it.
    unsafe { libc::close(fd) };
    RESERVED.fetch_max(want, Ordering::Relaxed);
    want
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reservation really grows the kernel's table, and never past the limit.
    #[test]
    fn reserve_grows_the_table_up_to_the_limit() {
        prepare();
        let want = 3000.min(limit());
        assert!(reserve(want) >= want);
        let most = reserve(u64::MAX);
        assert!(most <= limit() && most <= MAX_AHEAD, "capped: {most}");
        // The table now covers descriptor want - 1: /proc/self/status says how big it is.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let fd_size: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("FDSize in /proc/self/status");
        assert!(fd_size >= want, "FDSize {fd_size} < {want}");
    }
}
