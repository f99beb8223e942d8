"""What people look at: the one-screen summary, report.md with its figures, and the
side-by-side comparison of several runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .results import Results
from .rundir import RunDir, atomic_write_text
from .types import PseudoLabel, Round

ROWS = [("vanilla", "Vanilla"), ("sft", "SFT (warm-up)"), ("semievol", "SemiEvol")]


def summary(results: Results | dict) -> str:
    """The vanilla / SFT / SemiEvol table and the pseudo-labelling figures, as text
    (``results``: a run's, or results.json's content)."""
    results = Results.of(results)
    lines = [f"{results.task} on {results.backend}:{results.base_model}", "",
             f"{'model':<16}{'accuracy':>10}{'macro-F1':>10}{'err.red.':>10}{'n':>6}"]
    final = {"sft": "SFT", "semievol": "SemiEvol"}.get(results.final, results.final)
    if results.refit:
        final += ", refit"
    for key, label in ROWS + ([("final", f"Final ({final})")] if results.final else []):
        row = results.eval[key]
        if row:
            lines.append(f"{label:<16}{_pct(row['accuracy']):>10}{_pct(row['macro_f1']):>10}"
                         f"{_pct(row['error_reduction']):>10}{row['n']:>6}")
    u = results.unlabeled
    acc = u["pseudo_label_accuracy"]
    settled = "settled by vote" if results.config["justify"] == "vote" else "self-justified"
    lines += ["", f"unlabeled {u['total']}: consistent {u['consistent']}, {settled} "
              f"{u['justified']}, selected {u['selected']}",
              f"pseudo-label accuracy: all {_pct(acc['all'])}, selected {_pct(acc['selected'])}"]
    lines += ["", guard_decision(results)]
    if refit := results.refit:
        lines.append(f"refit: the final model is that choice made again on all "
                     f"{refit['labeled']} labels ({refit['dir']}/, "
                     f"{sum(refit['timings_s'].values()):.0f}s more)")
    if results.recipe:
        c = results.recipe["chosen"]
        lines.append(f"recipe auto chose: retrieved examples {'on' if c['icp'] else 'off'}, "
                     f"disagreements settled by {'the model' if c.get('justify') == 'model' else 'vote'}"
                     f", {'per-class' if c['per_class'] else 'global'} selection, labeled replay "
                     f"{'on' if c.get('replay_labeled', True) else 'off'} (choosing took "
                     f"{results.recipe['cost_s']:.0f}s)")
    usage = results.usage
    cost = f", ${usage['cost_usd']:.4f}" if usage["cost_usd"] is not None else ""
    lines.append(f"tokens: prompt {usage['prompt_tokens']}, completion {usage['completion_tokens']},"
                 f" trained {usage['trained_tokens']}{cost}")
    total = sum(results.timings_s.values())
    lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in results.timings_s.items())
                 + f" (total {total:.0f}s)")
    return "\n".join(lines)


def guard_decision(results: Results) -> str:
    """Which model the run returns and why, in a sentence with its numbers (the evidence
    is guard.compare's: probability on the right answer, Brier scores, their paired
    difference with its 90% interval), then the greedy validation accuracy."""
    v = results.validation
    if not v["n"]:
        return ("guard: off (no validation slice): the evolved model is returned without a "
                "check against the warm-up")
    scores, verdicts = v["scores"], v["comparisons"]
    name = _namer(scores)
    said = ", ".join(f"{name(k)} {_pct(s['accuracy'])}" for k, s in scores.items())
    accuracy = (f"  greedy validation accuracy (n={v['n']}; one question is "
                f"{100 / v['n']:.1f} points): {said}")
    if verdicts is None:  # a run decided by an older semievol, on accuracy
        return f"guard: the final model is {name(v['chosen'])} (chosen on accuracy).\n{accuracy}"
    if not verdicts:
        return f"guard: no round ran; the final model is {name(v['chosen'])}.\n{accuracy}"
    lines = [_verdict(c, v["n"], name) for c in verdicts]
    return "\n".join(["guard: " + lines[-1], *("  before: " + line for line in lines[:-1]),
                      accuracy])


def _namer(scores: dict):
    """Names for the keys of results.json's validation scores ("vanilla", "sft", "r1", ...):
    the evolved model is "SemiEvol", or "SemiEvol round r" where there were rounds."""
    several = len([k for k in scores if Round.parse(k)]) > 1

    def name(key: str) -> str:
        if r := Round.parse(key):
            return f"SemiEvol round {r.number}" if several else "SemiEvol"
        return {"vanilla": "vanilla", "sft": "SFT"}[key]
    return name


def _verdict(c: dict, n: int, name) -> str:
    """One comparison in a sentence."""
    cand, inc = name(c["candidate"]), name(c["incumbent"])
    (pc, pi), (bc, bi), (lo, hi) = c["p_right"], c["brier"], c["interval"]
    who = cand if c["harm"] else "it"
    numbers = (f"on {n} held-out questions {who} put {pc:.2f} probability on the right answer "
               f"on average against {inc}'s {pi:.2f} (Brier score {bc:.2f} against {bi:.2f}: "
               f"difference {c['difference']:+.2f}, 90% interval {lo:+.2f} to {hi:+.2f})")
    if c["harm"]:
        return (f"returned {inc}: {numbers}; evidence that evolving made the model worse "
                f"(p = {c['p_harm']:.3f})")
    return f"kept {cand}: {numbers}; no evidence of harm (p = {c['p_harm']:.2f})"


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """report.md plus accuracy.png, entropy.png, (with hidden answers) pseudo_accuracy.png
    and (with a validation slice) validation.png, the guard's evidence; in ``out`` (the run
    directory by default: one that is read-only is only read)."""
    out = out or run_dir
    out.mkdir(parents=True, exist_ok=True)
    results = Results.read(run_dir)
    plt = _pyplot()
    figures = [_accuracy_figure(plt, results, out / "accuracy.png")]
    records, selected = _mined(run_dir, results)
    if records:
        figures.append(_entropy_figure(plt, records, selected, out / "entropy.png"))
    pseudo = run_dir / "pseudo_labels.json"
    if pseudo.exists():
        figures.append(_bucket_figure(plt, json.loads(pseudo.read_text()),
                                      out / "pseudo_accuracy.png"))
    if results.validation["comparisons"]:
        figures.append(_evidence_figure(plt, results, out / "validation.png"))
    text = ["# SemiEvol run report", "", "```", summary(results), "```", ""]
    text += _validation_table(results)
    text += [f"![{p.stem}]({p.name})" for p in figures if p]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(text) + "\n")
    return path


def compare(run_dirs: list[Path], figure: Path) -> str:
    """A table of several runs side by side, and a grouped bar chart of their accuracy."""
    runs = [(d, Results.read(d)) for d in run_dirs]
    head = (f"{'run':<28}{'backend':<10}" + "".join(f"{label:>16}" for _, label in ROWS)
            + f"{'final (guard)':>18}{'selected':>10}")
    lines = [head]
    for d, r in runs:
        cells = "".join(f"{_pct(_accuracy(r.eval[k])):>16}" for k, _ in ROWS)
        final = f"{r.final or '-'} {_pct(_accuracy(r.eval['final']) if r.final else None)}"
        lines.append(f"{d.name[:27]:<28}{r.backend:<10}{cells}{final:>18}"
                     f"{r.unlabeled['selected']:>10}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 2.2 * len(runs), 3.6))
    width = 0.8 / len(ROWS)
    for j, (key, label) in enumerate(ROWS):
        values = [_accuracy(r.eval[key]) or 0 for _, r in runs]
        ax.bar([i + j * width for i in range(len(runs))], values, width, label=label)
    ax.set_xticks([i + width for i in range(len(runs))], [d.name for d, _ in runs], fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    return "\n".join(lines) + f"\n\nfigure: {figure}"


def _accuracy(row: dict | None) -> float | None:
    """A test score's accuracy (None: the model was not made, as SFT without IWP)."""
    return row["accuracy"] if row else None


