//! The harness for transparent-mode end-to-end tests, checked on its own (no peerd binary):
//! a node's namespace and cgroup with containerd in both, pulls by ctr with no hosts.toml over
//! plain HTTP and over HTTPS trusting a test CA, and agents restarted the same way they were
//! started (a stand-in agent: this test binary itself, see `fake_agent`).
//!
//! Needs root (namespaces, cgroups) and docker-registry, containerd, ctr, skopeo, umoci.
//! Everything is removed by Drop guards, also when an assertion fails.
use std::{
    net::IpAddr,
    path::Path,
    time::Duration,
};

use xtask::{
    cgroup::Cgroup,
    components::{command_in, run, Containerd, Image, TestCa},
    netcluster::{Deployment, NetCluster, Options, Spec, QUEUE_MS},
};

/// A directory removed on drop.
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("peerd-harness-{tag}-")).tempdir().unwrap()
}

fn cluster(tag: &str, nodes: usize) -> NetCluster {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the harness tests need root (namespaces, cgroups)");
    let prefix = format!("hx{}{tag}", std::process::id() % 10000);
    NetCluster::up(Spec { nodes, rate_mbit: 1000, registry_rate_mbit: 1000, delay_ms: 0, queue_ms: QUEUE_MS, small_first: false, prefix })
}

/// No agents in these tests: the registry alone (the path is never run).
fn registry_only<'a>(tls: Option<&'a TestCa>, name: Option<&str>) -> Options<'a> {
    Options { start_agents: false, registry_tls: tls, registry_name: name.map(str::to_owned), ..Options::default() }
}

/// Registry access-log lines of blob GETs since `before`, each checked to come from `from`.
fn blob_gets_from(d: &Deployment, before: usize, from: IpAddr, image: &Image) {
    let gets = d.registry_blob_gets()[before..].to_vec();
    for b in &image.blobs {
        let n = gets.iter().filter(|l| l.contains(b.as_str()) && l.starts_with(&format!("{from} "))).count();
        assert_eq!(n, 1, "{b}: {n} GETs from {from}: {gets:?}");
    }
}

#[test]
fn plain_http_pull_from_inside_a_node_namespace_and_cgroup_without_hosts_toml() {
    let dir = temp_dir("plain");
    let c = cluster("a", 1);
    let node = &c.nodes[0];
    let cg = Cgroup::create("n0");
    let d = Deployment::start_opts(&c, Path::new("/nonexistent/peerd"), dir.path(), &[], registry_only(None, None));
    assert_eq!(d.registry_url, format!("http://{}:5000", c.registry.ip));
    let ctd = Containerd::start_in(dir.path(), Some(&node.ns), Some(&cg));
    assert!(cg.pids().contains(&ctd.proc.pid()), "containerd {} not in {:?}: {:?}", ctd.proc.pid(), cg.path, cg.pids());

    // Commands made like ctr's run in the node's namespace and cgroup (and see the cgroup path).
    let procs = cg.procs_path();
    let inside = run(command_in("sh", Some(&node.ns), Some(&procs)).args([
        "-c",
        &format!("cat /proc/self/cgroup; ip -4 -o addr show dev eth0; test -d {} && echo path-visible", cg.path.display()),
    ]));
    assert!(inside.contains(&format!("0::{}\n", cg.name())), "{inside}");
    assert!(inside.contains(&format!("inet {}/", node.ip)), "{inside}");
    assert!(inside.contains("path-visible"), "{inside}");

    let image = Image::build(dir.path(), &[("a.bin", 200_000)]);
    image.push_to(Some(&node.ns), &d.registry_host, "app");
    let before = d.registry_blob_gets().len();
    let reference = format!("{}/app:v1", d.registry_host);
    // No --plain-http: ctr 1.6 speaks HTTPS only and does not fall back.
    let err = ctd.pull_plain(&reference, false).expect_err("HTTPS to a plain registry");
    assert!(err.contains("HTTP response to HTTPS client"), "{err}");
    ctd.pull_plain(&reference, true).expect("plain HTTP pull");
    blob_gets_from(&d, before, node.ip.into(), &image);
    assert!(!ctd.hosts.exists(), "a hosts.toml directory was written");
}

