"""`medgem ehr timeline|summarize|ask|agent|extract|synth`: FHIR records as timelines, summaries and answers.

timeline and summarize need no model. ask builds a context for the question under a token budget
(counted with the model's own tokenizer) and completes a short answer; with --qa it answers a whole
EHR-QA file in batches and reports exact-match accuracy. agent answers by calling tools over the record
instead (ehr/agent.py), showing each call and result. extract turns a lab report (text or PDF) into FHIR
Observations. synth writes synthetic patients, their QA set and text lab reports. --deid removes
identifiers and shifts dates before anything is rendered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medgem import progress
from medgem.cli.common import add_model_args, int_at_least, load_from_args, print_notice
from medgem.errors import InputError
from medgem.inputs.dicom import missing_path
from medgem.inputs.text import check_depth, read_text

DEFAULT_BUDGET = 2000


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ehr", help="FHIR records: timeline, summary, question answering, synthetic patients",
        description="Read FHIR R4 Bundles or Bulk Data NDJSON into a patient timeline, build token-budgeted "
        "contexts for questions, and generate synthetic patients with an EHR-QA set.",
    )  # fmt: skip
    actions = parser.add_subparsers(dest="ehr_action", metavar="ACTION", required=True)

    def record_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("bundle", metavar="RECORD", nargs=None if required else "?",
                       help="FHIR Bundle JSON, Bulk Data .ndjson file, or a folder of .ndjson files")  # fmt: skip
        p.add_argument("--patient", default=None, help="patient id, when the file holds several patients")
        p.add_argument("--lenient", action="store_true", help="skip and count invalid resources instead of failing")
        p.add_argument("--deid", action="store_true", help="redact identifiers and shift dates first")
        p.add_argument("--seed", type=int, default=0, help="seed of the de-identification date shift")

    timeline = actions.add_parser("timeline", help="print the chronological timeline",
                                  description="Print current problems, medications, allergies, latest labs "
                                  "and every event in date order.")  # fmt: skip
    record_args(timeline)
    timeline.set_defaults(func=run_timeline)

    summarize = actions.add_parser("summarize", help="print a summary (optionally written by the model)",
                                   description="Print the current-state summary and record span; with "
                                   "--narrative the model writes a prose summary from a budgeted context.")  # fmt: skip
    record_args(summarize)
    summarize.add_argument("--narrative", action="store_true", help="have the model write a prose summary")
    summarize.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="prompt token budget")
    summarize.add_argument("--max-new-tokens", type=int, default=200)
    add_model_args(summarize)
    summarize.set_defaults(func=run_summarize)

    ask = actions.add_parser(
        "ask", help="answer a question about a record, or a whole QA file (--qa)",
        description="Answer a question from a record within a token budget. With --qa QA.jsonl, answer "
        "every item (each names its record) in batches, write predictions to --out and report exact-match "
        "accuracy overall and per question kind, sex and age band.",
    )  # fmt: skip
    record_args(ask, required=False)
    ask.add_argument("question", nargs="?", help="the question (not with --qa)")
    ask.add_argument("--qa", type=Path, help="EHR-QA JSONL file (from `medgem ehr synth`)")
    ask.add_argument("--out", type=Path, help="predictions JSONL to write (with --qa)")
    ask.add_argument("--limit", type=int, default=None, help="answer only the first N items of --qa")
    ask.add_argument("--image", type=Path, help="an image (or DICOM) to ask about with the record")
    ask.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="prompt token budget")
    ask.add_argument("--retriever", choices=["bm25", "hybrid"], default="bm25",
                     help="excerpt ranking: BM25, or BM25 fused with MiniLM embeddings")  # fmt: skip
    ask.add_argument("--answer-type", choices=["quantity", "date", "yes_no", "count"], default=None,
                     help="answer format for a single question (default: guessed from the question)")  # fmt: skip
    ask.add_argument("--batch-size", type=int, default=8)
    ask.add_argument("--max-new-tokens", type=int, default=None)
    ask.add_argument("--show-context", action="store_true", help="print the prompt before the answer")
    add_model_args(ask)
    ask.set_defaults(func=run_ask)

    agent = actions.add_parser(
        "agent", help="answer a question by calling tools over the record (manifest, fetch by type)",
        description="Answer a question about one patient the way an agent does: the model calls "
        "get_manifest and fetch_resources (one resource type, filtered by code or date) over the local FHIR "
        "data, each call constrained so it always parses, then answers. Each call and result is shown; "
        "--transcript saves them. --deid de-identifies the record before any tool reads it.",
    )  # fmt: skip
    record_args(agent)
    agent.add_argument("question", help="the question")
    agent.add_argument("--max-steps", type=int_at_least(2), default=4,
                       help="most model turns, the last of which must answer (default 4)")  # fmt: skip
    agent.add_argument("--result-tokens", type=int_at_least(32), default=512,
                       help="most tokens of one tool result (the most recent entries are kept)")  # fmt: skip
    agent.add_argument("--answer-type", choices=["quantity", "date", "yes_no", "count"], default=None,
                       help="answer format (default: guessed from the question)")  # fmt: skip
    agent.add_argument("--transcript", type=Path, help="write the calls, results and messages to this JSON file")
    add_model_args(agent)
    agent.set_defaults(func=run_agent)

    extract = actions.add_parser(
        "extract", help="lab values in a report (text, PDF or page image) -> FHIR Observations",
        description="Read a lab report and write its values as FHIR R4 Observation resources in a Bundle, "
        "validated with fhir.resources. The model's answer is constrained to a JSON schema of lab values. A "
        "multimodal model reads a PDF's rendered pages; a text-only one reads its text layer (and says so).",
    )  # fmt: skip
    extract.add_argument("report", type=Path, help="a text report, a PDF, or a PNG/JPEG page")
    extract.add_argument("--out", type=Path, help="write the Bundle here (default: print it)")
    extract.add_argument("--subject", default=None, help="reference for Observation.subject, e.g. Patient/123")
    extract.add_argument("--max-new-tokens", type=int_at_least(16), default=768)
    add_model_args(extract)
    extract.set_defaults(func=run_extract)

    synth = actions.add_parser("synth", help="write synthetic FHIR patients and an EHR-QA set",
                               description="Write DIR/bundles/<id>.json (FHIR R4 Bundles), DIR/truth.jsonl "
                               "(ground-truth facts) and DIR/qa.jsonl (questions with exact answers).")  # fmt: skip
    synth.add_argument("--patients", type=int, default=50, help="how many synthetic patients")
    synth.add_argument("--seed", type=int, default=0, help="the same seed writes the same patients")
    synth.add_argument("--out", type=Path, required=True)
    synth.set_defaults(func=run_synth)


def _record(args: argparse.Namespace):
    from medgem.ehr.deid import deidentify
    from medgem.inputs.fhir import load_record

    record = load_record(args.bundle, lenient=args.lenient, patient_id=args.patient)
    if record.stats.total_skipped:
        reasons = ", ".join(f"{n} {r}" for r, n in record.stats.skipped.most_common())
        print(f"skipped {record.stats.total_skipped} invalid resources ({reasons})", file=sys.stderr)
    return deidentify(record, args.seed) if args.deid else record


def run_timeline(args: argparse.Namespace) -> int:
    from medgem.ehr.timeline import Timeline

    print_notice()
    print(Timeline(_record(args)).render())
    return 0


def run_summarize(args: argparse.Namespace) -> int:
    from medgem.ehr.timeline import Timeline

    print_notice()
    timeline = Timeline(_record(args))
    if not args.narrative:
        print(timeline.summary())
        return 0
    from medgem.ehr.context import ContextBuilder

    pipe = load_from_args(args)
    count = _counter(pipe)
    instruction = "\n\nA concise clinical summary of this patient's record:\n"
    budget = _fit_budget(pipe, args.budget, args.max_new_tokens) - count(instruction) - 1
    context = ContextBuilder(timeline, count).build("summary problems medications labs", budget, _window(pipe))
    print(pipe.generate(f"Patient record:\n{context.text}{instruction}", raw=True, temperature=0.0,
                        max_new_tokens=args.max_new_tokens, stop=["\n\n"]).strip())  # fmt: skip
    return 0


def _counter(pipe):
    return lambda text: len(pipe.tokenizer.encode(text, add_bos=False))


def _window(pipe) -> int | None:
    return getattr(pipe.config, "sliding_window", None)


def _fit_budget(pipe, budget: int, max_new_tokens: int) -> int:
    """The prompt budget, shrunk so prompt plus answer fit the model's context."""
    if budget < 100:
        raise InputError(f"--budget {budget} is too small for a record (use at least a few hundred tokens)")
    return min(budget, pipe.config.max_position_embeddings - max_new_tokens)