def _validation_table(results: Results) -> list[str]:
    """The validation slice's scores, one row per model (and round), in Markdown."""
    v = results.validation
    if not v["n"]:
        return []
    rows = ["## Validation (the guard)", "",
            f"{v['n']} labeled questions held out of every fine-tune and retrieval pool.", "",
            f"Probability on the right answer and Brier score (lower is better) from "
            f"{v['samples']} sampled answers a question; accuracy of the greedy answer.",
            "", "| model | accuracy | macro-F1 | P(right) | Brier | |", "|---|---|---|---|---|---|"]
    num = lambda x: "-" if x is None else f"{x:.3f}"
    name = _namer(v["scores"])
    for key, s in v["scores"].items():
        mark = "final" if key == v["chosen"] else ""
        rows.append(f"| {name(key)} | {_pct(s['accuracy'])} | {_pct(s['macro_f1'])} | "
                    f"{num(s.get('p_right'))} | {num(s.get('brier'))} | {mark} |")
    return rows + [""]


def _mined(run_dir: Path, results: Results) -> tuple[list[PseudoLabel], set[str]]:
    rd = RunDir(run_dir)
    records, selected = [], set()
    for r in (Round(row["round"]) for row in results.rounds):
        records += map(PseudoLabel.of, rd.stream(r.collaborate))
        selected |= set(rd.read_json(f"{r.selection}.json")["selected"])
    return records, selected


