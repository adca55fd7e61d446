"""
bench.py's plot: accuracy against tokens per forward pass, one series per rule family (verified
or not) and the step-0 baseline, as OUT.png. Needs matplotlib (optional: without it, a message).
"""


def series(r):
    """The plot's series of a row: the baseline, or its rule's family, verified or not."""
    return "baseline" if r["baseline"] else ("verified " if r["verify"] else "") + r["family"]


def pareto_plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no Pareto plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(dict.fromkeys(series(r) for r in results)):    # in table order
        pts = [r for r in results if series(r) == name]
        ax.plot([r["eff_k"] for r in pts], [100 * r["acc"] for r in pts], marker="so^vD*"[i % 6],
                label=name, linestyle="" if len(pts) == 1 else "-")
    ax.set_xlabel("effective k (tokens per forward pass)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
