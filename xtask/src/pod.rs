//! A pod-faithful harness: the chart's DaemonSet, rendered by `helm template`, run on N nodes the
//! way the kubelet runs it, with the parts of a node that do run here: one network namespace per
//! node (from `netcluster`), one containerd per node (its own root, so the hostPath
//! `/var/lib/containerd/...` is that node's content store), runc, and dnsmasq as cluster DNS.
//!
//! What the kubelet does and this does too, for every container of the pod (init containers
//! first, each to completion, then the others):
//! - the image, by the reference the pod names (normalized as the kubelet does,
//!   `peerd:0.1.0` -> `docker.io/library/peerd:0.1.0`), which must be present on the node
//!   (`IfNotPresent`; images are imported from archives, nothing is pulled from the internet);
//! - command/args over the image's entrypoint/cmd with the kubelet's rules, env in order with
//!   `$(VAR)` expansion, downward-API `fieldRef`s (spec.nodeName, status.hostIP, status.podIP,
//!   metadata.name/namespace/uid), `secretKeyRef`/`configMapKeyRef` from the rendered objects,
//!   the `KUBERNETES_SERVICE_*` variables and HOSTNAME;
//! - volumes: hostPath (types `""`, `Directory`, `DirectoryOrCreate`, `File`, `FileOrCreate`;
//!   a path is the node's: under the node's root directory, except `/sys`, `/proc` and `/dev`,
//!   which are the one kernel's), Secrets and ConfigMaps as files (items, defaultMode, the
//!   kubelet's `..data` symlink layout), always read-only; `readOnly` mounts read-only;
//!   kubelet-managed /etc/hosts, /etc/resolv.conf (`dnsPolicy`), /etc/hostname and
//!   /dev/termination-log;
//! - host network = the node's network namespace, host UTS namespace (the node's hostname), a
//!   private PID/IPC/mount namespace and a new cgroup namespace;
//! - securityContext: privileged, capabilities (the runtime's default set, then drop/add),
//!   readOnlyRootFilesystem, allowPrivilegeEscalation (no_new_privs), seccompProfile
//!   RuntimeDefault (containerd's default profile), runAsUser 0 only (see `Unsupported`);
//! - resources: memory limit, CPU limit (CFS quota) and CPU request (shares);
//! - liveness/readiness probes (httpGet, tcpSocket) polled from the node's network namespace at
//!   their period, threshold and timeout; liveness failures are recorded (the kubelet would
//!   restart the container; the tests fail on any);
//! - stopping: preStop exec hook, SIGTERM, SIGKILL after terminationGracePeriodSeconds.
//!
//! Not the kubelet: no API server, no CRI (ctr drives containerd directly), no pod sandbox
//! ("pause") container, no CNI, no admission, no RBAC, no restart policy loop (a killed
//! container is restarted by the test, as the kubelet would), no image pulls for the pod's own
//! images, no AppArmor (this kernel has none), runAsUser/runAsGroup other than 0 refused.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::components::Proc;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{cmd} failed: {output}")]
    Command { cmd: String, output: String },
    #[error("rendered manifests: {0}")]
    Manifest(String),
    #[error("the harness does not support {0}")]
    Unsupported(String),
    #[error("{0}")]
    Failed(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PodError {
    let what = what.into();
    move |source| PodError::Io { what, source }
}

fn run(cmd: &mut Command) -> Result<String, PodError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(io(format!("spawn {shown}")))?;
    if !out.status.success() {
        return Err(PodError::Command {
            cmd: shown,
            output: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn manifest(msg: impl Into<String>) -> PodError {
    PodError::Manifest(msg.into())
}

/// PATH with `~/.cache/peerd/bin` (helm, from deploy/install-tools.sh) in front.
pub fn tools_path() -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    format!("{home}/.cache/peerd/bin:{}", std::env::var("PATH").unwrap_or_default())
}

/// The objects `helm template` rendered.
#[derive(Clone, Debug)]
pub struct Manifests {
    pub docs: Vec<Value>,
}

impl Manifests {
    /// `helm template RELEASE CHART --namespace NS ARGS...` (e.g. `--set`, `--values`), parsed
    /// (YAML to JSON by python3's yaml module, which kubernetes-validate needs anyway).
    pub fn render(chart: &Path, release: &str, namespace: &str, args: &[String]) -> Result<Self, PodError> {
        let mut helm = Command::new("helm");
        helm.env("PATH", tools_path()).args(["template", release]).arg(chart).args(["--namespace", namespace]).args(args);
        let yaml = run(&mut helm)?;
        Self::from_yaml(&yaml)
    }

    pub fn from_yaml(yaml: &str) -> Result<Self, PodError> {
        use std::io::Write;
        let mut py = Command::new("python3")
            .args(["-c", "import sys, yaml, json; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(io("spawn python3"))?;
        if let Some(mut stdin) = py.stdin.take() {
            stdin.write_all(yaml.as_bytes()).map_err(io("write to python3"))?;
        }
        let out = py.wait_with_output().map_err(io("python3"))?;
        if !out.status.success() {
            return Err(manifest(format!("YAML: {}", String::from_utf8_lossy(&out.stderr))));
        }
        let docs: Vec<Value> = serde_json::from_slice(&out.stdout).map_err(|e| manifest(format!("JSON: {e}")))?;
        Ok(Self { docs })
    }

    /// The object of `kind` (and `name`, if given).
    pub fn find(&self, kind: &str, name: Option<&str>) -> Option<&Value> {
        self.docs.iter().find(|d| d["kind"] == kind && name.is_none_or(|n| d["metadata"]["name"] == n))
    }

    pub fn daemonset(&self) -> Result<&Value, PodError> {
        self.find("DaemonSet", None).ok_or_else(|| manifest("no DaemonSet"))
    }

    /// The pod template's spec.
    pub fn pod_spec(&self) -> Result<&Value, PodError> {
        let s = &self.daemonset()?["spec"]["template"]["spec"];
        if s.is_object() {
            Ok(s)
        } else {
            Err(manifest("DaemonSet without spec.template.spec"))
        }
    }

    /// A Secret's (or ConfigMap's) data as bytes per key.
    pub fn data_of(&self, kind: &str, name: &str) -> Result<BTreeMap<String, Vec<u8>>, PodError> {
        let obj = self.find(kind, Some(name)).ok_or_else(|| manifest(format!("{kind} {name} is not in the release")))?;
        let mut out = BTreeMap::new();
        if let Some(m) = obj["data"].as_object() {
            for (k, v) in m {
                let s = v.as_str().ok_or_else(|| manifest(format!("{kind} {name}: {k} is not a string")))?;
                let bytes = if kind == "Secret" { base64_decode(s).ok_or_else(|| manifest(format!("Secret {name}: {k} is not base64")))? } else { s.as_bytes().to_vec() };
                out.insert(k.clone(), bytes);
            }
        }
        for field in ["stringData", "binaryData"] {
            if let Some(m) = obj[field].as_object() {
                for (k, v) in m {
                    let s = v.as_str().unwrap_or_default();
                    let bytes = if field == "binaryData" { base64_decode(s).unwrap_or_default() } else { s.as_bytes().to_vec() };
                    out.insert(k.clone(), bytes);
                }
            }
        }
        Ok(out)
    }
}

/// Standard base64 (padding optional); None if malformed.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => continue,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The kubelet's image reference normalization (docker.io, library/, :latest).
pub fn normalize_image(image: &str) -> String {
    let (name, rest) = match image.find(['@']) {
        Some(i) => (&image[..i], &image[i..]),
        None => (image, ""),
    };
    let last = name.rsplit('/').next().unwrap_or(name);
    let (name, tag) = match last.rfind(':') {
        Some(i) => {
            let cut = name.len() - last.len() + i;
            (&name[..cut], &name[cut..])
        }
        None => (name, if rest.is_empty() { ":latest" } else { "" }),
    };
    let first = name.split('/').next().unwrap_or("");
    let domain = first.contains('.') || first.contains(':') || first == "localhost";
    let full = if domain {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{full}{tag}{rest}")
}

/// Kubernetes `$(VAR)` expansion: defined variables are replaced, `$$` is a literal `$`,
/// anything else stays as written.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'(' {
                if let Some(end) = s[i + 2..].find(')') {
                    let name = &s[i + 2..i + 2 + end];
                    if let Some((_, v)) = env.iter().rev().find(|(k, _)| k == name) {
                        out.push_str(v);
                        i += end + 3;
                        continue;
                    }
                }
            }
        }
        let ch = s[i..].chars().next().unwrap_or('$');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// A Kubernetes quantity in bytes (memory) or millicores (`cpu`).
pub fn quantity(q: &Value, cpu: bool) -> Result<u64, PodError> {
    let s = match q {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(manifest(format!("quantity {q}"))),
    };
    let bad = || manifest(format!("quantity {s:?}"));
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "m" => 0.001,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        _ => return Err(bad()),
    };
    let v = n * mult;
    Ok(if cpu { (v * 1000.0).round() as u64 } else { v.round() as u64 })
}

/// containerd's default capability set for containers (what CRI starts from).
const DEFAULT_CAPS: [&str; 14] = [
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP", "SETPCAP",
    "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
];

/// The cluster's DNS domain and the kubernetes Service address the pods are told about
/// (`KUBERNETES_SERVICE_HOST`: an address of the benchmark range nothing answers on).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
pub const KUBERNETES_SERVICE_IP: &str = "198.19.0.1";

/// One node: a network namespace (from NetCluster), a root directory for its hostPaths, and
/// its containerd (root `<root>/var/lib/containerd`, so the chart's hostPath of the content
/// store is this node's), started in the node's network namespace (nsenter, not `ip netns
/// exec`, which would remount /sys and hide the cgroup hierarchy runc needs) and in its own
/// UTS namespace with the node's hostname.
pub struct Node {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The node's `/` for hostPath volumes.
    pub root: PathBuf,
    /// Runtime state: containerd's state and socket, pod directories.
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub containerd: Proc,
    /// A prefix for container ids (and so cgroup paths) unique on this machine.
    id_prefix: String,
    /// Show the node's pods a pure cgroup v2 host: hostPath `/sys/fs/cgroup` is this machine's
    /// v2 hierarchy (`/sys/fs/cgroup/unified` on these hybrid hosts), as on current
    /// distributions' nodes. (runc itself still runs containers on the hybrid hierarchy.)
    pub cgroup2_only: bool,
}

impl Node {
    pub fn start(name: &str, ns: &str, ip: Ipv4Addr, dir: &Path, id_prefix: &str) -> Result<Self, PodError> {
        let root = dir.join("root");
        let run_dir = dir.join("run");
        for d in [root.join("var/lib/containerd"), run_dir.clone(), root.join("etc")] {
            std::fs::create_dir_all(&d).map_err(io(format!("create {}", d.display())))?;
        }
        let sock = run_dir.join("containerd.sock");
        let cfg = run_dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                root.join("var/lib/containerd").display(),
                run_dir.join("state").display(),
                sock.display()
            ),
        )
        .map_err(io("write containerd config"))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .args(["unshare", "--uts", "sh", "-c"])
            .arg(format!("hostname {name} && exec containerd --config {}", cfg.display()));
        let mut containerd = Proc::try_spawn(&mut cmd, run_dir.join("containerd.log")).map_err(io("spawn containerd"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if let Some(st) = containerd.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(PodError::Failed(format!("containerd on {name} exited ({st}): {}", containerd.log_text())));
            }
            if Instant::now() > deadline {
                return Err(PodError::Failed(format!("containerd on {name} did not start: {}", containerd.log_text())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { name: name.into(), ns: ns.into(), ip, root, dir: dir.to_owned(), sock, containerd, id_prefix: id_prefix.into(), cgroup2_only: false })
    }

    /// `ctr` for this node's containerd (namespace k8s.io, as the kubelet's), run in the node's
    /// network namespace (ctr 1.6 fetches images itself).
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns)).arg("ctr").arg("--address").arg(&self.sock).args(["--namespace", "k8s.io"]);
        c
    }

    /// A host path as this node sees it: `/sys`, `/proc` and `/dev` are the machine's (one
    /// kernel), everything else is under the node's root directory.
    pub fn host_path(&self, p: &str) -> PathBuf {
        let shared = ["/sys", "/proc", "/dev"].iter().any(|s| p == *s || p.starts_with(&format!("{s}/")));
        let cg = "/sys/fs/cgroup";
        let hybrid = Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists();
        if self.cgroup2_only && hybrid && (p == cg || p.starts_with(&format!("{cg}/"))) && !p.starts_with("/sys/fs/cgroup/unified") {
            PathBuf::from(format!("/sys/fs/cgroup/unified{}", &p[cg.len()..]))
        } else if shared {
            PathBuf::from(p)
        } else {
            self.root.join(p.trim_start_matches('/'))
        }
    }

    /// containerd's content store (what the chart's `containerdContentDir` names).
    pub fn content_dir(&self) -> PathBuf {
        self.host_path("/var/lib/containerd/io.containerd.content.v1.content")
    }

    pub fn import(&self, archive: &Path) -> Result<String, PodError> {
        run(self.ctr().args(["images", "import"]).arg(archive))
    }

    pub fn has_image(&self, reference: &str) -> Result<bool, PodError> {
        Ok(run(self.ctr().args(["images", "ls", "-q"]))?.lines().any(|l| l.trim() == reference))
    }

    /// Pulls over plain HTTP, through `hosts_dir` (containerd's `config_path`) if given.
    pub fn pull(&self, reference: &str, hosts_dir: Option<&Path>) -> Result<String, PodError> {
        let mut c = self.ctr();
        c.args(["images", "pull", "--plain-http"]);
        if let Some(h) = hosts_dir {
            c.arg("--hosts-dir").arg(h);
        }
        run(c.arg(reference))
    }

    /// Removes the image and its blobs (`blobs`: config and layers) from this node's
    /// containerd, so the next pull must fetch them again (bounded wait: GC is asynchronous).
    /// Other images' content (the pod's own images) stays.
    pub fn forget(&self, reference: &str, blobs: &[String]) -> Result<(), PodError> {
        let _ = self.ctr().args(["images", "rm", "--sync", reference]).output();
        for _ in 0..50 {
            let have = self.content()?;
            let left: Vec<&String> = blobs.iter().filter(|b| have.contains(b)).collect();
            if left.is_empty() {
                return Ok(());
            }
            for d in left {
                let _ = self.ctr().args(["content", "rm", d]).output();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(PodError::Failed(format!("{}: content still held after removing {reference}", self.name)))
    }

    /// Digests in this node's containerd content store.
    pub fn content(&self) -> Result<Vec<String>, PodError> {
        Ok(run(self.ctr().args(["content", "ls", "-q"]))?.split_whitespace().map(str::to_owned).collect())
    }

    /// An image's config (entrypoint, cmd) from the content store.
    fn image_config(&self, reference: &str) -> Result<Value, PodError> {
        let ls = run(self.ctr().args(["images", "ls"]))?;
        let digest = ls
            .lines()
            .find(|l| l.split_whitespace().next() == Some(reference))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
            .ok_or_else(|| PodError::Failed(format!("{}: image {reference} is not present", self.name)))?
            .to_string();
        let get = |d: &str| -> Result<Value, PodError> {
            let out = run(self.ctr().args(["content", "get", d]))?;
            serde_json::from_str(&out).map_err(|e| PodError::Failed(format!("{d}: {e}")))
        };
        let mut m = get(&digest)?;
        if m["manifests"].is_array() {
            let d = m["manifests"][0]["digest"].as_str().unwrap_or_default().to_string();
            m = get(&d)?;
        }
        let cfg = m["config"]["digest"].as_str().ok_or_else(|| PodError::Failed(format!("{reference}: manifest without config")))?.to_string();
        get(&cfg)
    }

    /// GET `path` from `addr` inside this node's network namespace: (status, body).
    pub fn http_get(&self, addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), PodError> {
        let ns = self.ns.clone();
        let path = path.to_string();
        std::thread::spawn(move || -> Result<(u16, String), PodError> {
            enter_netns(&ns)?;
            http_get(addr, &path, timeout).map_err(io(format!("GET http://{addr}{path}")))
        })
        .join()
        .map_err(|_| PodError::Failed("http_get thread panicked".into()))?
    }

    /// The containerd process's UTS namespace (the node's hostname).
    fn uts_ns(&self) -> String {
        format!("/proc/{}/ns/uts", self.containerd.pid())
    }

    fn remove_container(&self, id: &str) {
        let _ = self.ctr().args(["task", "kill", "-s", "SIGKILL", id]).output();
        for _ in 0..50 {
            let out = self.ctr().args(["task", "rm", "-f", id]).output();
            let gone = match out {
                Ok(o) => o.status.success() || String::from_utf8_lossy(&o.stderr).contains("not found"),
                Err(_) => true,
            };
            if gone {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.ctr().args(["containers", "rm", id]).output();
    }

    /// Runs `argv` in `image` once on this node (`docker run --rm -v SRC:DST IMAGE ...`), with
    /// bind mounts (host path, container path); returns what it printed.
    pub fn run_once(&self, image: &str, argv: &[&str], mounts: &[(&Path, &str)]) -> Result<String, PodError> {
        let id = format!("{}-once-{}", self.id_prefix, std::process::id());
        let log = self.dir.join(format!("{id}.log"));
        let mut c = self.ctr();
        c.args(["run", "--rm", &format!("--log-uri=file://{}", log.display())]);
        for (src, dst) in mounts {
            c.arg(format!("--mount=type=bind,src={},dst={dst},options=rbind:rw", src.display()));
        }
        c.args([image, &id]).args(argv);
        let r = run(&mut c);
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        r.map_err(|e| PodError::Failed(format!("{e}\n{out}")))?;
        Ok(out)
    }

    /// The host PID of task `id` (`ctr task ls`).
    pub fn task_pid(&self, id: &str) -> Result<u32, PodError> {
        let ls = run(self.ctr().args(["task", "ls"]))?;
        ls.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| PodError::Failed(format!("{}: no task {id}: {ls}", self.name)))
    }

    /// The node's task ids.
    fn tasks(&self) -> Vec<String> {
        self.ctr()
            .args(["task", "ls", "-q"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Containers first (their shims outlive containerd otherwise), then containerd, then
        // any shim of this node's socket still alive (found by its command line), by PID.
        let ids: Vec<String> = {
            let mut ids = self.tasks();
            if let Ok(o) = self.ctr().args(["containers", "ls", "-q"]).output() {
                ids.extend(String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned));
            }
            ids.sort();
            ids.dedup();
            ids
        };
        for id in ids {
            self.remove_container(&id);
        }
        self.containerd.kill();
        let sock = self.sock.display().to_string();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains("containerd-shim") && cmdline.contains(&sock) {
                    // SAFETY: kill(2) on a PID read just now whose command line names this
                    // node's containerd socket: one of this harness's own shims.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        unmount_under(&self.dir);
    }
}

/// Unmounts (lazily) everything mounted below `dir`, deepest first (overlay roots left by a
/// shim that died).
fn unmount_under(dir: &Path) {
    let prefix = dir.display().to_string();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> =
        info.lines().filter_map(|l| l.split_whitespace().nth(4)).filter(|m| m.starts_with(&prefix)).map(str::to_owned).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: umount2 with a valid C string; MNT_DETACH only detaches our own mounts.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Moves the calling thread into network namespace `ns` (/run/netns/NS).
pub fn enter_netns(ns: &str) -> Result<(), PodError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{ns}")).map_err(io(format!("open netns {ns}")))?;
    // SAFETY: setns on a namespace fd we hold open; affects only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(io(format!("setns {ns}"))(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A plain HTTP/1.1 GET as a kubelet probe sends it: (status, body).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.35\r\nAccept: */*\r\nConnection: close\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// One probe of a container, as written in the pod spec.
#[derive(Clone, Debug)]
struct ProbeSpec {
    container: String,
    liveness: bool,
    /// Where: httpGet (addr, path) or tcpSocket (addr, "").
    addr: SocketAddr,
    path: Option<String>,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
}

fn secs(v: &Value, default: u64) -> Duration {
    Duration::from_secs(v.as_u64().unwrap_or(default))
}

impl ProbeSpec {
    fn parse(container: &Value, which: &str, node_ip: Ipv4Addr) -> Result<Option<Self>, PodError> {
        let p = &container[which];
        if p.is_null() {
            return Ok(None);
        }
        let name = container["name"].as_str().unwrap_or_default().to_string();
        let port_of = |port: &Value| -> Result<u16, PodError> {
            match port {
                Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()).ok_or_else(|| manifest(format!("{name}: port {n}"))),
                Value::String(s) => container["ports"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|x| x["name"] == s.as_str()))
                    .and_then(|x| x["containerPort"].as_u64())
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| manifest(format!("{name}: no port named {s}"))),
                _ => Err(manifest(format!("{name}: port {port}"))),
            }
        };
        let host_of = |h: &Value| -> Result<Ipv4Addr, PodError> {
            // Default: the pod IP, which with host network is the node's.
            match h.as_str() {
                None | Some("") => Ok(node_ip),
                Some(h) => h.parse().map_err(|_| PodError::Unsupported(format!("probe host {h:?} (not an IPv4 address)"))),
            }
        };
        let (addr, path) = if p["httpGet"].is_object() {
            let g = &p["httpGet"];
            if g["scheme"].as_str().is_some_and(|s| s != "HTTP") {
                return Err(PodError::Unsupported(format!("{name}: probe scheme {}", g["scheme"])));
            }
            (SocketAddr::new(host_of(&g["host"])?.into(), port_of(&g["port"])?), Some(g["path"].as_str().unwrap_or("/").to_string()))
        } else if p["tcpSocket"].is_object() {
            let t = &p["tcpSocket"];
            (SocketAddr::new(host_of(&t["host"])?.into(), port_of(&t["port"])?), None)
        } else {
            return Err(PodError::Unsupported(format!("{name}: {which} other than httpGet/tcpSocket")));
        };
        Ok(Some(Self {
            container: name,
            liveness: which == "livenessProbe",
            addr,
            path,
            initial_delay: secs(&p["initialDelaySeconds"], 0),
            period: secs(&p["periodSeconds"], 10),
            timeout: secs(&p["timeoutSeconds"], 1),
            success_threshold: p["successThreshold"].as_u64().unwrap_or(1) as u32,
            failure_threshold: p["failureThreshold"].as_u64().unwrap_or(3) as u32,
        }))
    }

    fn once(&self) -> Result<(), String> {
        match &self.path {
            Some(path) => match http_get(self.addr, path, self.timeout) {
                Ok((s, _)) if (200..400).contains(&s) => Ok(()),
                Ok((s, _)) => Err(format!("HTTP {s}")),
                Err(e) => Err(e.to_string()),
            },
            None => TcpStream::connect_timeout(&self.addr, self.timeout).map(|_| ()).map_err(|e| e.to_string()),
        }
    }
}

/// What the probes saw so far.
#[derive(Debug, Default)]
pub struct ProbeState {
    /// Readiness per container (containers without a readiness probe: ready once started).
    pub ready: BTreeMap<String, bool>,
    /// Liveness failures that reached failureThreshold (the kubelet would restart): text.
    pub liveness_kills: Vec<String>,
    /// Probes run, for reports.
    pub probes_run: u64,
}

/// Polls a pod's probes from the node's network namespace, as the kubelet's prober does.
struct Prober {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<ProbeState>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(ns: &str, probes: Vec<ProbeSpec>, containers: &[String]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut st = ProbeState::default();
        for c in containers {
            let has_readiness = probes.iter().any(|p| !p.liveness && &p.container == c);
            st.ready.insert(c.clone(), !has_readiness);
        }
        let state = Arc::new(Mutex::new(st));
        let (stop2, state2, ns) = (stop.clone(), state.clone(), ns.to_string());
        let thread = std::thread::spawn(move || {
            if let Err(e) = enter_netns(&ns) {
                if let Ok(mut s) = state2.lock() {
                    s.liveness_kills.push(format!("prober could not enter {ns}: {e}"));
                }
                return;
            }
            let start = Instant::now();
            // Per probe: next due time, consecutive successes and failures.
            let mut due: Vec<Instant> = probes.iter().map(|p| start + p.initial_delay).collect();
            let mut ok = vec![0u32; probes.len()];
            let mut bad = vec![0u32; probes.len()];
            while !stop2.load(Ordering::Relaxed) {
                let now = Instant::now();
                for (i, p) in probes.iter().enumerate() {
                    if now < due[i] {
                        continue;
                    }
                    due[i] = now + p.period;
                    let r = p.once();
                    let Ok(mut s) = state2.lock() else { return };
                    s.probes_run += 1;
                    match r {
                        Ok(()) => {
                            ok[i] += 1;
                            bad[i] = 0;
                            if !p.liveness && ok[i] >= p.success_threshold {
                                s.ready.insert(p.container.clone(), true);
                            }
                        }
                        Err(e) => {
                            ok[i] = 0;
                            bad[i] += 1;
                            if bad[i] >= p.failure_threshold {
                                if p.liveness {
                                    s.liveness_kills.push(format!("{}: liveness failed {} times: {e}", p.container, bad[i]));
                                    bad[i] = 0;
                                } else {
                                    s.ready.insert(p.container.clone(), false);
                                }
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self { stop, state, thread: Some(thread) }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A container of a running pod.
#[derive(Clone, Debug)]
pub struct Running {
    pub name: String,
    pub id: String,
    pub log: PathBuf,
    spec: Value,
    pub restarts: u32,
}

/// A pod of the DaemonSet on one node.
pub struct Pod {
    pub name: String,
    pub uid: String,
    pub containers: Vec<Running>,
    /// Init containers' logs, in order.
    pub init_logs: Vec<PathBuf>,
    pub dir: PathBuf,
    grace: Duration,
    prober: Option<Prober>,
    probes: Vec<ProbeSpec>,
    /// Volume name -> (host source, always read-only).
    volumes: BTreeMap<String, (PathBuf, bool)>,
    namespace: String,
}

impl Pod {
    /// Creates and starts the DaemonSet's pod on `node`: volumes, kubelet files, init
    /// containers to completion, then the containers and their probes.
    pub fn start(node: &Node, m: &Manifests, name: &str, dns: Ipv4Addr) -> Result<Self, PodError> {
        let ds = m.daemonset()?;
        let spec = m.pod_spec()?;
        let namespace = ds["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        if spec["hostNetwork"] != true {
            return Err(PodError::Unsupported("pods without hostNetwork (no CNI here)".into()));
        }
        let uid = format!("{:016x}", {
            use sha2::Digest;
            let h = sha2::Sha256::digest(format!("{name}{:?}", Instant::now()).as_bytes());
            u64::from_le_bytes(h[..8].try_into().unwrap_or([0; 8]))
        });
        let dir = node.dir.join("pods").join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(format!("remove {}", dir.display())))?;
        }
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;

        // Volumes.
        let mut volumes = BTreeMap::new();
        for v in spec["volumes"].as_array().into_iter().flatten() {
            let vname = v["name"].as_str().ok_or_else(|| manifest("volume without name"))?.to_string();
            let src = if v["hostPath"].is_object() {
                let p = v["hostPath"]["path"].as_str().ok_or_else(|| manifest(format!("{vname}: hostPath.path")))?;
                let host = node.host_path(p);
                match v["hostPath"]["type"].as_str().unwrap_or("") {
                    "" => {}
                    "DirectoryOrCreate" => std::fs::create_dir_all(&host).map_err(io(format!("create {}", host.display())))?,
                    "Directory" if host.is_dir() => {}
                    "Directory" => return Err(PodError::Failed(format!("hostPath {p}: not a directory on {} (the kubelet would refuse the pod)", node.name))),
                    "File" if host.is_file() => {}
                    "FileOrCreate" => {
                        if !host.exists() {
                            std::fs::write(&host, b"").map_err(io(format!("create {}", host.display())))?;
                        }
                    }
                    t => return Err(PodError::Unsupported(format!("hostPath type {t}"))),
                }
                (host, false)
            } else if v["secret"].is_object() || v["configMap"].is_object() {
                let (kind, obj, key) = if v["secret"].is_object() { ("Secret", &v["secret"], "secretName") } else { ("ConfigMap", &v["configMap"], "name") };
                let oname = obj[key].as_str().ok_or_else(|| manifest(format!("{vname}: {kind} name")))?;
                let data = m.data_of(kind, oname)?;
                let mode = obj["defaultMode"].as_u64().unwrap_or(0o644) as u32;
                let vdir = dir.join("volumes").join(&vname);
                write_atomic_volume(&vdir, &data, obj["items"].as_array(), mode)?;
                (vdir, true)
            } else {
                return Err(PodError::Unsupported(format!("volume {vname}: {v}")));
            };
            volumes.insert(vname, src);
        }

        // What the kubelet writes for every container: hosts (host network: the node's),
        // resolv.conf per dnsPolicy, hostname.
        let etc_hosts = node.root.join("etc/hosts");
        if !etc_hosts.exists() {
            std::fs::write(&etc_hosts, format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n", node.ip, node.name))
                .map_err(io("write /etc/hosts"))?;
        }
        std::fs::copy(&etc_hosts, dir.join("etc-hosts")).map_err(io("copy /etc/hosts"))?;
        let resolv = match spec["dnsPolicy"].as_str().unwrap_or("ClusterFirst") {
            // ClusterFirst with host network falls back to the node's resolver (Default).
            "ClusterFirstWithHostNet" => format!(
                "search {namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\nnameserver {dns}\noptions ndots:5\n"
            ),
            "Default" | "ClusterFirst" => format!("nameserver {dns}\n"),
            p => return Err(PodError::Unsupported(format!("dnsPolicy {p}"))),
        };
        std::fs::write(dir.join("resolv.conf"), resolv).map_err(io("write resolv.conf"))?;
        std::fs::write(dir.join("hostname"), format!("{}\n", node.name)).map_err(io("write hostname"))?;

        let grace = secs(&spec["terminationGracePeriodSeconds"], 30);
        let mut pod = Pod {
            name: name.into(),
            uid,
            containers: Vec::new(),
            init_logs: Vec::new(),
            dir,
            grace,
            prober: None,
            probes: Vec::new(),
            volumes,
            namespace,
        };

        for c in spec["initContainers"].as_array().into_iter().flatten() {
            let cname = c["name"].as_str().unwrap_or("init");
            let id = format!("{}-{name}-{cname}", node.id_prefix);
            let log = pod.dir.join(format!("{cname}.log"));
            let args = pod.ctr_args(node, m, c, &id, &log, false)?;
            let out = node.ctr().args(&args).output().map_err(io("spawn ctr run"))?;
            node.remove_container(&id);
            pod.init_logs.push(log.clone());
            if !out.status.success() {
                return Err(PodError::Failed(format!(
                    "init container {cname} on {} failed ({}): {}{}\nlog: {}",
                    node.name,
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    std::fs::read_to_string(&log).unwrap_or_default()
                )));
            }
        }
        let mut names = Vec::new();
        for c in spec["containers"].as_array().into_iter().flatten() {
            let cname = c["name"].as_str().ok_or_else(|| manifest("container without name"))?.to_string();
            for which in ["livenessProbe", "readinessProbe"] {
                if let Some(p) = ProbeSpec::parse(c, which, node.ip)? {
                    pod.probes.push(p);
                }
            }
            let r = Running { name: cname.clone(), id: String::new(), log: PathBuf::new(), spec: c.clone(), restarts: 0 };
            pod.containers.push(r);
            names.push(cname);
        }
        for i in 0..pod.containers.len() {
            pod.run_container(node, m, i)?;
        }
        pod.prober = Some(Prober::start(&node.ns, pod.probes.clone(), &names));
        Ok(pod)
    }

    fn run_container(&mut self, node: &Node, m: &Manifests, i: usize) -> Result<(), PodError> {
        let c = self.containers[i].clone();
        let id = format!("{}-{}-{}-{}", node.id_prefix, self.name, c.name, c.restarts);
        let log = self.dir.join(format!("{}.{}.log", c.name, c.restarts));
        let args = self.ctr_args(node, m, &c.spec, &id, &log, true)?;
        run(node.ctr().args(&args))?;
        self.containers[i].id = id;
        self.containers[i].log = log;
        Ok(())
    }

    /// `ctr run` arguments for a container of this pod.
    fn ctr_args(&self, node: &Node, m: &Manifests, c: &Value, id: &str, log: &Path, detach: bool) -> Result<Vec<String>, PodError> {
        let cname = c["name"].as_str().unwrap_or_default();
        let image = normalize_image(c["image"].as_str().ok_or_else(|| manifest(format!("{cname}: no image")))?);
        match c["imagePullPolicy"].as_str().unwrap_or("IfNotPresent") {
            "IfNotPresent" | "Never" => {
                if !node.has_image(&image)? {
                    return Err(PodError::Failed(format!("{cname}: image {image} is not present on {} (import it first)", node.name)));
                }
            }
            p => return Err(PodError::Unsupported(format!("imagePullPolicy {p} (nothing can be pulled from the internet here)"))),
        }
        let mut a: Vec<String> = vec!["run".into()];
        if detach {
            a.push("-d".into());
        } else {
            a.push("--rm".into());
        }
        a.push(format!("--log-uri=file://{}", log.display()));

        // Environment, in order, each value expanded against the ones before it.
        let mut env: Vec<(String, String)> = vec![
            ("HOSTNAME".into(), node.name.clone()),
            ("KUBERNETES_SERVICE_HOST".into(), KUBERNETES_SERVICE_IP.into()),
            ("KUBERNETES_SERVICE_PORT".into(), "443".into()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".into(), "443".into()),
            ("KUBERNETES_PORT".into(), format!("tcp://{KUBERNETES_SERVICE_IP}:443")),
            ("KUBERNETES_PORT_443_TCP".into(), format!("tcp://{KUBERNETES_SERVICE_IP}:443")),
            ("KUBERNETES_PORT_443_TCP_PROTO".into(), "tcp".into()),
            ("KUBERNETES_PORT_443_TCP_PORT".into(), "443".into()),
            ("KUBERNETES_PORT_443_TCP_ADDR".into(), KUBERNETES_SERVICE_IP.into()),
        ];
        for e in c["env"].as_array().into_iter().flatten() {
            let k = e["name"].as_str().ok_or_else(|| manifest(format!("{cname}: env without name")))?.to_string();
            let v = if let Some(v) = e["value"].as_str() {
                expand(v, &env)
            } else if e["valueFrom"]["fieldRef"].is_object() {
                let f = e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap_or_default();
                match f {
                    "spec.nodeName" => node.name.clone(),
                    "status.hostIP" | "status.podIP" => node.ip.to_string(),
                    "status.hostIPs" | "status.podIPs" => node.ip.to_string(),
                    "metadata.name" => self.name.clone(),
                    "metadata.namespace" => self.namespace.clone(),
                    "metadata.uid" => self.uid.clone(),
                    "spec.serviceAccountName" => m.pod_spec()?["serviceAccountName"].as_str().unwrap_or("default").to_string(),
                    f => return Err(PodError::Unsupported(format!("{cname}: fieldRef {f}"))),
                }
            } else if e["valueFrom"]["secretKeyRef"].is_object() || e["valueFrom"]["configMapKeyRef"].is_object() {
                let (kind, r) = if e["valueFrom"]["secretKeyRef"].is_object() { ("Secret", &e["valueFrom"]["secretKeyRef"]) } else { ("ConfigMap", &e["valueFrom"]["configMapKeyRef"]) };
                let data = m.data_of(kind, r["name"].as_str().unwrap_or_default())?;
                let key = r["key"].as_str().unwrap_or_default();
                String::from_utf8_lossy(data.get(key).ok_or_else(|| manifest(format!("{cname}: {kind} key {key} missing")))?).into_owned()
            } else if e["value"].is_null() && e["valueFrom"].is_null() {
                String::new()
            } else {
                return Err(PodError::Unsupported(format!("{cname}: env {e}")));
            };
            env.push((k, v));
        }
        // The pod's variables override the kubelet's own of the same name.
        let mut seen = std::collections::BTreeSet::new();
        let mut final_env: Vec<(String, String)> = Vec::new();
        for (k, v) in env.iter().rev() {
            if seen.insert(k.clone()) {
                final_env.push((k.clone(), v.clone()));
            }
        }
        final_env.reverse();
        for (k, v) in &final_env {
            a.push(format!("--env={k}={v}"));
        }

        // Mounts: the pod's volumes, then the kubelet's files.
        for vm in c["volumeMounts"].as_array().into_iter().flatten() {
            let vname = vm["name"].as_str().unwrap_or_default();
            let (src, always_ro) = self.volumes.get(vname).ok_or_else(|| manifest(format!("{cname}: volumeMount of unknown volume {vname}")))?;
            if vm["subPath"].is_string() || vm["subPathExpr"].is_string() {
                return Err(PodError::Unsupported(format!("{cname}: subPath")));
            }
            if vm["mountPropagation"].as_str().is_some_and(|p| p != "None") {
                return Err(PodError::Unsupported(format!("{cname}: mountPropagation")));
            }
            let dst = vm["mountPath"].as_str().ok_or_else(|| manifest(format!("{cname}: mountPath")))?;
            let ro = *always_ro || vm["readOnly"] == true;
            a.push(format!("--mount=type=bind,src={},dst={dst},options=rbind:rprivate:{}", src.display(), if ro { "ro" } else { "rw" }));
        }
        let term_log = self.dir.join(format!("{cname}.termination-log"));
        std::fs::write(&term_log, b"").map_err(io("termination-log"))?;
        for (src, dst) in [
            (self.dir.join("etc-hosts"), "/etc/hosts"),
            (self.dir.join("resolv.conf"), "/etc/resolv.conf"),
            (self.dir.join("hostname"), "/etc/hostname"),
            (term_log, "/dev/termination-log"),
        ] {
            a.push(format!("--mount=type=bind,src={},dst={dst},options=rbind:rprivate:rw", src.display()));
        }

        // Namespaces: the node's network and UTS; a new cgroup namespace (as CRI gives on
        // cgroup v2 nodes); PID, IPC and mount private (ctr's defaults).
        a.push(format!("--with-ns=network:/run/netns/{}", node.ns));
        a.push(format!("--with-ns=uts:{}", node.uts_ns()));
        a.push("--with-ns=cgroup:".into());

        // Security context.
        let sc = &c["securityContext"];
        if sc["privileged"] == true {
            a.push("--privileged".into());
        } else {
            let drop: Vec<String> = sc["capabilities"]["drop"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).map(|s| s.trim_start_matches("CAP_").to_uppercase()).collect();
            let add: Vec<String> = sc["capabilities"]["add"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).map(|s| s.trim_start_matches("CAP_").to_uppercase()).collect();
            let mut caps: Vec<String> = if drop.iter().any(|d| d == "ALL") { Vec::new() } else { DEFAULT_CAPS.iter().map(|s| s.to_string()).filter(|c| !drop.contains(c)).collect() };
            for cap in &add {
                if cap == "ALL" {
                    return Err(PodError::Unsupported(format!("{cname}: capabilities.add ALL")));
                }
                if !caps.contains(cap) {
                    caps.push(cap.clone());
                }
            }
            // ctr applies --cap-add before --cap-drop: drop what the result must not have.
            for d in DEFAULT_CAPS {
                if !caps.iter().any(|c| c == d) {
                    a.push(format!("--cap-drop=CAP_{d}"));
                }
            }
            for cap in &caps {
                a.push(format!("--cap-add=CAP_{cap}"));
            }
        }
        if sc["readOnlyRootFilesystem"] == true {
            a.push("--read-only".into());
        }
        if sc["allowPrivilegeEscalation"] != false && sc["privileged"] != true {
            // Kubernetes' default (unset) allows it: no no_new_privs.
            a.push("--allow-new-privs".into());
        }
        let pod_sc = &m.pod_spec()?["securityContext"];
        for (field, what) in [("runAsUser", "runAsUser"), ("runAsGroup", "runAsGroup")] {
            let v = if sc[field].is_null() { &pod_sc[field] } else { &sc[field] };
            if !v.is_null() && v != 0 {
                return Err(PodError::Unsupported(format!("{cname}: {what} {v} (ctr 1.6 cannot set the user; the chart runs as 0)")));
            }
        }
        if sc["runAsNonRoot"] == true || pod_sc["runAsNonRoot"] == true {
            return Err(PodError::Unsupported(format!("{cname}: runAsNonRoot")));
        }
        let seccomp = if sc["seccompProfile"].is_object() { &sc["seccompProfile"] } else { &pod_sc["seccompProfile"] };
        match seccomp["type"].as_str() {
            Some("RuntimeDefault") => a.push("--seccomp".into()),
            // The kubelet's default is Unconfined (unless SeccompDefault is on).
            None | Some("Unconfined") => {}
            Some(t) => return Err(PodError::Unsupported(format!("{cname}: seccompProfile {t}"))),
        }
        // appArmorProfile: this kernel has no AppArmor (nothing to apply).

        // Resources.
        let res = &c["resources"];
        if !res["limits"]["memory"].is_null() {
            a.push(format!("--memory-limit={}", quantity(&res["limits"]["memory"], false)?));
        }
        if !res["limits"]["cpu"].is_null() {
            let milli = quantity(&res["limits"]["cpu"], true)?;
            a.push("--cpu-period=100000".into());
            a.push(format!("--cpu-quota={}", (milli * 100).max(1000)));
        }
        let req_cpu = if res["requests"]["cpu"].is_null() { &res["limits"]["cpu"] } else { &res["requests"]["cpu"] };
        if !req_cpu.is_null() {
            a.push(format!("--cpu-shares={}", (quantity(req_cpu, true)? * 1024 / 1000).max(2)));
        }
        a.push(format!("--cgroup=/peerd-pod/{id}"));

        // Image and argv (the kubelet's rules: command replaces the entrypoint, args the cmd).
        let cfg = node.image_config(&image)?;
        let strs = |v: &Value| -> Option<Vec<String>> { v.as_array().map(|a| a.iter().filter_map(|s| s.as_str()).map(|s| expand(s, &final_env)).collect()) };
        let img_ep = strs(&cfg["config"]["Entrypoint"]).unwrap_or_default();
        let img_cmd = strs(&cfg["config"]["Cmd"]).unwrap_or_default();
        let (command, args) = (strs(&c["command"]), strs(&c["args"]));
        let argv: Vec<String> = match (command, args) {
            (Some(cmd), Some(args)) => cmd.into_iter().chain(args).collect(),
            (Some(cmd), None) => cmd,
            (None, Some(args)) => img_ep.into_iter().chain(args).collect(),
            (None, None) => img_ep.into_iter().chain(img_cmd).collect(),
        };
        if argv.is_empty() {
            return Err(manifest(format!("{cname}: nothing to run")));
        }
        if let Some(wd) = c["workingDir"].as_str() {
            a.push(format!("--cwd={wd}"));
        }
        a.push(image);
        a.push(id.to_string());
        a.extend(argv);
        Ok(a)
    }

    /// Whether every container is ready (readiness probes) per the prober.
    pub fn ready(&self) -> bool {
        self.prober.as_ref().and_then(|p| p.state.lock().ok().map(|s| s.ready.values().all(|r| *r))).unwrap_or(false)
    }

    /// Liveness failures seen (each would have been a kubelet restart) and probes run.
    pub fn probe_report(&self) -> (Vec<String>, u64) {
        self.prober.as_ref().and_then(|p| p.state.lock().ok().map(|s| (s.liveness_kills.clone(), s.probes_run))).unwrap_or_default()
    }

    /// Waits until the pod is ready, or fails with the containers' logs.
    pub fn wait_ready(&self, node: &Node, within: Duration) -> Result<(), PodError> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.ready() {
                return Ok(());
            }
            // A container that exited will never become ready.
            let ls = run(node.ctr().args(["task", "ls"])).unwrap_or_default();
            for c in &self.containers {
                if ls.lines().any(|l| l.starts_with(&c.id) && l.contains("STOPPED")) {
                    return Err(PodError::Failed(format!("{} on {}: container {} exited: {}", self.name, node.name, c.name, self.logs())));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(PodError::Failed(format!("{} on {} not ready after {within:?}: {}", self.name, node.name, self.logs())))
    }

    /// Every container's log (current run), for failure messages.
    pub fn logs(&self) -> String {
        self.containers
            .iter()
            .map(|c| format!("--- {} ---\n{}", c.name, std::fs::read_to_string(&c.log).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn container(&self, name: &str) -> Result<&Running, PodError> {
        self.containers.iter().find(|c| c.name == name).ok_or_else(|| PodError::Failed(format!("{}: no container {name}", self.name)))
    }

    /// SIGKILLs one container (a crash), leaves it stopped.
    pub fn kill_container(&self, node: &Node, name: &str) -> Result<(), PodError> {
        let id = self.container(name)?.id.clone();
        run(node.ctr().args(["task", "kill", "-s", "SIGKILL", &id]))?;
        wait_stopped(node, &id, Duration::from_secs(10))
    }

    /// Starts a stopped container again, as the kubelet's restart policy does (a new
    /// container, restart count + 1, same volumes).
    pub fn restart_container(&mut self, node: &Node, m: &Manifests, name: &str) -> Result<(), PodError> {
        let i = self.containers.iter().position(|c| c.name == name).ok_or_else(|| PodError::Failed(format!("no container {name}")))?;
        node.remove_container(&self.containers[i].id);
        self.containers[i].restarts += 1;
        self.run_container(node, m, i)
    }

    /// Deletes the pod as the kubelet does: each container's preStop hook, then SIGTERM, then
    /// SIGKILL once terminationGracePeriodSeconds have passed; then the pod's volumes.
    /// Returns what the hooks printed.
    pub fn terminate(mut self, node: &Node) -> Result<String, PodError> {
        self.prober = None;
        let deadline = Instant::now() + self.grace;
        let mut out = String::new();
        for c in &self.containers {
            if let Some(cmd) = c.spec["lifecycle"]["preStop"]["exec"]["command"].as_array() {
                let argv: Vec<&str> = cmd.iter().filter_map(|v| v.as_str()).collect();
                let o = node
                    .ctr()
                    .args(["task", "exec", "--exec-id", &format!("prestop-{}", c.restarts), &c.id])
                    .args(&argv)
                    .output()
                    .map_err(io("spawn ctr task exec"))?;
                out.push_str(&String::from_utf8_lossy(&o.stdout));
                out.push_str(&String::from_utf8_lossy(&o.stderr));
                if !o.status.success() {
                    // The kubelet logs a failed hook (FailedPreStopHook) and goes on.
                    out.push_str(&format!("preStop of {} failed: {}\n", c.name, o.status));
                }
            } else if !c.spec["lifecycle"]["preStop"].is_null() {
                return Err(PodError::Unsupported(format!("{}: preStop other than exec", c.name)));
            }
        }
        for c in &self.containers {
            let _ = node.ctr().args(["task", "kill", "-s", "SIGTERM", &c.id]).output();
        }
        for c in &self.containers {
            let left = deadline.saturating_duration_since(Instant::now());
            if wait_stopped(node, &c.id, left).is_err() {
                out.push_str(&format!("{} did not stop within the grace period: SIGKILL\n", c.name));
            }
            node.remove_container(&c.id);
        }
        let _ = std::fs::remove_dir_all(self.dir.join("volumes"));
        Ok(out)
    }
}

/// Waits (bounded) until task `id` is stopped or gone.
fn wait_stopped(node: &Node, id: &str, within: Duration) -> Result<(), PodError> {
    let deadline = Instant::now() + within;
    loop {
        let ls = run(node.ctr().args(["task", "ls"]))?;
        let line = ls.lines().find(|l| l.split_whitespace().next() == Some(id));
        if line.is_none_or(|l| l.contains("STOPPED")) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(PodError::Failed(format!("{id} still running after {within:?}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes a Secret/ConfigMap volume as the kubelet's atomic writer does: the files in a
/// timestamped directory, `..data` pointing at it, and each key a link through `..data`.
fn write_atomic_volume(dir: &Path, data: &BTreeMap<String, Vec<u8>>, items: Option<&Vec<Value>>, default_mode: u32) -> Result<(), PodError> {
    use std::os::unix::fs::PermissionsExt;
    let ts = dir.join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir_all(&ts).map_err(io(format!("create {}", ts.display())))?;
    let files: Vec<(String, Vec<u8>, u32)> = match items {
        Some(items) => items
            .iter()
            .map(|it| {
                let key = it["key"].as_str().unwrap_or_default();
                let path = it["path"].as_str().unwrap_or(key).to_string();
                let mode = it["mode"].as_u64().map(|m| m as u32).unwrap_or(default_mode);
                data.get(key).map(|d| (path, d.clone(), mode)).ok_or_else(|| manifest(format!("volume item {key} missing")))
            })
            .collect::<Result<_, _>>()?,
        None => data.iter().map(|(k, v)| (k.clone(), v.clone(), default_mode)).collect(),
    };
    for (path, bytes, mode) in &files {
        if path.contains('/') || path.starts_with("..") {
            return Err(PodError::Unsupported(format!("volume item path {path}")));
        }
        let f = ts.join(path);
        std::fs::write(&f, bytes).map_err(io(format!("write {}", f.display())))?;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(*mode)).map_err(io("chmod"))?;
        std::os::unix::fs::symlink(format!("..data/{path}"), dir.join(path)).map_err(io("symlink"))?;
    }
    std::os::unix::fs::symlink(ts.file_name().unwrap_or_default(), dir.join("..data")).map_err(io("symlink ..data"))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777)).map_err(io("chmod volume"))?;
    Ok(())
}

/// The whole setup: NetCluster namespaces, the registry (docker-registry) and cluster DNS
/// (dnsmasq: the headless Service's name resolves to every node) in the registry namespace, one
/// `Node` per node namespace with the given image archives imported, and the rendered release.
pub struct PodCluster {
    /// One pod per node (None while deleted).
    pub pods: Vec<Option<Pod>>,
    pub nodes: Vec<Node>,
    pub manifests: Manifests,
    pub dns: Proc,
    pub dns_ip: Ipv4Addr,
    pub deployment: crate::netcluster::Deployment,
    pub net: crate::netcluster::NetCluster,
    pub dir: PathBuf,
    generation: u32,
}

impl PodCluster {
    /// `nodes` nodes, each with `archives` imported into its containerd; nothing runs yet.
    pub fn up(prefix: &str, nodes: usize, dir: &Path, manifests: Manifests, archives: &[PathBuf]) -> Result<Self, PodError> {
        use crate::netcluster::{Deployment, NetCluster, Options, Spec, QUEUE_MS};
        let net = NetCluster::up(Spec { nodes, rate_mbit: 1000, registry_rate_mbit: 1000, delay_ms: 0, queue_ms: QUEUE_MS, small_first: false, prefix: prefix.into() });
        let deployment = Deployment::start_opts(&net, Path::new("/nonexistent/peerd"), dir, &[], Options { start_agents: false, ..Options::default() });
        let dns_ip = net.registry.ip;
        // The headless Service: its name (and every node's name) resolves to the nodes.
        let svc = manifests.find("Service", None).ok_or_else(|| manifest("no Service"))?;
        let svc_name = format!(
            "{}.{}.svc.{CLUSTER_DOMAIN}",
            svc["metadata"]["name"].as_str().unwrap_or_default(),
            svc["metadata"]["namespace"].as_str().unwrap_or("default")
        );
        let mut hosts = String::new();
        for (i, n) in net.nodes.iter().enumerate() {
            hosts.push_str(&format!("{} {svc_name}\n{} node{}\n", n.ip, n.ip, i + 1));
        }
        let hosts_file = dir.join("cluster-dns-hosts");
        std::fs::write(&hosts_file, hosts).map_err(io("write DNS hosts"))?;
        let mut dns = Proc::try_spawn(
            Command::new("ip")
                .args(["netns", "exec", &net.registry.ns, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-daemon", "--port=53"])
                .arg(format!("--listen-address={dns_ip}"))
                .arg("--bind-interfaces")
                .arg(format!("--local=/{CLUSTER_DOMAIN}/"))
                .arg(format!("--addn-hosts={}", hosts_file.display()))
                .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display())),
            dir.join("dnsmasq.log"),
        )
        .map_err(io("spawn dnsmasq"))?;
        std::thread::sleep(Duration::from_millis(300));
        if let Some(st) = dns.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            return Err(PodError::Failed(format!("dnsmasq exited ({st}): {}", dns.log_text())));
        }
        let mut ns_nodes = Vec::new();
        for (i, n) in net.nodes.iter().enumerate() {
            let node = Node::start(&format!("node{}", i + 1), &n.ns, n.ip, &dir.join(format!("node{}", i + 1)), &format!("{prefix}n{}", i + 1))?;
            for a in archives {
                node.import(a)?;
            }
            ns_nodes.push(node);
        }
        Ok(Self { pods: (0..nodes).map(|_| None).collect(), nodes: ns_nodes, manifests, dns, dns_ip, deployment, net, dir: dir.to_owned(), generation: 0 })
    }

    /// The DaemonSet's pod name on node i (a new name per rollout, as a DaemonSet's are).
    fn pod_name(&self, i: usize) -> String {
        let ds = self.manifests.daemonset().ok().and_then(|d| d["metadata"]["name"].as_str().map(str::to_owned)).unwrap_or_else(|| "pod".into());
        format!("{ds}-g{}-n{}", self.generation, i + 1)
    }

    /// Node i, mutable (e.g. to set `cgroup2_only` before its pod starts).
    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    /// Starts the DaemonSet's pod on node i and waits until it is ready.
    pub fn start_pod(&mut self, i: usize, within: Duration) -> Result<(), PodError> {
        if self.pods[i].is_some() {
            return Err(PodError::Failed(format!("node{} already runs a pod", i + 1)));
        }
        let pod = Pod::start(&self.nodes[i], &self.manifests, &self.pod_name(i), self.dns_ip)?;
        let r = pod.wait_ready(&self.nodes[i], within);
        self.pods[i] = Some(pod);
        r
    }

    /// Deletes node i's pod (preStop, SIGTERM, grace); returns the hooks' output.
    pub fn delete_pod(&mut self, i: usize) -> Result<String, PodError> {
        match self.pods[i].take() {
            Some(p) => p.terminate(&self.nodes[i]),
            None => Ok(String::new()),
        }
    }

    /// A DaemonSet rolling update with maxUnavailable 1: node by node, the old pod deleted,
    /// the new one started and ready before the next node. Returns, per node, what deleting
    /// the old pod printed (hooks; containers that needed SIGKILL) and how long it took.
    pub fn rolling_restart(&mut self, within: Duration) -> Result<Vec<(String, Duration)>, PodError> {
        self.generation += 1;
        let mut out = Vec::new();
        for i in 0..self.nodes.len() {
            let t = Instant::now();
            let text = self.delete_pod(i)?;
            out.push((text, t.elapsed()));
            self.start_pod(i, within)?;
        }
        Ok(out)
    }

    pub fn pod(&self, i: usize) -> Result<&Pod, PodError> {
        self.pods[i].as_ref().ok_or_else(|| PodError::Failed(format!("node{} runs no pod", i + 1)))
    }

    /// GET from node i's own network namespace.
    pub fn get(&self, i: usize, addr: SocketAddr, path: &str) -> Result<(u16, String), PodError> {
        self.nodes[i].http_get(addr, path, Duration::from_secs(5))
    }

    /// A Prometheus sample (first series of that name) from node i's agent's /metrics.
    pub fn metric(&self, i: usize, mirror: SocketAddr, name: &str) -> Result<f64, PodError> {
        let (status, body) = self.get(i, mirror, "/metrics")?;
        if status != 200 {
            return Err(PodError::Failed(format!("node{}: /metrics answered {status}", i + 1)));
        }
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0))
    }
}

impl Drop for PodCluster {
    fn drop(&mut self) {
        for p in &mut self.pods {
            p.take();
        }
        // Nodes (containers, containerd, shims) go before the namespaces (field order: pods,
        // nodes, ..., net).
        self.nodes.clear();
        self.dns.kill();
        // runc removes each container's cgroup, not the parent this harness names them under
        // (fails, harmlessly, while another run's containers are in it).
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir(e.path().join("peerd-pod"));
            }
        }
        let _ = std::fs::remove_dir("/sys/fs/cgroup/peerd-pod");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_normalize_as_the_kubelet_does() {
        assert_eq!(normalize_image("peerd:0.1.0"), "docker.io/library/peerd:0.1.0");
        assert_eq!(normalize_image("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(normalize_image("me/app:v1"), "docker.io/me/app:v1");
        assert_eq!(normalize_image("reg.example:5000/a/b:v2"), "reg.example:5000/a/b:v2");
        assert_eq!(normalize_image("localhost/x"), "localhost/x:latest");
        let d = format!("app@sha256:{}", "a".repeat(64));
        assert_eq!(normalize_image(&d), format!("docker.io/library/{d}"));
    }

    #[test]
    fn env_expansion_follows_kubernetes() {
        let env = vec![("HOST_IP".to_string(), "198.18.1.1".to_string()), ("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(HOST_IP):30002", &env), "198.18.1.1:30002");
        assert_eq!(expand("$(UNSET)-$(A)", &env), "$(UNSET)-x");
        assert_eq!(expand("$$(A) $$ $", &env), "$(A) $ $");
        assert_eq!(expand("é$(A", &env), "é$(A");
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity(&Value::from("1Gi"), false).unwrap(), 1 << 30);
        assert_eq!(quantity(&Value::from("128Mi"), false).unwrap(), 128 << 20);
        assert_eq!(quantity(&Value::from("100m"), true).unwrap(), 100);
        assert_eq!(quantity(&Value::from("2"), true).unwrap(), 2000);
        assert_eq!(quantity(&serde_json::json!(2), true).unwrap(), 2000);
        assert!(quantity(&Value::from("1Xi"), false).is_err());
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a*b").is_none());
    }
}
