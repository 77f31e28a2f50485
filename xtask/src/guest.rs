//! The benchmark machine's memory: a VM's free page reporting would otherwise make every page
//! cache write fault memory in from the host (`GuestMemory`).

const PAGE_REPORTING: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

/// Memory the kernel keeps for this benchmark's writes. A VM with free page reporting (virtio
/// balloon) hands 2 MiB blocks the guest frees back to its host; the next write into such a page
/// faults it in from the host, which on the machine the results were taken on costs ~2 s per GiB
/// against ~0.25 s for memory the guest kept (`dd` of 3 GiB: 5.9 s vs 0.86 s). Every method writes
/// each node's copy of the blob into the page cache, so at N=16 that tax alone would be ~8 of the
/// run's ~21 core-seconds: the VM's, not any method's. While this guard lives reporting is off
/// (the order above the largest buddy order: the kernel reports nothing) and `bytes` of memory
/// were touched once and freed, so page cache writes reuse memory the guest owns, as on a
/// machine without a balloon. Dropped, it restores the setting. Absent the knob, it does nothing.
pub struct GuestMemory {
    saved: Option<String>,
}

impl GuestMemory {
    pub fn keep(bytes: u64) -> Self {
        let Ok(saved) = std::fs::read_to_string(PAGE_REPORTING) else {
            return Self { saved: None };
        };
        // NR_PAGE_ORDERS on x86-64 (MAX_PAGE_ORDER 10 + 1): no free block is that large.
        if std::fs::write(PAGE_REPORTING, "11").is_err() {
            eprintln!("bench: could not turn off free page reporting; writes may fault memory in from the host");
            return Self { saved: None };
        }
        // Never more than half of what the machine has free.
        let avail = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemAvailable:").and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())))
            .map_or(0, |kb| kb * 1024);
        let bytes = bytes.min(avail / 2);
        let t = std::time::Instant::now();
        const CHUNK: u64 = 256 << 20;
        // Written (not just allocated: untouched pages are never faulted in), all held at once
        // (else one chunk's pages would be reused for the next), then freed together.
        let held: Vec<Vec<u8>> = (0..bytes.div_ceil(CHUNK)).map(|_| vec![1u8; CHUNK as usize]).collect();
        drop(held);
        eprintln!("bench: free page reporting off, {:.1} GiB of memory warmed in {:.1} s", bytes as f64 / (1u64 << 30) as f64, t.elapsed().as_secs_f64());
        Self { saved: Some(saved.trim().to_string()) }
    }

    /// For the results' description.
    pub fn kept(&self) -> bool {
        self.saved.is_some()
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        if let Some(s) = &self.saved {
            let _ = std::fs::write(PAGE_REPORTING, s);
        }
    }
}
