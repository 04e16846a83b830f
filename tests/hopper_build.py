"""Build Triton kernels to an sm_90 cubin on a machine without a GPU (Triton's bundled ptxas), in a process
without TRITON_INTERPRET: the interpreter runs code the compiler rejects (types, layouts, unsupported ops), and
most test runs here have no GPU. A compile check, not a correctness or speed check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

for build in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(build["module"]), build["kernel"])
    consts = {k: v for k, v in build["constexprs"].items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = "*" + build["pointers"].get(name, build["dtype"])
        else:
            signature[name] = build["scalars"].get(name, "fp32" if name in build["floats"] else "i32")
        if name.endswith("_ptr") or name in build["divisible"]:  # as a launch with aligned tensors specialises
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": build["num_warps"], "num_stages": build["num_stages"]}
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert kernel.asm["cubin"], build["kernel"]
"""


def build(
    module,
    kernel,
    dtype,
    constexprs,
    num_warps,
    *,
    pointers=None,
    floats=(),
    scalars=None,
    divisible=("N", "C"),
    num_stages=3,
) -> dict:
    """One kernel configuration: pointers default to `dtype` ("bf16", "fp32", ...) unless named in `pointers`;
    scalars are i32 unless named in `floats` (fp32) or `scalars` (any type: a launch types a Python int by its
    value, i32 below 2**31, u32 up to 2**32)."""
    return dict(
        module=module,
        kernel=kernel,
        dtype=dtype,
        constexprs=constexprs,
        num_warps=num_warps,
        num_stages=num_stages,
        pointers=pointers or {},
        floats=list(floats),
        scalars=scalars or {},
        divisible=list(divisible),
    )


def assert_builds_for_hopper(builds: list[dict]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the kernels themselves")
    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default today, said out loud to silence Triton's warning
    args = [sys.executable, "-c", _SCRIPT, json.dumps(builds)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
