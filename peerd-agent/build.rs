//! Embeds the kernel object built by `cargo xtask build` (crate `peerd-ebpf`, bin `peerd`).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=PEERD_EBPF_OBJECT");
    let path = match std::env::var_os("PEERD_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest.join("../target"));
            target.join("bpfel-unknown-none/release/peerd")
        }
    };
    println!("cargo:rerun-if-changed={}", path.display());
    if !path.is_file() {
        panic!(
            "kernel programs not built: {} is missing. Run `cargo xtask build` (it builds peerd-ebpf \
             for bpfel-unknown-none and installs what it needs), or set PEERD_EBPF_OBJECT.",
            path.display()
        );
    }
    let path = path.canonicalize().expect("canonicalize kernel object path");
    println!("cargo:rustc-env=PEERD_EBPF_OBJECT={}", path.display());
}
