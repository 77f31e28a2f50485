//! Real components, started the same way by integration tests and by benchmarks: Debian's
//! docker-registry, containerd, skopeo, umoci, nginx, and the peerd binary. Every process started
//! here is killed by PID on drop; callers put directories under a TempDir.
//!
//! Helpers panic on failure with a message naming the command: they run inside tests and
//! benchmarks, where a panic is the failure report.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Fails the test with a clear message when a real component is not installed (CI installs them).
/// Commands the tests run, and the Debian package that provides each.
pub const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("sysctl", "procps"),
    ("cc", "gcc"),
    ("prlimit", "util-linux"),
    ("docker-registry", "docker-registry"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("skopeo", "skopeo"),
    ("umoci", "umoci"),
    ("nginx", "nginx-light"),
    ("htpasswd", "apache2-utils"),
    ("dnsmasq", "dnsmasq-base"),
    ("curl", "curl"),
    ("busybox", "busybox"),
    ("python3", "python3"),
    ("unshare", "util-linux"),
];

/// The package that provides `tool`, for error messages.
pub fn package_of(tool: &str) -> Option<&'static str> {
    PACKAGES.iter().find(|(t, _)| *t == tool).map(|(_, p)| *p)
}

pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    let hint = package_of(tool).map_or(String::new(), |p| format!(" (apt-get install {p})"));
    assert!(found, "{tool} is not installed{hint}: `cargo xtask test` installs every package the tests need");
}

/// A loopback port free right now for both TCP and UDP, for a component to bind later.
///
/// Chosen below the kernel's ephemeral range: a port the kernel handed out (`bind(0)`) returns
/// to that range on close, and any socket numbered by the kernel in the meantime (a resolver's,
/// an agent's own client endpoint) could take it before the component binds it; CI failed once
/// on exactly that. Below the range only explicit binds compete: a counter shared by the
/// process's threads, started at a pid-derived offset, keeps parallel tests apart, and the bind
/// check skips ports something already holds.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let base = 10_000u32;
    let span = ephemeral_low.saturating_sub(base).max(1000);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = (base + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        if tcp.is_ok() && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {base}..{}", base + span)
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> Self {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Self { child: Some(child), log }
    }

    /// As `spawn`, returning the error instead of panicking (for library code).
    pub fn try_spawn(cmd: &mut Command, log: PathBuf) -> std::io::Result<Self> {
        let f = std::fs::File::create(&log)?;
        let child = cmd.stdout(Stdio::from(f.try_clone()?)).stderr(Stdio::from(f)).stdin(Stdio::null()).spawn()?;
        Ok(Self { child: Some(child), log })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until `addr` accepts connections; fails with this process's log if it exits or
    /// the bound passes.
    pub fn wait_listening(&mut self, addr: SocketAddr, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return;
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("process exited ({st}) before listening on {addr}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nothing listening on {addr} after {within:?}: {}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `url` until it answers (any HTTP status), at most `within`.
pub fn wait_http(addr: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on {addr} after {within:?}");
}

/// Debian's docker-registry (the CNCF distribution registry) on loopback, with its access log.
pub struct Registry {
    pub addr: SocketAddr,
    pub proc: Proc,
}

impl Registry {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, None)
    }

    /// With `users`, the registry requires HTTP basic auth (htpasswd) for everything.
    pub fn start_with(dir: &Path, users: Option<&[(&str, &str)]>) -> Self {
        require("docker-registry");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let cfg = dir.join("registry.yml");
        let mut auth = String::new();
        if let Some(users) = users {
            require("htpasswd");
            let file = dir.join("htpasswd");
            let mut lines = String::new();
            for (u, p) in users {
                lines.push_str(run(Command::new("htpasswd").args(["-Bbn", u, p])).trim());
                lines.push('\n');
            }
            std::fs::write(&file, lines).unwrap();
            auth = format!("auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n", file.display());
        }
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  accesslog:\n    disabled: false\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{auth}",
                dir.join("registry-data").display()
            ),
        )
        .unwrap();
        let proc = Proc::spawn(Command::new("docker-registry").arg("serve").arg(&cfg), dir.join("registry.log"));
        wait_http(addr, Duration::from_secs(10));
        Self { addr, proc }
    }

    pub fn name(&self) -> String {
        self.addr.to_string()
    }

    /// Access-log lines for `GET /v2/.../blobs/...` so far. The registry logs a request after
    /// answering it, so this first waits briefly for lines still being written.
    pub fn blob_gets(&self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(250));
        self.proc.log_text().lines().filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:")).map(str::to_owned).collect()
    }
}

