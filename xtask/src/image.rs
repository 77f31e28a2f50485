//! OCI images without Docker: a root filesystem made of host binaries and exactly the shared
//! libraries `ldd` says they load, plus a few files (CA bundle, passwd), packed by umoci into an
//! OCI layout and archived as a tar of that layout (what `ctr images import` and
//! `skopeo copy oci-archive:...` read).
//!
//! `cargo xtask image` builds the agent's image with it (`target/peerd-image.tar`, root
//! filesystem kept at `target/peerd-image/rootfs`, which `deploy/Dockerfile` copies, so a Docker
//! build gives the same image); the pod harness builds a small busybox image the same way for
//! the chart's hosts-toml containers (no registry on the internet is reachable here).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Errors building an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{cmd} failed: {output}")]
    Command { cmd: String, output: String },
    #[error("{0}")]
    Invalid(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// Runs a command; its stdout, or an error with its output.
fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(io(format!("spawn {shown}")))?;
    if !out.status.success() {
        return Err(ImageError::Command {
            cmd: shown,
            output: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What goes into an image.
#[derive(Clone, Debug, Default)]
pub struct Spec {
    /// Executables: (host path, path in the image). Their shared libraries come along.
    pub binaries: Vec<(PathBuf, String)>,
    /// Plain files: (host path, path in the image, mode).
    pub files: Vec<(PathBuf, String, u32)>,
    /// Files with given contents: (path in the image, contents, mode).
    pub contents: Vec<(String, String, u32)>,
    /// Symbolic links: (path in the image, target).
    pub symlinks: Vec<(String, String)>,
    /// Empty directories: (path, mode).
    pub dirs: Vec<(String, u32)>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// `user[:group]` of the image config.
    pub user: String,
    pub labels: Vec<(String, String)>,
    /// The full reference the archive names the image by (`io.containerd.image.name`), e.g.
    /// `docker.io/library/peerd:0.1.0`; its tag is also the OCI `ref.name`.
    pub reference: String,
}

/// A built image.
#[derive(Clone, Debug)]
pub struct Built {
    pub archive: PathBuf,
    pub rootfs: PathBuf,
    pub reference: String,
    /// Paths in the image (files and links), sorted: what the test checks nothing leaked into.
    pub paths: Vec<String>,
}

/// The shared objects `ldd` lists for `bin` (the dynamic loader included), as absolute host
/// paths; empty for a static binary.
pub fn shared_libraries(bin: &Path) -> Result<Vec<String>, ImageError> {
    let out = Command::new("ldd").arg(bin).output().map_err(io("spawn ldd"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd says "not a dynamic executable" (exit 1) for static binaries.
        let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        if all.contains("not a dynamic executable") || all.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(ImageError::Command { cmd: format!("ldd {}", bin.display()), output: all });
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(ImageError::Invalid(format!("{}: a library is missing on this host: {line}", bin.display())));
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            libs.push(path.to_string());
        }
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// A path in the image under `rootfs` (`/a/b` -> `rootfs/a/b`).
fn in_root(rootfs: &Path, p: &str) -> Result<PathBuf, ImageError> {
    let rel = p.trim_start_matches('/');
    if rel.is_empty() || rel.split('/').any(|c| c == ".." || c.is_empty()) {
        return Err(ImageError::Invalid(format!("bad path in image: {p:?}")));
    }
    Ok(rootfs.join(rel))
}

fn copy_file(src: &Path, dst: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    }
    // fs::copy follows symlinks: the image gets the file, not a link into the host.
    std::fs::copy(src, dst).map_err(io(format!("copy {} to {}", src.display(), dst.display())))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode)).map_err(io(format!("chmod {}", dst.display())))?;
    Ok(())
}

/// Populates `rootfs` (created empty) from `spec`.
pub fn populate(rootfs: &Path, spec: &Spec) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    if rootfs.exists() {
        std::fs::remove_dir_all(rootfs).map_err(io(format!("remove {}", rootfs.display())))?;
    }
    std::fs::create_dir_all(rootfs).map_err(io(format!("create {}", rootfs.display())))?;
    for (src, dst) in &spec.binaries {
        copy_file(src, &in_root(rootfs, dst)?, 0o755)?;
        for lib in shared_libraries(src)? {
            let d = in_root(rootfs, &lib)?;
            if !d.exists() {
                copy_file(Path::new(&lib), &d, 0o755)?;
            }
        }
    }
    for (src, dst, mode) in &spec.files {
        copy_file(src, &in_root(rootfs, dst)?, *mode)?;
    }
    for (dst, text, mode) in &spec.contents {
        let d = in_root(rootfs, dst)?;
        if let Some(parent) = d.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }
        std::fs::write(&d, text).map_err(io(format!("write {}", d.display())))?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(*mode)).map_err(io(format!("chmod {}", d.display())))?;
    }
    for (dst, target) in &spec.symlinks {
        let d = in_root(rootfs, dst)?;
        if let Some(parent) = d.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }
        std::os::unix::fs::symlink(target, &d).map_err(io(format!("symlink {}", d.display())))?;
    }
    for (dst, mode) in &spec.dirs {
        let d = in_root(rootfs, dst)?;
        std::fs::create_dir_all(&d).map_err(io(format!("create {}", d.display())))?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(*mode)).map_err(io(format!("chmod {}", d.display())))?;
    }
    Ok(())
}

