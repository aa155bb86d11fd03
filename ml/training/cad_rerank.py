"""The nodule CAD's second stage, fitted on validation outlines and chosen leave-one-anatomy-out.

The outlines are :mod:`ml.training.cad_outlines`'s: each anatomy's validation composites (LIDC
validation-split nodules, never the test split) through the whole CAD with the fold classifier
that never saw the anatomy, so the classifier's scores on them are as it scores an anatomy it
does not know. Each outline has its features (:func:`ml.runtime.cad_rerank.outline_features`)
and whether it hits an inserted nodule.

A recipe (logistic regression or one hidden layer, an L2 weight) is fitted on five anatomies'
outlines and ranks the sixth's; the validation FROC of those rankings (:func:`leave_one_out`)
is set beside the classifier's own ranking of the same outlines, and the recipe with the best
such CPM is the one shipped, if it beats the classifier's. Each fold model (without one anatomy,
for the evaluation of that anatomy) takes its operating threshold from the rankings of its five
anatomies by models fitted without each of them in turn (nested), so no threshold is chosen on
the anatomy it is evaluated on; the shipped model's from the rankings of all six.

Run ``python -m ml.training.cad_outlines ... --collect-only`` first (it writes the outlines),
then ``python -m ml.training.cad_rerank --outlines DIR --out FILE [--register]`` (seconds).
Imports ``ml.evaluation``, ``ml.image``, ``ml.runtime`` and ``ml.training``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ml.evaluation.froc import ScanDetections, froc
from ml.image.blobs import Blob
from ml.image.measure import RegionMeasurement
from ml.runtime import cad, cad_rerank, registry
from ml.runtime.networks import RerankNet
from ml.training import cad_outlines

NAME = "radai-nodule-cad-rerank"
VERSION = "1.0.0"
TARGET_FP_PER_STUDY = 1.0
REPORTABLE_MM = cad_outlines.REPORTABLE_MM
RECIPES: tuple[dict, ...] = (
    {"hidden": 0, "l2": 1e-3},
    {"hidden": 0, "l2": 1e-2},
    {"hidden": 0, "l2": 1e-1},
    {"hidden": 16, "l2": 1e-2},
    {"hidden": 16, "l2": 1e-1},
)
ITERATIONS = 200
SEED = 0


@dataclass(frozen=True)
class Study:
    """One validation study's outlines as the second stage sees them."""

    study_id: str
    anatomy: str
    diameters_mm: list[float]  # its inserted nodules'
    masses: list[int | None]  # what each mass outline hits
    features: np.ndarray  # (n, len(FEATURES)) of the nodule outlines
    scores: np.ndarray  # the classifier's, per nodule outline
    hits: list[int | None]  # the nodule each hits
    faint: np.ndarray  # bool per nodule outline: ranked below all others, never reported
    classifier_threshold: float  # the fold classifier's operating threshold


def from_outlines(s: cad_outlines.OutlineStudy) -> Study:
    rows, scores, hits, faint, masses = [], [], [], [], []
    for o in s.outlines:
        if o.mass:
            masses.append(o.hit)
            continue
        if o.measurement is None or o.seed is None:
            raise ValueError(f"{s.study_id}: outlines collected without their features")
        m = RegionMeasurement(**o.measurement)
        rows.append(cad_rerank.outline_features(m, Blob(**o.seed), o.score))
        scores.append(o.score)
        hits.append(o.hit)
        faint.append(cad.is_faint(o.mean_hu))
    return Study(
        s.study_id,
        s.anatomy,
        s.nodule_diameters_mm,
        masses,
        cad_rerank.in_study(np.array(rows, dtype=np.float32)),
        np.array(scores, dtype=np.float64),
        hits,
        np.array(faint, dtype=bool),
        s.threshold,
    )