def _asker(args: argparse.Namespace, pipe, max_new_tokens: int):
    from medgem.ehr.qa import Asker

    embedder = None
    if args.retriever == "hybrid":
        from medgem.ehr.embed import MiniLM

        embedder = MiniLM()
    return Asker(_counter(pipe), _fit_budget(pipe, args.budget, max_new_tokens), deid=args.deid, seed=args.seed,
                 embedder=embedder, window=_window(pipe), lenient=args.lenient, patient_id=args.patient)  # fmt: skip


def run_ask(args: argparse.Namespace) -> int:
    from medgem.ehr import qa

    if args.qa is not None:
        if args.bundle or args.question or args.image:
            raise InputError("--qa answers a whole QA file; give no RECORD, question or --image with it")
        if args.out is None:
            raise InputError("--qa needs --out PREDICTIONS.jsonl")
        return _run_batch(args)
    if not args.bundle or not args.question:
        raise InputError('ask needs RECORD and "question" (or --qa QA.jsonl --out preds.jsonl)')
    if args.image is not None and not args.image.exists():
        raise InputError(f"--image {missing_path(args.image)}: no such file")
    print_notice()
    answer_type = args.answer_type or qa.infer_answer_type(args.question)
    max_new = args.max_new_tokens or (qa.MAX_NEW_TOKENS if answer_type else 96)
    pipe = load_from_args(args)
    with progress.step("reading the record"):
        prompt, _ = _asker(args, pipe, max_new).prompt(args.bundle, args.question, answer_type)
    if args.show_context:
        print(prompt, file=sys.stderr)
    with progress.step("answering"):
        if args.image is not None:
            message = [{"role": "user", "content": [{"type": "image", "image": str(args.image)},
                                                    {"type": "text", "text": prompt}]}]  # fmt: skip
            text = pipe.generate(message, max_new_tokens=max_new, temperature=0.0)
        else:
            text = pipe.generate(prompt, raw=True, max_new_tokens=max_new, temperature=0.0, stop=qa.STOP)
    print(qa.extract(text, answer_type) or text.strip())
    return 0


