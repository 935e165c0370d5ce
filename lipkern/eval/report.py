"""Markdown report, results.json and PNG figures from the results dictionary of ``EvalResult.to_dict()``.

Everything here reads only that dictionary, so a report can be rebuilt from a saved ``results.json``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .stats import wilson_interval  # noqa: E402

SHOWN_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
# Every file write_report writes carries a mark of lipkern's (figures in their PNG metadata), so that --overwrite
# and a new report replace only those, not a file of the user's that has the name of one.
TITLE = "# lipkern evaluation report"
GENERATOR = "lipkern eval"
_PNG_MARK = b"tEXtSource\x00" + GENERATOR.encode()
_TEXT_MARKS = {"report.md": (TITLE + "\n").encode(), "results.json": f'{{\n "generator": "{GENERATOR}",'.encode()}


def chunk_phrase(n_samples: int, chunk_size: int) -> str:
    """How ``n_samples`` split into chunks of ``chunk_size``, as a run's summary and report say it."""
    n_chunks = -(-n_samples // chunk_size)
    if n_chunks == 1:
        return f"1 chunk of {n_samples}"
    last = n_samples - (n_chunks - 1) * chunk_size
    return f"{n_chunks} chunks of {chunk_size}" + ("" if last == chunk_size else f" (the last of {last})")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _ci(c: dict, key: str) -> str:
    """``acc [low, high]`` in % (Wilson 95 %)."""
    if c.get(key) is None:
        return "-"
    low, high = c["intervals"][key]
    return f"{_pct(c[key])} [{_pct(low)}, {_pct(high)}]"


def _acc(p, n: int) -> str:
    """An accuracy over ``n`` samples, ``acc [low, high]`` in %, for the tables whose results store only the
    accuracy (the interval follows from it: acc x n is the count of correct samples)."""
    if p is None:
        return "-"
    correct = round(p * n)
    if abs(p * n - correct) > 1e-6:
        raise ValueError(f"an accuracy of {p!r} is no count of {n} samples")
    low, high = wilson_interval(correct, n)
    return f"{_pct(p)} [{_pct(low)}, {_pct(high)}]"


def _signed(v: float) -> str:
    return f"{100 * v:+.2f}"


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def _difference(cmp: dict) -> str:
    return f"{_signed(cmp['difference'])} [{_signed(cmp['low'])}, {_signed(cmp['high'])}], p = {_p(cmp['p_value'])}"


def verdict_lines(results: dict) -> list[str]:
    """One plain sentence per model and c^r: the verdict and the worst-case comparison it rests on."""
    lines = []
    for m in results["models"]:
        for label, c in m["configs"].items():
            if label == "original":
                continue
            w, a = c["paired"]["worst_case"], c["paired"]["autoattack"]
            clean = c["paired"]["clean"]
            lines.append(
                f"- **{m['name']}, c^r = {label}: {c['verdict']}.** Worst case {_pct(w['candidate'])} % vs the "
                f"original's {_pct(w['baseline'])} % ({_difference(w)}); AutoAttack {_pct(a['candidate'])} % vs "
                f"{_pct(a['baseline'])} % ({_difference(a)}); clean {_difference(clean)}"
                f"{' (a significant clean-accuracy change)' if clean['direction'] else ''}. "
                f"{w['n']} test samples, differences in points with 95 % intervals and exact McNemar p-values.")
    return lines


def main_table(results: dict) -> str:
    """Clean / AutoAttack / adaptive / worst-case accuracy (%) with 95 % Wilson intervals: the headline."""
    rows = []
    for m in results["models"]:
        for label, c in m["configs"].items():
            rows.append([m["name"], label, c["n"], _ci(c, "clean"), _ci(c, "autoattack"), _ci(c, "adaptive"),
                         _ci(c, "worst_case"), c["audit"]["verdict"], c.get("verdict", "(baseline)")])
    return _table(["model", "c^r", "n", "clean", "AutoAttack", "adaptive (BPDA)", "worst case", "audit",
                   "verdict vs original"], rows)


def paired_table(m: dict) -> str:
    rows = []
    for label, c in m["configs"].items():
        if label == "original":
            continue
        for key, title in (("clean", "clean"), ("autoattack", "AutoAttack"), ("worst_case", "worst case"),
                           ("adaptive_vs_original_aa", "adaptive vs original's AutoAttack"),
                           ("transfer_vs_original_aa", "transfer vs original's AutoAttack")):
            cmp = c["paired"][key]
            rows.append([label, title, _pct(cmp["baseline"]), _pct(cmp["candidate"]), _signed(cmp["difference"]),
                         f"[{_signed(cmp['low'])}, {_signed(cmp['high'])}]",
                         f"{cmp['only_baseline']} / {cmp['only_candidate']}", _p(cmp["p_value"]),
                         "yes" if cmp["significant"] else "no"])
    return _table(["c^r", "comparison", "original", "remapped", "difference", "95 % interval",
                   "only original / only remapped correct", "McNemar p", "significant"], rows)


def _model_sections(m: dict) -> list[str]:
    cfgs = m["configs"]
    b = m["budget"]
    aa = ("standard" if (b["aa_targets"], b["aa_square_queries"]) == (9, 5000) else
          f"standard attacks, reduced: {b['aa_targets']} target classes, Square {b['aa_square_queries']} queries")
    s = [f"## {m['name']}",
         f"L-inf eps {m['eps_label']} ({m['eps']:.4f}); {m['n_test']} test samples (seed {m['seed']}, "
         f"{chunk_phrase(m['n_test'], m['chunk_size'])}), {m['n_calib']} calibration samples: "
         f"{m['calib_source']}; budget `{b['name']}`; AutoAttack {aa}; device {m['device']}. Accuracies in %; "
         "[..] are 95 % Wilson intervals."]

    s.append(f"### Paired comparison with the original model ({m['n_test']} test samples)")
    s.append(paired_table(m))
    s.append("Each row compares the same samples. Difference in points (remapped - original) with the 95 % "
             "interval for paired proportions (Bonett-Price); McNemar's exact test on the samples only one model gets right. "
             "'significant' means p < 0.05 in the exact test, which decides the verdict; the interval is the "
             "size of the difference and can exclude 0 when the exact test, which is conservative, does not. "
             "The worst case of a remapped model also counts the adaptive BPDA and "
             "transfer attacks, so a gain there is one the masking-aware attacks could not remove.")

    s.append("### Accuracy per c^r (paper Tables 1, 2, 4, 6; adaptive attack beside AutoAttack)")
    s.append(_table(
        ["c^r", "clean", "AutoAttack", "adaptive APGD-CE+T (BPDA)", f"CW-Linf (PGD-{b['cw_steps']})",
         "transfer from original (AA)", "APGD-CE (AA stage 1)", "Square's extra breaks", "worst case"],
        [[k, _ci(c, "clean"), _ci(c, "autoattack"), _ci(c, "adaptive"), _ci(c, "cw"), _ci(c, "transfer"),
          _acc(c["apgd_ce"], c["n"]), _pct(c["square_gain"]), _ci(c, "worst_case")] for k, c in cfgs.items()]))
    s.append("worst case = correct under AutoAttack and CW at once (per sample), and for a remapped model also under "
             "the adaptive and transfer attacks. Square's extra "
             "breaks = accuracy Square removes after APGD-CE, APGD-T and FAB-T inside AutoAttack.")

    eps_keys = list(next(iter(cfgs.values()))["pgd"])
    s.append(f"### FGSM / PGD-{b['pgd_steps']} accuracy vs eps (paper Tables 7-8; {m['n_test']} test samples)")
    rows = []
    for k, c in cfgs.items():
        rows.append([k, "FGSM", *(_acc(c["fgsm"][e], c["n"]) for e in eps_keys)])
        rows.append([k, "PGD", *(_acc(c["pgd"][e], c["n"]) for e in eps_keys)])
    s.append(_table(["c^r", "attack", *(f"{e}/255" for e in eps_keys)], rows))

    s.append("### Gradient-masking audit")
    rows = []
    for k, c in cfgs.items():
        a = c["audit"]
        rows.append([k, f"**{a['verdict']}**", "; ".join(a["reasons"]) or "all checks hold",
                     ", ".join(x["check"] for x in a["checks"])])
    s.append(_table(["c^r", "verdict", "reasons", "checks run"], rows))
    s.append(f"Margin: {100 * next(iter(cfgs.values()))['audit']['margin']:.2f} points, the larger of 2 points and "
             f"3 samples of {m['n_test']}: a symptom smaller than that is not flagged. The audit screens for masking "
             "symptoms (including an AutoAttack gain over the original that the adaptive or transfer attack takes "
             "back, as RobustBench found for MeanSparse); the paired test above decides whether a difference is "
             "real.")

    sm = m["smoothing"]
    s.append(f"### Randomized smoothing (Cohen et al. CERTIFY; sigma {sm['sigma']}, n0 {sm['n0']}, n {sm['n']}, "
             f"alpha {sm['alpha']}, {sm['n_points']} test points; paper Figure 1)")
    idx = [sm["radii"].index(r) for r in SHOWN_RADII if r in sm["radii"]]
    s.append(_table(["c^r", *(f"r={sm['radii'][i]}" for i in idx)],
                    [[k, *(_acc(v[i], sm["n_points"]) for i in idx)] for k, v in sm["certified_accuracy"].items()]))

    ly = m["layers"]
    s.append(f"### Proportion of layer inputs equal to 0 (remapped; paper Figure 2; {ly['n_samples']} test samples)")
    s.append(_table(["layer", *ly["zero_fraction"]],
                    [[n, *(_pct(z[n]) for z in ly["zero_fraction"].values())] for n in ly["names"]]))
    s.append("The original column counts zeros the model already produces (ReLU); the remap's own share is the "
             "difference.")

    lip = m["lipschitz"]
    if lip:
        s.append(f"### Empirical Lipschitz constant per Linear / 1x1 conv (paper appendix C; {ly['n_samples']} test "
                 "samples)")
        confs = [k for k in next(iter(lip.values())) if k != "sigma_W"]
        rows = [[n, f"{row['sigma_W']:.3f}",
                 *(f"{row[k]['worst']:.3f} / {row[k]['mean']:.3f} ({100 * row[k]['worst_ratio']:.1f} %)"
                   for k in confs)] for n, row in lip.items()]
        s.append(_table(["layer", "sigma(W)", *(f"{k}: worst / mean (worst/sigma)" for k in confs)], rows))
        s.append("sigma of W diag(mask(x)), mask = input features not 0; worst case and mean over the test rows.")

    wv = m["weight_variant"]
    attack = wv["attack"]
    s.append(f"### Weight variant (Lemma 2, paper Table 5; masks at c^r = {wv['ratio_label']} from the calibration "
             f"data; {attack}; {m['n_test']} test samples)")
    n = m["n_test"]
    rows = [["original", "0", _acc(cfgs["original"]["clean"], n), _acc(cfgs["original"]["aux_robust"], n)]]
    if wv["ratio_label"] in cfgs:
        runtime = cfgs[wv["ratio_label"]]
        rows.append([f"runtime remap {wv['ratio_label']}", "-", _acc(runtime["clean"], n),
                     _acc(runtime["aux_robust"], n)])
    rows += [[f"weight, fraction >= {r['fraction']}", sum(r["pruned_columns"].values()), _acc(r["clean"], n),
              _acc(r["robust"], n)] for r in wv["rows"]]
    s.append(_table(["model", "zeroed columns", "clean", attack], rows))

    ab = m["calib_ablation"]
    attack = ab["attack"]
    s.append(f"### Calibration-set size (paper Table 3; c^r = {ab['ratio_label']}; {attack}; {m['n_test']} test "
             "samples)")
    s.append(_table(["calibration samples", "clean", attack],
                    [[r["n_calib"], _acc(r["clean"], n), _acc(r["robust"], n)] for r in ab["rows"]]))
    return s


def render_markdown(results: dict) -> str:
    parts = [TITLE, "## Verdict", "\n".join(verdict_lines(results)),
             "## Main table", main_table(results)]
    for m in results["models"]:
        parts += _model_sections(m)
    return "\n\n".join(parts) + "\n"


MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _finish(fig, ax, path, legend: dict) -> None:
    ax.title.set_fontsize(9)
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Source": GENERATOR})
    plt.close(fig)


def _plot_smoothing(m, path):
    sm = m["smoothing"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (k, v) in enumerate(sm["certified_accuracy"].items()):
        # Equal curves are common (the remap rarely changes a certificate): markers and dashes keep them apart.
        ax.plot(sm["radii"], v, label=k, drawstyle="steps-post", marker=MARKERS[i % len(MARKERS)], markersize=3,
                linestyle=("-", "--", "-.", ":")[i % 4], alpha=0.85)
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", ylim=(0, 1),
           title=f"{m['name']}: randomized smoothing, sigma={sm['sigma']}, n = {sm['n_points']}")
    _finish(fig, ax, path, legend=dict(fontsize=7))


def _short(name: str, parts: int = 3) -> str:
    return ".".join(name.split(".")[-parts:])


def original_lines(orig: dict) -> list[tuple[str, str, str]]:
    """The original model's lines on the robust-accuracy plot (key, colour, legend title): AutoAttack and the
    worst case, or one line for both where they are equal (the second would hide the first)."""
    if orig["worst_case"] == orig["autoattack"]:
        return [("autoattack", "tab:purple", "AutoAttack = worst case")]
    return [("autoattack", "tab:blue", "AutoAttack"), ("worst_case", "tab:red", "worst case")]


def _plot_main(m, path):
    """Robust accuracy against c^r with 95 % intervals; the original model as a line and band."""
    cfgs = m["configs"]
    labels = [k for k in cfgs if k != "original"]
    xs = list(range(len(labels)))
    fig, ax = plt.subplots(figsize=(6, 4))
    orig = cfgs["original"]
    for key, colour, title in original_lines(orig):
        low, high = orig["intervals"][key]
        ax.axhspan(100 * low, 100 * high, color=colour, alpha=0.12)
        ax.axhline(100 * orig[key], color=colour, linestyle="--", linewidth=1, label=f"original, {title}")
    for offset, (key, colour, marker, title) in zip((-0.12, 0.0, 0.12), (
            ("autoattack", "tab:blue", "o", "AutoAttack"), ("adaptive", "tab:green", "s", "adaptive (BPDA)"),
            ("worst_case", "tab:red", "D", "worst case"))):
        ys = [100 * cfgs[k][key] for k in labels]
        err = [[100 * (cfgs[k][key] - cfgs[k]["intervals"][key][0]) for k in labels],
               [100 * (cfgs[k]["intervals"][key][1] - cfgs[k][key]) for k in labels]]
        ax.errorbar([x + offset for x in xs], ys, yerr=err, fmt=marker, color=colour, capsize=3, label=title)
    ax.set_xticks(xs, [f"c^r = {k}" for k in labels])
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set(ylabel="accuracy under attack (%)",
           title=f"{m['name']}: robust accuracy, eps {m['eps_label']}, n = {m['n_test']} (95 % intervals)")
    _finish(fig, ax, path, legend=dict(fontsize=7, loc="best"))


def _plot_layers(m, path):
    ly = m["layers"]
    names = ly["names"]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(names) + 2.5), 4))
    confs = list(ly["zero_fraction"])
    width = 0.8 / max(len(confs), 1)
    for i, k in enumerate(confs):
        ax.bar([j + i * width for j in range(len(names))], [100 * ly["zero_fraction"][k][n] for n in names],
               width, label=k)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [_short(n) for n in names], rotation=60,
                  ha="right", fontsize=7)
    ax.set(ylabel="layer inputs equal to 0 (%)", ylim=(0, 100),
           title=f"{m['name']}: remapped proportion per layer ({ly['n_samples']} test samples)")
    # Bars reach any height up to 100 %, so no corner inside the axes is free of them: the legend goes outside.
    _finish(fig, ax, path, legend=dict(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0))


