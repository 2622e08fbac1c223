"""Hardware profiles: the rates the time model reads (pinned host-to-device bandwidth, the rate at
which a GPU runs counted FLOPs, a per-layer launch overhead, and for convolutional decoders their own
rate and how far their measured activation peak exceeds the counted one).

For weights that stay in the files (``host_tier`` mapped / disk) two read rates: from the page cache
(a mapped file whose pages are warm) and from the disk (direct I/O); streaming such a component
runs at the slower of the read and the copy link (the staging ring keeps both busy).

A spec names one (``profile: h200``, or a file ``calibrate`` wrote); a spec that names none gets the
profile of the GPU this runs on, found by its device name (``planner.files.gpu_name``), so a plan
made on an H200 predicts H200 times. Without a GPU, or on one no built-in profile matches, the
default is the H100 profile, and the plan says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

from planner.files.bounded_read import load_json_file
from planner.files.gpu_name import gpu_names
from planner.files.package_data import load_package_json

PROFILES_FILE = "profiles.json"
DEFAULT_PROFILE = "h100"
# read rates where a profile names none (shared/anchors.md, the H200 machine, 2026-12-01: a 20.5 GB
# Z-Image folder read in 3.4 s from the page cache and 10.9 s cold)
DEFAULT_PAGE_CACHE_BYTES_PER_S = 6.0e9
DEFAULT_DISK_BYTES_PER_S = 1.88e9


@dataclass(frozen=True)
class KernelRates:
    """What a denoiser call's kinds of kernel reach on a GPU (``bench/kernel_profile.py`` measures
    them): matrix multiplies in FLOP/s, fused attention in FLOP/s by head dim (narrow heads run
    slower), the other ops' bytes per second from contiguous and from non-contiguous inputs, and the
    host's seconds per op launched (a small call waits on the host, not the GPU), and how much longer
    each launch takes while the copy engine moves host memory to the GPU (a share: 0.25 is 1.25x).

    The last is what a partly streamed step at a small size pays: its launches and its copies run
    at once, and the copies slow the launches (on an H200 a Z-Image forward at 512² took 25 % longer
    beside a running copy, its kernels no longer; ``bench/overlap_probe.py``)."""

    matmul_flops: float
    attention_flops: tuple[tuple[int, float], ...]    # (head dim, FLOP/s), ascending head dims
    memory_bytes_per_s: float
    strided_bytes_per_s: float
    host_op_seconds: float
    host_slowdown_under_copy: float = 0.0
    # the fastest and slowest host seconds per op measured on machines of this GPU kind: a step
    # bound by the launches is priced at both too (None: the profile is one machine's, as calibrate's)
    host_op_seconds_seen: tuple[float, float] | None = None

    def attention_rate(self, head_dim: int) -> float:
        """Linear in the head dim between measured ones, held at the ends."""
        points = self.attention_flops
        if head_dim <= points[0][0]:
            return points[0][1]
        for (d0, r0), (d1, r1) in pairwise(points):
            if head_dim <= d1:
                return r0 + (r1 - r0) * (head_dim - d0) / (d1 - d0)
        return points[-1][1]


@dataclass(frozen=True)
class Profile:
    name: str
    h2d_bytes_per_s: float
    effective_flops: float
    layer_overhead_s: float = 2e-5
    source: str = ""          # why this profile: named by the spec, or the GPU it was matched to
    # convolutional decoders (the VAE): counted FLOPs per second of a channels-first bf16 decode,
    # and its measured activation peak over the counted one (the count sees tensors, not cuDNN's
    # workspaces); None / 1.0 where a profile does not say
    decode_flops: float | None = None
    decode_activation_scale: float = 1.0
    # the same measured per decoder class, where the convolutions differ (Qwen-Image's 3-D causal
    # convolutions keep other workspaces than AutoencoderKL's 2-D ones); a class not listed takes
    # decode_activation_scale
    decode_activation_scales: tuple[tuple[str, float], ...] = ()
    # host_tier mapped: bytes per second copied out of a warm file mapping (the page cache) into
    # pinned memory; host_tier disk: bytes per second read from the disk with direct I/O. None: the
    # defaults above
    page_cache_bytes_per_s: float | None = None
    disk_bytes_per_s: float | None = None
    # a denoiser's call priced kernel by kind where the profile has the rates and the class was
    # counted that way; None: every counted FLOP at ``effective_flops``
    kernel_rates: KernelRates | None = None

    def with_host_op_seconds(self, seconds: float) -> "Profile":
        """This profile on a host that launches an op in ``seconds`` (nothing else changes)."""
        if self.kernel_rates is None:
            return self
        return replace(self, kernel_rates=replace(self.kernel_rates, host_op_seconds=seconds))

    def decode_scale(self, class_name: str) -> float:
        """The measured activation scale of a decoder class (its own where measured)."""
        return dict(self.decode_activation_scales).get(class_name, self.decode_activation_scale)

    def read_bytes_per_s(self, tier: object) -> float | None:
        """The rate at which a host tier's bytes reach the staging ring (None: pinned, nothing read)."""
        value = getattr(tier, "value", tier)
        if value == "mapped":
            return self.page_cache_bytes_per_s or DEFAULT_PAGE_CACHE_BYTES_PER_S
        if value == "disk":
            return self.disk_bytes_per_s or DEFAULT_DISK_BYTES_PER_S
        return None

    def for_tier(self, tier: object) -> "Profile":
        """This profile as the time model sees a component of ``tier``: its streamed bytes move at the
        slower of the read rate and the copy link (read into the ring while the ring's other entry
        is copied); pinned (or None): unchanged."""
        rate = self.read_bytes_per_s(tier)
        if rate is None or rate >= self.h2d_bytes_per_s:
            return self
        return replace(self, h2d_bytes_per_s=rate)


