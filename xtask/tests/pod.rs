//! The chart's DaemonSet run as the kubelet would run it (xtask's `pod` harness): the agent's
//! image (`cargo xtask image`, from the release binary) imported into each node's containerd and
//! run by runc with the rendered command, env, downward-API values, Secret, hostPaths,
//! securityContext, resources, host network (the node's namespace), cluster DNS and probes.
//!
//! - `default_values`: two nodes, the chart's default values (only `registries` set, to the
//!   test registry). Pulls by containerd with no hosts.toml; the registry serves each blob once
//!   for the cluster; node 1's agent container killed: node 2 still pulls (cached and new
//!   images), node 1 pulls past its dead agent; a rolling restart loses no cached data.
//! - `hosts_toml_mode`: one node, `mode=hosts-toml`: the init container writes the hosts.toml
//!   files (keeping an admin's file as a backup), containerd pulls through them from the agent,
//!   and deleting the pod (preStop hook) removes them and restores the admin's file.
//!
//! Needs root, the image archive (`cargo xtask image`; `cargo xtask test` builds it and passes
//! PEERD_IMAGE_ARCHIVE), helm (deploy/install-tools.sh), python3-yaml, containerd, runc, ctr,
//! docker-registry, skopeo, umoci, dnsmasq, busybox. Everything is removed by Drop guards.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use xtask::{
    components::Image,
    image,
    netcluster::REGISTRY_PORT,
    pod::{Manifests, PodCluster},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The agent's image archive: PEERD_IMAGE_ARCHIVE, else target/peerd-image.tar.
fn agent_archive() -> PathBuf {
    let p = std::env::var_os("PEERD_IMAGE_ARCHIVE").map(PathBuf::from).unwrap_or_else(|| root().join("target/peerd-image.tar"));
    assert!(p.is_file(), "{} is missing: run `cargo xtask image` (cargo xtask test does)", p.display());
    p
}

/// The archives of every image the rendered pod names: the agent's, and a busybox image (made
/// from the host's busybox) for the hosts-toml containers.
fn archives_for(m: &Manifests, dir: &Path) -> Vec<PathBuf> {
    let spec = m.pod_spec().unwrap();
    let mut out = vec![agent_archive()];
    let mut done = vec![format!("docker.io/library/peerd:{}", image::version())];
    for c in ["initContainers", "containers"].iter().flat_map(|k| spec[*k].as_array().cloned().unwrap_or_default()) {
        let r = xtask::pod::normalize_image(c["image"].as_str().unwrap());
        if done.contains(&r) {
            continue;
        }
        assert!(r.starts_with("docker.io/library/busybox:"), "the harness has no image for {r}");
        let d = dir.join(format!("busybox{}", done.len()));
        let bb = image::build(&image::busybox_spec(&r).unwrap(), &d, &d.join("busybox.tar")).unwrap();
        out.push(bb.archive);
        done.push(r);
    }
    out
}

/// The registry NetCluster puts in its registry namespace.
fn registry_host() -> String {
    format!("{}:{REGISTRY_PORT}", Ipv4Addr::new(198, 18, 255, 1))
}

const MIRROR: &str = "127.0.0.1:30000";

fn mirror() -> SocketAddr {
    MIRROR.parse().unwrap()
}

fn setup_tools() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the pod harness needs root (namespaces, containerd)");
    let have_helm = std::process::Command::new("sh")
        .args(["-c", "command -v helm"])
        .env("PATH", xtask::pod::tools_path())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_helm {
        let out = std::process::Command::new("bash").arg(root().join("deploy/install-tools.sh")).output().unwrap();
        assert!(out.status.success(), "deploy/install-tools.sh: {}", String::from_utf8_lossy(&out.stderr));
    }
    for tool in ["containerd", "ctr", "runc", "docker-registry", "skopeo", "umoci", "dnsmasq", "busybox", "nsenter"] {
        xtask::components::require(tool);
    }
}

