"""Markdown report, results.json and PNG figures from the results dictionary of ``EvalResult.to_dict()``.

Everything here reads only that dictionary, so a report can be rebuilt from a saved ``results.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHOWN_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def main_table(results: dict) -> str:
    """Clean / AutoAttack / adaptive accuracy (%) per model and configuration: the report's headline."""
    rows = []
    for m in results["models"]:
        for label, c in m["configs"].items():
            rows.append([m["name"], label, _pct(c["clean"]), _pct(c["autoattack"]), _pct(c["adaptive"]),
                         _pct(c["worst_case"]), c["audit"]["verdict"]])
    return _table(["model", "c^r", "clean", "AutoAttack", "adaptive (BPDA)", "worst case", "audit"], rows)


def _model_sections(m: dict) -> list[str]:
    cfgs = m["configs"]
    b = m["budget"]
    aa = ("standard" if (b["aa_targets"], b["aa_square_queries"]) == (9, 5000) else
          f"standard attacks, reduced: {b['aa_targets']} target classes, Square {b['aa_square_queries']} queries")
    s = [f"## {m['name']}",
         f"L-inf eps {m['eps_label']} ({m['eps']:.4f}); {m['n_test']} test samples, {m['n_calib']} calibration "
         f"samples; budget `{b['name']}`; AutoAttack {aa}. Accuracies in %."]

    s.append("### Accuracy per c^r (paper Tables 1, 2, 4, 6; adaptive attack beside AutoAttack)")
    s.append(_table(
        ["c^r", "clean", "AutoAttack", "adaptive APGD-CE+T (BPDA)", f"CW-Linf (PGD-{b['cw_steps']})",
         "transfer from original (AA)", "APGD-CE (AA stage 1)", "Square's extra breaks", "worst case"],
        [[k, _pct(c["clean"]), _pct(c["autoattack"]), _pct(c["adaptive"]), _pct(c["cw"]), _pct(c["transfer"]),
          _pct(c["apgd_ce"]), _pct(c["square_gain"]), _pct(c["worst_case"])] for k, c in cfgs.items()]))
    s.append("worst case = correct under AutoAttack, CW, adaptive and transfer at once (per sample). Square's extra "
             "breaks = accuracy Square removes after APGD-CE, APGD-T and FAB-T inside AutoAttack.")

    eps_keys = list(next(iter(cfgs.values()))["pgd"])
    s.append(f"### FGSM / PGD-{b['pgd_steps']} accuracy vs eps (paper Tables 7-8)")
    rows = []
    for k, c in cfgs.items():
        rows.append([k, "FGSM", *(_pct(c["fgsm"][e]) for e in eps_keys)])
        rows.append([k, "PGD", *(_pct(c["pgd"][e]) for e in eps_keys)])
    s.append(_table(["c^r", "attack", *(f"{e}/255" for e in eps_keys)], rows))

    s.append("### Gradient-masking audit")
    rows = []
    for k, c in cfgs.items():
        a = c["audit"]
        rows.append([k, f"**{a['verdict']}**", "; ".join(a["reasons"]) or "all checks hold",
                     ", ".join(x["check"] for x in a["checks"])])
    s.append(_table(["c^r", "verdict", "reasons", "checks run"], rows))
    s.append(f"Margin: {100 * next(iter(cfgs.values()))['audit']['margin']:.2f} points.")

    sm = m["smoothing"]
    s.append(f"### Randomized smoothing (Cohen et al. CERTIFY; sigma {sm['sigma']}, n0 {sm['n0']}, n {sm['n']}, "
             f"alpha {sm['alpha']}, {sm['n_points']} test points; paper Figure 1)")
    idx = [sm["radii"].index(r) for r in SHOWN_RADII if r in sm["radii"]]
    s.append(_table(["c^r", *(f"r={sm['radii'][i]}" for i in idx)],
                    [[k, *(_pct(v[i]) for i in idx)] for k, v in sm["certified_accuracy"].items()]))

    ly = m["layers"]
    s.append(f"### Proportion of layer inputs equal to 0 (remapped; paper Figure 2; {ly['n_samples']} test samples)")
    s.append(_table(["layer", *ly["zero_fraction"]],
                    [[n, *(_pct(z[n]) for z in ly["zero_fraction"].values())] for n in ly["names"]]))
    s.append("The original column counts zeros the model already produces (ReLU); the remap's own share is the "
             "difference.")

    lip = m["lipschitz"]
    if lip:
        s.append("### Empirical Lipschitz constant per Linear / 1x1 conv (paper appendix C)")
        confs = [k for k in next(iter(lip.values())) if k != "sigma_W"]
        rows = [[n, f"{row['sigma_W']:.3f}",
                 *(f"{row[k]['worst']:.3f} / {row[k]['mean']:.3f} ({100 * row[k]['worst_ratio']:.1f} %)"
                   for k in confs)] for n, row in lip.items()]
        s.append(_table(["layer", "sigma(W)", *(f"{k}: worst / mean (worst/sigma)" for k in confs)], rows))
        s.append("sigma of W diag(mask(x)), mask = input features not 0; worst case and mean over the test rows.")

    wv = m["weight_variant"]
    attack = wv["attack"]
    s.append(f"### Weight variant (Lemma 2, paper Table 5; masks at c^r = {wv['ratio_label']}; {attack})")
    rows = [["original", "0", _pct(cfgs["original"]["clean"]), _pct(cfgs["original"]["aux_robust"])]]
    if wv["ratio_label"] in cfgs:
        runtime = cfgs[wv["ratio_label"]]
        rows.append([f"runtime remap {wv['ratio_label']}", "-", _pct(runtime["clean"]), _pct(runtime["aux_robust"])])
    rows += [[f"weight, fraction >= {r['fraction']}", sum(r["pruned_columns"].values()), _pct(r["clean"]),
              _pct(r["robust"])] for r in wv["rows"]]
    s.append(_table(["model", "zeroed columns", "clean", attack], rows))

    ab = m["calib_ablation"]
    attack = ab["attack"]
    s.append(f"### Calibration-set size (paper Table 3; c^r = {ab['ratio_label']}; {attack})")
    s.append(_table(["calibration samples", "clean", attack],
                    [[r["n_calib"], _pct(r["clean"]), _pct(r["robust"])] for r in ab["rows"]]))
    return s


