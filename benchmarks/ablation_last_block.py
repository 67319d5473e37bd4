"""Why the last block's crosscoder lost its latents, and what brought them back (docs/training.md).

    python -m benchmarks.ablation_last_block [--jobs 2]

Trains the sanity pair's last-block crosscoder (SmolLM2-135M against itself, block 29 of 30) on
a 60k-token harvest to a 200k-token ceiling under each setting of SETTINGS, one thread per job,
and writes held-out explained variance, L0 and dead share at the end to
benchmarks/ablation_last_block.{json,md}. Settings differ from the default pair only where named.
The table of these settings in docs/training.md was measured with trainer version 3; this runs
the present trainer, whose resampling (versions 4 to 6: live second moment, up to 4% per
evaluation, on into the final decay) changes the rows that resample.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "ablation_last_block"
"""Where the settings' results land (git-ignored); the table goes beside it as .json and .md."""
BASE = {"layers": ["last"], "harvest": {"max_tokens": 60_000}, "train": {"tokens": 200_000}}
SETTINGS: dict[str, dict] = {
    "zero-bias start, no lr warm-up (trainer v2)": {"train": {"centre_init": False, "lr_warmup_frac": 0.0,
                                                              "l1_rate": 0.01}},
    "centred start": {"train": {"lr_warmup_frac": 0.0, "l1_rate": 0.01}},
    "centred, resampling <= 5% per evaluation": {"train": {"lr_warmup_frac": 0.0, "l1_rate": 0.01,
                                                           "resample_max": 0.05}},
    "centred, resampling <= 25% per evaluation": {"train": {"lr_warmup_frac": 0.0, "l1_rate": 0.01,
                                                            "resample_max": 0.25}},
    "centred, lr 3e-4": {"train": {"lr_warmup_frac": 0.0, "l1_rate": 0.01, "lr": 3.0e-4}},
    "BatchTopK k 64, AuxK after 10k tokens": {"crosscoder": {"architecture": "batchtopk", "k": 64,
                                                             "dead_after_tokens": 10_000},
                                              "train": {"lr_warmup_frac": 0.0}},
    "centred, lr warm-up 10%": {"train": {"l1_rate": 0.01}},
    "centred, lr warm-up 10%, L1 rate 0.03 (the default)": {},
}
DROP = ("fp32_cpu", "bf16_without_amx", "quick", "train_at", "seed_floor", "variants")


def params_for(name: str, change: dict) -> dict:
    """The sanity pair's params with BASE and `change` merged in (section by section)."""
    raw = yaml.safe_load((ROOT / "params" / "smollm2-same.yaml").read_text())
    for key in DROP:
        raw.pop(key, None)
    raw["name"] = "ablation-" + re.sub(r"[^a-z0-9]+", "-", name.lower())[:40].strip("-")
    for extra in (BASE, change):
        for key, value in extra.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    raw["seed_floor"] = {"seeds": 1}
    return raw


SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from hidden_signatures import io
from hidden_signatures.run import pipeline
run = pipeline.load_run(sys.argv[1])
layers = pipeline.validate(run)
pipeline.harvest(run, pipeline.pair_tokens(run), layers)
out = pipeline.train_layer(run, "last")
print(json.dumps(io.read_json(out / "convergence.json")))
"""


def run_one(name: str, change: dict, results: Path) -> dict:
    """Train one setting in its own process; returns its last held-out point and verdict."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(params_for(name, change)))
        env = dict(os.environ, HIDDEN_SIGNATURES_RESULTS=str(results), HIDDEN_SIGNATURES_FIGURES=str(results / "figures"),
                   OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, cwd=ROOT,
                              capture_output=True, text=True, check=True)
    record = json.loads(done.stdout.strip().splitlines()[-1])
    last = record["curve"][-1]
    return {"setting": name, "tokens": record["tokens"], "converged": record["converged"],
            "ev": last["ev_a"], "l0": last["l0"], "dead": last["dead_fraction"],
            "min_ev": min(row["ev_a"] for row in record["curve"][len(record["curve"]) // 4:])}


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | tokens | converged | held-out EV (lowest after the first quarter) | L0 | dead |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['tokens'] / 1e3:.0f}k | {'yes' if r['converged'] else 'no'} | "
              f"{r['ev']:.3f} ({r['min_ev']:.2f}) | {r['l0']:.0f} | {r['dead']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation_last_block", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="settings trained side by side (one thread each)")
    args = parser.parse_args(argv)
    results = OUT / "results"
    first, *rest = SETTINGS.items()
    rows = [run_one(*first, results)]  # harvests the shared store once
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        rows += list(pool.map(lambda item: run_one(*item, results), rest))
    OUT.mkdir(exist_ok=True)
    (OUT.parent / "ablation_last_block.json").write_text(json.dumps(rows, indent=1) + "\n")
    (OUT.parent / "ablation_last_block.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
