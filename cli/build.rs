//! A `cuda` build of `hat` looks for libraries in `lib/` beside the binary first (an ELF RUNPATH of
//! `$ORIGIN/lib`). `scripts/build-cuda.sh` puts there the small filter libraries it linked against
//! in place of the CUDA libraries: each hands its symbols over to the machine's real library when
//! one is found (an auxiliary filter), so the binary starts with or without CUDA. A CPU build is
//! unchanged.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if linux && std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN/lib");
    }
}
