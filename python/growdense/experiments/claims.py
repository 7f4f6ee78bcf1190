"""The study's claims against ``growdense reproduce`` runs: one row per claim.

Reads every ``metrics.csv`` under the folders given (with the ``config.json``,
``growth_events.csv``, ``estimates.csv`` and ``evaluation.json`` written beside it) and
every per-epoch checkpoint (``checkpoints/*.last.pt``, which holds a model's history so
far), across seeds, and writes a markdown table claim | study | growdense | verdict, the
final losses per model and seed, the comparisons beyond the study and the estimators of
section 3.4. ``--export`` writes what it used (one folder per seed, which this command
reads back): the histories, every mini-batch loss, the finished models' reconstructions and
the two-sample tests of their samples, so that the results regenerate without the
checkpoints, which are not kept with them; ``--figures`` draws the study's Figures 4, 6 and
7 (and more) from the mini-batch losses, and the finished models' samples (with
``--data-dir``, their reconstructions too); ``--insert`` puts the markdown between
``<!-- claims:begin -->`` and ``<!-- claims:end -->`` in a file::

    python -m growdense.experiments.claims runs/study-seed0 runs/study-seed1 --out docs/study/claims.md \
        --export docs/study --figures docs/study/figures --insert docs/results.md

What "level" means is stated in the output: two models end level when their final test
losses differ by no more than the tolerance, the larger of 0.5 nats and the spread between
seeds of either model's final loss. A claim whose runs have not reached the configured
number of epochs is "pending".
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .output import markdown_table

__all__ = ["RunRecord", "Claim", "SampleTests", "load_records", "load_sample_tests", "assess", "claims_markdown",
           "export", "figures", "main"]

FLOOR_NATS = 0.5  # smallest tolerance for "level": below it, differences are not claimed either way
RECOVERY_EPOCHS = 5  # "stabilises quickly": the test loss is back at its pre-growth level within this many epochs
STUDY_TRAIN_SECONDS = 4034.42
STUDY_CROSSING_EPOCH = 37
SAMPLE_IMAGES = 2000  # prior samples per model for the two-sample test of "samples alike"
SAMPLE_PERMUTATIONS = 200
FIXED, APPROACH1, APPROACH2 = "fixed", "approach1-he", "approach2-he-first"


@dataclass
class RunRecord:
    """One model's per-epoch history and growth events, from one seed's output folder."""

    seed: int
    name: str
    epochs: int  # the configured number of epochs
    precision: str = "fp32"
    history: list[dict[str, float]] = field(default_factory=list)
    events: list[dict[str, float]] = field(default_factory=list)
    estimates: list[dict[str, float]] = field(default_factory=list)  # IWAE gap and Var log w during training
    steps: list[float] = field(default_factory=list)  # every mini-batch's training loss (checkpoints only)
    evaluation: Optional[dict[str, Any]] = None
    checkpoint: Optional[Path] = None  # the per-epoch checkpoint this history was read from
    capacity: Optional[tuple[int, int]] = None  # the hidden layers' capacities (checkpoints only)
    latent: Optional[int] = None  # the latent size (checkpoints only)
    # the final model's reconstructions of the first 16 test images as uint8 pixels (Figure 5's row)
    reconstruction: Optional[Any] = None

    @property
    def finished(self) -> bool:
        return len(self.history) >= self.epochs

    @property
    def final_test_loss(self) -> float:
        return self.history[-1]["test_loss"]


@dataclass
class SampleTests:
    """The two-sample tests of the "samples alike" claim, by pair of models ``(seed, name)``:
    computed from the final models where their checkpoints are read, carried from an export's
    ``samples.json`` where they are not. ``bandwidth`` is the kernel width every test uses."""

    bandwidth: Optional[float] = None
    results: dict[tuple[tuple[int, str], tuple[int, str]], tuple[float, float]] = field(default_factory=dict)
    note: str = ""  # where carried tests came from, kept through every export

    def to_json(self) -> dict[str, Any]:
        return {"images": SAMPLE_IMAGES, "permutations": SAMPLE_PERMUTATIONS, "bandwidth": self.bandwidth,
                "note": self.note, "tests": [{"a": list(a), "b": list(b), "mmd2": m, "p_value": p}
                                             for (a, b), (m, p) in sorted(self.results.items())]}


@dataclass
class Claim:
    claim: str
    study: str
    growdense: str
    verdict: str


def _number(v: str) -> Any:
    for kind in (int, float):  # ints stay ints, so an exported CSV reads back and writes out the same
        try:
            return kind(v)
        except (TypeError, ValueError):
            pass
    return v


def _numbers(row: dict[str, str]) -> dict[str, Any]:
    return {k: _number(v) for k, v in row.items()}


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file() or path.stat().st_size == 0:
        return []
    with path.open(newline="") as f:
        return [_numbers(r) for r in csv.DictReader(f)]


def _checkpoint_records(root: Path) -> list[RunRecord]:
    import torch

    out = []
    for path in sorted(Path(root).rglob("*.last.pt")):
        extra = torch.load(path, map_location="cpu", weights_only=True).get("extra") or {}
        trajectory = extra.get("trajectory")
        if not trajectory or "history" not in extra:
            continue  # not a reproduce checkpoint
        out.append(RunRecord(
            seed=int(trajectory["seed"]), name=trajectory["run"], epochs=int(trajectory["epochs"]),
            precision=str(trajectory.get("precision", "'fp32'")).strip("'\""),
            history=[dict(r) for r in extra["history"]], events=[dict(e) for e in extra["events"]],
            estimates=[dict(e) for e in extra.get("estimates", [])],
            steps=[float(v) for v in extra.get("steps", [])], checkpoint=path,
            capacity=tuple(ast.literal_eval(trajectory["target"])), latent=int(ast.literal_eval(trajectory["latent"]))))
    return out


def _read_arrays(path: Path) -> dict[str, Any]:
    import numpy as np

    if not path.is_file():
        return {}
    with np.load(path) as arrays:
        return {k: arrays[k] for k in arrays.files}


def _write_arrays(path: Path, arrays: dict[str, Any]) -> None:
    """``arrays`` as a compressed ``.npz``, left as it is when it holds them already (a zip
    archive stamps the time it was written)."""
    import numpy as np

    old = _read_arrays(path)
    if not arrays or (old.keys() == arrays.keys() and all(np.array_equal(old[k], v) for k, v in arrays.items())):
        return
    np.savez_compressed(path, **arrays)


def load_records(roots: Sequence[Path]) -> list[RunRecord]:
    """Every (seed, model) found under ``roots`` (output folders' CSVs and per-epoch
    checkpoints); where a model appears twice for a seed, the longer history wins."""
    import torch

    found: dict[tuple[int, str], RunRecord] = {}

    def add(rec: RunRecord) -> None:
        key = (rec.seed, rec.name)
        old = found.get(key)
        if old is not None and old.precision != rec.precision:
            raise ValueError(f"{rec.name} seed {rec.seed} was found trained at {old.precision} and at {rec.precision}; "
                             f"give the folders of one precision")
        if old is None or len(rec.history) > len(old.history):
            if old is not None and rec.evaluation is None:
                rec.evaluation = old.evaluation
            found[key] = rec
        else:
            old.evaluation = old.evaluation or rec.evaluation
            if len(rec.history) == len(old.history):  # the same run, read twice: keep what either adds
                if old.checkpoint is None:
                    old.checkpoint, old.capacity, old.latent = rec.checkpoint, rec.capacity, rec.latent
                old.steps = old.steps or rec.steps
                if old.reconstruction is None:
                    old.reconstruction = rec.reconstruction

    for root in roots:
        for rec in _checkpoint_records(root):
            add(rec)
        for metrics in sorted(Path(root).rglob("metrics.csv")):
            folder = metrics.parent
            config_file = folder / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(f"{config_file} is missing: a reproduce output folder has one beside "
                                        f"metrics.csv (it says the seed and the number of epochs)")
            cfg = json.loads(config_file.read_text())["config"]
            evaluation_file = folder / "evaluation.json"
            evaluations = json.loads(evaluation_file.read_text()) if evaluation_file.is_file() else {}
            rows, events = _read_csv(metrics), _read_csv(folder / "growth_events.csv")
            estimates = _read_csv(folder / "estimates.csv")
            steps, pixels = _read_arrays(folder / "steps.npz"), _read_arrays(folder / "reconstructions.npz")
            for name in dict.fromkeys(r["run"] for r in rows):
                rec = RunRecord(
                    seed=int(cfg["seed"]), name=name, epochs=int(cfg["epochs"]), precision=cfg.get("precision", "fp32"),
                    history=sorted((r for r in rows if r["run"] == name), key=lambda r: r["epoch"]),
                    events=[e for e in events if e["run"] == name],
                    estimates=[e for e in estimates if e["run"] == name],
                    evaluation=evaluations.get(name),
                    steps=steps[name].tolist() if name in steps else [],
                    reconstruction=torch.from_numpy(pixels[name]) if name in pixels else None,
                )
                add(rec)
    return sorted(found.values(), key=lambda r: (r.name, r.seed))


def _by_seed(records: Sequence[RunRecord], name: str) -> dict[int, RunRecord]:
    return {r.seed: r for r in records if r.name == name}


def _fmt(v: float, digits: int = 2) -> str:
    return f"{v:+.{digits}f}" if v else f"{v:.{digits}f}"  # no sign on zero


def _seeds_text(values: dict[int, str]) -> str:
    return "; ".join(f"seed {s}: {t}" for s, t in sorted(values.items()))


def tolerance(records: Sequence[RunRecord], names: Sequence[str]) -> float:
    """The larger of :data:`FLOOR_NATS` and the largest spread between seeds of the final
    test loss of any of ``names`` (finished runs only)."""
    spreads = [FLOOR_NATS]
    for name in names:
        finals = [r.final_test_loss for r in _by_seed(records, name).values() if r.finished]
        if len(finals) > 1:
            spreads.append(max(finals) - min(finals))
    return max(spreads)


def _paired(records: Sequence[RunRecord], a: str, b: str) -> dict[int, tuple[RunRecord, RunRecord]]:
    ra, rb = _by_seed(records, a), _by_seed(records, b)
    return {s: (ra[s], rb[s]) for s in sorted(set(ra) & set(rb))}


def _pending(pairs: dict[int, tuple[RunRecord, ...]]) -> Optional[str]:
    if not pairs:
        return "pending: no seed has both runs yet"
    short = [f"seed {s}: {r.name} at {len(r.history)}/{r.epochs} epochs"
             for s, rs in pairs.items() for r in rs if not r.finished]
    return "pending: " + "; ".join(short) if short else None


def crossing_epoch(grown: RunRecord, fixed: RunRecord, after: int = 0) -> Optional[int]:
    """The first epoch (1-based, after epoch ``after``) from which ``grown``'s test loss stays
    below ``fixed``'s to the end of the shorter history; None if it never does."""
    n = min(len(grown.history), len(fixed.history))
    below = [grown.history[i]["test_loss"] < fixed.history[i]["test_loss"] for i in range(n)]
    start = None
    for i in range(n - 1, after - 1, -1):
        if not below[i]:
            break
        start = i
    return None if start is None else start + 1


