//! The kernel programs link with `bpf-linker`, a binary cargo knows nothing about. Rebuild
//! whenever the linker on PATH changes, and fail early with the command that installs it.
fn main() {
    let bpf_linker = which::which("bpf-linker").unwrap_or_else(|_| {
        panic!("bpf-linker is not on PATH; run `cargo xtask setup` to install it (LLVM 22 build)")
    });
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
