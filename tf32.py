"""TF32 on or off for a block of code, process-wide, the process's settings restored exactly after.

torch >= 2.9 keeps the fp32 precision of matmuls and convolutions as `fp32_precision` settings per
(backend, op): "ieee", "tf32", "bf16" (oneDNN only) or "none", which inherits from (backend, "all"),
which inherits from ("generic", "all"). Once anything set one of them (transformers' `enable_tf32`
sets torch.backends.fp32_precision), torch's legacy switches (torch.get_float32_matmul_precision,
torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) may raise on reading. So the
new settings are used where torch has them, the legacy ones only where it does not.
"""

import contextlib

import torch

NEW_API = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 9)
# What a block sets: CUDA's (cuBLAS, cuDNN) and oneDNN's (CPU) matmuls and convolutions.
OPS = (("cuda", "matmul"), ("cuda", "conv"), ("mkldnn", "matmul"), ("mkldnn", "conv"))


@contextlib.contextmanager
def fp32_math(cuda_tf32: bool):
    """Within the block: CUDA's fp32 matmuls and convolutions in TF32 (cuda_tf32) or IEEE fp32,
    oneDNN's (CPU) in IEEE fp32; after it, every setting as the process had it."""
    if not NEW_API:
        with _legacy(cuda_tf32):
            yield
        return
    want = {op: "tf32" if cuda_tf32 and op[0] == "cuda" else "ieee" for op in OPS}
    change = [op for op in OPS if _computes_in(op) != want[op]]  # the rest already computes so
    kept = {op: (_as_set(op), _get(op)) for op in change}
    for op in change:
        _set(op, want[op])
    try:
        yield
    finally:
        for op, (as_set, reading) in kept.items():
            _set(op, as_set)
            if _get(op) != reading:  # a default torch keeps apart from "none" (cuDNN's TF32 conv)
                _set(op, reading)


def _computes_in(op: tuple) -> str:
    """What (backend, op) computes fp32 in: "tf32", "bf16" or "ieee" ("none" inherited to the top
    is IEEE)."""
    precision = _get(op)
    if precision == "none":
        return "ieee"
    return precision


def _get(op: tuple) -> str:
    """The precision (backend, op) computes in: its own setting, or the one it inherits."""
    return torch._C._get_fp32_precision_getter(*op)


def _set(op: tuple, value: str):
    torch._C._set_fp32_precision_setter(*op, value)


def _as_set(op: tuple) -> str:
    """What (backend, op) was set to, "none" included. torch's getter answers the inherited value
    instead of "none", so an inheriting setting is told by moving its parent (then put back)."""
    if op[0] == "generic":
        return _get(op)
    if op[1] == "all":
        parent = ("generic", "all")
    else:
        parent = (op[0], "all")
    parent_as_set = _as_set(parent)
    seen = []
    for probe in ("ieee", "tf32"):
        _set(parent, probe)
        seen.append(_get(op))
    _set(parent, parent_as_set)
    if seen == ["ieee", "tf32"]:
        return "none"
    return _get(op)


@contextlib.contextmanager
def _legacy(cuda_tf32: bool):
    """fp32_math through torch's legacy switches (torch < 2.9)."""
    matmul = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if cuda_tf32 else "highest")  # TF32 matmuls, or none
    # TF32 convolutions, or none (torch's default is on)
    torch.backends.cudnn.allow_tf32 = cuda_tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn
