"""A table of accelerators: dense peak FLOP/s, memory and an hourly price per device.

Peaks are the vendors' dense (no structured sparsity) figures per device, the denominators of
MFU. Prices are assumptions for cost planning, not quotes: see ``PRICE_NOTE`` and override them
with ``load_price_overrides``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

PRICE_NOTE = (
    "price_per_hour_usd values are editable assumptions: approximate on-demand cloud list prices "
    "per device (one GPU, or one TPU chip) in USD, as published around 2024-2025 (AWS/GCP on-demand, "
    "GCP Cloud TPU per chip-hour). Reserved, spot and neocloud prices are often 2-4x lower. "
    "Put your own in a YAML file ({name: usd_per_hour}) and load it with load_price_overrides()."
)

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator type; every figure is per device (one GPU or one TPU chip)."""

    name: str
    peak_bf16_flops: float  # dense bf16 FLOP/s
    peak_fp32_flops: float  # FLOP/s of a float32 matmul at JAX's default precision
    memory_bytes: int  # device (HBM) memory
    price_per_hour_usd: float  # an assumption; see PRICE_NOTE
    notes: str = ""
    peak_fp8_flops: float = 0.0  # dense fp8 FLOP/s; 0 where there are no fp8 matrix units

    def peak_kind(self, precision: str) -> str:
        """Which peak MFU divides by for a ``precision`` setting: fp32, bf16 or fp8.

        amp_fp8 is measured against the fp8 peak where the device has one (as Composer's speed
        monitor does), so its MFU is the conservative figure; elsewhere against bf16."""
        if precision == "fp32":
            return "fp32"
        return "fp8" if precision == "amp_fp8" and self.peak_fp8_flops else "bf16"

    def peak_flops(self, precision: str) -> float:
        """The peak that MFU divides by for a ``precision`` setting (amp_bf16 / amp_fp8 / fp32)."""
        kind = self.peak_kind(precision)
        return {"fp32": self.peak_fp32_flops, "fp8": self.peak_fp8_flops}.get(kind, self.peak_bf16_flops)


def _host_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


_TPU_FP32 = "float32 matmuls at JAX's default precision run as one bf16 pass on the MXU, so fp32 peak = bf16 peak"

HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("a100-40gb", 312e12, 19.5e12, 40 * GIB, 3.67,
                 "NVIDIA A100 SXM4 40GB; fp32 is the non-tensor-core figure (TF32: 156 TFLOP/s)"),
        Hardware("a100-80gb", 312e12, 19.5e12, 80 * GIB, 5.07,
                 "NVIDIA A100 SXM4 80GB; fp32 is the non-tensor-core figure (TF32: 156 TFLOP/s)"),
        Hardware("h100", 989e12, 67e12, 80 * GIB, 11.06,
                 "NVIDIA H100 SXM5 80GB HBM3; dense bf16 989 and fp8 1979 TFLOP/s (twice that with sparsity)",
                 peak_fp8_flops=1979e12),
        Hardware("h100-pcie", 756.5e12, 51e12, 80 * GIB, 4.50,
                 "NVIDIA H100 PCIe 80GB; dense bf16 756.5 and fp8 1513 TFLOP/s (1513 / 3026 with sparsity); "
                 "no AWS/GCP on-demand offer: the price is an approximate cloud list price",
                 peak_fp8_flops=1513e12),
        Hardware("h100-nvl", 835.5e12, 60e12, 94 * 10**9, 6.98,
                 "NVIDIA H100 NVL 94GB; dense bf16 835.5 and fp8 1670.5 TFLOP/s (1671 / 3341 with sparsity); "
                 "price: Azure NC H100 v5 on-demand per GPU", peak_fp8_flops=1670.5e12),
        Hardware("l4", 121e12, 30.3e12, 24 * GIB, 0.71,
                 "NVIDIA L4 24GB; dense bf16 121 and fp8 242.5 TFLOP/s (242 / 485 with sparsity); "
                 "price: GCP g2-standard-4 on-demand", peak_fp8_flops=242.5e12),
        Hardware("l40s", 362.05e12, 91.6e12, 48 * GIB, 1.86,
                 "NVIDIA L40S 48GB; dense bf16 362 and fp8 733 TFLOP/s (733 / 1466 with sparsity); "
                 "price: AWS g6e.xlarge on-demand", peak_fp8_flops=733e12),
        Hardware("h200", 989e12, 67e12, 141 * 10**9, 10.60,
                 "NVIDIA H200 SXM 141GB HBM3e; same compute as H100 SXM (about 790 TFLOP/s measured on matmuls)",
                 peak_fp8_flops=1979e12),
        Hardware("h200-nvl", 835.5e12, 60e12, 141 * 10**9, 10.60,
                 "NVIDIA H200 NVL 141GB HBM3e (PCIe card); dense bf16 835.5 and fp8 1670.5 TFLOP/s (1671 / 3341 "
                 "with sparsity); price assumed equal to the SXM part's", peak_fp8_flops=1670.5e12),
        Hardware("b200", 2250e12, 80e12, 192 * 10**9, 14.24,
                 "NVIDIA B200 192GB HBM3e; dense bf16 (4.5 PFLOP/s is with sparsity)", peak_fp8_flops=4500e12),
        Hardware("tpu-v4", 275e12, 275e12, 32 * GIB, 3.22, "Google TPU v4 chip; " + _TPU_FP32),
        Hardware("tpu-v5e", 197e12, 197e12, 16 * GIB, 1.20, "Google TPU v5e (v5 lite) chip; " + _TPU_FP32),
        Hardware("tpu-v5p", 459e12, 459e12, 95 * GIB, 4.20, "Google TPU v5p chip; " + _TPU_FP32),
        Hardware("tpu-v6e", 918e12, 918e12, 32 * GIB, 2.70, "Google TPU v6e (Trillium) chip; " + _TPU_FP32),
        Hardware("cpu", 1.58e12, 330e9, _host_memory_bytes(), 0.10,
                 "host CPU: no vendor peak; measured matmul peaks of one process on the 2-core development "
                 "machines: 330 GFLOP/s float32, 1.58 TFLOP/s bf16 (AMX via XLA's YNNPACK path); set "
                 "peak_flops_per_device for other CPUs; memory is this host's RAM"),
    )
}


