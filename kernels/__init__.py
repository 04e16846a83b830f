"""Device kernels (Triton), each with its pure-torch reference. Imported as `mlmtrain.kernels`."""

from __future__ import annotations

try:
    import triton

    @triton.jit
    def _probe():
        pass

    # TRITON_INTERPRET=1 set before triton was first imported makes every kernel run on the CPU interpreter
    INTERPRETED = type(_probe).__name__ == "InterpretedFunction"
except ImportError:  # no Triton wheel for this platform: every kernel's torch reference serves the calls
    triton, INTERPRETED = None, False


def triton_runs_on(device) -> bool:
    """Whether Triton kernels can run on `device`: a CUDA GPU, or the CPU under the interpreter (how the tests run
    the kernels without a GPU)."""
    return triton is not None and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED))
