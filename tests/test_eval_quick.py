"""End-to-end: `lipkern eval --quick` on the embedded digits default (the run CI makes)."""
import json
import re

import numpy as np
import pytest

from lipkern.eval import cli_eval
from lipkern.eval.report import write_report


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_quick")
    # An earlier run's report: --overwrite holds it aside, and deletes it once this run is done.
    write_report({"models": []}, out)
    assert cli_eval.main(["--quick", "--no-progress", "--out", str(out), "--overwrite"]) == 0
    assert not [p for p in out.iterdir() if p.name.startswith(cli_eval.HELD_PREFIX)]
    return out, json.loads((out / "results.json").read_text())


def test_report_structure(quick_run):
    out, res = quick_run
    assert [m["name"] for m in res["models"]] == ["preact_wrn", "tiny_vit"]
    md = (out / "report.md").read_text()
    for heading in ("Main table", "Gradient-masking audit", "Randomized smoothing", "Weight variant",
                    "Calibration-set size", "Empirical Lipschitz constant", "FGSM / PGD"):
        assert heading in md
    # Every accuracy in every table carries its interval: the sweep's rows included.
    assert re.search(r"\| 2\^-8 \| PGD \| \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\] \|", md)
    assert "40 test samples (seed 0, 1 chunk of 40)" in md  # the quick budget's 40 samples, in one chunk
    for m in res["models"]:
        assert list(m["configs"]) == ["original", "2^-8", "2^-7", "2^-6"]
        for kind in ("smoothing", "remapped", "lipschitz", "sweep"):
            assert (out / f"{kind}_{m['name']}.png").stat().st_size > 0
        assert m["layers"]["names"], "no layer with a remapped input was found"
        assert m["lipschitz"], "no Linear / 1x1 conv in the Lipschitz table"


def test_accuracies_in_unit_interval(quick_run):
    _, res = quick_run
    for m in res["models"]:
        for label, c in m["configs"].items():
            values = [c["clean"], c["autoattack"], c["cw"], c["worst_case"], *c["fgsm"].values(), *c["pgd"].values()]
            if label != "original":
                values += [c["adaptive"], c["transfer"]]
            assert all(0.0 <= v <= 1.0 for v in values), (m["name"], label)
            assert c["worst_case"] <= min(c["clean"], c["autoattack"], c["cw"])
            assert c["audit"]["verdict"] in ("PASS", "WARN")  # 40 samples: a margin of 7.5 points
            assert c["audit"]["verdict"] == "PASS" or c["audit"]["reasons"]
        for row in m["weight_variant"]["rows"] + m["calib_ablation"]["rows"]:
            low, high = row["robust_interval"]
            assert 0.0 <= low <= row["robust"] <= high <= 1.0, (m["name"], row)


def test_original_attack_sanity(quick_run):
    _, res = quick_run
    for m in res["models"]:
        c = m["configs"]["original"]
        for e in c["pgd"]:
            if int(e) >= 8:
                assert c["pgd"][e] <= c["fgsm"][e], (m["name"], e)
        assert c["pgd"]["96"] <= 0.05, m["name"]
        assert c["autoattack"] <= c["clean"]


def test_certified_accuracy_non_increasing(quick_run):
    _, res = quick_run
    for m in res["models"]:
        sm = m["smoothing"]
        assert sm["n0"] == 100 and sm["n"] >= 1000 and sm["alpha"] == 0.001
        for curve in sm["certified_accuracy"].values():
            assert np.all(np.diff(curve) <= 0)
            assert 0 <= curve[0] <= 1
