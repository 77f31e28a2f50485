//! The Kubernetes deployment (deploy/), checked without a cluster: the Helm chart lints, renders
//! (default mode and hosts-toml mode) into manifests that pass `kubernetes-validate --strict`,
//! and is wired as intended (host network, capabilities instead of privileged, the cluster
//! secret, probes, values reaching the agent's environment); the hosts-toml script, taken from
//! the rendered ConfigMap and run with the rendered commands under busybox sh, writes, backs up
//! and restores hosts.toml files; deploy/manifests/peerd.yaml is what deploy/render.sh makes;
//! the systemd unit and the chart only use flags the agent has.
//!
//! Tools: helm, kubernetes-validate, busybox, python3 with PyYAML (kubernetes-validate's own
//! dependency). When helm is missing, deploy/install-tools.sh is run once; a tool still missing
//! after that fails the tests (they never skip).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn chart() -> PathBuf {
    root().join("deploy/helm/peerd")
}

/// PATH with the tools on it; installs them with deploy/install-tools.sh when helm is missing.
fn tools_path() -> &'static str {
    static PATH: OnceLock<Result<String, String>> = OnceLock::new();
    let r = PATH.get_or_init(|| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let path = format!("{home}/.cache/peerd/bin:{}", std::env::var("PATH").unwrap_or_default());
        let found = |tool: &str| {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .env("PATH", &path)
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !found("helm") || !found("kubernetes-validate") || !found("busybox") {
            let out = Command::new("bash")
                .arg(root().join("deploy/install-tools.sh"))
                .output()
                .map_err(|e| format!("cannot run deploy/install-tools.sh: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "deploy/install-tools.sh failed ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        for tool in ["helm", "kubernetes-validate", "busybox", "python3"] {
            if !found(tool) {
                return Err(format!(
                    "required tool `{tool}` is missing (PATH={path}); run deploy/install-tools.sh"
                ));
            }
        }
        let yaml = Command::new("python3").args(["-c", "import yaml"]).env("PATH", &path).status();
        if !yaml.map(|s| s.success()).unwrap_or(false) {
            return Err("python3 cannot import yaml (PyYAML); `python3 -m pip install pyyaml` or run \
                        deploy/install-tools.sh"
                .into());
        }
        Ok(path)
    });
    match r {
        Ok(p) => p,
        Err(e) => panic!("deploy test tools: {e}"),
    }
}

/// Runs a tool with the tools' PATH; panics with its output on failure.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args).env("PATH", tools_path()).current_dir(root());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `helm template` of the chart with these `--set` values, in namespace kube-system.
fn render(sets: &[&str]) -> String {
    let chart = chart();
    let mut args = vec!["template", "peerd", chart.to_str().unwrap(), "--namespace", "kube-system"];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    run("helm", &args, None)
}

fn validate(yaml: &str) {
    run("kubernetes-validate", &["--strict", "--quiet", "-"], Some(yaml));
}

/// Every scalar of the rendered documents as `Kind/name.path.to.field` -> JSON value; list items
/// with a `name` are addressed as `[name]`, others by index; `list.#` is a list's length and
/// `list.#names` the items' names in order.
struct Facts(BTreeMap<String, String>);

const FLATTEN: &str = r#"
import json, sys, yaml
def walk(p, v):
    if isinstance(v, dict):
        if not v:
            print(p + "={}")
        for k, x in v.items():
            walk(p + "." + str(k), x)
    elif isinstance(v, list):
        print(p + ".#=" + str(len(v)))
        print(p + ".#names=" + json.dumps([x.get("name") for x in v if isinstance(x, dict)]))
        for i, x in enumerate(v):
            key = x["name"] if isinstance(x, dict) and isinstance(x.get("name"), str) else str(i)
            walk(p + "[" + key + "]", x)
    else:
        print(p + "=" + json.dumps(v))
for d in yaml.safe_load_all(sys.stdin):
    if d:
        walk(d["kind"] + "/" + d["metadata"]["name"], d)
"#;

impl Facts {
    fn of(yaml: &str) -> Facts {
        let out = run("python3", &["-c", FLATTEN], Some(yaml));
        let mut m = BTreeMap::new();
        for line in out.lines() {
            let (k, v) = line.split_once('=').unwrap();
            m.insert(k.to_string(), v.to_string());
        }
        Facts(m)
    }

    fn raw(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The JSON value at `key`; panics listing the keys sharing its prefix.
    fn get(&self, key: &str) -> &str {
        self.raw(key).unwrap_or_else(|| {
            let prefix = &key[..key.rfind(['.', '[']).unwrap_or(0)];
            let near: Vec<_> = self.0.keys().filter(|k| k.starts_with(prefix)).take(40).collect();
            panic!("rendered manifests have no {key}; near it: {near:#?}")
        })
    }

    /// The string at `key`.
    fn s(&self, key: &str) -> String {
        json_string(self.get(key)).unwrap_or_else(|| panic!("{key} is not a string: {}", self.get(key)))
    }

    fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    fn len(&self, key: &str) -> usize {
        self.raw(&format!("{key}.#")).map_or(0, |n| n.parse().unwrap())
    }

    /// The strings of the list at `key`.
    fn list(&self, key: &str) -> Vec<String> {
        (0..self.len(key)).map(|i| self.s(&format!("{key}[{i}]"))).collect()
    }

    /// The `name`s of the list's items at `key`, in document order.
    fn names(&self, key: &str) -> Vec<String> {
        let v = self.get(&format!("{key}.#names"));
        let inner = v.trim().trim_start_matches('[').trim_end_matches(']');
        inner.split(", ").filter(|s| !s.is_empty()).map(|s| json_string(s).unwrap_or_default()).collect()
    }

    fn keys_with(&self, suffix: &str) -> Vec<&String> {
        self.0.keys().filter(|k| k.ends_with(suffix)).collect()
    }
}

/// Decodes a JSON string literal (what json.dumps writes).
fn json_string(v: &str) -> Option<String> {
    let inner = v.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'u' => {
                let hex: String = chars.by_ref().take(4).collect();
                let mut cp = u32::from_str_radix(&hex, 16).ok()?;
                if (0xd800..0xdc00).contains(&cp) {
                    let low: String = chars.by_ref().skip(2).take(4).collect();
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (u32::from_str_radix(&low, 16).ok()? - 0xdc00);
                }
                out.push(char::from_u32(cp)?);
            }
            c => out.push(c),
        }
    }
    Some(out)
}

const DS: &str = "DaemonSet/peerd.spec.template.spec";
const AGENT: &str = "DaemonSet/peerd.spec.template.spec.containers[agent]";

/// The agent's `PEERD_*` variables, from its source (each flag's `env = "PEERD_..."`).
fn agent_env_vars() -> Vec<String> {
    let src = std::fs::read_to_string(root().join("peerd-agent/src/main.rs")).unwrap();
    let vars: Vec<String> = src
        .split("env = \"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .filter(|v| v.starts_with("PEERD_"))
        .map(str::to_string)
        .collect();
    assert!(vars.len() > 10, "found too few PEERD_ variables in peerd-agent/src/main.rs: {vars:?}");
    vars
}

/// Variables the chart renders for settings the agent does not implement yet (documented as such).
/// None today: every variable the chart renders is a flag of `peerd agent`.
const NOT_YET: &[&str] = &[];

fn env(f: &Facts, name: &str) -> Option<String> {
    let key = format!("{AGENT}.env[{name}].value");
    f.has(&key).then(|| f.s(&key))
}

#[test]
fn chart_lints() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    run("helm", &["lint", "--strict", chart], None);
    run("helm", &["lint", "--strict", chart, "--set", "mode=hosts-toml"], None);
    run("helm", &["lint", "--strict", chart, "--set", "mode=transparent"], None);
    run("helm", &["lint", "--strict", chart, "--set", "tlsIntercept.enabled=true,tlsIntercept.existingSecret=ca"], None);
    // Bad values are refused at render time, not at the node, with a message naming the value.
    for (bad, says) in [
        ("mode=ebpf", "mode must be"),
        ("registries={nonsense}", "NAME=URL"),
        ("clusterSecret.create=false", "clusterSecret.existingSecret"),
        // An intercept CA per node (the agent's default) is one no node trusts.
        ("tlsIntercept.enabled=true", "tlsIntercept.existingSecret"),
        ("tlsIntercept=true", "tlsIntercept.enabled"),
        ("mode=hosts-toml,tlsIntercept.enabled=true,tlsIntercept.existingSecret=ca", "mode=transparent or auto"),
        ("allowedCIDRs={10.0.0.0/8,10.1.0.0/16 evil}", "allowedCIDRs"),
        (r"allowedCIDRs={10.0.0.0/8\,10.1.0.0/16}", "allowedCIDRs"),
        ("guardInterfaces={none,eth0}", "guardInterfaces"),
        (r"guardInterfaces={eth0\,eth1}", "guardInterfaces"),
    ] {
        let out = Command::new("helm")
            .args(["template", "peerd", chart, "--set", bad])
            .env("PATH", tools_path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "helm template --set {bad} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "helm template --set {bad}: the error should mention {says:?}:\n{err}");
    }
}

/// The default, `auto`: the eBPF redirect and the hosts.toml drop-ins together; the agent reads
/// the drop-ins (read-only) to say in `peerd status` which registries they cover.
#[test]
fn auto_is_the_default_and_has_both() {
    let yaml = render(&[]);
    validate(&yaml);
    assert!(!yaml.contains("privileged: true"));
    let f = Facts::of(&yaml);
    assert_eq!(env(&f, "PEERD_TRANSPARENT").as_deref(), Some("true"));
    assert_eq!(f.list(&format!("{AGENT}.securityContext.capabilities.add")), ["BPF", "NET_ADMIN", "SYS_ADMIN"]);
    let install = f.list(&format!("{DS}.initContainers[hosts-toml-install].command"));
    assert_eq!(install[..5], ["sh", "/peerd/hosts-toml.sh", "install", "/host/containerd-certs.d", "http://127.0.0.1:30000"]);
    assert!(install.iter().any(|a| a == "docker.io=https://registry-1.docker.io"), "{install:?}");
    assert_eq!(f.list(&format!("{DS}.containers[hosts-toml].lifecycle.preStop.exec.command"))[2], "uninstall");
    assert_eq!(env(&f, "PEERD_HOSTS_TOML_DIR").as_deref(), Some("/host/containerd-certs.d"));
    // The script the init container and the hook run ships with the release.
    assert_eq!(f.s(&format!("{DS}.volumes[hosts-toml-script].configMap.name")), "peerd-hosts-toml");
    assert!(!f.s("ConfigMap/peerd-hosts-toml.data.hosts-toml.sh").is_empty(), "the hosts-toml ConfigMap is not rendered");
    assert_eq!(mount(&f, "containerd-certs"), ("/host/containerd-certs.d".into(), true, Some("/etc/containerd/certs.d".into())));
    assert_eq!(
        f.names(&format!("{AGENT}.volumeMounts")),
        ["data", "cluster-secret", "containerd-content", "containerd-certs", "host-cgroup"]
    );
}

#[test]
fn transparent_render_is_valid_and_wired() {
    let yaml = render(&["mode=transparent"]);
    validate(&yaml);
    assert!(!yaml.contains("privileged: true"), "something is privileged:\n{yaml}");
    let f = Facts::of(&yaml);

    // Host network, cluster DNS kept, no API access.
    assert_eq!(f.get(&format!("{DS}.hostNetwork")), "true");
    assert_eq!(f.s(&format!("{DS}.dnsPolicy")), "ClusterFirstWithHostNet");
    assert_eq!(f.get(&format!("{DS}.automountServiceAccountToken")), "false");
    assert_eq!(f.get("ServiceAccount/peerd.automountServiceAccountToken"), "false");
    assert!(f.keys_with(".kind").iter().all(|k| {
        let kind = f.s(k);
        !kind.contains("Role") && kind != "Job"
    }));

    // Capabilities, not privileged: every container says privileged false.
    for k in f.keys_with(".securityContext.privileged") {
        assert_eq!(f.get(k), "false", "{k}");
    }
    assert_eq!(f.get(&format!("{AGENT}.securityContext.privileged")), "false");
    assert_eq!(f.list(&format!("{AGENT}.securityContext.capabilities.drop")), ["ALL"]);
    assert_eq!(f.list(&format!("{AGENT}.securityContext.capabilities.add")), ["BPF", "NET_ADMIN", "SYS_ADMIN"]);
    assert_eq!(f.get(&format!("{AGENT}.securityContext.allowPrivilegeEscalation")), "false");
    assert_eq!(f.get(&format!("{AGENT}.securityContext.readOnlyRootFilesystem")), "true");
    assert!(!f.has(&format!("{DS}.initContainers.#")), "the default mode has no init container");
    assert_eq!(f.len(&format!("{DS}.containers")), 1);

    // Mounts: the host's cgroup hierarchy read-only away from the pod's own /sys/fs/cgroup (its
    // cgroup namespace's view), data dir, containerd's content read-only. No bpffs: the agent
    // pins nothing (its programs detach when it exits, which is how fail-open on death works).
    assert_eq!(
        f.names(&format!("{AGENT}.volumeMounts")),
        ["data", "cluster-secret", "containerd-content", "host-cgroup"]
    );
    assert_eq!(mount(&f, "host-cgroup"), ("/host/sys/fs/cgroup".into(), true, Some("/sys/fs/cgroup".into())));
    assert_eq!(f.s(&format!("{DS}.volumes[host-cgroup].hostPath.type")), "Directory");
    assert_eq!(mount(&f, "data"), ("/var/lib/peerd".into(), false, Some("/var/lib/peerd".into())));
    let content = "/var/lib/containerd/io.containerd.content.v1.content";
    assert_eq!(mount(&f, "containerd-content"), (content.into(), true, Some(content.into())));
    assert_eq!(env(&f, "PEERD_CONTAINERD_CONTENT_DIR").as_deref(), Some(content));
    assert_eq!(env(&f, "PEERD_NO_CONTAINERD_CONTENT"), None);
    assert!(!yaml.contains("/sys/fs/bpf"), "bpffs is mounted, but the agent pins nothing");
    assert!(!f.has(&format!("{AGENT}.securityContext.appArmorProfile.type")), "AppArmor: the runtime's default");
    assert_eq!(env(&f, "PEERD_DATA_DIR").as_deref(), Some("/var/lib/peerd"));

    // Transparent mode: on, attached to containerd's cgroup (not "/": pods in their own network
    // namespace would be rewritten to their own loopback) of the host's hierarchy as mounted.
    assert_eq!(env(&f, "PEERD_TRANSPARENT").as_deref(), Some("true"));
    assert_eq!(env(&f, "PEERD_CGROUP_ROOT"), Some(mount(&f, "host-cgroup").0));
    assert_eq!(env(&f, "PEERD_CGROUP").as_deref(), Some("/"));
    assert_eq!(env(&f, "PEERD_REDIRECT_PORT").as_deref(), Some("30003"));
    assert_eq!(f.get(&format!("{AGENT}.ports[redirect].containerPort")), "30003");
    assert_eq!(f.s(&format!("{AGENT}.ports[redirect].protocol")), "TCP");

    // The cluster secret: random, created here, mounted, passed as a file.
    let secret = json_string(f.get("Secret/peerd-cluster-secret.data.cluster-secret")).unwrap();
    let decoded = run("sh", &["-c", "base64 -d"], Some(&secret));
    assert_eq!(decoded.len(), 64, "cluster secret should be 64 random characters");
    assert!(decoded.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_ne!(
        render(&[]).split("cluster-secret: ").nth(1).map(|s| s.lines().next().unwrap().to_string()),
        Some(secret),
        "two installs must not get the same secret"
    );
    assert_eq!(f.s(&format!("{DS}.volumes[cluster-secret].secret.secretName")), "peerd-cluster-secret");
    let dir = f.s(&format!("{AGENT}.volumeMounts[cluster-secret].mountPath"));
    assert_eq!(f.get(&format!("{AGENT}.volumeMounts[cluster-secret].readOnly")), "true");
    assert_eq!(env(&f, "PEERD_CLUSTER_SECRET_FILE"), Some(format!("{dir}/cluster-secret")));

    // Node id from the downward API; ports; mirror node-local.
    assert_eq!(f.s(&format!("{AGENT}.env[PEERD_NODE_ID].valueFrom.fieldRef.fieldPath")), "spec.nodeName");
    assert_eq!(env(&f, "PEERD_MIRROR_ADDR").as_deref(), Some("127.0.0.1:30000"));
    assert_eq!(env(&f, "PEERD_PEER_ADDR").as_deref(), Some("0.0.0.0:30002"));
    assert_eq!(f.get(&format!("{AGENT}.ports[mirror].containerPort")), "30000");
    assert_eq!(f.s(&format!("{AGENT}.ports[peer].protocol")), "UDP");
    // Piece data on TCP at the same port number (--peer-data tcp, the default), declared on the
    // pod and the Service; with peerData=quic neither the port nor a TCP listener.
    assert_eq!(env(&f, "PEERD_PEER_DATA").as_deref(), Some("tcp"));
    assert_eq!(f.get(&format!("{AGENT}.ports[peer-data].containerPort")), "30002");
    assert_eq!(f.s(&format!("{AGENT}.ports[peer-data].protocol")), "TCP");
    assert_eq!(f.s("Service/peerd.spec.ports[peer-data].protocol"), "TCP");
    let quic = Facts::of(&render(&["peerData=quic"]));
    assert_eq!(env(&quic, "PEERD_PEER_DATA").as_deref(), Some("quic"));
    assert!(!quic.has(&format!("{AGENT}.ports[peer-data].containerPort")));
    assert!(!quic.has("Service/peerd.spec.ports[peer-data].port"));
    assert_eq!(f.get(&format!("{AGENT}.ports[gossip].containerPort")), "30001");

    // Probes: GET /healthz on the mirror port, at 127.0.0.1 where the mirror listens.
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(f.s(&format!("{AGENT}.{probe}.httpGet.path")), "/healthz");
        assert_eq!(f.get(&format!("{AGENT}.{probe}.httpGet.port")), "30000");
        assert_eq!(f.s(&format!("{AGENT}.{probe}.httpGet.host")), "127.0.0.1");
    }

    // Resources.
    for k in ["requests.cpu", "requests.memory", "limits.cpu", "limits.memory"] {
        assert!(f.has(&format!("{AGENT}.resources.{k}")), "resources.{k} missing");
    }

    // The headless Service whose name is the seeds.
    assert_eq!(f.s("Service/peerd.spec.clusterIP"), "None");
    assert_eq!(f.get("Service/peerd.spec.publishNotReadyAddresses"), "true");
    assert_eq!(f.s("Service/peerd.spec.ports[gossip].protocol"), "UDP");
    assert_eq!(f.get("Service/peerd.spec.ports[gossip].port"), "30001");
    assert_eq!(env(&f, "PEERD_SEED").as_deref(), Some("peerd.kube-system.svc.cluster.local:30001"));
    assert_eq!(f.s("Service/peerd.spec.selector.app.kubernetes.io/name"), "peerd");

    // Defaults leave the agent's own defaults alone; TLS interception is opt-in.
    for absent in [
        "PEERD_REGISTRY",
        "PEERD_CACHE_SIZE",
        "PEERD_TRUST_CLUSTER",
        "PEERD_ZONE",
        "PEERD_PEER",
        "PEERD_TLS_INTERCEPT",
        "PEERD_TLS_CA_DIR",
        "PEERD_FAIL_OPEN_MS",
        "PEERD_DNS_REFRESH",
        "PEERD_GUARD_IFACE",
        "PEERD_ALLOW_CIDR",
    ] {
        assert_eq!(env(&f, absent), None, "{absent} should not be set by default");
    }
    assert!(!f.has(&format!("{DS}.volumes[intercept-ca].secret.secretName")));
    only_known_env(&f);
}

/// A volume mount of the agent: (mountPath, readOnly, the volume's hostPath if any).
fn mount(f: &Facts, name: &str) -> (String, bool, Option<String>) {
    let path = f.s(&format!("{AGENT}.volumeMounts[{name}].mountPath"));
    let ro = f.raw(&format!("{AGENT}.volumeMounts[{name}].readOnly")) == Some("true");
    let host = f.raw(&format!("{DS}.volumes[{name}].hostPath.path")).map(|p| json_string(p).unwrap());
    (path, ro, host)
}

/// Every PEERD_* variable the chart sets is a flag of the agent or a documented "not yet".
fn only_known_env(f: &Facts) {
    let known = agent_env_vars();
    for k in f.keys_with(".name") {
        if !k.starts_with(&format!("{AGENT}.env[")) {
            continue;
        }
        let name = f.s(k);
        if name.starts_with("PEERD_") {
            assert!(
                known.contains(&name) || NOT_YET.contains(&name.as_str()),
                "the chart sets {name}, which is not a flag of `peerd agent` ({known:?})"
            );
        }
    }
}

#[test]
fn values_reach_the_agent_env() {
    let yaml = render(&[
        "registries={a.example=https://a.example,b.example:5000=http://b.example:5000}",
        "cacheSize=20GiB",
        "trustCluster=true",
        "noDefaultRegistries=true",
        "blobHosts={acct.blob.core.windows.net}",
        "peers={10.0.0.2:30002,10.0.0.3:30002}",
        "zone=eu-1a",
        "tlsIntercept.enabled=true",
        "tlsIntercept.existingSecret=peerd-intercept-ca",
        "mirrorPort=31000",
        "peerPort=31002",
        "redirectPort=31003",
        "redirectCgroup=/system.slice/k3s.service",
        "failOpenMs=500",
        "dnsRefresh=10",
        "guardInterfaces={eth0,ens5}",
        "allowedCIDRs={10.1.0.0/16,10.2.0.0/16,fd00::/8}",
        "uploadLimit=50M",
        "appArmorProfile.type=Unconfined",
    ]);
    validate(&yaml);
    let f = Facts::of(&yaml);
    let e = |n: &str| env(&f, n).unwrap_or_else(|| panic!("{n} not set"));
    assert_eq!(e("PEERD_REGISTRY"), "a.example=https://a.example,b.example:5000=http://b.example:5000");
    assert_eq!(e("PEERD_CACHE_SIZE"), "20GiB");
    assert_eq!(e("PEERD_TRUST_CLUSTER"), "true");
    assert_eq!(e("PEERD_NO_DEFAULT_REGISTRIES"), "true");
    assert_eq!(e("PEERD_BLOB_HOST"), "acct.blob.core.windows.net");
    assert_eq!(e("PEERD_PEER"), "10.0.0.2:30002,10.0.0.3:30002");
    assert_eq!(e("PEERD_ADVERTISE_ADDR"), "$(HOST_IP):31002");
    assert_eq!(e("PEERD_ZONE"), "eu-1a");
    // A static peer list replaces gossip: the agent ignores --peer when it has seeds.
    assert_eq!(env(&f, "PEERD_SEED"), None);
    assert_eq!(e("PEERD_TRANSPARENT"), "true");
    assert_eq!(e("PEERD_CGROUP"), "/system.slice/k3s.service");
    assert_eq!(e("PEERD_REDIRECT_PORT"), "31003");
    assert_eq!(f.get(&format!("{AGENT}.ports[redirect].containerPort")), "31003");
    assert_eq!(e("PEERD_FAIL_OPEN_MS"), "500");
    assert_eq!(e("PEERD_DNS_REFRESH"), "10");
    assert_eq!(e("PEERD_GUARD_IFACE"), "eth0,ens5");
    assert_eq!(e("PEERD_ALLOW_CIDR"), "10.1.0.0/16,10.2.0.0/16,fd00::/8");
    assert_eq!(f.s(&format!("{AGENT}.securityContext.appArmorProfile.type")), "Unconfined");
    // TLS interception: the CA from the named Secret, both keys, read-only, key not world-readable
    // (the agent warns otherwise), at the directory PEERD_TLS_CA_DIR names.
    assert_eq!(e("PEERD_TLS_INTERCEPT"), "true");
    let (ca_dir, ro, host) = mount(&f, "intercept-ca");
    assert!(ro && host.is_none());
    assert_eq!(e("PEERD_TLS_CA_DIR"), ca_dir);
    assert_eq!(f.s(&format!("{DS}.volumes[intercept-ca].secret.secretName")), "peerd-intercept-ca");
    assert_eq!(f.get(&format!("{DS}.volumes[intercept-ca].secret.defaultMode")), "256"); // 0400
    let items: Vec<(String, String)> = (0..f.len(&format!("{DS}.volumes[intercept-ca].secret.items")))
        .map(|i| {
            let item = format!("{DS}.volumes[intercept-ca].secret.items[{i}]");
            (f.s(&format!("{item}.key")), f.s(&format!("{item}.path")))
        })
        .collect();
    assert_eq!(items, [("ca.crt".into(), "ca.crt".into()), ("ca.key".into(), "ca.key".into())]);
    assert!(!f.has(&format!("{DS}.volumes[intercept-ca].secret.optional")), "a missing CA must fail the mount");
    assert_eq!(e("PEERD_UPLOAD_LIMIT"), "50M");
    assert_eq!(e("PEERD_MIRROR_ADDR"), "127.0.0.1:31000");
    assert_eq!(e("PEERD_PEER_ADDR"), "0.0.0.0:31002");
    assert_eq!(f.get(&format!("{AGENT}.livenessProbe.httpGet.port")), "31000");
    assert_eq!(f.get("Service/peerd.spec.ports[peer].port"), "31002");
    // $(HOST_IP) expands only if HOST_IP is defined before it.
    let names = f.names(&format!("{AGENT}.env"));
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
    assert!(pos("HOST_IP") < pos("PEERD_ADVERTISE_ADDR"));
    only_known_env(&f);

    // containerd's content store elsewhere (k3s), or not shared at all.
    let k3s = "/var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content";
    let f = Facts::of(&render(&[&format!("containerdContentDir={k3s}")]));
    assert_eq!(mount(&f, "containerd-content"), (k3s.into(), true, Some(k3s.into())));
    assert_eq!(env(&f, "PEERD_CONTAINERD_CONTENT_DIR").as_deref(), Some(k3s));
    let yaml = render(&["containerdContentDir="]);
    validate(&yaml);
    let f = Facts::of(&yaml);
    assert!(!f.has(&format!("{DS}.volumes[containerd-content].hostPath.path")));
    assert_eq!(env(&f, "PEERD_CONTAINERD_CONTENT_DIR"), None);
    assert_eq!(env(&f, "PEERD_NO_CONTAINERD_CONTENT").as_deref(), Some("true"));
    only_known_env(&f);

    // An existing Secret instead of a created one.
    let yaml = render(&["clusterSecret.create=false", "clusterSecret.existingSecret=mine"]);
    let f = Facts::of(&yaml);
    assert!(f.keys_with(".kind").iter().all(|k| f.s(k) != "Secret"));
    assert_eq!(f.s(&format!("{DS}.volumes[cluster-secret].secret.secretName")), "mine");
}

#[test]
fn hosts_toml_mode() {
    let yaml = render(&["mode=hosts-toml", "registries={my.registry:5000=https://my.registry:5000}", "allowedCIDRs={10.0.0.0/8}"]);
    validate(&yaml);
    assert!(!yaml.contains("privileged: true"));
    let f = Facts::of(&yaml);
    let init = format!("{DS}.initContainers[hosts-toml-install]");
    let side = format!("{DS}.containers[hosts-toml]");

    // The agent needs no capability, no kernel mounts and no transparent-mode settings here.
    assert!(!f.has(&format!("{AGENT}.securityContext.capabilities.add.#")));
    assert_eq!(f.list(&format!("{AGENT}.securityContext.capabilities.drop")), ["ALL"]);
    assert!(!f.has(&format!("{AGENT}.volumeMounts[host-cgroup].mountPath")));
    assert!(!f.has(&format!("{AGENT}.ports[redirect].containerPort")));
    for absent in ["PEERD_TRANSPARENT", "PEERD_CGROUP_ROOT", "PEERD_CGROUP", "PEERD_REDIRECT_PORT", "PEERD_GUARD_IFACE", "PEERD_ALLOW_CIDR"] {
        assert_eq!(env(&f, absent), None, "{absent} is for transparent mode");
    }
    assert!(env(&f, "PEERD_SEED").is_some(), "gossip in hosts-toml mode too");
    assert_eq!(f.s(&format!("{DS}.volumes[containerd-certs].hostPath.path")), "/etc/containerd/certs.d");

    // The init container installs, for the listed registries and the agent's defaults.
    let install = f.list(&format!("{init}.command"));
    assert_eq!(install[..5], ["sh", "/peerd/hosts-toml.sh", "install", "/host/containerd-certs.d", "http://127.0.0.1:30000"]);
    assert_eq!(
        install[5..],
        [
            "my.registry:5000=https://my.registry:5000",
            "docker.io=https://registry-1.docker.io",
            "ghcr.io=https://ghcr.io",
            "mcr.microsoft.com=https://mcr.microsoft.com",
            "registry.k8s.io=https://registry.k8s.io",
            "quay.io=https://quay.io",
        ]
    );
    assert_eq!(f.s(&format!("{init}.volumeMounts[containerd-certs].mountPath")), "/host/containerd-certs.d");
    assert_eq!(f.s(&format!("{init}.securityContext.capabilities.drop[0]")), "ALL");
    // The sidecar's preStop hook uninstalls.
    let uninstall = f.list(&format!("{side}.lifecycle.preStop.exec.command"));
    assert_eq!(uninstall, ["sh", "/peerd/hosts-toml.sh", "uninstall", "/host/containerd-certs.d"]);
    let hold = f.list(&format!("{side}.command"));
    assert_eq!(hold, ["sh", "/peerd/hosts-toml.sh", "hold"]);
    assert_eq!(f.s(&format!("{DS}.volumes[hosts-toml-script].configMap.name")), "peerd-hosts-toml");

    // The script, as the ConfigMap ships it, is the chart's file.
    let script = f.s("ConfigMap/peerd-hosts-toml.data.hosts-toml.sh");
    let file = std::fs::read_to_string(chart().join("files/hosts-toml.sh")).unwrap();
    assert_eq!(script.trim_end(), file.trim_end());

    // Run the rendered commands, under busybox sh and the system sh, against a temp certs.d.
    for shell in [&["busybox", "sh"][..], &["sh"][..]] {
        script_lifecycle(shell, &script, &install, &uninstall);
    }
    script_edge_cases(&script);
}

/// A directory removed on drop.
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("peerd-deploy-{tag}-")).tempdir().unwrap()
}