/// Every path under `rootfs` (files, links and directories), as absolute image paths, sorted.
pub fn list_paths(rootfs: &Path) -> Result<Vec<String>, ImageError> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), ImageError> {
        for e in std::fs::read_dir(dir).map_err(io(format!("list {}", dir.display())))? {
            let e = e.map_err(io(format!("list {}", dir.display())))?;
            let p = e.path();
            let rel = p.strip_prefix(base).map_err(|_| ImageError::Invalid(format!("{} outside {}", p.display(), base.display())))?;
            out.push(format!("/{}", rel.display()));
            if e.file_type().map_err(io(format!("stat {}", p.display())))?.is_dir() {
                walk(base, &p, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(rootfs, rootfs, &mut out)?;
    out.sort();
    Ok(out)
}

/// Builds the image: `work/rootfs` from `spec`, an OCI layout under `work/layout`, and the
/// archive `archive` (a tar of the layout, whose index names the image `spec.reference`).
pub fn build(spec: &Spec, work: &Path, archive: &Path) -> Result<Built, ImageError> {
    let tag = spec
        .reference
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .map(|(_, t)| t.to_string())
        .ok_or_else(|| ImageError::Invalid(format!("reference {:?} needs a :tag", spec.reference)))?;
    let rootfs = work.join("rootfs");
    populate(&rootfs, spec)?;
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    for d in [&layout, &bundle] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(io(format!("remove {}", d.display())))?;
        }
    }
    let img = format!("{}:{tag}", layout.display());
    run(Command::new("umoci").args(["init", "--layout"]).arg(&layout))?;
    run(Command::new("umoci").args(["new", "--image", &img]))?;
    // Unpacked rootless so that umoci keeps no ownership map; the files are root's anyway.
    run(Command::new("umoci").args(["unpack", "--rootless", "--image", &img]).arg(&bundle))?;
    run(Command::new("cp").arg("-a").arg(format!("{}/.", rootfs.display())).arg(bundle.join("rootfs")))?;
    run(Command::new("umoci").args(["repack", "--image", &img]).arg(&bundle))?;
    let mut cfg = Command::new("umoci");
    cfg.args(["config", "--image", &img, "--os", "linux", "--architecture", "amd64", "--config.workingdir", "/"]);
    cfg.args(["--clear=config.entrypoint", "--clear=config.cmd", "--clear=config.env"]);
    for e in &spec.entrypoint {
        cfg.args(["--config.entrypoint", e]);
    }
    for c in &spec.cmd {
        cfg.args(["--config.cmd", c]);
    }
    for e in &spec.env {
        cfg.args(["--config.env", e]);
    }
    if !spec.user.is_empty() {
        cfg.args(["--config.user", &spec.user]);
    }
    for (k, v) in &spec.labels {
        cfg.args(["--config.label", &format!("{k}={v}")]);
    }
    run(&mut cfg)?;
    run(Command::new("umoci").args(["gc", "--layout"]).arg(&layout))?;
    let _ = std::fs::remove_dir_all(&bundle);

    // The index names the image with its full reference too (containerd's annotation), so
    // `ctr images import` registers it under that name without --base-name.
    let index_path = layout.join("index.json");
    let text = std::fs::read_to_string(&index_path).map_err(io("read index.json"))?;
    let mut index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ImageError::Invalid(format!("index.json: {e}")))?;
    let manifests = index
        .get_mut("manifests")
        .and_then(|m| m.as_array_mut())
        .ok_or_else(|| ImageError::Invalid("index.json has no manifests".into()))?;
    if manifests.len() != 1 {
        return Err(ImageError::Invalid(format!("index.json: {} manifests, expected 1", manifests.len())));
    }
    let ann = manifests[0]
        .as_object_mut()
        .ok_or_else(|| ImageError::Invalid("index.json manifest is not an object".into()))?
        .entry("annotations")
        .or_insert_with(|| serde_json::json!({}));
    if let Some(a) = ann.as_object_mut() {
        a.insert("io.containerd.image.name".into(), serde_json::Value::String(spec.reference.clone()));
        a.insert("org.opencontainers.image.ref.name".into(), serde_json::Value::String(tag));
    }
    std::fs::write(&index_path, serde_json::to_vec(&index).map_err(|e| ImageError::Invalid(format!("index.json: {e}")))?)
        .map_err(io("write index.json"))?;

    if let Some(parent) = archive.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    }
    let part = archive.with_extension("tar.part");
    run(Command::new("tar")
        .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&layout)
        .arg("-cf")
        .arg(&part)
        .args(["oci-layout", "index.json", "blobs"]))?;
    std::fs::rename(&part, archive).map_err(io(format!("rename to {}", archive.display())))?;
    Ok(Built { archive: archive.to_owned(), rootfs: rootfs.clone(), reference: spec.reference.clone(), paths: list_paths(&rootfs)? })
}

