#!/usr/bin/env bash
# Builds `hat` with CUDA (`cargo build --release -p hat-cli --features cuda`) on a machine with no
# CUDA toolkit and no GPU, and checks that the binary still starts without CUDA.
#
#   scripts/build-cuda.sh   -> target/cuda/hat with target/cuda/lib/, and target/cuda/hat-cuda.tar.xz
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh    # another GPU generation (default 90: H100/H200)
#
# The compute capability is the GPU's `major minor` as one number: `nvidia-smi --query-gpu=compute_cap
# --format=csv` prints it (8.0 A100 -> 80, 8.9 L4/L40 -> 89, 9.0 H100/H200 -> 90).
#
# What it puts in place, all under target/cuda-toolchain:
# - NVIDIA's CUDA 13.0 compiler from PyPI in a virtual environment (nvcc, its C++ front end, the
#   NVVM back end, CCCL's headers, the runtime library). Pinned to 13.0: the CUDA driver 580 series
#   runs 13.0 and refuses PTX from a newer compiler.
# - A toolkit-shaped directory (CUDA_HOME) whose lib64 holds what the final link asks for:
#   - candle-kernels links its static kernels against `-lcudart`: here `libcudart.so` is a linker
#     script naming the wheel's static runtime (libcudart_static.a), so the runtime is inside `hat`.
#     It opens the driver only on the first CUDA call, so it costs nothing on a machine without one.
#   - cudarc (through candle) links `-lcuda -lnvrtc -lcublas -lcublasLt -lcurand` dynamically, and
#     the wheels do not ship those. The link gets a filter library for each instead (libhat-cuda-*.so):
#     it defines every function cudarc declares, and is an ELF auxiliary filter of the real library
#     (libcuda.so.1, libnvrtc.so.13, ...). When the loader finds the real library, on
#     LD_LIBRARY_PATH or in the system's directories, every symbol comes from it; when it finds none,
#     the filter's own definitions stand in (each aborts with the library's name if ever called, and
#     `--device cuda` refuses in one line before any is). The filters ship beside the binary in
#     lib/ (the binary's RUNPATH is $ORIGIN/lib, see cli/build.rs), so it starts with or without CUDA.
#
# At run time on the GPU machine, its own libraries are used: the directories holding libcuda.so.1
# (the driver) and CUDA 13's libcublas, libcublasLt, libcurand and libnvrtc must be on
# LD_LIBRARY_PATH or in the system's. The script prints the line.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
tc=$root/target/cuda-toolchain
venv=$tc/venv
pins=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
    nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88)

step() { echo "== $*" >&2; }

if [[ ! -x $venv/bin/python ]]; then
    step "installing CUDA 13.0's compiler from PyPI into $venv"
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
cu=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[[ -x $cu/bin/nvcc ]] || { echo "error: nvcc not found under $cu after installing ${pins[*]}" >&2; exit 1; }