/// An OCI image built locally with umoci (nothing can be pulled from the internet).
pub struct Image {
    pub layout: PathBuf,
    pub tag: String,
    /// Digests of the manifest's config and layers (what a pull fetches as blobs).
    pub blobs: Vec<String>,
}

impl Image {
    /// Builds an image with one layer per entry of `layers` (file name, size in bytes of random
    /// content).
    pub fn build(dir: &Path, layers: &[(&str, usize)]) -> Self {
        Self::build_with(dir, layers, false)
    }

    /// As [`Image::build`]; with `incompressible`, layer files are pseudo-random bytes, so the
    /// gzip'd layer blobs are as large as the files (benchmarks that move real sizes).
    pub fn build_with(dir: &Path, layers: &[(&str, usize)], incompressible: bool) -> Self {
        require("umoci");
        let layout = dir.join("layout");
        let tag = "v1".to_string();
        let img = format!("{}:{tag}", layout.display());
        run(Command::new("umoci").args(["init", "--layout"]).arg(&layout));
        run(Command::new("umoci").args(["new", "--image", &img]));
        for (i, (name, size)) in layers.iter().enumerate() {
            let bundle = dir.join(format!("bundle{i}"));
            run(Command::new("umoci").args(["unpack", "--rootless", "--image", &img]).arg(&bundle));
            let data: Vec<u8> = if incompressible {
                pseudo_random(*size as u64, i as u64 + 1)
            } else {
                (0..*size).map(|j| (j as u64 * 2654435761 % 251) as u8 ^ (i as u8)).collect()
            };
            std::fs::write(bundle.join("rootfs").join(name), data).unwrap();
            run(Command::new("umoci").args(["repack", "--image", &img]).arg(&bundle));
            let _ = std::fs::remove_dir_all(&bundle);
        }
        run(Command::new("umoci").args(["config", "--image", &img, "--config.cmd", "/bin/true"]));
        let blobs = manifest_blobs(&layout);
        Self { layout, tag, blobs }
    }

    /// Pushes to `registry` as `repo:tag` with skopeo.
    pub fn push(&self, registry: &Registry, repo: &str) {
        self.push_as(registry, repo, None)
    }

    pub fn push_as(&self, registry: &Registry, repo: &str, creds: Option<&str>) {
        require("skopeo");
        let mut cmd = Command::new("skopeo");
        if let Some(c) = creds {
            cmd.args(["copy", "--dest-creds", c]);
        } else {
            cmd.arg("copy");
        }
        run(cmd.args([
            "--dest-tls-verify=false",
            &format!("oci:{}:{}", self.layout.display(), self.tag),
            &format!("docker://{}/{repo}:{}", registry.name(), self.tag),
        ]));
    }

    /// Pushes to `registry_host` (`host:port`, HTTP or HTTPS; certificates are not checked:
    /// this only sets up the test) as `repo:tag`, with skopeo run inside `netns` if given: a
    /// registry in a NetCluster is reachable only from inside its namespaces.
    pub fn push_to(&self, netns: Option<&str>, registry_host: &str, repo: &str) {
        require("skopeo");
        run(command_in("skopeo", netns, None).args([
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:{}", self.layout.display(), self.tag),
            &format!("docker://{registry_host}/{repo}:{}", self.tag),
        ]));
    }

    pub fn blob_bytes(&self, digest: &str) -> Vec<u8> {
        std::fs::read(self.layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))).unwrap()
    }
}

