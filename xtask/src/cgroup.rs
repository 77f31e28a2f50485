//! A throwaway cgroup v2 directory per test node. Cgroups are machine-wide, so each node of a
//! NetCluster gets its own, and transparent mode's programs attached to it see only that node's
//! processes (containerd, ctr).
//!
//! The directory is a child of the cgroup2 mount's *root*, not of the test's own cgroup: a child
//! that holds processes is a leaf, and leaves are exempt from cgroup v2's "no internal processes"
//! rule whatever controllers the root enables (the test's own cgroup may be an inner node).
//!
//! Where: `ip netns exec` mounts a fresh sysfs over /sys for the command it runs, so a cgroup2
//! mount under /sys (the usual /sys/fs/cgroup, or /sys/fs/cgroup/unified in hybrid mode) is not
//! there for a process started that way, e.g. an agent given the path in `--cgroup`. When the
//! cgroup2 mount lies under /sys, or there is none, the cgroup2 hierarchy is mounted again at a
//! private temporary directory (same hierarchy, same cgroups; unmounted on drop), and `path` is
//! under it: one path valid on the host and inside every `ip netns exec`.
use std::{
    ffi::CString,
    io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A cgroup v2 directory; on drop every process still in it is killed and it is removed.
pub struct Cgroup {
    /// The cgroup's directory (visible on the host and inside `ip netns exec`).
    pub path: PathBuf,
    /// The cgroup2 mount it is under (for the agent's `--cgroup-root`).
    pub root: PathBuf,
    /// The cgroup2 mount this crate made for it, unmounted on drop.
    mounted: Option<PathBuf>,
}

/// Prefix of the temporary mounts made here (and by bpf-tests): never reused, since their owner
/// unmounts them when it is done.
const TEMP_MOUNT_PREFIX: &str = "peerd-cg2-";

/// The mount point of a lasting cgroup2 mount of the hierarchy's root outside /sys, if any.
fn usable_cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mountpoint opts ... - fstype source superopts
    info.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let f: Vec<&str> = pre.split_whitespace().collect();
        let (root, mountpoint) = (*f.get(3)?, PathBuf::from(f.get(4)?));
        let temporary = mountpoint.file_name().is_some_and(|n| n.to_string_lossy().starts_with(TEMP_MOUNT_PREFIX));
        let ok = post.split_whitespace().next()? == "cgroup2" && root == "/" && !mountpoint.starts_with("/sys") && !temporary;
        ok.then_some(mountpoint)
    })
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

impl Cgroup {
    /// Makes `peerd-test-<name>-<pid>-<n>` under the cgroup2 root. Panics with the reason if it
    /// cannot (tests need root).
    pub fn create(name: &str) -> Self {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let (root, mounted) = match usable_cgroup2_mount() {
            Some(m) => (m, None),
            None => {
                let m = std::env::temp_dir().join(format!("{TEMP_MOUNT_PREFIX}{name}-{pid}-{seq}"));
                std::fs::create_dir_all(&m).unwrap_or_else(|e| panic!("mkdir {m:?}: {e}"));
                // SAFETY: plain mount(2) with valid NUL-terminated strings and no data.
                let rc = unsafe { libc::mount(c"none".as_ptr(), cstr(&m).as_ptr(), c"cgroup2".as_ptr(), 0, std::ptr::null()) };
                if rc != 0 {
                    let e = io::Error::last_os_error();
                    let _ = std::fs::remove_dir(&m);
                    panic!("mount cgroup2 at {m:?}: {e} (tests need root)");
                }
                (m.clone(), Some(m))
            }
        };
        let path = root.join(format!("peerd-test-{name}-{pid}-{seq}"));
        // From here on, Drop cleans up (also the mount when mkdir fails).
        let cg = Self { path, root, mounted };
        std::fs::create_dir(&cg.path).unwrap_or_else(|e| panic!("mkdir {:?}: {e}", cg.path));
        cg
    }