def recovery_epochs(run: RunRecord) -> list[Optional[int]]:
    """For each growth event: epochs until the test loss is back at or below the last
    pre-growth epoch's (None if never within the history)."""
    out: list[Optional[int]] = []
    losses = [r["test_loss"] for r in run.history]
    for e in run.events:
        g = int(e["epoch"])
        if g < 1:
            out.append(None)
            continue
        before = losses[g - 1]
        back = next((i - g + 1 for i in range(g, len(losses)) if losses[i] <= before), None)
        out.append(back)
    return out


def _widths_claim(records: Sequence[RunRecord], every: int) -> Claim:
    # Table 1: +32/+16 each phase from 32/16. Table 2: 256/128 for the first phase, then cut to
    # 32/16 and grown at once to 64/32, then as Approach 1 (256/128 in the last phase).
    expected = {
        APPROACH1: lambda p: (32 * (p + 1), 16 * (p + 1)),
        APPROACH2: lambda p: (256, 128) if p == 0 else (32 * (p + 1), 16 * (p + 1)),
    }
    checked, wrong, unfinished = [], [], False
    for name, widths in expected.items():
        for r in _by_seed(records, name).values():
            for row in r.history:
                p = min(int(row["epoch"]) // every, 7)
                if (int(row["h1"]), int(row["h2"])) != widths(p):
                    wrong.append(f"{name} seed {r.seed} epoch {int(row['epoch']) + 1}")
            checked.append(f"{name} seed {r.seed} ({len(r.history)} epochs)")
            unfinished |= not r.finished
    if not checked:
        return Claim("Widths follow Tables 1 and 2", "Tables 1 and 2", "no run yet", "pending")
    return Claim("Widths follow Tables 1 and 2", "Tables 1 and 2: 32/16 → 256/128 by +32/+16 every 25 epochs; "
                 "Approach 2 starts at 256/128 and is cut at epoch 25",
                 "checked every epoch of " + ", ".join(checked),
                 ("reproduced" + (" so far" if unfinished else "")) if not wrong
                 else "not reproduced: " + ", ".join(wrong[:3]))


def _level_claim(records: Sequence[RunRecord]) -> Claim:
    pairs = _paired(records, APPROACH1, FIXED)
    study = "the two models end at identical loss values, no significant improvement (Fig. 6)"
    pending = _pending(pairs)
    if pending:
        so_far = {}
        for s, (a, f) in pairs.items():
            n = min(len(a.history), len(f.history))
            la, lf = a.history[n - 1]["test_loss"], f.history[n - 1]["test_loss"]
            so_far[s] = f"at epoch {n}, {la:.2f} vs {lf:.2f} ({_fmt(la - lf)})"
        return Claim("Approach 1 ends level with Fixed", study,
                     ("test loss so far, Approach 1 vs Fixed: " + _seeds_text(so_far)) if so_far else "-", pending)
    text = _seeds_text({s: f"{a.final_test_loss:.2f} vs {f.final_test_loss:.2f} ({_fmt(a.final_test_loss - f.final_test_loss)})"
                        for s, (a, f) in pairs.items()})
    tol = tolerance(records, [APPROACH1, FIXED])
    diffs = [a.final_test_loss - f.final_test_loss for a, f in pairs.values()]
    seeds = f" ({len(pairs)} seed{'s' if len(pairs) > 1 else ''}, tolerance {tol:.2f} nats)"
    if all(abs(d) <= tol for d in diffs):
        verdict = "reproduced" + seeds
    else:
        side = "above" if statistics.mean(diffs) > 0 else "below"
        verdict = f"not reproduced: Approach 1 ends {abs(statistics.mean(diffs)):.2f} nats {side} Fixed" + seeds
    return Claim("Approach 1 ends level with Fixed", study, "final test loss, Approach 1 vs Fixed: " + text, verdict)


def _crossing_claim(records: Sequence[RunRecord], every: int) -> Claim:
    pairs = _paired(records, APPROACH2, FIXED)
    study = f"Approach 2's loss below Fixed's from epoch {STUDY_CROSSING_EPOCH} on, and improving (Fig. 7)"
    # The study's epoch 37 is 12 epochs after its cut at 25; a shorter schedule scales it.
    ref = max(every + 1, round(STUDY_CROSSING_EPOCH * every / 25))
    per_seed = {}
    for s, (a, f) in pairs.items():
        e = crossing_epoch(a, f, after=every)
        at = (a.history[ref - 1]["test_loss"] - f.history[ref - 1]["test_loss"]
              if min(len(a.history), len(f.history)) >= ref else None)
        per_seed[s] = ((f"below from epoch {e}" if e is not None else "not below at the end")
                       + (f", at epoch {ref} {_fmt(at)}" if at is not None else "")
                       + f", final {_fmt(a.final_test_loss - f.final_test_loss)}")
    pending = _pending(pairs)
    text = "test loss, Approach 2 − Fixed: " + _seeds_text(per_seed) if per_seed else "-"
    if pending:
        return Claim("Approach 2 below Fixed from about epoch 37", study, text, pending)
    tol = tolerance(records, [APPROACH2, FIXED])
    diffs = [a.final_test_loss - f.final_test_loss for a, f in pairs.values()]
    crossings = [crossing_epoch(a, f, after=every) for a, f in pairs.values()]
    seeds = f" ({len(pairs)} seed{'s' if len(pairs) > 1 else ''}, tolerance {tol:.2f} nats)"
    if all(c is not None for c in crossings) and all(d < -tol for d in diffs):
        verdict = "reproduced" + seeds
    elif all(c is not None for c in crossings):
        verdict = "partly: below Fixed at the end, but within the tolerance" + seeds
    else:
        verdict = "not reproduced" + seeds
    return Claim("Approach 2 below Fixed from about epoch 37", study, text, verdict)


def _spike_claim(records: Sequence[RunRecord]) -> Claim:
    runs = list(_by_seed(records, APPROACH1).values())
    study = "the loss spikes at each growth, then quickly stabilises (Fig. 6)"
    if not runs:
        return Claim("Loss spikes at each growth, then stabilises", study, "-", "pending")
    jumps = [e["jump"] for r in runs for e in r.events]
    rec = [x for r in runs for x in recovery_epochs(r)]
    known = [x for x in rec if x is not None]
    text = (f"Approach 1, {len(jumps)} growths over {len(runs)} seed(s): probe loss jump "
            f"{min(jumps):.1f} to {max(jumps):.1f} nats; test loss back at its pre-growth level after "
            + ((f"{min(known)} to {max(known)} epochs" if min(known) < max(known) else
                f"{min(known)} epoch{'s' if min(known) > 1 else ''}") if known else "-")
            + (f" ({len(rec) - len(known)} not yet)" if len(known) < len(rec) else "")) if jumps else "no growth yet"
    if not all(r.finished for r in runs):
        return Claim("Loss spikes at each growth, then stabilises", study, text, "pending: runs unfinished")
    ok = jumps and all(j > 0 for j in jumps) and len(known) == len(rec) and max(known) <= RECOVERY_EPOCHS
    return Claim("Loss spikes at each growth, then stabilises", study, text,
                 "reproduced" if ok else f"not reproduced (a spike, or a recovery over {RECOVERY_EPOCHS} epochs)")


def _cut_claim(records: Sequence[RunRecord]) -> Claim:
    runs = list(_by_seed(records, APPROACH2).values())
    study = "a large spike at the first change (the cut to 32/16 and regrowth), Fig. 7"
    per_seed = {}
    big = []
    for r in runs:
        if not r.events:
            continue
        first, rest = r.events[0]["jump"], [e["jump"] for e in r.events[1:]]
        per_seed[r.seed] = f"{first:.1f} nats" + (f" vs at most {max(rest):.1f} at later growths" if rest else "")
        big.append(bool(rest) and first > max(rest))
    if not per_seed:
        return Claim("Large spike at Approach 2's cut", study, "-", "pending")
    verdict = "reproduced" if all(big) and all(r.finished for r in runs) else (
        "pending: runs unfinished" if not all(r.finished for r in runs) else "not reproduced")
    return Claim("Large spike at Approach 2's cut", study, "probe loss jump at the cut: " + _seeds_text(per_seed),
                 verdict)


def load_model(record: RunRecord):
    """The model at the end of ``record``'s history, from its per-epoch checkpoint, in eval mode."""
    from ..checkpoint import load_checkpoint
    from ..models.vae import VAE

    if record.checkpoint is None:
        raise ValueError(f"{record.name} seed {record.seed} was read without its checkpoint; give the folder that "
                         f"holds checkpoints/{record.name}.last.pt")
    last = record.history[-1]
    model = VAE(int(last["h1"]), int(last["h2"]), capacity=record.capacity, latent=record.latent)
    load_checkpoint(record.checkpoint, model, restore_global_rng=False, map_location="cpu")
    return model.eval()


def _final(records: Sequence[RunRecord], name: str) -> dict[int, RunRecord]:
    """The finished runs of ``name``, by seed."""
    return {s: r for s, r in _by_seed(records, name).items() if r.finished}


def _p_text(p: float) -> str:
    return f"p ≤ {p:.3f}" if p <= 1 / (1 + SAMPLE_PERMUTATIONS) + 1e-12 else f"p = {p:.3f}"


def load_sample_tests(roots: Sequence[Path]) -> SampleTests:
    """The two-sample tests kept in the ``samples.json`` files under ``roots`` (written by
    :func:`export`)."""
    tests = SampleTests()
    for path in sorted(p for root in roots for p in Path(root).rglob("samples.json")):
        data = json.loads(path.read_text())
        if (data["images"], data["permutations"]) != (SAMPLE_IMAGES, SAMPLE_PERMUTATIONS):
            continue  # another test's settings: not comparable
        if tests.bandwidth is not None and abs(data["bandwidth"] - tests.bandwidth) > 1e-9 * tests.bandwidth:
            raise ValueError(f"{path} holds tests at kernel width {data['bandwidth']}, others at {tests.bandwidth}: "
                             f"give the folders of one study")
        tests.bandwidth = data["bandwidth"]
        tests.note = " ".join(n for n in (tests.note, data.get("note", "")) if n)
        for t in data["tests"]:
            a, b = (int(t["a"][0]), str(t["a"][1])), (int(t["b"][0]), str(t["b"][1]))
            tests.results[(a, b)] = (float(t["mmd2"]), float(t["p_value"]))
    return tests


def _samples_claim(records: Sequence[RunRecord], tests: Optional[SampleTests] = None) -> Claim:
    """Approach 1's samples against Fixed's per seed, against the distance between two Fixed
    seeds' samples. A test is computed where both final models' checkpoints are read, else
    taken from ``tests`` (which receives the computed ones)."""
    import torch

    from .two_sample import median_bandwidth, mmd_test

    title = "Grown and fixed models' samples alike"
    study = ("the images generated by the grown model cannot be told apart by eye from the fixed model's "
             "(section 4.2.1, Approach 1)")
    tests = SampleTests() if tests is None else tests
    roles = {FIXED: 0, APPROACH1: 1, APPROACH2: 2}  # an independent draw per model
    finals = {name: _final(records, name) for name in roles}
    fixed = finals[FIXED]
    drawn: dict[tuple[int, str], Any] = {}
    carried: list[tuple[tuple[int, str], tuple[int, str]]] = []  # the tests used that were not computed here

    def samples(key: tuple[int, str]):
        if key not in drawn:
            g = torch.Generator().manual_seed(1000 * (key[0] + 1) + roles[key[1]])
            drawn[key] = load_model(finals[key[1]][key[0]]).sample(SAMPLE_IMAGES, g)
        return drawn[key]

    if fixed and fixed[min(fixed)].checkpoint is not None:
        h = median_bandwidth(samples((min(fixed), FIXED)))
        if tests.bandwidth is not None and abs(h - tests.bandwidth) > 1e-6 * h:
            tests.results.clear()  # measured on another scale: not comparable
            tests.note = ""
        tests.bandwidth = h

    def test(a: tuple[int, str], b: tuple[int, str]) -> Optional[tuple[float, float]]:
        ra, rb = finals[a[1]].get(a[0]), finals[b[1]].get(b[0])
        if ra is None or rb is None:
            return None
        if ra.checkpoint is not None and rb.checkpoint is not None and tests.bandwidth is not None:
            t = mmd_test(samples(a), samples(b), bandwidth=tests.bandwidth, permutations=SAMPLE_PERMUTATIONS,
                         generator=torch.Generator().manual_seed(0))
            tests.results[(a, b)] = (t.mmd2, t.p_value)
        elif (a, b) in tests.results:
            carried.append((a, b))
        return tests.results.get((a, b))

    def text_of(results: dict[int, Optional[tuple[float, float]]]) -> str:
        return _seeds_text({s: "not measured (a final model's checkpoint was not kept)" if t is None
                            else f"{t[0]:.4f} ({_p_text(t[1])})" for s, t in results.items()})

    seeds = sorted(set(fixed) & set(finals[APPROACH1]))
    versus = {s: test((s, APPROACH1), (s, FIXED)) for s in seeds}
    if not any(t is not None for t in versus.values()):
        return Claim(title, study, "-", "pending: needs a seed whose Fixed and Approach 1 have finished "
                                        "(their checkpoints hold the final models)")
    parts = ["Approach 1 vs Fixed: " + text_of(versus)]
    seeds2 = sorted(set(fixed) & set(finals[APPROACH2]))
    if seeds2:
        parts.append("Approach 2 vs Fixed: " + text_of({s: test((s, APPROACH2), (s, FIXED)) for s in seeds2}))
    verdict = "pending: needs the finished Fixed models of two seeds (how far apart two Fixed models' samples are)"
    if len(fixed) >= 2:
        s0, s1 = sorted(fixed)[:2]
        yard = test((s0, FIXED), (s1, FIXED))
        if yard is not None:
            parts.append(f"Fixed seed {s0} vs Fixed seed {s1}: {yard[0]:.4f} ({_p_text(yard[1])})")
            measured = [t for t in versus.values() if t is not None]
            if all(t[0] <= yard[0] for t in measured):
                verdict = ("reproduced: Approach 1's samples are no further from Fixed's than two Fixed seeds' are "
                           "apart")
            else:
                verdict = ("not reproduced in distribution: Approach 1's samples are further from Fixed's than two "
                           "Fixed seeds' are apart (by eye: the samples figures)")
    text = (f"kernel two-sample test, {SAMPLE_IMAGES:,} prior samples per model (mean images; Gaussian kernel of "
            f"width {tests.bandwidth:.2f}, the median distance between Fixed seed {min(fixed)}'s samples), MMD²: "
            + "; ".join(parts))
    if carried:
        text += " (the tests of final models whose checkpoints were not kept: as exported in samples.json)"
    return Claim(title, study, text, verdict)


def _time_claim(records: Sequence[RunRecord]) -> Claim:
    runs = [r for r in _by_seed(records, APPROACH1).values()]
    study = f"{STUDY_TRAIN_SECONDS:.2f} s of training for Approach 1 (hardware not stated)"
    if not runs:
        return Claim("Training time", study, "-", "pending")
    per_seed = {}
    for r in runs:
        times = [row.get("train_time", row.get("epoch_time", 0.0)) for row in r.history]
        per_seed[r.seed] = (f"{sum(times):.0f} s over {len(times)} epochs (median epoch {statistics.median(times):.1f} s"
                            f", x{r.epochs} = {statistics.median(times) * r.epochs:.0f} s)")
    return Claim("Training time", study, "training steps of Approach 1: " + _seeds_text(per_seed),
                 "not comparable (other hardware; the study's is not stated)"
                 if all(r.finished for r in runs) else "pending: runs unfinished")


def assess(records: Sequence[RunRecord], *, every: int = 25, sample_tests: Optional[SampleTests] = None) -> list[Claim]:
    """One :class:`Claim` per claim of the study, from ``records``; ``sample_tests`` holds the
    two-sample tests of models read without their checkpoints and receives those computed."""
    return [_widths_claim(records, every), _level_claim(records), _crossing_claim(records, every),
            _spike_claim(records), _cut_claim(records), _samples_claim(records, sample_tests), _time_claim(records)]


def final_losses_table(records: Sequence[RunRecord]) -> str:
    seeds = sorted({r.seed for r in records})
    rows = []
    for name in dict.fromkeys(r.name for r in records):
        runs = _by_seed(records, name)
        cells = []
        for s in seeds:
            r = runs.get(s)
            cells.append("-" if r is None else f"{r.final_test_loss:.2f}" + (
                "" if r.finished else f" (epoch {len(r.history)}/{r.epochs})"))
        rows.append([name] + cells)
    return markdown_table(["model"] + [f"seed {s}" for s in seeds], rows)


# One factor at a time: (question, model, against).
COMPARISONS = [
    ("Adam state kept at growth (keep) instead of a new Adam (reset), Approach 1", "approach1-he-keep", APPROACH1),
    ("Adam state kept at growth (keep) instead of a new Adam (reset), Approach 2", "approach2-he-first-keep",
     APPROACH2),
    ("function-preserving init (zero_out) instead of He, Approach 1", "approach1-zero_out", APPROACH1),
    ("function-preserving init (zero_out) instead of He, Approach 2", "approach2-zero_out-first", APPROACH2),
    ("keep the largest-norm neurons at the cut instead of the first, Approach 2", "approach2-he-norm", APPROACH2),
    ("grown to 256/128 (Approach 1) against staying at 32/16 from scratch", APPROACH1, "fixed-32x16"),
    ("gradient-guided init (gradmax) instead of He, Approach 1", "approach1-gradmax", APPROACH1),
    ("gradient-guided init (tiny) instead of He, Approach 1", "approach1-tiny", APPROACH1),
    ("gradient-guided init (gradmax) instead of He, Approach 2", "approach2-gradmax-first", APPROACH2),
    ("gradient-guided init (tiny) instead of He, Approach 2", "approach2-tiny-first", APPROACH2),
    ("gradient-guided init (gradmax) instead of He, Approach 2, Adam state kept", "approach2-gradmax-first-keep",
     "approach2-he-first-keep"),
    ("gradient-guided init (tiny) instead of He, Approach 2, Adam state kept", "approach2-tiny-first-keep",
     "approach2-he-first-keep"),
    ("grown with gradmax (Approach 1) against Fixed 256/128", "approach1-gradmax", FIXED),
    ("grown with tiny (Approach 1) against Fixed 256/128", "approach1-tiny", FIXED),
    ("grown with gradmax (Approach 2) against Fixed 256/128", "approach2-gradmax-first", FIXED),
    ("grown with tiny, Adam state kept (Approach 2) against Fixed 256/128", "approach2-tiny-first-keep", FIXED),
    ("Adam state kept (keep) instead of reset, gradmax, Approach 1", "approach1-gradmax-keep", "approach1-gradmax"),
    ("Adam state kept (keep) instead of reset, tiny, Approach 1", "approach1-tiny-keep", "approach1-tiny"),
    ("Adam state kept (keep) instead of reset, gradmax, Approach 2", "approach2-gradmax-first-keep",
     "approach2-gradmax-first"),
    ("Adam state kept (keep) instead of reset, tiny, Approach 2", "approach2-tiny-first-keep", "approach2-tiny-first"),
]


def _same_start(a: RunRecord, b: RunRecord) -> bool:
    """Whether two runs start at the same widths (so that, from one seed, they are one computation until one changes)."""
    first_a, first_b = a.history[0], b.history[0]
    return (int(first_a["h1"]), int(first_a["h2"])) == (int(first_b["h1"]), int(first_b["h2"]))


def comparisons_table(records: Sequence[RunRecord], *, every: int = 25) -> str:
    """The final test loss of each comparison's model minus its reference's, per seed (only
    the comparisons with both models present), beside the same difference after epoch
    ``every``: until their first growth or cut the two models train the same computation
    from the same seed, so that difference is what rounding alone (another machine or
    thread count) gives."""
    rows = []
    for question, model, ref in COMPARISONS:
        pairs = _paired(records, model, ref)
        if not pairs:
            continue
        final, before = {}, {}
        for s, (a, b) in pairs.items():
            n = min(len(a.history), len(b.history))
            d = a.history[n - 1]["test_loss"] - b.history[n - 1]["test_loss"]
            final[s] = _fmt(d) + ("" if a.finished and b.finished else f" (at epoch {n}, unfinished)")
            if n >= every and _same_start(a, b):
                before[s] = _fmt(a.history[every - 1]["test_loss"] - b.history[every - 1]["test_loss"])
        rows.append([f"{question} (`{model}` − `{ref}`)", _seeds_text(final),
                     _seeds_text(before) if before else "-"])
    header = ["comparison", "model − reference, final test loss (nats)",
              f"the same after epoch {every}, where both are still one computation (nats; - where they start "
              f"at other widths)"]
    return markdown_table(header, rows) if rows else ""


def estimates_table(records: Sequence[RunRecord]) -> str:
    """Per model and seed, at each measured epoch: the IWAE gap (IWAE bound − ELBO) and the
    variance of log w = log p(x, z) − log q(z | x) under q (Eq. 3.3), both on test images."""
    rows = [[r.name, r.seed, ", ".join(f"{int(e['epoch']) + 1}: {e['gap']:.2f} / {e['logw_var']:.1f}"
                                       for e in r.estimates)] for r in records if r.estimates]
    return markdown_table(["model", "seed", "epoch: IWAE gap (nats) / Var log w"], rows) if rows else ""


def _var_at(rows: Sequence[dict[str, Any]], key: str, n: int) -> str:
    row = next((r for r in rows or () if int(r[key]) == n), None)
    return "-" if row is None else f"{row['var']:.3g}"


def evaluation_table(records: Sequence[RunRecord]) -> str:
    """The final models' evaluation (``evaluation.json``): test ELBO and IWAE bound, and the
    variance of three estimators of log p(x) at 1 and 100 samples."""
    rows = []
    for r in records:
        ev = r.evaluation
        if not ev:
            continue
        iwae = ev.get("iwae", {}).get("1000")
        rows.append([r.name, r.seed, f"{ev['elbo']:.2f}", "-" if iwae is None else f"{iwae:.2f}"] + [
            f"{_var_at(ev.get(key), n, 1)} / {_var_at(ev.get(key), n, 100)}"
            for key, n in (("variance", "L"), ("logw_variance", "L"), ("iwae_variance", "K"))])
    header = ["model", "seed", "ELBO", "IWAE K=1000", "Var, study's estimator, L=1 / 100",
              "Var, mean of log w, L=1 / 100", "Var, IWAE, K=1 / 100"]
    return markdown_table(header, rows) if rows else ""


def claims_markdown(records: Sequence[RunRecord], *, every: int = 25,
                    sample_tests: Optional[SampleTests] = None) -> str:
    """The claims table and the final test losses, as markdown (``sample_tests``: as :func:`assess`)."""
    rows = assess(records, every=every, sample_tests=sample_tests)
    out = [markdown_table(["claim", "study", "growdense", "verdict"],
                          [[c.claim, c.study, c.growdense, c.verdict] for c in rows]),
           "Test loss at the last epoch reached (nats per image):", "",
           final_losses_table(records)]
    comparisons = comparisons_table(records, every=every)
    if comparisons:
        out += ["Beyond the study, one factor at a time (negative: the model ends below its reference):", "",
                comparisons]
    evaluation = evaluation_table(records)
    if evaluation:
        out += ["The final models on the test set (`evaluation.json`; nats per image; variances of an estimate of "
                "log p(x) over independent draws, per image, averaged over the images; the study's estimator is "
                "the L-sample reconstruction term plus the analytic KL):", "", evaluation]
    estimates = estimates_table(records)
    if estimates:
        first = next(r for r in records if r.estimates).estimates[0]
        out += [f"Section 3.4, measured during training on {int(first['images'])} test images: the IWAE gap with "
                f"K = {int(first['samples'])}, and the variance of log w over K = {int(first['samples'])} samples "
                "from q(z | x), per image, averaged over the images. Both go to 0 as q(z | x) approaches the "
                "posterior:", "", estimates]
    out.append(f"Tolerance of \"level\": the larger of {FLOOR_NATS} nats and the largest spread between seeds of "
               f"either model's final test loss. \"Stabilises\": the test loss is back at its last pre-growth value "
               f"within {RECOVERY_EPOCHS} epochs. Epochs are counted from 1.")
    return "\n".join(out) + "\n"


def export(records: Sequence[RunRecord], dest: Path, sample_tests: Optional[SampleTests] = None) -> list[Path]:
    """Write ``records`` as ``dest/seed<k>/{config.json, metrics.csv, growth_events.csv,
    estimates.csv, evaluation.json, steps.npz, reconstructions.npz}`` (the last three for the
    models that have an evaluation, mini-batch losses, reconstructions: one array per model)
    and ``sample_tests`` as ``dest/samples.json``; :func:`load_records` and
    :func:`load_sample_tests` read them back."""
    import numpy as np

    from .output import write_csv, write_json

    folders = []
    for seed in sorted({r.seed for r in records}):
        runs = [r for r in records if r.seed == seed]
        epochs = {r.epochs for r in runs}
        if len(epochs) != 1:
            raise ValueError(f"seed {seed}'s runs were configured for different numbers of epochs {sorted(epochs)}; "
                             f"export them separately")
        folder = Path(dest) / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        precisions = {r.precision for r in runs}
        write_json(folder / "config.json", {"config": {"seed": seed, "epochs": epochs.pop(), "precision": precisions.pop()}})
        write_csv(folder / "metrics.csv", [row for r in runs for row in r.history])
        write_csv(folder / "growth_events.csv", [e for r in runs for e in r.events])
        write_csv(folder / "estimates.csv", [e for r in runs for e in r.estimates])
        evaluations = {r.name: r.evaluation for r in runs if r.evaluation}
        if evaluations:
            write_json(folder / "evaluation.json", evaluations)
        _write_arrays(folder / "steps.npz", {r.name: np.asarray(r.steps, dtype=np.float32) for r in runs if r.steps})
        _write_arrays(folder / "reconstructions.npz",
                      {r.name: r.reconstruction.numpy() for r in runs if r.reconstruction is not None})
        folders.append(folder)
    if sample_tests is not None and sample_tests.results:
        write_json(Path(dest) / "samples.json", sample_tests.to_json())
    return folders


def figures(records: Sequence[RunRecord], dest: Path, *, spike_window: int = 10, test: Any = None) -> list[Path]:
    """The study's Figures 4, 6 and 7 (and the growth spikes, every mini-batch loss, the IWAE
    gap) per seed, under ``dest/seed<k>/``, for the seeds with a model whose mini-batch losses
    are known (models without them are drawn from their per-epoch history); and its Figures 3
    and 5: the prior samples of the finished models read with their checkpoints, and the
    reconstructions of the ``test`` images if given (Fixed's row first, then the other finished
    models by name; a model read without its checkpoint gives its exported row, and a
    record's row is set where its model is loaded)."""
    from .config import RunSpec
    from .plots import image_figures, reconstructions_figure, to_pixels, training_figures
    from .training import add_spikes

    written = []
    for seed in sorted({r.seed for r in records}):
        runs = [r for r in records if r.seed == seed]
        folder = Path(dest) / f"seed{seed}"
        if any(r.steps for r in runs):
            results = []
            for r in runs:
                events = [dict(e) for e in r.events]
                if r.steps:
                    add_spikes(events, r.steps, spike_window)
                results.append({"spec": RunSpec.from_name(r.name), "history": r.history, "steps": r.steps,
                                "events": events, "estimates": r.estimates})
            written += training_figures(folder, results)
        finished = sorted((r for r in runs if r.finished), key=lambda r: (r.name != FIXED, r.name))
        loaded = {r.name: load_model(r) for r in finished if r.checkpoint is not None}
        if loaded:
            written += image_figures(folder, list(loaded.items()), seed)
        if loaded and test is not None:  # with no model loaded, Figure 5 has nothing new: left as drawn
            x = test[:16]
            for r in finished:
                if r.name in loaded:
                    r.reconstruction = to_pixels(loaded[r.name].reconstruct(x))
            missing = [r.name for r in finished if r.reconstruction is None]
            if missing:
                warnings.warn(f"seed {seed}'s reconstructions.png is drawn without {', '.join(missing)}: read "
                              f"without its checkpoint or an exported row", stacklevel=2)
            shown = [r for r in finished if r.reconstruction is not None]
            written.append(reconstructions_figure(folder / "reconstructions.png", x,
                                                  [r.reconstruction for r in shown], [r.name for r in shown]))
    return written


BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


def insert(text: str, path: Path) -> None:
    """Replace what lies between the markers ``<!-- claims:begin -->`` and
    ``<!-- claims:end -->`` in the markdown file ``path`` with ``text``."""
    doc = Path(path).read_text()
    start, end = doc.find(BEGIN), doc.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {BEGIN} ... {END} block to fill; add the two markers where the claims go")
    Path(path).write_text(doc[: start + len(BEGIN)] + "\n" + text + doc[end:])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m growdense.experiments.claims", description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", type=Path, help="folders holding reproduce outputs (searched recursively)")
    parser.add_argument("--every", type=int, default=25, help="epochs between growths (default 25, the study's)")
    parser.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    parser.add_argument("--export", type=Path, help="also write the histories used, one folder per seed")
    parser.add_argument("--figures", type=Path, help="also draw the training figures (Figures 4, 6, 7, ...) of the "
                        "models whose checkpoints were read, and the finished models' samples, one folder per seed")
    parser.add_argument("--data-dir", type=Path, help="with --figures: MNIST's folder, to draw the finished models' "
                        "reconstructions of the first 16 test images (the study's Figure 5)")
    parser.add_argument("--insert", type=Path, action="append", default=[],
                        help="also put the markdown between the claims markers of this file (repeatable)")
    args = parser.parse_args(argv)
    try:
        records = load_records(args.roots)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    if not records:
        parser.error(f"no metrics.csv or checkpoint under {', '.join(map(str, args.roots))}")
    try:
        sample_tests = load_sample_tests(args.roots)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    text = claims_markdown(records, every=args.every, sample_tests=sample_tests)
    if args.figures:
        test = None
        if args.data_dir is not None:
            from .data import load_mnist

            try:
                test = load_mnist(args.data_dir)[1][:16]
            except OSError as e:
                parser.error(str(e))
        for path in figures(records, args.figures, test=test):
            print(f"wrote {path}")
    if args.export:  # after the figures, which give the loaded models' reconstructions
        for folder in export(records, args.export, sample_tests):
            print(f"wrote {folder}")
    for path in args.insert:
        try:
            insert(text, path)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        print(f"updated {path}")
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    elif not args.insert:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
