"""The nodule CAD's outlines on validation studies, and the reporting rule chosen on them.

Each anatomy's validation composites (LIDC validation-split nodules, inserted by
:func:`ml.evaluation.unseen.iter_studies` with `VALIDATION_SEED`: never the evaluation's seed or
its test-split nodules) go through the whole CAD (:func:`ml.runtime.cad.run_cad`) with the fold
model that never saw the anatomy. Every outline is kept with its classifier score, its size and
mean density and whether it hits a nodule by the evaluation's rule. The classifier's candidate
samples (:mod:`ml.training.cad_samples`) cannot show what an outline looks like; these can.

On them, :func:`table` measures a reporting rule (a floor of mean density and one of size: an
outline below either ranks below every other and is not reported) by the validation FROC's CPM,
the false calls per study at the operating point and the share of nodules >= 6 mm reported;
:func:`leave_one_anatomy_out` chooses the rule for each anatomy on the other five, which shows
whether the choice carries over to anatomy it was not made on. :func:`outline_comparison` sets
each nodule's outline by the CAD beside the classical baseline's lesion outline on the same lungs
(whether the CAD should take the baseline's outline for large nodules, as it does for masses).

With ``--outliner REF`` the outlines are drawn by an outline U-Net (where the classical outline
is at least ``--from-mm`` wide; 0: every nodule) and set nodule by nodule beside the classical
outlines of the same studies (:func:`outliner_comparison`), which is how the CAD's default
outliner was chosen.

Each outline keeps its measurements and the candidate it was drawn from, which the CAD's second
stage (:mod:`ml.training.cad_rerank`) is fitted on.

Run ``python -m ml.training.cad_outlines --data DIR --cache DIR --out FILE``. Imports `ml.data`,
`ml.evaluation`, `ml.image` and `ml.runtime`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ml.data.backgrounds import ANATOMIES
from ml.data.nodules import read_nodule_table
from ml.data.splits import rows_in
from ml.evaluation import unseen
from ml.evaluation.froc import ScanDetections, froc
from ml.image.blobs import Blob
from ml.runtime import cad, nodule_outline, registry
from ml.runtime.baseline import detect_lesions

VALIDATION_SEED = 48_200_000  # the validation composites; the evaluation's is 9_100_000
STUDIES_PER_ANATOMY = 6  # 36 studies, 180 nodules: each of the 165 validation nodules once or so
DENSITY_FLOORS_HU = (-2000.0, -500.0, -450.0, -400.0, -350.0, -300.0)  # -2000: no floor
SIZE_FLOORS_MM = (0.0, 4.0, 5.0, 6.0)
REPORTABLE_MM = 6.0  # nodules from this size count in the reported share (Lung-RADS)


@dataclass(frozen=True)
class Outline:
    score: float  # the classifier's
    mass: bool
    diameter_mm: float  # of the sphere of the outline's volume
    mean_hu: float | None
    hit: int | None  # index of the nodule it hits
    # What the second stage reads (ml.runtime.cad_rerank): the outline's measurements and the
    # candidate it was drawn from (None for a mass and in outlines collected before them).
    measurement: dict | None = None
    seed: dict | None = None


@dataclass(frozen=True)
class NoduleOutlines:
    """One inserted nodule and how well each pipeline outlined it (Dice as the evaluation's:
    the outlines that hit it, whatever their score, in its box grown by 10 mm; None where no
    outline hits it)."""

    diameter_mm: float
    cad_dice: float | None
    baseline_dice: float | None


@dataclass(frozen=True)
class OutlineStudy:
    study_id: str
    anatomy: str
    nodules: list[NoduleOutlines]
    threshold: float  # the fold model's operating threshold
    outlines: list[Outline]

    @property
    def nodule_diameters_mm(self) -> list[float]:
        return [n.diameter_mm for n in self.nodules]


def _dice(labels: np.ndarray, n: int, study: unseen.Study) -> list[float | None]:
    hits = unseen.match(labels, n, study.labels, study.truths, study.spacing)
    overlap = unseen.lesion_overlap(labels, hits, study)
    return [ov["dice"] if i in hits else None for i, ov in enumerate(overlap)]


def _as_dict(seed: Blob | None) -> dict | None:
    """The candidate as JSON keeps it (its centre a list), so a saved study loads equal."""
    return None if seed is None else {**seed.to_dict(), "centre_zyx": list(seed.centre_zyx)}


def outline_study(
    study: unseen.Study,
    model: registry.LoadedModel,
    limit: int = cad.OUTLINED,
    outliner: cad.Segmenter | None = None,
    from_mm: float = cad.LEARNT_OUTLINE_FROM_MM,
    *,
    scored: cad.Scored | None = None,
    baseline: tuple[np.ndarray, list] | None = None,
) -> OutlineStudy:
    """The CAD's outlines (at most ``limit``, drawn by ``outliner`` if given, where the
    classical outline is at least ``from_mm`` wide) on one study, what each hits, and each
    nodule's outline by the CAD and by the classical baseline's lesion detector on the same
    lungs. ``scored`` and ``baseline`` (:func:`detect_lesions`'s result), where given, are this
    study's already (so several outliners cost one classifier run)."""
    if scored is None:
        scored = cad.score_candidates(study.hu, study.spacing, model)
    r = cad.outline_scored(
        study.hu, study.spacing, scored, limit=limit, outliner=outliner, outliner_from_mm=from_mm
    )
    hits = unseen.match(r.lesion_labels, len(r.lesions), study.labels, study.truths, study.spacing)
    outlines = [
        Outline(
            r.scores[i],
            i < r.masses,
            unseen.equivalent_diameter(m.voxel_volume_mm3),
            m.mean_hu,
            hits[i],
            m.to_dict(),
            _as_dict(r.seeds[i]),
        )
        for i, m in enumerate(r.lesions)
    ]
    base_labels, base = baseline or detect_lesions(study.hu, r.lung_mask, study.spacing)
    nodules = [
        NoduleOutlines(t.diameter_mm, c, b)
        for t, c, b in zip(
            study.truths,
            _dice(r.lesion_labels, len(r.lesions), study),
            _dice(base_labels, len(base), study),
            strict=True,
        )
    ]
    return OutlineStudy(study.study_id, study.anatomy, nodules, r.threshold, outlines)


def collect(
    data_dir: Path,
    folder: Path,
    anatomies: Sequence[str] = ANATOMIES,
    k: int = STUDIES_PER_ANATOMY,
    *,
    model: str = f"{cad.CAD_MODEL}@{cad.CAD_VERSION}",
    limit: int = cad.OUTLINED,
    outliner: str | None = None,
    from_mm: float = cad.LEARNT_OUTLINE_FROM_MM,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Outline (or reuse from ``folder``, where the same models and limit outlined them) ``k``
    validation composites of each anatomy, each with the fold model of ``model`` that held the
    anatomy out, nodules drawn by the ``outliner`` model (a reference; where the classical
    outline is at least ``from_mm`` wide) or classically."""
    crop_dir = Path(data_dir) / "lidc-nodules"
    rows = rows_in(read_nodule_table(crop_dir / "nodules.csv", crop_dir), "validation")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    studies = unseen.iter_studies(
        data_dir, ANATOMIES, k, rows=rows, seed=VALIDATION_SEED, mirror_first=False,
        only=list(anatomies),
    )  # fmt: skip
    drawn = nodule_outline.Outliner(registry.load(outliner)) if outliner else None
    for study in studies:
        if study.kind != "composite":  # the real CTs as they are belong to the evaluation
            continue
        # The models and the limit are in the name: a cache of other outlines is never reused.
        name = f"{study.study_id}.{model}"
        classical = folder / f"{name}.limit{limit}.json"
        path = folder / f"{name}.{outliner}.from{from_mm:g}mm.limit{limit}.json"
        path = path if outliner else classical
        # An outliner's study is outlined classically too: both share the candidates and the
        # classifier's scores, which take most of the time.
        todo = [(path, drawn)] + ([(classical, None)] if outliner else [])
        todo = [(p, d) for p, d in todo if not p.exists()]
        if todo:
            start = time.perf_counter()
            fold = registry.load(f"{model}#holdout-{study.anatomy}")
            scored = cad.score_candidates(study.hu, study.spacing, fold)
            baseline = detect_lesions(study.hu, scored.found.lung_mask, study.spacing)
            for p, d in todo:
                done = outline_study(
                    study, fold, limit, d, from_mm, scored=scored, baseline=baseline
                )
                p.write_text(json.dumps(asdict(done)))
                found = sum(o.hit is not None for o in done.outlines)
                log(
                    f"{p.name}: {len(done.outlines)} outlines, {found} on a nodule, "
                    f"{time.perf_counter() - start:.0f}s"
                )
        out.append(path)
    return out


def load(paths: Sequence[Path]) -> list[OutlineStudy]:
    out = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        d["outlines"] = [Outline(**o) for o in d["outlines"]]
        d["nodules"] = [NoduleOutlines(**n) for n in d["nodules"]]
        out.append(OutlineStudy(**d))
    return out


def ranking(o: Outline, density_floor: float, size_floor_mm: float) -> float:
    """What an outline ranks by under a rule: as :attr:`ml.runtime.cad.CadResult.ranking`."""
    if o.mass:
        return 1.0
    below = cad.is_faint(o.mean_hu, density_floor) or o.diameter_mm < size_floor_mm
    return o.score - 1.0 if below else o.score


def table(
    studies: Sequence[OutlineStudy],
    density_floor: float,
    size_floor_mm: float,
    limit: int | None = None,
) -> dict:
    """Validation FROC (CPM and sensitivity at each rate) and, at each fold model's operating
    threshold, false calls per study and the share of nodules >= `REPORTABLE_MM` reported.
    ``limit``: only the first outlines of each study, as the CAD outlining no more would give
    (it outlines in a fixed order: masses, then candidates by score)."""
    scans, false_calls, big, big_reported = [], 0, 0, 0
    for s in studies:
        outlines = s.outlines[:limit]
        ranks = [ranking(o, density_floor, size_floor_mm) for o in outlines]
        scans.append(
            ScanDetections(
                s.study_id,
                len(s.nodule_diameters_mm),
                [(r, o.hit) for r, o in zip(ranks, outlines, strict=True)],
                s.anatomy,
            )
        )
        reported = [o for r, o in zip(ranks, outlines, strict=True) if o.mass or r >= s.threshold]
        false_calls += sum(o.hit is None for o in reported)
        found = {o.hit for o in reported if o.hit is not None}
        for i, d in enumerate(s.nodule_diameters_mm):
            if d >= REPORTABLE_MM:
                big += 1
                big_reported += i in found
    f = froc(scans)
    return {
        "density_floor_hu": density_floor,
        "size_floor_mm": size_floor_mm,
        "cpm": f.cpm,
        "sensitivity_at": {f"{k:g}": v for k, v in f.at_rates.items()},
        "false_calls_per_study": false_calls / max(1, len(studies)),
        "reported_share_6mm": big_reported / big if big else float("nan"),
        "studies": len(studies),
        "nodules": f.nodules,
        "outlines_per_study": limit or max((len(s.outlines) for s in studies), default=0),
    }


def rules() -> list[tuple[float, float]]:
    return list(itertools.product(DENSITY_FLOORS_HU, SIZE_FLOORS_MM))


def choose(studies: Sequence[OutlineStudy]) -> tuple[float, float]:
    """The rule with the best validation CPM (ties: the lower floors, the first in `rules`)."""
    options = rules()
    return max(options, key=lambda r: (round(table(studies, *r)["cpm"], 9), -options.index(r)))


def leave_one_anatomy_out(studies: Sequence[OutlineStudy]) -> dict:
    """Each anatomy's rule chosen on the other anatomies' studies, and the validation figures of
    all studies each under the rule chosen without its anatomy."""
    anatomies = sorted({s.anatomy for s in studies})
    chosen = {a: choose([s for s in studies if s.anatomy != a]) for a in anatomies}
    scans = []
    for s in studies:
        density, size = chosen[s.anatomy]
        scans.append(
            ScanDetections(
                s.study_id,
                len(s.nodule_diameters_mm),
                [(ranking(o, density, size), o.hit) for o in s.outlines],
                s.anatomy,
            )
        )
    f = froc(scans)
    return {
        "chosen": {a: {"density_floor_hu": d, "size_floor_mm": z} for a, (d, z) in chosen.items()},
        "cpm": f.cpm,
        "sensitivity_at": {f"{k:g}": v for k, v in f.at_rates.items()},
    }


def outline_comparison(studies: Sequence[OutlineStudy], min_diameter_mm: float = 0.0) -> dict:
    """Dice of the CAD's and the baseline's outlines on the nodules from ``min_diameter_mm``
    that both outlined: how many, their means, and on how many the CAD's is the better."""
    pairs = [
        (n.cad_dice, n.baseline_dice)
        for s in studies
        for n in s.nodules
        if n.diameter_mm >= min_diameter_mm and n.cad_dice is not None
        and n.baseline_dice is not None
    ]  # fmt: skip
    return _paired(pairs, min_diameter_mm, "cad", "baseline")


def _paired(pairs: list, min_diameter_mm: float, first: str, second: str) -> dict:
    """How many (Dice of ``first``, Dice of ``second``) pairs, their means, and on how many
    each one's is the better."""
    return {
        "min_diameter_mm": min_diameter_mm,
        "nodules": len(pairs),
        f"{first}_mean_dice": float(np.mean([a for a, _ in pairs])) if pairs else None,
        f"{second}_mean_dice": float(np.mean([b for _, b in pairs])) if pairs else None,
        f"{first}_better": sum(a > b for a, b in pairs),
        f"{second}_better": sum(b > a for a, b in pairs),
    }


def outliner_comparison(
    drawn: Sequence[OutlineStudy], classical: Sequence[OutlineStudy], min_diameter_mm: float = 0.0
) -> dict:
    """Dice of the CAD's outlines drawn by an outliner against its classical ones, on the same
    validation studies' nodules from ``min_diameter_mm`` that both outlined."""
    by_id = {s.study_id: s for s in classical}
    pairs = [
        (a.cad_dice, b.cad_dice)
        for s in drawn
        for a, b in zip(s.nodules, by_id[s.study_id].nodules, strict=True)
        if a.diameter_mm >= min_diameter_mm and a.cad_dice is not None
        and b.cad_dice is not None
    ]  # fmt: skip
    return {
        **_paired(pairs, min_diameter_mm, "outliner", "classical"),
        "outlined_by_outliner": sum(n.cad_dice is not None for s in drawn for n in s.nodules),
        "outlined_classically": sum(n.cad_dice is not None for s in classical for n in s.nodules),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True, help="folder for the outlines")
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the tables")
    ap.add_argument("--anatomies", default=",".join(ANATOMIES))
    ap.add_argument("--studies", type=int, default=STUDIES_PER_ANATOMY)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--limit", type=int, default=cad.OUTLINED, help="outlines per study")
    ap.add_argument("--outliner", default=None, help="outline model reference (default classical)")
    ap.add_argument(
        "--from-mm",
        type=float,
        default=cad.LEARNT_OUTLINE_FROM_MM,
        help="the outliner draws where the classical outline is at least this wide (0: all)",
    )
    ap.add_argument("--collect-only", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    paths = collect(
        a.data,
        a.cache,
        a.anatomies.split(","),
        a.studies,
        limit=a.limit,
        outliner=a.outliner,
        from_mm=a.from_mm,
    )
    if a.collect_only:
        return 0
    studies = load(paths)
    density, size = choose(studies)
    rows = [table(studies, *r) for r in rules()]
    doc: dict = {
        "what": "the nodule CAD's outlines on validation composites, fold model per anatomy "
        "(ml.training.cad_outlines)",
        "rules": rows,
        "chosen_on_all": {"density_floor_hu": density, "size_floor_mm": size},
        "leave_one_anatomy_out": leave_one_anatomy_out(studies),
        "outlines_cad_vs_baseline": [outline_comparison(studies, d) for d in (0.0, 18.0)],
    }
    if a.outliner:  # beside the classical outlines of the same studies (collected if need be)
        classical = load(collect(a.data, a.cache, a.anatomies.split(","), a.studies, limit=a.limit))
        doc["outliner"] = a.outliner
        doc["outliner_from_mm"] = a.from_mm
        doc["outliner_vs_classical"] = [
            outliner_comparison(studies, classical, d) for d in (0.0, 6.0, 18.0)
        ]
        print("outliner vs classical:", json.dumps(doc["outliner_vs_classical"]))
    most = max((len(s.outlines) for s in studies), default=0)
    if most > cad.OUTLINED:  # outlined beyond the CAD's limit: what more outlines would give
        doc["by_outlines_per_study"] = [
            table(studies, density, size, limit) for limit in range(cad.OUTLINED, most + 1, 20)
        ]
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    for row in rows:
        print(
            f"density >= {row['density_floor_hu']:6.0f} HU, size >= {row['size_floor_mm']:.0f} mm:"
            f" CPM {row['cpm']:.3f}, {row['false_calls_per_study']:.2f} false calls per study,"
            f" {row['reported_share_6mm']:.3f} of nodules >= 6 mm reported"
        )
    print("chosen on all:", doc["chosen_on_all"])
    print("leave one anatomy out:", json.dumps(doc["leave_one_anatomy_out"]))
    print("outlines, CAD vs baseline:", json.dumps(doc["outlines_cad_vs_baseline"]))
    for row in doc.get("by_outlines_per_study", []):
        print(f"{row['outlines_per_study']} outlines per study: CPM {row['cpm']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