/// The files every image here carries besides binaries and libraries: root and nobody in
/// passwd/group (the chart runs as uid 0), a hosts lookup order, and a writable-looking /tmp
/// (read-only anyway under readOnlyRootFilesystem).
fn base(spec: &mut Spec) {
    spec.contents.push(("/etc/passwd".into(), "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n".into(), 0o644));
    spec.contents.push(("/etc/group".into(), "root:x:0:\nnogroup:x:65534:\n".into(), 0o644));
    spec.contents.push(("/etc/nsswitch.conf".into(), "hosts: files dns\n".into(), 0o644));
    spec.dirs.push(("/tmp".into(), 0o1777));
    spec.dirs.push(("/root".into(), 0o700));
}

/// The host's CA bundle (Debian's ca-certificates), which the agent verifies upstream
/// registries against (rustls-native-certs reads this path).
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The agent's image: the peerd binary at /usr/local/bin/peerd (entrypoint, `agent` as the
/// default command), the libraries it loads, the CA bundle, passwd/group. Nothing else: no shell.
pub fn agent_spec(peerd: &Path, version: &str) -> Spec {
    let mut spec = Spec {
        binaries: vec![(peerd.to_owned(), "/usr/local/bin/peerd".into())],
        files: vec![(PathBuf::from(CA_BUNDLE), CA_BUNDLE.into(), 0o644)],
        entrypoint: vec!["/usr/local/bin/peerd".into()],
        cmd: vec!["agent".into()],
        // NO_COLOR: the agent's text logs (tracing-subscriber) are colored unless it is set, and
        // a container's stdout is a log file, not a terminal (kubectl logs showed escape codes).
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into(), format!("SSL_CERT_FILE={CA_BUNDLE}"), "NO_COLOR=1".into()],
        user: "0:0".into(),
        labels: vec![
            ("org.opencontainers.image.title".into(), "peerd".into()),
            ("org.opencontainers.image.version".into(), version.into()),
            ("org.opencontainers.image.licenses".into(), "Apache-2.0".into()),
        ],
        reference: format!("docker.io/library/peerd:{version}"),
        ..Spec::default()
    };
    base(&mut spec);
    spec
}

/// A busybox image from the host's busybox (Debian's, with its libraries): `sh` and the applets
/// the chart's hosts-toml script uses, for the harness (it stands in for `busybox:<tag>`).
pub fn busybox_spec(reference: &str) -> Result<Spec, ImageError> {
    let bb = ["/usr/bin/busybox", "/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::Invalid("busybox is not installed (apt-get install busybox)".into()))?;
    let mut spec = Spec {
        binaries: vec![(bb, "/bin/busybox".into())],
        cmd: vec!["sh".into()],
        env: vec!["PATH=/bin".into()],
        reference: reference.to_string(),
        ..Spec::default()
    };
    for applet in ["sh", "cat", "mv", "rm", "rmdir", "mkdir", "grep", "sleep", "ls", "echo", "test", "[", "id", "true"] {
        spec.symlinks.push((format!("/bin/{applet}"), "busybox".into()));
    }
    base(&mut spec);
    Ok(spec)
}

/// The workspace's version (the image tag; the chart's appVersion is the same).
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// `cargo xtask image`: the agent's image from `peerd` (the release binary) into
/// `target/peerd-image.tar` (root filesystem at `target/peerd-image/rootfs`). As root, the
/// binary is also started with nothing but that root filesystem (`chroot ... version`), so a
/// library the image lacks fails the build.
pub fn build_agent(peerd: &Path, target: &Path) -> Result<Built, ImageError> {
    let spec = agent_spec(peerd, version());
    let built = build(&spec, &target.join("peerd-image"), &target.join("peerd-image.tar"))?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let out = run(Command::new("chroot").arg(&built.rootfs).args(["/usr/local/bin/peerd", "version"]).env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))?;
        if out.trim().is_empty() {
            return Err(ImageError::Invalid("`peerd version` in the image's root printed nothing".into()));
        }
    }
    Ok(built)
}