def fit(studies: Sequence[Study], recipe: dict, seed: int = SEED) -> RerankNet:
    """A second stage fitted on ``studies``' outlines: mean binary cross-entropy of hitting a
    nodule plus ``l2`` times the squared weights, by L-BFGS from a seeded start."""
    x = torch.from_numpy(np.concatenate([s.features for s in studies]))
    y = torch.tensor([h is not None for s in studies for h in s.hits], dtype=torch.float32)
    torch.manual_seed(seed)
    net = RerankNet(x.shape[1], recipe["hidden"])
    net.mean.copy_(x.mean(0))
    net.scale.copy_(x.std(0).clamp_min(1e-3))
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    opt = torch.optim.LBFGS(net.parameters(), max_iter=ITERATIONS, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(net(x)[:, 0], y) + recipe["l2"] * sum((w**2).sum() for w in weights)
        loss.backward()
        return loss

    opt.step(closure)
    registry.as_shipped(net)
    return net


def ranks(s: Study, scores: np.ndarray) -> list[tuple[float, int | None]]:
    """(rank, hit) of every outline: a mass first (1.0), a faint nodule below all (score - 1)."""
    out: list[tuple[float, int | None]] = [(1.0, h) for h in s.masses]
    out += [
        (float(p) - 1.0 if f else float(p), h)
        for p, f, h in zip(scores, s.faint, s.hits, strict=True)
    ]
    return out


def validation_froc(studies: Sequence[Study], scores: Sequence[np.ndarray]) -> dict:
    f = froc(
        [
            ScanDetections(s.study_id, len(s.diameters_mm), ranks(s, p), s.anatomy)
            for s, p in zip(studies, scores, strict=True)
        ]
    )
    return {"cpm": f.cpm, "sensitivity_at": {f"{k:g}": v for k, v in f.at_rates.items()}}


def operating_point(
    studies: Sequence[Study], scores: Sequence[np.ndarray], thresholds: Sequence[float]
) -> dict:
    """False calls per study and the share of nodules >= `REPORTABLE_MM` reported (every mass,
    every nodule outline at or above its study's threshold that is not faint), pooled."""
    false_calls, big, reported_big = 0, 0, 0
    for s, p, t in zip(studies, scores, thresholds, strict=True):
        kept = list(s.masses) + [
            h for q, f, h in zip(p, s.faint, s.hits, strict=True) if q >= t and not f
        ]
        false_calls += sum(h is None for h in kept)
        found = {h for h in kept if h is not None}
        for i, d in enumerate(s.diameters_mm):
            if d >= REPORTABLE_MM:
                big += 1
                reported_big += i in found
    return {
        "false_calls_per_study": false_calls / max(1, len(studies)),
        "reported_share_6mm": reported_big / big if big else float("nan"),
    }


def threshold_at(
    studies: Sequence[Study], scores: Sequence[np.ndarray], target: float = TARGET_FP_PER_STUDY
) -> float:
    """The lowest threshold at which the studies' false calls per study stay within ``target``
    (masses, reported by size, count too)."""
    mass_fp = sum(h is None for s in studies for h in s.masses)
    negatives = np.sort(
        np.concatenate(
            [p[(~s.faint) & np.array([h is None for h in s.hits], dtype=bool)]
             for s, p in zip(studies, scores, strict=True)]
            or [np.zeros(0)]
        )
    )[::-1]  # fmt: skip
    allowed = int(np.floor(target * len(studies) + 1e-9)) - mass_fp
    if allowed < 0:
        return float("inf")
    if allowed >= len(negatives):
        return 0.0
    # Just above the first false call beyond the allowance, so that it is not reported.
    return float(np.nextafter(negatives[allowed], np.inf))


def leave_one_out(
    studies: Sequence[Study], recipe: dict, anatomies: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Every study's outlines scored by a second stage fitted without its anatomy."""
    anatomies = anatomies or sorted({s.anatomy for s in studies})
    fitted = {a: fit([s for s in studies if s.anatomy != a], recipe) for a in anatomies}
    return [cad_rerank.probabilities(fitted[s.anatomy], s.features) for s in studies]


def fold_threshold(studies: Sequence[Study], recipe: dict) -> float:
    """The operating threshold of a second stage fitted on ``studies``: chosen on their rankings
    by models fitted without each of their anatomies in turn."""
    return threshold_at(studies, leave_one_out(studies, recipe))


def evaluate(studies: Sequence[Study]) -> dict:
    """Each recipe's leave-one-anatomy-out validation figures beside the classifier's own."""
    classifier = [s.scores for s in studies]
    thresholds = [s.classifier_threshold for s in studies]
    own = {
        "froc": validation_froc(studies, classifier),
        "operating_point": operating_point(studies, classifier, thresholds),
    }
    anatomies = sorted({s.anatomy for s in studies})
    each = {a: [i for i, s in enumerate(studies) if s.anatomy == a] for a in anatomies}
    rows = []
    for recipe in RECIPES:
        oof = leave_one_out(studies, recipe)
        per = {a: fold_threshold([s for s in studies if s.anatomy != a], recipe) for a in anatomies}
        thresholds = [per[s.anatomy] for s in studies]
        rows.append(
            {
                "recipe": recipe,
                "froc": validation_froc(studies, oof),
                "operating_point": operating_point(studies, oof, thresholds),
                # The threshold rule pools the anatomies: how each held-out one fares under it.
                "by_anatomy": {
                    a: operating_point(
                        [studies[i] for i in each[a]],
                        [oof[i] for i in each[a]],
                        [thresholds[i] for i in each[a]],
                    )
                    for a in anatomies
                },
                "fold_thresholds": per,
            }
        )
    return {"classifier": own, "recipes": rows}


def choose(evaluation: dict) -> dict | None:
    """The recipe with the best leave-one-anatomy-out CPM, if it beats the classifier's own
    ranking of the same outlines (ties: the earlier, simpler recipe); else None."""
    best = max(evaluation["recipes"], key=lambda r: round(r["froc"]["cpm"], 9), default=None)
    if best is None or best["froc"]["cpm"] <= evaluation["classifier"]["froc"]["cpm"]:
        return None
    return best["recipe"]


def register(
    studies: Sequence[Study],
    recipe: dict,
    evaluation: dict,
    source: str,
    root: Path = registry.MODELS_DIR,
) -> list[Path]:
    """Fit the shipped second stage on every study and a fold model without each anatomy, each
    with the threshold :func:`evaluate` chose for it (:func:`fold_threshold`), and write them to
    the registry."""
    anatomies = sorted({s.anatomy for s in studies})
    row = next(r for r in evaluation["recipes"] if r["recipe"] == recipe)
    arch = {"features": len(cad_rerank.FEATURES), "hidden": recipe["hidden"]}
    data = {
        "outlines": source,
        "studies": len(studies),
        "outlined_nodules": sum(h is not None for s in studies for h in s.hits),
        "outlines_total": sum(len(s.hits) + len(s.masses) for s in studies),
        "description": "The nodule CAD's outlines on validation composites (LIDC validation-split "
        "nodules inserted into each anatomy, ml.training.cad_outlines) scored by the fold "
        "classifier that never saw the anatomy: an outline hitting an inserted nodule is a "
        "positive, every other one a negative. LIDC test-split patients never read.",
        # The same nodules and anatomies as the classifier's data: its citations and licences.
        **{k: v for k, v in _classifier_data().items() if k in ("citations", "licences")},
    }
    written = []
    for held_out in anatomies:
        own = [s for s in studies if s.anatomy != held_out]
        net = fit(own, recipe)
        threshold = row["fold_thresholds"][held_out]
        path = registry.save(
            net, name=NAME, version=VERSION, task="cad-rerank", card={}, root=root,
            weights_name=f"fold-without-{held_out}.pt",
        )  # fmt: skip
        info = {
            "architecture": arch,
            "anatomies": [a for a in anatomies if a != held_out],
            "operating_point": {"threshold": threshold, "fp_per_study": TARGET_FP_PER_STUDY},
            "weights": path.name,
            "sha256": registry.sha256_file(path),
            "studies": len(own),
        }
        registry.write_fold(NAME, VERSION, f"holdout-{held_out}", info, root)
        written.append(path)
    net = fit(studies, recipe)
    threshold = threshold_at(studies, leave_one_out(studies, recipe))
    card = {
        "architecture": arch,
        "features": list(cad_rerank.FEATURES),
        "recipe": {**recipe, "optimiser": f"L-BFGS, {ITERATIONS} iterations, seed {SEED}"},
        "operating_point": {
            "threshold": threshold,
            "fp_per_study": TARGET_FP_PER_STUDY,
            "chosen": "the lowest threshold keeping false calls within 1 per study on the "
            "validation outlines, each ranked by a model fitted without its anatomy",
        },
        "training": {"data": data, "anatomies": anatomies},
        "validation": evaluation,
        "intended_use": "research only; NOT FOR CLINICAL USE",
        "input": "ml.runtime.cad_rerank.outline_features of each outlined nodule",
    }
    if isinstance(net.head, torch.nn.Linear):  # a linear model's weights say what it learnt
        weights = net.head.weight[0].tolist()
        card["coefficients"] = dict(zip(cad_rerank.FEATURES, weights, strict=True))
    written.append(
        registry.save(net, name=NAME, version=VERSION, task="cad-rerank", card=card, root=root)
    )
    full = registry.read_card(NAME, VERSION, root)
    (root / NAME / VERSION / "card.md").write_text(card_markdown(full))
    return written


def _classifier_data() -> dict:
    try:
        card = registry.read_card(cad.CAD_MODEL, cad.CAD_VERSION)
    except registry.ModelError:
        return {}
    return card.get("training", {}).get("data", {})


def _figures(row: dict) -> str:
    f, op = row["froc"], row["operating_point"]
    at = f["sensitivity_at"]
    return (
        f"CPM {f['cpm']:.3f}; sensitivity at 1/8, 1, 8 false calls per study "
        f"{at['0.125']:.2f}, {at['1']:.2f}, {at['8']:.2f}; at the operating point "
        f"{op['false_calls_per_study']:.2f} false calls per study, "
        f"{op['reported_share_6mm']:.2f} of nodules >= 6 mm reported"
    )


def card_markdown(card: dict) -> str:
    """The card for people."""
    v, data = card["validation"], card["training"]["data"]
    recipe = {k: card["recipe"][k] for k in ("hidden", "l2")}
    chosen = next((r for r in v.get("recipes", []) if r["recipe"] == recipe), None)
    hidden = card["architecture"]["hidden"]
    network = f"one hidden layer of {hidden}" if hidden else "logistic regression"
    lines = [
        f"# Model card: {card['name']} {card['version']}",
        "",
        "**NOT FOR CLINICAL USE.**",
        "",
        "The nodule CAD's second stage (`ml/runtime/cad_rerank.py`): each outlined nodule scored "
        "again from its outline's shape and density, the candidate it was drawn from and the "
        "classifier's score, read against the study's other outlines.",
        "",
        f"- Input: {len(card['features'])} features: " + "; ".join(card["features"]),
        f"- Network: {network} on standardised features, L2 {card['recipe']['l2']:g}, "
        f"{card['recipe']['optimiser']}",
        f"- Weights: `{card['weights']}`, sha256 `{card['sha256']}` (float16)",
        f"- Operating threshold {card['operating_point']['threshold']:.4f}: "
        f"{card['operating_point']['chosen']}",
        "",
        "## Training data",
        "",
        f"{data['description']} {data['studies']} studies of "
        f"{', '.join(card['training']['anatomies'])}; {data['outlines_total']} outlines, "
        f"{data['outlined_nodules']} on a nodule ({data['outlines']}). Fold models (one without "
        "each anatomy, for the evaluation) are fitted the same way on the other five.",
        "",
        *[f"- {c}" for c in data.get("citations", [])],
        "",
        "## Validation (leave one anatomy out)",
        "",
        "Each anatomy's outlines ranked by a model fitted on the other five:",
        "",
        f"- the classifier's own scores: {_figures(v['classifier'])}"
        if "froc" in v.get("classifier", {})
        else "- the classifier's own scores: not measured",
    ]
    if chosen is not None:
        lines.append(f"- this recipe: {_figures(chosen)}")
    if card.get("coefficients"):
        lines += [
            "",
            "## What it weighs",
            "",
            "Its coefficients on the standardised features (a logistic regression's, largest "
            "first; positive: more like a nodule). The features are correlated (the classifier's "
            "score enters three ways, the blob's density and the outline's too), so one "
            "coefficient is not that feature's effect alone:",
            "",
            *[
                f"- {w:+.2f} {name}"
                for name, w in sorted(card["coefficients"].items(), key=lambda t: -abs(t[1]))
            ],
        ]
    lines += [
        "",
        "The figures on patients never seen are in `docs/models/report.md`.",
        "",
        "## Intended use",
        card["intended_use"],
        "",
        "## Known limits",
        "- It reorders only the outlines the CAD draws (the classifier's best candidates); a nodule"
        " the classifier ranks below them stays unfound.",
        "- Fitted on validation composites: real LIDC nodules inserted into six real CTs, labels "
        "true by construction; not clinical reads.",
        "",
    ]
    return "\n".join(lines)


def outline_files(folder: Path, outliner: str, limit: int) -> list[Path]:
    """The outlines of :mod:`ml.training.cad_outlines` in ``folder`` drawn by ``outliner`` (a
    reference, or 'classical') with ``limit`` outlines per study."""
    classical = outliner == registry.CLASSICAL_OUTLINE
    pattern = f"*.limit{limit}.json" if classical else f"*.{outliner}.*.limit{limit}.json"
    paths = sorted(Path(folder).glob(pattern))
    if classical:  # not the outliner's files, which end the same way
        paths = [p for p in paths if p.name.count("@") == 1]
    return paths


def fit_and_register(
    paths: Sequence[Path],
    out: Path,
    *,
    register_models: bool = True,
    root: Path = registry.MODELS_DIR,
    outliner: str = registry.CAD_OUTLINER,
    limit: int = cad.OUTLINED,
    log=print,
) -> dict:
    """Evaluate every recipe on the outlines of ``paths`` leave one anatomy out, write the
    tables to ``out`` and, if one beats the classifier and ``register_models``, register it
    (shipped and fold models). Returns the tables."""
    studies = [from_outlines(s) for s in cad_outlines.load(paths)]
    if len({s.anatomy for s in studies}) < 3:
        raise ValueError("the second stage needs validation outlines of at least three anatomies")
    evaluation = evaluate(studies)
    recipe = choose(evaluation)
    doc = {
        "what": "the nodule CAD's second stage on validation outlines, leave one anatomy out "
        "(ml.training.cad_rerank)",
        "outliner": outliner,
        "outlines_per_study": limit,
        "studies": len(studies),
        **evaluation,
        "chosen": recipe,
    }
    Path(out).write_text(json.dumps(doc, indent=1) + "\n")
    c = evaluation["classifier"]
    log(f"classifier: CPM {c['froc']['cpm']:.3f}, {json.dumps(c['operating_point'])}")
    for row in evaluation["recipes"]:
        log(f"{row['recipe']}: CPM {row['froc']['cpm']:.3f}, {json.dumps(row['operating_point'])}")
    log(f"chosen: {recipe}")
    if register_models and recipe is not None:
        source = f"{len(paths)} files of ml.training.cad_outlines, {limit} outlines per study"
        for p in register(studies, recipe, evaluation, source, root):
            log(f"wrote {p}")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outlines", type=Path, required=True, help="ml.training.cad_outlines cache")
    ap.add_argument("--outliner", default=registry.CAD_OUTLINER, help="whose outlines to read")
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the validation tables")
    ap.add_argument("--limit", type=int, default=cad.OUTLINED, help="outlines per study read")
    ap.add_argument("--register", action="store_true", help="write the chosen recipe's models")
    ap.add_argument("--root", type=Path, default=registry.MODELS_DIR)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    paths = outline_files(a.outlines, a.outliner, a.limit)
    fit_and_register(
        paths, a.out, register_models=a.register, root=a.root, outliner=a.outliner, limit=a.limit
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
