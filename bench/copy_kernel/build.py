"""Compiles bench/copy_kernel/copy_kernel.cu with nvcc into a shared library under build/bench/
(git-ignored), on demand: the library's name holds a hash of the source, the JAX version (its
FFI headers) and the target architectures, so an unchanged build is reused.

    python bench/copy_kernel/build.py            # prints the library's path
    python bench/copy_kernel/build.py --verbose  # ... and ptxas's register report

Architectures: $CUDAARCHS if set (CMake style, "90" or "80;90", "-real" suffixes allowed),
else 90. Flags: -O3 -std=c++17 --shared -Xcompiler -fPIC, the FFI headers as system headers
(their own warnings are not ours).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("copy_kernel.cu")
BUILD_DIR = Path(__file__).resolve().parents[2] / "build" / "bench"


def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME or /usr/local/cuda; None when there is none."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def architectures() -> list[str]:
    archs = []
    for a in os.environ.get("CUDAARCHS", "90").replace(",", ";").split(";"):
        a = a.strip().removesuffix("-real").removesuffix("-virtual")
        if a:
            archs.append(a)
    return archs or ["90"]


def library_path(build_dir: Path = BUILD_DIR) -> Path:
    """Where build() puts the library for this source, JAX version and architectures."""
    import jax

    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(f"{jax.__version__} {';'.join(architectures())}".encode())
    return Path(build_dir) / f"copy_kernel_{key.hexdigest()[:12]}.so"


def build(build_dir: Path = BUILD_DIR, verbose: bool = False) -> Path:
    """The library's path, compiling it first unless it is there already. Raises RuntimeError
    (one line: what is missing, or nvcc's last error line) when it cannot be built."""
    import jax

    out = library_path(build_dir)
    if out.exists() and not verbose:
        return out
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.so")  # several processes may build
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in architectures()]
    cmd = [nvcc, "-O3", "-std=c++17", "--shared", "-Xcompiler", "-fPIC", *gencode,
           "-isystem", jax.ffi.include_dir(), *(["-Xptxas", "-v"] if verbose else []),
           str(SOURCE), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if verbose:
        print(" ".join(cmd), proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "error" in ln]
        raise RuntimeError(f"nvcc failed (exit {proc.returncode}): "
                           f"{(lines or ['no error line'])[0].strip()}")
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--build-dir", default=str(BUILD_DIR))
    p.add_argument("--verbose", action="store_true", help="rebuild and print nvcc's output")
    args = p.parse_args(argv)
    print(build(Path(args.build_dir), verbose=args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
