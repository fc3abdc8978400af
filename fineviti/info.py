"""`fineviti info`: versions, the compiled extension, optional backends and the GPU, as a dict or text."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys

# Optional packages: (import name, distribution name, note). "unverified": this project has never run it on
# a machine (no machine here can); it is tested through fakes with its real signatures.
OPTIONAL = [
    ("flash_attn", "flash-attn", "unverified"),
    ("xformers", "xformers", "unverified"),
    ("apex", "apex", "unverified"),
    ("nvidia.dali", "nvidia-dali-cuda130", "GPU path unverified"),
    ("torchvision", "torchvision", None),
    ("tokenizers", "tokenizers", None),
    ("safetensors", "safetensors", None),
    ("tensorboard", "tensorboard", None),
    ("transformers", "transformers", None),
]
ENV_VARS = ["TRITON_INTERPRET", "FINEVITI_CHECKS", "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST"]


def _version(module, distribution: str) -> str | None:
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None
    return str(version)


def _optional_package(name: str, distribution: str, status: str | None) -> dict:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # a broken install raises more than ImportError; report it, don't crash
        return {"importable": False, "version": None, "status": status, "error": f"{type(exc).__name__}: {exc}"}
    return {"importable": True, "version": _version(module, distribution), "status": status, "error": None}


def _extension(torch) -> dict:
    from fineviti import _ext

    loaded = _ext.load(required=False)
    info = {"loaded": loaded, "path": None, "error": None if loaded else str(_ext.load_error())}
    if not loaded:
        return info
    info["path"] = sys.modules["fineviti._C"].__file__
    info["cuda_built"] = bool(torch.ops.fineviti.cuda_built())
    info["cuda_arch_list"] = torch.ops.fineviti.cuda_arch_list() or None
    # Loaded means registered with the dispatcher: these ops reach their CUDA kernels through torch.ops.fineviti.*.
    # The extension's own (C++) ops apart from the custom ops Python registers (Triton kernels, torch code), which
    # share the namespace and appear only once their modules are imported.
    from torch._library import custom_ops

    python_defined = set(getattr(custom_ops, "OPDEFS", {}))
    ops = sorted(name for name in torch._C._dispatch_get_all_op_names()
                 if name.startswith("fineviti::") and name not in python_defined)
    info["ops"] = [name.split("::", 1)[1] for name in ops]
    info["cuda_ops"] = [
        name.split("::", 1)[1] for name in ops if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    ]
    info["cuda_kernels_registered"] = bool(info["cuda_ops"])
    return info


def _gpus(torch) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
            }
        )
    return gpus


def collect() -> dict:
    """Everything `fineviti info` reports, as plain JSON-serialisable values."""
    import torch

    import fineviti

    triton = _optional_package("triton", "triton", None)
    return {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "fineviti": {"version": fineviti.__version__, "path": os.path.dirname(fineviti.__file__)},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "git": torch.version.git_version},
        "triton": {"version": triton["version"], "error": triton["error"]},
        "cuda": {
            "torch_built_with": torch.version.cuda,
            "available": torch.cuda.is_available(),
            "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        },
        "gpus": _gpus(torch),
        "extension": _extension(torch),
        "optional": {name: _optional_package(name, dist, status) for name, dist, status in OPTIONAL},
        "attention_backends": _attention_backends(torch),
        "env": {name: os.environ.get(name) for name in ENV_VARS},
    }


def _attention_backends(torch) -> dict:
    """{device: {backend: "yes" or why not}} for varlen_attention's backends, on the CPU and (when there is one)
    the GPU, and what backend="auto" picks there."""
    try:
        from fineviti.ops.attention import BACKENDS, backend_available, resolve_backend
    except Exception as exc:  # noqa: BLE001 (reported, not raised: info must work on a broken install)
        return {"error": f"{type(exc).__name__}: {exc}"}
    out = {}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        rows = {}
        for name in BACKENDS:
            ok, why = backend_available(name, device)
            rows[name] = "yes" if ok else why
        try:
            rows["auto"] = resolve_backend("auto", torch.device(device))
        except Exception as exc:  # noqa: BLE001
            rows["auto"] = f"error: {exc}"
        out[device] = rows
    return out


def _yes(flag) -> str:
    return "yes" if flag else "no"


def format_text(info: dict) -> str:
    ext = info["extension"]
    lines = [
        f"fineviti     {info['fineviti']['version']}  ({info['fineviti']['path']})",
        f"python       {info['python']['version']}  ({info['python']['executable']})",
        f"torch        {info['torch']['version']}  (CUDA build: {info['torch']['cuda'] or 'no'})",
        f"triton       {info['triton']['version'] or 'not importable: ' + str(info['triton']['error'])}",
        f"DALI         {info['optional']['nvidia.dali']['version'] or 'not installed'}",
        f"CUDA         available: {_yes(info['cuda']['available'])}, devices: {info['cuda']['device_count']}",
    ]
    for gpu in info["gpus"]:
        lines.append(
            f"GPU {gpu['index']}        {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, "
            f"{gpu['memory_gib']} GiB, {gpu['multiprocessors']} SMs)"
        )
    if not info["gpus"]:
        lines.append("GPU          none")
    if ext["loaded"]:
        lines.append(f"extension    fineviti._C loaded ({ext['path']})")
        arch = f" for TORCH_CUDA_ARCH_LIST={ext['cuda_arch_list']}" if ext["cuda_arch_list"] else ""
        lines.append(f"  CUDA part  built: {_yes(ext['cuda_built'])}{arch}")
        lines.append(f"  ops        {', '.join(ext['ops'])}")
        lines.append(f"  CUDA ops   {', '.join(ext['cuda_ops']) or 'none'}")
    else:
        lines.append(f"extension    not loaded: {ext['error']}")
    lines.append("optional packages:")
    for name, pkg in info["optional"].items():
        state = f"{pkg['version'] or 'importable'}" if pkg["importable"] else "not importable"
        lines.append(f"  {name:<13}{state:<24}{'[' + pkg['status'] + ']' if pkg['status'] else ''}".rstrip())
    lines.append("attention backends (varlen_attention):")
    for device, rows in info.get("attention_backends", {}).items():
        if not isinstance(rows, dict):
            lines.append(f"  {rows}")
            continue
        ready = [n for n, state in rows.items() if state == "yes"]
        lines.append(f"  {device:<13}available: {', '.join(ready) or 'none'}; auto: {rows.get('auto')}")
    env = ", ".join(f"{k}={v}" for k, v in info["env"].items() if v is not None)
    lines.append(f"environment  {env or '(none of ' + ', '.join(info['env']) + ' set)'}")
    return "\n".join(lines)