def cpu_bf16_note(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """A warning when this host is an x86 CPU (as ``cpuinfo`` lists its flags) with neither AMX-BF16
    nor AVX512-BF16; None otherwise, and wherever the flags cannot be read (another OS, Arm).
    Without either unit XLA:CPU converts every bf16 product to float32, so bf16 runs slower than
    float32, and MFU against the bf16 peak of the table's CPU entry means little."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None or "amx_bf16" in flags or "avx512_bf16" in flags:
        return None
    return ("this CPU has no bf16 matrix units (neither AMX-BF16 nor AVX512-BF16): bf16 products are converted "
            "to float32 here and run slower than float32 itself; add --set precision=fp32, and set "
            "peak_flops_per_device for a meaningful MFU")


def get_hardware(name: str) -> Hardware:
    """The table entry called ``name`` (e.g. ``"h100"``)."""
    try:
        return HARDWARE[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; valid names: {', '.join(sorted(HARDWARE))}") from None


def hardware_for_device_kind(device_kind: str, platform: str) -> Hardware | None:
    """Map a JAX ``device_kind`` / ``platform`` pair to a table entry; None when not in the table."""
    kind = device_kind.lower()
    if platform == "cpu":
        return HARDWARE["cpu"]
    if platform in ("gpu", "cuda", "rocm") or "nvidia" in kind:
        if "a100" in kind:
            return HARDWARE["a100-80gb" if "80gb" in kind else "a100-40gb"]
        if "h100" in kind:  # three parts with three peaks; the SXM part's kind names its HBM3
            if "nvl" in kind:
                return HARDWARE["h100-nvl"]
            return HARDWARE["h100-pcie" if "pcie" in kind or "hbm2e" in kind else "h100"]
        if "h200" in kind:
            return HARDWARE["h200-nvl" if "nvl" in kind else "h200"]
        if "b200" in kind:
            return HARDWARE["b200"]
        words = kind.replace("-", " ").split()
        if "l4" in words:
            return HARDWARE["l4"]
        if "l40s" in words:
            return HARDWARE["l40s"]
        return None
    if platform == "tpu" or kind.startswith("tpu"):
        lite = "lite" in kind or kind.endswith("e")
        if "v4" in kind:
            return HARDWARE["tpu-v4"]
        if "v5" in kind:
            return HARDWARE["tpu-v5e" if lite else "tpu-v5p"]
        if "v6" in kind:
            return HARDWARE["tpu-v6e"]
    return None


def detect_hardware(device: Any = None) -> Hardware | None:
    """The table entry for ``device`` (default ``jax.devices()[0]``); None for an unknown accelerator.

    When this returns None, MFU needs ``peak_flops_per_device`` from the config.
    """
    if device is None:
        import jax

        device = jax.devices()[0]
    return hardware_for_device_kind(str(getattr(device, "device_kind", "")), str(getattr(device, "platform", "")))


def load_price_overrides(path: str | os.PathLike, table: dict[str, Hardware] | None = None) -> dict[str, Hardware]:
    """A copy of ``table`` (default ``HARDWARE``) with prices from a YAML file ``{name: usd_per_hour}``."""
    import yaml

    base = HARDWARE if table is None else table
    try:
        with open(path, encoding="utf-8") as f:
            prices = yaml.safe_load(f) or {}
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason}); save it as a YAML file "
                         "{hardware_name: usd_per_hour}") from None
    except yaml.YAMLError as err:
        from jaxtrain.config.loader import malformed_yaml

        raise ValueError(malformed_yaml(str(path), err)) from None
    if not isinstance(prices, dict):
        raise ValueError(f"{path}: expected a mapping of hardware name to USD per hour, got {type(prices).__name__}")
    result = dict(base)
    for name, price in prices.items():
        if name not in base:
            raise ValueError(f"{path}: unknown hardware {name!r}; valid names: {', '.join(sorted(base))}")
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not 0 <= price < math.inf:
            raise ValueError(f"{path}: price for {name!r} must be a finite, non-negative number of USD per hour, "
                             f"got {price!r}")
        result[name] = dataclasses.replace(base[name], price_per_hour_usd=float(price))
    return result
