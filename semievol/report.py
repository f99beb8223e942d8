"""What people look at: the one-screen summary, report.md with its figures, and the
side-by-side comparison of several runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .rundir import RunDir, atomic_write_text
from .types import PseudoLabel

ROWS = [("vanilla", "Vanilla"), ("sft", "SFT (warm-up)"), ("semievol", "SemiEvol")]


def summary(results: dict) -> str:
    """The vanilla / SFT / SemiEvol table and the pseudo-labelling figures, as text."""
    lines = [f"{results['task']} on {results['backend']}:{results['base_model']}", "",
             f"{'model':<16}{'accuracy':>10}{'macro-F1':>10}{'err.red.':>10}{'n':>6}"]
    for key, label in ROWS:
        row = results["eval"].get(key)
        if row:
            lines.append(f"{label:<16}{_pct(row['accuracy']):>10}{_pct(row['macro_f1']):>10}"
                         f"{_pct(row.get('error_reduction')):>10}{row['n']:>6}")
    u = results["unlabeled"]
    acc = u["pseudo_label_accuracy"]
    lines += ["", f"unlabeled {u['total']}: consistent {u['consistent']}, self-justified "
              f"{u['justified']}, selected {u['selected']}",
              f"pseudo-label accuracy: all {_pct(acc['all'])}, selected {_pct(acc['selected'])}"]
    usage = results["usage"]
    cost = f", ${usage['cost_usd']:.4f}" if usage.get("cost_usd") is not None else ""
    lines.append(f"tokens: prompt {usage['prompt_tokens']}, completion {usage['completion_tokens']},"
                 f" trained {usage['trained_tokens']}{cost}")
    total = sum(results["timings_s"].values())
    lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in results["timings_s"].items())
                 + f" (total {total:.0f}s)")
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    """report.md plus accuracy.png, entropy.png and (with hidden answers) pseudo_accuracy.png."""
    results = json.loads((run_dir / "results.json").read_text())
    plt = _pyplot()
    figures = [_accuracy_figure(plt, results, run_dir / "accuracy.png")]
    records, selected = _mined(run_dir, results)
    if records:
        figures.append(_entropy_figure(plt, records, selected, run_dir / "entropy.png"))
    pseudo = run_dir / "pseudo_labels.json"
    if pseudo.exists():
        figures.append(_bucket_figure(plt, json.loads(pseudo.read_text()),
                                      run_dir / "pseudo_accuracy.png"))
    text = ["# SemiEvol run report", "", "```", summary(results), "```", ""]
    text += [f"![{p.stem}]({p.name})" for p in figures if p]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(text) + "\n")
    return path


def compare(run_dirs: list[Path], figure: Path) -> str:
    """A table of several runs side by side, and a grouped bar chart of their accuracy."""
    runs = [(d, json.loads((d / "results.json").read_text())) for d in run_dirs]
    head = f"{'run':<28}{'backend':<10}" + "".join(f"{label:>16}" for _, label in ROWS) + f"{'selected':>10}"
    lines = [head]
    for d, r in runs:
        cells = "".join(f"{_pct((r['eval'].get(k) or {}).get('accuracy')):>16}" for k, _ in ROWS)
        lines.append(f"{d.name[:27]:<28}{r['backend']:<10}{cells}{r['unlabeled']['selected']:>10}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 2.2 * len(runs), 3.6))
    width = 0.8 / len(ROWS)
    for j, (key, label) in enumerate(ROWS):
        values = [((r["eval"].get(key) or {}).get("accuracy") or 0) for _, r in runs]
        ax.bar([i + j * width for i in range(len(runs))], values, width, label=label)
    ax.set_xticks([i + width for i in range(len(runs))], [d.name for d, _ in runs], fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    return "\n".join(lines) + f"\n\nfigure: {figure}"


def _mined(run_dir: Path, results: dict) -> tuple[list[PseudoLabel], set[str]]:
    rd = RunDir(run_dir)
    records, selected = [], set()
    for r in results.get("rounds", []):
        records += map(PseudoLabel.of, rd.stream(f"collaborate_r{r['round']}"))
        selected |= set(rd.read_json(f"selection_r{r['round']}.json")["selected"])
    return records, selected


def _accuracy_figure(plt, results: dict, path: Path) -> Path:
    rows = [(label, results["eval"][k]) for k, label in ROWS if results["eval"].get(k)]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["accuracy"] for _, r in rows], 0.4, label="accuracy")
    ax.bar([i + 0.2 for i in x], [r["macro_f1"] or 0 for _, r in rows], 0.4, label="macro-F1")
    ax.set_xticks(list(x), [label for label, _ in rows])
    ax.set_ylim(0, 1)
    ax.set_title(f"{results['task']} ({results['backend']}: {results['base_model']})", fontsize=9)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _entropy_figure(plt, records: list[PseudoLabel], selected: set[str], path: Path) -> Path:
    """Paper figure 4: the entropy of selected and rejected pseudo-responses."""
    kept = [r.entropy for r in records if r.entropy is not None and r.id in selected]
    dropped = [r.entropy for r in records if r.entropy is not None and r.id not in selected]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    bins, log = _bins(kept + dropped)
    floor = lambda values: [max(v, bins[0]) for v in values]  # zeros go in the first bin
    ax.hist([floor(kept), floor(dropped)], bins=bins, stacked=True,
            label=[f"selected ({len(kept)})", f"rejected ({len(dropped)})"])
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("entropy (mean token NLL)" + (", log scale" if log else ""))
    ax.set_ylabel("pseudo-labels")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _bucket_figure(plt, rows: list[dict], path: Path) -> Path:
    """Pseudo-label accuracy by entropy quintile (lowest entropy first)."""
    rows = sorted((r for r in rows if r["entropy"] is not None), key=lambda r: r["entropy"])
    buckets = [rows[i * len(rows) // 5:(i + 1) * len(rows) // 5] for i in range(5)]
    buckets = [b for b in buckets if b]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.bar(range(len(buckets)), [sum(r["correct"] for r in b) / len(b) for b in buckets])
    ax.set_xticks(range(len(buckets)), [f"≤{b[-1]['entropy']:.2f}\n({len(b)})" for b in buckets],
                  fontsize=7)
    ax.set_xlabel("entropy bucket (upper bound, count)")
    ax.set_ylabel("pseudo-label accuracy")
    ax.set_ylim(0, 1)
    return _save(plt, fig, path)


def _bins(values: list[float]) -> tuple[list[float], bool]:
    """20 histogram bins, and whether they are log-spaced: they are when the entropies span
    more than two decades, as a confident model's do (most pseudo-labels far below 0.1)."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        lo, hi = math.log(min(positive)), math.log(max(positive))
        return [math.exp(lo + (hi - lo) * i / 20) for i in range(21)], True
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-9:
        hi = lo + 1e-3
    return [lo + (hi - lo) * i / 20 for i in range(21)], False


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"