def builtin_profiles() -> dict[str, dict]:
    return load_package_json(PROFILES_FILE)["profiles"]


def profile_for_gpu(name: str) -> str | None:
    """The built-in profile whose ``gpus`` names appear in a device name ("NVIDIA H200" -> h200)."""
    lowered = name.lower()
    for key, data in builtin_profiles().items():
        if any(token.lower() in lowered for token in data.get("gpus", ())):
            return key
    return None


def _detected() -> tuple[str, str]:
    names = gpu_names()
    if not names:
        return DEFAULT_PROFILE, "no GPU found here: the default"
    match = profile_for_gpu(names[0])
    if match is None:
        return DEFAULT_PROFILE, (f"no built-in profile matches {names[0]}: the default; "
                                 "'residency-planner calibrate' writes one")
    return match, f"matched to this machine's {names[0]}"


def load_profile(name_or_path: str | None, base: Path | None = None) -> Profile:
    """The profile a spec names (a built-in name or a file), else the one of this machine's GPU."""
    if name_or_path is None:
        name, source = _detected()
    else:
        name, source = name_or_path, "named by the spec"
    builtin = builtin_profiles()
    if name in builtin:
        data = builtin[name]
        label = name
    else:
        path = Path(name) if base is None or Path(name).is_absolute() else base / name
        data = load_json_file(path, "profile", limit=1 << 20)   # a FIFO or /dev/zero is refused, not read
        label = data.get("name", name)
    if not isinstance(data, dict):
        raise ValueError("a profile is a JSON object")
    return Profile(name=str(label), h2d_bytes_per_s=_positive(data, "h2d_bytes_per_s"),
                   effective_flops=_positive(data, "effective_flops"),
                   layer_overhead_s=_positive(data, "layer_overhead_s", 2e-5), source=source,
                   decode_flops=_positive(data, "decode_flops") if data.get("decode_flops") is not None else None,
                   decode_activation_scale=_positive(data, "decode_activation_scale", 1.0),
                   decode_activation_scales=_class_scales(data.get("decode_activation_scales")),
                   page_cache_bytes_per_s=_optional(data, "page_cache_bytes_per_s"),
                   disk_bytes_per_s=_optional(data, "disk_bytes_per_s"),
                   kernel_rates=_kernel_rates(data.get("kernel_rates")))


def _class_scales(data: object) -> tuple[tuple[str, float], ...]:
    if data is None:
        return ()
    if not isinstance(data, dict):
        raise ValueError("decode_activation_scales must be a JSON object of class name -> scale")
    return tuple(sorted((str(k), _positive(data, k)) for k in data))


def _kernel_rates(data: object) -> KernelRates | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError("kernel_rates must be a JSON object")
    attention = data.get("attention_flops_by_head_dim")
    if not isinstance(attention, dict) or not attention:
        raise ValueError("kernel_rates.attention_flops_by_head_dim must be an object of head dim -> FLOP/s")
    points = []
    for key in attention:
        if not (isinstance(key, str) and key.isdigit() and 0 < int(key) <= 4096):
            raise ValueError(f"kernel_rates.attention_flops_by_head_dim: {key!r} is not a head dim")
        points.append((int(key), _positive(attention, key)))
    return KernelRates(matmul_flops=_positive(data, "matmul_flops"), attention_flops=tuple(sorted(points)),
                       memory_bytes_per_s=_positive(data, "memory_bytes_per_s"),
                       strided_bytes_per_s=_positive(data, "strided_bytes_per_s"),
                       host_op_seconds=_positive(data, "host_op_seconds"),
                       host_slowdown_under_copy=_share(data, "host_slowdown_under_copy"),
                       host_op_seconds_seen=_seen(data.get("host_op_seconds_seen")))


def _seen(data: object) -> tuple[float, float] | None:
    """``kernel_rates.host_op_seconds_seen``: [fastest, slowest], two numbers above 0, in order."""
    if data is None:
        return None
    key = "kernel_rates.host_op_seconds_seen"
    if not isinstance(data, list) or len(data) != 2:
        raise ValueError(f"{key} must be a list of two numbers [fastest, slowest], got {data!r}")
    lo, hi = (_positive({key: v}, key) for v in data)
    if lo > hi:
        raise ValueError(f"{key} must list the fastest host first, got {data!r}")
    return lo, hi


def _share(data: dict, key: str) -> float:
    """A non-negative finite number, 0 where absent (a ValueError names the key otherwise)."""
    value = data.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be a finite number of at least 0, got {value!r}")
    return float(value)


def _optional(data: dict, key: str) -> float | None:
    return _positive(data, key) if data.get(key) is not None else None


def _positive(data: dict, key: str, default: float | None = None) -> float:
    """A rate of a profile: a finite number above 0 (a ValueError names the key otherwise)."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a finite number above 0, got {value!r}")
    return float(value)