    /// The cgroup as /proc/<pid>/cgroup names it, e.g. `/peerd-test-n0-1234-0` (for the
    /// agent's `--cgroup`).
    pub fn name(&self) -> String {
        format!("/{}", self.path.strip_prefix(&self.root).expect("under its root").display())
    }

    pub fn procs_path(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Makes `cmd`'s child move itself into this cgroup before it execs (so the program, and
    /// everything it starts, runs inside from its first instruction).
    pub fn enter_on_spawn(&self, cmd: &mut Command) {
        enter_on_spawn(&self.procs_path(), cmd)
    }

    /// Processes in the cgroup now.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.procs_path()).unwrap_or_default().split_whitespace().filter_map(|p| p.parse().ok()).collect()
    }

    /// Whether any process is still in the cgroup (a task that has died may linger in the
    /// count briefly after it left cgroup.procs: `populated` is what rmdir goes by).
    fn populated(&self) -> bool {
        std::fs::read_to_string(self.path.join("cgroup.events"))
            .map(|e| e.lines().any(|l| l == "populated 1"))
            .unwrap_or_else(|_| !self.pids().is_empty())
    }
}

/// Like `Cgroup::enter_on_spawn`, for a `cgroup.procs` path kept by a component (e.g.
/// Containerd) that outlives the borrow of its Cgroup. Panics if the file cannot be opened.
pub fn enter_on_spawn(procs: &Path, cmd: &mut Command) {
    // Opened here, in the parent: between fork and exec only async-signal-safe calls are allowed
    // (no allocation, no locks), so the child only write(2)s "0", which moves the writer.
    // The file is close-on-exec; the closure owns it, so it lives as long as `cmd`.
    let f = std::fs::OpenOptions::new().write(true).open(procs).unwrap_or_else(|e| panic!("open {procs:?}: {e}"));
    // SAFETY: the closure only calls write(2) on an fd it owns, and reads errno on failure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // cgroup.kill (Linux 5.14+) kills everything at once, also processes forked meanwhile;
        // otherwise SIGKILL each listed pid until none is left. Bounded: 5 s.
        let kill_file = self.path.join("cgroup.kill");
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.populated() && Instant::now() < deadline {
            if std::fs::write(&kill_file, "1").is_err() {
                for pid in self.pids() {
                    // SAFETY: kill(2) on a pid listed in our own test cgroup.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // rmdir can still say EBUSY for a moment after the last task is gone.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.path.exists() && std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.path.exists() {
            eprintln!("warning: could not remove cgroup {:?} (processes: {:?})", self.path, self.pids());
        }
        if let Some(m) = &self.mounted {
            // Lazy: the hierarchy stays mounted elsewhere; this mount point only has to go.
            // SAFETY: umount2 on a path we mounted.
            unsafe { libc::umount2(cstr(m).as_ptr(), libc::MNT_DETACH) };
            let _ = std::fs::remove_dir(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawned_process_runs_inside_and_is_killed_with_the_cgroup() {
        let cg = Cgroup::create("unit");
        let path = cg.path.clone();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        cg.enter_on_spawn(&mut cmd);
        let mut child = cmd.spawn().expect("spawn sleep");
        assert_eq!(cg.pids(), vec![child.id()], "sleep is not (alone) in {path:?}");
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert!(own.lines().any(|l| l == format!("0::{}", cg.name())), "{own}");
        // The test process itself stays where it was.
        assert!(!std::fs::read_to_string("/proc/self/cgroup").unwrap().contains("peerd-test-"));
        drop(cg);
        assert!(!path.exists(), "{path:?} still exists");
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    }

    #[test]
    fn two_cgroups_with_one_name_do_not_collide() {
        let (a, b) = (Cgroup::create("same"), Cgroup::create("same"));
        assert_ne!(a.path, b.path);
        assert!(a.path.is_dir() && b.path.is_dir());
    }
}