def _plot_lipschitz(m, path):
    """Dot chart: one row per layer, one marker per configuration, nudged apart so equal values stay visible."""
    lip = m["lipschitz"]
    names = list(lip)
    confs = [k for k in lip[names[0]] if k != "sigma_W"]
    fig, ax = plt.subplots(figsize=(6.5, max(3, 0.35 * len(names) + 1.5)))
    step = 0.6 / max(len(confs), 1)
    for i, k in enumerate(confs):
        ys = [j - 0.3 + (i + 0.5) * step for j in range(len(names))]
        ax.scatter([lip[n][k]["worst_ratio"] for n in names], ys, marker=MARKERS[i % len(MARKERS)], s=28,
                   label=f"{k}: worst case", zorder=3)
        ax.scatter([lip[n][k]["mean"] / lip[n]["sigma_W"] for n in names], ys, marker=MARKERS[i % len(MARKERS)],
                   s=28, facecolors="none", edgecolors=f"C{i}", label=f"{k}: mean", zorder=3)
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.grid(axis="x", alpha=0.3)
    ax.set(xlabel="sigma(W diag(mask)) / sigma(W)",
           title=f"{m['name']}: empirical Lipschitz constant ({m['layers']['n_samples']} test samples)")
    _finish(fig, ax, path, legend=dict(fontsize=6, loc="best"))


