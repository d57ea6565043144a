//! Rebuilds the eBPF object when the linker changes (it is an undeclared dependency).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
