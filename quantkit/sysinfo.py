"""What machine this is (for `quantkit info` and the benchmark headers)."""
from __future__ import annotations

import platform

_ISA_FLAGS = ("sse4_2", "popcnt", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq",
              "avx512_vnni", "avx_vnni", "avx512_bitalg", "amx_int8")


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags(wanted: tuple[str, ...] = _ISA_FLAGS) -> list[str]:
    """The ISA extensions of ``wanted`` that this CPU reports (Linux /proc/cpuinfo; empty elsewhere)."""
    have = set((_cpuinfo_field("flags") or "").split())
    return [w for w in wanted if w in have]


def x86_without_vnni() -> bool:
    """An x86 CPU without AVX-512 VNNI or AVX-VNNI (Linux): the integer kernels of onnxruntime and OpenVINO then
    multiply u8 by s8 with VPMADDUBSW, whose 16-bit pair sums saturate (see
    :func:`quantkit.export.emit.uniform.signed_weights_can_saturate`)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    return not cpu_flags(("avx512_vnni", "avx_vnni"))


def cpu_model() -> str:
    """CPU model name with its popcount-relevant ISA extensions, e.g. ``Intel(R) Xeon(R) ... [avx512_vpopcntdq ...]``."""
    model = _cpuinfo_field("model name") or platform.processor() or "unknown CPU"
    extra = cpu_flags(("avx512_vpopcntdq", "avx512bw", "avx2", "amx_int8"))
    return f"{model} [{' '.join(extra)}]" if extra else model
