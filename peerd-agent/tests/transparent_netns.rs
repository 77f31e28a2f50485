//! Transparent mode end to end, with real parts: nodes are network namespaces with their own
//! cgroup, containerd and `ctr` run inside both and pull with NO hosts.toml and no mirror
//! setting; the agents (in the same cgroups, so their own upstream fetches must be exempt) are
//! started with `--transparent` and redirect the registry's address to themselves.
//!
//! - plain HTTP: node 0's pull is served by its agent (the registry sees the agent, not
//!   containerd); node 1's layers come from node 0 over QUIC (the registry sees no blob GET);
//!   a killed agent and a hung (SIGSTOPped) agent both leave pulls working, straight to the
//!   registry, the hung one after the fail-open bound;
//! - HTTPS (a test CA that ctr trusts through SSL_CERT_FILE): without `--tls-intercept` the bytes
//!   pass through untouched (the registry sees containerd); with it, the agent serves the pull;
//! - the redirect table follows the registry name's DNS answer (a hosts file, re-read).
mod support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use support::*;
use xtask::{
    cgroup::Cgroup,
    netcluster::{Deployment, NetCluster, Options, Spec, QUEUE_MS},
};

fn cluster(tag: &str, nodes: usize) -> NetCluster {
    require_root();
    let prefix = format!("tp{}{tag}", std::process::id() % 10000);
    NetCluster::up(Spec { nodes, rate_mbit: 1000, registry_rate_mbit: 1000, delay_ms: 0, queue_ms: QUEUE_MS, small_first: false, prefix })
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "transparent mode tests need root (eBPF, namespaces, cgroups)");
}

/// The transparent-mode flags for each node: its own cgroup.
fn per_node(cgroups: &[Cgroup]) -> Vec<Vec<String>> {
    cgroups
        .iter()
        .map(|cg| vec!["--cgroup-root".into(), cg.root.display().to_string(), "--cgroup".into(), cg.name()])
        .collect()
}

/// Blob GETs the registry logged since `before`, as (client user agent) per line.
fn blob_get_agents(d: &Deployment, before: usize) -> Vec<String> {
    d.registry_blob_gets()[before..]
        .iter()
        .map(|l| l.rsplit('"').nth(1).unwrap_or("").to_string())
        .collect()
}

/// One counter from the agent's /metrics, read inside the node's namespace (0 if absent).
fn metric(ns: &str, name: &str) -> u64 {
    let out = Command::new("ip").args(["netns", "exec", ns, "curl", "-sS", "--max-time", "5", "http://127.0.0.1:30000/metrics"]).output().unwrap();
    metric_value(&String::from_utf8_lossy(&out.stdout), name).unwrap_or(0)
}

