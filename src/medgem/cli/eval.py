"""`medgem eval TASK --data FILE --out DIR` and `medgem eval compare DIR1 DIR2`."""

from __future__ import annotations

import argparse
import json
import sys

from medgem import progress
from medgem.cli.common import add_model_args, load_from_args, print_notice

TASK_HELP = {
    "medqa": "MedQA JSONL (question, options, answer_idx); --data handwritten uses the bundled set",
    "medmcqa": "MedMCQA JSON lines (question, opa..opd, cop)",
    "pubmedqa": "PubMedQA ori_pqal.json or JSONL (contexts, final_decision yes/no/maybe)",
    "mmlu": "MMLU-style CSV (question, A, B, C, D, answer), with or without a header",
    "vqa": "SLAKE or VQA-RAD JSON (closed/open answer_type): token F1, closed accuracy",
    "classify": "image classification CSV path,label (labels joined by '|' for multi-label)",
    "report": "report generation JSONL/CSV (image, report): ROUGE-L, BLEU",
    "ehrqa": "EHR-QA JSONL (question, answer, answer_type, metadata)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="score a model on a benchmark file, with CIs and subgroup gaps",
        description="Score a model on medical QA, VQA, classification, report generation or EHR-QA data. "
        "Writes results.json, report.html (with plots) and predictions.jsonl to --out; rerunning into the same "
        "--out resumes. `medgem eval compare DIR1 DIR2` puts two runs side by side.",
    )
    tasks = parser.add_subparsers(dest="eval_task", metavar="TASK")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", required=True, help="the data file (see the task's format)")
    common.add_argument("--out", required=True, help="output folder (resumes if it holds this run)")
    add_model_args(common)
    common.add_argument("--limit", type=int, default=None, help="only the first N items")
    common.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    common.add_argument("--subgroups", default="", help="comma-separated metadata columns, e.g. sex,age_band; a "
                        "numeric one is binned: age:10 (bands of width 10), age:q4 (quartiles), plain age (quartiles "
                        "when it has more than 8 values)")
    common.add_argument("--batch-size", type=int, default=8, help="prompts per model call")
    common.add_argument("--max-new-tokens", type=int, default=None, help="generation length (default per task)")
    common.add_argument("--chat", action="store_true", help="send prompts as a user turn (instruction-tuned models)")
    common.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    for name, text in TASK_HELP.items():
        task = tasks.add_parser(name, parents=[common], help=text, description=text)
        _task_options(task, name)
        task.set_defaults(func=run_eval)
    cmp = tasks.add_parser("compare", help="side-by-side table of two finished runs",
                           description="Compare two runs of the same task (e.g. base vs fine-tuned).")
    cmp.add_argument("first", help="first run's --out folder")
    cmp.add_argument("second", help="second run's --out folder")
    cmp.add_argument("--seed", type=int, default=0, help="seed of the paired bootstrap")
    cmp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cmp.set_defaults(func=run_compare)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


MCQ_TASKS = ("medqa", "medmcqa", "pubmedqa", "mmlu")


def _task_options(parser: argparse.ArgumentParser, task: str) -> None:
    """The options only some tasks use, on those tasks alone (`eval medqa --help` lists what medqa takes);
    the others get the RunConfig defaults."""
    if task in (*MCQ_TASKS, "classify"):
        parser.add_argument("--method", choices=["generate", "loglik"], default="generate",
                            help="generate and parse the answer, or score each option by log-likelihood")
    if task == "classify":
        parser.add_argument("--threshold", type=float, default=0.5, help="classification decision threshold")
    if task == "ehrqa":
        parser.add_argument("--budget", type=int, default=2048, help="prompt tokens for a record read from FHIR "
                            "(with --method agent: split evenly over the tool results)")
        parser.add_argument("--method", choices=["generate", "agent"], default="generate",
                            help="answer from one budgeted context (as `medgem ehr ask`), or through the records "
                            "agent's tool calls (as `medgem ehr agent`; transcripts in OUT/transcripts/)")
        parser.add_argument("--agent-steps", type=int, default=4, help="most model turns per question (agent)")


def run_eval(args: argparse.Namespace) -> int:
    from medgem.eval.report import text_summary
    from medgem.eval.runner import RunConfig, evaluate
    from medgem.eval.tasks import load_task

    print_notice()
    task = load_task(args.eval_task, args.data)  # read (and validate) the data before loading a model
    only = {k: getattr(args, k) for k in ("method", "threshold", "budget", "agent_steps")
            if hasattr(args, k)}  # _task_options
    cfg = RunConfig(
        model_name=args.model or "embedded", limit=args.limit, seed=args.seed,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, chat=args.chat,
        subgroups=[c.strip() for c in args.subgroups.split(",") if c.strip()], n_boot=args.n_boot,
        progress=progress.enabled(), **only,
    )
    cfg.validate(task)
    results = evaluate(task, load_from_args(args), args.out, cfg)
    print("\n".join(text_summary(results)))
    print(f"report: {args.out}/report.html")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from medgem.eval.compare import compare_runs, format_table

    print_notice()
    cmp = compare_runs(args.first, args.second, seed=args.seed)
    sys.stdout.write((json.dumps(cmp, indent=2) if args.json else format_table(cmp)) + "\n")
    return 0
