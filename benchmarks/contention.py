"""Two medgem processes on the same cores: does each keep a fair share of its quiet-machine speed?

Runs `medgem bench` (the embedded model by default) alone, then two copies at once, for each OpenMP
wait setting given, and reports each copy's decode and prefill speed as a share of the quiet run.
With OpenMP threads that spin while they wait, a process that shares its cores spends its time slices
spinning for a partner thread that is not running; medgem's default (`medgem/__init__.py`) bounds that
spin. Writes benchmarks/results/contention.json.

    python benchmarks/contention.py
    python benchmarks/contention.py --settings default,GOMP_SPINCOUNT=300000 --model /tmp/scale/gemma3-4b-random-Q4_K_M.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MEDGEM = str(Path(sys.executable).with_name("medgem"))


def bench_command(args: argparse.Namespace, out: Path) -> list[str]:
    command = [MEDGEM, "bench", "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--runs", str(args.runs), "--json", str(out)]
    return command + (["--model", args.model] if args.model else []) + (["--quant", args.quant] if args.quant else [])


def run(args: argparse.Namespace, env: dict[str, str], copies: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"{i}.json" for i in range(copies)]
        procs = [subprocess.Popen(bench_command(args, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for out in outs]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"medgem bench failed: {err.strip()[-300:]}")
        return [json.loads(out.read_text()) for out in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="default,GOMP_SPINCOUNT=300000",
                    help="comma-separated: 'default' (medgem's own) or VAR=VALUE[;VAR=VALUE] environments")
    ap.add_argument("--model", default=None)
    ap.add_argument("--quant", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "contention.json"))
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    report = {"model": args.model or "embedded 270M", "quant": args.quant, "settings": {}}
    for setting in args.settings.split(","):
        env = dict(base)
        if setting != "default":
            env.update(pair.split("=", 1) for pair in setting.split(";"))
        alone = run(args, env, 1)[0]
        shared = run(args, env, 2)
        row = {"alone": {k: alone[k] for k in ("decode_tok_s", "prefill_tok_s")},
               "shared": [{k: r[k] for k in ("decode_tok_s", "prefill_tok_s")} for r in shared]}
        row["decode_share"] = [round(r["decode_tok_s"] / alone["decode_tok_s"], 3) for r in shared]
        row["prefill_share"] = [round(r["prefill_tok_s"] / alone["prefill_tok_s"], 3) for r in shared]
        report["settings"][setting] = row
        print(setting, json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
