"""What this install of jax_ep can do:

    python -m jax_ep.info          # version, build (CUDA architectures), devices, backend "auto"
    python -m jax_ep.info --json   # the same as one JSON object
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

from jax_ep import _ext
from jax_ep.memory import format_bytes
from jax_ep._cli import FlagParser

# ---------------------------------------------------------------------------------------------
# python -m jax_ep.info


def _auto_backend(devices) -> tuple[str, str]:
    """What EPGroup(backend="auto") picks for a one-axis mesh of `devices`, and why."""
    import numpy as np
    from jax.sharding import Mesh

    from jax_ep import group as group_mod

    mesh = Mesh(np.array(devices), ("expert",))
    platforms = sorted({d.platform for d in devices})
    on_gpus = platforms == ["gpu"]
    name = group_mod._resolve_backend("auto", mesh, 1)
    multi = ("; a mesh whose EP axis spans several hosts would pick 'hierarchical' (XLA "
             "collectives between hosts, the cuda kernels inside each)")
    if name == "cuda":
        why = "the devices are GPUs and the extension was built with the CUDA kernels"
    elif on_gpus:
        why = ("the devices are GPUs but this build of jax_ep has no CUDA kernels (nvcc was not "
               "on the PATH at install time): reinstall with nvcc available, or JAX_EP_CUDA=ON to "
               "make that an error")
    else:
        why = (f"the devices are {'/'.join(platforms)}, not GPUs"
               + (" (jax sees no GPU: install the jax CUDA plugin, e.g. "
                  "pip install 'jax[cuda13]', and check the driver with nvidia-smi)"
                  if group_mod.cuda_available() else ""))
    return name, why + multi


def _plugins() -> list[str]:
    from importlib import metadata

    found = []
    for dist in ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda12-pjrt", "jax-cuda13-pjrt"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return found


def _built_for(compute_capability: str, archs: list[str]) -> bool:
    """Whether CMAKE_CUDA_ARCHITECTURES entries (80, 90a, 90-real, all-major, ...) include code
    for a device of this compute capability ("9.0")."""
    sm = compute_capability.replace(".", "")
    for arch in archs:
        base = arch.split("-")[0]
        if base in ("all", "native") or arch == "all-major" or base.rstrip("af") == sm:
            return True
    return False


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def collect() -> dict[str, Any]:
    """Everything `python -m jax_ep.info` reports, as a dict."""
    import jax
    import jaxlib

    import jax_ep

    info: dict[str, Any] = {"jax_ep": jax_ep.__version__, "python": sys.version.split()[0],
                            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                            "jax_cuda_plugins": _plugins()}
    try:
        ext = _ext.module()
    except ImportError as e:
        info["extension_error"] = str(e)
        return info
    archs = str(getattr(ext, "CUDA_ARCHITECTURES", ""))
    info.update(extension=ext.__file__, abi_version=int(ext.ABI_VERSION),
                with_cuda=bool(ext.WITH_CUDA),
                cuda_architectures=[a for a in archs.split(",") if a],
                cuda_available=bool(jax_ep.cuda_available()))
    if ext.WITH_CUDA and hasattr(ext, "cuda_driver_version"):
        info["cuda_runtime_built"] = _cuda_version(int(ext.CUDA_RUNTIME_VERSION))
        info["cuda_driver"] = _cuda_version(int(ext.cuda_driver_version()))
    try:
        devices = jax.local_devices()
    except RuntimeError as e:  # e.g. JAX_PLATFORMS names a platform that failed to start
        info["devices_error"] = str(e)
        return info
    rows = []
    for d in devices:
        row = {"id": d.id, "platform": d.platform, "kind": d.device_kind}
        cc = getattr(d, "compute_capability", None)
        if cc:
            row["compute_capability"] = str(cc)
            if info["with_cuda"]:
                row["kernels_built_for_it"] = _built_for(str(cc), info["cuda_architectures"])
        if d.platform == "gpu" and info["with_cuda"] and hasattr(ext, "device_memory"):
            try:
                free, total = ext.device_memory(d.local_hardware_id)
                row["memory_free_bytes"], row["memory_total_bytes"] = int(free), int(total)
            except Exception:  # noqa: BLE001 - informational only
                pass
        rows.append(row)
    info.update(default_backend=jax.default_backend(), process_index=jax.process_index(),
                process_count=jax.process_count(), devices=rows)
    info["auto_backend"], info["auto_backend_reason"] = _auto_backend(devices)
    return info


def render(info: dict[str, Any]) -> str:
    lines = [f"jax_ep {info['jax_ep']} (Python {info['python']})",
             f"jax {info['jax']}, jaxlib {info['jaxlib']}; CUDA plugins: "
             f"{', '.join(info['jax_cuda_plugins']) or 'none'}"]
    if "extension_error" in info:
        lines.append(f"extension: NOT LOADED: {info['extension_error']}")
        return "\n".join(lines)
    lines.append(f"extension: {info['extension']} (ABI {info['abi_version']})")
    if info["with_cuda"]:
        lines.append(f"WITH_CUDA: yes; CUDA architectures built: "
                     f"{', '.join(info['cuda_architectures']) or '?'}")
        if "cuda_runtime_built" in info:
            lines.append(f"CUDA runtime (static) built with {info['cuda_runtime_built']}; driver "
                         f"supports {info['cuda_driver']}")
    else:
        lines.append("WITH_CUDA: no (CPU-only build: the reference backend and the hierarchical "
                     "backend's XLA leg; install with nvcc on the PATH for the cuda kernels)")
    lines.append(f"cuda_available(): {info['cuda_available']}")
    if "devices_error" in info:
        lines.append(f"devices: NOT AVAILABLE: {info['devices_error']}")
        return "\n".join(lines)
    devs = info["devices"]
    lines.append(f"devices: {len(devs)} local ({info['default_backend']}), process "
                 f"{info['process_index']} of {info['process_count']}")
    for d in devs:
        extra = ""
        if "compute_capability" in d:
            extra += f", compute capability {d['compute_capability']}"
            if d.get("kernels_built_for_it") is False:
                extra += " (NOT among the built architectures: rebuild with CUDAARCHS)"
        if "memory_total_bytes" in d:
            extra += (f", {format_bytes(d['memory_free_bytes'])} free of "
                      f"{format_bytes(d['memory_total_bytes'])}")
        lines.append(f"  {d['id']}: {d['platform']} {d['kind']}{extra}")
    lines.append(f"backend 'auto' on a mesh of these {len(devs)} devices: "
                 f"{info['auto_backend']} ({info['auto_backend_reason']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = FlagParser(prog="python -m jax_ep.info",
                                description="Reports jax_ep's version and build (CUDA "
                                            "architectures), jax, the local devices, and the "
                                            "backend EPGroup(backend='auto') would pick.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0 if "extension_error" not in info else 1


if __name__ == "__main__":
    sys.exit(main())
