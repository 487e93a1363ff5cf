"""One table of what transfers: the speech branch and the fused model on held-out sentences and a
held-out corpus, beside the floors fitted on the same splits (training.speech_branch's SVM on MFCC
statistics and logistic regression on pooled Whisper states), from the recipe's run folders.

    python -m training.transfer_report --runs runs --out training/reports/transfer.json   (+ .png)

Speech rows: clean test versions, MELD labels (WA / WF1) and, for RAVDESS-only sets, RAVDESS's
eight classes (WA). Fusion rows: each acted test set with its own transcript ("both"), with a
neutral MELD sentence as its transcript ("meldtext") and voice alone ("speech"), with the share of
clips whose speech weight is above the text weight.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPEECH_RUNS = ("speech_to-emodb", "speech_to-ravdess", "speech_sentence02", "speech")
FUSION_RUNS = ("recipe", "recipe_to-emodb")
MODES = ("cnn", "whisper", "both")
FLOORS = ("svm-mfcc", "lr-whisper")


def speech_rows(rep: dict) -> list[dict]:
    rows = []
    sets = sorted({k.split("/")[0] for k in rep["test"]})
    for name in sets:
        row: dict = {"split": rep["split"], "set": name}
        for m in MODES:
            r = rep["test"].get(f"{name}/{m}/clean")
            if r:
                row[m] = {"wa": r["meld"]["wa"], "wf1": r["meld"]["wf1"], "native_wa": r["native"]["wa"],
                          "aug_wf1": rep["test"][f"{name}/{m}/aug"]["meld"]["wf1"]}
        for f in FLOORS:
            r = rep["floors"][f"test/{name}/{f}/clean"]
            row[f] = {"wa": r["meld"]["wa"], "wf1": r["meld"]["wf1"], "native_wa": r["native"]["wa"]}
        ours = [m for m in MODES if m in row]
        best_floor = max(row[f]["wf1"] for f in FLOORS)
        row["best_ours_wf1"] = max(row[m]["wf1"] for m in ours)
        row["best_floor_wf1"] = best_floor
        row["margin_over_floors"] = row["best_ours_wf1"] - best_floor
        if "choice" in rep:
            row["shipped_mode"] = rep["choice"]
        rows.append(row)
    return rows


def fusion_rows(rep: dict) -> list[dict]:
    rows = []
    names = sorted({k.rsplit("-", 2)[0] for k in rep["test"] if k.endswith("-clean-both")})
    for name in names:
        row: dict = {"split": rep["split"], "set": name}
        for m in ("both", "meldtext", "speech", "text"):
            r = rep["test"][f"{name}-clean-{m}"]
            row[m] = {"acc": r["acc"], "wa": r["wa"], "wf1": r["wf1"], "speech_weight": r["speech_weight"]["mean"],
                      "speech_over_text": r["speech_weight"]["frac_speech_over_text"]}
            a = rep["test"][f"{name}-aug-{m}"]
            row[m]["aug_wa"] = a["wa"]
        rows.append(row)
    meld = rep["test"]["meld-test"]
    return rows + [{"split": rep["split"], "set": "meld-test", "text": {"acc": meld["acc"], "wa": meld["wa"], "wf1": meld["wf1"]}}]


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["speech"] if r["set"] != "ravdess-seen-sentence"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    keys = (*MODES, *FLOORS)
    width = 0.8 / len(keys)
    for j, k in enumerate(keys):
        vals = [r[k]["wf1"] if k in r else 0.0 for r in rows]
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=k)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['split']}\n{r['set']}" for r in rows], fontsize=7)
    ax.set_ylabel("WF1 (MELD labels), clean test versions")
    ax.set_title("speech only: held-out sentences and corpora vs the floors on the same split")
    ax.legend(fontsize=8, ncol=5)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default="training/reports/transfer.json")
    a = p.parse_args(argv)
    runs, out = Path(a.runs), Path(a.out)
    report: dict = {"speech": [], "fusion": []}
    for name in SPEECH_RUNS:
        path = runs / name / "speech_report.json"
        if path.is_file():
            report["speech"] += speech_rows(json.loads(path.read_text()))
    for name in FUSION_RUNS:
        path = runs / name / "recipe_report.json"
        if path.is_file():
            report["fusion"] += fusion_rows(json.loads(path.read_text()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    for r in report["speech"]:
        cells = "  ".join(f"{k} {r[k]['wf1']:.1f}" for k in (*MODES, *FLOORS) if k in r)
        print(f"speech {r['split']:<11} {r['set']:<26} WF1: {cells}  margin {r['margin_over_floors']:+.1f}")
    for r in report["fusion"]:
        cells = "  ".join(f"{k} WA {r[k]['wa']:.1f}" + (f" (speech>text {100 * r[k]['speech_over_text']:.0f}%)" if "speech_over_text" in r[k] else "")
                          for k in ("both", "meldtext", "speech", "text") if k in r)
        print(f"fusion {r['split']:<11} {r['set']:<26} {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