/// Values: the chart's defaults plus the test registry (plain HTTP).
fn values(dir: &Path, extra: &str) -> Vec<String> {
    let f = dir.join("values.yaml");
    let r = registry_host();
    std::fs::write(&f, format!("registries:\n  - \"{r}=http://{r}\"\n{extra}")).unwrap();
    vec!["--values".into(), f.display().to_string()]
}

fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("peerd-pod-{tag}-")).tempdir().unwrap()
}

/// Registry blob GETs per digest of `image` so far. The registry logs a request after
/// answering it: when the counts are still below `at_least` (GETs the caller knows happened),
/// this waits for the log to catch up (bounded), then reads once more after a pause so that a
/// late extra GET is seen too.
fn gets_per_blob_at_least(c: &PodCluster, image: &Image, at_least: &[usize]) -> Vec<usize> {
    let count = || {
        let gets = c.deployment.registry_blob_gets();
        image.blobs.iter().map(|b| gets.iter().filter(|l| l.contains(b.as_str())).count()).collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while count().iter().zip(at_least).any(|(n, w)| n < w) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    count()
}

fn gets_per_blob(c: &PodCluster, image: &Image) -> Vec<usize> {
    gets_per_blob_at_least(c, image, &[])
}

/// CapEff of a process, as a set of capability numbers.
fn cap_eff(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = st.lines().find(|l| l.starts_with("CapEff:")).unwrap().split_whitespace().nth(1).unwrap().to_string();
    u64::from_str_radix(&hex, 16).unwrap()
}

fn wait_metric(c: &PodCluster, i: usize, name: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let v = c.metric(i, mirror(), name).unwrap_or(-1.0);
        if v >= want {
            return;
        }
        assert!(Instant::now() < deadline, "node{}: {name} = {v}, wanted {want} within {within:?}: {}", i + 1, c.pod(i).unwrap().logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Warnings and errors the pods' containers logged (shown with the test's output; every line
/// with PEERD_POD_LOGS=1).
fn show_warnings(c: &PodCluster) {
    let all = std::env::var_os("PEERD_POD_LOGS").is_some();
    for i in 0..c.nodes.len() {
        if let Ok(p) = c.pod(i) {
            for l in p.logs().lines().filter(|l| all || l.contains("WARN") || l.contains("ERROR")) {
                eprintln!("node{}: {l}", i + 1);
            }
        }
    }
}

/// Container logs are files, not terminals: no color escapes in them.
fn assert_plain_logs(c: &PodCluster) {
    for i in 0..c.nodes.len() {
        if let Ok(p) = c.pod(i) {
            let logs = p.logs();
            assert!(!logs.contains('\u{1b}'), "node{}: terminal escapes in the logs: {logs}", i + 1);
        }
    }
}

fn assert_probes_clean(c: &PodCluster) {
    for i in 0..c.nodes.len() {
        if let Ok(p) = c.pod(i) {
            let (kills, runs) = p.probe_report();
            assert!(kills.is_empty(), "node{}: liveness failures (the kubelet would restart): {kills:?}", i + 1);
            assert!(runs > 0, "node{}: no probe ran", i + 1);
        }
    }
}

#[test]
fn default_values() {
    setup_tools();
    let t0 = Instant::now();
    let archive = agent_archive();
    let dir = temp_dir("default");
    let m = Manifests::render(&root().join("deploy/helm/peerd"), "peerd", "kube-system", &values(dir.path(), "")).unwrap();
    // The chart's default mode (it may change): transparent when the agent gets PEERD_TRANSPARENT.
    let agent = m.pod_spec().unwrap()["containers"].as_array().unwrap().iter().find(|c| c["name"] == "agent").unwrap().clone();
    let transparent = agent["env"].as_array().unwrap().iter().any(|e| e["name"] == "PEERD_TRANSPARENT" && e["value"] == "true");
    let mode = if transparent { "transparent" } else { "hosts-toml" };
    let prefix = format!("pd{}a", std::process::id() % 1000);
    let mut c = PodCluster::up(&prefix, 2, dir.path(), m.clone(), &archives_for(&m, dir.path())).unwrap();

    // skopeo pushes the archive as it is (the image users push to their registry).
    let r = registry_host();
    xtask::components::run(xtask::components::command_in("skopeo", Some(&c.nodes[0].ns), None).args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci-archive:{}", archive.display()),
        &format!("docker://{r}/peerd:{}", image::version()),
    ]));

    // Node 2 looks like a current distribution's node to its pods: its /sys/fs/cgroup is pure
    // cgroup v2 (node 1's is this machine's hybrid hierarchy).
    c.node_mut(1).cgroup2_only = true;
    for i in 0..2 {
        c.start_pod(i, Duration::from_secs(60)).unwrap_or_else(|e| panic!("node{}: {e}", i + 1));
    }
    let t_ready = t0.elapsed();
    // The agent runs with exactly the capabilities the chart gives (transparent mode), none in
    // hosts-toml mode, as the rendered securityContext says.
    let pid = c.nodes[0].task_pid(&c.pod(0).unwrap().container("agent").unwrap().id).unwrap();
    let want: u64 = if mode == "transparent" { (1 << 39) | (1 << 12) | (1 << 21) } else { 0 };
    assert_eq!(cap_eff(pid), want, "agent's effective capabilities (mode {mode})");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"), "{status}");

    if mode == "transparent" {
        for (i, want) in [(0, "/host/sys/fs/cgroup/unified"), (1, "/host/sys/fs/cgroup/")] {
            let logs = c.pod(i).unwrap().logs();
            let line = logs.lines().find(|l| l.contains("transparent mode on")).unwrap_or_else(|| panic!("node{}: {logs}", i + 1));
            assert!(line.contains(&format!("cgroup={want}")) && !(i == 1 && line.contains("unified")), "node{}: {line}", i + 1);
        }
    }
    // Gossip seeded from the headless Service's name (cluster DNS): both agents see both.
    for i in 0..2 {
        wait_metric(&c, i, "peerd_members", 2.0, Duration::from_secs(30));
    }
    let t_members = t0.elapsed();

    // In transparent mode containerd has no configuration; in hosts-toml mode it uses the files
    // the init container wrote (containerd's config_path).
    let dirs: Vec<Option<PathBuf>> = (0..2).map(|i| (mode == "hosts-toml").then(|| c.nodes[i].host_path("/etc/containerd/certs.d"))).collect();
    let hosts_dir = |i: usize| dirs[i].clone();
    // Incompressible layers, so blobs are as large as their files (4 MiB in all).
    let a = Image::build_with(&dir.path().join("img-a"), &[("a.bin", 3 << 20), ("b.bin", 1 << 20)], true);
    // The manifest lists the config first, then the layers.
    let a_layer_bytes: usize = a.blobs[1..].iter().map(|b| a.blob_bytes(b).len()).sum();
    a.push_to(Some(&c.nodes[0].ns), &r, "app-a");
    let ref_a = format!("{r}/app-a:v1");

    // Node 1 pulls: the registry serves each blob once, through node 1's agent.
    c.nodes[0].pull(&ref_a, hosts_dir(0).as_deref()).unwrap();
    assert_eq!(gets_per_blob_at_least(&c, &a, &vec![1; a.blobs.len()]), vec![1; a.blobs.len()], "first pull");
    let misses1 = c.metric(0, mirror(), "peerd_cache_misses_total").unwrap();
    assert!(misses1 >= a.blobs.len() as f64, "node 1's pull did not go through its agent (misses {misses1})");
    // Node 2 pulls the image node 1 holds: from node 1, not the registry.
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    c.nodes[1].pull(&ref_a, hosts_dir(1).as_deref()).unwrap();
    let t_pull2 = t.elapsed();
    assert_eq!(gets_per_blob(&c, &a), vec![1; a.blobs.len()], "node 2's pull reached the registry");
    // Node 2's agent served the whole pull (its blobs came from node 1, or were already its own
    // as the rendezvous owner that fetched them for node 1: either way the cluster's one copy).
    let served = c.metric(1, mirror(), "peerd_served_from_cache_bytes_total").unwrap();
    assert!(served >= a_layer_bytes as f64, "node 2's agent served {served} bytes: {}", c.get(1, mirror(), "/metrics").unwrap().1);

    // Node 1's agent container killed (SIGKILL): node 2 pulls again (its cache) and a new image.
    c.pod(0).unwrap().kill_container(&c.nodes[0], "agent").unwrap();
    c.nodes[1].forget(&ref_a, &a.blobs).unwrap();
    c.nodes[1].pull(&ref_a, hosts_dir(1).as_deref()).unwrap();
    assert_eq!(gets_per_blob(&c, &a), vec![1; a.blobs.len()], "node 2's cache was not used");
    let b = Image::build_with(&dir.path().join("img-b"), &[("c.bin", 2 << 20)], true);
    b.push_to(Some(&c.nodes[1].ns), &r, "app-b");
    let ref_b = format!("{r}/app-b:v1");
    let t = Instant::now();
    c.nodes[1].pull(&ref_b, hosts_dir(1).as_deref()).unwrap();
    let t_pull_b = t.elapsed();
    assert_eq!(gets_per_blob_at_least(&c, &b, &vec![1; b.blobs.len()]), vec![1; b.blobs.len()], "image B with node 1 down");
    // Node 1 itself pulls past its dead agent (fail-open / hosts.toml fallback).
    c.nodes[0].forget(&ref_a, &a.blobs).unwrap();
    let t = Instant::now();
    c.nodes[0].pull(&ref_a, hosts_dir(0).as_deref()).unwrap();
    let t_pull_dead = t.elapsed();
    // With its agent dead, node 1's pull goes to the registry directly: one more GET per blob.
    let after_dead = gets_per_blob_at_least(&c, &a, &vec![2; a.blobs.len()]);
    assert_eq!(after_dead, vec![2; a.blobs.len()], "node 1's pull past its dead agent");

    // The kubelet restarts the killed container; it is ready again with its cache.
    {
        let PodCluster { pods, nodes, manifests, .. } = &mut c;
        pods[0].as_mut().unwrap().restart_container(&nodes[0], manifests, "agent").unwrap();
        pods[0].as_ref().unwrap().wait_ready(&nodes[0], Duration::from_secs(60)).unwrap();
    }
    wait_metric(&c, 0, "peerd_members", 2.0, Duration::from_secs(30));
    let blobs_before: Vec<f64> = (0..2).map(|i| c.metric(i, mirror(), "peerd_store_complete_blobs").unwrap()).collect();
    assert!(blobs_before.iter().all(|n| *n >= 2.0), "cached blobs per node: {blobs_before:?}");

    // A rolling restart (old pod deleted, new one ready, node by node): no cached data lost.
    let t = Instant::now();
    let stops = c.rolling_restart(Duration::from_secs(60)).unwrap();
    let t_roll = t.elapsed();
    for (i, (text, took)) in stops.iter().enumerate() {
        // The agent ends on SIGTERM, well within terminationGracePeriodSeconds.
        assert!(!text.contains("SIGKILL") && *took < Duration::from_secs(10), "node{}: deleting the pod took {took:?}: {text}", i + 1);
    }
    for (i, before) in blobs_before.iter().enumerate() {
        wait_metric(&c, i, "peerd_members", 2.0, Duration::from_secs(30));
        let n = c.metric(i, mirror(), "peerd_store_complete_blobs").unwrap();
        assert!(n >= *before, "node{}: {n} cached blobs after the rolling restart, {before} before", i + 1);
    }
    for i in 0..2 {
        c.nodes[i].forget(&ref_a, &a.blobs).unwrap();
        c.nodes[i].pull(&ref_a, hosts_dir(i).as_deref()).unwrap();
    }
    c.nodes[0].pull(&ref_b, hosts_dir(0).as_deref()).unwrap();
    assert_eq!(gets_per_blob(&c, &a), after_dead, "after the rolling restart, image A reached the registry");
    assert_eq!(gets_per_blob(&c, &b), vec![1; b.blobs.len()], "after the rolling restart, image B reached the registry");
    assert_probes_clean(&c);
    assert_plain_logs(&c);
    show_warnings(&c);
    eprintln!(
        "pod harness (mode {mode}): pods ready {t_ready:.1?}, pod deletions {:.1?}, members {t_members:.1?}, node 2 pull from node 1 {t_pull2:.1?}, \
         new image with node 1 down {t_pull_b:.1?}, node 1 pull past its dead agent {t_pull_dead:.1?}, rolling restart {t_roll:.1?}, total {:.1?}",
        stops.iter().map(|s| s.1).collect::<Vec<_>>(),
        t0.elapsed()
    );
}

#[test]
fn hosts_toml_mode() {
    setup_tools();
    let t0 = Instant::now();
    let dir = temp_dir("hoststoml");
    let m = Manifests::render(&root().join("deploy/helm/peerd"), "peerd", "kube-system", &values(dir.path(), "mode: hosts-toml\n")).unwrap();
    let prefix = format!("pd{}b", std::process::id() % 1000);
    let mut c = PodCluster::up(&prefix, 1, dir.path(), m.clone(), &archives_for(&m, dir.path())).unwrap();
    let certs = c.nodes[0].host_path("/etc/containerd/certs.d");
    // An admin's own file for docker.io, which peerd must keep and put back.
    let admin = "server = \"https://registry-1.docker.io\"\n# the admin's\n";
    std::fs::create_dir_all(certs.join("docker.io")).unwrap();
    std::fs::write(certs.join("docker.io/hosts.toml"), admin).unwrap();

    c.start_pod(0, Duration::from_secs(60)).unwrap();
    let r = registry_host();
    let ours = std::fs::read_to_string(certs.join(&r).join("hosts.toml")).unwrap();
    assert!(ours.contains("# managed-by: peerd") && ours.contains(&format!("server = \"http://{r}\"")) && ours.contains("[host.\"http://127.0.0.1:30000\"]"), "{ours}");
    assert!(std::fs::read_to_string(certs.join("docker.io/hosts.toml")).unwrap().contains("# managed-by: peerd"));
    assert_eq!(std::fs::read_to_string(certs.join("docker.io/hosts.toml.peerd-backup")).unwrap(), admin);
    let pid = c.nodes[0].task_pid(&c.pod(0).unwrap().container("agent").unwrap().id).unwrap();
    assert_eq!(cap_eff(pid), 0, "hosts-toml mode: no capabilities");

    // containerd pulls through the files: the agent fetches each blob once, then serves it.
    let a = Image::build(&dir.path().join("img"), &[("a.bin", 1 << 20)]);
    a.push_to(Some(&c.nodes[0].ns), &r, "app");
    let reference = format!("{r}/app:v1");
    c.nodes[0].pull(&reference, Some(&certs)).unwrap();
    assert_eq!(gets_per_blob_at_least(&c, &a, &vec![1; a.blobs.len()]), vec![1; a.blobs.len()]);
    c.nodes[0].forget(&reference, &a.blobs).unwrap();
    c.nodes[0].pull(&reference, Some(&certs)).unwrap();
    assert_eq!(gets_per_blob(&c, &a), vec![1; a.blobs.len()], "the second pull was not served by the agent");
    assert_probes_clean(&c);
    show_warnings(&c);

    // Deleting the pod runs the preStop hook: peerd's files go, the admin's comes back.
    let t = Instant::now();
    let hooks = c.delete_pod(0).unwrap();
    assert!(!hooks.contains("SIGKILL") && t.elapsed() < Duration::from_secs(10), "deleting the pod took {:?}: {hooks}", t.elapsed());
    assert!(!certs.join(&r).exists(), "{r} left behind; hook output: {hooks}");
    assert_eq!(std::fs::read_to_string(certs.join("docker.io/hosts.toml")).unwrap(), admin, "hook output: {hooks}");
    assert!(!certs.join("docker.io/hosts.toml.peerd-backup").exists());
    let left: Vec<_> = std::fs::read_dir(&certs).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("docker.io")], "certs.d after uninstall");
    eprintln!("pod harness (hosts-toml): total {:.1?}", t0.elapsed());
}

