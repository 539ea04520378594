"""``parity run`` for the plant catalogue: the same phases and exit status, with the
DeepSpeed runs cached across plants (cached_trainer.py) and the step-0 diagnosis.

``PARITY_PLANT=NAME PYTHONPATH=tests/plants:. python tests/plants/run_plant.py CONFIG
--out DIR --cache DIR [--precisions fp32] [--zero-stages 1] [--steps N] [k=v ...]``
prints ``diagnosis: <headline>`` first among its verdict lines, writes
``DIR/diagnosis.json`` and exits 0 only when every check passes. ``--diagnose-only``
diagnoses the runs already in ``--out`` again (same plant in ``PARITY_PLANT``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    from lmspec.config import load_config
    from lmspec.data import Dataset
    from lmspec.weights import load_safetensors
    from parity import localize
    from parity import run as P
    from parity.run_cmd import finish

    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--zero-stages", default="1")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--diagnose-only", action="store_true",
                    help="no runs: diagnose the runs already in --out (report.json)")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    precisions = tuple(args.precisions.split(","))
    stages = tuple(int(s) for s in args.zero_stages.split(","))

    def trainer_cmd(side: str) -> list[str]:
        if side == "torch":
            return [sys.executable, str(HERE / "cached_trainer.py"), str(args.cache)]
        return P.default_trainer_cmd(side)

    opts = P.ParityOptions(out=args.out, zero_stages=stages, precisions=precisions,
                           steps_fp32=args.steps, steps_bf16=args.steps,
                           trainer_cmd=trainer_cmd)
    if args.diagnose_only:
        result = json.loads((Path(args.out) / "report.json").read_text())
        result.pop("diagnosis", None)
    else:
        result = P.run_parity(cfg, opts, config_source=args.config)
    diag = result.get("diagnosis") or {}
    if "category" not in diag:  # run_parity localises only runs with a failing check
        out = Path(args.out).resolve()
        runs = {}
        for spec in P.plan_runs(out, stages, precisions, args.steps, args.steps):
            try:
                runs[spec.label] = P.read_run(spec)
            except (OSError, ValueError, KeyError) as e:
                runs[spec.label] = P.RunData(spec, error=str(e))
        batch = Dataset.from_config(cfg).global_batch(0)
        weights = load_safetensors(out / "init_weights.safetensors")
        diag = localize.diagnose(cfg, weights, batch, runs, result["checks"])
    (Path(args.out) / "diagnosis.json").write_text(json.dumps(diag, indent=1, default=str))
    print(f"diagnosis: {diag.get('headline')}", flush=True)
    print(f"category: {diag.get('category')}", flush=True)
    if args.diagnose_only:
        return 0
    return finish(result)


if __name__ == "__main__":
    raise SystemExit(main())
