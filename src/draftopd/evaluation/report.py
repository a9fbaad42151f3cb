"""Evaluation outputs: results.json, a paper-style Markdown table, and PNG plots."""

from __future__ import annotations

from pathlib import Path

from draftopd.decoding.speculative import MAX_REST
from draftopd.evaluation.paper import PRESET, PUBLISHED, PUBLISHED_LABEL, PUBLISHED_SETTING, TASKS
from draftopd.io import write_json_atomic

PLOTS = ("acceptance_histogram.png", "offset_acceptance.png", "tau_speedup.png")


def write_report(out_dir, results: dict) -> list[Path]:
    """Write results.json, results.md and the plots into `out_dir`; returns their paths."""
    out = Path(out_dir)
    paths = [out / "results.json", out / "results.md", *(out / p for p in PLOTS)]
    write_json_atomic(paths[0], results)
    paths[1].write_text(markdown(results))
    plot_acceptance_histogram(results, paths[2])
    plot_offset_acceptance(results, paths[3])
    plot_tau_speedup(results, paths[4])
    return paths


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _f(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _cell(speed: float | None, tau: float | None) -> str:
    return f"{_x(speed)} / {_f(tau)}"


def _labels(results: dict) -> dict[str, str]:
    """Benchmark spec -> its name in tables and plots: the paper's task name in a preset run."""
    names = {t.bench: t.name for t in TASKS} if results["config"].get("preset") == PRESET else {}
    return {b: names.get(b, b) for b in results["config"]["benchmarks"]}


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """Markdown table lines; `align` has one 'l' or 'r' per column."""
    rule = ["---" if a == "l" else "--:" for a in align]
    return ["| " + " | ".join(r) + " |" for r in [header, rule, *rows]]


def _paper_table(results: dict, key: str) -> list[str]:
    """Rows drafters, columns benchmarks, cells "speedup / τ", plus the mean over benchmarks.

    A `--bench paper` run has the paper's seven columns in its order, "—" for a task not run,
    and under the speedup over the target alone (what the paper reports) its published rows.
    """
    paper = results["config"].get("preset") == PRESET
    columns = [(t.name, t.bench) for t in TASKS] if paper else [(b, b) for b in results["config"]["benchmarks"]]
    rows = []
    for name, per_bench in results["summary"].items():
        mean = results["mean"][name]
        rows.append([name] + [_cell(per_bench[b][key], per_bench[b]["tau"]) if b in per_bench else "—"
                              for _, b in columns] + [_cell(mean[key], mean["tau"])])
    if paper and key == "speedup":
        rows += [[f"{p.drafter} ({PUBLISHED_LABEL})"] + [_cell(x, None) for x in p.speedups]
                 + [_cell(p.mean_speedup, p.mean_tau)] for p in PUBLISHED]
    return _table(["Drafter", *(h for h, _ in columns), "Mean"], rows, "l" + "r" * (len(columns) + 1))


def _samples_text(results: dict) -> str:
    samples, labels = results["config"]["samples"], _labels(results)
    if isinstance(samples, int):
        return f"the first {samples} prompt(s) of each benchmark"
    return "the first prompts of each benchmark (" + ", ".join(f"{labels[b]}: {n}" for b, n in samples.items()) + ")"


def _published_note(results: dict) -> list[str]:
    """Where the published rows come from, and which tasks this run left out ("—")."""
    if results["config"].get("preset") != PRESET:
        return []
    note = (f"Published rows: the Draft-OPD paper (arXiv 2605.29343), {PUBLISHED_SETTING}; other systems' "
            "figures on a GPU, for orientation. Its per-task τ are not in our reference notes (–); its mean is "
            "over the seven tasks.")
    skipped = [t.name for t in TASKS if t.bench not in results["config"]["benchmarks"]]
    if skipped:
        note += f" Not run here (—): {', '.join(skipped)}; our mean is over the tasks run."
    return [note, ""]


def _verify_note(c: dict) -> list[str]:
    """How wide the verify passes were: whole blocks, or adaptive/tree with the costs measured here."""
    measured = {n: v for n, v in (c.get("verify_costs") or {}).items() if v}
    if not measured:
        return []
    trees = {n: t for n, t in (c.get("tree_tokens") or {}).items() if t}
    costs = "; ".join(f"{n}: drafter {v['draft_ms']:.1f} ms, verify of 1..{len(v['verify_ms'])} tokens "
                      + " / ".join(f"{t:.1f}" for t in v["verify_ms"]) + " ms" for n, v in measured.items())
    lines = [f"Adaptive verify: these drafters verify only the drafts whose expected acceptance pays for the wider "
             f"pass, by the costs measured here ({costs}), and their drafter rests (the target decodes alone) for "
             f"1, 2, 4, ... up to {MAX_REST} steps after each draft not worth verifying; τ counts those steps too "
             f"(one token each)."]
    if trees:
        lines.append("Tree verify (" + ", ".join(f"{n}: up to {t} tokens" for n, t in trees.items()) + "): the "
                     "verified drafts are a tree of the drafter's likeliest paths (its top choices at each offset), "
                     "cut to the size that pays; a step commits the longest path the target agrees with, plus "
                     "the target's next token.")
    return [" ".join(lines), ""]


def markdown(results: dict) -> str:
    c = results["config"]
    mode = "greedy" if c["temperature"] == 0 else f"sampling at temperature {c['temperature']}"
    lines = [
        "# Speculative decoding: speedup / τ", "",
        f"Target `{c['target']['name']}` ({c['dtype']}, {c['device']}); {mode}; up to {c['max_new_tokens']} new "
        f"tokens; {_samples_text(results)}, plus one sample per later turn of "
        "multi-turn prompts; block size " + ", ".join(f"{n}: {B}" for n, B in c["drafters"].items())
        + "".join(f"; draft vocabulary (token map) {n}: {v or 'all'} tokens" for n, v in c.get("draft_vocab", {}).items())
        + ".", "", *_verify_note(c),
        "Cells: speedup in time per output token over the target alone in the same decoding loop "
        "(block size 1) / τ, the mean acceptance length (tokens committed per verify step, token-weighted).", "",
        *_paper_table(results, "speedup"), "", *_published_note(results),
        "The same, with the speedup over HF `generate` (both timed in this process):", "",
        *_paper_table(results, "speedup_hf"), "",
    ]
    checks = [(n, b, s) for n, per in results["summary"].items() for b, s in per.items()]
    if c["temperature"] == 0:
        total = sum(s["samples"] for _, _, s in checks)
        same = total - sum(len(s["mismatch_ids"]) for _, _, s in checks)
        bad = [f"{n}: {', '.join(s['mismatch_ids'])}" for n, _, s in checks if s["mismatch_ids"]]
        verdict = "." if not bad else f"; MISMATCHES: {'; '.join(bad)}."
        lines += [f"Greedy check: {same} of {total} drafter outputs equal the target-alone output{verdict}", ""]
    lines += ["## Details", ""]
    rows = []
    for n, b, s in checks:
        offline = "–" if not s["offline_samples"] else \
            f"{_f(s['offline_tau'])} ({s['offline_agree']}/{s['offline_samples']} walks equal)"
        rows.append([n, b, str(s["block_size"]), _f(s.get("verify_size")), _pct(s.get("rest_share")), str(s["samples"]), str(s["output_tokens"]), _f(s["tau"]),
                     _f(s["tau_per_sample_mean"]), _f(s["time_per_output_token"] * 1e3, 1), _f(s["tokens_per_s"], 1),
                     _x(s["speedup"]), _x(s["speedup_hf"]),
                     "–" if s["greedy_mismatches"] is None else str(s["greedy_mismatches"]), offline])
    lines += _table(["Drafter", "Benchmark", "B", "Verified/step", "Drafter rested", "Samples", "Tokens", "τ", "τ (per-sample mean)",
                     "ms/token", "tok/s", "Speedup (loop)", "Speedup (HF)", "Greedy mismatches",
                     "Offline τ (decoded text)"], rows, "llrrrrrrrrrrrrr")
    lines += ["", "## Target alone", ""]
    rows = [[b, str(s["loop"]["output_tokens"]), _f(s["loop"]["time_per_output_token"] * 1e3, 1),
             _f(s["loop"]["tokens_per_s"], 1), _f(s["hf"]["time_per_output_token"] * 1e3, 1),
             _f(s["hf"]["tokens_per_s"], 1)] for b, s in results["baseline"].items()]
    lines += _table(["Benchmark", "Tokens", "Loop ms/token", "Loop tok/s", "HF generate ms/token",
                     "HF generate tok/s"], rows, "lrrrrr")
    if results.get("offline_rollouts"):
        lines += ["", f"## Offline τ on cached rollouts (`{c['offline_rollouts']}`)", "",
                  "Exact greedy τ from the anchor walk over the target's cached responses (no decoding).", ""]
        rows = [[n, _f(o["tau"]), _f(o["tau_per_sample_mean"]), str(o["sequences"]), str(o["steps"])]
                for n, o in results["offline_rollouts"].items()]
        lines += _table(["Drafter", "τ", "τ (per-sample mean)", "Sequences", "Steps"], rows, "lrrrr")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_offsets(n: int) -> tuple[list[float], float]:
    """Centre offsets and width of n grouped bars in a slot of width 1 (narrow when n is small)."""
    w = min(0.8, 0.3 * n) / n
    return [(i - (n - 1) / 2) * w for i in range(n)], w


def plot_acceptance_histogram(results: dict, path) -> None:
    """One panel per drafter: share of verify steps committing 1..B tokens, a bar per benchmark."""
    plt = _pyplot()
    summary, benches, labels = results["summary"], results["config"]["benchmarks"], _labels(results)
    fig, axes = plt.subplots(len(summary), 1, figsize=(11, 3.2 * len(summary)), squeeze=False)
    offsets, w = _bar_offsets(len(benches))
    for ax, (name, per) in zip(axes[:, 0], summary.items()):
        B = per[benches[0]]["block_size"]
        for off, b in zip(offsets, benches):
            counts = per[b]["acceptance_histogram"]
            share = [100 * n / max(sum(counts), 1) for n in counts]
            ax.bar([k + 1 + off for k in range(B)], share, width=w, label=f"{labels[b]} (τ={per[b]['tau']:.2f})")
        ax.set_title(f"{name}: acceptance length per verify step")
        ax.set_xlabel("tokens committed per step (accepted drafts + 1)")
        ax.set_ylabel("% of steps")
        ax.set_xticks(range(1, B + 1))
        ax.set_xlim(0.4, B + 0.6)
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: bars may reach 100%
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_offset_acceptance(results: dict, path) -> None:
    """One panel per benchmark: how often the draft at block offset k is accepted, a line per drafter."""
    plt = _pyplot()
    summary, benches, labels = results["summary"], results["config"]["benchmarks"], _labels(results)
    fig, axes = plt.subplots(1, len(benches), figsize=(max(7.5, 4.2 * len(benches)), 3.6), squeeze=False,
                             sharey=True)
    for ax, b in zip(axes[0], benches):
        for i, (name, per) in enumerate(summary.items()):  # markers and dashes keep equal lines visible
            rates = per[b]["offset_acceptance"]
            ax.plot(range(1, len(rates) + 1), rates, marker="osD^v<>"[i % 7], linestyle=("-", "--", ":")[i % 3],
                    markersize=7 - i % 3 * 1.5, label=name)
        ax.set_title(labels[b])
        ax.set_xlabel("block offset k")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("P(draft at offset k accepted)")
    fig.suptitle("Per-offset acceptance (fraction of steps with acceptance length > k)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=min(len(summary), 4), fontsize=9)
    rows = -(-len(summary) // 4)
    fig.tight_layout(rect=(0, 0.09 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tau_speedup(results: dict, path) -> None:
    """τ and speedup per benchmark, a bar per drafter, values written on the bars."""
    plt = _pyplot()
    summary, benches, labels = results["summary"], results["config"]["benchmarks"], _labels(results)
    fig, (ax_tau, ax_speed) = plt.subplots(1, 2, figsize=(max(9, 3 * len(benches) + 3), 4))
    offsets, w = _bar_offsets(len(summary))
    for off, (name, per) in zip(offsets, summary.items()):
        xs = [i + off for i in range(len(benches))]
        bars = ax_tau.bar(xs, [per[b]["tau"] for b in benches], width=w, label=name)
        ax_tau.bar_label(bars, fmt="%.2f", fontsize=7)
        bars = ax_speed.bar(xs, [per[b]["speedup"] or 0 for b in benches], width=w, label=name)
        ax_speed.bar_label(bars, fmt="%.2f×", fontsize=7)
    ax_speed.axhline(1, color="grey", linestyle="--", linewidth=1)
    for ax, title, ylabel in ((ax_tau, "Mean acceptance length τ", "τ (tokens per verify step)"),
                              (ax_speed, "Speedup over the target alone (block size 1)", "speedup (×)")):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(benches)), [labels[b] for b in benches])
        ax.set_xlim(-0.6, len(benches) - 0.4)  # one slot per benchmark, however few bars
        ax.margins(y=0.15)
    fig.legend(*ax_tau.get_legend_handles_labels(), loc="upper center", ncol=min(len(summary), 4), fontsize=9)
    rows = -(-len(summary) // 4)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.07 * rows))
    fig.savefig(path, dpi=110)
    plt.close(fig)