def run_agent(args: argparse.Namespace) -> int:
    from medgem.ehr import qa
    from medgem.ehr.agent import RecordsAgent

    print_notice()
    record = _record(args)  # read, validated and (with --deid) de-identified before a model loads
    pipe = load_from_args(args)
    agent = RecordsAgent(pipe, max_steps=args.max_steps, result_tokens=args.result_tokens)

    def show(step: int, call: dict) -> None:
        lines = call["result"].splitlines()
        more = f"\n   ... {len(lines) - 20} more lines" if len(lines) > 20 else ""
        print(f"step {step}: {call['call']['name']} {json.dumps(call['call']['arguments'])}\n   "
              + "\n   ".join(lines[:20]) + more, file=sys.stderr)

    answer_type = args.answer_type or qa.infer_answer_type(args.question)
    result = agent.ask(record, args.question, answer_type, on_step=show)  # the steps are the progress
    if result.stopped != "answered":
        print(f"(stopped: {result.stopped.replace('_', ' ')} after {len(result.steps)} tool calls)", file=sys.stderr)
    if args.transcript is not None:
        args.transcript.parent.mkdir(parents=True, exist_ok=True)
        args.transcript.write_text(json.dumps(result.transcript(), indent=1))
        print(f"transcript: {args.transcript}", file=sys.stderr)
    print(qa.extract(result.answer, answer_type) or result.answer)
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from medgem.ehr.extract import extract_labs
    from medgem.inputs.documents import read_document

    print_notice()
    read_document(args.report, images=False)  # a missing, empty, page-less or unreadable file fails before a load
    pipe = load_from_args(args)
    with progress.step("reading the report"):
        result = extract_labs(pipe, args.report, subject=args.subject, max_new_tokens=args.max_new_tokens)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    coded = sum("coding" in o["code"] for o in result.observations)
    print(f"{len(result.observations)} observation(s) from the {result.source} ({coded} with a LOINC code)"
          + ("" if result.observations else ": nothing written to FHIR but an empty Bundle"), file=sys.stderr)
    text = json.dumps(result.bundle(), indent=1)
    if args.out is None:
        print(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"bundle: {args.out}", file=sys.stderr)
    return 0