step "preparing the link (CUDA_HOME=$tc/cuda, filters in target/cuda/lib)"
home=$tc/cuda
rm -rf "$home" && mkdir -p "$home/lib64"
for d in bin include nvvm; do ln -s "$cu/$d" "$home/$d"; done
echo "INPUT($cu/lib/libcudart_static.a)" >"$home/lib64/libcudart.so"
cargo fetch --quiet
cudarc=$(cargo metadata --format-version 1 --features hat-cli/cuda 2>/dev/null |
    python3 -c 'import json, sys, os; print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
out=$root/target/cuda
rm -rf "$out/lib" && mkdir -p "$out/lib"
for lib in cuda:driver:libcuda.so.1 nvrtc:nvrtc:libnvrtc.so.13 cublas:cublas:libcublas.so.13 \
    cublasLt:cublaslt:libcublasLt.so.13 curand:curand:libcurand.so.10; do
    IFS=: read -r name module real <<<"$lib"
    {
        echo '#include <stdio.h>'
        echo '#include <stdlib.h>'
        echo "static void missing(const char *f) { fprintf(stderr, \"hat: %s called, but $real was not loaded\\n\", f); abort(); }"
        sed -n 's/^pub unsafe fn \([A-Za-z0-9_]*\)(.*/void \1(void) { missing("\1"); }/p' "$cudarc/src/$module/sys/mod.rs" | sort -u
    } >"$tc/$name.c"
    grep -q '^void ' "$tc/$name.c" || { echo "error: no function names found in $cudarc/src/$module/sys/mod.rs" >&2; exit 1; }
    # Linked as -l$name, recorded as libhat-cuda-$name.so, filtering $real.
    cc -shared -fPIC -O1 -o "$home/lib64/lib$name.so" "$tc/$name.c" -Wl,-soname,"libhat-cuda-$name.so" -Wl,--auxiliary,"$real"
    cp "$home/lib64/lib$name.so" "$out/lib/libhat-cuda-$name.so"
done

step "cargo build --release -p hat-cli --features cuda (compute capability $CUDA_COMPUTE_CAP)"
PATH=$cu/bin:$PATH CUDA_HOME=$home cargo build --release -p hat-cli --features cuda
cp target/release/hat "$out/hat"

step "checking the binary"
needed=$(readelf -d "$out/hat" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
readelf -d "$out/hat" | grep -q 'RUNPATH.*\$ORIGIN/lib' || { echo "error: $out/hat has no RUNPATH \$ORIGIN/lib (cli/build.rs)" >&2; exit 1; }
[[ $needed == *libcudart* ]] && { echo "error: $out/hat needs a shared libcudart; it should hold the static runtime" >&2; exit 1; }
env -u LD_LIBRARY_PATH "$out/hat" --version >/dev/null
# With no CUDA library to be found, --device cuda must refuse in one line, not crash.
if msg=$(env -u LD_LIBRARY_PATH "$out/hat" serve cloud --package /nonexistent --device cuda 2>&1); then
    echo "error: --device cuda succeeded on a machine without CUDA?" >&2
    exit 1
fi
case $msg in
"error: no CUDA driver here"* | "error: the CUDA library"*) ;;
*)
    echo "error: --device cuda without CUDA did not say why: $msg" >&2
    exit 1
    ;;
esac
# With a stand-in driver on LD_LIBRARY_PATH (no GPU, one cuInit that says so), the filters must hand
# the calls over to it: the refusal then quotes it.
fake=$tc/fake-driver
mkdir -p "$fake"
cat >"$fake/cuda.c" <<'C'
int cuInit(unsigned flags) { (void)flags; return 100; }
int cuGetErrorString(int e, const char **s) { (void)e; *s = "no device (stand-in driver)"; return 0; }
int cuGetErrorName(int e, const char **s) { (void)e; *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
C
cc -shared -fPIC -o "$fake/libcuda.so.1" "$fake/cuda.c" -Wl,-soname,libcuda.so.1
echo 'void unused(void) {}' >"$fake/empty.c"
for so in libnvrtc.so.13 libcublasLt.so.13 libcublas.so.13 libcurand.so.10; do
    cc -shared -fPIC -o "$fake/$so" "$fake/empty.c" -Wl,-soname,"$so"
done
stand_in=$(LD_LIBRARY_PATH=$fake "$out/hat" serve cloud --package /nonexistent --device cuda 2>&1 || true)
if [[ $stand_in != *"stand-in driver"* ]]; then
    echo "error: with a stand-in libcuda.so.1 on LD_LIBRARY_PATH, hat did not call it through its filter library: $stand_in" >&2
    exit 1
fi
strip -o "$out/hat.stripped" "$out/hat"
tar -C "$out" --transform 's,^hat.stripped$,hat,' -cJf "$out/hat-cuda.tar.xz" hat.stripped lib
rm "$out/hat.stripped"
# target/release/hat is the CPU build again at the next `cargo build --release`; the CUDA one stays here.
echo "built $out/hat with $out/lib ($(du -h "$out/hat" | cut -f1); stripped and packed with lib/ as $out/hat-cuda.tar.xz, $(du -h "$out/hat-cuda.tar.xz" | cut -f1))" >&2
echo "it needs: $needed" >&2
echo "without CUDA it says: $msg" >&2
echo "with a stand-in driver it says: $stand_in" >&2
echo "on a GPU machine whose CUDA 13 libraries are not in the system's directories, before running it:" >&2
echo "  export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:\$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], \"cu13/lib\"))'):\$LD_LIBRARY_PATH" >&2
echo "$out/hat"