def _plot_sweep(m, path):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (k, c) in enumerate(m["configs"].items()):
        e = [int(v) for v in c["pgd"]]
        marker = MARKERS[i % len(MARKERS)]
        ax.plot(e, list(c["fgsm"].values()), linestyle="--", marker=marker, markersize=4, color=f"C{i}", alpha=0.8)
        ax.plot(e, list(c["pgd"].values()), color=f"C{i}", marker=marker, markerfacecolor="none", label=k,
                alpha=0.8)
    ax.set(xscale="log", xlabel="eps x 255", ylabel="accuracy", ylim=(0, 1),
           title=f"{m['name']}: FGSM (dashed) vs PGD (solid), n = {m['n_test']}")
    _finish(fig, ax, path, legend=dict(fontsize=7))


FIGURES = {"robust_accuracy": _plot_main, "smoothing": _plot_smoothing, "remapped": _plot_layers,
           "lipschitz": _plot_lipschitz, "sweep": _plot_sweep}


def is_report_file(path) -> bool:
    """Whether :func:`write_report` wrote ``path`` (or its temporary, which a killed write leaves cut short):
    a file of one of its names that carries its mark."""
    path = Path(path)
    name = path.name.removesuffix(".tmp")
    if name in _TEXT_MARKS:
        mark = _TEXT_MARKS[name]
        head = _head(path, len(mark))
        if head == mark or (head is not None and name != path.name and mark.startswith(head)):
            return True
        return name == "results.json" == path.name and _unmarked_results(path)
    if name.endswith(".png") and any(name.startswith(f"{kind}_") for kind in FIGURES):
        # The metadata chunks come before the image data, near the start.
        head = _head(path, 4096)
        return head is not None and _PNG_MARK in head
    return False