/// Transparent mode with `tlsIntercept` and its required Secret, made as deploy/README.md says:
/// the image's own `peerd ca create` (`docker run --rm -v ca:/ca IMAGE ca create /ca`), the
/// files as a Secret. The pod mounts it read-only (items, 0400) and starts ready.
#[test]
fn tls_intercept_with_the_ca_the_image_creates() {
    setup_tools();
    let t0 = Instant::now();
    let archive = agent_archive();
    let dir = temp_dir("intercept");
    let extra = "mode: transparent\ntlsIntercept:\n  enabled: true\n  existingSecret: peerd-intercept-ca\n";
    let mut m = Manifests::render(&root().join("deploy/helm/peerd"), "peerd", "kube-system", &values(dir.path(), extra)).unwrap();
    let prefix = format!("pd{}c", std::process::id() % 1000);
    // The Secret comes after the cluster is up (the CA is made on a node); the pod reads it at start.
    let mut c = PodCluster::up(&prefix, 1, dir.path(), m.clone(), &[archive]).unwrap();
    let ca = dir.path().join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    let reference = format!("docker.io/library/peerd:{}", image::version());
    c.nodes[0].run_once(&reference, &["/usr/local/bin/peerd", "ca", "create", "/ca"], &[(ca.as_path(), "/ca")]).unwrap();
    let read = |f: &str| std::fs::read_to_string(ca.join(f)).unwrap_or_else(|e| panic!("ca/{f}: {e}"));
    m.docs.push(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "peerd-intercept-ca", "namespace": "kube-system"},
        "stringData": {"ca.crt": read("ca.crt"), "ca.key": read("ca.key")},
    }));
    c.manifests = m;
    c.start_pod(0, Duration::from_secs(60)).unwrap();
    wait_metric(&c, 0, "peerd_members", 1.0, Duration::from_secs(30));
    let logs = c.pod(0).unwrap().logs();
    assert!(logs.contains("TLS interception on"), "{logs}");
    assert!(!logs.contains("created an intercept CA"), "{logs}");
    assert_probes_clean(&c);
    show_warnings(&c);
    eprintln!("pod harness (tlsIntercept): total {:.1?}", t0.elapsed());
}