def _read_qa(path: Path, limit: int | None) -> list[dict]:
    if not path.exists():
        raise InputError(f"--qa {missing_path(path)}: no such file")
    items = []
    for number, line in enumerate(read_text(path, f"--qa {path.name}").splitlines(), 1):
        if not line.strip():
            continue
        check_depth(line, f"{path.name} line {number}")
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path.name} line {number}: not JSON") from None
        if not isinstance(item, dict):
            raise InputError(f"{path.name} line {number}: expected a JSON object")
        missing = {"bundle", "question", "answer", "answer_type"} - set(item)
        if missing:
            raise InputError(f"{path.name} line {number}: missing {', '.join(sorted(missing))}")
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise InputError(f"{path.name}: no QA items")
    return items


def _run_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from medgem.ehr import qa

    items = _read_qa(args.qa, args.limit)
    print_notice()
    max_new = args.max_new_tokens or qa.MAX_NEW_TOKENS
    pipe = load_from_args(args)
    asker = _asker(args, pipe, max_new)
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out, tqdm(total=len(items), desc="ehr ask", unit="q",
                                         disable=not progress.enabled()) as bar:
        for start in range(0, len(items), args.batch_size):
            batch = items[start : start + args.batch_size]
            prompts, contexts = [], []
            for item in batch:
                prompt, context = asker.prompt(args.qa.parent / item["bundle"], item["question"], item["answer_type"])
                prompts.append(prompt)
                contexts.append(context)
            texts = pipe.generate_batch(prompts, raw=True, max_new_tokens=max_new, temperature=0.0, stop=qa.STOP)
            for item, context, text in zip(batch, contexts, texts, strict=True):
                row = {k: item.get(k) for k in ("patient_id", "bundle", "question", "answer", "answer_type", "kind",
                                                "sex", "age_band")}  # fmt: skip
                row.update(prediction=text, extracted=qa.extract(text, item["answer_type"]),
                           correct=qa.exact_match(text, item["answer"], item["answer_type"]),
                           context_tokens=context.tokens, evidence_in_context=qa.evidence_found(item, context))  # fmt: skip
                rows.append(row)
                out.write(json.dumps(row) + "\n")
            out.flush()  # an interrupted run keeps every answered batch
            bar.update(len(batch))
    table = qa.accuracy_table(rows)
    table.update(model=pipe.source, budget=args.budget, retriever=args.retriever, deid=args.deid,
                 evidence_recall=sum(r["evidence_in_context"] for r in rows) / len(rows))  # fmt: skip
    print(json.dumps(table, indent=2))
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from medgem.ehr.synth import write

    if args.patients < 1:
        raise InputError("--patients must be at least 1")
    print_notice()
    summary = write(args.out, args.patients, args.seed, progress=progress.enabled())
    print(json.dumps(summary))
    print(f"try: medgem ehr timeline {summary['first_bundle']}\n"
          f"     medgem ehr ask {summary['first_bundle']} \"Most recent potassium?\"\n"
          f"     medgem ehr agent {summary['first_bundle']} \"Most recent potassium?\"\n"
          f"     medgem ehr extract {summary['first_report']}", file=sys.stderr)
    return 0
