//! Builds the kernel programs (crate `jitgate-ebpf`) for the BPF target with the nightly
//! toolchain and `bpf-linker`, and leaves the object in `OUT_DIR` for `include_bytes_aligned!`.
//! With `AYA_BUILD_SKIP=1` (tooling that never loads programs) an empty object is embedded
//! and the daemon refuses to start with a message saying so.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    let object = std::path::Path::new(&out_dir).join("jitgate-ebpf");
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        std::fs::write(&object, []).context("writing the empty object")?;
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to ebpf/")?;
    aya_build::build_ebpf(
        [Package {
            name: "jitgate-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
