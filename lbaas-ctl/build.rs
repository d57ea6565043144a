//! Builds the XDP program (`lbaas-ebpf`) with the nightly toolchain and bpf-linker and leaves
//! the object in `OUT_DIR/lbaas`, where `datapath` embeds it.
//!
//! Modelled on aya-build, with one difference that matters: the program is compiled for BPF
//! CPU v3, because the strict global round robin needs the fetch-and-add atomic (and v3 gives
//! 32-bit jumps, which the verifier likes), and told that misaligned loads and stores are
//! allowed, as they are on x86-64 (and arm64), where the verifier checks alignment only when
//! asked to: a header field at an odd offset (an IPv4 address 26 bytes into the frame) is then
//! one load, not four byte loads and three shifts and ors. `LBAAS_SKIP_EBPF=1` embeds an empty
//! object instead, for `cargo check`/`clippy` on machines without the eBPF toolchain.
use std::{
    env,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("lbaas");
    println!("cargo:rerun-if-env-changed=LBAAS_SKIP_EBPF");
    if env::var("LBAAS_SKIP_EBPF").is_ok_and(|v| v == "1") {
        std::fs::write(&object, [])?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let workspace = manifest_dir.parent().context("no workspace dir")?;
    for dir in ["lbaas-ebpf", "lbaas-common"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "lbaas-ebpf",
        "--bins",
    ])
    .args([
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(workspace)
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            "--cfg=bpf_target_arch=\"x86_64\"",
            "-Ctarget-cpu=v3",
            "-Ctarget-feature=+allows-misaligned-mem-access",
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
        ]
        .join("\x1f"),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(key);
    }
    let output = cmd.output().context(
        "running `rustup run nightly cargo build` for lbaas-ebpf (run `cargo xtask setup`)",
    )?;
    if !output.status.success() {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("cargo:warning={line}");
        }
        bail!(
            "building the XDP program failed (is the eBPF toolchain installed? run `cargo xtask setup`):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/lbaas");
    std::fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    Ok(())
}