/// The config and layer digests of the layout's (single) manifest, without a JSON parser: the
/// index names one manifest; the manifest lists `"digest":"sha256:..."` entries.
fn manifest_blobs(layout: &Path) -> Vec<String> {
    let index = std::fs::read_to_string(layout.join("index.json")).unwrap();
    let m = digests_in(&index).pop().expect("manifest digest in index.json");
    let manifest = std::fs::read_to_string(layout.join("blobs/sha256").join(m.trim_start_matches("sha256:"))).unwrap();
    digests_in(&manifest)
}

pub fn digests_in(json: &str) -> Vec<String> {
    json.match_indices("sha256:")
        .map(|(i, _)| json[i..i + 71].to_string())
        .filter(|d| d[7..].bytes().all(|b| b.is_ascii_hexdigit()))
        .collect()
}

/// The peerd agent binary with a mirror for `registry`.
pub struct Agent {
    pub addr: SocketAddr,
    pub data: PathBuf,
    pub proc: Proc,
}

impl Agent {
    pub fn start(bin: &Path, dir: &Path, registries: &[String], extra: &[&str]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::start_on(bin, addr, dir, registries, extra)
    }

    pub fn start_on(bin: &Path, addr: SocketAddr, dir: &Path, registries: &[String], extra: &[&str]) -> Self {
        let data = dir.join("agent");
        let mut cmd = Command::new(bin);
        cmd.arg("agent").arg("--data-dir").arg(&data).arg("--mirror-addr").arg(addr.to_string());
        cmd.arg("--no-default-registries");
        // Defaults a caller may override through `extra`. No peer endpoint: an agent alone opens
        // none, and several agents on this one host pass their own `--peer-addr` ports (the one
        // flag a user running two agents on one host needs too).
        for (flag, value) in [("--cache-size", "2GiB"), ("--upstream-timeout", "3")] {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        for r in registries {
            cmd.arg("--registry").arg(r);
        }
        cmd.args(extra).env("RUST_LOG", "peerd_agent=debug,info");
        let mut proc = Proc::spawn(&mut cmd, dir.join(format!("agent-{}.log", free_port())));
        proc.wait_listening(addr, Duration::from_secs(20));
        Self { addr, data, proc }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Agent {
    /// A failing test shows the tail of every agent's log (the agents' view of what went wrong).
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = self.proc.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("---- agent {} (log {}), last {} lines ----\n{}", self.addr, self.proc.log.display(), tail.len(), tail.join("\n"));
        }
    }
}

/// A command for `program` run inside network namespace `netns` (`ip netns exec`, which execs:
/// the child's pid is the program's) and cgroup `cgroup_procs` (that cgroup's `cgroup.procs`),
/// each only if given.
pub fn command_in(program: impl AsRef<std::ffi::OsStr>, netns: Option<&str>, cgroup_procs: Option<&Path>) -> Command {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    };
    if let Some(procs) = cgroup_procs {
        crate::cgroup::enter_on_spawn(procs, &mut c);
    }
    c
}

/// Debian's containerd with its own root, state and socket, optionally inside a node's network
/// namespace and cgroup (and then so is every `ctr`: in containerd 1.6 `ctr images pull` resolves
/// and fetches in the ctr process itself, containerd only stores and unpacks).
pub struct Containerd {
    pub sock: PathBuf,
    pub hosts: PathBuf,
    pub proc: Proc,
    pub netns: Option<String>,
    /// `cgroup.procs` of the cgroup containerd and every ctr run in.
    pub cgroup_procs: Option<PathBuf>,
}

impl Containerd {
    pub fn start(dir: &Path) -> Self {
        Self::start_in(dir, None, None)
    }