#[test]
fn https_pull_trusting_the_test_ca_through_ssl_cert_file() {
    let dir = temp_dir("tls");
    let c = cluster("b", 1);
    let node = &c.nodes[0];
    let cg = Cgroup::create("n0");
    let ca = TestCa::create(&dir.path().join("ca"));
    let d = Deployment::start_opts(&c, Path::new("/nonexistent/peerd"), dir.path(), &[], registry_only(Some(&ca), Some("registry.test")));
    assert_eq!(d.registry_url, "https://registry.test:5000");
    let ctd = Containerd::start_in(dir.path(), Some(&node.ns), Some(&cg));
    let image = Image::build(dir.path(), &[("a.bin", 200_000)]);
    image.push_to(Some(&node.ns), &d.registry_host, "app");
    let ca_pem = ca.ca_pem_path.to_str().unwrap();

    // By name (resolved through /etc/netns/<ns>/hosts): untrusted without the CA, fine with it.
    let by_name = format!("{}/app:v1", d.registry_host);
    let err = ctd.pull_plain(&by_name, false).expect_err("pull without trusting the CA");
    assert!(err.contains("x509") || err.contains("certificate"), "{err}");
    let before = d.registry_blob_gets().len();
    ctd.pull_with(&by_name, false, &[("SSL_CERT_FILE", ca_pem)]).expect("HTTPS pull by name");
    blob_gets_from(&d, before, node.ip.into(), &image);

    // By IP (what transparent mode redirects on): the certificate names the IP too.
    ctd.forget(&by_name);
    let before = d.registry_blob_gets().len();
    ctd.pull_with(&format!("{}:5000/app:v1", c.registry.ip), false, &[("SSL_CERT_FILE", ca_pem)]).expect("HTTPS pull by IP");
    blob_gets_from(&d, before, node.ip.into(), &image);
}

/// The stand-in agent: only when started by the script of the restart test (with
/// FAKE_AGENT_LISTEN set) does it listen there, until killed; otherwise it passes at once.
#[test]
fn fake_agent() {
    let Ok(addr) = std::env::var("FAKE_AGENT_LISTEN") else { return };
    let _listener = std::net::TcpListener::bind(&addr).unwrap_or_else(|e| panic!("fake agent: bind {addr}: {e}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[test]
fn agents_run_in_their_cgroups_and_restart_with_the_same_command_line() {
    let dir = temp_dir("agents");
    let c = cluster("c", 2);
    let cgs = [Cgroup::create("n0"), Cgroup::create("n1")];
    // `peerd` here is a script: it records its arguments (and whether the cgroup they name
    // exists in its mount namespace), then becomes this test binary's `fake_agent`.
    let script = dir.path().join("fake-peerd");
    let args_log = dir.path().join("args.log");
    std::fs::write(
        &script,
        r#"#!/bin/sh
printf '%s\n' "$*" >> "$FAKE_AGENT_ARGS"
while [ $# -gt 0 ]; do
  case "$1" in --cgroup-root) root="$2";; --cgroup) name="$2";; esac
  shift
done
[ -d "$root$name" ] && echo "visible $root$name" >> "$FAKE_AGENT_ARGS"
exec "$FAKE_AGENT_EXE" fake_agent --exact --nocapture --test-threads=1 -q
"#,
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let env = |k: &str, v: &Path| (k.to_string(), v.display().to_string());
    let opts = Options {
        extra_per_node: cgs.iter().map(|cg| vec!["--cgroup-root".into(), cg.root.display().to_string(), "--cgroup".into(), cg.name()]).collect(),
        agent_cgroups: cgs.iter().collect(),
        agent_env: vec![
            ("FAKE_AGENT_LISTEN".into(), "0.0.0.0:30000".into()),
            env("FAKE_AGENT_ARGS", &args_log),
            env("FAKE_AGENT_EXE", &std::env::current_exe().unwrap()),
        ],
        ..Options::default()
    };
    let mut d = Deployment::start_opts(&c, &script, dir.path(), &["--trust-cluster"], opts);
    for (i, cg) in cgs.iter().enumerate() {
        let pid = d.agents[i].as_ref().unwrap().pid();
        assert_eq!(cg.pids(), vec![pid], "agent {i} (pid {pid}) not alone in {:?}", cg.path);
        let args = d.agent_args(i).join(" ");
        assert!(args.contains("--trust-cluster") && args.ends_with(&format!("--cgroup {}", cg.name())), "{args}");
        assert!(args.contains(&format!("--registry {h}={u}", h = d.registry_host, u = d.registry_url)), "{args}");
    }
    let log = std::fs::read_to_string(&args_log).unwrap();
    for cg in &cgs {
        assert!(log.contains(&format!("visible {}", cg.path.display())), "the agent cannot see its cgroup: {log}");
    }

    d.kill_agent(0);
    assert!(d.agents[0].is_none());
    assert!(cgs[0].pids().is_empty(), "{:?}", cgs[0].pids());
    d.start_agent(0);
    assert_eq!(cgs[0].pids(), vec![d.agents[0].as_ref().unwrap().pid()]);
    let lines: Vec<String> = std::fs::read_to_string(&args_log).unwrap().lines().filter(|l| !l.starts_with("visible")).map(str::to_owned).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[2], d.agent_args(0).join(" "), "restarted differently");
    assert!(dir.path().join("agent0.1.log").exists(), "the restart's log");

    let st = d.stop_agent(1, Duration::from_secs(5)).expect("the agent ends on SIGTERM");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(libc::SIGTERM), "{st}");
    assert!(cgs[1].pids().is_empty());
}
