"""``plan --chart FILE``: a picture of the plan (SVG or PNG, by the file's suffix).

Left: each component's resident, streamed-slot and pinned host bytes against the GPU budget.
Right: predicted GPU memory over one generation (encode → denoising steps → decode), with the
budget line and the peak marked. Needs matplotlib (the ``chart`` extra); never torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from planner.plan import Plan
from planner.planning.estimate import memory_timeline

GiB = float(1 << 30)


def write_chart(plan: Plan, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(f"error: --chart needs matplotlib: pip install 'residency-planner[chart]' ({exc})")
    path = Path(path)
    names = list(plan.components)
    resident = [plan.components[n].estimate.gpu_resident_bytes / GiB for n in names]
    transient = [plan.components[n].estimate.gpu_transient_bytes / GiB for n in names]
    pinned = [plan.components[n].estimate.host_pinned_bytes / GiB for n in names]
    e = plan.estimate

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    y = range(len(names))
    left.barh([i + 0.2 for i in y], resident, height=0.4, color="#2b6cb0", label="GPU, resident")
    left.barh([i + 0.2 for i in y], transient, left=resident, height=0.4, color="#90cdf4",
              label="GPU, slots / while running")
    left.barh([i - 0.2 for i in y], pinned, height=0.4, color="#ed8936", label="pinned host")
    left.set_yticks(list(y))
    left.set_yticklabels([f"{n}\n{plan.components[n].strategy}" for n in names], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("GiB")
    if e.gpu_budget_bytes:
        left.axvline(e.gpu_budget_bytes / GiB, color="#c53030", linestyle="--", label="GPU budget")
    left.legend(fontsize=7, loc="lower right")
    left.set_title("bytes per component", fontsize=10)

    timeline = memory_timeline(plan.components, e.margin_bytes)
    xs = list(range(len(timeline)))
    ys = [b / GiB for _, b in timeline]
    right.step(xs, ys, where="mid", color="#2b6cb0")
    right.fill_between(xs, ys, step="mid", alpha=0.25, color="#2b6cb0")
    peak_i = max(xs, key=lambda i: ys[i])
    right.annotate(f"peak {ys[peak_i]:.2f} GiB (plan: {e.gpu_peak_bytes / GiB:.2f})", (peak_i, ys[peak_i]),
                   xytext=(0, 12), textcoords="offset points", ha="center", fontsize=8, color="#2c5282")
    right.plot([peak_i], [ys[peak_i]], "o", color="#2c5282")
    if e.gpu_budget_bytes:
        right.axhline(e.gpu_budget_bytes / GiB, color="#c53030", linestyle="--", label="GPU budget")
        right.legend(fontsize=7, loc="lower right")
    right.set_xticks(xs)
    right.set_xticklabels([label for label, _ in timeline], rotation=45, ha="right", fontsize=7)
    right.set_ylabel("GiB on the GPU")
    right.set_ylim(bottom=0, top=max(ys + [(e.gpu_budget_bytes or 0) / GiB]) * 1.18)
    right.set_title("predicted GPU memory over one generation", fontsize=10)
    fig.suptitle(f"{plan.pipeline.get('model') or plan.pipeline.get('path') or 'pipeline'} on {plan.device} "
                 f"({plan.dtype}): peak {e.gpu_peak_bytes / GiB:.2f} GiB, pinned host {e.host_pinned_bytes / GiB:.2f} GiB",
                 fontsize=11)
    fig.tight_layout()
    # drawn into a file beside the target and renamed over it: a failed write keeps the old chart
    fmt = path.suffix.lstrip(".").lower() or "svg"
    if path.exists() and not path.is_file():
        try:
            fig.savefig(path, format=fmt, dpi=110)          # a device, or a directory (which fails)
        finally:
            plt.close(fig)
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=str(path.parent))
    os.close(fd)
    try:
        fig.savefig(tmp, format=fmt, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path