def render_markdown(results: dict) -> str:
    parts = ["# lipkern evaluation report", "## Main table", main_table(results)]
    for m in results["models"]:
        parts += _model_sections(m)
    return "\n\n".join(parts) + "\n"


def _plot_smoothing(m, path):
    sm = m["smoothing"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k, v in sm["certified_accuracy"].items():
        ax.plot(sm["radii"], v, label=k, drawstyle="steps-post")
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", ylim=(0, 1),
           title=f"{m['name']}: randomized smoothing, sigma={sm['sigma']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_layers(m, path):
    ly = m["layers"]
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(ly["names"]) + 2), 3.5))
    confs = list(ly["zero_fraction"])
    width = 0.8 / max(len(confs), 1)
    for i, k in enumerate(confs):
        ax.bar([j + i * width for j in range(len(ly["names"]))], [ly["zero_fraction"][k][n] for n in ly["names"]],
               width, label=k)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ly["names"]))], ly["names"], rotation=60, ha="right",
                  fontsize=7)
    ax.set(ylabel="proportion of inputs = 0", ylim=(0, 1), title=f"{m['name']}: remapped proportion per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_lipschitz(m, path):
    lip = m["lipschitz"]
    names = list(lip)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names) + 2), 3.5))
    confs = [k for k in lip[names[0]] if k != "sigma_W"]
    for k in confs:
        ax.plot(range(len(names)), [lip[n][k]["worst_ratio"] for n in names], marker="o", label=f"{k} worst")
        ax.plot(range(len(names)), [lip[n][k]["mean"] / lip[n]["sigma_W"] for n in names], marker="x",
                linestyle=":", label=f"{k} mean")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="sigma(W diag(mask)) / sigma(W)", title=f"{m['name']}: empirical Lipschitz constant")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_sweep(m, path):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k, c in m["configs"].items():
        e = [int(v) for v in c["pgd"]]
        line, = ax.plot(e, list(c["fgsm"].values()), linestyle="--", marker=".")
        ax.plot(e, list(c["pgd"].values()), color=line.get_color(), marker="o", label=k)
    ax.set(xscale="log", xlabel="eps x 255", ylabel="accuracy", ylim=(0, 1),
           title=f"{m['name']}: FGSM (dashed) vs PGD (solid)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out_dir) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"report": out / "report.md", "results": out / "results.json"}
    for m in results["models"]:
        for kind, fn in (("smoothing", _plot_smoothing), ("remapped", _plot_layers), ("lipschitz", _plot_lipschitz),
                         ("sweep", _plot_sweep)):
            if kind == "lipschitz" and not m["lipschitz"] or kind == "remapped" and not m["layers"]["names"]:
                continue
            path = out / f"{kind}_{m['name']}.png"
            fn(m, path)
            files[f"{kind}_{m['name']}"] = path
    md = render_markdown(results)
    md += "\n## Figures\n\n" + "\n".join(f"![{k}]({p.name})" for k, p in files.items() if p.suffix == ".png") + "\n"
    files["report"].write_text(md)
    files["results"].write_text(json.dumps(results, indent=1))
    return {k: str(p) for k, p in files.items()}
