//! connect4/connect6 + sock_ops in the real kernel: redirect, original destination, fail open,
//! bypass, cleanup on close, the decisions' log records. Each test has its own cgroup, netns and
//! loaded programs.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bpf_tests::{require_root, Cgroup, LogCapture, Netns};
use peerd_agent::bpf::{Kernel, KernelLog, LOG_TARGET};
use peerd_common::{programs, Counter};

/// A node: a netns with an "agent" listener, "origin" listeners at the registry's addresses, and
/// the programs attached to a cgroup the probe joins.
struct Node {
    ns: Netns,
    cg: Cgroup,
    kernel: Kernel,
    listeners: Vec<(&'static str, TcpListener)>,
    registry: SocketAddr,
    agent: SocketAddr,
}

struct Accepted {
    by: &'static str,
    peer: SocketAddr,
    orig: Option<SocketAddr>,
    probe_local: SocketAddr,
    reply: String,
}

impl Node {
    fn new(v6: bool) -> Result<Self> {
        Self::with_log(v6, KernelLog::Off)
    }

    fn with_log(v6: bool, log: KernelLog) -> Result<Self> {
        require_root();
        let ns = Netns::new()?;
        let (registry, other, agent_bind) = if v6 {
            ns.ip(&["addr", "add", "2001:2::1/128", "dev", "lo", "nodad"])?;
            ("[2001:2::1]:5000", "[2001:2::1]:5001", "[::1]:0")
        } else {
            ("127.0.0.2:5000", "127.0.0.2:5001", "127.0.0.1:0")
        };
        let listeners = ns.run(|| {
            let mut v = Vec::new();
            for (label, addr) in [("agent", agent_bind), ("origin", registry), ("other", other)] {
                let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
                l.set_nonblocking(true)?;
                v.push((label, l));
            }
            Ok(v)
        })?;
        let agent = listeners[0].1.local_addr()?;
        let cg = Cgroup::create("bpf");
        let mut kernel = Kernel::load_with(log)?;
        kernel.attach_cgroup(&cg.path)?;
        Ok(Self { ns, cg, kernel, listeners, registry: registry.parse()?, agent })
    }

    fn probe(&self, dst: SocketAddr, wait_go: bool) -> Result<std::process::Child> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_connect-probe"));
        cmd.args(["--cgroup", &self.cg.path.to_string_lossy(), "--netns", &self.ns.name]);
        cmd.args(["--connect", &dst.to_string()]);
        if wait_go {
            cmd.arg("--wait-go");
        }
        Ok(cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?)
    }

    /// Connects from inside the cgroup to `dst` and reports which listener got it.
    fn connect(&self, dst: SocketAddr) -> Result<Accepted> {
        let child = self.probe(dst, false)?;
        self.serve(child)
    }

