"""Replay a study run without pruning through pruner settings: the epochs each would have spent and
the best value it would have kept, without training anything again.

    python benchmarks/pruning_replay.py --storage sqlite:///optuna.db --study cnn-none
    python benchmarks/pruning_replay.py --storage sqlite:///optuna.db --study cnn-none --json replay.json

The complete trials' per-epoch values (what `fer-exp tune --pruner none` reports) are fed, in trial
order, to each pruner as a live study would; a pruned trial stops at the epoch it is pruned. (A live
study's sampler would also propose other trials after a prune: the replay keeps the trial sequence.)
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings


def curves_of(study) -> list[list[float]]:
    return [[t.intermediate_values[e] for e in sorted(t.intermediate_values)]
            for t in study.trials if t.state.name == "COMPLETE" and t.intermediate_values]


def replay(curves: list[list[float]], pruner, direction: str = "maximize") -> dict:
    import optuna

    study = optuna.create_study(direction=direction, pruner=pruner)
    spent, kept, pruned_at = 0, [], []
    for curve in curves:
        trial = study.ask()
        for epoch, value in enumerate(curve, 1):
            trial.report(value, epoch)
            spent += 1
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                pruned_at.append(epoch)
                break
        else:
            study.tell(trial, curve[-1])
            kept.append(curve[-1])
    best = (max if direction == "maximize" else min)(kept) if kept else None
    return {"epochs": spent, "pruned_at": pruned_at, "best": best}


def pruners(epochs: int) -> dict:
    """The settings worth comparing: fer-exp's choices and their knobs."""
    import optuna

    from fer_exp.config import StudyConfig
    from fer_exp.tune import make_pruner

    out = {}
    for startup in (1, 2, 3):
        for warmup in (0, 1, 2):
            sc = StudyConfig(pruner="median", pruner_startup_trials=startup, pruner_warmup_epochs=warmup)
            out[f"median startup {startup} warmup {warmup}"] = make_pruner(sc, epochs)
    out["hyperband (fer-exp)"] = make_pruner(StudyConfig(pruner="hyperband"), epochs)
    out["successive halving min 2"] = optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=3)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, help="the Optuna storage URL of the study")
    parser.add_argument("--study", required=True, help="a study made with --pruner none")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table here")
    args = parser.parse_args(argv)
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from fer_exp.experiment import database_url, sqlite_file

    file = sqlite_file(args.storage) if args.storage.startswith("sqlite:") else None
    if file is not None and not file.is_file():  # opening it would leave an empty database there
        print(f"error: no Optuna storage at {file}; give the --storage of the study", file=sys.stderr)
        return 2
    try:
        study = optuna.load_study(study_name=args.study, storage=database_url(args.storage))
    except KeyError:
        print(f"error: no study {args.study!r} in {args.storage}", file=sys.stderr)
        return 2
    curves = curves_of(study)
    if not curves:
        print(f"error: study {args.study!r} has no complete trials with per-epoch values", file=sys.stderr)
        return 2
    direction = study.direction.name.lower()
    full = sum(len(c) for c in curves)
    unpruned = replay(curves, optuna.pruners.NopPruner(), direction)["best"]
    rows = []
    print(f"{len(curves)} trials, {full} epochs without pruning, best {unpruned:.4f}")
    for name, pruner in pruners(max(len(c) for c in curves)).items():
        result = replay(curves, pruner, direction)
        result |= {"pruner": name, "saved": round(1 - result["epochs"] / full, 3),
                   "best_lost": round(abs(unpruned - result["best"]), 4) if result["best"] is not None else None}
        rows.append(result)
        print(f"  {name:28s} {result['epochs']:4d} epochs ({100 * result['saved']:3.0f}% saved)  best "
              f"{result['best']:.4f} ({100 * result['best_lost']:.2f} points lost)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"study": args.study, "trials": len(curves), "epochs": full, "best": unpruned, "rows": rows}, fh,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