    /// Starts containerd (state under `dir/containerd`) in `netns` and `cgroup` when given. The
    /// cgroup must outlive this (its drop kills whatever is left inside).
    pub fn start_in(dir: &Path, netns: Option<&str>, cgroup: Option<&crate::cgroup::Cgroup>) -> Self {
        require("containerd");
        require("ctr");
        let root = dir.join("containerd");
        std::fs::create_dir_all(&root).unwrap();
        let sock = root.join("ctd.sock");
        let cfg = root.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n[grpc]\n  address = \"{}\"\n[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                root.join("root").display(),
                root.join("state").display(),
                sock.display()
            ),
        )
        .unwrap();
        let cgroup_procs = cgroup.map(|c| c.procs_path());
        let mut cmd = command_in("containerd", netns, cgroup_procs.as_deref());
        let mut proc = Proc::spawn(cmd.arg("--config").arg(&cfg), root.join("containerd.log"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if let Some(st) = proc.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("containerd exited ({st}): {}", proc.log_text());
            }
            assert!(Instant::now() < deadline, "containerd did not start: {}", proc.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { sock, hosts: root.join("hosts"), proc, netns: netns.map(str::to_owned), cgroup_procs }
    }

    /// `ctr --address <sock>`, in containerd's namespace and cgroup.
    pub fn ctr(&self) -> Command {
        let mut c = command_in("ctr", self.netns.as_deref(), self.cgroup_procs.as_deref());
        c.arg("--address").arg(&self.sock);
        c
    }

    /// Writes hosts.toml for `registry` with `mirror` first and the registry itself as fallback.
    pub fn mirror(&self, registry: &str, mirror: SocketAddr) {
        let d = self.hosts.join(registry);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hosts.toml"),
            format!("server = \"http://{registry}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
        )
        .unwrap();
    }

    /// Pulls over plain HTTP with the hosts.toml files of `mirror` (the mirror mode).
    pub fn pull(&self, reference: &str) -> Result<String, String> {
        let mut cmd = self.ctr();
        cmd.args(["images", "pull", "--plain-http", "--hosts-dir"]).arg(&self.hosts).arg(reference);
        output_of(cmd)
    }

    /// Pulls with no hosts.toml at all (no `--hosts-dir`, so no mirror configured: what
    /// transparent mode must work with). `plain_http`: `--plain-http` (ctr 1.6 otherwise speaks
    /// HTTPS only, even to an IP:port, and does not fall back).
    pub fn pull_plain(&self, reference: &str, plain_http: bool) -> Result<String, String> {
        self.pull_with(reference, plain_http, &[])
    }

    /// `pull_plain` with extra environment for ctr, e.g. `("SSL_CERT_FILE", ca.pem)`: Go on Linux
    /// then trusts exactly the certificates in that file (instead of the system's).
    pub fn pull_with(&self, reference: &str, plain_http: bool, env: &[(&str, &str)]) -> Result<String, String> {
        let mut cmd = self.ctr();
        cmd.args(["images", "pull"]);
        if plain_http {
            cmd.arg("--plain-http");
        }
        cmd.arg(reference).envs(env.iter().copied());
        output_of(cmd)
    }

    /// Removes the image and every blob, so the next pull must fetch everything again (waits,
    /// bounded, until containerd's content store is really empty: removal and GC are async).
    pub fn forget(&self, reference: &str) {
        let _ = self.ctr().args(["images", "rm", "--sync", reference]).output();
        for _ in 0..50 {
            let list = run(self.ctr().args(["content", "ls", "-q"]));
            if list.split_whitespace().next().is_none() {
                return;
            }
            for d in list.split_whitespace() {
                let _ = self.ctr().args(["content", "rm", d]).output();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("containerd still holds content after removing it: {}", run(self.ctr().args(["content", "ls"])));
    }

    /// sha256 of a blob in containerd's content store.
    pub fn content(&self, digest: &str) -> Vec<u8> {
        let out = self.ctr().args(["content", "get", digest]).output().unwrap();
        assert!(out.status.success(), "ctr content get {digest}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }
}

/// Stdout of a finished command, or its stdout and stderr as the error.
fn output_of(mut cmd: Command) -> Result<String, String> {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// A certificate authority for tests (ECDSA P-256, made with rcgen): its certificate is written
/// to `ca_pem_path` for clients to trust (`SSL_CERT_FILE` for Go programs and the agent), and it
/// issues server certificates.
pub struct TestCa {
    pub dir: PathBuf,
    pub ca_pem_path: PathBuf,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A fresh CA; files go to `dir` (created).
    pub fn create(dir: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        std::fs::create_dir_all(dir).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "peerd test CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let issuer = rcgen::CertifiedIssuer::self_signed(p, KeyPair::generate().expect("CA key")).expect("CA certificate");
        let ca_pem_path = dir.join("ca.pem");
        std::fs::write(&ca_pem_path, issuer.pem()).unwrap();
        Self { dir: dir.to_owned(), ca_pem_path, issuer }
    }

    /// A server certificate for DNS name `name` (unless it is an IP address) and `ips`, written
    /// as `<dir>/<name>.crt` and `<dir>/<name>.key` (PEM, PKCS#8 key). Returns (cert, key).
    pub fn issue(&self, name: &str, ips: &[std::net::IpAddr]) -> (PathBuf, PathBuf) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType};
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap_or_else(|e| panic!("certificate name {name:?}: {e}"));
        p.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = p.signed_by(&key, &self.issuer).expect("server certificate");
        let stem = name.replace(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'), "_");
        let (crt, keyf) = (self.dir.join(format!("{stem}.crt")), self.dir.join(format!("{stem}.key")));
        std::fs::write(&crt, cert.pem()).unwrap();
        std::fs::write(&keyf, key.serialize_pem()).unwrap();
        (crt, keyf)
    }
}

/// Debian's nginx serving `root` on loopback (sendfile on), with an access log.
pub struct Nginx {
    pub addr: SocketAddr,
    pub access_log: PathBuf,
    pub proc: Proc,
}

impl Nginx {
    pub fn start(dir: &Path, root: &Path) -> Self {
        Self::start_with(dir, root, "")
    }

    /// As `start`, with `http_extra` added to the `http` block (e.g. `tcp_nopush on;`).
    pub fn start_with(dir: &Path, root: &Path, http_extra: &str) -> Self {
        require("nginx");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(prefix.join("tmp")).unwrap();
        let access_log = prefix.join("access.log");
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log {log};\n  client_body_temp_path {p}/tmp; proxy_temp_path {p}/tmp; fastcgi_temp_path {p}/tmp; uwsgi_temp_path {p}/tmp; scgi_temp_path {p}/tmp;\n  sendfile on;\n  {http_extra}\n  default_type application/octet-stream;\n  server {{ listen {addr}; root {root}; }}\n}}\n",
                p = prefix.display(),
                log = access_log.display(),
                root = root.display()
            ),
        )
        .unwrap();
        let proc = Proc::spawn(Command::new("nginx").arg("-c").arg(&conf).arg("-p").arg(&prefix), prefix.join("stderr.log"));
        wait_http(addr, Duration::from_secs(10));
        Self { addr, access_log, proc }
    }

    pub fn requests(&self) -> usize {
        std::fs::read_to_string(&self.access_log).map(|s| s.lines().count()).unwrap_or(0)
    }

    /// GET requests so far (HEADs are the agent's access checks, not data).
    pub fn gets(&self) -> usize {
        std::fs::read_to_string(&self.access_log).map(|s| s.lines().filter(|l| l.contains("\"GET ")).count()).unwrap_or(0)
    }
}

/// Sends raw bytes as an HTTP/1.1 request (no URL normalisation) and returns (status, body).
pub fn raw_request(addr: SocketAddr, head: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// An HTTP client for tests (installs the process's TLS provider first, as the agent does).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// Deterministic pseudo-random bytes (xorshift) for benchmarks: comparable across runs, and
/// incompressible.
pub fn pseudo_random(size: u64, seed: u64) -> Vec<u8> {
    let mut x: u64 = seed | 1;
    let mut v = Vec::with_capacity(size as usize);
    while (v.len() as u64) < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size as usize);
    v
}

/// The machine's CPU time so far as (busy, total) jiffies over all cores (`/proc/stat`; idle and
/// iowait count as not busy). Two readings give the share of the machine a run kept busy.
pub fn machine_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Share of the machine's CPU kept busy between two `machine_cpu` readings (0..1).
pub fn busy_between(a: (u64, u64), b: (u64, u64)) -> f64 {
    let total = b.1.saturating_sub(a.1);
    if total == 0 {
        return f64::NAN;
    }
    b.0.saturating_sub(a.0) as f64 / total as f64
}

/// utime + stime of a process so far, in seconds (0 if it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// user+sys seconds of this process's waited-for children (getrusage).
pub fn children_cpu() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
