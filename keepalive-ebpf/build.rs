//! The build links with `bpf-linker`, a binary cargo does not know about. Rebuild when the one on
//! PATH changes (`cargo xtask` puts the pinned build first on PATH).
fn main() {
    match which::which("bpf-linker") {
        Ok(linker) => println!("cargo::rerun-if-changed={}", linker.display()),
        Err(err) => {
            println!("cargo::warning=bpf-linker not found on PATH ({err}); run `cargo xtask build`")
        }
    }
}