/// Runs `cmd` (a rendered container command: sh /peerd/hosts-toml.sh ... /host/containerd-certs.d ...)
/// with `shell`, the script file and `certs` substituted. Returns (success, stderr).
fn run_script(shell: &[&str], script: &Path, certs: &Path, cmd: &[String]) -> (bool, String) {
    assert_eq!(cmd[0], "sh");
    let args: Vec<String> = cmd[1..]
        .iter()
        .map(|a| match a.as_str() {
            "/peerd/hosts-toml.sh" => script.display().to_string(),
            "/host/containerd-certs.d" => certs.display().to_string(),
            _ => a.clone(),
        })
        .collect();
    let out = Command::new(shell[0]).args(&shell[1..]).args(&args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Every file under `dir` with its contents, sorted.
fn tree(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            if p.is_dir() {
                out.push((format!("{rel}/"), String::new()));
                walk(base, &p, out);
            } else {
                out.push((rel, std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn script_lifecycle(shell: &[&str], script_text: &str, install: &[String], uninstall: &[String]) {
    let tmp = temp_dir(&format!("life-{}", shell[0]));
    let script = tmp.path().join("hosts-toml.sh");
    std::fs::write(&script, script_text).unwrap();
    let certs = tmp.path().join("certs.d");
    // The node before: docker.io has its own hosts.toml, another registry has one we do not touch.
    std::fs::create_dir_all(certs.join("docker.io")).unwrap();
    std::fs::create_dir_all(certs.join("internal.example")).unwrap();
    let original = "server = \"https://registry-1.docker.io\"\n[host.\"https://corp-mirror\"]\n  capabilities = [\"pull\"]\n";
    std::fs::write(certs.join("docker.io/hosts.toml"), original).unwrap();
    std::fs::write(certs.join("internal.example/hosts.toml"), "server = \"https://internal\"\n").unwrap();
    let before = tree(&certs);

    let (ok, err) = run_script(shell, &script, &certs, install);
    assert!(ok, "{shell:?} install failed: {err}");
    let written = std::fs::read_to_string(certs.join("docker.io/hosts.toml")).unwrap();
    assert!(written.contains("server = \"https://registry-1.docker.io\""), "{written}");
    assert!(written.contains("[host.\"http://127.0.0.1:30000\"]"), "{written}");
    assert!(written.contains("capabilities = [\"pull\", \"resolve\"]"), "{written}");
    assert_eq!(std::fs::read_to_string(certs.join("docker.io/hosts.toml.peerd-backup")).unwrap(), original);
    let mine = std::fs::read_to_string(certs.join("my.registry:5000/hosts.toml")).unwrap();
    assert!(mine.contains("server = \"https://my.registry:5000\""), "{mine}");
    for r in ["ghcr.io", "mcr.microsoft.com", "registry.k8s.io", "quay.io"] {
        assert!(certs.join(r).join("hosts.toml").is_file(), "no hosts.toml for {r}");
    }
    assert_eq!(
        std::fs::read_to_string(certs.join("internal.example/hosts.toml")).unwrap(),
        "server = \"https://internal\"\n"
    );

    // A restarted pod installs again: the backup (the node's own file) survives.
    let after_first = tree(&certs);
    let (ok, err) = run_script(shell, &script, &certs, install);
    assert!(ok, "{shell:?} second install failed: {err}");
    assert_eq!(tree(&certs), after_first, "install is not idempotent");

    // Uninstall restores the node exactly; twice is harmless.
    let (ok, err) = run_script(shell, &script, &certs, uninstall);
    assert!(ok, "{shell:?} uninstall failed: {err}");
    assert_eq!(tree(&certs), before, "uninstall did not restore the node's certs.d");
    let (ok, err) = run_script(shell, &script, &certs, uninstall);
    assert!(ok, "{shell:?} second uninstall failed: {err}");
    assert_eq!(tree(&certs), before);

    // `hold` ends on SIGTERM with status 0 (the sidecar's main process).
    // Its stdout is a pipe we read to the end: it closes only when no sleep is left behind.
    let mut child = Command::new(shell[0])
        .args(&shell[1..])
        .arg(&script)
        .arg("hold")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{shell:?} hold exited with {status} on SIGTERM");
    let mut pipe = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut pipe, &mut sink);
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok(),
        "{shell:?} hold left a process behind after SIGTERM (its `sleep` still holds stdout)"
    );
}

fn script_edge_cases(script_text: &str) {
    let sh = ["busybox", "sh"];
    let tmp = temp_dir("edge");
    let script = tmp.path().join("hosts-toml.sh");
    std::fs::write(&script, script_text).unwrap();
    let certs = tmp.path().join("certs.d");
    let cmd = |args: &[&str]| -> Vec<String> {
        ["sh", "/peerd/hosts-toml.sh"].iter().chain(args).map(|s| s.to_string()).collect()
    };
    let c = "/host/containerd-certs.d";
    let m = "http://127.0.0.1:30000";

    // Bad input is refused before anything is written.
    for bad in ["../etc=https://x", "a/b=https://x", "noequals", "a=ftp://x", "a=https://x\"\n[evil]"] {
        let (ok, _) = run_script(&sh, &script, &certs, &cmd(&["install", c, m, bad]));
        assert!(!ok, "install accepted {bad:?}");
        assert!(!certs.exists() || tree(&certs).is_empty(), "install of {bad:?} wrote files");
    }

    // A registry dropped from the list between installs: its entry goes, its backup comes back.
    std::fs::create_dir_all(certs.join("quay.io")).unwrap();
    std::fs::write(certs.join("quay.io/hosts.toml"), "mine\n").unwrap();
    let before = tree(&certs);
    let (ok, e) = run_script(&sh, &script, &certs, &cmd(&["install", c, m, "quay.io=https://quay.io", "ghcr.io=https://ghcr.io"]));
    assert!(ok, "{e}");
    let (ok, e) = run_script(&sh, &script, &certs, &cmd(&["install", c, m, "ghcr.io=https://ghcr.io"]));
    assert!(ok, "{e}");
    assert_eq!(std::fs::read_to_string(certs.join("quay.io/hosts.toml")).unwrap(), "mine\n");
    assert!(!certs.join("quay.io/hosts.toml.peerd-backup").exists());

    // An install interrupted between keeping the backup and writing ours: uninstall restores.
    std::fs::remove_file(certs.join("ghcr.io/hosts.toml")).unwrap();
    std::fs::create_dir_all(certs.join("docker.io")).unwrap();
    std::fs::write(certs.join("docker.io/hosts.toml.peerd-backup"), "node's\n").unwrap();
    let (ok, e) = run_script(&sh, &script, &certs, &cmd(&["uninstall", c]));
    assert!(ok, "{e}");
    assert_eq!(std::fs::read_to_string(certs.join("docker.io/hosts.toml")).unwrap(), "node's\n");
    assert!(!certs.join("docker.io/hosts.toml.peerd-backup").exists());
    assert!(!certs.join("ghcr.io").exists(), "the directory peerd created was left behind");
    std::fs::remove_dir_all(certs.join("docker.io")).unwrap();
    assert_eq!(tree(&certs), before);

    // A file someone else wrote over ours while installed is theirs: uninstall leaves it.
    let (ok, e) = run_script(&sh, &script, &certs, &cmd(&["install", c, m, "quay.io=https://quay.io"]));
    assert!(ok, "{e}");
    std::fs::write(certs.join("quay.io/hosts.toml"), "admin's\n").unwrap();
    let (ok, e) = run_script(&sh, &script, &certs, &cmd(&["uninstall", c]));
    assert!(ok, "{e}");
    assert_eq!(std::fs::read_to_string(certs.join("quay.io/hosts.toml")).unwrap(), "admin's\n");
}

#[test]
fn committed_manifests_are_current_and_valid() {
    tools_path();
    let out = Command::new("bash")
        .arg(root().join("deploy/render.sh"))
        .arg("--check")
        .env("PATH", tools_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/manifests/peerd.yaml is not what the chart renders; run deploy/render.sh\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = std::fs::read_to_string(root().join("deploy/manifests/peerd.yaml")).unwrap();
    validate(&yaml);
    let f = Facts::of(&yaml);
    // No secret committed to git; the DaemonSet uses the one the README says to create.
    assert!(f.keys_with(".kind").iter().all(|k| f.s(k) != "Secret"), "a Secret is committed");
    assert_eq!(f.s(&format!("{DS}.volumes[cluster-secret].secret.secretName")), "peerd-cluster-secret");
    assert_eq!(f.get(&format!("{DS}.hostNetwork")), "true");
    assert!(yaml.contains("kubectl -n kube-system create secret generic peerd-cluster-secret"));
}

#[test]
fn systemd_unit_uses_real_flags() {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/peerd.service")).unwrap();
    let known = agent_env_vars();
    let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).expect("no ExecStart");
    assert!(exec.contains("peerd agent"), "{exec}");
    for word in exec.split_whitespace().filter(|w| w.starts_with("--")) {
        let flag = word.trim_start_matches("--").split('=').next().unwrap();
        let var = format!("PEERD_{}", flag.to_uppercase().replace('-', "_"));
        let var = if var == "PEERD_REGISTRY" || known.contains(&var) { var } else { String::new() };
        assert!(!var.is_empty(), "the unit passes {word}, which `peerd agent` does not have");
    }
    // Settings, and the commented examples (transparent mode) too.
    let settings: Vec<&str> =
        unit.lines().filter_map(|l| l.trim_start_matches(['#', ' ']).strip_prefix("Environment=")).collect();
    assert!(settings.iter().any(|s| s.contains("PEERD_TRANSPARENT=true")), "no transparent-mode example");
    for line in settings {
        for assignment in line.split_whitespace() {
            let name = assignment.trim_matches('"').split('=').next().unwrap();
            if name.starts_with("PEERD_") {
                assert!(known.iter().any(|k| k == name), "the unit sets {name}, not a flag of `peerd agent`");
            }
        }
    }
    // Root limited to a bounding set that still holds what transparent mode needs.
    for key in ["CapabilityBoundingSet=", "AmbientCapabilities="] {
        let line = unit.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key}"));
        for cap in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"] {
            assert!(line.split(['=', ' ']).any(|w| w == cap), "{key} lacks {cap}: {line}");
        }
    }
}