def _unmarked_results(path: Path) -> bool:
    """Whether ``path`` holds results as an earlier lipkern wrote them, before the mark: its two keys, and
    models with their configurations."""
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (isinstance(results, dict) and set(results) == {"models", "meta"} and isinstance(results["models"], list)
            and all(isinstance(m, dict) and {"name", "configs", "ratio_labels"} <= set(m) for m in results["models"]))


def _head(path: Path, size: int) -> bytes | None:
    """The first ``size`` bytes of ``path``; None where it is no file that can be read."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return None


def write_report(results: dict, out_dir) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A resumed or partial earlier report may have drawn figures this one does not.
    for stale in out.glob("*.png"):
        if is_report_file(stale):
            stale.unlink()
    files = {"report": out / "report.md", "results": out / "results.json"}
    for m in results["models"]:
        for kind, fn in FIGURES.items():
            if kind == "lipschitz" and not m["lipschitz"] or kind == "remapped" and not m["layers"]["names"]:
                continue
            path = out / f"{kind}_{m['name']}.png"
            fn(m, path)
            files[f"{kind}_{m['name']}"] = path
    md = render_markdown(results)
    md += "\n## Figures\n\n" + "\n".join(f"![{k}]({p.name})" for k, p in files.items() if p.suffix == ".png") + "\n"
    _write_atomic(files["results"], json.dumps({"generator": GENERATOR, **results}, indent=1))
    _write_atomic(files["report"], md)
    return {k: str(p) for k, p in files.items()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