def _accuracy_figure(plt, results: Results, path: Path) -> Path:
    """Test accuracy and macro-F1 of each model, and its validation accuracy where the
    guard scored it (SemiEvol: the last round's model); the final model is starred."""
    rows = [(k, label, results.eval[k]) for k, label in ROWS if results.eval[k]]
    v = results.validation
    rounds = [k for k in v["scores"] if Round.parse(k)]
    checked = {**v["scores"], **({"semievol": v["scores"][rounds[-1]]} if rounds else {})}
    bars = [("test accuracy", lambda k, r: r["accuracy"]),
            ("test macro-F1", lambda k, r: r["macro_f1"] or 0)]
    if v["n"]:
        bars.append((f"validation accuracy (n={v['n']})",
                     lambda k, r: checked[k]["accuracy"] if k in checked else 0))
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    x, width = range(len(rows)), 0.8 / len(bars)
    for j, (name, value) in enumerate(bars):
        ax.bar([i + (j - (len(bars) - 1) / 2) * width for i in x], [value(k, r) for k, _, r in rows],
               width, label=name)
    final = results.final
    ax.set_xticks(list(x), [label + (" *" if k == final else "") for k, label, _ in rows])
    ax.set_ylim(0, 1)
    ax.set_title(f"{results.task} ({results.backend}: {results.base_model})"
                 + ("; * the final model" if final else ""), fontsize=9)
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


def _evidence_figure(plt, results: Results, path: Path) -> Path:
    """The guard's last comparison, question by question: the probability each model put on
    the right answer (the incumbent across, the candidate up); above the diagonal the
    evolved model is surer of the right answer."""
    v = results.validation
    c = v["comparisons"][-1]
    inc, cand = ({r["id"]: r["p_right"] for r in v["evidence"][k]} for k in (c["incumbent"], c["candidate"]))
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    ax.scatter([inc[q] for q in cand], [cand[q] for q in cand], alpha=0.6)
    incumbent = Round.parse(c["incumbent"])
    ax.set_xlabel(f"{f'round {incumbent.number}' if incumbent else _namer({})(c['incumbent'])}"
                  ": P(right answer)")
    ax.set_ylabel(f"SemiEvol round {Round.parse(c['candidate']).number}: P(right answer)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{c['n']} validation questions: Brier difference {c['difference']:+.2f}\n"
                 f"(90% interval {c['interval'][0]:+.2f} to {c['interval'][1]:+.2f}; "
                 f"{'harm' if c['harm'] else 'no evidence of harm'})", fontsize=9)
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