/// deploy/Dockerfile builds the image `cargo xtask image` builds: its root filesystem and the
/// same entrypoint, command, environment and user.
#[test]
fn dockerfile_matches_the_image() {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty()).collect();
    let spec = image::agent_spec(Path::new("/nonexistent"), image::version());
    let json = |v: &[String]| format!("[{}]", v.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", "));
    let want = vec![
        "FROM scratch".to_string(),
        "COPY target/peerd-image/rootfs/ /".to_string(),
        format!("ENV {}", spec.env.join(" ")),
        format!("USER {}", spec.user),
        "WORKDIR /".to_string(),
        format!("ENTRYPOINT {}", json(&spec.entrypoint)),
        format!("CMD {}", json(&spec.cmd)),
    ];
    assert_eq!(lines, want);
}

/// The image holds the binary, the shared libraries it loads, the CA bundle and passwd/group/
/// nsswitch.conf, nothing else (no shell, no other host library): read from the archive's layers.
#[test]
fn image_holds_only_what_the_agent_needs() {
    let archive = agent_archive();
    let dir = temp_dir("layers");
    let x = dir.path();
    xtask::components::run(std::process::Command::new("tar").arg("-xf").arg(&archive).arg("-C").arg(x));
    let read = |d: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(x.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap()).unwrap()
    };
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(x.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["annotations"]["io.containerd.image.name"], format!("docker.io/library/peerd:{}", image::version()));
    let manifest = read(index["manifests"][0]["digest"].as_str().unwrap());
    let mut files = Vec::new();
    for l in manifest["layers"].as_array().unwrap() {
        let blob = x.join("blobs/sha256").join(l["digest"].as_str().unwrap().trim_start_matches("sha256:"));
        let list = xtask::components::run(std::process::Command::new("tar").arg("-tzf").arg(&blob));
        files.extend(list.lines().map(|f| format!("/{}", f.trim_start_matches("./").trim_end_matches('/'))).filter(|f| f != "/" && f != "/."));
    }
    // The binary's libraries, as ldd resolves them for the copy in the image.
    let bin = x.join("peerd");
    let layer0 = x.join("blobs/sha256").join(manifest["layers"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:"));
    xtask::components::run(std::process::Command::new("sh").arg("-c").arg(format!(
        "tar -xzOf {} usr/local/bin/peerd > {} && chmod +x {}",
        layer0.display(),
        bin.display(),
        bin.display()
    )));
    let mut allowed: Vec<String> = image::shared_libraries(&bin).unwrap();
    allowed.extend(
        ["/usr/local/bin/peerd", image::CA_BUNDLE, "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/tmp", "/root"].map(String::from),
    );
    for f in &files {
        let is_parent = allowed.iter().any(|a| a.starts_with(&format!("{f}/")));
        assert!(allowed.contains(f) || is_parent, "{f} is in the image but not something the agent needs: {files:?}");
    }
    for a in &allowed {
        assert!(files.contains(a), "{a} is missing from the image: {files:?}");
    }
    assert!(!files.iter().any(|f| f.ends_with("/sh")), "a shell in the image");
}

/// values.yaml says SYS_ADMIN can be dropped on kernels with CAP_BPF if PERFMON is added:
/// transparent mode starts with [BPF, NET_ADMIN, PERFMON] under containerd's default seccomp
/// profile. (Without PERFMON the verifier refuses the XDP guard: EACCES, checked by hand.)
#[test]
fn transparent_mode_without_sys_admin() {
    setup_tools();
    let archive = agent_archive();
    let dir = temp_dir("caps");
    let m = Manifests::render(&root().join("deploy/helm/peerd"), "peerd", "kube-system", &values(dir.path(), "mode: transparent\ncapabilities: [BPF, NET_ADMIN, PERFMON]\n")).unwrap();
    let prefix = format!("pd{}d", std::process::id() % 1000);
    let mut c = PodCluster::up(&prefix, 1, dir.path(), m, &[archive]).unwrap();
    c.start_pod(0, Duration::from_secs(60)).unwrap();
    let pid = c.nodes[0].task_pid(&c.pod(0).unwrap().container("agent").unwrap().id).unwrap();
    assert_eq!(cap_eff(pid), (1 << 39) | (1 << 12) | (1 << 38), "BPF, NET_ADMIN, PERFMON");
    let logs = c.pod(0).unwrap().logs();
    assert!(logs.contains("transparent mode on"), "{logs}");
    assert_probes_clean(&c);
}

/// deploy/manifests/peerd.yaml (for `kubectl apply`, no Secret inside) runs as deploy/README.md
/// says: the cluster Secret created first (`kubectl create secret generic peerd-cluster-secret
/// --from-literal=cluster-secret=...`), then the file as it is (default registries only: their
/// names do not resolve here, which the agent survives).
#[test]
fn plain_manifests_file() {
    setup_tools();
    let dir = temp_dir("manifests");
    let mut m = Manifests::from_yaml(&std::fs::read_to_string(root().join("deploy/manifests/peerd.yaml")).unwrap()).unwrap();
    assert!(m.find("Secret", None).is_none(), "the file must not carry a secret");
    let secret = xtask::components::run(std::process::Command::new("sh").args(["-c", "head -c 48 /dev/urandom | base64 -w0"]));
    m.docs.push(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "peerd-cluster-secret", "namespace": "kube-system"},
        "stringData": {"cluster-secret": secret},
    }));
    let prefix = format!("pd{}e", std::process::id() % 1000);
    let mut c = PodCluster::up(&prefix, 1, dir.path(), m.clone(), &archives_for(&m, dir.path())).unwrap();
    c.start_pod(0, Duration::from_secs(60)).unwrap();
    wait_metric(&c, 0, "peerd_members", 1.0, Duration::from_secs(30));
    assert_probes_clean(&c);
    assert_plain_logs(&c);
}
