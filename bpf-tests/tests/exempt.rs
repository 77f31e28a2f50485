//! The agent's process exemption: after `Kernel::exempt_self`, every connection the agent
//! process makes reaches the real registry, while other processes in the cgroup are still
//! redirected. Its own test binary: the whole process has to join the cgroup (cgroup v2 moves
//! processes, not threads), which must not disturb the other tests.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bpf_tests::{require_root, Netns, Cgroup};
use peerd_agent::bpf::Kernel;
use peerd_common::Counter;

/// Moves this process into a cgroup and back to where it was on drop.
struct Joined(String);

impl Joined {
    fn join(cg: &Cgroup) -> Result<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).context("cgroup v2 path")?.to_string();
        std::fs::write(cg.path.join("cgroup.procs"), std::process::id().to_string())?;
        Ok(Self(rel))
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        if let Ok(root) = peerd_agent::bpf::cgroup2_mount() {
            let back = root.join(self.0.trim_start_matches('/'));
            let _ = std::fs::write(back.join("cgroup.procs"), std::process::id().to_string());
        }
    }
}

fn accept_one(ls: &[(&'static str, &TcpListener)]) -> Result<&'static str> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for (label, l) in ls {
            if let Ok((mut s, _)) = l.accept() {
                s.set_nonblocking(false)?;
                s.write_all(label.as_bytes())?;
                return Ok(label);
            }
        }
        if Instant::now() > deadline {
            bail!("no listener accepted");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn exempt_process_reaches_the_registry_others_are_redirected() -> Result<()> {
    require_root();
    let ns = Netns::new()?;
    let cg = Cgroup::create("bpf");
    let mut kernel = Kernel::load()?;
    kernel.attach_cgroup(&cg.path)?;
    kernel.set_stale_after(Duration::from_secs(60))?;
    kernel.heartbeat()?;

    let joined = Joined::join(&cg)?;
    let result = ns.run(|| {
        let agent = TcpListener::bind("127.0.0.1:0")?;
        let origin = TcpListener::bind("127.0.0.2:5000")?;
        agent.set_nonblocking(true)?;
        origin.set_nonblocking(true)?;
        let (agent_addr, registry) = (agent.local_addr()?, origin.local_addr()?);
        kernel.set_redirect(registry, agent_addr)?;

        // Before registration this process is redirected like any other.
        let mut c = TcpStream::connect(registry)?;
        assert_eq!(accept_one(&[("agent", &agent), ("origin", &origin)])?, "agent");
        let mut reply = String::new();
        c.read_to_string(&mut reply)?;
        assert_eq!(reply, "agent");

        let pid = kernel.exempt_self(agent_addr)?.context("the program should have seen the registration")?;
        // The registration connection itself landed on the agent listener; drain it.
        assert_eq!(accept_one(&[("agent", &agent)])?, "agent");
        // The kernel names the process by its root-namespace PID, which is ours here.
        assert_eq!(pid, std::process::id());

        // Now, from another thread of the same process too: the real registry.
        let h = std::thread::spawn(move || TcpStream::connect(registry));
        let mut c = h.join().map_err(|_| anyhow::anyhow!("thread"))??;
        assert_eq!(accept_one(&[("agent", &agent), ("origin", &origin)])?, "origin");
        reply.clear();
        c.read_to_string(&mut reply)?;
        assert_eq!(reply, "origin");
        assert_eq!(kernel.counter(Counter::Exempt), 1);

        // A different process in the same cgroup is still redirected.
        let out = Command::new(env!("CARGO_BIN_EXE_connect-probe"))
            .args(["--cgroup", &cg.path.to_string_lossy(), "--netns", &ns.name, "--connect", &registry.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        assert_eq!(accept_one(&[("agent", &agent), ("origin", &origin)])?, "agent");
        let out = out.wait_with_output()?;
        assert!(out.status.success(), "probe: {}", String::from_utf8_lossy(&out.stdout));
        Ok::<_, anyhow::Error>(())
    });
    drop(joined);
    result?;

    // Outside the attached cgroup, registration is not needed and says so.
    let mut kernel2 = Kernel::load()?;
    let other = Cgroup::create("bpf");
    kernel2.attach_cgroup(&other.path)?;
    let none = ns.run(|| {
        let l = TcpListener::bind("127.0.0.1:0")?;
        Ok(kernel2.exempt_self(l.local_addr()?)?)
    })?;
    assert_eq!(none, None);
    Ok(())
}