    fn serve(&self, mut child: std::process::Child) -> Result<Accepted> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (by, stream, peer) = 'found: loop {
            for (label, l) in &self.listeners {
                if let Ok((s, peer)) = l.accept() {
                    break 'found (*label, s, peer);
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!("no listener accepted; probe: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // Looked up while the client is still connected (it waits for our reply).
        let orig = self.kernel.original_destination(peer);
        stream.set_nonblocking(false)?;
        (&stream).write_all(format!("{by}\n").as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("probe failed: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
        }
        let field = |k: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
                .with_context(|| format!("probe printed no {k}: {stdout}"))
        };
        Ok(Accepted {
            by,
            peer,
            orig,
            probe_local: field("local ")?.parse()?,
            reply: field("reply ")?,
        })
    }

    /// Waits (bounded) until the kernel has forgotten every redirected connection.
    fn wait_untracked(&self) -> Result<()> {
        for _ in 0..200 {
            if self.kernel.tracked_connections() == 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("{} connections still tracked after close", self.kernel.tracked_connections())
    }
}

fn redirect_recovers_original_destination(v6: bool) -> Result<()> {
    let mut node = Node::new(v6)?;
    node.kernel.set_redirect(node.registry, node.agent)?;
    // Fail-open is tested elsewhere; a long bound keeps a loaded machine from tripping it here.
    node.kernel.set_stale_after(Duration::from_secs(60))?;
    node.kernel.heartbeat()?;

    let a = node.connect(node.registry)?;
    assert_eq!(a.by, "agent", "a registry connect() must land on the agent");
    assert_eq!(a.reply, "agent");
    assert_eq!(a.peer, a.probe_local, "the agent sees the client's own local address");
    assert_eq!(a.orig, Some(node.registry), "original destination recovered from the accepted socket");
    assert_eq!(node.kernel.counter(Counter::Redirected), 1);
    assert_eq!(node.kernel.counter(Counter::OrigDstRecorded), 1);

    // A destination not in the table is untouched, even on the same host.
    let other: SocketAddr = SocketAddr::new(node.registry.ip(), 5001);
    let b = node.connect(other)?;
    assert_eq!(b.by, "other");
    assert_eq!(b.orig, None);
    assert_eq!(node.kernel.counter(Counter::Redirected), 1);

    // The entry goes away with the connection, so the map cannot fill up.
    node.wait_untracked()?;
    assert_eq!(node.kernel.counter(Counter::OrigDstClosed), 1);
    Ok(())
}

#[test]
fn redirect_v4() -> Result<()> {
    redirect_recovers_original_destination(false)
}

#[test]
fn redirect_v6() -> Result<()> {
    redirect_recovers_original_destination(true)
}

fn fail_open(v6: bool) -> Result<()> {
    let mut node = Node::new(v6)?;
    node.kernel.set_redirect(node.registry, node.agent)?;

    // Never a heartbeat: nothing is redirected.
    assert_eq!(node.connect(node.registry)?.by, "origin");
    assert_eq!(node.kernel.counter(Counter::FailOpen), 1);

    // 1 s (the default bound): generous enough for a loaded machine to start the probe in time.
    node.kernel.set_stale_after(Duration::from_secs(1))?;
    node.kernel.heartbeat()?;
    assert_eq!(node.connect(node.registry)?.by, "agent");

    // The agent stops refreshing (it died): past the bound, connects reach the registry again.
    std::thread::sleep(Duration::from_millis(1300));
    let a = node.connect(node.registry)?;
    assert_eq!(a.by, "origin", "a stale heartbeat must fail open");
    assert_eq!(a.orig, None);
    assert_eq!(node.kernel.counter(Counter::FailOpen), 2);
    assert_eq!(node.kernel.counter(Counter::Redirected), 1);

    node.kernel.heartbeat()?;
    assert_eq!(node.connect(node.registry)?.by, "agent", "a fresh heartbeat resumes redirects");
    Ok(())
}

#[test]
fn fail_open_v4() -> Result<()> {
    fail_open(false)
}

#[test]
fn fail_open_v6() -> Result<()> {
    fail_open(true)
}

#[test]
fn agent_sockets_bypass_the_redirect() -> Result<()> {
    let mut node = Node::new(false)?;
    node.kernel.set_redirect(node.registry, node.agent)?;
    node.kernel.set_stale_after(Duration::from_secs(60))?;
    node.kernel.heartbeat()?;

    let mut child = node.probe(node.registry, true)?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let cookie: u64 = line.strip_prefix("cookie ").context("cookie line")?.trim().parse()?;
    node.kernel.bypass_cookie(cookie)?;
    child.stdin.take().context("stdin")?.write_all(b"go\n")?;
    // Put stdout back for serve() to read the rest.
    let rest = node.serve_partial(child, stdout)?;
    assert_eq!(rest, "origin", "the agent's own socket must reach the real registry");
    assert_eq!(node.kernel.counter(Counter::Bypassed), 1);
    assert_eq!(node.kernel.counter(Counter::Redirected), 0);

    node.kernel.unbypass_cookie(cookie);
    assert_eq!(node.connect(node.registry)?.by, "agent", "other sockets are still redirected");
    Ok(())
}

impl Node {
    /// Accepts one connection for a probe whose stdout was partly consumed; returns the listener.
    fn serve_partial(
        &self,
        mut child: std::process::Child,
        stdout: BufReader<std::process::ChildStdout>,
    ) -> Result<&'static str> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for (label, l) in &self.listeners {
                if let Ok((s, _)) = l.accept() {
                    s.set_nonblocking(false)?;
                    (&s).write_all(format!("{label}\n").as_bytes())?;
                    let rest: Vec<String> = stdout.lines().collect::<Result<_, _>>()?;
                    assert!(child.wait()?.success(), "probe failed: {rest:?}");
                    assert!(rest.iter().any(|l| l == &format!("reply {label}")), "{rest:?}");
                    return Ok(label);
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("no listener accepted the bypassed connection");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Only connect() calls in the agent's network namespace are redirected: elsewhere 127.0.0.1 is
/// another namespace's loopback (a pod with its own network would be cut off from the registry).
#[test]
fn other_network_namespaces_are_not_redirected() -> Result<()> {
    let mut node = Node::new(false)?;
    node.kernel.set_redirect(node.registry, node.agent)?;
    node.kernel.set_stale_after(Duration::from_secs(60))?;
    node.kernel.heartbeat()?;
    // The agent "lives" in the test's own namespace: the probe's connect is left alone.
    let here = TcpListener::bind("127.0.0.1:0")?;
    node.kernel.set_netns_of(&here)?;
    node.kernel.heartbeat()?;
    assert_eq!(node.connect(node.registry)?.by, "origin");
    assert_eq!(node.kernel.counter(Counter::OtherNetns), 1);
    assert_eq!(node.kernel.counter(Counter::Redirected), 0);
    // The agent in the probe's namespace: redirected as usual.
    let there = node.ns.run(|| Ok(TcpListener::bind("127.0.0.1:0")?))?;
    node.kernel.set_netns_of(&there)?;
    node.kernel.heartbeat()?;
    assert_eq!(node.connect(node.registry)?.by, "agent");
    assert_eq!(node.kernel.counter(Counter::Redirected), 1);
    Ok(())
}

/// With the agent's filter at debug for the kernel target, each decision shows in its log.
#[test]
fn decisions_are_logged_when_enabled() -> Result<()> {
    let log = LogCapture::default();
    {
        // The switch is the agent's own log filter: info alone keeps the kernel quiet.
        let _info = log.install("info");
        assert_eq!(KernelLog::from_tracing(), KernelLog::Off);
    }
    let _debug = log.install(&format!("info,{LOG_TARGET}=debug"));
    assert_eq!(KernelLog::from_tracing(), KernelLog::Debug);
    let mut node = Node::with_log(false, KernelLog::from_tracing())?;
    node.kernel.set_redirect(node.registry, node.agent)?;

    // No heartbeat yet: fail open.
    assert_eq!(node.connect(node.registry)?.by, "origin");
    node.kernel.set_stale_after(Duration::from_secs(60))?;
    node.kernel.heartbeat()?;
    let a = node.connect(node.registry)?;
    assert_eq!(a.by, "agent");
    // Not in the table: no decision, no record.
    assert_eq!(node.connect(SocketAddr::new(node.registry.ip(), 5001))?.by, "other");

    let text = log.wait_for(&format!("redirected {} pid ", node.registry), 1)?;
    let line = text.lines().find(|l| l.contains("redirected ")).context("redirect line")?;
    assert!(line.contains(&format!(" to port {}", node.agent.port())), "{line}");
    assert!(line.contains("DEBUG") && line.contains(LOG_TARGET) && line.contains("program=\"peerd::redirect\""), "{line}");
    assert_eq!(text.lines().filter(|l| l.contains(&format!("fail_open {} pid ", node.registry))).count(), 1, "{text}");
    // Debug, not trace: sock_ops' per-connection bookkeeping is not logged.
    assert!(!text.contains("orig_dst_recorded"), "{text}");
    assert!(!text.contains(":5001"), "{text}");
    assert_eq!(node.kernel.counter(Counter::Redirected), 1);
    Ok(())
}

/// Off (the default): the programs write no record at all, and the verifier has removed the
/// log calls (fewer verified instructions than the same object loaded with logging on).
#[test]
fn logging_off_writes_no_records() -> Result<()> {
    let mut node = Node::with_log(false, KernelLog::Off)?;
    // A reader of our own on the programs' ring buffer sees whatever they wrote.
    let id = node.kernel.program_info(programs::CONNECT4)?.id();
    let seen = Records::default();
    let mut reader = aya_log::EbpfLogger::init_from_id_with_logger(id, seen.clone())?;
    node.kernel.set_redirect(node.registry, node.agent)?;
    assert_eq!(node.connect(node.registry)?.by, "origin");
    node.kernel.set_stale_after(Duration::from_secs(60))?;
    node.kernel.heartbeat()?;
    assert_eq!(node.connect(node.registry)?.by, "agent");
    node.wait_untracked()?;
    reader.flush();
    assert_eq!(node.kernel.counter(Counter::Redirected), 1);
    assert_eq!(node.kernel.counter(Counter::FailOpen), 1);
    assert_eq!(seen.0.lock().unwrap().as_slice(), &[] as &[String], "no records with logging off");

    let on = Kernel::load_with(KernelLog::Trace)?;
    for name in [programs::CONNECT4, programs::CONNECT6, programs::SOCK_OPS, programs::XDP_GUARD] {
        let insns = |k: &Kernel| -> Result<u32> {
            k.program_info(name)?.verified_instruction_count().context("verified_insns (kernel >= 5.16)")
        };
        let (off, on) = (insns(&node.kernel)?, insns(&on)?);
        eprintln!("{name}: {off} verified instructions with logging off, {on} on");
        assert!(off * 2 < on, "{name}: the verifier kept the log calls with logging off ({off} vs {on} instructions)");
    }
    Ok(())
}

#[derive(Clone, Default)]
struct Records(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Records {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        self.0.lock().unwrap().push(r.args().to_string());
    }
    fn flush(&self) {}
}