/// Waits (bounded) until the agent's redirect table holds the registry.
fn wait_redirecting(ns: &str) {
    for _ in 0..100 {
        if metric(ns, "peerd_redirected_endpoints") > 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("agent in {ns} never started redirecting");
}

fn check_content(ctd: &Containerd, image: &Image) {
    for b in &image.blobs {
        assert_eq!(sha256_hex(&ctd.content(b)), b[7..], "containerd holds wrong bytes for {b}");
    }
}

#[test]
fn plain_http_pulls_are_served_shared_and_fail_open() {
    require("curl");
    let dir = tempfile::tempdir().unwrap();
    let c = cluster("a", 2);
    let cgroups: Vec<Cgroup> = (0..2).map(|i| Cgroup::create(&format!("tpa{i}"))).collect();
    let opts = Options {
        extra_per_node: per_node(&cgroups),
        agent_cgroups: cgroups.iter().collect(),
        ..Options::default()
    };
    let mut d = Deployment::start_opts(&c, peerd(), dir.path(), &["--transparent"], opts);
    let ctds: Vec<Containerd> = (0..2)
        .map(|i| {
            let cd = dir.path().join(format!("ctd{i}"));
            std::fs::create_dir_all(&cd).unwrap();
            Containerd::start_in(&cd, Some(&c.nodes[i].ns), Some(&cgroups[i]))
        })
        .collect();
    let image = Image::build(dir.path(), &[("a.bin", 3 << 20), ("b.bin", 5 << 20)]);
    image.push_to(Some(&c.registry.ns), &d.registry_host, "app");
    let reference = format!("{}/app:{}", d.registry_host, image.tag);
    for n in &c.nodes {
        wait_redirecting(&n.ns);
    }

    // Node 0: the agent serves the pull and fetches upstream itself (exempt from the redirect).
    let before = d.registry_blob_gets().len();
    ctds[0].pull_plain(&reference, true).unwrap_or_else(|e| panic!("node 0 pull: {e}\nagent: {}", d.agents[0].as_ref().unwrap().log_text()));
    check_content(&ctds[0], &image);
    let agents = blob_get_agents(&d, before);
    assert!(!agents.is_empty() && agents.iter().all(|a| a.starts_with("peerd/")), "registry should see only the agent: {agents:?}");
    assert!(metric(&c.nodes[0].ns, "peerd_redirected_connections_total{outcome=\"http\"}") > 0);
    assert!(metric(&c.nodes[0].ns, "peerd_kernel_events_total{reason=\"exempt\"}") > 0, "the agent's own upstream connects were exempt");

    // Each blob was fetched once for the cluster, by its rendezvous owner (node 0 or node 1).
    let gets = d.registry_blob_gets()[before..].to_vec();
    for b in &image.blobs {
        assert_eq!(gets.iter().filter(|l| l.contains(b.as_str())).count(), 1, "{b} once for the cluster: {gets:?}");
    }

    // Node 1: nothing from the registry. Each blob crossed between the nodes over QUIC once:
    // to node 0 when node 1 owned it, to node 1 now when node 0 did.
    let before = d.registry_blob_gets().len();
    ctds[1].pull_plain(&reference, true).unwrap_or_else(|e| panic!("node 1 pull: {e}"));
    check_content(&ctds[1], &image);
    assert_eq!(blob_get_agents(&d, before), Vec::<String>::new(), "node 1's layers should come from the cluster");
    let blob_bytes: u64 = image.blobs.iter().map(|b| image.blob_bytes(b).len() as u64).sum();
    let crossed: u64 = c.nodes.iter().map(|n| metric(&n.ns, "peerd_peer_received_bytes_total")).sum();
    let from_cluster: u64 = c.nodes.iter().map(|n| metric(&n.ns, "peerd_blob_fetch_seconds_count{source=\"cluster\"}")).sum();
    assert!(from_cluster > 0, "fetch latency histogram recorded no cluster fetch");
    // The XDP guard sits on each node's interface and let the other node's QUIC packets through.
    for n in &c.nodes {
        assert!(metric(&n.ns, "peerd_kernel_events_total{reason=\"xdp_passed\"}") > 0, "no packets counted by the guard in {}", n.ns);
        assert_eq!(metric(&n.ns, "peerd_kernel_events_total{reason=\"xdp_dropped\"}"), 0);
    }
    assert!(
        crossed >= blob_bytes,
        "{crossed} bytes crossed between the nodes, blobs total {blob_bytes}; registry: {gets:?}\nagent 1: {}",
        d.agents[1].as_ref().unwrap().log_text()
    );

    // Killed agent: its programs go with it; the pull goes straight to the registry.
    d.kill_agent(1);
    ctds[1].forget(&reference);
    let before = d.registry_blob_gets().len();
    let t = Instant::now();
    ctds[1].pull_plain(&reference, true).unwrap_or_else(|e| panic!("pull with the agent dead: {e}"));
    let dead = t.elapsed();
    check_content(&ctds[1], &image);
    let agents = blob_get_agents(&d, before);
    assert!(agents.len() >= image.blobs.len() && agents.iter().all(|a| a.starts_with("containerd/")), "direct pull expected: {agents:?}");

    // Hung agent: redirects stop within the fail-open bound (1 s), then pulls go direct.
    d.start_agent(1);
    wait_redirecting(&c.nodes[1].ns);
    let pid = d.agents[1].as_ref().unwrap().pid() as i32;
    // `ip netns exec` execs the agent, so the child's PID is the agent itself.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "peerd", "expected the agent at pid {pid}");
    // SAFETY: signals to a process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(1300));
    ctds[1].forget(&reference);
    let before = d.registry_blob_gets().len();
    let r = ctds[1].pull_plain(&reference, true);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    r.unwrap_or_else(|e| panic!("pull with the agent hung: {e}"));
    check_content(&ctds[1], &image);
    let agents = blob_get_agents(&d, before);
    assert!(agents.iter().all(|a| a.starts_with("containerd/")), "direct pull expected while hung: {agents:?}");
    assert!(metric(&c.nodes[1].ns, "peerd_kernel_events_total{reason=\"fail_open\"}") > 0, "the kernel counted the fail-open");
    // A clean stop (SIGTERM) detaches the programs and says so.
    let st = d.stop_agent(1, Duration::from_secs(10)).expect("the agent should exit on SIGTERM");
    assert!(st.success(), "agent exit: {st}");
    let log = std::fs::read_to_string(dir.path().join("agent1.1.log")).unwrap_or_default();
    assert!(log.contains("programs detached"), "no detach in the log: {log}");
    eprintln!("pull with the agent killed: {dead:?}");
}

#[test]
fn https_passes_through_untouched_and_is_served_with_tls_intercept() {
    require("curl");
    let dir = tempfile::tempdir().unwrap();
    let test_ca = TestCa::create(&dir.path().join("test-ca"));
    let ca_dir = dir.path().join("intercept-ca");
    let out = Command::new(peerd()).args(["ca", "create"]).arg(&ca_dir).output().unwrap();
    assert!(out.status.success(), "peerd ca create: {}", String::from_utf8_lossy(&out.stderr));
    // The node trusts the registry's CA, and (for the intercept half) the cluster's.
    let bundle = dir.path().join("bundle.pem");
    let mut pem = std::fs::read(&test_ca.ca_pem_path).unwrap();
    pem.extend(std::fs::read(ca_dir.join("ca.crt")).unwrap());
    std::fs::write(&bundle, pem).unwrap();

    for (k, intercept) in [false, true].into_iter().enumerate() {
        let c = cluster(&format!("b{k}"), 1);
        let cg = Cgroup::create(&format!("tpb{k}"));
        let mut extra = vec!["--transparent".to_string()];
        if intercept {
            extra.extend(["--tls-intercept".into(), "--tls-ca-dir".into(), ca_dir.display().to_string()]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let sub = dir.path().join(format!("run{k}"));
        std::fs::create_dir_all(&sub).unwrap();
        let opts = Options {
            registry_tls: Some(&test_ca),
            registry_name: Some("registry.test".into()),
            extra_per_node: per_node(std::slice::from_ref(&cg)),
            agent_cgroups: vec![&cg],
            ..Options::default()
        };
        let d = Deployment::start_opts(&c, peerd(), &sub, &extra, opts);
        let ctd = Containerd::start_in(&sub, Some(&c.nodes[0].ns), Some(&cg));
        let image = Image::build(&sub, &[("s.bin", 2 << 20)]);
        image.push_to(Some(&c.registry.ns), &d.registry_host, "app");
        wait_redirecting(&c.nodes[0].ns);
        let reference = format!("{}/app:{}", d.registry_host, image.tag);
        let before = d.registry_blob_gets().len();
        let env = [("SSL_CERT_FILE", bundle.to_str().unwrap())];
        ctd.pull_with(&reference, false, &env).unwrap_or_else(|e| panic!("HTTPS pull (intercept {intercept}): {e}\nagent: {}", d.agents[0].as_ref().unwrap().log_text()));
        check_content(&ctd, &image);
        let agents = blob_get_agents(&d, before);
        let ns = &c.nodes[0].ns;
        if intercept {
            assert!(!agents.is_empty() && agents.iter().all(|a| a.starts_with("peerd/")), "the agent should serve: {agents:?}");
            assert!(metric(ns, "peerd_redirected_connections_total{outcome=\"tls_intercepted\"}") > 0);
            assert_eq!(metric(ns, "peerd_redirected_connections_total{outcome=\"tls_passthrough\"}"), 0);
            // Again: cache hits, copied from the store through the TLS stream.
            ctd.forget(&reference);
            let before = d.registry_blob_gets().len();
            ctd.pull_with(&reference, false, &env).unwrap_or_else(|e| panic!("HTTPS pull from the cache: {e}"));
            check_content(&ctd, &image);
            assert_eq!(blob_get_agents(&d, before), Vec::<String>::new(), "the second pull should be served from the cache");
            assert!(metric(ns, "peerd_cache_hits_total") >= image.blobs.len() as u64);
        } else {
            assert!(!agents.is_empty() && agents.iter().all(|a| a.starts_with("containerd/")), "untouched pass-through expected: {agents:?}");
            assert!(metric(ns, "peerd_redirected_connections_total{outcome=\"tls_passthrough\"}") > 0);
            assert_eq!(metric(ns, "peerd_cache_misses_total"), 0, "the agent must not have seen the requests");
        }
    }
}

/// The redirect table follows DNS: when the registry's name stops resolving to its address, that
/// address is no longer redirected (pulls by address go straight to the registry), and when it
/// resolves there again, it is redirected again.
#[test]
fn the_redirect_table_follows_dns() {
    require("curl");
    let dir = tempfile::tempdir().unwrap();
    let c = cluster("c", 1);
    let cg = Cgroup::create("tpc0");
    let opts = Options {
        registry_name: Some("registry.test".into()),
        extra_per_node: per_node(std::slice::from_ref(&cg)),
        agent_cgroups: vec![&cg],
        ..Options::default()
    };
    let d = Deployment::start_opts(&c, peerd(), dir.path(), &["--transparent", "--dns-refresh", "1"], opts);
    let ctd = Containerd::start_in(dir.path(), Some(&c.nodes[0].ns), Some(&cg));
    let image = Image::build(dir.path(), &[("s.bin", 1 << 20)]);
    image.push_to(Some(&c.registry.ns), &d.registry_host, "app");
    let ns = &c.nodes[0].ns;
    wait_redirecting(ns);
    // Pulled by address: redirected while the name resolves to it.
    let by_addr = format!("{}/app:{}", d.registry_addr, image.tag);
    let pull_agents = || {
        ctd.forget(&by_addr);
        let before = d.registry_blob_gets().len();
        ctd.pull_plain(&by_addr, true).unwrap_or_else(|e| panic!("pull: {e}"));
        check_content(&ctd, &image);
        blob_get_agents(&d, before)
    };
    let first = pull_agents();
    assert!(!first.is_empty() && first.iter().all(|a| a.starts_with("peerd/")), "redirected at first: {first:?}");

    // The name moves elsewhere (the file `ip netns exec` mounted over /etc/hosts, rewritten in place).
    let hosts = std::path::PathBuf::from("/etc/netns").join(ns).join("hosts");
    let original = std::fs::read_to_string(&hosts).unwrap();
    std::fs::write(&hosts, original.replace(&c.registry.ip.to_string(), "198.18.254.254")).unwrap();
    let target = format!("peerd_redirect_target{{endpoint=\"{}\"}}", d.registry_addr);
    let wait_target = |present: bool| {
        for _ in 0..100 {
            if (metric(ns, &target) == 1) == present {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the agent did not follow the DNS change (want {target} present: {present})");
    };
    wait_target(false);
    let direct = pull_agents();
    assert!(!direct.is_empty() && direct.iter().all(|a| a.starts_with("containerd/")), "direct once the name moved: {direct:?}");

    // And back.
    std::fs::write(&hosts, &original).unwrap();
    wait_target(true);
    let http = "peerd_redirected_connections_total{outcome=\"http\"}";
    let served_before = metric(ns, http);
    let again = pull_agents();
    // The agent still holds the blobs from the first pull: no registry GET at all this time.
    assert!(again.iter().all(|a| a.starts_with("peerd/")), "redirected again: {again:?}");
    assert!(metric(ns, http) > served_before, "the pull reached the agent again");
}
