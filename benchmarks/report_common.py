"""What every report section shares: the device line, number formatting, markdown tables, the plot backend."""

from __future__ import annotations

from pathlib import Path


def device_label(info) -> str:
    """One line naming the device a result was measured on."""
    if not info:
        return "device not recorded"
    if isinstance(info, str):
        return info
    if info.get("gpu"):
        bench = f"cudnn.benchmark={info.get('cudnn_benchmark')}"
        if "latency_cudnn_benchmark" in info and info["latency_cudnn_benchmark"] != info.get("cudnn_benchmark"):
            bench += f" (latency: {info['latency_cudnn_benchmark']})"  # a sweep: training and timing differ
        return (f"GPU {info['gpu']} (CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, torch {info.get('torch')}, "
                f"{bench}, TF32 conv={info.get('cudnn_allow_tf32')}); host CPU {info.get('cpu')}")
    threads = info.get("torch_threads")
    if isinstance(threads, list):
        threads = "/".join(str(t) for t in threads)
    return (f"CPU {info.get('cpu', '?')} ({info.get('logical_cpus', '?')} logical cores), torch threads {threads}, "
            f"torch {info.get('torch', '?')}, timm {info.get('timm', '?')}")


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.{digits}g}"
    return str(v)


def md_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines + [""]


def pyplot_or_none():
    """matplotlib's pyplot on the file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, data: dict, path: Path, fontsize: int) -> bool:
    fig.suptitle(device_label(data.get("device"))[:150], fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
